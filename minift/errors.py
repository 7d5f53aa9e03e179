"""The base of every error minift raises on purpose, and how the command line reports it.

``minift.cli`` prints a ``MiniftError`` as one line (``minift: error: <message>``) and exits
with its ``exit_code``: 2 for input minift refuses (a config, data file, checkpoint or argument
the user can fix), 1 for a run that failed while running (non-finite loss, disk full). Anything
else is a bug and keeps its traceback. Nothing here imports the rest of minift.
"""
from __future__ import annotations


class MiniftError(Exception):
    """A refusal or failure whose message says what, where, and what to do."""

    exit_code = 1


class InputError(MiniftError, ValueError):
    """Input minift refuses: a config, data, checkpoint, tokenizer or argument (exit 2)."""

    exit_code = 2


class RunFailure(MiniftError, RuntimeError):
    """A run that started and could not go on (exit 1)."""

    exit_code = 1


class ResumeRefused(MiniftError, RuntimeError):
    """A checkpoint this run cannot continue from as configured (exit 2)."""

    exit_code = 2


class MissingFile(MiniftError, FileNotFoundError):
    """A file or directory the user named that does not exist (exit 2)."""

    exit_code = 2
