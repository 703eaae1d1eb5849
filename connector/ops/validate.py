"""``peersync validate``: check what a sync would write, before it is written.

The resources come from :func:`connector.map.export.iter_bundles` (what ``peersync map`` writes and a sync sends).
On a server, each goes through ``$validate`` against base R4 and, where US Core 6.1.0 has a profile for its
type, against that profile; ``load_us_core`` first puts the US Core conformance resources shipped in
``mappings/fhir/us-core-6.1.0`` and peersync's terminology on a test server. Offline, each is checked for
structure (elements, types, cardinality) with the fhir.resources models.

Findings are grouped by severity, resource type and message. Messages keep canonical URLs, codes and constraint
texts but lose every other quoted value and every query (:func:`clean_message`), so the report holds no patient
data and identical problems group.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from connector.errors import ConfigError, ExitCode
from connector.map.codes import US_CORE_PROFILES
from connector.server.client import FhirClient

BASE_R4 = "R4"
STRUCTURE = "structure"
_ERROR_SEVERITIES = ("fatal", "error")
_LOAD_ORDER = {"CodeSystem": 0, "ValueSet": 1, "StructureDefinition": 2}


@dataclass(frozen=True)
class Finding:
    """One issue about one resource, free of values: where (an element path) and what (a scrubbed message)."""

    severity: str  # error | warning | information
    resource_type: str
    profile: str  # "R4", a US Core profile name, or "structure" (offline)
    message: str
    location: str = ""


@dataclass
class ValidationReport:
    """Every finding of one ``peersync validate`` run, and how much was checked."""

    mode: str  # "server" or "offline"
    resources: Counter[str] = field(default_factory=Counter)
    checks: int = 0
    findings: list[Finding] = field(default_factory=list)

    def count(self, severity: str) -> int:
        """Findings of one severity."""
        return sum(1 for f in self.findings if f.severity == severity)

    def groups(self) -> list[dict[str, Any]]:
        """Findings grouped by severity, resource type, profile and message: errors first, then the most frequent."""
        grouped: dict[tuple[str, str, str, str], list[Finding]] = {}
        for finding in self.findings:
            key = (finding.severity, finding.resource_type, finding.profile, finding.message)
            grouped.setdefault(key, []).append(finding)
        rank = {"error": 0, "warning": 1, "information": 2}
        out = [
            {"severity": s, "resource_type": t, "profile": p, "message": m, "count": len(items),
             "locations": sorted({f.location for f in items if f.location})[:5]}
            for (s, t, p, m), items in grouped.items()
        ]
        return sorted(out, key=lambda g: (rank.get(g["severity"], 3), -g["count"], g["resource_type"], g["message"]))

    def exit_code(self) -> ExitCode:
        """65 when any resource has an error (a sync would write invalid data), else 0."""
        return ExitCode.RECORDS_REJECTED if self.count("error") else ExitCode.OK

    def as_dict(self) -> dict[str, Any]:
        """The ``--json`` output."""
        return {"mode": self.mode, "resources": dict(sorted(self.resources.items())), "checks": self.checks,
                "errors": self.count("error"), "warnings": self.count("warning"),
                "exit_code": int(self.exit_code()), "groups": self.groups()}


def resources_of(bundles: Iterable[tuple[str, dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    """The resources of transaction bundles, in order."""
    for _name, bundle in bundles:
        for entry in bundle.get("entry", []):
            if "resource" in entry:
                yield entry["resource"]


# -- server ------------------------------------------------------------------------------------------------------


def findings_from_outcome(outcome: dict[str, Any], resource_type: str, profile: str) -> list[Finding]:
    """The issues of a ``$validate`` OperationOutcome as findings (``fatal`` counts as ``error``)."""
    findings = []
    for issue in outcome.get("issue", []):
        severity = str(issue.get("severity", "error"))
        severity = "error" if severity in _ERROR_SEVERITIES else severity
        message = issue.get("diagnostics") or issue.get("details", {}).get("text") or str(issue.get("code", ""))
        where = issue.get("expression") or issue.get("location") or []
        findings.append(Finding(severity, resource_type, profile, clean_message(str(message)),
                                _element_path(str(where[0])) if where else ""))
    return findings


_APOSTROPHE = re.compile(r"(?<=\w)'(?=\w)")  # "can't": not a quote
_CONSTRAINT_TEXT = re.compile(r"(Constraint failed: [\w.-]+: )'([^']*)'")
_QUOTED = re.compile(r"'([^']*)'|\"([^\"]*)\"")
_CANONICAL = re.compile(r"https?://[^\s?=|]+(#[\w.-]+)?")
_QUERY_URL = re.compile(r"\S*\?\S*=\S*")


def clean_message(text: str, limit: int = 400) -> str:
    """A validator message without values: quoted text that is not a canonical URL (with its ``#code``) and
    queries (conditional references carry identifiers) become ``<value>``; constraint texts stay."""
    text = _APOSTROPHE.sub("\u2019", text)
    text = _CONSTRAINT_TEXT.sub(lambda m: m.group(1) + "\u2018" + m.group(2) + "\u2019", text)

    def quoted(match: re.Match[str]) -> str:
        inner = match.group(1) if match.group(1) is not None else match.group(2)
        return f"'{inner}'" if _CANONICAL.fullmatch(inner) else "<value>"

    text = _QUOTED.sub(quoted, text)
    text = _QUERY_URL.sub("<value>", text)
    return re.sub(r"\s+", " ", text).strip()[:limit]


def _element_path(path: str) -> str:
    # "Goal.target[0].measure" -> "Goal.target.measure": indexes say which row, not which rule
    return re.sub(r"\[\d+\]", "", path)


def profiles_for(resource_type: str, *, us_core: bool = True) -> list[tuple[str, str | None]]:
    """(label, profile URL) pairs to validate a resource type against: base R4, then its US Core profile."""
    pairs: list[tuple[str, str | None]] = [(BASE_R4, None)]
    url = US_CORE_PROFILES.get(resource_type)
    if us_core and url:
        pairs.append((url.rsplit("/", 1)[-1], url))
    return pairs


def missing_profiles(client: FhirClient) -> list[str]:
    """The US Core profiles peersync validates against that the server does not have."""
    return [url for url in sorted(set(US_CORE_PROFILES.values()))
            if not client.search_raw(f"StructureDefinition?url={quote(url, safe='')}&_elements=url")]


def validate_on_server(client: FhirClient, resources: Iterable[dict[str, Any]], *,
                       us_core: bool = True) -> ValidationReport:
    """``$validate`` every resource against base R4 and (``us_core``) its US Core 6.1.0 profile."""
    if us_core:
        missing = missing_profiles(client)
        if missing:
            raise ConfigError(
                f"the server has no US Core 6.1.0 profile {', '.join(m.rsplit('/', 1)[-1] for m in missing)}: "
                "run peersync validate with --load-us-core (on a test server), or with --base-only"
            )
    report = ValidationReport("server")
    for resource in resources:
        resource_type = resource["resourceType"]
        report.resources[resource_type] += 1
        for label, url in profiles_for(resource_type, us_core=us_core):
            report.checks += 1
            report.findings += findings_from_outcome(client.validate(resource, url), resource_type, label)
    return report


def us_core_resources() -> list[dict[str, Any]]:
    """The shipped US Core 6.1.0 conformance resources, CodeSystems and ValueSets before StructureDefinitions."""
    from connector.assets import us_core_dir

    resources = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(us_core_dir().glob("*.json"))]
    return sorted(resources, key=lambda r: _LOAD_ORDER.get(r["resourceType"], 3))


def load_us_core(client: FhirClient) -> int:
    """Put the US Core 6.1.0 conformance resources (by id) and peersync's terminology on the server.

    For test servers: a production EHR manages its own conformance resources. Returns how many were loaded.
    """
    from connector.map.terminology import load_terminology, terminology_bundle

    resources = us_core_resources()
    for resource in resources:
        client.update(resource["resourceType"], resource["id"], resource)
    ours = load_terminology()
    client.transaction(terminology_bundle(ours))
    return len(resources) + len(ours)


# -- offline -----------------------------------------------------------------------------------------------------


def structure_findings(resource: dict[str, Any]) -> list[Finding]:
    """Structure problems of one resource (unknown elements, wrong types, missing required elements).

    Uses the fhir.resources models: R4B, whose structure equals R4's for the resources peersync writes.
    Codes and profiles are not checked offline.
    """
    from fhir.resources.R4B import get_fhir_model_class
    from pydantic import ValidationError

    resource_type = str(resource.get("resourceType", ""))
    try:
        model = get_fhir_model_class(resource_type)
    except (KeyError, ValueError):
        return [Finding("error", resource_type or "?", STRUCTURE, "unknown resource type")]
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        # loc and msg only: the input value (exc.errors()[i]["input"]) may be patient data
        return [Finding("error", resource_type, STRUCTURE, clean_message(err["msg"]),
                        ".".join([resource_type, *(str(p) for p in err["loc"] if not isinstance(p, int))]))
                for err in exc.errors()]
    return []


def validate_offline(resources: Iterable[dict[str, Any]]) -> ValidationReport:
    """Check the structure of every resource with the fhir.resources models, without a server."""
    report = ValidationReport("offline")
    for resource in resources:
        report.resources[str(resource.get("resourceType"))] += 1
        report.checks += 1
        report.findings += structure_findings(resource)
    return report
