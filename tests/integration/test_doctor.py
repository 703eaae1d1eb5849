"""`peersync doctor` and `config check` against the real local HAPI server, as a separate process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from connector.identifiers import token_query
from connector.ops.landed import PROGRAM_RESOURCES
from connector.plan.ledger import SCHEMA_VERSION

from .syncutil import demo_enrollments, make_program, trim_inputs

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "docs" / "examples"


def peersync(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("PEERSYNC_")}
    clean["PEERSYNC_SECRETS_DIR"] = ""
    clean.update(env or {})
    return subprocess.run([sys.executable, "-m", "connector.cli", *args], capture_output=True, text=True,
                          env=clean, cwd=cwd, timeout=300, check=False)


def checks(stdout: str) -> dict[str, dict]:
    data = json.loads(stdout)
    return {c["name"]: c for c in data["checks"]}


def test_doctor_passes_against_the_local_server(tmp_path: Path, fhir_base_url: str) -> None:
    program = make_program(tmp_path, fhir_base_url)
    result = peersync("doctor", "--config", str(program.config), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    found = checks(result.stdout)
    for name in ("server.reachable", "server.fhir_version", "server.transaction", "auth", "auth.probe",
                 "server.Patient", "server.Goal", "server.Provenance", "ledger", "ledger.lock"):
        assert found[name]["status"] == "pass", found[name]
    assert found["server.fhir_version"]["detail"].startswith("FHIR 4.0.")
    # HAPI JPA offers conditional update and identifier search on every type peersync writes.
    for name, check in found.items():
        if name.startswith("server.") and name not in ("server.reachable", "server.base_url"):
            assert check["status"] == "pass", check
    table = peersync("doctor", "--config", str(program.config))
    assert table.returncode == 0 and "PASS    server.transaction" in table.stdout


def test_doctor_after_a_sync_reports_the_ledger(tmp_path: Path, fhir_base_url: str) -> None:
    program = make_program(tmp_path, fhir_base_url)
    sync = peersync("sync", "--config", str(program.config), "--json")
    assert sync.returncode == 65, sync.stderr  # the demo has bad rows and review cases
    result = peersync("doctor", "--config", str(program.config), "--json")
    assert result.returncode == 0
    assert f"schema version {SCHEMA_VERSION}, 1 run(s) recorded" in checks(result.stdout)["ledger"]["detail"]
    status = json.loads(peersync("status", "--config", str(program.config), "--json").stdout)
    assert status["last_success"]["run_id"] == json.loads(sync.stdout)["run_id"]
    assert status["backlog"]["in_review"] > 0 and status["backlog"]["open_reviews"] == 2


def test_local_example_config_works_against_the_server(tmp_path: Path, fhir_base_url: str) -> None:
    env = {"PEERSYNC_SERVER__BASE_URL": fhir_base_url, "PEERSYNC_SYNC__LEDGER": str(tmp_path / "ledger.sqlite"),
           "PEERSYNC_OUTPUT__REJECTS_DIR": str(tmp_path / "rejects"),
           "PEERSYNC_OUTPUT__METRICS_FILE": str(tmp_path / "peersync.prom")}
    check = peersync("config", "check", str(EXAMPLES / "local-hapi.toml"), env=env)
    assert check.returncode == 0, check.stdout
    result = peersync("doctor", "--config", str(EXAMPLES / "local-hapi.toml"), "--json", env=env)
    assert result.returncode == 0, result.stdout


def test_doctor_unreachable_server_exits_69(tmp_path: Path, fhir_base_url: str) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    program = make_program(tmp_path, fhir_base_url)
    result = peersync("doctor", "--config", str(program.config), "--json",
                      env={"PEERSYNC_SERVER__BASE_URL": f"http://127.0.0.1:{port}/fhir"})
    assert result.returncode == 69
    found = checks(result.stdout)
    assert found["server.reachable"]["status"] == "fail" and found["auth"]["status"] == "skip"


def test_doctor_wrong_base_url_exits_78(tmp_path: Path, fhir_base_url: str) -> None:
    program = make_program(tmp_path, fhir_base_url)
    wrong = fhir_base_url.rsplit("/", 1)[0] + "/not-fhir"
    result = peersync("doctor", "--config", str(program.config), "--json",
                      env={"PEERSYNC_SERVER__BASE_URL": wrong})
    assert result.returncode == 78, result.stdout
    assert checks(result.stdout)["server.metadata"]["status"] == "fail"


def test_doctor_fails_after_the_server_lost_the_programs_resources(tmp_path: Path, fhir_base_url: str) -> None:
    program = make_program(tmp_path, fhir_base_url)
    trim_inputs(program.inputs, set(demo_enrollments()[:3]))  # a small program: deleting it from the server is quick
    program.sync()
    assert json.loads(peersync("doctor", "--config", str(program.config), "--json").stdout)["exit_code"] == 0
    ctx = program.context()
    for resource_type, kind, _ in PROGRAM_RESOURCES:  # as a refreshed test EHR: the program's resources are gone
        query = f"identifier={token_query(ctx.system(kind), '')}&_cascade=delete"
        response = requests.delete(f"{fhir_base_url}/{resource_type}?{query}", timeout=300)
        assert response.status_code in (200, 204), response.text[:300]
    result = peersync("doctor", "--config", str(program.config), "--json")
    check = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "ledger.server")
    assert check["status"] == "fail" and "peersync verify --repair" in check["fix"]
    assert result.returncode == 65
