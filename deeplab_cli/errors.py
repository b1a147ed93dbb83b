"""Errors a user can cause: the CLI prints them as one line and exits with their code, never a traceback."""

from __future__ import annotations


class DeeplabError(Exception):
    """A failure caused by what the user gave us (a bad file, wrong weights): exit code 1."""

    exit_code = 1


class UsageError(DeeplabError):
    """A wrong invocation (missing file, impossible option value): exit code 2."""

    exit_code = 2
