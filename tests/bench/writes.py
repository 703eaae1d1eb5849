"""Writing to the local HAPI server: peersync, a naive one-resource-per-request client, and the server's own limit.

* peersync: ``Syncer.run`` in-process, exactly as ``peersync sync`` runs it (read, plan, map, transactions of
  conditional PUTs with a Provenance, ledger), timed from start to end of the run.
* server-bound: the same transaction bundles, built beforehand with peersync's own builder (not timed) and
  POSTed by a minimal loop with the same concurrency: no reading, mapping, ledger or Patient look-ups.
* naive: what a script on a generic FHIR client does: one POST per resource, sequential, references rewritten
  to the ids the server returned, a Patient search per participant, and a PUT afterwards for a resource whose
  references formed a cycle (a CarePlan and the requests based on it). Plain creates, no Provenance.

Rates count the program's resources (every resource but Provenance), the same numerator for all three.
In the first-sync-latency section the program's ``base_url`` is a Toxiproxy proxy in front of the server: every
timed request goes through it, untimed setup (``BenchProgram.setup_url``) goes to the server directly.
"""

from __future__ import annotations

import sqlite3
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import requests

from connector.identifiers import parse_conditional_reference, token_query
from connector.map._util import compact
from connector.map.units import (
    iter_planned_units,
    map_global_units,
    map_participant_units,
    map_planned_global_units,
    participant_unit_keys,
)
from connector.model import Enrollment, RecordKind
from connector.ops.logs import new_run_id
from connector.plan.ledger import Ledger
from connector.plan.planner import (
    compute_plan,
    participants_to_write,
    program_fingerprint,
    units_to_write,
)
from connector.read.program import read_program
from connector.read.staging import Staging
from connector.run import RunSummary, Syncer
from connector.wiring import build_client, sync_options
from connector.write.bundle import Identity, UnitWrite, identity_of
from connector.write.changeset import build_change_set
from connector.write.decisions import chunk_writes

from .common import HEADERS, BenchProgram, Timer


@dataclass
class WriteResult:
    """One measured write run."""

    who: str
    seconds: float
    resources: int
    requests: int
    write_requests: int
    detail: str = ""

    @property
    def per_second(self) -> float:
        return self.resources / self.seconds if self.seconds else 0.0


# -- peersync -----------------------------------------------------------------------------------------------------


def run_peersync(program: BenchProgram, who: str = "peersync") -> tuple[WriteResult, RunSummary]:
    """One ``peersync sync`` of the program, in-process; resources = those the ledger confirmed in this run."""
    settings = program.settings()
    new_run_id()
    syncer = Syncer(sync_options(settings), build_client(settings))
    with Timer() as timer:
        summary = syncer.run(new_run_id())
    written = summary.counts["created"] + summary.counts["updated"] + summary.counts["voided"]
    resources = _resources_of_run(settings.sync.ledger, summary.run_id)
    return WriteResult(who, timer.seconds, resources, summary.requests, summary.write_requests,
                       f"units written {written}, outcome {summary.outcome}"), summary


def _resources_of_run(ledger: Path, run_id: str) -> int:
    with sqlite3.connect(ledger) as db:
        return db.execute("SELECT count(*) FROM resources r JOIN units u ON u.unit_key = r.unit_key "
                          "WHERE u.run_id = ? AND u.state = 'sent'", (run_id,)).fetchone()[0]


# -- the program's units, mapped with peersync's own code (shared by server-bound and naive) --------------------


@dataclass
class Mapped:
    """Everything a first sync of the program writes: global units, then each participant's units."""

    global_units: list[UnitWrite]
    participants: list[tuple[Enrollment, list[UnitWrite]]]


def _staged(program: BenchProgram, tmp: Path) -> Staging:
    opts = sync_options(program.settings())
    staging = Staging(tmp / "staging.sqlite")
    read_program(opts.profile, opts.inputs, staging)
    return staging


def _participant_units(staging: Staging, participant: str, ctx: Any) -> tuple[Enrollment, list[UnitWrite]]:
    enrollment = staging.record(RecordKind.ENROLLMENT, participant)
    assert isinstance(enrollment, Enrollment)
    return enrollment, map_participant_units(staging, participant, participant_unit_keys(staging, participant), ctx)


# -- server-bound: pre-built bundles, minimal loop ------------------------------------------------------------------


class _KnownIds:
    """What the writer asks the ledger: the server ids of the program-wide resources (posted first)."""

    def __init__(self, known: dict[Identity, str]) -> None:
        self.known = known

    def resolve(self, identity: Identity) -> str | None:
        return self.known.get(identity)


def prebuild_bundles(program: BenchProgram) -> tuple[list[bytes], int]:
    """Post the program-wide bundle (setup, not timed), then build every participant's transactions exactly as
    ``peersync sync`` would: the plan's units and hashes, the same mapping, chunking and change-set builder
    (literal Patient and program-wide references, a conditional-create Provenance).
    Returns (serialized bundles, program resources in them)."""
    settings = program.settings()
    opts = sync_options(settings)
    ctx = opts.ctx
    recorded = datetime.now(UTC)
    bodies: list[bytes] = []
    resources = 0
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, _staged(program, Path(tmp)) as staging, \
            Ledger(Path(tmp) / "empty-ledger.sqlite") as empty:
        compute_plan(staging, empty, program_id=ctx.program_id, fingerprint=program_fingerprint(ctx))
        global_units = map_planned_global_units(staging, units_to_write(staging, None), ctx)
        built = build_change_set(global_units, ctx=ctx, patient=None, resolve=lambda _identity: None,
                                 recorded=recorded)
        response = requests.post(program.setup_url, data=orjson.dumps(built.bundle), headers=HEADERS, timeout=600)
        response.raise_for_status()
        known: dict[Identity, str] = {}
        for (_unit, identity), entry in zip(built.entries, response.json()["entry"], strict=False):
            known[identity] = entry["response"]["location"].split("/")[1]
        ledger = _KnownIds(known)
        for participant in participants_to_write(staging):
            planned = units_to_write(staging, participant)
            enrollment = staging.record(RecordKind.ENROLLMENT, participant)
            assert isinstance(enrollment, Enrollment)
            patient_id = program.patient_ids.get(enrollment.mrn)
            if not patient_id:
                continue  # no Patient or two: peersync sends this participant to review and writes nothing
            mrn_system = enrollment.mrn_system or program.mrn_system
            patient = (("Patient", mrn_system, enrollment.mrn), f"Patient/{patient_id}")
            for chunk in chunk_writes(iter_planned_units(staging, participant, planned, ctx), opts.max_bundle_entries):
                bundle = build_change_set(chunk, ctx=ctx, patient=patient, resolve=ledger.resolve,
                                          recorded=recorded)
                bodies.append(orjson.dumps(bundle.bundle))
                resources += len(bundle.entries)
    return bodies, resources


def post_bundles(base_url: str, bodies: list[bytes], resources: int, *, concurrency: int) -> WriteResult:
    """The server-bound loop: POST each pre-serialized transaction, ``concurrency`` at a time."""
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=concurrency * 2, pool_maxsize=concurrency * 2)
    session.mount("http://", adapter)

    def post(body: bytes) -> None:
        answer = session.post(base_url, data=body, headers=HEADERS, timeout=600)
        if answer.status_code != 200:
            raise RuntimeError(f"server-bound loop: HTTP {answer.status_code}: {answer.text[:300]}")

    with Timer() as timer, ThreadPoolExecutor(max_workers=concurrency) as pool:
        for future in [pool.submit(post, body) for body in bodies]:
            future.result()
    session.close()
    return WriteResult("server-bound", timer.seconds, resources, len(bodies), len(bodies))


# -- naive: one resource per request ----------------------------------------------------------------------------------


class NaiveClient:
    """POST one resource at a time, sequentially, resolving references by the ids the server returned."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.session = requests.Session()
        self.ids: dict[tuple[str, str, str], str] = {}
        self.requests = 0
        self.writes = 0
        self.resources = 0

    def _post(self, resource: dict[str, Any]) -> str:
        self.requests += 1
        self.writes += 1
        answer = self.session.post(f"{self.base_url}/{resource['resourceType']}", data=orjson.dumps(resource),
                                   headers=HEADERS, timeout=600)
        if answer.status_code != 201:
            raise RuntimeError(f"naive POST {resource['resourceType']}: HTTP {answer.status_code}: {answer.text[:300]}")
        return answer.json()["id"]

    def _put(self, resource_type: str, server_id: str, resource: dict[str, Any]) -> None:
        self.requests += 1
        self.writes += 1
        body = dict(resource, id=server_id)
        answer = self.session.put(f"{self.base_url}/{resource_type}/{server_id}", data=orjson.dumps(body),
                                  headers=HEADERS, timeout=600)
        if answer.status_code not in (200, 201):
            raise RuntimeError(f"naive PUT {resource_type}: HTTP {answer.status_code}: {answer.text[:300]}")

    def patient_id(self, system: str, mrn: str) -> str | None:
        self.requests += 1
        answer = self.session.get(f"{self.base_url}/Patient?identifier={token_query(system, mrn)}",
                                  headers=HEADERS, timeout=600)
        answer.raise_for_status()
        found = [e["resource"]["id"] for e in answer.json().get("entry", [])]
        return found[0] if len(found) == 1 else None

    def write(self, resources: list[dict[str, Any]], patient: tuple[tuple[str, str, str], str] | None) -> None:
        """Create resources in an order that resolves as many references as possible; break cycles by creating
        one resource without its unresolved references and updating it once the rest exist."""
        todo = list(resources)
        fix_ups: list[tuple[dict[str, Any], str]] = []
        while todo:
            ready = next((r for r in todo if not self._unresolved(r, patient)), None)
            stripped = False
            if ready is None:  # a cycle: take the resource with the fewest unresolved references
                ready = min(todo, key=lambda r: len(self._unresolved(r, patient)))
                stripped = True
            todo.remove(ready)
            body = self._resolved(ready, patient, drop_unresolved=stripped)
            server_id = self._post(body)
            self.ids[identity_of(ready)] = server_id
            self.resources += 1
            if stripped:
                fix_ups.append((ready, server_id))
        for resource, server_id in fix_ups:
            self._put(resource["resourceType"], server_id, self._resolved(resource, patient, drop_unresolved=False))

    def _target(self, reference: str, patient: tuple[tuple[str, str, str], str] | None) -> str | None:
        parsed = parse_conditional_reference(reference)
        if parsed is None:
            return reference
        if patient is not None and parsed == patient[0]:
            return patient[1]
        known = self.ids.get(parsed)
        return f"{parsed[0]}/{known}" if known else None

    def _unresolved(self, node: Any, patient: Any) -> list[str]:
        out: list[str] = []
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "reference" and isinstance(value, str) and self._target(value, patient) is None:
                    out.append(value)
                elif isinstance(value, (dict, list)):
                    out += self._unresolved(value, patient)
        elif isinstance(node, list):
            for item in node:
                out += self._unresolved(item, patient)
        return out

    def _resolved(self, node: Any, patient: Any, *, drop_unresolved: bool) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key == "reference" and isinstance(value, str):
                    target = self._target(value, patient)
                    if target is None:
                        if drop_unresolved:
                            return None  # drop the whole Reference
                        raise RuntimeError(f"unresolved reference {value}")
                    out[key] = target
                else:
                    out[key] = self._resolved(value, patient, drop_unresolved=drop_unresolved)
            return compact(out) if drop_unresolved else out
        if isinstance(node, list):
            items = [self._resolved(i, patient, drop_unresolved=drop_unresolved) for i in node]
            return [i for i in items if i is not None]
        return node


def run_naive(program: BenchProgram, *, max_participants: int | None = None) -> WriteResult:
    """The naive client over the program (the first ``max_participants`` participants). Reading the inputs is
    not timed (it is the same for every client); mapping, Patient look-ups and requests are."""
    ctx = sync_options(program.settings()).ctx
    client = NaiveClient(program.base_url)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, _staged(program, Path(tmp)) as staging:
        participants = staging.participants()[:max_participants]
        with Timer() as timer:
            client.write([r for u in map_global_units(staging, ctx) for r in u.resources], None)
            for participant in participants:
                enrollment, units = _participant_units(staging, participant, ctx)
                system = enrollment.mrn_system or program.mrn_system
                patient_id = client.patient_id(system, enrollment.mrn)
                if patient_id is None:
                    continue
                client.write([r for u in units for r in u.resources],
                             (("Patient", system, enrollment.mrn), f"Patient/{patient_id}"))
    return WriteResult("naive", timer.seconds, client.resources, client.requests, client.writes,
                       f"{len(participants)} participants")
