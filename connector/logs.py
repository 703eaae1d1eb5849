"""Logging: stderr only, human text on a terminal or JSON lines, a run id on every line, no patient data.

Library code logs metadata only: counts, opaque record keys, resource types, HTTP status codes and
OperationOutcome codes. It never passes names, MRNs, notes, identifier values or request/response bodies
to a logger. As a second line of defence, :class:`RedactingFilter` masks values registered as sensitive
(e.g. secrets) if they ever reach a log record.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

RUN_ID: contextvars.ContextVar[str] = contextvars.ContextVar("peersync_run_id", default="-")
_SECRETS: set[str] = set()

# Extra attributes a log call may carry (``logger.info(..., extra={"counts": {...}})``).
_EXTRA_FIELDS = ("event", "key", "kind", "resource_type", "status", "counts", "attempt", "outcome", "code",
                 "duration_s", "participant_key", "path")


def new_run_id() -> str:
    """Start a run: a fresh id that every following log line carries."""
    run_id = uuid.uuid4().hex[:12]
    RUN_ID.set(run_id)
    return run_id


def register_secret(value: str | None) -> None:
    """Mask this value wherever it might appear in a log line (tokens, client secrets)."""
    if value and len(value) >= 6:
        _SECRETS.add(value)


class RedactingFilter(logging.Filter):
    """Adds the run id and masks registered secrets in the rendered message."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.run_id = RUN_ID.get()
        if _SECRETS:
            message = record.getMessage()
            for secret in _SECRETS:
                if secret in message:
                    message = message.replace(secret, "***")
            record.msg, record.args = message, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, run_id, message and known extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "run_id": getattr(record, "run_id", "-"),
            "message": record.getMessage(),
        }
        for name in _EXTRA_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info and record.exc_info[0] is not None:
            entry["error_type"] = record.exc_info[0].__name__
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Readable lines for a terminal: ``12:00:01 INFO  [run 1a2b] message``; tracebacks only with --verbose."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        line = f"{stamp} {record.levelname:<7} [run {getattr(record, 'run_id', '-')}] {record.getMessage()}"
        if self.verbose and record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(*, fmt: str = "text", verbose: bool = False, quiet: bool = False) -> None:
    """Send peersync's logs to stderr in the chosen format. Safe to call more than once."""
    root = logging.getLogger("connector")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(verbose))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    root.propagate = False
    # urllib3 logs full URLs (which can hold identifier searches) at DEBUG: keep it quiet.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
