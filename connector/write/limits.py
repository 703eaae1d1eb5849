"""Server limits and per-type write permissions, as pure decisions (no I/O): each is unit-tested alone.

Real FHIR servers refuse requests for reasons that are not the records' fault, and peersync must not read them
as bad data (bisecting and quarantining):

* a **limit**: the bundle is too large (HTTP 413; Medplum's 400 "Transaction requires strict isolation but has
  too many entries" for more than 8 entries with conditional writes, and "Transaction contains more update
  operations than allowed" for more than 50: medplum/medplum packages/fhir-router/src/batch.ts). The run
  sends smaller bundles from then on (:class:`RunLimits`);
* a **rate limit**: 429, or a 403 whose text or headers say "rate limit" (athenahealth answers throttling
  with 403). The records stay pending (exit 69), as for any throttling that outlasts the retries;
* a **type not permitted**: 403 or 405 for a request whose types the server will not accept (an
  OperationOutcome ``forbidden``/``not-supported`` naming the type, or a 403 for a request of a single type). Those
  records are parked (``UnitState.NOT_PERMITTED``); everything else still lands;
* **auth**: 401, or a 403 for every type (a missing scope): the run stops with exit 77.

:func:`classify_failure` takes what the client kept of the answer. The server's free text is only matched
against the fixed phrases below; it is never stored or logged (it may echo patient data).
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from connector.identifiers import parse_conditional_reference
from connector.server.capabilities import Capabilities


class FailureKind(StrEnum):
    """What kind of refusal a failed write request is."""

    DATA = "data"  # anything else: handled as before (isolate content errors, review duplicates, stop on 405)
    LIMIT = "limit"  # the bundle is too large for this server: send smaller bundles
    RATE_LIMIT = "rate-limit"  # throttled: leave pending, the next run goes on
    NOT_PERMITTED = "not-permitted"  # the server does not accept writes of these types: park them
    AUTH = "auth"  # credentials or scope: the run stops (77)


@dataclass(frozen=True)
class Failure:
    """A classified failure: its kind, the types the server named (NOT_PERMITTED), and the entry limit the
    server stated (LIMIT), when it said one."""

    kind: FailureKind
    types: frozenset[str] = frozenset()
    stated_limit: int | None = None


# Phrases servers use for "the bundle is too large" (lower case). Medplum's are quoted from its source.
LIMIT_PHRASES = (
    "transaction requires strict isolation but has too many entries",  # Medplum: > 8 with conditional writes
    "transaction contains more update operations than allowed",  # Medplum: > 50 updates
    "too many entries",
    "too many resources",
    "bundle size",
    "bundle is too large",
    "request entity too large",
    "payload too large",
    "maximum number of entries",
    "exceeds the maximum",
)
# Phrases of throttling (athenahealth and API gateways answer some of it with 403).
RATE_LIMIT_PHRASES = ("rate limit", "rate-limit", "too many requests", "quota", "throttl")
_RATE_LIMIT_HEADERS = ("retry-after", "x-ratelimit-remaining", "ratelimit-remaining", "x-rate-limit-remaining")
# "at most 8 entries", "limit of 50 entries", "maximum of 25 entries", "max 8": the number, when stated.
_STATED_LIMIT = re.compile(r"(?:at most|limit(?: is| of)?|maximum(?: of| is)?|max(?:imum)?\.?|up to)\s+(\d{1,5})")
# Medplum states its limits in code, not in the message: the known values for its two messages.
_KNOWN_LIMITS = {LIMIT_PHRASES[0]: 8, LIMIT_PHRASES[1]: 50}
_NOT_PERMITTED_CODES = frozenset({"forbidden", "not-supported", "security"})


def _types_named(text: str, candidates: Collection[str]) -> frozenset[str]:
    """The candidate resource types a server message names (as whole words; case-sensitive, as FHIR types)."""
    return frozenset(t for t in candidates if re.search(rf"(?<![A-Za-z]){t}(?![A-Za-z])", text))


def classify_failure(status: int, *, issue_codes: Collection[str] = (), text: str = "",
                     headers: Mapping[str, str] | None = None, sent_types: Collection[str] = ()) -> Failure:
    """Classify a refused write request.

    ``issue_codes``: the OperationOutcome issue codes; ``text``: the server's raw messages (diagnostics,
    details), only matched here; ``headers``: the answer's headers (names in any case); ``sent_types``: the
    resource types the request carried (Provenance included).
    """
    lowered = text.lower()
    header_names = {k.lower() for k in (headers or {})}
    if status == 401:
        return Failure(FailureKind.AUTH)
    if status == 429 or (status == 403 and (any(p in lowered for p in RATE_LIMIT_PHRASES)
                                            or any(h in header_names for h in _RATE_LIMIT_HEADERS))):
        return Failure(FailureKind.RATE_LIMIT)
    limit_phrase = next((p for p in LIMIT_PHRASES if p in lowered), None)
    if status == 413 or (status in (400, 422) and limit_phrase):
        stated = _STATED_LIMIT.search(lowered)
        return Failure(FailureKind.LIMIT, stated_limit=int(stated.group(1)) if stated
                       else _KNOWN_LIMITS.get(limit_phrase or ""))
    named = _types_named(text, sent_types)
    refusal = status in (403, 405) or (status in (400, 422) and bool(_NOT_PERMITTED_CODES & set(issue_codes)))
    if refusal and named:
        return Failure(FailureKind.NOT_PERMITTED, types=named)
    written = frozenset(sent_types) - {"Provenance"}
    if status == 403 and len(written) == 1:
        # One type in the request (besides its Provenance): the refusal is about that type.
        return Failure(FailureKind.NOT_PERMITTED, types=written)
    if status == 403:
        # Several types, none named: the caller sends them apart to learn which one is refused.
        return Failure(FailureKind.NOT_PERMITTED)
    return Failure(FailureKind.DATA)  # e.g. a 405 for a whole transaction: the server lacks the operation


def next_max_entries(current: int, sent: int, stated_limit: int | None, *, floor: int = 1) -> int | None:
    """The new limit on resources per bundle (the Provenance each bundle adds not counted) after a bundle of
    ``sent`` resources was refused as too large, or None when it cannot go lower (already at ``floor``, or
    the refused bundle was a single record that cannot be cut). A limit the server stated wins (one entry
    kept for the Provenance); otherwise the refused size is halved."""
    candidate = stated_limit - 1 if stated_limit else sent // 2
    lowered = max(floor, min(current, candidate))
    return lowered if lowered < sent else None


_STRATEGIES = ("transaction", "batch", "single")


@dataclass
class RunLimits:
    """What this run has learnt about the server's limits and permissions; shared by the write threads.

    ``max_entries``: resources per bundle (starts at ``sync.max_bundle_entries``, only ever lowered);
    ``strategy``: the write strategy the writer should use from now on (``transaction`` -> ``batch`` ->
    ``single`` when even the smallest bundle is refused as too large: read by the write strategies);
    ``refused``: type -> why it is not permitted (from the CapabilityStatement, an earlier run, or a 403/405).
    """

    max_entries: int
    floor: int = 1
    strategy: str = "transaction"
    refused: dict[str, str] = field(default_factory=dict)
    adaptations: list[str] = field(default_factory=list)  # what the run adapted, for the summary (PHI-free)
    forbidden_seen: bool = False  # a 403 or 405 was answered in this run
    wrote_any: bool = False  # a write was confirmed in this run
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def strategy_downgrade(self) -> bool:
        """True once the run fell back from transactions."""
        return self.strategy != _STRATEGIES[0]

    def lower(self, sent: int, stated_limit: int | None) -> int | None:
        """Lower ``max_entries`` after a bundle of ``sent`` resources was refused as too large. Returns the limit
        to re-send with (None: cannot go lower). Records an adaptation only when the limit actually changed."""
        with self._lock:
            lowered = next_max_entries(self.max_entries, sent, stated_limit, floor=self.floor)
            if lowered is None or lowered >= self.max_entries:
                return lowered
            self.max_entries = lowered
            self._note(f"bundles of at most {lowered + 1} entries (server limit)")
            return lowered

    def downgrade_strategy(self) -> str | None:
        """Fall back to the next write strategy (transaction -> batch -> single); None when at the last one."""
        with self._lock:
            at = _STRATEGIES.index(self.strategy)
            if at + 1 >= len(_STRATEGIES):
                return None
            self.strategy = _STRATEGIES[at + 1]
            self._note(f"{self.strategy} instead of {_STRATEGIES[at]} (server limit)")
            return self.strategy

    def refuse(self, types: Iterable[str], reason: str) -> list[str]:
        """Mark types not permitted for the rest of the run; returns the ones that were not known yet."""
        with self._lock:
            new = sorted(t for t in set(types) if t not in self.refused)
            for resource_type in new:
                self.refused[resource_type] = reason
            return new

    def refused_of(self, types: Iterable[str]) -> list[str]:
        """The given types that are not permitted; every type when Provenance (part of every bundle) is."""
        types = list(types)
        with self._lock:
            if "Provenance" in self.refused:
                return sorted(set(types) | {"Provenance"})
            return sorted(t for t in set(types) if t in self.refused)

    def note_forbidden(self) -> None:
        """A 403 or 405 was answered."""
        self.forbidden_seen = True

    def note_written(self) -> None:
        """A write was confirmed."""
        self.wrote_any = True

    def refused_everything(self) -> bool:
        """The server answered 403/405 and confirmed nothing in this run: a missing scope, not a type (77)."""
        return self.forbidden_seen and not self.wrote_any

    def _note(self, adaptation: str) -> None:
        if adaptation not in self.adaptations:
            self.adaptations.append(adaptation)


def refused_by_capabilities(capabilities: Capabilities | None, written_types: Iterable[str]) -> dict[str, str]:
    """Written types the CapabilityStatement says the server will not write: type -> reason.

    A statement that lists no resources says nothing. A listed type whose interactions include neither
    ``create`` nor ``update`` is refused (declared read/search only, as Epic documents CarePlan and Goal); a
    written type missing from a statement that lists resources is refused. A listed type without interactions
    says nothing either way.
    """
    if capabilities is None or not capabilities.resources:
        return {}
    refused: dict[str, str] = {}
    for resource_type in sorted(set(written_types)):
        declared = capabilities.resource(resource_type)
        if declared is None:
            refused[resource_type] = "not in the server's CapabilityStatement"
        elif declared.interactions and not declared.interactions & {"create", "update"}:
            refused[resource_type] = "the server's CapabilityStatement declares no create or update"
    return refused


def permissions_fingerprint(capabilities: Capabilities | None, written_types: Iterable[str], *settings: str) -> str:
    """A fingerprint of what decides per-type permissions (the statement's write interactions for the written
    types, and the settings given): parked records are retried when it changes."""
    parts = list(settings)
    for resource_type in sorted(set(written_types)):
        declared = capabilities.resource(resource_type) if capabilities else None
        parts.append(f"{resource_type}:" + (",".join(sorted(declared.interactions)) if declared else "-"))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def logical_references(resource: dict[str, Any], parked: Collection[str]) -> dict[str, Any]:
    """A copy of ``resource`` in which every conditional reference to a parked type (``Type?identifier=...``)
    is a logical reference instead (``{"type", "identifier"}``, its ``display`` kept): never a literal
    reference to something the server does not have. Copy on write: unchanged parts are shared."""
    if not parked:
        return resource
    out = _logical(resource, frozenset(parked))
    return out if isinstance(out, dict) else resource


def _logical(node: Any, parked: frozenset[str]) -> Any:
    if isinstance(node, dict):
        reference = node.get("reference")
        if isinstance(reference, str):
            target = parse_conditional_reference(reference)
            if target is not None and target[0] in parked:
                logical: dict[str, Any] = {"type": target[0],
                                           "identifier": {"system": target[1], "value": target[2]}}
                if "display" in node:
                    logical["display"] = node["display"]
                return logical
        changed: dict[str, Any] | None = None
        for key, value in node.items():
            if isinstance(value, dict | list):
                new = _logical(value, parked)
                if new is not value:
                    changed = changed if changed is not None else dict(node)
                    changed[key] = new
        return node if changed is None else changed
    if isinstance(node, list):
        items: list[Any] | None = None
        for index, item in enumerate(node):
            new = _logical(item, parked)
            if new is not item:
                items = items if items is not None else list(node)
                items[index] = new
        return node if items is None else items
    return node


def unit_types(resources: Iterable[dict[str, Any]]) -> list[str]:
    """The resource types of a unit's resources (sorted, once each)."""
    return sorted({str(r.get("resourceType")) for r in resources})
