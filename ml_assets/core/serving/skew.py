"""The skew check: the champion's test rows scored by the batch path and by the online path (their
request-time fields completed from the lookups, as every API request is) must agree.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import polars as pl

from ml_assets.core import registry
from ml_assets.core.check_results import CheckOutcome
from ml_assets.core.dataset import table_name
from ml_assets.core.errors import ArtifactError, UserError
from ml_assets.core.serving.batch_scores import PROBABILITIES, score_frame
from ml_assets.core.serving.loader import ServableModel
from ml_assets.core.serving.online_model import OnlineModel
from ml_assets.core.serving.request_parsing import not_servable_online, request_fields, request_rows
from ml_assets.core.spec import PipelineSpec, SourceSpec
from ml_assets.core.store import Connect

# How many of the skew check's rows it sends as single objects, one request each.
SKEW_SINGLE_ROWS = 20


def online_path(
    connect: Connect,
    pipeline: PipelineSpec,
    sources: Mapping[str, SourceSpec],
    pinned: str | None = None,
) -> Callable[[Any], dict[str, Any]]:
    """`post` for compare_paths without a server: the champion (or the `pinned` version) loaded now as the
    API loads it, and each request and answer passed through JSON text as over HTTP (an unusable request,
    or no model, answers {"error": ...} as the API's 4xx and 5xx do)."""
    model = OnlineModel(pipeline, sources, connect, pinned=pinned)
    try:
        model.refresh()
    except ArtifactError as exc:
        model.problem = str(exc)

    def post(rows: Any) -> dict[str, Any]:
        try:
            answer = model.predict(json.loads(json.dumps(rows, allow_nan=False)))
            return json.loads(json.dumps(answer, allow_nan=False))
        except (UserError, ValueError) as exc:
            return {"error": str(exc)}

    return post


def compare_paths(
    connect: Connect,
    pipeline: PipelineSpec,
    sources: Mapping[str, SourceSpec],
    post: Callable[[list[dict[str, Any]]], dict[str, Any]],
    version: str | None,
    tolerance: float = 1e-9,
) -> CheckOutcome:
    """The skew check: a sample of the champion's test rows scored by the batch path (modelling-table
    rows) and by the online path (`post`: their request-time fields sent to the API, which completes them
    from its lookups) must agree to `tolerance`, decision and version included. `version` is the champion
    the caller's champion step settled (None: none yet); an online path serving another one fails."""
    offline = not_servable_online(pipeline)
    if offline:
        # Nothing is served online, so nothing online can disagree with the batch scores.
        return CheckOutcome(True, f"{offline}: nothing to compare", {"rows": 0})
    n = pipeline.serving.skew_sample_rows
    if version is None:
        return CheckOutcome(True, "no champion yet: nothing to compare", {"rows": 0})
    with connect() as conn:
        found = registry.registered(conn, version, pipeline.name)
        # Sampled from the test rows: USING SAMPLE applies before the WHERE of its own SELECT.
        sample = conn.execute(
            f"SELECT * FROM (SELECT * FROM {table_name(pipeline)} WHERE _split = 'test') "
            f"USING SAMPLE reservoir({n} ROWS) REPEATABLE (0)"
        ).pl()
    if sample.height == 0:
        return CheckOutcome(True, "no test rows to compare", {"rows": 0})
    batch = score_frame(ServableModel.from_registry(found), pipeline, sample, version)
    requests = request_rows(sample, list(request_fields(pipeline, sources)))
    size = pipeline.serving.max_batch
    # Some rows one object at a time (what a single request sends), the rest in lists: both go through
    # the completion every request takes (per-key lookups, or the SQL when the joins need it).
    single = min(SKEW_SINGLE_ROWS, len(requests))
    answers = [post(r) for r in requests[:single]]
    answers += [post(requests[i : i + size]) for i in range(single, len(requests), size)]
    versions = {a.get("version") for a in answers}
    online = pl.DataFrame([p for a in answers for p in a.get("predictions", [])])
    if versions != {version} or online.height != batch.height:
        errors = "; ".join(str(a["error"])[:300] for a in answers if "error" in a)
        return CheckOutcome(
            False,
            f"the online path answered {online.height} rows with version(s) {sorted(map(str, versions))} for "
            f"{batch.height} rows of champion {version}{f' ({errors})' if errors else ''}",
            {"rows": batch.height, "online_versions": sorted(map(str, versions)), "champion": version},
        )
    diff = float((online.get_column("score") - batch.get_column("score")).abs().max() or 0.0)
    decisions = int((online.get_column("decision") != batch.get_column("decision")).sum() or 0)
    if PROBABILITIES in batch.columns:  # multiclass: every class' probability, in the same class order
        each = [f.get_column(PROBABILITIES).explode().struct.unnest() for f in (online, batch)]
        diff = max(diff, float((each[0]["probability"] - each[1]["probability"]).abs().max() or 0.0))
        decisions += int((each[0]["class"] != each[1]["class"]).sum() or 0)
    passed = diff <= tolerance and decisions == 0
    return CheckOutcome(
        passed,
        f"{batch.height} test rows of champion {version}: online and batch scores differ by at most "
        f"{diff:.2e} (tolerance {tolerance:.0e}), {decisions} decision(s) differ",
        {
            "rows": batch.height,
            "single_row_requests": single,
            "max_abs_diff": diff,
            "decisions_differing": decisions,
            "champion": version,
        },
    )
