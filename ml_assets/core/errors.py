"""The errors ml_assets raises on purpose.

`UserError` is a problem the user can fix (a pipeline file, a data file, a command's arguments, a
tampered artifact): its message names the file, the field or column, the rule and the value, and the
orchestration layer shows it as a clean, non-retriable failure. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class MlAssetsError(Exception):
    """Base of every error ml_assets raises on purpose."""


class UserError(MlAssetsError):
    """Something the user can fix; the message says what and where."""


class ConfigError(UserError):
    """A pipeline file is invalid. The message names the file, the field and what was expected."""


class SourceError(UserError):
    """A source cannot be read. The message names the source, the file and the problem."""


class RejectedFile(SourceError):
    """One file of a source is unusable; the landing zone's ledger records it as rejected."""

    def __init__(self, message: str, path: object, sha256: str) -> None:
        super().__init__(message)
        self.path = path
        self.sha256 = sha256

    def ledger_row(self) -> dict[str, object]:
        return {"file": str(self.path), "sha256": self.sha256, "status": "rejected", "reason": str(self)}


class ValidationFailure(UserError):
    """The raw data cannot be validated at all (e.g. a required column is missing)."""


class DatasetError(UserError):
    """The modelling table, its features or its splits cannot be built as configured."""


class ArtifactError(UserError):
    """A model version is unknown, belongs elsewhere, or its files do not match their recorded hashes."""


class UsageError(UserError):
    """A command's arguments are wrong: an unknown pipeline, column or option value."""


class StoreError(UserError):
    """The data directory's tables cannot be used by this version of ml_assets (and what to do)."""


class Problems(UserError):
    """Several problems found at once (`ml-assets validate`); the CLI prints one per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
