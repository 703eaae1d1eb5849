"""Test hooks applied from outside connector/ (in-process by the tests, or in subprocesses via sitecustomize)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
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


def hold_lock_until_refused(signal_dir: str, timeout_s: float = 240.0) -> None:
    """Make two runs on one ledger overlap whatever the machine's speed: the run that takes the ledger lock waits,
    before any work, until another run has tried the lock and been refused. The refused run marks that by creating
    ``<signal_dir>/refused`` before it exits. ``timeout_s`` only bounds a broken test; it never decides a result."""
    import connector.run as run_module
    from connector.errors import LockHeldError

    original = run_module.LedgerLock.__enter__
    refused = Path(signal_dir) / "refused"

    def enter(self: Any) -> Any:
        try:
            held = original(self)
        except LockHeldError:
            refused.touch()
            raise
        deadline = time.monotonic() + timeout_s
        while not refused.exists():  # waits for an event (the other run's refusal), not for the work to finish
            if time.monotonic() > deadline:
                raise RuntimeError(f"test hook: no other run tried the ledger lock within {timeout_s:.0f} s")
            time.sleep(0.01)
        return held

    run_module.LedgerLock.__enter__ = enter  # type: ignore[method-assign]


def pause_after_ledger_commit(commits: int, signal_fd: int) -> None:
    """A crash point after the ``commits``-th ledger commit of confirmed units: write one byte to ``signal_fd``
    and block the committing thread until the test SIGKILLs the process. The run cannot finish meanwhile (its
    thread never returns), so the kill lands mid-run on any machine."""
    import connector.plan.ledger as ledger_module

    original = ledger_module.Ledger.record_confirmed_many
    count = 0
    count_lock = threading.Lock()

    def record_confirmed_many(self: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal count
        original(self, *args, **kwargs)
        with count_lock:
            count += 1
            reached = count == commits
        if reached:
            os.write(signal_fd, b"p")
            threading.Event().wait()  # until SIGKILL

    ledger_module.Ledger.record_confirmed_many = record_confirmed_many  # type: ignore[method-assign]


def read_only_folder(folder: str) -> None:
    """Simulate a folder the service user may not write (the suite runs as root, which ignores permissions):
    ``os.access(folder, W_OK)`` and anything under it answer False, as for a read-only mount."""
    real_access = os.access
    blocked = Path(folder).resolve()

    def access(path: Any, mode: int, **kwargs: Any) -> bool:
        target = Path(path).resolve()
        if mode & os.W_OK and (target == blocked or blocked in target.parents):
            return False
        return real_access(path, mode, **kwargs)

    os.access = access  # type: ignore[assignment]


def fail_renames_into(folder: str) -> None:
    """Simulate a full disk at the last step of an atomic write: ``os.replace`` into ``folder`` fails (ENOSPC)
    after the temporary file was written."""
    import errno

    real_replace = os.replace
    blocked = Path(folder).resolve()

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        if Path(dst).resolve().parent == blocked:
            raise OSError(errno.ENOSPC, "No space left on device (test hook)")
        real_replace(src, dst, **kwargs)

    os.replace = replace  # type: ignore[assignment]
