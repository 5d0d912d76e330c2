"""Errors a user can act on: each says what was expected, what was seen, and the fix."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class MoekitError(Exception):
    """Base error; `str(err)` is a one-line message meant for the user."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ModelSourceError(MoekitError):
    """The model folder or Hub repo could not be found or is incomplete."""


class UnsupportedModelError(MoekitError):
    """No family record matches the checkpoint's config."""


class CheckpointError(MoekitError):
    """The safetensors files or their index are inconsistent or corrupt."""


class OutputExistsError(MoekitError):
    """The output folder exists and is not empty."""


class DiskFullError(MoekitError):
    """The output's file system ran out of space (or quota) while the output was written."""


class InvalidArgumentError(MoekitError):
    """An option value is out of range or inconsistent with the model."""


class DataError(MoekitError):
    """Calibration or evaluation data is missing, empty or malformed."""


class StatsError(MoekitError):
    """Routing statistics are missing, malformed, or belong to another model."""


class UnsafeCheckpointError(MoekitError):
    """Loading the checkpoint would run code it ships, and the user did not allow it."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: handled like Ctrl-C (cleanup, one line, exit 128 + signal)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def transformers_load_errors(path: object) -> Iterator[None]:
    """Turn transformers' "weights do not fit the model" errors (which point at a load report
    moekit keeps quiet) into one CheckpointError that stands on its own."""
    try:
        yield
    except RuntimeError as err:
        text = str(err)
        if not any(s in text for s in ("above report", "size mismatch", "loading state_dict")):
            raise
        raise CheckpointError(
            f"transformers cannot load {path}: its tensors do not fit the model its config.json "
            "describes (shapes or names differ)",
            "compare config.json with the tensors (moekit inspect), or re-download") from err


class DistributedError(MoekitError):
    """A rank of a torchrun run failed, or the ranks could not be set up or reached."""
