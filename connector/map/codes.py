"""Code systems, codes and mapping tables used by the mappers.

External codes carry their display here (checked against the sources named in docs/fhir-mapping.md);
peersync's own codes take their display from ``mappings/terminology/`` via :mod:`connector.map.terminology`.
"""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from typing import Any

import yaml

from connector import assets
from connector.map import terminology
from connector.model import (
    Behavior,
    ContactMode,
    ContactSetting,
    EnrollmentStatus,
    EssentialElement,
    GoalSetBy,
    NeedCategory,
    PlannedStatus,
    ReferralStatus,
    SupporterTitle,
    SupportType,
    TargetMeasure,
)

from .context import MappingContext, code_system_url

# -- systems ---------------------------------------------------------------------------------------------------------
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
NUCC = "http://nucc.org/provider-taxonomy"
NPI = "http://hl7.org/fhir/sid/us-npi"
V3_PARTICIPATION_MODE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationMode"
V3_DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
GOAL_CATEGORY = "http://terminology.hl7.org/CodeSystem/goal-category"
GOAL_ACHIEVEMENT = "http://terminology.hl7.org/CodeSystem/goal-achievement"
COMMUNICATION_TOPIC = "http://terminology.hl7.org/CodeSystem/communication-topic"
COMMUNICATION_NOT_DONE_REASON = "http://terminology.hl7.org/CodeSystem/communication-not-done-reason"
PROVENANCE_PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
ORGANIZATION_TYPE = "http://terminology.hl7.org/CodeSystem/organization-type"
TASK_CODE = "http://hl7.org/fhir/CodeSystem/task-code"
US_CORE_CAREPLAN_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/careplan-category"
US_CORE_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/us-core-category"
US_CORE_PROVENANCE_PARTICIPANT_TYPE = "http://hl7.org/fhir/us/core/CodeSystem/us-core-provenance-participant-type"
SDOHCC_TEMPORARY_CODES = "http://hl7.org/fhir/us/sdoh-clinicalcare/CodeSystem/SDOHCC-CodeSystemTemporaryCodes"
PA_TEMPORARY_CODES = "http://hl7.org/fhir/us/physical-activity/CodeSystem/pa-temporary-codes"

# -- our CodeSystem ids (files mappings/terminology/CodeSystem-{id}.json) ---------------------------------------------
CS_ESSENTIAL_ELEMENT = "peer-support-essential-element"
CS_SUPPORT_TYPE = "peer-support-type"
CS_ADCES7 = "adces7-behavior"
CS_SUPPORTER_TITLE = "peer-supporter-title"
CS_CONTACT_MODE = "peer-contact-mode"
CS_CONTACT_SETTING = "peer-contact-setting"
CS_CAREPLAN_KIND = "careplan-kind"
CS_REFERRAL_NEED = "referral-need"
CS_PEER_SUPPORT_ACTIVITY = "peer-support-activity"

# Source vocabularies written as codes of ours: the terminology files must define every value.
SOURCE_CODE_SYSTEMS: dict[str, type[StrEnum]] = {
    CS_ESSENTIAL_ELEMENT: EssentialElement,
    CS_SUPPORT_TYPE: SupportType,
    CS_ADCES7: Behavior,
    CS_SUPPORTER_TITLE: SupporterTitle,
    CS_CONTACT_SETTING: ContactSetting,
    CS_REFERRAL_NEED: NeedCategory,
}


def undefined_codes() -> list[str]:
    """``system#code`` for each source value the terminology files do not define (mapping it would fail).

    Raises :class:`~connector.map.terminology.TerminologyError` when the files cannot be read at all.
    """
    defined = terminology.code_systems()
    return [f"{cs_id}#{member.value}" for cs_id, enum in SOURCE_CODE_SYSTEMS.items()
            for member in enum if member.value not in defined.get(cs_id, {})]


# -- our extensions --------------------------------------------------------------------------------------------------
EXT_CONTACT_DURATION = "contact-duration"
EXT_CONTACT_SETTING = "contact-setting"
EXT_GROUP_SESSION = "group-session"
PERTAINS_TO_GOAL = "http://hl7.org/fhir/StructureDefinition/resource-pertainsToGoal"

# Identifier kind of group sessions (a value of the group-session extension, not a resource of ours).
KIND_GROUP_SESSION = "group-session"

# US Core 6.1.0 profiles of the resources we emit (for validation; we do not claim them in meta.profile).
US_CORE_PROFILES: dict[str, str] = {
    t: f"http://hl7.org/fhir/us/core/StructureDefinition/us-core-{t.lower()}"
    for t in (
        "CarePlan",
        "CareTeam",
        "DocumentReference",
        "Goal",
        "Organization",
        "Practitioner",
        "PractitionerRole",
        "Procedure",
        "Provenance",
        "ServiceRequest",
    )
}


def coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    """A Coding (display only when given)."""
    out = {"system": system, "code": code}
    if display:
        out["display"] = display
    return out


def local_coding(ctx: MappingContext, cs_id: str, code: str) -> dict[str, Any]:
    """A Coding from one of our CodeSystems, display from the terminology files."""
    system, display = _system_and_display(cs_id, code)
    return {"system": system, "code": code, "display": display}


@lru_cache(maxsize=4096)
def _system_and_display(cs_id: str, code: str) -> tuple[str, str]:
    # cached: a contact carries several of our codes, from a few hundred in all (not keyed on the context:
    # hashing it on every call cost more than the look-up saved)
    return code_system_url(cs_id), terminology.display(cs_id, code)


def local_concept(ctx: MappingContext, cs_id: str, code: str, text: str | None = None) -> dict[str, Any]:
    """A CodeableConcept with one of our codes; ``text`` defaults to the display (EHRs don't know our codes)."""
    c = local_coding(ctx, cs_id, code)
    return {"coding": [c], "text": text or c["display"]}


# -- statuses --------------------------------------------------------------------------------------------------------
CAREPLAN_STATUS = {
    EnrollmentStatus.ACTIVE: "active",
    EnrollmentStatus.ON_HOLD: "on-hold",
    EnrollmentStatus.COMPLETED: "completed",
    EnrollmentStatus.WITHDRAWN: "revoked",
    EnrollmentStatus.DECLINED: "revoked",
    EnrollmentStatus.NOT_REACHED: "revoked",
}
CARETEAM_STATUS = {
    EnrollmentStatus.ACTIVE: "active",
    EnrollmentStatus.ON_HOLD: "suspended",
    EnrollmentStatus.COMPLETED: "inactive",
    EnrollmentStatus.WITHDRAWN: "inactive",
    EnrollmentStatus.DECLINED: "inactive",
    EnrollmentStatus.NOT_REACHED: "inactive",
}
COMMUNICATION_REQUEST_STATUS = {
    PlannedStatus.PLANNED: "active",
    PlannedStatus.DONE: "completed",
    PlannedStatus.DROPPED: "revoked",
}
SERVICE_REQUEST_STATUS = {
    ReferralStatus.MADE: "active",
    ReferralStatus.ACCEPTED: "active",
    ReferralStatus.COMPLETED: "completed",
    ReferralStatus.DECLINED: "revoked",
    ReferralStatus.PARTICIPANT_DECLINED: "revoked",
    ReferralStatus.CANCELLED: "revoked",
}
# SDOHCC Task: `rejected` is the performer (the community organization) declining; a participant who declines
# cancels the request, which the requester's side records as `cancelled` with the reason.
TASK_STATUS = {
    ReferralStatus.MADE: "requested",
    ReferralStatus.ACCEPTED: "accepted",
    ReferralStatus.COMPLETED: "completed",
    ReferralStatus.DECLINED: "rejected",
    ReferralStatus.PARTICIPANT_DECLINED: "cancelled",
    ReferralStatus.CANCELLED: "cancelled",
}
# SNOMED CT 1296859006 "Procedure declined (situation)", active since the 2023-12-01 International release; it took
# the place of 183944003 "Procedure refused", no longer active (SNOMED naming: "<procedure> declined (situation)").
# HL7 US Quality Core codes a declined Task's statusReason with it (docs/fhir-modeling-corrections.md).
SNOMED_PROCEDURE_DECLINED = coding(SNOMED, "1296859006", "Procedure declined")
# our referral-status-reason code: the same reason on clinic-referral Tasks (connector/pull/answers.py)
CS_REFERRAL_STATUS_REASON = "referral-status-reason"
PARTICIPANT_DECLINED_REASON = "participant-declined"
# SDOHCC asks for statusReason.text on rejected and cancelled Tasks; the participant's refusal is also coded.
TASK_STATUS_REASON_TEXT: dict[ReferralStatus, str] = {
    ReferralStatus.DECLINED: "Declined by the community organization",
    ReferralStatus.PARTICIPANT_DECLINED: "Declined by the participant",
    ReferralStatus.CANCELLED: "Referral cancelled before the service was delivered",
}


def task_status_reason(status: ReferralStatus, ctx: MappingContext) -> dict[str, Any] | None:
    """A referral Task's statusReason: text for every ended-without-service status; a participant's refusal also
    coded, with our referral-status-reason code (as on clinic-referral Tasks) and the SNOMED CT one."""
    text = TASK_STATUS_REASON_TEXT.get(status)
    if text is None:
        return None
    if status is ReferralStatus.PARTICIPANT_DECLINED:
        ours = local_coding(ctx, CS_REFERRAL_STATUS_REASON, PARTICIPANT_DECLINED_REASON)
        return {"coding": [ours, dict(SNOMED_PROCEDURE_DECLINED)], "text": text}
    return {"text": text}
# Task.businessStatus: the program's own status, in its words.
TASK_BUSINESS_STATUS = {
    ReferralStatus.MADE: "Referral made",
    ReferralStatus.ACCEPTED: "Accepted by the community organization",
    ReferralStatus.COMPLETED: "Service received",
    ReferralStatus.DECLINED: "Declined by the community organization",
    ReferralStatus.PARTICIPANT_DECLINED: "Declined by the participant",
    ReferralStatus.CANCELLED: "Cancelled",
}
ENTERED_IN_ERROR = "entered-in-error"

# -- supporter titles → NUCC provider taxonomy (fhir-modeling.md §4) -------------------------------------------------
NUCC_CHW = coding(NUCC, "172V00000X", "Community Health Worker")
NUCC_PEER_SPECIALIST = coding(NUCC, "175T00000X", "Peer Specialist")
TITLE_TAXONOMY = {
    SupporterTitle.COMMUNITY_HEALTH_WORKER: NUCC_CHW,
    SupporterTitle.PROMOTORA: NUCC_CHW,
    SupporterTitle.LAY_HEALTH_WORKER: NUCC_CHW,
    SupporterTitle.OTHER: NUCC_CHW,
    SupporterTitle.PEER_COACH: NUCC_PEER_SPECIALIST,
    SupporterTitle.PEER_LEADER: NUCC_PEER_SPECIALIST,
    SupporterTitle.PEER_MENTOR: NUCC_PEER_SPECIALIST,
}

# -- CarePlan / CareTeam ---------------------------------------------------------------------------------------------
CAREPLAN_ASSESS_PLAN = coding(US_CORE_CAREPLAN_CATEGORY, "assess-plan", "Assessment and Plan of Treatment")
SNOMED_DIABETES_SM_PLAN = coding(SNOMED, "698360004", "Diabetes self management plan")
SNOMED_PATIENT = coding(SNOMED, "116154003", "Patient")
# R4 care-team-category (LOINC answer list LL3112-8): a team that coordinates care over time
CARETEAM_LONGITUDINAL = coding(LOINC, "LA28865-6", "Longitudinal care-coordination focused care team")

# -- Goal ------------------------------------------------------------------------------------------------------------
GOAL_ACHIEVEMENT_DISPLAY = {
    "in-progress": "In Progress",
    "improving": "Improving",
    "worsening": "Worsening",
    "no-change": "No Change",
    "achieved": "Achieved",
    "sustaining": "Sustaining",
    "not-achieved": "Not Achieved",
    "no-progress": "No Progress",
    "not-attainable": "Not Attainable",
}
GOAL_CATEGORY_DIETARY = coding(GOAL_CATEGORY, "dietary", "Dietary")
GOAL_CATEGORY_BEHAVIORAL = coding(GOAL_CATEGORY, "behavioral", "Behavioral")
PA_PHYSICAL_ACTIVITY = coding(PA_TEMPORARY_CODES, "PhysicalActivity", "Physical Activity")
BEHAVIOR_GOAL_CATEGORY = {b: GOAL_CATEGORY_BEHAVIORAL for b in Behavior} | {
    Behavior.HEALTHY_EATING: GOAL_CATEGORY_DIETARY
}
# who expressed the goal: the Patient unless the supporter proposed it alone
EXPRESSED_BY_SUPPORTER = frozenset({GoalSetBy.SUPPORTER})

# Goal targets: measure → {unit alias → (LOINC code, LOINC display, UCUM code, human unit)}; the first unit is the
# default. LOINC 4548-4 is HbA1c as a mass fraction (%); the IFCC scale (mmol/mol) has its own code, 59261-8.
_HBA1C_PCT = ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", "%")
_HBA1C_IFCC = ("59261-8", "Hemoglobin A1c/Hemoglobin.total in Blood by IFCC protocol", "mmol/mol", "mmol/mol")
_STEPS = ("41950-7", "Number of steps in 24 hour Measured", "/d", "steps per day")
_MIN_WK = ("82290-8", "Frequency of moderate to vigorous aerobic physical activity", "min/wk", "minutes per week")
_D_WK = (
    "89555-7",
    "How many days per week did you engage in moderate to strenuous physical activity in the last 30 days",
    "d/wk",
    "days per week",
)
_WEIGHT_KG = ("29463-7", "Body weight", "kg", "kg")
_WEIGHT_LB = ("29463-7", "Body weight", "[lb_av]", "lb")
_GLUCOSE_MG = ("1558-6", "Fasting glucose [Mass/volume] in Serum or Plasma", "mg/dL", "mg/dL")
_GLUCOSE_MMOL = ("14771-0", "Fasting glucose [Moles/volume] in Serum or Plasma", "mmol/L", "mmol/L")
TARGET_UNITS: dict[TargetMeasure, dict[str, tuple[str, str, str, str]]] = {
    TargetMeasure.HBA1C: {"%": _HBA1C_PCT, "percent": _HBA1C_PCT, "mmol/mol": _HBA1C_IFCC},
    TargetMeasure.STEPS_PER_DAY: {
        "/d": _STEPS,
        "steps/day": _STEPS,
        "steps per day": _STEPS,
        "{steps}/d": _STEPS,
        "steps": _STEPS,
    },
    TargetMeasure.ACTIVITY_MINUTES_PER_WEEK: {
        "min/wk": _MIN_WK,
        "minutes/week": _MIN_WK,
        "minutes per week": _MIN_WK,
        "min/week": _MIN_WK,
    },
    TargetMeasure.ACTIVE_DAYS_PER_WEEK: {"d/wk": _D_WK, "days/week": _D_WK, "days per week": _D_WK},
    TargetMeasure.BODY_WEIGHT: {
        "kg": _WEIGHT_KG,
        "lb": _WEIGHT_LB,
        "lbs": _WEIGHT_LB,
        "[lb_av]": _WEIGHT_LB,
        "pounds": _WEIGHT_LB,
    },
    TargetMeasure.FASTING_GLUCOSE: {
        "mg/dL": _GLUCOSE_MG,
        "mg/dl": _GLUCOSE_MG,
        "mmol/L": _GLUCOSE_MMOL,
        "mmol/l": _GLUCOSE_MMOL,
    },
}

# -- Communication ---------------------------------------------------------------------------------------------------
MODE_FACE = coding(V3_PARTICIPATION_MODE, "FACE", "face-to-face")
MODE_PHONE = coding(V3_PARTICIPATION_MODE, "PHONE", "telephone")
MODE_VIDEO = coding(V3_PARTICIPATION_MODE, "VIDEOCONF", "videoconferencing")
MODE_ONLINE_WRITTEN = coding(V3_PARTICIPATION_MODE, "ONLINEWRIT", "online written")
MODE_EMAIL = coding(V3_PARTICIPATION_MODE, "EMAILWRIT", "email")
# contact mode → (v3 codings, our peer-contact-mode code or None, text); R4's v3 list has no SMS and no group code
CONTACT_MODE: dict[ContactMode, tuple[tuple[dict[str, Any], ...], str | None, str]] = {
    ContactMode.FACE_TO_FACE: ((MODE_FACE,), None, "Face to face"),
    ContactMode.TELEPHONE: ((MODE_PHONE,), None, "Telephone"),
    ContactMode.VIDEO: ((MODE_VIDEO,), None, "Video call"),
    ContactMode.TEXT_MESSAGE: ((MODE_ONLINE_WRITTEN,), "sms", "Text message"),
    ContactMode.EMAIL: ((MODE_EMAIL,), None, "Email"),
    ContactMode.GROUP: ((), "group", "Group session"),
}
# modes in which sender and recipient are together in time: `received` = `sent`
SYNCHRONOUS_MODES = frozenset({ContactMode.FACE_TO_FACE, ContactMode.TELEPHONE, ContactMode.VIDEO, ContactMode.GROUP})
TOPIC_PROGRESS_UPDATE = coding(COMMUNICATION_TOPIC, "progress-update", "Progress Update")
NOT_DONE_RECIPIENT_UNAVAILABLE = coding(COMMUNICATION_NOT_DONE_REASON, "recipient-unavailable", "Recipient Unavailable")

# -- referrals (fhir-modeling.md §6) ---------------------------------------------------------------------------------
US_CORE_SDOH = coding(US_CORE_CATEGORY, "sdoh", "SDOH")
# display as the US Core 6.1 ServiceRequest category value set lists it (the validator checks it there)
SNOMED_SOCIAL_SERVICE = coding(SNOMED, "410606002", "Social service procedure (procedure)")
# FHIR R4 procedure-category value set (SNOMED CT): the standard code beside a support type, where one means the same
SNOMED_EDUCATION = coding(SNOMED, "409073007", "Education")
SUPPORT_TYPE_STANDARD = {SupportType.EDUCATION: SNOMED_EDUCATION}
# Broader SNOMED CT encounter codes beside our peer-support-contact code on a contact's Procedure (field-coverage.md):
# 185317003 (NHS interaction-type vocabulary; eCQM value sets), 439708006 (VSAC eCQM "Home Healthcare Services",
# 2.16.840.1.113883.3.464.1003.101.12.1016, display "Home visit (procedure)").
SNOMED_TELEPHONE_ENCOUNTER = coding(SNOMED, "185317003", "Telephone encounter")
SNOMED_HOME_VISIT = coding(SNOMED, "439708006", "Home visit")
# need → SDOHCC category (physical activity has none: it uses the PA IG category instead)
NEED_SDOHCC = {
    NeedCategory.FOOD: coding(SDOHCC_TEMPORARY_CODES, "food-insecurity", "Food Insecurity"),
    NeedCategory.HOUSING: coding(SDOHCC_TEMPORARY_CODES, "housing-instability", "Housing Instability"),
    NeedCategory.TRANSPORTATION: coding(
        SDOHCC_TEMPORARY_CODES, "transportation-insecurity", "Transportation Insecurity"
    ),
    NeedCategory.SOCIAL_CONNECTION: coding(SDOHCC_TEMPORARY_CODES, "social-connection", "Social Connection"),
    NeedCategory.STRESS: coding(SDOHCC_TEMPORARY_CODES, "stress", "Stress"),
    NeedCategory.FINANCIAL: coding(SDOHCC_TEMPORARY_CODES, "financial-insecurity", "Financial Insecurity"),
    NeedCategory.MEDICATION_ACCESS: coding(
        SDOHCC_TEMPORARY_CODES, "sdoh-category-unspecified", "SDOH Category Unspecified"
    ),
    NeedCategory.OTHER: coding(SDOHCC_TEMPORARY_CODES, "sdoh-category-unspecified", "SDOH Category Unspecified"),
}
REFERRAL_CODES_FILE = "referral-codes.yaml"


@lru_cache(maxsize=1)
def shipped_referral_codes() -> dict[str, dict[str, str]]:
    """need → {system, code, display}: the shipped table ``mappings/referral-codes.yaml``."""
    path = assets.mappings_dir() / REFERRAL_CODES_FILE
    try:
        table = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise terminology.TerminologyError(f"cannot read the referral code table {path}: {exc}") from exc
    return {need: coding(str(c["system"]), str(c["code"]), str(c["display"])) for need, c in table.items()}


def referral_service_code(need: NeedCategory, ctx: MappingContext, resource_id: str | None = None) -> dict[str, Any]:
    """ServiceRequest.code's coding for a referral: the profile's code for its community resource (what the program
    states that resource provides), else the profile's code for its need, else the shipped table's (a code true for
    every referral of that need), else SNOMED CT "Social service procedure" (true of any community referral)."""
    if resource_id is not None:
        for override_resource, system, code, display in ctx.referral_resource_codes:
            if override_resource == resource_id:
                return coding(system, code, display)
    for override_need, system, code, display in ctx.referral_codes:
        if override_need == need.value:
            return coding(system, code, display)
    return dict(shipped_referral_codes().get(need.value, SNOMED_SOCIAL_SERVICE))


SDOHCC_RESULTING_ACTIVITY = coding(SDOHCC_TEMPORARY_CODES, "resulting-activity", "Resulting Activity")
TASK_FULFILL = coding(TASK_CODE, "fulfill", "Fulfill the focal request")
ORG_TYPE_COMMUNITY_GROUP = coding(ORGANIZATION_TYPE, "cg", "Community Group")

# -- Provenance ------------------------------------------------------------------------------------------------------
PROVENANCE_ACTIVITY = {
    "CREATE": coding(V3_DATA_OPERATION, "CREATE", "create"),
    "UPDATE": coding(V3_DATA_OPERATION, "UPDATE", "revise"),
    "NULLIFY": coding(V3_DATA_OPERATION, "NULLIFY", "nullify"),
}
PROVENANCE_AUTHOR = coding(PROVENANCE_PARTICIPANT_TYPE, "author", "Author")
PROVENANCE_TRANSMITTER = coding(US_CORE_PROVENANCE_PARTICIPANT_TYPE, "transmitter", "Transmitter")
