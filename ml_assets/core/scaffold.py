"""`ml-assets init`: a complete, commented pipeline file written from a data file.

Everything comes from `spec.infer` (types, not-null, ranges with headroom, safe feature names); this
module adds what a person should look at: the task guessed from the target, the split (time when there
is a time column, else random and stratified), and columns that look like leakage (core.leakage: they
predict the target near perfectly, alone or together), flagged in a comment but kept, because only the
user knows what is known at prediction time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ml_assets.core.errors import UsageError
from ml_assets.core.leakage import predictive_hints
from ml_assets.core.spec.infer import (
    column_type,
    infer_columns,
    infer_features,
    resolve_paths,
    safe_name,
    sample_frame,
)
from ml_assets.core.spec.reference import SCHEMA_COMMENT, SCHEMA_FILE
from ml_assets.core.spec.schema import DEFAULT_METRIC, FeatureSpec

MULTICLASS_MAX = 20
# A text column with more values than a feature keeps by default (max_categories: 50) keeps them all, up
# to this many: the rest would become one "other" value, and a column of 400 shops lost most of its signal
# (bench/own_data.py wide_categorical: RMSE 1.69 against 1.14 for LightGBM on all values).
INIT_MAX_CATEGORIES = 1000


def _yaml(value: Any) -> str:
    """A scalar or flow collection as YAML (JSON is valid YAML, and quotes every odd name safely)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_yaml(k)}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, str) and value.replace("_", "").isalnum() and value.isascii() and value[0].isalpha():
        return (
            value
            if value.lower() not in ("yes", "no", "on", "off", "true", "false", "null")
            else f'"{value}"'
        )
    return json.dumps(value)


def guess_task(target: pl.Series) -> str:
    distinct = target.drop_nulls().n_unique()
    if distinct == 2:
        return "binary"
    if column_type(target.dtype) in ("str", "bool") or (
        target.dtype.is_integer() and distinct <= MULTICLASS_MAX
    ):
        return "multiclass"
    return "regression"


def leakage_hints(
    frame: pl.DataFrame, target: str, task: str, candidates: list[str], time: str | None = None
) -> dict[str, str]:
    """Column -> why it may only be known after the outcome: it predicts the target near perfectly
    (alone or with a few others), it is missing exactly where the target is, or it is named after it.
    Dates and times are not judged by predictive power: on a trend they interpolate any target."""
    y = frame.get_column(target)
    judged = [c for c in candidates if column_type(frame.get_column(c).dtype) not in ("date", "datetime")]
    hints = predictive_hints(frame, target, task, judged, time)
    for name in candidates:
        series = frame.get_column(name)
        if name in hints:
            continue
        if y.null_count() and series.null_count() and series.is_null().equals(y.is_null()):
            hints[name] = f"missing exactly where {target!r} is"
        elif target.lower() in name.lower():
            hints[name] = f"its name contains the target's, {target!r}"
    return hints


def _keeping_categories(features: list[dict[str, Any]], frame: pl.DataFrame) -> list[dict[str, Any]]:
    """Text features with more values than the default `max_categories` keep them all, up to
    INIT_MAX_CATEGORIES."""
    default_max = FeatureSpec.model_fields["max_categories"].default
    for feature in features:
        distinct = frame.get_column(feature.get("column", feature["name"])).n_unique()
        if feature["type"] == "categorical" and distinct > default_max:
            feature["max_categories"] = min(distinct, INIT_MAX_CATEGORIES)
    return features


def _pick_time(frame: pl.DataFrame, time: str | None) -> str | None:
    if time is not None:
        if time not in frame.columns:
            raise UsageError(f"--time: no column {time!r} in the file; columns: {frame.columns}")
        if column_type(frame.get_column(time).dtype) not in ("datetime", "date"):
            raise UsageError(f"--time: column {time!r} does not parse as dates or datetimes")
        return time
    stamps = [c for c in frame.columns if column_type(frame.get_column(c).dtype) in ("datetime", "date")]
    return stamps[0] if len(stamps) == 1 else None


def scaffold(
    pattern: str,
    target: str,
    out: Path,
    task: str | None = None,
    time: str | None = None,
    id_columns: list[str] | None = None,
    written_by: str | None = None,
) -> str:
    """The text of a pipeline file named after `out`, reading `pattern` (a file or glob); its header
    names the command that wrote it (default: `ml-assets init`)."""
    paths = resolve_paths(pattern, Path.cwd())
    frame = sample_frame(paths, ["", "NA"], rows=1_000_000)
    if target not in frame.columns:
        raise UsageError(f"--target: no column {target!r} in {paths[0]}; columns: {frame.columns}")
    for col in id_columns or []:
        if col not in frame.columns:
            raise UsageError(f"--id: no column {col!r} in {paths[0]}; columns: {frame.columns}")
    task = task or guess_task(frame.get_column(target))
    time = _pick_time(frame, time)
    name = safe_name(out.stem)
    source = safe_name(paths[0].name.split(".")[0])
    # The pipeline file reads its path relative to itself.
    shown = (
        pattern
        if pattern.startswith("pkg://")
        else os.path.relpath(os.path.abspath(pattern), out.parent.absolute())
    )
    columns = infer_columns(frame)
    constant = {c for c in frame.columns if frame.get_column(c).drop_nulls().n_unique() <= 1}
    ids = id_columns or []
    candidates = {
        c: columns[c]["type"] for c in frame.columns if c not in {target, *ids} and c not in constant
    }
    hints = leakage_hints(frame, target, task, list(candidates), time)
    features = _keeping_categories(infer_features(candidates, "features"), frame)
    lines = [
        # Editors that speak the YAML language server validate and complete the file against it.
        f"{SCHEMA_COMMENT}{SCHEMA_FILE}",
        f"# Written by {written_by or f'`ml-assets init {pattern} --target {target}`'} from {frame.height} rows "
        f"of {paths[0].name}.",
        "# Every value below was read from the data: check the types, the rules (ranges have headroom), the",
        "# features, and the columns flagged LEAKAGE? (move those known only after the outcome to leakage:).",
        f"name: {name}",
        f"task: {task}   # guessed from {frame.get_column(target).drop_nulls().n_unique()} distinct target values",
        "",
        "sources:",
        f"  {source}:",
        f"    path: {_yaml(shown)}",
    ]
    if ids:
        lines.append(f"    id: {_yaml(ids)}")
    else:
        lines.append("    # no id column: rows get the built-in _row_id (a hash of the row's values)")
    if time:
        lines.append(f"    timestamp: {_yaml(time)}")
    lines.append("    columns:")
    for col, spec in columns.items():
        series = frame.get_column(col)
        note = f"{series.n_unique()} distinct, {series.null_count() / max(frame.height, 1):.0%} missing"
        lines.append(f"      {_yaml(col)}: {_yaml(spec)}   # {note}")
    lines += ["", f"base: {source}"]
    if ids:
        lines.append(f"id: {_yaml(ids)}")
    if time:
        lines.append(f"timestamp: {_yaml(time)}")
    lines += [
        f"target: {{name: {_yaml(target)}, missing: drop}}",
        "leakage: []   # columns not known at prediction time: never features",
        "",
        "features:",
    ]
    for feature in features:
        column = feature.get("column", feature["name"])
        flag = f"   # LEAKAGE? {hints[column]}" if column in hints else ""
        lines.append(f"  - {_yaml(feature)}{flag}")
    for col in sorted(constant - {target}):
        lines.append(f"  # {_yaml(col)} is constant in the data: not a feature")
    return "\n".join(lines + _split_and_model(task, time))


def _split_and_model(task: str, time: str | None) -> list[str]:
    """The pipeline file's last lines: a split by time when there is a time column, else by shares."""
    classification = task != "regression"
    if time:
        split = {"method": "time", "test_fraction": 0.2, "valid_fraction": 0.1}
        why = f"the latest 20% of rows by {time!r} are the test set"
    else:
        split = {"method": "random", "test_fraction": 0.2, "valid_fraction": 0.1, "stratify": classification}
        why = "exact shares of the whole" + (", each class keeping its share" if classification else "")
    return [
        "",
        f"split: {_yaml(split)}   # {why}; train is the remaining 70%",
        f"model: {{metric: {DEFAULT_METRIC[task]}, time_budget_s: 60, max_trials: 10}}",
        "",
    ]


SAMPLE_TARGET = "churned"
SAMPLE_ID = "customer_id"


def write_churn_sample(path: Path, rows: int = 3000, seed: int = 0) -> Path:
    """A made-up customer table to start a pipeline from without data of one's own (`dg scaffold defs`):
    one row per customer, a signup date (a time split), numbers and categories with a known relation to
    whether the customer left, and nothing that is known only afterwards. Seeded: the same file every time."""
    rng = np.random.default_rng(seed)
    plans = np.array(["basic", "standard", "premium"])
    plan = rng.choice(plans, rows, p=[0.5, 0.3, 0.2])
    tenure = rng.integers(1, 72, rows)
    calls = rng.poisson(1.5, rows)
    charges = np.round(rng.normal(40, 8, rows) + 25 * (plan == "standard") + 45 * (plan == "premium"), 2)
    region = rng.choice(np.array(["north", "south", "east", "west"]), rows)
    signup = np.datetime64("2023-01-01") + rng.integers(0, 730, rows).astype("timedelta64[D]")
    # Short tenure, many support calls and a high bill make leaving likelier; the basic plan a little too.
    logit = -1.2 - 0.04 * tenure + 0.6 * calls + 0.02 * (charges - 60) + 0.4 * (plan == "basic")
    churned = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)
    frame = pl.DataFrame(
        {
            SAMPLE_ID: np.arange(1, rows + 1),
            "signup_date": np.sort(signup),
            "region": region,
            "plan": plan,
            "tenure_months": tenure,
            "monthly_charges": charges,
            "support_calls": calls,
            SAMPLE_TARGET: churned,
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_csv(path)
    return path
