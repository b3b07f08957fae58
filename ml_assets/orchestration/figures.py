"""Figures and reports as Dagster metadata.

What Dagster 1.13's UI does with them (checked in a real browser, see test_ui_browser): a markdown value
shorter than 1,000 characters renders inline on the asset page, `![name](http://...)` images included;
a longer one hides behind "[Show Markdown]" and opens in a dialog, where `data:image/png` images render.
So each figure is a short inline markdown image served by the report server (`plot_<name>`), and all
figures are also embedded once (`plots_embedded`), which needs no server: one click away.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import dagster as dg

from ml_assets.orchestration.resources import ArtifactStore

# Bounds what one materialization adds to the event log (figures are ~20-60 kB each).
MAX_EMBEDDED_BYTES = 600_000


def figure_metadata(artifacts: ArtifactStore, plots: dict[str, Path]) -> dict[str, Any]:
    # Inline images need a URL: without the deployment's base URL only the embedded copies are shown.
    urls = {name: artifacts.url_of(path) for name, path in plots.items()}
    meta: dict[str, Any] = {
        f"plot_{name}": dg.MetadataValue.md(f"![{name}]({url})") for name, url in urls.items() if url
    }
    embedded, size = [], 0
    for name, path in plots.items():
        data = path.read_bytes()
        if size + len(data) > MAX_EMBEDDED_BYTES:
            embedded.append(f"*{name}: too large to embed; see the report*")
            continue
        size += len(data)
        embedded.append(f"**{name}**\n\n![{name}](data:image/png;base64,{base64.b64encode(data).decode()})")
    if embedded:
        meta["plots_embedded"] = dg.MetadataValue.md("\n\n".join(embedded))
    return meta


def report_metadata(artifacts: ArtifactStore, path: Path, name: str = "report") -> dict[str, Any]:
    """A link the browser opens (under the deployment's reports URL, when it has one) and the file's path
    on disk."""
    url = artifacts.url_of(path)
    return {
        **({name: dg.MetadataValue.url(url)} if url else {}),
        f"{name}_path": dg.MetadataValue.path(str(path)),
    }
