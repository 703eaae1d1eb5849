"""The sync run: take the ledger lock, read and plan, hand the writes to the writer, and decide the outcome.

:class:`Syncer` is what ``peersync sync`` runs. It owns the run's bookkeeping (the lock, the summary recorded
in the ledger, the exit policy); everything that talks to the FHIR server is in :mod:`connector.write.writer`.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from filelock import FileLock, Timeout

from connector.errors import (
    WRITE_ACCESS_FIX,
    ExitCode,
    LedgerError,
    LockHeldError,
    PeersyncError,
)
from connector.files import PRIVATE_FILE_MODE, create_file, make_folder
from connector.map import MappingContext
from connector.map.directory import (
    ORGANIZATION_NOT_FOUND,
    PRACTITIONER_NOT_FOUND,
    Directory,
    organization_subject,
    supporter_subject,
)
from connector.model import Contact, Enrollment, Goal, RecordKind
from connector.plan.ledger import Ledger, check_ledger_access
from connector.plan.planner import (
    UNIT_RESOURCE_TYPES,
    Act,
    Plan,
    compute_plan,
    program_fingerprint,
    retried_units,
    source_ids_to_write,
)
from connector.plan.shape import (
    KindShape,
    current_shapes,
    held_unit_kinds,
    shape_changes,
)
from connector.pull.answers import DesiredTask, answer_clinic_referrals, clinic_referral_requests, desired_task
from connector.read.cache import (
    ReadCache,
    cache_path,
    keep_as_cache,
    reader_fingerprint,
    remove_quietly,
    run_staging_path,
)
from connector.read.formats import DEFAULT_LIMITS, ReadLimits
from connector.read.profile import Profile
from connector.read.program import ReadReport, read_program, write_rejects
from connector.read.staging import Staging
from connector.server.client import FhirClient
from connector.write.directory import resolve_directory
from connector.write.writer import Writer, permissions_fingerprint_of, read_capabilities

log = logging.getLogger(__name__)

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
    deletions_held_records: int = 0  # records whose deletion was held back (the guard against truncated inputs)
    # Why a completed run needs a person (PHI-free codes, ATTENTION_REASONS); non-empty: outcome "partial"
    attention: list[str] = field(default_factory=list)
    shape_held: list[str] = field(default_factory=list)  # record kinds the shape guard held, and why
    warnings: list[str] = field(default_factory=list)  # what reading the inputs warned about (as `check` does)
    # Why records were left pending (PHI-free reason -> records): an unconfirmed answer, the server down, ...
    pending_reasons: Counter[str] = field(default_factory=Counter)
    # What the run adapted to the server's limits ("bundles of at most 8 entries (server limit)")
    adaptations: list[str] = field(default_factory=list)
    # Records parked because the server does not accept one of their types: resource type -> records
    not_permitted: dict[str, int] = field(default_factory=dict)
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
            "deletions_held_records": self.deletions_held_records,
            "attention": self.attention,
            "shape_held": self.shape_held,
            "warnings": self.warnings,
            "pending_reasons": dict(self.pending_reasons.most_common(10)),
            "adaptations": self.adaptations,
            "not_permitted": dict(sorted(self.not_permitted.items())),
            "rejects_report": self.rejects_report,
            "error": self.error,
        }


# retried: units sent again this run because an earlier run left them pending, quarantined or in review.
# held: updates, voids and deletions the shape guard held back.
COUNT_NAMES = ("rejected", "unchanged", "created", "updated", "voided", "deleted", "in_review", "quarantined",
               "pending", "skipped_quarantined", "retried", "held", "not_permitted", "clinic_referrals_unanswered")


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
    max_row_drop_fraction: float = 0.2
    accept_shape_change: bool = False
    read_limits: ReadLimits = DEFAULT_LIMITS
    write_mode: str = "auto"
    write_strategy: str = "auto"  # transaction | batch | single | update-as-create, or auto (capabilities)
    resolves_conditional_references: bool = True  # in a transaction (else peersync resolves references)
    file_mode: int = PRIVATE_FILE_MODE  # of the ledger and the rejects report (0600, or 0640 for a group)
    run_deadline_seconds: float | None = 7200.0  # after this, nothing more is sent: the rest stays pending (69)
    data_problems_exit_zero: bool = False  # rejected/quarantined/in-review records exit 0 (still in the metrics)
    retry_parked: bool = False  # send records parked as not permitted again, even if nothing changed
    read_cache: bool = True  # unchanged rows are staged from the last sync's records (connector.read.cache)


class LedgerLock:
    """An OS file lock next to the ledger: a second sync on the same ledger exits with LOCK_HELD."""

    def __init__(self, ledger_path: Path) -> None:
        check_ledger_access(ledger_path)  # exit 78 with the fix, before the lock file is attempted
        make_folder(ledger_path.parent)
        self.lock = FileLock(str(ledger_path) + ".lock", timeout=0)

    def __enter__(self) -> Self:
        try:
            self.lock.acquire()
        except Timeout:  # (a subclass of OSError: caught first)
            raise LockHeldError(
                f"another peersync run holds the lock {self.lock.lock_file}; this run did nothing. "
                "It is safe to try again after the other run ends."
            ) from None
        except OSError as exc:  # e.g. a folder made read-only after the check above
            raise LedgerError(f"cannot create the lock file {self.lock.lock_file}: {exc.strerror or exc}. "
                              f"Fix: {WRITE_ACCESS_FIX}.") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def read_and_plan(opts: SyncOptions, ledger: Ledger, staging: Staging, phases: dict[str, float] | None = None,
                  cache: ReadCache | None = None) -> tuple[ReadReport, Plan, Path]:
    """Read the inputs into staging (unchanged rows from ``cache``), write the rejects report, and compute the
    plan (timed into ``phases``)."""
    started = time.monotonic()
    report = read_program(opts.profile, opts.inputs, staging, opts.read_limits, cache)
    csv_path, _json_path, _n = write_rejects(staging, opts.rejects_dir, opts.file_mode)
    planned = time.monotonic()
    shapes = current_shapes(report.present_columns, report.read)
    previous = {kind: KindShape(frozenset(columns), rows) for kind, (columns, rows) in ledger.shapes().items()}
    held = {} if opts.accept_shape_change else shape_changes(
        previous, shapes, report.mapped_columns, max_row_drop_fraction=opts.max_row_drop_fraction)
    plan = compute_plan(staging, ledger, program_id=opts.ctx.program_id, fingerprint=program_fingerprint(opts.ctx),
                        max_delete_fraction=opts.max_delete_fraction, held_kinds=held_unit_kinds(held), ctx=opts.ctx)
    plan.shape_held = list(held.values())
    plan.shapes_seen = {kind: shape for kind, shape in shapes.items() if kind not in held}
    if phases is not None:
        phases["read"], phases["plan"] = planned - started, time.monotonic() - planned
    log.debug("read %d rows (%d rejected, %d unchanged from the read cache) in %.2fs; planned in %.2fs",
              report.as_dict()["total"]["read"], report.total_rejected, report.cached, planned - started,
              time.monotonic() - planned, extra={"event": "read", "counts": report.as_dict()["total"]})
    return report, plan, csv_path


@contextmanager
def run_staging(opts: SyncOptions) -> Iterator[tuple[Staging, ReadCache | None]]:
    """The run's staging, and the read cache to read with. With ``opts.read_cache`` the staging is made next to
    the ledger and, once its read completed, becomes the next run's cache; otherwise it is a temporary file and
    any cache is removed."""
    if not opts.read_cache:
        remove_quietly(cache_path(opts.ledger_path))
        with tempfile.TemporaryDirectory(prefix="peersync-") as tmp, Staging(Path(tmp) / "staging.sqlite") as staging:
            yield staging, None
        return
    staging_path, fingerprint = run_staging_path(opts.ledger_path), reader_fingerprint(opts.profile)
    remove_quietly(staging_path)  # a run that was killed left it
    create_file(staging_path, opts.file_mode)
    cache = ReadCache(cache_path(opts.ledger_path), fingerprint)
    staging = Staging(staging_path)
    try:
        yield staging, cache
    finally:
        staging.close()
        if staging.finalized:
            keep_as_cache(staging_path, cache_path(opts.ledger_path), fingerprint)
        else:  # the read did not complete: the last cache stays
            remove_quietly(staging_path)


class Syncer:
    """One sync run. Construct, then call :meth:`run`."""

    def __init__(self, opts: SyncOptions, client: FhirClient, *, on_progress: Callable[[int, int], None] | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.opts = opts
        self.client = client
        self.on_progress = on_progress
        self.clock = clock
        self.counts: Counter[str] = Counter()
        self.summary: RunSummary | None = None  # set by run(): the CLI reports it even when the run raises
        self._write_started: float | None = None
        self._shapes_seen: dict[str, KindShape] = {}  # the shape guard remembers them if the run completes

    def run(self, run_id: str) -> RunSummary:
        """Read, plan and write; always returns a summary (and records it in the ledger)."""
        started = time.monotonic()
        summary = RunSummary(run_id=run_id, command="sync", started_at=self.clock().isoformat(timespec="seconds"))
        self.summary = summary
        with LedgerLock(self.opts.ledger_path), Ledger(self.opts.ledger_path, mode=self.opts.file_mode) as ledger:
            ledger.start_run(run_id, "sync")
            self.client.deadline.start(self.opts.run_deadline_seconds)
            try:
                self._run(ledger, summary)
            except PeersyncError as exc:
                summary.exit_code, summary.error = int(exc.exit_code), str(exc)
                summary.outcome = outcome_of_error(summary.exit_code)
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
                    summary.attention = attention_reasons(
                        summary.counts, rows_read=summary.read.get("read"),
                        deletions_held=summary.deletions_held_records, shape_held=bool(summary.shape_held))
                    summary.exit_code, summary.outcome = exit_for(
                        summary.counts, shape_held=bool(summary.shape_held), rows_read=summary.read.get("read"),
                        deletions_held=summary.deletions_held_records,
                        data_problems_exit_zero=self.opts.data_problems_exit_zero)
                # An empty drop folder is no new shape: remembering it would disarm the guard for the next run.
                if (summary.exit_code in COMPLETED_EXIT_CODES and self._shapes_seen
                        and "no-input-rows" not in summary.attention):
                    ledger.record_shapes({kind: (sorted(shape.columns), shape.rows)
                                          for kind, shape in self._shapes_seen.items()}, run_id=run_id)
                ledger.finish_run(run_id, summary.outcome, summary.exit_code, summary.as_dict())
                log.info("run finished: %s (exit %d)", summary.outcome, summary.exit_code,
                         extra={"event": "run-finished", "outcome": summary.outcome, "exit_code": summary.exit_code,
                                "counts": dict(summary.counts)})
        return summary

    def _retry_parked_if_changed(self, ledger: Ledger) -> None:
        """Parked records (types the server refused) are sent again when asked, or when the server's
        CapabilityStatement or the settings changed since they were parked (one metadata read, only then)."""
        if not ledger.parked_by_kind():
            return
        stored, _types = ledger.refused_types()
        if not self.opts.retry_parked:
            capabilities = read_capabilities(self.client) if self.opts.write_mode != "conditional" else None
            if stored == permissions_fingerprint_of(capabilities, self.opts):
                return
        count = ledger.retry_parked()
        log.info("%d parked record(s) sent again: %s", count,
                 "asked for (--retry-parked)" if self.opts.retry_parked else "the server's CapabilityStatement or the "
                 "settings changed", extra={"event": "retry-parked", "count": count})

    def _run(self, ledger: Ledger, summary: RunSummary) -> None:
        self._retry_parked_if_changed(ledger)
        with run_staging(self.opts) as (staging, cache):
            report, plan, rejects = read_and_plan(self.opts, ledger, staging, summary.phases, cache)
            summary.read = report.as_dict()["total"]
            summary.rejects_report = str(rejects)
            summary.deletions_held = plan.deletions_held
            summary.deletions_held_records = plan.deletions_held_records
            _warn_about_inputs(summary.read.get("read", 0), plan.deletions_held, self.opts.inputs)
            summary.shape_held, summary.warnings = plan.shape_held, report.warnings
            self._shapes_seen = plan.shapes_seen
            self.counts["held"] = plan.total(Act.HELD)
            self.counts["rejected"] = report.total_rejected
            self.counts["unchanged"] = plan.total(Act.UNCHANGED)
            self.counts["skipped_quarantined"] = plan.total(Act.QUARANTINED)
            self.counts["retried"] = retried_units(staging)
            self.counts["not_permitted"] = plan.total(Act.PARKED)
            summary.not_permitted = parked_by_type(plan, ledger.refused_types()[1])
            log.info("plan: %d units to write, %d unchanged", plan.writes(), plan.total(Act.UNCHANGED),
                     extra={"event": "plan", "counts": plan.as_dict()["totals"]})
            answers = clinic_referral_answers(staging)
            if plan.writes() > 0:
                self._write_started = time.monotonic()
                opts = self._with_directory(ledger, staging, self._with_referral_context(ledger, staging, answers))
                summary.warnings = [*summary.warnings, *directory_warnings(opts.ctx.directory)]
                writer = Writer(opts, self.client, self.counts, clock=self.clock)
                try:
                    writer.write(staging, ledger, on_progress=self.on_progress)
                finally:
                    summary.pending_reasons.update(writer.pending_reasons)
                    summary.adaptations = list(writer.limits.adaptations)
                    for resource_type, count in writer.not_permitted.items():
                        summary.not_permitted[resource_type] = summary.not_permitted.get(resource_type, 0) + count
            if answers:
                answered = answer_clinic_referrals(self.client, ledger, self.opts.ctx, answers, clock=self.clock)
                self.counts["clinic_tasks_updated"] += answered.updated
                # Retried by the next sync; until then the referring clinician sees a stale status: never silent.
                self.counts["clinic_referrals_unanswered"] += len(answered.problems)
                summary.warnings = [*summary.warnings, *answered.problems]
                for problem in answered.problems:
                    log.warning("clinic referral not answered: %s", problem, extra={"event": "clinic-referral"})

    def _with_directory(self, ledger: Ledger, staging: Staging, opts: SyncOptions) -> SyncOptions:
        """The options with the EHR's own Organization and Practitioners found (``[directory]``, once per run);
        review entries of those found since are closed."""
        directory = opts.ctx.directory
        if not directory.existing_organization and not directory.existing_practitioners:
            return opts
        found = resolve_directory(self.client, staging, directory, opts.ctx.program_id)
        if found.existing_organization and found.organization_id:
            ledger.close_review(organization_subject(opts.ctx.program_id), ORGANIZATION_NOT_FOUND)
        for staff_id in found.practitioner_ids:
            ledger.close_review(supporter_subject(staff_id), PRACTITIONER_NOT_FOUND)
        return replace(opts, ctx=replace(opts.ctx, directory=found))

    def _with_referral_context(self, ledger: Ledger, staging: Staging,
                               answers: dict[str, tuple[Enrollment, DesiredTask]]) -> SyncOptions:
        """The options with what the mapper needs from the server about referrals: the Tasks a community
        organization changed since peersync wrote them (their status is kept, never rolled back), and the
        ServiceRequests of the clinic referrals enrollments answer (CarePlan.supportingInfo: R4 limits
        CarePlan.basedOn to CarePlan)."""
        from connector.pull.puller import organization_task_fields

        owned = organization_task_fields(self.client, ledger, self.opts.ctx, source_ids_to_write(staging, "referral"))
        if owned:
            log.info("%d referral(s) carry a status set by the community organization: kept", len(owned),
                     extra={"event": "organization-status-kept"})
        requests = clinic_referral_requests(self.client, answers)[0] if answers else {}
        if not owned and not requests:
            return self.opts
        return replace(self.opts, ctx=replace(self.opts.ctx, organization_tasks=owned,
                                              clinic_referral_requests=requests))


def directory_warnings(directory: Directory) -> list[str]:
    """What the run did not find of the EHR's own directory (``[directory]``): counts only, no identifiers."""
    reasons = Counter(reason for reason, _ in directory.problems.values())
    what = {ORGANIZATION_NOT_FOUND: "the program's Organization was not found on the EHR",
            PRACTITIONER_NOT_FOUND: "supporter(s) have no Practitioner on the EHR"}
    return [f"{f'{count} ' if reason == PRACTITIONER_NOT_FOUND else ''}{what[reason]} ({reason}): the records that "
            "need it wait in review; see `peersync review list`" for reason, count in sorted(reasons.items())]


def parked_by_type(plan: Plan, refused: dict[str, str]) -> dict[str, int]:
    """Records the plan parks, per refused resource type of their kind (a kind of several types counts under
    each refused one)."""
    counts: Counter[str] = Counter()
    for kind, actions in plan.by_kind.items():
        parked = actions.get(Act.PARKED.value, 0)
        for resource_type in UNIT_RESOURCE_TYPES.get(kind, ()):
            if parked and resource_type in refused:
                counts[resource_type] += parked
    return dict(counts)


def clinic_referral_answers(staging: Staging) -> dict[str, tuple[Enrollment, DesiredTask]]:
    """Clinic referral Task id -> (the enrollment that answers it, the Task status it means)."""
    answers: dict[str, tuple[Enrollment, DesiredTask]] = {}
    for record in staging.records(RecordKind.ENROLLMENT):
        if isinstance(record, Enrollment) and record.clinic_referral and not record.void:
            contacts = [c for c in staging.records(RecordKind.CONTACT, record.enrollment_id) if isinstance(c, Contact)]
            goals = [g for g in staging.records(RecordKind.GOAL, record.enrollment_id) if isinstance(g, Goal)]
            answers[record.clinic_referral] = (record, desired_task(record, contacts, goals))
    return answers


def _warn_about_inputs(rows_read: int, deletions_held: list[str], inputs: list[Path]) -> None:
    """Say on stderr (the log) what an unattended run must not keep quiet: an empty or truncated drop folder."""
    if rows_read == 0:
        log.warning("no input rows were read from %d input path(s): the export did not arrive or is empty; nothing "
                    "was sent and nothing was voided. Check the drop folder and the export job (exit 65)",
                    len(inputs), extra={"event": "no-input"})
    for held in deletions_held:
        log.warning("deletions held: %s", held, extra={"event": "deletions-held"})


def outcome_of_error(exit_code: int) -> str:
    """The outcome of a run that an error stopped: ``incomplete`` when the server became unavailable (69: what
    was not confirmed stays pending for the next run), else ``failed`` (docs/operations.md)."""
    return "incomplete" if exit_code == ExitCode.SERVER_UNAVAILABLE else "failed"


# Runs that completed: the shape guard remembers their input's shape.
COMPLETED_EXIT_CODES = (int(ExitCode.OK), int(ExitCode.RECORDS_REJECTED), int(ExitCode.SERVER_REFUSES_TYPES))


# Why a completed run needs a person (the summary's ``attention``). The first three are the input's or the
# guards' doing (IT or the export job); DATA_PROBLEMS are single records, for the program staff.
ATTENTION_REASONS = ("no-input-rows", "deletions-held", "shape-held", "types-not-permitted",
                     "clinic-referrals-unanswered", "records-rejected", "records-quarantined", "records-in-review")
DATA_PROBLEMS = frozenset({"records-rejected", "records-quarantined", "records-in-review"})


def attention_reasons(counts: Counter[str], *, rows_read: int | None = None, deletions_held: int = 0,
                      shape_held: bool = False) -> list[str]:
    """Why a completed run needs a person (codes of ATTENTION_REASONS, in that order); ``rows_read`` None: the
    run did not read its inputs (nothing to say about them)."""
    found = {
        "no-input-rows": rows_read == 0,
        "deletions-held": deletions_held > 0,
        "shape-held": shape_held,
        "types-not-permitted": counts["not_permitted"] > 0,
        "clinic-referrals-unanswered": counts["clinic_referrals_unanswered"] > 0,
        "records-rejected": counts["rejected"] > 0,
        "records-quarantined": counts["quarantined"] > 0,
        "records-in-review": counts["in_review"] > 0,
    }
    return [reason for reason in ATTENTION_REASONS if found[reason]]


def exit_for(counts: Counter[str], *, shape_held: bool = False, rows_read: int | None = None,
             deletions_held: int = 0, data_problems_exit_zero: bool = False) -> tuple[int, str]:
    """The exit code and outcome of a run that ended without an error, from its counts: 69 when records were
    left pending; 76 (``partial``) when records were parked because the server refuses their types; 65 (outcome
    ``partial``) when it needs a person (``attention_reasons``: no input rows, held
    deletions or kinds, records rejected, quarantined or in review); else 0. ``data_problems_exit_zero``: a run
    whose only problems are single records (DATA_PROBLEMS) exits 0 for the scheduler, its outcome still
    ``partial`` (docs/exit-codes.md)."""
    if counts["pending"]:
        return int(ExitCode.SERVER_UNAVAILABLE), "incomplete"
    reasons = attention_reasons(counts, rows_read=rows_read, deletions_held=deletions_held, shape_held=shape_held)
    if not reasons:
        return int(ExitCode.OK), "ok"
    if "types-not-permitted" in reasons:
        return int(ExitCode.SERVER_REFUSES_TYPES), "partial"
    if data_problems_exit_zero and DATA_PROBLEMS.issuperset(reasons):
        return int(ExitCode.OK), "partial"
    return int(ExitCode.RECORDS_REJECTED), "partial"


__all__ = ["ATTENTION_REASONS", "COUNT_NAMES", "DATA_PROBLEMS", "LedgerLock", "RunSummary", "SyncOptions", "Syncer",
           "attention_reasons", "exit_for", "outcome_of_error", "program_fingerprint", "read_and_plan"]
