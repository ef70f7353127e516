"""The errors a user sees as one line. Every one derives from :class:`UserError`, whose class
carries the CLI's exit code; ``cli`` catches the base once and prints the message.

* :class:`ConfigError` (exit 2): an unknown or invalid option, or an input that cannot be used;
* :class:`CheckpointError` (exit 2): a checkpoint, weights file or model folder that cannot be used;
* :class:`ManifestError` (exit 2): a latent dataset without a usable manifest;
* :class:`JobFailed` (exit 1): a job that ran but did not do its work.
"""

from __future__ import annotations


class UserError(Exception):
    """An error whose message is the whole story for the user: printed as one line, no traceback
    (unless ``--verbose``), and the process exits with :attr:`exit_code`."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """An unknown or invalid option, or an input that cannot be used; the message names it."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used: missing, of another kind or version, or damaged."""


class ManifestError(UserError, ValueError):
    """A latent dataset without a usable manifest."""


class JobFailed(UserError, RuntimeError):
    """A job that ran but did not do its work: nothing written, or too many inputs failed.
    What it did write is kept; the CLI exits non-zero with this one line."""

    exit_code = 1


USER_ERRORS: tuple[type[UserError], ...] = (ConfigError, CheckpointError, ManifestError, JobFailed)
