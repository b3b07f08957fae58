"""Content fingerprints: files by sha256 (landing files, model artifacts), frames by their values."""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def frame_fingerprint(frame: pl.DataFrame) -> str:
    """The sha256 of a frame's schema and its rows' values, in order. Not of its Arrow bytes: those follow
    how the frame was read (its chunks, its string buffers), so the same rows read from a DuckDB file and
    from DuckLake's Parquet files hashed apart. Row hashes are Polars' own, stable within one version of
    Polars (a Polars upgrade changes fingerprints of new versions, not whether two runs agree)."""
    digest = hashlib.sha256(repr(frame.schema).encode())
    digest.update(frame.hash_rows(seed=0, seed_1=1, seed_2=2, seed_3=3).to_numpy().tobytes())
    return digest.hexdigest()
