"""Error taxonomy: each class says what the operator should do, and carries the exit code the CLI uses.

Messages never contain patient data (names, MRNs, notes, identifier values, request bodies).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Documented process exit codes (sysexits-style), stable for cron/systemd/Kubernetes alerting."""

    OK = 0
    UNEXPECTED = 1
    USAGE = 2
    RECORDS_REJECTED = 65  # EX_DATAERR: some rows rejected, quarantined or sent to review; the rest landed
    SERVER_UNAVAILABLE = 69  # EX_UNAVAILABLE: server unreachable or retries exhausted; pending work kept
    LOCK_HELD = 75  # EX_TEMPFAIL: another sync holds the ledger lock; try again later
    AUTH_FAILED = 77  # EX_NOPERM: 401/403, token endpoint refused us, or granted scopes too narrow
    CONFIG_ERROR = 78  # EX_CONFIG: bad configuration or mapping profile


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


class ServerAnswerError(ServerUnavailableError):
    """The server answered, but not as a FHIR server does: a redirect, an HTML page, an empty or non-FHIR body.
    Nothing is taken as written; the records stay pending (exit 69) until the server answers properly."""


class RunDeadlineError(ServerUnavailableError):
    """The run reached its deadline (``sync.run_deadline_seconds``); unsent records stay pending (exit 69)."""
