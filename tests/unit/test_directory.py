"""Existing directory resources ([directory]): the EHR's own Organization and Practitioners referenced by server
id, never written; what a unit needs that the EHR lacks; the search that finds them once per run."""

from __future__ import annotations

from dataclasses import replace
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import responses

from connector.errors import ConfigError
from connector.identifiers import KIND_ROLE, KIND_STAFF
from connector.map import (
    MappingContext,
    map_contact,
    map_enrollment,
    map_program,
    map_provenance,
    map_supporter,
)
from connector.map.directory import (
    NPI_SYSTEM,
    ORGANIZATION_NOT_FOUND,
    PRACTITIONER_NOT_FOUND,
    Directory,
    missing_directory_entries,
    organization_subject,
    supporter_subject,
)
from connector.map.people import map_careteam
from connector.model import Contact, Enrollment, Supporter
from connector.ops.config import load_settings
from connector.ops.doctor import WRITTEN_TYPES, Report, Status, _check_directory, written_types
from connector.plan.planner import program_fingerprint
from connector.read.formats.base import RowLocation
from connector.read.staging import Staging
from connector.run import directory_warnings
from connector.server.client import FhirClient, FhirHttpError, OutcomeSummary, RetryPolicy
from connector.wiring import directory_of
from connector.write.directory import resolve_directory

CST = timezone(timedelta(hours=-6))
BASE = "https://ehr.test/fhir"
FAST = RetryPolicy(attempts=0, backoff_factor=0.0, backoff_max=0.0, jitter=0.0)
ORG = "urn:oid:2.16.840.1.113883.3.9999.7|clinic-7"
EXISTING = Directory(organization_identifier=ORG, practitioner_system=NPI_SYSTEM, write_roles=False,
                     organization_id="org-7", practitioner_ids={"S01": "pr-1"})


def context(directory: Directory | None = None) -> MappingContext:
    return MappingContext(program_id="demo-program", program_name="Demo Program",
                          base_url="https://fhir.demo-program.example.org/peer-support",
                          mrn_system="urn:oid:2.16.840.1.113883.3.9999.1", timezone="America/Chicago",
                          directory=directory or Directory())


def supporter(staff_id: str = "S01", npi: str | None = "1234567893") -> Supporter:
    return Supporter(staff_id=staff_id, given_name="Rosa", family_name="Lopez", title="promotora", npi=npi)


ENROLLMENT = Enrollment(enrollment_id="E1", mrn="M1", start_date=date(2025, 1, 6), supporter_id="S01")
CONTACT = Contact(contact_id="C1", enrollment_id="E1", supporter_id="S01", mode="telephone",
                  occurred_at=datetime(2025, 2, 10, 9, 5, tzinfo=CST))


def references(node: object) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "reference"] + [r for v in node.values() for r in references(v)]
    if isinstance(node, list):
        return [r for item in node for r in references(item)]
    return []


# -- mapping with the EHR's ids -------------------------------------------------------------------------------


def test_existing_directory_resources_are_not_mapped_and_are_referenced_by_server_id() -> None:
    ctx = context(EXISTING)
    program = map_program(ctx)
    assert [r["resourceType"] for r in program] == ["Device"]
    assert program[0]["owner"] == {"reference": "Organization/org-7"}
    assert map_supporter(supporter(), ctx) == []  # neither the Practitioner nor (roles skipped) the role
    communication = map_contact(CONTACT, ENROLLMENT, ctx)
    assert communication["sender"]["reference"] == "Practitioner/pr-1"
    careteam = map_careteam(ENROLLMENT, ctx, supporter())
    assert careteam["participant"][1]["member"]["reference"] == "Practitioner/pr-1"
    assert careteam["managingOrganization"] == [{"reference": "Organization/org-7"}]
    resources = map_enrollment(ENROLLMENT, goal_ids=[], planned_contact_ids=[], referral_ids=[], ctx=ctx,
                               supporter=supporter())
    written = [r for resource in [*resources, communication] for r in references(resource)]
    assert not [r for r in written if r.startswith(("Practitioner", "Organization")) and "?" in r]


def test_provenance_names_the_existing_practitioner_as_author_for_the_existing_organization() -> None:
    ctx = context(EXISTING)
    author = ctx.ref("PractitionerRole", KIND_ROLE, "S01")["reference"]
    provenance = map_provenance(["Communication/1"], activity="CREATE", author=author,
                                recorded=datetime(2025, 3, 1, tzinfo=CST), ctx=ctx)
    assert provenance["agent"][0]["who"] == {"reference": "Practitioner/pr-1"}
    assert provenance["agent"][0]["onBehalfOf"] == {"reference": "Organization/org-7"}
    assert "peer supporter" in provenance["text"]["div"]


def test_roles_can_still_be_written_for_existing_practitioners() -> None:
    ctx = context(replace(EXISTING, write_roles=True))
    [role] = map_supporter(supporter(), ctx)
    assert role["resourceType"] == "PractitionerRole"
    assert role["practitioner"] == {"reference": "Practitioner/pr-1"}
    assert role["organization"] == {"reference": "Organization/org-7"}
    assert map_contact(CONTACT, ENROLLMENT, ctx)["sender"]["reference"].startswith("PractitionerRole?identifier=")


def test_default_directory_changes_nothing() -> None:
    ctx = context()
    assert [r["resourceType"] for r in map_program(ctx)] == ["Organization", "Device"]
    assert [r["resourceType"] for r in map_supporter(supporter(), ctx)] == ["Practitioner", "PractitionerRole"]
    assert Directory().fingerprint_parts() == ()
    assert program_fingerprint(ctx) == program_fingerprint(replace(ctx, directory=Directory()))
    assert program_fingerprint(context(EXISTING)) != program_fingerprint(ctx)
    # the ids a run finds are not part of the fingerprint: finding a supporter later re-sends nothing else
    assert program_fingerprint(context(EXISTING)) == program_fingerprint(
        context(replace(EXISTING, practitioner_ids={}, organization_id=None)))


def test_an_organization_not_found_yet_is_referenced_by_its_identifier() -> None:
    ctx = context(replace(EXISTING, organization_id=None))
    assert ctx.organization_ref() == {
        "reference": "Organization?identifier=urn:oid:2.16.840.1.113883.3.9999.7|clinic-7"}


# -- what waits for the EHR ----------------------------------------------------------------------------------


def test_units_needing_a_missing_practitioner_or_organization_are_named() -> None:
    missing = replace(EXISTING, practitioner_ids={},
                      problems={supporter_subject("S01"): (PRACTITIONER_NOT_FOUND, "no Practitioner")})
    ctx = context(missing)
    contact = map_contact(CONTACT, ENROLLMENT, ctx)
    other = map_contact(CONTACT.model_copy(update={"supporter_id": "S02"}), ENROLLMENT, ctx)
    kwargs = {"base_url": ctx.base_url, "program_id": ctx.program_id}
    assert missing_directory_entries([contact], missing, **kwargs) == ["supporter:S01"]
    assert missing_directory_entries([other], missing, **kwargs) == []
    no_org = replace(EXISTING, problems={organization_subject("demo-program"): (ORGANIZATION_NOT_FOUND, "none")})
    assert missing_directory_entries([other], no_org, **kwargs) == ["organization:demo-program"]
    # peersync's own directory: nothing ever waits
    assert missing_directory_entries([contact], Directory(), **kwargs) == []


def test_roles_refer_to_the_supporter_practitioner_when_not_written() -> None:
    ctx = context(replace(EXISTING, practitioner_ids={}, organization_id=None))
    # not found: still the supporter's own conditional reference (never sent: the unit waits in review)
    assert ctx.ref("PractitionerRole", KIND_ROLE, "S01")["reference"].startswith("Practitioner?identifier=")
    assert ctx.ref("Practitioner", KIND_STAFF, "S01")["reference"] == ctx.ref(
        "PractitionerRole", KIND_ROLE, "S01")["reference"]


# -- the search, once per run --------------------------------------------------------------------------------


def searchset(*resources: dict) -> dict:
    return {"resourceType": "Bundle", "type": "searchset",
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}


def practitioner(pid: str, npi: str) -> dict:
    return {"resourceType": "Practitioner", "id": pid, "identifier": [{"system": NPI_SYSTEM, "value": npi}]}


@responses.activate
def test_resolve_finds_exact_matches_in_one_search_and_names_what_is_missing(tmp_path: Path) -> None:
    system, value = ORG.split("|")
    responses.get(BASE + "/Organization", json=searchset(
        {"resourceType": "Organization", "id": "org-7", "identifier": [{"system": system, "value": value}]}))
    responses.get(BASE + "/Practitioner", json=searchset(
        practitioner("pr-1", "1234567893"),
        practitioner("pr-2a", "1111111112"), practitioner("pr-2b", "1111111112"),  # two share an NPI
        practitioner("x", "123456789"),  # not an exact match
    ))
    with Staging(tmp_path / "staging.sqlite") as staging:
        for s in (supporter("S01"), supporter("S02", "1111111112"), supporter("S03", "2222222220"),
                  supporter("S04", None)):
            staging.add(s, RowLocation("supporters.csv", 2))
        staging.flush()
        found = resolve_directory(FhirClient(BASE, retry=FAST), staging, replace(EXISTING, organization_id=None,
                                                                                 practitioner_ids={}), "demo-program")
    assert found.organization_id == "org-7"
    assert found.practitioner_ids == {"S01": "pr-1"}
    assert {s: reason for s, (reason, _) in found.problems.items()} == {
        "supporter:S02": PRACTITIONER_NOT_FOUND, "supporter:S03": PRACTITIONER_NOT_FOUND,
        "supporter:S04": PRACTITIONER_NOT_FOUND}
    assert "2 Practitioners have" in found.problems["supporter:S02"][1]
    assert "no npi in the source" in found.problems["supporter:S04"][1]
    assert len(responses.calls) == 2  # one Organization search, one Practitioner search for all supporters
    query = parse_qs(urlsplit(responses.calls[1].request.url).query)
    assert query["identifier"] == [f"{NPI_SYSTEM}|1111111112,{NPI_SYSTEM}|1234567893,{NPI_SYSTEM}|2222222220"]


@responses.activate
def test_resolve_reports_a_missing_organization(tmp_path: Path) -> None:
    responses.get(BASE + "/Organization", json=searchset())
    with Staging(tmp_path / "staging.sqlite") as staging:
        found = resolve_directory(FhirClient(BASE, retry=FAST), staging,
                                  Directory(organization_identifier=ORG), "demo-program")
    assert found.organization_id is None
    reason, detail = found.problems["organization:demo-program"]
    assert reason == ORGANIZATION_NOT_FOUND and "organization_identifier" in detail


# -- configuration -------------------------------------------------------------------------------------------


def write_config(tmp_path: Path, directory: str) -> Path:
    path = tmp_path / "peersync.toml"
    path.write_text(f"""
[source]
profile = "peersync-template"
inputs = ["in"]
[server]
base_url = "https://ehr.example.org/fhir"
[directory]
{directory}
""", encoding="utf-8")
    return path


def test_config_directory_modes(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, f'organization = "existing"\norganization_identifier = "{ORG}"\n'
                                                    'practitioners = "existing"'))
    directory = directory_of(settings)
    assert directory.organization_identifier == ORG and directory.practitioner_system == NPI_SYSTEM
    assert directory.write_roles is False  # roles follow the practitioners by default
    settings = load_settings(write_config(tmp_path, 'practitioners = "existing"\npractitioner_roles = "write"\n'
                                                    'practitioner_identifier_field = "staff_id"'))
    directory = directory_of(settings)
    assert directory.write_roles and directory.practitioner_field == "staff_id"
    assert not directory.existing_organization
    assert directory_of(load_settings(write_config(tmp_path, ""))) == Directory()


def test_config_existing_organization_needs_its_identifier(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="organization_identifier"):
        load_settings(write_config(tmp_path, 'organization = "existing"'))


# -- doctor --------------------------------------------------------------------------------------------------


class SearchOnly:
    """A client whose searches answer from a table (or raise what the server would)."""

    def __init__(self, answers: dict[str, list[dict] | Exception]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def search_raw(self, url: str) -> list[dict]:
        self.asked.append(url)
        answer = self.answers[url.split("?")[0]]
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_doctor_reports_the_directory_mode_and_checks_the_searches(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, f'organization = "existing"\norganization_identifier = "{ORG}"\n'
                                                    'practitioners = "existing"'))
    assert "Practitioner" not in written_types(settings) and "PractitionerRole" not in written_types(settings)
    assert "Organization" in written_types(settings)  # community organizations are still written
    report = Report(None)
    client = SearchOnly({"Organization": [{"resourceType": "Organization", "id": "org-7"}], "Practitioner": []})
    _check_directory(report, client, settings)
    checks = {c.name: c for c in report.checks}
    assert checks["directory.mode"].status is Status.PASS and "PractitionerRole: not written" in \
        checks["directory.mode"].detail
    assert checks["directory.organization"].status is Status.PASS and "Organization/org-7" in \
        checks["directory.organization"].detail
    assert checks["directory.practitioners"].status is Status.PASS
    assert "peersync-doctor-probe" in client.asked[1]  # the permission probe matches no one

    report = Report(None)
    refused = FhirHttpError("GET", "/Practitioner", 403, OutcomeSummary())
    _check_directory(report, SearchOnly({"Organization": [], "Practitioner": refused}), settings)
    checks = {c.name: c for c in report.checks}
    assert checks["directory.organization"].status is Status.FAIL
    assert "organization_identifier" in checks["directory.organization"].fix
    assert checks["directory.practitioners"].status is Status.FAIL
    assert "system/Practitioner.rs" in checks["directory.practitioners"].fix


def test_doctor_says_nothing_of_the_default_directory(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, ""))
    report = Report(None)
    _check_directory(report, SearchOnly({}), settings)
    assert report.checks == []
    assert written_types(settings) == WRITTEN_TYPES


def test_the_run_summary_warns_with_counts_only() -> None:
    problems = {"supporter:S01": (PRACTITIONER_NOT_FOUND, "no Practitioner has identifier x|1"),
                "supporter:S02": (PRACTITIONER_NOT_FOUND, "the supporter has no npi"),
                "organization:p": (ORGANIZATION_NOT_FOUND, "no Organization")}
    warnings = directory_warnings(replace(EXISTING, problems=problems))
    assert warnings == [
        "the program's Organization was not found on the EHR (organization-not-found): the records that need it "
        "wait in review; see `peersync review list`",
        "2 supporter(s) have no Practitioner on the EHR (practitioner-not-found): the records that need it wait in "
        "review; see `peersync review list`"]
    assert directory_warnings(EXISTING) == []
