"""The sync run: take the ledger lock, read and plan, hand the writes to the writer, and decide the outcome.

:class:`Syncer` is what ``peersync sync`` runs. It owns the run's bookkeeping (the lock, the summary recorded
in the ledger, the exit policy); everything that talks to the FHIR server is in :mod:`connector.write.writer`.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
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
from connector.files import PRIVATE_FILE_MODE, make_folder
from connector.map import MappingContext
from connector.plan.ledger import Ledger, check_ledger_access
from connector.plan.planner import (
    Act,
    Plan,
    compute_plan,
    program_fingerprint,
    retried_units,
)
from connector.plan.shape import (
    KindShape,
    current_shapes,
    held_unit_kinds,
    shape_changes,
)
from connector.read.formats import DEFAULT_LIMITS, ReadLimits
from connector.read.profile import Profile
from connector.read.program import ReadReport, read_program, write_rejects
from connector.read.staging import Staging
from connector.server.client import FhirClient
from connector.write.writer import Writer

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
            "rejects_report": self.rejects_report,
            "error": self.error,
        }


# retried: units sent again this run because an earlier run left them pending, quarantined or in review.
# held: updates, voids and deletions the shape guard held back.
COUNT_NAMES = ("rejected", "unchanged", "created", "updated", "voided", "deleted", "in_review", "quarantined",
               "pending", "skipped_quarantined", "retried", "held")


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
    file_mode: int = PRIVATE_FILE_MODE  # of the ledger and the rejects report (0600, or 0640 for a group)
    run_deadline_seconds: float | None = 7200.0  # after this, nothing more is sent: the rest stays pending (69)
    data_problems_exit_zero: bool = False  # rejected/quarantined/in-review records exit 0 (still in the metrics)


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


def read_and_plan(opts: SyncOptions, ledger: Ledger, staging: Staging,
                  phases: dict[str, float] | None = None) -> tuple[ReadReport, Plan, Path]:
    """Read the inputs into staging, write the rejects report, and compute the plan (timed into ``phases``)."""
    started = time.monotonic()
    report = read_program(opts.profile, opts.inputs, staging, opts.read_limits)
    csv_path, _json_path, _n = write_rejects(staging, opts.rejects_dir, opts.file_mode)
    planned = time.monotonic()
    shapes = current_shapes(report.present_columns, report.read)
    previous = {kind: KindShape(frozenset(columns), rows) for kind, (columns, rows) in ledger.shapes().items()}
    held = {} if opts.accept_shape_change else shape_changes(
        previous, shapes, report.mapped_columns, max_row_drop_fraction=opts.max_row_drop_fraction)
    plan = compute_plan(staging, ledger, program_id=opts.ctx.program_id, fingerprint=program_fingerprint(opts.ctx),
                        max_delete_fraction=opts.max_delete_fraction, held_kinds=held_unit_kinds(held),
                        contact_procedures=opts.ctx.contact_procedures)
    plan.shape_held = list(held.values())
    plan.shapes_seen = {kind: shape for kind, shape in shapes.items() if kind not in held}
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

    def _run(self, ledger: Ledger, summary: RunSummary) -> None:
        with tempfile.TemporaryDirectory(prefix="peersync-") as tmp, Staging(Path(tmp) / "staging.sqlite") as staging:
            report, plan, rejects = read_and_plan(self.opts, ledger, staging, summary.phases)
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
            log.info("plan: %d units to write, %d unchanged", plan.writes(), plan.total(Act.UNCHANGED),
                     extra={"event": "plan", "counts": plan.as_dict()["totals"]})
            if plan.writes() == 0:
                return
            self._write_started = time.monotonic()
            writer = Writer(self.opts, self.client, self.counts, clock=self.clock)
            try:
                writer.write(staging, ledger, on_progress=self.on_progress)
            finally:
                summary.pending_reasons.update(writer.pending_reasons)


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
COMPLETED_EXIT_CODES = (int(ExitCode.OK), int(ExitCode.RECORDS_REJECTED))


# Why a completed run needs a person (the summary's ``attention``). The first three are the input's or the
# guards' doing (IT or the export job); DATA_PROBLEMS are single records, for the program staff.
ATTENTION_REASONS = ("no-input-rows", "deletions-held", "shape-held",
                     "records-rejected", "records-quarantined", "records-in-review")
DATA_PROBLEMS = frozenset({"records-rejected", "records-quarantined", "records-in-review"})


def attention_reasons(counts: Counter[str], *, rows_read: int | None = None, deletions_held: int = 0,
                      shape_held: bool = False) -> list[str]:
    """Why a completed run needs a person (codes of ATTENTION_REASONS, in that order); ``rows_read`` None: the
    run did not read its inputs (nothing to say about them)."""
    found = {
        "no-input-rows": rows_read == 0,
        "deletions-held": deletions_held > 0,
        "shape-held": shape_held,
        "records-rejected": counts["rejected"] > 0,
        "records-quarantined": counts["quarantined"] > 0,
        "records-in-review": counts["in_review"] > 0,
    }
    return [reason for reason in ATTENTION_REASONS if found[reason]]


def exit_for(counts: Counter[str], *, shape_held: bool = False, rows_read: int | None = None,
             deletions_held: int = 0, data_problems_exit_zero: bool = False) -> tuple[int, str]:
    """The exit code and outcome of a run that ended without an error, from its counts: 69 when records were
    left pending; 65 (outcome ``partial``) when it needs a person (``attention_reasons``: no input rows, held
    deletions or kinds, records rejected, quarantined or in review); else 0. ``data_problems_exit_zero``: a run
    whose only problems are single records (DATA_PROBLEMS) exits 0 for the scheduler, its outcome still
    ``partial`` (docs/exit-codes.md)."""
    if counts["pending"]:
        return int(ExitCode.SERVER_UNAVAILABLE), "incomplete"
    reasons = attention_reasons(counts, rows_read=rows_read, deletions_held=deletions_held, shape_held=shape_held)
    if not reasons:
        return int(ExitCode.OK), "ok"
    if data_problems_exit_zero and DATA_PROBLEMS.issuperset(reasons):
        return int(ExitCode.OK), "partial"
    return int(ExitCode.RECORDS_REJECTED), "partial"


__all__ = ["ATTENTION_REASONS", "COUNT_NAMES", "DATA_PROBLEMS", "LedgerLock", "RunSummary", "SyncOptions", "Syncer",
           "attention_reasons", "exit_for", "outcome_of_error", "program_fingerprint", "read_and_plan"]
