"""Logging: JSON lines with a run id on every line, text for terminals, and no patient data anywhere."""

from __future__ import annotations

import io
import json
import logging
import socket
import warnings
from collections.abc import Iterator

import pytest

from connector.errors import ServerUnavailableError
from connector.ops.logs import (
    configure_logging,
    flush_repeated_warnings,
    log_format,
    new_run_id,
    outcome_codes,
    redact_text,
    register_secret,
    reset_logging,
)
from connector.server.client import FhirClient, RetryPolicy

MRN = "MRN8841207"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    yield
    reset_logging()


def capture(fmt: str = "json", verbose: bool = False, quiet: bool = False) -> io.StringIO:
    stream = io.StringIO()
    configure_logging(fmt=fmt, verbose=verbose, quiet=quiet, stream=stream)
    return stream


def json_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_run_id_and_extras() -> None:
    stream = capture("json")
    run_id = new_run_id()
    writer_log = logging.getLogger("connector.write.writer")
    writer_log.info("plan: %d units", 3, extra={"event": "plan", "counts": {"create": 3}})
    writer_log.warning("record quarantined", extra={"key": "rk-0123456789ab", "status": 422})
    lines = json_lines(stream)
    assert [line["run_id"] for line in lines] == [run_id, run_id]
    assert lines[0]["message"] == "plan: 3 units" and lines[0]["counts"] == {"create": 3}
    assert lines[0]["level"] == "info" and lines[0]["logger"] == "connector.write.writer"
    assert lines[0]["event"] == "plan"
    assert lines[1]["key"] == "rk-0123456789ab" and lines[1]["status"] == 422
    assert log_format() == "json"


def test_text_format_and_levels() -> None:
    stream = capture("text")
    new_run_id()
    logging.getLogger("connector.x").debug("hidden without --verbose")
    logging.getLogger("connector.x").info("shown")
    text = stream.getvalue()
    assert "hidden" not in text and "INFO    [run " in text and text.rstrip().endswith("shown")

    stream = capture("text", verbose=True)
    logging.getLogger("connector.x").debug("detail", extra={"key": "rk-1"})
    assert "DEBUG" in stream.getvalue() and "(key=rk-1)" in stream.getvalue()

    stream = capture("text", quiet=True)
    logging.getLogger("connector.x").info("not in quiet mode")
    logging.getLogger("connector.x").warning("still shown")
    assert "not in quiet" not in stream.getvalue() and "still shown" in stream.getvalue()


def test_url_queries_and_identifier_values_are_masked() -> None:
    text = f"GET /fhir/Patient?identifier=urn:oid:2.16.840%7C{MRN}&_count=1 HTTP/1.1"
    cleaned = redact_text(text)
    assert MRN not in cleaned and cleaned.startswith("GET /fhir/Patient?<query redacted>") and "HTTP/1.1" in cleaned
    assert MRN not in redact_text(f"search identifier=urn:x|{MRN} failed")
    assert redact_text("what? nothing here") == "what? nothing here"


def test_registered_secrets_are_masked() -> None:
    stream = capture("json")
    register_secret("tok-abcdef-123")
    logging.getLogger("connector.auth").warning("server echoed %s", "tok-abcdef-123")
    assert "tok-abcdef-123" not in stream.getvalue() and "***" in stream.getvalue()


def test_exception_messages_are_not_logged_in_json() -> None:
    stream = capture("json")
    try:
        raise ValueError(f"Input should be a valid date, got {MRN}")  # noqa: TRY301 - a real traceback to log
    except ValueError:
        logging.getLogger("connector.write.writer").exception("mapping failed")
    line = json_lines(stream)[0]
    assert line["error_type"] == "ValueError" and MRN not in stream.getvalue()


def test_verbose_text_shows_frames_but_not_the_message() -> None:
    stream = capture("text", verbose=True)
    try:
        raise ValueError(f"bad value {MRN}")  # noqa: TRY301 - a real traceback to log
    except ValueError:
        logging.getLogger("connector.write.writer").exception("mapping failed")
    assert "test_logs.py:" in stream.getvalue() and MRN not in stream.getvalue()


def test_third_party_warnings_and_python_warnings_become_json_lines() -> None:
    stream = capture("json")
    logging.getLogger("somelib").warning("library warning with ?identifier=x%7C" + MRN)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a library's UserWarning", UserWarning, stacklevel=1)
    lines = json_lines(stream)
    assert {line["logger"] for line in lines} == {"somelib", "py.warnings"}
    assert MRN not in stream.getvalue()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_urllib3_retry_warnings_do_not_leak_identifier_searches() -> None:
    """urllib3 logs 'Retrying ... : /fhir/Patient?identifier=system|MRN' at WARNING: the query must be masked."""
    stream = capture("json", verbose=True)
    new_run_id()
    client = FhirClient(f"http://127.0.0.1:{_closed_port()}/fhir",
                        retry=RetryPolicy(attempts=2, backoff_factor=0, backoff_max=0, jitter=0))
    with pytest.raises(ServerUnavailableError) as info:
        client.search_raw(f"Patient?identifier=urn:oid:1.2.3%7C{MRN}")
    assert MRN not in str(info.value)
    flush_repeated_warnings()
    lines = json_lines(stream)
    assert MRN not in stream.getvalue() and "identifier" not in stream.getvalue()
    assert all(line["run_id"] != "-" for line in lines)
    # urllib3's two retry lines became our own event: shown once, then counted.
    retries = [line for line in lines if line.get("event") == "http-retry"]
    assert [line["logger"] for line in retries] == ["connector.server.client"] * 2
    assert retries[0]["message"] == ("HTTP request to /fhir/Patient retried: the connection broke "
                                     "(NewConnectionError)")
    assert retries[0]["retries_left"] == 1 and "repeated" not in retries[0]
    assert retries[1]["message"] == retries[0]["message"] + " (repeated 1 more time)" and retries[1]["repeated"] == 1
    assert not any(line["logger"].startswith("urllib3") for line in lines)


def test_urllib3_protocol_errors_name_both_exception_types_and_other_warnings_are_events() -> None:
    from urllib3.exceptions import ProtocolError
    from urllib3.util.retry import Retry

    stream = capture("json")
    urllib3_log = logging.getLogger("urllib3.connectionpool")
    error = ProtocolError("Connection aborted.", ConnectionResetError(104, f"reset by {MRN}"))
    urllib3_log.warning("Retrying (%r) after connection broken by '%r': %s", Retry(total=3), error,
                        f"/fhir/Patient?identifier=x%7C{MRN}")
    urllib3_log.warning("Connection pool is full, discarding connection: %s. Connection pool size: %s", "ehr", 10)
    first, second = json_lines(stream)
    assert first["message"] == ("HTTP request to /fhir/Patient retried: the connection broke "
                                "(ProtocolError/ConnectionResetError)") and first["retries_left"] == 3
    assert second["event"] == "http-warning" and second["logger"] == "connector.server.client"
    assert "Connection pool is full" in second["message"] and MRN not in stream.getvalue()


def test_identical_warnings_are_shown_once_then_counted_before_run_finished() -> None:
    stream = capture("text")
    new_run_id()
    writer_log = logging.getLogger("connector.write.writer")
    for _ in range(3):
        writer_log.warning("server unavailable: HTTP 503", extra={"event": "server-unavailable"})
    for key in ("rk-000000000001", "rk-000000000002"):  # different records: different events, both shown
        writer_log.warning("participant sent to review: patient-not-found", extra={"participant_key": key})
    writer_log.info("an info line is never collapsed")
    writer_log.info("an info line is never collapsed")
    logging.getLogger("connector.run").info("run finished: incomplete (exit 69)", extra={"event": "run-finished"})
    writer_log.warning("server unavailable: HTTP 503")  # a new count starts after the run finished
    flush_repeated_warnings()
    messages = [line.split("] ", 1)[1] for line in stream.getvalue().splitlines()]
    assert messages == ["server unavailable: HTTP 503",
                        "participant sent to review: patient-not-found",
                        "participant sent to review: patient-not-found",
                        "an info line is never collapsed",
                        "an info line is never collapsed",
                        "server unavailable: HTTP 503 (repeated 2 more times)",
                        "run finished: incomplete (exit 69)",
                        "server unavailable: HTTP 503"]
    assert "WARNING" in stream.getvalue().splitlines()[5]


def test_outcome_codes_keep_only_codes() -> None:
    issues = [{"severity": "error", "code": "processing",
               "diagnostics": "HAPI-1094: Resource Patient/abc not found, Maria Lopez"},
              {"severity": "warning", "code": "invalid", "diagnostics": "free text Maria"}]
    assert outcome_codes(issues) == "error/processing HAPI-1094; warning/invalid"
    assert outcome_codes([{"severity": "error", "code": "invalid", "message_ids": "HAPI-1091"}]) == \
        "error/invalid HAPI-1091"
    assert outcome_codes([]) == "no OperationOutcome"


def test_configure_twice_keeps_one_handler() -> None:
    capture("json")
    capture("text")
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_peersync_handler", False)]
    assert len(ours) == 1
    reset_logging()
    assert not [h for h in logging.getLogger().handlers if getattr(h, "_peersync_handler", False)]
