"""The warehouse store on real DuckDB files: a fresh data directory gets every platform table, an old one
is upgraded in place once, a newer one is refused untouched, a failing migration leaves nothing behind,
rows are inserted by column name, and a file held by another process is waited for."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import duckdb
import pytest

from ml_assets.core import check_results, store
from ml_assets.core.errors import StoreError
from ml_assets.core.serving import batch_scores
from ml_assets.core.spec.load import default_pipelines_dir, load_project
from ml_assets_tests.store_helpers import PLATFORM_TABLES, columns, tables, version_rows


def snapshot(path: Path) -> dict[str, list[tuple]]:
    """Every table's name, columns and rows, read without the store (so nothing is migrated)."""
    conn = duckdb.connect(str(path), read_only=True)
    try:
        return {
            table: [
                tuple(columns(conn, table)),
                *sorted(map(repr, conn.execute(f"SELECT * FROM {table}").fetchall())),
            ]
            for table in sorted(tables(conn))
        }
    finally:
        conn.close()


@pytest.fixture
def warehouse(tmp_path: Path) -> Path:
    return store.warehouse_path(tmp_path / "data")


# --- a fresh data directory --------------------------------------------------------------------------


def test_fresh_warehouse_is_at_the_latest_version_with_every_platform_table(warehouse):
    assert not warehouse.exists()
    with store.connect(warehouse) as conn:
        assert store.schema_version(conn) == store.LATEST
        assert tables(conn) >= PLATFORM_TABLES
        assert "run_id" in columns(conn, "registry.model_versions")
        assert [row[0] for row in version_rows(conn)] == list(range(1, store.LATEST + 1))
    assert warehouse.exists()
    # Reopening a current warehouse changes nothing.
    before = snapshot(warehouse)
    with store.connect(warehouse) as conn:
        assert store.schema_version(conn) == store.LATEST
    assert snapshot(warehouse) == before


# --- an old data directory (before versioning) -------------------------------------------------------

V1_ROW = (
    "flight_delay-20240101T000000-abc123",
    "flight_delay",
    dt.datetime(2024, 1, 1, 12, 30),
    "binary",
    "roc_auc",
    0.71,
    0.72,
    0.5,
    "2013-01-01",
    "2013-09-30",
    "fingerprint",
    "code",
    "sha",
    "/models/flight_delay/model.pkl",
    '{"k": 1}',
)
V1_COLUMNS = [
    "version",
    "pipeline",
    "created_at",
    "task",
    "metric",
    "cv_score",
    "test_score",
    "baseline_test_score",
    "train_start",
    "train_end",
    "data_fingerprint",
    "code_version",
    "model_sha256",
    "path",
    "manifest",
]


def write_v1_warehouse(path: Path) -> None:
    """A data directory as ml_assets wrote it before the store versioned its schema."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = duckdb.connect(str(path))
    try:
        conn.execute(store.MIGRATIONS[0][1])
        assert len(V1_ROW) == len(V1_COLUMNS) == len(columns(conn, "registry.model_versions"))
        conn.execute(f"INSERT INTO registry.model_versions VALUES ({', '.join('?' for _ in V1_ROW)})", V1_ROW)
        assert "meta.schema_version" not in tables(conn)
        assert "run_id" not in columns(conn, "registry.model_versions")
    finally:
        conn.close()


def test_old_data_directory_is_upgraded_in_place_once(warehouse):
    write_v1_warehouse(warehouse)

    with store.connect(warehouse) as conn:
        assert store.schema_version(conn) == store.LATEST
        assert tables(conn) >= PLATFORM_TABLES
        rows = conn.execute(f"SELECT {', '.join(V1_COLUMNS)}, run_id FROM registry.model_versions").fetchall()
        first = version_rows(conn)

    assert len(rows) == 1
    assert rows[0][:-1] == V1_ROW
    assert rows[0][-1] is None  # run_id: not recorded before the column existed
    assert [row[0] for row in first] == list(range(1, store.LATEST + 1))
    assert all(row[2] is not None for row in first)

    with store.connect(warehouse) as conn:
        second = version_rows(conn)
        assert conn.execute("SELECT count(*) FROM registry.model_versions").fetchone()[0] == 1
    assert second == first  # nothing re-applied: same versions, same applied_at


def test_migrate_reports_the_version_it_found(warehouse):
    write_v1_warehouse(warehouse)
    conn = duckdb.connect(str(warehouse))
    try:
        assert store.schema_version(conn) == 1
        assert store.migrate(conn) == 1
        assert store.schema_version(conn) == store.LATEST
        assert store.migrate(conn) == store.LATEST
    finally:
        conn.close()


def test_failed_verdicts_under_the_old_source_keys_still_block_after_the_upgrade(warehouse, monkeypatch):
    """Source keys gained their layer's name; a verdict recorded under `validated/flights` must keep
    blocking as `validated/flights_validated`, and a key already in the new form is left alone."""

    renamed = next(
        n for n, (description, _) in enumerate(store.MIGRATIONS, 1) if "name their layer" in description
    )
    with monkeypatch.context() as m:
        m.setattr(store, "MIGRATIONS", store.MIGRATIONS[: renamed - 1])
        m.setattr(store, "LATEST", renamed - 1)
        with store.connect(warehouse) as conn:
            for asset, passed in (
                ("validated/flights", False),
                ("validated/weather", True),
                ("validated/planes_validated", False),
                ("flight_delay/champion", False),
            ):
                check_results.record_check(
                    conn, asset, "rules", check_results.CheckOutcome(passed=passed, description="d"), "run-1"
                )
    with store.connect(warehouse) as conn:
        assert store.schema_version(conn) == store.LATEST
        assert check_results.failed_checks(
            conn, ["validated/flights_validated", "validated/weather_validated", "validated/planes_validated"]
        ) == ["validated/flights_validated:rules", "validated/planes_validated:rules"]
        assert check_results.failed_checks(conn, ["flight_delay/champion"]) == ["flight_delay/champion:rules"]
        assert check_results.failed_checks(conn, ["validated/flights"]) == []


def test_monitor_and_score_rows_gain_a_run_id_and_keep_their_rows_on_upgrade(warehouse, monkeypatch):
    """Migrations 8 and 9: drift, drift column and performance rows, and every pipeline's batch scores
    (a table per pipeline, written by the code before) get a `run_id`, NULL on the rows written before;
    the scores table is then the one the current code writes, so scoring does not rebuild it."""
    pipeline = load_project(default_pipelines_dir()).pipelines["flight_delay"]
    entities = batch_scores.entity_columns(pipeline)
    added = next(n for n, (description, _) in enumerate(store.MIGRATIONS, 1) if "monitor rows" in description)
    old_row = {"pipeline": "flight_delay", "computed_at": dt.datetime(2013, 7, 1)}
    with monkeypatch.context() as m:
        m.setattr(store, "MIGRATIONS", store.MIGRATIONS[: added - 1])
        m.setattr(store, "LATEST", added - 1)
        with store.connect(warehouse) as conn:
            store.insert(conn, store.DRIFT_RUNS, old_row | {"id": "d1", "champion": "v1"})
            store.insert(
                conn, store.DRIFT_HISTORY, {"drift_run": "d1", "pipeline": "flight_delay", "column_name": "x"}
            )
            store.insert(
                conn,
                store.PERFORMANCE_HISTORY,
                old_row
                | {
                    "champion": "v1",
                    "period_start": dt.datetime(2013, 6, 1),
                    "period_end": dt.datetime(2013, 6, 30),
                    "rows": 10,
                    "metric": "roc_auc",
                    "expected": 0.7,
                },
            )
            # The modelling table's entity columns and the scores table as the code before created it.
            conn.execute("CREATE SCHEMA flight_delay")
            conn.execute(
                f"CREATE TABLE flight_delay.modelling_table AS SELECT {', '.join(f'NULL::VARCHAR AS {c}' for c in entities[:-1])}, "
                f"TIMESTAMP '2013-07-01' AS {entities[-1]}"
            )
            conn.execute(
                "CREATE TABLE flight_delay.predictions AS SELECT *, 0.5::DOUBLE AS score, 'late' AS decision, "
                "'v1' AS version, TIMESTAMP '2013-07-02' AS scored_at FROM flight_delay.modelling_table"
            )
    with store.connect(warehouse) as conn:
        assert store.schema_version(conn) == store.LATEST
        for table in (
            store.DRIFT_RUNS,
            store.DRIFT_HISTORY,
            store.PERFORMANCE_HISTORY,
            "flight_delay.predictions",
        ):
            assert conn.execute(f"SELECT count(*), count(run_id) FROM {table}").fetchone() == (1, 0), table
        assert batch_scores._ensure_table(conn, pipeline, pipeline.task) is None  # not rebuilt: same columns
        assert conn.execute("SELECT version FROM flight_delay.predictions").fetchall() == [("v1",)]


# --- a data directory from a newer ml_assets ---------------------------------------------------------


def test_warehouse_from_a_newer_ml_assets_is_refused_untouched(warehouse):
    with store.connect(warehouse) as conn:
        store.insert(
            conn,
            store.SCHEMA_VERSION,
            {
                "version": store.LATEST + 1,
                "description": "from the future",
                "applied_at": dt.datetime(2030, 1, 1),
            },
        )
        store.insert(
            conn,
            store.ALIASES,
            {"pipeline": "p", "alias": "champion", "version": "v1", "updated_at": dt.datetime(2024, 1, 1)},
        )
    before = snapshot(warehouse)

    with pytest.raises(StoreError) as excinfo, store.connect(warehouse):
        pytest.fail("a newer warehouse was opened")

    message = str(excinfo.value)
    assert "newer ml_assets" in message
    assert store.DATA_DIR_ENV == "ML_ASSETS_DATA_DIR" and "ML_ASSETS_DATA_DIR" in message
    assert str(warehouse) in message
    assert snapshot(warehouse) == before


# --- a failing migration -----------------------------------------------------------------------------

# Each statement parses; the last fails when run, after the first ones have done their work.
BAD_MIGRATION = (
    "a migration that fails halfway",
    """CREATE TABLE meta.partial (a INTEGER);
    INSERT INTO registry.aliases VALUES ('p', 'champion', 'v-bad', TIMESTAMP '2024-01-01');
    ALTER TABLE registry.no_such_table ADD COLUMN x INTEGER""",
)
# A statement DuckDB cannot even parse.
UNPARSABLE_MIGRATION = (
    "a migration with a typo",
    "CREATE TABLE meta.partial (a INTEGER); CREAT TABLE x (a INT)",
)


@pytest.mark.parametrize(
    "bad", [BAD_MIGRATION, UNPARSABLE_MIGRATION], ids=["fails_when_run", "does_not_parse"]
)
def test_failing_migration_rolls_back_everything(warehouse, monkeypatch, bad):
    with store.connect(warehouse):
        pass
    before = snapshot(warehouse)
    latest = store.LATEST

    monkeypatch.setattr(store, "MIGRATIONS", (*store.MIGRATIONS, bad))
    monkeypatch.setattr(store, "LATEST", latest + 1)
    with pytest.raises(duckdb.Error), store.connect(warehouse):
        pytest.fail("the failing migration was not reported")

    after = snapshot(warehouse)
    assert after == before
    assert "meta.partial" not in after
    conn = duckdb.connect(str(warehouse), read_only=True)
    try:
        assert store.schema_version(conn) == latest
    finally:
        conn.close()

    # The store is usable again once the migration is fixed (here: dropped).
    monkeypatch.undo()
    with store.connect(warehouse) as conn:
        assert store.schema_version(conn) == latest


def test_failing_migration_leaves_an_old_directory_at_its_old_version(warehouse, monkeypatch):
    """All pending migrations run in one transaction: a failure in the last undoes the earlier ones."""
    write_v1_warehouse(warehouse)
    before = snapshot(warehouse)

    monkeypatch.setattr(store, "MIGRATIONS", (*store.MIGRATIONS, BAD_MIGRATION))
    monkeypatch.setattr(store, "LATEST", store.LATEST + 1)
    with pytest.raises(duckdb.Error), store.connect(warehouse):
        pass

    after = snapshot(warehouse)
    assert after == before
    assert "meta.schema_version" not in after and "monitor.check_results" not in after
    assert "run_id" not in after["registry.model_versions"][0]


# --- inserting by column name ------------------------------------------------------------------------


def test_insert_matches_columns_by_name_not_position(warehouse):
    row = {  # the reverse of the table's column order
        "run_id": "run-1",
        "details": '{"x": 1}',
        "reason": "better",
        "champion_after": "v2",
        "champion_before": "v1",
        "challenger": "v2",
        "action": "promote",
        "pipeline": "flight_delay",
        "decided_at": dt.datetime(2024, 2, 3, 4, 5, 6),
    }
    with store.connect(warehouse) as conn:
        assert columns(conn, store.DECISION_LOG) != list(row)
        store.insert(conn, store.DECISION_LOG, row)
        got = conn.execute(f"SELECT {', '.join(row)} FROM {store.DECISION_LOG}").fetchall()
    assert got == [tuple(row.values())]


def test_insert_many_takes_rows_with_keys_in_any_order(warehouse):
    rows = [
        {"pipeline": "a", "alias": "champion", "version": "v1", "updated_at": dt.datetime(2024, 1, 1)},
        {"updated_at": dt.datetime(2024, 1, 2), "version": "v2", "alias": "champion", "pipeline": "b"},
        {"version": "v3", "pipeline": "c", "updated_at": dt.datetime(2024, 1, 3), "alias": "previous"},
    ]
    with store.connect(warehouse) as conn:
        store.insert_many(conn, store.ALIASES, rows)
        store.insert_many(conn, store.ALIASES, [])  # nothing to insert is not an error
        got = conn.execute(
            f"SELECT pipeline, alias, version, updated_at FROM {store.ALIASES} ORDER BY pipeline"
        ).fetchall()
    assert got == [(r["pipeline"], r["alias"], r["version"], r["updated_at"]) for r in rows]


def test_replace_upserts_on_the_primary_key(warehouse):
    first = {"pipeline": "p", "alias": "champion", "version": "v1", "updated_at": dt.datetime(2024, 1, 1)}
    second = {"updated_at": dt.datetime(2024, 1, 2), "version": "v2", "alias": "champion", "pipeline": "p"}
    other = {"pipeline": "p", "alias": "previous", "version": "v0", "updated_at": dt.datetime(2024, 1, 1)}
    with store.connect(warehouse) as conn:
        store.insert_many(conn, store.ALIASES, [first, other])
        with pytest.raises(duckdb.ConstraintException):
            store.insert(conn, store.ALIASES, second)
        store.insert(conn, store.ALIASES, second, replace=True)
        got = conn.execute(
            f"SELECT alias, version, updated_at FROM {store.ALIASES} ORDER BY alias"
        ).fetchall()
    assert got == [
        (second["alias"], second["version"], second["updated_at"]),
        (other["alias"], other["version"], other["updated_at"]),
    ]


def test_transaction_rolls_back_on_error(warehouse):
    row = {"pipeline": "p", "alias": "champion", "version": "v1", "updated_at": dt.datetime(2024, 1, 1)}
    with store.connect(warehouse) as conn:
        with pytest.raises(RuntimeError):
            for attempt in store.transactions(conn, store.ALIASES):
                with attempt:
                    store.insert(conn, store.ALIASES, row)
                    raise RuntimeError("boom")
        assert conn.execute(f"SELECT count(*) FROM {store.ALIASES}").fetchone()[0] == 0
        for attempt in store.transactions(conn, store.ALIASES):
            with attempt:
                store.insert(conn, store.ALIASES, row)
        assert conn.execute(f"SELECT count(*) FROM {store.ALIASES}").fetchone()[0] == 1


# --- another process holding the file ----------------------------------------------------------------


def test_file_held_by_another_process_fails_after_the_wait_naming_the_setting(warehouse, hold, monkeypatch):
    with store.connect(warehouse):
        pass
    proc = hold(warehouse)
    monkeypatch.setenv(store.LOCK_WAIT_ENV, "1")

    with pytest.raises(StoreError) as excinfo, store.connect(warehouse):
        pytest.fail("opened a file another process holds")

    message = str(excinfo.value)
    assert str(warehouse) in message
    assert "ML_ASSETS_LOCK_WAIT_S" in message
    assert proc.poll() is None  # the error came while the other process still held the file


def test_file_held_by_another_process_is_opened_once_it_exits(warehouse, hold, monkeypatch):
    with store.connect(warehouse):
        pass
    proc = hold(warehouse)
    monkeypatch.setenv(store.LOCK_WAIT_ENV, "300")
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        proc.kill()

    killer = threading.Timer(1.0, kill)
    killer.start()
    try:
        with store.connect(warehouse) as conn:
            # Only possible once the holder was told to go: connect waited for it rather than failing.
            assert killed.is_set()
            assert store.schema_version(conn) == store.LATEST
    finally:
        killer.cancel()


def test_the_change_marker_moves_with_a_committed_write_and_not_with_a_read(tmp_path):
    path = tmp_path / "w.duckdb"
    with store.connect(path) as conn:
        conn.execute("CREATE TABLE t (x INT)")
    before = store.change_marker(path)
    with store.connect(path) as conn:
        conn.execute("SELECT count(*) FROM t").fetchall()
    assert store.change_marker(path) == before
    conn = duckdb.connect(str(path))
    try:
        conn.execute("INSERT INTO t VALUES (1)")
        during = store.change_marker(path)  # committed, the connection still open (in the log)
    finally:
        conn.close()
    assert during != before and store.change_marker(path) != before


def test_a_memory_limit_duckdb_refuses_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(store.DUCKDB_MEMORY_ENV, "lots")
    with (
        pytest.raises(StoreError, match="ML_ASSETS_DUCKDB_MEMORY='lots'"),
        store.connect(tmp_path / "warehouse.duckdb"),
    ):
        pass
    monkeypatch.setenv(store.DUCKDB_MEMORY_ENV, "300MB")
    with store.connect(tmp_path / "warehouse.duckdb") as conn:
        assert conn.execute("SELECT current_setting('memory_limit')").fetchone()[0] in (
            "300.0 MB",
            "286.1 MiB",
        )


def test_an_asof_join_inside_a_transaction_stays_a_sort_not_a_nested_loop(tmp_path):
    # DuckDB has no row estimate for tables written in the open transaction; by default it then runs an
    # ASOF join as a nested loop (minutes on half a year of flights in the history feature set's update).
    with store.connect(tmp_path / "w.duckdb") as conn:
        conn.execute("BEGIN")
        conn.execute("CREATE TEMP TABLE rows_ AS SELECT range AS t FROM range(1000)")
        conn.execute("CREATE TEMP TABLE events AS SELECT range * 2 AS t FROM range(1000)")
        plan = conn.execute("EXPLAIN SELECT * FROM rows_ r ASOF LEFT JOIN events e ON r.t > e.t").fetchall()
        conn.execute("ROLLBACK")
    assert "ASOF_JOIN" in plan[0][1] and "NESTED_LOOP_JOIN" not in plan[0][1]
