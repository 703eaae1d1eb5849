"""The reliability suite's results file: one entry per scenario, merged into a JSON file at the end of a session.

Path: ``PEERSYNC_RELIABILITY_RESULTS``, else ``.peersync/reliability-results.json`` in the repository.
``tests/reliability/report.py`` turns it into docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def results_path() -> Path:
    return Path(os.environ.get("PEERSYNC_RELIABILITY_RESULTS") or REPO / ".peersync" / "reliability-results.json")


@dataclass
class Scenario:
    """What one scenario did and found. Counts are totals over all its runs."""

    name: str
    title: str
    test: str = ""
    outcome: str = "unknown"  # passed / failed (from the test's report)
    runs: int = 0
    faults_injected: int = 0
    faults_by_kind: dict[str, int] = field(default_factory=dict)
    records_sent: int = 0
    duplicates: int = 0
    lost: int = 0
    phi_hits: int | None = None  # None: not scanned in this scenario
    content_mismatches: int | None = None  # None: content not compared
    drift_reported: int | None = None  # server drift: resources `peersync verify` reported changed or missing
    repaired: int | None = None  # server drift: of those, back with a clean sync's content after `verify --repair`
    command: str = ""
    seed: int | None = None
    duration_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    finished_at: str = ""


class Recorder:
    """Collects scenarios during a session; :meth:`write` merges them into the results file."""

    def __init__(self) -> None:
        self.scenarios: dict[str, Scenario] = {}
        self.by_test: dict[str, list[str]] = {}
        self.started: dict[str, float] = {}
        self.environment: dict[str, Any] = {}

    def start_test(self, nodeid: str) -> None:
        self.started[nodeid] = time.monotonic()

    def record(self, nodeid: str, name: str, title: str, *, env: dict[str, str] | None = None,
               **values: Any) -> Scenario:
        """Add or update a scenario (values: any Scenario field; lists and counts accumulate if repeated)."""
        scenario = self.scenarios.get(name) or Scenario(name=name, title=title)
        scenario.title = title
        scenario.test = nodeid
        for key, value in values.items():
            setattr(scenario, key, value)
        scenario.duration_s = round(time.monotonic() - self.started.get(nodeid, time.monotonic()), 1)
        scenario.finished_at = datetime.now(UTC).isoformat(timespec="seconds")
        scenario.command = reproduce_command(nodeid, env)
        self.scenarios[name] = scenario
        self.by_test.setdefault(nodeid, [])
        if name not in self.by_test[nodeid]:
            self.by_test[nodeid].append(name)
        return scenario

    def set_outcome(self, nodeid: str, outcome: str) -> None:
        for name in self.by_test.get(nodeid, []):
            scenario = self.scenarios[name]
            if scenario.outcome != "failed":
                scenario.outcome = outcome
            scenario.duration_s = round(time.monotonic() - self.started.get(nodeid, time.monotonic()), 1)

    def write(self, session: dict[str, Any] | None = None) -> Path | None:
        """Merge this session's scenarios (and a line about the session itself) into the results file."""
        if not self.scenarios:
            return None
        path = results_path()
        existing: dict[str, Any] = {}
        if path.exists():
            try:
                existing = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                existing = {}
        scenarios = existing.get("scenarios", {})
        for name, scenario in self.scenarios.items():
            scenarios[name] = asdict(scenario)
        sessions = existing.get("sessions", [])
        if session is not None:
            sessions = [*sessions, session | {"scenarios": sorted(self.scenarios)}][-8:]
        data = {
            "format": 1,
            "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": existing.get("machine", {}) | machine_info() | self.environment,
            "sessions": sessions,
            "scenarios": dict(sorted(scenarios.items())),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path


def reproduce_command(nodeid: str, env: dict[str, str] | None = None) -> str:
    """The command that re-runs one scenario with the same seed (and run count, when set)."""
    settings = {"PEERSYNC_RELIABILITY_SEED": os.environ.get("PEERSYNC_RELIABILITY_SEED") or "20260801"}
    if os.environ.get("PEERSYNC_RELIABILITY_RUNS"):
        settings["PEERSYNC_RELIABILITY_RUNS"] = os.environ["PEERSYNC_RELIABILITY_RUNS"]
    settings.update(env or {})
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in settings.items())
    return f"{prefix} .venv/bin/python -m pytest -p no:cacheprovider {shlex.quote(nodeid)}"


def machine_info() -> dict[str, Any]:
    """Where and when the suite ran (no user names, no paths outside the repository)."""
    info: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "hostname": socket.gethostname(),
        "os": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            kb = int(handle.readline().split()[1])
        info["memory_gib"] = round(kb / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), None)
        if model:
            info["cpu_model"] = model
    except OSError:
        pass
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
    return info
