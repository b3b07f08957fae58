"""The Dagster UI as a user sees it, in a real headless Chromium: after the flagship ran on the small sample
(its gate refuses; the version is then made champion by hand so the monitors have one), the evaluation,
promotion, drift, performance and profile pages show their numbers, the verdict first and the plots as loaded images.

Slow (`make test-ui` installs the system browser if missing and runs it): the webserver takes ~20 s to
start and each page a few seconds to render. Needs `chromium` (Debian) and the `playwright` package;
it never downloads a browser. Screenshots go to $ML_ASSETS_UI_SHOTS or bench/out/ui/.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from playwright.sync_api import TimeoutError as PageTimeout
from playwright.sync_api import sync_playwright

from ml_assets.core import registry, rollback
from ml_assets.core.report_server import URL_ENV, serve_in_thread
from ml_assets.core.spec.load import PIPELINES_DIR_ENV, load_project
from ml_assets.core.store import DATA_DIR_ENV, connect, warehouse_path
from ml_assets.orchestration.keys import layer_key
from ml_assets_tests.conftest import FAST_MODEL, materialize_all, stop_process, write_pipelines

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = Path(os.environ.get("ML_ASSETS_UI_SHOTS", Path(__file__).parents[1] / "bench" / "out" / "ui"))
# Generous: a busy 2-core machine; every wait below is bounded by one of these.
SERVER_START_S = 240
PAGE_MS = 90_000
DELAY = "flight_delay"
REGRESSION = "flight_arr_delay"
GATE = (
    dg.AssetSelection.assets(dg.AssetKey([DELAY, "promotion"]), dg.AssetKey([REGRESSION, "evaluation"]))
    .upstream()
    .required_multi_asset_neighbors()
)
MONITORS = [dg.AssetKey([DELAY, "drift_report"]), dg.AssetKey([DELAY, "performance"])]
PROFILES = [layer_key("profile", s) for s in ("flights", "weather")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, deadline_s: float, proc: subprocess.Popen) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"dagster-webserver exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {deadline_s} s")


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory, sample_sources: Path) -> Iterator[dict[str, str]]:
    tmp = tmp_path_factory.mktemp("ui")
    pipelines, root, home = (
        write_pipelines(tmp / "pipelines", sample_sources, FAST_MODEL),
        tmp / "data",
        tmp / "home",
    )
    home.mkdir()
    shutil.copy(Path(__file__).parents[1] / "dagster.yaml", home / "dagster.yaml")
    reports = serve_in_thread(root / "reports")
    reports_url = f"http://127.0.0.1:{reports.server_port}"
    os.environ[URL_ENV] = reports_url
    try:
        instance = dg.DagsterInstance.from_config(str(home))
        assert materialize_all(pipelines, root, selection=GATE, instance=instance).success
        with connect(warehouse_path(root)) as conn:
            version = registry.alias_version(conn, DELAY, registry.CHALLENGER)
        spec = load_project(pipelines).pipelines[DELAY]
        db = functools.partial(connect, warehouse_path(root))
        rollback.rollback(db, spec, load_project(pipelines).sources_of(spec), to=version)
        # The monitors judge what the champion step settles: the version just made champion.
        settled = [dg.AssetKey([DELAY, "champion"]), *MONITORS, *PROFILES]
        assert materialize_all(pipelines, root, selection=settled, instance=instance).success
        instance.dispose()
        port = _free_port()
        env = os.environ | {
            "DAGSTER_HOME": str(home),
            DATA_DIR_ENV: str(root),
            PIPELINES_DIR_ENV: str(pipelines),
            "DO_NOT_TRACK": "1",
        }
        web = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port)]
            + ["-m", "ml_assets.orchestration.definitions"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(tmp / "webserver.log").open("w"),
            start_new_session=True,
        )
        try:
            _wait_for(f"http://127.0.0.1:{port}/server_info", SERVER_START_S, web)
            yield {"url": f"http://127.0.0.1:{port}", "reports": reports_url, "version": version}
        finally:
            stop_process(web)
    finally:
        os.environ.pop(URL_ENV, None)
        reports.shutdown()


@pytest.fixture(scope="module")
def browser(ui):
    if not Path(CHROMIUM).exists():
        pytest.fail("no system Chromium: `make test-ui` installs it (apt-get install chromium)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots in {SHOTS}")
    with sync_playwright() as p:
        chrome = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, timeout=PAGE_MS)
        try:
            yield chrome
        finally:
            chrome.close()


def _open(browser, ui: dict[str, str], asset: str, shot: str):
    """An asset's page, the first-visit dialog dismissed, rendered until its metadata table shows."""
    page = browser.new_page(viewport={"width": 1600, "height": 3200})
    page.set_default_timeout(PAGE_MS)
    page.goto(f"{ui['url']}/assets/{asset}")
    page.get_by_text("Metadata", exact=True).first.wait_for()
    # Dagster's "join the community" dialog, shown on a first visit.
    with contextlib.suppress(PageTimeout):
        page.get_by_role("button", name="Skip").click(timeout=5_000)
    page.screenshot(path=str(SHOTS / f"{shot}.png"), full_page=True)
    return page


def _loaded_images(page, prefix: str) -> list[str]:
    """Sources of the images under `prefix` that loaded (a broken image has natural width 0)."""
    page.wait_for_function(
        "p => [...document.images].some(i => i.src.startsWith(p) && i.complete && i.naturalWidth > 0)",
        arg=prefix,
        timeout=PAGE_MS,
    )
    shown = page.eval_on_selector_all("img", _SHOWN, prefix)
    # A plot wider than the value column is cut off at the right edge of the metadata table.
    cut = [(src, right, edge) for src, right, edge in shown if edge is not None and right > edge + 1]
    assert not cut, f"plots cut off at the right (src, right edge, visible edge): {cut}"
    return [src for src, _, _ in shown]


# Each loaded image under the prefix with its right edge and that of the nearest ancestor that clips it.
_SHOWN = """(els, p) => els.filter(i => i.src.startsWith(p) && i.naturalWidth > 0).map(i => {
    let box = i.parentElement;
    while (box && getComputedStyle(box).overflowX === "visible") box = box.parentElement;
    return [i.src, i.getBoundingClientRect().right, box ? box.getBoundingClientRect().right : null];
})"""


def _metadata_keys(page) -> list[str]:
    return page.eval_on_selector_all(
        "table tbody tr td:first-child", "els => els.map(e => e.innerText.trim())"
    )


def test_evaluation_page_shows_metrics_and_plots(browser, ui):
    page = _open(browser, ui, f"{DELAY}/evaluation", "evaluation")
    images = _loaded_images(page, ui["reports"])
    page.screenshot(path=str(SHOTS / "evaluation.png"), full_page=True)
    names = {Path(src).stem for src in images}
    assert {"roc", "pr", "calibration", "feature_importance", "versions"} <= names
    text = page.inner_text("body")
    assert "model_roc_auc" in text and "roc_auc (primary)" in text
    link = page.get_by_role("link", name=f"{ui['reports']}/{DELAY}/{ui['version']}/report.html")
    with urllib.request.urlopen(link.first.get_attribute("href"), timeout=30) as response:
        assert response.read(200).strip().lower().startswith(b"<!doctype html")
    page.close()


def test_regression_evaluation_shows_residuals(browser, ui):
    page = _open(browser, ui, f"{REGRESSION}/evaluation", "evaluation_regression")
    images = _loaded_images(page, ui["reports"])
    page.screenshot(path=str(SHOTS / "evaluation_regression.png"), full_page=True)
    assert {"residuals", "feature_importance"} <= {Path(src).stem for src in images}, images
    assert "model_rmse" in page.inner_text("body")
    page.close()


def test_promotion_page_shows_the_verdict_first(browser, ui):
    page = _open(browser, ui, f"{DELAY}/promotion", "promotion")
    keys = _metadata_keys(page)
    assert keys and keys[0] == "verdict", keys
    # Every pipeline's first promotion ends with a champion (the model or a baseline, said in the reason).
    verdict = page.get_by_text(f"PROMOTED (first champion): challenger {ui['version']}")
    assert verdict.is_visible()
    box = verdict.bounding_box()
    assert box is not None and box["x"] + box["width"] <= 1600  # not cut off at the right edge
    body = page.inner_text("body")
    assert "Champion now: " in body and "(no champion before)" in body
    page.close()


def test_drift_and_performance_pages_show_their_plots(browser, ui):
    for asset, plot in (("drift_report", "drift"), ("performance", "performance")):
        page = _open(browser, ui, f"{DELAY}/{asset}", asset)
        images = _loaded_images(page, ui["reports"])
        page.screenshot(path=str(SHOTS / f"{asset}.png"), full_page=True)
        assert any(f"/{plot}/" in src for src in images), images
        if asset == "performance":  # the weeks' table explains itself
            text = page.inner_text("body")
            assert "days with labelled rows" in text
            assert re.search(r"\(\d+ rows, \d days\): (ok|degraded|not judged)", text), text
        page.close()


def test_the_drift_report_opens_on_the_drifted_columns(browser, ui):
    page = _open(browser, ui, f"{DELAY}/drift_report", "drift_report")
    links = page.eval_on_selector_all("a", "as => as.map(a => a.href)")
    (summary,) = {
        h for h in links if f"/{DELAY}/drift/" in h and h.endswith(".html") and "_evidently" not in h
    }
    page.close()
    page = browser.new_page(viewport={"width": 1600, "height": 900})
    page.goto(summary)
    page.screenshot(path=str(SHOTS / "drift_summary.png"))
    heading = page.locator("h1")
    assert "columns drifted" in heading.inner_text() and heading.bounding_box()["y"] < 200
    # Every row of the table, drifted ones first, within the first screen's reach: name, test, score, threshold.
    rows = page.eval_on_selector_all("table tr", "rs => rs.map(r => [...r.cells].map(c => c.innerText))")
    assert rows[0] == ["column", "test", "score", "threshold", "drifted"], rows[0]
    flags = [r[4] == "True" for r in rows[1:]]
    assert flags == sorted(flags, reverse=True) and len(flags) > 3, rows
    drifted = [r[0] for r in rows[1:] if r[4] == "True"]
    assert all(name in page.locator("#drifted").inner_text() for name in drifted)
    full = page.get_by_text("Evidently's full report").evaluate("a => a.href")
    with urllib.request.urlopen(full, timeout=30) as response:
        body = response.read()
    # Evidently's own page (served, and not the summary again).
    assert body.lstrip().lower().startswith(b"<!doctype html") and b"columns drifted" not in body
    page.close()


def test_profile_page_shows_distributions_and_correlations(browser, ui):
    page = _open(browser, ui, "profile/flights_profile", "profile")
    images = _loaded_images(page, ui["reports"])
    page.screenshot(path=str(SHOTS / "profile.png"), full_page=True)
    names = {Path(src).stem for src in images}
    assert {"histograms", "top_values", "target_correlation"} <= names, images
    assert "sampled_rows" in page.inner_text("body")
    page.close()
