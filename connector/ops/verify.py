"""Read back what the ledger says was sent, and compare: ``peersync verify`` and the doctor's ledger check.

The server may lose or change what peersync wrote: someone edits or deletes a resource, an EHR is restored
from a backup, a test EHR is refreshed. The ledger cannot see that: it only knows what the server confirmed.
This module reads the ledger's resources back in batches (``Type?_id=a,b,c&_elements=...``, or by
identifier for a resource without a server id) and sorts each into:

- ``identical``: present, and its versionId is the one the server confirmed (for a record that peersync voided
  after it left the source: still entered-in-error, as the void bumped the version after the ledger stored it);
- ``changed``: present, with another version (someone edited it) or no longer entered-in-error;
- ``missing``: not found (deleted on the server, 404/410 or absent from the search).

:func:`mark_for_repair` hands the drifted units to the ledger, so the next sync re-sends exactly those, as the
usual conditional writes (no duplicates). Nothing here holds patient data: unit keys, types and server ids only.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from connector.errors import ExitCode, PeersyncError
from connector.identifiers import escape_token
from connector.plan.ledger import Ledger, SentResource
from connector.server.client import FhirClient, FhirHttpError
from connector.write.writer import STATUS_ELEMENT

log = logging.getLogger(__name__)

# Ids per search: 100 ids of up to 64 characters keep the URL under 8 kB (the usual server limit).
READ_BATCH = 100
# A verify that found drift exits 65 (EX_DATAERR, as for rejected records): the data differs, the run worked.
DRIFT_EXIT = ExitCode.RECORDS_REJECTED
VOID_STATUS = "entered-in-error"


class Drift(StrEnum):
    """How a resource on the server compares with what the ledger says was confirmed."""

    IDENTICAL = "identical"
    CHANGED = "changed"
    MISSING = "missing"


class ReadBackError(PeersyncError):
    """The server refused the read-back searches (not a transient failure: those raise ServerUnavailableError)."""

    exit_code = ExitCode.SERVER_UNAVAILABLE


@dataclass(frozen=True)
class Finding:
    """One resource's comparison."""

    resource: SentResource
    drift: Drift
    why: str  # "", "version 1 -> 3", "status active", "not found"


@dataclass
class VerifyReport:
    """Counts per resource type, and the findings that are not identical (for repair and --json)."""

    by_type: dict[str, Counter[str]] = field(default_factory=dict)
    drifted: list[Finding] = field(default_factory=list)
    requests: int = 0

    def add(self, finding: Finding) -> None:
        """Count a finding; keep it when it is drift."""
        self.by_type.setdefault(finding.resource.resource_type, Counter())[finding.drift.value] += 1
        if finding.drift is not Drift.IDENTICAL:
            self.drifted.append(finding)

    def totals(self) -> dict[str, int]:
        """Resources per outcome, over all types."""
        return {d.value: sum(c[d.value] for c in self.by_type.values()) for d in Drift}

    def drifted_units(self) -> list[str]:
        """Unit keys with at least one changed or missing resource, in a stable order."""
        return sorted({f.resource.unit_key for f in self.drifted})

    def exit_code(self) -> int:
        """0 when everything is identical, else 65."""
        return int(DRIFT_EXIT) if self.drifted else int(ExitCode.OK)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (no patient data: types, unit keys, server ids, versions)."""
        return {
            "totals": self.totals(),
            "resources": {t: {d.value: c.get(d.value, 0) for d in Drift} for t, c in sorted(self.by_type.items())},
            "drifted_units": self.drifted_units(),
            "drifted": [{"unit": f.resource.unit_key, "resource_type": f.resource.resource_type,
                         "server_id": f.resource.server_id, "drift": f.drift.value, "why": f.why}
                        for f in self.drifted],
            "requests": self.requests,
            "exit_code": self.exit_code(),
        }


def compare(expected: SentResource, found: dict[str, Any] | None) -> Finding:
    """Compare the ledger's record of a resource with what the server returned for it (None: not found)."""
    if found is None:
        return Finding(expected, Drift.MISSING, "not found")
    if expected.retracted:
        element = STATUS_ELEMENT.get(expected.resource_type)
        status = found.get(element) if element else VOID_STATUS
        if status != VOID_STATUS:
            return Finding(expected, Drift.CHANGED, f"{element} {status}")
        return Finding(expected, Drift.IDENTICAL, "")
    version = str((found.get("meta") or {}).get("versionId", ""))
    if expected.version is not None and version != expected.version:
        return Finding(expected, Drift.CHANGED, f"version {expected.version} -> {version or '?'}")
    return Finding(expected, Drift.IDENTICAL, "")


def verify(client: FhirClient, resources: Sequence[SentResource], *, batch_size: int = READ_BATCH) -> VerifyReport:
    """Read ``resources`` back from the server in batches, one after the other (a gentle background load on the
    EHR: on the 2-core test machine, 4 concurrent batches were slower than 1), and compare each with the ledger."""
    before = client.stats.requests
    by_type: dict[str, list[SentResource]] = {}
    for resource in resources:
        by_type.setdefault(resource.resource_type, []).append(resource)
    batches = [(resource_type, batch) for resource_type, expected in sorted(by_type.items())
               for batch in _chunks([r for r in expected if r.server_id], batch_size)]
    batches += [(resource_type, batch) for resource_type, expected in sorted(by_type.items())
                for batch in _chunks([r for r in expected if not r.server_id], batch_size)]
    report = VerifyReport()
    for resource_type, batch in batches:
        for finding in _read_batch(client, resource_type, batch):
            report.add(finding)
    report.requests = client.stats.requests - before
    log.info("verify: %s", ", ".join(f"{k} {v}" for k, v in report.totals().items()),
             extra={"event": "verify", "counts": report.totals()})
    return report


def _read_batch(client: FhirClient, resource_type: str, batch: Sequence[SentResource]) -> list[Finding]:
    """One batch of one type, all with a server id (searched by ``_id``) or all without (by identifier)."""
    if batch[0].server_id:
        found = _search(client, resource_type, {"_id": ",".join(r.server_id or "" for r in batch)}, len(batch))
        by_id = {res.get("id"): res for res in found}
        return [compare(r, by_id.get(r.server_id)) for r in batch]
    tokens = ",".join(f"{escape_token(r.system)}|{escape_token(r.value)}" for r in batch)
    found = _search(client, resource_type, {"identifier": tokens}, len(batch), with_identifier=True)
    by_identity = {(i.get("system"), i.get("value")): res for res in found for i in res.get("identifier", [])}
    return [compare(r, by_identity.get((r.system, r.value))) for r in batch]


def verify_ledger(client: FhirClient, ledger: Ledger, *, sample: int | None = None) -> VerifyReport:
    """Verify every resource the ledger says the server confirmed (or a random ``sample`` of them)."""
    return verify(client, ledger.sent_resources(sample=sample))


def mark_for_repair(ledger: Ledger, report: VerifyReport, *, run_id: str) -> int:
    """Mark the drifted units so the next sync re-sends them; returns how many units were marked."""
    missing = [(f.resource.resource_type, f.resource.system, f.resource.value)
               for f in report.drifted if f.drift is Drift.MISSING]
    units = report.drifted_units()
    # A CarePlan links its participant's contacts by server id (activity.outcomeReference): a contact re-created
    # under a new id needs its CarePlan re-sent too, or the link would point at the deleted resource.
    for finding in report.drifted:
        if finding.drift is Drift.MISSING and finding.resource.unit_key.startswith("contact:"):
            unit = ledger.unit(finding.resource.unit_key)
            if unit is not None and unit.participant:
                units.append(f"enrollment:{unit.participant}")
    units = sorted(set(units))
    marked = ledger.mark_drifted(units, missing, detail="drift on the server: re-send (peersync verify --repair)",
                                 run_id=run_id)
    log.info("verify: %d record(s) marked for re-sending", marked, extra={"event": "repair-marked", "units": marked})
    return marked


def _search(client: FhirClient, resource_type: str, params: dict[str, str], expected: int, *,
            with_identifier: bool = False) -> list[dict[str, Any]]:
    """One batched search, only the elements the comparison needs (every page: a server may cap _count)."""
    elements = [e for e in (STATUS_ELEMENT.get(resource_type), "identifier" if with_identifier else None) if e]
    query = {**params, "_count": str(expected), "_elements": ",".join(elements or ["id"])}
    try:
        return list(client.search(resource_type, query, max_pages=expected + 1))
    except FhirHttpError as exc:
        raise ReadBackError(
            f"the server refused the read-back search on {resource_type} (HTTP {exc.status}); verify needs "
            f"search by _id and identifier with _elements on every type peersync writes (see peersync doctor)"
        ) from None


def _chunks(items: Sequence[SentResource], size: int) -> Iterator[Sequence[SentResource]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


__all__ = ["DRIFT_EXIT", "Drift", "Finding", "ReadBackError", "VerifyReport", "compare", "mark_for_repair", "verify",
           "verify_ledger"]
