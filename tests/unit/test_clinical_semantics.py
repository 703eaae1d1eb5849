"""Issue 19: what the output says happened is what the source recorded (who declined, who wrote it, when a status
changed, what was really achieved), checked over the seeded demo program and on single records."""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from connector.identifiers import (
    KIND_CANCELLED_CONTACT,
    KIND_CONTACT,
    KIND_CONTACT_PROCEDURE,
    KIND_CONTACT_REQUEST,
    KIND_GOAL,
    KIND_REFERRAL,
    KIND_REFERRAL_TASK,
    KIND_ROLE,
    KIND_STAFF,
    parse_conditional_reference,
)
from connector.map import (
    MappingContext,
    TeamMember,
    map_cancelled_contact_request,
    map_contact,
    map_enrollment,
    map_goal,
    map_referral,
)
from connector.map._util import markdown_text
from connector.map.export import iter_bundles
from connector.model import Contact, Enrollment, Goal, RecordKind, Referral
from connector.read.profile import load_profile
from connector.read.program import read_program
from connector.read.staging import Staging
from tests.demogen import generate_program

CTX = MappingContext(program_id="demo", program_name="Demo", base_url="https://demo.example.org",
                     mrn_system="urn:oid:1.2.3", timezone="America/Chicago")
RECORDED = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)
ENROLLMENT = Enrollment(enrollment_id="E1", mrn="M1", start_date=date(2025, 1, 6), supporter_id="S01")


def _map_demo(folder: Path, **overrides: Any) -> dict[str, Any]:
    generate_program(folder, fmt="template")
    profile = load_profile("peersync-template")
    ctx = MappingContext.from_profile(profile, **overrides)
    with Staging() as staging:
        read_program(profile, [folder], staging)
        records = {kind: list(staging.records(kind)) for kind in RecordKind}
        bundles = [bundle for _name, bundle in iter_bundles(staging, ctx, recorded=RECORDED)]
    return {"ctx": ctx, "records": records, "bundles": bundles}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The default demo program (template format): its source records and what ``peersync map`` sends."""
    return _map_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def demo_with_procedures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The demo program mapped for a server that also takes each contact as a US Core Procedure."""
    return _map_demo(tmp_path_factory.mktemp("demo-procedures"), contact_procedures="also")


def _resources(bundles: list[dict[str, Any]], resource_type: str) -> list[dict[str, Any]]:
    return [e["resource"] for b in bundles for e in b["entry"] if e["resource"]["resourceType"] == resource_type]


def _value(resource: dict[str, Any]) -> str:
    return str(resource["identifier"][0]["value"])


# -- 1. who declined -----------------------------------------------------------------------------------------------


def test_the_demos_declined_referrals_read_cancelled_with_the_participants_reason(demo: dict[str, Any]) -> None:
    declined = {r.referral_id: r for r in demo["records"][RecordKind.REFERRAL] if r.status == "participant-declined"}
    assert len(declined) == 12  # every declined referral of the demo was declined by the participant
    tasks = {_value(t): t for t in _resources(demo["bundles"], "Task")}
    reasons_sent = 0
    for referral_id, referral in declined.items():
        task = tasks[referral_id]
        assert task["status"] == "cancelled"
        # our code, as on clinic-referral Tasks, and SNOMED CT 1296859006 "Procedure declined" (active concept)
        assert [(c["system"], c["code"]) for c in task["statusReason"]["coding"]] == [
            (demo["ctx"].code_system("referral-status-reason"), "participant-declined"),
            ("http://snomed.info/sct", "1296859006")]
        assert task["statusReason"]["text"] == "Declined by the participant"
        assert task["businessStatus"]["text"] == "Declined by the participant"
        # the participant's own reason, as the program recorded it, reaches the Task's note
        if referral.outcome_notes:
            assert task["note"] == [{"text": markdown_text(referral.outcome_notes)}]
            reasons_sent += 1
    assert reasons_sent >= 6  # the demo records a reason for most refusals ("no childcare in the evenings" ...)
    assert not [t for t in tasks.values() if t["status"] == "rejected"]  # no organization declined in the demo


def test_a_declined_community_referral_carries_the_reason_code_of_a_declined_clinic_referral() -> None:
    from connector.model import EnrollmentStatus
    from connector.pull.answers import REASONS, DesiredTask, apply_step

    _, task = map_referral(Referral(referral_id="R1", enrollment_id="E1", resource_name="Food bank", need="food",
                                    referred_on=date(2025, 2, 1), status="participant-declined"), ENROLLMENT, CTX)
    clinic = apply_step({"resourceType": "Task"}, "cancelled", DesiredTask("cancelled",
                        REASONS[EnrollmentStatus.DECLINED]), careplan_id=None, now="2025-02-02", ctx=CTX)
    assert task["statusReason"]["coding"] == clinic["statusReason"]["coding"]


def test_an_open_referral_task_is_draft_for_a_server_that_acts_on_requested_tasks() -> None:
    made = Referral(referral_id="R1", enrollment_id="E1", resource_name="Food bank", need="food",
                    referred_on=date(2025, 2, 1), status="made")
    _, task = map_referral(made, ENROLLMENT, CTX)
    assert task["status"] == "requested"
    draft_ctx = dataclasses.replace(CTX, referral_tasks="draft")
    _, task = map_referral(made, ENROLLMENT, draft_ctx)
    assert task["status"] == "draft" and task["businessStatus"] == {"text": "Referral made"}
    # only the open status changes: what happened later reads the same for every receiver
    _, accepted = map_referral(made.model_copy(update={"status": "accepted"}), ENROLLMENT, draft_ctx)
    assert accepted["status"] == "accepted"
    from connector.plan.planner import program_fingerprint
    assert program_fingerprint(draft_ctx) != program_fingerprint(CTX)


def test_only_the_organization_declining_rejects_the_task() -> None:
    _, task = map_referral(Referral(referral_id="R1", enrollment_id="E1", resource_name="Food bank", need="food",
                                    referred_on=date(2025, 2, 1), status="declined"), ENROLLMENT, CTX)
    assert task["status"] == "rejected" and task["statusReason"] == {"text": "Declined by the community organization"}


# -- 2. who wrote it -----------------------------------------------------------------------------------------------


def _source_writers(records: dict[RecordKind, list[Any]]) -> dict[tuple[str, str], set[str]]:
    """(identifier kind, source id) → the staff ids the **source records** name as having written that record:
    a contact's, planned contact's or referral's supporter_id, a goal's supporter when that supporter set it
    alone, and the supporter_id of every note on it. Read from the source, not from the mapped elements the
    Provenance grouping reads, so the test cannot agree with a wrong mapping by construction."""
    out: dict[tuple[str, str], set[str]] = {}
    for c in records[RecordKind.CONTACT]:
        for kind in (KIND_CONTACT, KIND_CONTACT_PROCEDURE, KIND_CANCELLED_CONTACT):
            out[(kind, c.contact_id)] = {c.supporter_id}
    for p in records[RecordKind.PLANNED_CONTACT]:
        out[(KIND_CONTACT_REQUEST, p.planned_contact_id)] = {p.supporter_id} - {None}
    for r in records[RecordKind.REFERRAL]:
        out[(KIND_REFERRAL, r.referral_id)] = out[(KIND_REFERRAL_TASK, r.referral_id)] = {r.supporter_id} - {None}
    notes: dict[str, set[str]] = {}
    for n in records[RecordKind.GOAL_NOTE]:
        notes.setdefault(n.goal_id, set()).add(n.supporter_id)
    for g in records[RecordKind.GOAL]:
        written = {g.supporter_id} if g.set_by == "supporter" else set()
        written |= notes.get(g.goal_id, set()) | {n.supporter_id for n in g.notes}
        out[(KIND_GOAL, g.goal_id)] = written - {None}
    return out


def _record_key(resource: dict[str, Any]) -> tuple[str, str] | None:
    """(identifier kind, source id) of a mapped resource, from its business identifier."""
    identifier = (resource.get("identifier") or [{}])[0]
    if "system" not in identifier:
        return None
    return identifier["system"].rsplit("/", 1)[1], str(identifier["value"])


@pytest.mark.parametrize("fixture", ["demo", "demo_with_procedures"])
def test_no_provenance_credits_an_author_who_did_not_write_its_targets(fixture: str,
                                                                       request: pytest.FixtureRequest) -> None:
    demo = request.getfixturevalue(fixture)
    ctx: MappingContext = demo["ctx"]
    assert fixture == "demo" or len(_resources(demo["bundles"], "Procedure")) >= 100  # the Procedures are checked
    source_writers = _source_writers(demo["records"])
    credited_per_bundle = []
    written_resources = 0
    for bundle in demo["bundles"]:
        by_url = {e["fullUrl"]: e["resource"] for e in bundle["entry"]}
        targeted: set[str] = set()
        credited_for: dict[str, set[str]] = {}
        for prov in (r for r in by_url.values() if r["resourceType"] == "Provenance"):
            who = prov["agent"][0]["who"]["reference"]
            # the program's bundle holds the Organization itself: its reference is the entry's fullUrl there
            kind, system, value = parse_conditional_reference(who) or (by_url[who]["resourceType"], "", "")
            for target in prov["target"]:
                written_by = source_writers.get(_record_key(by_url[target["reference"]]) or ("", ""), set())
                if kind == "PractitionerRole":
                    assert system == ctx.system(KIND_ROLE)
                    assert value in written_by, (value, by_url[target["reference"]]["resourceType"])
                    credited_for.setdefault(target["reference"], set()).add(value)
                else:  # the program Organization: only for what the source names no supporter as writing
                    assert kind == "Organization" and not written_by
                targeted.add(target["reference"])
        assert targeted == {url for url, r in by_url.items() if r["resourceType"] != "Provenance"}
        # and every supporter the source names as a writer is credited for what they wrote
        for url, resource in by_url.items():
            written_by = source_writers.get(_record_key(resource) or ("", ""), set())
            assert credited_for.get(url, set()) == written_by, (url, written_by)
            written_resources += bool(written_by)
        credited_per_bundle.append(len(set().union(*credited_for.values()) if credited_for else set()))
    assert written_resources >= 500  # the oracle covers the demo's contacts, requests, referrals and goals
    # the demo's supporters stand in for each other: many participants' records are written by several
    assert sum(n >= 2 for n in credited_per_bundle) >= 20


def test_provenance_activity_is_create_on_a_first_send(demo: dict[str, Any]) -> None:
    # peersync map shows a first sync: everything is created, except records the source voided (nullified)
    for bundle in demo["bundles"]:
        by_url = {e["fullUrl"]: e["resource"] for e in bundle["entry"]}
        for prov in (r for r in by_url.values() if r["resourceType"] == "Provenance"):
            statuses = {by_url[t["reference"]].get("status", by_url[t["reference"]].get("lifecycleStatus"))
                        for t in prov["target"]}
            activity = prov["activity"]["coding"][0]["code"]
            assert activity == ("NULLIFY" if statuses == {"entered-in-error"} else "CREATE")
            assert activity == "CREATE" or len(statuses) == 1


def test_a_note_author_is_credited_with_the_goal_and_practitioner_becomes_their_role() -> None:
    goal = Goal(goal_id="G1", enrollment_id="E1", description="walk", behavior="being-active",
                start_date=date(2025, 1, 6), notes=({"note_id": "N1", "goal_id": "G1", "noted_on": date(2025, 2, 1),
                                                      "text": "ok", "supporter_id": "S09"},))
    from connector.map import resource_authors

    (author,) = resource_authors(map_goal(goal, ENROLLMENT, CTX), CTX)
    assert parse_conditional_reference(author) == ("PractitionerRole", CTX.system(KIND_ROLE), "S09")
    assert CTX.system(KIND_STAFF) != CTX.system(KIND_ROLE)


# -- 3. and 4. goal status dates and outcomes ------------------------------------------------------------------------


def test_no_ended_goal_gets_a_status_date_the_source_did_not_record(demo: dict[str, Any]) -> None:
    recorded = {g.goal_id: g.status_date for g in demo["records"][RecordKind.GOAL]}
    goals = _resources(demo["bundles"], "Goal")
    ended = [g for g in goals if g["lifecycleStatus"] in ("completed", "cancelled")]
    assert len(ended) >= 20
    for goal in goals:
        source = recorded[_value(goal)]
        assert goal.get("statusDate") == (source.isoformat() if source else None)


def test_a_completed_goal_not_achieved_says_so_in_status_reason() -> None:
    base = {"goal_id": "G1", "enrollment_id": "E1", "description": "A1c under 7", "behavior": "monitoring",
            "start_date": date(2025, 1, 6), "lifecycle_status": "completed"}
    missed = map_goal(Goal(**base, achievement_status="not-achieved", status_date=date(2025, 6, 1)), ENROLLMENT, CTX)
    assert missed["statusReason"] == "Completed without being achieved (Not Achieved)"
    assert missed["statusDate"] == "2025-06-01" and "outcomeReference" not in missed
    assert "Completed without being achieved" in missed["text"]["div"]  # for a chart that shows only the narrative
    assert "statusReason" not in map_goal(Goal(**base, achievement_status="achieved"), ENROLLMENT, CTX)
    # the result the program names (e.g. from pull's clinical-facts.csv), never one peersync picks
    lab = {"reference": "Observation/a1c-1"}
    assert map_goal(Goal(**base, outcome_observation="Observation/a1c-1"), ENROLLMENT, CTX)["outcomeReference"] == [lab]


# -- 5. cancelled contacts -------------------------------------------------------------------------------------------


def test_a_cancelled_contact_has_no_sent_and_its_planned_time_is_on_a_revoked_request() -> None:
    c = Contact(contact_id="C1", enrollment_id="E1", supporter_id="S02", mode="telephone", outcome="cancelled",
                occurred_at=datetime(2025, 2, 10, 15, 5, tzinfo=UTC))
    communication = map_contact(c, ENROLLMENT, CTX)
    request = map_cancelled_contact_request(c, ENROLLMENT, CTX)
    assert communication["status"] == "not-done" and "sent" not in communication
    assert request is not None and request["status"] == "revoked"
    assert request["occurrenceDateTime"] == "2025-02-10T15:05:00+00:00"
    assert communication["basedOn"][1]["reference"].startswith("CommunicationRequest?")
    # a cancelled contact that fulfils a planned contact points at that one: no second request
    planned = c.model_copy(update={"planned_contact_id": "P1"})
    assert map_cancelled_contact_request(planned, ENROLLMENT, CTX) is None
    not_reached = Contact(**{**c.model_dump(), "outcome": "not-reached"})
    assert map_contact(not_reached, ENROLLMENT, CTX)["sent"] == "2025-02-10T15:05:00+00:00"


def test_a_cancelled_contact_for_a_plan_another_contact_carried_out_does_not_read_as_fulfilling_it() -> None:
    """Planned contact P1 is `done` (contact C2 carried it out); C1, also for P1, was cancelled. C1 keeps P1 in
    `basedOn` (the plan it was meant to carry out, R4 Event pattern) but says, by its own status, that it did not
    happen; only C2 is the CarePlan activity's outcome (docs/fhir-modeling-corrections.md)."""
    when = datetime(2025, 2, 10, 15, 5, tzinfo=UTC)
    cancelled = Contact(contact_id="C1", enrollment_id="E1", supporter_id="S02", mode="telephone",
                        outcome="cancelled", occurred_at=when, planned_contact_id="P1")
    done = Contact(**{**cancelled.model_dump(), "contact_id": "C2", "outcome": "completed"})
    c1 = map_contact(cancelled, ENROLLMENT, CTX)
    assert c1["status"] == "not-done" and c1["statusReason"]
    assert "sent" not in c1 and "received" not in c1
    assert parse_conditional_reference(c1["basedOn"][1]["reference"])[2] == "P1"
    assert map_contact(done, ENROLLMENT, CTX)["status"] == "completed"
    careplan, _ = map_enrollment(ENROLLMENT, goal_ids=[], planned_contact_ids=["P1"], referral_ids=[], ctx=CTX,
                                 performed_contacts=[("C2", "P1")])
    (activity,) = careplan["activity"]
    outcomes = [parse_conditional_reference(r["reference"])[2] for r in activity["outcomeReference"]]
    assert outcomes == ["C2"]


# -- 6. and 7. referral codes and requesters -----------------------------------------------------------------------


def test_a_profile_overrides_the_referral_code_of_a_need() -> None:
    referral = Referral(referral_id="R1", enrollment_id="E1", resource_name="Bus passes", need="transportation",
                        referred_on=date(2025, 2, 1), status="completed", outcome_notes="<b>got</b> a pass")
    ctx = MappingContext(**{**{f: getattr(CTX, f) for f in ("program_id", "program_name", "base_url", "mrn_system")},
                            "referral_codes": (("transportation", "http://example.org/cpt", "X1", "Bus pass"),)})
    sr, task = map_referral(referral, ENROLLMENT, ctx)
    assert sr["code"]["coding"] == [{"system": "http://example.org/cpt", "code": "X1", "display": "Bus pass"}]
    assert sr["code"]["text"] == "Referral to Bus passes"
    assert sr["requester"] == task["requester"] == ctx.organization_ref()  # no supporter named
    assert task["output"][0]["valueCodeableConcept"]["coding"] == sr["code"]["coding"]
    assert task["output"][0]["type"]["coding"][0]["code"] == "resulting-activity"
    assert task["note"] == [{"text": "\\<b\\>got\\</b\\> a pass"}]  # markdown: the HTML shows, never renders
    assert "lastModified" not in task  # completed on an unknown day
    made = Referral(**{**referral.model_dump(), "status": "made"})
    assert map_referral(made, ENROLLMENT, ctx)[1]["lastModified"] == "2025-02-01"


def test_a_referral_is_coded_only_as_specifically_as_is_true() -> None:
    """Gap: every food referral was coded "Assistance with application for food pantry program" (a cooking class
    too), every social-connection referral "Referral to peer support" (a walking group too)."""
    cooking = Referral(referral_id="R1", enrollment_id="E1", resource_name="Eastside Diabetes Cooking Class",
                       need="food", referred_on=date(2025, 2, 1), status="completed")
    walking = Referral(**{**cooking.model_dump(), "resource_name": "Walking group", "need": "social-connection"})
    for referral in (cooking, walking):
        sr, task = map_referral(referral, ENROLLMENT, CTX)
        assert sr["code"]["coding"] == [{"system": "http://snomed.info/sct", "code": "410606002",
                                         "display": "Social service procedure (procedure)"}]
        # the resulting activity claims no more than the request: a service received from that resource
        output = task["output"][0]["valueCodeableConcept"]
        assert output == {"coding": sr["code"]["coding"], "text": f"Service received from {referral.resource_name}"}
    # a program states what a resource really provides; that code wins over its need's
    peer_group = Referral(**{**walking.model_dump(), "resource_id": "RD-501",
                             "resource_name": "Diabetes support group"})
    peer = ("http://snomed.info/sct", "461481000124109", "Referral to peer support")
    ctx = dataclasses.replace(CTX, referral_resource_codes=(("RD-501", *peer),),
                              referral_codes=(("social-connection", "http://example.org/x", "SC", "Social"),))
    sr, task = map_referral(peer_group, ENROLLMENT, ctx)
    assert sr["code"]["coding"] == [dict(zip(("system", "code", "display"), peer, strict=True))]
    assert task["output"][0]["valueCodeableConcept"]["coding"] == sr["code"]["coding"]
    assert map_referral(walking, ENROLLMENT, ctx)[0]["code"]["coding"][0]["code"] == "SC"  # no resource code: need's


def test_the_demo_codes_only_its_peer_support_group_as_peer_support(demo: dict[str, Any]) -> None:
    referrals = {r.referral_id: r for r in demo["records"][RecordKind.REFERRAL]}
    codes_by_resource: dict[str | None, set[str]] = {}
    for sr in _resources(demo["bundles"], "ServiceRequest"):
        r = referrals[_value(sr)]
        codes_by_resource.setdefault(r.resource_id, set()).add(sr["code"]["coding"][0]["code"])
    assert codes_by_resource["RD-501"] == {"461481000124109"}  # the demo profile's code for its support group
    assert codes_by_resource["RD-103"] == {"410606002"}  # SNAP application help: not a food pantry application
    assert all("467771000124109" not in found for found in codes_by_resource.values())
    assert all("461481000124109" not in found for rid, found in codes_by_resource.items() if rid != "RD-501")


def test_the_template_reads_a_goals_outcome_observation_into_outcome_reference(tmp_path: Path) -> None:
    """The shipped template has the column and its profile maps it: a program can link the EHR's result."""
    import csv
    import shutil

    from connector.read.program import read_program as read

    folder = tmp_path / "template"
    shutil.copytree(Path(__file__).resolve().parents[2] / "fixtures" / "demo" / "template", folder)
    goals_csv = folder / "goals.csv"
    with goals_csv.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert "outcome_observation" in rows[0]  # the template's own column
    rows[1]["outcome_observation"] = "Observation/hba1c-77"
    with goals_csv.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    profile = load_profile("peersync-template")
    with Staging() as staging:
        read(profile, [folder], staging)
        goals = {g.goal_id: g for g in staging.records(RecordKind.GOAL)}
    linked = goals[rows[1]["goal_id"]]
    assert linked.outcome_observation is not None
    goal = map_goal(linked, ENROLLMENT, MappingContext.from_profile(profile))
    assert goal["outcomeReference"] == [{"reference": "Observation/hba1c-77"}]
    assert goals[rows[0]["goal_id"]].outcome_observation is None


def test_a_goal_set_by_the_supporter_without_a_named_one_has_no_expressed_by() -> None:
    goal = Goal(goal_id="G1", enrollment_id="E1", description="walk", behavior="being-active",
                start_date=date(2025, 1, 6), set_by="supporter")
    assert "expressedBy" not in map_goal(goal, ENROLLMENT, CTX)
    named = map_goal(Goal(**{**goal.model_dump(), "supporter_id": "S04"}), ENROLLMENT, CTX)
    assert parse_conditional_reference(named["expressedBy"]["reference"])[2] == "S04"


# -- CareTeam ------------------------------------------------------------------------------------------------------


def test_the_care_team_lists_every_supporter_who_worked_with_the_participant() -> None:
    ended = Enrollment(**{**ENROLLMENT.model_dump(), "status": "completed", "end_date": date(2025, 6, 30)})
    team = [TeamMember("S01", date(2025, 1, 8)), TeamMember("S07", date(2025, 3, 2))]
    _, careteam = map_enrollment(ended, goal_ids=[], planned_contact_ids=[], referral_ids=[], ctx=CTX, team=team)
    assert careteam["category"][0]["coding"][0]["code"] == "LA28865-6"
    members = careteam["participant"][1:]
    assert [parse_conditional_reference(m["member"]["reference"])[2] for m in members] == ["S01", "S07"]
    assert [m["period"] for m in members] == [{"start": "2025-01-06", "end": "2025-06-30"},
                                             {"start": "2025-03-02", "end": "2025-06-30"}]
    _, active = map_enrollment(ENROLLMENT, goal_ids=[], planned_contact_ids=[], referral_ids=[], ctx=CTX, team=team)
    assert all("end" not in m["period"] for m in active["participant"][1:])


def test_the_demos_care_teams_hold_the_supporters_of_the_contacts(demo: dict[str, Any]) -> None:
    contacts: dict[str, set[str]] = {}
    for c in demo["records"][RecordKind.CONTACT]:
        if not c.void and c.outcome != "cancelled":
            contacts.setdefault(c.enrollment_id, set()).add(c.supporter_id)
    enrollments = {e.enrollment_id: e for e in demo["records"][RecordKind.ENROLLMENT]}
    for careteam in _resources(demo["bundles"], "CareTeam"):
        enrollment_id = _value(careteam)
        members = {parse_conditional_reference(p["member"]["reference"])[2] for p in careteam["participant"][1:]}
        assert members == contacts.get(enrollment_id, set()) | {enrollments[enrollment_id].supporter_id}


def test_a_profiles_referral_codes_reach_the_context_and_the_fingerprint() -> None:
    from connector.plan.planner import program_fingerprint
    from connector.read.profile import ProgramSpec

    profile = load_profile("peersync-template")
    housing = {"system": "http://snomed.info/sct", "code": "123", "display": "Housing help"}
    program = ProgramSpec.model_validate({**profile.program.model_dump(), "referral_codes": {"housing": housing}})
    ctx = MappingContext.from_profile(profile.model_copy(update={"program": program}))
    assert ctx.referral_codes == (("housing", "http://snomed.info/sct", "123", "Housing help"),)
    assert program_fingerprint(ctx) != program_fingerprint(MappingContext.from_profile(profile))
    with pytest.raises(ValueError, match="referral_codes"):
        ProgramSpec.model_validate({**profile.program.model_dump(), "referral_codes": {"rent": housing}})
    # per community resource, beside (or instead of) per need
    table = {"resources": {"RD-9": housing}, "needs": {"housing": housing}}
    both = ProgramSpec.model_validate({**profile.program.model_dump(), "referral_codes": table})
    by_resource = MappingContext.from_profile(profile.model_copy(update={"program": both}))
    assert by_resource.referral_resource_codes == (("RD-9", "http://snomed.info/sct", "123", "Housing help"),)
    assert program_fingerprint(by_resource) != program_fingerprint(ctx)
