"""The asset keys of a source's layers: `<layer>/<source>_<layer>` (`raw/flights_raw`,
`validated/flights_validated`, `quarantine/flights_quarantine`, `profile/flights_profile`).

The asset graph shows only a key's last part, so that part names the layer too: `flights` four times
would not tell the raw table from its profile. Only the keys carry the suffix; the DuckDB tables stay
`raw.flights`, `validated.flights`, `quarantine.flights`.
"""

from __future__ import annotations

from typing import Literal

import dagster as dg

Layer = Literal["raw", "validated", "quarantine", "profile"]
TABLE_LAYERS: tuple[Layer, ...] = ("raw", "validated", "quarantine")


def layer_key(layer: Layer, source: str) -> dg.AssetKey:
    return dg.AssetKey([layer, f"{source}_{layer}"])


def source_keys(source: str) -> list[dg.AssetKey]:
    """The raw, validated and quarantine keys of a source, in that order."""
    return [layer_key(layer, source) for layer in TABLE_LAYERS]
