"""Do the references peersync's resources hold on the server resolve? A read-only check of the server's state.

It scans the program's resources by identifier system (and its Provenances by ``_source``), then checks every
reference they hold: a relative ``Type/id`` must name a resource the server has (found in the scan, or read once);
a conditional ``Type?identifier=`` (a server that neither resolved nor rejected it stored it literally) or a
``urn:uuid`` placeholder is broken. Absolute URLs (outside this server) and contained ``#`` references are not
checked. The report holds server ids, element names and types only: no patient data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from connector.identifiers import reference_strings
from connector.map import MappingContext
from connector.ops.landed import PROGRAM_RESOURCES
from connector.server.client import FhirClient, FhirHttpError


@dataclass(frozen=True)
class BrokenReference:
    """One stored reference that does not resolve."""

    referrer: str  # "Communication/123"
    element: str  # the top-level element holding it, e.g. "basedOn"
    target: str  # the target's resource type
    why: str  # "stored conditional", "placeholder", "not on the server"


@dataclass
class ReferenceReport:
    """Resources scanned per type, references checked, and the broken ones."""

    scanned: Counter[str] = field(default_factory=Counter)
    checked: int = 0
    broken: list[BrokenReference] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (PHI-free)."""
        return {"scanned": dict(self.scanned), "checked": self.checked,
                "broken": [vars(b) for b in self.broken]}


def check_references(client: FhirClient, ctx: MappingContext, *, page_size: int = 500) -> ReferenceReport:
    """Scan the program's resources on the server and report the references that do not resolve."""
    report = ReferenceReport()
    resources: dict[str, dict[str, Any]] = {}
    for resource_type, kind, _status in PROGRAM_RESOURCES:
        params = {"identifier": f"{ctx.system(kind)}|", "_count": str(page_size)}
        for resource in client.search(resource_type, params, max_pages=10_000):
            resources[f"{resource_type}/{resource['id']}"] = resource
    for resource in client.search("Provenance", {"_source": ctx.meta_source, "_count": str(page_size)},
                                  max_pages=10_000):
        resources[f"Provenance/{resource['id']}"] = resource
    exists: dict[str, bool] = {key: True for key in resources}
    for key, resource in resources.items():
        report.scanned[resource["resourceType"]] += 1
        for element, reference in _references(resource):
            report.checked += 1
            problem = _problem(reference, exists, client)
            if problem:
                report.broken.append(BrokenReference(key, element, _target_type(reference), problem))
    return report


def _problem(reference: str, exists: dict[str, bool], client: FhirClient) -> str | None:
    if reference.startswith("#") or reference.startswith(("http://", "https://")):
        return None
    if "?" in reference:
        return "stored conditional"
    if reference.startswith("urn:"):
        return "placeholder"
    parts = reference.split("/")
    if len(parts) == 4 and parts[2] == "_history":
        parts = parts[:2]
    if len(parts) != 2:
        return "not a Type/id reference"
    key = "/".join(parts)
    if key not in exists:
        try:
            client.read(parts[0], parts[1])
            exists[key] = True
        except FhirHttpError as exc:
            if exc.status not in (404, 410):
                raise
            exists[key] = False
    return None if exists[key] else "not on the server"


def _target_type(reference: str) -> str:
    head = reference.split("?", 1)[0].split("/", 1)[0]
    return head if head.isalpha() else "-"


def _references(resource: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(top-level element, reference string) of every Reference.reference in a resource."""
    for element, value in resource.items():
        for reference in reference_strings(value):
            yield element, reference
