"""Error taxonomy: each class says what the operator should do, and carries the exit code the CLI uses.

Messages never contain patient data (names, MRNs, notes, identifier values, request bodies).
"""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    """Documented process exit codes (sysexits-style), stable for cron/systemd/Kubernetes alerting."""

    OK = 0
    UNEXPECTED = 1
    USAGE = 2
    RECORDS_REJECTED = 65  # EX_DATAERR: some rows rejected, quarantined or sent to review; the rest landed
    SERVER_UNAVAILABLE = 69  # EX_UNAVAILABLE: server unreachable or retries exhausted; pending work kept
    LOCK_HELD = 75  # EX_TEMPFAIL: another sync holds the ledger lock; try again later
    SERVER_REFUSES_TYPES = 76  # partial: the server refuses writes of some resource types (parked); the rest landed
    AUTH_FAILED = 77  # EX_NOPERM: 401/403, token endpoint refused us, or granted scopes too narrow
    CONFIG_ERROR = 78  # EX_CONFIG: bad configuration or mapping profile


# What the FHIR client decided about a refused request (the values of connector.server.client.Action) and the
# exit code that decision means for a command: the one place where an HTTP answer becomes an exit code.
ACTION_EXIT_CODES: dict[str, ExitCode] = {
    "retry-later": ExitCode.SERVER_UNAVAILABLE,  # 429/5xx after the retries: the next run tries again
    "conflict": ExitCode.SERVER_UNAVAILABLE,  # 409 version conflict: transient, the next run tries again
    "isolate": ExitCode.RECORDS_REJECTED,  # 400/404/422...: the server refused the content of the request
    "review": ExitCode.RECORDS_REJECTED,  # 412 duplicates on the server: a person must look
    "auth": ExitCode.AUTH_FAILED,  # 401/403
    "fatal": ExitCode.CONFIG_ERROR,  # 405/501: the server cannot do this at all; its setup or ours must change
}


def exit_code_for_action(action: str) -> ExitCode:
    """The exit code for a request the server refused, from the client's action for it (see ACTION_EXIT_CODES)."""
    return ACTION_EXIT_CODES.get(str(action), ExitCode.UNEXPECTED)


class PeersyncError(Exception):
    """Root of all peersync errors."""

    exit_code: ExitCode = ExitCode.UNEXPECTED


class ConfigError(PeersyncError):
    """The configuration or a mapping profile is wrong; a person must fix it before the next run."""

    exit_code = ExitCode.CONFIG_ERROR


class ProfileError(ConfigError):
    """A mapping profile is invalid."""


class AuthError(PeersyncError):
    """Authentication or authorization failed (bad credentials, refused token, missing scopes)."""

    exit_code = ExitCode.AUTH_FAILED
    # The FHIR server's refusal (a connector.server.client.FhirHttpError) when the error is its 401/403: the
    # writer tells a type the server does not accept from a missing scope.
    http_error: object | None = None


class TransportError(ConfigError):
    """The transport settings are unsafe (plain http to a remote host, token to a foreign host)."""


class ServerUnavailableError(PeersyncError):
    """The FHIR server could not be reached, or kept failing after the retry budget was spent."""

    exit_code = ExitCode.SERVER_UNAVAILABLE


class LockHeldError(PeersyncError):
    """Another peersync process holds the ledger lock."""

    exit_code = ExitCode.LOCK_HELD


class LedgerError(PeersyncError):
    """The local state ledger is unreadable, corrupt, or cannot be written."""

    exit_code = ExitCode.CONFIG_ERROR


class InputError(PeersyncError):
    """An input file cannot be read at all (missing, unreadable, wrong format)."""

    exit_code = ExitCode.CONFIG_ERROR


# The fix for a path this user cannot create or write: the same advice from `config check`, `doctor` and a run.
WRITE_ACCESS_FIX = ("give the peersync user write access to it (chown/chmod; systemd: StateDirectory= or "
                    "ReadWritePaths=; Kubernetes: a writable PersistentVolumeClaim)")


def path_error_message(exc: OSError) -> str:
    """What went wrong with a file or folder, and the fix, from an OSError that names a path (no file contents)."""
    path = Path(str(exc.filename))
    reason = exc.strerror or type(exc).__name__
    if isinstance(exc, PermissionError):
        return (f"{path}: {reason}: give the peersync user access to it (chown/chmod; systemd: ReadWritePaths=), "
                "or choose another path")
    if isinstance(exc, FileNotFoundError):
        return f"{path}: {reason}: check the path"
    return f"{path}: {reason}: check the path and the free disk space"


class ServerAnswerError(ServerUnavailableError):
    """The server answered, but not as a FHIR server does: a redirect, an HTML page, an empty or non-FHIR body.
    Nothing is taken as written; the records stay pending (exit 69) until the server answers properly."""


class RunDeadlineError(ServerUnavailableError):
    """The run reached its deadline (``sync.run_deadline_seconds``); unsent records stay pending (exit 69)."""
