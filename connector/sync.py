"""The write stage: push planned units to the FHIR server, idempotently, one participant at a time.

For each participant with changes: resolve the Patient by MRN (never create it; 0 or several matches go to
the review queue), map the changed units, and send them as transactions of conditional updates with a
Provenance. A rejected transaction is split until the entries at fault are found; those are quarantined
with the server's reason, and the rest lands. Transient failures are retried by the HTTP layer and then left
pending for the next run. The ledger marks a unit sent only after the server confirmed it.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from connector import __version__
from connector.bundle import BuiltBundle, Identity, UnitWrite, build_transaction, parse_location
from connector.errors import ExitCode, LockHeldError, PeersyncError, ServerUnavailableError
from connector.fhirclient import Action, FhirClient, FhirHttpError, summarize_outcome
from connector.identifiers import KIND_ROLE, identifier_system, token_query
from connector.ledger import STATE_PENDING, STATE_QUARANTINED, STATE_REVIEW, ConfirmedUnit, Ledger
from connector.logs import RUN_ID, outcome_codes
from connector.mappers import MappingContext, map_provenance
from connector.model import Enrollment, RecordKind
from connector.patients import PatientPrefetch, prefetch_for
from connector.planner import (
    WRITE_ACTIONS,
    Act,
    Plan,
    compute_plan,
    mapping_fingerprint,
    participants_to_write,
    units_to_write,
)
from connector.profile import Profile
from connector.source import ReadReport, read_program, write_rejects
from connector.staging import Staging
from connector.units import map_global_unit, map_participant_units

log = logging.getLogger(__name__)

# Bump when mapping output changes in a way that must re-send everything.
MAPPING_VERSION = "1"

# Where each resource type keeps the status that entered-in-error goes into.
STATUS_ELEMENT = {
    "Goal": "lifecycleStatus",
    "CarePlan": "status",
    "CareTeam": "status",
    "Communication": "status",
    "CommunicationRequest": "status",
    "ServiceRequest": "status",
    "Task": "status",
}


def opaque_key(unit_key: str) -> str:
    """The key logs use for a record: stable, but reveals no source id."""
    return "rk-" + hashlib.sha256(unit_key.encode()).hexdigest()[:12]


@dataclass
class RunSummary:
    """What one run did (the `--json` output, the ledger's run history, the metrics)."""

    run_id: str
    command: str
    started_at: str
    finished_at: str = ""
    duration_s: float = 0.0
    outcome: str = "running"
    exit_code: int = 0
    read: dict[str, Any] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    write_requests: int = 0
    retries: int = 0
    deletions_held: list[str] = field(default_factory=list)
    rejects_report: str | None = None
    error: str | None = None
    # Seconds per phase: read (inputs into staging, rejects report), plan (diff against the ledger), write.
    phases: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "run_id": self.run_id,
            "command": self.command,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "duration_s": round(self.duration_s, 3),
            "durations": {"total_s": round(self.duration_s, 3),
                          **{f"{name}_s": round(self.phases.get(name, 0.0), 3) for name in ("read", "plan", "write")}},
            "outcome": self.outcome,
            "exit_code": self.exit_code,
            "read": self.read,
            "counts": {k: self.counts.get(k, 0) for k in COUNT_NAMES},
            "requests": self.requests,
            "write_requests": self.write_requests,
            "retries": self.retries,
            "deletions_held": self.deletions_held,
            "rejects_report": self.rejects_report,
            "error": self.error,
        }


# retried: units sent again this run because an earlier run left them pending, quarantined or in review.
COUNT_NAMES = ("rejected", "unchanged", "created", "updated", "voided", "deleted", "in_review", "quarantined",
               "pending", "skipped_quarantined", "retried")


@dataclass
class SyncOptions:
    """Everything a run needs besides the server client."""

    profile: Profile
    inputs: list[Path]
    ledger_path: Path
    ctx: MappingContext
    rejects_dir: Path
    concurrency: int = 4
    max_bundle_entries: int = 100
    max_delete_fraction: float = 0.2
    write_mode: str = "auto"


def program_fingerprint(ctx: MappingContext) -> str:
    """The mapping fingerprint of a deployment: a change re-sends everything (conditionally: no duplicates)."""
    return mapping_fingerprint(MAPPING_VERSION, ctx.program_id, ctx.program_name, ctx.base_url, ctx.mrn_system,
                               ctx.terminology_base, ctx.program_phone or "")


class LedgerLock:
    """An OS file lock next to the ledger: a second sync on the same ledger exits with LOCK_HELD."""

    def __init__(self, ledger_path: Path) -> None:
        ledger_path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(str(ledger_path) + ".lock", timeout=0)

    def __enter__(self) -> LedgerLock:
        try:
            self.lock.acquire()
        except Timeout:
            raise LockHeldError(
                f"another peersync run holds the lock {self.lock.lock_file}; this run did nothing. "
                "It is safe to try again after the other run ends."
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def read_and_plan(opts: SyncOptions, ledger: Ledger, staging: Staging,
                  phases: dict[str, float] | None = None) -> tuple[ReadReport, Plan, Path]:
    """Read the inputs into staging, write the rejects report, and compute the plan (timed into ``phases``)."""
    started = time.monotonic()
    report = read_program(opts.profile, opts.inputs, staging)
    csv_path, _json_path, _n = write_rejects(staging, opts.rejects_dir)
    planned = time.monotonic()
    plan = compute_plan(staging, ledger, program_id=opts.ctx.program_id, fingerprint=program_fingerprint(opts.ctx),
                        max_delete_fraction=opts.max_delete_fraction)
    if phases is not None:
        phases["read"], phases["plan"] = planned - started, time.monotonic() - planned
    log.debug("read %d rows (%d rejected) in %.2fs; planned in %.2fs", report.as_dict()["total"]["read"],
              report.total_rejected, planned - started, time.monotonic() - planned,
              extra={"event": "read", "counts": report.as_dict()["total"]})
    return report, plan, csv_path


class Syncer:
    """One sync run. Construct, then call :meth:`run`."""

    def __init__(self, opts: SyncOptions, client: FhirClient, *, on_progress: Callable[[int, int], None] | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.opts = opts
        self.client = client
        self.on_progress = on_progress
        self.clock = clock
        self.counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        self._server_down = threading.Event()
        self._conditional_types: set[str] | None = None
        self._provenance_conditional_create = True
        self.summary: RunSummary | None = None  # set by run(): the CLI reports it even when the run raises
        self._write_started: float | None = None
        self._patients: PatientPrefetch | None = None  # Patients looked up in batches (first syncs)

    # -- the run ---------------------------------------------------------------------------------------

    def run(self, run_id: str) -> RunSummary:
        """Read, plan and write; always returns a summary (and records it in the ledger)."""
        started = time.monotonic()
        summary = RunSummary(run_id=run_id, command="sync", started_at=self.clock().isoformat(timespec="seconds"))
        self.summary = summary
        with LedgerLock(self.opts.ledger_path), Ledger(self.opts.ledger_path) as ledger:
            ledger.start_run(run_id, "sync")
            try:
                self._run(ledger, summary)
            except PeersyncError as exc:
                summary.outcome, summary.exit_code, summary.error = "failed", int(exc.exit_code), str(exc)
                raise
            except Exception as exc:  # a bug: the run failed (exit 1); never recorded as "ok" from its counts
                summary.outcome, summary.exit_code = "failed", int(ExitCode.UNEXPECTED)
                summary.error = f"unexpected {exc.__class__.__name__}"
                raise
            finally:
                summary.counts.update(self.counts)
                stats = self.client.stats
                summary.requests, summary.write_requests, summary.retries = stats.requests, stats.writes, stats.retries
                summary.duration_s = time.monotonic() - started
                if self._write_started is not None:
                    summary.phases["write"] = time.monotonic() - self._write_started
                summary.finished_at = self.clock().isoformat(timespec="seconds")
                if summary.outcome == "running":
                    summary.exit_code, summary.outcome = _exit_for(summary)
                ledger.finish_run(run_id, summary.outcome, summary.exit_code, summary.as_dict())
                log.info("run finished: %s", summary.outcome,
                         extra={"event": "run-finished", "outcome": summary.outcome, "counts": dict(summary.counts)})
        return summary

    def _run(self, ledger: Ledger, summary: RunSummary) -> None:
        with tempfile.TemporaryDirectory(prefix="peersync-") as tmp, Staging(Path(tmp) / "staging.sqlite") as staging:
            report, plan, rejects = read_and_plan(self.opts, ledger, staging, summary.phases)
            summary.read = report.as_dict()["total"]
            summary.rejects_report = str(rejects)
            summary.deletions_held = plan.deletions_held
            self.counts["rejected"] = report.total_rejected
            self.counts["unchanged"] = plan.total(Act.UNCHANGED)
            self.counts["skipped_quarantined"] = plan.total(Act.QUARANTINED)
            self.counts["retried"] = _retried_units(staging)
            log.info("plan: %d units to write, %d unchanged", plan.writes(), plan.total(Act.UNCHANGED),
                     extra={"event": "plan", "counts": plan.as_dict()["totals"]})
            if plan.writes() == 0:
                return
            self._write_started = time.monotonic()
            self._check_capabilities()
            self._write_global_units(staging, ledger)
            participants = participants_to_write(staging)
            self._patients = prefetch_for(self.client, staging, participants, self.opts.ctx.mrn_system)
            done = 0
            if self.on_progress:
                self.on_progress(0, len(participants))
            try:
                with ThreadPoolExecutor(max_workers=self.opts.concurrency, thread_name_prefix="peersync") as pool:
                    run_id = RUN_ID.get()
                    futures = [pool.submit(self._participant_in_run, run_id, staging, ledger, p) for p in participants]
                    for future in futures:
                        future.result()
                        done += 1
                        if self.on_progress:
                            self.on_progress(done, len(participants))
            finally:
                if self._patients is not None:
                    self._patients.close()
            if self._server_down.is_set():
                raise ServerUnavailableError("the FHIR server stopped answering; unsent records stay pending "
                                             "and the next run sends them")

    def _participant_in_run(self, run_id: str, staging: Staging, ledger: Ledger, participant: str) -> None:
        RUN_ID.set(run_id)  # worker threads carry the run id in their log lines
        # SQLite connections are per thread: each worker reads staging through its own connection.
        with Staging(staging.path, create=False) as own:
            if self._server_down.is_set():
                self._mark_all(own, ledger, participant, STATE_PENDING, "not attempted: server unavailable")
                return
            try:
                self._participant(own, ledger, participant)
            except ServerUnavailableError as exc:
                self._server_down.set()
                log.warning("server unavailable: %s", exc, extra={"event": "server-unavailable"})
                self._mark_all(own, ledger, participant, STATE_PENDING, "server unavailable")
            except FhirHttpError as exc:
                # An answer the write path does not expect (e.g. a read that fails while voiding): this
                # participant's records stay pending for the next run; the other participants go on.
                log.warning("participant left pending: HTTP %s on %s", exc.status, exc.path,
                            extra={"event": "pending", "participant_key": opaque_key(participant),
                                   "status": exc.status})
                self._mark_all(own, ledger, participant, STATE_PENDING, f"HTTP {exc.status} on {exc.path}")

    # -- capabilities ----------------------------------------------------------------------------------

    def _check_capabilities(self) -> None:
        if self.opts.write_mode == "conditional":
            self._conditional_types = None
            return
        try:
            statement = self.client.capabilities()
        except FhirHttpError as exc:
            # Without a CapabilityStatement, assume the standard conditional update; a server that lacks it
            # rejects the writes, and those records are quarantined or left pending with the reason.
            log.warning("could not read the CapabilityStatement (HTTP %s); assuming conditional update",
                        exc.status, extra={"event": "capabilities-unavailable", "status": exc.status})
            self._conditional_types = None
            return
        types: set[str] = set()
        for rest in statement.get("rest", []):
            for resource in rest.get("resource", []):
                if resource.get("conditionalUpdate") and self.opts.write_mode == "auto":
                    types.add(resource.get("type", ""))
                if resource.get("type") == "Provenance":
                    self._provenance_conditional_create = bool(resource.get("conditionalCreate"))
        self._conditional_types = types
        log.debug("server offers conditional update for %d resource type(s)", len(types),
                  extra={"event": "capabilities"})
        missing = sorted(set(STATUS_ELEMENT) - types)
        if missing and self.opts.write_mode == "auto":
            log.warning("server lacks conditional update for %s: using search-then-write for them",
                        ", ".join(missing), extra={"event": "write-mode-fallback"})

    def _uses_conditional(self, resource_type: str) -> bool:
        return self._conditional_types is None or resource_type in self._conditional_types

    # -- global units (program, supporters, community organizations) -----------------------------------

    def _write_global_units(self, staging: Staging, ledger: Ledger) -> None:
        writes = []
        for unit_key, kind, source_id, unit_hash, _action in units_to_write(staging, None):
            unit = map_global_unit(staging, kind, source_id, self.opts.ctx)
            if unit is not None:
                writes.append((unit, unit_hash))
        if writes:
            self._send(ledger, writes, patient=None, participant=None, author=None)

    # -- one participant -------------------------------------------------------------------------------

    def _participant(self, staging: Staging, ledger: Ledger, participant: str) -> None:
        rows = units_to_write(staging, participant)
        deletes = [r for r in rows if r[4] == Act.DELETE.value]
        writes = [r for r in rows if r[4] != Act.DELETE.value]
        enrollment = staging.record(RecordKind.ENROLLMENT, participant)
        if writes and isinstance(enrollment, Enrollment):
            self._write_participant(staging, ledger, enrollment, writes)
        for unit_key, kind, *_ in deletes:
            self._void_remote(ledger, unit_key, kind, participant)

    def _write_participant(self, staging: Staging, ledger: Ledger, enrollment: Enrollment,
                           rows: list[tuple[str, str, str, str | None, str]]) -> None:
        participant = enrollment.enrollment_id
        mrn_system = enrollment.mrn_system or self.opts.ctx.mrn_system
        patient_id, reason, detail = self._resolve_patient(mrn_system, enrollment.mrn)
        ledger.set_participant(participant, patient_id=patient_id, mrn_hash=ledger.mrn_hash(mrn_system, enrollment.mrn),
                               state="resolved" if patient_id else STATE_REVIEW, detail=detail,
                               close_review=patient_id is not None)
        hashes = {unit_key: unit_hash for unit_key, _k, _s, unit_hash, _a in rows}
        if patient_id is None:
            ledger.open_review(f"participant:{participant}", reason or "patient-unresolved", detail, RUN_ID.get())
            for unit_key, kind, _source_id, unit_hash, _action in rows:
                ledger.record_state(unit_key, kind=kind, participant=participant, state=STATE_REVIEW,
                                    detail=f"{reason}: {detail}", run_id=RUN_ID.get(), attempt_hash=unit_hash)
                self._count("in_review")
            log.warning("participant sent to review: %s", reason,
                        extra={"event": "review", "participant_key": opaque_key(participant), "code": reason})
            return
        self._retire_moved_units(ledger, [r[0] for r in rows], patient_id)
        units = map_participant_units(staging, participant, [(kind, sid) for _u, kind, sid, _h, _a in rows],
                                      self.opts.ctx)
        patient_identity: Identity = ("Patient", mrn_system, enrollment.mrn)
        author = self.opts.ctx.ref("PractitionerRole", KIND_ROLE, enrollment.supporter_id)["reference"]
        patient = (patient_identity, f"Patient/{patient_id}")
        deferred: list[tuple[UnitWrite, str | None]] = []
        chunk: list[tuple[UnitWrite, str | None]] = []
        size = 0
        for unit in units:
            if chunk and size + len(unit.resources) > self.opts.max_bundle_entries:
                self._send(ledger, chunk, patient=patient, participant=participant, author=author,
                           patient_id=patient_id, deferred=deferred)
                chunk, size = [], 0
            chunk.append((unit, hashes.get(unit.unit_key)))
            size += len(unit.resources)
        if chunk:
            self._send(ledger, chunk, patient=patient, participant=participant, author=author, patient_id=patient_id,
                       deferred=deferred)
        if deferred:
            # Units that only failed on a reference to something not yet written (a CarePlan and the requests
            # that point back at it, split apart): now everything else has landed, send them together once more.
            self._send(ledger, deferred, patient=patient, participant=participant, author=author,
                       patient_id=patient_id, deferred=None)

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

    def _send(self, ledger: Ledger, units: list[tuple[UnitWrite, str | None]], *,
              patient: tuple[Identity, str] | None, participant: str | None, author: str | None,
              patient_id: str | None = None, deferred: list[tuple[UnitWrite, str | None]] | None = None) -> None:
        """Send units as one transaction; on a content error, split until the bad units are isolated.

        A single unit that fails only on an unresolved reference is appended to ``deferred`` (when given)
        instead of being quarantined: its target may land later in the same run.
        """
        built = self._build(ledger, units, patient, author)
        try:
            response = self.client.transaction(built.bundle)
        except FhirHttpError as exc:
            restored = list(units)  # the builder rewrote references in copies: the units are as mapped
            if exc.action in (Action.ISOLATE, Action.REVIEW, Action.CONFLICT) and len(units) > 1:
                middle = len(restored) // 2
                for half in (restored[:middle], restored[middle:]):
                    self._send(ledger, half, patient=patient, participant=participant, author=author,
                               patient_id=patient_id, deferred=deferred)
                return
            if deferred is not None and _unresolved_reference(exc):
                deferred.extend(restored)
                return
            self._record_failure(ledger, units, exc, participant)
            if exc.action is Action.FATAL:
                raise
            return
        self._record_success(ledger, units, built, response, participant, patient_id)

    def _build(self, ledger: Ledger, hashed_units: list[tuple[UnitWrite, str | None]],
               patient: tuple[Identity, str] | None, author: str | None) -> BuiltBundle:
        units = [u for u, _h in hashed_units]
        cache: dict[Identity, str | None] = {}

        def resolve(identity: Identity) -> str | None:
            if identity not in cache:
                cache[identity] = ledger.server_ids([identity]).get(identity)
            return cache[identity]

        activity = ("NULLIFY" if all(u.voided for u in units) else "UPDATE")
        recorded = self.clock()

        # The change-set tag makes the Provenance a conditional create: a replay of the same change-set
        # (a lost response, a lost ledger) finds the first Provenance instead of adding another.
        change_set = hashlib.sha256("\n".join(sorted(f"{u.unit_key}={h}" for u, h in hashed_units)).encode()).hexdigest()[:32]
        tag_system = f"{self.opts.ctx.meta_source}/change-set"

        def provenance(targets: list[str]) -> dict[str, Any]:
            prov = map_provenance(targets, activity=activity, author=author, recorded=recorded, ctx=self.opts.ctx)
            prov.setdefault("meta", {}).setdefault("tag", []).append({"system": tag_system, "code": change_set})
            return prov

        built = build_transaction(units, patient=patient, resolve=resolve, provenance=provenance)
        if built.has_provenance and self._provenance_conditional_create:
            built.bundle["entry"][-1]["request"]["ifNoneExist"] = f"_tag={token_query(tag_system, change_set)}"
        if self._conditional_types is not None:
            self._apply_search_mode(built, resolve)
        return built

    def _apply_search_mode(self, built: BuiltBundle, resolve: Callable[[Identity], str | None]) -> None:
        """For types without conditional update: search by identifier, then PUT by id or POST."""
        for entry, (_unit_key, identity) in zip(built.bundle["entry"], built.entries, strict=False):
            resource_type = identity[0]
            if self._uses_conditional(resource_type):
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

    def _record_success(self, ledger: Ledger, units: list[tuple[UnitWrite, str | None]], built: BuiltBundle,
                        response: dict[str, Any], participant: str | None, patient_id: str | None) -> None:
        entries = response.get("entry", [])
        confirmed: dict[str, list[tuple[str, str, str, str | None, str | None]]] = {}
        statuses: dict[str, list[str]] = {}
        for (unit_key, identity), entry in zip(built.entries, entries, strict=False):
            status = str(entry.get("response", {}).get("status", ""))
            server_id, version = parse_location(entry.get("response", {}).get("location"))
            confirmed.setdefault(unit_key, []).append((*identity, server_id, version))
            statuses.setdefault(unit_key, []).append(status.split(" ")[0])
        ledger.record_confirmed_many(
            [ConfirmedUnit(unit.unit_key, unit.kind, participant, unit_hash or "", unit.voided, patient_id,
                           confirmed.get(unit.unit_key, []), " ".join(statuses.get(unit.unit_key, [])))
             for unit, unit_hash in units],
            run_id=RUN_ID.get())
        for unit, _unit_hash in units:
            codes = statuses.get(unit.unit_key, [])
            self._count("voided" if unit.voided else "created" if codes and all(c == "201" for c in codes)
                        else "updated")
        log.debug("transaction landed: %d record(s), %d entries (HTTP %s)", len(units), len(entries),
                  " ".join(f"{code}x{n}" for code, n in sorted(Counter(str(e.get("response", {}).get("status", ""))
                                                                        .split(" ")[0] for e in entries).items())),
                  extra={"event": "transaction", "entries": len(entries),
                         "participant_key": opaque_key(participant) if participant else "program"})

    def _record_failure(self, ledger: Ledger, units: list[tuple[UnitWrite, str | None]], exc: FhirHttpError,
                        participant: str | None) -> None:
        detail = f"HTTP {exc.status}: {exc.outcome.text()}"[:500]
        for unit, unit_hash in units:
            if exc.action is Action.REVIEW:
                state, counter = STATE_REVIEW, "in_review"
                ledger.open_review(unit.unit_key, "duplicate-on-server", detail, RUN_ID.get())
            elif exc.action is Action.CONFLICT:
                state, counter = STATE_PENDING, "pending"
            else:
                state, counter = STATE_QUARANTINED, "quarantined"
            ledger.record_state(unit.unit_key, kind=unit.kind, participant=participant, state=state, detail=detail,
                                run_id=RUN_ID.get(), attempt_hash=unit_hash)
            self._count(counter)
            log.warning("record %s: HTTP %s (%s)", state, exc.status, outcome_codes(exc.outcome.issues),
                        extra={"event": state, "key": opaque_key(unit.unit_key), "kind": unit.kind,
                               "status": exc.status})

    # -- corrections -----------------------------------------------------------------------------------

    def _void_remote(self, ledger: Ledger, unit_key: str, kind: str, participant: str | None) -> None:
        """A record gone from the source: mark its resources entered-in-error (read, set status, update by id)."""
        rows = ledger.db.execute("SELECT resource_type, server_id FROM resources WHERE unit_key=? AND server_id IS NOT NULL",
                                 (unit_key,)).fetchall()
        entries = []
        for resource_type, server_id in rows:
            if resource_type not in STATUS_ELEMENT:
                continue
            resource = self.client.read(resource_type, server_id)
            resource[STATUS_ELEMENT[resource_type]] = "entered-in-error"
            resource.pop("meta", None)
            entries.append({"resource": resource, "request": {"method": "PUT", "url": f"{resource_type}/{server_id}"}})
        if entries:
            prov = map_provenance([f"{e['request']['url']}" for e in entries], activity="NULLIFY", author=None,
                                  recorded=self.clock(), ctx=self.opts.ctx)
            entries.append({"resource": prov, "request": {"method": "POST", "url": "Provenance"}})
            try:
                self.client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries})
            except FhirHttpError as exc:
                ledger.record_state(unit_key, kind=kind, participant=participant, state=STATE_QUARANTINED,
                                    detail=f"void failed: HTTP {exc.status}: {exc.outcome.text()}", run_id=RUN_ID.get())
                self._count("quarantined")
                return
        with ledger.transaction() as db:
            db.execute("UPDATE units SET voided=1, hash='deleted', state='sent', detail='voided: gone from source', "
                       "updated_at=datetime('now'), run_id=? WHERE unit_key=?", (RUN_ID.get(), unit_key))
        self._count("deleted")

    def _retire_moved_units(self, ledger: Ledger, unit_keys: list[str], patient_id: str) -> None:
        """Records now under another Patient: void the old resources and move their identifier to a retired
        system, so the conditional write creates a fresh resource under the right Patient."""
        for unit_key in unit_keys:
            unit = ledger.unit(unit_key)
            if unit is None or not unit.patient_id or unit.patient_id == patient_id:
                continue
            rows = ledger.db.execute(
                "SELECT resource_type, system, value, server_id FROM resources WHERE unit_key=? AND server_id IS NOT NULL",
                (unit_key,)).fetchall()
            for resource_type, system, value, server_id in rows:
                resource = self.client.read(resource_type, server_id)
                if resource_type in STATUS_ELEMENT:
                    resource[STATUS_ELEMENT[resource_type]] = "entered-in-error"
                kind = system.rsplit("/", 1)[1]  # systems are {base}/sid/{program}/{kind}
                retired = identifier_system(self.opts.ctx.base_url, self.opts.ctx.program_id, kind, retired=True)
                for ident in resource.get("identifier", []):
                    if ident.get("system") == system and ident.get("value") == value:
                        ident["system"] = retired
                resource.pop("meta", None)
                self.client.update(resource_type, server_id, resource)
                with ledger.transaction() as db:
                    db.execute("DELETE FROM resources WHERE resource_type=? AND system=? AND value=?",
                               (resource_type, system, value))
            log.info("record moved to another patient: old resources retired",
                     extra={"event": "moved", "key": opaque_key(unit_key)})

    # -- helpers ---------------------------------------------------------------------------------------

    def _mark_all(self, staging: Staging, ledger: Ledger, participant: str, state: str, detail: str) -> None:
        for unit_key, kind, _sid, unit_hash, _action in units_to_write(staging, participant):
            unit = ledger.unit(unit_key)
            if unit is not None and unit.state == "sent" and unit.hash == unit_hash:
                continue
            ledger.record_state(unit_key, kind=kind, participant=participant, state=state, detail=detail,
                                run_id=RUN_ID.get(), attempt_hash=unit_hash)
            self._count("pending")

    def _count(self, name: str, n: int = 1) -> None:
        with self._counts_lock:
            self.counts[name] += n


def _retried_units(staging: Staging) -> int:
    """Units this run writes that an earlier run left unconfirmed: pending, quarantined or in review.

    Counted from the plan joined with the ledger (attached by the planner): units in review have no confirmed
    hash, so the plan calls them 'create' rather than 'retry'.
    """
    writes = ",".join(f"'{a.value}'" for a in sorted(WRITE_ACTIONS))
    return int(staging.db.execute(
        f"SELECT count(*) FROM plan p JOIN ledger.units l ON l.unit_key = p.unit_key "
        f"WHERE p.action IN ({writes}) AND l.state != 'sent'").fetchone()[0])


def _unresolved_reference(exc: FhirHttpError) -> bool:
    """The server could not resolve a reference (HAPI-1091 conditional, HAPI-1094 literal, or 404)."""
    text = exc.outcome.text()
    return exc.status == 404 or "HAPI-1091" in text or "HAPI-1094" in text


def _exit_for(summary: RunSummary) -> tuple[int, str]:
    counts = summary.counts
    if counts["pending"]:
        return int(ExitCode.SERVER_UNAVAILABLE), "incomplete"
    if counts["rejected"] or counts["in_review"] or counts["quarantined"]:
        return int(ExitCode.RECORDS_REJECTED), "partial"
    return int(ExitCode.OK), "ok"



__all__ = ["Syncer", "SyncOptions", "RunSummary", "LedgerLock", "read_and_plan", "opaque_key", "__version__"]
