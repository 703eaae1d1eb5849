"""Loaded at start-up by peersync subprocesses of the reliability suite (this folder is put first on PYTHONPATH).

* ``PEERSYNC_NETGUARD=1``: refuse and record any traffic to a non-loopback address (see peersync_netguard).
* ``PEERSYNC_RELIABILITY_LEDGER_MAX_PAGES=N``: a test hook that simulates a full disk under the ledger: every
  ledger connection gets ``PRAGMA max_page_count`` = its current size + N pages, so writes fail with
  SQLITE_FULL ("database or disk is full") once the ledger has grown by N pages. Nothing in connector/ knows
  about it: the hook wraps ``connector.plan.ledger.Ledger.__init__`` from outside.
* ``PEERSYNC_RELIABILITY_LOCK_RENDEZVOUS=DIR``: the run that takes the ledger lock waits until another run has been
  refused the lock (it marks DIR/refused), so two runs overlap on any machine (test_concurrency).
* ``PEERSYNC_RELIABILITY_PAUSE_AFTER_COMMITS=N`` with ``PEERSYNC_RELIABILITY_PAUSE_FD=FD``: after the N-th ledger
  commit of confirmed units, write a byte to FD and block until killed (test_crashes' SIGKILL point).
* ``PEERSYNC_RELIABILITY_READ_ONLY=DIR``: DIR (and what is under it) is not writable for ``os.access``, as for a
  service user without write permission (the suite runs as root, which ignores file modes).
* ``PEERSYNC_RELIABILITY_FAIL_RENAMES_INTO=DIR``: ``os.replace`` into DIR fails with ENOSPC (a full disk at the
  last step of an atomic write).
"""

from __future__ import annotations

import os

if os.environ.get("PEERSYNC_NETGUARD") == "1":
    import peersync_netguard

    peersync_netguard.install()

if os.environ.get("PEERSYNC_RELIABILITY_LEDGER_MAX_PAGES"):
    import peersync_hooks

    peersync_hooks.limit_ledger_pages(int(os.environ["PEERSYNC_RELIABILITY_LEDGER_MAX_PAGES"]))

if os.environ.get("PEERSYNC_RELIABILITY_LOCK_RENDEZVOUS"):
    import peersync_hooks

    peersync_hooks.hold_lock_until_refused(os.environ["PEERSYNC_RELIABILITY_LOCK_RENDEZVOUS"])

if os.environ.get("PEERSYNC_RELIABILITY_PAUSE_AFTER_COMMITS"):
    import peersync_hooks

    peersync_hooks.pause_after_ledger_commit(int(os.environ["PEERSYNC_RELIABILITY_PAUSE_AFTER_COMMITS"]),
                                             int(os.environ["PEERSYNC_RELIABILITY_PAUSE_FD"]))

if os.environ.get("PEERSYNC_RELIABILITY_READ_ONLY"):
    import peersync_hooks

    peersync_hooks.read_only_folder(os.environ["PEERSYNC_RELIABILITY_READ_ONLY"])

if os.environ.get("PEERSYNC_RELIABILITY_FAIL_RENAMES_INTO"):
    import peersync_hooks

    peersync_hooks.fail_renames_into(os.environ["PEERSYNC_RELIABILITY_FAIL_RENAMES_INTO"])
