"""`ml-assets` command line: run the whole asset graph headless and print what it produced."""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import polars as pl

from ml_assets.core import ingest, registry
from ml_assets.core.errors import Problems, UsageError, UserError
from ml_assets.core.ingest import preflight, replay
from ml_assets.core.spec import PipelineSpec, Project
from ml_assets.core.spec.infer import safe_name
from ml_assets.core.spec.load import load_default_project
from ml_assets.core.sql import q
from ml_assets.core.store import MODEL_VERSIONS, change_marker, connect, data_root, is_lake, warehouse

# The training and orchestration stack (Dagster, LightGBM, scikit-learn, Evidently) is imported by the
# commands that use it, inside them: `versions`, `landing`, `validate` and `--help` answer in a fraction
# of the seconds that stack takes to import (a test proves they leave it unimported).
if TYPE_CHECKING:
    import dagster as dg


def _pipeline(project: Project, name: str) -> PipelineSpec:
    if name not in project.pipelines:
        raise UsageError(f"unknown pipeline '{name}'; pipelines: {', '.join(sorted(project.pipelines))}")
    return project.pipelines[name]


def _instance() -> dg.DagsterInstance:
    import dagster as dg

    # With DAGSTER_HOME set (as `make` does) runs land in the same history `dagster dev` shows.
    return dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()


def run(
    time_budget_s: float | None,
    max_trials: int | None,
    pipelines: list[str] | None = None,
    retrain: bool = False,
    dask_fit_rows: int | None = None,
) -> int:
    """Materialize every asset, or only these pipelines' assets and the sources they read, or (retrain)
    one pipeline from its modelling table on; then print the summary."""

    from ml_assets.orchestration import deployments, execute
    from ml_assets.orchestration.build import build_definitions
    from ml_assets.orchestration.jobs import pipeline_selection, retrain_selection
    from ml_assets.orchestration.partitions import RANGE_END, RANGE_START
    from ml_assets.orchestration.resources import TrainingOverrides

    project = load_default_project()
    names = [_pipeline(project, name).name for name in pipelines or []]
    deployment = deployments.current()
    selection = None
    if retrain:
        selection = retrain_selection(names[0])
    elif names:
        selection = pipeline_selection(*names)
    tags: dict[str, str] = {}
    if not retrain:
        for name, files in replay.seed(project, data_root()).items():
            print(f"landing zone of '{name}' seeded with {len(files)} batch(es) of its initial period")
        tags = landed_partitions(project)
    if tags:
        print(f"partitions {tags[RANGE_START]}...{tags[RANGE_END]} (everything landed so far)")
    started = time.monotonic()
    overrides = TrainingOverrides(
        time_budget_s=time_budget_s, max_trials=max_trials, dask_fit_rows=dask_fit_rows
    )
    with _instance() as instance:
        if deployment.name == "cluster":
            result = execute.on_cluster(instance, selection, tags, overrides)
        else:
            result = execute.in_process(
                build_definitions(project.directory, deployment), instance, selection, tags, overrides
            )
    elapsed = time.monotonic() - started
    print(f"\nml_assets run {result.run_id}: {'SUCCESS' if result.success else 'FAILURE'} in {elapsed:.1f} s")
    if not result.success:
        for event in result.all_events:
            if event.is_step_failure:
                print(f"  step {event.step_key} failed: {event.step_failure_data.error.message.strip()}")
        for event in result.get_asset_check_evaluations():
            if not event.passed:
                print(
                    f"  check {event.asset_key.to_user_string()}:{event.check_name} failed: {event.description}"
                )
    summary(project, names or None)
    return 0 if result.success else 1


def validate(pipeline: str | None) -> int:
    """Config and data-source checks in seconds, no training: one line per problem, exit 2 if any."""
    project = load_default_project()
    names = [_pipeline(project, pipeline).name] if pipeline else sorted(project.pipelines)
    print(f"{project.directory}: {len(project.pipelines)} pipeline file(s) load and cross-check")
    problems: list[str] = []
    sources = sorted({s for n in names for s in project.sources_of(project.pipelines[n])})
    for name in sources:
        base = project.source_files[name].parent
        line, found = preflight.check_source(name, project.sources[name], base, data_root())
        print(f"  {line}" if not found else f"  source '{name}': {len(found)} problem(s)")
        problems += found
    for name in names:
        spec = project.pipelines[name]
        print(f"  pipeline '{name}': {spec.task}, target '{spec.target.name}', {len(spec.features)} features")
    if problems:
        raise Problems(problems)
    return 0


def init(args: argparse.Namespace) -> int:
    out = Path(
        args.out or f"{safe_name(Path(args.file.split('*')[0]).name.split('.')[0]) or 'pipeline'}.yaml"
    )
    if out.exists() and not args.force:
        raise UsageError(f"{out} exists; pass --force to overwrite it or --out to write elsewhere")
    from ml_assets.core.scaffold import scaffold

    text = scaffold(args.file, args.target, out, args.task, args.time, args.id)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}: check it, then `ML_ASSETS_PIPELINES_DIR={out.parent} ml-assets validate`")
    return 0


def landed_partitions(project: Project) -> dict[str, str]:
    """Range tags from the time axis' first partition to the last one any landed file reaches.

    Re-materializing the whole landed range is idempotent (each partition replaces its own rows), so
    running twice never duplicates rows.
    """
    from ml_assets.orchestration.partitions import all_partitions_tags, range_tags_for

    if project.time_axis is None:
        return {}
    lasts = []
    for name, spec in project.sources.items():
        if not spec.partitions:
            continue
        base = project.source_files[name].parent
        for path in ingest.resolve_files(name, spec, base, data_root()):
            try:
                _, records = ingest.read_files(name, spec, [path])
            except ingest.RejectedFile:
                continue  # the run itself rejects it, naming the file and the reason
            lasts += [r["last_partition"] for r in records]
    if not lasts:
        return all_partitions_tags(project)
    axis_start = dt.datetime.combine(project.time_axis.start, dt.time())
    return range_tags_for(project, axis_start, max(lasts))


def summary(project: Project, pipelines: list[str] | None = None) -> None:
    root = data_root()
    with connect(warehouse(root)) as conn:
        print(
            f"\nData directory: {root}\n\n{'source':<12}{'raw':>10}{'validated':>11}{'quarantined':>13}  reasons"
        )
        chosen = [project.pipelines[p] for p in pipelines] if pipelines else project.pipelines.values()
        shown = {s for spec in chosen for s in project.sources_of(spec)}
        for name in [s for s in project.sources if s in shown]:
            try:
                raw, valid, bad = conn.execute(
                    f"SELECT (SELECT count(*) FROM raw.{q(name)}), (SELECT count(*) FROM validated.{q(name)}), "
                    f"(SELECT count(*) FROM quarantine.{q(name)})"
                ).fetchone()
            except duckdb.CatalogException:  # a source not materialized yet is reported, not fatal
                print(f"{name:<12}{'(not materialized)':>34}")
                continue
            reasons = conn.execute(
                f"SELECT string_agg(_rule || ' on ' || _column || ': ' || n, ', ') FROM "
                f"(SELECT _rule, _column, count(*) n FROM quarantine.{q(name)} GROUP BY ALL)"
            ).fetchone()[0]
            print(f"{name:<12}{raw:>10}{valid:>11}{bad:>13}  {reasons or ''}")
        for name, pipeline in project.pipelines.items():
            if pipelines and name not in pipelines:
                continue
            rows = conn.execute(
                f"SELECT version, path, manifest FROM {MODEL_VERSIONS} WHERE pipeline = ? "
                "ORDER BY created_at DESC, version DESC",
                [name],
            ).fetchall()
            print(f"\n{name} ({pipeline.task}, target '{pipeline.target.name}')")
            if not rows:
                print("  no model version registered")
                continue
            # The latest trained model (a baseline registered as it became champion is not one).
            challenger = registry.alias_version(conn, name, registry.CHALLENGER)
            latest = next((r for r in rows if r[0] == challenger), rows[0])
            version, path = latest[0], latest[1]
            manifest = registry.parse_manifest(latest[2], f"the registry's manifest of {version}")
            metric = manifest.metric
            ours, base = manifest.test_metrics[metric], manifest.baseline_test_metrics[metric]
            print(
                f"  model {version} ({len(rows)} version(s) registered), rows train/valid/test "
                f"{manifest.rows['train']}/{manifest.rows['valid']}/{manifest.rows['test']}"
            )
            print(f"  test {metric}: model {ours:.4f} vs {manifest.baseline} {base:.4f} ({ours - base:+.4f})")
            others = ", ".join(f"{m} {v:.4f}" for m, v in manifest.test_metrics.items() if m != metric)
            print(f"  other test metrics: {others}")
            champion = registry.alias_version(conn, name, registry.CHAMPION)
            log = registry.decisions(conn, name)
            if log.height:
                last = log.row(-1, named=True)
                print(f"  champion: {champion}; last gate decision: {last['action']}: {last['reason']}")
            report = root / "reports" / name / version / "report.html"
            print(f"  model: {path}\n  report: {report if report.exists() else '(not built)'}")


def _connect() -> AbstractContextManager[duckdb.DuckDBPyConnection]:
    return connect(warehouse(data_root()))


def show_versions(pipeline: str) -> None:
    with _connect() as conn:
        history = registry.versions(conn, pipeline)
        log = registry.decisions(conn, pipeline)
    with pl.Config(tbl_rows=100, tbl_width_chars=200, fmt_str_lengths=120, tbl_hide_dataframe_shape=True):
        print(f"Model versions of {pipeline}:\n{history.drop('path')}\n\nDecision log:\n{log}")


def predict(pipeline: PipelineSpec, project: Project, file: Path, output: Path | None) -> None:
    """Score a CSV or Parquet file of request-time inputs with the champion, exactly as the API does."""
    from ml_assets.core.serving import online_model, request_parsing
    from ml_assets.core.serving.batch_scores import score_frame

    if not file.is_file():
        raise UsageError(f"{file}: no such file")
    try:
        frame = (
            pl.read_parquet(file)
            if file.suffix.lower() == ".parquet"
            else pl.read_csv(file, infer_schema=False, null_values=["", "NA"])
        )
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise UsageError(f"{file}: cannot be read as {file.suffix or 'CSV'} ({exc})") from exc
    model = online_model.OnlineModel(pipeline, project.sources_of(pipeline), _connect)
    model.refresh()
    if model.served is None:
        raise UsageError(model.problem or f"pipeline '{pipeline.name}': no champion to score with")
    fields = model.fields
    rows = request_parsing.cast_frame(
        fields, frame.drop([c for c in frame.columns if c not in fields]), str(file)
    )
    scored = score_frame(
        model.served.model, pipeline, model.served.lookups.complete(rows), model.served.version
    )
    if output is None:
        with pl.Config(tbl_rows=50, tbl_cols=-1, tbl_width_chars=200):
            print(scored)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix.lower() == ".parquet":
        scored.write_parquet(output)
    else:
        scored.write_csv(output)
    print(f"{scored.height} rows scored by {pipeline.name} champion {model.served.version} -> {output}")


def serve(pipelines: list[str], host: str, port: int, bundles: Path | None) -> None:
    import uvicorn

    from ml_assets.api import create_app
    from ml_assets.core.serving.bundle import served_from

    project = load_default_project()
    names = [_pipeline(project, p).name for p in pipelines] or None
    bundles = bundles.resolve() if bundles is not None else served_from()
    if bundles is not None:
        # The published bundles only: this host may not even see the warehouse.
        app = create_app(project, None, names, log_root=data_root(), bundles=bundles)
    else:
        database = warehouse(data_root())
        # A DuckLake warehouse has no local file whose changes could be watched: every poll reads it.
        marker = None if is_lake(database) else functools.partial(change_marker, database)
        app = create_app(project, _connect, names, log_root=data_root(), marker=marker)
    source = f"the bundles under {bundles}" if bundles is not None else "the warehouse"
    print(
        f"serving {', '.join(app.state.models)} from {source} on http://{host}:{port} "
        f"(docs: http://{host}:{port}/docs)"
    )
    # The poller's thread (refreshing lookups, flushing the request log) runs Python beside the event
    # loop: a request then waits for the GIL up to the switch interval, 5 ms by default.
    sys.setswitchinterval(0.001)
    # uvloop and httptools (pinned dependencies) rather than uvicorn's pure-Python fallbacks, and no
    # access log: each costs a share of a millisecond per request.
    uvicorn.run(
        app, host=host, port=port, log_level="warning", loop="uvloop", http="httptools", access_log=False
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ml-assets", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser(
        "run",
        help="materialize every asset (or those of the pipelines named and their sources), then summarize",
    )
    run_p.add_argument("pipelines", nargs="*", help="only these pipelines (default: all)")
    retrain_p = sub.add_parser("retrain", help="rebuild one pipeline from its modelling table on (no ingest)")
    retrain_p.add_argument("pipeline")
    for p in (run_p, retrain_p):
        p.add_argument("--time-budget", type=float, help="seconds the model step may take per model")
        p.add_argument("--max-trials", type=int, help="at most this many search trials per model")
        p.add_argument(
            "--dask-fit-rows",
            type=int,
            help="cluster only: fit with LightGBM's Dask interface from this many training rows "
            "(over ML_ASSETS_DASK_FIT_ROWS)",
        )
    validate_p = sub.add_parser("validate", help="check pipeline files and their data sources; no training")
    validate_p.add_argument("pipeline", nargs="?")
    init_p = sub.add_parser("init", help="write a complete, commented pipeline file from a data file")
    init_p.add_argument("file", help="CSV or Parquet file, or a glob of them")
    init_p.add_argument("--target", required=True, help="the column to predict")
    init_p.add_argument("--task", choices=["binary", "multiclass", "regression"])
    init_p.add_argument("--time", help="time column: a time split (default: the only datetime column)")
    init_p.add_argument("--id", action="append", help="id column (repeatable; default: built-in row id)")
    init_p.add_argument("--out", help="pipeline file to write (default: <file name>.yaml here)")
    init_p.add_argument("--force", action="store_true", help="overwrite an existing file")
    sub.add_parser("summary", help="print row counts, model versions and metrics from the data directory")
    versions_p = sub.add_parser("versions", help="model versions, their status and the decision log")
    versions_p.add_argument("pipeline")
    rollback_p = sub.add_parser(
        "rollback", help="move the champion back (to the previous champion by default)"
    )
    rollback_p.add_argument("pipeline")
    rollback_p.add_argument("--to", help="version to make champion")
    replay_p = sub.add_parser(
        "replay", help="drop the next slices of a pipeline's recorded sources into their landing zones"
    )
    replay_p.add_argument("pipeline")
    replay_p.add_argument("--until", required=True, type=dt.date.fromisoformat, help="last day to replay")
    replay_p.add_argument(
        "--batch", choices=["day", "week", "month"], default="month", help="one file per ..."
    )
    replay_p.add_argument(
        "--shift",
        action="append",
        default=[],
        type=replay.Shift.parse,
        help="inject a shift: [source.]column=+N|-N|*N or [source.]column:OLD->NEW (repeatable)",
    )
    replay_p.add_argument(
        "--resample-from",
        type=replay.Resample.parse,
        metavar="START..END",
        help="stationary replay: each new day is a day drawn from START..END (same weekday), moved to it",
    )
    sub.add_parser("landing", help="the landing zones' ledger: files loaded or rejected, and why")
    predict_p = sub.add_parser(
        "predict", help="score a CSV/Parquet file of request-time inputs with the champion"
    )
    predict_p.add_argument("pipeline")
    predict_p.add_argument("file", type=Path)
    predict_p.add_argument("--output", "-o", type=Path, help="write the scores here (.csv or .parquet)")
    serve_p = sub.add_parser("serve", help="the REST API on the champions (FastAPI on uvicorn)")
    serve_p.add_argument("pipelines", nargs="*", help="pipelines to serve (default: all)")
    serve_p.add_argument("--host", default="127.0.0.1")
    serve_p.add_argument("--port", type=int, default=8000)
    serve_p.add_argument(
        "--bundles",
        type=Path,
        help="serve the published bundles under this folder, never opening the warehouse (default: "
        "$ML_ASSETS_BUNDLES; under the cluster deployment, <shared root>/bundles; else the warehouse)",
    )
    return parser


def _replay(args: argparse.Namespace) -> int:
    project = load_default_project()
    pipeline = _pipeline(project, args.pipeline)
    written = replay.replay(
        project, data_root(), pipeline, args.until, args.batch, tuple(args.shift), args.resample_from
    )
    for name, files in written.items():
        print(f"{name}: {len(files)} file(s) -> {ingest.landing_dir(data_root(), name)}")
        for f in files:
            print(f"  {f.name}")
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        return run(args.time_budget, args.max_trials, args.pipelines, dask_fit_rows=args.dask_fit_rows)
    if args.command == "retrain":
        return run(args.time_budget, args.max_trials, [args.pipeline], True, args.dask_fit_rows)
    if args.command == "validate":
        return validate(args.pipeline)
    if args.command == "init":
        return init(args)
    if args.command == "replay":
        return _replay(args)
    if args.command == "predict":
        project = load_default_project()
        predict(_pipeline(project, args.pipeline), project, args.file, args.output)
        return 0
    if args.command == "serve":
        serve(args.pipelines, args.host, args.port, args.bundles)
        return 0
    if args.command == "landing":
        # Whole reasons and paths: a cut would hide the rule and the column a rejection names (65,535 is the
        # widest table polars can print).
        with (
            _connect() as conn,
            pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=65_535, fmt_str_lengths=10_000),
        ):
            print(ingest.ledger(conn))
    elif args.command == "versions":
        show_versions(_pipeline(load_default_project(), args.pipeline).name)
    elif args.command == "rollback":
        project = load_default_project()
        pipeline = _pipeline(project, args.pipeline)
        from ml_assets.core import rollback

        decision = rollback.rollback(_connect, pipeline, project.sources_of(pipeline), args.to)
        print(decision.reason)
        from ml_assets.core.tracking import sync_champion

        sync_champion(pipeline, _connect, lambda message: print(message, file=sys.stderr))
        from ml_assets.core.serving import bundle

        published = bundle.publish(
            _connect, pipeline, project.sources_of(pipeline), bundle.bundle_root(data_root())
        )
        print(f"published bundle {published} for the API (core.serving.bundle)")
    else:
        summary(load_default_project())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except UserError as exc:
        # A problem the user can fix: one message naming it, no traceback unless asked for.
        if args.debug:
            raise
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(f"ml-assets {args.command}: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
