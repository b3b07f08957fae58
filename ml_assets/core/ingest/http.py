"""HTTP sources: the records of a paged JSON API inside a time window.

Values come back as strings, exactly like a CSV file read without type inference, so an HTTP source goes
through the same validation (and quarantine) as a file. The window is sent to the server when the config
names its parameters, and applied again here: a server that ignores them still yields exactly the window.
Header values (tokens) come from environment variables and never appear in a message.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
import urllib.request
from http.client import HTTPException
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import polars as pl

from ml_assets.core.errors import ConfigError, SourceError
from ml_assets.core.ingest.window import TimeWindow
from ml_assets.core.spec.schema import HttpSpec, SourceSpec
from ml_assets.core.sql import EVENT_TIME, LINEAGE

RESERVED = (*LINEAGE, EVENT_TIME)
JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def read_http(
    name: str, spec: SourceSpec, window: TimeWindow, limit: int | None = None
) -> tuple[pl.DataFrame, str]:
    """(rows of the window as strings plus `_source_row`, the API's URL without its query string); with
    `limit`, the pages up to the first that reaches that many records (a sample to infer the schema
    from)."""
    http = spec.http
    if http is None or spec.timestamp is None:
        raise ConfigError(f"source '{name}': an HTTP source needs http: and timestamp:")
    parts = urlsplit(http.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SourceError(f"source '{name}': http.url must be an http:// or https:// URL")
    if "@" in parts.netloc:
        # Not echoed: the URL itself holds the secret.
        raise SourceError(
            f"source '{name}': http.url must not hold credentials; send them in a header (http.headers_env)"
        )
    label = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    headers = _headers(name, http)
    query = [*parse_qsl(parts.query, keep_blank_values=True), *http.params.items()]
    # Sending `after` as the start is inclusive where the watermark is not: the filter below drops the rest.
    start = window.start if window.start is not None else window.after
    for param, value in ((http.start_param, start), (http.end_param, window.end)):
        if param and value is not None:
            query.append((param, _naive_utc(value).isoformat() + "Z"))
    if http.page_size_param:
        query.append((http.page_size_param, str(http.page_size)))

    records: list[dict[str, Any]] = []
    page, cursor = http.first_page, None
    for _ in range(http.max_pages):
        if http.paging == "page":
            position = [(http.page_param, str(page))]
        else:
            position = [] if cursor is None else [(http.cursor_param, cursor)]
        encoded = urlencode(query + position)
        doc, batch = _fetch(name, f"{label}?{encoded}" if encoded else label, headers, http)
        records += batch
        if limit is not None and len(records) >= limit:
            break
        if http.paging == "page":
            if not batch or (http.page_size_param and len(batch) < http.page_size):
                break
            page += 1
        else:
            cursor = doc.get(http.next_cursor)
            if cursor is None or cursor == "":
                break
            cursor = cursor if isinstance(cursor, str) else json.dumps(cursor)
    else:
        raise SourceError(
            f"source '{name}': {label}: still more pages after http.max_pages={http.max_pages}; raise it if "
            "the source really is that large, or check the server's paging"
        )
    return _frame(name, label, spec.timestamp, window, records), label


def _headers(name: str, http: HttpSpec) -> dict[str, str]:
    headers = {}
    for header, var in http.headers_env.items():
        value = os.environ.get(var, "").strip()
        if not value:
            raise SourceError(
                f"source '{name}': environment variable {var} (for header {header}) is not set or empty"
            )
        # http.client would reject such a value with an error that quotes it.
        if not (value.isascii() and value.isprintable()):
            raise SourceError(
                f"source '{name}': environment variable {var} (for header {header}) holds characters "
                "a header cannot carry"
            )
        headers[header] = value
    return headers


def _fetch(name: str, url: str, headers: dict[str, str], http: HttpSpec) -> tuple[dict, list[dict]]:
    """The response document of one page and its records, checked."""
    body = _get(name, url, headers, http)
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise SourceError(f"source '{name}': {url}: response is not valid JSON ({exc})") from None
    field = http.records
    problem = None
    if not isinstance(doc, dict):
        problem = f"response is a JSON {_json_type(doc)}, expected an object with field '{field}'"
    elif field not in doc:
        problem = f"response has no field '{field}' (http.records); its fields: {list(doc)[:20]}"
    elif not isinstance(doc[field], list):
        problem = f"field '{field}' is a JSON {_json_type(doc[field])}, expected an array of records"
    else:
        bad = next((i for i, r in enumerate(doc[field]) if not isinstance(r, dict)), None)
        if bad is not None:
            problem = f"record {bad + 1} of field '{field}' is a JSON {_json_type(doc[field][bad])}, expected an object"
    if problem:
        raise SourceError(f"source '{name}': {url}: {problem}")
    return doc, doc[field]


def _get(name: str, url: str, headers: dict[str, str], http: HttpSpec) -> bytes:
    """The body of a 2xx response, retrying what may pass (network errors, timeouts, 429, 5xx)."""
    request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "ml_assets"})
    for header, value in headers.items():
        # urllib forwards ordinary headers to wherever a redirect points, even another host.
        request.add_unredirected_header(header, value)
    attempts = http.retries + 1
    for attempt in range(attempts):
        if attempt:
            time.sleep(http.backoff_s * 2 ** (attempt - 1))
        try:
            with urllib.request.urlopen(request, timeout=http.timeout_s) as response:
                return response.read()
        except HTTPError as exc:
            problem = f"HTTP {exc.code} {exc.reason}: {_error_body(exc, headers)}"
            if exc.code != 429 and exc.code < 500:
                raise SourceError(f"source '{name}': {url}: {problem}") from None
        except (OSError, HTTPException) as exc:
            reason = exc.reason if isinstance(exc, URLError) else exc
            problem = (
                f"timed out (timeout_s={http.timeout_s})"
                if isinstance(reason, TimeoutError)
                else f"request failed: {str(reason) or type(reason).__name__}"
            )
        except ValueError as exc:
            # A malformed URL or header name; header values were checked, so none can be quoted here.
            raise SourceError(f"source '{name}': {url}: invalid request: {exc}") from None
    raise SourceError(f"source '{name}': {url}: {problem} after {attempts} attempt(s)")


def _error_body(exc: HTTPError, headers: dict[str, str]) -> str:
    try:
        text = exc.read().decode("utf-8", "replace")
    except (OSError, HTTPException):
        return "(body unreadable)"
    # Some servers echo the request's headers back; scrub before cutting, so no part of a token survives.
    for value in headers.values():
        for secret in (value, value.split()[-1]):
            text = text.replace(secret, "***")
    return " ".join(text.split())[:200] or "(empty body)"


def _json_type(value: object) -> str:
    return JSON_TYPES.get(type(value), "null" if value is None else type(value).__name__)


def _naive_utc(value: dt.datetime) -> dt.datetime:
    return value.astimezone(dt.UTC).replace(tzinfo=None) if value.tzinfo else value


def _instant(value: object) -> dt.datetime | None:
    """A timestamp field as a naive UTC instant (ISO 8601; without an offset it is UTC); None if it is not one."""
    if not isinstance(value, str):
        return None
    try:
        return _naive_utc(dt.datetime.fromisoformat(value.strip()))
    except ValueError:
        return None


def _inside(instant: dt.datetime | None, window: TimeWindow) -> bool:
    return instant is not None and all(
        (
            window.start is None or instant >= window.start,
            window.end is None or instant < window.end,
            window.after is None or instant > window.after,
        )
    )


def _text(value: object) -> str | None:
    """A JSON value as the text a CSV file would hold (DuckDB parses it back to the same value)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _frame(name: str, label: str, ts: str, window: TimeWindow, records: list[dict]) -> pl.DataFrame:
    if records and not any(ts in r for r in records):
        raise SourceError(
            f"source '{name}': {label}: no record has the timestamp field '{ts}'; fields: "
            f"{list(dict.fromkeys(k for r in records[:100] for k in r))[:20]}"
        )
    if window != TimeWindow():
        # A row whose time is missing or does not parse belongs to no window: like a NULL timestamp in a
        # database source, it is only read with an open window (and then quarantined by validation).
        records = [r for r in records if _inside(_instant(r.get(ts)), window)]
    names = list(dict.fromkeys(key for r in records for key in r))
    reserved = [n for n in names if n in RESERVED]
    if reserved:
        raise SourceError(f"source '{name}': {label}: field(s) {reserved} are reserved for platform columns")
    frame = pl.DataFrame(
        {n: [_text(r.get(n)) for r in records] for n in names}, schema=dict.fromkeys(names, pl.String)
    )
    return frame.with_columns(pl.int_range(1, len(records) + 1, dtype=pl.Int64).alias("_source_row"))
