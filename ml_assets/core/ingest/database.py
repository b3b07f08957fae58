"""Database sources: the rows of a table or query inside a time window, read with SQL.

Values come back as strings, exactly like a CSV file read without type inference, so a database source
goes through the same validation (and quarantine) as a file. Each value is cast to text by the database
itself, in a session pinned to UTC and ISO dates, so timestamps, numbers and booleans are rendered in
forms DuckDB's TRY_CAST parses back to the same value.
"""

from __future__ import annotations

import math
import os
import threading
from urllib.parse import unquote, urlsplit

import duckdb
import polars as pl

from ml_assets.core.errors import ConfigError, SourceError
from ml_assets.core.ingest.window import TimeWindow
from ml_assets.core.spec.schema import SourceSpec
from ml_assets.core.sql import LINEAGE, q

POSTGRES_SCHEMES = ("postgresql", "postgres")


def read_database(
    name: str, spec: SourceSpec, window: TimeWindow, limit: int | None = None
) -> tuple[pl.DataFrame, str]:
    """(rows of the window as strings plus `_source_row`, label of where they came from, no credentials);
    with `limit`, only the window's first rows in time order (a sample to infer the schema from)."""
    # Imported by the reads that need it: every CLI command imports this module through the ingest package.
    import psycopg

    db = spec.database
    if db is None or spec.timestamp is None:
        raise ConfigError(f"source '{name}': a database source needs database: and timestamp:")
    url = os.environ.get(db.url_env, "").strip()
    if not url:
        raise SourceError(
            f"source '{name}': environment variable {db.url_env} is not set or empty; it must hold the "
            "database URL (postgresql://user:password@host:port/db or duckdb:///path/file.duckdb)"
        )
    parts = urlsplit(url)
    label = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path} " + (
        f"table {db.table}" if db.table else "query"
    )
    source = ".".join(q(p) for p in db.table.split(".")) if db.table else f"({db.query})"
    try:
        if parts.scheme in POSTGRES_SCHEMES:
            names, rows = _read_postgres(url, source, spec.timestamp, window, db.timeout_s, limit)
        elif parts.scheme == "duckdb":
            path = unquote(parts.path)
            if parts.netloc or not os.path.isabs(path):
                raise SourceError(
                    f"source '{name}': {db.url_env}: a DuckDB URL needs an absolute path "
                    "(duckdb:///abs/path/file.duckdb)"
                )
            names, rows = _read_duckdb(path, source, spec.timestamp, window, db.timeout_s, limit)
        else:
            raise SourceError(
                f"source '{name}': {db.url_env}: unsupported URL scheme '{parts.scheme}' "
                "(expected postgresql:// or duckdb:///)"
            )
    except _Problem as exc:
        raise SourceError(f"source '{name}': {label}: {exc}") from exc.__cause__
    except duckdb.InterruptException as exc:
        raise SourceError(f"source '{name}': {label}: query exceeded timeout_s={db.timeout_s}s") from exc
    except (psycopg.Error, duckdb.Error) as exc:
        raise SourceError(f"source '{name}': {label}: {_first_line(exc)}") from exc
    frame = pl.DataFrame(rows, schema=dict.fromkeys(names, pl.String), orient="row")
    return frame.with_columns(pl.int_range(1, frame.height + 1, dtype=pl.Int64).alias("_source_row")), label


class _Problem(Exception):
    """A failure whose message is already safe to show (the cause may quote the connection string)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_postgres(
    url: str, source: str, ts: str, window: TimeWindow, timeout_s: float, limit: int | None
) -> tuple[list[str], list[tuple]]:
    import psycopg

    password = urlsplit(url).password
    try:
        # libpq takes whole seconds (and treats anything below 2 as 2).
        conn = psycopg.connect(
            url, connect_timeout=max(2, math.ceil(timeout_s)), application_name="ml_assets"
        )
    except psycopg.Error as exc:
        # libpq may quote parts of the connection string (e.g. a badly encoded password): drop the
        # cause and scrub the message, so the password can never reach a log.
        message = _first_line(exc)
        for secret in {password, unquote(password or "")} - {None, ""}:
            message = message.replace(secret, "***")
        raise _Problem(f"cannot connect: {message}") from None
    with conn:
        conn.read_only = True
        with conn.cursor() as cur:
            # The server's or role's defaults may be anything: the window's naive UTC bounds are compared
            # in the session zone, and dates render as ISO only under DateStyle ISO.
            cur.execute(
                "SELECT set_config('TimeZone', 'UTC', false), set_config('DateStyle', 'ISO', false), "
                "set_config('statement_timeout', %s, false)",
                [str(math.ceil(timeout_s * 1000))],
            )
            # psycopg reads every % of a query with parameters as a placeholder; a user query may hold
            # literal ones (LIKE 'a%').
            return _select(cur, source.replace("%", "%%"), ts, window, "%s", limit)


def _read_duckdb(
    path: str, source: str, ts: str, window: TimeWindow, timeout_s: float, limit: int | None
) -> tuple[list[str], list[tuple]]:
    with duckdb.connect(path, read_only=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        # DuckDB has no statement timeout: interrupt the query from a timer instead.
        timer = threading.Timer(timeout_s, conn.interrupt)
        timer.start()
        try:
            return _select(conn, source, ts, window, "?", limit)
        finally:
            timer.cancel()


def _select(
    cur, source: str, ts: str, window: TimeWindow, placeholder: str, limit: int | None
) -> tuple[list[str], list[tuple]]:
    """Column names and rows (all text) of `source` inside the window, ordered by the timestamp."""
    cur.execute(f"SELECT * FROM {source} AS s LIMIT 0", [])
    names = [d[0] for d in cur.description]
    if ts not in names:
        raise _Problem(f"timestamp column '{ts}' is not a column of the result; columns: {names}")
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise _Problem(f"column name(s) {duplicated} appear more than once; give each column its own name")
    reserved = [n for n in names if n in LINEAGE]
    if reserved:
        raise _Problem(f"column name(s) {reserved} are reserved for lineage; rename them in a query")
    conditions, params = [], []
    for op, value in ((">=", window.start), ("<", window.end), (">", window.after)):
        if value is not None:
            conditions.append(f"{q(ts)} {op} {placeholder}")
            params.append(value)
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    columns = ", ".join(f"CAST({q(n)} AS TEXT) AS {q(n)}" for n in names)
    bound = f" LIMIT {int(limit)}" if limit is not None else ""
    cur.execute(f"SELECT {columns} FROM {source} AS s{where} ORDER BY {q(ts)}{bound}", params)
    return names, cur.fetchall()
