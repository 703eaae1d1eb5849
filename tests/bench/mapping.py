"""Mapping throughput: peersync's read -> map -> bundle -> serialize, against fhir.resources and a plain floor.

All three are measured in the same process on the same resources, in CPU seconds of this process
(``time.process_time``: a busy neighbour on a shared machine slows the wall clock, not the work done):

* peersync: read the CSVs into staging (every source row parsed and validated against the source model),
  map each participant's units, assemble its transaction bundle and serialize it with orjson: what a sync
  does before the network. peersync has no FHIR validation step at run time: the mappers are pure and
  the unit tests (tests/unit/test_mappers.py) and integration tests ($validate) prove what they emit.
* naive: the same read and map, then each resource built as a fhir.resources R4B model (``model_validate``)
  and serialized with ``model_dump_json``: the usual way to "make sure" resources are valid with a generic
  FHIR library. Measured on a seeded random sample of the resources (it is slow), warmed up per type.
* floor: the same resources built as plain dicts (every dict and list constructed anew) and serialized with
  orjson: the least Python can do to produce these bytes, with no reading and no mapping logic.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from connector.map import MappingContext, map_provenance
from connector.map.units import (
    UnitWrite,
    map_global_units,
    map_participant_units,
    participant_unit_keys,
)
from connector.read.profile import load_profile
from connector.read.program import read_program
from connector.read.staging import Staging
from connector.write.bundle import BundledResource, build_transaction

from .common import Dataset


@dataclass
class MappingResult:
    resources: int
    rows: int
    read_s: float
    map_s: float
    bundle_s: float  # assembling bundles and serializing them
    naive_per_resource_s: float  # model_validate + model_dump_json, per resource (sampled)
    naive_sample: int
    floor_s: float
    wall_s: float

    @property
    def peersync_s(self) -> float:
        return self.read_s + self.map_s + self.bundle_s

    @property
    def peersync_rate(self) -> float:
        return self.resources / self.peersync_s

    @property
    def naive_rate(self) -> float:
        return 1.0 / ((self.read_s + self.map_s) / self.resources + self.naive_per_resource_s)

    @property
    def floor_rate(self) -> float:
        return self.resources / self.floor_s

    def as_dict(self) -> dict[str, Any]:
        return {
            "resources": self.resources, "rows": self.rows, "read_s": self.read_s, "map_s": self.map_s,
            "bundle_and_serialize_s": self.bundle_s,
            "naive_validate_dump_us_per_resource": self.naive_per_resource_s * 1e6,
            "naive_sample": self.naive_sample, "floor_s": self.floor_s, "wall_s": self.wall_s,
            "peersync_per_s": self.peersync_rate, "naive_per_s": self.naive_rate, "floor_per_s": self.floor_rate,
            "peersync_over_naive": self.peersync_rate / self.naive_rate,
            "peersync_over_floor": self.peersync_rate / self.floor_rate,
        }


def _plain(node: Any) -> Any:
    """The same structure built anew: what building these dicts costs at the least."""
    if type(node) is dict:
        return {k: _plain(v) if type(v) in (dict, list) else v for k, v in node.items()}
    return [_plain(v) if type(v) in (dict, list) else v for v in node]


def _unit_batches(staging: Staging, ctx: MappingContext) -> list[Callable[[], list[UnitWrite]]]:
    """The program-wide units, then each participant's, as functions that map them when called."""
    def participant_units(participant: str) -> list[UnitWrite]:
        return map_participant_units(staging, participant, participant_unit_keys(staging, participant), ctx)

    batches: list[Callable[[], list[UnitWrite]]] = [lambda: map_global_units(staging, ctx)]
    batches += [lambda p=participant: participant_units(p) for participant in staging.participants()]
    return batches


def measure(data: Dataset, *, naive_sample: int = 3000, seed: int = 1) -> MappingResult:
    """Run the three paths over ``data`` and return CPU seconds per stage."""
    profile = load_profile("peersync-template")
    ctx = MappingContext.from_profile(profile)
    recorded = datetime.now(UTC)
    clock = time.process_time
    wall = time.perf_counter()

    def provenances(bundled: list[BundledResource]) -> list[tuple[dict[str, Any], str | None]]:
        targets = [b.full_url for b in bundled]
        return [(map_provenance(targets, activity="UPDATE", author=None, recorded=recorded, ctx=ctx), None)]

    with tempfile.TemporaryDirectory(prefix="bench-map-") as tmp, Staging(Path(tmp) / "s.sqlite") as staging:
        started = clock()
        report = read_program(profile, [data.path], staging)
        read_s = clock() - started
        # timed: what a sync does with each participant's resources before the network, keeping none of them
        # (holding every mapped resource alive would bill peersync for the garbage collector walking them)
        map_s = bundle_s = 0.0
        count = 0
        for units_of in _unit_batches(staging, ctx):
            t0 = clock()
            units = units_of()
            t1 = clock()
            orjson.dumps(build_transaction(units, patient=None, resolve=lambda i: None,
                                           provenances=provenances).bundle)
            t2 = clock()
            map_s += t1 - t0
            bundle_s += t2 - t1
            count += sum(len(u.resources) for u in units)
        # not timed: the same resources again, kept for the naive and floor paths
        resources = [r for units_of in _unit_batches(staging, ctx) for u in units_of() for r in u.resources]
        assert len(resources) == count

    # naive: fhir.resources R4B, on a seeded sample, each model class warmed up first (schema building)
    from fhir.resources.R4B import get_fhir_model_class

    classes = {}
    for resource in resources:
        name = resource["resourceType"]
        if name not in classes:
            classes[name] = get_fhir_model_class(name)
            classes[name].model_validate(resource).model_dump_json()
    sample = random.Random(seed).sample(resources, min(naive_sample, len(resources)))
    started = clock()
    for resource in sample:
        classes[resource["resourceType"]].model_validate(resource).model_dump_json()
    naive_per_resource = (clock() - started) / len(sample)

    started = clock()
    for resource in resources:
        orjson.dumps(_plain(resource))
    floor_s = clock() - started

    return MappingResult(len(resources), report.total_read, read_s, map_s, bundle_s, naive_per_resource, len(sample),
                         floor_s, time.perf_counter() - wall)
