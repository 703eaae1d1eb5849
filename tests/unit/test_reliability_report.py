"""docs/reliability.md rendering (tests/reliability/report.py): the Server drift group and its table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reliability.report import render


def drift(name: str, reported: int, repaired: int) -> dict[str, Any]:
    return {"name": name, "title": f"Server drift: {name}", "outcome": "passed", "runs": 1, "records_sent": 196,
            "duplicates": 0, "lost": 0, "drift_reported": reported, "repaired": repaired, "command": "pytest x"}


def test_drift_scenarios_get_their_group_and_a_row_with_reported_and_repaired() -> None:
    text, ok = render({"scenarios": {"drift-edited": drift("drift-edited", 1, 1),
                                     "drift-careplan-cascade": drift("drift-careplan-cascade", 18, 18)}},
                      Path("results.json"))
    assert ok
    assert "## Server drift" in text
    assert "| scenario | records reported | repaired | duplicates | lost |" in text
    assert "| [drift-careplan-cascade](#drift-careplan-cascade) | 18 | 18 | 0 | 0 |" in text
    assert "drift reported by verify: 1; repaired: 1" in text


def test_drift_not_all_repaired_fails_the_report() -> None:
    text, ok = render({"scenarios": {"drift-deleted": drift("drift-deleted", 3, 2)}}, Path("results.json"))
    assert not ok
    assert "| [drift-deleted](#drift-deleted) | **passed** |" in text
