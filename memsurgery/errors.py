"""User-facing error types.

Every failure a user can cause is raised as one of these; the CLI turns it into
one line on stderr and an exit code (2 = bad input or usage, 1 = runtime
failure). Library callers can catch them like any exception.
"""

from __future__ import annotations


class MemsurgeryError(Exception):
    """Base class: `str(err)` is the complete one-line message."""

    exit_code = 1


class InputError(MemsurgeryError):
    """The user gave us something we cannot use (path, file, flag value)."""

    exit_code = 2


class UsageError(InputError):
    """A flag or argument combination that makes no sense."""


class RuntimeFailure(MemsurgeryError):
    """Something went wrong while doing valid work (out of memory, I/O, ...)."""

    exit_code = 1


class MissingDependency(RuntimeFailure):
    """An optional dependency is not installed; the message names the extra."""

    exit_code = 1


class BackendUnavailable(RuntimeFailure, RuntimeError):
    """A kernel backend cannot run here (triton missing, or CPU tensors without
    TRITON_INTERPRET=1). A RuntimeError for plain-Python callers, a RuntimeFailure
    (exit 1, one line) for the CLI. Raised by memsurgery.ops."""


def one_line(message: str) -> str:
    """Collapse a message to a single line so stderr stays one line."""
    return " ".join(str(message).split())
