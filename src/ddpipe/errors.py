"""Errors that ddpipe reports to its user as one line.

Every failure caused by the user's input (config, data, checkpoint, store) is a
``DDPipeError``: the CLI prints ``ddpipe: error: <message>`` and exits non-zero,
without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (at most ``limit`` characters), for a one-line error."""
    return (str(e).splitlines() or [""])[0][:limit]


class DDPipeError(Exception):
    """Base class: an expected failure with a message fit for the user."""

    exit_code = 2


class ConfigError(DDPipeError):
    """A config field is missing, unknown or has an invalid value."""


class DatasetNotFoundError(DDPipeError):
    """The dataset files are not where the config says."""


class DataError(DDPipeError):
    """The dataset exists but cannot be used (corrupt file, too few images, ...)."""


class ClassMapMismatchError(DDPipeError):
    """A teacher checkpoint was trained on another class map than the data's."""


class CheckpointError(DDPipeError):
    """A checkpoint or another stored torch file (statistics, diffusion state) is missing or unreadable."""


class TeacherError(DDPipeError):
    """The teacher is not good enough to distill with (below teacher.min_val_accuracy)."""


class StoreError(DDPipeError):
    """The store URI cannot be read or written."""


class ValidationError(DDPipeError):
    """A stage output failed validation (hash, size, row count)."""


class ServerError(DDPipeError):
    """The temporary Prefect server of a run did not start."""
