"""Logging: stderr only, human text on a terminal or JSON lines, a run id on every line, no patient data.

Library code logs metadata only: counts, opaque record keys, resource types, HTTP status codes and
OperationOutcome codes. It never passes names, MRNs, notes, identifier values or request/response bodies
to a logger. As a second line of defence, :class:`RedactingFilter` masks values registered as sensitive
(e.g. secrets) and the query part of any URL (``Patient?identifier=system|MRN``) in every record, including
records from third-party libraries: urllib3 logs the full URL of a request it retries.

Two more filters keep a scheduler's log readable: urllib3's retry warnings become peersync ``http-retry``
events (:class:`Urllib3EventFilter`), and a warning repeated word for word is shown once, then counted
(:class:`RepeatCollapsingFilter`).
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import re
import sys
import threading
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import urlsplit

RUN_ID: contextvars.ContextVar[str] = contextvars.ContextVar("peersync_run_id", default="-")
_SECRETS: set[str] = set()

# Extra attributes a log call may carry (``logger.info(..., extra={"counts": {...}})``).
_EXTRA_FIELDS = ("event", "key", "kind", "resource_type", "status", "counts", "attempt", "outcome", "code",
                 "duration_s", "participant_key", "path", "exit_code", "entries", "phase", "error_type", "frames",
                 "retries_left", "repeated")

# A URL query (``?identifier=...``, ``?name=...``): search values can be MRNs or names. Matched from the "?"
# to the next whitespace or quote, so "GET /fhir/Patient?identifier=a%7Cb HTTP/1.1" keeps the method/protocol.
_QUERY = re.compile(r"\?[^\s'\"<>]*=[^\s'\"<>]*")
# A bare "identifier=system|value" or "identifier=system%7Cvalue" outside a URL (e.g. in a repr).
_IDENTIFIER_PARAM = re.compile(r"(identifier[=:]\s*)[^\s'\"&,)]+", re.IGNORECASE)

_HANDLER_MARK = "_peersync_handler"
_STATE: dict[str, Any] = {"format": "text", "verbose": False}


def new_run_id() -> str:
    """Start a run: a fresh id that every following log line carries."""
    run_id = uuid.uuid4().hex[:12]
    RUN_ID.set(run_id)
    return run_id


def register_secret(value: str | None) -> None:
    """Mask this value wherever it might appear in a log line (tokens, client secrets)."""
    if value and len(value) >= 6:
        _SECRETS.add(value)


def redact_text(text: str) -> str:
    """Mask registered secrets and URL query values (identifier searches) in a rendered log message."""
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, "***")
    if "?" in text:
        text = _QUERY.sub("?<query redacted>", text)
    if "dentifier" in text:
        text = _IDENTIFIER_PARAM.sub(r"\1<redacted>", text)
    return text


def outcome_codes(issues: Iterable[Mapping[str, str]]) -> str:
    """The log-safe part of OperationOutcome issues: severity/code and HAPI-NNNN message codes only.

    Free diagnostics never reach the ledger unless the operator turns on ``output.store_server_diagnostics``
    (then scrubbed: heuristic, an unquoted name has no shape to detect); log lines carry only the codes.
    """
    parts = []
    for issue in issues:
        hapi = " ".join(dict.fromkeys([*str(issue.get("message_ids", "")).split(),
                                       *re.findall(r"HAPI-\d{4}", str(issue.get("diagnostics", "")))]))
        parts.append(" ".join(p for p in (f"{issue.get('severity', '')}/{issue.get('code', '')}", hapi) if p))
    return "; ".join(parts) or "no OperationOutcome"


class RedactingFilter(logging.Filter):
    """Adds the run id and masks registered secrets and URL queries in the rendered message."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.run_id = RUN_ID.get()
        message = record.getMessage()
        cleaned = redact_text(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        return True


# The logger our own HTTP events use; urllib3's retry lines are re-issued under it.
HTTP_LOGGER = "connector.server.client"


class Urllib3EventFilter(logging.Filter):
    """Turns urllib3's warnings into peersync events: logger ``connector.server.client``, an ``event`` field
    and a message that names the cause, the request path (never its query) and the retries left.

    urllib3 logs ``Retrying (Retry(total=2, ...)) after connection broken by 'NewConnectionError(...)': /fhir/..``
    with its own wording and a repr that changes on every attempt; operators filter on our events instead.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("urllib3") or record.levelno < logging.WARNING:
            return True
        retrying = isinstance(record.msg, str) and record.msg.startswith("Retrying")
        if retrying and isinstance(record.args, tuple) and len(record.args) == 3:
            retries, error, url = record.args
            left = getattr(retries, "total", None)
            record.msg = "HTTP request to %s retried: the connection broke (%s)"
            record.args = (_path_only(str(url)), _error_name(error))
            record.event = "http-retry"
            if isinstance(left, int):
                record.retries_left = left
        else:
            record.event = "http-warning"
        record.name = HTTP_LOGGER
        return True


def _path_only(url: str) -> str:
    """The path of a URL: its query (identifier searches) is dropped, not just masked."""
    return urlsplit(url).path or "/"


def _error_name(error: object) -> str:
    """``ProtocolError/RemoteDisconnected``: the exception types, never their text (it can quote a host or value)."""
    names = [type(error).__name__]
    inner: tuple[Any, ...] = getattr(error, "args", ())
    if len(inner) > 1 and isinstance(inner[1], BaseException):
        names.append(type(inner[1]).__name__)
    return "/".join(names)


class RepeatCollapsingFilter(logging.Filter):
    """Shows a warning repeated word for word once, and its count when the run ends.

    "Identical" means the same logger, level and message, and the same record key: warnings about different
    records (``key``/``participant_key``) are different events and all shown. The counts are emitted as one
    line per message (``... (repeated 40 more times)``, field ``repeated``) just before ``run finished``, or
    when the command ends (:func:`flush_repeated_warnings`).
    """

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self.handler = handler
        self.lock = threading.Lock()
        self.first: dict[tuple[Any, ...], logging.LogRecord] = {}
        self.repeats: dict[tuple[Any, ...], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "repeated", None) is not None:
            return True
        if getattr(record, "event", None) == "run-finished":
            self.flush()
            return True
        if record.levelno < logging.WARNING:
            return True
        identity = (record.name, record.levelno, record.getMessage(), getattr(record, "key", None),
                    getattr(record, "participant_key", None))
        with self.lock:
            if identity not in self.first:
                self.first[identity] = record
                return True
            self.repeats[identity] = self.repeats.get(identity, 0) + 1
        return False

    def flush(self) -> None:
        """Emit the count of every suppressed repeat, then start counting afresh."""
        with self.lock:
            counted = [(self.first[identity], n) for identity, n in self.repeats.items()]
            self.first.clear()
            self.repeats.clear()
        for first, count in counted:
            summary = logging.makeLogRecord({**first.__dict__, "msg": f"{first.getMessage()} (repeated {count} more "
                                                                      f"time{'s' if count > 1 else ''})",
                                             "args": None, "repeated": count, "exc_info": None, "exc_text": None})
            self.handler.handle(summary)


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
            # The type only: exception messages can carry values (a pydantic error quotes its input).
            entry["error_type"] = record.exc_info[0].__name__
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Readable lines for a terminal: ``12:00:01 INFO    [run 1a2b] message (key=rk-..)``."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        line = f"{stamp} {record.levelname:<7} [run {getattr(record, 'run_id', '-')}] {record.getMessage()}"
        if self.verbose:
            shown = [f"{name}={getattr(record, name)}" for name in ("key", "participant_key", "status", "entries",
                                                                     "duration_s") if hasattr(record, name)]
            if shown:
                line += f" ({', '.join(shown)})"
        if self.verbose and record.exc_info and record.exc_info[0] is not None:
            # Frames (file, line, function) but not the exception message, which may quote a value.
            line += "\n" + format_frames(record.exc_info[2])
        return line


def format_frames(tb: Any) -> str:
    """A traceback as 'file:line in function' lines: where it failed, without any values."""
    import traceback

    return "\n".join(f"  {f.filename}:{f.lineno} in {f.name}" for f in traceback.extract_tb(tb))


def configure_logging(*, fmt: str = "text", verbose: bool = False, quiet: bool = False,
                      stream: TextIO | None = None) -> None:
    """Send all log records (ours and third-party warnings) to stderr in the chosen format. Safe to call again.

    The handler sits on the root logger so that nothing reaches Python's last-resort handler (which would print
    plain, unfiltered text); peersync's own loggers get the verbosity, third-party loggers stay at WARNING.
    """
    reset_logging()
    handler = logging.StreamHandler(stream or sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    handler.addFilter(Urllib3EventFilter())  # first: it rewrites the message the others read
    handler.addFilter(RedactingFilter())
    handler.addFilter(RepeatCollapsingFilter(handler))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(verbose))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    ours = logging.getLogger("connector")
    ours.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    ours.propagate = True
    # urllib3 logs full URLs (which can hold identifier searches) at DEBUG; its WARNING lines (retries) are
    # useful and pass through the redacting filter.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    # warnings.warn() from libraries would otherwise print plain text to stderr, breaking JSON lines.
    logging.captureWarnings(True)
    _STATE.update(format=fmt, verbose=verbose)


def flush_repeated_warnings() -> None:
    """Emit the counts of repeated warnings not yet reported (the CLI calls this when a command ends)."""
    for handler in logging.getLogger().handlers:
        if getattr(handler, _HANDLER_MARK, False):
            for flt in handler.filters:
                if isinstance(flt, RepeatCollapsingFilter):
                    flt.flush()


def reset_logging() -> None:
    """Remove the handler configure_logging installed (tests call this between CLI invocations)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    for handler in list(logging.getLogger("connector").handlers):  # from older versions of this module
        logging.getLogger("connector").removeHandler(handler)
    logging.captureWarnings(False)
    _STATE.update(format="text", verbose=False)


def log_format() -> str:
    """The format chosen by the last configure_logging call ("text" or "json")."""
    return str(_STATE["format"])


def is_verbose() -> bool:
    """True when --verbose was given."""
    return bool(_STATE["verbose"])


def opaque_key(unit_key: str) -> str:
    """The key logs use for a record: stable, but reveals no source id."""
    return "rk-" + hashlib.sha256(unit_key.encode()).hexdigest()[:12]
