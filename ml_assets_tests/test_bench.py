"""The benchmarks keep working and keep their output contract (slow: `make test-slow`)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

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
