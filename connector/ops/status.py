"""The health of a deployment, read from its ledger: recent runs, the last success, and the backlog.

Used by ``peersync status`` and by the metrics file. Reads only; a missing ledger means no sync has run yet
and is reported as such (the ledger is not created here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from connector.plan.ledger import Ledger, UnitState

# Exit codes of runs that completed: everything sendable landed (65 = some rows need the program's attention).
SUCCESS_EXIT_CODES = (0, 65)


def backlog(ledger: Ledger) -> dict[str, int]:
    """Records waiting: pending (next run sends them), quarantined, in review, and open review entries."""
    states = ledger.state_counts()
    return {
        "pending": int(states.get(UnitState.PENDING, 0)),
        "quarantined": int(states.get(UnitState.QUARANTINED, 0)),
        "in_review": int(states.get(UnitState.REVIEW, 0)),
        "open_reviews": len(ledger.reviews()),
    }


def last_success(ledger: Ledger) -> dict[str, Any] | None:
    """The newest run that completed (exit 0 or 65), or None."""
    return ledger.last_run_with_exit(tuple(SUCCESS_EXIT_CODES))


def status_report(ledger_path: Path, runs: int = 5) -> dict[str, Any]:
    """Everything ``peersync status`` shows, as one JSON-friendly dict."""
    report: dict[str, Any] = {"ledger": str(ledger_path), "ledger_exists": ledger_path.is_file(), "runs": [],
                              "last_run": None, "last_success": None,
                              "backlog": {"pending": 0, "quarantined": 0, "in_review": 0, "open_reviews": 0}}
    if not ledger_path.is_file():
        return report
    with Ledger(ledger_path) as ledger:
        recent = ledger.runs(runs)
        report["backlog"] = backlog(ledger)
        report["last_success"] = last_success(ledger)
    report["runs"] = [_run_row(run) for run in recent]
    report["last_run"] = report["runs"][0] if report["runs"] else None
    return report


def _run_row(run: dict[str, Any]) -> dict[str, Any]:
    summary = run.get("summary") or {}
    return {
        "run_id": run["run_id"],
        "command": run["command"],
        "started_at": run["started_at"],
        "finished_at": run["finished_at"],
        # A run without an end was interrupted (killed, crashed, host rebooted) or is still running.
        "outcome": run["outcome"] or ("unfinished" if not run["finished_at"] else None),
        "exit_code": run["exit_code"],
        "duration_s": summary.get("duration_s"),
        "read": summary.get("read") or {},
        "counts": summary.get("counts") or {},
        "error": summary.get("error"),
        "shape_held": summary.get("shape_held") or [],
    }
