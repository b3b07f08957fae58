"""A read-only HTTP route for `<data>/reports` on loopback, so the Dagster UI can show plots inline and
open the HTML reports with one click.

Why a server of our own: the UI renders a markdown metadata value inline only when it is shorter than
1,000 characters (longer ones hide behind "[Show Markdown]"), so an inline plot must be an image *URL*;
and a browser will not open a `file://` path from an http page. Dagster's webserver has no route for
user files, hence this one (stdlib only, `make dev` starts it next to `dagster dev`).

    python -m ml_assets.core.report_server            # serves ./data/reports on 127.0.0.1:3001
"""

from __future__ import annotations

import argparse
import functools
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, urlsplit

from ml_assets.core.store import data_dir

URL_ENV = "ML_ASSETS_REPORTS_URL"
DEFAULT_URL = "http://127.0.0.1:3001"


def reports_url(default: str | None = DEFAULT_URL) -> str | None:
    """Where the browser finds `<data>/reports` (no trailing slash): $ML_ASSETS_REPORTS_URL, else
    `default` (the loopback report server for `local`; a cluster has no default, see deployments)."""
    url = os.environ.get(URL_ENV, "").strip() or default
    return url.rstrip("/") if url else None


def url_of(base_url: str | None, reports_root: Path, path: Path) -> str | None:
    """The browser's URL of a file under the reports folder; None without a base URL."""
    if not base_url:
        return None
    relative = Path(path).resolve().relative_to(Path(reports_root).resolve())
    return f"{base_url.rstrip('/')}/{quote(relative.as_posix())}"


class _QuietHandler(SimpleHTTPRequestHandler):
    # One line per image request would drown `make dev`'s own log.
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's signature
        return None

    def end_headers(self) -> None:
        # A report is rewritten in place when a version is re-evaluated: never serve a stale copy.
        self.send_header("Cache-Control", "no-store")
        super().end_headers()


def make_server(root: Path, host: str = "127.0.0.1", port: int = 3001) -> ThreadingHTTPServer:
    """A server for the files under `root` (port 0: any free port; `server.server_port` tells which)."""
    root.mkdir(parents=True, exist_ok=True)
    handler = functools.partial(_QuietHandler, directory=str(root))
    return ThreadingHTTPServer((host, port), handler)


def serve_in_thread(root: Path, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """Started in a daemon thread; `server.shutdown()` stops it."""
    server = make_server(root, host, port)
    threading.Thread(target=server.serve_forever, name="report-server", daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> None:
    parsed = urlsplit(reports_url() or DEFAULT_URL)
    parser = argparse.ArgumentParser(description="Serve <data>/reports read-only for the Dagster UI.")
    parser.add_argument("--root", type=Path, default=data_dir() / "reports")
    parser.add_argument("--host", default=parsed.hostname or "127.0.0.1")
    parser.add_argument("--port", type=int, default=parsed.port or 3001)
    args = parser.parse_args(argv)
    server = make_server(args.root, args.host, args.port)
    print(f"reports of {args.root} on http://{args.host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
