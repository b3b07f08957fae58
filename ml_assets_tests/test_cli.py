"""The `ml-assets` command line, run as a subprocess exactly as a user runs it: replay, versions, rollback,
summary and landing, checked against the files and tables they act on; user errors are one stderr line.

Every command pays for importing the whole stack (seconds), so commands that do not depend on each other
run concurrently, each on its own data directory or on state that none of them changes.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from ml_assets.core import registry, rollback
from ml_assets.core.ingest import landing_dir
from ml_assets.core.ingest.replay import STATE_FILE
from ml_assets.core.serving import bundle
from ml_assets.core.spec.load import default_pipelines_dir, load_project
from ml_assets.core.store import connect, warehouse_path
from ml_assets.orchestration.definitions import build_definitions
from ml_assets.orchestration.keys import source_keys
from ml_assets_tests.cli_helpers import (
    Result,
    cli,
    cli_concurrently,
    cli_env,
    finish_all,
    one_error_line,
    start_all,
    stop_all,
)
from ml_assets_tests.conftest import FAST_MODEL, materialize_all, nycflights_file, write_pipelines
from ml_assets_tests.landing_helpers import land

SOURCES = ("flights", "weather")
JAN_1, JAN_31, FEB_10 = dt.date(2013, 1, 1), dt.date(2013, 1, 31), dt.date(2013, 2, 10)


def _table_rows(text: str) -> list[list[str]]:
    """Data rows of polars' printed tables, wrapped cells joined back into one string per cell."""
    rows: list[list[str]] = []
    body = False
    for line in text.splitlines():
        if line.startswith("╞"):
            body = True
        elif line.startswith("└"):
            body = False
        elif body and line.startswith("│"):
            cells = [c.strip() for c in line.strip().strip("│").split("┆")]
            if cells[0]:
                rows.append(cells)
            else:  # continuation of the previous row's wrapped cells
                rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells, strict=True)]
    return rows


# --- versions, rollback and summary on a data directory with model history --------------------------------


@dataclass(frozen=True)
class Trained:
    pipelines: Path
    root: Path
    env: dict[str, str]
    first: str
    second: str

    def connect(self):
        return connect(warehouse_path(self.root))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, sample_sources: Path, one_shots_started) -> Trained:
    """Both sample pipelines trained and judged once, then flight_delay's model trained and judged again.

    With the fast settings the first flight_delay model need not beat its baseline on the sample (the
    first promotion then makes a baseline the champion): a manual rollback (the real code, as an operator
    would) then makes the model the champion. The second model is
    judged against it, and another manual rollback makes the second the champion, so the first is the
    previous champion. Monitoring assets and batch scores are left out (nothing here reads them), and the independent
    commands of `one_shots_started` run meanwhile.
    """
    base = tmp_path_factory.mktemp("trained")
    pipelines = write_pipelines(base / "pipelines", sample_sources, FAST_MODEL)
    root = base / "data"
    monitoring = dg.AssetSelection.assets(
        *(
            dg.AssetKey([p, a])
            for p in ("flight_delay", "flight_arr_delay")
            # The rollback check too: it would put back a baseline that beat the model made champion by hand.
            for a in ("drift_report", "performance", "champion", "predictions")
        )
    )
    assert materialize_all(pipelines, root, selection=dg.AssetSelection.all() - monitoring).success
    db = functools.partial(connect, warehouse_path(root))
    project = load_project(pipelines)
    spec = project.pipelines["flight_delay"]
    with db() as conn:
        first = registry.latest_version(conn, "flight_delay")
        champion = registry.alias_version(conn, "flight_delay", registry.CHAMPION)
    assert champion is not None  # every first run ends with a champion
    if champion != first:
        rollback.rollback(db, spec, project.sources_of(spec), to=first)
    again = dg.AssetSelection.groups("flight_delay") - monitoring
    assert materialize_all(pipelines, root, selection=again).success
    with db() as conn:
        second = registry.latest_version(conn, "flight_delay")
        assert registry.alias_version(conn, "flight_delay", registry.CHAMPION) == first != second
    rollback.rollback(db, spec, project.sources_of(spec), to=second)
    return Trained(pipelines, root, cli_env(root, pipelines), first, second)


def _state(trained: Trained, pipeline: str = "flight_delay") -> tuple[str | None, pl.DataFrame]:
    with trained.connect() as conn:
        return registry.alias_version(conn, pipeline, registry.CHAMPION), registry.decisions(conn, pipeline)


def _versions_of(trained: Trained, pipeline: str) -> list[str]:
    with trained.connect() as conn:
        return registry.versions(conn, pipeline).get_column("version").to_list()


@pytest.fixture(scope="module")
def reads(trained: Trained) -> dict[str, Result]:
    """Commands that change nothing, run concurrently."""
    calls = {
        "versions": (("versions", "flight_delay"), trained.env),
        "summary": (("summary",), trained.env),
    }
    return cli_concurrently(calls)


def test_versions_lists_every_version_with_its_status_and_the_decision_log(trained, reads):
    result = reads["versions"]
    assert result.returncode == 0, str(result)
    history, _, log_text = result.stdout.partition("Decision log:")
    assert history.startswith("Model versions of flight_delay:")
    champion, log = _state(trained)
    ours = _versions_of(trained, "flight_delay")
    rows = _table_rows(history)
    assert [r[0] for r in rows] == ours  # every version, oldest first, and only this pipeline's
    status = {r[0]: r[2] for r in rows}
    assert "champion" in status[champion].split("+")
    assert "challenger" in status[ours[-1]].split("+")
    for other in _versions_of(trained, "flight_arr_delay"):
        assert other not in result.stdout
    printed = [(r[1], r[2], r[3], r[4]) for r in _table_rows(log_text)]
    expected = [
        (
            d["action"],
            d["challenger"] or "null",
            d["champion_before"] or "null",
            d["champion_after"] or "null",
        )
        for d in log.iter_rows(named=True)
    ]
    assert printed == expected and len(printed) >= 2


def test_summary_prints_the_warehouse_counts_and_each_champion(trained, reads):
    result = reads["summary"]
    assert result.returncode == 0, str(result)
    project = load_project(trained.pipelines)
    counts = {
        m[1]: tuple(int(x) for x in m.groups()[1:])
        for m in re.finditer(r"^(\w+) +(\d+) +(\d+) +(\d+)", result.stdout, re.M)
    }
    with trained.connect() as conn:
        for source in project.sources:
            expected = tuple(
                conn.execute(f"SELECT count(*) FROM {layer}.{source}").fetchone()[0]
                for layer in ("raw", "validated", "quarantine")
            )
            assert counts[source] == expected and expected[0] > 0, source
        quarantined = conn.execute(
            "SELECT _rule, _column, count(*) FROM quarantine.weather GROUP BY ALL"
        ).fetchall()
    assert quarantined  # the sample's one 1048 mph wind reading
    for rule, column, n in quarantined:
        assert f"{rule} on {column}: {n}" in result.stdout
    for name in project.pipelines:
        block = result.stdout.split(f"\n{name} (")[1].split("\n\n")[0]
        champion, _ = _state(trained, name)
        versions = _versions_of(trained, name)
        assert champion is not None
        assert f"champion: {champion};" in block
        # The latest *trained* model: a baseline registered as it became the first champion is not one.
        with trained.connect() as conn:
            challenger = registry.alias_version(conn, name, registry.CHALLENGER)
        assert challenger in versions and not challenger.endswith(("-linear", "-constant"))
        assert f"model {challenger} ({len(versions)} version(s) registered)" in block


def test_rollback_moves_the_champion_back_to_the_previous_champion(trained):
    champion, log = _state(trained)
    assert champion == trained.second  # and trained.first was the champion before it
    result = cli("rollback", "flight_delay", env=trained.env)
    assert result.returncode == 0, str(result)
    moved, published = result.stdout.strip().splitlines()
    assert moved == f"manual rollback from {trained.second} to {trained.first}"
    # The API serving from bundles follows: the rollback published the new champion's bundle.
    bundle_id = bundle.current(bundle.bundle_root(trained.root), "flight_delay")
    assert published == f"published bundle {bundle_id} for the API (core.serving.bundle)"
    assert bundle.read_manifest(bundle.bundle_root(trained.root) / "flight_delay" / bundle_id).version == (
        trained.first
    )
    champion, after = _state(trained)
    assert champion == trained.first
    assert after.head(log.height).equals(log) and after.height == log.height + 1
    last = after.row(-1, named=True)
    assert (last["action"], last["champion_before"], last["champion_after"]) == (
        "rollback",
        trained.second,
        trained.first,
    )


@pytest.fixture(scope="module")
def refused_rollbacks(trained: Trained) -> tuple[dict[str, Result], tuple, tuple, str]:
    """Rollbacks onto another pipeline's version and onto a tampered model, with the state around them."""
    champion, log = _state(trained)
    # The trained model that is not the champion (a baseline the first promotion registered is neither).
    (other,) = [v for v in (trained.first, trained.second) if v != champion]
    foreign = _versions_of(trained, "flight_arr_delay")[-1]
    with trained.connect() as conn:
        model = registry.version_dir(conn, other, "flight_delay") / registry.MODEL_FILE
    original = model.read_bytes()
    model.write_bytes(original + b"\n# edited after training\n")
    try:
        results = cli_concurrently(
            {
                "foreign": (("rollback", "flight_delay", "--to", foreign), trained.env),
                "tampered": (("rollback", "flight_delay", "--to", other), trained.env),
            }
        )
    finally:
        model.write_bytes(original)
    after_champion, after_log = _state(trained)
    return results, (champion, log), (after_champion, after_log), foreign


def test_rollback_onto_another_pipelines_version_is_refused(refused_rollbacks):
    results, (champion, log), (after_champion, after_log), foreign = refused_rollbacks
    line = one_error_line(results["foreign"], "rollback")
    assert foreign in line and "'flight_arr_delay'" in line and "'flight_delay'" in line
    assert after_champion == champion and after_log.equals(log)


def test_rollback_onto_a_tampered_model_is_refused(refused_rollbacks):
    results, (champion, log), (after_champion, after_log), _ = refused_rollbacks
    line = one_error_line(results["tampered"], "rollback")
    assert registry.MODEL_FILE in line and "does not match the manifest" in line
    assert after_champion == champion and after_log.equals(log)


# --- replay on the shipped pipelines (landing sources) --------------------------------------------------


def _local_day() -> pl.Expr:
    """A row's New York calendar day, from the year/month/day columns both source files carry."""
    return pl.date(*(pl.col(c).cast(pl.Int32) for c in ("year", "month", "day")))


@pytest.fixture(scope="module")
def source_tables() -> dict[str, pl.DataFrame]:
    """The recorded sources, read independently of the code under test ("NA" is a null)."""
    with zipfile.ZipFile(nycflights_file("flights.csv.zip")) as archive:
        flights = pl.read_csv(archive.read("flights.csv"), infer_schema=False, null_values="NA")
    weather = pl.read_csv(nycflights_file("weather.csv"), infer_schema=False, null_values="NA")
    return {"flights": flights, "weather": weather}


def _expected_weeks(frame: pl.DataFrame, first: dt.date, last: dt.date) -> dict[tuple[dt.date, dt.date], int]:
    """{(first day, last day): rows} of one-file-per-week batches over [first, last]: weeks run Monday to
    Sunday, cut at `first` and `last`; a week without rows has no file."""
    per_day = (
        frame.with_columns(_local_day().alias("_day"))
        .filter(pl.col("_day").is_between(first, last))
        .group_by("_day")
        .len()
    )
    out: dict[tuple[dt.date, dt.date], int] = {}
    for day, rows in per_day.iter_rows():
        monday = day - dt.timedelta(days=day.weekday())
        week = (max(monday, first), min(monday + dt.timedelta(days=6), last))
        out[week] = out.get(week, 0) + rows
    return dict(sorted(out.items()))


def _listed_files(stdout: str) -> dict[str, list[str]]:
    """{source: [file names]} from replay's output (`<source>: N file(s) -> <dir>` then one name a line)."""
    out: dict[str, list[str]] = {}
    source = None
    for line in stdout.splitlines():
        if m := re.match(r"^(\w+): (\d+) file\(s\) -> (.+)$", line):
            source = m[1]
            out[source] = []
        elif line.startswith("  ") and source:
            out[source].append(line.strip())
    return out


def _check_replayed_files(
    root: Path, result: Result, tables: dict[str, pl.DataFrame], first: dt.date, last: dt.date
) -> None:
    """The command listed and wrote one file per week of [first, last] per source, each holding exactly
    the source's rows of its days."""
    assert result.returncode == 0, str(result)
    listed = _listed_files(result.stdout)
    assert set(listed) == set(SOURCES), str(result)
    for source in SOURCES:
        weeks = _expected_weeks(tables[source], first, last)
        names = [f"{source}_{lo}_{hi}.csv" for lo, hi in weeks]
        assert listed[source] == names, str(result)
        assert f"{source}: {len(names)} file(s) -> {landing_dir(root, source)}" in result.stdout
        for (lo, hi), rows in weeks.items():
            written = pl.read_csv(landing_dir(root, source) / f"{source}_{lo}_{hi}.csv", infer_schema=False)
            days = written.select(_local_day().alias("d")).get_column("d")
            assert written.height == rows and lo <= days.min() and days.max() <= hi, (source, lo, hi)


@dataclass(frozen=True)
class Replayed:
    root: Path
    env: dict[str, str]
    first: Result
    second: Result


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> Replayed:
    """January replayed week by week with the shipped configs, then a second replay up to February 10."""
    root = tmp_path_factory.mktemp("replayed") / "data"
    env = cli_env(root, default_pipelines_dir())
    first = cli("replay", "flight_delay", "--until", str(JAN_31), "--batch", "week", env=env)
    second = cli("replay", "flight_delay", "--until", str(FEB_10), "--batch", "week", env=env)
    return Replayed(root, env, first, second)


def test_replay_writes_one_file_per_week_with_the_source_rows_of_its_days(replayed, source_tables):
    _check_replayed_files(replayed.root, replayed.first, source_tables, JAN_1, JAN_31)
    # January 1, 2013 was a Tuesday: a short first week, four full weeks, and January 28-31.
    assert _listed_files(replayed.first.stdout)["flights"][0] == "flights_2013-01-01_2013-01-06.csv"
    assert _listed_files(replayed.first.stdout)["flights"][-1] == "flights_2013-01-28_2013-01-31.csv"


def test_a_second_replay_continues_after_the_last_replayed_day(replayed, source_tables):
    _check_replayed_files(
        replayed.root, replayed.second, source_tables, JAN_31 + dt.timedelta(days=1), FEB_10
    )
    for source in SOURCES:
        folder = landing_dir(replayed.root, source)
        assert (folder / STATE_FILE).read_text() == f'{{"until": "{FEB_10}"}}'
        # Together the two replays cover every day from January 1 to February 10 once: no gap, no overlap,
        # and every row of those days.
        ranges = sorted(
            tuple(dt.date.fromisoformat(part) for part in p.stem.split("_")[1:3])
            for p in folder.glob(f"{source}_2013-*.csv")
        )
        assert ranges[0][0] == JAN_1 and ranges[-1][1] == FEB_10
        gaps = [
            (a, b) for a, b in zip(ranges, ranges[1:], strict=False) if b[0] != a[1] + dt.timedelta(days=1)
        ]
        assert len(ranges) > 1 and not gaps, ranges
        landed = sum(pl.read_csv(p, infer_schema=False).height for p in folder.glob(f"{source}_2013-*.csv"))
        expected = source_tables[source].filter(_local_day().is_between(JAN_1, FEB_10)).height
        assert landed == expected


@pytest.fixture(scope="module")
def one_shots_started(tmp_path_factory: pytest.TempPathFactory):
    """Independent commands, each on a fresh data directory, started at once and as early as possible:
    the first fixture doing heavy work (`trained`) requests this one, so they run while it works."""
    shipped = default_pipelines_dir()
    jan = ("replay", "flight_delay", "--until", str(JAN_31))
    week = ("replay", "flight_delay", "--until", "2013-01-08", "--batch", "week")
    calls = {
        "unknown_pipeline": ("replay", "no_such_pipeline", "--until", str(JAN_31)),
        "debug": ("--debug", "replay", "no_such_pipeline", "--until", str(JAN_31)),
        "bad_weather_column": (*jan, "--shift", "weather.no_such_column=+1"),
        "bad_column_no_source": (*jan, "--shift", "no_such_column=+1"),
        "shift": (*week, "--shift", "flights.distance=+300", "--shift", "temp=*2"),
        "empty_ledger": ("landing",),
        "beyond_axis": ("replay", "flight_delay", "--until", "2014-03-01"),
    }
    roots = {label: tmp_path_factory.mktemp(label) / "data" for label in calls}
    started = start_all({label: (args, cli_env(roots[label], shipped)) for label, args in calls.items()})
    yield roots, started
    stop_all(started)


@pytest.fixture(scope="module")
def one_shots(one_shots_started) -> dict[str, tuple[Path, Result]]:
    """{label: (data dir, result)} of the commands `one_shots_started` started."""
    roots, started = one_shots_started
    results = finish_all(started)
    return {label: (roots[label], results[label]) for label in roots}


def _landed(root: Path) -> list[Path]:
    return sorted(p for p in (root / "landing").rglob("*") if p.is_file())


def test_replay_of_an_unknown_pipeline_names_it_and_lists_the_pipelines(one_shots):
    root, result = one_shots["unknown_pipeline"]
    line = one_error_line(result, "replay")
    assert "'no_such_pipeline'" in line and "flight_delay" in line and "flight_arr_delay" in line
    assert not _landed(root)


def test_replay_beyond_the_time_axis_is_refused_naming_the_last_day_and_lands_nothing(one_shots):
    root, result = one_shots["beyond_axis"]
    line = one_error_line(result, "replay")
    # The flagship's partitions end before 2014-01-02: 2014-01-01 is the last replayable day.
    assert "2014-03-01" in line and "'flights'" in line and "2014-01-01" in line
    assert not _landed(root)


def test_debug_shows_the_traceback_of_the_same_error(one_shots):
    _, result = one_shots["debug"]
    assert result.returncode not in (0, 2), str(result)
    assert "Traceback (most recent call last)" in result.stderr
    assert "UsageError: unknown pipeline 'no_such_pipeline'" in result.stderr


def test_shift_on_an_unknown_column_of_a_source_is_one_error_line(one_shots):
    _, result = one_shots["bad_weather_column"]
    line = one_error_line(result, "replay")
    assert "'no_such_column'" in line and "'weather'" in line


def test_a_refused_shift_lands_nothing_in_any_source(one_shots):
    # The typo is in the second source's shift (weather): the first source (flights) must not have been
    # replayed meanwhile; its files would land without the weather, and its replay state would move on.
    root, result = one_shots["bad_weather_column"]
    assert result.returncode == 2, str(result)
    assert not _landed(root)


def test_shift_on_a_column_no_source_has_is_an_error_not_ignored(one_shots):
    # `--shift no_such_column=+1` (no source given) must be refused like `flights.no_such_column=+1`,
    # not replayed unshifted (which also moves the replay state on, so the intended shift is lost).
    root, result = one_shots["bad_column_no_source"]
    line = one_error_line(result, "replay")
    assert "'no_such_column'" in line
    assert not _landed(root)


def test_shift_changes_only_the_named_column_relative_to_the_source(one_shots, source_tables):
    root, result = one_shots["shift"]
    assert result.returncode == 0, str(result)
    first, last = JAN_1, dt.date(2013, 1, 8)
    for source, column in (("flights", "distance"), ("weather", "temp")):
        names = [
            f"{source}_{lo}_{hi}_shifted.csv"
            for lo, hi in _expected_weeks(source_tables[source], first, last)
        ]
        assert _listed_files(result.stdout)[source] == names
        written = pl.concat(
            [pl.read_csv(landing_dir(root, source) / name, infer_schema=False) for name in names]
        )
        original = source_tables[source].filter(_local_day().is_between(first, last))
        assert written.columns == original.columns
        # Every other column is the source's, row for row; the named one moved exactly as asked.
        key = [c for c in original.columns if c != column]
        written, original = written.sort(key, nulls_last=True), original.sort(key, nulls_last=True)
        assert written.select(key).equals(original.select(key))
        new = written.get_column(column).cast(pl.Float64)
        old = original.get_column(column).cast(pl.Float64)
        assert new.null_count() == old.null_count() < len(old)
        expected = old + 300 if column == "distance" else old * 2
        assert ((new - expected).abs().drop_nulls() < 1e-9).all(), source


def test_landing_on_an_empty_ledger_prints_an_empty_table(one_shots):
    _, result = one_shots["empty_ledger"]
    assert result.returncode == 0, str(result)
    assert "shape: (0, " in result.stdout and "status" in result.stdout and "source" in result.stdout
    assert _table_rows(result.stdout) == []
    assert not result.stderr.strip(), str(result)


@dataclass(frozen=True)
class Ingested:
    root: Path
    broken: Path
    ledger: pl.DataFrame
    result: Result


@pytest.fixture(scope="module")
def ingested(replayed: Replayed) -> Ingested:
    """The replayed files plus an unusable one, ingested by the landing sensor's run, then `landing`."""
    root = replayed.root
    assert replayed.first.returncode == replayed.second.returncode == 0
    flights = landing_dir(root, "flights")
    broken = flights / "broken_upload.csv"
    january = pl.read_csv(flights / "flights_2013-01-01_2013-01-06.csv", infer_schema=False)
    january.head(50).drop("distance").write_csv(broken)
    # The sensor reads a file once it has settled (unchanged for a few seconds): these have.
    landed_at = time.time() - 60
    for path in (root / "landing").glob("*/*"):
        os.utime(path, (landed_at, landed_at))

    defs = build_definitions(default_pipelines_dir(), root)
    request, _ = land(defs, None)  # the intake run checks the files, then the load is requested
    assert request is not None
    layers = [key for s in SOURCES for key in source_keys(s)]
    assert dg.materialize(
        list(defs.assets), selection=layers, tags=request.tags, resources=defs.resources
    ).success

    result = cli("landing", env=replayed.env)
    with connect(warehouse_path(root)) as conn:
        ledger = conn.execute("SELECT * FROM ingest.landing_files").pl()
    return Ingested(root, broken, ledger, result)


def _printed_ledger(ingested: Ingested) -> dict[str, list[str]]:
    """{sha256: printed row}: the hash (64 characters, wrapped but never cut) identifies a printed row."""
    result = ingested.result
    assert result.returncode == 0, str(result)
    rows = _table_rows(result.stdout)
    assert rows and all(len(r[1].replace(" ", "")) == 64 for r in rows), str(result)
    return {r[1].replace(" ", ""): r for r in rows}


def test_landing_prints_one_ledger_row_per_landed_file_with_its_status(ingested):
    landed = {p for s in SOURCES for p in landing_dir(ingested.root, s).glob("*.csv")}
    assert {Path(f) for f in ingested.ledger.get_column("file")} == landed  # every file, once
    printed = _printed_ledger(ingested)
    assert f"shape: ({ingested.ledger.height}, " in ingested.result.stdout
    assert set(printed) == set(ingested.ledger.get_column("sha256"))
    for entry in ingested.ledger.iter_rows(named=True):
        source, _, file, rows, *_ = printed[entry["sha256"]]
        status = "rejected" if Path(entry["file"]) == ingested.broken else "loaded"
        assert entry["status"] == status and status in printed[entry["sha256"]]
        assert source == entry["source"]
        assert rows == ("null" if status == "rejected" else str(entry["rows"]))
        # The path, or as much of it as the column shows.
        assert entry["file"].startswith(file.replace(" ", "").removesuffix("…"))
    assert ingested.ledger.filter(pl.col("status") == "loaded").get_column("rows").sum() == sum(
        pl.read_csv(p, infer_schema=False).height for p in landed if p != ingested.broken
    )


def test_landing_shows_why_a_file_was_rejected(ingested):
    # The command's purpose ("files loaded or rejected, and why"): the reason must be readable. It starts
    # with the file's absolute path, so a 100-character cut hides the rule and the column it names.
    (reason,) = ingested.ledger.filter(pl.col("status") == "rejected").get_column("reason")
    assert "'distance'" in reason and "rule: schema" in reason
    (row,) = [r for r in _printed_ledger(ingested).values() if "rejected" in r]
    assert any(cell.replace(" ", "") == reason.replace(" ", "") for cell in row), row
