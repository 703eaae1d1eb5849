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
from urllib3.util.retry import Retry

from connector.errors import (
    AuthError,
    PeersyncError,
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
    """The PHI-free part of an OperationOutcome: severities, codes, and diagnostics with values scrubbed."""

    issues: list[dict[str, str]] = field(default_factory=list)

    def text(self) -> str:
        """One line for logs and the ledger."""
        return "; ".join(f"{i['severity']}/{i['code']}: {i['diagnostics']}".rstrip(": ") for i in self.issues)


_HAPI_CODE = re.compile(r"HAPI-\d{4}")
_QUOTED = re.compile(r"(\"[^\"]*\"|'[^']*'|\[[^\]]*\])")
_URLISH = re.compile(r"\S*[?|=]\S*")
_IDENTIFIER_LIKE = re.compile(r"\b[A-Za-z]*\d[\w.-]*\b")


def scrub(text: str, limit: int = 300) -> str:
    """Remove values from server diagnostics: quoted text, URLs/queries and identifier-like tokens.

    HAPI diagnostics can echo match URLs ("...identifier=system|value") or element values; we keep the
    message shape and the HAPI-NNNN code, which is what an operator needs to look the problem up.
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


def summarize_outcome(body: Any) -> OutcomeSummary:
    """Extract severity/code/scrubbed diagnostics from an OperationOutcome (or a transaction-response entry)."""
    summary = OutcomeSummary()
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        for issue in body.get("issue", [])[:10]:
            summary.issues.append(
                {
                    "severity": str(issue.get("severity", "")),
                    "code": str(issue.get("code", "")),
                    "diagnostics": scrub(str(issue.get("diagnostics", ""))),
                }
            )
    return summary


class FhirHttpError(PeersyncError):
    """A FHIR request failed with an HTTP status; carries the action and a PHI-free outcome summary."""

    def __init__(self, method: str, path: str, status: int, outcome: OutcomeSummary) -> None:
        self.method, self.path, self.status, self.outcome = method, path, status, outcome
        self.action = action_for(status, outcome.text())
        self.exit_code = exit_code_for_action(self.action)
        super().__init__(f"{method} {path} -> HTTP {status}" + (f": {outcome.text()}" if outcome.issues else ""))


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


class CappedRetry(Retry):
    """urllib3 Retry that caps one Retry-After wait and counts every retry it grants."""

    retry_after_cap: float = 120.0
    stats: RequestStats | None = None

    def get_retry_after(self, response: Any) -> float | None:
        value = super().get_retry_after(response)
        return None if value is None else min(value, self.retry_after_cap)

    def increment(self, method: str | None = None, *args: Any, **kwargs: Any) -> CappedRetry:
        retry = super().increment(method, *args, **kwargs)  # raises MaxRetryError when the budget is spent
        if self.stats is not None:
            writes = 1 if method in ("POST", "PUT", "PATCH", "DELETE") else 0
            self.stats.add(requests=1, writes=writes, retries=1)
        return retry

    def new(self, **kw: Any) -> CappedRetry:
        retry = super().new(**kw)
        retry.retry_after_cap = self.retry_after_cap
        retry.stats = self.stats
        return retry


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retry settings."""

    attempts: int = 5
    backoff_factor: float = 0.5
    backoff_max: float = 30.0
    jitter: float = 0.5
    retry_after_cap: float = 120.0

    def urllib3_retry(self, stats: RequestStats | None = None) -> Retry:
        """The urllib3 Retry object for these settings (counting retries into ``stats``)."""
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
        return retry


class FhirClient:
    """Talks to one FHIR base URL. Thread-safe for concurrent use (one requests.Session, pooled)."""

    def __init__(
        self,
        base_url: str,
        *,
        session: requests.Session | None = None,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        pool_size: int = 8,
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.session = session or requests.Session()
        self.timeout = timeout
        self.stats = RequestStats()
        self.retry = retry or RetryPolicy()
        adapter = HTTPAdapter(max_retries=self.retry.urllib3_retry(self.stats), pool_maxsize=pool_size,
                              pool_connections=pool_size)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers.setdefault("Accept", FHIR_JSON)

    # -- core ------------------------------------------------------------------------------------------

    def request(self, method: str, path: str, *, json_body: Any = None, params: dict[str, str] | None = None,
                headers: dict[str, str] | None = None, outcome_statuses: tuple[int, ...] = ()) -> requests.Response:
        """Send one request (with transport retries); refresh auth once on 401; raise FhirHttpError on failure.

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
        if response.status_code in (401, 403) and hasattr(self.session.auth, "unauthorized_error"):
            raise self.session.auth.unauthorized_error(response)  # type: ignore[union-attr]
        if response.status_code in outcome_statuses and _is_outcome(response):
            return response
        if response.status_code >= 400:
            outcome = summarize_outcome(_json_or_none(response))
            error = FhirHttpError(method, _path_only(url, self.base_url), response.status_code, outcome)
            if error.action is Action.AUTH:
                raise AuthError(f"{error} (check credentials and granted scopes)") from None
            raise error
        return response

    def _send(self, method: str, url: str, json_body: Any, params: dict[str, str] | None,
              headers: dict[str, str]) -> requests.Response:
        data = None
        if json_body is not None:
            import orjson

            data = orjson.dumps(json_body)
        broken = 0
        while True:
            try:
                response = self.session.request(method, url, data=data, params=params, headers=headers,
                                                timeout=self.timeout, allow_redirects=False)
                break
            except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError) as exc:
                # The connection broke while the body was read: requests reads bodies after urllib3's retry
                # loop has returned, so retry here, within the same budget (our requests are safe to replay).
                self.stats.add(requests=1)
                broken += 1
                if broken > self.retry.attempts:
                    raise ServerUnavailableError(
                        f"{method} {_path_only(url, self.base_url)}: the response broke off {broken} times "
                        f"({exc.__class__.__name__})"
                    ) from None
                self.stats.add(retries=1)
                time.sleep(min(self.retry.backoff_max, self.retry.backoff_factor * 2 ** (broken - 1)))
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
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
                self.stats.add(requests=1)
                raise ServerUnavailableError(
                    f"{method} {_path_only(url, self.base_url)}: server unreachable after retries "
                    f"({exc.__class__.__name__})"
                ) from None
        self.stats.add(requests=1, writes=1 if method in ("POST", "PUT", "PATCH", "DELETE") else 0)
        if response.status_code in RETRY_STATUSES:
            # urllib3 gave up with the retry budget spent and handed back the last response.
            raise ServerUnavailableError(
                f"{method} {_path_only(url, self.base_url)}: HTTP {response.status_code} after retries"
            )
        return response

    # -- FHIR operations -------------------------------------------------------------------------------

    def capabilities(self) -> dict[str, Any]:
        """The server's CapabilityStatement."""
        return _json_object(self.request("GET", "metadata"))

    def search(self, resource_type: str, params: dict[str, str], *, max_pages: int = 20) -> Iterator[dict[str, Any]]:
        """Resources matching a search (follows `next` links on the same server only)."""
        response = self.request("GET", resource_type, params=params)
        for _ in range(max_pages):
            bundle = response.json()
            for entry in bundle.get("entry", []):
                if entry.get("search", {}).get("mode", "match") == "match" and "resource" in entry:
                    yield entry["resource"]
            next_link = next((link["url"] for link in bundle.get("link", []) if link.get("relation") == "next"), None)
            if not next_link:
                return
            response = self.request("GET", next_link)

    def search_raw(self, query: str) -> list[dict[str, Any]]:
        """Resources for a pre-encoded query such as ``Goal?identifier=sys%7Cval`` (one page)."""
        bundle = self.request("GET", query).json()
        return [e["resource"] for e in bundle.get("entry", []) if "resource" in e
                and e.get("search", {}).get("mode", "match") == "match"]

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """Read one resource."""
        return _json_object(self.request("GET", f"{resource_type}/{resource_id}"))

    def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """POST a transaction bundle; return the transaction-response bundle."""
        return _json_object(self.request("POST", "", json_body=bundle))

    def update(self, resource_type: str, resource_id: str, resource: dict[str, Any]) -> dict[str, Any]:
        """PUT a resource by id."""
        return _json_object(self.request("PUT", f"{resource_type}/{resource_id}", json_body=resource))

    def validate(self, resource: dict[str, Any], profile: str | None = None) -> dict[str, Any]:
        """``$validate`` one resource (against ``profile`` when given); the OperationOutcome, errors included."""
        return self.request("POST", f"{resource['resourceType']}/$validate", json_body=resource,
                            params={"profile": profile} if profile else None,
                            outcome_statuses=(400, 412, 422)).json()


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
    try:
        return response.json()
    except ValueError:
        return None


def _json_object(response: requests.Response) -> dict[str, Any]:
    """The response body: a FHIR resource or Bundle, always a JSON object."""
    body: dict[str, Any] = response.json()
    return body
