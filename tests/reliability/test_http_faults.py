"""HTTP-level faults through tests/reliability/faultproxy.py: 429 with Retry-After, 500, 502, 503, connection
resets, and — the worst case — responses lost AFTER the server committed the transaction (dropped, replaced by
500, cut off mid-body, or held past the client's timeout). The demo program is synced through at least 20% failing
requests, re-running sync until it converges; the server must end exactly as after a clean sync."""

from __future__ import annotations

import pytest

from .faultproxy import COMMITTING_FAULTS, FAULTS, Schedule
from .relutil import check_invariant, converge, runs, scenario_name, seed_for

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

# Every fault kind; the slow one costs a client timeout each time, so it is drawn less often.
WEIGHTS = {fault: 1.0 for fault in FAULTS if fault != "400-echo"} | {"slow-after-commit": 0.4}


def _sync_through(proxy, rel, *, max_runs: int) -> tuple[list[int], int, int]:
    requests_made = retries = 0

    def step(_attempt: int) -> int:
        nonlocal requests_made, retries
        code, result = rel.sync_code()
        if hasattr(result, "requests"):
            requests_made += result.requests
            retries += result.retries
        return code

    return converge(step, max_runs=max_runs, max_seconds=420), requests_made, retries


@pytest.mark.parametrize("variant", ["full-demo-default-retries", "trimmed-one-retry"])
def test_demo_sync_through_http_faults_converges_to_the_clean_state(variant: str, faultproxy, program_factory,
                                                                    references, record) -> None:
    """full-demo-default-retries: the whole demo program, 35% of requests faulted, the default retry budget.
    trimmed-one-retry: one retry only, so runs end with 69 (server unavailable) and must converge over re-runs."""
    participants = None if variant.startswith("full") else 16
    rate, attempts = (0.35, 5) if variant.startswith("full") else (0.4, 1)
    n = runs(1)
    ref = references.get(participants)
    totals = {"runs": 0, "requests": 0, "faults": 0, "sent": 0, "duplicates": 0, "lost": 0, "mismatches": 0}
    by_kind: dict[str, int] = {}
    notes: list[str] = []
    for repeat in range(n):
        seed = seed_for(f"http-faults-{variant}-{repeat}")
        proxy = faultproxy(Schedule(seed=seed, rate=rate, weights=WEIGHTS), slow_seconds=2.5)
        rel = program_factory(f"http-{variant}-{repeat}", server_url=proxy.base_url, participants=participants,
                              server={"timeout_seconds": 2}, sync={"retry_attempts": attempts})
        codes, _requests, _retries = _sync_through(proxy, rel, max_runs=40)
        stats = proxy.stats
        fraction = stats.total_faults / max(1, stats.requests)
        assert fraction >= 0.2, f"only {fraction:.0%} of requests were faulted"
        assert sum(stats.faults[f] for f in COMMITTING_FAULTS) > 0, "no response was lost after a commit"
        verdict = check_invariant(rel, ref["content"])
        totals["runs"] += len(codes)
        totals["requests"] += stats.requests
        totals["faults"] += stats.total_faults
        totals["sent"] += verdict.sent
        totals["duplicates"] += verdict.duplicates
        totals["lost"] += verdict.lost + verdict.extra
        totals["mismatches"] += verdict.content_mismatches
        for kind, count in stats.faults.items():
            by_kind[kind] = by_kind.get(kind, 0) + count
        notes.append(f"seed {seed}: exit codes {codes}; {stats.total_faults} of {stats.requests} requests faulted "
                     f"({fraction:.0%}); {stats.forwarded_writes} writes reached the server")
    record(scenario_name(f"http-faults-{variant}", n, 1),
           "HTTP faults (429/500/502/503, resets, responses lost after commit): "
           + ("whole demo, default retries" if participants is None else f"{participants} participants, 1 retry"),
           runs=totals["runs"], faults_injected=totals["faults"], faults_by_kind=dict(sorted(by_kind.items())),
           records_sent=totals["sent"], duplicates=totals["duplicates"], lost=totals["lost"],
           content_mismatches=totals["mismatches"], seed=seed_for(f"http-faults-{variant}-0"),
           notes=[*notes, f"fault rate {rate:.0%} of all requests; retry_attempts {attempts}; client timeout 2 s"])


def test_every_other_transaction_loses_its_response_after_commit(faultproxy, program_factory, references,
                                                                record) -> None:
    """Half of all transaction POSTs are committed by the server and their response dropped (connection reset):
    every one is replayed; conditional updates make the replays no-ops, so nothing is duplicated."""
    participants = 12
    ref = references.get(participants)
    seed = seed_for("lost-responses")
    proxy = faultproxy(Schedule(seed=seed, rate=0.5, weights={"drop-after-commit": 1.0},
                                methods=frozenset({"POST"})))
    rel = program_factory("lost-responses", server_url=proxy.base_url, participants=participants)
    codes, _requests, _retries = _sync_through(proxy, rel, max_runs=10)
    dropped = proxy.stats.faults["drop-after-commit"]
    assert dropped >= 5
    verdict = check_invariant(rel, ref["content"])
    record("http-lost-responses", "Half of the transactions committed, then their response dropped",
           runs=len(codes), faults_injected=dropped, faults_by_kind={"drop-after-commit": dropped},
           records_sent=verdict.sent, duplicates=verdict.duplicates, lost=verdict.lost,
           content_mismatches=verdict.content_mismatches, seed=seed,
           notes=[f"{proxy.stats.forwarded_writes} transactions reached the server for "
                  f"{proxy.stats.forwarded_writes - dropped} answered ones; exit codes {codes}"])
