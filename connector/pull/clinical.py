"""Clinical facts a peer supporter needs, for consenting participants only: the latest HbA1c and blood pressure
with their dates, and upcoming appointments, read from the EHR; and, per goal with a measurable target, the
latest value next to the target. Pure functions over FHIR resources; the rows hold PHI (written 0600).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from connector.model import GoalTarget, TargetMeasure

LOINC = "http://loinc.org"
HBA1C = "4548-4"  # Hemoglobin A1c/Hemoglobin.total in Blood
BP_PANEL = "85354-9"  # Blood pressure panel with all children optional
SYSTOLIC = "8480-6"
DIASTOLIC = "8462-4"
BODY_WEIGHT = "29463-7"
FASTING_GLUCOSE = "1558-6"  # Fasting glucose [Mass/volume] in Serum or Plasma
# Goal targets the EHR holds a measurement for (the same LOINC codes the Goal mapper uses, connector.map.codes).
# Steps and activity minutes/days are what the participant reports to the program, not EHR results: no EHR value.
EHR_MEASURES: dict[TargetMeasure, str] = {
    TargetMeasure.HBA1C: HBA1C,
    TargetMeasure.BODY_WEIGHT: BODY_WEIGHT,
    TargetMeasure.FASTING_GLUCOSE: FASTING_GLUCOSE,
}
# Observation statuses a value is taken from (also sent as the search's status filter, so the newest usable one
# is the first of a newest-first search of one).
USABLE_STATUSES = ("final", "amended", "corrected", "preliminary")


@dataclass(frozen=True)
class Measurement:
    """A value with its unit and effective date (text as the EHR wrote it)."""

    value: str
    unit: str
    date: str
    observation: str = ""  # "Observation/{id}" on the EHR: what a goal's outcome_observation may name


def _has_code(concept: Mapping[str, Any] | None, code: str) -> bool:
    return any(c.get("system") == LOINC and c.get("code") == code for c in (concept or {}).get("coding", []))


def _effective(observation: Mapping[str, Any]) -> str:
    return str(observation.get("effectiveDateTime") or (observation.get("effectivePeriod") or {}).get("start")
               or observation.get("issued") or "")


def _quantity(quantity: Mapping[str, Any] | None) -> tuple[str, str] | None:
    if not quantity or quantity.get("value") is None:
        return None
    return str(quantity["value"]), str(quantity.get("unit") or quantity.get("code") or "")


def _usable(observation: Mapping[str, Any]) -> bool:
    return observation.get("status") in USABLE_STATUSES


def latest_a1c(observations: Iterable[Mapping[str, Any]]) -> Measurement | None:
    """The most recent usable HbA1c (LOINC 4548-4) among ``observations``."""
    return latest_quantity(observations, HBA1C)


def latest_quantity(observations: Iterable[Mapping[str, Any]], code: str) -> Measurement | None:
    """The most recent usable Observation with LOINC ``code`` and a quantity value among ``observations``."""
    found = [(obs, q) for obs in observations if _usable(obs) and _has_code(obs.get("code"), code)
             and (q := _quantity(obs.get("valueQuantity"))) is not None]
    if not found:
        return None
    obs, (value, unit) = max(found, key=lambda pair: _effective(pair[0]))
    return Measurement(value, unit, _effective(obs)[:10], f"Observation/{obs['id']}" if obs.get("id") else "")


def latest_blood_pressure(observations: Iterable[Mapping[str, Any]]) -> Measurement | None:
    """The most recent usable blood pressure panel (LOINC 85354-9) with systolic and diastolic components."""
    best: tuple[str, str, str] | None = None
    for obs in observations:
        if not _usable(obs) or not _has_code(obs.get("code"), BP_PANEL):
            continue
        parts = {code: _quantity(c.get("valueQuantity")) for c in obs.get("component", [])
                 for code in (SYSTOLIC, DIASTOLIC) if _has_code(c.get("code"), code)}
        if parts.get(SYSTOLIC) and parts.get(DIASTOLIC):
            when = _effective(obs)
            if best is None or when > best[0]:
                best = (when, f"{parts[SYSTOLIC][0]}/{parts[DIASTOLIC][0]}",  # type: ignore[index]
                        parts[SYSTOLIC][1])  # type: ignore[index]
    return Measurement(best[1], best[2], best[0][:10]) if best else None


def upcoming_appointments(appointments: Iterable[Mapping[str, Any]], *, today: str, limit: int = 3) -> list[str]:
    """Start dates (and the service, if named) of booked or pending appointments from ``today`` on."""
    upcoming = sorted((str(a.get("start", "")), a) for a in appointments
                      if a.get("status") in ("booked", "pending", "proposed") and str(a.get("start", "")) >= today)
    out = []
    for start, appointment in upcoming[:limit]:
        service = next((str(c.get("text") or next((x.get("display") for x in c.get("coding", [])), "") or "")
                        for c in appointment.get("serviceType", [])), "")
        out.append(f"{start[:16]} {service}".strip())
    return out


def target_progress(target: GoalTarget | None, latest: Mapping[TargetMeasure, Measurement]) -> str:
    """For a goal with a target the EHR measures (HbA1c, body weight, fasting glucose): the latest value next to
    the target; empty for other targets or when the EHR has no value."""
    if target is None or (found := latest.get(target.measure)) is None:
        return ""
    unit = f" {target.unit}" if target.unit else ""
    return f"latest {found.value} {found.unit} on {found.date}; target {target.comparator.value} {target.value}{unit}"
