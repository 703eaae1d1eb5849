"""A loopback proxy in front of the local HAPI server that behaves like a more restrictive EHR (issue 15).

HAPI accepts everything peersync can send: transactions, conditional updates, conditional references inside a
bundle, every resource type. Clinic EHRs and FHIR platforms do not. This proxy refuses what a restricted server
refuses, answering as such a server would (status, OperationOutcome), and rewrites ``/metadata`` into the
CapabilityStatement that server would publish, so peersync can (and must) learn the restriction from it.

==============================  ==================================================================================
mode                            what the proxy does
==============================  ==================================================================================
``batch-only``                  a ``transaction`` Bundle is refused (400, or ``transaction_status``; issue code
                                ``not-supported``: "transaction not supported"); batches pass. Metadata: the
                                system interactions are ``batch`` (and the search/history ones), no ``transaction``.
``no-conditional-update``       ``PUT Type?query`` (direct or as a bundle entry) is refused (400
                                ``not-supported``). Metadata: ``conditionalUpdate: false`` for every type.
``no-conditional-references``   a write whose resource holds a conditional reference (``Type?identifier=...``)
                                is refused (400 ``not-supported``). Metadata: ``referencePolicy`` literal,
                                enforced, local (R4 has no element saying "resolves conditional references").
``only-communication-           writes of any type other than Communication and Provenance (or ``writable_types``)
provenance``                    are refused (403 ``forbidden``, naming the type). Metadata: the other types keep
                                only read/search interactions, no conditional create/update (unchanged with
                                ``refusal_stated=False``: only the 403s tell).
``max-8-entries``               a batch or transaction Bundle with more than ``max_entries`` entries is refused
                                (400 ``too-costly``, "too many entries ... at most 8"; with ``limit_stated=False``
                                Medplum's 400 "Transaction requires strict isolation but has too many entries",
                                which names no number). Metadata unchanged: R4 has no element for a bundle size
                                limit (servers document it).
``rate-limit``                  every ``rate_every``-th request is answered 429 with ``Retry-After`` (not
                                forwarded). Metadata unchanged.
``unrestricted``                the baseline: everything forwarded and counted.
==============================  ==================================================================================

A refused entry of a *transaction* refuses the whole transaction (it is atomic). A *batch* is answered per
entry: the refused entries get their error in the ``batch-response``, the others are forwarded (as one batch)
and their real answers kept in place.

Why conditional references are refused rather than stored literally: HAPI always parses a reference of the form
``Type?search`` as a match URL and resolves it (or fails the write), so a proxy in front of HAPI cannot make it
store the string as it is. The refusing variant is the one a test can drive; a server storing them literally is
what peersync's post-write reference check is for.

The proxy counts requests per method and target (resource type, ``metadata``, ``transaction``, ``batch``),
bundle entries per resource type, writes per resource type that reached HAPI, and refusals per reason. Request
and response bodies, URLs and headers are never logged. It binds 127.0.0.1 on a free port and forwards only to a
loopback upstream. Stop it with :meth:`RestrictionProxy.stop` (or use it as a context manager).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from loopback_proxy import LoopbackProxy, ProxyHandler  # tests/loopback_proxy.py (tests/ is on sys.path)

MODES = ("batch-only", "no-conditional-update", "no-conditional-references", "only-communication-provenance",
         "max-8-entries", "rate-limit")
UNRESTRICTED = "unrestricted"  # the baseline: forward everything, count it
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_CONDITIONAL_REFERENCE = re.compile(r"^[A-Z][A-Za-z]+\?")
_REASONS = {400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed", 429: "Too Many Requests"}
_READ_ONLY = ("read", "vread", "search-type", "history-instance", "history-type")


@dataclass(frozen=True)
class Restriction:
    """One mode and its parameters."""

    mode: str
    max_entries: int = 8  # max-8-entries
    rate_every: int = 10  # rate-limit: every N-th request is refused
    retry_after_seconds: int = 1  # rate-limit
    writable_types: frozenset[str] = frozenset({"Communication", "Provenance"})  # only-communication-provenance
    transaction_status: int = 400  # batch-only: 400 (most servers) or 405
    limit_stated: bool = True  # max-8-entries: the message states the limit; False: Medplum's, which does not
    # only-communication-provenance: the CapabilityStatement says which types are read-only; False: it lists
    # them as writable and only the 403s tell (peersync must learn it from the answers)
    refusal_stated: bool = True

    def __post_init__(self) -> None:
        if self.mode not in (*MODES, UNRESTRICTED):
            raise ValueError(f"unknown restriction mode {self.mode!r}; one of {', '.join(MODES)}")


@dataclass(frozen=True)
class Refusal:
    """What the restricted server answers instead of doing a request (or one bundle entry)."""

    status: int
    code: str  # the OperationOutcome issue code
    reason: str  # the counter key (PHI-free)
    diagnostics: str
    headers: tuple[tuple[str, str], ...] = ()

    def outcome(self) -> dict[str, Any]:
        return {"resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": self.code, "diagnostics": self.diagnostics}]}

    def body(self) -> bytes:
        return json.dumps(self.outcome()).encode()


# -- the decisions (pure: a request or entry in, a refusal or None out) -------------------------------------------


def _entry_type(url: str) -> str:
    """The resource type an entry or request URL targets (``Type``, ``Type/id``, ``Type?query``)."""
    return re.split(r"[/?]", url.lstrip("/"), maxsplit=1)[0]


def _conditional_references(node: Any) -> bool:
    if isinstance(node, dict):
        return any((key == "reference" and isinstance(value, str) and bool(_CONDITIONAL_REFERENCE.match(value)))
                   or _conditional_references(value) for key, value in node.items())
    if isinstance(node, list):
        return any(_conditional_references(item) for item in node)
    return False


def entry_refusal(restriction: Restriction, method: str, url: str, resource: Any) -> Refusal | None:
    """The refusal for one write (a direct request or a bundle entry), or None when the server would do it."""
    if method not in WRITE_METHODS:
        return None
    resource_type = _entry_type(url)
    if restriction.mode == "no-conditional-update" and method == "PUT" and "?" in url:
        return Refusal(400, "not-supported", "conditional-update",
                       f"Conditional update is not supported for {resource_type}: update by id instead")
    if restriction.mode == "no-conditional-references" and _conditional_references(resource):
        return Refusal(400, "not-supported", "conditional-reference",
                       "Conditional references (Type?search) are not supported: use literal references (Type/id)")
    if restriction.mode == "only-communication-provenance" and resource_type not in restriction.writable_types:
        return Refusal(403, "forbidden", f"type-forbidden:{resource_type}",
                       f"This client is not permitted to write {resource_type} resources")
    return None


def bundle_refusal(restriction: Restriction, bundle_type: str, entries: int) -> Refusal | None:
    """The refusal of a whole batch or transaction Bundle, or None."""
    if restriction.mode == "batch-only" and bundle_type == "transaction":
        return Refusal(restriction.transaction_status, "not-supported", "transaction-not-supported",
                       "Transaction not supported: this server processes batch Bundles only")
    if restriction.mode == "max-8-entries" and entries > restriction.max_entries:
        if not restriction.limit_stated:  # Medplum's answer (its transaction isolation rule): no number in it
            return Refusal(400, "invalid", "too-many-entries",
                           "Transaction requires strict isolation but has too many entries")
        return Refusal(400, "too-costly", "too-many-entries",
                       f"Bundle has too many entries ({entries}): at most {restriction.max_entries} entries "
                       "per batch or transaction")
    return None


def rewrite_capabilities(restriction: Restriction, statement: dict[str, Any]) -> dict[str, Any]:
    """The CapabilityStatement the restricted server would publish, made from HAPI's (modified in place)."""
    for rest in statement.get("rest") or []:
        if restriction.mode == "batch-only":
            codes = [i for i in rest.get("interaction") or [] if i.get("code") != "transaction"]
            if not any(i.get("code") == "batch" for i in codes):
                codes.append({"code": "batch"})
            rest["interaction"] = codes
        for resource in rest.get("resource") or []:
            if restriction.mode == "no-conditional-update":
                resource["conditionalUpdate"] = False
            elif restriction.mode == "no-conditional-references":
                resource["referencePolicy"] = ["literal", "enforced", "local"]
            elif restriction.mode == "only-communication-provenance" and restriction.refusal_stated \
                    and resource.get("type") not in restriction.writable_types:
                resource["interaction"] = [i for i in resource.get("interaction") or []
                                           if i.get("code") in _READ_ONLY]
                for flag in ("conditionalCreate", "conditionalUpdate", "conditionalDelete", "updateCreate"):
                    resource.pop(flag, None)
    return statement


# -- counters -----------------------------------------------------------------------------------------------------


@dataclass
class Stats:
    """What went through the proxy (PHI-free: methods, resource types, reasons)."""

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # (method, target)
    entries: Counter[tuple[str, str]] = field(default_factory=Counter)  # (bundle type, resource type)
    forwarded_writes: Counter[str] = field(default_factory=Counter)  # resource type -> writes that reached HAPI
    refused: Counter[str] = field(default_factory=Counter)  # reason -> refused requests or entries

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    @property
    def writes(self) -> int:
        """Write requests peersync sent (bundle POSTs and direct writes), refused ones included."""
        return sum(n for (method, _), n in self.requests.items() if method in WRITE_METHODS)

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.total, "writes": self.writes,
                "by_method_target": {f"{m} {t}": n for (m, t), n in sorted(self.requests.items())},
                "entries": {f"{b} {t}": n for (b, t), n in sorted(self.entries.items())},
                "forwarded_writes": dict(sorted(self.forwarded_writes.items())),
                "refused": dict(sorted(self.refused.items()))}


# -- the proxy ----------------------------------------------------------------------------------------------------


class RestrictionProxy(LoopbackProxy):
    """A reverse proxy on 127.0.0.1 in front of ``upstream`` (a loopback FHIR base URL) enforcing a restriction."""

    def __init__(self, upstream: str, restriction: Restriction, *, max_body: int = 64 << 20,
                 upstream_timeout: float = 120.0) -> None:
        self.restriction = restriction
        self.stats = Stats()
        super().__init__(upstream, name="restriction proxy", upstream_timeout=upstream_timeout, max_body=max_body)

    def take_stats(self) -> Stats:
        """The counters so far, and fresh ones from now on (one run's requests each)."""
        with self._lock:
            stats, self.stats = self.stats, Stats()
        return stats

    # -- bookkeeping (under the lock: the handler runs one thread per connection) --------------------------------

    def _count_request(self, method: str, target: str) -> int:
        with self._lock:
            self.stats.requests[(method, target)] += 1
            return self.stats.total

    def _count(self, counter: str, key: Any, n: int = 1) -> None:
        with self._lock:
            getattr(self.stats, counter)[key] += n

    def _handler_class(self) -> type[ProxyHandler]:
        proxy = self

        class Handler(ProxyHandler):
            # -- dispatch ------------------------------------------------------------------------------------

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length > proxy.max_body:
                    self._refuse(Refusal(413, "too-costly", "body-too-large", "request too large for the proxy"))
                    return
                body = self.rfile.read(length) if length else b""
                relative = self.path[len(proxy.upstream_path):] if self.path.startswith(proxy.upstream_path) \
                    else self.path
                relative = relative.lstrip("/")
                document = _json(body) if body else None
                is_bundle = (self.command == "POST" and relative.split("?")[0] == ""
                             and isinstance(document, dict) and document.get("resourceType") == "Bundle")
                target = str(document.get("type")) if is_bundle and isinstance(document, dict) \
                    else _entry_type(relative) or "(base)"
                index = proxy._count_request(self.command, target)
                restriction = proxy.restriction
                if restriction.mode == "rate-limit" and index % restriction.rate_every == 0:
                    self._refuse(Refusal(429, "throttled", "rate-limited", "Rate limit exceeded: retry later",
                                         (("Retry-After", str(restriction.retry_after_seconds)),)))
                    return
                if is_bundle and isinstance(document, dict):
                    self._bundle(document)
                    return
                refusal = entry_refusal(restriction, self.command, relative, document)
                if refusal is not None:
                    self._refuse(refusal)
                    return
                status, headers, payload = self._forward(body)
                if self.command in WRITE_METHODS and status < 300:
                    proxy._count("forwarded_writes", target)
                if relative.split("?")[0] == "metadata" and status == 200:
                    statement = _json(payload)
                    if isinstance(statement, dict):
                        payload = json.dumps(rewrite_capabilities(restriction, statement)).encode()
                self._send(status, headers, payload)

            def _bundle(self, bundle: dict[str, Any]) -> None:
                bundle_type = str(bundle.get("type"))
                entries = [e for e in bundle.get("entry") or [] if isinstance(e, dict)]
                for entry in entries:
                    proxy._count("entries", (bundle_type, _entry_type(str(entry.get("request", {}).get("url", "")))))
                refusal = bundle_refusal(proxy.restriction, bundle_type, len(entries))
                if refusal is not None:
                    self._refuse(refusal)
                    return
                refusals = [entry_refusal(proxy.restriction, str(e.get("request", {}).get("method", "")),
                                          str(e.get("request", {}).get("url", "")), e.get("resource"))
                            for e in entries]
                if bundle_type != "batch" and any(refusals):
                    # a transaction is atomic: one refused entry refuses it all
                    self._refuse(next(r for r in refusals if r is not None))
                    return
                for refusal in filter(None, refusals):
                    proxy._count("refused", refusal.reason)
                allowed = [e for e, r in zip(entries, refusals, strict=True) if r is None]
                if len(allowed) == len(entries):
                    status, headers, payload = self._forward(json.dumps(bundle).encode())
                    self._count_forwarded_entries(entries, status, payload)
                    self._send(status, headers, payload)
                    return
                answers: list[dict[str, Any]] = []
                if allowed:
                    status, headers, payload = self._forward(json.dumps({**bundle, "entry": allowed}).encode())
                    answer = _json(payload)
                    if status >= 300 or not isinstance(answer, dict):
                        self._send(status, headers, payload)  # the upstream refused the whole batch: pass it on
                        return
                    self._count_forwarded_entries(allowed, status, payload)
                    answers = list(answer.get("entry") or [])
                merged: list[dict[str, Any]] = []
                for refusal in refusals:
                    if refusal is None:
                        merged.append(answers.pop(0) if answers else {"response": {"status": "500"}})
                    else:
                        merged.append({"response": {"status": f"{refusal.status} {_REASONS.get(refusal.status, '')}"
                                                    .strip(), "outcome": refusal.outcome()}})
                response = {"resourceType": "Bundle", "type": "batch-response", "entry": merged}
                self._send(200, [("Content-Type", "application/fhir+json;charset=utf-8")],
                           json.dumps(response).encode())

            def _count_forwarded_entries(self, entries: list[dict[str, Any]], status: int, payload: bytes) -> None:
                if status >= 300:
                    return
                answer = _json(payload)
                answered = answer.get("entry") or [] if isinstance(answer, dict) else []
                for entry, result in zip(entries, answered, strict=False):
                    method = str(entry.get("request", {}).get("method", ""))
                    code = str((result or {}).get("response", {}).get("status", ""))
                    if method in WRITE_METHODS and code.startswith("2"):
                        proxy._count("forwarded_writes", _entry_type(str(entry["request"].get("url", ""))))

            # -- I/O -----------------------------------------------------------------------------------------

            def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                try:  # uncompressed: the proxy reads and rewrites answers
                    status, _reason, headers, payload = proxy.forward(self, body, identity=True)
                except OSError:
                    return 502, [("Content-Type", "application/fhir+json")], \
                        Refusal(502, "transient", "upstream", "upstream unreachable").body()
                return status, headers, payload

            def _refuse(self, refusal: Refusal) -> None:
                proxy._count("refused", refusal.reason)
                self._send(refusal.status, [("Content-Type", "application/fhir+json;charset=utf-8"),
                                            *refusal.headers], refusal.body())

            def _send(self, status: int, headers: list[tuple[str, str]], payload: bytes) -> None:
                self.send_response_only(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

        return Handler


def _json(payload: bytes) -> Any:
    try:
        return json.loads(payload or b"null")
    except ValueError:
        return None


__all__ = ["MODES", "UNRESTRICTED", "Refusal", "Restriction", "RestrictionProxy", "Stats", "bundle_refusal",
           "entry_refusal", "rewrite_capabilities"]
