"""Prometheus text-file metrics (node_exporter textfile collector): the run summary's counters."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def render(summary: dict[str, Any], now: float | None = None) -> str:
    """The metrics text for one run summary."""
    lines = [
        "# HELP peersync_records_total Records by outcome in the last run.",
        "# TYPE peersync_records_total gauge",
    ]
    for name, value in summary.get("counts", {}).items():
        lines.append(f'peersync_records_total{{outcome="{name}"}} {int(value)}')
    read = summary.get("read") or {}
    lines += [
        "# HELP peersync_rows_read Rows read from the inputs in the last run.",
        "# TYPE peersync_rows_read gauge",
        f"peersync_rows_read {int(read.get('read', 0))}",
        "# HELP peersync_requests_total HTTP requests in the last run (including retries).",
        "# TYPE peersync_requests_total gauge",
        f"peersync_requests_total {int(summary.get('requests', 0))}",
        f"peersync_write_requests_total {int(summary.get('write_requests', 0))}",
        f"peersync_retries_total {int(summary.get('retries', 0))}",
        "# HELP peersync_last_run_exit_code Exit code of the last run.",
        "# TYPE peersync_last_run_exit_code gauge",
        f"peersync_last_run_exit_code {int(summary.get('exit_code', 0))}",
        "# HELP peersync_last_run_duration_seconds Duration of the last run.",
        "# TYPE peersync_last_run_duration_seconds gauge",
        f"peersync_last_run_duration_seconds {float(summary.get('duration_s', 0.0)):.3f}",
        "# HELP peersync_last_run_timestamp_seconds When the last run finished.",
        "# TYPE peersync_last_run_timestamp_seconds gauge",
        f"peersync_last_run_timestamp_seconds {now or time.time():.0f}",
    ]
    if summary.get("exit_code") in (0, 65):
        lines += [
            "# HELP peersync_last_success_timestamp_seconds When a run last completed (all sent or only data issues).",
            "# TYPE peersync_last_success_timestamp_seconds gauge",
            f"peersync_last_success_timestamp_seconds {now or time.time():.0f}",
        ]
    return "\n".join(lines) + "\n"


def write_textfile(path: Path, summary: dict[str, Any]) -> None:
    """Write atomically (temp file + rename), as the textfile collector requires."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    tmp.write_text(render(summary), encoding="utf-8")
    os.replace(tmp, path)
