"""The Prometheus text file: valid exposition format, counters and last success carried across runs."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from connector.ops.metrics import metrics_file_of_broken_config, parse_samples, render, write_textfile

SUMMARY = {
    "run_id": "abc", "exit_code": 65, "duration_s": 7.864,
    "durations": {"total_s": 7.864, "read_s": 0.41, "plan_s": 0.05, "write_s": 7.3},
    "read": {"read": 877, "accepted": 869, "rejected": 8},
    "counts": {"rejected": 8, "unchanged": 0, "created": 778, "updated": 0, "voided": 3, "in_review": 36},
    "requests": 80, "write_requests": 39, "retries": 2,
}
BACKLOG = {"pending": 0, "quarantined": 1, "in_review": 36, "open_reviews": 2}

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\\\|\\"|\\n)*"'
_SAMPLE = re.compile(rf"^({_NAME})(\{{(?:{_LABEL})(?:,{_LABEL})*\}})? (\S+)$")


def parse_exposition(text: str) -> dict[str, dict]:
    """A strict reader of the text format (version 0.0.4): returns family -> {type, help, samples}.

    Checks what Prometheus' own parser rejects: a TYPE after samples of its family, two TYPE lines for one
    family, sample lines that do not parse, values that are not floats, duplicate series, no final newline.
    """
    assert text.endswith("\n"), "the file must end with a newline"
    families: dict[str, dict] = {}
    seen_series: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        assert line == line.strip() and line, f"line {number}: blank or padded"
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            families.setdefault(name, {"samples": []})["help"] = line.split(" ", 3)[3]
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            family = families.setdefault(name, {"samples": []})
            assert "type" not in family and not family["samples"], f"line {number}: TYPE after samples or twice"
            family["type"] = kind
            continue
        assert not line.startswith("#"), f"line {number}: unknown comment"
        match = _SAMPLE.match(line)
        assert match, f"line {number}: not a sample line: {line!r}"
        name, labels, value = match.groups()
        series = name + (labels or "")
        assert series not in seen_series, f"line {number}: duplicate series {series}"
        seen_series.add(series)
        assert not math.isnan(float(value)), f"line {number}: value"
        assert name in families and "type" in families[name], f"line {number}: sample without TYPE ({name})"
        if families[name]["type"] == "counter":
            assert name.endswith("_total"), f"counter {name} must end in _total"
        families[name]["samples"].append((labels or "", float(value)))
    return families


def test_render_parses_and_has_the_expected_series() -> None:
    families = parse_exposition(render(SUMMARY, now=1_800_000_000, backlog=BACKLOG))
    values = parse_samples(render(SUMMARY, now=1_800_000_000, backlog=BACKLOG))
    assert families["peersync_last_run_exit_code"]["type"] == "gauge"
    assert values["peersync_last_run_exit_code"] == 65
    assert values["peersync_last_success_timestamp_seconds"] == 1_800_000_000  # 65 completed the run
    assert values['peersync_last_run_records{outcome="created"}'] == 778
    assert values['peersync_last_run_rows{result="rejected"}'] == 8
    assert values['peersync_last_run_phase_duration_seconds{phase="write"}'] == pytest.approx(7.3)
    assert values['peersync_last_run_requests{kind="retry"}'] == 2
    assert values['peersync_backlog_records{state="in_review"}'] == 36
    assert values["peersync_open_reviews"] == 2
    assert families["peersync_records_total"]["type"] == "counter"
    assert values['peersync_runs_total{exit_code="65"}'] == 1
    assert values["peersync_last_run_duration_seconds"] == pytest.approx(7.864)


def test_counters_and_last_success_carry_over(tmp_path: Path) -> None:
    path = tmp_path / "textfile" / "peersync.prom"
    write_textfile(path, SUMMARY, backlog=BACKLOG, now=1_000)
    write_textfile(path, SUMMARY | {"exit_code": 0, "counts": {"created": 2, "updated": 5}}, now=2_000)
    failed = {"exit_code": 69, "outcome": "failed", "duration_s": 1.0, "counts": {}}
    write_textfile(path, failed, now=3_000)
    text = path.read_text(encoding="utf-8")
    parse_exposition(text)
    values = parse_samples(text)
    assert values["peersync_last_run_exit_code"] == 69
    assert values["peersync_last_run_timestamp_seconds"] == 3_000
    assert values["peersync_last_success_timestamp_seconds"] == 2_000  # kept through the failed run
    assert values['peersync_records_total{outcome="created"}'] == 780
    assert values['peersync_runs_total{exit_code="65"}'] == 1
    assert values['peersync_runs_total{exit_code="0"}'] == 1
    assert values['peersync_runs_total{exit_code="69"}'] == 1
    assert not list(path.parent.glob("*.tmp")) and not list(path.parent.glob(".*.tmp"))


def test_never_succeeded_seeds_the_success_timestamp_at_zero() -> None:
    # "no success for 2 hours" must fire for an install whose runs never succeeded: the gauge exists, at 0.
    values = parse_samples(render({"exit_code": 77, "counts": {}}, now=5))
    assert values["peersync_last_success_timestamp_seconds"] == 0
    assert values["peersync_last_run_exit_code"] == 77
    later = parse_samples(render({"exit_code": 0, "counts": {}}, now=50, previous=values))
    assert later["peersync_last_success_timestamp_seconds"] == 50


def test_rows_only_for_a_run_that_read_and_the_reasons_it_needs_a_person() -> None:
    failed = parse_samples(render({"exit_code": 78, "counts": {}}, now=5))
    assert not any(key.startswith("peersync_last_run_rows") for key in failed)  # "0 rows" means an empty input
    assert failed["peersync_last_run_deletions_held"] == 0
    empty = parse_samples(render({"exit_code": 65, "counts": {}, "read": {"read": 0, "accepted": 0, "rejected": 0},
                                  "deletions_held_records": 12, "attention": ["no-input-rows", "deletions-held"]},
                                 now=5))
    assert empty['peersync_last_run_rows{result="read"}'] == 0
    assert empty["peersync_last_run_deletions_held"] == 12
    assert empty['peersync_last_run_attention{reason="no-input-rows"}'] == 1
    assert empty['peersync_last_run_attention{reason="deletions-held"}'] == 1


def test_metrics_file_of_a_config_that_does_not_load(tmp_path: Path) -> None:
    config = tmp_path / "peersync.toml"
    config.write_text('[output]\nmetrics_file = "metrics/peersync.prom"\n[sync]\nno_such_setting = 1\n',
                      encoding="utf-8")
    assert metrics_file_of_broken_config(config, {}) == tmp_path / "metrics" / "peersync.prom"
    assert metrics_file_of_broken_config(config, {"PEERSYNC_OUTPUT__METRICS_FILE": "/m/p.prom"}) == Path("/m/p.prom")
    (tmp_path / "bad.toml").write_text("[output\n", encoding="utf-8")
    assert metrics_file_of_broken_config(tmp_path / "bad.toml", {}) is None
    assert metrics_file_of_broken_config(None, {}) is None


def test_prometheus_client_parser_accepts_the_file_if_installed() -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    families = list(parser.text_string_to_metric_families(render(SUMMARY, now=1, backlog=BACKLOG)))
    assert "peersync_last_run_exit_code" in {f.name for f in families}
