"""Your own data in five minutes: a CSV with any header, no id and only a target named, end to end; the
names that cannot work refused at load naming both columns; the built-in row id; exact, stratified and
grouped splits; a lag of the target; and the first run ending with a champion, judged by the gate with
the numbers the report shows."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest

from ml_assets.core import registry
from ml_assets.core.errors import ConfigError
from ml_assets.core.evaluate import evaluate_version
from ml_assets.core.serving import online_model
from ml_assets.core.serving.loader import ServableModel
from ml_assets.core.spec.load import load_project
from ml_assets.core.store import DATA_DIR_ENV, connect, warehouse_path
from ml_assets.core.validate import validate_source
from ml_assets_tests.conftest import materialize_all

FAST = "{time_budget_s: 600, max_trials: 2, cv_folds: 2, max_rounds: 100, early_stopping_rounds: 10}"


def _shop(n: int = 2000, seed: int = 3) -> pl.DataFrame:
    """Headers a real export holds: reserved words, upper case, a space; no id; a yes/no target."""
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=n), rng.normal(size=n)
    order = rng.choice(["web", "store", "phone"], size=n)
    select = rng.integers(0, 5, size=n)
    age_group = rng.choice(["18-30", "31-50", "51+"], size=n)
    logit = 1.5 * x - y + 0.8 * (order == "web") + 0.3 * select - 1.0
    purchase = np.where(rng.random(n) < 1 / (1 + np.exp(-logit)), "yes", "no")
    return pl.DataFrame(
        {"x": x, "y": y, "order": order, "Select": select, "Age Group": age_group, "Purchase": purchase}
    )


def _project(tmp_path: Path, name: str, yaml_text: str, data: dict[str, pl.DataFrame]) -> Path:
    for file, frame in data.items():
        frame.write_csv(tmp_path / file)
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir(exist_ok=True)
    (pipelines / f"{name}.yaml").write_text(textwrap.dedent(yaml_text))
    return pipelines


SHOP = f"""
    name: shop
    task: binary
    sources:
      shop: {{path: ../shop.csv}}
    base: shop
    target: {{name: Purchase}}
    split: {{method: random, test_fraction: 0.2, valid_fraction: 0.1, stratify: true}}
    model: {FAST}
"""


@pytest.fixture(scope="module")
def shop_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, pl.DataFrame]:
    """The whole graph on a CSV with only `path` and `target` given: columns, features and ids inferred."""
    tmp = tmp_path_factory.mktemp("shop")
    data = _shop()
    pipelines = _project(tmp, "shop", SHOP, {"shop.csv": data})
    root = tmp / "data"
    assert materialize_all(pipelines, root).success
    return pipelines, root, data


def test_any_header_and_no_id_run_end_to_end_with_inferred_columns_and_features(shop_run):
    pipelines, root, data = shop_run
    stored = json.loads((pipelines / ".inferred" / "shop.json").read_text())
    assert stored["columns"]["Select"] == {"type": "int", "not_null": True, "min": 0.0, "max": 6.0}
    assert stored["columns"]["order"]["type"] == "str"
    spec = load_project(pipelines).pipelines["shop"]
    # Safe feature names with the mapping to the column each reads; never the target.
    mapping = {f.name: f.input_column for f in spec.features}
    assert mapping == {"x": "x", "y": "y", "order": "order", "select": "Select", "age_group": "Age Group"}
    with connect(warehouse_path(root)) as conn:
        ids = conn.execute("SELECT count(DISTINCT _row_id), count(*) FROM shop.modelling_table").fetchone()
        champion = registry.alias_version(conn, "shop", registry.CHAMPION)
        found = registry.registered(conn, champion, "shop")
        rows = conn.execute("SELECT * FROM shop.modelling_table LIMIT 100").pl()
    assert ids == (data.height, data.height)
    model = ServableModel.from_registry(found)
    assert model.manifest.classes == ["no", "yes"]
    assert model.manifest.input_columns == sorted(["Age Group", "Select", "order", "x", "y"])
    scores = model.predict(rows)
    assert scores.shape == (100,) and ((scores >= 0) & (scores <= 1)).all()


def test_a_stored_schema_keeps_later_loads_from_reinferring(shop_run, tmp_path):
    """A later load reads the schema stored at the first one, so a batch with another column is a
    schema-evolution event (here: extra column accepted by the policy), not a silently new schema."""
    pipelines, _, _ = shop_run
    before = load_project(pipelines).sources["shop"].columns
    stored = pipelines / ".inferred" / "shop.json"
    record = json.loads(stored.read_text())
    record["columns"]["x"]["max"] = 123.0  # what a load would read if it did not infer again
    stored.write_text(json.dumps(record))
    try:
        assert load_project(pipelines).sources["shop"].columns["x"].max == 123.0
    finally:
        record["columns"]["x"]["max"] = before["x"].max
        stored.write_text(json.dumps(record))


def test_random_split_has_exact_stratified_fractions_of_the_whole(shop_run):
    _, root, data = shop_run
    with connect(warehouse_path(root)) as conn:
        counts = conn.execute(
            'SELECT "Purchase", _split, count(*) FROM shop.modelling_table GROUP BY ALL'
        ).fetchall()
    per_class = {c: int((data.get_column("Purchase") == c).sum()) for c in ("yes", "no")}
    for label, split, rows in counts:
        share = {"test": 0.2, "valid": 0.1, "train": 0.7}[split]
        # Exact within each class, to the row (rounding at the two boundaries).
        assert abs(rows - share * per_class[label]) <= 1, (label, split, rows)


def test_first_run_ends_with_a_champion_judged_with_the_reports_numbers(shop_run):
    """The first promotion climbs constant -> linear -> LightGBM; every step's gain is exactly the test
    metric difference the manifest (and so the report) holds for the two models, at their own thresholds."""
    _, root, _ = shop_run
    with connect(warehouse_path(root)) as conn:
        (decision,) = registry.decisions(conn, "shop").rows(named=True)
        details = json.loads(
            conn.execute("SELECT details FROM registry.decision_log WHERE pipeline = 'shop'").fetchone()[0]
        )
        trained = registry.registered(conn, decision["challenger"], "shop")
    assert decision["action"] == "promote_first" and decision["champion_after"] is not None
    assert decision["reason"].startswith("first champion: the ")
    manifest = ServableModel.from_registry(trained).manifest
    metric = manifest.metric
    test_metric = {k: v.test_metrics[metric] for k, v in manifest.candidates.items()}
    test_metric["lightgbm"] = manifest.test_metrics[metric]
    assert [s["candidate"] for s in details["ladder"]] == ["linear", "lightgbm"]
    for step in details["ladder"]:
        gain = test_metric[step["candidate"]] - test_metric[step["against"]]
        assert step["bootstrap"]["improvement"] == pytest.approx(gain, abs=1e-12), step
    report = evaluate_version(trained.path, root / "reports", trained.manifest_sha256)
    # LightGBM's defaults are a candidate the gate decision and the report show beside the others.
    assert set(details["candidates"]) == {"constant", "linear", "lightgbm_defaults"}
    assert details["candidates"]["lightgbm_defaults"] == test_metric["lightgbm_defaults"]
    assert "lightgbm_defaults" in report.report_path.read_text()
    assert report.model[metric] - report.baseline[metric] == pytest.approx(
        test_metric["lightgbm"] - test_metric["linear"], abs=1e-12
    )
    kind = details["champion_kind"]
    if kind != "lightgbm":
        assert decision["champion_after"].endswith(f"-{kind}")
        assert "baseline" in decision["reason"]


# --- names that cannot work are refused at load, naming both columns ---------------------------------


@pytest.mark.parametrize(
    ("frame", "target", "expected"),
    [
        # The target computed under a name that only differs by case from a source column.
        (
            pl.DataFrame({"Purchase": [0, 1] * 50, "amount": range(100)}),
            '{name: purchase, expr: "\\"Purchase\\" = 1"}',
            "the target 'purchase' (computed by target.expr) and column 'Purchase'",
        ),
        # Two columns of one file that SQL cannot tell apart.
        (
            pl.DataFrame({"Age": range(100), "age": range(100), "label": [0, 1] * 50}),
            "{name: label}",
            "columns 'Age' and 'age' differ only by case",
        ),
        # Two columns that make the same feature name.
        (
            pl.DataFrame({"Unit Price": range(100), "unit_price": range(100), "label": [0, 1] * 50}),
            "{name: label}",
            "columns 'Unit Price' and 'unit_price' both become feature 'unit_price'",
        ),
        # A target spelled in the wrong case.
        (
            pl.DataFrame({"Purchase": [0, 1] * 50, "amount": range(100)}),
            "{name: purchase}",
            "'purchase' is not a column of the modelling table (did you mean 'Purchase'?",
        ),
    ],
    ids=["target_case_twin", "column_case_twins", "feature_name_twins", "target_wrong_case"],
)
def test_names_that_collide_fail_at_load_in_one_line_naming_both(tmp_path, frame, target, expected):
    pipelines = _project(
        tmp_path,
        "p",
        f"""
        name: p
        task: binary
        sources:
          s: {{path: ../s.csv}}
        base: s
        target: {target}
        split: {{method: random}}
        """,
        {"s.csv": frame},
    )
    with pytest.raises(ConfigError) as err:
        load_project(pipelines)
    message = str(err.value)
    assert expected in message and "\n" not in message, message
    assert message.startswith(str(pipelines / "p.yaml")), message


# --- a lag of the target is a past value, and may be a feature --------------------------------------


def _series(n: int = 600) -> pl.DataFrame:
    rng = np.random.default_rng(5)
    level = np.cumsum(rng.normal(size=n))
    return pl.DataFrame(
        {
            "T": pl.datetime_range(
                pl.datetime(2024, 1, 1), pl.datetime(2024, 1, 1) + pl.duration(days=n - 1), "1d", eager=True
            ),
            "x": rng.normal(size=n),
            "y": level + rng.normal(scale=0.3, size=n),
        }
    )


def _series_yaml(expr: str) -> str:
    return f"""
        name: level
        task: regression
        sources:
          series: {{path: ../series.csv, timestamp: T}}
        base: series
        timestamp: T
        derived:
          previous: '{expr}'
        target: {{name: y}}
        features:
          - {{name: x, type: numeric}}
          - {{name: previous, type: numeric}}
        split: {{method: time, test_fraction: 0.2, valid_fraction: 0.1}}
        model: {FAST}
    """


def test_a_lag_of_the_target_is_a_feature_and_the_pipeline_learns_from_it(tmp_path):
    pipelines = _project(
        tmp_path, "level", _series_yaml('lag(y) OVER (ORDER BY "T")'), {"series.csv": _series()}
    )
    spec = load_project(pipelines).pipelines["level"]
    assert [f.name for f in spec.features] == ["x", "previous"]
    root = tmp_path / "data"
    result = materialize_all(pipelines, root)
    assert result.success
    with connect(warehouse_path(root)) as conn:
        trained = registry.alias_version(conn, "level", registry.CHALLENGER)
        manifest = registry.registered(conn, trained, "level")
        champion = registry.alias_version(conn, "level", registry.CHAMPION)
        scored = conn.execute("SELECT count(*), count(DISTINCT version) FROM level.predictions").fetchone()
        rows = conn.execute("SELECT count(*) FROM level.modelling_table").fetchone()[0]
    test = ServableModel.from_registry(manifest).manifest
    # The random walk is predictable only from its last value: far better than the constant floor.
    assert test.test_metrics["rmse"] < 0.5 * test.candidates["constant"].test_metrics["rmse"]
    # One request carries no earlier rows, so the lag cannot be completed online: the pipeline is scored
    # in batch only (every row, by the champion), and the online path says why instead of serving skew.
    assert champion is not None and scored == (rows, 1)
    (skew,) = [c for c in result.get_asset_check_evaluations() if c.check_name == "online_matches_batch"]
    assert skew.passed and "not served online" in skew.description and "'previous'" in skew.description
    served = online_model.OnlineModel(
        spec, load_project(pipelines).sources_of(spec), lambda: connect(warehouse_path(root))
    )
    assert not served.refresh() and served.served is None
    assert "'previous'" in served.problem and "level/predictions" in served.problem


@pytest.mark.parametrize(
    "expr",
    [
        "lead(y) OVER (ORDER BY T)",  # the next value: the future
        "lag(y) OVER (ORDER BY T DESC)",  # ordered backwards, a lag is a lead
        "lag(y) OVER (ORDER BY x)",  # not ordered by time
        "avg(y) OVER (ORDER BY T ROWS BETWEEN 3 PRECEDING AND CURRENT ROW)",  # includes this row
        "y + lag(y) OVER (ORDER BY T)",  # reads the current value too
    ],
)
def test_anything_else_that_reads_the_target_is_refused(tmp_path, expr):
    pipelines = _project(tmp_path, "level", _series_yaml(expr), {"series.csv": _series(50)})
    with pytest.raises(ConfigError, match=r"derived column 'previous' reads \['y'\], the target"):
        load_project(pipelines)


# --- ids and grouped splits -------------------------------------------------------------------------


def _raw(conn: duckdb.DuckDBPyConnection, frame: pl.DataFrame, file: str) -> None:
    conn.execute("CREATE SCHEMA IF NOT EXISTS raw")
    rows = frame.cast(pl.String).with_columns(
        pl.lit(file).alias("_source_file"), pl.int_range(1, frame.height + 1).alias("_source_row")
    )
    conn.register("_r", rows.to_arrow())
    conn.execute("CREATE OR REPLACE TABLE raw.s AS SELECT * FROM _r")
    conn.unregister("_r")


def test_the_built_in_row_id_survives_a_reingest_in_another_order_and_file(tmp_path):
    from ml_assets.core.spec.schema import SourceSpec

    frame = pl.DataFrame({"a": [1, 2, 2, 3], "b": ["u", "v", "v", None]})  # rows 2 and 3 identical
    spec = SourceSpec.model_validate(
        {"path": "s.csv", "columns": {"a": {"type": "int"}, "b": {"type": "str"}}}
    )
    ids = []
    for shuffled, file in ((frame, "jan.csv"), (frame.reverse(), "renamed.csv")):
        with duckdb.connect() as conn:
            _raw(conn, shuffled, file)
            validate_source(conn, "s", spec)
            ids.append(conn.execute("SELECT a, b, _row_id FROM validated.s ORDER BY _row_id").fetchall())
    assert ids[0] == ids[1]
    assert len({r[2] for r in ids[0]}) == 4  # identical rows still get distinct ids


def test_group_by_keeps_each_entity_in_one_split(tmp_path):
    rng = np.random.default_rng(11)
    n = 3000
    customer = rng.integers(0, 300, size=n)
    frame = pl.DataFrame({"Customer": customer, "x": rng.normal(size=n), "label": rng.integers(0, 2, size=n)})
    pipelines = _project(
        tmp_path,
        "grouped",
        f"""
        name: grouped
        task: binary
        sources:
          s: {{path: ../s.csv}}
        base: s
        target: {{name: label}}
        features: [{{name: x, type: numeric}}]
        split: {{method: random, test_fraction: 0.2, valid_fraction: 0.1, group_by: [Customer]}}
        model: {FAST}
        """,
        {"s.csv": frame},
    )
    root = tmp_path / "data"
    modelling = [["grouped", "modelling_table"], ["grouped", "features"]]
    import dagster as dg

    selection = (
        dg.AssetSelection.assets(*map(dg.AssetKey, modelling)).upstream().required_multi_asset_neighbors()
    )
    assert materialize_all(pipelines, root, selection=selection).success
    with connect(warehouse_path(root)) as conn:
        spans = conn.execute(
            'SELECT max(n) FROM (SELECT "Customer", count(DISTINCT _split) n FROM grouped.modelling_table GROUP BY 1)'
        ).fetchone()[0]
        shares = dict(
            conn.execute("SELECT _split, count(*) / 3000 FROM grouped.modelling_table GROUP BY 1").fetchall()
        )
        # Training's CV folds keep these groups whole (tuning.cv_folds): the features carry them.
        groups = conn.execute(
            "SELECT count(*) FROM grouped.features f JOIN grouped.modelling_table m ON f._key = m._row_id "
            'WHERE f._group = CAST(m."Customer" AS VARCHAR)'
        ).fetchone()[0]
    assert spans == 1 and groups == n
    # Whole groups of about 10 rows: the shares are exact to within a group or two.
    assert abs(shares["test"] - 0.2) < 0.01 and abs(shares["valid"] - 0.1) < 0.01


def test_validation_rules_work_on_any_column_name():
    """Reserved words, quotes and spaces in column names: rules are checked, bad rows quarantined with a
    reason naming the column, and the rules check re-verifies them (the bug was a Binder Error on `x`)."""
    from ml_assets.core.spec.schema import SourceSpec
    from ml_assets.core.validate import check_rules

    odd = 'it\'s "odd"'
    frame = pl.DataFrame({"x": ["1", "2", "zz"], "order": ["a", "b", "c"], odd: ["5", "50", "7"]})
    spec = SourceSpec.model_validate(
        {
            "path": "s.csv",
            "columns": {
                "x": {"type": "int", "min": 0, "not_null": True},
                "order": {"type": "str", "allowed": ["a", "b", "c"]},
                odd: {"type": "float", "max": 10},
            },
        }
    )
    with duckdb.connect() as conn:
        _raw(conn, frame, "s.csv")
        result = validate_source(conn, "s", spec)
        reasons = conn.execute("SELECT _column, _reasons FROM quarantine.s ORDER BY _source_row").fetchall()
        rules = check_rules(conn, "s", spec)
    assert (result.valid_rows, result.quarantined_rows) == (1, 2)
    assert reasons == [
        (odd, f"{odd}: 50.0 is above max 10.0"),
        ("x", "x: 'zz' is not a valid int; x: value is missing (NaN counts as missing) (rule not_null)"),
    ]
    # 5 rules: the float column's range also implies its `finite` rule.
    assert rules.passed and rules.metadata["rules_checked"] == 5


def _events(n: int = 400) -> pl.DataFrame:
    rng = np.random.default_rng(5)
    start = np.datetime64("2024-01-01T00:00:00")
    return pl.DataFrame(
        {
            "Event Time": [str(start + np.timedelta64(int(h), "h")) for h in range(n)],
            "amount": rng.normal(size=n).round(3),
            "shop": rng.choice(["a", "b"], size=n),
            "y": rng.normal(size=n).round(3),
        }
    )


LANDED = """
    name: landed
    task: regression
    sources:
      s: {{landing: true, timestamp: Event Time{replay}}}
    base: s
    timestamp: Event Time
    target: {{name: y}}
    split: {{method: time}}
"""


def test_a_landing_source_without_columns_is_inferred_from_its_replay_origin(tmp_path):
    history = tmp_path / "history.csv"
    _events().write_csv(history)
    pipelines = _project(tmp_path, "landed", LANDED.format(replay=f", replay: {{path: {history}}}"), {})
    columns = load_project(pipelines).sources["s"].columns
    assert {c: s.type for c, s in columns.items()} == {
        "Event Time": "datetime",
        "amount": "float",
        "shop": "str",
        "y": "float",
    }
    stored = json.loads((pipelines / ".inferred" / "s.json").read_text())
    assert stored["inferred_from"] == [str(history)] and stored["rows_sampled"] == 400


def test_a_landing_source_without_replay_is_inferred_from_the_landed_files(tmp_path, monkeypatch):
    """Nothing landed yet: a one-line error naming the landing zone; once a file landed, its sample."""
    root = tmp_path / "data"
    monkeypatch.setenv(DATA_DIR_ENV, str(root))
    pipelines = _project(tmp_path, "landed", LANDED.format(replay=""), {})
    with pytest.raises(ConfigError) as excinfo:
        load_project(pipelines)
    (line,) = str(excinfo.value).splitlines()
    assert "sources.s.columns: omitted" in line and f"landing zone {root / 'landing' / 's'}" in line
    landed = root / "landing" / "s" / "2024-01.csv"
    landed.parent.mkdir(parents=True)
    _events().write_csv(landed)
    columns = load_project(pipelines).sources["s"].columns
    assert columns["Event Time"].type == "datetime" and columns["shop"].type == "str"
    assert json.loads((pipelines / ".inferred" / "s.json").read_text())["inferred_from"] == [str(landed)]


def test_a_budget_too_short_for_any_trial_still_registers_a_model(tmp_path):
    """No time for a CV trial leaves no CV score: the model step registers LightGBM's defaults,
    cut at the budget's end (its metadata has no CV score rather than failing on one)."""
    import dagster as dg

    pipelines = _project(
        tmp_path,
        "hurried",
        """
        name: hurried
        task: binary
        sources:
          s: {path: ../s.csv}
        base: s
        target: {name: Purchase}
        split: {method: random}
        model: {time_budget_s: 0.001, max_trials: 3, cv_folds: 2}
        """,
        {"s.csv": _shop(600)},
    )
    root = tmp_path / "data"
    model = dg.AssetKey(["hurried", "model"])
    selection = dg.AssetSelection.assets(model).upstream().required_multi_asset_neighbors()
    result = materialize_all(pipelines, root, selection=selection)
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key == model]
    metadata = event.step_materialization_data.materialization.metadata
    assert metadata["trials"].value == 0 and "cv_roc_auc" not in metadata
    with connect(warehouse_path(root)) as conn:
        (manifest,) = conn.execute("SELECT manifest FROM registry.model_versions").fetchone()
    cv = json.loads(manifest)["cv"]
    assert cv["score"] is None and cv["trials"] == [] and cv["final_fit_cut_at_round"] is not None
