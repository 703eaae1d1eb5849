"""The writer: everything a sync run sends to the FHIR server, one participant at a time.

For each participant with changes: resolve the Patient by MRN (never create it; 0 or several matches go to
the review queue), map the changed units, and send them as transactions of conditional updates with a
Provenance. A rejected transaction is split until the entries at fault are found; those are quarantined
with the server's reason, and the rest lands. Transient failures are retried by the HTTP layer and then left
pending for the next run. The ledger marks a unit sent only after the server confirmed it.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from connector.errors import (
    ServerUnavailableError,
)
from connector.identifiers import identifier_system, token_query
from connector.map import change_set_author
from connector.map.units import iter_planned_units, map_planned_global_units
from connector.model import Enrollment, RecordKind
from connector.ops.logs import RUN_ID, opaque_key, outcome_codes
from connector.plan.ledger import ConfirmedUnit, Ledger, UnitState
from connector.plan.planner import (
    UNIT_RESOURCE_TYPES,
    Act,
    PlannedUnit,
    participants_to_write,
    units_to_write,
)
from connector.read.staging import Staging
from connector.server.capabilities import Capabilities
from connector.server.client import Action, FhirClient, FhirHttpError, HttpAnswer, summarize_outcome
from connector.write.bundle import BuiltBundle, Identity, PendingWrite, UnitWrite, identity_of
from connector.write.changeset import STATUS_ELEMENT, build_change_set, void_bundle
from connector.write.conditions import find_condition_refs
from connector.write.confirm import confirm_writes
from connector.write.decisions import (
    CONDITIONAL_EVERYWHERE,
    FailureStep,
    WritePlan,
    chunk_writes,
    halves,
    is_unresolved_reference,
    step_after_failure,
    write_plan,
)
from connector.write.outcomes import without_unknown_outcomes
from connector.write.patients import PatientPrefetch, prefetch_for

if TYPE_CHECKING:
    from connector.run import SyncOptions

log = logging.getLogger(__name__)

# The types written by conditional update (Provenance is only ever created).
UPDATED_TYPES = frozenset(t for types in UNIT_RESOURCE_TYPES.values() for t in types)


def updated_types(contact_procedures: str) -> frozenset[str]:
    """The types this deployment writes by conditional update: contacts may be Procedures too, or instead."""
    if contact_procedures == "also":
        return UPDATED_TYPES | {"Procedure"}
    if contact_procedures == "instead":
        return (UPDATED_TYPES - {"Communication"}) | {"Procedure"}
    return UPDATED_TYPES


class Writer:
    """Writes one run's planned units; counts what happened into the run's counter."""

    def __init__(self, opts: SyncOptions, client: FhirClient, counts: Counter[str], *,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.opts = opts
        self.client = client
        self.clock = clock
        self.counts = counts
        self._counts_lock = threading.Lock()
        self._server_down = threading.Event()
        self.plan: WritePlan = CONDITIONAL_EVERYWHERE  # set from the CapabilityStatement by write()
        self._patients: PatientPrefetch | None = None  # Patients looked up in batches (first syncs)
        self._down_reason = "the FHIR server stopped answering"
        self.pending_reasons: Counter[str] = Counter()  # why units were left pending (PHI-free): the run summary

    def write(self, staging: Staging, ledger: Ledger, *,
              on_progress: Callable[[int, int], None] | None = None) -> None:
        """Write the global units, then every participant with changes (in parallel)."""
        self.plan = self._write_plan()
        self._write_global_units(staging, ledger)
        participants = participants_to_write(staging)
        self._patients = prefetch_for(self.client, staging, participants, self.opts.ctx.mrn_system)
        done = 0
        if on_progress:
            on_progress(0, len(participants))
        try:
            with ThreadPoolExecutor(max_workers=self.opts.concurrency, thread_name_prefix="peersync") as pool:
                run_id = RUN_ID.get()
                futures = [pool.submit(self._participant_in_run, run_id, staging, ledger, p) for p in participants]
                for future in futures:
                    future.result()
                    done += 1
                    if on_progress:
                        on_progress(done, len(participants))
        finally:
            if self._patients is not None:
                self._patients.close()
        if self._server_down.is_set():
            raise ServerUnavailableError(f"{self._down_reason}; unsent records stay pending and the next run "
                                         "sends them")

    def _participant_in_run(self, run_id: str, staging: Staging, ledger: Ledger, participant: str) -> None:
        RUN_ID.set(run_id)  # worker threads carry the run id in their log lines
        # SQLite connections are per thread: each worker reads staging through its own connection.
        with Staging(staging.path, create=False) as own:
            if self._server_down.is_set():
                self._mark_all(own, ledger, participant, UnitState.PENDING, "not attempted: server unavailable")
                return
            try:
                self._participant(own, ledger, participant)
            except ServerUnavailableError as exc:
                if not self._server_down.is_set():
                    self._down_reason = str(exc)
                self._server_down.set()
                log.warning("server unavailable: %s", exc, extra={"event": "server-unavailable"})
                self._mark_all(own, ledger, participant, UnitState.PENDING, f"server unavailable: {exc}"[:300])
            except FhirHttpError as exc:
                # An answer the write path does not expect (e.g. a read that fails while voiding): this
                # participant's records stay pending for the next run; the other participants go on.
                log.warning("participant left pending: HTTP %s on %s", exc.status, exc.path,
                            extra={"event": "pending", "participant_key": opaque_key(participant),
                                   "status": exc.status})
                self._mark_all(own, ledger, participant, UnitState.PENDING, f"HTTP {exc.status} on {exc.path}")

    # -- capabilities ----------------------------------------------------------------------------------

    def _write_plan(self) -> WritePlan:
        """How to write each type: from ``server.write_mode`` and the server's CapabilityStatement."""
        if self.opts.write_mode == "conditional":
            return CONDITIONAL_EVERYWHERE
        try:
            capabilities: Capabilities | None = Capabilities.parse(self.client.capabilities())
        except FhirHttpError as exc:
            log.warning("could not read the CapabilityStatement (HTTP %s); assuming conditional update",
                        exc.status, extra={"event": "capabilities-unavailable", "status": exc.status})
            capabilities = None
        plan = write_plan(self.opts.write_mode, capabilities, updated_types(self.opts.ctx.contact_procedures))
        if not plan.transaction_declared:
            log.warning("the server does not declare transaction support; peersync writes only in transactions "
                        "(run peersync doctor)", extra={"event": "capabilities-no-transaction"})
        if plan.search_types and self.opts.write_mode == "auto":
            log.warning("server lacks conditional update for %s: using search-then-write for them",
                        ", ".join(plan.search_types), extra={"event": "write-mode-fallback"})
        return plan

    # -- global units (program, supporters, community organizations) -----------------------------------

    def _write_global_units(self, staging: Staging, ledger: Ledger) -> None:
        writes = map_planned_global_units(staging, units_to_write(staging, None), self.opts.ctx)
        for chunk in chunk_writes(writes, self.opts.max_bundle_entries):
            self._send(ledger, chunk, patient=None, participant=None, author=None)

    # -- one participant -------------------------------------------------------------------------------

    def _participant(self, staging: Staging, ledger: Ledger, participant: str) -> None:
        planned = units_to_write(staging, participant)
        deletes = [u for u in planned if u.action is Act.DELETE]
        writes = [u for u in planned if u.action is not Act.DELETE]
        enrollment = staging.record(RecordKind.ENROLLMENT, participant)
        if writes and isinstance(enrollment, Enrollment):
            self._write_participant(staging, ledger, enrollment, writes)
        for unit in deletes:
            self._void_remote(ledger, unit.unit_key, unit.kind, participant)

    def _write_participant(self, staging: Staging, ledger: Ledger, enrollment: Enrollment,
                           planned: list[PlannedUnit]) -> None:
        participant = enrollment.enrollment_id
        mrn_system = enrollment.mrn_system or self.opts.ctx.mrn_system
        patient_id, reason, detail = self._resolve_patient(mrn_system, enrollment.mrn)
        ledger.set_participant(participant, patient_id=patient_id, mrn_hash=ledger.mrn_hash(mrn_system, enrollment.mrn),
                               state="resolved" if patient_id else UnitState.REVIEW, detail=detail,
                               close_review=patient_id is not None)
        if patient_id is None:
            if any((known := ledger.unit(unit.unit_key)) is not None and known.patient_id for unit in planned):
                # e.g. the MRN was changed to one the EHR does not know: say what stays behind on the old Patient.
                detail += ("; this participant's earlier records remain active on the previously matched Patient "
                           "(not changed by peersync)")
            ledger.open_review(f"participant:{participant}", reason or "patient-unresolved", detail, RUN_ID.get())
            for unit in planned:
                ledger.record_state(unit.unit_key, kind=unit.kind, participant=participant, state=UnitState.REVIEW,
                                    detail=f"{reason}: {detail}", run_id=RUN_ID.get(), attempt_hash=unit.unit_hash)
                self._count("in_review")
            log.warning("participant sent to review: %s", reason,
                        extra={"event": "review", "participant_key": opaque_key(participant), "code": reason})
            return
        self._retire_moved_units(ledger, [u.unit_key for u in planned], patient_id)
        patient_identity: Identity = ("Patient", mrn_system, enrollment.mrn)
        author = change_set_author(enrollment, self.opts.ctx)
        patient = (patient_identity, f"Patient/{patient_id}")
        deferred: list[PendingWrite] = []
        # the EHR's own Conditions the CarePlan addresses: looked up like the Patient, only when the plan is sent
        condition_refs = (find_condition_refs(self.client, patient_id, enrollment.conditions)
                          if any(u.kind == "enrollment" for u in planned) else [])
        for chunk in chunk_writes(iter_planned_units(staging, participant, planned, self.opts.ctx,
                                                     condition_refs=condition_refs),
                                  self.opts.max_bundle_entries):
            self._send(ledger, chunk, patient=patient, participant=participant, author=author,
                       patient_id=patient_id, deferred=deferred)
        if deferred:
            # Units that only failed on a reference to something not yet written (a CarePlan and the requests
            # that point back at it, split apart): now everything else has landed, send them together once more.
            deferred = self._drop_lost_outcomes(ledger, deferred)
            self._send(ledger, deferred, patient=patient, participant=participant, author=author,
                       patient_id=patient_id, deferred=None)

    def _drop_lost_outcomes(self, ledger: Ledger, deferred: list[PendingWrite]) -> list[PendingWrite]:
        """The deferred units, with CarePlan outcome links to contacts that did not land taken out (see
        connector/write/outcomes.py); such a CarePlan is recorded without the plan's hash, so the next run resends
        it whole."""
        in_batch = {identity_of(r) for w in deferred for r in w.unit.resources if r.get("identifier")}

        def known(identity: Identity) -> bool:
            return identity in in_batch or bool(ledger.server_ids([identity]))

        out = []
        for write in deferred:
            resources, dropped = [], 0
            for resource in write.unit.resources:
                if resource.get("resourceType") == "CarePlan":
                    resource, n = without_unknown_outcomes(resource, known)
                    dropped += n
                resources.append(resource)
            if dropped:
                log.warning("CarePlan sent without %d outcome link(s) to contacts that did not land; resent next run",
                            dropped, extra={"event": "careplan-outcomes-dropped"})
                unit = write.unit
                write = PendingWrite(UnitWrite(unit.unit_key, unit.kind, resources, unit.voided), None)
            out.append(write)
        return out

    def _resolve_patient(self, mrn_system: str, mrn: str) -> tuple[str | None, str | None, str]:
        """(patient id, review reason, PHI-free detail). A search or read the server refuses (4xx) sends the
        participant to review: it must not end the run for everyone (exit 1), run after run."""
        try:
            return self._match_patient(mrn_system, mrn)
        except FhirHttpError as exc:
            if exc.action not in (Action.ISOLATE, Action.CONFLICT):
                raise
            return None, "patient-search-failed", f"the server refused the Patient search: HTTP {exc.status}: " \
                                                  f"{exc.outcome.text()}"[:300]

    def _match_patient(self, mrn_system: str, mrn: str) -> tuple[str | None, str | None, str]:
        """(patient id, review reason, PHI-free detail). Follows Patient.link replaced-by up to 3 hops."""
        matches = self._patients.matches(mrn_system, mrn) if self._patients else None  # batched look-ups
        if matches is None:
            matches = self.client.search_raw(f"Patient?identifier={token_query(mrn_system, mrn)}")
        if not matches:
            return None, "patient-not-found", "no Patient has this participant's MRN"
        if len(matches) > 1:
            return None, "patient-ambiguous", f"{len(matches)} Patients share this participant's MRN"
        patient = matches[0]
        for _hop in range(3):
            successor = next((link.get("other", {}).get("reference") for link in patient.get("link", [])
                              if link.get("type") == "replaced-by"), None)
            if not successor or not successor.startswith("Patient/"):
                break
            patient = self.client.read("Patient", successor.split("/", 1)[1])
        if patient.get("active") is False:
            return None, "patient-inactive", "the matching Patient is inactive and names no replacement"
        return patient["id"], None, "matched by MRN"

    # -- sending with failure isolation ----------------------------------------------------------------

    def _send(self, ledger: Ledger, units: list[PendingWrite], *,
              patient: tuple[Identity, str] | None, participant: str | None, author: str | None,
              patient_id: str | None = None, deferred: list[PendingWrite] | None = None) -> None:
        """Send units as one transaction; on a content error, split until the bad units are isolated.

        A single unit that fails only on an unresolved reference is appended to ``deferred`` (when given)
        instead of being quarantined: its target may land later in the same run.
        """
        resolved: dict[Identity, str | None] = {}  # what the ledger resolved references to (lost-target check)
        try:
            # Building may search (search-then-write): two matches there are a duplicate on the server (review).
            built = self._build(ledger, units, patient, author, resolved)
            answer = self.client.send_transaction(built.bundle)
        except FhirHttpError as exc:
            # The builder rewrote references in copies: the units are as mapped, ready to be sent again.
            unresolved = is_unresolved_reference(exc.status, exc.outcome.text())
            step = step_after_failure(exc.action, units=len(units), can_defer=deferred is not None,
                                      unresolved_reference=unresolved)
            if step is FailureStep.SPLIT:
                for half in halves(units):
                    self._send(ledger, half, patient=patient, participant=participant, author=author,
                               patient_id=patient_id, deferred=deferred)
            elif step is FailureStep.DEFER and deferred is not None:
                deferred.extend(units)
            elif unresolved and step is FailureStep.RECORD and self._resend_lost_targets(ledger, units, resolved,
                                                                                          participant):
                return
            else:
                self._record_failure(ledger, units, exc, participant)
                if step is FailureStep.STOP:
                    raise
            return
        self._record_success(ledger, units, built, answer, participant, patient_id)

    def _build(self, ledger: Ledger, writes: list[PendingWrite], patient: tuple[Identity, str] | None,
               author: str | None, cache: dict[Identity, str | None] | None = None) -> BuiltBundle:
        """The units' change set; ``cache`` receives the server ids the ledger resolved for its references."""
        cache = {} if cache is None else cache

        def resolve(identity: Identity) -> str | None:
            if identity not in cache:
                cache[identity] = ledger.server_ids([identity]).get(identity)
            return cache[identity]

        built = build_change_set(writes, ctx=self.opts.ctx, patient=patient, resolve=resolve, author=author,
                                 recorded=self.clock(),
                                 conditional_provenance=self.plan.provenance_conditional_create)
        if self.plan.conditional_types is not None:
            self._apply_search_mode(built, resolve)
        return built

    def _apply_search_mode(self, built: BuiltBundle, resolve: Callable[[Identity], str | None]) -> None:
        """For types without conditional update: search by identifier, then PUT by id or POST."""
        for entry, (_unit_key, identity) in zip(built.bundle["entry"], built.entries, strict=False):
            resource_type = identity[0]
            if self.plan.uses_conditional(resource_type):
                continue
            known = resolve(identity)
            if known is None:
                found = self.client.search_raw(f"{resource_type}?identifier={token_query(identity[1], identity[2])}")
                if len(found) > 1:
                    raise FhirHttpError("GET", f"/{resource_type}", 412, summarize_outcome(None))
                known = found[0]["id"] if found else None
            if known:
                entry["resource"]["id"] = known
                entry["request"] = {"method": "PUT", "url": f"{resource_type}/{known}"}
            else:
                entry["request"] = {"method": "POST", "url": resource_type}

    def _record_success(self, ledger: Ledger, units: list[PendingWrite], built: BuiltBundle,
                        answer: HttpAnswer, participant: str | None, patient_id: str | None) -> None:
        """Mark sent exactly the units the answer proves written (connector.write.confirm); the others stay
        pending with the reason. The Provenance covers every unit of the bundle: unproven, none is sent."""
        confirmation = confirm_writes(built.bundle, answer.status, answer.body, answer.content_type)
        verdicts = confirmation.entries
        provenance = verdicts[-1] if built.has_provenance else None
        confirmed: dict[str, list[tuple[str, str, str, str | None, str | None]]] = {}
        statuses: dict[str, list[str]] = {}
        unproven: dict[str, str] = {}
        for (unit_key, identity), verdict in zip(built.entries, verdicts, strict=False):
            confirmed.setdefault(unit_key, []).append((*identity, verdict.server_id, verdict.version))
            statuses.setdefault(unit_key, []).append(verdict.status)
            if not verdict.confirmed:
                unproven.setdefault(unit_key, verdict.reason or "not confirmed")
        if provenance is not None and not provenance.confirmed:
            for w in units:
                unproven.setdefault(w.unit.unit_key, f"Provenance: {provenance.reason or 'not confirmed'}")
        ledger.record_confirmed_many(
            [ConfirmedUnit(w.unit.unit_key, w.unit.kind, participant, w.unit_hash or "", w.unit.voided, patient_id,
                           confirmed.get(w.unit.unit_key, []), " ".join(statuses.get(w.unit.unit_key, [])))
             for w in units if w.unit.unit_key not in unproven],
            run_id=RUN_ID.get())
        for w in units:
            unit = w.unit
            if unit.unit_key in unproven:
                self._leave_unconfirmed(ledger, unit, w.unit_hash, participant, unproven[unit.unit_key])
                continue
            codes = statuses.get(unit.unit_key, [])
            self._count("voided" if unit.voided else "created" if codes and all(c == "201" for c in codes)
                        else "updated")
        log.debug("transaction answered: %d record(s), %d of %d entries confirmed (HTTP %s)", len(units),
                  sum(v.confirmed for v in verdicts), len(verdicts),
                  " ".join(f"{code or '-'}x{n}" for code, n in sorted(Counter(v.status for v in verdicts).items())),
                  extra={"event": "transaction", "entries": len(verdicts),
                         "participant_key": opaque_key(participant) if participant else "program"})

    def _leave_unconfirmed(self, ledger: Ledger, unit: UnitWrite, unit_hash: str | None, participant: str | None,
                           reason: str) -> None:
        """A unit the server's answer does not prove written: pending, so the next run sends it again (a
        conditional write: if it did land, the replay changes nothing)."""
        ledger.record_state(unit.unit_key, kind=unit.kind, participant=participant, state=UnitState.PENDING,
                            detail=f"not confirmed: {reason}", run_id=RUN_ID.get(), attempt_hash=unit_hash)
        self._count("pending")
        with self._counts_lock:
            self.pending_reasons[f"not confirmed: {reason}"] += 1
        log.warning("record left pending: the server's answer does not confirm it (%s)", reason,
                    extra={"event": "unconfirmed", "key": opaque_key(unit.unit_key), "kind": unit.kind})

    def _record_failure(self, ledger: Ledger, units: list[PendingWrite], exc: FhirHttpError,
                        participant: str | None) -> None:
        detail = f"HTTP {exc.status}: {exc.outcome.text()}"[:500]
        for unit, unit_hash in ((w.unit, w.unit_hash) for w in units):
            if exc.action is Action.REVIEW:
                state, counter = UnitState.REVIEW, "in_review"
                ledger.open_review(unit.unit_key, "duplicate-on-server", detail, RUN_ID.get())
            elif exc.action is Action.CONFLICT:
                state, counter = UnitState.PENDING, "pending"
            else:
                state, counter = UnitState.QUARANTINED, "quarantined"
            ledger.record_state(unit.unit_key, kind=unit.kind, participant=participant, state=state, detail=detail,
                                run_id=RUN_ID.get(), attempt_hash=unit_hash)
            self._count(counter)
            log.warning("record %s: HTTP %s (%s)", state, exc.status, outcome_codes(exc.outcome.issues),
                        extra={"event": state, "key": opaque_key(unit.unit_key), "kind": unit.kind,
                               "status": exc.status})

    def _resend_lost_targets(self, ledger: Ledger, units: list[PendingWrite], resolved: dict[Identity, str | None],
                             participant: str | None) -> bool:
        """A reference the server could not resolve, to a resource the ledger says it wrote: if the server lost
        it (a restore, a refreshed test EHR), that is server state, not bad data. The target's unit is marked for
        re-send (the ledger's drift marking, as ``verify --repair`` does) and these units stay pending: the next
        run sends the target, then them. True when a lost target was found."""
        own = {w.unit.unit_key for w in units}
        suspects = [(identity, server_id) for identity, server_id in resolved.items() if server_id]
        lost: list[Identity] = []
        for identity, server_id in suspects:
            try:
                self.client.read(identity[0], server_id)
            except FhirHttpError as exc:
                if exc.status in (404, 410):
                    lost.append(identity)
        if not lost:
            return False
        targets = sorted(set(ledger.unit_keys_of(lost).values()) - own)
        detail = "re-sent: a record referenced it, but the server no longer has it (restored or refreshed?)"
        ledger.mark_drifted(targets, lost, detail=detail, run_id=RUN_ID.get())
        reason = "a resource it references was lost by the server: re-sent with its target on the next run"
        for w in units:
            ledger.record_state(w.unit.unit_key, kind=w.unit.kind, participant=participant, state=UnitState.PENDING,
                                detail=reason, run_id=RUN_ID.get(), attempt_hash=w.unit_hash)
            self._count("pending")
            with self._counts_lock:
                self.pending_reasons[reason] += 1
        log.warning("%d referenced resource(s) the ledger says were written are missing on the server: %d record(s) "
                    "marked for re-send, %d record(s) left pending until then", len(lost), len(targets), len(units),
                    extra={"event": "lost-reference-target", "key": opaque_key(units[0].unit.unit_key)})
        return True

    # -- corrections -----------------------------------------------------------------------------------

    def _void_remote(self, ledger: Ledger, unit_key: str, kind: str, participant: str | None) -> None:
        """A record gone from the source: mark its resources entered-in-error (read, set status, update by id)."""
        current = [self.client.read(res.resource_type, res.server_id) for res in ledger.resources_of(unit_key)
                   if res.resource_type in STATUS_ELEMENT and res.server_id]
        bundle = void_bundle(unit_key, current, ctx=self.opts.ctx, recorded=self.clock(),
                             conditional_provenance=self.plan.provenance_conditional_create)
        if bundle is not None:
            try:
                answer = self.client.send_transaction(bundle)
            except FhirHttpError as exc:
                ledger.record_state(unit_key, kind=kind, participant=participant, state=UnitState.QUARANTINED,
                                    detail=f"void failed: HTTP {exc.status}: {exc.outcome.text()}", run_id=RUN_ID.get())
                self._count("quarantined")
                return
            confirmation = confirm_writes(bundle, answer.status, answer.body, answer.content_type)
            if not confirmation.all_confirmed:
                reason = f"void not confirmed: {confirmation.first_reason()}"
                ledger.record_state(unit_key, kind=kind, participant=participant, state=UnitState.PENDING,
                                    detail=reason, run_id=RUN_ID.get())
                self._count("pending")
                with self._counts_lock:
                    self.pending_reasons[reason] += 1
                return
        ledger.record_voided(unit_key, run_id=RUN_ID.get())
        self._count("deleted")

    def _retire_moved_units(self, ledger: Ledger, unit_keys: list[str], patient_id: str) -> None:
        """Records now under another Patient: void the old resources and move their identifier to a retired
        system, so the conditional write creates a fresh resource under the right Patient."""
        for unit_key in unit_keys:
            unit = ledger.unit(unit_key)
            if unit is None or not unit.patient_id or unit.patient_id == patient_id:
                continue
            for res in ledger.resources_of(unit_key):
                resource_type, system, value, server_id = res.resource_type, res.system, res.value, res.server_id
                try:
                    resource = self.client.read(resource_type, server_id)
                except FhirHttpError as exc:
                    if exc.status not in (404, 410):
                        raise
                    # The server lost it (a restore, a refreshed test EHR: new Patient ids too): nothing to retire.
                    ledger.forget_resource(resource_type, system, value)
                    continue
                if resource_type in STATUS_ELEMENT:
                    resource[STATUS_ELEMENT[resource_type]] = "entered-in-error"
                kind = system.rsplit("/", 1)[1]  # systems are {base}/sid/{program}/{kind}
                retired = identifier_system(self.opts.ctx.base_url, self.opts.ctx.program_id, kind, retired=True)
                for ident in resource.get("identifier", []):
                    if ident.get("system") == system and ident.get("value") == value:
                        ident["system"] = retired
                resource.pop("meta", None)
                self.client.update(resource_type, server_id, resource)
                ledger.forget_resource(resource_type, system, value)
            log.info("record moved to another patient: old resources retired",
                     extra={"event": "moved", "key": opaque_key(unit_key)})

    # -- helpers ---------------------------------------------------------------------------------------

    def _mark_all(self, staging: Staging, ledger: Ledger, participant: str, state: UnitState, detail: str) -> None:
        for unit in units_to_write(staging, participant):
            if ledger.is_settled(unit.unit_key, unit.unit_hash):
                continue
            ledger.record_state(unit.unit_key, kind=unit.kind, participant=participant, state=state, detail=detail,
                                run_id=RUN_ID.get(), attempt_hash=unit.unit_hash)
            self._count("pending")
            with self._counts_lock:
                self.pending_reasons[detail] += 1

    def _count(self, name: str, n: int = 1) -> None:
        with self._counts_lock:
            self.counts[name] += n

