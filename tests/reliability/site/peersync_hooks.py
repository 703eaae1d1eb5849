"""Test hooks applied from outside connector/ (in-process by the tests, or in subprocesses via sitecustomize)."""

from __future__ import annotations

from typing import Any


def limit_ledger_pages(extra_pages: int) -> None:
    """Simulate a full disk: each Ledger connection may grow by ``extra_pages`` pages, then SQLITE_FULL."""
    import connector.plan.ledger as ledger_module

    original = ledger_module.Ledger.__init__
    if getattr(original, "_peersync_limited", False):
        return

    def limited_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        self.db.execute(f"PRAGMA max_page_count = {int(pages) + extra_pages}")

    limited_init._peersync_limited = True  # type: ignore[attr-defined]
    ledger_module.Ledger.__init__ = limited_init  # type: ignore[method-assign]
