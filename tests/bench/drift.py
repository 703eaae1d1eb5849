"""The cost of ``peersync verify``: a first sync, then a verify of everything it wrote, timed side by side.

Both run in-process as the CLI runs them: ``Syncer.run`` for the sync, ``verify_ledger`` (batched ``_id``
searches with ``_elements``) for the verify. The verify's figure is a ratio to the first sync of the same program.
"""

from __future__ import annotations

import uuid
from typing import Any

from connector.ops.logs import new_run_id
from connector.ops.verify import verify_ledger
from connector.plan.ledger import Ledger
from connector.wiring import build_client

from .common import Timer, work_dir
from .writes import run_peersync


def demo_program(base_url: str) -> Any:
    """The demo program (fixtures/demo) under a fresh program id, its Patients loaded (not timed)."""
    from tests.integration.syncutil import make_program

    root = work_dir() / "runs" / f"demo{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True)
    return make_program(root, base_url)


def sync_then_verify(program: Any) -> dict[str, Any]:
    """A timed first sync and a timed verify of the same program: seconds, requests, resources checked."""
    first, _summary = run_peersync(program, "first sync")
    settings = program.settings()
    new_run_id()
    client = build_client(settings)
    with Timer() as timer, Ledger(settings.sync.ledger) as ledger:
        report = verify_ledger(client, ledger)
    totals = report.totals()
    return {"first_sync": vars(first), "verify": {"seconds": timer.seconds, "requests": report.requests,
                                                  "resources": sum(totals.values()), "totals": totals}}
