"""A hostile server (tests/reliability/faultproxy.py, HOSTILE modes): answers that do not prove the writes (an empty
or short transaction-response, entries without status or location, a 302 or an HTML page after the server
committed), a body sent a byte at a time, diagnostics that echo submitted values unquoted, in typographic quotes or
in another language, and a response dropped after a void committed.

For each mode: a sync through the hostile proxy (records it could not prove stay pending, exit 69), then syncs
against the healthy server until done. At the end: duplicates (Provenance included) 0, nothing lost, the same
content as a clean sync, and no PHI in any output nor in the ledger file itself."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import requests
from integration.syncutil import Program

from . import phi
from .faultproxy import Schedule
from .relutil import (
    DONE_CODES,
    RelProgram,
    assert_no_traceback,
    check_invariant,
    cli_env,
    measure,
    read_csv,
    run_cli,
    seed_for,
    write_csv,
)
from .test_phi_leakage import ledger_text

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

PARTICIPANTS = 8
# mode -> (methods it hits, share of those requests, what it shows)
MODES: dict[str, tuple[frozenset[str], float, str]] = {
    "empty-after-commit": (frozenset({"POST"}), 0.5, "transaction committed, answered 200 with an empty Bundle"),
    "short-after-commit": (frozenset({"POST"}), 0.5, "transaction committed, answer missing its last entry"),
    "no-location-after-commit": (frozenset({"POST"}), 0.5,
                                 ("transaction committed, entries without location (first also without status)")),
    "302-json-after-commit": (frozenset({"POST"}), 0.5, "transaction committed, answered 302 with the JSON body"),
    "html-200-after-commit": (frozenset({"POST"}), 0.5, "transaction committed, answered 200 with an HTML page"),
    "slow-body-after-commit": (frozenset({"POST"}), 0.5,
                               ("transaction committed, answer sent one byte a second (request deadline 3 s)")),
    "echo-unquoted": (frozenset({"POST", "GET"}), 0.3, "409/400 echoing submitted values unquoted"),
    "echo-typographic": (frozenset({"POST", "GET"}), 0.3, "409/400 echoing submitted values in typographic quotes"),
    "echo-foreign": (frozenset({"POST", "GET"}), 0.3, "409/400 echoing submitted values in French and Japanese"),
}


def provenance_duplicates(program: Program) -> tuple[int, int]:
    """(Provenance resources of the program, how many repeat another): the same change-set tag twice, or (for
    an untagged one) the same activity over the same targets."""
    ctx = program.context()
    url: str | None = f"{program.base_url}/Provenance?_source={ctx.meta_source}&_count=500"
    keys: Counter[str] = Counter()
    while url:
        bundle = requests.get(url, timeout=120).json()
        for entry in bundle.get("entry", []):
            prov = entry["resource"]
            tags = sorted(t.get("code", "") for t in prov.get("meta", {}).get("tag", [])
                          if str(t.get("system", "")).endswith("/change-set"))
            activity = json.dumps(prov.get("activity", {}), sort_keys=True)
            targets = sorted(t.get("reference", "") for t in prov.get("target", []))
            keys[f"tag:{tags[0]}" if tags else f"{activity}|{targets}"] += 1
        url = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)
    return sum(keys.values()), sum(n - 1 for n in keys.values() if n > 1)


def _sync(rel: RelProgram, outputs: dict[str, str], label: str) -> int:
    proc = run_cli("sync", "--config", str(rel.config), "-v", "--json", env=cli_env({"PEERSYNC_LOG_FORMAT": ""}),
                   timeout=600)
    assert_no_traceback(proc)
    outputs[f"{label} (stdout)"], outputs[f"{label} (stderr)"] = proc.stdout, proc.stderr
    return proc.returncode


def _phi_hits(rel: RelProgram, outputs: dict[str, str]) -> list[phi.Hit]:
    """PHI in the commands' output, every text file peersync wrote, the ledger's text and the ledger's bytes."""
    hits: list[phi.Hit] = []
    for where, text in outputs.items():
        hits += phi.scan(where, text, phi.PHI)
    for path in sorted((rel.root / "state").rglob("*")):
        if path.is_file() and path.suffix in (".csv", ".json", ".prom", ".log", ".txt"):
            hits += phi.scan(str(path.relative_to(rel.root)), path.read_text(encoding="utf-8", errors="replace"),
                             phi.PHI)
    hits += phi.scan("ledger (text columns)", ledger_text(rel.ledger), phi.PHI)
    for suffix in ("", "-wal"):
        path = Path(str(rel.ledger) + suffix)
        if path.exists():
            hits += phi.scan_bytes(f"ledger file{suffix} (raw bytes)", path.read_bytes(), phi.PHI)
    return hits


def _drain(rel: RelProgram, outputs: dict[str, str], codes: list[int], max_runs: int = 6) -> None:
    for attempt in range(max_runs):
        codes.append(_sync(rel, outputs, f"healthy sync {attempt + 1}"))
        if codes[-1] in DONE_CODES:
            return
        assert codes[-1] == 69, f"healthy sync ended with exit {codes[-1]}"
    raise AssertionError(f"the healthy server did not get everything in {max_runs} runs: exit codes {codes}")


@pytest.mark.parametrize("mode", list(MODES))
def test_hostile_answers_never_mark_records_sent(mode: str, faultproxy, program_factory, references,
                                                 record) -> None:
    methods, rate, title = MODES[mode]
    seed = seed_for(f"server-{mode}")
    proxy = faultproxy(Schedule(seed=seed, rate=rate, weights={mode: 1.0}, methods=methods), trickle_seconds=1.0)
    # Only the slow-body mode is about deadlines: the others get the default, so a busy server is not mistaken for it.
    server = {"timeout_seconds": 2, "request_deadline_seconds": 3} if mode.startswith("slow") else {}
    rel = program_factory(f"server-{mode}", server_url=proxy.base_url, participants=PARTICIPANTS, server=server,
                          sync={"retry_attempts": 1})
    outputs: dict[str, str] = {}
    codes = [_sync(rel, outputs, "hostile sync")]
    faults, by_kind = proxy.stats.total_faults, dict(proxy.stats.faults)
    echoed_phi = [h for text in proxy.stats.echoed for h in phi.scan("server diagnostics", text, phi.PHI)]
    assert faults > 0, (f"the hostile mode never fired (exit {codes[0]}, {proxy.stats.as_dict()}): "
                        f"{outputs['hostile sync (stderr)'][-800:]}")
    assert codes[0] in (65, 69), f"hostile sync: exit {codes[0]} (expected 69: records left pending)"
    hostile = json.loads(outputs["hostile sync (stdout)"] or "{}")
    proxy.reset()  # healthy from here on
    _drain(rel, outputs, codes)
    verdict = check_invariant(rel, references.get(PARTICIPANTS)["content"])
    provenances, provenance_dups = provenance_duplicates(rel.program)
    hits = _phi_hits(rel, outputs)
    reasons = hostile.get("pending_reasons") or {}
    record(f"server-{mode}", f"Hostile server: {title}", runs=len(codes), faults_injected=faults,
           faults_by_kind=by_kind, records_sent=verdict.sent, duplicates=verdict.duplicates + provenance_dups,
           lost=verdict.lost + verdict.extra, content_mismatches=verdict.content_mismatches, phi_hits=len(hits),
           seed=seed, notes=[(f"exit codes {codes}; first run left {hostile.get('counts', {}).get('pending', 0)} "
                              f"record(s) pending; {provenances} Provenance, {provenance_dups} repeated"),
                             *(f"pending reason: {r} ({n})" for r, n in list(reasons.items())[:2]),
                             *([f"{len(echoed_phi)} PHI values echoed by the server, none kept"]
                               if echoed_phi else [])])
    assert provenance_dups == 0, f"{provenance_dups} duplicate Provenance"
    assert not hits, f"{len(hits)} PHI hits:\n" + "\n".join(str(h) for h in hits[:25])
    if mode.startswith("echo-"):
        assert echoed_phi, "the server echoed no PHI: the scenario proved nothing"


def test_a_void_whose_response_is_dropped_after_commit_is_not_repeated(faultproxy, program_factory, record) -> None:
    """Sync, remove two contacts from the export, then void them through a proxy that drops the answer of every
    void transaction after the server committed it; then sync against the healthy server."""
    seed = seed_for("server-void-drop")
    proxy = faultproxy()
    rel = program_factory("server-void-drop", server_url=proxy.base_url, participants=PARTICIPANTS,
                          sync={"retry_attempts": 1})
    outputs: dict[str, str] = {}
    codes = [_sync(rel, outputs, "first sync")]
    assert codes[0] in DONE_CODES
    contacts_csv = rel.program.inputs / "contacts.csv"
    rows = read_csv(contacts_csv)
    same_participant = [r for r in rows if r["enrollment_id"] == rows[0]["enrollment_id"] and not r.get("void")]
    removed = [r["contact_id"] for r in same_participant[:2]]
    write_csv(contacts_csv, [r for r in rows if r["contact_id"] not in removed], list(rows[0]))
    proxy.reset(Schedule(seed=seed, rate=1.0, weights={"void-drop-after-commit": 1.0}, methods=frozenset({"POST"})))
    codes.append(_sync(rel, outputs, "void sync (answers dropped)"))
    dropped = proxy.stats.faults["void-drop-after-commit"]
    assert dropped > 0 and codes[-1] == 69
    proxy.reset()
    _drain(rel, outputs, codes)
    verdict = measure(rel, None)
    communications = {key[1].split("|", 1)[1]: found for key, found in verdict.found.items()
                      if key[0] == "Communication"}
    voided = [c for c in removed if all(r.get("status") == "entered-in-error" for r in communications.get(c, [None]))]
    provenances, provenance_dups = provenance_duplicates(rel.program)
    hits = _phi_hits(rel, outputs)
    record("server-void-drop-after-commit", "Hostile server: a void committed, its answer dropped (every retry too)",
           runs=len(codes), faults_injected=dropped, faults_by_kind={"void-drop-after-commit": dropped},
           records_sent=verdict.sent, duplicates=verdict.duplicates + provenance_dups, lost=len(removed) - len(voided),
           phi_hits=len(hits), seed=seed,
           notes=[(f"exit codes {codes}; {len(voided)} of {len(removed)} removed contacts entered-in-error; "
                   f"{provenances} Provenance, {provenance_dups} repeated")])
    assert verdict.duplicates == 0 and len(voided) == len(removed)
    assert provenance_dups == 0, f"{provenance_dups} duplicate Provenance (a replayed void added another)"
    assert not hits, f"{len(hits)} PHI hits:\n" + "\n".join(str(h) for h in hits[:25])


