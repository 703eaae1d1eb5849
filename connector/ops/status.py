"""The health of a deployment, read from its ledger: recent runs, the last success, and the backlog.

Used by ``peersync status`` and by the metrics file. Reads only; a missing ledger means no sync has run yet
and is reported as such (the ledger is not created here).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from connector.plan.ledger import Ledger, UnitState

# Exit codes of runs that completed: everything sendable landed (65 = some rows need the program's attention;
# 76 = the server refuses some types: those records are parked, the rest landed).
SUCCESS_EXIT_CODES = (0, 65, 76)


def backlog(ledger: Ledger) -> dict[str, int]:
    """Records waiting: pending (next run sends them), quarantined, in review, parked (not permitted by the
    server), and open review entries."""
    states = ledger.state_counts()
    return {
        "pending": int(states.get(UnitState.PENDING, 0)),
        "quarantined": int(states.get(UnitState.QUARANTINED, 0)),
        "in_review": int(states.get(UnitState.REVIEW, 0)),
        "not_permitted": int(states.get(UnitState.NOT_PERMITTED, 0)),
        "open_reviews": len(ledger.reviews()),
    }


def parked(ledger: Ledger) -> dict[str, Any]:
    """Parked records per record kind, and the resource types the server refuses (with why)."""
    _fingerprint, refused = ledger.refused_types()
    return {"records_by_kind": ledger.parked_by_kind(), "refused_types": refused}


def last_success(ledger: Ledger) -> dict[str, Any] | None:
    """The newest sync that completed (exit 0, 65 or 76), or None (a pull is no sync: its runs are apart)."""
    return ledger.last_run_with_exit(tuple(SUCCESS_EXIT_CODES), command="sync")


def status_report(ledger_path: Path, runs: int = 5) -> dict[str, Any]:
    """Everything ``peersync status`` shows, as one JSON-friendly dict."""
    report: dict[str, Any] = {"ledger": str(ledger_path), "ledger_exists": ledger_path.is_file(), "runs": [],
                              "last_run": None, "last_success": None,
                              "backlog": {"pending": 0, "quarantined": 0, "in_review": 0, "not_permitted": 0,
                                          "open_reviews": 0},
                              "parked": {"records_by_kind": {}, "refused_types": {}}}
    if not ledger_path.is_file():
        return report
    with Ledger(ledger_path) as ledger:
        recent = ledger.runs(runs, command="sync")
        pulls = ledger.runs(1, command="pull")
        report["backlog"] = backlog(ledger)
        report["parked"] = parked(ledger)
        report["last_success"] = last_success(ledger)
        report["referrals"] = referral_summary(ledger)
    lock_held = lock_is_held(Path(f"{ledger_path}.lock"))
    report["runs"] = [_run_row(run, newest=(i == 0), lock_held=lock_held) for i, run in enumerate(recent)]
    report["last_run"] = report["runs"][0] if report["runs"] else None
    report["last_pull"] = _run_row(pulls[0], newest=True, lock_held=lock_held) if pulls else None
    return report


def referral_summary(ledger: Ledger) -> dict[str, Any]:
    """What the last ``peersync pull`` saw: each community referral (the program's referral id, never patient
    data: status, when it changed, who changed it), counts by status, the clinic referrals delivered to intake,
    and the clinic referral Tasks skipped and still waiting for a fix in the EHR (Task id and reason)."""
    statuses = ledger.referral_statuses()
    by_status: dict[str, int] = {}
    for row in statuses:
        by_status[row["status"]] = by_status.get(row["status"], 0) + 1
    pulled = ledger.pulled_tasks()
    return {"community": dict(sorted(by_status.items())),
            "changed_by_organization": sum(row["changed_by"] == "organization" for row in statuses),
            "last_seen": max((row["seen_at"] for row in statuses), default=None),
            "clinic_referrals_delivered": len(pulled),
            "community_referrals": [{key: row[key] for key in ("referral_id", "status", "changed_at", "changed_by")}
                                    for row in statuses],
            "clinic_referrals_waiting": [{"task": task, "reason": reason}
                                         for task, reason in sorted(ledger.skipped_tasks().items())]}


def lock_is_held(lock_path: Path, proc_locks: Path = Path("/proc/locks")) -> bool | None:
    """Whether some process holds the ledger lock, read from the kernel's lock table (Linux) without taking the
    lock: a probe by locking would make a sync that starts at that moment exit 75. None where it cannot tell."""
    try:
        info = lock_path.stat()
    except FileNotFoundError:
        return False  # every sync creates the lock file before it takes the lock
    except OSError:
        return None
    try:
        table = proc_locks.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    return any(len(fields) > 5 and fields[5] == device for fields in (line.split() for line in table.splitlines()))


def _run_row(run: dict[str, Any], *, newest: bool = False, lock_held: bool | None = None) -> dict[str, Any]:
    summary = run.get("summary") or {}
    outcome = run["outcome"]
    if not run["finished_at"]:
        # Still running only if it is the newest run and a sync holds the lock; otherwise it was interrupted
        # (killed, crashed, host rebooted). Where the lock table cannot be read, say both.
        outcome = "interrupted" if not newest or lock_held is False else "running" if lock_held else "unfinished"
    return {
        "run_id": run["run_id"],
        "command": run["command"],
        "started_at": run["started_at"],
        "finished_at": run["finished_at"],
        "outcome": outcome,
        "exit_code": run["exit_code"],
        "duration_s": summary.get("duration_s"),
        "read": summary.get("read") or {},
        "counts": summary.get("counts") or {},
        "error": summary.get("error"),
        "shape_held": summary.get("shape_held") or [],
    }
