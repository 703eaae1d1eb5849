"""The writer: everything a sync run sends to the FHIR server, one participant at a time.

For each participant with changes: resolve the Patient by MRN (never create it; 0 or several matches go to
the review queue), map the changed units, order them so no referrer goes before its target, and send them with
the run's write strategy (:func:`connector.write.decisions.choose_strategy`): transactions of conditional
updates with a Provenance, or, outside a transaction, batches or single requests with references peersync
resolved itself (:mod:`connector.write.stepwise`). A rejected request is split until the entries at fault are
found; those are quarantined with the server's reason, and the rest lands. Transient failures are retried by the
HTTP layer and then left pending for the next run. The ledger marks a unit sent only after the server confirmed it.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from connector.errors import (
    AuthError,
    ServerUnavailableError,
)
from connector.identifiers import identifier_system, token_query
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
from connector.write.confirm import Confirmation, confirm_single, confirm_writes
from connector.write.decisions import (
    CONDITIONAL_EVERYWHERE,
    FailureStep,
    Strategy,
    StrategyChoice,
    WritePlan,
    choose_strategy,
    chunk_writes,
    deterministic_id,
    halves,
    is_unresolved_reference,
    reference_order,
    references_of,
    step_after_failure,
    strip_deferrable,
    write_plan,
)
from connector.write.limits import (
    FailureKind,
    RunLimits,
    classify_failure,
    logical_references,
    permissions_fingerprint,
    refused_by_capabilities,
    unit_types,
)
from connector.write.outcomes import without_unknown_outcomes
from connector.write.patients import PatientPrefetch, prefetch_for
from connector.write.stepwise import Failure, KnownIds, StepwiseSender

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
        self.choice = StrategyChoice(Strategy.TRANSACTION, "default", False)  # set by write()
        self.known = KnownIds()  # server ids confirmed in this run: what peersync-resolved references point at
        self._created_incomplete: set[str] = set()  # units created without a deferrable reference, completed later
        self._patients: PatientPrefetch | None = None  # Patients looked up in batches (first syncs)
        self._down_reason = "the FHIR server stopped answering"
        self.pending_reasons: Counter[str] = Counter()  # why units were left pending (PHI-free): the run summary
        # The server's limits and per-type permissions as this run learns them (connector.write.limits)
        self.limits = RunLimits(opts.max_bundle_entries)
        self.not_permitted: Counter[str] = Counter()  # units parked this run, per refused resource type
        self._parked: list[tuple[UnitWrite, str | None, str | None]] = []  # (unit, hash, participant) parked
        self.capabilities: Capabilities | None = None

    def write(self, staging: Staging, ledger: Ledger, *,
              on_progress: Callable[[int, int], None] | None = None) -> None:
        """Write the global units, then every participant with changes (in parallel)."""
        self.plan, self.choice = self._write_plan()
        ledger.set_meta("write_strategy", f"{self.choice.strategy} ({self.choice.reason})")  # `peersync plan` shows it
        fingerprint = self._seed_permissions(ledger)
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
        if self.limits.refused_everything():
            self._unpark(ledger)
            raise AuthError("the FHIR server refused every write of this run (HTTP 403/405) and accepted none: the "
                            "credentials lack write permission. Ask the EHR administrator for the write scopes "
                            "(auth.scope) or permissions; nothing was written, the records stay pending")
        ledger.set_refused_types(fingerprint, dict(self.limits.refused))
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

    def _write_plan(self) -> tuple[WritePlan, StrategyChoice]:
        """How to write each type (``server.write_mode``) and how writes travel (``server.write_strategy``), from
        the configuration and the server's CapabilityStatement (read only when a setting is auto)."""
        capabilities: Capabilities | None = None
        if self.opts.write_mode != "conditional" or self.opts.write_strategy == "auto":
            try:
                capabilities = Capabilities.parse(self.client.capabilities())
            except FhirHttpError as exc:
                log.warning("could not read the CapabilityStatement (HTTP %s); assuming conditional update",
                            exc.status, extra={"event": "capabilities-unavailable", "status": exc.status})
        self.capabilities = capabilities
        types = updated_types(self.opts.ctx.contact_procedures)
        plan = write_plan(self.opts.write_mode, capabilities, types)
        choice = choose_strategy(self.opts.write_strategy, capabilities,
                                 resolves_conditional_references=self.opts.resolves_conditional_references,
                                 written_types=types)
        log.info("write strategy: %s (%s)", choice.strategy, choice.reason,
                 extra={"event": "write-strategy", "strategy": str(choice.strategy)})
        if plan.search_types and self.opts.write_mode == "auto":
            log.warning("server lacks conditional update for %s: using search-then-write for them",
                        ", ".join(plan.search_types), extra={"event": "write-mode-fallback"})
        return plan, choice

    def _seed_permissions(self, ledger: Ledger) -> str:
        """Start the run's refused types: those the CapabilityStatement declares not writable, and those an
        earlier run was refused while the statement and settings are unchanged. Returns their fingerprint."""
        fingerprint = permissions_fingerprint_of(self.capabilities, self.opts)
        # DocumentReference only matters in clinical-note mode: a server without it is no news otherwise.
        written = updated_types(self.opts.ctx.contact_procedures) | {"Provenance"}
        if self.opts.ctx.clinical_notes == "off":
            written -= {"DocumentReference"}
        for resource_type, reason in refused_by_capabilities(self.capabilities, written).items():
            self.limits.refuse([resource_type], reason)
        stored, types = ledger.refused_types()
        if stored == fingerprint:
            for resource_type, reason in types.items():
                self.limits.refuse([resource_type], reason)
        if self.limits.refused:
            log.warning("the server does not accept writes of %s: those records are parked",
                        ", ".join(sorted(self.limits.refused)),
                        extra={"event": "types-not-permitted", "types": sorted(self.limits.refused)})
        return fingerprint

    # -- global units (program, supporters, community organizations) -----------------------------------

    def _write_global_units(self, staging: Staging, ledger: Ledger) -> None:
        writes = reference_order(map_planned_global_units(staging, units_to_write(staging, None), self.opts.ctx))
        deferred: list[PendingWrite] = []
        for chunk in chunk_writes(writes, self.limits.max_entries):
            self._send(ledger, chunk, patient=None, participant=None, deferred=deferred)
        for chunk in chunk_writes(reference_order(deferred), self.limits.max_entries):
            self._send(ledger, chunk, patient=None, participant=None, deferred=None)

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
        patient = (patient_identity, f"Patient/{patient_id}")
        deferred: list[PendingWrite] = []
        # the EHR's own Conditions the CarePlan addresses: looked up like the Patient, only when the plan is sent
        condition_refs = (find_condition_refs(self.client, patient_id, enrollment.conditions)
                          if any(u.kind == "enrollment" for u in planned) else [])
        # Targets before referrers (a CarePlan before the requests based on it): no chunk, and no half of a
        # rejected chunk, then sends a reference to something not yet written.
        ordered = reference_order(list(iter_planned_units(staging, participant, planned, self.opts.ctx,
                                                          condition_refs=condition_refs)))
        for chunk in chunk_writes(ordered, self.limits.max_entries):
            self._send(ledger, chunk, patient=patient, participant=participant,
                       patient_id=patient_id, deferred=deferred)
        # Units that failed on a reference to something not yet written, and units sent without a deferrable
        # reference (a CarePlan's activities, written after it): now everything else has landed, once more, in
        # bundles the server takes.
        for chunk in chunk_writes(self._last_pass(ledger, deferred), self.limits.max_entries):
            self._send(ledger, chunk, patient=patient, participant=participant,
                       patient_id=patient_id, deferred=None)

    def _last_pass(self, ledger: Ledger, deferred: list[PendingWrite]) -> list[PendingWrite]:
        """The deferred units in the order of their last pass: those not on the server yet in reference order,
        then those already written (a CarePlan that landed without its activities and outcome links): they point
        at the others, which no longer need them first. CarePlan outcome links to contacts that are neither in
        the pass nor written are taken out (connector/write/outcomes.py); such a CarePlan is recorded without the
        plan's hash, so the next run resends it whole."""
        def written(identity: Identity) -> bool:
            return self.known.get(identity) is not None or bool(ledger.server_ids([identity]))

        in_batch = {identity_of(r) for w in deferred for r in w.unit.resources if r.get("identifier")}
        units = self._drop_lost_outcomes(deferred, lambda identity: identity in in_batch or written(identity))
        landed = [w for w in units if w.unit.resources and all(written(identity_of(r)) for r in w.unit.resources)]
        return reference_order([w for w in units if w not in landed]) + reference_order(landed)

    @staticmethod
    def _drop_lost_outcomes(deferred: list[PendingWrite], known: Callable[[Identity], bool]) -> list[PendingWrite]:
        """The deferred units, without CarePlan outcome links to contacts that are not ``known``."""

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
                write = PendingWrite(UnitWrite(unit.unit_key, unit.kind, resources, unit.voided), None,
                                     first_send=write.first_send)
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
              patient: tuple[Identity, str] | None, participant: str | None,
              patient_id: str | None = None, deferred: list[PendingWrite] | None = None) -> None:
        """Send units as one request of the run's strategy (a transaction, or batches or single requests in
        reference order); on a content error, split until the bad units are isolated.

        A single unit that fails only on an unresolved reference is appended to ``deferred`` (when given)
        instead of being quarantined: its target may land later in the same run. So is a unit sent without a
        deferrable reference whose target is not written yet (see :meth:`_complete_later`).
        """
        units = self._park_refused(ledger, units, participant)
        if not units:
            return
        units, incomplete = self._strip_unwritten_targets(ledger, units,
                                                          same_request=self.choice.strategy is Strategy.TRANSACTION)
        if self.choice.strategy is not Strategy.TRANSACTION:
            self._send_stepwise(ledger, units, incomplete, patient=patient, participant=participant,
                                patient_id=patient_id, deferred=deferred)
            return
        if self.choice.peersync_resolves_references:
            units = self._defer_unresolvable(ledger, units, patient, participant, deferred)
            if not units:
                return
        resolved: dict[Identity, str | None] = {}  # what the ledger resolved references to (lost-target check)
        built: BuiltBundle | None = None
        resend = {"patient": patient, "participant": participant, "patient_id": patient_id,
                  "deferred": deferred}
        try:
            # Building may search (search-then-write): two matches there are a duplicate on the server (review).
            built = self._build(ledger, units, patient, resolved)
            if (len(units) > 1 and self.limits.max_entries < self.opts.max_bundle_entries
                    and len(built.bundle["entry"]) > self.limits.max_entries + 1):
                # A learned server limit counts every entry, and a change-set has one Provenance per author:
                # a bundle over the limit is split before it is sent, not refused again.
                for half in halves(units):
                    self._send(ledger, half, patient=patient, participant=participant, patient_id=patient_id,
                               deferred=deferred)
                return
            answer = self.client.send_transaction(built.bundle)
        except AuthError as exc:
            # A 403 may refuse one type (park it, write the rest) rather than every write (a missing scope: 77).
            if not isinstance(exc.http_error, FhirHttpError) or built is None \
                    or not self._adapt(ledger, units, built, exc.http_error, resend):
                raise
            return
        except FhirHttpError as exc:
            if built is not None and self._adapt(ledger, units, built, exc, resend):
                return
            # The builder rewrote references in copies: the units are as mapped, ready to be sent again.
            self._after_failure(ledger, [incomplete.get(w.unit.unit_key, w) for w in units], exc, resolved,
                                patient=patient, participant=participant, patient_id=patient_id,
                                deferred=deferred)
            return
        self.limits.note_written()
        self._record_success(ledger, units, built, answer, participant, patient_id, incomplete, deferred)

    def _after_failure(self, ledger: Ledger, units: list[PendingWrite], exc: FhirHttpError,
                       resolved: dict[Identity, str | None], *, patient: tuple[Identity, str] | None,
                       participant: str | None, patient_id: str | None,
                       deferred: list[PendingWrite] | None) -> None:
        """A request the server refused as a whole: split it, defer it, or record the units' state."""
        unresolved = is_unresolved_reference(exc.status, exc.outcome.text())
        step = step_after_failure(exc.action, units=len(units), can_defer=deferred is not None,
                                  unresolved_reference=unresolved)
        if step is FailureStep.SPLIT:
            for half in halves(units):
                self._send(ledger, half, patient=patient, participant=participant,
                           patient_id=patient_id, deferred=deferred)
        elif step is FailureStep.DEFER and deferred is not None:
            deferred.extend(units)
        elif unresolved and step is FailureStep.RECORD and self._resend_lost_targets(ledger, units, resolved,
                                                                                      participant):
            return
        else:
            self._record_failure(ledger, units, exc, participant)
            if step is FailureStep.STOP:
                raise exc

    # -- references peersync resolves ------------------------------------------------------------------

    def _resolve(self, ledger: Ledger, identity: Identity) -> tuple[str, str | None] | None:
        """(server id, version) of a resource written before: confirmed in this run, known to the ledger, or
        found by its identifier on the server (a lost or new ledger). update-as-create computes it instead."""
        found = self.known.get(identity)
        if found:
            return found
        server_id = ledger.server_ids([identity]).get(identity)
        if server_id:
            return server_id, ledger.versions([identity]).get(identity)
        if self.choice.strategy is Strategy.UPDATE_AS_CREATE:
            return deterministic_id(*identity), None
        matches = self.client.search_raw(f"{identity[0]}?identifier={token_query(identity[1], identity[2])}")
        if len(matches) != 1:
            return None  # not written yet (or a duplicate on the server: the referrer waits)
        found = (str(matches[0]["id"]), (matches[0].get("meta") or {}).get("versionId"))
        self.known.put(identity, *found)
        return found

    def _strip_unwritten_targets(self, ledger: Ledger, units: list[PendingWrite], *, same_request: bool
                                 ) -> tuple[list[PendingWrite], dict[str, PendingWrite]]:
        """:func:`strip_deferrable` with what is written: confirmed in this run, known to the ledger, or (for a
        transaction, ``same_request``) in the same request."""
        in_request = {identity_of(r) for w in units for r in w.unit.resources} if same_request else set()
        return strip_deferrable(units, lambda target: target in in_request or self.known.get(target) is not None
                                or bool(ledger.server_ids([target])))

    def _complete_later(self, ledger: Ledger, write: PendingWrite, participant: str | None,
                        deferred: list[PendingWrite] | None) -> None:
        """A unit that landed without a deferrable reference: sent again, complete, after its targets (or left
        pending with the reason when this already was the last pass)."""
        if deferred is not None:
            deferred.append(write)
            return
        self._unit_failed(ledger, write, Failure(Action.RETRY_LATER, "written without some of its references: "
                                                 "a record it lists was not written; completed on a later run"),
                          participant, None)

    def _defer_unresolvable(self, ledger: Ledger, units: list[PendingWrite], patient: tuple[Identity, str] | None,
                            participant: str | None, deferred: list[PendingWrite] | None) -> list[PendingWrite]:
        """A transaction where peersync resolves references: the units whose references all resolve (in the
        request, this run, the ledger, or by identifier); the others wait (deferred, or pending)."""
        in_request = {identity_of(r) for w in units for r in w.unit.resources}
        ready: list[PendingWrite] = []
        for write in units:
            missing = next((target for r in write.unit.resources for target, deferrable in references_of(r)
                            if not deferrable and target not in in_request
                            and (patient is None or target != patient[0]) and self._resolve(ledger, target) is None),
                           None)
            if missing is None:
                ready.append(write)
            else:
                self._unit_failed(ledger, write, Failure(Action.ISOLATE, f"references a {missing[0]} that is not on "
                                                         "the server", unresolved_reference=True),
                                  participant, deferred)
        return ready

    # -- outside a transaction -------------------------------------------------------------------------

    def _send_stepwise(self, ledger: Ledger, units: list[PendingWrite], incomplete: dict[str, PendingWrite], *,
                       patient: tuple[Identity, str] | None, participant: str | None,
                       patient_id: str | None, deferred: list[PendingWrite] | None) -> None:
        """Batch, single or update-as-create (:mod:`connector.write.stepwise`): record each unit's outcome."""
        sender = StepwiseSender(self.client, self.choice.strategy, self.plan, self.opts.ctx)
        try:
            outcomes = sender.send(units, patient=patient, resolve=lambda identity: self._resolve(ledger, identity),
                                   known=self.known, recorded=self.clock())
        except FhirHttpError as exc:
            self._after_failure(ledger, [incomplete.get(w.unit.unit_key, w) for w in units], exc, {},
                                patient=patient, participant=participant, patient_id=patient_id,
                                deferred=deferred)
            return
        confirmed: list[ConfirmedUnit] = []
        for write in units:
            unit, outcome = write.unit, outcomes[write.unit.unit_key]
            if outcome.failure is not None:
                self._unit_failed(ledger, incomplete.get(unit.unit_key, write), outcome.failure, participant,
                                  deferred)
            elif unit.unit_key in incomplete:
                self._note_created(unit.unit_key, outcome.statuses)
                self._complete_later(ledger, incomplete[unit.unit_key], participant, deferred)
            else:
                confirmed.append(ConfirmedUnit(unit.unit_key, unit.kind, participant, write.unit_hash or "",
                                               unit.voided, patient_id, outcome.resources, " ".join(outcome.statuses)))
                self._count_written(unit, outcome.statuses)
        ledger.record_confirmed_many(confirmed, run_id=RUN_ID.get())

    def _note_created(self, unit_key: str, codes: list[str]) -> None:
        """A unit created by its first, incomplete write: its completion still counts as created."""
        if codes and all(c == "201" for c in codes):
            with self._counts_lock:
                self._created_incomplete.add(unit_key)

    def _count_written(self, unit: UnitWrite, codes: list[str]) -> None:
        with self._counts_lock:
            created = unit.unit_key in self._created_incomplete or (bool(codes) and all(c == "201" for c in codes))
        self._count("voided" if unit.voided else "created" if created else "updated")

    def _unit_failed(self, ledger: Ledger, write: PendingWrite, failure: Failure, participant: str | None,
                     deferred: list[PendingWrite] | None) -> None:
        """One unit that did not land: deferred (a target may land later this run), or its state recorded."""
        if failure.unresolved_reference and deferred is not None:
            deferred.append(write)
            return
        unit = write.unit
        if failure.action is Action.REVIEW:
            state, counter = UnitState.REVIEW, "in_review"
            ledger.open_review(unit.unit_key, "duplicate-on-server", failure.reason, RUN_ID.get())
        elif failure.action in (Action.CONFLICT, Action.RETRY_LATER) or failure.unresolved_reference:
            state, counter = UnitState.PENDING, "pending"
            with self._counts_lock:
                self.pending_reasons[failure.reason] += 1
        else:
            state, counter = UnitState.QUARANTINED, "quarantined"
        ledger.record_state(unit.unit_key, kind=unit.kind, participant=participant, state=state,
                            detail=failure.reason, run_id=RUN_ID.get(), attempt_hash=write.unit_hash)
        self._count(counter)
        log.warning("record %s: %s", state, failure.reason,
                    extra={"event": state, "key": opaque_key(unit.unit_key), "kind": unit.kind})

    def _adapt(self, ledger: Ledger, units: list[PendingWrite], built: BuiltBundle, exc: FhirHttpError,
               resend: dict[str, Any]) -> bool:
        """Handle a refusal that is the server's limit or permission, not the records' fault: True when handled
        (smaller bundles, parked types, or the run stops as throttled); False: the caller goes on as before."""
        sent_types = {entry["resource"]["resourceType"] for entry in built.bundle["entry"]}
        failure = classify_failure(exc.status, issue_codes=[i["code"] for i in exc.outcome.issues],
                                   text=exc.signal_text, headers=exc.headers, sent_types=sent_types)
        if failure.kind is FailureKind.RATE_LIMIT:
            raise ServerUnavailableError(f"the server's rate limit (HTTP {exc.status}); unsent records stay pending "
                                         "and the next run sends them")
        if failure.kind is FailureKind.LIMIT:
            self._adapt_to_limit(ledger, units, exc, failure.stated_limit, resend)
            return True
        if failure.kind is not FailureKind.NOT_PERMITTED:
            return False
        self.limits.note_forbidden()
        groups: dict[tuple[str, ...], list[PendingWrite]] = {}
        for w in units:
            groups.setdefault(tuple(unit_types(w.unit.resources)), []).append(w)
        types = failure.types
        if "Provenance" not in types and not any(types.intersection(group) for group in groups):
            types = frozenset()  # the types it names are none of these records' (e.g. a referenced type)
        if not types and len(groups) > 1:
            # Several types, none named: send each set of types apart to learn which is refused.
            for group in groups.values():
                self._send(ledger, group, **resend)
            return True
        types = types or frozenset(next(iter(groups)))
        reason = f"HTTP {exc.status} ({exc.outcome.codes() or 'no OperationOutcome'})"
        for resource_type in self.limits.refuse(types, reason):
            log.warning("the server refuses writes of %s (HTTP %s): those records are parked, the others go on",
                        resource_type, exc.status,
                        extra={"event": "type-not-permitted", "resource_type": resource_type, "status": exc.status})
        self._send(ledger, units, **resend)  # parks the refused units, sends the others
        return True

    def _adapt_to_limit(self, ledger: Ledger, units: list[PendingWrite], exc: FhirHttpError,
                        stated_limit: int | None, resend: dict[str, Any]) -> None:
        """A bundle refused as too large: smaller bundles for the rest of the run, and these units again."""
        sent = sum(w.size for w in units)
        before = self.limits.max_entries
        lowered = self.limits.lower(sent, stated_limit)
        if lowered is not None and lowered < before:
            log.warning("server limit: bundle of %d entries refused (HTTP %s); bundles of at most %d entries for the "
                        "rest of the run", sent + 1, exc.status, lowered + 1,
                        extra={"event": "server-limit-adapted", "status": exc.status, "max_entries": lowered + 1})
        if lowered is not None:
            for chunk in chunk_writes(units, lowered):
                self._send(ledger, chunk, **resend)
            return
        if len(units) > 1:
            for half in halves(units):
                self._send(ledger, half, **resend)
            return
        # One record's bundle is still too large: a strategy with smaller requests is needed (write strategies).
        self.limits.downgrade_strategy()
        reason = f"server limit: the server refuses even this record's bundle as too large (HTTP {exc.status})"
        for w in units:
            self._leave_pending(ledger, w, resend["participant"], reason)

    def _leave_pending(self, ledger: Ledger, w: PendingWrite, participant: str | None, reason: str) -> None:
        ledger.record_state(w.unit.unit_key, kind=w.unit.kind, participant=participant, state=UnitState.PENDING,
                            detail=reason, run_id=RUN_ID.get(), attempt_hash=w.unit_hash)
        self._count("pending")
        with self._counts_lock:
            self.pending_reasons[reason] += 1

    def _park_refused(self, ledger: Ledger, units: list[PendingWrite], participant: str | None) -> list[PendingWrite]:
        """Park the units with a type the server does not accept (no request); returns the others."""
        if not self.limits.refused:
            return units
        others: list[PendingWrite] = []
        for w in units:
            refused = self.limits.refused_of(unit_types(w.unit.resources))
            if not refused:
                others.append(w)
                continue
            self._park(ledger, w.unit, w.unit_hash, participant, refused)
        return others

    def _park(self, ledger: Ledger, unit: UnitWrite, unit_hash: str | None, participant: str | None,
              refused: list[str]) -> None:
        reasons = "; ".join(f"{t}: {self.limits.refused.get(t, 'refused')}" for t in refused)
        ledger.record_state(unit.unit_key, kind=unit.kind, participant=participant, state=UnitState.NOT_PERMITTED,
                            detail=f"not permitted by the server: {reasons}"[:500], run_id=RUN_ID.get(),
                            attempt_hash=unit_hash)
        self._count("not_permitted")
        with self._counts_lock:
            self.not_permitted.update(refused)
            self._parked.append((unit, unit_hash, participant))

    def _unpark(self, ledger: Ledger) -> None:
        """Every write was refused: a missing scope, not types. What this run parked goes back to pending, so
        the run after the fix sends it (parked records would wait for a changed CapabilityStatement)."""
        reason = "not attempted: the server refused every write (HTTP 403)"
        for unit, unit_hash, participant in self._parked:
            ledger.record_state(unit.unit_key, kind=unit.kind, participant=participant, state=UnitState.PENDING,
                                detail=reason, run_id=RUN_ID.get(), attempt_hash=unit_hash)
        self.counts["not_permitted"] = 0
        self.not_permitted.clear()
        self.limits.refused.clear()

    def _build(self, ledger: Ledger, writes: list[PendingWrite], patient: tuple[Identity, str] | None,
               cache: dict[Identity, str | None] | None = None) -> BuiltBundle:
        """The units' change set; ``cache`` receives the server ids the ledger resolved for its references."""
        cache = {} if cache is None else cache

        def resolve(identity: Identity) -> str | None:
            if identity not in cache:
                if self.choice.peersync_resolves_references:
                    found = self._resolve(ledger, identity)
                    cache[identity] = found[0] if found else None
                else:
                    cache[identity] = ledger.server_ids([identity]).get(identity)
            return cache[identity]

        built = build_change_set(writes, ctx=self.opts.ctx, patient=patient, resolve=resolve, recorded=self.clock(),
                                 conditional_provenance=self.plan.provenance_conditional_create)
        if self.limits.refused:  # never a literal reference to a type the server refuses: a logical one
            parked = frozenset(self.limits.refused)
            for entry in built.bundle["entry"]:
                entry["resource"] = logical_references(entry["resource"], parked)
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
                        answer: HttpAnswer, participant: str | None, patient_id: str | None,
                        incomplete: dict[str, PendingWrite] | None = None,
                        deferred: list[PendingWrite] | None = None) -> None:
        """Mark sent exactly the units the answer proves written (connector.write.confirm); the others stay
        pending with the reason. The Provenances cover the units of the bundle: one unproven, none is sent. Units sent
        ``incomplete`` (by unit key: the complete unit) go again later (:meth:`_complete_later`)."""
        incomplete = incomplete or {}
        confirmation = confirm_writes(built.bundle, answer.status, answer.body, answer.content_type)
        verdicts = confirmation.entries
        provenance = next((v for v in verdicts[len(built.entries):] if not v.confirmed), None)
        confirmed: dict[str, list[tuple[str, str, str, str | None, str | None]]] = {}
        statuses: dict[str, list[str]] = {}
        unproven: dict[str, str] = {}
        for (unit_key, identity), verdict in zip(built.entries, verdicts, strict=False):
            confirmed.setdefault(unit_key, []).append((*identity, verdict.server_id, verdict.version))
            if verdict.confirmed and verdict.server_id:
                self.known.put(identity, verdict.server_id, verdict.version)
            statuses.setdefault(unit_key, []).append(verdict.status)
            if not verdict.confirmed:
                unproven.setdefault(unit_key, verdict.reason or "not confirmed")
        if provenance is not None:
            for w in units:
                unproven.setdefault(w.unit.unit_key, f"Provenance: {provenance.reason or 'not confirmed'}")
        ledger.record_confirmed_many(
            [ConfirmedUnit(w.unit.unit_key, w.unit.kind, participant, w.unit_hash or "", w.unit.voided, patient_id,
                           confirmed.get(w.unit.unit_key, []), " ".join(statuses.get(w.unit.unit_key, [])))
             for w in units if w.unit.unit_key not in unproven and w.unit.unit_key not in incomplete],
            run_id=RUN_ID.get())
        for w in units:
            unit = w.unit
            if unit.unit_key in incomplete and unit.unit_key not in unproven:
                self._note_created(unit.unit_key, statuses.get(unit.unit_key, []))
                self._complete_later(ledger, incomplete[unit.unit_key], participant, deferred)
                continue
            if unit.unit_key in unproven:
                self._leave_unconfirmed(ledger, unit, w.unit_hash, participant, unproven[unit.unit_key])
                continue
            self._count_written(unit, statuses.get(unit.unit_key, []))
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
            except AuthError:
                continue  # no read permission for that type: cannot tell, so not counted as lost
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
        refused = self.limits.refused_of(res.resource_type for res in ledger.resources_of(unit_key))
        if refused:
            self._park(ledger, UnitWrite(unit_key, kind, []), None, participant, refused)
            return
        current = [self.client.read(res.resource_type, res.server_id) for res in ledger.resources_of(unit_key)
                   if res.resource_type in STATUS_ELEMENT and res.server_id]
        bundle = void_bundle(unit_key, current, ctx=self.opts.ctx, recorded=self.clock(),
                             conditional_provenance=self.plan.provenance_conditional_create)
        if bundle is not None:
            try:
                confirmation = self._send_void(bundle)
            except FhirHttpError as exc:
                ledger.record_state(unit_key, kind=kind, participant=participant, state=UnitState.QUARANTINED,
                                    detail=f"void failed: HTTP {exc.status}: {exc.outcome.text()}", run_id=RUN_ID.get())
                self._count("quarantined")
                return
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

    def _send_void(self, bundle: dict[str, Any]) -> Confirmation:
        """Send a void (updates by id, then its Provenance) with the run's strategy: one transaction, one batch
        (its entries need no references resolved), or one request each."""
        if self.choice.strategy in (Strategy.TRANSACTION, Strategy.BATCH):
            bundle["type"] = "transaction" if self.choice.strategy is Strategy.TRANSACTION else "batch"
            answer = self.client.send_transaction(bundle)
            return confirm_writes(bundle, answer.status, answer.body, answer.content_type)
        verdicts = []
        for entry in bundle["entry"]:
            request, resource = entry["request"], entry["resource"]
            single = self.client.write(request["method"], request["url"], resource,
                                       if_none_exist=request.get("ifNoneExist"))
            verdicts.append(confirm_single(resource["resourceType"], None, single.status, single.body,
                                           single.location, single.etag,
                                           conditional_create=bool(request.get("ifNoneExist"))))
        return Confirmation(verdicts)

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



# Every type peersync writes, Provenance included (the per-type permissions cover them all).
WRITTEN_TYPES = UPDATED_TYPES | {"Provenance"}


def read_capabilities(client: FhirClient) -> Capabilities | None:
    """The server's CapabilityStatement, parsed; None when the server does not answer it (4xx)."""
    try:
        return Capabilities.parse(client.capabilities())
    except FhirHttpError as exc:
        log.warning("could not read the CapabilityStatement (HTTP %s); assuming conditional update",
                    exc.status, extra={"event": "capabilities-unavailable", "status": exc.status})
        return None


def permissions_fingerprint_of(capabilities: Capabilities | None, opts: SyncOptions) -> str:
    """What decides the per-type permissions of this deployment: parked records are retried when it changes."""
    return permissions_fingerprint(capabilities, WRITTEN_TYPES, opts.ctx.base_url, opts.write_mode)
