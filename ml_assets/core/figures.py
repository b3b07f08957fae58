"""PNG figures of the monitors (drift scores per column, real metric per period) and the figure helpers
every report shares.

Figures are files beside their HTML report, so the Dagster UI can show them by URL (see report_server)
and a report can embed them.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import polars as pl

# The object-oriented Figure API needs no pyplot state or display: safe in headless workers and threads.
from matplotlib.figure import Figure

MODEL_COLOUR, BASELINE_COLOUR, ALERT_COLOUR = "#4c72b0", "#999999", "#c44e52"


def axes(width: float = 5, height: float = 4, ncols: int = 1) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots(1, ncols)


def save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def html_table(frame: pl.DataFrame) -> str:
    """A frame as an HTML table for a report page, every cell escaped."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in row) + "</tr>"
        for row in frame.iter_rows()
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def drift_scores(columns: list[tuple[str, float, float, bool]], path: Path, top: int = 25) -> Path:
    """Horizontal bars of (column, score, threshold, drifted), each with its threshold, drifted first and
    then highest first: the drifted columns are the first thing seen (Evidently's own report lists them
    mid-page), also a low score over a low threshold."""
    shown = sorted(columns, key=lambda c: (not c[3], -c[1]))[:top][::-1]
    fig, ax = axes(5, 0.28 * len(shown) + 1.2)
    names = [c[0] for c in shown]
    ax.barh(names, [c[1] for c in shown], color=[ALERT_COLOUR if c[3] else MODEL_COLOUR for c in shown])
    ax.scatter([c[2] for c in shown], names, marker="|", s=200, color="k", label="threshold", zorder=3)
    drifted = sum(c[3] for c in columns)
    ax.set(xlabel="drift score", title=f"Drift per column: {drifted} of {len(columns)} drifted (red)")
    ax.legend(loc="lower right")
    return save(fig, path)


def performance_over_time(periods: pl.DataFrame, expected: float, metric: str, path: Path) -> Path:
    """The champion's real metric per period against the test score it was promoted on; degraded periods
    in red, periods not judged hollow."""
    fig, ax = axes(5.5, 3.5)
    x = periods.get_column("period_start").to_list()
    ax.plot(x, periods.get_column("score").to_list(), color=MODEL_COLOUR, marker="o", ms=3, label="real")
    ax.axhline(expected, color=BASELINE_COLOUR, ls="--", lw=1, label=f"test score {expected:.3f}")
    for flag, style in ((True, {"color": ALERT_COLOUR}), (None, {"facecolors": "none", "edgecolors": "k"})):
        part = periods.filter(pl.col("degraded").is_null() if flag is None else pl.col("degraded"))
        if part.height:
            label = "degraded" if flag else "not judged"
            ax.scatter(part.get_column("period_start"), part.get_column("score"), s=30, label=label, **style)
    ax.set(ylabel=metric, title=f"Champion's real {metric} per period")
    ax.legend(fontsize=8)
    fig.autofmt_xdate()
    return save(fig, path)


def versions_over_time(history: pl.DataFrame, metric: str, path: Path) -> Path:
    """Each version's test score next to its baseline's, oldest first: whether retraining still pays."""
    shown = history.sort("created_at").tail(30)
    fig, ax = axes(5, 3)
    x = list(range(1, shown.height + 1))
    ax.plot(x, shown.get_column("test_score").to_list(), marker="o", color=MODEL_COLOUR, label="model")
    baseline = shown.get_column("baseline_test_score").to_list()
    ax.plot(x, baseline, marker=".", ls="--", color=BASELINE_COLOUR, label="baseline")
    ax.set(xlabel="version (oldest first)", ylabel=f"test {metric}", title=f"Test {metric} by version")
    ax.set_xticks(x)
    ax.legend(fontsize=8)
    return save(fig, path)
