"""Profile assets (EDA of each validated source) on the small real sample: statistics that match the
table, the sample size recorded, correlation with the targets built from the source, plots for the UI
and an HTML page, and what changed since the previous profile."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import duckdb
import polars as pl

from ml_assets.core.profile import profile_source
from ml_assets.core.spec.load import load_project
from ml_assets.core.store import connect, warehouse_path
from ml_assets.orchestration.keys import layer_key
from ml_assets_tests.conftest import materialize_all

SOURCES = ("flights", "weather", "planes")
PROFILES = [layer_key("profile", s) for s in SOURCES]
WITH_SOURCES = dg.AssetSelection.assets(*PROFILES).upstream().required_multi_asset_neighbors()


def _metadata(result: dg.ExecuteInProcessResult) -> dict[dg.AssetKey, dict]:
    return {e.asset_key: e.materialization.metadata for e in result.get_asset_materialization_events()}


def test_every_source_has_a_profile_with_plots_and_a_report(sample_project):
    pipelines, root = sample_project
    result = materialize_all(pipelines, root, selection=WITH_SOURCES)
    assert result.success
    meta = _metadata(result)
    with connect(warehouse_path(root)) as conn:
        rows = {s: conn.execute(f"SELECT count(*) FROM validated.{s}").fetchone()[0] for s in SOURCES}
    for source, key in zip(SOURCES, PROFILES, strict=True):
        m = meta[key]
        assert m["rows"].value == rows[source]
        assert m["sampled_rows"].value == min(rows[source], 50_000)
        assert m["changes"].value == "- first profile"
        assert m["plot_histograms"].value.endswith("/histograms.png)")
        assert "| _event_time |" not in m["columns"].value  # the platform's own columns are not profiled
        report = Path(m["report_path"].value)
        assert report.read_text().startswith("<!doctype html") and f"validated.{source}" in report.read_text()
    # flights is the base of both pipelines: its numeric columns are correlated with both targets, and the
    # target's own source column (arr_delay) is, unsurprisingly, the strongest for the delay flag.
    correlations = meta[PROFILES[0]]["target_correlation"].value
    assert set(correlations) == {"flight_delay:late", "flight_arr_delay:arr_delay"}
    late = correlations["flight_delay:late"]
    assert max(late, key=lambda c: abs(late[c])) in {"arr_delay", "dep_delay"}
    assert "arr_delay" not in correlations["flight_arr_delay:arr_delay"]  # a target is not its own feature
    # weather and planes are joined in, never a base: no target to correlate with.
    assert meta[PROFILES[1]]["target_correlation"].value == {}
    assert "| time_hour |" in meta[PROFILES[0]]["columns"].value


def test_statistics_are_the_tables_and_changes_are_reported(tmp_path):
    conn = duckdb.connect(str(tmp_path / "w.duckdb"))
    conn.execute("CREATE SCHEMA validated")
    frame = pl.DataFrame(
        {"x": [float(i) for i in range(1000)], "c": ["a", "b"] * 500, "n": [None, 1.0] * 500}
    )
    conn.register("frame", frame)
    conn.execute("CREATE TABLE validated.s AS SELECT * FROM frame")
    out = tmp_path / "profile"
    first = profile_source(conn, "s", [], out, sample_rows=200)
    assert (first.rows, first.sampled_rows) == (1000, 200)  # statistics on a bounded sample
    sampled = {r["column"]: r for r in first.columns.iter_rows(named=True)}
    assert abs(sampled["n"]["null_share"] - 0.5) < 0.15 and sampled["c"]["distinct_share"] == 2 / 200
    assert sampled["c"]["top_values"].startswith(("a (", "b ("))
    assert first.changes == ["first profile"]
    conn.execute("UPDATE validated.s SET x = x + 500 WHERE c = 'a'")
    conn.execute("UPDATE validated.s SET n = NULL WHERE c = 'b'")
    second = profile_source(conn, "s", [], out, sample_rows=2000)
    assert second.sampled_rows == 1000  # smaller than the bound: the whole table, exact statistics
    whole = {r["column"]: r for r in second.columns.iter_rows(named=True)}
    assert (whole["x"]["min"], whole["x"]["max"], whole["n"]["null_share"]) == (1.0, 1498.0, 1.0)
    assert any(c.startswith("x: mean ") for c in second.changes), second.changes
    assert any(c.startswith("n: null share ") for c in second.changes), second.changes
    unchanged = profile_source(conn, "s", [], out, sample_rows=2000)
    assert unchanged.changes == ["no change beyond the thresholds"]


def test_profiles_are_in_the_graph_beside_their_source(sample_project):
    pipelines, root = sample_project
    from ml_assets.orchestration.definitions import build_definitions

    graph = build_definitions(pipelines, root).resolve_asset_graph()
    for source, key in zip(SOURCES, PROFILES, strict=True):
        assert graph.get(key).parent_keys == {layer_key("validated", source)}
    assert set(load_project(pipelines).sources) == set(SOURCES)
