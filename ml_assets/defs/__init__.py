"""The defs folder of this repository as a `dg` project ([tool.dg] in pyproject.toml): a pipeline that
`dg scaffold defs ml_assets.MlPipelineComponent <name>` adds here is loaded beside the pipeline files
(orchestration/definitions.py). The shipped pipelines stay files in ml_assets/pipelines/."""
