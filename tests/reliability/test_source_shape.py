"""Source-shape scenarios: the export changes shape between two syncs (a column renamed, removed or with an
undecodable name, a kind's rows cut to half). Nothing on the server loses data: every resource is read back and
compared with what the first sync wrote, and the run says why it held the kind (summary, --json, status)."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .relutil import RelProgram, normalized_content, run_cli, versions

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

PARTICIPANTS = 6


def rewrite_header(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    header, rest = data.split(b"\n", 1)
    columns = header.split(b",")
    assert old in columns
    path.write_bytes(b",".join(new if c == old else c for c in columns) + b"\n" + rest)


def drop_column(path: Path, name: str) -> None:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    index = rows[0].index(name)
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(row[:index] + row[index + 1:] for row in rows)


def cut_rows(path: Path, keep: float) -> None:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows[: 1 + int((len(rows) - 1) * keep)])


SCENARIOS: dict[str, tuple[str, Callable[[Path], None], bool, str]] = {
    # name: (title, edit of the inputs folder, held?, what the reason names)
    "shape-column-renamed": ("contacts.csv: `notes` renamed `Notes ` (case and a trailing space)",
                             lambda inputs: rewrite_header(inputs / "contacts.csv", b"notes", b'" Notes "'),
                             False, ""),
    "shape-column-removed": ("contacts.csv: the `notes` column removed",
                             lambda inputs: drop_column(inputs / "contacts.csv", "notes"), True, "'notes'"),
    "shape-column-invalid-utf8-name": ("contacts.csv: invalid UTF-8 in the `notes` header (`no\\xfftes`)",
                                       lambda inputs: rewrite_header(inputs / "contacts.csv", b"notes", b"no\xfftes"),
                                       True, "'notes'"),
    "shape-rows-cut-to-half": ("goals.csv: half of its rows cut off",
                               lambda inputs: cut_rows(inputs / "goals.csv", 0.5), True, "goal held"),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_source_shape_change_loses_nothing(name: str, program_factory: Callable[..., RelProgram],
                                           record: Callable[..., Any]) -> None:
    title, edit, held, reason = SCENARIOS[name]
    rel = program_factory(name, participants=PARTICIPANTS)
    first_code, first = rel.sync_code()
    assert first_code in (0, 65), first
    before_content, before_versions = normalized_content(rel.program), versions(rel.program)

    edit(rel.program.inputs)
    code, summary = rel.sync_code()
    after_content, after_versions = normalized_content(rel.program), versions(rel.program)
    changed = sorted(k for k in before_content if after_content.get(k) != before_content[k])
    lost = sum(1 for k in before_content if k not in after_content)
    assert not changed and not lost, f"the server lost data: {changed[:5]}"
    updated = sorted(k for k in before_versions if after_versions.get(k) != before_versions[k])
    assert not updated, f"resources were rewritten: {updated[:5]}"
    notes = [f"first sync exit {first_code}; after the edit exit {code}"]
    if held:
        assert code == 65 and len(summary.shape_held) == 1 and reason in summary.shape_held[0], summary.shape_held
        status = run_cli("status", "--json", "--config", str(rel.config))
        assert json.loads(status.stdout)["last_run"]["shape_held"] == summary.shape_held
        notes.append(f"held: {summary.shape_held[0]}")
        accepted_code, accepted = rel.sync_code(sync={"accept_shape_change": True})
        assert accepted_code in (0, 65) and not accepted.shape_held
        notes.append(f"with sync.accept_shape_change: exit {accepted_code}, {accepted.counts['updated']} updated, "
                     f"{accepted.counts['deleted']} voided; the next run remembers the new shape")
    else:
        assert code == first_code and not summary.shape_held and summary.counts["updated"] == 0
        notes.append("the renamed header matched `notes`: nothing held, nothing rewritten")
    record(name, title, runs=3 if held else 2, faults_injected=1, faults_by_kind={"export edited": 1},
           records_sent=len(after_content), duplicates=sum(1 for v in after_content.values() if len(v) > 1),
           lost=lost, content_mismatches=len(changed), notes=notes)
