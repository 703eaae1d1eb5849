"""A small fault-injecting HTTP reverse proxy for the reliability suite (loopback only, bounded).

It sits between peersync and the local HAPI server and, per a SEEDED schedule, answers some requests itself
or breaks them, so a sync can be driven through the failures a real network and a busy EHR produce:

=====================  ==========================================================================================
fault                  what the client sees                                  did the server commit?
=====================  ==========================================================================================
``429``                429 Too Many Requests with ``Retry-After: 1``         no (not forwarded)
``500`` ``502``        500 / 502 with an OperationOutcome                    no (not forwarded)
``503``                503 with ``Retry-After: 1``                           no (not forwarded)
``reset-before``       connection reset (RST) before any response            no (not forwarded)
``drop-after-commit``  request FORWARDED, server answered, then the          yes: the worst case, the client
                       connection is reset and the answer is lost             must replay without duplicating
``500-after-commit``   request forwarded, the real answer replaced by 500    yes
``truncate-after-      request forwarded, status line, headers and half     yes
commit``               the body sent, then the connection is reset
``slow-after-commit``  request forwarded, the answer held back past the     yes
                       client's read timeout (``slow_seconds``)
``400-echo``           400 with an OperationOutcome whose diagnostics echo  no (not forwarded)
                       values of the request, as servers do: the query
                       string (an MRN search) and text values from the body
                       (notes, names), quoted and unquoted — for PHI tests
=====================  ==========================================================================================

Hostile-server modes (the server, or something in front of it, answers in ways that must never be read as
"written"); the ``*-after-commit`` ones forward the request first, so the server HAS committed:

==============================  ===================================================================================
``empty-after-commit``          200 with a ``transaction-response`` Bundle without entries
``short-after-commit``          the real answer with its last entry removed
``no-location-after-commit``    the real answer with each entry's ``location`` (and the first one's ``status``)
                                removed
``garbled-bundle-after-commit`` the real answer (a search) with three malformed entries in front: a resource
                                without an id, an entry without a resource, an entry that is not an object
``302-json-after-commit``       302 to another address, with the real JSON answer as its body
``html-200-after-commit``       200 with a ``text/html`` page (a proxy's or login page's answer)
``slow-body-after-commit``      the real status and headers, then the body one byte every ``trickle_seconds``
                                until the client gives up
``void-drop-after-commit``      like ``drop-after-commit``, but only for a transaction that voids (entered-in-error);
                                other requests pass untouched
``echo-unquoted``               409 (400 for a GET) whose diagnostics echo values of the request unquoted,
``echo-typographic``            in typographic quotes,
``echo-foreign``                or inside a non-English message (not forwarded)
==============================  ===================================================================================

EHR restrictions (:class:`Restrictions`, independent of the schedule), answered by the proxy itself, never forwarded:

=====================  ==========================================================================================
``max_entries``        a transaction or batch with more entries is refused: 413, or (``limit_status=400``) a 400
                       with Medplum's "Transaction requires strict isolation but has too many entries"
``writable_types``     a write (bundle, PUT, POST) of any other resource type is refused with 403 and an
                       OperationOutcome ``forbidden`` naming the refused types
``unprocessable``      a write (PUT, POST) to one of these routes (``Task/123``) is refused with 422 (``processing``):
                       one resource the EHR's business rules will not take
=====================  ==========================================================================================

The schedule is a ``random.Random(seed)`` consumed once per request in arrival order: with one client
connection the same seed gives the same faults; with several, the same *multiset* of faults.

Besides faults, a proxy can call ``hook(index, phase, method)`` around each request (``phase`` is
``"before-forward"`` or ``"after-commit"``): the crash tests use it to SIGKILL the client at a precise
point (e.g. after the server committed a transaction but before the client heard about it). When the hook
returns ``"reset"``, the proxy resets the connection instead of going on.

``latency_seconds`` delays every request (the concurrency test uses it to keep a run going). Request and response
bodies, URLs and headers are never logged.

Bounds: upstream must be a loopback address; request bodies up to ``max_body`` bytes; at most
``max_requests`` requests (then 503 for everything); every socket has a timeout. The proxy binds 127.0.0.1
on a free port. Stop it with :meth:`FaultProxy.stop`.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from loopback_proxy import LoopbackProxy, ProxyHandler  # tests/loopback_proxy.py (tests/ is on sys.path)

FAULTS = ("429", "500", "502", "503", "reset-before", "drop-after-commit", "500-after-commit",
          "truncate-after-commit", "slow-after-commit", "400-echo")
HOSTILE = ("empty-after-commit", "short-after-commit", "no-location-after-commit", "garbled-bundle-after-commit",
           "302-json-after-commit",
           "html-200-after-commit", "slow-body-after-commit", "void-drop-after-commit", "echo-unquoted",
           "echo-typographic", "echo-foreign")
COMMITTING_FAULTS = frozenset(f for f in FAULTS if f.endswith("-after-commit"))
_ECHO_STYLES = {
    "echo-unquoted": "HAPI-0450: Failed to process request: invalid value {v} for this element",
    "echo-typographic": "HAPI-0450: Failed to process request: invalid value \u201c{v}\u201d (\u2018{v}\u2019)",
    "echo-foreign": "HAPI-0450: Impossible de traiter la requ\u00eate\u00a0: la valeur {v} n\u2019est pas valide "
                    "(\u5024 {v} \u306f\u7121\u52b9\u3067\u3059)",
}


def _echo_values(body: bytes, limit: int = 4) -> list[str]:
    """Text values of a request body a server might echo in an error (notes, names, descriptions)."""
    try:
        document = json.loads(body or b"null")
    except ValueError:
        return []
    found: list[str] = []

    def walk(node: object) -> None:
        if len(found) >= limit:
            return
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("text", "family", "given", "description", "value") and isinstance(value, str) \
                        and len(value) > 3 and not value.startswith(("http", "urn:")):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(document)
    return found


def _echo_diagnostics(path: str, body: bytes) -> str:
    values = _echo_values(body)
    quoted = "; ".join(f'"{v[:120]}"' for v in values)
    return (f"HAPI-0450: Failed to process request {path}: invalid value {quoted or '(none)'}; "
            f"HAPI-1821: element value {values[0][:60] if values else ''} is not valid for Patient?identifier=" +
            (path.split("identifier=", 1)[1][:80] if "identifier=" in path else "x|y"))


def _hostile_answer(fault: str, payload: bytes) -> bytes:
    """A transaction answer that does not prove the writes, made from the real one."""
    try:
        answer = json.loads(payload or b"null")
    except ValueError:
        return payload
    if not isinstance(answer, dict) or answer.get("resourceType") != "Bundle":
        return payload
    entries = answer.get("entry") or []
    if fault == "empty-after-commit":
        answer["entry"] = []
    elif fault == "garbled-bundle-after-commit":
        answer["entry"] = [{"resource": {"resourceType": "Task", "status": "requested"}}, {"fullUrl": "urn:x"},
                           "not an entry", *entries]
    elif fault == "short-after-commit":
        answer["entry"] = entries[:-1]
    else:
        for index, entry in enumerate(entries):
            entry.get("response", {}).pop("location", None)
            if index == 0:
                entry.get("response", {}).pop("status", None)
    return json.dumps(answer).encode()


@dataclass
class Restrictions:
    """What a restricted EHR refuses (see the module docstring); None: no such restriction."""

    max_entries: int | None = None
    limit_status: int = 413
    writable_types: frozenset[str] | None = None
    unprocessable: frozenset[str] = frozenset()

    def refusal(self, method: str, route: str, body: bytes) -> tuple[int, bytes, str] | None:
        """(status, OperationOutcome, what) for a request this EHR refuses, or None to forward it. ``route``: the
        request path below the FHIR base, without the query ("" for a transaction or batch)."""
        if method not in ("POST", "PUT", "PATCH", "DELETE"):
            return None
        if route in self.unprocessable:
            outcome = {"resourceType": "OperationOutcome", "issue": [{
                "severity": "error", "code": "processing", "diagnostics": "Rejected by a business rule"}]}
            return 422, json.dumps(outcome).encode(), "unprocessable"
        entries: list[dict[str, object]] = []
        if route == "":
            try:
                bundle = json.loads(body or b"{}")
            except ValueError:
                return None
            entries = [e for e in bundle.get("entry") or [] if isinstance(e, dict)] if isinstance(bundle, dict) else []
            types = {str((e.get("resource") or {}).get("resourceType")) for e in entries}  # type: ignore[union-attr]
        else:
            types = {route.split("/", 1)[0]}
        if self.max_entries is not None and len(entries) > self.max_entries:
            if self.limit_status == 400:
                outcome = {"resourceType": "OperationOutcome", "issue": [{
                    "severity": "error", "code": "invalid",
                    "details": {"text": "Transaction requires strict isolation but has too many entries"}}]}
                return 400, json.dumps(outcome).encode(), "too-many-entries"
            return 413, _outcome(413, "Request entity too large: bundle size over the limit"), "too-many-entries"
        if self.writable_types is not None:
            refused = sorted(types - self.writable_types)
            if refused:
                outcome = {"resourceType": "OperationOutcome", "issue": [{
                    "severity": "error", "code": "forbidden",
                    "diagnostics": f"Access denied: this client may not write {', '.join(refused)}"}]}
                return 403, json.dumps(outcome).encode(), "type-forbidden"
        return None


def _outcome(status: int, text: str) -> bytes:
    return json.dumps({"resourceType": "OperationOutcome",
                       "issue": [{"severity": "error", "code": "transient" if status >= 500 else "throttled",
                                  "diagnostics": text}]}).encode()


@dataclass
class Schedule:
    """Which fault (or None) each request gets: seeded, with a fault rate and weights per fault kind.

    ``methods`` limits faults to those HTTP methods (e.g. only POST transactions); ``only`` lets a test
    fault exactly the requests with these 1-based indexes instead of drawing.
    """

    seed: int = 0
    rate: float = 0.0
    weights: dict[str, float] = field(default_factory=lambda: {f: 1.0 for f in FAULTS})
    methods: frozenset[str] | None = None
    only: dict[int, str] | None = None

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        unknown = set(self.weights) - set(FAULTS) - set(HOSTILE)
        if unknown:
            raise ValueError(f"unknown faults: {sorted(unknown)}")

    def draw(self, index: int, method: str) -> str | None:
        """The fault for request number ``index`` (1-based), or None to forward it untouched."""
        if self.only is not None:
            return self.only.get(index)
        if self.methods is not None and method not in self.methods:
            # No draw: the faults then follow the order of the requests they may hit (e.g. the POSTs), whatever
            # GETs the client's threads interleave, so a seed gives the same faults run after run.
            return None
        roll, pick = self._rng.random(), self._rng.random()  # always two draws: the stream stays aligned
        if roll >= self.rate:
            return None
        kinds = [k for k, w in self.weights.items() if w > 0]
        total = sum(self.weights[k] for k in kinds)
        acc = 0.0
        for kind in kinds:
            acc += self.weights[kind] / total
            if pick < acc:
                return kind
        return kinds[-1]


@dataclass
class Stats:
    """What the proxy did. ``faults`` counts injected faults by kind."""

    requests: int = 0
    forwarded: int = 0
    forwarded_writes: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    by_method: Counter[str] = field(default_factory=Counter)
    by_type: Counter[str] = field(default_factory=Counter)  # requests per resource type (first path segment)
    upstream_errors: int = 0
    restricted: Counter[str] = field(default_factory=Counter)  # requests refused by the Restrictions, by what
    echoed: list[str] = field(default_factory=list)  # the first diagnostics of 400-echo answers (PHI tests)

    @property
    def total_faults(self) -> int:
        return sum(self.faults.values())

    def as_dict(self) -> dict[str, object]:
        return {"requests": self.requests, "forwarded": self.forwarded, "forwarded_writes": self.forwarded_writes,
                "faults": dict(self.faults), "total_faults": self.total_faults, "by_method": dict(self.by_method),
                "upstream_errors": self.upstream_errors, "restricted": dict(self.restricted)}


class FaultProxy(LoopbackProxy):
    """A reverse proxy on 127.0.0.1 in front of ``upstream`` (a loopback FHIR base URL), injecting faults."""

    def __init__(self, upstream: str, schedule: Schedule | None = None, *, slow_seconds: float = 4.0,
                 trickle_seconds: float = 1.0,
                 latency_seconds: float = 0.0, max_requests: int = 20_000, max_body: int = 64 << 20,
                 upstream_timeout: float = 120.0,
                 hook: Callable[[int, str, str], str | None] | None = None,
                 restrictions: Restrictions | None = None) -> None:
        self.schedule = schedule or Schedule()
        self.slow_seconds = slow_seconds
        self.trickle_seconds = trickle_seconds
        self.latency_seconds = latency_seconds
        self.max_requests = max_requests
        self.hook = hook
        self.restrictions = restrictions or Restrictions()
        self.stats = Stats()
        super().__init__(upstream, name="faultproxy", upstream_timeout=upstream_timeout, max_body=max_body)

    def reset(self, schedule: Schedule | None = None) -> None:
        """New schedule and zeroed counters (between phases of a test)."""
        with self._lock:
            self.schedule = schedule or Schedule()
            self.stats = Stats()

    # -- the handler -----------------------------------------------------------------------------------

    def _next(self, method: str, path: str = "") -> tuple[int, str | None]:
        with self._lock:
            self.stats.requests += 1
            self.stats.by_method[method] += 1
            relative = urlsplit(path).path[len(self.upstream_path):].strip("/")
            self.stats.by_type[relative.split("/", 1)[0] or "(base)"] += 1
            index = self.stats.requests
            if index > self.max_requests:
                return index, "503"
            fault = self.schedule.draw(index, method)
            if fault:
                self.stats.faults[fault] += 1
            return index, fault

    def _handler_class(self) -> type[ProxyHandler]:
        proxy = self

        class Handler(ProxyHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length > proxy.max_body:
                    self._reply(413, _outcome(413, "request too large for the fault proxy"))
                    return
                body = self.rfile.read(length) if length else b""
                index, fault = proxy._next(self.command, self.path)
                route = self.path.split("?", 1)[0][len(proxy.upstream_path):].strip("/")
                refused = proxy.restrictions.refusal(self.command, route, body)
                if refused is not None:
                    with proxy._lock:
                        proxy.stats.restricted[refused[2]] += 1
                    self._reply(refused[0], refused[1])
                    return
                if proxy.latency_seconds:
                    time.sleep(proxy.latency_seconds)
                if proxy.hook and proxy.hook(index, "before-forward", self.command) == "reset":
                    self._reset()
                    return
                if fault == "429":
                    self._reply(429, _outcome(429, "slow down"), {"Retry-After": "1"})
                    return
                if fault in ("500", "502", "503"):
                    extra = {"Retry-After": "1"} if fault == "503" else {}
                    self._reply(int(fault), _outcome(int(fault), f"injected {fault}"), extra)
                    return
                if fault == "reset-before":
                    self._reset()
                    return
                if fault == "400-echo":
                    from urllib.parse import unquote

                    diagnostics = _echo_diagnostics(unquote(self.path), body)
                    with proxy._lock:
                        if len(proxy.stats.echoed) < 20:
                            proxy.stats.echoed.append(diagnostics)
                    outcome = json.loads(_outcome(400, diagnostics))
                    outcome["issue"][0]["code"] = "invalid"
                    self._reply(400, json.dumps(outcome).encode())
                    return
                if fault in _ECHO_STYLES:
                    from urllib.parse import unquote

                    values = _echo_values(body) or [unquote(self.path).split("|")[-1][:60]]
                    diagnostics = "; ".join(_ECHO_STYLES[fault].format(v=v[:120]) for v in values)
                    with proxy._lock:
                        if len(proxy.stats.echoed) < 20:
                            proxy.stats.echoed.append(diagnostics)
                    status = 400 if self.command == "GET" else 409
                    outcome = json.loads(_outcome(status, diagnostics))
                    outcome["issue"][0]["code"] = "processing"
                    self._reply(status, json.dumps(outcome).encode())
                    return
                if fault == "void-drop-after-commit" and b"entered-in-error" not in body:
                    with proxy._lock:
                        proxy.stats.faults[fault] -= 1  # not a void: passed through, not a fault
                    fault = None
                try:
                    status, reason, headers, payload = proxy.forward(self, body, identity=fault in HOSTILE)
                except OSError:
                    with proxy._lock:
                        proxy.stats.upstream_errors += 1
                    self._reply(502, _outcome(502, "upstream unreachable"))
                    return
                with proxy._lock:
                    proxy.stats.forwarded += 1
                    if self.command in ("POST", "PUT", "PATCH", "DELETE"):
                        proxy.stats.forwarded_writes += 1
                if proxy.hook and proxy.hook(index, "after-commit", self.command) == "reset":
                    self._reset()
                    return
                if fault in ("drop-after-commit", "void-drop-after-commit"):
                    self._reset()
                elif fault in ("empty-after-commit", "short-after-commit", "no-location-after-commit",
                               "garbled-bundle-after-commit"):
                    self._reply(status, _hostile_answer(fault, payload))
                elif fault == "302-json-after-commit":
                    self._reply(302, payload, {"Location": "http://127.0.0.1:9/elsewhere/fhir"})
                elif fault == "html-200-after-commit":
                    self._reply(200, b"<html><body><h1>Welcome</h1><p>Please sign in.</p></body></html>",
                                content_type="text/html; charset=utf-8")
                elif fault == "slow-body-after-commit":
                    self._send_head(status, reason, headers, len(payload))
                    for byte in range(len(payload)):
                        try:
                            self.wfile.write(payload[byte:byte + 1])
                            self.wfile.flush()
                        except OSError:
                            break  # the client gave up: what the scenario expects
                        time.sleep(proxy.trickle_seconds)
                    self.close_connection = True
                elif fault == "500-after-commit":
                    self._reply(500, _outcome(500, "injected 500 after the server committed"))
                elif fault == "truncate-after-commit":
                    self._send_head(status, reason, headers, len(payload))
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self._reset()
                elif fault == "slow-after-commit":
                    time.sleep(proxy.slow_seconds)
                    self._reset()
                else:
                    self._send_head(status, reason, headers, len(payload))
                    if self.command != "HEAD":
                        self.wfile.write(payload)

            def _send_head(self, status: int, reason: str, headers: list[tuple[str, str]], length: int) -> None:
                self.send_response_only(status, reason)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(length))
                self.end_headers()

            def _reply(self, status: int, payload: bytes, extra: dict[str, str] | None = None, *,
                       content_type: str = "application/fhir+json") -> None:
                self.send_response_only(status)
                self.send_header("Content-Type", content_type)
                for key, value in (extra or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _reset(self) -> None:
                """Close with RST (SO_LINGER 0): the client gets 'connection reset', nothing more."""
                with contextlib.suppress(OSError):
                    self.wfile.flush()
                try:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                except OSError:
                    pass
                self.close_connection = True
                self.wfile = io.BytesIO()  # the server's finish() flushes this harmlessly

        return Handler


__all__ = ["COMMITTING_FAULTS", "FAULTS", "HOSTILE", "FaultProxy", "Restrictions", "Schedule", "Stats"]
