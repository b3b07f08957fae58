"""ml_assets: a Dagster-native ML platform."""

import os

# Offline machines: Evidently must not try to send usage telemetry.
os.environ.setdefault("DO_NOT_TRACK", "1")

__version__ = "0.1.0"
