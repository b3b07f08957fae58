"""The pipeline YAML schema: one pydantic model per block of a pipeline file.

Field-level rules live here (types, ranges, one-of choices); rules that need several blocks or the
sources of other files live in `checks`, and reading files (with `extends`) in `load`.
"""

from __future__ import annotations

import codecs
import datetime as dt
import functools
import importlib
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from ml_assets.core.metrics import GREATER_IS_BETTER
from ml_assets.core.spec.expressions import regex_problem

IDENTIFIER = r"^[a-z_][a-z0-9_]*$"
# Leading underscores are reserved for the columns the platform adds (_split, _key, _source_file, ...).
FEATURE_NAME = r"^[a-z][a-z0-9_]*$"
# Source names become table names, landing directories and Dagster asset keys: nothing but a plain name.
# The built-in row id of a source without `id`: md5 of the row's raw values and its occurrence among
# identical rows, so re-ingesting the same rows (renamed files, another order) gives the same ids.
ROW_ID = "_row_id"
Identifier = Annotated[str, StringConstraints(pattern=IDENTIFIER)]
ColumnName = Annotated[str, StringConstraints(pattern=FEATURE_NAME)]
# Who answers for a pipeline's assets, as Dagster shows and filters them: an email or `team:<name>`.
Owner = Annotated[str, StringConstraints(pattern=r"^(team:\S+|[^@\s]+@[^@\s]+\.[^@\s]+)$")]
DEFAULT_OWNERS = ["team:ml-platform"]


@functools.cache
def _iana_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def _iana_zone(name: str) -> str:
    if name not in _iana_zones():
        raise ValueError("not an IANA time zone name (e.g. America/New_York, Europe/Paris, UTC)")
    return name


Timezone = Annotated[str, AfterValidator(_iana_zone)]

ColumnType = Literal["int", "float", "str", "bool", "datetime", "date"]
Task = Literal["binary", "multiclass", "regression"]

# Metrics a model may be tuned on, per task (the threshold-dependent ones are only reported).
OPTIMISABLE = {
    "binary": ["roc_auc", "pr_auc", "log_loss", "f1", "accuracy"],
    "multiclass": ["log_loss", "accuracy", "f1_macro", "roc_auc_ovr"],
    "regression": ["rmse", "mae", "r2"],
}
METRICS: dict[str, dict[str, bool]] = {
    task: {m: GREATER_IS_BETTER[m] for m in names} for task, names in OPTIMISABLE.items()
}
DEFAULT_METRIC = {"binary": "roc_auc", "multiclass": "log_loss", "regression": "rmse"}


class _Strict(BaseModel):
    # Unknown keys are almost always typos; silently ignoring them hides mistakes.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ColumnSpec(_Strict):
    """A column's type and the rules its values must pass (failing rows go to quarantine, with the rule named)."""

    type: ColumnType
    """int, float, str, bool, datetime or date"""
    not_null: bool = False
    """A missing value breaks the rule"""
    min: float | None = None
    """Smallest allowed value (int and float columns)"""
    max: float | None = None
    """Largest allowed value (int and float columns)"""
    allowed: list[str | int | float] | None = None
    """The only values allowed"""
    pattern: str | None = Field(
        None, description="Regular expression the whole value must match (str columns)"
    )

    @field_validator("pattern")
    @classmethod
    def _pattern_compiles(cls, pattern: str | None) -> str | None:
        problem = None if pattern is None else regex_problem(pattern)
        if problem:
            raise ValueError(f"not a valid regular expression (RE2 syntax): {problem}")
        return pattern

    @model_validator(mode="after")
    def _range_is_ordered(self) -> ColumnSpec:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        if (self.min is not None or self.max is not None) and self.type not in ("int", "float"):
            raise ValueError(f"min/max need an int or float column, not type '{self.type}'")
        return self


class PartitionSpec(_Strict):
    """Time partitions of a source, on its timestamp column (UTC days)."""

    granularity: Literal["daily", "weekly", "monthly"] = "daily"
    """One partition per day, week or month"""
    start: dt.date
    """First day of the first partition"""
    end: dt.date | None = Field(None, description="First day after the last partition (default: open-ended)")

    @model_validator(mode="after")
    def _is_ordered(self) -> PartitionSpec:
        if self.end is not None and self.end <= self.start:
            raise ValueError(f"end ({self.end}) must be after start ({self.start})")
        # A partial last period would not be a partition: its rows could never be loaded.
        if self.granularity == "monthly" and (self.start.day != 1 or (self.end and self.end.day != 1)):
            raise ValueError("monthly partitions need start and end on the first day of a month")
        if self.granularity == "weekly" and self.end and (self.end - self.start).days % 7:
            raise ValueError("weekly partitions need end a whole number of weeks after start")
        return self


class ReplaySpec(_Strict):
    """Where `ml-assets replay` cuts batches from, to drop them into the landing zone over time."""

    path: str = Field(description="File (or pkg:// path) holding the whole history of the source")
    initial_until: dt.date | None = Field(
        None, description="`ml-assets run` seeds an empty landing zone with data up to this day"
    )
    date_parts: dict[str, Literal["year", "month", "day"]] = Field(
        default_factory=dict,
        description="Columns holding parts of the timestamp's date (e.g. year: year): a resampled replay "
        "moves rows to other days and rewrites these with the timestamp",
    )
    timezone: Timezone | None = Field(
        None,
        description="Zone of that local calendar (e.g. America/New_York): rows move by whole local days, "
        "so clock times stay put across daylight-saving changes",
    )


class DatabaseSpec(_Strict):
    """Rows read with SQL from a database, incrementally by the source's timestamp column."""

    url_env: str = Field(
        description="Environment variable holding the URL (postgresql://user:password@host:port/db or "
        "duckdb:///path/file.duckdb): credentials never live in the pipeline file"
    )
    table: str | None = Field(None, description="Table (optionally schema.table) to read")
    query: str | None = Field(None, description="SELECT to read from instead of a table")
    timeout_s: float = Field(30.0, gt=0)
    """Seconds before a query is abandoned"""

    @model_validator(mode="after")
    def _table_or_query(self) -> DatabaseSpec:
        if (self.table is None) == (self.query is None):
            raise ValueError("give exactly one of 'table' or 'query'")
        return self


class HttpSpec(_Strict):
    """Records paged from a JSON HTTP API."""

    url: str
    """Endpoint returning JSON"""
    records: str = Field("data", description="Field of the JSON response that holds the list of records")
    paging: Literal["page", "cursor"] = "page"
    """page: numbered pages; cursor: the response names the next cursor"""
    page_param: str = "page"
    """Query parameter of the page number"""
    first_page: int = 1
    """Number of the first page"""
    page_size_param: str | None = "per_page"
    """Query parameter of the page size (null: none sent)"""
    page_size: int = Field(1000, ge=1)
    """Records asked for per page"""
    cursor_param: str = "cursor"
    """Query parameter of the cursor"""
    next_cursor: str = Field("next_cursor", description="Field of the response holding the next cursor")
    start_param: str | None = Field(None, description="Query parameter for the window's first instant")
    end_param: str | None = Field(None, description="Query parameter for the window's end (exclusive)")
    params: dict[str, str] = Field(default_factory=dict, description="Fixed query parameters")
    headers_env: dict[str, str] = Field(
        default_factory=dict, description="Header -> environment variable holding its value (tokens)"
    )
    timeout_s: float = Field(30.0, gt=0)
    """Seconds before a request is abandoned"""
    retries: int = Field(3, ge=0)
    """Retries of a failed request (5xx, timeouts) before the batch fails"""
    backoff_s: float = Field(0.5, ge=0)
    """First retry delay, doubled each retry"""
    max_pages: int = Field(10_000, ge=1)
    """Most pages one batch reads: a guard against an API that never stops paging"""


class SchemaEvolutionSpec(_Strict):
    """What a batch whose columns differ from the config does."""

    extra_columns: Literal["accept", "fail"] = Field(
        "accept", description="accept: kept in raw, left out of validated, recorded; fail: the batch fails"
    )
    missing_columns: Literal["null", "fail"] = Field(
        "fail", description="null: an optional (nullable) column absent from the batch is all null, recorded"
    )
    type_changes: Literal["quarantine", "fail"] = Field(
        "quarantine",
        description="quarantine: rows whose value does not parse go to quarantine; fail: the batch fails",
    )


class SourceSpec(_Strict):
    """Where one table's rows come from, their columns and rules, and what bad rows do."""

    description: str = ""
    """Shown on the source's assets in the UI"""
    owners: list[Owner] | None = Field(
        None, description="Omitted: the owners of the pipeline file that defines the source"
    )
    path: str | None = Field(
        None,
        description="File, glob, or pkg://<package>/<file> for data shipped inside an installed package. "
        "Relative paths are relative to the pipeline file.",
    )
    landing: bool = Field(False, description="Files arrive in <data dir>/landing/<source>/ (sensor-watched)")
    database: DatabaseSpec | None = None
    """Rows read with SQL from PostgreSQL or DuckDB"""
    http: HttpSpec | None = None
    """Records paged from a JSON HTTP API"""
    replay: ReplaySpec | None = None
    """Where `ml-assets replay` cuts batches from (landing sources)"""
    format: Literal["csv", "parquet"] | None = None
    """File format (default: from the file name: parquet for .parquet, else csv)"""
    id: list[str] = Field(default_factory=list, description="Columns that identify a row (must be unique)")
    timestamp: str | None = None
    """Time column of the rows: partitions and incremental reads follow it"""
    partitions: PartitionSpec | None = None
    """Time partitions (Dagster partitions) of the source's assets"""
    null_values: list[str] = Field(default_factory=lambda: ["", "NA"])
    """Strings read as missing"""
    encoding: str = Field(
        "utf-8",
        description="Text encoding of the source's CSV files (e.g. latin-1, cp1252: any Python codec name); "
        "a file in another encoding is rejected with the first line that does not decode",
    )
    columns: dict[str, ColumnSpec] | None = Field(
        None,
        description="Omitted: inferred from a sample when the pipeline loads (the files; a landing zone's "
        "replay origin, else its landed files; a database's or API's first rows), and stored beside the "
        "pipeline file (.inferred/<source>.json) so later loads use the same schema",
    )
    max_quarantine_share: float = Field(0.05, ge=0, le=1)
    """Largest share of a batch's rows that may be quarantined before the quarantine_share check fails the batch"""
    schema_evolution: SchemaEvolutionSpec = Field(default_factory=SchemaEvolutionSpec)
    """What a batch whose columns differ from `columns` does"""
    timezones: Literal["normalize", "reject"] = Field(
        "normalize",
        description="Datetime values are stored as naive UTC (a value without an offset is taken as UTC). "
        "normalize: any offset is converted, and the count of values whose offset was not +00:00 is "
        "recorded; reject: a value whose offset differs from the most common one of its partition (of "
        "the batch, unpartitioned) is quarantined, a naive value counting as one more offset",
    )
    duplicate_ids: Literal["block", "warn"] = Field(
        "block",
        description="An id in two partitions (within one partition, later rows are quarantined). block: "
        "the unique_ids check fails and consumers refuse the table; warn: it only warns",
    )

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(
                f"unknown encoding {value!r}; give a Python codec name such as latin-1 or cp1252"
            ) from None
        return value

    @model_validator(mode="after")
    def _keys_are_columns(self) -> SourceSpec:
        kinds = [
            k
            for k, v in (
                ("path", self.path),
                ("landing", self.landing),
                ("database", self.database),
                ("http", self.http),
            )
            if v
        ]
        if len(kinds) != 1:
            raise ValueError(f"give exactly one of path, landing, database or http (got {kinds or 'none'})")
        if self.columns is None:
            # Filled in by the loader (spec.infer), which validates the source again with its columns.
            return self
        for name in [*self.id, *([self.timestamp] if self.timestamp else [])]:
            if name not in self.columns:
                raise ValueError(f"'{name}' is used as id/timestamp but is not listed under columns")
        if self.timestamp and self.columns[self.timestamp].type not in ("datetime", "date"):
            raise ValueError(f"timestamp column '{self.timestamp}' must have type datetime or date")
        if (self.partitions or self.database or self.http) and not self.timestamp:
            raise ValueError(
                f"{kinds[0] if not self.partitions else 'partitions'} need(s) a timestamp column"
            )
        if self.replay and not self.landing:
            raise ValueError("replay needs landing: true (replayed batches land in the landing zone)")
        return self

    @property
    def kind(self) -> Literal["files", "database", "http"]:
        return "database" if self.database else "http" if self.http else "files"

    @property
    def resolved_format(self) -> str:
        if self.format:
            return self.format
        return "parquet" if ".parquet" in (self.path or "").lower() else "csv"


class AsofSpec(_Strict):
    """The time columns of an as-of join (DuckDB ASOF: never a later row)."""

    left: str = Field(description="Time column of the base table")
    right: str = Field(
        description="Time column of the joined source; the latest row at or before left is taken"
    )


class JoinSpec(_Strict):
    """A source joined onto the base rows."""

    source: str
    """Source to join (defined here or shared)"""
    keys: list[str] = Field(min_length=1)
    """Columns equal on both sides"""
    asof: AsofSpec | None = None
    """Join the latest row at or before a time instead of an exact match"""
    columns: list[str] | None = Field(None, description="Columns to bring in (default: all but the keys)")
    prefix: str = ""
    """Put before the joined columns' names"""


class TargetSpec(_Strict):
    """The column the model predicts."""

    name: str = Field(min_length=1, description="Column of the modelling table (any name a file can hold)")
    expr: str | None = Field(
        None, description="SQL expression over the modelling table (default: column `name`)"
    )
    source_columns: list[str] = Field(
        default_factory=list, description="Columns the target is computed from: never allowed as features"
    )
    missing: Literal["drop", "fail"] = "drop"
    """drop: rows without a target are left out of the modelling table (counted in its metadata); fail: the run fails"""
    missing_reason: str = ""
    """Why targets can be missing, shown in the metadata"""


class FeatureSpec(_Strict):
    """One model input and how it is encoded (fitted on the training split only)."""

    name: str = Field(pattern=FEATURE_NAME)
    """Feature name (lower case)"""
    type: Literal["numeric", "categorical", "datetime", "boolean"]
    """numeric, categorical, datetime (expanded into parts) or boolean"""
    column: str | None = Field(None, description="Input column (default: name)")
    function: str | None = Field(
        None, description="Dotted path 'package.module:function' of a custom feature"
    )
    impute: Literal["median", "mean", "zero", "none"] = "median"
    """How missing numeric values are filled (fitted on train)"""
    parts: list[Literal["year", "month", "day", "dayofweek", "dayofyear", "hour", "minute"]] = Field(
        default_factory=lambda: ["month", "dayofweek", "hour"]
    )
    """Datetime parts used as features"""
    timezone: Timezone | None = Field(
        None, description="Convert datetimes (stored as UTC) to this zone first"
    )
    max_categories: int = Field(50, ge=1)
    """Most categories kept (the rest become other)"""
    min_frequency: int = Field(20, ge=1)
    """Rarer categories become other"""

    @property
    def input_column(self) -> str:
        return self.column or self.name

    @model_validator(mode="after")
    def _function_or_column(self) -> FeatureSpec:
        if self.function and self.column:
            raise ValueError("give either 'function' or 'column', not both")
        if self.function:
            resolve_function(self.function)
        return self


# A span of time: minutes, hours or days ("30m", "2h", "7d").
DURATION = r"^-?[0-9]+(m|h|d)$"
Duration = Annotated[str, StringConstraints(pattern=DURATION)]


def duration_minutes(text: str) -> int:
    """Minutes of a duration ("2h" -> 120)."""
    return int(text[:-1]) * {"m": 1, "h": 60, "d": 1440}[text[-1]]


class HistoryFamily(_Strict):
    """Aggregates of earlier source rows sharing a row's keys, over windows ending when it is predicted."""

    source: str | None = Field(None, description="Source of the aggregated rows (default: the base)")
    keys: list[str] = Field(
        default_factory=list, description="Columns of the base and the source grouping rows ([]: all rows)"
    )
    value: str = Field("1", description="Column or SQL expression over a source row that is aggregated")
    condition: str | None = Field(
        None, description="SQL condition over a source row: `share` is the share of rows where it holds"
    )
    functions: list[Literal["mean", "sum", "count", "std", "min", "max", "share", "last"]] = Field(
        min_length=1,
        description="Aggregates per window: one feature <family>_<function>_<window> each (`last`: the "
        "value of the latest row known)",
    )
    windows: list[Duration] = Field(
        min_length=1, description="Spans before the prediction time (as_of) whose rows are aggregated"
    )
    known_at: str | None = Field(
        None,
        description="SQL expression: when a source row's value becomes known (a row counts only if known "
        "before as_of). Omitted: known in advance (a schedule); then the windows are on `time` around the "
        "row's own time, and `ahead` may look forward",
    )
    time: str | None = Field(
        None, description="Schedule families: the source rows' event time (default: its timestamp column)"
    )
    ahead: Duration | None = Field(
        None, description="Schedule families: the windows also cover this span after the row's own time"
    )
    min_count: int = Field(1, ge=1, description="Fewer rows in a window: the fallback's value is used")
    fallback: list[str] | None = Field(
        None,
        description="Parent keys (a subset of keys; []: all rows) whose value a sparse group takes; "
        "omitted: a sparse group's value is null",
    )
    prior: float = Field(
        0.0,
        ge=0,
        description="Shrinkage: mean and share are pulled to the fallback's as if by this many rows",
    )

    @property
    def schedule(self) -> bool:
        return self.known_at is None

    @model_validator(mode="after")
    def _coherent(self) -> HistoryFamily:
        if "share" in self.functions and self.condition is None:
            raise ValueError("function 'share' needs a condition (the share of rows where it holds)")
        if self.fallback is not None and not set(self.fallback) < set(self.keys):
            raise ValueError(f"fallback {self.fallback} must be a strict subset of keys {self.keys}")
        if self.prior and self.fallback is None:
            raise ValueError("prior (shrinkage) needs a fallback group to shrink to")
        if any(w.startswith("-") or duration_minutes(w) == 0 for w in self.windows):
            raise ValueError("a window is a positive span before as_of (e.g. 2h, 7d)")
        if self.known_at is not None and self.ahead is not None:
            raise ValueError(
                f"ahead: {self.ahead} reaches the future: only a schedule (no known_at) may look forward"
            )
        if self.known_at is not None and self.time is not None:
            raise ValueError("time applies to schedule families (no known_at); the windows are on known_at")
        return self


class HistorySpec(_Strict):
    """Point-in-time aggregates of earlier rows (feature families), as of when a row is predicted."""

    at: str = Field(description="SQL expression over a base row: its own event time (a scheduled departure)")
    horizon: Duration = Field(
        "0m", description="Rows are predicted this long before `at`: as_of = at - horizon"
    )
    families: dict[ColumnName, HistoryFamily] = Field(
        min_length=1, description="Feature families by name: the features' prefix"
    )

    def columns(self) -> dict[str, str]:
        """The feature set's columns, `<family>_<function>_<window>`, with their config types."""
        return {
            f"{name}_{function}_{window}": "int" if function == "count" else "float"
            for name, family in self.families.items()
            for window in family.windows
            for function in family.functions
        }

    @field_validator("horizon")
    @classmethod
    def _not_after_the_row(cls, horizon: str) -> str:
        if horizon.startswith("-"):
            raise ValueError(
                f"{horizon} is negative: as_of would come after the row's own time and its windows would "
                "reach the future"
            )
        return horizon


class SplitSpec(_Strict):
    """How the modelling table is split into train, validation (early stopping, threshold) and test."""

    method: Literal["time", "random"] = "time"
    """time: later rows are validation and test; random: exact random shares"""
    valid_start: dt.date | None = None
    """time: first day of validation (with test_start)"""
    test_start: dt.date | None = None
    """time: first day of test"""
    valid_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of rows for validation"""
    test_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of rows for test"""
    test_days: int | None = Field(
        None, ge=1, description="Test = the last N days of labelled data (moves with new partitions)"
    )
    valid_days: int | None = Field(None, ge=1, description="Validation = the N days before the test days")
    window_days: int | None = Field(
        None, ge=1, description="Train on the latest N days only (default: every loaded partition)"
    )
    seed: int = 0
    """Seed of a random split"""
    stratify: bool = Field(
        True, description="random: each class keeps its share in every split (classification targets)"
    )
    group_by: list[str] = Field(
        default_factory=list,
        description="random: rows sharing these columns' values stay in one split (one entity never "
        "spans train and test)",
    )

    @model_validator(mode="after")
    def _dates_are_ordered(self) -> SplitSpec:
        if (self.valid_start is None) != (self.test_start is None):
            raise ValueError("give both valid_start and test_start, or neither (then fractions are used)")
        if self.valid_start and self.test_start and self.valid_start >= self.test_start:
            raise ValueError(
                f"valid_start ({self.valid_start}) must be before test_start ({self.test_start})"
            )
        if (self.test_days is None) != (self.valid_days is None):
            raise ValueError("give both test_days and valid_days, or neither")
        if self.test_days and self.valid_start:
            raise ValueError("give either valid_start/test_start or valid_days/test_days")
        if self.method == "random" and (self.valid_start or self.test_days or self.window_days):
            raise ValueError("dates, days and window_days only apply to method: time")
        if self.method == "time" and self.group_by:
            raise ValueError("group_by applies to method: random (a time split never mixes periods)")
        if self.window_days and self.test_days and self.window_days <= self.test_days + self.valid_days:
            raise ValueError("window_days must be longer than test_days + valid_days (no training rows left)")
        if self.valid_fraction + self.test_fraction >= 0.9:
            raise ValueError("valid_fraction + test_fraction leave less than 10% for training")
        return self


class ParamRange(_Strict):
    """A searched parameter's range."""

    low: float
    """Lowest value"""
    high: float
    """Highest value"""
    log: bool = False
    """Sample on a log scale"""
    type: Literal["float", "int"] = "float"
    """float or int"""

    @model_validator(mode="after")
    def _is_range(self) -> ParamRange:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is greater than high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log-scaled range needs low > 0")
        return self


def _default_search_space() -> dict[str, ParamRange]:
    return {
        "num_leaves": ParamRange(low=15, high=255, log=True, type="int"),
        "learning_rate": ParamRange(low=0.02, high=0.2, log=True),
        "min_child_samples": ParamRange(low=10, high=300, log=True, type="int"),
        "feature_fraction": ParamRange(low=0.5, high=1.0),
        "lambda_l2": ParamRange(low=1e-3, high=10.0, log=True),
    }


class TuningSpec(_Strict):
    """How the search picks each trial's parameters."""

    method: Literal["optuna", "random"] = Field(
        "optuna",
        description="optuna: Optuna's TPE sampler (seeded; random for its first max_trials/4 trials, 2 to "
        "10), each trial pruned after a fold when its running CV mean is worse than the median of the "
        "completed trials at that fold; random: uniform random points of search_space, never pruned. "
        "Both start with LightGBM's defaults and share folds, metric and budget. Optuna is the default: "
        "it won or tied on 3 of 3 datasets in bench/tuning.py (bench/RESULTS.md)",
    )


class DecisionSpec(_Strict):
    """How a binary model's decision threshold is chosen on the validation split."""

    optimise: Literal["auto", "f1", "accuracy", "cost", "recall"] = Field(
        "auto",
        description="auto: accuracy when the metric is accuracy, else F1; cost: least "
        "false_positive_cost * FP + false_negative_cost * FN; recall: the highest threshold reaching "
        "target_recall",
    )
    false_positive_cost: float = Field(1.0, ge=0)
    """Cost of a false positive (optimise: cost)"""
    false_negative_cost: float = Field(1.0, ge=0)
    """Cost of a false negative (optimise: cost)"""
    target_recall: float = Field(0.8, gt=0, le=1)
    """Recall to reach (optimise: recall)"""

    def objective(self, metric: str) -> str:
        if self.optimise != "auto":
            return self.optimise
        return "accuracy" if metric == "accuracy" else "f1"


class ModelSpec(_Strict):
    """Training: a LightGBM model tuned by cross-validation within a time budget, beside linear and constant baselines."""

    metric: str | None = None
    """Metric tuned and judged (default: roc_auc, log_loss or rmse by task)"""
    time_budget_s: float = Field(60.0, gt=0)
    """Ceiling on the whole model step (baselines, search, refit), in seconds"""
    max_trials: int = Field(20, ge=1)
    """Most search trials"""
    cv_folds: int = Field(3, ge=2)
    """Cross-validation folds per trial (folded as the split is)"""
    seed: int = 42
    """Seed of the search and the fits"""
    max_rounds: int = Field(1000, ge=10)
    """Most boosting rounds"""
    max_train_rows: int | None = Field(
        None,
        ge=1000,
        description="Train on at most this many training-split rows (a seeded random sample; the valid and "
        "test splits stay whole): bounds the model step's memory and time on big tables. The manifest "
        "records the rows used and available",
    )
    early_stopping_rounds: int = Field(50, ge=1)
    """Rounds without improvement on validation before a fit stops"""
    num_threads: int = Field(
        1,
        ge=1,
        description="LightGBM threads per fit. One by default: with a thread per core, a fit on a busy "
        "2-core machine took 51-55 s instead of 4.5-4.7 s (bench/RESULTS.md)",
    )
    params: dict[str, Any] = Field(default_factory=dict, description="Fixed LightGBM parameters")
    decision_threshold: DecisionSpec = Field(default_factory=DecisionSpec)
    """How a binary model's decision threshold is chosen"""
    search_space: dict[str, ParamRange] = Field(default_factory=_default_search_space)
    """LightGBM parameter -> range searched"""
    tuning: TuningSpec = Field(default_factory=TuningSpec)
    """How the search picks each trial's parameters"""


class GateSpec(_Strict):
    """When a newly trained model (challenger) may replace the champion, and when to roll back."""

    margin: float = Field(0.0, ge=0, description="Least improvement of the primary metric, in its own units")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Level of the paired bootstrap interval")
    bootstrap_samples: int = Field(200, ge=50)
    """Paired bootstrap resamples of the test split"""
    guarded_metrics: dict[str, float] = Field(
        default_factory=dict, description="Metric -> largest tolerated regression (in its units)"
    )
    slices: list[str] = Field(default_factory=list, description="Columns whose groups must not regress")
    slice_tolerance: float = Field(0.02, ge=0, description="Largest tolerated primary-metric loss per slice")
    min_slice_rows: int = Field(500, ge=1, description="Smaller slices are too noisy to judge")
    rollback_margin: float = Field(
        0.01, ge=0, description="Roll back when the champion trails the previous champion by more than this"
    )
    monitor_days: int = Field(
        30, ge=1, description="Window of recent labelled data the champion is judged on"
    )


class PerformanceSpec(_Strict):
    """The champion's real metric on labelled periods it never saw, and when a drop means retraining."""

    period: Literal["day", "week", "month"] = Field("week", description="Labelled rows are scored per period")
    tolerance: float = Field(
        0.05, gt=0, description="Relative drop of the metric below the champion's test score that degrades"
    )
    min_rows: int = Field(500, ge=1, description="Periods with fewer labelled rows are scored, not judged")
    persist_periods: int = Field(2, ge=1, description="Consecutive degraded periods before retraining")


class MonitoringSpec(_Strict):
    """Drift monitoring of the champion's inputs and performance, and when they turn into a retraining run."""

    columns: list[str] | None = Field(
        None, description="Model features to watch for drift (default: all of the champion's features)"
    )
    window_days: int = Field(30, ge=1, description="Current window: the latest days of the modelling table")
    current: Literal["modelling_table", "request_log"] = Field(
        "modelling_table",
        description="Where the current window comes from: the modelling table, or the online API's request "
        "log (the rows it scored, as it completed them)",
    )
    sample_rows: int = Field(50_000, ge=1000, description="Bound on rows Evidently sees, per side")
    num_method: str = "wasserstein"
    """Evidently drift method for numeric columns"""
    cat_method: str = "jensenshannon"
    """Evidently drift method for categorical columns"""
    threshold: float = Field(0.1, gt=0, description="Per-column drift threshold of the methods above")
    column_thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="Thresholds for columns whose values are shared by many rows (all flights of an hour "
        "share its weather): a window holds few independent values of them, so they vary more by chance",
    )
    drift_share: float = Field(0.3, gt=0, le=1, description="Share of drifted features that counts as drift")
    persist_windows: int = Field(2, ge=1, description="Consecutive drifted windows before retraining")
    cooldown_hours: float = Field(24.0, ge=0, description="Least time between two automatic retrains")
    sensor_interval_s: int = Field(30, ge=5)
    """Seconds between two ticks of the retraining sensor"""
    performance: PerformanceSpec = Field(default_factory=PerformanceSpec)
    """The champion's real metric per labelled period"""


class ServingSpec(_Strict):
    """Batch scores (`<pipeline>/predictions`) and the online API (`ml-assets serve`) of the champion."""

    chunk_rows: int = Field(
        50_000, ge=100, description="Batch scoring reads, scores and writes this many rows at a time"
    )
    rescore_partitions: int = Field(
        7,
        ge=0,
        description="After a promotion or rollback, the latest N partitions with rows are re-scored by the "
        "new champion (0: never; earlier partitions keep the version that scored them)",
    )
    max_batch: int = Field(1000, ge=1, description="Most rows one online request may send")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest online request body accepted")
    poll_s: float = Field(
        2.0, gt=0, description="How often the API checks the registry and the joined tables for changes"
    )
    skew_sample_rows: int = Field(
        200, ge=1, description="Test rows the skew check sends through both the online and the batch path"
    )
    request_log_sample: float = Field(
        1.0, ge=0, le=1, description="Share of online requests written to the request log (0: none)"
    )


class MlflowSpec(_Strict):
    """MLflow tracking (optional): each trained version logged as a run, the champion alias mirrored.
    Our registry stays the source of truth; MLflow being down makes a run warn, not fail."""

    tracking_uri: str | None = None
    """Tracking server (http://host:port) or store URI; omitted: $ML_ASSETS_MLFLOW_TRACKING_URI, and
    neither means off"""
    experiment: str | None = None
    """Experiment the runs go to (default: ml_assets/<pipeline>)"""
    registered_model: str | None = None
    """Registered model whose versions mirror ours (default: the pipeline's name)"""


class PipelineSpec(_Strict):
    """One pipeline: where its rows come from, how they become a modelling table, and how its model is trained, judged, served and watched."""

    name: str = Field(pattern=IDENTIFIER)
    """The pipeline's name: equal to the file name without .yaml; prefixes its assets, tables and files"""
    description: str = ""
    """Shown on the pipeline's assets in the UI"""
    owners: list[Owner] = Field(
        default_factory=lambda: list(DEFAULT_OWNERS),
        min_length=1,
        description="Shown on every asset of the pipeline (and its sources): emails or team:<name>",
    )
    task: Task
    """binary, multiclass or regression: decides the metrics, the model objective and the baselines"""
    sources: dict[Identifier, SourceSpec] = Field(default_factory=dict)
    """Sources this file defines: name -> where rows come from (exactly one of path, landing, database, http)"""
    shared_sources: list[str] = Field(
        default_factory=list, description="Sources this pipeline uses but another pipeline file defines"
    )
    base: str = Field(description="Source whose rows become the modelling table's rows")
    joins: list[JoinSpec] = Field(default_factory=list)
    """Sources joined onto base rows by keys, optionally as of a time (the latest row at or before)"""
    derived: dict[ColumnName, str] = Field(
        default_factory=dict, description="New columns: name -> SQL expression"
    )
    id: list[str] = Field(
        default_factory=list,
        description="Columns identifying a row; omitted: the built-in _row_id (a hash of the row's content)",
    )
    timestamp: str | None = None
    """Time column of the modelling table: time splits, partitions, performance periods, drift windows"""
    target: TargetSpec
    """What the model predicts"""
    history: HistorySpec | None = Field(
        None, description="Point-in-time aggregates of earlier rows, joined to the modelling table"
    )
    features: list[FeatureSpec] = Field(
        default_factory=list,
        description="Omitted: every modelling-table column but the target, ids and leakage, typed from the data",
    )
    leakage: list[str] = Field(
        default_factory=list, description="Columns not known at prediction time: never allowed as features"
    )
    split: SplitSpec = Field(default_factory=SplitSpec)
    """How rows are split into train, validation and test"""
    model: ModelSpec = Field(default_factory=ModelSpec)
    """LightGBM tuning and its baselines (linear, constant)"""
    gate: GateSpec = Field(default_factory=GateSpec)
    """The promotion gate and the rollback check"""
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec)
    """Drift and performance monitoring, and when they trigger a retraining run"""
    serving: ServingSpec = Field(default_factory=ServingSpec)
    """Batch scores and the online API"""
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec)
    """MLflow tracking and registry mirroring (optional)"""

    @property
    def metric(self) -> str:
        return self.model.metric or DEFAULT_METRIC[self.task]

    @property
    def row_id(self) -> list[str]:
        """The columns that identify a modelling-table row: `id`, or the built-in content hash."""
        return self.id or [ROW_ID]

    @property
    def greater_is_better(self) -> bool:
        return METRICS[self.task][self.metric]


@dataclass(frozen=True)
class Project:
    """All pipelines of a pipelines directory, with every source resolved to the file that defines it."""

    directory: Path
    pipelines: dict[str, PipelineSpec]
    sources: dict[str, SourceSpec]
    """Sources this file defines: name -> where rows come from (exactly one of path, landing, database, http)"""
    source_files: dict[str, Path] = field(default_factory=dict)
    pipeline_files: dict[str, Path] = field(default_factory=dict)

    def sources_of(self, pipeline: PipelineSpec) -> dict[str, SourceSpec]:
        return {name: self.sources[name] for name in [*pipeline.sources, *pipeline.shared_sources]}

    @property
    def time_axis(self) -> PartitionSpec | None:
        """The partitioning every partitioned source shares (load_project checks there is one)."""
        return next((s.partitions for s in self.sources.values() if s.partitions), None)


def resolve_function(dotted: str) -> Callable[..., Any]:
    """Import 'package.module:function' (or 'package.module.function')."""
    module_name, _, attr = dotted.partition(":") if ":" in dotted else dotted.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"'{dotted}' is not a dotted path like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        # Whatever importing the user's module raises is a problem of that module, reported with the
        # pipeline file and the field that name it.
        raise ValueError(
            f"cannot import module '{module_name}' for '{dotted}': {type(exc).__name__}: {exc}"
        ) from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"module '{module_name}' has no function '{attr}'")
    return fn
