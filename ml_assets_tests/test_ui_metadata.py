"""What the UI tells: the report route, progress in the run log, statuses that say what a version is now,
readable verdicts and descriptions, owners and code versions, and our own message for a partitioned
source launched without partitions. (The rendered pages themselves: test_ui_browser, slow.)"""

from __future__ import annotations

import functools
import re
import urllib.error
import urllib.request
from pathlib import Path

import dagster as dg
import pytest
import yaml

from ml_assets.core import promotion, registry
from ml_assets.core.errors import ConfigError
from ml_assets.core.promotion import Decision
from ml_assets.core.report_server import serve_in_thread, url_of
from ml_assets.core.spec import DEFAULT_OWNERS
from ml_assets.core.spec.load import load_project
from ml_assets.core.store import connect, warehouse_path
from ml_assets.orchestration.assets.training import verdict_markdown
from ml_assets.orchestration.definitions import build_definitions
from ml_assets.orchestration.keys import layer_key, source_keys
from ml_assets.orchestration.metadata import decisions_table, md_table, round_floats
from ml_assets_tests.conftest import materialize_all
from ml_assets_tests.helpers import FLAGSHIP_MODEL, gate_chooses_champion

DELAY = "flight_delay"


def test_report_server_serves_the_reports_folder_and_nothing_else(tmp_path):
    reports = tmp_path / "reports"
    (reports / DELAY / "v1").mkdir(parents=True)
    page = reports / DELAY / "v1" / "report.html"
    page.write_text("<!doctype html><p>hello</p>")
    (tmp_path / "secret.txt").write_text("outside the reports folder")
    server = serve_in_thread(reports)
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        url = url_of(base, reports, page)
        assert url == f"{base}/{DELAY}/v1/report.html"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.read() == page.read_bytes()
            assert response.headers["Cache-Control"] == "no-store"
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{base}/../secret.txt", timeout=30)
    finally:
        server.shutdown()
        server.server_close()


def _copy(root: Path, source: Path) -> str:
    """Register a copy of a version under a new id (as test_registry's crash writer does)."""
    manifest = registry.read_manifest(source)
    version = registry.new_version_id()
    files = {name: source / name for name in manifest.files}
    folder = registry.write_version(
        root / "models", DELAY, version, files, manifest.model_copy(update={"version": version})
    )
    with connect(warehouse_path(root)) as conn:
        registry.register(conn, folder)
    return version


def test_model_step_logs_each_trial_and_statuses_say_what_a_version_is_now(sample_project):
    pipelines, root = sample_project
    instance = dg.DagsterInstance.ephemeral()
    result = materialize_all(pipelines, root, selection=FLAGSHIP_MODEL, instance=instance)
    assert result.success
    messages = [e.message for e in instance.all_logs(result.run_id) if e.step_key == f"{DELAY}__model"]
    trials = [m for m in messages if m.startswith("trial ")]
    # FAST_MODEL: two trials, each with the best score so far and what is left of the budget.
    assert [t.split(":")[0] for t in trials] == ["trial 1 of 2", "trial 2 of 2"], messages
    # The search gets what the baselines and the defaults' fit leave of the 600 s budget, minus one fit.
    assert all(re.search(r"best so far 0\.\d+; \d+ s of the 5\d\d s search budget left", t) for t in trials)
    raw = [e.message for e in instance.all_logs(result.run_id) if e.step_key == "raw__flights_raw"]
    assert any(m.startswith("loaded ") and "rows/s" in m for m in raw), raw

    with connect(warehouse_path(root)) as conn:
        trained = registry.version_of_run(conn, DELAY, result.run_id)
        source = registry.version_dir(conn, trained)
    # The gate's own decisions: the constant baseline first, then the trained model promoted over it, then a
    # copy of the champion refused (the same scores: no gain).
    gated = gate_chooses_champion(pipelines, root)
    copy = _copy(root, source)
    spec = load_project(pipelines).pipelines[DELAY]
    db = functools.partial(connect, warehouse_path(root))
    assert promotion.promote_or_refuse(db, spec).action == "refuse"
    with connect(warehouse_path(root)) as conn:
        statuses = dict(registry.versions(conn, DELAY).select("version", "status").iter_rows())
    assert statuses == {
        gated.previous: "previous champion",
        trained: "champion",
        copy: "refused+challenger",
    }


def test_verdicts_read_well():
    first = Decision("promote_first", "roc_auc improves", "v2", None, "v2")
    assert verdict_markdown(first).value.endswith("Champion now: `v2` (no champion before)")
    refused = Decision("refuse", "x" * 5000, "v3", None, None)
    text = verdict_markdown(refused).value
    # Short enough for the UI to render inline (it hides markdown of 1,000 characters or more).
    assert (
        text.startswith("### REFUSED: challenger v3")
        and len(text) < 1000
        and text.endswith("No champion yet.")
    )
    assert round_floats({"a": [0.123456789, {"b": 2.0000001}], "c": "s"}) == {
        "a": [0.12346, {"b": 2.0}],
        "c": "s",
    }


def test_tables_fit_and_keep_their_rows():
    import datetime as dt

    import polars as pl

    log = pl.DataFrame(
        {
            "decided_at": [dt.datetime(2026, 1, 1, 12, 30, 15, 123456)],
            "action": ["refuse"],
            "challenger": ["v1"],
            "champion_before": [None],
            "champion_after": [None],
            "reason": ["a | b\nc " + "long " * 40],
        }
    )
    table = decisions_table(log).value
    header, _, row = table.splitlines()
    assert header == "| decided_at | action | challenger | reason |"
    assert row.startswith("| 2026-01-01 12:30 | refuse | v1 | a \\| b c long") and row.endswith("… |")
    assert md_table(pl.DataFrame({"x": ["p|q"]})).value.splitlines()[-1] == "| p\\|q |"


def test_descriptions_say_worse_in_the_metrics_direction(tmp_path, sample_project):
    pipelines, _ = sample_project
    defs = build_definitions(pipelines, tmp_path)
    sensors = {s.name: s.description for s in defs.sensors}
    assert "worse (lower) than its test score" in sensors["flight_delay_retrain"]  # roc_auc
    assert "worse (higher) than its test score" in sensors["flight_arr_delay_retrain"]  # rmse


def test_every_asset_has_owners_and_a_code_version_that_follows_its_config(tmp_path, sample_project):
    pipelines, _ = sample_project
    graph = build_definitions(pipelines, tmp_path).resolve_asset_graph()
    nodes = {key: graph.get(key) for key in graph.get_all_asset_keys()}
    assert len(nodes) > 20
    unowned = [key for key, n in nodes.items() if n.owners != DEFAULT_OWNERS or not n.code_version]
    assert not unowned, unowned
    model, flights = dg.AssetKey([DELAY, "model"]), layer_key("raw", "flights")
    path = pipelines / f"{DELAY}.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["model"]["max_trials"] += 1
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    changed = build_definitions(pipelines, tmp_path).resolve_asset_graph()
    assert changed.get(model).code_version != nodes[model].code_version
    assert changed.get(flights).code_version == nodes[flights].code_version


def test_owners_come_from_the_pipeline_file(tmp_path, sample_project):
    pipelines, _ = sample_project
    before = build_definitions(pipelines, tmp_path).resolve_asset_graph()
    path = pipelines / f"{DELAY}.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["owners"] = ["team:flights", "ana@example.com"]
    raw["sources"]["planes"]["owners"] = ["team:fleet"]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    graph = build_definitions(pipelines, tmp_path).resolve_asset_graph()
    owners = {key.to_user_string(): graph.get(key).owners for key in graph.get_all_asset_keys()}
    # The pipeline's assets, and the sources its file defines unless a source names its own owners; the
    # pipeline extending it inherits them with the rest of the file.
    assert owners[f"{DELAY}/model"] == owners["validated/flights_validated"] == raw["owners"]
    assert owners["profile/weather_profile"] == owners["flight_arr_delay/promotion"] == raw["owners"]
    assert owners["raw/planes_raw"] == owners["profile/planes_profile"] == ["team:fleet"]
    for key in (dg.AssetKey([DELAY, "model"]), layer_key("raw", "planes")):  # owning changes nothing built
        assert graph.get(key).code_version == before.get(key).code_version
    raw["owners"] = ["nobody"]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError, match="owners"):
        load_project(pipelines)


def test_a_partitioned_source_launched_without_partitions_says_to_pick_them(sample_project):
    pipelines, root = sample_project
    defs = build_definitions(pipelines, root)
    raw = [a for a in defs.assets if layer_key("raw", "flights") in a.keys]
    result = dg.materialize(raw, resources=defs.resources, raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.message
    assert "raw/flights_raw is partitioned: launch it with partitions" in message, message
    assert "CheckError" not in message


def test_a_launch_without_partitions_fails_at_its_first_partitioned_step_and_writes_nothing(sample_project):
    """A launch of partitioned assets without partitions (the launchpad, Dagster's own run coordinator):
    the run fails at its first partitioned step with our message, the steps after it are skipped, and
    nothing partitioned is written (docs/design.md says what the old refusal at submission gave more)."""
    pipelines, root = sample_project
    defs = build_definitions(pipelines, root)
    keys = [*source_keys("flights"), *source_keys("planes")]
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(
            list(defs.assets),
            selection=keys,
            resources=defs.resources,
            instance=instance,
            raise_on_error=False,
        )
        assert not result.success
        run = instance.get_run_by_id(result.run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.FAILURE
        (failure,) = [e for e in result.all_events if e.is_step_failure]
        assert failure.step_key == "raw__flights_raw"  # the first partitioned step
        message = failure.step_failure_data.error.message
        assert "raw/flights_raw is partitioned: launch it with partitions" in message, message
        assert "planes" not in message
        started = {e.step_key for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_START}
        assert "raw__flights_raw" in started and "validate_flights" not in started
        flights = set(source_keys("flights"))
        assert not [e for e in result.get_asset_materialization_events() if e.asset_key in flights]
    with connect(warehouse_path(root)) as conn:
        assert not conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'flights'"
        ).fetchone()[0]


def test_a_run_over_many_partitions_writes_its_metadata_once_on_the_last_partition(sample_project):
    """A ranged run's metadata (the bulk of the event log's work over a year of days) goes on the range's
    last partition, which the UI shows; every other partition of the range points there (the batch scores'
    too: test_serving)."""
    pipelines, root = sample_project
    selection = [*source_keys("weather")]
    result = materialize_all(pipelines, root, selection=selection)
    for key in selection:
        events = sorted(
            (e for e in result.get_asset_materialization_events() if e.asset_key == key),
            key=lambda e: e.partition,
        )
        assert len(events) > 1, key
        *earlier, last = (e.materialization.metadata for e in events)
        assert "dagster/row_count" in last and "table" in last, key
        assert all(set(m) == {"run_range"} for m in earlier), key
        assert all(events[-1].partition in m["run_range"].value for m in earlier), key
    validated_last = sorted(
        (e for e in result.get_asset_materialization_events() if e.asset_key == selection[1]),
        key=lambda e: e.partition,
    )[-1].materialization.metadata
    assert {"schema", "quarantine_share", "dagster/column_schema", "preview"} <= set(validated_last)
