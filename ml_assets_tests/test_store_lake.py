"""The warehouse on DuckLake (a PostgreSQL catalog, Parquet data in a folder), against the same store
code as the local DuckDB file: the platform's tables created and migrated, upserts with the same result
on both, two processes writing the same tables at once, and conflicts retried or reported."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import duckdb
import polars as pl
import pytest

from ml_assets.core import changes, store
from ml_assets.core.errors import StoreError
from ml_assets.core.hashing import frame_fingerprint
from ml_assets_tests.store_helpers import PLATFORM_TABLES, columns, tables, version_rows


def local_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.suffix in (".duckdb", ".wal")]


def test_a_fresh_lake_gets_every_platform_table_and_no_local_database_file(new_lake, tmp_path):
    url, data = new_lake()
    with store.connect(url, data) as conn:
        assert tables(conn) >= PLATFORM_TABLES
        assert [v for v, *_ in version_rows(conn)] == list(range(1, store.LATEST + 1))
        store.insert(conn, store.LANDING_FILES, {"source": "s", "sha256": "x" * 64, "rows": 3})
    with store.connect(url, data) as conn:  # reopened: nothing is migrated twice, the row is there
        assert [v for v, *_ in version_rows(conn)] == list(range(1, store.LATEST + 1))
        assert conn.execute(f"SELECT rows FROM {store.LANDING_FILES}").fetchall() == [(3,)]
    assert local_files(tmp_path) == []


def test_an_older_lake_is_migrated_forward_in_place(new_lake, monkeypatch):
    url, data = new_lake()
    with monkeypatch.context() as old:
        old.setattr(store, "MIGRATIONS", store.MIGRATIONS[:3])
        old.setattr(store, "LATEST", 3)
        with store.connect(url, data) as conn:
            assert "manifest_sha256" not in columns(conn, store.MODEL_VERSIONS)
            store.insert(
                conn,
                store.MODEL_VERSIONS,
                {"version": "v1", "pipeline": "p", "created_at": dt.datetime(2024, 1, 1), "path": "/m"},
            )
    with store.connect(url, data) as conn:
        assert [v for v, *_ in version_rows(conn)] == list(range(1, store.LATEST + 1))
        assert "manifest_sha256" in columns(conn, store.MODEL_VERSIONS)
        assert {store.VALIDATED_CHANGES, store.MODELLING_BUILDS} <= tables(conn)
        assert conn.execute(f"SELECT version, manifest_sha256 FROM {store.MODEL_VERSIONS}").fetchall() == [
            ("v1", None)
        ]


def alias(pipeline: str, name: str, version: str) -> dict:
    return {"pipeline": pipeline, "alias": name, "version": version, "updated_at": dt.datetime(2024, 1, 1)}


def upserted_aliases(conn: duckdb.DuckDBPyConnection) -> list[tuple]:
    store.insert_many(conn, store.ALIASES, [alias("p", "champion", "v1"), alias("p", "challenger", "v2")])
    store.insert_many(
        conn, store.ALIASES, [alias("p", "champion", "v3"), alias("q", "champion", "v1")], replace=True
    )
    # Two rows with one key in one call: the later wins, as INSERT OR REPLACE did.
    store.insert_many(
        conn, store.ALIASES, [alias("p", "challenger", "v4"), alias("p", "challenger", "v5")], replace=True
    )
    return conn.execute(f"SELECT pipeline, alias, version FROM {store.ALIASES} ORDER BY ALL").fetchall()


def test_upserts_replace_by_key_alike_on_a_file_and_on_a_lake(new_lake, tmp_path):
    url, data = new_lake()
    with store.connect(tmp_path / "w.duckdb") as conn:
        on_file = upserted_aliases(conn)
    with store.connect(url, data) as conn:
        on_lake = upserted_aliases(conn)
    assert on_file == on_lake == [("p", "challenger", "v5"), ("p", "champion", "v3"), ("q", "champion", "v1")]


def test_the_declared_keys_are_the_local_files_primary_keys(tmp_path):
    """`KEYS` stands in for the constraints DuckLake lacks: they must not drift apart."""
    with store.connect(tmp_path / "w.duckdb") as conn:
        found = {
            f"{schema}.{table}": tuple(cols)
            for schema, table, cols in conn.execute(
                "SELECT schema_name, table_name, constraint_column_names FROM duckdb_constraints() "
                "WHERE constraint_type = 'PRIMARY KEY'"
            ).fetchall()
        }
    assert found == store.KEYS


WRITER = textwrap.dedent("""
    import sys, time, datetime as dt
    from pathlib import Path
    from ml_assets.core import changes, store
    url, data, who, n, go = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), Path(sys.argv[5])
    with store.connect(url, data) as conn:
        while not go.exists():
            time.sleep(0.01)
        for i in range(n):
            for attempt in store.transactions(conn, "main.events"):
                with attempt:
                    conn.execute("DELETE FROM main.events WHERE who = ? AND i = ?", [who, i])
                    conn.execute("INSERT INTO main.events SELECT ?, ?, range FROM range(50)", [who, i])
                    changes.record(conn, who, None, None)
            row = {"pipeline": "shared", "alias": "last", "version": f"{who}-{i}", "updated_at": dt.datetime.now()}
            store.insert(conn, store.ALIASES, row, replace=True)
            store.insert(conn, store.ALIASES, row | {"pipeline": who}, replace=True)
""")


# Slow: ~30 s on a busy machine, most of it two interpreters starting; the in-process conflict test below
# covers the retry in the default run.
@pytest.mark.slow
def test_two_processes_writing_the_same_tables_at_once_both_succeed_with_all_rows(new_lake, tmp_path):
    url, data = new_lake()
    with store.connect(url, data) as conn:
        conn.execute("CREATE TABLE main.events (who VARCHAR, i INTEGER, r BIGINT)")
    n, go = 4, tmp_path / "go"
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, url, data, who, str(n), str(go)], stderr=subprocess.PIPE, text=True
        )
        for who in ("a", "b")
    ]
    go.touch()
    for w in writers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err
    with store.connect(url, data) as conn:
        per_writer = conn.execute(
            "SELECT who, count(*), count(DISTINCT i) FROM main.events GROUP BY 1 ORDER BY 1"
        ).fetchall()
        assert per_writer == [("a", n * 50, n), ("b", n * 50, n)]
        aliases = dict(
            conn.execute(f"SELECT pipeline, version FROM {store.ALIASES} WHERE alias = 'last'").fetchall()
        )
        assert aliases["a"] == f"a-{n - 1}" and aliases["b"] == f"b-{n - 1}"
        assert aliases["shared"] in (f"a-{n - 1}", f"b-{n - 1}") and len(aliases) == 3
        # The change log numbers every write once, in commit order, though both wrote it at once.
        seqs = [
            s for (s,) in conn.execute(f"SELECT seq FROM {store.VALIDATED_CHANGES} ORDER BY seq").fetchall()
        ]
        assert seqs == list(range(1, 2 * n + 1))
        assert len(changes.since(conn, 0, ["a", "b"])) == 2 * n
    assert local_files(tmp_path) == []


def test_a_conflict_is_retried_with_the_other_writers_rows_and_a_lasting_one_names_the_table(
    new_lake, monkeypatch
):
    url, data = new_lake()
    monkeypatch.setenv(store.LOCK_WAIT_ENV, "1")
    with store.connect(url, data) as mine, store.connect(url, data) as other:
        mine.execute("CREATE TABLE main.t AS SELECT 0 AS k")
        tries = 0
        for attempt in store.transactions(mine, "main.t"):
            with attempt:
                tries += 1
                mine.execute("DELETE FROM main.t")
                if tries == 1:  # another process commits a write to the table first, once
                    other.execute("INSERT INTO main.t VALUES (1)")
        # The second try ran on a snapshot with the other writer's row, and deleted it too.
        assert tries == 2 and mine.execute("SELECT count(*) FROM main.t").fetchone()[0] == 0
        mine.execute("INSERT INTO main.t VALUES (5)")
        with pytest.raises(StoreError, match=r"^main\.t: .*write conflict.* ML_ASSETS_LOCK_WAIT_S"):
            for attempt in store.transactions(mine, "main.t"):
                with attempt:
                    mine.execute("DELETE FROM main.t")
                    other.execute("INSERT INTO main.t VALUES (2)")
        assert mine.execute("SELECT count(*) FROM main.t").fetchone()[0] > 0


def test_an_unreachable_catalog_or_no_shared_root_is_a_clear_error(monkeypatch):
    url = "ducklake:postgres:dbname=nothing host=127.0.0.1 port=1 user=ml password=secret-word"
    with (
        pytest.raises(StoreError, match=r"cannot attach the DuckLake catalog") as failed,
        store.connect(url, "/tmp/x"),
    ):
        pass
    assert "secret-word" not in str(failed.value) and "password=***" in str(failed.value)
    monkeypatch.delenv(store.SHARED_ROOT_ENV, raising=False)
    with pytest.raises(StoreError, match=store.SHARED_ROOT_ENV), store.connect(url):
        pass


def test_the_warehouse_setting_defaults_to_the_data_directorys_file(monkeypatch, tmp_path):
    monkeypatch.delenv(store.WAREHOUSE_ENV, raising=False)
    assert store.warehouse(tmp_path) == str(tmp_path / "warehouse.duckdb")
    monkeypatch.setenv(store.WAREHOUSE_ENV, "ducklake:postgres:dbname=x")
    assert store.warehouse(tmp_path) == "ducklake:postgres:dbname=x"
    monkeypatch.setenv(store.SHARED_ROOT_ENV, str(tmp_path / "shared"))
    assert store.lake_data_path() == f"{tmp_path}/shared/warehouse/"


def test_processes_attaching_a_new_catalog_at_once_all_get_it(new_lake):
    """The first attach of an empty catalog database creates DuckLake's tables; several at once (a fresh
    cluster's workers) collide on PostgreSQL's unique names, and the losers attach again."""
    url, data = new_lake()
    go, attached, failed = threading.Barrier(4), [], []

    def attach() -> None:
        go.wait()
        try:
            attached.append(store._attached_lake(url, store.lake_data_path(data)))
        except Exception as exc:  # collected for the assertion's message
            failed.append(exc)

    threads = [threading.Thread(target=attach) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not failed and len(attached) == 4, failed
    for conn in attached:
        found = conn.execute(
            "SELECT type FROM duckdb_databases() WHERE database_name = ?", [store.LAKE_ALIAS]
        ).fetchall()
        assert found == [("ducklake",)]
        conn.close()


def test_the_same_rows_from_a_file_and_a_lake_have_one_fingerprint(new_lake, tmp_path):
    """A version's data fingerprint follows the rows and their order, not how the warehouse handed them
    over (a lake's Parquet files arrive in other pieces than a file's blocks); the model step puts the
    rows in one order before it fingerprints them."""
    url, data = new_lake()
    frames = []
    for database, data_path in ((str(tmp_path / "w.duckdb"), None), (url, data)):
        with store.connect(database, data_path) as conn:
            conn.execute("CREATE TABLE main.rows (i BIGINT, s VARCHAR, x DOUBLE)")
            for part in range(3):  # three inserts: three data files on the lake
                conn.execute(
                    "INSERT INTO main.rows SELECT range, 'a fairly long text ' || range, range / 7 "
                    f"FROM range({part * 1000}, {(part + 1) * 1000})"
                )
            frames.append(conn.execute("SELECT * FROM main.rows ORDER BY i").pl())
    on_file, on_lake = frames
    # As a reader may hand them over: in pieces (one per data file, or per batch of a stream).
    pieces = pl.concat([on_lake.slice(0, 1000), on_lake.slice(1000)], rechunk=False)
    assert on_file.equals(on_lake) and pieces.n_chunks() == 2
    assert frame_fingerprint(on_file) == frame_fingerprint(on_lake) == frame_fingerprint(pieces)
    assert frame_fingerprint(on_file) != frame_fingerprint(on_file.reverse())
