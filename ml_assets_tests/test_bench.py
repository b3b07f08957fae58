"""The benchmarks keep working and keep their output contract (slow: `make test-slow`)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from ml_assets.core.spec.load import load_project

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_drift_bench_agrees_with_full_evidently():
    out = (
        subprocess.run(
            [sys.executable, str(ROOT / "bench" / "drift.py"), "--quick"],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        .stdout.strip()
        .splitlines()
    )
    last = re.fullmatch(r"drift_speedup=([\d.]+) verdict_agreement=([\d.]+)", out[-1])
    assert last, out[-1]
    assert float(last.group(2)) == 1.0
    assert float(last.group(1)) > 1.0
    detected, injected = map(int, re.search(r"injected_shifts_detected=(\d+)/(\d+)", out[-2]).groups())
    assert detected == injected > 0


def _bench_module(name: str):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_scale_generator_fits_the_flagship_config_and_carries_signal(tmp_path):
    scalegen = _bench_module("scalegen")
    held = scalegen.write_landing(tmp_path, 20_000, years=1, seed=3, hold_back_last_day=True)
    project = load_project(scalegen.write_pipelines(tmp_path / "pipelines", years=1, max_trials=1))
    sources = project.sources
    flights = pl.concat(pl.read_csv(p, infer_schema=False) for p in (tmp_path / "landing/flights").iterdir())
    weather = pl.read_csv(held["weather"][0], infer_schema=False)
    assert flights.columns == list(sources["flights"].columns)
    assert weather.columns == list(sources["weather"].columns)
    # Held back: exactly the last local day, which the landing zone does not hold.
    last = pl.read_csv(held["flights"][0], infer_schema=False)
    assert set(zip(last["month"], last["day"], strict=True)) == {("12", "31")}
    assert not flights.filter(pl.col("month") == "12", pl.col("day") == "31").height
    assert flights.select(sources["flights"].id).is_duplicated().sum() == 0
    assert set(flights["origin"]) == {"EWR", "JFK", "LGA"}
    typed = flights.with_columns(pl.col("arr_delay", "hour").replace("NA", None).cast(pl.Float64))
    late = (typed["arr_delay"] >= 15).mean()
    by_hour = typed.group_by(pl.col("hour") >= 17).agg((pl.col("arr_delay") >= 15).mean().alias("late"))
    evening, morning = by_hour.sort("hour", descending=True)["late"]
    assert 0.1 < late < 0.5 and evening > morning + 0.05
    # The same seed gives the same data; another seed other data.
    again = scalegen.generate(2_000, years=1, seed=3)[0]
    assert again.equals(scalegen.generate(2_000, years=1, seed=3)[0])
    assert not again.equals(scalegen.generate(2_000, years=1, seed=4)[0])


@pytest.mark.slow
def test_quick_scale_bench_prints_its_line_and_both_sides_agree():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scale.py"), "--quick", "--max-trials", "1"],
        capture_output=True,
        text=True,
        timeout=1800,
        check=True,
    ).stdout.strip()
    *_, size, last = out.splitlines()
    number = r"(nan|[\d.]+)"
    fields = ("scale_ratio_1m", "scale_ratio_10m", "rss_10m_gib", "growth_10m_over_1m", "incremental_share")
    assert re.fullmatch(" ".join(f"{f}={number}" for f in fields), last), last
    measured = dict(pair.split("=") for pair in size.split())
    assert measured["rows"] == "200000"
    # Same modelling table, features, model scores and batch scores on both sides.
    assert measured["same_outputs"] == "True"
    assert float(measured["rss_gib"]) > 0 and float(measured["incremental_share"]) > 0


@pytest.mark.slow
def test_cluster_bench_on_three_weeks_prints_its_ratios():
    """bench/cluster.py on three weeks of flights (local, then the cluster with 1 and 2 workers, each
    a whole flagship run, and the bookkeeping runs): several minutes, hence slow."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cluster.py"), "--until", "2013-01-22", "--max-trials", "1"]
        + ["--partitions", "20"],
        capture_output=True,
        text=True,
        timeout=3600,
        check=True,
    ).stdout.strip()
    lines = out.splitlines()
    number = r"[\d.]+"
    fields = ("cluster1_vs_local", "cluster2_vs_cluster1", "partitions_pg_vs_sqlite")
    assert re.fullmatch(" ".join(f"{f}={number}" for f in fields), lines[-1]), lines[-1]
    for side in ("local", "cluster1", "cluster2"):
        (line,) = [x for x in lines if x.startswith(f"{side}: ")]
        rates = re.search(r"ingest (\d+) rows/s, training (\d+) rows/s", line)
        assert rates and all(int(r) > 0 for r in rates.groups()), line


@pytest.mark.slow
def test_quick_tuning_bench_prints_both_methods_and_a_verdict(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.tuning",
            "--datasets",
            "breast_cancer",
            "--budget",
            "3",
            "--repeats",
            "1",
            "--keep",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
        cwd=ROOT,
    ).stdout.strip()
    *runs, verdict, last = out.splitlines()
    assert re.fullmatch(r"optuna_wins_or_ties=[01]/1", last), last
    assert re.search(
        r"^breast_cancer: roc_auc random=0\.\d+ optuna=0\.\d+ .* verdict=(optuna|random|tie)$", verdict
    )
    searched = [line.split(":")[0].split()[-1] for line in runs if line.startswith("  repeat 0")]
    assert searched == ["random", "optuna"], out
