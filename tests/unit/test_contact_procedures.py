"""Contacts as US Core Procedures (connector/map/procedure.py) and the `[server] contact_procedures` switch."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from connector.identifiers import parse_conditional_reference
from connector.map import MappingContext, map_contact, map_contact_procedure
from connector.map.codes import PERTAINS_TO_GOAL, SNOMED
from connector.map.units import contact_resources
from connector.model import Contact, Enrollment, RecordKind
from connector.ops.config import ServerSettings
from connector.plan.planner import program_fingerprint
from connector.write.writer import UPDATED_TYPES, updated_types

CST = timezone(timedelta(hours=-6))


def context(**kw: Any) -> MappingContext:
    return MappingContext(program_id="demo", program_name="Demo", base_url="https://ps.example.org",
                          mrn_system="urn:mrn", timezone="America/Chicago", **kw)


def enrollment() -> Enrollment:
    return Enrollment(enrollment_id="E1", mrn="MRN1", start_date=datetime(2025, 1, 6, tzinfo=UTC).date(),
                      supporter_id="S1")


def contact(**kw: Any) -> Contact:
    values = {"contact_id": "C1", "enrollment_id": "E1", "supporter_id": "S2", "mode": "telephone",
              "occurred_at": datetime(2025, 2, 10, 9, 5, tzinfo=CST)}
    return Contact(**(values | kw))


def test_a_completed_contact_with_a_duration_is_a_completed_procedure_with_a_period() -> None:
    ctx = context()
    p = map_contact_procedure(contact(duration_minutes=25, goal_ids=("G1", "G2", "G1"), notes="walked"),
                              enrollment(), ctx)
    assert p["resourceType"] == "Procedure" and p["status"] == "completed" and "statusReason" not in p
    assert p["identifier"][0]["system"] == ctx.system("contact-procedure")
    assert p["performedPeriod"] == {"start": "2025-02-10T09:05:00-06:00", "end": "2025-02-10T09:30:00-06:00"}
    assert parse_conditional_reference(p["basedOn"][0]["reference"])[:2] == ("CarePlan", ctx.system("careplan"))
    (performer,) = p["performer"]
    assert parse_conditional_reference(performer["actor"]["reference"])[1:] == (ctx.system("role"), "S2")
    assert parse_conditional_reference(performer["onBehalfOf"]["reference"])[0] == "Organization"
    # R4 reasonReference cannot target a Goal: each goal once, through the core pertainsToGoal extension
    assert [e["url"] for e in p["extension"]] == [PERTAINS_TO_GOAL] * 2
    assert [parse_conditional_reference(e["valueReference"]["reference"])[2] for e in p["extension"]] == ["G1", "G2"]
    assert p["code"]["coding"][0]["code"] == "peer-support-contact" and p["code"]["text"] == "Peer support contact"
    assert p["note"][0]["text"] == "walked"


def test_without_a_duration_the_time_is_a_date_time() -> None:
    p = map_contact_procedure(contact(), enrollment(), context())
    assert p["performedDateTime"] == "2025-02-10T09:05:00-06:00" and "performedPeriod" not in p


@pytest.mark.parametrize(("outcome", "reason"), [("not-reached", "Participant not reached"),
                                                 ("cancelled", "Contact cancelled")])
def test_a_contact_that_did_not_take_place_is_not_done_without_a_performed_time(outcome: str, reason: str) -> None:
    p = map_contact_procedure(contact(outcome=outcome, duration_minutes=10), enrollment(), context())
    assert p["status"] == "not-done" and p["statusReason"] == {"text": reason}
    assert not any(k.startswith("performed") for k in p)


def test_a_voided_contact_is_an_entered_in_error_procedure() -> None:
    p = map_contact_procedure(contact(void=True, outcome="not-reached"), enrollment(), context())
    assert p["status"] == "entered-in-error" and "statusReason" not in p


@pytest.mark.parametrize(("support", "code"), [
    (("community-linkage", "education"), "410606002"),  # linkage first: a social service procedure
    (("education",), "409073007"),
    (("skills-training", "emotional"), "409073007"),
    (("emotional", "follow-up"), None),  # no verified standard code: no category rather than a guess
])
def test_category_only_where_a_verified_code_fits(support: tuple[str, ...], code: str | None) -> None:
    p = map_contact_procedure(contact(support_types=support), enrollment(), context())
    if code is None:
        assert "category" not in p
    else:
        assert p["category"]["coding"] == [{"system": SNOMED, "code": code,
                                            "display": {"410606002": "Social service procedure (procedure)",
                                                        "409073007": "Education"}[code]}]


@pytest.mark.parametrize(("mode", "setting", "standard"), [
    ("telephone", None, ("185317003", "Telephone encounter")),
    ("face-to-face", "home", ("439708006", "Home visit")),
    ("face-to-face", "clinic", None),  # not a home visit, and no verified code for the rest
    ("video", "home", None),  # at home, but not a visit
    ("text-message", None, None),
])
def test_a_broader_snomed_encounter_code_sits_beside_ours_only_where_true(
        mode: str, setting: str | None, standard: tuple[str, str] | None) -> None:
    p = map_contact_procedure(contact(mode=mode, setting=setting), enrollment(), context())
    assert p["code"]["coding"][0]["code"] == "peer-support-contact" and p["code"]["text"] == "Peer support contact"
    extra = [(c["code"], c["display"]) for c in p["code"]["coding"][1:]]
    assert extra == ([standard] if standard else [])
    assert all(c["system"] == SNOMED for c in p["code"]["coding"][1:])


def test_the_communication_category_carries_snomed_education_beside_our_code() -> None:
    r = map_contact(contact(support_types=("education", "emotional")), enrollment(), context())
    education, emotional = r["category"]
    assert [c["system"].rsplit("/", 1)[-1] for c in education["coding"]] == ["peer-support-type", "sct"]
    assert education["coding"][1] == {"system": SNOMED, "code": "409073007", "display": "Education"}
    assert len(emotional["coding"]) == 1


@pytest.mark.parametrize(("mode", "types"), [("off", ["Communication"]), ("also", ["Communication", "Procedure"]),
                                             ("instead", ["Procedure"])])
def test_the_switch_decides_the_contact_units_resources(mode: str, types: list[str]) -> None:
    ctx = context(contact_procedures=mode)
    assert [r["resourceType"] for r in contact_resources(contact(), enrollment(), ctx)] == types
    assert ("Procedure" in updated_types(mode)) is (mode != "off")
    assert ("Communication" in updated_types(mode)) is (mode != "instead")


def test_the_switch_is_a_server_setting_and_part_of_the_mapping_fingerprint() -> None:
    assert ServerSettings(base_url="https://ehr.example.org/fhir").contact_procedures == "off"
    with pytest.raises(ValueError, match="off"):
        ServerSettings(base_url="https://ehr.example.org/fhir", contact_procedures="sometimes")
    assert program_fingerprint(context()) != program_fingerprint(context(contact_procedures="also"))
    assert updated_types("off") == UPDATED_TYPES


def test_plan_counts_procedures_per_resource_type() -> None:
    from connector.plan.planner import unit_resource_types

    assert unit_resource_types("contact") == ("Communication",)
    assert unit_resource_types("contact", "also") == ("Communication", "Procedure")
    assert unit_resource_types("contact", "instead") == ("Procedure",)
    assert unit_resource_types("enrollment", "instead") == ("CarePlan", "CareTeam")


def test_the_careplan_links_exactly_the_contacts_that_took_place_and_credits_their_supporters(tmp_path: Any) -> None:
    import csv
    from pathlib import Path

    from connector.identifiers import parse_conditional_reference as parse
    from connector.map.units import map_participant_units
    from connector.read.profile import load_profile
    from connector.read.program import read_program
    from connector.read.staging import Staging

    demo = Path(__file__).resolve().parents[2] / "fixtures" / "demo" / "template"
    profile = load_profile("peersync-template")
    ctx = MappingContext.from_profile(profile)
    with Staging(tmp_path / "s.sqlite") as staging:
        read_program(profile, [demo], staging)
        kept = {r.contact_id for r in staging.records(RecordKind.CONTACT)}  # rows the reader accepted
        (unit,) = map_participant_units(staging, "E0001", [("enrollment", "E0001")], ctx)
    with (demo / "contacts.csv").open(encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["enrollment_id"] == "E0001" and r["contact_id"] in kept]
    took_place = {r["contact_id"] for r in rows if r["outcome"] in ("", "completed") and r["void"] in ("", "0")}
    assert took_place and len(took_place) < len(rows)  # the demo has attempts or voids to leave out
    careplan = unit.resources[0]
    linked = [parse(ref["reference"]) for a in careplan["activity"] for ref in a.get("outcomeReference", [])]
    assert {value for _, _, value in linked} == took_place and len(linked) == len(took_place)
    contributors = {parse(c["reference"])[2] for c in careplan["contributor"][1:]}
    assert {r["supporter_id"] for r in rows if r["contact_id"] in took_place} <= contributors
