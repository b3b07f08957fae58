"""How the core's errors surface in Dagster: a user's problem is a clean, non-retriable failure with our
message; anything else is a bug and keeps its traceback."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import dagster as dg

from ml_assets.core.errors import UserError

T = TypeVar("T")


def user_errors_as_failures(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except UserError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
