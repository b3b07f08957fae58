"""Crash safety of the registry: kill -9 while versions are written, registered and promoted."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import pytest

from ml_assets.core import registry
from ml_assets.core.store import connect, warehouse_path
from ml_assets_tests.conftest import materialize_all
from ml_assets_tests.helpers import (
    FLAGSHIP,
    FLAGSHIP_MODEL,
    assert_registry_consistent,
    gate_chooses_champion,
)

# Registers copies of a real version and makes each champion, as fast as it can, until killed.
WRITER = """
import itertools, sys
from pathlib import Path
from ml_assets.core import registry
from ml_assets.core.store import connect
db, source = sys.argv[1], Path(sys.argv[2])
manifest = registry.read_manifest(source)
for i in itertools.count():
    version = registry.new_version_id()
    files = {name: source / name for name in manifest.files}
    folder = registry.write_version(source.parent.parent, "flight_delay", version, files, manifest.model_copy(update={"version": version}))
    with connect(db) as conn:
        registry.register(conn, folder)
        registry.record_decision(conn, "flight_delay", "promote", f"crash test {i}", version, version)
    print(i, flush=True)
"""


def test_kill_9_during_registration_and_alias_moves_leaves_a_loadable_champion(sample_project):
    pipelines, root = sample_project
    assert materialize_all(pipelines, root, selection=FLAGSHIP_MODEL).success
    first = gate_chooses_champion(pipelines, root).champion
    with connect(warehouse_path(root)) as conn:
        source = registry.version_dir(conn, first)
    rng = random.Random(0)
    champions = []
    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(warehouse_path(root)), str(source)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(rng.randint(1, 3)):  # let it get going, then kill it at a random moment
            assert proc.stdout.readline(), "the writer died on its own"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        champions.append(assert_registry_consistent(root))
    assert len(set(champions)) > 1
    # The next run recovers: it trains, registers and judges a new version as usual.
    assert materialize_all(pipelines, root, selection=FLAGSHIP).success
    assert_registry_consistent(root)
    assert not list((root / "models" / "flight_delay").glob(".tmp-*"))


def test_an_alias_cannot_point_at_an_unregistered_version(tmp_path):
    with (
        connect(tmp_path / "w.duckdb") as conn,
        pytest.raises(registry.ArtifactError, match="not registered"),
    ):
        registry.record_decision(conn, "p", "promote", "test", "v-missing", "v-missing")
    with connect(tmp_path / "w.duckdb") as conn:
        assert registry.alias_version(conn, "p", registry.CHAMPION) is None
        assert registry.decisions(conn, "p").height == 0
