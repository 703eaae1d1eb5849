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
from contextlib import ExitStack
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from connector.errors import (
    AuthError,
    ServerUnavailableError,
)
from connector.identifiers import identifier_system, token_query
from connector.map.directory import missing_directory_entries
from connector.map.note import replaced
from connector.map.units import iter_planned_units, map_planned_global_units, participant_notes
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
from connector.write.coalesce import (
    Coalescer,
    Parcel,
    coalesces,
    requests_of,
    shared_capacity,
    shared_transaction,
    split_confirmation,
)
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
        self._lost: set[Identity] = set()  # resources the server lost, found in this run (re-sent next run)
        self._sharing = True  # small change-sets may share a request (off after a shared request timed out)
        self._partial: dict[str, list[str]] = {}  # unit key -> refused types left out of it (sent without them)
        self._logged_refused: set[str] = set()  # refused types already logged in this run
        self.capabilities: Capabilities | None = None
        self._coalescer: Coalescer | None = None  # small change-sets waiting to share a transaction
        self._staging_path: Path | str | None = None  # for a shared request's participants

    def write(self, staging: Staging, ledger: Ledger, *,
              on_progress: Callable[[int, int], None] | None = None) -> None:
        """Write the global units, then every participant with changes (in parallel)."""
        self.plan, self.choice = self._write_plan()
        ledger.set_meta("write_strategy", f"{self.choice.strategy} ({self.choice.reason})")  # `peersync plan` shows it
        fingerprint = self._seed_permissions(ledger)
        self._write_global_units(staging, ledger)
        self._staging_path = staging.path
        if self.choice.strategy is Strategy.TRANSACTION:
            self._coalescer = Coalescer(shared_capacity(self.limits.max_entries))
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
            if self._coalescer is not None:
                self._flush(ledger, self._coalescer.drain())  # the last, partly filled shared request
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
            self._guarded(lambda: own, ledger, participant, lambda: self._participant(own, ledger, participant))

    def _guarded(self, staging: Callable[[], Staging], ledger: Ledger, participant: str,
                 work: Callable[[], None], *, answered: bool = False) -> None:
        """Do a participant's work; when the server is down or answers unexpectedly, its records stay pending
        and the other participants go on. ``staging`` opens staging when needed (to list the records);
        ``answered``: the work records an answer already received, which a server down since does not undo."""
        if self._server_down.is_set() and not answered:
            self._mark_all(staging(), ledger, participant, UnitState.PENDING, "not attempted: server unavailable")
            return
        try:
            work()
        except ServerUnavailableError as exc:
            if not self._server_down.is_set():
                self._down_reason = str(exc)
            self._server_down.set()
            log.warning("server unavailable: %s", exc, extra={"event": "server-unavailable"})
            self._mark_all(staging(), ledger, participant, UnitState.PENDING, f"server unavailable: {exc}"[:300])
        except FhirHttpError as exc:
            # An answer the write path does not expect (e.g. a read that fails while voiding): this
            # participant's records stay pending for the next run; the other participants go on.
            log.warning("participant left pending: HTTP %s on %s", exc.status, exc.path,
                        extra={"event": "pending", "participant_key": opaque_key(participant),
                               "status": exc.status})
            self._mark_all(staging(), ledger, participant, UnitState.PENDING, f"HTTP {exc.status} on {exc.path}")

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
        writes = [w for w in writes if not self._wait_for_directory(ledger, [w], None, whole=False)]
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

        # A note whose period is now covered by other notes was replaced, not withdrawn. Decided here: the voids
        # may run on another thread, after a shared change-set is recorded, and the staging store stays on this one.
        current_notes = participant_notes(staging, participant, self.opts.ctx) \
            if any(u.kind == "note" for u in deletes) else []
        superseded = {u.unit_key for u in deletes
                      if u.kind == "note" and replaced(u.source_id, current_notes, self.opts.ctx.timezone)}

        def voids() -> None:
            for unit in deletes:
                self._void_remote(ledger, unit.unit_key, unit.kind, participant,
                                  superseded=unit.unit_key in superseded)

        if writes and isinstance(enrollment, Enrollment) and \
                self._write_participant(staging, ledger, enrollment, writes, after=voids):
            return  # its change-set waits to share a request: the voids follow once it is recorded
        voids()

    def _write_participant(self, staging: Staging, ledger: Ledger, enrollment: Enrollment,
                           planned: list[PlannedUnit], after: Callable[[], None] = lambda: None) -> bool:
        """Write a participant's units; True when its change-set was queued to share a request with others'
        (then ``after`` runs once it is recorded; otherwise the caller runs it)."""
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
            return False
        # the EHR's own Conditions the CarePlan addresses: looked up like the Patient, only when the plan is sent
        condition_refs = (find_condition_refs(self.client, patient_id, enrollment.conditions)
                          if any(u.kind == "enrollment" for u in planned) else [])
        # Targets before referrers (a CarePlan before the requests based on it): no chunk, and no half of a
        # rejected chunk, then sends a reference to something not yet written.
        ordered = reference_order(list(iter_planned_units(staging, participant, planned, self.opts.ctx,
                                                          condition_refs=condition_refs)))
        if self._wait_for_directory(ledger, ordered, participant, whole=True):
            return False
        self._retire_moved_units(ledger, [u.unit_key for u in planned], patient_id)
        patient_identity: Identity = ("Patient", mrn_system, enrollment.mrn)
        patient = (patient_identity, f"Patient/{patient_id}")
        deferred: list[PendingWrite] = []
        chunks = list(chunk_writes(ordered, self.limits.max_entries))

        def second_pass() -> None:
            # Units that failed on a reference to something not yet written, and units sent without a deferrable
            # reference (a CarePlan's activities, written after it): now everything else has landed, once more,
            # in bundles the server takes.
            for chunk in chunk_writes(self._last_pass(ledger, deferred), self.limits.max_entries):
                self._send(ledger, chunk, patient=patient, participant=participant,
                           patient_id=patient_id, deferred=None)

        def then() -> None:
            second_pass()
            after()

        for chunk in chunks:
            # only a change-set of one chunk may wait to share a request (a small one: connector.write.coalesce)
            if self._send(ledger, chunk, patient=patient, participant=participant, patient_id=patient_id,
                          deferred=deferred, after=then if len(chunks) == 1 else None):
                return True
        second_pass()
        return False

    def _wait_for_directory(self, ledger: Ledger, units: list[PendingWrite], participant: str | None, *,
                            whole: bool) -> bool:
        """Put units that need an Organization or Practitioner the EHR lacks (``[directory]``) in review, with a
        review entry per missing one; ``whole``: all of them when any needs one (a participant's units refer to
        each other). True when units were held."""
        directory = self.opts.ctx.directory
        if not directory.problems:
            return False
        needs = {w.unit.unit_key: missing_directory_entries(w.unit.resources, directory,
                                                            base_url=self.opts.ctx.base_url,
                                                            program_id=self.opts.ctx.program_id) for w in units}
        subjects = sorted({s for found in needs.values() for s in found})
        if not subjects:
            return False
        for subject in subjects:
            reason, detail = directory.problems[subject]
            ledger.open_review(subject, reason, detail, RUN_ID.get())
        reasons = ", ".join(sorted({directory.problems[s][0] for s in subjects}))
        for w in units:
            if whole or needs[w.unit.unit_key]:
                ledger.record_state(w.unit.unit_key, kind=w.unit.kind, participant=participant,
                                    state=UnitState.REVIEW, run_id=RUN_ID.get(), attempt_hash=w.unit_hash,
                                    detail=f"{reasons}: waits for {', '.join(subjects)}"[:300])
                self._count("in_review")
        log.warning("records wait in review for directory resources the EHR lacks: %s", reasons,
                    extra={"event": "review", "code": reasons, "count": len(subjects),
                           **({"participant_key": opaque_key(participant)} if participant else {})})
        return True

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
              patient_id: str | None = None, deferred: list[PendingWrite] | None = None,
              after: Callable[[], None] | None = None) -> bool:
        """Send units as one request of the run's strategy (a transaction, or batches or single requests in
        reference order); on a content error, split until the bad units are isolated.

        A single unit that fails only on an unresolved reference is appended to ``deferred`` (when given)
        instead of being quarantined: its target may land later in the same run. So is a unit sent without a
        deferrable reference whose target is not written yet (see :meth:`_complete_later`).

        With ``after``, a small transaction change-set is queued to share a request with other participants'
        (:mod:`connector.write.coalesce`); True then, and ``after`` runs once it is recorded.
        """
        units = self._park_refused(ledger, units, participant)
        if not units:
            return False
        units, incomplete = self._strip_unwritten_targets(ledger, units,
                                                          same_request=self.choice.strategy is Strategy.TRANSACTION)
        if self.choice.strategy is not Strategy.TRANSACTION:
            self._send_stepwise(ledger, units, incomplete, patient=patient, participant=participant,
                                patient_id=patient_id, deferred=deferred)
            return False
        if self.choice.peersync_resolves_references:
            units = self._defer_unresolvable(ledger, units, patient, participant, deferred)
            if not units:
                return False
        resolved: dict[Identity, str | None] = {}  # what the ledger resolved references to (lost-target check)
        resend: dict[str, Any] = {"patient": patient, "participant": participant, "patient_id": patient_id,
                                  "deferred": deferred}
        try:
            # Building may search (search-then-write): two matches there are a duplicate on the server (review).
            built = self._build(ledger, units, patient, resolved)
        except FhirHttpError as exc:
            self._after_failure(ledger, [incomplete.get(w.unit.unit_key, w) for w in units], exc, resolved,
                                **resend)
            return False
        if (len(units) > 1 and self.limits.max_entries < self.opts.max_bundle_entries
                and len(built.bundle["entry"]) > self.limits.max_entries + 1):
            # A learned server limit counts every entry, and a change-set has one Provenance per author:
            # a bundle over the limit is split before it is sent, not refused again.
            for half in halves(units):
                self._send(ledger, half, patient=patient, participant=participant, patient_id=patient_id,
                           deferred=deferred)
            return False
        if after is not None and self._coalescer is not None and self._sharing and coalesces(
                self.choice.strategy, len(built.bundle["entry"]), shared_capacity(self.limits.max_entries)):
            full = self._coalescer.add(Parcel(units, built, resend, resolved, incomplete, after))
            self._flush(ledger, full)
            return True
        self._transmit(ledger, units, built, resolved, incomplete, resend)
        return False

    def _transmit(self, ledger: Ledger, units: list[PendingWrite], built: BuiltBundle,
                  resolved: dict[Identity, str | None], incomplete: dict[str, PendingWrite],
                  resend: dict[str, Any]) -> None:
        """Send one built transaction and record what its answer proves; a refusal adapts to the server's limit
        or permission, or splits the units to isolate the bad ones."""
        try:
            answer = self.client.send_transaction(built.bundle)
        except AuthError as exc:
            # A 403 may refuse one type (park it, write the rest) rather than every write (a missing scope: 77).
            if not isinstance(exc.http_error, FhirHttpError) or built is None \
                    or not self._adapt(ledger, units, _bundle_types(built), exc.http_error, resend):
                raise
            return
        except FhirHttpError as exc:
            if built is not None and self._adapt(ledger, units, _bundle_types(built), exc, resend):
                return
            # The builder rewrote references in copies: the units are as mapped, ready to be sent again.
            self._after_failure(ledger, [incomplete.get(w.unit.unit_key, w) for w in units], exc, resolved,
                                **resend)
            return
        self.limits.note_written()
        self._record_success(ledger, units, built, answer, resend["participant"], resend["patient_id"], incomplete,
                             resend["deferred"])

    # -- change-sets that share a request (connector.write.coalesce) -----------------------------------

    def _flush(self, ledger: Ledger, parcels: list[Parcel]) -> None:
        """Send queued change-sets, as many to a request as the limit in force allows."""
        for group in requests_of(parcels, shared_capacity(self.limits.max_entries)):
            self._send_shared(ledger, group)

    def _send_shared(self, ledger: Ledger, parcels: list[Parcel]) -> None:
        """One transaction of several participants' change-sets; each is recorded from its own part of the answer.
        A refused request is sent again one change-set per request, where the usual splitting isolates the bad
        records: one participant's bad data never quarantines another's."""
        if len(parcels) == 1 or self._server_down.is_set():
            self._each_alone(ledger, parcels)
            return
        bundle = shared_transaction(parcels)
        try:
            answer = self.client.send_transaction(bundle)
        except ServerUnavailableError as exc:
            if self._sharing:
                # A slow link may time out on the larger shared request where each change-set alone gets through
                # (a run that always tried it again would never converge): no more sharing in this run.
                self._sharing = False
                log.warning("a shared transaction of %d change-sets failed (%s): change-sets are sent alone for the "
                            "rest of the run", len(parcels), exc.__class__.__name__,
                            extra={"event": "shared-unavailable", "change_sets": len(parcels)})
                self._each_alone(ledger, parcels)
                return
            down = exc  # each participant's records left pending, as when its own request fails

            def unavailable() -> None:
                raise down
            for parcel in parcels:
                self._in_parcel(ledger, parcel, unavailable)
            return
        except (AuthError, FhirHttpError) as exc:
            http = exc.http_error if isinstance(exc, AuthError) else exc
            status = http.status if isinstance(http, FhirHttpError) else None
            log.info("a shared transaction of %d change-sets was refused (HTTP %s): each is sent alone",
                     len(parcels), status, extra={"event": "shared-refused", "change_sets": len(parcels),
                                                  "status": status})
            if isinstance(http, FhirHttpError) and self._learn_from_shared(bundle, http):
                self._flush(ledger, parcels)  # smaller shared requests under the limit just learnt
                return
            for parcel in parcels:
                def alone(p: Parcel = parcel) -> None:
                    # built afresh: types refused since are parked, and the usual splitting finds bad records
                    self._send(ledger, [p.incomplete.get(w.unit.unit_key, w) for w in p.units], **p.resend)
                self._in_parcel(ledger, parcel, alone)
            return
        self.limits.note_written()
        confirmation = confirm_writes(bundle, answer.status, answer.body, answer.content_type)
        for parcel, own in zip(parcels, split_confirmation(confirmation, parcels), strict=True):
            def record(parcel: Parcel = parcel, own: Confirmation = own) -> None:
                self._record_success(ledger, parcel.units, parcel.built, answer, parcel.resend["participant"],
                                     parcel.resend["patient_id"], parcel.incomplete, parcel.resend["deferred"],
                                     confirmation=own)
            self._in_parcel(ledger, parcel, record, answered=True)

    def _each_alone(self, ledger: Ledger, parcels: list[Parcel]) -> None:
        for parcel in parcels:
            def transmit(p: Parcel = parcel) -> None:
                self._transmit(ledger, p.units, p.built, p.resolved, p.incomplete, p.resend)
            self._in_parcel(ledger, parcel, transmit)

    def _learn_from_shared(self, bundle: dict[str, Any], exc: FhirHttpError) -> bool:
        """What a refused shared request teaches for the rest of the run, before its change-sets go alone: a
        type the server names as not permitted is refused (its records are parked, not sent again); a bundle
        refused as too large lowers the limit. True when the limit went below this request's size (then smaller
        shared requests go instead of single change-sets)."""
        sent_types = {entry["resource"]["resourceType"] for entry in bundle["entry"]}
        failure = classify_failure(exc.status, issue_codes=[i["code"] for i in exc.outcome.issues],
                                   text=exc.signal_text, headers=exc.headers, sent_types=sent_types)
        if failure.kind is FailureKind.NOT_PERMITTED:
            named = failure.types & (sent_types - {"Provenance"})  # Provenance refused: each change-set tells
            if named:
                self.limits.note_forbidden()
                reason = f"HTTP {exc.status} ({exc.outcome.codes() or 'no OperationOutcome'})"
                for resource_type in self.limits.refuse(named, reason):
                    log.warning("the server refuses writes of %s (HTTP %s): those records are parked, the others "
                                "go on", resource_type, exc.status,
                                extra={"event": "type-not-permitted", "resource_type": resource_type,
                                       "status": exc.status})
            return False
        if failure.kind is not FailureKind.LIMIT:
            return False
        resources = sum(1 for entry in bundle["entry"] if entry["resource"]["resourceType"] != "Provenance")
        before = self.limits.max_entries
        lowered = self.limits.lower(resources, failure.stated_limit)
        if lowered is None or lowered >= before:
            return False
        log.warning("server limit: bundle of %d entries refused (HTTP %s); bundles of at most %d entries for the "
                    "rest of the run", len(bundle["entry"]), exc.status, lowered + 1,
                    extra={"event": "server-limit-adapted", "status": exc.status, "max_entries": lowered + 1})
        return shared_capacity(lowered) < len(bundle["entry"])

    def _in_parcel(self, ledger: Ledger, parcel: Parcel, work: Callable[[], None], *, answered: bool = False) -> None:
        """Do a queued change-set's work, then its participant's remaining work, as that participant's own."""
        def work_then_after() -> None:
            work()
            parcel.after()
        with ExitStack() as stack:
            def staging() -> Staging:
                assert self._staging_path is not None
                return stack.enter_context(Staging(self._staging_path, create=False))
            self._guarded(staging, ledger, parcel.resend["participant"], work_then_after, answered=answered)

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
            found = (server_id, ledger.versions([identity]).get(identity))
            self.known.put(identity, *found)  # every participant refers to the program's: one ledger look-up
            return found
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
        sender = StepwiseSender(self.client, self.choice.strategy, self.plan, self.opts.ctx, limits=self.limits)
        resend: dict[str, Any] = {"patient": patient, "participant": participant, "patient_id": patient_id,
                                  "deferred": deferred}
        as_mapped = [incomplete.get(w.unit.unit_key, w) for w in units]
        try:
            outcomes = sender.send(units, patient=patient, resolve=lambda identity: self._resolve(ledger, identity),
                                   known=self.known, recorded=self.clock())
        except AuthError as exc:
            # A whole batch refused with 403: one type (park it, send the rest) or every write (77).
            sent_types = {t for w in units for t in unit_types(w.unit.resources)} | {"Provenance"}
            if not isinstance(exc.http_error, FhirHttpError) \
                    or not self._adapt(ledger, as_mapped, sent_types, exc.http_error, resend):
                raise
            return
        except FhirHttpError as exc:
            sent_types = {t for w in units for t in unit_types(w.unit.resources)} | {"Provenance"}
            if self._adapt(ledger, as_mapped, sent_types, exc, resend):
                return
            self._after_failure(ledger, as_mapped, exc, {}, patient=patient, participant=participant,
                                patient_id=patient_id, deferred=deferred)
            return
        if any(outcome.resources for outcome in outcomes.values()):
            self.limits.note_written()
        refused_types = {o.failure.refused_types for o in outcomes.values() if o.failure and o.failure.refused_types}
        for types in refused_types:
            self._log_refused(types)
        # Sent again below: the units with a refused type (parked, or sent without its resources), and with them
        # those that failed on a reference to a record of this request that did not land (now parked: a logical
        # reference; or sent without its refused part: landed), rather than waiting for the deferred pass.
        again = {w.unit.unit_key for w in units if (failure := outcomes[w.unit.unit_key].failure) is not None
                 and (failure.refused_types or (refused_types and failure.unresolved_reference))}
        confirmed: list[ConfirmedUnit] = []
        for write in units:
            unit, outcome = write.unit, outcomes[write.unit.unit_key]
            if unit.unit_key in again:
                continue
            if outcome.failure is not None:
                self._unit_failed(ledger, incomplete.get(unit.unit_key, write), outcome.failure, participant,
                                  deferred)
            elif unit.unit_key in incomplete:
                self._note_created(unit.unit_key, outcome.statuses)
                self._complete_later(ledger, incomplete[unit.unit_key], participant, deferred)
            else:
                confirmed.append(self._confirmed(write, participant, patient_id, outcome.resources, outcome.statuses))
        ledger.record_confirmed_many(confirmed, run_id=RUN_ID.get())
        if again:
            self._send(ledger, reference_order([w for w in as_mapped if w.unit.unit_key in again]), **resend)

    def _confirmed(self, write: PendingWrite, participant: str | None, patient_id: str | None,
                   resources: list[tuple[str, str, str, str | None, str | None]], statuses: list[str]
                   ) -> ConfirmedUnit:
        """A unit the server confirmed, counted: sent, or parked when it was sent without the resources of a
        type the server refuses (its landed resources recorded, the whole unit sent again once permitted)."""
        unit = write.unit
        with self._counts_lock:
            left_out = self._partial.get(unit.unit_key)
        if left_out is None:
            self._count_written(unit, statuses)
            return ConfirmedUnit(unit.unit_key, unit.kind, participant, write.unit_hash or "", unit.voided,
                                 patient_id, resources, " ".join(statuses))
        self._count("not_permitted")
        with self._counts_lock:
            self.not_permitted.update(left_out)
        reasons = "; ".join(f"{t}: {self.limits.refused.get(t, 'refused')}" for t in left_out)
        return ConfirmedUnit(unit.unit_key, unit.kind, participant, write.unit_hash or "", unit.voided, patient_id,
                             resources, f"sent without {', '.join(left_out)}, not permitted by the server: "
                                        f"{reasons}"[:500], state=UnitState.NOT_PERMITTED)

    def _log_refused(self, types: frozenset[str]) -> None:
        """Once per type and run: the server refused a write of it (outside a transaction)."""
        for resource_type in sorted(types):
            with self._counts_lock:
                if resource_type in self._logged_refused:
                    continue
                self._logged_refused.add(resource_type)
            log.warning("the server refuses writes of %s (%s): those records are parked, the others go on",
                        resource_type, self.limits.refused.get(resource_type, "refused"),
                        extra={"event": "type-not-permitted", "resource_type": resource_type})

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

    def _adapt(self, ledger: Ledger, units: list[PendingWrite], sent_types: set[str], exc: FhirHttpError,
               resend: dict[str, Any]) -> bool:
        """Handle a refusal that is the server's limit or permission, not the records' fault: True when handled
        (smaller bundles, parked types, or the run stops as throttled); False: the caller goes on as before.
        ``sent_types``: the resource types the refused request carried (its Provenance included)."""
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
        """Park what the server does not accept (no request) and return what to send. A unit all of whose types
        are refused is parked; a unit with some refused types is sent without those resources (recorded as
        parked once the rest lands: :meth:`_confirmed`). References to refused types become logical ones
        (``Reference.identifier``): never a reference to something the server does not have."""
        if not self.limits.refused:
            return units
        parked = frozenset(self.limits.refused)
        others: list[PendingWrite] = []
        for w in units:
            types = unit_types(w.unit.resources)
            refused = self.limits.refused_of(types)
            with self._counts_lock:
                left_out = self._partial.get(w.unit.unit_key, [])  # refused earlier, already stripped from it
            if refused and set(types) <= set(refused):
                self._park(ledger, w.unit, w.unit_hash, participant, sorted(set(refused) | set(left_out)))
                continue
            if refused:
                with self._counts_lock:
                    self._partial[w.unit.unit_key] = sorted(set(refused) | set(left_out))
            kept = [logical_references(r, parked) for r in w.unit.resources if r["resourceType"] not in parked]
            others.append(replace(w, unit=replace(w.unit, resources=kept)))
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
                else:  # confirmed in this run (the program's Organization, Device, roles...), else the ledger's
                    known = self.known.get(identity)
                    cache[identity] = known[0] if known else ledger.server_ids([identity]).get(identity)
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
                        deferred: list[PendingWrite] | None = None,
                        confirmation: Confirmation | None = None) -> None:
        """Mark sent exactly the units the answer proves written (connector.write.confirm); the others stay
        pending with the reason. The Provenances cover the units of the bundle: one unproven, none is sent. Units sent
        ``incomplete`` (by unit key: the complete unit) go again later (:meth:`_complete_later`). ``confirmation``:
        this bundle's part of a shared request's answer (:func:`~connector.write.coalesce.split_confirmation`)."""
        incomplete = incomplete or {}
        if confirmation is None:
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
            [self._confirmed(w, participant, patient_id, confirmed.get(w.unit.unit_key, []),
                             statuses.get(w.unit.unit_key, []))
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
        # a target found lost earlier in this run is marked for re-send, so the ledger no longer resolves it
        lost: list[Identity] = sorted(set(resolved) & self._lost)
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
        with self._counts_lock:
            self._lost.update(lost)
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

    def _void_remote(self, ledger: Ledger, unit_key: str, kind: str, participant: str | None, *,
                     superseded: bool = False) -> None:
        """A record gone from the source: mark its resources entered-in-error (read, set status, update by id);
        ``superseded`` for a clinical note replaced by others."""
        refused = self.limits.refused_of(res.resource_type for res in ledger.resources_of(unit_key))
        if refused:
            self._park(ledger, UnitWrite(unit_key, kind, []), None, participant, refused)
            return
        current = [self.client.read(res.resource_type, res.server_id) for res in ledger.resources_of(unit_key)
                   if res.resource_type in STATUS_ELEMENT and res.server_id]
        bundle = void_bundle(unit_key, current, ctx=self.opts.ctx, recorded=self.clock(),
                             conditional_provenance=self.plan.provenance_conditional_create, superseded=superseded)
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


def _bundle_types(built: BuiltBundle) -> set[str]:
    return {entry["resource"]["resourceType"] for entry in built.bundle["entry"]}


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
