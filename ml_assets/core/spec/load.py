"""Reading pipeline files: YAML, `extends` (deep merge), pydantic validation, and the project-wide
cross-checks, with errors that name the file and the field."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ml_assets.core.errors import ConfigError
from ml_assets.core.spec.checks import check_pipeline, column_types, modelling_columns
from ml_assets.core.spec.infer import infer_features, source_columns
from ml_assets.core.spec.schema import IDENTIFIER, ROW_ID, FeatureSpec, PipelineSpec, Project, SourceSpec

PIPELINES_DIR_ENV = "ML_ASSETS_PIPELINES_DIR"


def _format_pydantic(path: Path, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        msg = err["msg"].removeprefix("Value error, ")
        if loc[-1:] == ["[key]"]:
            # A name (a mapping's key) broke the rule: the field is the mapping, the value the name.
            loc = loc[:-2]
            msg = f"name {msg[0].lower()}{msg[1:]}"
            if err["type"] == "string_pattern_mismatch":
                msg += " (lower-case letters, digits and _)"
        where = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        got = err.get("input")
        suffix = (
            f" (got {got!r})" if got is not None and err["type"] not in ("missing", "extra_forbidden") else ""
        )
        if isinstance(got, dict):
            suffix = ""
        lines.append(f"{path}: {where}: {msg}{suffix}")
    return "\n".join(lines)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of pipeline fields at the top level")
    return raw


def deep_merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """The child's fields over the parent's, as in a JSON merge patch (RFC 7386): mappings merge key by
    key at every depth, `null` drops the parent's value (the field's default applies), and anything else
    (lists, scalars) replaces the parent's value whole."""
    out = dict(parent)
    for key, value in child.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict):
            # Also into an absent block, so a null inside it still means "the default".
            out[key] = deep_merge(out.get(key) if isinstance(out.get(key), dict) else {}, value)
        else:
            out[key] = value
    return out


def _with_parent(raw: dict[str, Any], path: Path, chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """Resolve `extends: <pipeline>`: the parent's fields deep-merged with the child's (see deep_merge);
    the parent's own sources become shared sources (defined once, ingested once)."""
    parent_name = raw.get("extends")
    if parent_name is None:
        return raw
    if not isinstance(parent_name, str) or not re.fullmatch(IDENTIFIER, parent_name):
        raise ConfigError(
            f"{path}: extends: expected the name of a pipeline file beside it, without .yaml "
            f"(got {parent_name!r})"
        )
    parent_path = path.parent / f"{parent_name}.yaml"
    if parent_name in chain or not parent_path.exists():
        problem = (
            "circular extends" if parent_name in chain else f"no pipeline file {parent_path.name} beside it"
        )
        raise ConfigError(f"{path}: extends: {problem} (got {parent_name!r})")
    parent = _with_parent(_read_yaml(parent_path), parent_path, (*chain, path.stem))
    inherited = {k: v for k, v in parent.items() if k not in ("sources", "name", "extends")}
    inherited["shared_sources"] = [*parent.get("shared_sources", []), *parent.get("sources", {})]
    return deep_merge(inherited, {k: v for k, v in raw.items() if k != "extends"})


def _with_inferred_columns(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """Sources of this file that leave out `columns` get the stored (else freshly inferred) ones."""
    sources = raw.get("sources")
    if not isinstance(sources, dict):
        return raw
    filled = {}
    for name, source in sources.items():
        if isinstance(source, dict) and source.get("columns") is None:
            try:
                spec = SourceSpec.model_validate(source)
            except ValidationError:
                spec = None  # validating the whole file reports it, with the field's full path
            if spec is not None:
                columns, _ = source_columns(path, str(name), spec)
                source = source | {"columns": columns}
        filled[name] = source
    return raw | {"sources": filled}


def _with_inferred_features(spec: PipelineSpec, sources: dict[str, SourceSpec], path: Path) -> PipelineSpec:
    """A pipeline without `features` uses every modelling-table column but the target, what it is
    computed from, ids and leakage columns, typed as the data is."""
    if spec.features:
        return spec
    modelling_columns(spec, sources)  # names SQL cannot tell apart are refused before any inference
    excluded = {
        spec.target.name,
        *spec.target.source_columns,
        *spec.leakage,
        *spec.id,
        ROW_ID,
    }
    types = {c: t for c, t in column_types(spec, sources).items() if c not in excluded}
    try:
        features = [FeatureSpec.model_validate(f) for f in infer_features(types, "features")]
    except ValidationError as exc:
        raise ConfigError(_format_pydantic(path, exc)) from exc
    if not features:
        raise ConfigError(f"{path}: features: omitted, and no column is left to infer them from")
    return spec.model_copy(update={"features": features})


def _pipeline(raw: dict[str, Any], path: Path) -> PipelineSpec:
    """A pipeline's fields (as read from `path`) validated, its parent merged and its columns inferred."""
    raw = _with_inferred_columns(_with_parent(raw, path), path)
    try:
        return PipelineSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_pydantic(path, exc)) from exc


def load_pipeline_file(path: Path) -> PipelineSpec:
    spec = _pipeline(_read_yaml(path), path)
    if spec.name != path.stem:
        raise ConfigError(f"{path}: name: must match the file name '{path.stem}' (got {spec.name!r})")
    return spec


def _parents_first(files: list[Path]) -> list[Path]:
    """The files, each after the file it extends, so that a defect in an inherited field is reported
    against the file that holds it rather than a file extending it."""

    def depth(path: Path, seen: frozenset[Path]) -> int:
        parent = path.parent / f"{_read_yaml(path).get('extends')}.yaml"
        # No parent here, or a circle (loading the file reports both).
        if parent not in files or parent in seen:
            return 0
        return 1 + depth(parent, seen | {path})

    return sorted(files, key=lambda path: (depth(path, frozenset()), path.name))


def load_project(directory: Path) -> Project:
    """Load and cross-check every `*.yaml` pipeline file of a directory."""
    directory = Path(directory)
    files = _parents_first(sorted(directory.glob("*.yaml")))
    if not files:
        raise ConfigError(f"{directory}: no pipeline files (*.yaml) found")
    # Lazily, so that a broken file is reported before a clash with a later file is looked for.
    return _cross_checked(directory, ((path, load_pipeline_file(path)) for path in files))


def load_pipeline_attributes(raw: dict[str, Any] | None, path: Path) -> Project:
    """One pipeline given as a mapping of a pipeline file's fields (the attributes of a Dagster component
    declared in `path`), loaded and checked exactly as a pipeline file is: a project of that one pipeline,
    whose relative paths and stored inferred columns live beside `path`."""
    if not raw:
        raise ConfigError(f"{path}: attributes: required (the fields of a pipeline file)")
    if "extends" in raw:
        raise ConfigError(
            f"{path}: extends: a component holds one whole pipeline; copy the fields it should share"
        )
    return _cross_checked(path.parent, [(path, _pipeline(raw, path))])


def _cross_checked(directory: Path, loaded: Iterable[tuple[Path, PipelineSpec]]) -> Project:
    """The project of the loaded pipelines, after the checks that need several blocks or files."""
    pipelines: dict[str, PipelineSpec] = {}
    sources: dict[str, SourceSpec] = {}
    source_files: dict[str, Path] = {}
    pipeline_files: dict[str, Path] = {}
    for path, spec in loaded:
        if spec.name in pipelines:
            raise ConfigError(
                f"{path}: name: pipeline '{spec.name}' is also defined in {pipeline_files[spec.name]}"
            )
        pipelines[spec.name] = spec
        pipeline_files[spec.name] = path
        for name, source in spec.sources.items():
            if name in source_files:
                raise ConfigError(
                    f"{path}: sources.{name}: source already defined in {source_files[name]}; "
                    "list it under shared_sources instead"
                )
            sources[name] = source if source.owners else source.model_copy(update={"owners": spec.owners})
            source_files[name] = path
    partitioned = {n: s.partitions for n, s in sources.items() if s.partitions}
    if len(set(partitioned.values())) > 1:
        raise ConfigError(
            f"{directory}: partitions: partitioned sources must share one time axis (same granularity, start "
            f"and end), got {partitioned}"
        )
    for name, spec in pipelines.items():
        path = pipeline_files[name]
        for shared in spec.shared_sources:
            if shared not in sources:
                raise ConfigError(f"{path}: shared_sources: no pipeline file defines source {shared!r}")
        own = {s: sources[s] for s in [*spec.sources, *spec.shared_sources]}
        try:
            spec = _with_inferred_features(spec, own, path) if own.get(spec.base) else spec
            check_pipeline(spec, own)
        except ConfigError as exc:
            message = str(exc)
            raise ConfigError(message if message.startswith(str(path)) else f"{path}: {message}") from exc
        pipelines[name] = spec
    return Project(directory, pipelines, sources, source_files, pipeline_files)


def default_pipelines_dir() -> Path:
    return Path(__file__).parents[2] / "pipelines"


def pipelines_dir() -> Path:
    """The pipelines directory in use: $ML_ASSETS_PIPELINES_DIR, or the pipelines shipped in the package."""
    return Path(os.environ.get(PIPELINES_DIR_ENV) or default_pipelines_dir())


def load_default_project() -> Project:
    return load_project(pipelines_dir())
