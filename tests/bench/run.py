"""Run the benchmarks and print the table: ``python -m tests.bench.run [--quick] [--only SECTION,...]``.

Sections: mapping (in-process, no server), first-sync and resync (the local HAPI server of tests/fhir-server,
or PEERSYNC_TEST_FHIR_URL), memory (child processes, no server). Every figure with a target is a ratio of two
measurements of this run. Results also go to ``<bench dir>/results-<time>.json``. See docs/benchmarks.md.

The local server is reset ($expunge: every resource on it is deleted) before each measured write run, so
every side starts from the same, empty server. Use a server of its own (PEERSYNC_FHIR_PORT=8111 make bench)
when integration tests may be running against the default one. An external server is never reset.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import mapping, memory
from .common import (
    Row,
    dataset,
    fhirserver,
    machine,
    new_program,
    quiet_logs,
    render,
    reset_server,
    server_version,
    verdict,
    work_dir,
)
from .writes import post_bundles, prebuild_bundles, run_naive, run_peersync

SECTIONS = ("mapping", "first-sync", "resync", "memory")

# (participants, contacts) per scale. Full: what docs/benchmarks.md reports. Quick: a smoke run of minutes.
FULL = {
    "mapping": (1000, 20_000),
    "first-sync": [(1000, 0), (10_000, 0)],  # no contact rows: the 10k run fits in minutes
    "naive_participants": 1000,
    "resync": (2000, 83_300),  # 100k source rows in all (contacts + enrollments, goals, notes, ...)
    "memory": [10_000, 100_000, 1_000_000],
    "memory_participants": 1000,
}
QUICK = {
    "mapping": (200, 2000),
    "first-sync": [(100, 0), (300, 0)],
    "naive_participants": 100,
    "resync": (200, 8300),
    "memory": [10_000, 100_000],
    "memory_participants": 1000,
}


class Bench:
    def __init__(self, scales: dict[str, Any], base_url: str | None, reset: bool) -> None:
        self.scales = scales
        self.base_url = base_url
        self.reset = reset
        self.results: dict[str, Any] = {}

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
            self.fresh_server()
            program = new_program(data, self.base_url, "sb")
            bodies, n = prebuild_bundles(program)
            bound = post_bundles(self.base_url, bodies, n, concurrency=4)
            self.log(f"  server-bound {bound}")
            self.fresh_server()
            program = new_program(data, self.base_url, "ps")
            ours, summary = run_peersync(program)
            self.log(f"  peersync {ours}")
            self.fresh_server()
            program = new_program(data, self.base_url, "nv")
            naive = run_naive(program, max_participants=self.scales["naive_participants"])
            self.log(f"  naive {naive}")
            out.append({"participants": participants, "contacts": contacts, "rows": data.rows,
                        "peersync": vars(ours) | {"phases": getattr(summary, "phases", {})},
                        "server_bound": vars(bound), "naive": vars(naive)})

    def warm_up(self) -> None:
        """JIT-compile the server's write path before anything is timed."""
        assert self.base_url
        self.log("warm-up (not measured)")
        data = dataset(100, 300)
        for _ in range(2):
            program = new_program(data, self.base_url, "wu")
            run_peersync(program)
            program = new_program(data, self.base_url, "wu")
            bodies, n = prebuild_bundles(program)
            post_bundles(self.base_url, bodies, n, concurrency=4)
            run_naive(new_program(data, self.base_url, "wu"), max_participants=30)

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
        changed, changed_summary = run_peersync(program, "1% changed")
        self.log(f"  1% changed ({changed_rows} rows) {changed}")
        self.results["resync"] = {
            "rows": data.rows, "participants": data.participants, "contacts": data.contacts,
            "changed_rows": changed_rows,
            "first": vars(first) | {"phases": getattr(first_summary, "phases", {})},
            "noop": vars(noop) | {"phases": getattr(noop_summary, "phases", {})},
            "changed": vars(changed) | {"phases": getattr(changed_summary, "phases", {})}}

    # -- 5. memory ----------------------------------------------------------------------------------------

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
        ours, bound, naive = run["peersync"], run["server_bound"], run["naive"]
        rate = {k: v["resources"] / v["seconds"] for k, v in (("ours", ours), ("bound", bound), ("naive", naive))}
        section = f"first sync, {run['participants']:,} participants ({ours['resources']:,} res)"
        over_naive, over_bound = rate["ours"] / rate["naive"], rate["ours"] / rate["bound"]
        rows += [
            Row(section, "peersync sync, concurrency 4", f"{rate['ours']:,.0f} res/s", f"{over_naive:.1f}× naive",
                "≥ 10× naive", verdict(over_naive >= 10)),
            Row(section, f"  {ours['seconds']:,.0f} s, {ours['requests']:,} requests",
                f"{ours['write_requests']:,} writes", f"{over_bound:.2f}× server-bound", "≥ 0.8× server-bound",
                verdict(over_bound >= 0.8)),
            Row(section, "server-bound: same bundles, 4 threads", f"{rate['bound']:,.0f} res/s",
                f"{bound['seconds']:,.0f} s, {bound['requests']:,} requests"),
            Row(section, f"naive: 1 request per resource ({naive['detail']})", f"{rate['naive']:,.0f} res/s",
                f"{naive['seconds']:,.0f} s, {naive['requests']:,} requests",
                f"bound/naive = {rate['bound'] / rate['naive']:.1f}×"),
        ]
    if "resync" in results:
        r = results["resync"]
        first, noop, changed = r["first"], r["noop"], r["changed"]
        section = f"re-sync, {r['rows'] // 1000}k source rows"
        noop_fraction = noop["seconds"] / first["seconds"]
        rows += [
            Row(section, "first sync", f"{first['seconds']:,.1f} s",
                f"{first['write_requests']:,} writes, {first['resources']:,} res"),
            Row(section, "no-op re-sync", f"{noop['seconds']:,.1f} s, {noop['write_requests']} writes",
                f"{noop_fraction:.1%} of first", "≤ 5% and 0 writes",
                verdict(noop_fraction <= 0.05 and noop["write_requests"] == 0)),
            Row(section, f"1% changed ({r['changed_rows']:,} contact rows)",
                f"{changed['seconds']:,.1f} s, {changed['write_requests']:,} writes",
                f"{changed['seconds'] / first['seconds']:.1%} of first, {changed['seconds'] / noop['seconds']:.1f}× no-op"),
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
        row[notes] = (row[notes] + " (updated)").strip()
        changed += 1
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header, *body])
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small scales: a smoke run of a few minutes")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--no-reset", action="store_true", help="never $expunge the server between runs")
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
    if {"first-sync", "resync"} & set(sections):
        base_url = fhirserver.ensure_server()
    bench = Bench(QUICK if args.quick else FULL, base_url, reset=not args.no_reset and not external)
    info = machine() | {"date": datetime.now(UTC).isoformat(timespec="seconds"),
                        "server": server_version(base_url) if base_url else "-", "server_url": base_url or "-",
                        "mode": "quick" if args.quick else "full"}
    bench.log(json.dumps(info))
    started = time.perf_counter()
    for section in SECTIONS:
        if section in sections:
            getattr(bench, section.replace("-", "_"))()
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
