"""Data rules a user expects: datetimes with mixed UTC offsets, ids repeated across partitions, and a batch
too broken to train on, on real files and DuckDB, through core.validate and through Dagster."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from ml_assets.core import ingest, validate
from ml_assets.core.spec import SourceSpec
from ml_assets.core.store import connect, warehouse_path
from ml_assets.orchestration.definitions import build_definitions
from ml_assets.orchestration.keys import source_keys
from ml_assets.orchestration.partitions import partition_range_tags
from ml_assets_tests.conftest import materialize_all, run_metadata

JAN_1 = ingest.TimeWindow(start=dt.datetime(2013, 1, 1), end=dt.datetime(2013, 1, 2))
JAN_2 = ingest.TimeWindow(start=dt.datetime(2013, 1, 2), end=dt.datetime(2013, 1, 3))
BOTH_DAYS = ingest.TimeWindow(start=dt.datetime(2013, 1, 1), end=dt.datetime(2013, 1, 3))
TEN_UTC = dt.datetime(2013, 1, 1, 10)
# One instant, 10:00 UTC on Jan 1, written six ways; three of them carry an offset other than +00:00.
SAME_INSTANT = [
    "2013-01-01T05:00:00-05:00",
    "2013-01-01T10:00:00+00:00",
    "2013-01-01 10:00:00",
    "2013-01-01T10:00:00Z",
    "2013-01-01T15:30:00.000+0530",
    "2013-01-01 05:00:00 America/New_York",
]


def _source(**options: Any) -> dict[str, Any]:
    return {
        "id": ["leg"],
        "timestamp": "t",
        "partitions": {"start": "2013-01-01", "end": "2013-01-03"},
        "columns": {
            "leg": {"type": "int", "not_null": True},
            "t": {"type": "datetime", "not_null": True},
            "x": {"type": "float"},
            "y": {"type": "str"},
        },
    } | options


def _csv(path: Path, rows: list[tuple[object, ...]]) -> Path:
    path.write_text("leg,t,x,y\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def _validate(conn, spec: SourceSpec, path: Path, window: ingest.TimeWindow) -> validate.ValidationResult:
    batch, records = ingest.read_files("legs", spec, [path])
    ingest.load_raw(conn, "legs", spec, batch, records, window)
    return validate.validate_source(conn, "legs", spec, ingest.window_condition(window))


# --- timezones -------------------------------------------------------------------------------------------


def test_mixed_offsets_are_normalised_to_their_utc_instant_and_counted(conn, tmp_path):
    spec = SourceSpec.model_validate(_source(path="legs.csv"))
    path = _csv(tmp_path / "legs.csv", [(i, t, 1.0, "a") for i, t in enumerate(SAME_INSTANT)])
    result = _validate(conn, spec, path, JAN_1)
    assert result.quarantined_rows == 0
    assert conn.execute("SELECT DISTINCT t FROM validated.legs").fetchall() == [(TEN_UTC,)]
    # Naive values are taken as UTC, and +00:00 / Z need no conversion: -05:00 (twice) and +05:30 count.
    assert result.tz_offsets_normalised == {"t": 3}


def test_reject_quarantines_offsets_unlike_the_partitions_most_common_one(conn, tmp_path):
    spec = SourceSpec.model_validate(_source(path="legs.csv", timezones="reject"))
    # Jan 1: mostly UTC; Jan 2: every value at -05:00, which is that partition's usual offset.
    rows = [(i, t, 1.0, "a") for i, t in enumerate([*SAME_INSTANT, "2013-01-01T11:00:00Z"])]
    rows += [(10 + h, f"2013-01-02T{h:02d}:00:00-05:00", 1.0, "b") for h in range(3)]
    path = _csv(tmp_path / "legs.csv", rows)
    result = _validate(conn, spec, path, BOTH_DAYS)
    bad = conn.execute(
        "SELECT t, _rule, _column, _reasons FROM quarantine.legs ORDER BY _source_row"
    ).fetchall()
    assert [(t, rule, column) for t, rule, column, _ in bad] == [
        ("2013-01-01T05:00:00-05:00", "timezone", "t"),
        ("2013-01-01 10:00:00", "timezone", "t"),
        ("2013-01-01T15:30:00.000+0530", "timezone", "t"),
        ("2013-01-01 05:00:00 America/New_York", "timezone", "t"),
    ]
    assert bad[0][3] == (
        "t: '2013-01-01T05:00:00-05:00' has UTC offset -05:00, not the most common UTC offset +00:00 of "
        "partition 2013-01-01 (rule timezones: reject); give its values one offset, or set timezones: normalize"
    )
    assert "'2013-01-01 10:00:00' has no UTC offset" in bad[1][3]
    assert result.valid_rows == 3 + 3
    # The accepted -05:00 values of Jan 2 are still converted, and counted.
    assert result.tz_offsets_normalised == {"t": 3}
    assert conn.execute("SELECT min(t) FROM validated.legs WHERE leg >= 10").fetchone() == (
        dt.datetime(2013, 1, 2, 5),
    )


def test_reject_breaks_a_tie_by_the_earliest_row(conn, tmp_path):
    spec = SourceSpec.model_validate(_source(path="legs.csv", timezones="reject"))
    rows = [(1, "2013-01-01T05:00:00-05:00", 1.0, "a"), (2, "2013-01-01T10:00:00Z", 1.0, "a")]
    _validate(conn, spec, _csv(tmp_path / "legs.csv", rows), JAN_1)
    assert conn.execute("SELECT leg, _rule FROM quarantine.legs").fetchall() == [("2", "timezone")]


# --- ids in two partitions -----------------------------------------------------------------------------


def test_an_id_in_two_partitions_fails_the_check_however_the_runs_are_cut(conn, tmp_path):
    spec = SourceSpec.model_validate(_source(path="legs.csv"))
    day1 = _csv(
        tmp_path / "day1.csv", [(1, "2013-01-01T05:00:00Z", 1.0, "a"), (2, "2013-01-01T06:00:00Z", 1.0, "a")]
    )
    day2 = _csv(
        tmp_path / "day2.csv",
        # leg 1 again on Jan 2, and leg 3 twice within Jan 2 (the later copy is quarantined).
        [
            (1, "2013-01-02T05:00:00Z", 2.0, "b"),
            (3, "2013-01-02T06:00:00Z", 1.0, "b"),
            (3, "2013-01-02T07:00:00Z", 1.0, "b"),
        ],
    )
    _validate(conn, spec, day1, JAN_1)
    _validate(conn, spec, day2, JAN_2)
    separate = conn.execute("SELECT * FROM validated.legs ORDER BY ALL").fetchall()
    outcome = validate.check_unique_ids(conn, "legs", spec)
    assert not outcome.passed and outcome.blocks
    assert outcome.description.startswith(
        f"1 id value(s) of (leg) are on more than one row of validated.legs, e.g. (leg=1) in partition "
        f"2013-01-01 ({day1} row 1) and partition 2013-01-02 ({day2} row 1) (duplicate_ids: block)"
    )
    assert outcome.metadata["duplicated_ids"] == 1
    assert conn.execute("SELECT leg, _rule, _source_row FROM quarantine.legs").fetchall() == [
        ("3", "unique", 3)
    ]

    # One run over both days keeps exactly the same rows: a partition's rows never depend on its run mates.
    conn.execute("DROP SCHEMA validated CASCADE; DROP SCHEMA quarantine CASCADE; DROP SCHEMA raw CASCADE")
    batch, records = ingest.read_files("legs", spec, [day1, day2])
    ingest.load_raw(conn, "legs", spec, batch, records, BOTH_DAYS)
    validate.validate_source(conn, "legs", spec, ingest.window_condition(BOTH_DAYS))
    assert conn.execute("SELECT * FROM validated.legs ORDER BY ALL").fetchall() == separate
    assert validate.check_unique_ids(conn, "legs", spec).description == outcome.description


@pytest.mark.parametrize(
    ("partitions", "same", "other"),
    [
        ({"granularity": "weekly", "start": "2013-01-02"}, "2013-01-08T23:00:00Z", "2013-01-09T00:00:00Z"),
        ({"granularity": "monthly", "start": "2013-01-01"}, "2013-01-31T23:00:00Z", "2013-02-01T00:00:00Z"),
    ],
)
def test_duplicates_are_quarantined_within_a_partition_of_any_granularity(
    conn, tmp_path, partitions, same, other
):
    spec = SourceSpec.model_validate(_source(path="legs.csv", partitions=partitions))
    path = _csv(
        tmp_path / "legs.csv",
        [(1, "2013-01-02T00:00:00Z", 1.0, "a"), (1, same, 1.0, "a"), (1, other, 1.0, "a")],
    )
    _validate(conn, spec, path, ingest.TimeWindow(start=dt.datetime(2013, 1, 1), end=dt.datetime(2013, 3, 1)))
    assert conn.execute("SELECT _source_row, _rule FROM quarantine.legs").fetchall() == [(2, "unique")]
    outcome = validate.check_unique_ids(conn, "legs", spec)
    assert f"partition {other[:10]} ({path} row 3)" in outcome.description


def test_warn_reports_the_duplicate_without_blocking_consumers(conn, tmp_path):
    spec = SourceSpec.model_validate(_source(path="legs.csv", duplicate_ids="warn"))
    path = _csv(
        tmp_path / "legs.csv", [(1, "2013-01-01T05:00:00Z", 1.0, "a"), (1, "2013-01-02T05:00:00Z", 1.0, "a")]
    )
    _validate(conn, spec, path, BOTH_DAYS)
    outcome = validate.check_unique_ids(conn, "legs", spec)
    assert (outcome.passed, outcome.severity, outcome.blocks) == (False, "warn", False)
    assert outcome.description.startswith("warning only: 1 id value(s) of (leg)")
    assert "(duplicate_ids: warn); consumers still use the table" in outcome.description


# --- through Dagster -------------------------------------------------------------------------------------


def _project(tmp_path: Path, rows: list[tuple[object, ...]], **options: Any) -> tuple[Path, Path]:
    """A one-source regression pipeline over legs.csv: (pipelines dir, data dir)."""
    _csv(tmp_path / "legs.csv", rows)
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    spec = {
        "name": "legs",
        "task": "regression",
        "sources": {"legs": _source(path="../legs.csv", **options)},
        "base": "legs",
        "id": ["leg"],
        "timestamp": "t",
        "target": {"name": "x"},
        "features": [{"name": "y", "type": "categorical"}],
    }
    (pipelines / "legs.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return pipelines, tmp_path / "data"


SOURCE = source_keys("legs")
TABLE = dg.AssetKey(["legs", "modelling_table"])


def _hourly(days: int = 2) -> list[tuple[object, ...]]:
    """A row an hour from Jan 1, 00:00 UTC, leg = hours since then."""
    return [
        (
            h,
            f"{TEN_UTC.date() + dt.timedelta(days=h // 24)}T{h % 24:02d}:00:00Z",
            float(h % 7),
            "ab"[h % 2],
        )
        for h in range(24 * days)
    ]


def _check(result: dg.ExecuteInProcessResult, name: str) -> dg.AssetCheckEvaluation:
    (found,) = [c for c in result.get_asset_check_evaluations() if c.check_name == name]
    return found


def _validated_metadata(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    return {k: v.value for k, v in run_metadata(result, SOURCE[1]).items()}


def _failures(result: dg.ExecuteInProcessResult) -> str:
    return "\n".join(e.step_failure_data.error.message for e in result.all_events if e.is_step_failure)


def test_normalised_offsets_are_counted_in_the_validated_metadata(tmp_path):
    rows = [(100 + i, t, 1.0, "a") for i, t in enumerate(SAME_INSTANT)] + _hourly(1)
    pipelines, root = _project(tmp_path, rows)
    result = materialize_all(pipelines, root, selection=SOURCE)
    assert _validated_metadata(result)["tz_offsets_normalised"] == {"t": 3}
    with connect(warehouse_path(root)) as c:
        assert c.execute("SELECT DISTINCT t FROM validated.legs WHERE leg >= 100").fetchall() == [(TEN_UTC,)]


def test_an_id_in_two_partitions_blocks_the_modelling_table(tmp_path):
    pipelines, root = _project(tmp_path, [*_hourly(), (5, "2013-01-02T23:00:00Z", 1.0, "a")])
    instance = dg.DagsterInstance.ephemeral()
    result = materialize_all(pipelines, root, raise_on_error=False, selection=SOURCE, instance=instance)
    assert not result.success
    check = _check(result, "unique_ids")
    assert (check.passed, check.severity) == (False, dg.AssetCheckSeverity.ERROR)
    assert (
        "1 id value(s) of (leg)" in check.description
        and "(leg=5) in partition 2013-01-01" in check.description
    )
    # A later run of the consumer alone refuses, from the verdict recorded in the warehouse.
    later = materialize_all(pipelines, root, raise_on_error=False, selection=[TABLE], instance=instance)
    assert not later.success
    assert "validated/legs_validated:unique_ids" in _failures(later)


def test_an_id_in_two_partitions_only_warns_when_configured(tmp_path):
    pipelines, root = _project(
        tmp_path, [*_hourly(), (5, "2013-01-02T23:00:00Z", 1.0, "a")], duplicate_ids="warn"
    )
    result = materialize_all(pipelines, root, selection=[*SOURCE, TABLE])
    check = _check(result, "unique_ids")
    assert (check.passed, check.severity) == (False, dg.AssetCheckSeverity.WARN)
    assert check.description.startswith("warning only: 1 id value(s) of (leg)")
    # The table reads the recorded verdict before building (as a later run would): a warning lets it through.
    assert TABLE in {e.asset_key for e in result.get_asset_materialization_events()}


def test_a_mostly_broken_batch_names_its_share_and_the_limit(tmp_path):
    rows = [(i, t, "oops" if i < 13 else x, y) for i, t, x, y in _hourly(1)]
    pipelines, root = _project(tmp_path, rows)
    result = materialize_all(pipelines, root, raise_on_error=False, selection=SOURCE)
    check = _check(result, "quarantine_share")
    expected = (
        "54.17% of rows quarantined (13 of 24), above the limit max_quarantine_share = 5% of source 'legs'; "
        "the batch must not reach training"
    )
    assert not check.passed and check.description.startswith(expected)
    assert "top: type on x: 13 rows (e.g. " in check.description
    meta = _validated_metadata(result)
    assert meta["quarantine_limit_hit"] is True
    assert meta["quarantine_limit"].startswith(expected)


def _materialize(pipelines: Path, root: Path, keys: list[dg.AssetKey], day: str) -> dg.ExecuteInProcessResult:
    """One run over one daily partition, as a sensor or a second user launches it."""
    defs = build_definitions(pipelines, root)
    return dg.materialize(
        list(defs.assets),
        resources=defs.resources,
        selection=keys,
        tags=partition_range_tags(day, day),
        raise_on_error=False,
    )


def test_row_conservation_counts_the_runs_own_partitions_not_another_runs_unvalidated_rows(tmp_path):
    """Two runs of different partitions: run 2 has loaded its raw rows and not validated them yet when run 1
    checks. Counted over the whole tables, run 1 failed on run 2's half-done step (seen on the cluster)."""
    pipelines, root = _project(tmp_path, _hourly())
    raw, valid, quarantine = SOURCE
    assert _materialize(pipelines, root, [raw], "2013-01-02").success
    first = _materialize(pipelines, root, [raw, valid, quarantine], "2013-01-01")
    assert first.success, _failures(first)
    check = _check(first, "row_conservation")
    assert check.passed and check.description.startswith("raw 24 = validated 24 + quarantined 0 (rows with ")
    with connect(warehouse_path(root)) as c:
        whole = validate.check_row_conservation(c, "legs")
        assert not whole.passed and whole.description == "raw 48 != validated 24 + quarantined 0"
        # A row lost inside the run's own partition still fails it.
        c.execute("DELETE FROM validated.legs WHERE leg = 3")
        lost = validate.check_row_conservation(c, "legs", ingest.window_condition(JAN_1))
    assert not lost.passed and lost.description.startswith("raw 24 != validated 23 + quarantined 0")
    second = _materialize(pipelines, root, [valid, quarantine], "2013-01-02")
    assert second.success and _check(second, "row_conservation").passed, _failures(second)


# --- non-finite numbers ----------------------------------------------------------------------------------


def test_nan_is_missing_and_infinity_breaks_a_range_or_the_finite_rule(conn, tmp_path):
    spec = SourceSpec.model_validate(
        _source(
            path="legs.csv",
            columns={
                "leg": {"type": "int", "not_null": True},
                "t": {"type": "datetime", "not_null": True},
                "x": {"type": "float"},  # no range: the finite rule applies
                "y": {"type": "float", "not_null": True, "min": -100, "max": 100},
            },
        )
    )
    path = _csv(
        tmp_path / "legs.csv",
        [
            (1, "2013-01-01 10:00", "NaN", 1.5),  # NaN in an optional column: missing, kept
            (2, "2013-01-01 10:00", 2.0, "nan"),  # NaN where a value is required
            (3, "2013-01-01 10:00", "inf", 3.0),
            (4, "2013-01-01 10:00", "-Infinity", 4.0),
            (5, "2013-01-01 10:00", 5.0, "inf"),  # above the range
            ("NaN", "2013-01-01 10:00", 6.0, 6.0),  # an int column's NaN is missing too
            (7, "2013-01-01 10:00", 7.0, 7.0),
        ],
    )
    result = _validate(conn, spec, path, JAN_1)
    assert (result.valid_rows, result.quarantined_rows) == (2, 5)
    valid = conn.execute("SELECT leg, x, y FROM validated.legs ORDER BY leg").fetchall()
    assert valid == [(1, None, 1.5), (7, 7.0, 7.0)]
    quarantined = {
        row: (rule, column, reasons)
        for row, rule, column, reasons in conn.execute(
            "SELECT _source_row, _rule, _column, _reasons FROM quarantine.legs"
        ).fetchall()
    }
    assert quarantined[2][:2] == ("not_null", "y") and "NaN counts as missing" in quarantined[2][2]
    assert quarantined[3][:2] == ("finite", "x") and "x: inf is not a finite number" in quarantined[3][2]
    assert quarantined[4][:2] == ("finite", "x") and "-inf" in quarantined[4][2]
    assert quarantined[5][:2] == ("max", "y") and "y: inf is above max 100" in quarantined[5][2]
    assert quarantined[6][:2] == ("not_null", "leg")
    # Every value left in the validated table is a finite number or NULL, as the checks re-verify.
    assert validate.check_rules(conn, "legs", spec).passed
