"""The flagship's graph on small real data, once on a local DuckDB file and once on DuckLake (PostgreSQL
catalog, Parquet files under a shared root): the same table contents, and no local warehouse file."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml_assets.core import registry, store
from ml_assets.core.spec.load import default_pipelines_dir
from ml_assets_tests.conftest import materialize_all

# Differ between two runs by design (times, run and version ids, file paths) or follow from one that does.
PER_RUN = {
    "recorded_at", "created_at", "updated_at", "decided_at", "computed_at", "checked_at", "applied_at",
    "built_at", "run_id", "version", "path", "manifest", "manifest_sha256", "model_sha256", "champion",
    "challenger", "champion_before", "champion_after", "details", "id", "drift_run", "report", "_source_file",
    "scored_at", "description",
}  # fmt: skip


def contents(database: str, data_path: str | None) -> dict[str, list[tuple]]:
    """Every table's rows (sorted, without the per-run columns), by schema-qualified name."""
    out = {}
    with store.connect(database, data_path) as conn:
        names = conn.execute(
            "SELECT schema_name, table_name FROM duckdb_tables() WHERE database_name = current_database()"
        ).fetchall()
        for schema, name in names:
            table = f'{schema}."{name}"'
            kept = [c for (c, *_) in conn.execute(f"DESCRIBE {table}").fetchall() if c not in PER_RUN]
            cols = ", ".join(f'"{c}"' for c in kept) or "count(*)"  # only per-run columns: their count
            rows = conn.execute(f"SELECT {cols} FROM {table}").fetchall()
            out[f"{schema}.{name}"] = sorted(rows, key=repr)
    return out


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

    on_file = contents(str(store.warehouse_path(local_root)), None)
    on_lake = contents(url, None)
    schemas = {name.split(".")[0] for name in on_lake}
    assert {
        "raw",
        "validated",
        "quarantine",
        "flight_delay",
    } <= schemas and "flight_delay.modelling_table" in on_lake
    assert store.KEYS.keys() <= set(on_lake)
    assert on_lake.keys() == on_file.keys()
    differ = [t for t in on_file if on_file[t] != on_lake[t]]
    assert not differ, f"tables whose contents differ between the backends: {differ}"
    with store.connect(url) as conn:
        assert registry.alias_version(conn, "flight_delay", registry.CHAMPION) is not None
    # The lake's Parquet files are under the shared root; nowhere a DuckDB database file.
    assert list(shared.rglob("*.parquet"))
    assert [
        p for p in tmp_path.rglob("*") if p.suffix in (".duckdb", ".wal") and local_root not in p.parents
    ] == []
    assert not Path("warehouse.duckdb").exists()
