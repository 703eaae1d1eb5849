"""Every resource the mappers emit for a synthetic program validates on a real HAPI FHIR server.

The server gets the US Core 6.1.0 conformance resources shipped in mappings/fhir/us-core-6.1.0 and our terminology.
The mapped resources are written to it (conditional references replaced by literal placeholder ids, plus a
stand-in Patient) so that every reference resolves, then each one goes through ``$validate`` against base R4
and, where one exists, its US Core profile. Any ``error``/``fatal`` issue fails the test; warnings are summed up.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests

from connector.identifiers import parse_conditional_reference
from connector.map import (
    US_CORE_PROFILES,
    MappingContext,
    TeamMember,
    map_cancelled_contact_request,
    map_cbo,
    map_contact,
    map_contact_procedure,
    map_enrollment,
    map_goal,
    map_planned_contact,
    map_program,
    map_provenance,
    map_referral,
    map_supporter,
)
from connector.map.note import group_notes, map_note
from connector.map.terminology import load_terminology, terminology_bundle
from connector.model import (
    Contact,
    Enrollment,
    Goal,
    GoalNote,
    GoalTarget,
    PlannedContact,
    Referral,
    Supporter,
)
from connector.ops.validate import us_core_resources
from tests.demogen import generate_program
from tests.integration.test_clinical_notes import loinc_unavailable, unexpected_type_issues

pytestmark = pytest.mark.integration

FHIR_JSON = "application/fhir+json"
# This test shares the server with other integration tests: its own program ids and MRN system keep its resources
# (and its stand-in Patients) out of their identifier searches.
MRN_SYSTEM = "https://validate-mapped.peersync.test/mrn"
RECORDED = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)


# -- fixtures ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_url(fhir_base_url: str) -> str:
    """The server from tests/conftest.py (the local HAPI server, or PEERSYNC_TEST_FHIR_URL)."""
    return fhir_base_url.rstrip("/")


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.headers.update({"Accept": FHIR_JSON, "Content-Type": FHIR_JSON})
        yield session


@pytest.fixture(scope="module")
def conformance_loaded(base_url: str, http: requests.Session) -> None:
    """US Core 6.1.0 (PUT by id: CodeSystems, ValueSets, then StructureDefinitions) and our terminology."""
    for resource in us_core_resources():
        response = http.put(f"{base_url}/{resource['resourceType']}/{resource['id']}", json=resource, timeout=120)
        assert response.status_code in (
            200,
            201,
        ), f"loading {resource['url']}: {response.status_code} {response.text[:500]}"
    response = http.post(base_url, json=terminology_bundle(load_terminology()), timeout=120)
    assert response.status_code == 200, f"publishing our terminology: {response.status_code} {response.text[:1000]}"


# -- the synthetic program -----------------------------------------------------------------------------------------


def _program(ctx: MappingContext) -> list[dict[str, Any]]:
    """Every kind of source record, each status and mode at least once, mapped."""
    tz = timezone(timedelta(hours=-6))
    supporters = [
        Supporter(
            staff_id="S01",
            given_name="Rosa",
            family_name="Lopez",
            title="promotora",
            title_text="Promotora de salud",
            phone="+1-555-0101",
            email="rosa@example.org",
        ),
        Supporter(staff_id="S02", given_name="Sam", family_name="Reed", title="peer-coach", npi="1234567893"),
        Supporter(
            staff_id="S03",
            given_name="Ana",
            family_name="Ruiz",
            title="other",
            original_text={"title": "navegadora"},
            active=False,
        ),
    ]
    enrollments = [
        Enrollment(enrollment_id="E001", mrn="MRN-0001", start_date=date(2025, 1, 6), supporter_id="S01"),
        Enrollment(
            enrollment_id="E002",
            mrn="MRN-0002",
            start_date=date(2025, 2, 3),
            end_date=date(2025, 8, 1),
            status="withdrawn",
            supporter_id="S02",
        ),
        Enrollment(
            enrollment_id="E003", mrn="MRN-0003", start_date=date(2025, 3, 3), status="on-hold", supporter_id="S03"
        ),
    ]
    goals = {
        "E001": [
            Goal(
                goal_id="G001",
                enrollment_id="E001",
                description="Get my A1c under 7 & keep it there",
                behavior="monitoring",
                target=GoalTarget(measure="hba1c", comparator="<", value=Decimal(7)),
                start_date=date(2025, 1, 6),
                due_date=date(2025, 7, 1),
                achievement_status="improving",
                notes=(
                    GoalNote(
                        note_id="N1",
                        goal_id="G001",
                        noted_on=date(2025, 2, 1),
                        text="A1c 7.8 <down>",
                        supporter_id="S01",
                    ),
                    GoalNote(note_id="N2", goal_id="G001", noted_on=date(2025, 3, 1), text="no author"),
                ),
            ),
            Goal(
                goal_id="G002",
                enrollment_id="E001",
                description="Walk 7000 steps a day",
                behavior="being-active",
                target=GoalTarget(measure="steps-per-day", comparator=">=", value=Decimal(7000)),
                start_date=date(2025, 1, 6),
                set_by="supporter",
            ),
            Goal(
                goal_id="G003",
                enrollment_id="E001",
                description="Eat vegetables",
                behavior="healthy-eating",
                start_date=date(2025, 1, 6),
                due_date=date(2025, 3, 1),
                lifecycle_status="completed",
                achievement_status="achieved",
                status_date=date(2025, 3, 1),
                set_by="together",
                supporter_id="S01",
            ),
            Goal(
                goal_id="G008",
                enrollment_id="E001",
                description="Check my feet every night",
                behavior="monitoring",
                start_date=date(2025, 1, 6),
                lifecycle_status="completed",
                achievement_status="not-achieved",
                set_by="supporter",
            ),
        ],
        "E002": [
            Goal(
                goal_id="G004",
                enrollment_id="E002",
                description="Lose 5 kg",
                behavior="reducing-risks",
                target=GoalTarget(measure="body-weight", comparator="<=", value=Decimal("82.5"), unit="kg"),
                start_date=date(2025, 2, 3),
                lifecycle_status="cancelled",
                achievement_status="not-attainable",
                status_date=date(2025, 5, 2),
            ),
            Goal(
                goal_id="G005",
                enrollment_id="E002",
                description="150 minutes a week",
                behavior="being-active",
                target=GoalTarget(measure="activity-minutes-per-week", comparator=">=", value=Decimal(150)),
                start_date=date(2025, 2, 3),
                void=True,
            ),
        ],
        "E003": [
            Goal(
                goal_id="G006",
                enrollment_id="E003",
                description="Fasting sugar below 130",
                behavior="monitoring",
                target=GoalTarget(measure="fasting-glucose", comparator="<", value=Decimal(130), unit="mg/dL"),
                start_date=date(2025, 3, 3),
            ),
            Goal(
                goal_id="G007",
                enrollment_id="E003",
                description="Active 5 days a week",
                behavior="being-active",
                target=GoalTarget(measure="active-days-per-week", comparator=">=", value=Decimal(5)),
                start_date=date(2025, 3, 3),
                lifecycle_status="on-hold",
            ),
        ],
    }
    planned = {
        "E001": [
            PlannedContact(
                planned_contact_id="P001",
                enrollment_id="E001",
                due_at=datetime(2025, 2, 10, 9, tzinfo=tz),
                mode="telephone",
                status="done",
            ),
            PlannedContact(
                planned_contact_id="P002",
                enrollment_id="E001",
                due_at=datetime(2025, 3, 10, 9, tzinfo=tz),
                mode="text-message",
            ),
        ],
        "E002": [
            PlannedContact(
                planned_contact_id="P003",
                enrollment_id="E002",
                due_at=datetime(2025, 4, 1, 9, tzinfo=tz),
                mode="face-to-face",
                status="dropped",
            )
        ],
        "E003": [
            PlannedContact(
                planned_contact_id="P004",
                enrollment_id="E003",
                due_at=datetime(2025, 4, 1, 9, tzinfo=tz),
                mode="group",
                void=True,
            )
        ],
    }
    referrals = {
        "E001": [
            Referral(
                referral_id="R001",
                enrollment_id="E001",
                supporter_id="S01",
                resource_name="Northside Food Bank",
                resource_id="CBO-17",
                need="food",
                referred_on=date(2025, 1, 20),
                status="completed",
            ),
            Referral(
                referral_id="R002",
                enrollment_id="E001",
                resource_name="YMCA Diabetes Prevention Program",
                need="physical-activity",
                referred_on=date(2025, 1, 20),
                status="accepted",
            ),
        ],
        "E002": [
            Referral(
                referral_id="R003",
                enrollment_id="E002",
                resource_name="Ride Share",
                resource_id="CBO-3",
                need="transportation",
                referred_on=date(2025, 2, 10),
                status="declined",
                outcome_notes="The service does not reach her street",
            ),
            Referral(
                referral_id="R006",
                enrollment_id="E002",
                supporter_id="S02",
                resource_name="Walking group",
                need="social-connection",
                referred_on=date(2025, 2, 10),
                status="participant-declined",
                status_date=date(2025, 2, 17),
                outcome_notes="Prefers to walk <b>alone</b>",
            ),
        ],
        "E003": [
            Referral(
                referral_id="R004",
                enrollment_id="E003",
                resource_name="Legal aid",
                need="other",
                original_text={"need": "immigration paperwork"},
                referred_on=date(2025, 3, 10),
                status="cancelled",
            ),
            Referral(
                referral_id="R005",
                enrollment_id="E003",
                resource_name="Pharmacy help",
                need="medication-access",
                referred_on=date(2025, 3, 10),
                void=True,
            ),
        ],
    }
    contacts = {
        "E001": [
            Contact(
                contact_id="C001",
                enrollment_id="E001",
                supporter_id="S01",
                occurred_at=datetime(2025, 2, 10, 9, 5, tzinfo=tz),
                duration_minutes=25,
                mode="telephone",
                setting="remote",
                support_types=("emotional", "follow-up"),
                essential_elements=("ongoing-follow-up-support",),
                goal_ids=("G001", "G002"),
                notes="Discussed <labs> & meals",
                planned_contact_id="P001",
            ),
            Contact(
                contact_id="C002",
                enrollment_id="E001",
                supporter_id="S01",
                occurred_at=datetime(2025, 2, 20, 18, tzinfo=tz),
                mode="text-message",
                support_types=("outreach",),
                void=True,
            ),
            Contact(
                contact_id="C003",
                enrollment_id="E001",
                supporter_id="S02",  # another supporter led the group session: a second CareTeam member
                occurred_at=datetime(2025, 2, 22, 10, tzinfo=tz),
                duration_minutes=90,
                mode="group",
                setting="faith-based",
                support_types=("education", "skills-training"),
                essential_elements=("education-skills-training",),
                group_session_id="GS-2025-02-22",
            ),
        ],
        "E002": [
            Contact(
                contact_id="C004",
                enrollment_id="E002",
                supporter_id="S02",
                occurred_at=datetime(2025, 3, 1, 11, tzinfo=tz),
                mode="telephone",
                outcome="not-reached",
            ),
            Contact(
                contact_id="C005",
                enrollment_id="E002",
                supporter_id="S02",
                occurred_at=datetime(2025, 3, 2, 11, tzinfo=tz),
                mode="video",
                outcome="cancelled",
            ),
            Contact(
                contact_id="C006",
                enrollment_id="E002",
                supporter_id="S02",
                occurred_at=datetime(2025, 3, 3, 11, tzinfo=tz),
                duration_minutes=15,
                mode="email",
                support_types=("community-linkage",),
                essential_elements=("community-resource-linkage",),
            ),
        ],
        "E003": [
            Contact(
                contact_id="C007",
                enrollment_id="E003",
                supporter_id="S03",
                occurred_at=datetime(2025, 3, 5, 14, tzinfo=tz),
                duration_minutes=45,
                mode="face-to-face",
                setting="other",
                original_text={"setting": "laundromat", "support_types": "helped with groceries"},
                support_types=("other", "instrumental", "care-coordination", "clinical-access-assistance"),
                essential_elements=("clinical-care-access", "individualized-assessment", "collaborative-goal-setting"),
                goal_ids=("G006",),
            ),
        ],
    }
    out = map_program(ctx)
    for s in supporters:
        out += map_supporter(s, ctx)
    by_id = {s.staff_id: s for s in supporters}
    for e in enrollments:
        eid = e.enrollment_id
        out += map_enrollment(
            e,
            goal_ids=[g.goal_id for g in goals[eid]],
            planned_contact_ids=[p.planned_contact_id for p in planned[eid]],
            referral_ids=[r.referral_id for r in referrals[eid]],
            ctx=ctx,
            supporter=by_id[e.supporter_id],
            team=_team(contacts[eid], by_id),
            performed_contacts=_performed(contacts[eid]),
            contributor_ids=[c.supporter_id for c in contacts[eid]],
        )
        out += [map_goal(g, e, ctx) for g in goals[eid]]
        out += [map_planned_contact(p, e, ctx) for p in planned[eid]]
        goals_by_id = {g.goal_id: g for g in goals[eid]}
        out += _contacts(contacts[eid], e, ctx, by_id, goals_by_id)
        for r in referrals[eid]:
            out += map_referral(r, e, ctx)
            cbo = map_cbo(r, ctx)
            if cbo is not None and cbo not in out:
                out.append(cbo)
        # clinical-note mode: a note per week (C002 alone in its week is voided: an entered-in-error note)
        out += [map_note(n, ctx) for n in group_notes(e, contacts[eid], goals[eid], referrals[eid], planned[eid],
                                                      by_id, kind="week", timezone=ctx.timezone)]
    return out


def _team(contacts: list[Contact], supporters: dict[str, Supporter]) -> list[TeamMember]:
    first: dict[str, date] = {}
    for c in contacts:
        if not c.void and c.outcome != "cancelled":
            first[c.supporter_id] = min(c.occurred_at.date(), first.get(c.supporter_id, c.occurred_at.date()))
    return [TeamMember(s, since, supporters.get(s)) for s, since in sorted(first.items())]


def _contacts(contacts: list[Contact], e: Enrollment, ctx: MappingContext, supporters: dict[str, Any],
              goals_by_id: dict[str, Any]) -> list[dict[str, Any]]:
    """Each contact's Communication (as units.py maps it), after the revoked request of a cancelled one, and its
    US Core Procedure (`contact_procedures = "also"`)."""
    out = []
    for c in contacts:
        request = map_cancelled_contact_request(c, e, ctx)
        out += ([request] if request else []) + [map_contact(
            c, e, ctx, supporter=supporters.get(c.supporter_id),
            goals=[goals_by_id[g] for g in c.goal_ids if g in goals_by_id])]
        out.append(map_contact_procedure(c, e, ctx, supporter=supporters.get(c.supporter_id),
                                         goals=[goals_by_id[g] for g in c.goal_ids if g in goals_by_id]))
    return out


def _performed(contacts: list[Contact]) -> list[tuple[str, str | None]]:
    return [(c.contact_id, c.planned_contact_id) for c in contacts if c.outcome == "completed" and not c.void]


def _demo_program(ctx: MappingContext, tmp: Path) -> list[dict[str, Any]]:
    """A small seeded demo program (tests.demogen), read back like a real export, mapped."""
    from connector.model import RecordKind
    from connector.read.profile import load_profile
    from connector.read.program import read_program
    from connector.read.staging import Staging

    generate_program(tmp, fmt="template", participants=6, months=3)
    with Staging() as staging:
        read_program(load_profile("peersync-template"), [tmp], staging)
        records = [r for kind in RecordKind for r in staging.records(kind)]
    return _map_records(records, ctx)


def _map_records(flat: list[Any], ctx: MappingContext) -> list[dict[str, Any]]:
    # the test's own MRN system (see MRN_SYSTEM), whatever the rows say
    enrollments = {
        r.enrollment_id: r.model_copy(update={"mrn_system": None}) for r in flat if isinstance(r, Enrollment)
    }
    out = map_program(ctx)
    supporters = {r.staff_id: r for r in flat if isinstance(r, Supporter)}
    for s in supporters.values():
        out += map_supporter(s, ctx)
    goals_by_id = {r.goal_id: r for r in flat if isinstance(r, Goal)}
    notes: dict[str, list[GoalNote]] = {}
    for n in (r for r in flat if isinstance(r, GoalNote)):
        notes.setdefault(n.goal_id, []).append(n)
    for e in enrollments.values():
        mine = [
            r for r in flat if getattr(r, "enrollment_id", None) == e.enrollment_id and not isinstance(r, Enrollment)
        ]
        goals = [g for g in mine if isinstance(g, Goal)]
        planned = [p for p in mine if isinstance(p, PlannedContact)]
        refs = [r for r in mine if isinstance(r, Referral)]
        contacts = [c for c in mine if isinstance(c, Contact)]
        out += map_enrollment(
            e,
            goal_ids=[g.goal_id for g in goals],
            planned_contact_ids=[p.planned_contact_id for p in planned],
            referral_ids=[r.referral_id for r in refs],
            ctx=ctx,
            team=_team(contacts, {}),
            performed_contacts=_performed(contacts),
            contributor_ids=[c.supporter_id for c in contacts],
        )
        out += [map_goal(g.model_copy(update={"notes": tuple(notes.get(g.goal_id, ()))}), e, ctx) for g in goals]
        out += [map_planned_contact(p, e, ctx) for p in planned]
        out += _contacts(contacts, e, ctx, supporters, goals_by_id)
        for r in refs:
            out += map_referral(r, e, ctx)
            cbo = map_cbo(r, ctx)
            if cbo is not None and cbo not in out:
                out.append(cbo)
        with_notes = [g.model_copy(update={"notes": tuple(notes.get(g.goal_id, ()))}) for g in goals]
        supporters = {s.staff_id: s for s in flat if isinstance(s, Supporter)}
        out += [map_note(n, ctx) for n in group_notes(e, [c for c in mine if isinstance(c, Contact)], with_notes,
                                                      refs, planned, supporters, kind="month", timezone=ctx.timezone)]
    return out


# -- references → literal placeholder ids --------------------------------------------------------------------------


def _placeholder_id(resource_type: str, system: str, value: str) -> str:
    return "ps-" + hashlib.sha1(f"{resource_type}|{system}|{value}".encode()).hexdigest()[:20]


def _assign_ids(resources: list[dict[str, Any]]) -> dict[tuple[str, str, str], str]:
    """Set a placeholder id on each resource; return (type, system, value) -> id."""
    ids: dict[tuple[str, str, str], str] = {}
    for n, r in enumerate(resources):
        if "identifier" not in r:  # Provenance has no business identifier
            r["id"] = f"ps-{r['resourceType'].lower()}-{n}"
            continue
        ident = r["identifier"][0]
        key = (r["resourceType"], ident["system"], ident["value"])
        r["id"] = ids.setdefault(key, _placeholder_id(*key))
    return ids


def _literalize(resources: list[dict[str, Any]], ids: dict[tuple[str, str, str], str]) -> list[dict[str, Any]]:
    """Replace conditional references by ``Type/id``; add a stand-in Patient per referenced MRN."""
    patients: dict[tuple[str, str, str], dict[str, Any]] = {}
    dangling: list[str] = []

    def fix(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: fix(v) for k, v in node.items()}
            ref = out.get("reference")
            if isinstance(ref, str):
                parsed = parse_conditional_reference(ref)
                if parsed is not None:
                    if parsed not in ids and parsed[0] == "Patient":
                        ids[parsed] = _placeholder_id(*parsed)
                        patients[parsed] = _stand_in_patient(ids[parsed], parsed[1], parsed[2])
                    if parsed in ids:
                        out["reference"] = f"{parsed[0]}/{ids[parsed]}"
                    else:
                        dangling.append(ref)
            return out
        if isinstance(node, list):
            return [fix(v) for v in node]
        return node

    fixed = [fix(r) for r in resources]
    assert not dangling, f"references to resources the mappers never emit: {sorted(set(dangling))}"
    return list(patients.values()) + fixed


def _stand_in_patient(resource_id: str, system: str, mrn: str) -> dict[str, Any]:
    # the EHR's chart: the connector never writes Patients; this one only makes references resolvable
    return {
        "resourceType": "Patient",
        "id": resource_id,
        "identifier": [
            {
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
                "system": system,
                "value": mrn,
            }
        ],
        "name": [{"family": "Test", "given": ["Synthetic"]}],
        "gender": "unknown",
    }


# -- validation ----------------------------------------------------------------------------------------------------


def _validate(
    http: requests.Session, base_url: str, resource: dict[str, Any], profile: str | None
) -> list[dict[str, Any]]:
    url = f"{base_url}/{resource['resourceType']}/$validate"
    response = http.post(url, params={"profile": profile} if profile else None, json=resource, timeout=300)
    # HAPI answers 200, or 412 when there are errors; both carry an OperationOutcome
    assert response.status_code in (
        200,
        400,
        412,
        422,
    ), f"$validate {url}: {response.status_code} {response.text[:500]}"
    outcome = response.json()
    assert outcome.get("resourceType") == "OperationOutcome", response.text[:500]
    return outcome.get("issue", [])


def _issue_text(issue: dict[str, Any]) -> str:
    where = ", ".join(issue.get("expression", issue.get("location", [])))
    message = issue.get("diagnostics") or issue.get("details", {}).get("text", "")
    return f"{where}: {message}"


def _validate_all(http: requests.Session, base_url: str, resources: list[dict[str, Any]]) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in resources
        ],
    }
    response = http.post(base_url, json=bundle, timeout=300)
    assert response.status_code == 200, f"writing the mapped resources: {response.status_code} {response.text[:2000]}"

    errors: list[str] = []
    warnings: Counter[str] = Counter()
    narrative_issues: list[str] = []
    checked = 0
    for resource in resources:
        if resource["resourceType"] == "Patient" or resource["id"].startswith("ps-stand-in-"):
            continue  # the EHR's own records, only there so that references resolve
        us_core = US_CORE_PROFILES.get(resource["resourceType"])
        for profile in [None, us_core] if us_core else [None]:
            label = f"{resource['resourceType']}/{resource['id']} [{profile or 'R4'}]"
            checked += 1
            for issue in _validate(http, base_url, resource, profile):
                severity = issue.get("severity")
                if "dom-6" in _issue_text(issue) or "txt-" in _issue_text(issue):
                    narrative_issues.append(f"{label} {severity}: {_issue_text(issue)}")
                if unexpected_type_issues([issue]):
                    errors.append(f"{label} {severity}: {_issue_text(issue)}")
                elif severity in ("error", "fatal") and loinc_unavailable(issue):
                    warnings[f"{resource['resourceType']} (no LOINC on this server) {_issue_text(issue)}"] += 1
                elif severity in ("error", "fatal"):
                    errors.append(f"{label} {severity}: {_issue_text(issue)}")
                elif severity == "warning":
                    warnings[f"{resource['resourceType']} {_issue_text(issue)}"] += 1
    print(
        f"\nvalidated {checked} resource/profile pairs; {len(errors)} errors; "
        f"{sum(warnings.values())} warnings ({len(warnings)} distinct):"
    )
    for text, n in sorted(warnings.items()):
        print(f"  WARNING x{n} {text}")
    assert not errors, "validation errors:\n" + "\n".join(errors)
    # every resource carries a narrative that passes the XHTML rules: no dom-6 (missing narrative), no txt-1/txt-2
    assert not narrative_issues, "narrative issues:\n" + "\n".join(narrative_issues)


# -- tests ---------------------------------------------------------------------------------------------------------


def _ctx() -> MappingContext:
    return MappingContext(
        program_id="validate-program",
        program_name="Validation Diabetes Peer Support Program",
        base_url="https://fhir.validate-program.example.org/peer-support",
        mrn_system=MRN_SYSTEM,
        timezone="America/Chicago",
        program_phone="+1-555-0100",
    )


def _with_provenance(resources: list[dict[str, Any]], ctx: MappingContext) -> list[dict[str, Any]]:
    """The resources plus two Provenances over them, all with literal references."""
    ids = _assign_ids(resources)
    targets = [f"{r['resourceType']}/{r['id']}" for r in resources]
    role = next(f"PractitionerRole/{r['id']}" for r in resources if r["resourceType"] == "PractitionerRole")
    provenances = [
        map_provenance(
            targets,
            activity="CREATE",
            author=role,
            recorded=RECORDED,
            ctx=ctx,
            source_entities=["contact/C001", "https://example.org/source|row-12"],
        ),
        map_provenance(targets[:3], activity="NULLIFY", author=None, recorded=RECORDED, ctx=ctx),
    ]
    for n, p in enumerate(provenances):
        p["id"] = f"ps-provenance-{n}"
    return _literalize(resources + provenances, ids)


def test_every_mapped_resource_validates(base_url: str, http: requests.Session, conformance_loaded: None) -> None:
    ctx = _ctx()
    _validate_all(http, base_url, _with_provenance(_program(ctx), ctx))


def test_demo_program_validates(
    base_url: str, http: requests.Session, conformance_loaded: None, tmp_path: Path
) -> None:
    from connector.read.profile import load_profile

    ctx = MappingContext.from_profile(
        load_profile("peersync-template"),
        program_id="validate-demo",
        base_url="https://fhir.validate-demo.example.org/peer-support",
        mrn_system=MRN_SYSTEM,
        program_phone="+1-555-010-0199",
    )
    resources = _demo_program(ctx, tmp_path)
    _validate_all(http, base_url, _with_provenance(resources, ctx))


# -- what a sync sends -------------------------------------------------------------------------------------------------


def _sync_bundles(ctx: MappingContext, tmp: Path) -> list[dict[str, Any]]:
    """The transaction bundles a first sync sends for a small demo program (``iter_bundles``: per-author
    Provenances, Procedures beside Communications, draft Tasks), one of its goals naming the EHR's HbA1c result
    (``outcome_observation``), plus one participant's change-set built again as a later send (UPDATE Provenances,
    ``build_change_set`` with ``first_send`` False)."""
    import csv
    import dataclasses
    import tempfile

    from connector.map.export import iter_bundles
    from connector.map.units import iter_planned_units
    from connector.plan.ledger import Ledger
    from connector.plan.planner import compute_plan, participants_to_write, program_fingerprint, units_to_write
    from connector.read.profile import load_profile
    from connector.read.program import read_program
    from connector.read.staging import Staging
    from connector.write.changeset import build_change_set

    generate_program(tmp, fmt="template", participants=4, months=3)
    goals_csv = tmp / "goals.csv"
    with goals_csv.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows[0]["outcome_observation"] = f"Observation/{STAND_IN_OBSERVATION}"
    with goals_csv.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with Staging() as staging:
        read_program(load_profile("peersync-template"), [tmp], staging)
        bundles = [bundle for _name, bundle in iter_bundles(staging, ctx, recorded=RECORDED)]
        with tempfile.TemporaryDirectory() as ledger_dir, Ledger(Path(ledger_dir) / "l.sqlite") as empty:
            compute_plan(staging, empty, program_id=ctx.program_id, fingerprint=program_fingerprint(ctx), ctx=ctx)
            participant = participants_to_write(staging)[0]
            writes = list(iter_planned_units(staging, participant, units_to_write(staging, participant), ctx))
            Ledger.detach_from(staging.db)
    later = [dataclasses.replace(w, first_send=False) for w in writes]
    bundles.append(build_change_set(later, ctx=ctx, patient=None, resolve=lambda _identity: None,
                                    recorded=RECORDED).bundle)
    return bundles


STAND_IN_OBSERVATION = "ps-stand-in-hba1c"
STAND_IN_CONDITION = "ps-stand-in-diabetes"


def _resources_of_bundles(bundles: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The bundles' resources as ``_validate_all`` writes them: one per identity (a later version wins), ids
    assigned, every ``urn:uuid`` reference (Provenance targets, the program Organization) made literal, Patient
    references on this test's MRN system, conditional references literal (``_literalize``)."""
    import copy

    by_identity: dict[tuple[str, str, str], dict[str, Any]] = {}
    provenances: list[dict[str, Any]] = []
    identity_of_url: dict[str, tuple[str, str, str]] = {}
    provenance_urls: list[tuple[str, dict[str, Any]]] = []
    for bundle in bundles:
        for entry in bundle["entry"]:
            resource = copy.deepcopy(entry["resource"])
            if resource["resourceType"] == "Provenance":
                provenances.append(resource)
                provenance_urls.append((entry["fullUrl"], resource))
                continue
            ident = resource["identifier"][0]
            identity = (resource["resourceType"], ident["system"], ident["value"])
            by_identity[identity] = resource
            identity_of_url[entry["fullUrl"]] = identity
    resources = list(by_identity.values())
    ids = _assign_ids(resources)
    for n, provenance in enumerate(provenances):
        provenance["id"] = f"ps-sync-provenance-{n}"
    local = {url: f"{identity[0]}/{ids[identity]}" for url, identity in identity_of_url.items()}

    def fix(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: fix(v) for k, v in node.items()}
            ref = out.get("reference")
            if isinstance(ref, str) and ref.startswith("urn:uuid:"):
                out["reference"] = local[ref]
            parsed = parse_conditional_reference(ref) if isinstance(ref, str) else None
            if parsed is not None and parsed[0] == "Patient":
                out["reference"] = f"Patient?identifier={MRN_SYSTEM}|{parsed[2]}"
            return out
        if isinstance(node, list):
            return [fix(v) for v in node]
        return node

    fixed = [fix(r) for r in resources + provenances]
    # the CarePlan of a participant whose enrollment names a diagnosis addresses the EHR's Condition (found by a
    # search at sync time, never created): a stand-in Condition, as the sync would have found it
    careplan = next(r for r in fixed if r["resourceType"] == "CarePlan")
    careplan["addresses"] = [{"reference": f"Condition/{STAND_IN_CONDITION}"}]
    return _literalize(fixed, ids)


def _stand_ins(patient_ref: str) -> list[dict[str, Any]]:
    """The EHR's own records a sync links to: the HbA1c result a goal names, the diagnosis a CarePlan addresses."""
    return [
        {"resourceType": "Observation", "id": STAND_IN_OBSERVATION, "status": "final",
         "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                   "code": "laboratory"}]}],
         "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}], "text": "Hemoglobin A1c"},
         "subject": {"reference": patient_ref}, "effectiveDateTime": "2026-01-02",
         "valueQuantity": {"value": 6.8, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}},
        {"resourceType": "Condition", "id": STAND_IN_CONDITION,
         "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                        "code": "active"}]},
         "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "E11.9"}],
                  "text": "Type 2 diabetes"},
         "subject": {"reference": patient_ref}},
    ]


def test_what_sync_sends_validates(base_url: str, http: requests.Session, conformance_loaded: None,
                                   tmp_path: Path) -> None:
    """Not the test's own mapping loop: the bundles ``iter_bundles`` / ``build_change_set`` produce, with contacts
    also as Procedures, per-author CREATE and UPDATE Provenances, the draft referral Task, CarePlan.addresses and
    Goal.outcomeReference, against base R4 and US Core 6.1.0: 0 errors."""
    from connector.read.profile import load_profile

    ctx = MappingContext.from_profile(
        load_profile("peersync-template"),
        program_id="validate-sync",
        base_url="https://fhir.validate-sync.example.org/peer-support",
        mrn_system=MRN_SYSTEM,
        program_phone="+1-555-010-0198",
        contact_procedures="also",
        referral_tasks="draft",
    )
    resources = _resources_of_bundles(_sync_bundles(ctx, tmp_path))
    kinds = Counter(r["resourceType"] for r in resources)
    assert kinds["Procedure"] and kinds["Communication"] and kinds["Provenance"] >= 3
    activities = {p["activity"]["coding"][0]["code"] for p in resources if p["resourceType"] == "Provenance"}
    assert {"CREATE", "UPDATE"} <= activities
    authors = {p["agent"][0]["who"]["reference"].split("/")[0] for p in resources if p["resourceType"] == "Provenance"}
    assert authors == {"PractitionerRole", "Organization"}
    assert any(t["status"] == "draft" for t in resources if t["resourceType"] == "Task")
    assert any(g.get("outcomeReference") for g in resources if g["resourceType"] == "Goal")
    careplan = next(r for r in resources if r["resourceType"] == "CarePlan" and r.get("addresses"))
    _validate_all(http, base_url, _stand_ins(careplan["subject"]["reference"]) + resources)
