"""`peersync validate`: findings from OperationOutcomes, grouping, value-free messages, the offline structure
check and the command's exit codes (the server side runs in tests/integration/test_validate_command.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from connector.cli import main
from connector.errors import ConfigError, ExitCode
from connector.ops import validate as v

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "fixtures" / "demo" / "template"


def test_messages_keep_canonicals_and_constraints_but_lose_values() -> None:
    assert v.clean_message("The value 'Rosa Lopez' is not valid") == "The value <value> is not valid"
    assert v.clean_message("Unable to resolve Patient?identifier=https://x|MRN-0001 here") == \
        "Unable to resolve <value> here"
    unknown = "CodeSystem is unknown and can't be validated: http://loinc.org for 'http://loinc.org#41950-7'"
    assert v.clean_message(unknown) == \
        "CodeSystem is unknown and can\u2019t be validated: http://loinc.org for 'http://loinc.org#41950-7'"
    constraint = "Constraint failed: dom-6: 'A resource should have narrative' (defined in http://hl7.org/x)"
    assert "dom-6: \u2018A resource should have narrative\u2019" in v.clean_message(constraint)


def test_findings_from_an_outcome() -> None:
    outcome = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "fatal", "code": "structure", "diagnostics": "bad 'secret'", "expression": ["Goal.target[0]"]},
        {"severity": "warning", "code": "invariant", "details": {"text": "check me"}, "location": ["Goal"]},
        {"severity": "information", "code": "informational"},
    ]}
    findings = v.findings_from_outcome(outcome, "Goal", "us-core-goal")
    assert findings == [
        v.Finding("error", "Goal", "us-core-goal", "bad <value>", "Goal.target"),
        v.Finding("warning", "Goal", "us-core-goal", "check me", "Goal"),
        v.Finding("information", "Goal", "us-core-goal", "informational", ""),
    ]


def test_groups_put_errors_first_and_count() -> None:
    report = v.ValidationReport("server", checks=4)
    report.findings = [
        v.Finding("warning", "Goal", "R4", "narrative", "Goal"),
        v.Finding("warning", "Goal", "R4", "narrative", "Goal"),
        v.Finding("error", "CareTeam", "us-core-careteam", "missing subject", "CareTeam.subject"),
    ]
    groups = report.groups()
    assert [(g["severity"], g["resource_type"], g["count"]) for g in groups] == [
        ("error", "CareTeam", 1), ("warning", "Goal", 2)]
    assert report.exit_code() is ExitCode.RECORDS_REJECTED
    assert report.as_dict()["errors"] == 1 and report.as_dict()["warnings"] == 2
    report.findings = report.findings[:2]
    assert report.exit_code() is ExitCode.OK


def test_profiles_for_a_type() -> None:
    assert v.profiles_for("Goal") == [
        ("R4", None), ("us-core-goal", "http://hl7.org/fhir/us/core/StructureDefinition/us-core-goal")]
    assert v.profiles_for("Communication") == [("R4", None)]
    assert v.profiles_for("Goal", us_core=False) == [("R4", None)]


def test_structure_check_finds_unknown_and_mistyped_elements_without_echoing_values() -> None:
    good = {"resourceType": "Goal", "lifecycleStatus": "active", "description": {"text": "walk"},
            "subject": {"reference": "Patient/1"}}
    assert v.structure_findings(good) == []
    bad = good | {"colour": "Rosa Lopez", "target": [{"dueDate": "not a date"}]}
    findings = v.structure_findings(bad)
    assert {f.location for f in findings} == {"Goal.colour", "Goal.target.dueDate"}
    assert all(f.severity == "error" and f.profile == v.STRUCTURE for f in findings)
    assert "Rosa" not in json.dumps([f.__dict__ for f in findings]) and "not a date" not in str(findings)
    assert v.structure_findings({"resourceType": "NoSuchThing"})[0].message == "unknown resource type"


class _FakeServer:
    """Answers $validate with one warning (two for US Core) and has the US Core profiles it is told of."""

    def __init__(self, profiles: bool) -> None:
        self.profiles = profiles
        self.calls: list[tuple[str, str | None]] = []

    def search_raw(self, query: str) -> list[dict[str, Any]]:
        return [{"resourceType": "StructureDefinition"}] if self.profiles else []

    def validate(self, resource: dict[str, Any], profile: str | None = None) -> dict[str, Any]:
        self.calls.append((resource["resourceType"], profile))
        issues = [{"severity": "warning", "diagnostics": "no narrative"}]
        if profile:
            issues.append({"severity": "error", "diagnostics": "missing must-support", "expression": ["Goal.x"]})
        return {"resourceType": "OperationOutcome", "issue": issues}


def test_validate_on_server_checks_base_and_us_core() -> None:
    server = _FakeServer(profiles=True)
    resources = [{"resourceType": "Goal"}, {"resourceType": "Communication"}]
    report = v.validate_on_server(server, resources)  # type: ignore[arg-type]
    assert server.calls == [("Goal", None), ("Goal", v.US_CORE_PROFILES["Goal"]), ("Communication", None)]
    assert report.checks == 3 and report.count("error") == 1 and report.count("warning") == 3
    assert dict(report.resources) == {"Goal": 1, "Communication": 1}


def test_validate_on_server_without_us_core_profiles_says_to_load_them() -> None:
    with pytest.raises(ConfigError, match="--load-us-core"):
        v.validate_on_server(_FakeServer(profiles=False), [{"resourceType": "Goal"}])  # type: ignore[arg-type]
    report = v.validate_on_server(_FakeServer(profiles=False), [{"resourceType": "Goal"}],  # type: ignore[arg-type]
                                  us_core=False)
    assert report.count("error") == 0


def test_us_core_resources_load_terminology_before_profiles() -> None:
    kinds = [r["resourceType"] for r in v.us_core_resources()]
    assert len(kinds) == 38 and kinds == sorted(kinds, key=["CodeSystem", "ValueSet", "StructureDefinition"].index)


def test_offline_validate_of_the_demo(peersync_env: None) -> None:
    result = CliRunner().invoke(main, ["validate", "--offline", "--json", "--profile", "peersync-template",
                                       str(DEMO)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["mode"] == "offline" and data["errors"] == 0 and data["exit_code"] == 0
    assert data["resources"]["Communication"] > 100 and data["read"]["rejected"] == 8


def test_validate_usage_errors(peersync_env: None) -> None:
    runner = CliRunner()
    assert runner.invoke(main, ["validate", "--profile", "peersync-template"]).exit_code == ExitCode.USAGE
    assert runner.invoke(main, ["validate", "--profile", "peersync-template", str(DEMO)]).exit_code == ExitCode.USAGE
    assert runner.invoke(main, ["validate", "--offline", "--profile", "no-such-profile", str(DEMO)]).exit_code == \
        ExitCode.CONFIG_ERROR
