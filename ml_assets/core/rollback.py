"""Rollback: should the champion be rolled back? Automatically when it trails the previous champion on
recent labelled data (`check_champion`), or by hand (`rollback`, `ml-assets rollback`); either way only to
a version that loads intact and fits the pipeline as configured now.
"""

from __future__ import annotations

from collections.abc import Collection

from ml_assets.core import registry
from ml_assets.core.dataset import table_name
from ml_assets.core.errors import ArtifactError
from ml_assets.core.metrics import improvement
from ml_assets.core.promotion import Decision
from ml_assets.core.serving.loader import ServableModel
from ml_assets.core.spec import PipelineSpec, SourceSpec, modelling_columns
from ml_assets.core.sql import q
from ml_assets.core.store import Connect


def check_champion(connect: Connect, pipeline: PipelineSpec, run_id: str | None = None) -> Decision:
    """Roll back automatically when the champion trails the previous champion on recent labelled data."""
    window = (
        f"{q(pipeline.timestamp)} >= (SELECT max({q(pipeline.timestamp)}) FROM {table_name(pipeline)}) "
        f"- INTERVAL {pipeline.gate.monitor_days} DAY"
        if pipeline.timestamp
        else "_split = 'test'"
    )
    with connect() as conn:
        champion = registry.alias_version(conn, pipeline.name, registry.CHAMPION)
        previous = registry.previous_champion(conn, pipeline.name)
        if champion is None or previous is None or previous == champion:
            return Decision("none", "no previous champion to compare with", None, champion, champion)
        found = {v: registry.registered(conn, v, pipeline.name) for v in (champion, previous)}
        rows = conn.execute(f"SELECT * FROM {table_name(pipeline)} WHERE {window}").pl()
    models = {v: ServableModel.from_registry(r) for v, r in found.items()}
    mismatch = serving_mismatch(pipeline, rows.columns, models[previous].manifest)
    if mismatch is not None:
        # Trained before the pipeline changed: not a model to fall back on, however the scores compare.
        reason = f"champion {champion} kept: previous champion {previous} cannot serve it now: {mismatch}"
        return Decision("keep", reason, None, champion, champion)
    metric = pipeline.metric
    scores = {v: m.score(rows, metric) for v, m in models.items()}
    delta = improvement(metric, scores[champion], scores[previous])
    details = {
        "rows": len(rows),
        "window_days": pipeline.gate.monitor_days,
        "scores": scores,
        "improvement": delta,
    }
    if delta >= -pipeline.gate.rollback_margin:
        return Decision(
            "keep",
            f"champion {champion} {metric} {scores[champion]:.5f} vs previous {previous} "
            f"{scores[previous]:.5f} on the last {len(rows)} labelled rows",
            None,
            champion,
            champion,
            details,
        )
    reason = (
        f"champion {champion} trails previous champion {previous} on {metric} by {-delta:.5f} on the last "
        f"{len(rows)} labelled rows (rollback margin {pipeline.gate.rollback_margin})"
    )
    with connect() as conn:
        registry.record_decision(
            conn, pipeline.name, "auto_rollback", reason, None, previous, details, run_id
        )
    return Decision("auto_rollback", reason, None, champion, previous, details)


def serving_mismatch(
    pipeline: PipelineSpec, columns: Collection[str], manifest: registry.Manifest
) -> str | None:
    """Why a version cannot serve `pipeline` as it is configured now (trained for another task, or reading
    columns its modelling table, `columns`, no longer has), or None when it can."""
    version = manifest.version
    if manifest.task != pipeline.task:
        return (
            f"version {version} was trained for task '{manifest.task}', but pipeline '{pipeline.name}' "
            f"now has task '{pipeline.task}'"
        )
    missing = sorted(set(manifest.input_columns) - set(columns))
    if missing:
        return (
            f"version {version} reads columns {missing} that the modelling table of pipeline "
            f"'{pipeline.name}' no longer has"
        )
    return None


def rollback(
    connect: Connect,
    pipeline: PipelineSpec,
    sources: dict[str, SourceSpec],
    to: str | None = None,
    run_id: str | None = None,
) -> Decision:
    """Move the champion back to `to`, or to the previous champion; recorded in the decision log.

    The target must be one of the pipeline's own versions, load intact (manifest as registered, artifacts
    as in the manifest) and fit the pipeline as configured now: same task, every input column in the
    modelling table its `sources` (the project's `sources_of(pipeline)`) build."""
    with connect() as conn:
        current = registry.alias_version(conn, pipeline.name, registry.CHAMPION)
        target = to or registry.previous_champion(conn, pipeline.name)
        if target is None:
            raise ArtifactError(f"pipeline '{pipeline.name}': no previous champion to roll back to")
        model = ServableModel.from_registry(registry.registered(conn, target, pipeline.name))
        mismatch = serving_mismatch(pipeline, modelling_columns(pipeline, sources), model.manifest)
        if mismatch is not None:
            raise ArtifactError(
                f"pipeline '{pipeline.name}': will not roll back to {target}: {mismatch}; "
                f"`ml-assets versions {pipeline.name}` lists its versions"
            )
        reason = f"manual rollback from {current} to {target}"
        registry.record_decision(conn, pipeline.name, "rollback", reason, None, target, {}, run_id)
    return Decision("rollback", reason, None, current, target)
