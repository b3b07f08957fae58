"""The flagship's graph on small real data, once on a local DuckDB file and once on DuckLake (PostgreSQL
catalog, Parquet files under a shared root): the same table contents, and no local warehouse file."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml_assets.core import registry, store
from ml_assets.core.spec.load import default_pipelines_dir
from ml_assets_tests.conftest import materialize_all
from ml_assets_tests.store_helpers import differing, table_contents


@pytest.mark.slow
def test_the_flagship_on_ducklake_writes_the_same_tables_as_on_a_local_file(
    sample_project, new_lake, tmp_path, monkeypatch
):
    pipelines, _ = sample_project
    for other in set(p.name for p in default_pipelines_dir().glob("*.yaml")) - {"flight_delay.yaml"}:
        (pipelines / other).unlink()
    local_root = tmp_path / "local"
    monkeypatch.delenv(store.WAREHOUSE_ENV, raising=False)
    assert materialize_all(pipelines, local_root).success

    url, _ = new_lake()
    shared, lake_root = tmp_path / "shared", tmp_path / "lake"
    monkeypatch.setenv(store.WAREHOUSE_ENV, url)
    monkeypatch.setenv(store.SHARED_ROOT_ENV, str(shared))
    assert materialize_all(pipelines, lake_root).success

    on_file = table_contents(str(store.warehouse_path(local_root)))
    on_lake = table_contents(url)
    schemas = {name.split(".")[0] for name in on_lake}
    assert {
        "raw",
        "validated",
        "quarantine",
        "flight_delay",
    } <= schemas and "flight_delay.modelling_table" in on_lake
    assert store.KEYS.keys() <= set(on_lake)
    assert on_lake.keys() == on_file.keys()
    differ = differing(on_lake, on_file)
    assert not differ, f"tables whose contents differ between the backends: {differ}"
    with store.connect(url) as conn:
        assert registry.alias_version(conn, "flight_delay", registry.CHAMPION) is not None
    # The lake's Parquet files are under the shared root; nowhere a DuckDB database file.
    assert list(shared.rglob("*.parquet"))
    assert [
        p for p in tmp_path.rglob("*") if p.suffix in (".duckdb", ".wal") and local_root not in p.parents
    ] == []
    assert not Path("warehouse.duckdb").exists()
