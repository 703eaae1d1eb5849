"""Transaction bundles: pure assembly of mapped resources into one FHIR transaction.

Each resource becomes an entry with a deterministic ``urn:uuid`` fullUrl and a conditional update
``PUT Type?identifier=system|value`` (token escaped and percent-encoded). Conditional references made by
the mappers are rewritten: to the fullUrl of an entry in the same bundle, to ``Type/id`` when the ledger
knows the server id, to the resolved Patient, or left conditional (the server resolves them in the
transaction). The rewriting happens in copies: the units' resources are left as mapped. The same condition
never appears twice in one bundle.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from connector.identifiers import conditional_url, parse_conditional_reference

Identity = tuple[str, str, str]  # (resource type, identifier system, identifier value)
_NAMESPACE = uuid.UUID("6f1c8a52-3c1e-4d8e-9b7a-2f5d0e4c9a10")


def identity_of(resource: dict[str, Any]) -> Identity:
    """(type, system, value) of a resource's business identifier."""
    ident = resource["identifier"][0]
    return resource["resourceType"], ident["system"], ident["value"]


def full_url(identity: Identity) -> str:
    """A deterministic urn:uuid for an identity, so a replayed bundle is byte-identical."""
    return "urn:uuid:" + str(uuid.uuid5(_NAMESPACE, "|".join(identity)))


@dataclass
class UnitWrite:
    """The resources of one unit (one source record) to write together."""

    unit_key: str
    kind: str
    resources: list[dict[str, Any]]
    voided: bool = False


@dataclass(frozen=True)
class PendingWrite:
    """A mapped unit and the plan's hash of it: what a transaction sends, and what the ledger records once the
    server has confirmed it (``unit_hash`` None: a unit the plan has no hash for)."""

    unit: UnitWrite
    unit_hash: str | None
    first_send: bool = False  # never confirmed on the server: its Provenance activity is CREATE

    @property
    def size(self) -> int:
        """Bundle entries this unit takes (its resources)."""
        return len(self.unit.resources)


@dataclass(frozen=True)
class BundledResource:
    """One resource entry of a transaction: its fullUrl, the resource as mapped, and its unit."""

    full_url: str
    resource: dict[str, Any]
    unit_key: str


@dataclass
class BuiltBundle:
    """A transaction bundle and, per entry, which unit and identity it belongs to (same order)."""

    bundle: dict[str, Any]
    entries: list[tuple[str, Identity]] = field(default_factory=list)  # (unit_key, identity); Provenances after
    provenance_count: int = 0  # the Provenance entries that follow the resources'

    @property
    def has_provenance(self) -> bool:
        """Whether the bundle ends with Provenance entries."""
        return self.provenance_count > 0


def build_transaction(
    units: Iterable[UnitWrite],
    *,
    patient: tuple[Identity, str] | None,
    resolve: Callable[[Identity], str | None],
    provenances: Callable[[list[BundledResource]], list[tuple[dict[str, Any], str | None]]] | None = None,
) -> BuiltBundle:
    """Assemble units into one transaction bundle.

    ``patient`` maps the Patient's conditional identity to its literal reference ("Patient/123").
    ``resolve`` returns a known server id for an identity (from the ledger), or None.
    ``provenances`` builds the Provenances over the bundled resources (POSTed in the same bundle), each with the
    ``ifNoneExist`` condition that makes its POST a conditional create (None: a plain create).
    """
    units = list(units)
    in_bundle: dict[Identity, str] = {}
    for unit in units:
        for resource in unit.resources:
            in_bundle.setdefault(identity_of(resource), full_url(identity_of(resource)))

    def rewrite(reference: str) -> str:
        parsed = parse_conditional_reference(reference)
        if parsed is None:
            return reference
        if patient is not None and parsed == patient[0]:
            return patient[1]
        if parsed in in_bundle:
            return in_bundle[parsed]
        known = resolve(parsed)
        return f"{parsed[0]}/{known}" if known else reference

    entries: list[dict[str, Any]] = []
    index: list[tuple[str, Identity]] = []
    bundled: list[BundledResource] = []
    seen: set[Identity] = set()
    for unit in units:
        for resource in unit.resources:
            identity = identity_of(resource)
            if identity in seen:
                continue  # never the same condition twice in one transaction
            seen.add(identity)
            entries.append(
                {
                    "fullUrl": in_bundle[identity],
                    "resource": _rewritten(resource, rewrite),
                    "request": {"method": "PUT", "url": conditional_url(*identity)},
                }
            )
            index.append((unit.unit_key, identity))
            bundled.append(BundledResource(in_bundle[identity], resource, unit.unit_key))
    built = BuiltBundle({"resourceType": "Bundle", "type": "transaction", "entry": entries}, index)
    if provenances is not None and entries:
        for prov, condition in provenances(bundled):
            request = {"method": "POST", "url": "Provenance"}
            if condition:
                request["ifNoneExist"] = condition
            entries.append({"fullUrl": "urn:uuid:" + str(uuid.uuid4()), "resource": _rewritten(prov, rewrite),
                            "request": request})
            built.provenance_count += 1
    return built


def _rewritten(resource: dict[str, Any], rewrite: Callable[[str], str]) -> dict[str, Any]:
    """A copy of a resource with every Reference.reference rewritten; the input is not changed (a failed
    transaction is rebuilt from the same units). Copy on write: only the dicts and lists on the way to a
    rewritten reference are new; unchanged elements are shared with the input."""
    out = _rewrite_node(resource, rewrite)
    return dict(out) if out is resource else out  # always a new top level (search mode sets its id)


def _rewrite_node(node: Any, rewrite: Callable[[str], str]) -> Any:
    # written for speed: this walks every element of everything peersync sends
    if type(node) is dict:
        out = None
        for key, value in node.items():
            kind = type(value)
            if kind is dict or kind is list:
                new = _rewrite_node(value, rewrite)
            elif kind is str and key == "reference":
                new = rewrite(value)
            else:
                continue
            if new is not value:
                if out is None:
                    out = dict(node)
                out[key] = new
        return node if out is None else out
    items = None
    for index, item in enumerate(node):
        kind = type(item)
        if kind is dict or kind is list:
            new = _rewrite_node(item, rewrite)
            if new is not item:
                if items is None:
                    items = list(node)
                items[index] = new
    return node if items is None else items


def parse_location(location: str | None) -> tuple[str | None, str | None]:
    """(id, version) from a transaction-response location such as ``Goal/123/_history/2``."""
    if not location:
        return None, None
    parts = location.split("?")[0].strip("/").split("/")
    if "_history" in parts:
        at = parts.index("_history")
        return parts[at - 1], parts[at + 1] if at + 1 < len(parts) else None
    return (parts[-1] if len(parts) >= 2 else None), None
