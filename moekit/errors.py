"""Errors a user can act on: each says what was expected, what was seen, and the fix."""

from __future__ import annotations


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


class InvalidArgumentError(MoekitError):
    """An option value is out of range or inconsistent with the model."""


class DataError(MoekitError):
    """Calibration or evaluation data is missing, empty or malformed."""


class StatsError(MoekitError):
    """Routing statistics are missing, malformed, or belong to another model."""


class DistributedError(MoekitError):
    """A rank of a torchrun run failed, or the ranks could not be set up or reached."""
