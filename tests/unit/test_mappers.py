"""The mappers (connector.map) and the terminology files they draw on."""

from __future__ import annotations

import copy
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from connector import identifiers
from connector import map as mappers
from connector.identifiers import (
    KIND_CAREPLAN,
    KIND_CARETEAM,
    KIND_CBO,
    KIND_CONTACT,
    KIND_CONTACT_REQUEST,
    KIND_DEVICE,
    KIND_GOAL,
    KIND_ORGANIZATION,
    KIND_REFERRAL,
    KIND_REFERRAL_TASK,
    KIND_ROLE,
    KIND_STAFF,
    parse_conditional_reference,
)
from connector.map import (
    MappingContext,
    codes,
    map_cbo,
    map_contact,
    map_enrollment,
    map_goal,
    map_planned_contact,
    map_program,
    map_provenance,
    map_referral,
    map_supporter,
    terminology,
)
from connector.map.units import map_participant_units, participant_unit_keys
from connector.model import (
    Behavior,
    Contact,
    ContactMode,
    ContactOutcome,
    ContactSetting,
    Enrollment,
    EnrollmentStatus,
    EssentialElement,
    Goal,
    GoalAchievement,
    GoalLifecycle,
    GoalNote,
    GoalTarget,
    NeedCategory,
    PlannedContact,
    PlannedStatus,
    Referral,
    ReferralStatus,
    Supporter,
    SupporterTitle,
    SupportType,
    TargetMeasure,
)
from connector.read.profile import load_profile
from connector.read.program import read_program
from connector.read.staging import Staging
from tests.demogen import generate_program

CST = timezone(timedelta(hours=-6))
RECORDED = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)
MRN = "MRN-998877"
NAMES = ("Rosa", "Lopez", "Sam", "Reed")


@pytest.fixture
def ctx() -> MappingContext:
    return MappingContext(
        program_id="demo-program",
        program_name="Demo Diabetes Peer Support Program",
        base_url="https://fhir.demo-program.example.org/peer-support",
        mrn_system="urn:oid:2.16.840.1.113883.3.9999.1",
        timezone="America/Chicago",
        program_phone="+1-555-010-0000",
    )


def supporter(**kw: Any) -> Supporter:
    values = {
        "staff_id": "S01",
        "given_name": "Rosa",
        "family_name": "Lopez",
        "title": "promotora",
        "title_text": "Promotora de salud",
        "phone": "+1-555-010-0101",
    }
    return Supporter(**(values | kw))


def enrollment(**kw: Any) -> Enrollment:
    values = {"enrollment_id": "E0001", "mrn": MRN, "start_date": date(2025, 1, 6), "supporter_id": "S01"}
    return Enrollment(**(values | kw))


def goal(**kw: Any) -> Goal:
    values = {
        "goal_id": "G0001",
        "enrollment_id": "E0001",
        "description": "Walk after dinner",
        "behavior": "being-active",
        "start_date": date(2025, 1, 6),
    }
    return Goal(**(values | kw))


def contact(**kw: Any) -> Contact:
    values = {
        "contact_id": "C0001",
        "enrollment_id": "E0001",
        "supporter_id": "S01",
        "occurred_at": datetime(2025, 2, 10, 9, 5, tzinfo=CST),
        "mode": "telephone",
    }
    return Contact(**(values | kw))


def planned(**kw: Any) -> PlannedContact:
    values = {
        "planned_contact_id": "P0001",
        "enrollment_id": "E0001",
        "due_at": datetime(2025, 3, 1, 9, tzinfo=CST),
        "mode": "face-to-face",
    }
    return PlannedContact(**(values | kw))


def referral(**kw: Any) -> Referral:
    values = {
        "referral_id": "R0001",
        "enrollment_id": "E0001",
        "resource_name": "Northside Food Bank",
        "need": "food",
        "referred_on": date(2025, 2, 10),
    }
    return Referral(**(values | kw))


def full_participant(ctx: MappingContext) -> list[dict[str, Any]]:
    """Everything one participant produces, with every optional element filled somewhere."""
    e = enrollment(end_date=date(2025, 9, 1))
    s = supporter(email="rosa@example.org", npi="1234567893")
    goals = [
        goal(
            goal_id="G0001",
            behavior="monitoring",
            description="A1c < 7 <script>alert(1)</script> & more",
            target=GoalTarget(measure="hba1c", comparator="<", value=Decimal(7)),
            due_date=date(2025, 7, 1),
            achievement_status="improving",
            notes=(
                GoalNote(
                    note_id="N1", goal_id="G0001", noted_on=date(2025, 2, 1), text="down to 7.6", supporter_id="S01"
                ),
            ),
        ),
        goal(
            goal_id="G0002",
            target=GoalTarget(measure="steps-per-day", comparator=">=", value=Decimal(7000)),
            set_by="supporter",
        ),
        goal(
            goal_id="G0003",
            behavior="healthy-eating",
            due_date=date(2025, 4, 1),
            lifecycle_status="completed",
            achievement_status="achieved",
        ),
    ]
    plans = [planned(), planned(planned_contact_id="P0002", mode="text-message", status="dropped")]
    refs = [
        referral(resource_id="CBO-17", status="declined", outcome_notes="prefers her church pantry"),
        referral(referral_id="R0002", need="physical-activity", resource_name="YMCA DPP", status="accepted"),
    ]
    contacts = [
        contact(
            duration_minutes=25,
            setting="other",
            original_text={"setting": "laundromat"},
            support_types=("emotional", "other"),
            essential_elements=("ongoing-follow-up-support",),
            goal_ids=("G0001",),
            notes="talked <b>meals</b> & labs",
            planned_contact_id="P0001",
        ),
        contact(contact_id="C0002", outcome="not-reached"),
        contact(
            contact_id="C0003",
            mode="group",
            setting="faith-based",
            group_session_id="GS 1",
            duration_minutes=90,
            support_types=("education",),
        ),
        contact(contact_id="C0004", mode="text-message", void=True),
    ]
    out = map_program(ctx) + map_supporter(s, ctx)
    out += map_enrollment(
        e,
        goal_ids=[g.goal_id for g in goals],
        planned_contact_ids=[p.planned_contact_id for p in plans],
        referral_ids=[r.referral_id for r in refs],
        ctx=ctx,
        supporter=s,
    )
    out += [map_goal(g, e, ctx) for g in goals]
    out += [map_planned_contact(p, e, ctx) for p in plans]
    out += [map_contact(c, e, ctx) for c in contacts]
    for r in refs:
        out += map_referral(r, e, ctx)
        cbo = map_cbo(r, ctx)
        if cbo:
            out.append(cbo)
    targets = [
        ctx.ref(r["resourceType"], r["identifier"][0]["system"].rsplit("/", 1)[1], r["identifier"][0]["value"])[
            "reference"
        ]
        for r in out
    ]
    out.append(
        map_provenance(
            targets,
            activity="CREATE",
            author=ctx.ref("PractitionerRole", KIND_ROLE, "S01")["reference"],
            recorded=RECORDED,
            ctx=ctx,
            source_entities=["contact/C0001"],
        )
    )
    return out


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(path, value) of every node."""
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")


def references(resource: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (p, n["reference"]) for p, n in walk(resource) if isinstance(n, dict) and isinstance(n.get("reference"), str)
    ]


# -- every resource ------------------------------------------------------------------------------------------------


def test_full_participant_resource_types(ctx: MappingContext) -> None:
    types = sorted({r["resourceType"] for r in full_participant(ctx)})
    assert types == sorted(
        [
            "Organization",
            "Device",
            "Practitioner",
            "PractitionerRole",
            "CarePlan",
            "CareTeam",
            "Goal",
            "CommunicationRequest",
            "Communication",
            "ServiceRequest",
            "Task",
            "Provenance",
        ]
    )


def test_no_empty_elements(ctx: MappingContext) -> None:
    for r in full_participant(ctx):
        for path, value in walk(r):
            assert value is not None and value != "" and value != [] and value != {}, f"{r['resourceType']}{path}"


def test_business_identifier_on_every_resource_but_provenance(ctx: MappingContext) -> None:
    for r in full_participant(ctx):
        if r["resourceType"] == "Provenance":
            assert "identifier" not in r
            continue
        ident = r["identifier"][0]
        assert ident["use"] == "official"
        assert ident["system"].startswith(f"{ctx.base_url}/sid/{ctx.program_id}/")
        assert ident["assigner"] == {"display": ctx.program_name}
        assert all(ch.isalnum() or ch in "._-" for ch in ident["value"])


@pytest.mark.parametrize(
    ("resource_type", "kind"),
    [
        ("Organization", KIND_ORGANIZATION),
        ("Device", KIND_DEVICE),
        ("Practitioner", KIND_STAFF),
        ("PractitionerRole", KIND_ROLE),
        ("CarePlan", KIND_CAREPLAN),
        ("CareTeam", KIND_CARETEAM),
        ("Goal", KIND_GOAL),
        ("Communication", KIND_CONTACT),
        ("CommunicationRequest", KIND_CONTACT_REQUEST),
        ("ServiceRequest", KIND_REFERRAL),
        ("Task", KIND_REFERRAL_TASK),
    ],
)
def test_identifier_kinds(ctx: MappingContext, resource_type: str, kind: str) -> None:
    found = [r for r in full_participant(ctx) if r["resourceType"] == resource_type]
    assert found
    for r in found:
        assert r["identifier"][0]["system"] == ctx.system(kind) or (resource_type, r["identifier"][0]["system"]) == (
            "Organization",
            ctx.system(KIND_CBO),
        )


def test_careteam_participants_keep_invariant_ctm_1(ctx: MappingContext) -> None:
    """R4 ctm-1: onBehalfOf only when the member is a Practitioner (Medplum's validator refuses anything else)."""
    _, careteam = map_enrollment(enrollment(), goal_ids=[], planned_contact_ids=[], referral_ids=[], ctx=ctx)
    members = [parse_conditional_reference(p["member"]["reference"])[0] for p in careteam["participant"]]
    assert members == ["Patient", "PractitionerRole"]
    assert not [p for p in careteam["participant"] if "onBehalfOf" in p]


def test_careteam_and_careplan_share_the_enrollment_id_under_different_systems(ctx: MappingContext) -> None:
    careplan, careteam = map_enrollment(enrollment(), goal_ids=[], planned_contact_ids=[], referral_ids=[], ctx=ctx)
    assert careplan["identifier"][0]["value"] == careteam["identifier"][0]["value"] == "E0001"
    assert careplan["identifier"][0]["system"] != careteam["identifier"][0]["system"]


def test_no_phi_in_identifiers_ids_or_displays(ctx: MappingContext) -> None:
    for r in full_participant(ctx):
        for path, node in walk(r):
            if not isinstance(node, str):
                continue
            if path.startswith(".identifier") or path.endswith(".display") or path == ".id":
                assert MRN not in node, f"MRN in {r['resourceType']}{path}"
                if r["resourceType"] not in ("Practitioner",):
                    assert not any(n in node for n in NAMES), f"a name in {r['resourceType']}{path}"
        # the MRN only ever appears inside Patient references
        for path, node in walk(r):
            if isinstance(node, str) and MRN in node:
                assert path.endswith(".reference") and node.startswith("Patient?identifier="), path


def test_references_are_parseable_conditional_references(ctx: MappingContext) -> None:
    emitted = {
        (r["resourceType"], r["identifier"][0]["system"], r["identifier"][0]["value"])
        for r in full_participant(ctx)
        if "identifier" in r
    }
    for r in full_participant(ctx):
        for path, ref in references(r):
            parsed = parse_conditional_reference(ref)
            assert parsed is not None, f"{r['resourceType']}{path}: {ref}"
            if parsed[0] == "Patient":
                assert parsed[1:] == (ctx.mrn_system, MRN)
            else:
                # every reference points at something the mappers emit
                assert parsed in emitted, f"{r['resourceType']}{path} -> {ref}"


def test_meta_source_is_the_program_connector_uri(ctx: MappingContext) -> None:
    for r in full_participant(ctx):
        assert r["meta"] == {"source": f"{ctx.base_url}/peersync/{ctx.program_id}"}
        assert "#" not in r["meta"]["source"]


def test_mappers_are_pure(ctx: MappingContext) -> None:
    c = contact(support_types=("emotional",), goal_ids=("G1",))
    before = c.model_dump()
    first = map_contact(c, enrollment(), ctx)
    assert map_contact(c, enrollment(), ctx) == first
    assert c.model_dump() == before
    json.dumps(full_participant(ctx))  # plain JSON, no Decimals or datetimes left


def _placeholders(resource: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(resource)
    for _path, node in walk(out):
        if isinstance(node, dict) and isinstance(node.get("reference"), str):
            parsed = parse_conditional_reference(node["reference"])
            if parsed is not None:
                node["reference"] = f"{parsed[0]}/x"
    return out


def test_every_resource_validates_with_fhir_resources(ctx: MappingContext) -> None:
    for r in full_participant(ctx):
        model = get_fhir_model_class(r["resourceType"])
        model.model_validate(r)  # the R4B Reference model takes any string, conditional references included
        model.model_validate(_placeholders(r))


def test_public_api() -> None:
    assert set(mappers.__all__) == {
        "DEFAULT_TERMINOLOGY_BASE",
        "US_CORE_PROFILES",
        "MappingContext",
        "TeamMember",
        "map_cancelled_contact_request",
        "map_cbo",
        "map_contact",
        "map_contact_procedure",
        "map_enrollment",
        "map_goal",
        "map_planned_contact",
        "map_program",
        "map_provenance",
        "map_referral",
        "map_supporter",
        "resource_authors",
    }
    assert mappers.DEFAULT_TERMINOLOGY_BASE == "https://peersync.github.io/fhir"


# -- context -------------------------------------------------------------------------------------------------------


def test_context_helpers(ctx: MappingContext) -> None:
    assert ctx.system(KIND_GOAL) == "https://fhir.demo-program.example.org/peer-support/sid/demo-program/goal"
    assert ctx.ident(KIND_GOAL, "G 1") == {
        "use": "official",
        "system": ctx.system(KIND_GOAL),
        "value": identifiers.identifier_value("G 1"),
        "assigner": {"display": ctx.program_name},
    }
    assert ctx.ref("Goal", KIND_GOAL, "G|1") == {
        "reference": identifiers.conditional_reference(
            "Goal", ctx.system(KIND_GOAL), identifiers.identifier_value("G|1")
        )
    }
    assert ctx.patient_ref(enrollment(mrn_system="urn:other")) == {"reference": f"Patient?identifier=urn:other|{MRN}"}
    with pytest.raises(AttributeError):
        ctx.program_id = "x"  # type: ignore[misc]


def test_context_from_profile() -> None:
    from connector.read.profile import load_profile

    ctx = MappingContext.from_profile(load_profile("peersync-template"), program_phone="+1")
    assert ctx.program_id == "demo-program" and ctx.timezone == "America/Chicago" and ctx.program_phone == "+1"


# -- program and supporters ----------------------------------------------------------------------------------------


def test_program_organization_and_device(ctx: MappingContext) -> None:
    org, device = map_program(ctx)
    assert org["resourceType"] == "Organization" and org["active"] is True and org["name"] == ctx.program_name
    assert org["telecom"] == [{"system": "phone", "value": "+1-555-010-0000", "use": "work"}]
    assert device["version"] == [{"value": ctx.connector_version}]
    assert parse_conditional_reference(device["owner"]["reference"]) == (
        "Organization",
        ctx.system(KIND_ORGANIZATION),
        ctx.program_id,
    )


@pytest.mark.parametrize(
    ("title", "nucc"),
    [
        (SupporterTitle.COMMUNITY_HEALTH_WORKER, "172V00000X"),
        (SupporterTitle.PROMOTORA, "172V00000X"),
        (SupporterTitle.LAY_HEALTH_WORKER, "172V00000X"),
        (SupporterTitle.OTHER, "172V00000X"),
        (SupporterTitle.PEER_COACH, "175T00000X"),
        (SupporterTitle.PEER_LEADER, "175T00000X"),
        (SupporterTitle.PEER_MENTOR, "175T00000X"),
    ],
)
def test_supporter_role_taxonomy(ctx: MappingContext, title: SupporterTitle, nucc: str) -> None:
    _, role = map_supporter(supporter(title=title, title_text=None), ctx)
    code = role["code"][0]
    assert code["coding"][0] == {"system": codes.NUCC, "code": nucc, "display": codes.TITLE_TAXONOMY[title]["display"]}
    assert code["coding"][1]["code"] == title.value
    assert code["text"] == terminology.display("peer-supporter-title", title.value)
    assert role["specialty"] == [{"coding": [code["coding"][0]]}]


def test_supporter_practitioner_and_role(ctx: MappingContext) -> None:
    practitioner, role = map_supporter(supporter(email="r@example.org", npi="1234567893"), ctx)
    assert practitioner["name"] == [{"use": "official", "family": "Lopez", "given": ["Rosa"]}]
    assert practitioner["identifier"][1] == {"use": "official", "system": codes.NPI, "value": "1234567893"}
    assert [t["system"] for t in practitioner["telecom"]] == ["phone", "email"]
    assert role["code"][0]["text"] == "Promotora de salud"
    assert role["telecom"] == practitioner["telecom"]
    assert parse_conditional_reference(role["practitioner"]["reference"])[1:] == (ctx.system(KIND_STAFF), "S01")


def test_supporter_title_other_keeps_source_text(ctx: MappingContext) -> None:
    _, role = map_supporter(supporter(title="other", title_text=None, original_text={"title": "navegadora"}), ctx)
    assert role["code"][0]["text"] == "navegadora"


def test_supporter_telecom_falls_back_to_program_phone(ctx: MappingContext) -> None:
    practitioner, role = map_supporter(supporter(phone=None, active=False), ctx)
    assert "telecom" not in practitioner
    assert role["telecom"] == [{"system": "phone", "value": ctx.program_phone, "use": "work"}]
    assert role["active"] is False and practitioner["active"] is False


def test_supporter_without_any_telecom_omits_it(ctx: MappingContext) -> None:
    no_phone = MappingContext(**{**_fields(ctx), "program_phone": None})
    _, role = map_supporter(supporter(phone=None), no_phone)
    assert "telecom" not in role  # pd-1 then fails: documented in docs/field-coverage.md


def _fields(ctx: MappingContext) -> dict[str, Any]:
    return {f: getattr(ctx, f) for f in ctx.__dataclass_fields__}


# -- enrollment: CarePlan + CareTeam -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "careplan", "careteam"),
    [
        (EnrollmentStatus.ACTIVE, "active", "active"),
        (EnrollmentStatus.ON_HOLD, "on-hold", "suspended"),
        (EnrollmentStatus.COMPLETED, "completed", "inactive"),
        (EnrollmentStatus.WITHDRAWN, "revoked", "inactive"),
    ],
)
def test_enrollment_status(ctx: MappingContext, status: EnrollmentStatus, careplan: str, careteam: str) -> None:
    cp, ct = map_enrollment(enrollment(status=status), goal_ids=[], planned_contact_ids=[], referral_ids=[], ctx=ctx)
    assert (cp["status"], ct["status"]) == (careplan, careteam)
    cp, ct = map_enrollment(
        enrollment(status=status, void=True), goal_ids=[], planned_contact_ids=[], referral_ids=[], ctx=ctx
    )
    assert cp["status"] == ct["status"] == "entered-in-error"


def test_careplan_elements(ctx: MappingContext) -> None:
    cp, _ = map_enrollment(
        enrollment(end_date=date(2025, 9, 1)),
        goal_ids=["G1", "G2"],
        planned_contact_ids=["P1"],
        referral_ids=["R1"],
        ctx=ctx,
    )
    assert cp["intent"] == "plan"
    assert cp["category"][0] == {"coding": [codes.CAREPLAN_ASSESS_PLAN]}
    assert cp["category"][1]["coding"][0]["code"] == "698360004"
    assert cp["category"][2]["coding"][0] == {
        "system": "https://peersync.github.io/fhir/CodeSystem/careplan-kind",
        "code": "peer-support-plan",
        "display": "Peer support plan",
    }
    assert cp["period"] == {"start": "2025-01-06", "end": "2025-09-01"}
    assert [parse_conditional_reference(g["reference"])[2] for g in cp["goal"]] == ["G1", "G2"]
    assert [parse_conditional_reference(a["reference"]["reference"])[0] for a in cp["activity"]] == [
        "CommunicationRequest",
        "ServiceRequest",
    ]
    assert "detail" not in json.dumps(cp["activity"])  # MCC: activities are references only
    assert "author" not in cp  # MCC: discouraged (removed in R5); custodian and contributor instead
    (custodian,) = cp["extension"]
    assert custodian["url"] == "http://hl7.org/fhir/us/mcc/StructureDefinition/custodian"
    assert parse_conditional_reference(custodian["valueReference"]["reference"])[0] == "Organization"
    assert [parse_conditional_reference(c["reference"])[0] for c in cp["contributor"]] == [
        "Organization", "PractitionerRole"]
    assert parse_conditional_reference(cp["careTeam"][0]["reference"])[1] == ctx.system(KIND_CARETEAM)
    assert "addresses" not in cp  # no Conditions found: nothing is invented


def test_careplan_links_performed_contacts_as_activity_outcomes(ctx: MappingContext) -> None:
    cp, _ = map_enrollment(
        enrollment(), goal_ids=[], planned_contact_ids=["P1", "P2"], referral_ids=["R1"], ctx=ctx,
        performed_contacts=[("C1", "P1"), ("C2", None), ("C3", "P-gone"), ("C4", "P1")],
    )
    planned_1, planned_2, referral, unplanned = cp["activity"]
    ids = [parse_conditional_reference(r["reference"])[1:] for r in planned_1["outcomeReference"]]
    assert ids == [(ctx.system("contact"), "C1"), (ctx.system("contact"), "C4")]
    assert "outcomeReference" not in planned_2 and "outcomeReference" not in referral
    # contacts without a (sent) planned contact: one activity that holds only their outcomes
    assert set(unplanned) == {"outcomeReference"}
    assert [parse_conditional_reference(r["reference"])[2] for r in unplanned["outcomeReference"]] == ["C2", "C3"]
    assert all(parse_conditional_reference(r["reference"])[0] == "Communication" for r in unplanned["outcomeReference"])
    procedures = MappingContext(**{**_fields(ctx), "contact_procedures": "instead"})
    cp, _ = map_enrollment(enrollment(), goal_ids=[], planned_contact_ids=[], referral_ids=[], ctx=procedures,
                           performed_contacts=[("C2", None)])
    (ref,) = cp["activity"][0]["outcomeReference"]
    assert parse_conditional_reference(ref["reference"])[:2] == ("Procedure", ctx.system("contact-procedure"))


def test_careplan_contributors_and_addressed_conditions(ctx: MappingContext) -> None:
    cp, _ = map_enrollment(
        enrollment(supporter_id="S1"), goal_ids=[], planned_contact_ids=[], referral_ids=[], ctx=ctx,
        contributor_ids=["S2", "S1", "S3"], condition_refs=["Condition/7", "Condition/9"],
    )
    roles = [parse_conditional_reference(c["reference"])[2] for c in cp["contributor"][1:]]
    assert roles == ["S1", "S2", "S3"]  # the enrollment's supporter first, each once
    assert cp["addresses"] == [{"reference": "Condition/7"}, {"reference": "Condition/9"}]


def test_careplan_narrative_escapes_source_text_and_has_no_phi(ctx: MappingContext) -> None:
    evil = MappingContext(**{**_fields(ctx), "program_name": "Salud <script>alert('x')</script> & Vida"})
    long_words = "Walk after dinner with my granddaughter every single evening, then work up to 7000 steps a day"
    cp, _ = map_enrollment(
        enrollment(enrollment_id="E<1>&"), goal_ids=["G<b>", "G&2"], planned_contact_ids=[], referral_ids=[], ctx=evil,
        goal_words={"G<b>": "Bajar <b>mi</b> A1c & más", "G&2": long_words},
    )
    div = cp["text"]["div"]
    assert cp["text"]["status"] == "generated"
    assert "<script>" not in div and "&lt;script&gt;" in div and "&amp; Vida" in div
    assert "E&lt;1&gt;" not in div and "G&lt;b&gt;" not in div  # no internal ids: a clinician cannot use them
    root = ET.fromstring(div)  # well-formed XHTML
    assert root.tag == "{http://www.w3.org/1999/xhtml}div"
    text = "".join(root.itertext())
    assert "Goals: 2: “Bajar <b>mi</b> A1c & más”; “Walk after dinner with my granddaughter every single…”" in text
    assert MRN not in div and not any(n in div for n in NAMES)


def test_careteam_participants(ctx: MappingContext) -> None:
    _, ct = map_enrollment(
        enrollment(),
        goal_ids=[],
        planned_contact_ids=[],
        referral_ids=[],
        ctx=ctx,
        supporter=supporter(title="peer-coach", title_text="Coach"),
    )
    patient, peer = ct["participant"]
    assert patient["role"][0]["coding"][0] == {"system": codes.SNOMED, "code": "116154003", "display": "Patient"}
    assert parse_conditional_reference(patient["member"]["reference"])[0] == "Patient"
    assert peer["role"][0]["coding"][0]["code"] == "175T00000X" and peer["role"][0]["text"] == "Coach"
    assert parse_conditional_reference(peer["member"]["reference"])[:2] == ("PractitionerRole", ctx.system(KIND_ROLE))
    assert ct["name"] == "Diabetes peer support team"
    assert parse_conditional_reference(ct["managingOrganization"][0]["reference"])[0] == "Organization"
    _, ct = map_enrollment(enrollment(), goal_ids=[], planned_contact_ids=[], referral_ids=[], ctx=ctx)
    assert ct["participant"][1]["role"] == [{"text": "Peer supporter"}]


# -- goal ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", list(GoalLifecycle))
def test_goal_lifecycle(ctx: MappingContext, status: GoalLifecycle) -> None:
    assert map_goal(goal(lifecycle_status=status), enrollment(), ctx)["lifecycleStatus"] == status.value
    assert (
        map_goal(goal(lifecycle_status=status, void=True), enrollment(), ctx)["lifecycleStatus"] == "entered-in-error"
    )


@pytest.mark.parametrize(("named", "reference"), [
    ("Observation/a1c-7", "Observation/a1c-7"), ("a1c-7", "Observation/a1c-7"), (None, None)])
def test_goal_outcome_is_only_the_result_the_program_names(ctx: MappingContext, named: str | None,
                                                          reference: str | None) -> None:
    mapped = map_goal(goal(outcome_observation=named, lifecycle_status=GoalLifecycle.COMPLETED,
                           achievement_status=GoalAchievement.NOT_ACHIEVED), enrollment(), ctx)
    assert mapped.get("outcomeReference") == ([{"reference": reference}] if reference else None)
    assert ("linked result" in mapped["text"]["div"]) is bool(reference)
    assert "outcomeReference" not in map_goal(goal(outcome_observation=named, void=True), enrollment(), ctx)


@pytest.mark.parametrize("bad", ["Patient/1", "https://ehr.example/Observation/1", "Observation/", "a b"])
def test_goal_outcome_observation_must_be_an_observation_id(bad: str) -> None:
    with pytest.raises(ValidationError):
        goal(outcome_observation=bad)


@pytest.mark.parametrize("achievement", list(GoalAchievement))
def test_goal_achievement(ctx: MappingContext, achievement: GoalAchievement) -> None:
    coding = map_goal(goal(achievement_status=achievement), enrollment(), ctx)["achievementStatus"]["coding"][0]
    assert coding["system"] == codes.GOAL_ACHIEVEMENT and coding["code"] == achievement.value and coding["display"]


@pytest.mark.parametrize("behavior", list(Behavior))
def test_goal_categories(ctx: MappingContext, behavior: Behavior) -> None:
    category = map_goal(goal(behavior=behavior), enrollment(), ctx)["category"]
    hl7 = category[0]["coding"][0]["code"]
    assert hl7 == ("dietary" if behavior is Behavior.HEALTHY_EATING else "behavioral")
    assert category[1]["coding"][0]["code"] == behavior.value
    has_pa = any(c["coding"][0]["code"] == "PhysicalActivity" for c in category)
    assert has_pa == (behavior is Behavior.BEING_ACTIVE)


@pytest.mark.parametrize(
    ("measure", "unit", "loinc", "ucum"),
    [
        (TargetMeasure.HBA1C, None, "4548-4", "%"),
        (TargetMeasure.HBA1C, "mmol/mol", "59261-8", "mmol/mol"),
        (TargetMeasure.STEPS_PER_DAY, None, "41950-7", "/d"),
        (TargetMeasure.ACTIVITY_MINUTES_PER_WEEK, None, "82290-8", "min/wk"),
        (TargetMeasure.ACTIVE_DAYS_PER_WEEK, None, "89555-7", "d/wk"),
        (TargetMeasure.BODY_WEIGHT, None, "29463-7", "kg"),
        (TargetMeasure.BODY_WEIGHT, "lb", "29463-7", "[lb_av]"),
        (TargetMeasure.FASTING_GLUCOSE, None, "1558-6", "mg/dL"),
        (TargetMeasure.FASTING_GLUCOSE, "mmol/L", "14771-0", "mmol/L"),
    ],
)
def test_goal_target_codes(
    ctx: MappingContext, measure: TargetMeasure, unit: str | None, loinc: str, ucum: str
) -> None:
    g = goal(
        target=GoalTarget(measure=measure, comparator=">=", value=Decimal("6.5"), unit=unit), due_date=date(2025, 6, 1)
    )
    target = map_goal(g, enrollment(), ctx)["target"]
    assert len(target) == 1
    assert target[0]["measure"]["coding"][0]["system"] == codes.LOINC
    assert target[0]["measure"]["coding"][0]["code"] == loinc
    q = target[0]["detailQuantity"]
    assert q["value"] == 6.5 and q["comparator"] == ">=" and q["system"] == codes.UCUM and q["code"] == ucum
    assert target[0]["dueDate"] == "2025-06-01"


def test_goal_target_equal_has_no_comparator_and_integral_values_stay_integers(ctx: MappingContext) -> None:
    q = map_goal(goal(target=GoalTarget(measure="steps-per-day", value=Decimal(7000))), enrollment(), ctx)["target"][
        0
    ]["detailQuantity"]
    assert "comparator" not in q and q["value"] == 7000 and isinstance(q["value"], int)


def test_goal_target_unknown_unit_is_kept_uncoded(ctx: MappingContext) -> None:
    q = map_goal(goal(target=GoalTarget(measure="body-weight", value=Decimal(80), unit="stone")), enrollment(), ctx)[
        "target"
    ][0]["detailQuantity"]
    assert q == {"value": 80, "unit": "stone"}


def test_goal_gol_1(ctx: MappingContext) -> None:
    """gol-1: a target with detail[x] has a measure; a due date alone is a legal target."""
    for r in full_participant(ctx):
        for t in r.get("target", []) if r["resourceType"] == "Goal" else []:
            if any(k.startswith("detail") for k in t):
                assert "measure" in t
    only_due = map_goal(goal(due_date=date(2025, 5, 1)), enrollment(), ctx)
    assert only_due["target"] == [{"dueDate": "2025-05-01"}]
    assert "target" not in map_goal(goal(), enrollment(), ctx)


def test_goal_elements(ctx: MappingContext) -> None:
    notes = (
        GoalNote(note_id="N2", goal_id="G0001", noted_on=date(2025, 3, 1), text="second", supporter_id="S01"),
        GoalNote(note_id="N1", goal_id="G0001", noted_on=date(2025, 2, 1), text="first"),
        GoalNote(note_id="N3", goal_id="G0001", noted_on=date(2025, 4, 1), text="voided", void=True),
    )
    r = map_goal(goal(description="Caminar <más> & comer bien", notes=notes), enrollment(), ctx)
    assert r["description"] == {"text": "Caminar <más> & comer bien"}
    assert r["startDate"] == "2025-01-06"
    assert "statusDate" not in r  # the source recorded no status date: a note date is not one
    assert map_goal(goal(status_date=date(2025, 3, 2)), enrollment(), ctx)["statusDate"] == "2025-03-02"
    assert [n["text"] for n in r["note"]] == ["first", "second"]
    assert "authorReference" not in r["note"][0]
    # Annotation.author cannot be a PractitionerRole in R4: the Practitioner
    assert parse_conditional_reference(r["note"][1]["authorReference"]["reference"])[:2] == (
        "Practitioner",
        ctx.system(KIND_STAFF),
    )
    assert r["note"][1]["time"] == "2025-03-01"


@pytest.mark.parametrize(
    ("set_by", "expected"), [("participant", "Patient"), ("together", "Patient"), ("supporter", "PractitionerRole")]
)
def test_goal_expressed_by(ctx: MappingContext, set_by: str, expected: str) -> None:
    ref = map_goal(goal(set_by=set_by, supporter_id="S09"), enrollment(), ctx)["expressedBy"]["reference"]
    parsed = parse_conditional_reference(ref)
    assert parsed[0] == expected
    if expected == "PractitionerRole":
        assert parsed[2] == "S09"


# -- contact -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "void", "status"),
    [
        (ContactOutcome.COMPLETED, False, "completed"),
        (ContactOutcome.NOT_REACHED, False, "not-done"),
        (ContactOutcome.CANCELLED, False, "not-done"),
        (ContactOutcome.COMPLETED, True, "entered-in-error"),
        (ContactOutcome.NOT_REACHED, True, "entered-in-error"),
    ],
)
def test_contact_status(ctx: MappingContext, outcome: ContactOutcome, void: bool, status: str) -> None:
    r = map_contact(contact(outcome=outcome, void=void), enrollment(), ctx)
    assert r["status"] == status
    if status == "not-done":
        assert r["statusReason"]["text"]
        assert "received" not in r
        # an attempt has its time; a cancelled contact was never attempted (its planned time is on its request)
        assert r.get("sent") == (None if outcome is ContactOutcome.CANCELLED else "2025-02-10T09:05:00-06:00")
    else:
        assert "statusReason" not in r


def test_contact_not_reached_reason(ctx: MappingContext) -> None:
    reason = map_contact(contact(outcome="not-reached"), enrollment(), ctx)["statusReason"]
    assert reason["coding"][0]["code"] == "recipient-unavailable"


@pytest.mark.parametrize(
    ("mode", "v3", "local"),
    [
        (ContactMode.FACE_TO_FACE, ["FACE"], None),
        (ContactMode.TELEPHONE, ["PHONE"], None),
        (ContactMode.VIDEO, ["VIDEOCONF"], None),
        (ContactMode.TEXT_MESSAGE, ["ONLINEWRIT"], "sms"),
        (ContactMode.EMAIL, ["EMAILWRIT"], None),
        (ContactMode.GROUP, [], "group"),
    ],
)
def test_contact_medium(ctx: MappingContext, mode: ContactMode, v3: list[str], local: str | None) -> None:
    (medium,) = map_contact(contact(mode=mode), enrollment(), ctx)["medium"]
    assert [c["code"] for c in medium["coding"] if c["system"] == codes.V3_PARTICIPATION_MODE] == v3
    ours = [c for c in medium["coding"] if c["system"] == ctx.code_system("peer-contact-mode")]
    assert [c["code"] for c in ours] == ([local] if local else [])
    assert all(c.get("display") for c in medium["coding"]) and medium["text"]


def test_contact_received_only_for_synchronous_completed_contacts(ctx: MappingContext) -> None:
    assert map_contact(contact(mode="video"), enrollment(), ctx)["received"] == "2025-02-10T09:05:00-06:00"
    assert "received" not in map_contact(contact(mode="email"), enrollment(), ctx)
    assert "received" not in map_contact(contact(mode="text-message"), enrollment(), ctx)


def test_contact_elements(ctx: MappingContext) -> None:
    c = contact(
        duration_minutes=25,
        setting="other",
        original_text={"setting": "laundromat", "support_types": "groceries"},
        support_types=("emotional", "other", "emotional"),
        essential_elements=("ongoing-follow-up-support",),
        goal_ids=("G1", "G2"),
        notes="meals & <labs>",
        planned_contact_id="P1",
        group_session_id="GS 1",
    )
    r = map_contact(c, enrollment(), ctx)
    assert [cat["coding"][0]["code"] for cat in r["category"]] == ["emotional", "other", "ongoing-follow-up-support"]
    assert r["category"][0] == {
        "coding": [
            {"system": ctx.code_system("peer-support-type"), "code": "emotional", "display": "Emotional support"}
        ],
        "text": "Emotional support",
    }
    assert r["category"][1]["text"] == "groceries"  # original text of a code mapped to "other"
    assert r["topic"]["coding"][0] == {
        "system": codes.COMMUNICATION_TOPIC,
        "code": "progress-update",
        "display": "Progress Update",
    }
    assert [parse_conditional_reference(a["reference"])[0] for a in r["about"]] == ["Goal", "Goal", "CarePlan"]
    assert [parse_conditional_reference(b["reference"])[0] for b in r["basedOn"]] == [
        "CarePlan",
        "CommunicationRequest",
    ]
    assert parse_conditional_reference(r["sender"]["reference"])[0] == "PractitionerRole"
    assert parse_conditional_reference(r["subject"]["reference"])[0] == "Patient"
    assert r["recipient"] == [r["subject"]]
    assert r["note"][0]["text"] == "meals \\& \\<labs\\>"  # markdown: the source's markup shows as written
    assert parse_conditional_reference(r["note"][0]["authorReference"]["reference"])[0] == "Practitioner"
    ext = {e["url"].rsplit("/", 1)[1]: e for e in r["extension"]}
    assert ext["contact-duration"]["valueDuration"] == {"value": 25, "unit": "min", "system": codes.UCUM, "code": "min"}
    assert ext["contact-setting"]["valueCodeableConcept"]["coding"][0]["code"] == "other"
    assert ext["contact-setting"]["valueCodeableConcept"]["text"] == "laundromat"
    assert ext["group-session"]["valueIdentifier"] == {"system": ctx.system("group-session"), "value": "GS_201"}
    assert all(e["url"].startswith(f"{ctx.terminology_base}/StructureDefinition/") for e in r["extension"])


def test_contact_minimal_has_no_optional_elements(ctx: MappingContext) -> None:
    r = map_contact(contact(), enrollment(), ctx)
    for absent in ("extension", "category", "note", "statusReason"):
        assert absent not in r
    assert [parse_conditional_reference(a["reference"])[0] for a in r["about"]] == ["CarePlan"]


def test_contact_every_setting_and_support_code_exists(ctx: MappingContext) -> None:
    for setting in ContactSetting:
        map_contact(contact(setting=setting), enrollment(), ctx)
    map_contact(
        contact(support_types=tuple(SupportType), essential_elements=tuple(EssentialElement)), enrollment(), ctx
    )


# -- planned contact -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [(PlannedStatus.PLANNED, "active"), (PlannedStatus.DONE, "completed"), (PlannedStatus.DROPPED, "revoked")],
)
def test_planned_contact_status(ctx: MappingContext, status: PlannedStatus, expected: str) -> None:
    assert map_planned_contact(planned(status=status), enrollment(), ctx)["status"] == expected
    assert map_planned_contact(planned(status=status, void=True), enrollment(), ctx)["status"] == "entered-in-error"


def test_planned_contact_elements(ctx: MappingContext) -> None:
    r = map_planned_contact(planned(mode="text-message", supporter_id="S07"), enrollment(), ctx)
    assert r["occurrenceDateTime"] == "2025-03-01T09:00:00-06:00"
    assert [c["code"] for c in r["medium"][0]["coding"]] == ["ONLINEWRIT", "sms"]
    assert parse_conditional_reference(r["requester"]["reference"])[2] == "S07"
    assert parse_conditional_reference(r["basedOn"][0]["reference"])[0] == "CarePlan"
    assert parse_conditional_reference(r["recipient"][0]["reference"])[0] == "Patient"
    assert "intent" not in r  # R4 CommunicationRequest has no intent
    # no supporter named: the program asked for it, not the enrollment's supporter by default
    r = map_planned_contact(planned(), enrollment(supporter_id="S05"), ctx)
    assert r["requester"] == r["sender"] == ctx.organization_ref()


# -- referral ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "sr", "task", "reason"),
    [
        (ReferralStatus.MADE, "active", "requested", False),
        (ReferralStatus.ACCEPTED, "active", "accepted", False),
        (ReferralStatus.COMPLETED, "completed", "completed", False),
        (ReferralStatus.DECLINED, "revoked", "rejected", True),
        (ReferralStatus.PARTICIPANT_DECLINED, "revoked", "cancelled", True),
        (ReferralStatus.CANCELLED, "revoked", "cancelled", True),
    ],
)
def test_referral_status(ctx: MappingContext, status: ReferralStatus, sr: str, task: str, reason: bool) -> None:
    service_request, t = map_referral(referral(status=status), enrollment(), ctx)
    assert (service_request["status"], t["status"]) == (sr, task)
    assert ("statusReason" in t) == reason
    if reason:
        assert t["statusReason"]["text"]
    service_request, t = map_referral(referral(status=status, void=True), enrollment(), ctx)
    assert service_request["status"] == t["status"] == "entered-in-error" and "statusReason" not in t


@pytest.mark.parametrize("need", list(NeedCategory))
def test_referral_codes(ctx: MappingContext, need: NeedCategory) -> None:
    sr, _ = map_referral(referral(need=need), enrollment(), ctx)
    systems = [c["coding"][0]["system"] for c in sr["category"]]
    # a need-level code only where it is true for every referral of the need (mappings/referral-codes.yaml)
    specific = {NeedCategory.PHYSICAL_ACTIVITY: "390893007"}
    if need is NeedCategory.PHYSICAL_ACTIVITY:
        assert systems == [codes.PA_TEMPORARY_CODES, ctx.code_system("referral-need")]
    else:
        assert systems == [codes.US_CORE_CATEGORY, codes.SNOMED, codes.SDOHCC_TEMPORARY_CODES,
                           ctx.code_system("referral-need")]
        assert sr["category"][0]["coding"][0]["code"] == "sdoh"
        assert sr["category"][1]["coding"][0]["code"] == "410606002"  # US Core ServiceRequest category
    # else the generic social service procedure, true of any community referral
    assert sr["code"]["coding"][0]["code"] == specific.get(need, "410606002")
    assert sr["reasonCode"][0]["coding"][0]["code"] == need.value
    assert sr["code"]["coding"][0]["system"] == codes.SNOMED  # US Core Procedure Codes: 1..1
    assert sr["category"][-1]["coding"][0]["code"] == need.value


def test_referral_elements_with_cbo(ctx: MappingContext) -> None:
    r = referral(
        resource_id="CBO-17",
        supporter_id="S03",
        status="declined",
        outcome_notes="too far",
        need="other",
        original_text={"need": "legal help"},
    )
    sr, task = map_referral(r, enrollment(), ctx)
    assert sr["intent"] == "order" and sr["authoredOn"] == "2025-02-10"
    assert sr["category"][-1]["text"] == "legal help"
    assert sr["code"]["text"] == "Referral to Northside Food Bank"
    performer = sr["performer"][0]
    assert parse_conditional_reference(performer["reference"]) == ("Organization", ctx.system(KIND_CBO), "CBO-17")
    assert performer["display"] == "Northside Food Bank"
    assert parse_conditional_reference(sr["requester"]["reference"])[2] == "S03"
    assert task["intent"] == "order"
    assert task["code"] == {
        "coding": [
            {
                "system": "http://hl7.org/fhir/CodeSystem/task-code",
                "code": "fulfill",
                "display": "Fulfill the focal request",
            }
        ]
    }
    assert parse_conditional_reference(task["focus"]["reference"]) == (
        "ServiceRequest",
        ctx.system(KIND_REFERRAL),
        "R0001",
    )
    assert parse_conditional_reference(task["for"]["reference"])[0] == "Patient"
    assert task["owner"] == performer and task["requester"] == sr["requester"]
    assert task["note"] == [{"text": "too far"}]
    cbo = map_cbo(r, ctx)
    assert cbo["identifier"][0]["system"] == ctx.system(KIND_CBO) and cbo["name"] == "Northside Food Bank"


def test_referral_without_cbo(ctx: MappingContext) -> None:
    r = referral()
    sr, task = map_referral(r, enrollment(), ctx)
    assert sr["performer"] == [{"display": "Northside Food Bank"}]
    assert task["owner"] == {"display": "Northside Food Bank"}
    # no supporter named: the program Organization requested it (never the enrollment's supporter by default)
    assert sr["requester"] == task["requester"] == ctx.organization_ref()
    assert map_cbo(r, ctx) is None


# -- provenance ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("activity", "display"), [("CREATE", "create"), ("UPDATE", "revise"), ("NULLIFY", "nullify")])
def test_provenance(ctx: MappingContext, activity: str, display: str) -> None:
    p = map_provenance(
        ["urn:uuid:a", "Goal/1"],
        activity=activity,
        author="PractitionerRole/7",
        recorded=RECORDED,
        ctx=ctx,
        source_entities=["contact/C1", "urn:sys|v1"],
    )
    assert "identifier" not in p
    assert p["target"] == [{"reference": "urn:uuid:a"}, {"reference": "Goal/1"}]
    assert p["recorded"] == "2026-01-15T12:00:00+00:00"
    assert p["activity"]["coding"][0] == {"system": codes.V3_DATA_OPERATION, "code": activity, "display": display}
    author, transmitter = p["agent"]
    assert author["type"]["coding"][0]["code"] == "author"
    assert author["who"] == {"reference": "PractitionerRole/7"}
    assert parse_conditional_reference(author["onBehalfOf"]["reference"])[0] == "Organization"
    assert transmitter["type"]["coding"][0] == {
        "system": codes.US_CORE_PROVENANCE_PARTICIPANT_TYPE,
        "code": "transmitter",
        "display": "Transmitter",
    }
    assert parse_conditional_reference(transmitter["who"]["reference"])[0] == "Device"
    assert transmitter["onBehalfOf"] == author["onBehalfOf"]  # provenance-1
    assert p["entity"] == [
        {"role": "source", "what": {"identifier": {"system": ctx.system("source-record"), "value": "contact/C1"}}},
        {"role": "source", "what": {"identifier": {"system": "urn:sys", "value": "v1"}}},
    ]


def test_provenance_without_author_and_naive_time(ctx: MappingContext) -> None:
    p = map_provenance(["Goal/1"], activity="CREATE", author=None, recorded=datetime(2026, 1, 15, 6, 0), ctx=ctx)
    assert p["recorded"] == "2026-01-15T06:00:00-06:00"  # naive times are read in the program's zone
    assert parse_conditional_reference(p["agent"][0]["who"]["reference"])[0] == "Organization"
    assert "entity" not in p
    with pytest.raises(ValueError):
        map_provenance([], activity="CREATE", author=None, recorded=RECORDED, ctx=ctx)


# -- terminology ---------------------------------------------------------------------------------------------------


def test_terminology_files() -> None:
    resources = terminology.load_terminology()
    by_id = {(r["resourceType"], r["id"]): r for r in resources}
    for cs_id in (
        "peer-support-essential-element",
        "peer-support-type",
        "adces7-behavior",
        "peer-supporter-title",
        "peer-contact-mode",
        "peer-contact-setting",
        "careplan-kind",
        "referral-need",
    ):
        cs = by_id[("CodeSystem", cs_id)]
        assert cs["url"] == f"https://peersync.github.io/fhir/CodeSystem/{cs_id}"
        assert (
            cs["status"] == "active" and cs["version"] and cs["content"] == "complete" and cs["caseSensitive"] is True
        )
        assert cs["count"] == len(cs["concept"])
        assert all(c["display"] and c["definition"] for c in cs["concept"])
    for sd_id in ("contact-duration", "contact-setting", "group-session"):
        sd = by_id[("StructureDefinition", sd_id)]
        assert sd["url"] == f"https://peersync.github.io/fhir/StructureDefinition/{sd_id}"
        assert sd["status"] == "active" and sd["version"] and sd["type"] == "Extension"
        assert sd["context"] == [{"type": "element", "expression": "Communication"}]
        fixed = [e for e in sd["differential"]["element"] if e["path"] == "Extension.url"]
        assert fixed[0]["fixedUri"] == sd["url"]
    for r in resources:
        assert r["status"] == "active" and r["url"].startswith("https://peersync.github.io/fhir/")


def test_support_types_carry_their_essential_element() -> None:
    cs = terminology.code_systems()
    for code, concept in cs["peer-support-type"].items():
        props = concept.get("property", [])
        if code == "other":
            assert not props
            continue
        (prop,) = props
        assert prop["code"] == "essential-element"
        assert prop["valueCoding"]["code"] in cs["peer-support-essential-element"]
        assert prop["valueCoding"]["display"] == terminology.display(
            "peer-support-essential-element", prop["valueCoding"]["code"]
        )


@pytest.mark.parametrize(
    ("cs_id", "enum"),
    [
        ("peer-support-essential-element", EssentialElement),
        ("peer-support-type", SupportType),
        ("adces7-behavior", Behavior),
        ("peer-supporter-title", SupporterTitle),
        ("peer-contact-setting", ContactSetting),
        ("referral-need", NeedCategory),
    ],
)
def test_every_source_code_is_in_its_code_system(cs_id: str, enum: type) -> None:
    assert set(terminology.code_systems()[cs_id]) == {m.value for m in enum}


def test_terminology_display_errors() -> None:
    assert terminology.display("adces7-behavior", "being-active") == "Being active"
    with pytest.raises(KeyError):
        terminology.display("adces7-behavior", "sleeping")


def test_terminology_bundle() -> None:
    resources = terminology.load_terminology()
    bundle = terminology.terminology_bundle(resources)
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    assert len(bundle["entry"]) == len(resources)
    entry = next(e for e in bundle["entry"] if e["resource"]["id"] == "adces7-behavior")
    assert entry["request"] == {
        "method": "PUT",
        "url": "CodeSystem?url=https%3A%2F%2Fpeersync.github.io%2Ffhir%2FCodeSystem%2Fadces7-behavior",
    }
    assert entry["fullUrl"].startswith("urn:uuid:")
    assert terminology.terminology_bundle(resources) == bundle  # deterministic


def test_terminology_is_a_versioned_package_with_publisher_contact_and_copyright() -> None:
    manifest = terminology.load_package_manifest()
    assert manifest["canonical"] == "https://peersync.github.io/fhir" and manifest["fhirVersions"] == ["4.0.1"]
    for r in terminology.load_terminology():
        assert r["version"] == manifest["version"]
        assert r["publisher"] == "peersync project"
        assert r["contact"][0]["telecom"][0]["value"] == "https://github.com/peersync/peersync"
        assert r["copyright"]
    adces7 = next(r for r in terminology.load_terminology() if r["id"] == "adces7-behavior")
    assert "Association of Diabetes Care & Education Specialists" in adces7["copyright"]


def test_terminology_load_errors(tmp_path: Any) -> None:
    with pytest.raises(terminology.TerminologyError):
        terminology.load_terminology(tmp_path)
    folder = tmp_path / "terminology"
    folder.mkdir()
    with pytest.raises(terminology.TerminologyError, match=r"package\.json"):  # not a package
        terminology.load_terminology(tmp_path)
    shipped = terminology.load_package_manifest()
    (folder / "package.json").write_text(json.dumps(shipped | {"canonical": "https://fhir.example.org/ps"}))
    with pytest.raises(terminology.TerminologyError, match="one canonical base"):
        terminology.load_terminology(tmp_path)
    (folder / "package.json").write_text(json.dumps(shipped))
    (folder / "x.json").write_text('{"resourceType": "Patient"}')
    with pytest.raises(terminology.TerminologyError):
        terminology.load_terminology(tmp_path)
    moved = {"resourceType": "CodeSystem", "id": "x", "url": "https://fhir.example.org/ps/CodeSystem/x",
             "version": shipped["version"]}
    (folder / "x.json").write_text(json.dumps(moved))
    with pytest.raises(terminology.TerminologyError, match=re.escape("is not https://peersync.github.io/fhir/CodeSystem/x")):
        terminology.load_terminology(tmp_path)
    (folder / "x.json").write_text(json.dumps(moved | {"url": "https://peersync.github.io/fhir/CodeSystem/x",
                                                       "version": "0.1"}))
    with pytest.raises(terminology.TerminologyError, match="not the package's"):
        terminology.load_terminology(tmp_path)


def test_mapped_local_codings_use_the_one_canonical_base() -> None:
    ctx = MappingContext(program_id="p", program_name="P", base_url="https://x.example/ps", mrn_system="urn:m")
    r = map_contact(contact(setting="home", support_types=("emotional",)), enrollment(), ctx)
    assert r["category"][0]["coding"][0]["system"] == "https://peersync.github.io/fhir/CodeSystem/peer-support-type"
    assert r["extension"][0]["url"] == "https://peersync.github.io/fhir/StructureDefinition/contact-setting"
    with pytest.raises(TypeError):  # a deployment cannot choose another base
        MappingContext(program_id="p", program_name="P", base_url="https://x.example/ps", mrn_system="urn:m",
                       terminology_base="https://fhir.example.org/ps")  # type: ignore[call-arg]


def _mapped_program(profile_name: str, inputs: list[Path]) -> Iterator[dict[str, Any]]:
    """Every resource one program's input maps to (read, then each participant's units)."""
    profile = load_profile(profile_name)
    map_ctx = MappingContext.from_profile(profile)
    with Staging() as staging:
        read_program(profile, inputs, staging)
        for participant in staging.participants():
            for unit in map_participant_units(staging, participant, participant_unit_keys(staging, participant),
                                              map_ctx):
                yield from unit.resources


@pytest.mark.parametrize(("profile_name", "fmt", "seed"), [
    ("peersync-template", "template", 20260101), ("peersync-template", "template", 7),
    ("redcap-example", "redcap", 20260101), ("redcap-example", "redcap", 11),
])
def test_mapped_programs_are_compact_all_the_way_down(tmp_path: Path, profile_name: str, fmt: Any, seed: int) -> None:
    """resource() compacts only the top level: nested elements must come out of the mappers without empties."""
    generate_program(tmp_path, participants=25, seed=seed, fmt=fmt)
    count = 0
    for r in _mapped_program(profile_name, [tmp_path]):
        count += 1
        for path, value in walk(r):
            assert value is not None and value != "" and value != [] and value != {}, f"{r['resourceType']}{path}"
    assert count > 200


def test_the_profile_carries_the_program_phone_and_config_overrides_it() -> None:
    profile = load_profile("examples/sheets-es")
    assert profile.program.phone
    from_profile = MappingContext.from_profile(profile)
    assert from_profile.program_phone == profile.program.phone
    _, role = map_supporter(supporter(phone=None, email=None), from_profile)
    assert role["telecom"] == [{"system": "phone", "value": profile.program.phone, "use": "work"}]  # pd-1 holds
    overridden = MappingContext.from_profile(profile, program_phone="+1-555-010-9999")
    assert overridden.program_phone == "+1-555-010-9999"


def test_a_goal_set_together_records_each_persons_acceptance(ctx: MappingContext) -> None:
    together = map_goal(goal(set_by="together", supporter_id="S09"), enrollment(), ctx)
    acceptances = [
        {part["url"]: part.get("valueReference", part.get("valueCode")) for part in ext["extension"]}
        for ext in together["extension"]
        if ext["url"] == "http://hl7.org/fhir/StructureDefinition/goal-acceptance"
    ]
    assert [parse_conditional_reference(a["individual"]["reference"])[0] for a in acceptances] == [
        "Patient", "Practitioner"]
    assert parse_conditional_reference(acceptances[1]["individual"]["reference"])[2] == "S09"
    assert {a["status"] for a in acceptances} == {"agree"}
    assert parse_conditional_reference(together["expressedBy"]["reference"])[0] == "Patient"
    for alone in ("participant", "supporter"):
        assert "extension" not in map_goal(goal(set_by=alone, supporter_id="S09"), enrollment(), ctx)
