"""Run the benchmarks and print the table: ``python -m tests.bench.run [--quick] [--only SECTION,...]``.

Sections: mapping (in-process, no server), first-sync, resync and verify (the local HAPI server of
tests/fhir-server, or PEERSYNC_TEST_FHIR_URL; verify: tests/bench/drift.py), first-sync-latency (the same
first sync through Toxiproxy adding ~20 ms of round trip in front of the local server; tests/bench/latency.py),
first-sync-pinned (server-bound and peersync with the local server on one CPU and the benchmark on the other,
as on separate machines), strategies (a first sync per write strategy against a replay of its own requests;
tests/bench/strategies.py), memory (child
processes, no server). Every figure with a target is a ratio of two measurements of this run. Results also go
to ``<bench dir>/results-<time>.json``. See docs/benchmarks.md.

The local server is reset ($expunge: every resource on it is deleted) before each measured write run, so
every side starts from the same, empty server. Use a server of its own (PEERSYNC_FHIR_PORT=8111 make bench)
when integration tests may be running against the default one. An external server is never reset.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import drift, latency, mapping, memory, strategies
from .common import (
    Row,
    dataset,
    fhirserver,
    fhirserver_pid,
    machine,
    new_program,
    pin_process,
    quiet_logs,
    render,
    reset_server,
    server_version,
    verdict,
    work_dir,
)
from .writes import post_bundles, prebuild_bundles, run_naive, run_peersync

SECTIONS = ("mapping", "first-sync", "first-sync-latency", "first-sync-pinned", "strategies", "resync", "verify",
            "memory")
SERVER_SECTIONS = {"first-sync", "first-sync-latency", "first-sync-pinned", "strategies", "resync", "verify"}
CONCURRENCY = 4  # peersync's sync concurrency and the server-bound loop's threads, in every write section
# Up to this many participants, peersync and server-bound run twice each in the order A B B A (server-bound,
# peersync, peersync, server-bound) and the faster run of each side counts: the server speeds up as its JIT
# warms and slows as other work lands on the shared cores, and the ABBA order spreads that drift over both.
PAIRED_UP_TO = 1000

# (participants, contacts) per scale. Full: what docs/benchmarks.md reports. Quick: a smoke run of minutes.
FULL = {
    "mapping": (1000, 20_000),
    "first-sync": [(1000, 0), (10_000, 0)],  # no contact rows: the 10k run fits in minutes
    "naive_participants": 1000,
    # through Toxiproxy: peersync and server-bound write every participant; the naive client (about 12 requests
    # per participant, each paying the round trip) the first "naive_participants" of them
    "first-sync-latency": {"participants": 1000, "contacts": 0, "naive_participants": 200},
    "first-sync-pinned": 1000,  # participants; server-bound and peersync only
    # per write strategy: peersync and its replay, twice each (single: ~15 requests per participant); 300: at 100
    # one side's run took 10-25 s, within the machine's run-to-run spread (docs/benchmarks.md)
    "strategies": (300, 0),
    "resync": (2000, 83_300),  # 100k source rows in all (contacts + enrollments, goals, notes, ...)
    "verify": (2000, 83_300),  # the demo program, then the resync section's 100k-row program
    "memory": [10_000, 100_000, 1_000_000],
    "memory_participants": 1000,
}
QUICK = {
    "mapping": (200, 2000),
    "first-sync": [(100, 0), (300, 0)],
    "naive_participants": 100,
    "first-sync-latency": {"participants": 100, "contacts": 0, "naive_participants": 30},
    "first-sync-pinned": 100,
    "strategies": (50, 0),
    "resync": (200, 8300),
    "verify": (200, 8300),
    "memory": [10_000, 100_000],
    "memory_participants": 1000,
}


class Bench:
    def __init__(self, scales: dict[str, Any], base_url: str | None, reset: bool,
                 one_way_latency_ms: int = latency.ONE_WAY_LATENCY_MS) -> None:
        self.scales = scales
        self.base_url = base_url
        self.reset = reset
        self.one_way_latency_ms = one_way_latency_ms
        self.results: dict[str, Any] = {}
        self.warmed_up = False

    def log(self, text: str) -> None:
        print(f"[{datetime.now().strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def fresh_server(self) -> None:
        if self.reset and self.base_url:
            self.log(f"reset server: {reset_server(self.base_url):.1f}s")

    # -- 1. mapping ------------------------------------------------------------------------------------

    def mapping(self) -> None:
        data = dataset(*self.scales["mapping"])
        self.log(f"mapping: {data.rows} rows ({data.participants} participants, {data.contacts} contacts)")
        result = mapping.measure(data)
        self.log(f"  {result.as_dict()}")
        self.results["mapping"] = result.as_dict() | {"dataset": data.path.name}

    # -- 2. first sync -----------------------------------------------------------------------------------

    def first_sync(self) -> None:
        assert self.base_url
        self.warm_up()
        out = self.results["first_sync"] = []
        for participants, contacts in self.scales["first-sync"]:
            data = dataset(participants, contacts)
            self.log(f"first sync, {participants} participants: {data.rows} rows")
            paired = self._bound_and_peersync(data, self.base_url, "", rounds=2 if participants <= PAIRED_UP_TO else 1)
            self.fresh_server()
            program = new_program(data, self.base_url, "nv")
            naive = run_naive(program, max_participants=self.scales["naive_participants"])
            self.log(f"  naive {naive}")
            out.append({"participants": participants, "contacts": contacts, "rows": data.rows,
                        **paired, "naive": vars(naive)})

    def _bound_and_peersync(self, data: Any, url: str, label: str, *, rounds: int, direct_url: str | None = None,
                            check: Any = None) -> dict[str, Any]:
        """Server-bound and peersync over ``data`` into ``url`` on a reset server: once each, or (rounds=2) in
        the order server-bound, peersync, peersync, server-bound; the faster run of each side is reported.
        ``check(side, run)`` wraps each timed run (the latency section counts proxy connections with it)."""
        order = (["server_bound", "peersync"] if rounds == 1
                 else ["server_bound", "peersync", "peersync", "server_bound"])
        best: dict[str, dict[str, Any]] = {}
        history: list[dict[str, Any]] = []
        for side in order:
            self.fresh_server()
            if side == "server_bound":
                program = new_program(data, url, f"{label}sb", direct_url=direct_url)
                bodies, n = prebuild_bundles(program)
                timed = functools.partial(_posted, url, bodies, n)
            else:
                program = new_program(data, url, f"{label}ps", direct_url=direct_url, concurrency=CONCURRENCY)
                assert program.settings().server.base_url == url
                timed = functools.partial(run_peersync, program)
            result, summary = check(side, timed) if check else timed()
            self.log(f"  {side.replace('_', '-')} {result}")
            run = vars(result) | ({"phases": getattr(summary, "phases", {})} if summary is not None else {})
            history.append({"side": side, "seconds": result.seconds, "per_second": result.per_second})
            if side not in best or result.per_second > best[side]["resources"] / best[side]["seconds"]:
                best[side] = run
        return {"peersync": best["peersync"], "server_bound": best["server_bound"], "rounds": history}

    def warm_up(self) -> None:
        """JIT-compile the server's write path before anything is timed (once per run)."""
        assert self.base_url
        if self.warmed_up:
            return
        self.warmed_up = True
        self.log("warm-up (not measured)")
        data = dataset(100, 300)
        for _ in range(2):
            program = new_program(data, self.base_url, "wu")
            run_peersync(program)
            program = new_program(data, self.base_url, "wu")
            bodies, n = prebuild_bundles(program)
            post_bundles(self.base_url, bodies, n, concurrency=CONCURRENCY)
            run_naive(new_program(data, self.base_url, "wu"), max_participants=30)

    # -- 2b. first sync through a network with latency ---------------------------------------------------------

    def first_sync_latency(self) -> None:
        """The three first-sync sides through Toxiproxy (``latency`` toxic on each direction) in front of the local
        server. Patients are loaded, the server-bound side's program-wide bundle posted and the server reset
        directly (not timed); everything timed goes through the proxy."""
        assert self.base_url
        scale = self.scales["first-sync-latency"]
        one_way = self.one_way_latency_ms
        out: dict[str, Any] = {"participants": scale["participants"], "contacts": scale["contacts"],
                               "one_way_latency_ms": one_way}
        self.results["first_sync_latency"] = out
        log_path = work_dir() / "toxiproxy.log"
        try:
            proxy = latency.start_proxy(self.base_url, one_way, log_path)
        except latency.ProxyUnavailable as exc:
            out["skipped"] = " ".join(str(exc).split())[:300]
            self.log(f"first sync through Toxiproxy: skipped: {out['skipped']}")
            return
        try:
            self.warm_up()  # the server's JIT, directly (the proxy adds nothing to warm up)
            self._first_sync_latency(proxy, out, log_path)
        finally:
            proxy.stop()

    def _first_sync_latency(self, proxy: latency.toxiproxy.Toxiproxy, out: dict[str, Any], log_path: Path) -> None:
        assert self.base_url
        scale = self.scales["first-sync-latency"]
        via = proxy.base_url
        out["toxiproxy"] = proxy.version
        out["toxics"] = proxy.toxics()
        rtt = latency.round_trip(self.base_url, via)
        out["round_trip"] = vars(rtt) | {"added_ms": rtt.added_ms, "probe": latency.RTT_PROBE}
        self.log(f"first sync through Toxiproxy ({via}, {out['one_way_latency_ms']} ms each way): GET "
                 f"{latency.RTT_PROBE} {rtt.proxied_ms:.1f} ms via proxy, {rtt.direct_ms:.1f} ms direct")
        data = dataset(scale["participants"], scale["contacts"])
        out["rows"] = data.rows
        connections: dict[str, int] = {}

        def through_proxy(side: str, timed: Any) -> Any:
            before = latency.accepted_connections(log_path)
            result = timed()
            connections[side] = connections.get(side, 0) + latency.accepted_connections(log_path) - before
            if connections[side] == 0:
                raise RuntimeError(f"first-sync-latency: the {side} side made no connection through the proxy")
            return result

        rounds = 2 if scale["participants"] <= PAIRED_UP_TO else 1
        paired = self._bound_and_peersync(data, via, "l", rounds=rounds, direct_url=self.base_url, check=through_proxy)
        self.fresh_server()
        program = new_program(data, via, "lnv", direct_url=self.base_url)
        naive = through_proxy("naive", lambda: run_naive(program, max_participants=scale["naive_participants"]))
        self.log(f"  naive {naive}")
        out.update({**paired, "naive": vars(naive), "proxy_connections": connections})

    # -- 2c. first sync with the server and the client on cores of their own --------------------------------------

    def first_sync_pinned(self) -> None:
        """Server-bound and peersync with the local server's threads on CPU 0 and this process on CPU 1: the client
        no longer takes CPU from the server, as on separate machines (a deployment's connector does not run on
        the EHR's host). Needs the local server's pid file and two CPUs; otherwise reported as skipped."""
        assert self.base_url
        participants = self.scales["first-sync-pinned"]
        out: dict[str, Any] = {"participants": participants}
        self.results["first_sync_pinned"] = out
        server_pid = fhirserver_pid()
        cpus = sorted(os.sched_getaffinity(0))
        if server_pid is None or len(cpus) < 2:
            out["skipped"] = "needs the local server (its pid file) and two CPUs"
            self.log(f"first sync pinned: skipped: {out['skipped']}")
            return
        self.warm_up()
        server_cpu, client_cpus = {cpus[0]}, set(cpus[1:])
        try:
            threads = pin_process(server_pid, server_cpu)
            os.sched_setaffinity(0, client_cpus)
            out["pinning"] = {"server_cpus": sorted(server_cpu), "client_cpus": sorted(client_cpus),
                              "server_threads": threads}
            self.log(f"first sync pinned: server ({threads} threads) on CPU {cpus[0]}, client on {sorted(client_cpus)}")
            data = dataset(participants, 0)
            out.update(self._bound_and_peersync(data, self.base_url, "pin",
                                                rounds=2 if participants <= PAIRED_UP_TO else 1))
        finally:
            pin_process(server_pid, set(cpus))
            os.sched_setaffinity(0, set(cpus))

    # -- 2d. first sync per write strategy ------------------------------------------------------------------------

    def strategies(self) -> None:
        """A first sync with each ``server.write_strategy`` against a replay of the requests it sent
        (tests/bench/strategies.py); the server's write path for each strategy is warmed up first (20
        participants, not measured)."""
        assert self.base_url
        participants, contacts = self.scales["strategies"]
        data = dataset(participants, contacts)
        out: dict[str, Any] = {"participants": participants, "contacts": contacts, "rows": data.rows, "runs": []}
        self.results["strategies"] = out
        for strategy in strategies.STRATEGIES:
            self.log(f"strategies: {strategy}, {participants} participants ({data.rows} rows); warm-up")
            self.fresh_server()
            strategies.run_recorded(strategies.with_strategy(new_program(dataset(20, 0), self.base_url, "wu"),
                                                             strategy), "warm-up")
            out["runs"].append(strategies.compare(data, self.base_url, strategy, concurrency=CONCURRENCY,
                                                  fresh=self.fresh_server, log=self.log))

    # -- 3 and 4. re-syncs ----------------------------------------------------------------------------------

    def resync(self) -> None:
        assert self.base_url
        data = dataset(*self.scales["resync"])
        self.log(f"resync: {data.rows} rows")
        self.fresh_server()
        program = new_program(data, self.base_url, "rs", copy_inputs=True)
        first, first_summary = run_peersync(program, "first sync")
        self.log(f"  first {first}")
        noop, noop_summary = run_peersync(program, "no-op re-sync")
        self.log(f"  no-op {noop}")
        changed_rows = change_rows(program.inputs / "contacts.csv", fraction_of=data.rows, fraction=0.01)
        changed, changed_summary, calls = strategies.run_recorded(program, "1% changed")
        self.log(f"  1% changed ({changed_rows} rows) {changed}: {changed.seconds / first.seconds:.1%} of the first "
                 f"sync, {changed.write_requests} write requests")
        # The server's own share: the same requests, the same rows changed once more, replayed by a plain loop.
        bound = strategies.replay_changes(calls, CHANGE_MARKER, b"(replayed)")
        self.log(f"  1% changed, server-bound replay {bound}: {bound.seconds / first.seconds:.1%} of the first sync")
        self.results["resync"] = {
            "rows": data.rows, "participants": data.participants, "contacts": data.contacts,
            "changed_rows": changed_rows,
            "first": vars(first) | {"phases": getattr(first_summary, "phases", {})},
            "noop": vars(noop) | {"phases": getattr(noop_summary, "phases", {})},
            "changed": vars(changed) | {"phases": getattr(changed_summary, "phases", {})},
            "changed_server_bound": vars(bound)}

    # -- 5. verify: its cost as a ratio to the first sync ---------------------------------------------------

    def verify(self) -> None:
        assert self.base_url
        self.warm_up()  # like the write sections: a cold JIT would inflate the demo's first sync
        self.fresh_server()
        self.log("verify: demo program")
        demo = drift.sync_then_verify(drift.demo_program(self.base_url))
        self.log(f"  {demo}")
        data = dataset(*self.scales["verify"])
        self.log(f"verify: {data.rows} rows")
        self.fresh_server()
        large = drift.sync_then_verify(new_program(data, self.base_url, "vf"))
        self.log(f"  {large}")
        self.results["verify"] = [{"program": "demo program", "rows": None} | demo,
                                  {"program": f"{data.rows // 1000}k source rows", "rows": data.rows} | large]

    # -- 6. memory ----------------------------------------------------------------------------------------

    def memory(self) -> None:
        results = []
        for contacts in self.scales["memory"]:
            data = dataset(self.scales["memory_participants"], contacts)
            self.log(f"memory: {contacts} contacts ({data.rows} rows)")
            for result in memory.measure(data):
                self.log(f"  {result}")
                results.append(result)
        self.results["memory"] = [vars(r) for r in results]


def table_rows(results: dict[str, Any]) -> list[Row]:
    """The table, from the results of a run (``--render`` re-renders a saved results file)."""
    rows: list[Row] = []
    if "mapping" in results:
        m = results["mapping"]
        n = m["resources"]
        read_map = n / (m["read_s"] + m["map_s"])
        naive = m["naive_per_s"]
        full = m["peersync_per_s"]
        section = f"mapping, {m['rows'] // 1000}k rows (CPU time)"
        rows += [
            Row(section, "peersync read → map", f"{read_map:,.0f} res/s", f"{read_map / naive:.1f}× naive",
                "≥ 10× naive", verdict(read_map / naive >= 10)),
            Row(section, "peersync read → map → bundle → JSON", f"{full:,.0f} res/s", f"{full / naive:.1f}× naive"),
            Row(section, "  µs per resource: read / map / bundle+JSON",
                " / ".join(f"{m[k] / n * 1e6:.0f}" for k in ("read_s", "map_s", "bundle_and_serialize_s"))),
            Row(section, "naive: read → map → fhir.resources validate + dump", f"{naive:,.0f} res/s",
                f"validate+dump {m['naive_validate_dump_us_per_resource']:,.0f} µs/res"),
            Row(section, "floor: plain dicts + orjson", f"{m['floor_per_s']:,.0f} res/s",
                f"read → map = {read_map / m['floor_per_s']:.2f}× floor"),
        ]
    for run in results.get("first_sync", []):
        section = f"first sync, {run['participants']:,} participants ({run['peersync']['resources']:,} res)"
        rows += first_sync_rows(section, run)
    if "first_sync_latency" in results:
        run = results["first_sync_latency"]
        rtt = f"{2 * run['one_way_latency_ms']} ms RTT (Toxiproxy)"
        if "skipped" in run:
            rows.append(Row(f"first sync, {run['participants']:,} participants, {rtt}", f"skipped: {run['skipped']}",
                            "-"))
        else:
            section = (f"first sync, {run['participants']:,} participants ({run['peersync']['resources']:,} res), "
                       f"{rtt}")
            probe = run["round_trip"]
            rows.append(Row(section, f"latency toxic {run['one_way_latency_ms']} ms each way: small GET, median",
                            f"+{probe['added_ms']:.1f} ms",
                            f"{probe['proxied_ms']:.1f} ms via proxy, {probe['direct_ms']:.1f} ms direct"))
            rows += first_sync_rows(section, run)
    if "first_sync_pinned" in results:
        run = results["first_sync_pinned"]
        if "skipped" in run:
            rows.append(Row(f"first sync, {run['participants']:,} participants, pinned", f"skipped: {run['skipped']}",
                            "-"))
        else:
            rate = {k: run[k]["resources"] / run[k]["seconds"] for k in ("peersync", "server_bound")}
            section = (f"first sync, {run['participants']:,} participants ({run['peersync']['resources']:,} res), "
                       "server and client on separate cores")
            over_bound = rate["peersync"] / rate["server_bound"]
            rows += [
                Row(section, f"peersync sync, concurrency {CONCURRENCY}", f"{rate['peersync']:,.0f} res/s",
                    f"{over_bound:.2f}× server-bound", "≥ 0.8× server-bound", verdict(over_bound >= 0.8)),
                Row(section, f"server-bound: same bundles, {CONCURRENCY} threads", f"{rate['server_bound']:,.0f} res/s",
                    f"{run['server_bound']['seconds']:,.0f} s"),
                *_rounds_rows(section, run.get("rounds", [])),
            ]
    if "strategies" in results:
        rows += strategy_rows(results["strategies"])
    if "resync" in results:
        r = results["resync"]
        first, noop, changed = r["first"], r["noop"], r["changed"]
        section = f"re-sync, {r['rows'] // 1000}k source rows"
        noop_fraction = noop["seconds"] / first["seconds"]
        changed_fraction = changed["seconds"] / first["seconds"]
        rows += [
            Row(section, "first sync", f"{first['seconds']:,.1f} s",
                f"{first['write_requests']:,} writes, {first['resources']:,} res"),
            Row(section, "no-op re-sync", f"{noop['seconds']:,.1f} s, {noop['write_requests']} writes",
                f"{noop_fraction:.1%} of first", "≤ 5% and 0 writes",
                verdict(noop_fraction <= 0.05 and noop["write_requests"] == 0)),
            Row(section, f"1% changed ({r['changed_rows']:,} contact rows)",
                f"{changed['seconds']:,.1f} s, {changed['write_requests']:,} writes",
                f"{changed_fraction:.1%} of first, {changed['seconds'] / noop['seconds']:.1f}× no-op",
                "≤ 3%", verdict(changed_fraction <= 0.03)),
        ]
        if "changed_server_bound" in r:
            bound, phases = r["changed_server_bound"], changed.get("phases", {})
            rows += [
                Row(section, "  its phases: read, plan, write",
                    ", ".join(f"{phases.get(p, 0):,.1f} s" for p in ("read", "plan", "write")),
                    f"read + plan {(phases.get('read', 0) + phases.get('plan', 0)) / first['seconds']:.1%} of first"),
                Row(section, "  its requests replayed by a plain loop (server-bound)",
                    f"{bound['seconds']:,.1f} s, {bound['requests']:,} requests",
                    f"{bound['seconds'] / first['seconds']:.1%} of first; write stage "
                    f"{bound['seconds'] / phases['write']:.2f}× server-bound" if phases.get("write") else ""),
            ]
    for run in results.get("verify", []):
        first, check = run["first_sync"], run["verify"]
        section = f"verify, {run['program']} ({check['resources']:,} res)"
        rows += [
            Row(section, "first sync", f"{first['seconds']:,.1f} s", f"{first['requests']:,} requests"),
            Row(section, "verify (read back every resource)", f"{check['seconds']:,.1f} s, {check['requests']:,} "
                "requests", f"{check['seconds'] / first['seconds']:.1%} of first sync"),
        ]
    mem = results.get("memory", [])
    for command in ("plan", "map"):
        mine = [r for r in mem if r["command"] == command]
        for r in mine:
            ratio = r["peak_rss_kib"] / mine[0]["peak_rss_kib"]
            last = r is mine[-1] and len(mine) > 1
            rows.append(Row(f"peak RSS, peersync {command}", f"{r['contacts']:,} contact rows ({r['rows']:,} rows)",
                            f"{r['peak_rss_kib'] / 1024:,.0f} MiB ({r['seconds']:,.0f} s)",
                            f"{ratio:.2f}× the {mine[0]['contacts'] // 1000}k figure",
                            "≤ 1.5×" if last else "", verdict(ratio <= 1.5) if last else ""))
    return rows


def first_sync_rows(section: str, run: dict[str, Any]) -> list[Row]:
    """The four rows of one first-sync comparison (peersync, server-bound, naive; rates in resources/s)."""
    ours, bound, naive = run["peersync"], run["server_bound"], run["naive"]
    rate = {k: v["resources"] / v["seconds"] for k, v in (("ours", ours), ("bound", bound), ("naive", naive))}
    over_naive, over_bound = rate["ours"] / rate["naive"], rate["ours"] / rate["bound"]
    return [
        Row(section, f"peersync sync, concurrency {CONCURRENCY}", f"{rate['ours']:,.0f} res/s",
            f"{over_naive:.1f}× naive", "≥ 10× naive", verdict(over_naive >= 10)),
        Row(section, f"  {ours['seconds']:,.0f} s, {ours['requests']:,} requests",
            f"{ours['write_requests']:,} writes", f"{over_bound:.2f}× server-bound", "≥ 0.8× server-bound",
            verdict(over_bound >= 0.8)),
        Row(section, f"server-bound: same bundles, {CONCURRENCY} threads", f"{rate['bound']:,.0f} res/s",
            f"{bound['seconds']:,.0f} s, {bound['requests']:,} requests"),
        *_rounds_rows(section, run.get("rounds", [])),
        Row(section, f"naive: 1 request per resource ({naive['detail']})", f"{rate['naive']:,.0f} res/s",
            f"{naive['seconds']:,.0f} s, {naive['requests']:,} requests",
            f"bound/naive = {rate['bound'] / rate['naive']:.1f}×"),
    ]


def strategy_rows(out: dict[str, Any]) -> list[Row]:
    """Per write strategy: peersync against the replay of its own requests; then update-as-create against the
    conditional transaction."""
    runs = {run["strategy"]: run for run in out["runs"]}
    if not runs:
        return []
    first = next(iter(runs.values()))
    section = (f"first sync per write strategy, {out['participants']:,} participants "
               f"({first['peersync']['resources']:,} res)")
    rows: list[Row] = []
    rates: dict[str, dict[str, float]] = {}
    for name, run in runs.items():
        ours, bound = run["peersync"], run["server_bound"]
        rate = rates[name] = {"ours": ours["resources"] / ours["seconds"],
                              "bound": bound["resources"] / bound["seconds"]}
        over_bound = rate["ours"] / rate["bound"]
        rows += [
            Row(section, f"{name}: peersync, concurrency {CONCURRENCY}", f"{rate['ours']:,.0f} res/s",
                f"{over_bound:.2f}× server-bound", "≥ 0.8× server-bound", verdict(over_bound >= 0.8)),
            Row(section, f"  {ours['seconds']:,.0f} s, {ours['requests']:,} requests",
                f"{ours['write_requests']:,} writes",
                f"server-bound {rate['bound']:,.0f} res/s, {bound['seconds']:,.0f} s ({bound['detail']})"),
            *_rounds_rows(section, run.get("rounds", [])),
        ]
    # update-as-create against conditional writes: the transaction (peersync's default), and single requests (the
    # same requests one by one, each a conditional update instead of an update by id)
    for other, label in (("transaction", "conditional transaction"), ("single", "conditional single requests")):
        if "update-as-create" in rates and other in rates:
            uac, them = rates["update-as-create"], rates[other]
            rows.append(Row(section, f"update-as-create / {label}, res/s", f"{uac['ours']:,.0f} / {them['ours']:,.0f}",
                            f"{uac['ours'] / them['ours']:.2f}× (peersync), "
                            f"{uac['bound'] / them['bound']:.2f}× (server-bound)"))
    return rows


def _posted(url: str, bodies: list[bytes], resources: int) -> tuple[Any, None]:
    """The server-bound loop, shaped like run_peersync's answer (result, no summary)."""
    return post_bundles(url, bodies, resources, concurrency=CONCURRENCY), None


def _rounds_rows(section: str, rounds: list[dict[str, Any]]) -> list[Row]:
    """One row listing every timed run of a paired (ABBA) comparison, in order; none for a single round."""
    if len(rounds) < 2:
        return []
    runs = ", ".join(f"{'sb' if r['side'] == 'server_bound' else 'ps'} {r['per_second']:,.0f}" for r in rounds)
    return [Row(section, "  runs in order, res/s (faster of each side counts)", runs)]


CHANGE_MARKER = b"(updated)"  # what change_rows() appends to a note


def change_rows(path: Path, *, fraction_of: int, fraction: float) -> int:
    """Change the notes of evenly spread contact rows: ``fraction`` of ``fraction_of`` source rows."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    wanted = max(1, round(fraction_of * fraction))
    step = max(1, len(body) // wanted)
    notes = header.index("notes")
    changed = 0
    for row in body[::step][:wanted]:
        row[notes] = (row[notes] + " " + CHANGE_MARKER.decode()).strip()
        changed += 1
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header, *body])
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small scales: a smoke run of a few minutes")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--no-reset", action="store_true", help="never $expunge the server between runs")
    parser.add_argument("--latency-ms", type=int, default=latency.ONE_WAY_LATENCY_MS, metavar="MS",
                        help="first-sync-latency: Toxiproxy latency on each direction (default "
                             f"{latency.ONE_WAY_LATENCY_MS}, i.e. a {2 * latency.ONE_WAY_LATENCY_MS} ms round trip)")
    parser.add_argument("--render", type=Path, metavar="RESULTS_JSON", help="print the table of a saved run")
    args = parser.parse_args(argv)
    if args.render:
        saved = json.loads(args.render.read_text(encoding="utf-8"))
        print(render(table_rows(saved["results"])))
        print("\n" + ", ".join(f"{k}: {v}" for k, v in saved["machine"].items()))
        return 0
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    quiet_logs()
    base_url = None
    external = fhirserver.external_base_url()
    if SERVER_SECTIONS & set(sections):
        base_url = fhirserver.ensure_server()
    bench = Bench(QUICK if args.quick else FULL, base_url, reset=not args.no_reset and not external,
                  one_way_latency_ms=args.latency_ms)
    info = machine() | {"date": datetime.now(UTC).isoformat(timespec="seconds"),
                        "server": server_version(base_url) if base_url else "-", "server_url": base_url or "-",
                        "mode": "quick" if args.quick else "full"}
    bench.log(json.dumps(info))
    started = time.perf_counter()
    for section in SECTIONS:
        if section in sections:
            section_started = time.perf_counter()
            getattr(bench, section.replace("-", "_"))()
            info[f"minutes_{section}"] = f"{(time.perf_counter() - section_started) / 60:.1f}"
    info["total_minutes"] = f"{(time.perf_counter() - started) / 60:.1f}"
    info["loadavg_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    table = render(table_rows(bench.results))
    print(table)
    print("\n" + ", ".join(f"{k}: {v}" for k, v in info.items()))
    out = work_dir() / f"results-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"machine": info, "results": bench.results, "table": table}, indent=2, default=str),
                   encoding="utf-8")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
