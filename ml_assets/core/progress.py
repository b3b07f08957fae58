"""How a long core step reports progress without knowing who listens: a callable taking one line (the
orchestration layer passes its run log's `info`, so the step's log in the UI moves while it runs)."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str], None]


def silent(message: str) -> None:
    """Nobody listens (the default)."""
    return None
