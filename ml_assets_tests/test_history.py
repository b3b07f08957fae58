"""History feature sets: the pipeline file's refusals, values a plain recomputation agrees with, the
point-in-time guard passing on a correct build and failing on one that sees values known after as_of."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

import duckdb
import pytest
import yaml

from ml_assets.core import dataset, history, history_guard, ingest, validate
from ml_assets.core.errors import ConfigError, DatasetError
from ml_assets.core.serving.history_state import HistoryState, decimal_to_double
from ml_assets.core.spec.load import load_project
from ml_assets.core.spec.schema import HistoryFamily
from ml_assets.core.store import connect
from ml_assets_tests.conftest import write_pipelines

PIPELINE = "flight_delay"


def _edited(tmp_path: Path, sample_sources: Path, edit) -> Path:
    folder = write_pipelines(tmp_path / "pipelines", sample_sources)
    path = folder / f"{PIPELINE}.yaml"
    raw = yaml.safe_load(path.read_text())
    edit(raw["history"])
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("edit", "field", "words"),
    [
        (lambda h: h["families"]["route"].update(ahead="1h"), "history.families.route", "reaches the future"),
        (lambda h: h["families"]["tail"].pop("known_at"), "history.families.tail.known_at", "dep_delay"),
        (lambda h: h.update(horizon="-1h"), "history.horizon", "reach the future"),
        (lambda h: h["families"]["carrier"].update(windows=["0h"]), "history.families.carrier", "positive"),
        (
            lambda h: h["families"]["route"].update(value="(SELECT 1)"),
            "history.families.route.value",
            "subquery",
        ),
        (lambda h: h["families"]["route"].update(keys=["nope"]), "history.families.route", "nope"),
    ],
    ids=[
        "ahead-on-a-label",
        "label-without-known_at",
        "negative-horizon",
        "empty-window",
        "unsafe-sql",
        "bad-key",
    ],
)
def test_the_pipeline_file_refuses_a_window_into_the_future_or_a_label_without_known_at(
    tmp_path, sample_sources, edit, field, words
):
    path = _edited(tmp_path, sample_sources, edit)
    with pytest.raises(ConfigError) as excinfo:
        load_project(path.parent)
    message = str(excinfo.value)
    assert message.startswith(str(path)), message
    assert field in message and words in message, message


@pytest.fixture(scope="module")
def landed(sample_sources: Path, tmp_path_factory: pytest.TempPathFactory):
    """(project, warehouse path) with every sample source landed and validated."""
    project = load_project(write_pipelines(tmp_path_factory.mktemp("pipelines"), sample_sources))
    path = tmp_path_factory.mktemp("warehouse") / "w.duckdb"
    window = ingest.TimeWindow(dt.datetime(2013, 1, 1), dt.datetime(2014, 1, 2))
    with connect(path) as conn:
        for name in project.sources_of(project.pipelines[PIPELINE]):
            spec = project.sources[name]
            files = ingest.resolve_files(name, spec, project.source_files[name].parent, Path("."))
            frame, records = ingest.read_files(name, spec, files)
            ingest.load_raw(conn, name, spec, frame, records, window if spec.partitions else None)
            validate.validate_source(
                conn, name, spec, ingest.window_condition(window) if spec.partitions else None
            )
    return project, path


def test_the_modelling_table_waits_for_its_history(landed, tmp_path):
    project, path = landed
    pipeline = project.pipelines[PIPELINE]
    with connect(path) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {history.table_name(pipeline)}")
        with pytest.raises(DatasetError, match="materialize flight_delay/history first"):
            dataset.build_modelling_table(conn, pipeline, project.sources_of(pipeline))


def test_features_see_only_rows_known_before_as_of_and_the_guard_agrees(landed):
    project, path = landed
    pipeline = project.pipelines[PIPELINE]
    sources = project.sources_of(pipeline)
    with connect(path) as conn:
        history.build_history(conn, pipeline, sources)
        # One row by hand: its route's arrival delays known in the 7 days before its as_of.
        row = conn.execute(
            f"SELECT origin, dest, _as_of, route_count_7d, _n__route_7d FROM {history.table_name(pipeline)} "
            "WHERE _n__route_7d >= 5 ORDER BY _as_of, flight LIMIT 1 OFFSET 100"
        ).fetchone()
        origin, dest, as_of, count, n = row
        known = "time_hour + to_minutes(coalesce(minute, 0) + CAST(dep_delay + air_time AS BIGINT) + 30)"
        expected = conn.execute(
            f"SELECT count(arr_delay) FROM validated.flights WHERE origin = ? AND dest = ? "
            f"AND {known} < ? AND {known} >= ? - INTERVAL 7 DAY",
            [origin, dest, as_of, as_of],
        ).fetchone()[0]
        assert count == n == expected > 0
        outcome = history_guard.check_point_in_time(conn, pipeline, sources, sample_rows=60, seed=7)
    assert outcome.passed, outcome.description
    assert outcome.metadata["sampled_rows"] == 60


def test_the_guard_fails_a_feature_set_that_sees_values_known_after_as_of(landed, monkeypatch):
    """A build whose windows end 2 hours after as_of (a leak: departures not yet known when the row is
    predicted) is caught by the plain recomputation."""
    project, path = landed
    pipeline = project.pipelines[PIPELINE]
    sources = project.sources_of(pipeline)
    honest = history._bounds

    def leaky(family):
        end, starts = honest(family)
        return f"({end} + INTERVAL 2 HOUR)", starts

    monkeypatch.setattr(history, "_bounds", leaky)
    with connect(path) as conn:
        try:
            history._build(conn, pipeline, sources)
            outcome = history_guard.check_point_in_time(conn, pipeline, sources, sample_rows=60, seed=7)
        finally:  # the shared warehouse keeps no leaky feature set for the other tests
            conn.execute(f"DROP TABLE IF EXISTS {history.table_name(pipeline)}")
    assert not outcome.passed
    assert outcome.metadata["mismatches"] > 0
    assert "known before as_of" in outcome.description


def test_a_pipeline_with_the_same_history_copies_its_twin(landed, monkeypatch):
    project, path = landed
    first, second = project.pipelines[PIPELINE], project.pipelines["flight_arr_delay"]
    with connect(path) as conn:
        history.build_history(conn, first, project.sources_of(first))

        def refuse(*args, **kwargs):
            raise AssertionError("computed again instead of copied")

        monkeypatch.setattr(history, "_build", refuse)
        result = history.build_history(conn, second, project.sources_of(second))
        tables = [
            conn.execute(f"SELECT * FROM {history.table_name(p)}").pl().sort(p.row_id)
            for p in (first, second)
        ]
    assert result.rows == tables[0].height > 0
    assert tables[1].equals(tables[0])


def _variant(project):
    """The flagship's feature set plus a family using every function, a fallback and a fractional prior,
    and a schedule family over all rows that looks ahead; under another name (its own tables)."""
    pipeline = project.pipelines[PIPELINE]
    every = HistoryFamily(
        keys=["carrier", "origin"],
        value="dep_delay",
        condition="dep_delay > 0",
        known_at="time_hour + to_minutes(coalesce(minute, 0) + CAST(dep_delay AS BIGINT))",
        functions=["mean", "sum", "count", "std", "min", "max", "share", "last"],
        windows=["3h", "2d"],
        min_count=3,
        fallback=["carrier"],
        prior=2.5,
    )
    scheduled = HistoryFamily(
        value="distance", functions=["count", "sum", "max"], windows=["30m"], ahead="15m"
    )
    families = {**pipeline.history.families, "every": every, "scheduled": scheduled}
    spec = pipeline.history.model_copy(update={"families": families})
    return pipeline.model_copy(update={"name": "history_variant", "history": spec})


def test_the_online_state_gives_every_stored_feature_bit_for_bit(landed):
    """What the API computes for a request (core/serving/history_state.py: running totals kept by the
    refresh, two bisections per window) equals the stored feature set exactly, for every function,
    fallback and shrinkage; the guard passes on the same build."""
    project, path = landed
    pipeline = _variant(project)
    sources = project.sources_of(project.pipelines[PIPELINE])
    ids = ", ".join(pipeline.row_id)
    with connect(path) as conn:
        history.build_history(conn, pipeline, sources)
        outcome = history_guard.check_point_in_time(conn, pipeline, sources, sample_rows=40, seed=3)
        state = HistoryState.load(conn, pipeline)
        rows = conn.execute(
            f"SELECT *, epoch_us(CAST(({pipeline.history.at}) AS TIMESTAMP)) AS _at_us FROM validated.flights "
            f"ORDER BY {ids}"
        ).pl()
        stored = conn.execute(f"SELECT * FROM {history.table_name(pipeline)} ORDER BY {ids}").pl()
    assert outcome.passed, outcome.description
    online = state.features({c: rows.get_column(c).to_list() for c in rows.columns}, rows["_at_us"].to_list())
    expected = stored.select(list(pipeline.history.columns()))
    assert online.columns == expected.columns and online.height == rows.height > 10_000
    assert online.equals(expected)
    # Not vacuous: sparse groups fell back, windows were empty, every function has values.
    assert (stored["_n__every_3h"] < 3).any() and (stored["_n__every_3h"] >= 3).any()
    assert all(online[c].drop_nulls().len() > 0 for c in online.columns)


def test_decimal_sums_convert_to_double_as_duckdb_casts_them():
    rng = random.Random(5)
    values = [rng.randint(-(10**30), 10**30) for _ in range(300)] + [2**53 + 1, -(2**53) - 1, 0, 7]
    for scale in (6, 12):
        texts = [
            f"{'-' if v < 0 else ''}{abs(v) // 10**scale}.{abs(v) % 10**scale:0{scale}d}" for v in values
        ]
        with duckdb.connect() as conn:
            cast = conn.execute(
                f"SELECT CAST(CAST(t AS DECIMAL(38, {scale})) AS DOUBLE) FROM (SELECT unnest(?) AS t)",
                [texts],
            ).fetchall()
        assert [decimal_to_double(v, scale) for v in values] == [r[0] for r in cast]
