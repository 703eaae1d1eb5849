"""Two `peersync sync` processes started together on the same ledger: exactly one runs; the other exits with the
lock-held code 75 and a clear message, having done nothing (no run recorded, no request sent)."""

from __future__ import annotations

import subprocess

import pytest

from .relutil import (
    assert_no_traceback,
    check_invariant,
    cli_command,
    cli_env,
    ledger_rows,
    runs,
    scenario_name,
    seed_for,
)

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

PARTICIPANTS = 4
PAIRS = 3


def test_two_syncs_on_one_ledger_exactly_one_runs(program_factory, references, record, tmp_path) -> None:
    n = runs(PAIRS)
    seed = seed_for("concurrency")
    ref = references.get(PARTICIPANTS)
    sent = duplicates = lost = mismatches = 0
    notes: list[str] = []
    for pair in range(n):
        rel = program_factory(f"pair-{pair}", participants=PARTICIPANTS)
        # The run that takes the lock waits (before any work) until the other has been refused it: the two runs
        # overlap whatever the machine's speed, and either may win the race for the lock.
        rendezvous = tmp_path / f"rendezvous-{pair}"
        rendezvous.mkdir()
        env = cli_env({"PEERSYNC_RELIABILITY_LOCK_RENDEZVOUS": str(rendezvous)})
        procs = [subprocess.Popen(cli_command("sync", "--config", str(rel.config)), env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        results = [(p.wait(300), *p.communicate()) for p in procs]
        codes = sorted(code for code, _out, _err in results)
        assert codes == [65, 75], f"pair {pair}: exit codes {codes}: {[r[2][-800:] for r in results]}"
        assert (rendezvous / "refused").exists()
        loser = next(r for r in results if r[0] == 75)
        assert_no_traceback(loser[2])
        assert "another peersync run holds the lock" in loser[2] and "did nothing" in loser[2], loser[2]
        assert ledger_rows(rel.ledger, "SELECT count(*) FROM runs")[0][0] == 1, "the losing run left a trace"
        verdict = check_invariant(rel, ref["content"])
        sent += verdict.sent
        duplicates += verdict.duplicates
        lost += verdict.lost
        mismatches += verdict.content_mismatches
        winner = "first" if results[0][0] == 65 else "second"
        notes.append(f"pair {pair}: both started together; the {winner} took the lock and waited for the other's "
                     "refusal")
    record(scenario_name("concurrency-lock", n, PAIRS), "Two syncs started together on one ledger", runs=n,
           faults_injected=n, faults_by_kind={"concurrent start": n}, records_sent=sent, duplicates=duplicates,
           lost=lost, content_mismatches=mismatches, seed=seed,
           notes=[*notes, "the loser exits 75 with 'another peersync run holds the lock ... this run did nothing'"])
