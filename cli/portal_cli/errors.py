"""Exit codes and the one error type every command turns into a single line on stderr."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What ``portal`` exits with; the README and ``portal --help`` list the same."""

    OK = 0
    INPUT = 1
    """The portal (a 4xx other than 401/403) or the CLI itself refused the input."""
    USAGE = 2
    """Wrong options or arguments (Click's own code)."""
    AUTH = 3
    """Not logged in, the login expired or was revoked, a refused API key, or 403."""
    UNAVAILABLE = 4
    """The portal cannot be reached, timed out, or answered 5xx."""
    INTERRUPTED = 130
    """Ctrl-C (128 + SIGINT, as shells report it)."""
    TERMINATED = 143
    """SIGTERM (128 + SIGTERM), once the temporary zip is deleted."""


class PortalError(Exception):
    """A failure to show as one line, and the exit code it ends the command with."""

    def __init__(self, message: str, code: ExitCode = ExitCode.INPUT) -> None:
        # One line whatever the API sent: a multi-line detail would break `2>err.log` greps.
        super().__init__(" ".join(message.split()))
        self.message = " ".join(message.split())
        self.code = code


class Forbidden(PortalError):
    """The portal's 403: the credential is valid but may not do this (an API key without the
    scope the request needs). Exit 3, as any 401 or 403."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ExitCode.AUTH)


class Terminated(SystemExit):
    """SIGTERM (a kill) or SIGHUP (a closed terminal): the command ends with 128 + the signal,
    unwinding as it goes (the temporary zip is deleted), and a batch says how to go on."""
