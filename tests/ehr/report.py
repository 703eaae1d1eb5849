"""Print the request counts of the EHR-restriction tests as a Markdown table (for docs/ehr-restrictions.md).

Reads ``.peersync/ehr-restrictions/<mode>.json``, written by tests/integration/test_ehr_restrictions.py::

    python tests/ehr/report.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2] / ".peersync" / "ehr-restrictions"
ORDER = ("unrestricted", "batch-only", "no-conditional-update", "no-conditional-references",
         "only-communication-provenance", "max-8-entries", "max-8-entries-unstated", "rate-limit",
         "careteam-refused", *(f"{mode}-{strategy}" for strategy in ("batch", "single")
                               for mode in ("only-communication-provenance", "max-8-entries", "careteam-refused")))


def _cell(run: dict) -> str:
    proxy = run["proxy"]
    refused = sum(proxy["refused"].values())
    return (f"exit {run['exit_code']}, {proxy['requests']} req ({proxy['writes']} writes"
            + (f", {refused} refused" if refused else "") + f"), {run.get('seconds', '?')} s")


def table(results: Path = RESULTS) -> str:
    """One row per mode: each run's exit code, requests, writes, refusals, seconds; then the server's state."""
    lines = ["| mode | first sync | again | ledger deleted | on the server after the 3 runs |",
             "|---|---|---|---|---|"]
    for mode in ORDER:
        path = results / f"{mode}.json"
        if not path.is_file():
            continue
        runs = json.loads(path.read_text(encoding="utf-8"))["runs"]
        cells = [_cell(r) for r in runs] + ["(not reached)"] * (3 - len(runs))
        last = runs[-1]
        landed = sum(last["on_server"].values())
        expected = sum(last["expected"].values())
        state = (f"{landed} of {expected} accepted records, {last['duplicates']} duplicates, "
                 f"{last['broken_references']} broken references"
                 + (f" ({last['checker_broken']} by peersync's checker)" if "checker_broken" in last else ""))
        lines.append(f"| `{mode}` | " + " | ".join(cells) + f" | {state} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(table() + "\n")
