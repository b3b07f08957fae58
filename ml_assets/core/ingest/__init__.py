"""Ingestion: sources (files, landing zone, database, HTTP) loaded unchanged into `raw.<source>`.

`files` reads and checks file batches, `database` and `http` read remote rows, `window` says which rows
a run covers, `raw` writes them atomically, `ledger` records the landing zone's files, and `replay`
drops recorded history into a landing zone as if it arrived over time.
"""

from ml_assets.core.errors import RejectedFile, SourceError
from ml_assets.core.ingest.batch import Batch
from ml_assets.core.ingest.files import (
    PKG_SCHEME,
    landing_dir,
    package_file,
    read_file,
    read_files,
    resolve_files,
)
from ml_assets.core.ingest.ledger import (
    changed_after_load,
    ledger,
    ledger_names,
    loaded_outside,
    record_files,
    rejected_sha256,
)
from ml_assets.core.ingest.raw import IngestResult, load_raw, read_remote, watermark
from ml_assets.core.ingest.window import TimeWindow, event_time_sql, window_condition

__all__ = [
    "PKG_SCHEME",
    "Batch",
    "IngestResult",
    "RejectedFile",
    "SourceError",
    "TimeWindow",
    "changed_after_load",
    "event_time_sql",
    "landing_dir",
    "ledger",
    "ledger_names",
    "load_raw",
    "loaded_outside",
    "package_file",
    "read_file",
    "read_files",
    "record_files",
    "rejected_sha256",
    "read_remote",
    "resolve_files",
    "watermark",
    "window_condition",
]
