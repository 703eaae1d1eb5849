"""peersync's own terminology: CodeSystems, ValueSets and extension definitions kept as FHIR JSON data.

The files live in ``mappings/terminology/`` (data, not code; found by :mod:`connector.assets`). Mappers take
code displays from them, so a
display is changed in one place; ``peersync terminology publish`` sends them to a server with
:func:`terminology_bundle`.
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
from connector.map.context import DEFAULT_TERMINOLOGY_BASE

# The canonical base written in the data files: the default base (a deployment may publish under another).
FILE_TERMINOLOGY_BASE = DEFAULT_TERMINOLOGY_BASE
_KINDS = ("CodeSystem", "ValueSet", "StructureDefinition")


class TerminologyError(ConfigError):
    """A terminology file is missing, unreadable or not a CodeSystem/ValueSet/StructureDefinition."""


def load_terminology(mappings_dir: Path | None = None) -> list[dict[str, Any]]:
    """Read every CodeSystem, ValueSet and StructureDefinition JSON file, in a stable (file name) order."""
    folder = terminology_dir(mappings_dir)
    if not folder.is_dir():
        raise TerminologyError(f"terminology folder not found: {folder}")
    resources: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.json")):
        try:
            resource = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TerminologyError(f"cannot read {path}: {exc}") from exc
        if not isinstance(resource, dict) or resource.get("resourceType") not in _KINDS or not resource.get("url"):
            raise TerminologyError(f"{path}: not a CodeSystem, ValueSet or StructureDefinition with a url")
        resources.append(resource)
    return resources


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


def rebase(resources: Iterable[Mapping[str, Any]], terminology_base: str) -> list[dict[str, Any]]:
    """Copies of the resources with the files' canonical base replaced by ``terminology_base``."""
    text = json.dumps(list(resources), ensure_ascii=False)
    if terminology_base != FILE_TERMINOLOGY_BASE:
        text = text.replace(FILE_TERMINOLOGY_BASE + "/", terminology_base.rstrip("/") + "/")
    rebased: list[dict[str, Any]] = json.loads(text)
    return rebased


def terminology_bundle(
    resources: Iterable[Mapping[str, Any]], *, terminology_base: str | None = None
) -> dict[str, Any]:
    """A transaction Bundle that upserts each resource by canonical URL (``PUT CodeSystem?url=...``).

    ``terminology_base`` rewrites the canonical URLs when a deployment publishes under another base.
    """
    items = rebase(resources, terminology_base) if terminology_base else [dict(r) for r in resources]
    entries = []
    for resource in items:
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
