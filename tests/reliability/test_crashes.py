"""Crashes and a damaged ledger: SIGKILL at seeded points, ledger lost, ledger corrupted, disk full under the ledger.

Each scenario ends with the invariant of relutil.check_invariant: no duplicates, nothing lost, content equal to a
clean sync of the same inputs, and a ledger that marks nothing sent that the server does not hold.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

from .relutil import (
    assert_no_traceback,
    check_invariant,
    cli_command,
    cli_env,
    converge,
    ledger_rows,
    measure,
    run_cli,
    runs,
    scenario_name,
    seed_for,
    versions,
)

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

CRASH_RUNS = 10  # seeded SIGKILL runs in a normal run (PEERSYNC_RELIABILITY_RUNS=30 for the long variant)
CRASH_PARTICIPANTS = 5  # trimmed demo program per crash run (plus both review cases and the bad-MRN row)


def sync_until_done(rel: Any, *, max_runs: int = 6, in_process: bool = False) -> list[int]:
    """Run sync (the CLI, or in-process to save the start-up second) until it reports done (0/65); bounded."""

    def step(_attempt: int) -> int:
        if in_process:
            return int(rel.sync_code()[0])
        proc = run_cli("sync", "--config", str(rel.config), "-q")
        assert_no_traceback(proc)
        return proc.returncode

    return converge(step, max_runs=max_runs)


class Killer:
    """SIGKILLs the sync subprocess from inside the fault proxy at request ``index`` and ``phase``."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.target: tuple[int, str] | None = None
        self.fired = threading.Event()

    def hook(self, index: int, phase: str, method: str) -> str | None:
        if self.target == (index, phase) and self.proc is not None and not self.fired.is_set():
            self.fired.set()
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(60)
            return "reset"
        return None


def test_sigkill_at_seeded_points_then_restart_converges(program_factory, faultproxy, references, record) -> None:
    """SIGKILL `peersync sync` at seeded points (at request k before it is forwarded, at request k after the server
    committed it but before the client heard, or right after its k-th ledger commit), sometimes twice; restart;
    check the invariant. Each kill point is an event in the run, never a time, so it lands the same on any machine."""
    n_runs = runs(CRASH_RUNS)
    seed = seed_for("crash-sigkill")
    rng = random.Random(seed)
    ref = references.get(CRASH_PARTICIPANTS)
    max_requests = ref["requests"]
    # Ledger commits of confirmed units: at least one per landing participant and one for the program-wide units.
    max_commits = CRASH_PARTICIPANTS + 1
    totals = {"runs": 0, "kills": 0, "sent": 0, "duplicates": 0, "lost": 0, "mismatches": 0, "ledger": 0}
    modes: dict[str, int] = {}
    killer = Killer()
    proxy = faultproxy(hook=killer.hook)
    failures: list[str] = []
    for run in range(n_runs):
        rel = program_factory(f"crash-{run}", server_url=proxy.base_url, participants=CRASH_PARTICIPANTS,
                              sync={"concurrency": rng.choice([1, 2, 4]), "max_bundle_entries": rng.choice([10, 100])})
        kills = 2 if rng.random() < 0.3 else 1
        for _ in range(kills):
            mode = rng.choice(["before-forward", "after-commit", "after-commit", "after-ledger-commit"])
            proxy.reset()
            killer.fired.clear()
            killer.target = None if mode == "after-ledger-commit" else (rng.randint(1, max_requests), mode)
            commits = rng.randint(1, max_commits)
            with tempfile.TemporaryFile("w+", encoding="utf-8") as stderr_file:  # a pipe could fill up and block
                if mode == "after-ledger-commit":
                    # The run writes a byte to the pipe after its k-th ledger commit and blocks until killed.
                    paused_read, paused_write = os.pipe()
                    env = cli_env({"PEERSYNC_RELIABILITY_PAUSE_AFTER_COMMITS": str(commits),
                                   "PEERSYNC_RELIABILITY_PAUSE_FD": str(paused_write)})
                    killer.proc = subprocess.Popen(cli_command("sync", "--config", str(rel.config), "-q"), env=env,
                                                   stdout=subprocess.DEVNULL, stderr=stderr_file, text=True,
                                                   pass_fds=(paused_write,))
                    os.close(paused_write)
                    with os.fdopen(paused_read, "rb") as paused:
                        if paused.read(1):  # b"" (end of file): the run ended before its k-th commit
                            killer.proc.send_signal(signal.SIGKILL)
                            killer.fired.set()
                else:
                    killer.proc = subprocess.Popen(cli_command("sync", "--config", str(rel.config), "-q"),
                                                   env=cli_env(), stdout=subprocess.DEVNULL, stderr=stderr_file,
                                                   text=True)
                killer.proc.wait(300)
                stderr_file.seek(0)
                stderr = stderr_file.read()
            if killer.fired.is_set():
                totals["kills"] += 1
                modes[mode] = modes.get(mode, 0) + 1
                assert killer.proc.returncode == -signal.SIGKILL
            else:
                assert_no_traceback(stderr)
                assert killer.proc.returncode in (0, 65), stderr[-2000:]
        killer.target = None
        codes = sync_until_done(rel, in_process=True)  # the restart (a fresh Syncer, ledger and lock)
        verdict = measure(rel, ref["content"])
        totals["runs"] += 1
        totals["sent"] += verdict.sent
        totals["duplicates"] += verdict.duplicates
        totals["lost"] += verdict.lost + verdict.extra
        totals["mismatches"] += verdict.content_mismatches
        totals["ledger"] += verdict.ledger_problems
        if not verdict.ok:
            failures.append(f"run {run} (exit codes after the kill {codes}): " + "; ".join(verdict.details[:4]))
    record(scenario_name("crash-sigkill", n_runs, CRASH_RUNS),
           f"SIGKILL of `peersync sync` at seeded points, restart until done ({n_runs} runs)",
           runs=totals["runs"], faults_injected=totals["kills"], faults_by_kind=modes, records_sent=totals["sent"],
           duplicates=totals["duplicates"], lost=totals["lost"], content_mismatches=totals["mismatches"], seed=seed,
           notes=[f"trimmed demo program: {CRASH_PARTICIPANTS} participants + 2 review cases per run",
                  "kill points: request k before forwarding, request k after the server committed it "
                  "(response never delivered), or right after the k-th ledger commit; 30% of runs are killed twice",
                  f"ledger rows contradicting the server: {totals['ledger']}"],
           env={"PEERSYNC_RELIABILITY_RUNS": str(n_runs)})
    assert not failures, "\n".join(failures)
    assert totals["kills"] >= max(1, n_runs // 2), f"too few kills landed mid-run: {totals['kills']} of {n_runs}"


def test_lost_ledger_resync_changes_nothing(program_factory, references, record) -> None:
    """The ledger is deleted (with its WAL): the next sync matches everything by identifier, creates nothing,
    makes no new versions, and the content still equals a clean sync."""
    ref = references.get(CRASH_PARTICIPANTS)
    rel = program_factory("lost-ledger", participants=CRASH_PARTICIPANTS)
    assert rel.sync_code()[0] == 65
    before = versions(rel.program)
    for suffix in ("", "-wal", "-shm"):
        Path(str(rel.ledger) + suffix).unlink(missing_ok=True)
    code, summary = rel.sync_code()
    assert code == 65 and summary.counts["created"] == 0, summary
    after = versions(rel.program)
    verdict = check_invariant(rel, ref["content"])
    record("ledger-deleted", "Ledger deleted between runs: full conditional re-send", runs=1, faults_injected=1,
           faults_by_kind={"ledger deleted": 1}, records_sent=verdict.sent, duplicates=verdict.duplicates,
           lost=verdict.lost, content_mismatches=verdict.content_mismatches,
           notes=[f"new versions after the re-send: {sum(1 for k in after if after[k] != before.get(k))}"])
    assert after == before


# -- a corrupted ledger ----------------------------------------------------------------------------------------------

CORRUPTIONS = ("header-random-bytes", "random-bytes-in-pages", "truncated-half", "truncated-to-one-page",
               "zero-length")


def corrupt(path: Path, how: str, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    if how == "header-random-bytes":
        data[0:100] = rng.randbytes(100)
    elif how == "random-bytes-in-pages":
        page = int.from_bytes(data[16:18], "big") or 65536
        for _ in range(12):  # clobber 12 runs of 64 bytes in pages after the first (schema) page
            at = rng.randrange(page, max(page + 1, len(data) - 64))
            data[at:at + 64] = rng.randbytes(64)
    elif how == "truncated-half":
        del data[len(data) // 2:]
    elif how == "truncated-to-one-page":
        page = int.from_bytes(data[16:18], "big") or 65536
        del data[page:]
    elif how == "zero-length":
        data = bytearray()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupted_ledger_fails_clearly_then_recovery_path_converges(how: str, program_factory, references,
                                                                    record) -> None:
    """A corrupted ledger: the run either stops before writing anything with a clear LedgerError (exit 78) that
    names the recovery path, or — where the damage is undetectable (a zero-length file is an empty database) —
    runs as a fresh ledger. Never a traceback, never a duplicate. Then follow the documented recovery path."""
    seed = seed_for(f"ledger-corrupt-{how}")
    ref = references.get(CRASH_PARTICIPANTS)
    rel = program_factory(f"corrupt-{how}", participants=CRASH_PARTICIPANTS)
    first = run_cli("sync", "--config", str(rel.config), "-q")
    assert first.returncode == 65, first.stderr
    before = versions(rel.program)
    assert not Path(str(rel.ledger) + "-wal").exists() or Path(str(rel.ledger) + "-wal").stat().st_size == 0
    corrupt(rel.ledger, how, random.Random(seed))
    damaged = run_cli("sync", "--config", str(rel.config))
    assert_no_traceback(damaged)
    notes = [f"first run after the damage: exit {damaged.returncode}"]
    if damaged.returncode == 78:
        message = damaged.stderr
        assert "unreadable or corrupt" in message and "move it aside" in message, message
        assert versions(rel.program) == before, "a run that refused the ledger wrote to the server"
        mv = re.search(r"\(mv (\S+) (\S+)\)", message)
        assert mv, f"the error names no recovery command: {message}"
        source, target = Path(mv.group(1)), Path(mv.group(2))
        assert source == rel.ledger
        shutil.move(source, target)  # the documented recovery path, literally
        for suffix in ("-wal", "-shm"):  # stale WAL files of the old ledger must not be replayed into a new one
            Path(str(source) + suffix).unlink(missing_ok=True)
        notes.append("clear LedgerError naming `mv LEDGER LEDGER.broken`; the server was not written to")
        recovered = run_cli("sync", "--config", str(rel.config), "-q")
        assert_no_traceback(recovered)
        assert recovered.returncode == 65, recovered.stderr
    else:
        assert damaged.returncode == 65, damaged.stderr
        notes.append("damage not detectable (an empty file is a valid empty database): ran as a new ledger, "
                     "full conditional re-send")
    verdict = check_invariant(rel, ref["content"])
    status = run_cli("status", "--config", str(rel.config), "--json")
    assert status.returncode == 0 and "Traceback" not in status.stderr
    record(f"ledger-corrupt-{how}", f"Ledger corrupted ({how.replace('-', ' ')}), then the recovery path",
           runs=2, faults_injected=1, faults_by_kind={how: 1}, records_sent=verdict.sent,
           duplicates=verdict.duplicates, lost=verdict.lost, content_mismatches=verdict.content_mismatches, seed=seed,
           notes=notes)


# -- disk full under the ledger --------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra_pages", [2, 12])
def test_disk_full_on_the_ledger_fails_clearly_and_the_next_run_converges(extra_pages: int, program_factory,
                                                                         references, record) -> None:
    """The ledger's disk fills up mid-run (simulated with PRAGMA max_page_count through a test hook): the run stops
    with a clear error and a non-zero exit code, nothing is marked sent that the server did not confirm, and the
    next run with space converges to the clean state."""
    ref = references.get(CRASH_PARTICIPANTS)
    rel = program_factory(f"diskfull-{extra_pages}", participants=CRASH_PARTICIPANTS)
    full = run_cli("sync", "--config", str(rel.config), "-q",
                   env=cli_env({"PEERSYNC_RELIABILITY_LEDGER_MAX_PAGES": str(extra_pages)}))
    assert_no_traceback(full)
    assert full.returncode == 78, f"exit {full.returncode}: {full.stderr[-2000:]}"
    assert "disk is full" in full.stderr and "free space and run sync again" in full.stderr, full.stderr
    partial = measure(rel, None)
    assert partial.ledger_problems == 0, partial.details
    assert partial.duplicates == 0
    sent_before = ledger_rows(rel.ledger, "SELECT count(*) FROM units WHERE state='sent'")[0][0]
    sync_until_done(rel)
    verdict = check_invariant(rel, ref["content"])
    record(f"ledger-disk-full-{extra_pages}", f"Disk full under the ledger after {extra_pages} more pages",
           runs=2, faults_injected=1, faults_by_kind={"SQLITE_FULL": 1}, records_sent=verdict.sent,
           duplicates=verdict.duplicates, lost=verdict.lost, content_mismatches=verdict.content_mismatches,
           notes=[f"exit {full.returncode} with the documented 'disk is full' message; "
                  f"{sent_before} units were marked sent before the disk filled, all confirmed by the server"],
           env={})


