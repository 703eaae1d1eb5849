"""`peersync map`: what a sync would send, written to files, with no server and no ledger.

The bundles come from the same plan and builder as a first sync's: the input is planned against an empty
ledger (so every unit is written, with the hash a sync records), the units are mapped and cut into transactions
by the same rule (:func:`connector.write.decisions.chunk_writes`, ``max_bundle_entries`` resources each), and
each transaction is built by :func:`connector.write.changeset.build_change_set`, with the same change-set
Provenance (tag and ``ifNoneExist``). What only a sync can know stays as mapped: references to the Patient and
to resources already on the server stay conditional (``Type?identifier=...``).

One bundle per participant (``participant-<id>.json``, then ``participant-<id>-2.json``, ... when a participant's
change-set is cut), ``_program.json`` for the program-wide resources, NDJSON per resource type, and a summary.
Units are mapped one at a time and written a bundle at a time, so memory does not grow with a participant's
history.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson

from connector.files import make_folder, open_new_binary, write_atomically
from connector.identifiers import identifier_value
from connector.map import MappingContext
from connector.map.note import preview_page
from connector.map.units import (
    iter_planned_units,
    map_participant_units,
    map_planned_global_units,
    participant_notes,
    participant_unit_keys,
)
from connector.plan.ledger import Ledger
from connector.plan.planner import (
    compute_plan,
    participants_to_write,
    program_fingerprint,
    units_to_write,
)
from connector.read.profile import Profile
from connector.read.program import ReadReport, read_program
from connector.read.staging import Staging
from connector.write.bundle import Identity, PendingWrite, identity_of
from connector.write.changeset import build_change_set
from connector.write.decisions import chunk_writes, reference_order, strip_deferrable


def map_program(profile: Profile, inputs: list[Path], ctx: MappingContext, out_dir: Path, staging: Staging,
                *, recorded: datetime | None = None, max_bundle_entries: int = 100) -> dict[str, Any]:
    """Read, map and write every record; return the summary (also written as summary.json)."""
    report: ReadReport = read_program(profile, inputs, staging)
    bundles_dir = out_dir / "bundles"
    make_folder(bundles_dir)  # 0700, files 0600: every file here holds patient data
    ndjson: dict[str, IO[bytes]] = {}
    counts: Counter[str] = Counter()
    bundles = 0
    try:
        for name, bundle in iter_bundles(staging, ctx, recorded=recorded, max_bundle_entries=max_bundle_entries):
            bundles += 1
            write_atomically(bundles_dir / f"{name}.json", orjson.dumps(bundle, option=orjson.OPT_INDENT_2))
            for entry in bundle["entry"]:
                resource = entry["resource"]
                resource_type = resource["resourceType"]
                if resource_type not in ndjson:
                    ndjson[resource_type] = open_new_binary(out_dir / f"{resource_type}.ndjson")
                ndjson[resource_type].write(orjson.dumps(resource) + b"\n")
                counts[resource_type] += 1
    finally:
        for handle in ndjson.values():
            handle.close()
    summary = {
        "read": report.as_dict(),
        "participants": len(staging.participants()),
        "bundles": bundles,
        "resources": dict(sorted(counts.items())),
        "out_dir": str(out_dir),
    }
    write_atomically(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def iter_bundles(staging: Staging, ctx: MappingContext, *, recorded: datetime | None = None,
                 max_bundle_entries: int = 100) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, transaction bundle) for what a first sync would send of the staged records: ``_program`` for the
    program-wide resources, then each participant's (``participant-<id>``, ``-2``, ... when cut), with the
    change-set Provenance. ``peersync map`` writes these; ``peersync validate`` checks them.
    """
    recorded = recorded or datetime.now(UTC)

    def built(name: str, writes: Iterable[PendingWrite]) -> Iterator[tuple[str, dict[str, Any]]]:
        # As a first sync sends them: in reference order, cut, and a unit whose deferrable references point past
        # its bundle sent without them, then complete in a last bundle (connector.write.decisions).
        written: set[Identity] = set()
        complete_later: list[PendingWrite] = []
        part = 0
        for part, chunk in enumerate(chunk_writes(reference_order(list(writes)), max_bundle_entries), start=1):
            written |= {identity_of(r) for w in chunk for r in w.unit.resources}
            sent, incomplete = strip_deferrable(chunk, written.__contains__)
            complete_later += incomplete.values()
            change_set = build_change_set(sent, ctx=ctx, patient=None, resolve=lambda _identity: None,
                                          recorded=recorded)
            yield (name if part == 1 else f"{name}-{part}"), change_set.bundle
        if complete_later:
            change_set = build_change_set(complete_later, ctx=ctx, patient=None, resolve=lambda _identity: None,
                                          recorded=recorded)
            yield f"{name}-{part + 1}", change_set.bundle

    # What a first sync writes: the plan against a ledger that holds nothing (thrown away afterwards).
    with tempfile.TemporaryDirectory(prefix="peersync-map-") as tmp, Ledger(Path(tmp) / "empty.sqlite") as empty:
        compute_plan(staging, empty, program_id=ctx.program_id, fingerprint=program_fingerprint(ctx), ctx=ctx)
        try:
            yield from built("_program", map_planned_global_units(staging, units_to_write(staging, None), ctx))
            for participant in participants_to_write(staging):
                planned = units_to_write(staging, participant)
                yield from built(f"participant-{identifier_value(participant)}",
                                 iter_planned_units(staging, participant, planned, ctx))
        finally:
            # A consumer that stops early may close the generator after it closed the staging store.
            with contextlib.suppress(sqlite3.ProgrammingError):
                Ledger.detach_from(staging.db)


def write_note_previews(staging: Staging, ctx: MappingContext, out_dir: Path,
                        participant: str | None = None) -> list[Path]:
    """Render what the clinic will see of participants (all, or one) to ``notes-<id>.html`` in ``out_dir``, each
    file created 0600 (it holds patient data), before the first sync: their clinical notes (unless
    ``clinical_notes`` is off: the clinic receives none) and the narratives of their structured resources (unless
    it is ``only``). Returns the files written."""
    make_folder(out_dir)
    chosen = [participant] if participant is not None else staging.participants()
    written = []
    for pid in chosen:
        notes = [] if ctx.clinical_notes == "off" else [
            n for n in participant_notes(staging, pid, ctx) if not n.voided]  # as a first sync: never sent
        narratives = [] if ctx.clinical_notes == "only" else participant_narratives(staging, pid, ctx)
        if not notes and not narratives:
            continue
        path = out_dir / f"notes-{identifier_value(pid)}.html"
        write_atomically(path, preview_page(notes, ctx, f"Peer support notes: {ctx.program_name}", narratives))
        written.append(path)
    return written


def participant_narratives(staging: Staging, participant: str, ctx: MappingContext) -> list[tuple[str, str]]:
    """(resource type, narrative div) of one participant's structured resources, as a first sync writes them."""
    units = map_participant_units(staging, participant, participant_unit_keys(staging, participant), ctx)
    return [(r["resourceType"], r["text"]["div"]) for unit in units for r in unit.resources
            if "text" in r and r["resourceType"] != "DocumentReference"]
