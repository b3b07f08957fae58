"""The hand-off after `<pipeline>/champion`: the version it settled, passed along the lineage as its value.

The champion asset is the one step that reads the champion alias (and may roll it back). What it settled
is its output, stored as JSON by `HandOffStore`, and every asset and check after it takes that value as
an input, so a rollback or promotion by another run between `champion` and `drift_report` does not change
what this run's drift, performance, batch scores and skew check judge.

Each run's value is kept under its run id: Dagster hands a step the value of the upstream step of the same
run (or, for a re-execution, of the run that produced it). An asset materialized without `champion` in its
run gets the value the champion asset settled last, as Dagster's own file IO manager would.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
from pydantic import BaseModel, ConfigDict

LATEST = "latest"


class SettledChampion(BaseModel):
    """What a champion step settled: the version that serves after its rollback check (None: no champion
    yet), and the run that settled it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pipeline: str
    version: str | None
    run_id: str


def settled_in(pipeline: str) -> dict[str, dg.AssetIn]:
    """A pipeline's champion asset as the input `champion` of an asset after it."""
    return {"champion": dg.AssetIn(key=dg.AssetKey([pipeline, "champion"]))}


class HandOffStore(dg.ConfigurableIOManager):
    """Keeps each settled champion as `<root>/<asset key>/<run id>.json` and the newest as `latest.json`."""

    root: str

    def _folder(self, key: dg.AssetKey) -> Path:
        return Path(self.root).joinpath(*key.path)

    def handle_output(self, context: dg.OutputContext, obj: SettledChampion) -> None:
        folder = self._folder(context.asset_key)
        folder.mkdir(parents=True, exist_ok=True)
        content = obj.model_dump_json()
        for name in (context.run_id, LATEST):
            # Renamed into place: a reader never sees half a file.
            tmp = folder / f".{name}.{os.getpid()}.tmp"
            tmp.write_text(content)
            tmp.replace(folder / f"{name}.json")

    def load_input(self, context: dg.InputContext) -> SettledChampion:
        folder = self._folder(context.asset_key)
        upstream = context.upstream_output
        produced = folder / f"{upstream.run_id}.json" if upstream is not None else None
        path = produced if produced is not None and produced.exists() else folder / f"{LATEST}.json"
        if not path.exists():
            raise dg.Failure(
                description=f"{context.asset_key.to_user_string()} has not been materialized yet: materialize "
                "it first (it settles the champion every later step judges)",
                allow_retries=False,
            )
        return SettledChampion.model_validate_json(path.read_text())
