"""`peersync validate` against the local HAPI server: US Core loaded from the repository, a program that
validates (exit 0), a resource that does not (exit 65), and a server that is not there (exit 69)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from connector.cli import main
from connector.errors import ExitCode
from connector.ops import validate as checks
from connector.wiring import anonymous_client
from tests.demogen import generate_program

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small seeded demo program in the template format (the demo's shape, fewer rows)."""
    folder = tmp_path_factory.mktemp("validate-program")
    generate_program(folder, fmt="template", participants=3, months=2)
    return folder


def _validate(*args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(main, ["validate", "--json", *args])
    assert result.exit_code in (0, 65), result.output
    return result.exit_code, json.loads(result.stdout)


def test_validate_loads_us_core_and_passes_the_program(fhir_base_url: str, program: Path) -> None:
    code, data = _validate("--load-us-core", "--server", fhir_base_url, "--profile", "peersync-template",
                           str(program))
    assert code == ExitCode.OK and data["errors"] == 0, data["groups"][:5]
    assert data["mode"] == "server"
    # every resource type was checked against base R4, those with a US Core profile against it too
    us_core_checks = sum(n for t, n in data["resources"].items() if t in checks.US_CORE_PROFILES)
    assert data["checks"] == sum(data["resources"].values()) + us_core_checks
    assert {"Goal", "CareTeam", "Provenance", "Communication"} <= set(data["resources"])
    assert not checks.missing_profiles(anonymous_client(fhir_base_url))


def test_an_invalid_resource_is_an_error(fhir_base_url: str) -> None:
    client = anonymous_client(fhir_base_url)
    checks.load_us_core(client)
    goal = {"resourceType": "Goal", "lifecycleStatus": "active", "description": {"text": "walk"},
            "subject": {"reference": "Patient/example"}, "target": [{"dueDate": "not a date"}]}
    report = checks.validate_on_server(client, [goal])
    assert report.exit_code() is ExitCode.RECORDS_REJECTED
    errors = [g for g in report.groups() if g["severity"] == "error"]
    assert errors and all(g["resource_type"] == "Goal" for g in errors)
    assert "not a date" not in json.dumps(report.as_dict())  # values never reach the report


def test_an_unreachable_server_is_69(program: Path) -> None:
    result = CliRunner().invoke(main, ["validate", "--server", "http://127.0.0.1:9/fhir", "--base-only",
                                       "--profile", "peersync-template", str(program)])
    assert result.exit_code == ExitCode.SERVER_UNAVAILABLE, result.output
