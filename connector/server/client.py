"""A small FHIR R4 HTTP client for the write stage: retries, auth refresh, and error classification.

Transport retries (429, 5xx, timeouts, connection resets) are urllib3's `Retry`, mounted on the session,
with exponential backoff, jitter and Retry-After (capped). POST is retried too: the only POSTs peersync
sends are transactions of conditional writes, which are safe to replay (a replay after a lost response
finds the resources by identifier and changes nothing).

Errors never carry request or response bodies: only method, resource path (no query string), status, and
OperationOutcome issue codes with scrubbed diagnostics.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import (
    DecodeError,
    MaxRetryError,
    ProtocolError,
    ReadTimeoutError,
    ResponseError,
)
from urllib3.util.retry import Retry

from connector.errors import (
    AuthError,
    PeersyncError,
    RunDeadlineError,
    ServerAnswerError,
    ServerUnavailableError,
    TransportError,
    exit_code_for_action,
)
from connector.server.hapi import MULTIPLE_MATCH_CODES
from connector.server.transport import check_next_link, redact_url

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class Action(StrEnum):
    """What to do about a failed request."""

    RETRY_LATER = "retry-later"  # transient: leave pending for the next run
    ISOLATE = "isolate"  # the content is at fault: find the bad entries, quarantine them
    REVIEW = "review"  # a person must look (duplicates on the server)
    CONFLICT = "conflict"  # version conflict: retry soon, then leave pending
    AUTH = "auth"  # credentials or permissions
    FATAL = "fatal"  # the server cannot do this at all (e.g. unsupported operation)


# Status -> action: reviewable by clinic IT and unit-tested as data.
STATUS_ACTIONS: dict[int, Action] = {
    400: Action.ISOLATE,
    401: Action.AUTH,
    403: Action.AUTH,
    404: Action.ISOLATE,
    405: Action.FATAL,
    409: Action.CONFLICT,
    410: Action.ISOLATE,
    412: Action.REVIEW,
    413: Action.ISOLATE,
    422: Action.ISOLATE,
    429: Action.RETRY_LATER,
    500: Action.RETRY_LATER,
    501: Action.FATAL,
    502: Action.RETRY_LATER,
    503: Action.RETRY_LATER,
    504: Action.RETRY_LATER,
}

# HAPI reports "this condition matched N resources" as 412 (its message ids); some servers use 409/400.
_DUPLICATE_CODES = (*MULTIPLE_MATCH_CODES, "multiple matches", "matched 2", "matched multiple")


def action_for(status: int, outcome_text: str = "") -> Action:
    """The action for an HTTP status (and its OperationOutcome text, for duplicate detection)."""
    if any(code.lower() in outcome_text.lower() for code in _DUPLICATE_CODES):
        return Action.REVIEW
    if status in STATUS_ACTIONS:
        return STATUS_ACTIONS[status]
    if 400 <= status < 500:
        return Action.ISOLATE
    return Action.RETRY_LATER


@dataclass
class OutcomeSummary:
    """The known-safe part of an OperationOutcome: per issue its severity, code, FHIRPath expression and server
    message ids (``HAPI-1091``). Free diagnostics text can echo patient data in any form (unquoted, in another
    language), so it is kept only when the operator asked for it (``diagnostics``, scrubbed), never by default.
    ``duplicate`` says the server reported a condition matching several resources (read from the raw text)."""

    issues: list[dict[str, str]] = field(default_factory=list)
    duplicate: bool = False

    def codes(self) -> str:
        """Severity/code, expression and message ids of each issue: safe for logs, the ledger and reports."""
        return "; ".join(_issue_codes(issue) for issue in self.issues)

    def text(self) -> str:
        """One line for the ledger and review list: the codes, plus scrubbed diagnostics when they were kept."""
        return "; ".join(_issue_codes(issue) + (f" ({issue['diagnostics']})" if issue.get("diagnostics") else "")
                         for issue in self.issues)


def _issue_codes(issue: dict[str, str]) -> str:
    words = [f"{issue['severity']}/{issue['code']}", issue.get("message_ids", ""),
             f"at {issue['expression']}" if issue.get("expression") else ""]
    return " ".join(w for w in words if w)


_HAPI_CODE = re.compile(r"HAPI-\d{4}")
_QUOTED = re.compile(r"(\"[^\"]*\"|'[^']*'|\[[^\]]*\]|[\u201c\u201e\u00ab][^\u201d\u00bb]*[\u201d\u00bb]|"
                     r"[\u2018\u201a][^\u2019]*\u2019)")
_URLISH = re.compile(r"\S*[?|=]\S*")
_IDENTIFIER_LIKE = re.compile(r"(?<![\w-])[A-Za-z]*\d[\w.-]*\b")
# A FHIRPath location as servers report it (Bundle.entry[2].resource.note[0].text): element names and
# indexes only. Anything else in expression/location (spaces, quotes, values) is dropped.
_FHIRPATH = re.compile(r"[A-Z][A-Za-z]{1,63}(\.[a-z][A-Za-z0-9]{0,63}(\[\d{1,5}\])?){0,12}")
_SEVERITIES = frozenset({"fatal", "error", "warning", "information"})
_ISSUE_CODES = frozenset({
    "invalid", "structure", "required", "value", "invariant", "security", "login", "unknown", "expired",
    "forbidden", "suppressed", "processing", "not-supported", "duplicate", "multiple-matches", "not-found",
    "deleted", "too-long", "code-invalid", "extension", "too-costly", "business-rule", "conflict", "transient",
    "lock-error", "no-store", "exception", "timeout", "incomplete", "throttled", "informational",
})
_OUTCOME_SYSTEM = "http://terminology.hl7.org/CodeSystem/operation-outcome"


def scrub(text: str, limit: int = 300) -> str:
    """Remove values from server diagnostics: quoted text (straight or typographic quotes), URLs/queries and
    identifier-like tokens. Heuristic: an unquoted name has no shape to detect, so scrubbed text is still only
    stored when the operator turns on ``output.store_server_diagnostics``.
    """
    codes = _HAPI_CODE.findall(text)
    text = _QUOTED.sub("<value>", text)
    text = _URLISH.sub("<value>", text)
    text = _IDENTIFIER_LIKE.sub(lambda m: m.group(0) if _HAPI_CODE.fullmatch(m.group(0)) else "<value>", text)
    text = re.sub(r"\s+", " ", text).strip()
    for code in codes:
        if code not in text:
            text = f"{code} {text}"
    return text[:limit]


def summarize_outcome(body: Any, *, keep_diagnostics: bool = False) -> OutcomeSummary:
    """The known-safe part of an OperationOutcome (scrubbed diagnostics too, only with ``keep_diagnostics``)."""
    summary = OutcomeSummary()
    if not (isinstance(body, dict) and body.get("resourceType") == "OperationOutcome"):
        return summary
    for issue in body.get("issue", [])[:10] if isinstance(body.get("issue"), list) else []:
        if not isinstance(issue, dict):
            continue
        raw = str(issue.get("diagnostics", ""))
        if any(code.lower() in raw.lower() for code in _DUPLICATE_CODES):
            summary.duplicate = True
        severity, code = str(issue.get("severity", "")), str(issue.get("code", ""))
        ids = list(dict.fromkeys(_HAPI_CODE.findall(raw)))
        ids += [str(c.get("code")) for c in (issue.get("details") or {}).get("coding", []) or []
                if isinstance(c, dict) and c.get("system") == _OUTCOME_SYSTEM
                and re.fullmatch(r"MSG_[A-Z_]{1,40}", str(c.get("code")))]
        paths = [str(p) for p in [*(issue.get("expression") or []), *(issue.get("location") or [])]]
        kept = {
            "severity": severity if severity in _SEVERITIES else "unknown",
            "code": code if code in _ISSUE_CODES else "unknown",
            "message_ids": " ".join(ids),
            "expression": next((p for p in paths if _FHIRPATH.fullmatch(p)), ""),
        }
        if keep_diagnostics and raw:
            kept["diagnostics"] = scrub(raw)
        summary.issues.append(kept)
    return summary


class FhirHttpError(PeersyncError):
    """A FHIR request failed with an HTTP status; carries the action and a PHI-free outcome summary."""

    def __init__(self, method: str, path: str, status: int, outcome: OutcomeSummary, *, signal_text: str = "",
                 headers: dict[str, str] | None = None) -> None:
        self.method, self.path, self.status, self.outcome = method, path, status, outcome
        # The server's raw messages, only for matching fixed phrases (connector.write.limits): never logged or
        # stored, as they may echo patient data. Headers: the rate-limit ones only.
        self.signal_text, self.headers = signal_text, headers or {}
        self.action = Action.REVIEW if outcome.duplicate else action_for(status, outcome.codes())
        self.exit_code = exit_code_for_action(self.action)
        super().__init__(f"{method} {path} -> HTTP {status}" + (f": {outcome.codes()}" if outcome.issues else ""))


@dataclass(frozen=True)
class HttpAnswer:
    """A 2xx answer as the write confirmation needs it: status, Content-Type, and the parsed JSON body (None when
    the body was empty or not JSON)."""

    status: int
    body: Any
    content_type: str = ""


@dataclass(frozen=True)
class WriteAnswer:
    """A 2xx answer to one write outside a bundle: status, parsed JSON body (None when empty or not JSON), and the
    Location (or Content-Location) and ETag headers."""

    status: int
    body: Any
    location: str | None = None
    etag: str | None = None


@dataclass
class RequestStats:
    """What the client did: requests sent (including retries), writes, and retries."""

    requests: int = 0
    writes: int = 0
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, *, requests: int = 0, writes: int = 0, retries: int = 0) -> None:
        """Thread-safe increment."""
        with self._lock:
            self.requests += requests
            self.writes += writes
            self.retries += retries


class RunDeadline:
    """When the run must end (monotonic seconds), shared by the client and its retries; no deadline until
    :meth:`start`. After it, no request starts and no retry waits: unsent records stay pending (exit 69)."""

    def __init__(self) -> None:
        self.at: float | None = None
        self.seconds: float | None = None

    def start(self, seconds: float | None) -> None:
        """The run's deadline is ``seconds`` from now (None: no deadline)."""
        self.seconds = seconds
        self.at = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float:
        """Seconds left (infinite without a deadline; negative once passed)."""
        return float("inf") if self.at is None else self.at - time.monotonic()

    def check(self) -> None:
        """Raise RunDeadlineError once the deadline has passed."""
        if self.remaining() <= 0:
            raise RunDeadlineError(
                f"the run reached its deadline (sync.run_deadline_seconds = {self.seconds:g}); unsent records stay "
                "pending and the next run sends them. If runs often need longer, raise the deadline or look at "
                "why the server is slow")


class CappedRetry(Retry):
    """urllib3 Retry that caps Retry-After waits, stops at the run deadline, and counts every retry it grants.

    A server asking for a wait longer than ``retry_after_cap`` (alone or added up over the retries of one request)
    is not waited for: the request fails now and its records stay pending for the next run. No wait outlasts the
    run deadline either.
    """

    retry_after_cap: float = 120.0
    stats: RequestStats | None = None
    deadline: RunDeadline | None = None
    retry_after_waited: float = 0.0

    def get_retry_after(self, response: Any) -> float | None:
        value = super().get_retry_after(response)
        return None if value is None else min(value, self.retry_after_cap)

    def get_backoff_time(self) -> float:
        remaining = self.deadline.remaining() if self.deadline else float("inf")
        return max(0.0, min(super().get_backoff_time(), remaining))

    def increment(self, method: str | None = None, url: str | None = None, *args: Any, **kwargs: Any) -> CappedRetry:
        response = kwargs.get("response")
        asked = Retry.get_retry_after(self, response) if response is not None else None
        remaining = self.deadline.remaining() if self.deadline else float("inf")
        if asked is not None and (asked > self.retry_after_cap or self.retry_after_waited + asked > self.retry_after_cap
                                  or asked >= remaining):
            raise MaxRetryError(kwargs.get("_pool"), url or "", ResponseError(  # type: ignore[arg-type]
                f"Retry-After {asked:g} s is longer than this run waits"))
        if remaining <= 0:
            raise MaxRetryError(kwargs.get("_pool"), url or "", ResponseError("the run deadline has passed"))  # type: ignore[arg-type]
        retry = super().increment(method, url, *args, **kwargs)  # raises MaxRetryError when the budget is spent
        retry.retry_after_waited = self.retry_after_waited + (asked or 0.0)
        if self.stats is not None:
            writes = 1 if method in ("POST", "PUT", "PATCH", "DELETE") else 0
            self.stats.add(requests=1, writes=writes, retries=1)
        return retry

    def new(self, **kw: Any) -> CappedRetry:
        retry = super().new(**kw)
        retry.retry_after_cap = self.retry_after_cap
        retry.stats = self.stats
        retry.deadline = self.deadline
        retry.retry_after_waited = self.retry_after_waited
        return retry


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retry settings."""

    attempts: int = 5
    backoff_factor: float = 0.5
    backoff_max: float = 30.0
    jitter: float = 0.5
    retry_after_cap: float = 120.0

    def urllib3_retry(self, stats: RequestStats | None = None, deadline: RunDeadline | None = None) -> Retry:
        """The urllib3 Retry object for these settings (counting retries into ``stats``, stopping at ``deadline``)."""
        retry = CappedRetry(
            total=self.attempts,
            connect=self.attempts,
            read=self.attempts,
            status=self.attempts,
            other=0,
            status_forcelist=RETRY_STATUSES,
            allowed_methods=frozenset({"GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS"}),
            backoff_factor=self.backoff_factor,
            backoff_max=self.backoff_max,
            backoff_jitter=self.jitter,
            respect_retry_after_header=True,
            raise_on_status=False,
            raise_on_redirect=False,
        )
        retry.retry_after_cap = self.retry_after_cap
        retry.stats = stats
        retry.deadline = deadline
        return retry


class FhirClient:
    """Talks to one FHIR base URL. Thread-safe for concurrent use (one requests.Session, pooled).

    ``timeout`` bounds each socket wait; ``request_deadline`` bounds one whole attempt (connect and the entire
    body: a server trickling a byte every few seconds is cut off), and :attr:`deadline` is the run's deadline,
    after which nothing is sent. Redirects are never followed and a 3xx is never success.
    """

    def __init__(
        self,
        base_url: str,
        *,
        session: requests.Session | None = None,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        pool_size: int = 8,
        request_deadline: float = 300.0,
        keep_diagnostics: bool = False,
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.session = session or requests.Session()
        self.timeout = timeout
        self.request_deadline = max(request_deadline, timeout)
        self.keep_diagnostics = keep_diagnostics
        self.stats = RequestStats()
        self.deadline = RunDeadline()
        self.retry = retry or RetryPolicy()
        adapter = HTTPAdapter(max_retries=self.retry.urllib3_retry(self.stats, self.deadline), pool_maxsize=pool_size,
                              pool_connections=pool_size)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers.setdefault("Accept", FHIR_JSON)

    # -- core ------------------------------------------------------------------------------------------

    def request(self, method: str, path: str, *, json_body: Any = None, params: dict[str, str] | None = None,
                headers: dict[str, str] | None = None, outcome_statuses: tuple[int, ...] = ()) -> requests.Response:
        """Send one request (with transport retries); refresh auth once on 401; raise FhirHttpError on failure
        and ServerAnswerError on a redirect (never followed: a write must not be replayed elsewhere).

        A status in ``outcome_statuses`` whose body is an OperationOutcome is an answer, not a failure
        (``$validate`` reports invalid content with 400/412/422).
        """
        url = check_next_link(path, self.base_url) if path.startswith(("http://", "https://")) \
            else urljoin(self.base_url, path)
        send_headers = {"Content-Type": FHIR_JSON} if json_body is not None else {}
        send_headers.update(headers or {})
        refreshed = False
        while True:
            response = self._send(method, url, json_body, params, send_headers)
            auth = self.session.auth
            if response.status_code == 401 and not refreshed and hasattr(auth, "invalidate"):
                refreshed = True
                if auth.invalidate(response):  # type: ignore[union-attr]
                    log.info("server answered 401; refreshing the access token once", extra={"status": 401})
                    continue
            break
        if response.status_code in outcome_statuses and response.status_code not in (401, 403) \
                and _is_outcome(response):
            return response
        if response.status_code >= 400:
            body = _json_or_none(response)
            outcome = summarize_outcome(body, keep_diagnostics=self.keep_diagnostics)
            error = FhirHttpError(method, _path_only(url, self.base_url), response.status_code, outcome,
                                  signal_text=outcome_messages(body), headers=_limit_headers(response))
            if response.status_code in (401, 403) or error.action is Action.AUTH:
                auth_error = (self.session.auth.unauthorized_error(response)  # type: ignore[union-attr]
                              if hasattr(self.session.auth, "unauthorized_error")
                              else AuthError(f"{error} (check credentials and granted scopes)"))
                auth_error.http_error = error  # the writer tells a refused type from a missing scope
                raise auth_error from None
            raise error
        if not 200 <= response.status_code < 300:
            location = response.headers.get("Location")
            target = f" to {redact_url(urljoin(url, location))}" if location else ""
            raise ServerAnswerError(
                f"{method} {_path_only(url, self.base_url)}: the server answered HTTP {response.status_code}{target}; "
                "peersync never follows redirects and takes nothing as written. Check server.base_url (https, "
                "host, path) and any proxy or login page in front of the FHIR server; unsent records stay pending")
        return response

    def _send(self, method: str, url: str, json_body: Any, params: dict[str, str] | None,
              headers: dict[str, str]) -> requests.Response:
        data = None
        if json_body is not None:
            import orjson

            data = orjson.dumps(json_body)
        broken = 0
        while True:
            self.deadline.check()
            started = time.monotonic()
            try:
                response = self.session.request(method, url, data=data, params=params, headers=headers,
                                                timeout=self.timeout, allow_redirects=False, stream=True)
                try:
                    self._read_body(response, started, method, url)
                except BaseException:
                    response.close()
                    raise
                break
            except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError,
                    ProtocolError, DecodeError) as exc:
                # The connection broke while the body was read: the body is read after urllib3's retry loop has
                # returned, so retry here, within the same budget (our requests are safe to replay).
                self.stats.add(requests=1)
                broken += 1
                if broken > self.retry.attempts:
                    raise ServerUnavailableError(
                        f"{method} {_path_only(url, self.base_url)}: the response broke off {broken} times "
                        f"({exc.__class__.__name__})"
                    ) from None
                self.stats.add(retries=1)
                wait = min(self.retry.backoff_max, self.retry.backoff_factor * 2 ** (broken - 1))
                time.sleep(max(0.0, min(wait, self.deadline.remaining())))
            except requests.exceptions.RetryError as exc:
                self.stats.add(requests=1)
                raise ServerUnavailableError(f"{method} {_path_only(url, self.base_url)}: retries exhausted") from exc
            except requests.exceptions.SSLError as exc:
                # Not "unavailable": retrying will not help, and nothing was sent. A configuration problem (78).
                self.stats.add(requests=1)
                raise TransportError(
                    f"TLS verification failed for {redact_url(self.base_url)}: {_tls_reason(exc)}. The server's "
                    "certificate is not trusted; if the EHR uses a private CA, set server.ca_bundle to its PEM file "
                    "(never verify_tls = false with real data)"
                ) from None
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ReadTimeoutError) as exc:
                self.stats.add(requests=1)
                self.deadline.check()  # a retry cut short by the run deadline is the deadline's doing
                raise ServerUnavailableError(
                    f"{method} {_path_only(url, self.base_url)}: server unreachable after retries "
                    f"({exc.__class__.__name__})"
                ) from None
        self.stats.add(requests=1, writes=1 if method in ("POST", "PUT", "PATCH", "DELETE") else 0)
        if response.status_code in RETRY_STATUSES:
            # urllib3 gave up (retry budget spent, or a Retry-After longer than this run waits) and handed back the
            # last response.
            asked = response.headers.get("Retry-After")
            self.deadline.check()
            raise ServerUnavailableError(
                f"{method} {_path_only(url, self.base_url)}: HTTP {response.status_code} after retries"
                + (f" (the server asked to retry after {asked[:40]!r}; at most {self.retry.retry_after_cap:g} s is "
                   "waited per request, sync.retry_after_cap_seconds)" if asked else "")
            )
        return response

    def _read_body(self, response: requests.Response, started: float, method: str, url: str) -> None:
        """Read the whole body before the request's deadline. Each read waits at most ``timeout``; between reads
        the deadline is checked, so a server sending a byte every few seconds cannot hold the run."""
        deadline = min(started + self.request_deadline, time.monotonic() + max(0.0, self.deadline.remaining()))
        chunks: list[bytes] = []
        while True:
            if time.monotonic() > deadline:
                raise ServerUnavailableError(
                    f"{method} {_path_only(url, self.base_url)}: no complete answer within "
                    f"{min(self.request_deadline, time.monotonic() - started):.0f} s (server.request_deadline_seconds "
                    "or the run deadline); the server is too slow. Unsent records stay pending")
            chunk = response.raw.read1(_READ_SIZE, decode_content=True)
            if not chunk:
                break
            chunks.append(chunk)
        # requests keeps a read body in _content (what .content/.json() use); the connection goes back to the pool.
        response._content = b"".join(chunks)
        response.raw.release_conn()

    # -- FHIR operations -------------------------------------------------------------------------------

    def capabilities(self) -> dict[str, Any]:
        """The server's CapabilityStatement."""
        return _json_resource(self.request("GET", "metadata"), "GET /metadata")

    def search(self, resource_type: str, params: dict[str, str], *, max_pages: int = 20) -> Iterator[dict[str, Any]]:
        """Resources matching a search (follows `next` links on the same server only). An answer that is not a
        ``searchset`` Bundle is an error (ServerAnswerError), never "no match"."""
        response = self.request("GET", resource_type, params=params)
        for _ in range(max_pages):
            bundle = _searchset(response, f"GET /{resource_type}")
            for entry in bundle.get("entry", []):
                if entry.get("search", {}).get("mode", "match") == "match" and "resource" in entry:
                    yield entry["resource"]
            next_link = next((link["url"] for link in bundle.get("link", []) if link.get("relation") == "next"), None)
            if not next_link:
                return
            response = self.request("GET", next_link)

    def search_with_included(self, resource_type: str, params: dict[str, Any], *,
                             max_pages: int = 50) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(matches, included resources) of a search that may ``_include`` others; a list value repeats the
        parameter (``{"_include": ["Task:focus", "Task:patient"]}``). A malformed entry (no resource) is an empty
        dict among the matches, for the caller to report."""
        matches: list[dict[str, Any]] = []
        included: list[dict[str, Any]] = []
        response = self.request("GET", resource_type, params=params)
        for _ in range(max_pages):
            bundle = _searchset(response, f"GET /{resource_type}")
            for entry in bundle.get("entry", []):
                resource = entry.get("resource") if isinstance(entry, dict) else None
                if not isinstance(resource, dict) or not resource.get("resourceType"):
                    matches.append({})  # a malformed entry: the caller reports it (never silently dropped)
                    continue
                mode = (entry.get("search") or {}).get("mode")
                if mode == "include" or (mode is None and resource["resourceType"] != resource_type):
                    included.append(resource)
                else:
                    matches.append(resource)
            next_link = next((link["url"] for link in bundle.get("link", []) if link.get("relation") == "next"), None)
            if not next_link:
                break
            response = self.request("GET", next_link)
        return matches, included

    def update_versioned(self, resource_type: str, resource_id: str, resource: dict[str, Any],
                         version: str) -> dict[str, Any]:
        """PUT a resource by id only if the server still holds ``version`` (``If-Match``): a concurrent edit
        answers 412 (FhirHttpError), never overwritten."""
        return _json_resource(self.request("PUT", f"{resource_type}/{resource_id}", json_body=resource,
                                           headers={"If-Match": f'W/"{version}"'}), f"PUT /{resource_type}")

    def search_raw(self, query: str) -> list[dict[str, Any]]:
        """Resources for a pre-encoded query such as ``Goal?identifier=sys%7Cval`` (one page). An answer that is
        not a ``searchset`` Bundle is an error (ServerAnswerError), never "no match"."""
        bundle = _searchset(self.request("GET", query), "GET /" + query.split("?", 1)[0])
        return [e["resource"] for e in bundle.get("entry", []) if "resource" in e
                and e.get("search", {}).get("mode", "match") == "match"]

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """Read one resource."""
        return _json_resource(self.request("GET", f"{resource_type}/{resource_id}"), f"GET /{resource_type}")

    def send_transaction(self, bundle: dict[str, Any]) -> HttpAnswer:
        """POST a transaction (or batch) bundle; the 2xx answer as it came, for :mod:`connector.write.confirm`."""
        response = self.request("POST", "", json_body=bundle)
        return HttpAnswer(response.status_code, _json_or_none(response), response.headers.get("Content-Type", ""))

    def write(self, method: str, path: str, resource: dict[str, Any], *, if_match: str | None = None,
              if_none_exist: str | None = None) -> WriteAnswer:
        """One write outside a bundle (``PUT Type?identifier=``, ``PUT Type/id``, ``POST Type``): the 2xx answer
        as it came, for :func:`connector.write.confirm.confirm_single`. ``if_match`` is a version id (sent as
        ``W/"version"``), ``if_none_exist`` a search query (a conditional create)."""
        headers = {"Prefer": "return=representation"}
        if if_match:
            headers["If-Match"] = f'W/"{if_match}"'
        if if_none_exist:
            headers["If-None-Exist"] = if_none_exist
        response = self.request(method, path, json_body=resource, headers=headers)
        return WriteAnswer(response.status_code, _json_or_none(response),
                           response.headers.get("Location") or response.headers.get("Content-Location"),
                           response.headers.get("ETag"))

    def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """POST a transaction bundle; return the answer, which must be a FHIR resource (else ServerAnswerError)."""
        return _json_resource(self.request("POST", "", json_body=bundle), "POST /")

    def update(self, resource_type: str, resource_id: str, resource: dict[str, Any]) -> dict[str, Any]:
        """PUT a resource by id."""
        return _json_resource(self.request("PUT", f"{resource_type}/{resource_id}", json_body=resource),
                              f"PUT /{resource_type}")

    def validate(self, resource: dict[str, Any], profile: str | None = None) -> dict[str, Any]:
        """``$validate`` one resource (against ``profile`` when given); the OperationOutcome, errors included."""
        return _json_resource(self.request("POST", f"{resource['resourceType']}/$validate", json_body=resource,
                                           params={"profile": profile} if profile else None,
                                           outcome_statuses=(400, 412, 422)), "POST $validate")


_READ_SIZE = 256 * 1024
_LIMIT_HEADERS = ("retry-after", "x-ratelimit-remaining", "ratelimit-remaining", "x-rate-limit-remaining")


def outcome_messages(body: Any) -> str:
    """An OperationOutcome's raw messages (diagnostics, details.text), capped: for phrase matching only (never
    log or store them: they may echo patient data)."""
    if not (isinstance(body, dict) and isinstance(body.get("issue"), list)):
        return ""
    texts = []
    for issue in body["issue"][:10]:
        if isinstance(issue, dict):
            details = issue.get("details")
            texts += [str(issue.get("diagnostics", "")), str(details.get("text", "")) if isinstance(details, dict)
                      else ""]
    return " | ".join(t for t in texts if t)[:4000]


def _limit_headers(response: requests.Response) -> dict[str, str]:
    """The rate-limit headers of an answer (names lower case, values capped)."""
    return {name: response.headers[name][:40] for name in _LIMIT_HEADERS if name in response.headers}


def _json_resource(response: requests.Response, what: str) -> dict[str, Any]:
    """The answer's FHIR resource; an empty, HTML or other non-FHIR body is a ServerAnswerError (exit 69)."""
    body = _json_or_none(response)
    if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
        media = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        shown = f"a {media} body" if re.fullmatch(r"[a-z]+/[a-z0-9.+-]+", media) and response.content \
            else "an empty body" if not response.content else "a body that is not FHIR JSON"
        raise ServerAnswerError(
            f"{what}: the server answered HTTP {response.status_code} with {shown}, not a FHIR resource. Check "
            "server.base_url (it must be the FHIR base, not a web page) and any proxy in front of the server")
    return body


def _searchset(response: requests.Response, what: str) -> dict[str, Any]:
    bundle = _json_resource(response, what)
    if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "searchset":
        raise ServerAnswerError(
            f"{what}: the server answered a search with {_json_kind(bundle)}, not a searchset Bundle; nothing is "
            "taken as \"no match\". Check server.base_url and any proxy in front of the server")
    return bundle


def _json_kind(body: dict[str, Any]) -> str:
    kind = f"{body.get('resourceType')}/{body.get('type', '')}".rstrip("/")
    return kind if re.fullmatch(r"[A-Za-z/-]{1,60}", kind) else "an unexpected resource"


def _path_only(url: str, base: str) -> str:
    """The resource path without query string or base, for messages (queries can hold identifiers)."""
    path = urlsplit(url).path
    base_path = urlsplit(base).path
    return "/" + path[len(base_path):].lstrip("/") if path.startswith(base_path) else path


def _tls_reason(exc: Exception) -> str:
    """The certificate problem in a TLS error ("self-signed certificate", "Hostname mismatch, ..."), briefly."""
    text = str(exc)
    match = re.search(r"certificate verify failed: ([^(')\]]+)", text) or re.search(r"(Hostname mismatch[^'\]]*)", text)
    return match.group(1).strip().rstrip(".,") if match else "the TLS handshake failed"


def _is_outcome(response: requests.Response) -> bool:
    body = _json_or_none(response)
    return isinstance(body, dict) and body.get("resourceType") == "OperationOutcome"


def _json_or_none(response: requests.Response) -> Any:
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return None

