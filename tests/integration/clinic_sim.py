"""A small clinic and community-organization simulator for the pull tests: it writes to the real FHIR server
what an EHR and a CBO platform would (referral Tasks with their ServiceRequest and Patient, status changes on the
program's referral Tasks, lab Observations and Appointments). Plain REST calls, as those systems would make.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import requests

FHIR_JSON = {"Content-Type": "application/fhir+json"}
# A code the test program takes (pull.referral_codes) and one it does not.
PEER_SUPPORT = {"system": "http://snomed.info/sct", "code": "103698003",
                "display": "Patient referral to non-physician provider"}
UNKNOWN_SERVICE = {"system": "http://snomed.info/sct", "code": "183524004", "display": "Referral to psychiatry service"}


@dataclass
class Clinic:
    """The EHR side: who it is, and what it wrote (names, phones and MRNs the PHI scan looks for)."""

    base_url: str
    mrn_system: str
    program_org_id: str
    names: list[str] = field(default_factory=list)
    phones: list[str] = field(default_factory=list)
    mrns: list[str] = field(default_factory=list)

    def create(self, resource: dict[str, Any]) -> dict[str, Any]:
        response = requests.post(f"{self.base_url}/{resource['resourceType']}", json=resource, headers=FHIR_JSON,
                                 timeout=60)
        response.raise_for_status()
        return response.json()

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        response = requests.get(f"{self.base_url}/{resource_type}/{resource_id}", timeout=60)
        response.raise_for_status()
        return response.json()

    def update(self, resource: dict[str, Any]) -> dict[str, Any]:
        response = requests.put(f"{self.base_url}/{resource['resourceType']}/{resource['id']}", json=resource,
                                headers=FHIR_JSON, timeout=60)
        response.raise_for_status()
        return response.json()

    def patient(self, *, mrn: str | None = None, language: str = "es") -> dict[str, Any]:
        """A Patient with a name, a phone and a preferred language (and an MRN in the clinic's system)."""
        tag = uuid.uuid4().hex[:6]
        given, family = f"Rosa{tag}", f"Delgado{tag}"
        phone = f"555-01{int(tag, 16) % 100:02d}-{tag[:4]}"
        self.names += [given, family]
        self.phones.append(phone)
        identifiers = []
        if mrn is not None:
            identifiers.append({"system": self.mrn_system, "value": mrn})
            self.mrns.append(mrn)
        return self.create({
            "resourceType": "Patient", "identifier": identifiers, "name": [{"given": [given], "family": family}],
            "telecom": [{"system": "phone", "value": phone, "use": "mobile"}],
            "communication": [{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": language}]},
                               "preferred": True}],
        })

    def clinician(self) -> dict[str, Any]:
        return self.create({"resourceType": "Practitioner",
                            "name": [{"given": ["Ana"], "family": "Ruiz", "prefix": ["Dr."]}]})

    def refer(self, patient: dict[str, Any] | None, *, code: dict[str, str] = PEER_SUPPORT,
              owner_id: str | None = None,
              reason: str = "HbA1c 9.1 %, needs self-management support") -> dict[str, Any]:
        """A referral from the clinic to the program: ServiceRequest + Task (status requested)."""
        doctor = self.clinician()
        subject = {"reference": f"Patient/{patient['id']}"} if patient else None
        request = self.create({
            "resourceType": "ServiceRequest", "status": "active", "intent": "order",
            "code": {"coding": [code]}, "subject": subject or {"display": "unknown"},
            "authoredOn": "2026-11-30", "requester": {"reference": f"Practitioner/{doctor['id']}"},
            "reasonCode": [{"text": reason}],
        })
        task: dict[str, Any] = {
            "resourceType": "Task", "status": "requested", "intent": "order",
            "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]},
            "focus": {"reference": f"ServiceRequest/{request['id']}"}, "authoredOn": "2026-11-30",
            "requester": {"reference": f"Practitioner/{doctor['id']}"},
            "owner": {"reference": f"Organization/{owner_id or self.program_org_id}"},
        }
        if subject:
            task["for"] = subject
        return self.create(task)

    def a1c(self, patient_id: str, value: float, when: str) -> dict[str, Any]:
        return self.create({
            "resourceType": "Observation", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "laboratory"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
            "subject": {"reference": f"Patient/{patient_id}"}, "effectiveDateTime": when,
            "valueQuantity": {"value": value, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"},
        })

    def weight(self, patient_id: str, kg: float, when: str) -> dict[str, Any]:
        return self.create({
            "resourceType": "Observation", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
            "subject": {"reference": f"Patient/{patient_id}"}, "effectiveDateTime": when,
            "valueQuantity": {"value": kg, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"},
        })

    def blood_pressure(self, patient_id: str, systolic: int, diastolic: int, when: str) -> dict[str, Any]:
        def part(code: str, value: int) -> dict[str, Any]:
            return {"code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                    "valueQuantity": {"value": value, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org",
                                      "code": "mm[Hg]"}}
        return self.create({
            "resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
            "subject": {"reference": f"Patient/{patient_id}"}, "effectiveDateTime": when,
            "component": [part("8480-6", systolic), part("8462-4", diastolic)],
        })

    def appointment(self, patient_id: str, start: str) -> dict[str, Any]:
        return self.create({
            "resourceType": "Appointment", "status": "booked", "start": start,
            "end": start.replace("T09:00", "T09:30"),
            "serviceType": [{"text": "Diabetes follow-up"}],
            "participant": [{"actor": {"reference": f"Patient/{patient_id}"}, "status": "accepted"}],
        })


def cbo_sets_status(clinic: Clinic, task_id: str, status: str, *, reason: str | None = None,
                    output: str | None = None) -> dict[str, Any]:
    """A community organization's platform moves one of the program's referral Tasks on."""
    task = clinic.read("Task", task_id)
    task["status"] = status
    task["lastModified"] = "2026-12-01T10:00:00+00:00"
    task.pop("meta", None)
    if reason:
        task["statusReason"] = {"text": reason}
    if output:
        task["output"] = [{"type": {"text": "service delivered"}, "valueString": output}]
    return clinic.update(task)
