"""The errors a user sees as one line (the CLI turns each into a message and an exit code)."""

from __future__ import annotations


class ConfigError(ValueError):
    """An unknown or invalid option, or an input that cannot be used; the message names it."""


class JobFailed(RuntimeError):
    """A job that ran but did not do its work: nothing written, or too many inputs failed.
    What it did write is kept; the CLI exits non-zero with this one line."""
