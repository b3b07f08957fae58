"""Bad input gets a clear error and nothing is lost: broken files, missing columns, wrong types, empty
batches and blocking checks, run through Dagster on a small sample of the real data."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from ml_assets.core.errors import ArtifactError
from ml_assets.core.registry import MODEL_FILE, read_manifest
from ml_assets.core.serving.loader import ServableModel
from ml_assets.core.store import connect, warehouse_path
from ml_assets.orchestration.assets import PIPELINE_ASSETS
from ml_assets.orchestration.keys import layer_key
from ml_assets_tests.conftest import FAST_MODEL, materialize_all, write_pipelines

DOWNSTREAM = [dg.AssetKey([p, a]) for p in ("flight_delay", "flight_arr_delay") for a in PIPELINE_ASSETS]


def _counts(root: Path) -> dict[str, int]:
    with connect(warehouse_path(root)) as conn:
        return {
            t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in (
                "raw.flights",
                "validated.flights",
                "quarantine.flights",
                "flight_delay.modelling_table",
            )
        }


def _versions(root: Path) -> list[str]:
    with connect(warehouse_path(root)) as conn:
        return [
            r[0]
            # Trained versions only: a baseline registered at a first promotion is derived from one.
            for r in conn.execute(
                "SELECT path FROM registry.model_versions "
                "WHERE json_extract_string(manifest, '$.derived_from') IS NULL ORDER BY created_at"
            ).fetchall()
        ]


def _failure_messages(result: dg.ExecuteInProcessResult) -> str:
    return "\n".join(e.step_failure_data.error.message for e in result.all_events if e.is_step_failure)


def _materialized(result: dg.ExecuteInProcessResult) -> set[dg.AssetKey]:
    return {e.asset_key for e in result.get_asset_materialization_events()}


def _edit_flights(sources: Path, edit: Callable[[pl.DataFrame], pl.DataFrame]) -> Path:
    path = sources / "flights.csv"
    edit(pl.read_csv(path, infer_schema=False)).write_csv(path)
    return path


def _set_flight_values(sources: Path, column: str, value: str, where: pl.Expr) -> Path:
    """Overwrite `column` with `value` on the rows of the sample's flights file where `where` holds."""
    return _edit_flights(
        sources,
        lambda f: f.with_columns(pl.when(where).then(pl.lit(value)).otherwise(pl.col(column)).alias(column)),
    )


EVERY_TENTH_ROW = pl.int_range(pl.len()) % 10 == 0


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory, sample_sources: Path) -> Path:
    """The data directory of one successful run of everything on the sample; tests work on copies."""
    base = tmp_path_factory.mktemp("first_run")
    root = base / "data"
    assert materialize_all(write_pipelines(base / "pipelines", sample_sources, FAST_MODEL), root).success
    return root


@pytest.fixture
def good_run(first_run: Path, tmp_path: Path, sample_sources: Path) -> tuple[Path, Path, Path]:
    """(pipelines, data dir, sources) after a successful run: a copy of `first_run`'s data directory (its
    registry still names the first run's model folders, which no test here writes) and private sources."""
    sources = tmp_path / "sources"
    shutil.copytree(sample_sources, sources)
    shutil.copytree(first_run, tmp_path / "data")
    return write_pipelines(tmp_path / "pipelines", sources, FAST_MODEL), tmp_path / "data", sources


def test_running_twice_replaces_tables_and_adds_a_model_version(good_run):
    pipelines, root, _ = good_run
    before = _counts(root)
    assert materialize_all(pipelines, root).success
    assert _counts(root) == before
    assert len(_versions(root)) == 4  # two pipelines, two runs


def test_corrupt_file_fails_the_run_naming_the_file_and_keeps_previous_tables(good_run):
    pipelines, root, sources = good_run
    before, versions = _counts(root), _versions(root)
    path = sources / "flights.csv"
    path.write_text(path.read_text().replace("\n", '\n"unterminated,quote\n', 1)[:200_000])
    result = materialize_all(pipelines, root, raise_on_error=False)
    assert not result.success
    message = _failure_messages(result)
    assert "source 'flights'" in message and str(path) in message
    assert not _materialized(result) & {layer_key("raw", "flights"), *DOWNSTREAM}
    assert _counts(root) == before
    assert _versions(root) == versions
    ServableModel.load(Path(versions[-1]))  # the previous model is intact and loadable


def test_missing_column_fails_validation_naming_file_column_and_rule(good_run):
    pipelines, root, sources = good_run
    before = _counts(root)
    path = _edit_flights(sources, lambda f: f.drop("distance"))
    result = materialize_all(pipelines, root, raise_on_error=False)
    message = _failure_messages(result)
    assert not result.success
    assert "'distance'" in message and "rule: schema" in message and str(path) in message
    after = _counts(root)
    assert after["validated.flights"] == before["validated.flights"]
    assert after["flight_delay.modelling_table"] == before["flight_delay.modelling_table"]


def test_empty_batch_fails_and_keeps_previous_raw_table(good_run):
    pipelines, root, sources = good_run
    before = _counts(root)
    _edit_flights(sources, lambda f: f.head(0))
    result = materialize_all(pipelines, root, raise_on_error=False)
    assert not result.success
    assert "no data rows" in _failure_messages(result)
    assert _counts(root) == before


def test_wrong_types_are_quarantined_with_file_row_column_and_rule(sample_project):
    pipelines, root = sample_project
    sources = pipelines.parent / "sources"
    # Three rows get a non-numeric delay: few enough to stay under the quarantine threshold.
    _set_flight_values(sources, "dep_delay", "abc", pl.int_range(pl.len()).is_in([3, 10, 50]))
    assert materialize_all(pipelines, root).success
    with connect(warehouse_path(root)) as conn:
        rows = conn.execute(
            "SELECT _source_file, _source_row, _rule, _column, _reasons, dep_delay "
            "FROM quarantine.flights WHERE _rule = 'type'"
        ).fetchall()
    assert sorted(r[1] for r in rows) == [4, 11, 51]  # 1-based data rows
    for file, _, rule, column, reasons, value in rows:
        assert file.endswith("flights.csv") and rule == "type" and column == "dep_delay" and value == "abc"
        assert "'abc' is not a valid float" in reasons


def test_failed_blocking_check_stops_everything_downstream(sample_project):
    pipelines, root = sample_project
    sources = pipelines.parent / "sources"
    # 10% of flights with an impossible distance: validation quarantines them, then the quarantine-share
    # check (max 1%) must stop both pipelines before any training.
    _set_flight_values(sources, "distance", "-5", EVERY_TENTH_ROW)
    result = materialize_all(pipelines, root, raise_on_error=False)
    assert not result.success
    failed = [c for c in result.get_asset_check_evaluations() if not c.passed]
    assert [(c.asset_key.to_user_string(), c.check_name) for c in failed] == [
        ("validated/flights_validated", "quarantine_share")
    ]
    assert "min on distance" in failed[0].description
    assert layer_key("validated", "flights") in _materialized(result)
    assert not _materialized(result) & set(DOWNSTREAM)


def test_a_later_run_does_not_build_on_data_whose_check_failed(sample_project):
    pipelines, root = sample_project
    sources = pipelines.parent / "sources"
    original = (sources / "flights.csv").read_bytes()
    _set_flight_values(sources, "distance", "-5", EVERY_TENTH_ROW)
    instance = dg.DagsterInstance.ephemeral()
    assert not materialize_all(pipelines, root, raise_on_error=False, instance=instance).success
    # Blocking checks only stop steps of their own run: a run of just the modelling table must refuse too.
    table = dg.AssetKey(["flight_delay", "modelling_table"])
    result = materialize_all(pipelines, root, raise_on_error=False, selection=[table], instance=instance)
    assert not result.success
    assert "validated/flights_validated:quarantine_share" in _failure_messages(result)
    (sources / "flights.csv").write_bytes(original)
    assert materialize_all(pipelines, root, instance=instance).success


def test_tampered_model_artifact_is_refused(first_run, tmp_path):
    version_dir = tmp_path / "version"
    shutil.copytree(_versions(first_run)[-1], version_dir)
    read_manifest(version_dir)
    with open(version_dir / MODEL_FILE, "a") as fh:
        fh.write("\n# tampered\n")
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        ServableModel.load(version_dir)
