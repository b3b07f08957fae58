"""The project stands on Dagster's public surface: nothing imports `dagster._…`, and the one undocumented
switch it relies on (DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS, orchestration/build.py) is proven to
still be honoured, so a Dagster upgrade that drops it fails here instead of silently slowing ranged runs."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import dagster as dg
import yaml

import ml_assets
from ml_assets.orchestration import build

REPO = Path(ml_assets.__file__).parents[1]
PRIVATE = "dagster" + "._"  # spelled apart so this file does not match itself


def _private_imports(path: Path, root: Path = REPO) -> list[str]:
    """`import dagster._x` / `from dagster._x import y` anywhere in the file (functions included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        found += [f"{path.relative_to(root)}:{node.lineno} {n}" for n in names if n.startswith(PRIVATE)]
    return found


def test_nothing_imports_private_dagster_modules():
    files = [p for folder in ("ml_assets", "ml_assets_tests", "bench") for p in (REPO / folder).rglob("*.py")]
    assert len(files) > 50  # the walk found the package, its tests and the benches
    offending = [hit for path in files for hit in _private_imports(path)]
    # The text too: a dotted path in configuration or a string import (importlib) is a private import.
    offending += [
        f"{path.relative_to(REPO)}: mentions {PRIVATE}"
        for path in [*files, REPO / "dagster.yaml", REPO / "workspace.yaml"]
        if path.name != Path(__file__).name and PRIVATE in path.read_text()
    ]
    assert not offending, "private Dagster imports:\n" + "\n".join(offending)


def test_the_private_import_finder_sees_both_import_forms(tmp_path):
    module = tmp_path / "probe.py"
    module.write_text(
        f"import {PRIVATE}core.x\nimport dagster\n\ndef f():\n    from {PRIVATE}core import y\n"
    )
    assert _private_imports(module, tmp_path) == [f"probe.py:1 {PRIVATE}core.x", f"probe.py:5 {PRIVATE}core"]


DAYS = dg.DailyPartitionsDefinition(start_date="2024-01-01", end_date="2024-01-11")


@dg.asset(partitions_def=DAYS, backfill_policy=dg.BackfillPolicy.single_run())
def failing_days() -> None:
    raise dg.Failure("a ranged run that fails")


def _partition_status_after_a_failed_ranged_run() -> dict[str, object]:
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(
            [failing_days],
            instance=instance,
            raise_on_error=False,
            tags={
                "dagster/asset_partition_range_start": "2024-01-01",
                "dagster/asset_partition_range_end": "2024-01-10",
            },
        )
        assert not result.success
        keys = DAYS.get_partition_keys()
        status = instance.get_status_by_partition(failing_days.key, keys, DAYS)
    assert status is not None and len(status) == 10
    return dict(status)


def test_importing_the_definitions_sets_the_planned_events_switch_and_dagster_honours_it(monkeypatch):
    """With the switch, a ranged run writes one "planned" event per asset instead of one per partition
    (the speed of a full reload, bench/RESULTS.md). Dagster's documented price of that one event, seen
    through its public per-partition status: a failed ranged run leaves its partitions unmarked instead of
    marking each one failed. If Dagster stops reading the switch, the partitions read failed either way
    and this test fails: re-measure bench/e2e.py and look for the switch's replacement."""
    assert os.environ.get(build.PLANNED_EVENTS_ENV) == "1"  # set by importing orchestration/build.py
    one_event_per_asset = _partition_status_after_a_failed_ranged_run()
    assert set(one_event_per_asset.values()) == {None}, one_event_per_asset

    monkeypatch.delenv(build.PLANNED_EVENTS_ENV)
    one_event_per_partition = _partition_status_after_a_failed_ranged_run()
    assert set(one_event_per_partition.values()) == {dg.AssetPartitionStatus.FAILED}, one_event_per_partition


def test_the_makefile_sets_the_switch_for_the_processes_it_starts():
    """`make dev` starts the webserver and daemon, which create the UI's runs without importing our code."""
    makefile = (REPO / "Makefile").read_text()
    assert f"export {build.PLANNED_EVENTS_ENV} := 1" in makefile


def test_the_instance_configuration_is_dagster_default_apart_from_telemetry():
    """No custom run coordinator or storage class: what `make` copies into DAGSTER_HOME."""
    assert yaml.safe_load((REPO / "dagster.yaml").read_text()) == {"telemetry": {"enabled": False}}
