"""The Dagster Component (`ml_assets.MlPipelineComponent`): a pipeline declared in a `dg` project's defs
folder, its attributes being the fields of a pipeline file.

    type: ml_assets.MlPipelineComponent
    attributes:
      name: churn
      task: binary
      sources: ...

The attributes go through the same loader as a pipeline file (core.spec.load), so `dg check defs` reports
the same one-line errors as `ml-assets validate`, and `build_defs` is the same assets, checks, jobs, sensors
and schedules as a pipelines directory holding that one file. Dagster checks the attributes only as a
mapping: its own schema check would report a defect first, in its own words.

`dg scaffold defs ml_assets.MlPipelineComponent <name>` writes a runnable pipeline: a made-up customer
table beside `defs.yaml` (core.scaffold.write_churn_sample) and the attributes `ml-assets init` writes for
it; with `--json-params '{"data": "<file or glob>", "target": "<column>"}'` the attributes come from the
user's own data instead.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import BaseModel, Field, RootModel

from ml_assets.core.errors import ConfigError
from ml_assets.core.scaffold import SAMPLE_ID, SAMPLE_TARGET, scaffold, write_churn_sample
from ml_assets.core.spec.load import load_pipeline_attributes
from ml_assets.core.spec.reference import SCHEMA_COMMENT
from ml_assets.orchestration.build import current_deployment, project_definitions

DEFS_FILES = ("defs.yaml", "defs.yml", "component.yaml")
SAMPLE_FILE = "customers.csv"


class PipelineAttributes(RootModel[dict[str, Any]]):
    """The fields of a pipeline file (docs/pipeline-reference.md), checked by ml_assets' own loader."""


class ScaffoldParams(BaseModel):
    """Optional: a data file to write the pipeline from, as `ml-assets init` does (default: a sample)."""

    data: str | None = Field(None, description="Data file or glob (default: a made-up customer table)")
    target: str | None = Field(None, description="Column to predict (required with data)")
    id: list[str] | None = Field(None, description="Columns that identify a row")


class PipelineScaffolder(dg.Scaffolder[ScaffoldParams]):
    @classmethod
    def get_scaffold_params(cls) -> type[ScaffoldParams]:
        return ScaffoldParams

    def scaffold(self, request: dg.ScaffoldRequest[ScaffoldParams]) -> None:
        if request.scaffold_format != "yaml":
            raise ConfigError(
                "dg scaffold: --format: an ml_assets pipeline is a defs.yaml (use --format yaml)"
            )
        params, folder = request.params or ScaffoldParams(), request.target_path
        folder.mkdir(parents=True, exist_ok=True)
        if params.data is None:
            data, target, ids = str(write_churn_sample(folder / SAMPLE_FILE)), SAMPLE_TARGET, [SAMPLE_ID]
        elif params.target is None:
            raise ConfigError("dg scaffold: params: data needs target, the column to predict")
        else:
            data, target, ids = params.data, params.target, params.id
        command = f"`dg scaffold defs {request.type_name} {folder.name}`"
        text = scaffold(data, target, folder / f"{folder.name}.yaml", id_columns=ids, written_by=command)
        # The pipeline file's schema comment points at a file beside it; here the fields are nested.
        lines = [line for line in text.splitlines() if not line.startswith(SCHEMA_COMMENT)]
        head = next(i for i, line in enumerate(lines) if not line.startswith("#"))
        (folder / "defs.yaml").write_text(
            "\n".join(lines[:head])
            + "\n# The attributes are the fields of a pipeline file (docs/pipeline-reference.md).\n"
            + f"type: {request.type_name}\nattributes:\n"
            + textwrap.indent("\n".join(lines[head:]), "  ")
            + "\n"
        )


@dg.scaffold_with(PipelineScaffolder)
class MlPipelineComponent(dg.Component):
    """An ml_assets pipeline: raw data to a monitored model as assets, checks, jobs, sensors and schedules.
    The attributes are the fields of a pipeline file (docs/pipeline-reference.md); relative paths are
    relative to the folder of defs.yaml."""

    def __init__(self, attributes: dict[str, Any] | None, defs_file: Path):
        self.attributes = attributes
        self.defs_file = defs_file

    @classmethod
    def get_model_cls(cls) -> type[BaseModel]:
        return PipelineAttributes

    @classmethod
    def load(cls, attributes: BaseModel | None, context: dg.ComponentLoadContext) -> MlPipelineComponent:
        raw = attributes.root if isinstance(attributes, PipelineAttributes) else None
        found = [context.path / name for name in DEFS_FILES if (context.path / name).exists()]
        return cls(raw, found[0] if found else context.path / DEFS_FILES[0])

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        try:
            project = load_pipeline_attributes(self.attributes, self.defs_file)
        except ConfigError as exc:
            # The one line names the file and field; the loader's own frames and causes add nothing to
            # what Dagster prints around it.
            raise ConfigError(str(exc)) from None
        return project_definitions(project, *current_deployment())
