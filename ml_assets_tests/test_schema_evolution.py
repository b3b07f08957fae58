"""Schema evolution and partition replacement: batches whose columns differ from the config, on real rows."""

from __future__ import annotations

import datetime as dt
import zipfile
from pathlib import Path

import polars as pl
import pytest

from ml_assets.core import ingest, validate
from ml_assets.core.spec import SourceSpec
from ml_assets.core.sql import table_columns
from ml_assets_tests.conftest import nycflights_file

JAN_1 = ingest.TimeWindow(start=dt.datetime(2013, 1, 1), end=dt.datetime(2013, 1, 2))
JAN_2 = ingest.TimeWindow(start=dt.datetime(2013, 1, 2), end=dt.datetime(2013, 1, 3))


@pytest.fixture(scope="module")
def two_days() -> pl.DataFrame:
    with zipfile.ZipFile(nycflights_file("flights.csv.zip")) as archive:
        flights = pl.read_csv(archive.read("flights.csv"), infer_schema=False)
    day = flights.get_column("time_hour").str.slice(0, 10)
    return flights.filter(day.is_in(["2013-01-01", "2013-01-02"])).select(
        "year", "month", "day", "carrier", "flight", "origin", "dep_delay", "distance", "time_hour"
    )


def _spec(**policy: str) -> SourceSpec:
    return SourceSpec.model_validate(
        {
            "path": "flights.csv",
            "id": ["year", "month", "day", "carrier", "flight", "origin"],
            "timestamp": "time_hour",
            "partitions": {"start": "2013-01-01"},
            "schema_evolution": policy,
            "columns": {
                "year": {"type": "int", "not_null": True},
                "month": {"type": "int", "not_null": True},
                "day": {"type": "int", "not_null": True},
                "carrier": {"type": "str", "not_null": True},
                "flight": {"type": "int", "not_null": True},
                "origin": {"type": "str", "not_null": True},
                "dep_delay": {"type": "float"},
                "distance": {"type": "float", "not_null": True},
                "time_hour": {"type": "datetime", "not_null": True},
            },
        }
    )


def _load(
    conn, tmp_path: Path, spec: SourceSpec, frame: pl.DataFrame, window: ingest.TimeWindow, name="a.csv"
):
    path = tmp_path / name
    frame.write_csv(path)
    batch, records = ingest.read_files("flights", spec, [path])
    ingest.load_raw(conn, "flights", spec, batch, records, window)
    return validate.validate_source(conn, "flights", spec, ingest.window_condition(window)), records


def _count(conn, table: str, window: ingest.TimeWindow) -> int:
    return conn.execute(f"SELECT count(*) FROM {table} WHERE {ingest.window_condition(window)}").fetchone()[0]


def test_a_partition_is_replaced_exactly_and_other_partitions_are_untouched(conn, tmp_path, two_days):
    spec = _spec()
    _load(conn, tmp_path, spec, two_days, JAN_1)
    _load(conn, tmp_path, spec, two_days, JAN_2)
    day1 = int(two_days.get_column("time_hour").str.starts_with("2013-01-01").sum())
    assert _count(conn, "raw.flights", JAN_1) == day1
    assert _count(conn, "raw.flights", JAN_2) == two_days.height - day1
    # Re-loading day 1 from a batch with fewer rows replaces day 1 only.
    fewer = two_days.filter(pl.col("carrier") != "UA")
    _load(conn, tmp_path, spec, fewer, JAN_1, name="b.csv")
    assert _count(conn, "raw.flights", JAN_1) == int(
        fewer.get_column("time_hour").str.starts_with("2013-01-01").sum()
    )
    assert _count(conn, "raw.flights", JAN_2) == two_days.height - day1
    assert _count(conn, "validated.flights", JAN_2) + _count(conn, "quarantine.flights", JAN_2) == (
        two_days.height - day1
    )


def test_extra_column_is_accepted_recorded_and_kept_out_of_validated(conn, tmp_path, two_days):
    spec = _spec(extra_columns="accept")
    result, records = _load(conn, tmp_path, spec, two_days.with_columns(pl.lit("x").alias("gate")), JAN_1)
    assert records[0]["extra_columns"] == "gate"
    assert "gate" in table_columns(conn, "raw", "flights")
    assert "gate" not in table_columns(conn, "validated", "flights")
    assert result.quarantined_rows == 0 and result.valid_rows > 0
    assert validate.check_schema(conn, "flights", spec).passed


def test_extra_column_fails_the_batch_when_the_config_says_fail(conn, tmp_path, two_days):
    with pytest.raises(ingest.RejectedFile, match=r"\['gate'\].*rule: schema.*extra_columns: fail"):
        _load(
            conn,
            tmp_path,
            _spec(extra_columns="fail"),
            two_days.with_columns(pl.lit("x").alias("gate")),
            JAN_1,
        )


def test_missing_optional_column_becomes_null_when_allowed(conn, tmp_path, two_days):
    result, records = _load(conn, tmp_path, _spec(missing_columns="null"), two_days.drop("dep_delay"), JAN_1)
    assert records[0]["missing_columns_null"] == "dep_delay"
    assert result.quarantined_rows == 0
    assert conn.execute("SELECT count(dep_delay), count(*) FROM validated.flights").fetchone() == (
        0,
        result.valid_rows,
    )


@pytest.mark.parametrize(
    ("policy", "dropped"),
    [({"missing_columns": "fail"}, "dep_delay"), ({"missing_columns": "null"}, "distance")],
)
def test_missing_column_fails_naming_file_column_and_rule(conn, tmp_path, two_days, policy, dropped):
    # distance is not_null: filling it with nulls would reject every row, so it fails even under `null`.
    with pytest.raises(ingest.RejectedFile) as err:
        _load(conn, tmp_path, _spec(**policy), two_days.drop(dropped), JAN_1)
    assert f"'{dropped}'" in str(err.value) and "rule: schema" in str(err.value)
    assert str(tmp_path / "a.csv") in str(err.value)


def test_changed_type_is_quarantined_or_fails_the_batch_as_configured(conn, tmp_path, two_days):
    bad = two_days.with_columns(
        pl.when(pl.int_range(pl.len()) % 50 == 0)
        .then(pl.lit("n/a"))
        .otherwise(pl.col("distance"))
        .alias("distance")
    )
    n_bad = bad.filter(
        pl.col("time_hour").str.starts_with("2013-01-01") & (pl.col("distance") == "n/a")
    ).height
    result, _ = _load(conn, tmp_path, _spec(type_changes="quarantine"), bad, JAN_1)
    assert result.quarantined_rows == n_bad > 0
    assert conn.execute("SELECT DISTINCT _rule, _column FROM quarantine.flights").fetchall() == [
        ("type", "distance")
    ]

    valid_before = _count(conn, "validated.flights", JAN_1)
    with pytest.raises(
        validate.ValidationFailure, match=r"'distance'.*rule: type.*type_changes: fail"
    ) as err:
        _load(conn, tmp_path, _spec(type_changes="fail"), bad, JAN_1)
    assert f"{n_bad} value(s)" in str(err.value) and "a.csv row" in str(err.value)
    assert _count(conn, "validated.flights", JAN_1) == valid_before


def test_tables_from_before_the_source_was_partitioned_are_replaced_not_duplicated(conn, tmp_path, two_days):
    spec = _spec()
    path = tmp_path / "old.csv"
    two_days.write_csv(path)
    batch, records = ingest.read_files("flights", spec, [path])
    ingest.load_raw(conn, "flights", spec, batch, records, None)  # as the unpartitioned version wrote it
    validate.validate_source(conn, "flights", spec)
    _load(conn, tmp_path, spec, two_days, JAN_1)
    day1 = int(two_days.get_column("time_hour").str.starts_with("2013-01-01").sum())
    raw, valid, bad = conn.execute(
        "SELECT (SELECT count(*) FROM raw.flights), (SELECT count(*) FROM validated.flights), "
        "(SELECT count(*) FROM quarantine.flights)"
    ).fetchone()
    assert raw == day1 == valid + bad
