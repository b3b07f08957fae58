"""Training assets of a pipeline: `<pipeline>/model` (a new registered version), `evaluation` (its
report) and `promotion` (the gate's verdict on it).

Hand-off by lineage, not by "latest": the model step stamps the version it registers with its run id,
and evaluation and promotion judge the version their own run trained. Only when one of them is
materialized without the model in its run does it fall back to the registry's challenger.
"""

import dagster as dg

from ml_assets.core import figures, registry, tracking
from ml_assets.core import promotion as gate
from ml_assets.core.evaluate import evaluate_version, markdown_ablation, markdown_summary
from ml_assets.core.spec import PipelineSpec
from ml_assets.core.train import train_and_register
from ml_assets.orchestration.assets.modelling import common, pipeline_key
from ml_assets.orchestration.deployments import TRAINING_STEP_TAGS, dask_fit, with_fit_threads
from ml_assets.orchestration.failures import user_errors_as_failures
from ml_assets.orchestration.figures import figure_metadata, report_metadata
from ml_assets.orchestration.metadata import decision_metadata, shorten, versions_table
from ml_assets.orchestration.resources import ArtifactStore, RunPause, TrainingOverrides, Warehouse

VERDICT = {"promote": "PROMOTED", "promote_first": "PROMOTED (first champion)", "refuse": "REFUSED"}
# Under 1,000 characters the UI renders markdown inline; longer, it hides it behind a button.
VERDICT_REASON_CHARS = 700


def verdict_markdown(decision: gate.Decision) -> dg.MetadataValue:
    reason = shorten(decision.reason, VERDICT_REASON_CHARS)
    if decision.champion_after is None:
        now = "No champion yet."
    else:
        before = f"was `{decision.champion_before}`" if decision.champion_before else "no champion before"
        now = f"Champion now: `{decision.champion_after}` ({before})"
    return dg.MetadataValue.md(
        f"### {VERDICT.get(decision.action, decision.action.upper())}: challenger {decision.challenger}\n\n"
        f"{reason}\n\n{now}"
    )


def gain_metadata(decision: gate.Decision) -> dict[str, float]:
    """The bootstrap's gain and interval, rounded: numbers the UI plots across promotions."""
    boot = decision.details.get("bootstrap") or {}
    return {k: round(float(boot[k]), 5) for k in ("improvement", "ci_low", "ci_high") if k in boot}


def version_under_judgement(warehouse: Warehouse, pipeline: PipelineSpec, run_id: str) -> str:
    """The version this run trained, or (materialized alone) the registry's challenger."""
    with warehouse.get_connection() as conn:
        version = registry.version_of_run(conn, pipeline.name, run_id) or registry.alias_version(
            conn, pipeline.name, registry.CHALLENGER
        )
    if version is None:
        raise dg.Failure(
            description=f"pipeline '{pipeline.name}': no model version is registered yet; materialize its model",
            allow_retries=False,
        )
    return version


def model_asset(pipeline: PipelineSpec) -> dg.AssetsDefinition:
    @dg.asset(
        key=pipeline_key(pipeline, "model"),
        deps=[pipeline_key(pipeline, "features")],
        kinds={"lightgbm", "scikit-learn"},
        **common(pipeline),
        op_tags=TRAINING_STEP_TAGS,
        description=f"LightGBM tuned by {'time-series' if pipeline.split.method == 'time' else 'k-fold'} "
        f"CV on {pipeline.metric} within a time budget, and a linear baseline; registered "
        "as a new model version (text model + JSON manifest), stamped with this run.",
    )
    def model(
        context: dg.AssetExecutionContext,
        warehouse: Warehouse,
        artifacts: ArtifactStore,
        training: TrainingOverrides,
        pause: RunPause,
    ) -> dg.MaterializeResult:
        version_dir, manifest = user_errors_as_failures(
            lambda: train_and_register(
                warehouse.get_connection,
                with_fit_threads(pipeline),
                artifacts.transforms(pipeline.name),
                artifacts.models,
                training.time_budget_s,
                training.max_trials,
                context.run.run_id,
                progress=context.log.info,
                on_dask=dask_fit(training.dask_fit_rows),
            )
        )
        pause.after_registering(context.run.run_id, manifest.version)
        metric, cv = manifest.metric, manifest.cv
        # No CV score when the budget cut the first trial short (LightGBM's defaults are the model).
        cv_score = {} if cv.score is None else {f"cv_{metric}": round(cv.score, 4)}
        return dg.MaterializeResult(
            metadata={
                "version": manifest.version,
                f"test_{metric}": round(manifest.test_metrics[metric], 4),
                f"baseline_test_{metric}": round(manifest.baseline_test_metrics[metric], 4),
                **cv_score,
                "trials": len(cv.trials),
                "trials_cut_short": cv.trials_cut_short,
                "model_step_s": cv.model_step_s,
                # Below the available rows when model.max_train_rows capped the training split.
                "train_rows": manifest.rows["train"],
                "train_rows_available": manifest.train_rows_available,
                "path": dg.MetadataValue.path(str(version_dir)),
                "best_iteration": manifest.best_iteration,
                "params": dg.MetadataValue.json(manifest.params),
                "train_window": dg.MetadataValue.json(manifest.train_window),
                "data_fingerprint": manifest.data_fingerprint,
                "code_version": manifest.code_version,
            }
        )

    return model


def evaluation_asset(pipeline: PipelineSpec) -> dg.AssetsDefinition:
    @dg.asset(
        key=pipeline_key(pipeline, "evaluation"),
        deps=[pipeline_key(pipeline, "model")],
        kinds={"html", "matplotlib"},
        **common(pipeline),
        description="Test metrics of the version this run trained next to the baseline, plots and an "
        "HTML report.",
    )
    def evaluation(
        context: dg.AssetExecutionContext, warehouse: Warehouse, artifacts: ArtifactStore
    ) -> dg.MaterializeResult:
        version = version_under_judgement(warehouse, pipeline, context.run.run_id)
        with warehouse.get_connection() as conn:
            found = user_errors_as_failures(lambda: registry.registered(conn, version, pipeline.name))
            history = registry.versions(conn, pipeline.name)
        ev = user_errors_as_failures(
            lambda: evaluate_version(found.path, artifacts.reports, found.manifest_sha256)
        )
        versions_plot = figures.versions_over_time(history, ev.metric, ev.report_path.parent / "versions.png")
        mlflow_run = tracking.log_version(
            pipeline,
            found.path,
            registry.read_manifest(found.path, manifest_sha256=found.manifest_sha256),
            [("plots", p) for p in (*ev.plots.values(), versions_plot)] + [("report", ev.report_path)],
            context.run.run_id,
            context.log.warning,
        )
        ablation = markdown_ablation(ev)
        # Only the primary metric as numbers: the UI plots each number across materializations, and
        # two series (model, baseline) say more than eighteen; every metric is in the summary table.
        return dg.MaterializeResult(
            metadata={
                "summary": dg.MetadataValue.md(markdown_summary(ev, pipeline.name)),
                f"model_{ev.metric}": round(float(ev.model[ev.metric]), 4),
                f"baseline_{ev.metric}": round(float(ev.baseline[ev.metric]), 4),
                **report_metadata(artifacts, ev.report_path),
                **figure_metadata(artifacts, ev.plots | {"versions": versions_plot}),
                "version": ev.version,
                "beats_baseline": ev.beats_baseline,
                "model_versions": versions_table(history),
                **({"mlflow_run_id": mlflow_run} if mlflow_run else {}),
                **({"ablation": dg.MetadataValue.md(ablation)} if ablation else {}),
            }
        )

    return evaluation


def promotion_asset(pipeline: PipelineSpec) -> dg.AssetsDefinition:
    @dg.asset(
        key=pipeline_key(pipeline, "promotion"),
        deps=[pipeline_key(pipeline, "model"), pipeline_key(pipeline, "evaluation")],
        kinds={"lightgbm"},
        **common(pipeline),
        description="Promotion gate: the version this run trained replaces the champion only if its primary "
        "metric is significantly better (paired bootstrap) on the latest holdout, no guarded metric or slice "
        "regresses, and it reproduces its predictions in a fresh process. The verdict is logged either way.",
    )
    def promotion(context: dg.AssetExecutionContext, warehouse: Warehouse) -> dg.MaterializeResult:
        version = version_under_judgement(warehouse, pipeline, context.run.run_id)
        # What launched this run (e.g. the drift result behind a sensor's retrain) goes into the log.
        trigger = {k: v for k, v in context.run.tags.items() if k.startswith("ml_assets/")}
        decision = user_errors_as_failures(
            lambda: gate.promote_or_refuse(
                warehouse.get_connection, pipeline, version, context.run.run_id, trigger
            )
        )
        tracking.sync_champion(pipeline, warehouse.get_connection, context.log.warning)
        with warehouse.get_connection() as conn:
            meta = decision_metadata(decision, conn, pipeline)
        # The verdict first: the UI lists metadata in the order given.
        return dg.MaterializeResult(
            metadata={"verdict": verdict_markdown(decision), **gain_metadata(decision), **meta}
        )

    return promotion
