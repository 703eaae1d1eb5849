"""Referrals from the clinic to the program: which Tasks in a search answer are deliverable, as pure functions.

A referral (SDOH Clinical Care's Task for referral management) is a ``Task`` whose ``owner`` is the program's
Organization and whose ``focus`` is the ``ServiceRequest``; its ``for`` is the Patient. The search that finds them
includes the ServiceRequest, the Patient and the requester, so one answer holds everything an intake row needs.
Every Task that cannot be delivered is skipped with a reason that holds no patient data (ids and codes only).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Tasks the program still has to pick up (SDOH CC: "requested"; "received" when a previous pull was cut short
# between writing the intake file and recording it, or an intermediary marked it received).
OPEN_STATUSES = ("requested", "received")
# The meta.tag peersync puts on a Task it delivered to intake: with the ledger lost, it still says "delivered".
DELIVERED_TAG_CODE = "delivered-to-intake"


@dataclass(frozen=True)
class InboundReferral:
    """One clinic referral, ready for the intake file. Holds PHI (name, phone, MRN): never logged."""

    task_id: str
    task_version: str
    task_status: str
    service_request_id: str
    referral_date: str
    reason: str
    service: str
    referring_clinician: str
    patient_id: str
    mrn: str
    given_name: str
    family_name: str
    phone: str
    language: str
    delivered_before: bool  # the Task carries peersync's delivered tag

    @property
    def key(self) -> str:
        """Idempotency key: the Task id (a new version of a delivered Task is not a new referral)."""
        return self.task_id


@dataclass(frozen=True)
class SkippedTask:
    """A Task that is not delivered, and why (no patient data: the Task id and a reason)."""

    task_id: str
    reason: str


def ref_id(reference: Mapping[str, Any] | None, resource_type: str) -> str | None:
    """The id in a literal ``Type/id`` reference (relative or absolute), else None."""
    text = (reference or {}).get("reference") or ""
    parts = text.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == resource_type and parts[-1] and "?" not in text:
        return parts[-1]
    if len(parts) >= 4 and parts[-4] == resource_type and parts[-2] == "_history":  # Type/id/_history/v
        return parts[-3]
    return None


def index_included(resources: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], Mapping[str, Any]]:
    """Resources of a search answer by (type, id)."""
    return {(r["resourceType"], r["id"]): r for r in resources if r.get("resourceType") and r.get("id")}


def _coding_key(coding: Mapping[str, Any]) -> str:
    return f"{coding.get('system', '')}|{coding.get('code', '')}"


def _concept_text(concept: Mapping[str, Any] | None) -> str:
    concept = concept or {}
    if concept.get("text"):
        return str(concept["text"])
    for coding in concept.get("coding", []):
        if coding.get("display"):
            return str(coding["display"])
    return ""


def _human_name(resource: Mapping[str, Any]) -> tuple[str, str]:
    names = resource.get("name") or []
    name = next((n for n in names if n.get("use") in ("official", "usual")), names[0] if names else {})
    return " ".join(name.get("given", [])), str(name.get("family", ""))


def _phone(patient: Mapping[str, Any]) -> str:
    phones = [t for t in patient.get("telecom", []) if t.get("system") == "phone" and t.get("value")]
    phones.sort(key=lambda t: (t.get("use") != "mobile", t.get("rank", 99)))
    return str(phones[0]["value"]) if phones else ""


def _language(patient: Mapping[str, Any]) -> str:
    comms = patient.get("communication") or []
    preferred = next((c for c in comms if c.get("preferred")), comms[0] if comms else None)
    if not preferred:
        return ""
    concept = preferred.get("language") or {}
    code = next((c.get("code") for c in concept.get("coding", []) if c.get("code")), None)
    return str(code or concept.get("text") or "")


def _mrn(patient: Mapping[str, Any], mrn_system: str) -> str | None:
    return next((str(i["value"]) for i in patient.get("identifier", [])
                 if i.get("system") == mrn_system and i.get("value")), None)


def _clinician(task: Mapping[str, Any], request: Mapping[str, Any],
               included: Mapping[tuple[str, str], Mapping[str, Any]]) -> str:
    for who in (task.get("requester"), request.get("requester")):
        if not who:
            continue
        if who.get("display"):
            return str(who["display"])
        for resource_type in ("Practitioner", "PractitionerRole", "Organization"):
            found = included.get((resource_type, ref_id(who, resource_type) or ""))
            if found and resource_type == "Practitioner":
                given, family = _human_name(found)
                return f"{given} {family}".strip()
            if found and found.get("name"):
                return str(found["name"])
    return ""


def is_delivered_tag(task: Mapping[str, Any], tag_system: str) -> bool:
    """Whether the Task carries peersync's delivered-to-intake tag."""
    return any(t.get("system") == tag_system and t.get("code") == DELIVERED_TAG_CODE
               for t in (task.get("meta") or {}).get("tag", []))


def inbound_referrals(tasks: Iterable[Mapping[str, Any]], included: Mapping[tuple[str, str], Mapping[str, Any]], *,
                      owner_id: str, mrn_system: str, accepted_codes: frozenset[str],
                      tag_system: str) -> tuple[list[InboundReferral], list[SkippedTask]]:
    """Sort the Tasks of a search answer into deliverable referrals and skipped Tasks (with reasons).

    ``accepted_codes`` (``system|code``) are the ServiceRequest codes the program takes; empty accepts any code.
    """
    found: list[InboundReferral] = []
    skipped: list[SkippedTask] = []
    for task in tasks:
        task_id = str(task.get("id", "?"))
        reason = _skip_reason(task, included, owner_id=owner_id, mrn_system=mrn_system, accepted_codes=accepted_codes)
        if reason:
            skipped.append(SkippedTask(task_id, reason))
            continue
        request = included[("ServiceRequest", ref_id(task.get("focus"), "ServiceRequest") or "")]
        patient = included[("Patient", ref_id(task.get("for"), "Patient") or "")]
        given, family = _human_name(patient)
        found.append(InboundReferral(
            task_id=task_id,
            task_version=str((task.get("meta") or {}).get("versionId", "")),
            task_status=str(task["status"]),
            service_request_id=str(request["id"]),
            referral_date=str(request.get("authoredOn") or task.get("authoredOn") or "")[:10],
            reason="; ".join(t for t in (_concept_text(c) for c in request.get("reasonCode", [])) if t)
            or _concept_text(request.get("code")),
            service=_concept_text(request.get("code")),
            referring_clinician=_clinician(task, request, included),
            patient_id=str(patient["id"]),
            mrn=_mrn(patient, mrn_system) or "",
            given_name=given,
            family_name=family,
            phone=_phone(patient),
            language=_language(patient),
            delivered_before=is_delivered_tag(task, tag_system),
        ))
    return found, skipped


def _skip_reason(task: Mapping[str, Any], included: Mapping[tuple[str, str], Mapping[str, Any]], *,
                 owner_id: str, mrn_system: str, accepted_codes: frozenset[str]) -> str | None:
    """Why a Task cannot be delivered (None: it can). The reason names ids and codes, never patient data."""
    if task.get("resourceType") != "Task" or not task.get("id"):
        return "not a Task with an id"
    if ref_id(task.get("owner"), "Organization") != owner_id:
        return "owned by another organization"
    if task.get("status") not in OPEN_STATUSES:
        return f"status {task.get('status')!r} is not open for intake"
    patient_id = ref_id(task.get("for"), "Patient")
    if patient_id is None:
        return "the Task names no Patient (Task.for)"
    patient = included.get(("Patient", patient_id))
    if patient is None:
        return f"Patient/{patient_id} is not in the answer (deleted, or not readable with the granted scopes)"
    if _mrn(patient, mrn_system) is None:
        return f"Patient/{patient_id} has no MRN in the configured system ({mrn_system})"
    request_id = ref_id(task.get("focus"), "ServiceRequest")
    if request_id is None:
        return "the Task has no ServiceRequest focus"
    request = included.get(("ServiceRequest", request_id))
    if request is None:
        return f"ServiceRequest/{request_id} is not in the answer"
    if request.get("status") in ("revoked", "entered-in-error", "completed"):
        return f"ServiceRequest/{request_id} is {request.get('status')}"
    codes = {_coding_key(c) for c in (request.get("code") or {}).get("coding", [])}
    if accepted_codes and not codes & accepted_codes:
        shown = ", ".join(sorted(codes)) or "no code"
        return f"ServiceRequest/{request_id} asks for a service the program does not take ({shown})"
    return None
