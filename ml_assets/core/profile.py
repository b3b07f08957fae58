"""Data profile of a validated source (the EDA stage): per-column statistics, null and distinct shares,
histograms and top values, correlation with each target a pipeline builds from the source, and what
changed since the previous profile.

Bounded cost: statistics are computed on a reservoir sample of at most `sample_rows` rows (recorded in the
profile); only the row count reads the whole table. The previous profile is the JSON file written beside
the HTML page, so "what changed" needs no history table.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl

from ml_assets.core import figures
from ml_assets.core.spec import PipelineSpec
from ml_assets.core.sql import q

DEFAULT_SAMPLE_ROWS = 50_000
TOP_VALUES = 5
# Columns shown per figure: a profile page stays readable on a 100-column source.
MAX_HISTOGRAMS, MAX_TOP_VALUE_PLOTS = 12, 6
# What counts as a change between two profiles.
NULL_SHARE_CHANGE, MEAN_CHANGE_SD = 0.01, 0.1


@dataclass(frozen=True)
class Profile:
    source: str
    rows: int
    sampled_rows: int
    columns: pl.DataFrame  # one row per column
    correlations: dict[str, dict[str, float]]  # target name -> column -> Spearman correlation
    changes: list[str]
    plots: dict[str, Path]
    report: Path

    @property
    def null_share(self) -> float:
        """Share of empty cells in the sample: one number to watch across materializations."""
        if self.columns.height == 0:
            return 0.0
        return float(self.columns.get_column("null_share").mean())


def _is_numeric(dtype: pl.DataType) -> bool:
    return dtype.is_numeric() and dtype != pl.Boolean


def _column_stats(sample: pl.DataFrame) -> pl.DataFrame:
    rows = []
    n = max(sample.height, 1)
    for name in sample.columns:
        col = sample.get_column(name)
        numeric = _is_numeric(col.dtype)
        values = col.drop_nulls()
        top = values.cast(pl.String).value_counts(sort=True).head(TOP_VALUES) if not numeric else None
        rows.append(
            {
                "column": name,
                "type": str(col.dtype),
                "null_share": col.null_count() / n,
                "distinct_share": values.n_unique() / n,
                "min": float(values.min()) if numeric and values.len() else None,
                "median": float(values.median()) if numeric and values.len() else None,
                "mean": float(values.mean()) if numeric and values.len() else None,
                "max": float(values.max()) if numeric and values.len() else None,
                "std": float(values.std()) if numeric and values.len() > 1 else None,
                "top_values": ", ".join(f"{v} ({c})" for v, c in top.iter_rows()) if top is not None else "",
            }
        )
    return pl.DataFrame(
        rows, schema_overrides={k: pl.Float64 for k in ("min", "median", "mean", "max", "std")}
    )


def _spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    keep = ~(np.isnan(x) | np.isnan(y))
    if keep.sum() < 10:
        return None
    rx, ry = pl.Series(x[keep]).rank().to_numpy(), pl.Series(y[keep]).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _correlations(sample: pl.DataFrame, targets: dict[str, str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    numeric = [c for c in sample.columns if _is_numeric(sample.schema[c]) and c not in targets.values()]
    for target, column in targets.items():
        y = sample.get_column(column).cast(pl.Float64).to_numpy()
        # A target that is a column of the source is not correlated with itself (key: pipeline:target).
        others = [c for c in numeric if c != target.split(":", 1)[1]]
        scores = {c: _spearman(sample.get_column(c).cast(pl.Float64).to_numpy(), y) for c in others}
        out[target] = {c: round(s, 4) for c, s in scores.items() if s is not None}
    return out


def _targets_sql(source: str, pipelines: list[PipelineSpec], columns: list[str]) -> dict[str, str]:
    """target name -> SQL computing it on the source's own rows, for pipelines based on this source whose
    target needs no join (its expression's columns, or the target column itself, are the source's)."""
    out = {}
    for p in pipelines:
        needs = p.target.source_columns or [p.target.name]
        if p.base == source and set(needs) <= set(columns):
            out[f"{p.name}:{p.target.name}"] = p.target.expr or q(p.target.name)
    return out


def _sample(
    conn: duckdb.DuckDBPyConnection,
    table: str,
    columns: list[str],
    targets: dict[str, str],
    rows: int,
    sample_rows: int,
    seed: int,
) -> pl.DataFrame:
    extra = "".join(
        f", CAST(({expr}) AS DOUBLE) AS {q('_target_' + str(i))}" for i, expr in enumerate(targets.values())
    )
    sampling = (
        f" USING SAMPLE reservoir({sample_rows} ROWS) REPEATABLE ({seed})" if rows > sample_rows else ""
    )
    return conn.execute(f"SELECT {', '.join(q(c) for c in columns)}{extra} FROM {table}{sampling}").pl()


def _changes(previous: dict[str, Any] | None, columns: pl.DataFrame) -> list[str]:
    if previous is None:
        return ["first profile"]
    before = {c["column"]: c for c in previous["columns"]}
    out = [f"new column {c}" for c in columns.get_column("column") if c not in before]
    out += [f"column {c} is gone" for c in before if c not in set(columns.get_column("column"))]
    for now in columns.iter_rows(named=True):
        old = before.get(now["column"])
        if old is None:
            continue
        if abs(now["null_share"] - old["null_share"]) >= NULL_SHARE_CHANGE:
            out.append(f"{now['column']}: null share {old['null_share']:.3f} -> {now['null_share']:.3f}")
        sd = old.get("std") or 0.0
        moved = now["mean"] is not None and old.get("mean") is not None and sd > 0
        if moved and abs(now["mean"] - old["mean"]) / sd >= MEAN_CHANGE_SD:
            out.append(f"{now['column']}: mean {old['mean']:.4g} -> {now['mean']:.4g}")
    return out or ["no change beyond the thresholds"]


def _histograms(sample: pl.DataFrame, path: Path) -> Path | None:
    numeric = [c for c in sample.columns if _is_numeric(sample.schema[c])][:MAX_HISTOGRAMS]
    if not numeric:
        return None
    ncols = min(3, len(numeric))
    nrows = math.ceil(len(numeric) / ncols)
    fig = figures.Figure(figsize=(5, 1.6 * nrows + 0.4))
    for i, name in enumerate(numeric):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        values = sample.get_column(name).drop_nulls().cast(pl.Float64).to_numpy()
        if values.size:
            lo, hi = np.percentile(values, [0.5, 99.5])
            ax.hist(np.clip(values, lo, hi), bins=30, color=figures.MODEL_COLOUR)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle("Distributions (0.5-99.5 percentile)", fontsize=9)
    return figures.save(fig, path)


def _top_values(sample: pl.DataFrame, path: Path) -> Path | None:
    categorical = [c for c in sample.columns if sample.schema[c] in (pl.String, pl.Boolean, pl.Categorical)]
    categorical = [c for c in categorical if sample.get_column(c).n_unique() > 1][:MAX_TOP_VALUE_PLOTS]
    if not categorical:
        return None
    ncols = 2 if len(categorical) > 1 else 1
    nrows = math.ceil(len(categorical) / ncols)
    fig = figures.Figure(figsize=(5, 1.8 * nrows + 0.4))
    for i, name in enumerate(categorical):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        counts = sample.get_column(name).cast(pl.String).fill_null("(null)").value_counts(sort=True).head(8)
        ax.barh(counts.get_column(name).to_list()[::-1], counts.get_column("count").to_list()[::-1])
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle("Most frequent values", fontsize=9)
    return figures.save(fig, path)


def _correlation_plot(correlations: dict[str, dict[str, float]], path: Path) -> Path | None:
    if not any(correlations.values()):
        return None
    fig, axes_ = figures.axes(
        5, 0.22 * max(len(c) for c in correlations.values()) + 1.5, ncols=len(correlations)
    )
    for ax, (target, scores) in zip(np.atleast_1d(axes_), correlations.items(), strict=True):
        ranked = sorted(scores.items(), key=lambda t: abs(t[1]))
        ax.barh([c for c, _ in ranked], [s for _, s in ranked], color=figures.MODEL_COLOUR)
        ax.axvline(0, color="k", lw=0.5)
        ax.set_title(f"Spearman with {target}", fontsize=8)
        ax.tick_params(labelsize=6)
    return figures.save(fig, path)


def _write_html(profile: Profile, path: Path) -> None:
    table = figures.html_table(profile.columns.with_columns(pl.col(pl.Float64).round(4)))
    images = "".join(
        f'<figure><img alt="{n}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{n}</figcaption></figure>"
        for n, p in profile.plots.items()
    )
    changes = "".join(f"<li>{html.escape(c)}</li>" for c in profile.changes)
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>profile of {profile.source}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:2px 6px}}figure{{display:inline-block;margin:8px}}</style></head><body>
<h1>Profile of validated.{html.escape(profile.source)}</h1>
<p>{profile.rows} rows; statistics on a sample of {profile.sampled_rows} rows.</p>
<h2>Changes since the previous profile</h2><ul>{changes}</ul>
<h2>Columns</h2>{table}<h2>Plots</h2>{images}</body></html>""")


def profile_source(
    conn: duckdb.DuckDBPyConnection,
    source: str,
    pipelines: list[PipelineSpec],
    out_dir: Path,
    sample_rows: int = DEFAULT_SAMPLE_ROWS,
    seed: int = 0,
) -> Profile:
    """Profile `validated.<source>` into `out_dir` (profile.json, profile.html, PNGs)."""
    table = f"validated.{q(source)}"
    rows = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    # Columns the platform adds (_source_file, _source_row, _event_time) say nothing about the data.
    names = [
        r[0] for r in conn.execute(f"SELECT * FROM {table} LIMIT 0").description if not r[0].startswith("_")
    ]
    targets = _targets_sql(source, pipelines, names)
    try:
        frame = _sample(conn, table, names, targets, rows, sample_rows, seed)
    except duckdb.Error:
        # A target expression that reads a derived or joined column cannot be computed on the source
        # alone: profile without that correlation rather than fail.
        targets = {}
        frame = _sample(conn, table, names, targets, rows, sample_rows, seed)
    target_columns = {t: f"_target_{i}" for i, t in enumerate(targets)}
    sample = frame.drop(target_columns.values())
    out_dir.mkdir(parents=True, exist_ok=True)
    state = out_dir / "profile.json"
    previous = json.loads(state.read_text()) if state.exists() else None
    columns = _column_stats(sample)
    correlations = _correlations(frame, target_columns)
    plots = {
        name: path
        for name, path in (
            ("histograms", _histograms(sample, out_dir / "histograms.png")),
            ("top_values", _top_values(sample, out_dir / "top_values.png")),
            ("target_correlation", _correlation_plot(correlations, out_dir / "target_correlation.png")),
        )
        if path is not None
    }
    profile = Profile(
        source,
        rows,
        sample.height,
        columns,
        correlations,
        _changes(previous, columns),
        plots,
        out_dir / "profile.html",
    )
    _write_html(profile, profile.report)
    state.write_text(json.dumps({"rows": rows, "columns": columns.to_dicts()}, default=str))
    return profile
