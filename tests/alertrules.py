"""Evaluate docs/examples/peersync-alerts.yml against a metrics file that peersync wrote, with ``promtool test rules``.

A metrics file is one scrape: its gauges become promtool input series, held from the moment the file was written
(its ``peersync_last_run_timestamp_seconds``) until the evaluation time, one sample a minute, as a textfile
collector would keep exposing an unchanged file. promtool's clock starts at 0, so every ``*_timestamp_seconds``
value is shifted by the same base as the clock: ``time() - peersync_last_success_timestamp_seconds`` keeps its
real value (a success seeded at 0, "never", becomes a large negative number: long ago).

The check is a ``promql_expr_test`` on the ``ALERTS`` series that promtool's rule evaluation writes: the firing
alerts by name (and ``reason`` label), compared with the expected set; promtool's own message shows expected
and got. promtool is Debian's ``prometheus`` package (``.ci/run`` installs it): without it the check fails.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

import yaml

from connector.ops.metrics import parse_samples

REPO = Path(__file__).resolve().parents[1]
ALERT_RULES = REPO / "docs" / "examples" / "peersync-alerts.yml"
MINUTE = 60
FIRING = 'count by (alertname, reason) (ALERTS{alertstate="firing"})'


class PromtoolMissing(AssertionError):
    """promtool is not installed: the alert rules cannot be checked."""


def promtool() -> str:
    """The promtool executable, or PromtoolMissing with the fix."""
    found = shutil.which("promtool")
    if not found:
        raise PromtoolMissing("promtool not found: install it with `apt-get install prometheus` (Debian's package; "
                              ".ci/run installs it). The alert-rule tests never skip.")
    return found


def _series_value(name: str, value: float, base: float) -> str:
    shifted = value - base if name.endswith("_timestamp_seconds") else value
    return repr(int(shifted)) if float(shifted).is_integer() else repr(float(shifted))


def _expected_label_set(alert: str) -> str:
    """'PeersyncDataProblems{reason="records-rejected"}' or 'PeersyncRunFailed' -> a promtool label set."""
    name, _, rest = alert.partition("{")
    labels = f'alertname="{name}"' + (f",{rest.rstrip('}')}" if rest else "")
    return "{" + labels + "}"


def build_test(metrics_text: str, expected: Iterable[str], *, later_s: float = MINUTE,
               rules: Path = ALERT_RULES) -> dict[str, object]:
    """The promtool test document: the file's series from when it was written until ``later_s`` after."""
    samples = parse_samples(metrics_text)
    written_at = samples.get("peersync_last_run_timestamp_seconds")
    if written_at is None:
        raise AssertionError("the metrics file has no peersync_last_run_timestamp_seconds")
    minutes = max(1, round(later_s / MINUTE))
    series = [{"series": key, "values": f"{_series_value(key.split('{')[0], value, written_at)}x{minutes}"}
              for key, value in samples.items()]
    return {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": series,
            "promql_expr_test": [{
                "expr": FIRING,
                "eval_time": f"{minutes}m",
                "exp_samples": [{"labels": _expected_label_set(a), "value": 1} for a in sorted(set(expected))],
            }],
        }],
    }


def assert_alerts(metrics_text: str, expected: Iterable[str], *, later_s: float = MINUTE,
                  rules: Path = ALERT_RULES) -> None:
    """Assert that exactly ``expected`` alerts fire ``later_s`` seconds after the metrics file was written.

    ``expected`` holds alert names, with the ``reason`` label where the rule has one:
    ``{"PeersyncRunFailed", 'PeersyncDataProblems{reason="records-rejected"}'}``.
    """
    executable = promtool()
    with tempfile.TemporaryDirectory(prefix="peersync-alerts-") as folder:
        test_file = Path(folder) / "alerts-test.yml"
        test_file.write_text(yaml.safe_dump(build_test(metrics_text, expected, later_s=later_s, rules=rules),
                                            sort_keys=False), encoding="utf-8")
        result = subprocess.run([executable, "test", "rules", str(test_file)], capture_output=True, text=True,
                                timeout=120, check=False)
    if result.returncode != 0:
        raise AssertionError(f"alert rules {rules.name} {later_s:.0f} s after the run:\n{result.stdout}{result.stderr}")
