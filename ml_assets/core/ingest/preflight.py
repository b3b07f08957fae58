"""`ml-assets validate`: what can be checked about a pipeline's sources in seconds, without loading or
training: every file source resolves to files, and every file it would read (each file of a glob or
landing zone, each member of a zip) has a header that fits the source's schema-evolution policy and a
sample of values (its first SAMPLE_ROWS rows) that parses as the configured types."""

from __future__ import annotations

from pathlib import Path

import duckdb
import polars as pl

from ml_assets.core.errors import SourceError
from ml_assets.core.ingest.files import check_batch, read_file, resolve_files
from ml_assets.core.spec.schema import SourceSpec
from ml_assets.core.sql import cast_expr, nan_as_missing, q

SAMPLE_ROWS = 5000


def _unparsed(spec: SourceSpec, frame: pl.DataFrame) -> list[str]:
    """'column: N of M sampled values are not a valid <type> (e.g. 'x')' for the sample's bad columns."""
    sample = frame.select([c for c in frame.columns if c in spec.columns])
    problems = []
    with duckdb.connect(":memory:") as conn:
        conn.register("sample", sample.cast(pl.String).to_arrow())
        for column in sample.columns:
            ctype = spec.columns[column].type
            # A number column's NaN is a missing value, not one that fails to parse (validate.typed_sql).
            nan = f" AND NOT {nan_as_missing(q(column))}" if ctype in ("int", "float") else ""
            bad, example = conn.execute(
                f"SELECT count(*), min({q(column)}) FROM sample WHERE {q(column)} IS NOT NULL "
                f"AND {cast_expr(q(column), ctype)} IS NULL{nan}"
            ).fetchone()
            if bad:
                problems.append(
                    f"column '{column}': {bad} of {sample.height} sampled values are not a valid {ctype} "
                    f"(e.g. {example!r}); those rows would be quarantined"
                )
    return problems


def check_source(name: str, spec: SourceSpec, base_dir: Path, root: Path) -> tuple[str, list[str]]:
    """(summary line, problems) for one source; database and HTTP sources are only checked by a run."""
    if spec.kind != "files":
        return f"source '{name}': {spec.kind} source, checked when it is read", []
    try:
        files = resolve_files(name, spec, base_dir, root)
    except SourceError as exc:
        return f"source '{name}': no files", [str(exc)]
    if not files:
        return f"source '{name}': landing zone empty (nothing to check yet)", []
    problems = []
    for path in files:
        try:
            for label, frame in read_file(name, path, spec, SAMPLE_ROWS):
                check_batch(name, spec, label, frame.columns, frame.height)
                problems += [f"source '{name}': file {label}: {p}" for p in _unparsed(spec, frame)]
        except SourceError as exc:
            problems.append(str(exc))
    return f"source '{name}': {len(files)} file(s) checked, columns fit the config", problems
