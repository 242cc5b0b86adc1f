"""The error vocabulary shared by every module, mapped to exit statuses in one place."""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_USAGE = 2


class RelrobustError(Exception):
    """Base class: a problem the user can fix, reported as one clear message."""

    exit_status = EXIT_USAGE


class InputError(RelrobustError):
    """A model, data file or option that cannot be used as given (exit status 2)."""


class UnsupportedModelError(InputError):
    """The model uses an operator or shape the tool cannot handle; names the operator and node."""
