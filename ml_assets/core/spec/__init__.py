"""Pipeline specs: the YAML schema (`schema`) and the cross-checks that need several blocks or files
(`checks`). Reading pipeline files (`load`: `extends`, and the columns a source leaves out, inferred from
its data by `infer` through ingest's readers) is a later stage, imported as `ml_assets.core.spec.load`."""

from ml_assets.core.errors import ConfigError
from ml_assets.core.spec.checks import modelling_columns, sql_words
from ml_assets.core.spec.schema import (
    DEFAULT_OWNERS,
    METRICS,
    AsofSpec,
    ColumnSpec,
    DatabaseSpec,
    FeatureSpec,
    GateSpec,
    HttpSpec,
    JoinSpec,
    ModelSpec,
    MonitoringSpec,
    ParamRange,
    PartitionSpec,
    PerformanceSpec,
    PipelineSpec,
    Project,
    ReplaySpec,
    SchemaEvolutionSpec,
    SourceSpec,
    SplitSpec,
    TargetSpec,
    resolve_function,
)

__all__ = [
    "DEFAULT_OWNERS",
    "AsofSpec",
    "ColumnSpec",
    "ConfigError",
    "DatabaseSpec",
    "FeatureSpec",
    "GateSpec",
    "HttpSpec",
    "JoinSpec",
    "METRICS",
    "ModelSpec",
    "MonitoringSpec",
    "ParamRange",
    "PartitionSpec",
    "PerformanceSpec",
    "PipelineSpec",
    "Project",
    "ReplaySpec",
    "SchemaEvolutionSpec",
    "SourceSpec",
    "SplitSpec",
    "TargetSpec",
    "modelling_columns",
    "resolve_function",
    "sql_words",
]
