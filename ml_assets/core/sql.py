"""SQL vocabulary shared by every stage: quoting, typed casts, the platform's own columns, and the
table helpers that replace exactly a window's rows."""

from __future__ import annotations

import duckdb

DUCKDB_TYPES = {
    "int": "BIGINT",
    "float": "DOUBLE",
    "str": "VARCHAR",
    "bool": "BOOLEAN",
    "datetime": "TIMESTAMP",
    "date": "DATE",
}
LINEAGE = ("_source_file", "_source_row")
# Each row's parsed time in a partitioned or incremental source's tables: what a partition replaces.
EVENT_TIME = "_event_time"


def q(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def lit(value: object) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


def cast_expr(ref: str, ctype: str) -> str:
    """SQL casting the (string) SQL expression `ref` to a config type; NULL where it does not parse."""
    if ctype == "str":
        return f"CAST({ref} AS VARCHAR)"
    if ctype == "datetime":
        # Parse with or without an offset; store as naive UTC (the session zone is UTC).
        return f"CAST(TRY_CAST({ref} AS TIMESTAMPTZ) AS TIMESTAMP)"
    return f"TRY_CAST({ref} AS {DUCKDB_TYPES[ctype]})"


def nan_as_missing(raw: str) -> str:
    """SQL true when a raw value is a NaN (`NaN`, `nan`, a float NaN of a Parquet file): in a number
    column it is a missing value, never a number that would reach training, plots or metrics."""
    return f"coalesce(isnan(TRY_CAST({raw} AS DOUBLE)), false)"


def table_exists(conn: duckdb.DuckDBPyConnection, schema: str, name: str) -> bool:
    return bool(
        conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
            [schema, name],
        ).fetchone()[0]
    )


def table_columns(conn: duckdb.DuckDBPyConnection, schema: str, table: str) -> list[str]:
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = ? AND table_name = ? "
        "ORDER BY ordinal_position",
        [schema, table],
    ).fetchall()
    return [r[0] for r in rows]


def drop_unpartitioned(conn: duckdb.DuckDBPyConnection, schema: str, name: str) -> None:
    """Drop a table written before its source was partitioned: its rows have no _event_time, so no
    partition could ever replace them and the new partitions' rows would duplicate them."""
    columns = table_columns(conn, schema, name)
    if columns and EVENT_TIME not in columns:
        conn.execute(f"DROP TABLE {schema}.{q(name)}")


def replace_rows(conn: duckdb.DuckDBPyConnection, table: str, source: str, where: str | None) -> None:
    """Replace the rows of `table` matching `where` (None: append) by the rows of relation `source`.

    Columns are matched by name; a column the batch brings that the table lacks is added (schema
    evolution), one the batch lacks stays null. The caller owns the transaction.
    """
    schema, name = (part.strip('"') for part in table.split(".", 1))
    if not table_exists(conn, schema, name):
        conn.execute(f"CREATE TABLE {table} AS SELECT * FROM {source}")
        return
    have = {r[0] for r in conn.execute(f"DESCRIBE {table}").fetchall()}
    for column, ctype, *_ in conn.execute(f"DESCRIBE SELECT * FROM {source}").fetchall():
        if column not in have:
            conn.execute(f'ALTER TABLE {table} ADD COLUMN "{column}" {ctype}')
    if where is not None:
        conn.execute(f"DELETE FROM {table} WHERE {where}")
    conn.execute(f"INSERT INTO {table} BY NAME SELECT * FROM {source}")
