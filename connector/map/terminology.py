"""peersync's own terminology: CodeSystems, ValueSets and extension definitions kept as FHIR JSON data.

The files live in ``mappings/terminology/`` (data, not code; found by :mod:`connector.assets`), laid out as a FHIR
package: ``package.json`` (name, version, canonical) beside the resources. Every resource's ``url`` lies under the
package's canonical, which is :data:`~connector.map.context.TERMINOLOGY_BASE`, and carries the package's version.
Mappers take code displays from them, so a display is changed in one place; ``peersync terminology publish`` sends
them to a server with :func:`terminology_bundle`, always under their one canonical URL.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

from connector.assets import terminology_dir
from connector.errors import ConfigError
from connector.map.context import TERMINOLOGY_BASE

PACKAGE_MANIFEST = "package.json"
_KINDS = ("CodeSystem", "ValueSet", "StructureDefinition")


class TerminologyError(ConfigError):
    """A terminology file is missing, unreadable or not a CodeSystem/ValueSet/StructureDefinition."""


def load_package_manifest(mappings_dir: Path | None = None) -> dict[str, Any]:
    """The terminology package's ``package.json``, checked: a name, a version and peersync's canonical base."""
    path = terminology_dir(mappings_dir) / PACKAGE_MANIFEST
    manifest = _read_json(path)
    if not manifest.get("name") or not manifest.get("version"):
        raise TerminologyError(f"{path}: a FHIR package manifest needs a name and a version")
    if manifest.get("canonical") != TERMINOLOGY_BASE:
        raise TerminologyError(f"{path}: canonical is {manifest.get('canonical')!r}, not peersync's {TERMINOLOGY_BASE}"
                               " (peersync's codes keep one canonical base: restore the shipped file)")
    return manifest


def load_terminology(mappings_dir: Path | None = None) -> list[dict[str, Any]]:
    """Read the terminology package: every CodeSystem, ValueSet and StructureDefinition, in file name order.

    Each must lie under the package's canonical base and carry the package's version.
    """
    folder = terminology_dir(mappings_dir)
    if not folder.is_dir():
        raise TerminologyError(f"terminology folder not found: {folder}")
    version = load_package_manifest(mappings_dir)["version"]
    resources: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.json")):
        if path.name == PACKAGE_MANIFEST:
            continue
        resource = _read_json(path)
        if resource.get("resourceType") not in _KINDS or not resource.get("url"):
            raise TerminologyError(f"{path}: not a CodeSystem, ValueSet or StructureDefinition with a url")
        expected = f"{TERMINOLOGY_BASE}/{resource['resourceType']}/{resource.get('id')}"
        if resource["url"] != expected:
            raise TerminologyError(f"{path}: url {resource['url']} is not {expected}")
        if resource.get("version") != version:
            raise TerminologyError(f"{path}: version {resource.get('version')!r} is not the package's {version!r}")
        resources.append(resource)
    return resources


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TerminologyError(f"cannot read {path}: {exc}") from exc
    if not isinstance(value, dict):
        raise TerminologyError(f"{path}: not a JSON object")
    return value


@lru_cache(maxsize=1)
def _concepts() -> Mapping[str, Mapping[str, Mapping[str, Any]]]:
    """CodeSystem id -> code -> concept, from the shipped files (loaded once)."""
    index: dict[str, dict[str, Mapping[str, Any]]] = {}
    for resource in load_terminology():
        if resource["resourceType"] == "CodeSystem":
            index[resource["id"]] = {c["code"]: c for c in _flatten(resource.get("concept", ()))}
    return index


def _flatten(concepts: Iterable[Mapping[str, Any]]) -> Iterable[Mapping[str, Any]]:
    for concept in concepts:
        yield concept
        yield from _flatten(concept.get("concept", ()))


def display(code_system_id: str, code: str) -> str:
    """The display of one of our codes (``KeyError`` if the CodeSystem or code does not exist)."""
    try:
        return str(_concepts()[code_system_id][code]["display"])
    except KeyError:
        raise KeyError(f"no code {code!r} in CodeSystem {code_system_id!r} (mappings/terminology)") from None


def code_systems() -> Mapping[str, Mapping[str, Mapping[str, Any]]]:
    """All shipped CodeSystems' concepts, by CodeSystem id and code (read-only use)."""
    return _concepts()


def terminology_bundle(resources: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """A transaction Bundle that upserts each resource by canonical URL (``PUT CodeSystem?url=...``).

    The URLs are never rewritten: a deployment publishes peersync's codes under their one canonical base.
    """
    entries = []
    for resource in (dict(r) for r in resources):
        url = resource["url"]
        entries.append(
            {
                # deterministic, so the same publish produces the same bundle
                "fullUrl": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, url)}",
                "resource": resource,
                "request": {"method": "PUT", "url": f"{resource['resourceType']}?url={quote(url, safe='')}"},
            }
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}
