"""The server's CapabilityStatement, read once into what peersync needs to know about it.

Both the writer (how to write each type) and ``peersync doctor`` (what to tell the operator) read the statement
through :meth:`Capabilities.parse`, so they cannot disagree about what the server offers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ResourceCapability:
    """What the server declares for one resource type."""

    type: str
    interactions: frozenset[str] = frozenset()  # empty: not declared (says nothing either way)
    conditional_update: bool = False
    conditional_create: bool = False
    update_create: bool = False  # the server accepts PUT Type/{client id} for a new resource
    search_params: frozenset[str] | None = None  # None: not declared


@dataclass(frozen=True)
class Capabilities:
    """The parts of a CapabilityStatement that decide how peersync writes (the first ``rest`` in server mode)."""

    fhir_version: str = ""
    software: str = ""  # "name version", empty when the statement does not say
    system_interactions: frozenset[str] = frozenset()
    resources: Mapping[str, ResourceCapability] = field(default_factory=dict)

    @classmethod
    def parse(cls, statement: Mapping[str, Any]) -> Capabilities:
        """Read a CapabilityStatement (a JSON object); missing or malformed parts read as "not declared"."""
        rests = [r for r in _list(statement.get("rest")) if r.get("mode", "server") == "server"]
        rest = rests[0] if rests else {}
        resources: dict[str, ResourceCapability] = {}
        for resource in _list(rest.get("resource")):
            resource_type = str(resource.get("type", ""))
            params = resource.get("searchParam")
            resources[resource_type] = ResourceCapability(
                type=resource_type,
                interactions=_codes(resource.get("interaction")),
                conditional_update=bool(resource.get("conditionalUpdate")),
                conditional_create=bool(resource.get("conditionalCreate")),
                update_create=bool(resource.get("updateCreate")),
                search_params=None if params is None else frozenset(
                    str(p.get("name")) for p in _list(params)),
            )
        declared = statement.get("software")
        software: Mapping[str, Any] = declared if isinstance(declared, dict) else {}
        return cls(
            fhir_version=str(statement.get("fhirVersion", "") or ""),
            software=" ".join(str(software.get(k, "")) for k in ("name", "version")).strip(),
            system_interactions=_codes(rest.get("interaction")),
            resources=resources,
        )

    @property
    def supports_transaction(self) -> bool:
        """The server declares the ``transaction`` interaction."""
        return "transaction" in self.system_interactions

    @property
    def supports_batch(self) -> bool:
        """The server declares the ``batch`` interaction."""
        return "batch" in self.system_interactions

    def update_create_types(self) -> frozenset[str]:
        """The types that accept a new resource by ``PUT Type/{client-assigned id}`` (``updateCreate``)."""
        return frozenset(t for t, r in self.resources.items() if r.update_create)

    def resource(self, resource_type: str) -> ResourceCapability | None:
        """The declaration for one type, or None when the statement does not list it."""
        return self.resources.get(resource_type)

    def conditional_update_types(self) -> frozenset[str]:
        """The types the server can update by condition (``PUT Type?identifier=...``)."""
        return frozenset(t for t, r in self.resources.items() if r.conditional_update)

    def conditional_create(self, resource_type: str) -> bool:
        """Whether ``ifNoneExist`` is honoured for a type; a type the statement does not list is assumed to."""
        declared = self.resources.get(resource_type)
        return declared is None or declared.conditional_create


def _list(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _codes(interactions: Any) -> frozenset[str]:
    return frozenset(str(i.get("code")) for i in _list(interactions) if i.get("code"))
