"""What the EHR-restriction tests check on the server itself (HAPI directly, never through the proxy).

* :func:`clean_enrollments`: demo participants without bad rows or review cases, so that a run whose records all
  land exits 0 and any other code is the restriction's;
* :func:`broken_references`: every reference stored in the program's resources resolves to a resource on the
  server (a conditional ``Type?search`` string stored as it is, or an id that is not there, is broken).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import requests

TEMPLATE = Path(__file__).resolve().parents[2] / "fixtures" / "demo" / "template"
_RECORD_FILES = {"enrollment": ("enrollments.csv", "enrollment_id"), "goal": ("goals.csv", "goal_id"),
                 "contact": ("contacts.csv", "contact_id"),
                 "planned_contact": ("planned_contacts.csv", "planned_contact_id"),
                 "referral": ("referrals.csv", "referral_id")}


def _rows(name: str) -> list[dict[str, str]]:
    with (TEMPLATE / name).open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def clean_enrollments(summary: dict[str, Any], count: int) -> set[str]:
    """The first ``count`` demo enrollments that have no bad row and no review case."""
    unclean = set(summary["unmatched_enrollments"]) | set(summary["ambiguous_enrollments"])
    for bad in summary["bad_rows"]:
        file_name, id_column = _RECORD_FILES.get(bad["kind"], (bad["file"], ""))
        for row in _rows(file_name):
            if bad["record_id"] in (row.get(id_column), row.get("enrollment_id")):
                unclean.add(row["enrollment_id"])
    clean = [r["enrollment_id"] for r in _rows("enrollments.csv") if r["enrollment_id"] not in unclean]
    return set(clean[:count])


def _references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            else:
                yield from _references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)


def broken_references(base_url: str, resources: Iterable[dict[str, Any]]) -> list[str]:
    """``Type/id -> reference`` for each stored reference that does not resolve on the server (PHI-free: ids)."""
    literal: dict[str, set[str]] = defaultdict(set)  # type -> ids referenced
    holders: dict[str, list[str]] = defaultdict(list)  # "Type/id" referenced -> who holds the reference
    broken: list[str] = []
    for resource in resources:
        holder = f"{resource['resourceType']}/{resource['id']}"
        for reference in _references(resource):
            parts = reference.split("/")
            if reference.startswith("#"):
                continue  # a contained resource: resolved inside the resource
            if len(parts) != 2 or "?" in reference or not parts[0][:1].isupper():
                broken.append(f"{holder} -> {reference.split('?')[0]}?... (not a literal reference)")
                continue
            literal[parts[0]].add(parts[1])
            holders[reference].append(holder)
    for resource_type, ids in literal.items():
        found = _existing_ids(base_url, resource_type, sorted(ids))
        broken += [f"{holder} -> {resource_type}/{missing}" for missing in sorted(set(ids) - found)
                   for holder in holders[f"{resource_type}/{missing}"]]
    return broken


def _existing_ids(base_url: str, resource_type: str, ids: list[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(ids), 50):
        chunk = ids[start:start + 50]
        bundle = requests.get(f"{base_url}/{resource_type}", params={"_id": ",".join(chunk), "_elements": "id",
                                                                      "_count": 100}, timeout=60).json()
        found |= {e["resource"]["id"] for e in bundle.get("entry", []) if e.get("resource", {}).get("id")}
    return found
