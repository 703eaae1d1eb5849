"""`peersync map`: what a sync would send, written to files, with no server and no ledger.

One transaction bundle per participant (plus one for the program-wide resources), NDJSON per resource
type, and a summary. Like a sync, a participant whose change-set exceeds ``max_bundle_entries`` (100) gets
several bundles (``participant-<id>.json``, ``participant-<id>-2.json``, ...): units are mapped one at a time
and written a bundle at a time, so memory does not grow with a participant's history. References to the Patient
stay conditional (``Patient?identifier=...``): only a sync resolves them against the EHR.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson

from connector.identifiers import identifier_value
from connector.map import MappingContext, map_provenance
from connector.map.units import (
    iter_participant_units,
    map_global_units,
    participant_unit_keys,
)
from connector.model import Enrollment, RecordKind
from connector.read.profile import Profile
from connector.read.program import ReadReport, read_program
from connector.read.staging import Staging
from connector.write.bundle import UnitWrite, build_transaction


def map_program(profile: Profile, inputs: list[Path], ctx: MappingContext, out_dir: Path, staging: Staging,
                *, recorded: datetime | None = None, max_bundle_entries: int = 100) -> dict[str, Any]:
    """Read, map and write every record; return the summary (also written as summary.json)."""
    recorded = recorded or datetime.now(UTC)
    report: ReadReport = read_program(profile, inputs, staging)
    bundles_dir = out_dir / "bundles"
    bundles_dir.mkdir(parents=True, exist_ok=True)
    ndjson: dict[str, IO[bytes]] = {}
    counts: Counter[str] = Counter()
    bundles = 0

    def emit(name: str, units: list[UnitWrite], author: str | None) -> None:
        def provenance(targets: list[str]) -> dict[str, Any]:
            return map_provenance(targets, activity="UPDATE", author=author, recorded=recorded, ctx=ctx)

        nonlocal bundles
        bundles += 1
        built = build_transaction(units, patient=None, resolve=lambda identity: None, provenance=provenance)
        (bundles_dir / f"{name}.json").write_bytes(orjson.dumps(built.bundle, option=orjson.OPT_INDENT_2))
        for entry in built.bundle["entry"]:
            resource = entry["resource"]
            resource_type = resource["resourceType"]
            if resource_type not in ndjson:
                ndjson[resource_type] = (out_dir / f"{resource_type}.ndjson").open("wb")
            ndjson[resource_type].write(orjson.dumps(resource) + b"\n")
            counts[resource_type] += 1

    try:
        emit("_program", map_global_units(staging, ctx), None)
        participants = staging.participants()
        for participant in participants:
            units = participant_unit_keys(staging, participant)
            enrollment = staging.record(RecordKind.ENROLLMENT, participant)
            author = (ctx.ref("PractitionerRole", "role", enrollment.supporter_id)["reference"]
                      if isinstance(enrollment, Enrollment) else None)
            name = f"participant-{identifier_value(participant)}"
            chunk: list[UnitWrite] = []
            size = part = 0
            for unit in iter_participant_units(staging, participant, units, ctx):
                if chunk and size + len(unit.resources) > max_bundle_entries:  # the rule of Syncer
                    part += 1
                    emit(name if part == 1 else f"{name}-{part}", chunk, author)
                    chunk, size = [], 0
                chunk.append(unit)
                size += len(unit.resources)
            if chunk or part == 0:
                part += 1
                emit(name if part == 1 else f"{name}-{part}", chunk, author)
    finally:
        for handle in ndjson.values():
            handle.close()
    summary = {
        "read": report.as_dict(),
        "participants": len(participants),
        "bundles": bundles,
        "resources": dict(sorted(counts.items())),
        "out_dir": str(out_dir),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
