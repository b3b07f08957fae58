"""Cross-checks of a pipeline against its sources: every name it uses must exist, and no feature may
read what is not known at prediction time. Each check raises ConfigError naming the field."""

from __future__ import annotations

import re

import duckdb

from ml_assets.core.errors import ConfigError
from ml_assets.core.metrics import REPORTED
from ml_assets.core.spec.expressions import current_column_refs, expression_problem, shorten
from ml_assets.core.spec.schema import METRICS, ROW_ID, PipelineSpec, SourceSpec
from ml_assets.core.sql import DUCKDB_TYPES, q


def _refuse_case_twins(columns: dict[str, str], where: str) -> None:
    """DuckDB names are case-insensitive: `Purchase` and `purchase` cannot be two columns of one table
    (it would rename one to purchase_1 and every later step would miss it)."""
    seen: dict[str, str] = {}
    for name in columns:
        twin = seen.setdefault(name.lower(), name)
        if twin != name:
            raise ConfigError(
                f"{where}: columns '{twin}' and '{name}' differ only by case, which SQL cannot tell "
                "apart; rename one (or give a derived column / target another name)"
            )


def modelling_columns(pipeline: PipelineSpec, sources: dict[str, SourceSpec]) -> dict[str, str]:
    """Columns of the modelling table mapped to where they come from, for error messages."""
    for name, source in sources.items():
        _refuse_case_twins(source.columns, f"sources.{name}.columns")
    columns = {c: f"source '{pipeline.base}'" for c in sources[pipeline.base].columns}
    if not sources[pipeline.base].id:
        columns[ROW_ID] = "the built-in row id"
    for join in pipeline.joins:
        spec = sources[join.source]
        right_keys = {*join.keys, *([join.asof.right] if join.asof else [])}
        for col in join.columns or [c for c in spec.columns if c not in right_keys]:
            out = join.prefix + col
            if out in columns:
                raise ConfigError(
                    f"joins: column '{out}' from source '{join.source}' clashes with {columns[out]}; set a prefix"
                )
            columns[out] = f"join with '{join.source}'"
    for name in pipeline.history.columns() if pipeline.history else {}:
        if name in columns:
            raise ConfigError(f"history: feature '{name}' clashes with {columns[name]}; rename the family")
        columns[name] = "history"
    for name in pipeline.derived:
        if name in columns:
            # DuckDB would rename the new column (name_1) and the old one would silently win.
            raise ConfigError(f"derived.{name}: '{name}' clashes with {columns[name]}; choose another name")
        columns[name] = "derived"
    _refuse_case_twins(columns, "modelling table")
    if pipeline.target.expr is not None:
        twin = next((c for c in columns if c.lower() == pipeline.target.name.lower()), None)
        if twin is not None:
            raise ConfigError(
                f"target.name: the target '{pipeline.target.name}' (computed by target.expr) and column "
                f"'{twin}' ({columns[twin]}) differ only by case or not at all; name the target otherwise"
            )
    return columns


def column_types(pipeline: PipelineSpec, sources: dict[str, SourceSpec]) -> dict[str, str]:
    """Config type of every modelling-table column; derived columns get the type DuckDB gives their
    expression over columns of those types."""
    types = {c: s.type for c, s in sources[pipeline.base].columns.items()}
    for join in pipeline.joins:
        spec = sources[join.source]
        right_keys = {*join.keys, *([join.asof.right] if join.asof else [])}
        for col in join.columns or [c for c in spec.columns if c not in right_keys]:
            types[join.prefix + col] = spec.columns[col].type
    types |= pipeline.history.columns() if pipeline.history else {}
    if not pipeline.derived:
        return types
    back = {"BIGINT": "int", "INTEGER": "int", "DOUBLE": "float", "BOOLEAN": "bool", "DATE": "date"}
    empty = ", ".join(f"CAST(NULL AS {DUCKDB_TYPES[t]}) AS {q(c)}" for c, t in types.items())
    with duckdb.connect(":memory:") as conn:
        conn.execute(f"CREATE TABLE t AS SELECT {empty} LIMIT 0")
        for name, expr in pipeline.derived.items():
            kind = conn.execute(f"DESCRIBE SELECT {expr} AS {q(name)} FROM t").fetchone()[1]
            types[name] = back.get(kind, "datetime" if kind.startswith("TIMESTAMP") else "float")
            if kind == "VARCHAR":
                types[name] = "str"
            conn.execute(f"ALTER TABLE t ADD COLUMN {q(name)} {DUCKDB_TYPES[types[name]]}")
    return types


def sql_words(expr: str) -> set[str]:
    """Identifier-like words of a SQL expression, without string literals."""
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", re.sub(r"'(?:[^']|'')*'", " ", expr)))


def derived_reads(pipeline: PipelineSpec, column: str) -> set[str]:
    """Lower-cased columns a derived column's expression reads at the current row, following derived
    columns it reads in turn (a later derived expression may use an earlier one's name). A column read
    only through a strictly-past window ordered by the timestamp (a lag of the target) is not read."""
    derived = {name.lower(): expr for name, expr in pipeline.derived.items()}
    seen: set[str] = set()
    pending = [column.lower()]
    while pending:
        name = pending.pop()
        if name in seen or name not in derived:
            continue
        seen.add(name)
        words = current_column_refs(derived[name], pipeline.timestamp)
        pending += list(words - seen)
        seen |= words - set(derived)
    return seen - {column.lower()}


def _check_expressions(pipeline: PipelineSpec) -> None:
    """Every SQL snippet of the pipeline is one expression over the row (see `expressions`)."""
    snippets = {f"derived.{name}": expr for name, expr in pipeline.derived.items()}
    if pipeline.target.expr is not None:
        snippets["target.expr"] = pipeline.target.expr
    snippets |= _history_snippets(pipeline)
    for field_name, expr in snippets.items():
        problem = expression_problem(expr)
        if problem:
            raise ConfigError(f"{field_name}: {problem}; got {shorten(expr)!r}")


def _history_snippets(pipeline: PipelineSpec) -> dict[str, str]:
    if pipeline.history is None:
        return {}
    snippets = {"history.at": pipeline.history.at}
    for name, family in pipeline.history.families.items():
        for part in ("value", "condition", "known_at", "time"):
            if getattr(family, part) is not None:
                snippets[f"history.families.{name}.{part}"] = getattr(family, part)
    return snippets


def _check_history(pipeline: PipelineSpec, sources: dict[str, SourceSpec]) -> None:
    """Every family reads a known source by keys both sides hold, and a family that aggregates what is
    known only later (the target, what it is computed from, leakage) says when it becomes known."""
    if pipeline.history is None:
        return
    later = {c.lower() for c in [*pipeline.leakage, *pipeline.target.source_columns, pipeline.target.name]}
    for name, family in pipeline.history.families.items():
        where = f"history.families.{name}"
        source = family.source or pipeline.base
        if source not in sources:
            raise ConfigError(f"{where}.source: unknown source {source!r}; known: {sorted(sources)}")
        for key in family.keys:
            if key not in sources[pipeline.base].columns or key not in sources[source].columns:
                raise ConfigError(
                    f"{where}.keys: key '{key}' must be a column of both '{pipeline.base}' and '{source}'"
                )
        if family.schedule and family.time is None and sources[source].timestamp is None:
            raise ConfigError(f"{where}.time: source '{source}' has no timestamp; give the rows' event time")
        reads = set()
        for part in (family.value, family.condition):
            reads |= current_column_refs(part, None) if part else set()
        labels = sorted(reads & later)
        if family.known_at is None and labels:
            raise ConfigError(
                f"{where}.known_at: missing, but the family aggregates {labels}, known only after a row is "
                "predicted (target, its source columns or leakage); give known_at: when a value becomes "
                "known (e.g. the actual arrival time)"
            )


def _check_metrics(pipeline: PipelineSpec) -> None:
    metrics = METRICS[pipeline.task]
    if pipeline.model.metric and pipeline.model.metric not in metrics:
        raise ConfigError(
            f"model.metric: expected one of {sorted(metrics)} for task '{pipeline.task}', "
            f"got {pipeline.model.metric!r}"
        )
    for name in pipeline.gate.guarded_metrics:
        if name not in REPORTED[pipeline.task]:
            raise ConfigError(
                f"gate.guarded_metrics: {name!r} is not a metric of task '{pipeline.task}'; "
                f"expected one of {REPORTED[pipeline.task]}"
            )


def _check_joins(pipeline: PipelineSpec, sources: dict[str, SourceSpec]) -> None:
    if pipeline.base not in sources:
        raise ConfigError(f"base: unknown source {pipeline.base!r}; known: {sorted(sources)}")
    base_columns = sources[pipeline.base].columns
    for i, join in enumerate(pipeline.joins):
        if join.source not in sources:
            raise ConfigError(f"joins.{i}.source: unknown source {join.source!r}; known: {sorted(sources)}")
        right = sources[join.source].columns
        for key in join.keys:
            if key not in base_columns or key not in right:
                raise ConfigError(
                    f"joins.{i}.keys: key '{key}' must be a column of both '{pipeline.base}' "
                    f"and '{join.source}'"
                )
        if join.asof and (join.asof.left not in base_columns or join.asof.right not in right):
            raise ConfigError(
                f"joins.{i}.asof: '{join.asof.left}' must be a column of '{pipeline.base}' and "
                f"'{join.asof.right}' a column of '{join.source}'"
            )
        for col in join.columns or []:
            if col not in right:
                raise ConfigError(f"joins.{i}.columns: '{col}' is not a column of source '{join.source}'")


def _check_columns_exist(pipeline: PipelineSpec, columns: dict[str, str]) -> None:
    named = [
        *(("id", c) for c in pipeline.row_id),
        *(("gate.slices", c) for c in pipeline.gate.slices),
        *(("timestamp", c) for c in [pipeline.timestamp] if c),
        *(("leakage", c) for c in pipeline.leakage),
        *(("target.source_columns", c) for c in pipeline.target.source_columns),
    ]
    for field_name, col in named:
        if col not in columns:
            raise ConfigError(f"{field_name}: '{col}' is not a column of the modelling table")
    if pipeline.split.method == "time" and not pipeline.timestamp:
        raise ConfigError("split.method: 'time' needs a pipeline timestamp column")
    if pipeline.target.expr is None and pipeline.target.name not in columns:
        near = [c for c in columns if c.lower() == pipeline.target.name.lower()]
        hint = f" (did you mean '{near[0]}'? names are case-sensitive)" if near else ""
        raise ConfigError(
            f"target.name: '{pipeline.target.name}' is not a column of the modelling table{hint}; "
            "give target.expr to compute it"
        )
    for col in pipeline.split.group_by:
        if col not in columns:
            raise ConfigError(f"split.group_by: '{col}' is not a column of the modelling table")


def _check_features(pipeline: PipelineSpec, columns: dict[str, str]) -> None:
    forbidden = {
        **{c: "listed under leakage (not known at prediction time)" for c in pipeline.leakage},
        **{c: "what the target is computed from" for c in pipeline.target.source_columns},
        pipeline.target.name: "the target",
    }
    seen: set[str] = set()
    for i, feat in enumerate(pipeline.features):
        if feat.name in seen:
            raise ConfigError(f"features.{i}.name: duplicate feature '{feat.name}'")
        seen.add(feat.name)
        if feat.function:
            continue
        where = f"features.{i} ('{feat.name}')"
        if feat.input_column not in columns:
            raise ConfigError(
                f"{where}: column '{feat.input_column}' is not a column of the modelling table; "
                f"available: {sorted(columns)}"
            )
        if feat.input_column in forbidden:
            raise ConfigError(f"{where}: column '{feat.input_column}' is {forbidden[feat.input_column]}")
        # A derived column is only as clean as the columns its expression reads, directly or through
        # other derived columns (DuckDB identifiers are case-insensitive).
        leaked = sorted(derived_reads(pipeline, feat.input_column) & {c.lower() for c in forbidden})
        if leaked:
            reason = next(why for c, why in forbidden.items() if c.lower() == leaked[0])
            raise ConfigError(f"{where}: derived column '{feat.input_column}' reads {leaked}, {reason}")


def _check_monitoring(pipeline: PipelineSpec) -> None:
    # A datetime feature becomes one column per part (departure -> departure_dayofweek).
    for col in [*(pipeline.monitoring.columns or []), *pipeline.monitoring.column_thresholds]:
        if not any(col == f.name or col.startswith(f"{f.name}_") for f in pipeline.features):
            raise ConfigError(
                f"monitoring: column '{col}' is not a feature; features: {[f.name for f in pipeline.features]}"
            )


def check_pipeline(pipeline: PipelineSpec, sources: dict[str, SourceSpec]) -> None:
    """Cross-field rules that need the sources: every name a pipeline uses must exist, and its SQL is
    safe to run."""
    _check_expressions(pipeline)
    _check_metrics(pipeline)
    _check_joins(pipeline, sources)
    _check_history(pipeline, sources)
    columns = modelling_columns(pipeline, sources)
    _check_columns_exist(pipeline, columns)
    _check_features(pipeline, columns)
    _check_monitoring(pipeline)
