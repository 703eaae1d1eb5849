"""Writing a group of units without a transaction: batch Bundles, one request per resource, or update-as-create.

Outside a transaction nothing resolves ``Type?identifier=`` references for us, so peersync does: every reference
sent is a literal ``Type/id`` of a resource confirmed earlier in this run, known to the ledger, or found by
identifier on the server (update-as-create: the deterministic id). Entries go in requests ordered so a target is
always written, and confirmed, in an earlier request than anything that references it
(:func:`connector.write.decisions.request_waves`). Each answer is believed only when it proves the write
(:mod:`connector.write.confirm`), and a stored resource that still holds a conditional reference is an error, not
"landed". Updates by id carry ``If-Match`` with the version peersync last saw; a version conflict re-reads the
resource and retries once. The change-set's Provenance follows as its own conditional create, over the units
that landed.

Refusals that are the server's limits or permissions, not bad data, are classified per request and per batch
entry with the transaction path's function (:func:`connector.write.limits.classify_failure`): a batch refused as
too large is sent again in smaller batches and the run keeps the smaller size (:class:`RunLimits`); a 403/405
for one type fails its unit with ``refused_types`` (the writer parks that type and sends the rest); a rate limit
that outlasts the transport's retries stops the run as throttled (entry-level: the unit stays pending). Only
what is left is handled as a data error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from connector.errors import AuthError, ServerUnavailableError
from connector.identifiers import conditional_url, parse_conditional_reference, token_query
from connector.map import MappingContext
from connector.server.client import (
    Action,
    FhirClient,
    FhirHttpError,
    OutcomeSummary,
    action_for,
    outcome_messages,
    summarize_outcome,
)
from connector.write.bundle import BundledResource, Identity, PendingWrite, _rewritten, identity_of
from connector.write.changeset import (
    change_set_code,
    change_set_provenance,
    provenance_condition,
    provenance_groups,
    units_change_set,
)
from connector.write.confirm import EntryVerdict, confirm_single, confirm_writes, stored_conditional_references
from connector.write.decisions import (
    Strategy,
    WritePlan,
    deterministic_id,
    references_of,
    request_waves,
    resource_order,
)
from connector.write.limits import FailureKind, RunLimits, classify_failure, logical_references

# Statuses that, on an update by id with If-Match, mean "the version changed" (FHIR: 412; HAPI answers 409).
VERSION_CONFLICT = frozenset({409, 412})


class KnownIds:
    """Server ids and versions confirmed in this run, shared by the writer's threads."""

    def __init__(self) -> None:
        self._ids: dict[Identity, tuple[str, str | None]] = {}
        self._lock = threading.Lock()

    def get(self, identity: Identity) -> tuple[str, str | None] | None:
        """(server id, version) confirmed in this run, or None."""
        with self._lock:
            return self._ids.get(identity)

    def put(self, identity: Identity, server_id: str, version: str | None) -> None:
        """Remember a confirmed write."""
        with self._lock:
            self._ids[identity] = (server_id, version)


@dataclass
class Failure:
    """Why a unit did not land (PHI-free), and what the writer does about it."""

    action: Action
    reason: str
    unresolved_reference: bool = False
    refused_types: frozenset[str] = frozenset()  # the server does not accept writes of these: park them


@dataclass
class UnitOutcome:
    """What happened to one unit: its confirmed resources (type, system, value, id, version) and statuses, or
    the failure."""

    resources: list[tuple[str, str, str, str | None, str | None]] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    failure: Failure | None = None


@dataclass
class _Entry:
    unit_key: str
    identity: Identity
    resource: dict[str, Any]


@dataclass
class _Request:
    entry: _Entry
    method: str
    url: str
    resource: dict[str, Any]
    if_match: str | None = None


Resolver = Callable[[Identity], tuple[str, str | None] | None]


class StepwiseSender:
    """Sends groups of units as batches or single requests (see the module docstring)."""

    def __init__(self, client: FhirClient, strategy: Strategy, plan: WritePlan, ctx: MappingContext, *,
                 limits: RunLimits | None = None) -> None:
        self.client = client
        self.strategy = strategy
        self.plan = plan
        self.ctx = ctx
        # The run's learnt limits and refused types (shared with the writer); alone: no limit known yet.
        self.limits = limits if limits is not None else RunLimits(max_entries=1_000_000)

    def send(self, units: Sequence[PendingWrite], *, patient: tuple[Identity, str] | None, resolve: Resolver,
             known: KnownIds, recorded: datetime) -> dict[str, UnitOutcome]:
        """Write the units (already in reference order), then their Provenances; one outcome per unit key.

        ``resolve`` gives the (id, version) of a resource written before this group (ledger, search); what this
        group confirms goes into ``known``. A whole batch the server refuses raises FhirHttpError (the writer
        splits it as it does a transaction)."""
        entries = _entries(units)
        position = {e.identity: i for i, e in enumerate(entries)}
        targets = [{position[t] for t, deferrable in references_of(e.resource)
                    if not deferrable and t in position and position[t] < i} for i, e in enumerate(entries)]
        outcomes = {w.unit.unit_key: UnitOutcome() for w in units}

        def lookup(identity: Identity) -> tuple[str, str | None] | None:
            return known.get(identity) or resolve(identity)

        def rewrite(reference: str) -> str:
            parsed = parse_conditional_reference(reference)
            if parsed is None:
                return reference
            if patient is not None and parsed == patient[0]:
                return patient[1]
            found = lookup(parsed)
            return f"{parsed[0]}/{found[0]}" if found else reference

        for wave in request_waves(targets, one_per_request=self.strategy is not Strategy.BATCH):
            requests: list[_Request] = []
            for index in wave:
                entry = entries[index]
                outcome = outcomes[entry.unit_key]
                if outcome.failure is not None:
                    continue  # a resource of this unit failed: the rest of it waits for the next run
                if entry.identity[0] in self.limits.refused:  # refused meanwhile (another request, thread)
                    outcome.failure = _not_permitted(frozenset({entry.identity[0]}), "refused earlier in this run")
                    continue
                resource = _rewritten(entry.resource, rewrite)
                left = stored_conditional_references(resource)
                if left:
                    outcome.failure = Failure(Action.ISOLATE, f"references a {left[0]} that is not on the server "
                                                              "(not written yet, or its write failed)",
                                              unresolved_reference=True)
                    continue
                requests.append(self._request(entry, resource, lookup))
            if requests:
                self._send_wave(requests, outcomes, known)
        self._send_provenance(units, outcomes, known, rewrite=rewrite, recorded=recorded)
        return outcomes

    # -- requests --------------------------------------------------------------------------------------

    def _request(self, entry: _Entry, resource: dict[str, Any], lookup: Resolver) -> _Request:
        """The request line for one resource under this strategy and write mode."""
        resource_type, system, value = entry.identity
        if self.strategy is Strategy.UPDATE_AS_CREATE:
            found = lookup(entry.identity)
            server_id, version = found if found else (deterministic_id(resource_type, system, value), None)
            resource["id"] = server_id
            return _Request(entry, "PUT", f"{resource_type}/{server_id}", resource, version)
        if self.plan.uses_conditional(resource_type):
            return _Request(entry, "PUT", conditional_url(*entry.identity), resource)
        found = lookup(entry.identity)
        if found is None:
            matches = self.client.search_raw(f"{resource_type}?identifier={token_query(system, value)}")
            if len(matches) > 1:
                raise FhirHttpError("GET", f"/{resource_type}", 412, summarize_outcome(None))
            if matches:
                found = (matches[0]["id"], (matches[0].get("meta") or {}).get("versionId"))
        if found is None:
            return _Request(entry, "POST", resource_type, resource)
        resource["id"] = found[0]
        return _Request(entry, "PUT", f"{resource_type}/{found[0]}", resource, found[1])

    def _send_wave(self, requests: list[_Request], outcomes: dict[str, UnitOutcome], known: KnownIds) -> None:
        if self.strategy is Strategy.BATCH and len(requests) > 1:
            # A learnt bundle limit counts entries; a batch carries no Provenance, so one more resource fits.
            size = self.limits.max_entries + 1
            for start in range(0, len(requests), size):
                self._send_batch(requests[start:start + size], outcomes, known)
            return
        for request in requests:
            self._single(request, outcomes, known)

    def _send_batch(self, requests: list[_Request], outcomes: dict[str, UnitOutcome], known: KnownIds) -> None:
        """One batch Bundle, answered per entry. Refused as too large: smaller batches from now on (this one
        again, cut to the new size; one request each when it cannot go lower). Any other refusal of the whole
        batch is raised for the writer (it tells a refused type, a rate limit and bad data apart)."""
        if len(requests) == 1:
            self._single(requests[0], outcomes, known)
            return
        bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
            {"resource": r.resource, "request": _request_line(r)} for r in requests]}
        try:
            answer = self.client.send_transaction(bundle)
        except FhirHttpError as exc:
            failure = classify_failure(exc.status, issue_codes=[i["code"] for i in exc.outcome.issues],
                                       text=exc.signal_text, headers=exc.headers,
                                       sent_types={r.entry.identity[0] for r in requests})
            if failure.kind is not FailureKind.LIMIT:
                raise
            lowered = self.limits.lower(len(requests) - 1, failure.stated_limit)
            size = lowered + 1 if lowered is not None else 1
            for start in range(0, len(requests), size):
                self._send_batch(requests[start:start + size], outcomes, known)
            return
        confirmation = confirm_writes(bundle, answer.status, answer.body, answer.content_type)
        answered = (answer.body or {}).get("entry") or [] if isinstance(answer.body, dict) else []
        for i, (request, verdict) in enumerate(zip(requests, confirmation.entries, strict=True)):
            response = answered[i] if i < len(answered) and isinstance(answered[i], dict) else {}
            if not verdict.confirmed and verdict.status[:1] in ("4", "5"):
                status = int(verdict.status)
                if status in VERSION_CONFLICT and request.if_match:
                    self._single(request, outcomes, known)  # re-read and retry once, on its own
                    continue
                raw = (response.get("response") or {}).get("outcome")
                self._entry_refused(request, status, summarize_outcome(raw), outcome_messages(raw), outcomes)
                continue
            self._record(request, verdict, response.get("resource"), outcomes, known)

    def _entry_refused(self, request: _Request, status: int, outcome: OutcomeSummary, text: str,
                       outcomes: dict[str, UnitOutcome]) -> None:
        """A batch entry the server refused: its unit fails as the classification says (parked type, pending for
        a limit or throttling, or the data error's action)."""
        resource_type = request.entry.identity[0]
        failure = classify_failure(status, issue_codes=[i["code"] for i in outcome.issues], text=text,
                                   sent_types={resource_type})
        codes = f"HTTP {status}" + (f": {outcome.codes()}" if outcome.issues else "")
        if failure.kind is FailureKind.NOT_PERMITTED:
            self._refused(outcomes, request, failure.types or frozenset({resource_type}), codes)
        elif failure.kind in (FailureKind.RATE_LIMIT, FailureKind.LIMIT, FailureKind.AUTH):
            self._fail(outcomes, request, Action.RETRY_LATER, f"{failure.kind} ({codes}); sent again next run")
        else:
            self._fail(outcomes, request, action_for(status, outcome.codes()), codes)

    def _single(self, request: _Request, outcomes: dict[str, UnitOutcome], known: KnownIds) -> None:
        """One request on its own; a version conflict on an update by id re-reads the version and retries once."""
        for attempt in (1, 2):
            try:
                answer = self.client.write(request.method, request.url, request.resource, if_match=request.if_match)
            except AuthError as exc:
                self._request_refused(request, exc, outcomes)
                return
            except FhirHttpError as exc:
                if exc.status in (405, 413, 429):
                    self._request_refused(request, exc, outcomes)
                    return
                if exc.status in VERSION_CONFLICT and request.if_match and attempt == 1:
                    current = self.client.read(request.entry.identity[0], request.resource["id"])
                    request.if_match = (current.get("meta") or {}).get("versionId")
                    continue
                if exc.status in VERSION_CONFLICT and request.if_match:
                    self._fail(outcomes, request, Action.CONFLICT, "the resource changed on the server while it "
                               "was written, twice (If-Match); sent again next run")
                    return
                self._fail(outcomes, request, exc.action, f"HTTP {exc.status}" + (
                    f": {exc.outcome.text()}" if exc.outcome.issues else ""),
                    unresolved=exc.status == 404 or "HAPI-1094" in exc.outcome.text())
                return
            resource_type, system, value = request.entry.identity
            verdict = confirm_single(resource_type, (system, value), answer.status, answer.body, answer.location,
                                     answer.etag)
            self._record(request, verdict, answer.body, outcomes, known)
            return

    def _record(self, request: _Request, verdict: EntryVerdict, stored: Any, outcomes: dict[str, UnitOutcome],
                known: KnownIds) -> None:
        """A confirmed write whose stored resource (when the answer includes it) has every reference resolved."""
        if not verdict.confirmed or verdict.server_id is None:
            self._fail(outcomes, request, Action.RETRY_LATER, f"not confirmed: {verdict.reason or 'no id'}")
            return
        left = stored_conditional_references(stored) if isinstance(stored, dict) else []
        if left:
            self._fail(outcomes, request, Action.ISOLATE, f"the server stored a {left[0]} reference unresolved "
                       "(Type?identifier=); it is not landed", unresolved=True)
            return
        known.put(request.entry.identity, verdict.server_id, verdict.version)
        outcome = outcomes[request.entry.unit_key]
        outcome.resources.append((*request.entry.identity, verdict.server_id, verdict.version))
        outcome.statuses.append(verdict.status)

    def _request_refused(self, request: _Request, exc: AuthError | FhirHttpError,
                         outcomes: dict[str, UnitOutcome]) -> None:
        """A single request refused with 401/403/405/413/429: a refused type fails its unit for parking; a rate
        limit (after the transport's retries) stops the run as throttled; a limit leaves the unit pending;
        anything else is raised as it came (a 401, or a 403 that is no one type's)."""
        http = exc if isinstance(exc, FhirHttpError) else exc.http_error
        if not isinstance(http, FhirHttpError):
            raise exc
        failure = classify_failure(http.status, issue_codes=[i["code"] for i in http.outcome.issues],
                                   text=http.signal_text, headers=http.headers,
                                   sent_types={request.entry.identity[0]})
        codes = f"HTTP {http.status}" + (f": {http.outcome.codes()}" if http.outcome.issues else "")
        if failure.kind is FailureKind.NOT_PERMITTED:
            self._refused(outcomes, request, failure.types or frozenset({request.entry.identity[0]}), codes)
        elif failure.kind is FailureKind.RATE_LIMIT:
            raise ServerUnavailableError(f"the server's rate limit (HTTP {http.status}); unsent records stay pending "
                                         "and the next run sends them")
        elif failure.kind is FailureKind.LIMIT:
            self._fail(outcomes, request, Action.RETRY_LATER, f"server limit ({codes}): the server refuses this "
                       "record's single request as too large; sent again next run")
        elif isinstance(exc, AuthError):
            raise exc
        else:
            self._fail(outcomes, request, http.action, codes)

    def _refused(self, outcomes: dict[str, UnitOutcome], request: _Request, types: frozenset[str],
                 codes: str) -> None:
        """The server does not accept writes of ``types``: the run refuses them, the unit fails for parking."""
        self.limits.note_forbidden()
        self.limits.refuse(types, codes)
        outcome = outcomes[request.entry.unit_key]
        if outcome.failure is None:
            outcome.failure = _not_permitted(types, codes)

    @staticmethod
    def _fail(outcomes: dict[str, UnitOutcome], request: _Request, action: Action, reason: str, *,
              unresolved: bool = False) -> None:
        outcome = outcomes[request.entry.unit_key]
        if outcome.failure is None:
            outcome.failure = Failure(action, f"{request.entry.identity[0]}: {reason}"[:500], unresolved)

    # -- provenance ------------------------------------------------------------------------------------

    def _send_provenance(self, units: Sequence[PendingWrite], outcomes: dict[str, UnitOutcome], known: KnownIds,
                         *, rewrite: Callable[[str], str], recorded: datetime) -> None:
        """One Provenance per author and activity over the resources of the units that landed
        (:func:`~connector.write.changeset.provenance_groups`), each a conditional create on its change-set tag;
        one unproven, none of those units counts as landed."""
        landed = [w for w in units if outcomes[w.unit.unit_key].failure is None and outcomes[w.unit.unit_key].resources]
        if not landed:
            return
        bundled: list[BundledResource] = []
        for w in landed:
            ids = {(t, system, value): server_id
                   for t, system, value, server_id, _ver in outcomes[w.unit.unit_key].resources}
            for resource in w.unit.resources:
                server_id = ids.get(identity_of(resource))
                if server_id:
                    bundled.append(BundledResource(f"{resource['resourceType']}/{server_id}", resource,
                                                   w.unit.unit_key))
        units_code = units_change_set(landed)
        reason: str | None = None
        for author, activity, targets in provenance_groups(bundled, landed, self.ctx):
            code = change_set_code([units_code, author or "program", activity])
            provenance = change_set_provenance(targets, code=code, activity=activity, author=author,
                                               recorded=recorded, ctx=self.ctx)
            # An author of a type the server refuses is named by identifier, never by a reference that dangles
            provenance = _rewritten(logical_references(provenance, frozenset(self.limits.refused)), rewrite)
            if stored_conditional_references(provenance):
                reason = "Provenance: its author is not on the server"
                break
            condition = provenance_condition(self.ctx, code) if self.plan.provenance_conditional_create else None
            try:
                answer = self.client.write("POST", "Provenance", provenance, if_none_exist=condition)
            except (AuthError, FhirHttpError) as exc:
                http = exc if isinstance(exc, FhirHttpError) else exc.http_error
                if not isinstance(http, FhirHttpError):
                    raise
                failure = classify_failure(http.status, issue_codes=[i["code"] for i in http.outcome.issues],
                                           text=http.signal_text, headers=http.headers, sent_types={"Provenance"})
                if failure.kind is FailureKind.RATE_LIMIT:
                    raise ServerUnavailableError(f"the server's rate limit (HTTP {http.status}); unsent records "
                                                 "stay pending and the next run sends them") from None
                if failure.kind is FailureKind.NOT_PERMITTED:
                    refused = failure.types or frozenset({"Provenance"})
                    self.limits.note_forbidden()
                    self.limits.refuse(refused, f"HTTP {http.status}")
                    for w in landed:
                        outcomes[w.unit.unit_key].failure = _not_permitted(refused, f"HTTP {http.status}")
                    return
                if isinstance(exc, AuthError):
                    raise
                reason = f"Provenance: HTTP {http.status}"
                break
            verdict = confirm_single("Provenance", None, answer.status, answer.body, answer.location, answer.etag,
                                     conditional_create=condition is not None)
            if not verdict.confirmed:
                reason = f"Provenance: {verdict.reason}"
                break
        if reason:
            for w in landed:
                outcomes[w.unit.unit_key].failure = Failure(Action.RETRY_LATER, f"not confirmed: {reason}")


def _not_permitted(types: frozenset[str], why: str) -> Failure:
    return Failure(Action.AUTH, f"not permitted by the server: {', '.join(sorted(types))} ({why})"[:500],
                   refused_types=types)


def _entries(units: Sequence[PendingWrite]) -> list[_Entry]:
    """Every resource of the units, each unit's in its own reference order, the same identity once."""
    entries: list[_Entry] = []
    seen: set[Identity] = set()
    for write in units:
        resources = write.unit.resources
        for index in resource_order(resources):
            identity = identity_of(resources[index])
            if identity not in seen:
                seen.add(identity)
                entries.append(_Entry(write.unit.unit_key, identity, resources[index]))
    return entries


def _request_line(request: _Request) -> dict[str, str]:
    line = {"method": request.method, "url": request.url}
    if request.if_match:
        line["ifMatch"] = f'W/"{request.if_match}"'
    return line

