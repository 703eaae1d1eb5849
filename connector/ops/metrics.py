"""Prometheus text-file metrics (node_exporter textfile collector), written after every sync.

The file holds the last run's gauges (exit code, duration per phase, records by outcome, requests), the
ledger's backlog, and counters that add up across runs (records by outcome, runs by exit code). Counters
and the last success time are carried over from the previous file, so a failed run does not lose them.
Written atomically (temp file + rename), as the collector requires. No new dependency: the exposition
format is plain text (https://prometheus.io/docs/instrumenting/exposition_formats/).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from connector import __version__
from connector.files import PRIVATE_FILE_MODE, make_folder, write_atomically

SUCCESS_EXIT_CODES = (0, 65, 76)  # the run completed; 65: some rows need the program's attention; 76: types parked
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)(?:\s+\d+)?$")


def _labels(**labels: str) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
               for k, v in labels.items())
    return "{" + ",".join(escaped) + "}"


class _Family:
    """One metric family: HELP, TYPE and its samples."""

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name, self.kind, self.help = name, kind, help_text
        self.samples: list[tuple[str, float]] = []

    def add(self, value: float, **labels: str) -> None:
        self.samples.append((_labels(**labels), value))

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        for labels, value in self.samples:
            shown = f"{value:.3f}" if isinstance(value, float) and not value.is_integer() else f"{int(value)}"
            lines.append(f"{self.name}{labels} {shown}")
        return lines


class _Exposition:
    """The families of one metrics file, in the order they were added."""

    def __init__(self) -> None:
        self.families: list[_Family] = []

    def family(self, name: str, kind: str, help_text: str) -> _Family:
        fam = _Family(name, kind, help_text)
        self.families.append(fam)
        return fam

    def text(self) -> str:
        return "\n".join(line for fam in self.families for line in fam.render()) + "\n"


def _last_success(previous: dict[str, float], name: str, exit_code: int, now: float) -> float:
    """The last-success gauge: now when this run completed, else the previous file's value (0 until a success, so
    "no success for 2 hours" fires for an install that never succeeded)."""
    return round(now) if exit_code in SUCCESS_EXIT_CODES else previous.get(name, 0)


def _count_runs(runs: _Family, previous: dict[str, float], exit_code: int) -> None:
    """A runs-by-exit-code counter: the previous file's counts, plus one for this run's code."""
    codes = set(_label_values(previous, runs.name, "exit_code")) | {str(exit_code)}
    for code in sorted(codes, key=lambda c: int(c) if c.isdigit() else 999):
        key = f'{runs.name}{{exit_code="{code}"}}'
        runs.add(int(previous.get(key, 0)) + (1 if code == str(exit_code) else 0), exit_code=code)


def _label_values(samples: dict[str, float], name: str, label: str) -> list[str]:
    """Values of one label among a family's series in parsed samples, in file order."""
    pattern = re.compile(rf'^{re.escape(name)}\{{{label}="([^"]*)"\}}$')
    return [m.group(1) for key in samples if (m := pattern.match(key))]


def parse_samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value for every sample line of a text-format file (also used to carry values over)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line.strip())
        if match:
            try:
                values[match.group(1) + (match.group(2) or "")] = float(match.group(3))
            except ValueError:
                continue
    return values


def render(summary: dict[str, Any], now: float | None = None, *, backlog: dict[str, int] | None = None,
           previous: dict[str, float] | None = None) -> str:
    """The metrics text for one run summary (plus the ledger backlog and the previous file's counters)."""
    now = time.time() if now is None else now
    previous = previous or {}
    exit_code = int(summary.get("exit_code", 0))
    doc = _Exposition()
    family = doc.family

    family("peersync_info", "gauge", "peersync version (always 1).").add(1, version=__version__)
    fam = family("peersync_last_run_exit_code", "gauge",
                 "Exit code of the last run (0 ok, 65 data issues, 69 server, 75 lock, 77 auth, 78 config).")
    fam.add(exit_code)
    family("peersync_last_run_timestamp_seconds", "gauge", "When the last run finished (Unix time).").add(round(now))
    success = _last_success(previous, "peersync_last_success_timestamp_seconds", exit_code, now)
    family("peersync_last_success_timestamp_seconds", "gauge",
           "When a run last completed with exit 0 or 65 (Unix time; 0: never).").add(success)
    family("peersync_last_run_duration_seconds", "gauge", "Duration of the last run.").add(
        float(summary.get("duration_s", 0.0)))
    phases = family("peersync_last_run_phase_duration_seconds", "gauge", "Duration of each phase of the last run.")
    for phase, seconds in (summary.get("durations") or {}).items():
        if phase != "total_s":
            phases.add(float(seconds or 0.0), phase=phase.removesuffix("_s"))
    read = summary.get("read") or {}
    if read:  # absent when the run stopped before reading: "0 rows read" must mean an empty input
        rows = family("peersync_last_run_rows", "gauge", "Input rows in the last run, by result.")
        for name in ("read", "accepted", "rejected"):
            rows.add(int(read.get(name, 0)), result=name)
    family("peersync_last_run_deletions_held", "gauge",
           "Records missing from the input whose deletion the last run held back (a truncated input?).").add(
        int(summary.get("deletions_held_records", 0)))
    attention = family("peersync_last_run_attention", "gauge",
                       "1 for each reason the last run needs a person (no-input-rows, deletions-held, shape-held, "
                       "types-not-permitted, clinic-referrals-unanswered, records-rejected, records-quarantined, "
                       "records-in-review).")
    for reason in summary.get("attention") or []:
        attention.add(1, reason=reason)
    records = family("peersync_last_run_records", "gauge", "Records by outcome in the last run.")
    counts = summary.get("counts") or {}
    for name, value in counts.items():
        records.add(int(value), outcome=name)
    requests = family("peersync_last_run_requests", "gauge", "HTTP requests in the last run, by kind.")
    requests.add(int(summary.get("requests", 0)), kind="all")
    requests.add(int(summary.get("write_requests", 0)), kind="write")
    requests.add(int(summary.get("retries", 0)), kind="retry")
    if backlog is not None:
        waiting = family("peersync_backlog_records", "gauge", "Records waiting in the ledger, by state.")
        for name in ("pending", "quarantined", "in_review", "not_permitted"):
            waiting.add(int(backlog.get(name, 0)), state=name)
        family("peersync_open_reviews", "gauge", "Open entries in the review queue.").add(
            int(backlog.get("open_reviews", 0)))
    # Counters: the previous file's values plus this run's, for every label seen so far (a run that failed
    # early has no counts, and must not make the totals disappear).
    total = family("peersync_records_total", "counter", "Records by outcome, summed over all runs.")
    outcomes = list(counts) + [o for o in _label_values(previous, "peersync_records_total", "outcome")
                               if o not in counts]
    for name in outcomes:
        key = f'peersync_records_total{{outcome="{name}"}}'
        total.add(int(previous.get(key, 0)) + int(counts.get(name, 0)), outcome=name)
    runs = family("peersync_runs_total", "counter", "Runs by exit code, summed over all runs.")
    _count_runs(runs, previous, exit_code)
    return doc.text()


def write_textfile(path: Path, summary: dict[str, Any], *, backlog: dict[str, int] | None = None,
                   now: float | None = None, mode: int = PRIVATE_FILE_MODE) -> None:
    """Write atomically (temp file + rename in the same folder, the temp file removed if the write fails),
    created with ``mode``, carrying counters over from the old file."""
    make_folder(path.parent, mode)
    try:
        previous = parse_samples(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        previous = {}
    write_atomically(path, render(summary, now, backlog=backlog, previous=previous), mode)


def metrics_file_of_broken_config(config_path: Path | None, environ: Mapping[str, str] | None = None) -> Path | None:
    """Where ``[output] metrics_file`` points when the settings as a whole do not load (a run that stops with 78
    must still reach the alert rules): the environment variable, else the TOML file's value, else None."""
    environ = os.environ if environ is None else environ
    base = Path.cwd()
    value: object = environ.get("PEERSYNC_OUTPUT__METRICS_FILE")
    if not value and config_path is not None:
        from connector.errors import ConfigError
        from connector.ops.config import read_config_file

        try:
            value = (read_config_file(config_path).get("output") or {}).get("metrics_file")
        except (ConfigError, AttributeError):
            return None
        base = config_path.resolve().parent
    if not isinstance(value, str) or not value:
        return None
    path = Path(value)
    return path if path.is_absolute() else (base / path).resolve()


def pull_metrics_path(metrics_file: Path) -> Path:
    """Where `peersync pull` writes its metrics: beside the sync's file, ``<stem>-pull.prom``. A file of its own
    with ``peersync_pull_*`` names: the textfile collector refuses a metric that two files both define, and a pull
    must not overwrite the sync's last-run gauges that the alert rules read."""
    return metrics_file.with_name(f"{metrics_file.stem}-pull{metrics_file.suffix or '.prom'}")


def render_pull(summary: dict[str, Any], now: float | None = None, *, previous: dict[str, float] | None = None) -> str:
    """The metrics text of one pull (counts only: no patient data)."""
    now = time.time() if now is None else now
    previous = previous or {}
    exit_code = int(summary.get("exit_code", 0))
    doc = _Exposition()
    family = doc.family

    family("peersync_pull_last_run_exit_code", "gauge",
           "Exit code of the last pull (0 ok, 65 a referral skipped or a step failed, 69 server, 75 lock, 77 auth, "
           "78 config).").add(exit_code)
    family("peersync_pull_last_run_timestamp_seconds", "gauge", "When the last pull finished (Unix time).").add(
        round(now))
    success = _last_success(previous, "peersync_pull_last_success_timestamp_seconds", exit_code, now)
    family("peersync_pull_last_success_timestamp_seconds", "gauge",
           "When a pull last completed with exit 0 or 65 (Unix time; 0: never).").add(success)
    family("peersync_pull_last_run_duration_seconds", "gauge", "Duration of the last pull.").add(
        float(summary.get("duration_s") or 0.0))
    referrals = family("peersync_pull_last_run_referrals", "gauge", "Clinic referrals and steps of the last pull, "
                       "by outcome (delivered, received, skipped, still_skipped, problems...).")
    for name, value in (summary.get("counts") or {}).items():
        referrals.add(int(value), outcome=name)
    community = family("peersync_pull_community_referrals", "gauge",
                       "The program's community referrals by the status their Task had at the last pull.")
    for status, count in sorted((summary.get("referral_statuses") or {}).items()):
        community.add(int(count), status=status)
    runs = family("peersync_pull_runs_total", "counter", "Pulls by exit code, summed over all pulls.")
    _count_runs(runs, previous, exit_code)
    return doc.text()


def write_pull_textfile(path: Path, summary: dict[str, Any], *, now: float | None = None,
                        mode: int = PRIVATE_FILE_MODE) -> None:
    """Write a pull's metrics atomically (as :func:`write_textfile`), carrying its counters over."""
    make_folder(path.parent, mode)
    try:
        previous = parse_samples(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        previous = {}
    write_atomically(path, render_pull(summary, now, previous=previous), mode)
