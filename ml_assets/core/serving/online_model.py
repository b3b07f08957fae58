"""The served model and its hot swap: `OnlineModel` is what one pipeline serves, the champion and the
lookups, replaced as one object when the registry's champion or a joined table changes (`refresh`, called
by a poller). A request reads that reference once, so a swap never fails a request in flight. The
warehouse is only ever touched by `refresh`, through short-lived connections that copy what they need and
close; with `bundles` set, never: `refresh` reads the published bundles' pointer (core.serving.bundle) and
loads a bundle when it moves.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ml_assets.core import registry
from ml_assets.core.errors import ArtifactError
from ml_assets.core.serving import bundle
from ml_assets.core.serving.batch_scores import score_frame
from ml_assets.core.serving.loader import ServableModel
from ml_assets.core.serving.lookups import Lookups, lookup_fingerprint
from ml_assets.core.serving.request_log import RequestLog
from ml_assets.core.serving.request_parsing import json_rows, not_servable_online, parse_rows, request_fields
from ml_assets.core.spec import ColumnSpec, PipelineSpec, SourceSpec
from ml_assets.core.store import Connect

log = logging.getLogger("ml_assets.serving")


@dataclass(frozen=True)
class Served:
    """One pipeline's champion and lookups: replaced whole, never changed in place."""

    version: str
    model: ServableModel
    lookups: Lookups
    loaded_at: dt.datetime
    # The bundle it came from (None: loaded from the warehouse).
    bundle: str | None = None


@dataclass
class OnlineModel:
    """What one pipeline serves, kept current by `refresh` (a poller calls it every few seconds)."""

    pipeline: PipelineSpec
    sources: Mapping[str, SourceSpec]
    # The warehouse; None when the model is served from `bundles`.
    connect: Connect | None
    served: Served | None = None
    # Why the latest champion is not what serves (none yet, its files fail their hash check, ...).
    problem: str | None = None
    last_refresh: dt.datetime | None = None
    log: RequestLog | None = None
    # When given, a cheap reading that changes whenever the warehouse does (store.change_marker): a poll
    # that finds it unchanged skips the connection and the queries.
    marker: Callable[[], Hashable] | None = None
    # A version served instead of the champion alias's: the skew check tests the one its run settled.
    pinned: str | None = None
    # The bundle root (core.serving.bundle): when set, what serves is the bundle its pointer names.
    bundles: Path | None = None
    _refused: str | None = None
    _seen: Hashable = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # The pipeline spec never changes under a served model: derived once, not on each poll or request.
    @cached_property
    def fields(self) -> dict[str, ColumnSpec]:
        return request_fields(self.pipeline, self.sources)

    @cached_property
    def offline_only(self) -> str | None:
        return not_servable_online(self.pipeline)

    def refresh(self) -> bool:
        """Load a new champion or new lookups if either changed; True when what serves changed. A
        champion whose files fail their hash check is refused once and the previous one kept serving."""
        if self.offline_only:
            self.problem = self.offline_only
            return False
        with self._lock:
            if self.bundles is not None:
                return self._refresh_bundle(self.bundles)
            # Read before the connection: a write committed during this refresh makes the next one look.
            marker = self.marker() if self.marker else None
            if marker is not None and marker == self._seen:
                self.last_refresh = dt.datetime.now(dt.UTC).replace(tzinfo=None)
                return False
            changed = self._refresh()
            self._seen = marker
            return changed

    def _refresh_bundle(self, root: Path) -> bool:
        """Load the bundle the pointer names if it moved; a broken bundle is refused once (logged) and
        the one loaded before keeps serving."""
        name = self.pipeline.name
        pointer = bundle.current(root, name)
        self.last_refresh = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        current = self.served
        if pointer is None:
            self.problem = f"{bundle.pipeline_folder(root, name) / bundle.POINTER}: no bundle published yet"
            return False
        if current is not None and pointer == current.bundle:
            self.problem = None  # back to what serves: an earlier refusal is history
            return False
        if pointer == self._refused:
            return False
        try:
            found = bundle.load(root, self.pipeline, dict(self.sources), pointer)
        except ArtifactError as exc:
            self._refused = pointer
            self.problem = f"bundle {pointer} refused: {exc}"
            kept = f"; {current.version} keeps serving" if current else ""
            log.warning("%s: %s%s", name, self.problem, kept)
            return False
        self.problem = None
        self.served = Served(found.manifest.version, found.model, found.lookups, self.last_refresh, pointer)
        return True

    def _refresh(self) -> bool:
        current = self.served
        assert self.connect is not None  # bundles unset: the warehouse is what serves
        with self.connect() as conn:
            version = self.pinned or registry.alias_version(conn, self.pipeline.name, registry.CHAMPION)
            if version is None:
                self.last_refresh = dt.datetime.now(dt.UTC).replace(tzinfo=None)
                self.problem = f"pipeline '{self.pipeline.name}' has no champion yet"
                return False
            if version != self._refused:
                self._refused = None  # the champion moved: a version refused before may be fixed now
            fresh = lookup_fingerprint(conn, self.pipeline)
            lookups = current.lookups if current and current.lookups.fingerprint == fresh else None
            if lookups is None:
                lookups = Lookups.copy(conn, self.pipeline, self.sources)
            found = (
                registry.registered(conn, version, self.pipeline.name)
                if version and version != self._refused and (current is None or version != current.version)
                else None
            )
        self.last_refresh = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        if current is not None and version == current.version:
            self.problem = None  # back to what serves: an earlier refusal is history
        model, served_version = (current.model, current.version) if current else (None, None)
        if found is not None:
            try:
                model, served_version = ServableModel.from_registry(found), version
                self.problem = None
            except ArtifactError as exc:
                self._refused = version
                self.problem = f"champion {version} refused: {exc}"
        if model is None or served_version is None or lookups is None:
            return False
        if current and current.version == served_version and current.lookups is lookups:
            return False
        self.served = Served(served_version, model, lookups, self.last_refresh)
        return True

    def predict(self, payload: Any) -> dict[str, Any]:
        """Scores of request rows (raises RequestError); names the version that answered."""
        served = self.served  # read once: a swap meanwhile does not touch this request
        if served is None:
            raise ArtifactError(self.problem or f"pipeline '{self.pipeline.name}': no model loaded yet")
        started = time.perf_counter()
        rows = parse_rows(self.fields, payload, self.pipeline.serving.max_batch)
        completed = served.lookups.complete(rows)
        scored = score_frame(served.model, self.pipeline, completed, served.version)
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        if self.log is not None:
            self.log.record(completed, scored, latency_ms)
        return {
            "pipeline": self.pipeline.name,
            "version": served.version,
            # Indexing, not drop: the same columns without a query.
            "predictions": json_rows(scored[[c for c in scored.columns if c != "version"]]),
            "latency_ms": latency_ms,
        }
