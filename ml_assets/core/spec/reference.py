"""The pipeline-file reference (docs/pipeline-reference.md) and JSON Schema (pipeline.schema.json),
generated from the pydantic models in `schema`, so neither can drift from what the loader accepts.

The JSON Schema is for editors (yaml-language-server completes and checks a file as it is typed); the
loader stays the judge. It differs from pydantic's own schema in two ways a pipeline *file* needs:
`extends` is a field of the file (the loader merges the parent in before validation), and a file that
extends another may leave out anything its parent gives, required fields included.

    python -m ml_assets.core.spec.reference          # rewrite both files
    python -m ml_assets.core.spec.reference --check  # exit 1 when either is out of date
"""

from __future__ import annotations

import json
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from ml_assets.core.spec.schema import PipelineSpec

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "pipelines" / "pipeline.schema.json"
REFERENCE_FILE = Path(__file__).resolve().parents[3] / "docs" / "pipeline-reference.md"
# What `ml-assets init` and the shipped pipeline files put on their first line, for editors.
SCHEMA_COMMENT = "# yaml-language-server: $schema="

EXTENDS = {
    "type": "string",
    "pattern": "^[a-z_][a-z0-9_]*$",
    "description": "Name of a pipeline file beside this one (without .yaml) whose fields this file "
    "inherits, merged like a JSON merge patch: nested mappings key by key, null drops the parent's "
    "value, lists and scalars replace. Its sources become this pipeline's shared_sources.",
}


def file_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of one pipeline file.

    It is the schema of a merge patch: a file that extends another may leave out anything its parent
    gives, nested fields included, and may set any field to null to drop the parent's value. So blocks
    carry no `required` list and every field also accepts null; the loader names what is missing or
    null after the merge. A file without `extends` must still give the top-level required fields.
    """
    schema = _as_patch(PipelineSpec.model_json_schema(mode="validation"))
    required = PipelineSpec.model_json_schema(mode="validation").get("required", [])
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **schema,
        "title": "ml_assets pipeline file",
        "properties": {"extends": EXTENDS, **schema["properties"]},
        "if": {"not": {"required": ["extends"]}},
        "then": {"required": required},
    }


def _as_patch(node: Any) -> Any:
    if isinstance(node, list):
        return [_as_patch(v) for v in node]
    if not isinstance(node, dict):
        return node
    patched = {k: _as_patch(v) for k, v in node.items() if k != "required"}
    for key in ("properties", "patternProperties"):
        if key in patched:
            patched[key] = {name: _nullable(field) for name, field in patched[key].items()}
    if isinstance(patched.get("additionalProperties"), dict):
        patched["additionalProperties"] = _nullable(patched["additionalProperties"])
    return patched


def _nullable(field: dict[str, Any]) -> dict[str, Any]:
    if field.get("type") == "null" or any(o.get("type") == "null" for o in field.get("anyOf", [])):
        return field
    return {"anyOf": [field, {"type": "null"}]}


def _models(model: type[BaseModel], path: str, seen: set[type]) -> Iterator[tuple[str, type[BaseModel]]]:
    """Every model reachable from `model`, depth first in field order, each once, with its block path."""
    if model in seen:
        return
    seen.add(model)
    yield path, model
    for name, info in model.model_fields.items():
        for inner, suffix in _nested(info.annotation):
            yield from _models(inner, f"{path}.{name}{suffix}".lstrip("."), seen)


def _nested(annotation: Any) -> Iterator[tuple[type[BaseModel], str]]:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation, ""
    elif origin is dict:
        for inner, suffix in _nested(args[1]):
            yield inner, ".<name>" + suffix
    elif origin is list:
        for inner, suffix in _nested(args[0]):
            yield inner, "[]" + suffix
    elif origin in (typing.Union, types.UnionType, typing.Annotated):
        for arg in args:
            yield from _nested(arg)


def _type_text(node: dict[str, Any] | bool, sections: dict[str, str]) -> str:
    if not isinstance(node, dict) or not node:
        return "any value"
    if "$ref" in node:
        return f"block (`{sections[node['$ref'].rsplit('/', 1)[-1]]}`)"
    if "anyOf" in node:
        kinds = [_type_text(n, sections) for n in node["anyOf"] if n.get("type") != "null"]
        optional = any(n.get("type") == "null" for n in node["anyOf"])
        return " or ".join(kinds) + (" (or null)" if optional else "")
    if "enum" in node:
        return " | ".join(f"`{v}`" for v in node["enum"])
    if "const" in node:
        return f"`{node['const']}`"
    kind = node.get("type", "any")
    if kind == "array":
        return f"list of {_type_text(node.get('items', {}), sections)}"
    if kind == "object":
        values = [*node.get("patternProperties", {}).values(), node.get("additionalProperties", {})]
        return f"mapping of name to {_type_text(values[0], sections)}"
    if node.get("format") in ("date", "date-time"):
        return f"{node['format']} (ISO 8601)"
    bounds = [
        f"{sign} {node[key]}"
        for key, sign in (
            ("minimum", "≥"),
            ("exclusiveMinimum", ">"),
            ("maximum", "≤"),
            ("exclusiveMaximum", "<"),
        )
        if key in node
    ]
    return kind + (f" ({', '.join(bounds)})" if bounds else "")


def _default_text(model: type[BaseModel], field: str) -> str:
    info = model.model_fields[field]
    if info.is_required():
        return "**required**"
    value = info.default_factory() if info.default_factory is not None else info.default  # type: ignore[call-arg]
    if value is PydanticUndefined:
        return ""
    if isinstance(value, BaseModel):
        return "(the block's defaults)"
    plain = json.loads(
        json.dumps(value, default=lambda v: v.model_dump() if isinstance(v, BaseModel) else str(v))
    )
    text = json.dumps(plain, ensure_ascii=False)
    return f"`{text}`" if len(text) <= 60 else "(see below)" if isinstance(plain, dict) else f"`{text[:57]}…`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def markdown_reference() -> str:
    defs = PipelineSpec.model_json_schema(mode="validation").get("$defs", {})
    lines = [
        "# Pipeline file reference",
        "",
        "<!-- Generated by `python -m ml_assets.core.spec.reference` from ml_assets/core/spec/schema.py:",
        "     edit the models' descriptions there, not this file (a test fails when the two differ). -->",
        "",
        "One YAML file per pipeline. Every block below is a mapping; unknown keys are refused (they are almost",
        "always typos). Editors that speak the YAML language server validate and complete a file whose first",
        f"line is `{SCHEMA_COMMENT}<path to ml_assets/pipelines/pipeline.schema.json>` (`ml-assets init` writes",
        "it). Rules that span several blocks or files (a join naming a source that exists, leakage, SQL",
        "expressions) are checked when the file loads, with one line naming the file and the field.",
        "",
        "| field | type | default | meaning |",
        "|---|---|---|---|",
        f"| `extends` | string | | {_cell(EXTENDS['description'])} |",
    ]
    models = list(_models(PipelineSpec, "", set()))
    sections = {model.__name__: path for path, model in models}
    for path, model in models:
        schema = defs.get(model.__name__) or PipelineSpec.model_json_schema(mode="validation")
        if path:
            doc = _cell(model.__doc__ or "") if model.__doc__ else ""
            lines += [
                "",
                f"## `{path}`",
                "",
                *([doc, ""] if doc else []),
                "| field | type | default | meaning |",
                "|---|---|---|---|",
            ]
        for field, node in schema.get("properties", {}).items():
            lines.append(
                f"| `{field}` | {_cell(_type_text(node, sections))} | {_cell(_default_text(model, field))} "
                f"| {_cell(node.get('description', ''))} |"
            )
    return "\n".join(lines) + "\n"


def rendered() -> dict[Path, str]:
    return {
        SCHEMA_FILE: json.dumps(file_schema(), indent=1, ensure_ascii=False) + "\n",
        REFERENCE_FILE: markdown_reference(),
    }


def main(argv: list[str]) -> int:
    stale = [path for path, text in rendered().items() if not path.exists() or path.read_text() != text]
    if "--check" in argv:
        for path in stale:
            print(f"{path}: out of date: run python -m ml_assets.core.spec.reference", file=sys.stderr)
        return 1 if stale else 0
    for path, text in rendered().items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
