"""Errors a user can cause or fix. Each carries one clear sentence and an exit code.

Exit codes (documented in the README):
  0 success, 1 other error, 2 bad usage or bad input, 3 needs root, 4 database problem,
  5 kernel/BPF problem, 6 another run holds the lock, 7 missing dependency (tshark, BCC, headers),
  141 the output pipe was closed (``status | head``): the rest of the output is dropped quietly, as a
  process killed by SIGPIPE exits (128 + 13), so a ``set -o pipefail`` script sees it like any tool's.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_ROOT = 3
EXIT_DB = 4
EXIT_BPF = 5
EXIT_LOCKED = 6
EXIT_DEPENDENCY = 7
EXIT_PIPE = 141


class PortwatchError(Exception):
    """An error with a message meant for the user (one sentence) and an exit code."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(PortwatchError):
    exit_code = EXIT_USAGE


class NeedsRootError(PortwatchError):
    exit_code = EXIT_ROOT


class DatabaseError(PortwatchError):
    exit_code = EXIT_DB


class BpfError(PortwatchError):
    exit_code = EXIT_BPF


class LockedError(PortwatchError):
    exit_code = EXIT_LOCKED


class DependencyError(PortwatchError):
    exit_code = EXIT_DEPENDENCY
