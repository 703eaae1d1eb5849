"""`config check` (offline) and `doctor` (against `responses` stubs of a FHIR server and token endpoint)."""

from __future__ import annotations

import copy
import os
import sqlite3
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
import requests
import responses
from filelock import FileLock

from connector.auth.keys import generate_keypair
from connector.errors import ExitCode
from connector.ops.doctor import WRITTEN_TYPES, Report, Status, check_config, run_doctor

REPO = Path(__file__).resolve().parents[2]
DEMO_INPUTS = REPO / "fixtures" / "demo" / "template"
BASE = "https://ehr.example.org/fhir"
TOKEN_URL = "https://ehr.example.org/oauth2/token"
ACCESS_TOKEN = "at-9f8e7d6c5b4a-secret-token"


pytestmark = pytest.mark.usefixtures("peersync_env")


def config(tmp_path: Path, *, server: str = f'base_url = "{BASE}"', auth: str = 'mode = "none"',
           extra: str = "", inputs: str | None = None) -> Path:
    path = tmp_path / "peersync.toml"
    path.write_text(f"""
[source]
profile = "peersync-template"
inputs = [{inputs or repr(str(DEMO_INPUTS)).replace("'", '"')}]

[server]
{server}

[auth]
{auth}

[sync]
ledger = "state/ledger.sqlite"
{extra}
""", encoding="utf-8")
    return path


def by_name(report: Report, name: str) -> list:
    return [c for c in report.checks if c.name == name]


def one(report: Report, name: str) -> Any:
    found = by_name(report, name)
    assert len(found) == 1, f"{name}: {[(c.name, c.status, c.detail) for c in report.checks]}"
    return found[0]


# -- CapabilityStatement stubs ------------------------------------------------------------------------------


def capability(*, fhir_version: str = "4.0.1", transaction: bool = True, conditional: bool = True,
               drop: tuple[str, ...] = (), no_conditional: tuple[str, ...] = (),
               no_identifier: tuple[str, ...] = (), undeclared: tuple[str, ...] = ()) -> dict[str, Any]:
    resources = []
    for resource_type in ("Patient", *WRITTEN_TYPES):
        if resource_type in drop:
            continue
        entry: dict[str, Any] = {
            "type": resource_type,
            "interaction": [{"code": c} for c in ("read", "vread", "update", "create", "search-type")],
            "searchParam": [{"name": "_id", "type": "token"}] +
            ([] if resource_type in no_identifier else [{"name": "identifier", "type": "token"}]),
        }
        if resource_type in undeclared:
            del entry["searchParam"]
        if conditional and resource_type not in no_conditional:
            entry["conditionalUpdate"] = True
        resources.append(entry)
    rest: dict[str, Any] = {"mode": "server", "resource": resources}
    if transaction:
        rest["interaction"] = [{"code": "transaction"}, {"code": "history-system"}]
    return {"resourceType": "CapabilityStatement", "status": "active", "fhirVersion": fhir_version,
            "software": {"name": "Stub FHIR", "version": "1.0"}, "rest": [rest]}


def stub_server(rsps: responses.RequestsMock, statement: dict[str, Any] | None = None, *,
                date: str | None = None) -> None:
    headers = {"Date": date or formatdate(usegmt=True)}
    rsps.add(responses.GET, f"{BASE}/metadata", json=statement or capability(), headers=headers)
    rsps.add(responses.GET, f"{BASE}/Patient", json={"resourceType": "Bundle", "type": "searchset", "total": 0})


def doctor(path: Path, statement: dict[str, Any] | None = None, **kwargs: Any) -> Report:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        stub_server(rsps, statement, **kwargs)
        return run_doctor(path)


# -- config check (offline) ---------------------------------------------------------------------------------


def test_good_config_passes(tmp_path: Path) -> None:
    report = check_config(config(tmp_path, server='base_url = "http://127.0.0.1:8089/fhir"'))
    assert report.exit_code() == 0 and not report.failed()
    assert {c.status for c in report.checks} == {Status.PASS}
    assert one(report, "source.profile").detail.endswith("(supporter, enrollment, goal, goal_note, contact, "
                                                         "referral, planned_contact)")
    assert "first sync creates it" in one(report, "ledger").detail


@pytest.mark.parametrize(("text", "name", "detail", "fix"), [
    ('[source]\nprofile = "x"\ninputs = []\ncolour = 1\n[server]\nbase_url = "https://a.example"\n',
     "source.colour", "peersync.toml:4: unknown setting", "remove it"),
    ('[source]\nprofile = "x"\ninputs = []\n[server]\nbase_url = "https://a.example"\ntimeout_seconds = "x"\n',
     "server.timeout_seconds", "peersync.toml:6: Input should be a valid number", "correct the value"),
    ('[source]\nprofile = "x"\ninputs = []\n[server]\ntimeout_seconds = 5\n',
     "server.base_url", "peersync.toml:4: Field required", "add `base_url = ...` under [server]"),
    ('[source]\nprofile = "x"\ninputs = []\n',
     "server", "peersync.toml: Field required", "add a [server] section with base_url = ..."),
    ("[source\n", "config.file", "not valid TOML", "fix the file"),
])
def test_schema_problems(tmp_path: Path, text: str, name: str, detail: str, fix: str) -> None:
    path = tmp_path / "peersync.toml"
    path.write_text(text, encoding="utf-8")
    report = check_config(path)
    check = one(report, name)
    assert check.status is Status.FAIL and detail in check.detail and fix in check.fix
    assert report.exit_code() == ExitCode.CONFIG_ERROR


def test_missing_config_file(tmp_path: Path) -> None:
    report = check_config(tmp_path / "nope.toml")
    assert one(report, "config.file").status is Status.FAIL and report.exit_code() == 78


def test_plain_http_to_a_remote_host(tmp_path: Path) -> None:
    report = check_config(config(tmp_path, server='base_url = "http://ehr.example.org/fhir"'))
    check = one(report, "server.base_url")
    assert check.status is Status.FAIL and "refusing plain http://" in check.detail and "https://" in check.fix
    allowed = check_config(config(tmp_path, server='base_url = "http://ehr.example.org/fhir"\n'
                                                   "allow_insecure_http = true"))
    assert one(allowed, "server.base_url").status is Status.WARN and allowed.exit_code() == 0


def test_credentials_in_the_url(tmp_path: Path) -> None:
    report = check_config(config(tmp_path, server='base_url = "https://user:pw@ehr.example.org/fhir"'))
    check = one(report, "server.base_url")
    assert check.status is Status.FAIL and "pw" not in check.detail


def test_tls_settings(tmp_path: Path) -> None:
    report = check_config(config(tmp_path, server=f'base_url = "{BASE}"\nca_bundle = "missing-ca.pem"'))
    assert one(report, "server.ca_bundle").status is Status.FAIL
    report = check_config(config(tmp_path, server=f'base_url = "{BASE}"\nverify_tls = false'))
    assert one(report, "server.verify_tls").status is Status.WARN


def test_missing_empty_and_world_readable_secret_files(tmp_path: Path) -> None:
    report = check_config(config(tmp_path, auth='mode = "bearer"\ntoken_file = "secrets/token"'))
    check = one(report, "auth.token_file")
    assert check.status is Status.FAIL and "does not exist" in check.detail and report.exit_code() == 78
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "token").write_text("", encoding="utf-8")
    assert "is empty" in one(check_config(config(tmp_path, auth='mode = "bearer"\ntoken_file = "secrets/token"')),
                             "auth.token_file").detail
    (tmp_path / "secrets" / "token").write_text("tok-123456", encoding="utf-8")
    os.chmod(tmp_path / "secrets" / "token", 0o644)
    report = check_config(config(tmp_path, auth='mode = "bearer"\ntoken_file = "secrets/token"'))
    assert one(report, "auth.token_file").status is Status.WARN and "chmod 400" in one(report, "auth.token_file").fix
    os.chmod(tmp_path / "secrets" / "token", 0o400)
    report = check_config(config(tmp_path, auth='mode = "bearer"\ntoken_file = "secrets/token"'))
    assert one(report, "auth.token_file").status is Status.PASS and report.exit_code() == 0
    assert "tok-123456" not in str(report.as_dict())


def test_inline_secret_is_a_warning(tmp_path: Path) -> None:
    report = check_config(config(tmp_path, auth='mode = "bearer"\ntoken = "tok-inline-123"'))
    check = one(report, "auth.token")
    assert check.status is Status.WARN and "auth.token_file" in check.fix
    assert "tok-inline-123" not in str(report.as_dict())


def test_private_key_checks(tmp_path: Path) -> None:
    key, _jwks = generate_keypair("ES384", "k1", tmp_path / "keys")
    smart = ('mode = "smart-backend"\nclient_id = "c1"\nkid = "k1"\nscope = "system/Goal.cu"\n'
             f'private_key_file = "{key}"')
    report = check_config(config(tmp_path, auth=smart))
    assert one(report, "auth.private_key").status is Status.PASS and "ES384" in one(report, "auth.private_key").detail
    assert report.exit_code() == 0
    report = check_config(config(tmp_path, auth=smart + '\nalg = "RS384"'))
    assert one(report, "auth.private_key").status is Status.FAIL
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n", encoding="utf-8")
    os.chmod(garbage, 0o600)
    report = check_config(config(tmp_path, auth=smart.replace(str(key), str(garbage))))
    check = one(report, "auth.private_key")
    assert check.status is Status.FAIL and "not a valid PEM private key" in check.detail
    assert report.exit_code() == 78


def test_profile_problems(tmp_path: Path) -> None:
    path = config(tmp_path)
    path.write_text(path.read_text().replace('"peersync-template"', '"no-such-profile"'), encoding="utf-8")
    check = one(check_config(path), "source.profile")
    assert check.status is Status.FAIL and "profile not found" in check.detail
    bad = tmp_path / "profile.yaml"
    bad.write_text("format_version: 1\nprogram: {}\n", encoding="utf-8")
    path.write_text(path.read_text().replace('"no-such-profile"', f'"{bad}"'), encoding="utf-8")
    failures = by_name(check_config(path), "source.profile")
    assert failures and all(c.status is Status.FAIL for c in failures)
    assert any(f"{bad}:2:" in c.detail for c in failures) and "peersync profile check" in failures[0].fix


def test_inputs_missing_is_a_warning(tmp_path: Path) -> None:
    report = check_config(config(tmp_path, inputs='"exports/"'))
    assert one(report, "source.inputs").status is Status.WARN and report.exit_code() == 0


def test_ledger_folder_not_writable(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    path = config(tmp_path)
    path.write_text(path.read_text().replace('"state/ledger.sqlite"', '"afile/ledger.sqlite"'), encoding="utf-8")
    check = one(check_config(path), "sync.ledger")
    assert check.status is Status.FAIL and "is a file, not a folder" in check.detail


def test_corrupt_and_newer_ledgers(tmp_path: Path) -> None:
    path = config(tmp_path)
    (tmp_path / "state").mkdir()
    ledger = tmp_path / "state" / "ledger.sqlite"
    ledger.write_bytes(b"this is not sqlite" * 100)
    check = one(check_config(path), "ledger")
    assert check.status is Status.FAIL and "mv " in check.fix
    ledger.unlink()
    db = sqlite3.connect(ledger)
    db.execute("PRAGMA user_version = 99")
    db.close()
    check = one(check_config(path), "ledger")
    assert check.status is Status.FAIL and "upgrade peersync" in check.fix


def test_unknown_environment_variable_and_secrets_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "peersync_sync__concurrency").write_text("2", encoding="utf-8")
    monkeypatch.setenv("PEERSYNC_SECRETS_DIR", str(secrets))
    monkeypatch.setenv("PEERSYNC_SERVERR__BASE_URL", "https://typo.example")
    report = check_config(config(tmp_path))
    assert one(report, "config.env").status is Status.WARN and "PEERSYNC_SERVERR__BASE_URL" in one(
        report, "config.env").detail
    assert "sync.concurrency is read from" in one(report, "config.secrets_dir").detail


def test_env_override_problem_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEERSYNC_SERVER__TIMEOUT_SECONDS", "soon")
    check = one(check_config(config(tmp_path)), "server.timeout_seconds")
    assert check.detail.startswith("environment variable PEERSYNC_SERVER__TIMEOUT_SECONDS:")


# -- doctor -------------------------------------------------------------------------------------------------


def test_doctor_all_good(tmp_path: Path) -> None:
    report = doctor(config(tmp_path))
    assert report.exit_code() == 0, [(c.name, c.status, c.detail) for c in report.checks if c.status != "pass"]
    assert one(report, "server.reachable").status is Status.PASS and "Stub FHIR 1.0" in one(
        report, "server.reachable").detail
    assert one(report, "server.fhir_version").status is Status.PASS
    assert one(report, "server.transaction").status is Status.PASS
    for resource_type in ("Patient", *WRITTEN_TYPES):
        assert one(report, f"server.{resource_type}").status is Status.PASS
    assert one(report, "auth.probe").status is Status.PASS and one(report, "ledger.lock").status is Status.PASS
    assert one(report, "host.clock").status is Status.PASS
    assert one(report, "auth.mode").status is Status.WARN  # no auth to a remote server
    assert report.as_dict()["ok"] is True


def test_missing_conditional_update_warns_naming_the_fallback(tmp_path: Path) -> None:
    report = doctor(config(tmp_path), capability(no_conditional=("Goal", "Task")))
    for resource_type in ("Goal", "Task"):
        check = one(report, f"server.{resource_type}")
        assert check.status is Status.WARN
        assert "no conditionalUpdate: sync falls back to search-then-write" in check.detail
    assert one(report, "server.CarePlan").status is Status.PASS
    assert report.exit_code() == 0


def test_missing_conditional_update_fails_when_conditional_is_forced(tmp_path: Path) -> None:
    path = config(tmp_path, server=f'base_url = "{BASE}"\nwrite_mode = "conditional"')
    report = doctor(path, capability(no_conditional=("Goal",)))
    assert one(report, "server.Goal").status is Status.FAIL and 'write_mode = "auto"' in one(report, "server.Goal").fix
    assert report.exit_code() == 78


def test_no_system_interactions_warns_that_transactions_are_assumed(tmp_path: Path) -> None:
    report = doctor(config(tmp_path), capability(transaction=False))
    check = one(report, "server.transaction")
    assert check.status is Status.WARN and "assumes transactions" in check.detail and "batch" in check.fix
    assert one(report, "server.write_strategy").detail.startswith("transaction: auto:")


def batch_only() -> dict[str, Any]:
    statement = capability()
    statement["rest"][0]["interaction"] = [{"code": "batch"}]
    return statement


def test_a_batch_only_server_is_written_in_batches_with_references_peersync_resolves(tmp_path: Path) -> None:
    report = doctor(config(tmp_path), batch_only())
    assert one(report, "server.transaction").status is Status.PASS
    strategy = one(report, "server.write_strategy")
    assert strategy.status is Status.PASS and strategy.detail.startswith("batch: auto: the server declares batch")
    assert "peersync resolves references" in strategy.detail
    assert report.exit_code() == 0


def test_a_forced_transaction_on_a_server_without_one_fails(tmp_path: Path) -> None:
    path = config(tmp_path, server=f'base_url = "{BASE}"\nwrite_strategy = "transaction"')
    report = doctor(path, batch_only())
    check = one(report, "server.transaction")
    assert check.status is Status.FAIL and 'write_strategy = "auto"' in check.fix
    assert report.exit_code() == ExitCode.CONFIG_ERROR


def test_not_r4_missing_types_and_search_parameters(tmp_path: Path) -> None:
    report = doctor(config(tmp_path), capability(fhir_version="3.0.2", drop=("Task",), no_identifier=("Goal",),
                                                 undeclared=("Device",)))
    assert one(report, "server.fhir_version").status is Status.FAIL
    assert one(report, "server.Task").status is Status.FAIL and "not in the CapabilityStatement" in one(
        report, "server.Task").detail
    assert one(report, "server.Goal").status is Status.FAIL and "identifier" in one(report, "server.Goal").detail
    assert one(report, "server.Device").status is Status.WARN
    assert report.exit_code() == 78


def test_server_unreachable_is_69(tmp_path: Path) -> None:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add(responses.GET, f"{BASE}/metadata", body=requests.exceptions.ConnectionError("refused"))
        report = run_doctor(config(tmp_path))
    check = one(report, "server.reachable")
    assert check.status is Status.FAIL and "ConnectionError" in check.detail and "curl" in check.fix
    assert one(report, "auth").status is Status.SKIP
    assert report.exit_code() == ExitCode.SERVER_UNAVAILABLE


def test_server_errors_and_wrong_base(tmp_path: Path) -> None:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add(responses.GET, f"{BASE}/metadata", status=503)
        assert run_doctor(config(tmp_path)).exit_code() == 69
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add(responses.GET, f"{BASE}/metadata", status=404, body="<html>not here</html>")
        report = run_doctor(config(tmp_path))
        assert one(report, "server.metadata").status is Status.FAIL and report.exit_code() == 78
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add(responses.GET, f"{BASE}/metadata", body=requests.exceptions.SSLError("bad cert"))
        report = run_doctor(config(tmp_path))
        assert "TLS verification failed" in one(report, "server.reachable").detail and report.exit_code() == 78


def test_clock_skew_warns(tmp_path: Path) -> None:
    import time

    report = doctor(config(tmp_path), date=formatdate(time.time() - 600, usegmt=True))
    check = one(report, "host.clock")
    assert check.status is Status.WARN and "NTP" in check.fix and report.exit_code() == 0


def _client_credentials(tmp_path: Path, scope: str = "system/Patient.rs system/Goal.cu") -> Path:
    secret = tmp_path / "client-secret"
    secret.write_text("cs-very-secret-value\n", encoding="utf-8")
    os.chmod(secret, 0o400)
    return config(tmp_path, auth=f'mode = "client-credentials"\nclient_id = "peersync-test"\n'
                                 f'client_secret_file = "{secret}"\ntoken_url = "{TOKEN_URL}"\nscope = "{scope}"')


def test_auth_failure_is_77(tmp_path: Path) -> None:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        stub_server(rsps)
        rsps.add(responses.POST, TOKEN_URL, status=401, json={"error": "invalid_client"})
        report = run_doctor(_client_credentials(tmp_path))
    check = one(report, "auth")
    assert check.status is Status.FAIL and "invalid_client" in check.detail
    assert report.exit_code() == ExitCode.AUTH_FAILED
    assert "cs-very-secret-value" not in str(report.as_dict())


def test_auth_success_reports_scopes_never_the_token(tmp_path: Path) -> None:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        stub_server(rsps)
        rsps.add(responses.POST, TOKEN_URL, json={"access_token": ACCESS_TOKEN, "token_type": "bearer",
                                                  "expires_in": 300, "scope": "system/Patient.rs system/Goal.cu"})
        report = run_doctor(_client_credentials(tmp_path))
        probe = [c for c in rsps.calls if "/Patient" in c.request.url]
        assert probe and probe[0].request.headers["Authorization"] == f"Bearer {ACCESS_TOKEN}"
    auth = one(report, "auth")
    assert auth.status is Status.PASS and "granted: system/Patient.rs system/Goal.cu" in auth.detail
    scopes = one(report, "auth.scopes")
    assert scopes.status is Status.WARN and "system/Task.cu" in scopes.detail
    assert "system/Procedure" not in scopes.detail  # contacts are not written as Procedures by default
    condition = one(report, "auth.scopes.condition")
    assert condition.status is Status.WARN and "CarePlan.addresses" in condition.detail
    assert ACCESS_TOKEN not in str(report.as_dict()) and "cs-very-secret-value" not in str(report.as_dict())
    assert report.exit_code() == 0


@pytest.mark.parametrize("pull_section", ["", "[pull]\nclinical_facts = true\n"])
def test_pull_scopes_are_checked_only_where_pull_is_configured(tmp_path: Path, pull_section: str) -> None:
    secret = tmp_path / "client-secret"
    secret.write_text("cs-very-secret-value\n", encoding="utf-8")
    os.chmod(secret, 0o400)
    granted = "system/Patient.rs system/Goal.cu system/Task.rus system/ServiceRequest.rs system/Practitioner.rs"
    path = config(tmp_path, extra=pull_section,
                  auth=f'mode = "client-credentials"\nclient_id = "peersync-test"\nclient_secret_file = "{secret}"\n'
                       f'token_url = "{TOKEN_URL}"\nscope = "{granted}"')
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        stub_server(rsps)
        rsps.add(responses.POST, TOKEN_URL, json={"access_token": ACCESS_TOKEN, "token_type": "bearer",
                                                  "expires_in": 300, "scope": granted})
        report = run_doctor(path)
    if not pull_section:  # a sync-only site: no warning about scopes it never needs
        assert by_name(report, "auth.scopes.pull") == []
        return
    check = one(report, "auth.scopes.pull")
    assert check.status is Status.WARN
    # pull's first request is Organization?identifier=; Task:requester may include a PractitionerRole or an
    # Organization; with clinical facts, Observations and Appointments
    assert check.detail.split("needs ", 1)[1].split() == ["system/Organization.rs", "system/PractitionerRole.rs",
                                                          "system/Observation.rs", "system/Appointment.rs"]


def test_written_types_follow_contact_procedures() -> None:
    from types import SimpleNamespace

    from connector.ops.config import DirectorySettings
    from connector.ops.doctor import WRITTEN_TYPES, written_types

    def types(procedures: str) -> tuple[str, ...]:
        settings = SimpleNamespace(server=SimpleNamespace(contact_procedures=procedures),
                                   directory=DirectorySettings())
        return written_types(settings)  # type: ignore[arg-type]

    assert types("off") == WRITTEN_TYPES
    assert types("also") == (*WRITTEN_TYPES, "Procedure")
    assert "Communication" not in types("instead") and "Procedure" in types("instead")


def test_probe_refused_is_77(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("static-token-123", encoding="utf-8")
    os.chmod(token, 0o400)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add(responses.GET, f"{BASE}/metadata", json=capability())
        rsps.add(responses.GET, f"{BASE}/Patient", status=403)
        report = run_doctor(config(tmp_path, auth=f'mode = "bearer"\ntoken_file = "{token}"'))
    assert one(report, "auth.probe").status is Status.FAIL and report.exit_code() == 77


def test_metadata_behind_auth_is_read_after_the_token(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("static-token-123", encoding="utf-8")
    os.chmod(token, 0o400)
    statement = capability()

    def metadata(request: Any) -> tuple[int, dict, str]:
        import json

        if request.headers.get("Authorization") != "Bearer static-token-123":
            return 401, {}, ""
        return 200, {}, json.dumps(statement)

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add_callback(responses.GET, f"{BASE}/metadata", callback=metadata)
        rsps.add(responses.GET, f"{BASE}/Patient", json={"resourceType": "Bundle", "type": "searchset"})
        report = run_doctor(config(tmp_path, auth=f'mode = "bearer"\ntoken_file = "{token}"'))
    assert "needs authentication" in one(report, "server.reachable").detail
    assert one(report, "server.transaction").status is Status.PASS and report.exit_code() == 0


def test_config_failure_skips_the_server(tmp_path: Path) -> None:
    report = run_doctor(config(tmp_path, server='base_url = "http://ehr.example.org/fhir"'))
    assert one(report, "server").status is Status.SKIP and report.exit_code() == 78


def test_broken_auth_config_still_checks_the_server(tmp_path: Path) -> None:
    path = config(tmp_path, auth='mode = "bearer"\ntoken_file = "missing-token"')
    report = doctor(path)
    assert one(report, "server.transaction").status is Status.PASS
    assert one(report, "auth").status is Status.SKIP and report.exit_code() == 78


def test_lock_held_warns(tmp_path: Path) -> None:
    path = config(tmp_path)
    (tmp_path / "state").mkdir()
    with FileLock(str(tmp_path / "state" / "ledger.sqlite.lock")):
        report = doctor(path)
    assert one(report, "ledger.lock").status is Status.WARN and report.exit_code() == 0


def test_exit_code_precedence() -> None:
    report = Report(None)
    report.add("a", Status.FAIL, "server", exit_code=ExitCode.SERVER_UNAVAILABLE)
    report.add("b", Status.FAIL, "auth", exit_code=ExitCode.AUTH_FAILED)
    assert report.exit_code() == 77
    report.add("c", Status.FAIL, "config")
    assert report.exit_code() == 78
    assert Report(None).exit_code() == 0
    data = copy.deepcopy(report.as_dict())
    assert data["counts"] == {"pass": 0, "warn": 0, "fail": 3, "skip": 0} and data["ok"] is False


def test_config_check_never_touches_the_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("config check opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    key, _jwks = generate_keypair("RS384", "k2", tmp_path / "keys")
    smart = ('mode = "smart-backend"\nclient_id = "c1"\nkid = "k2"\nscope = "system/Goal.cu"\n'
             f'private_key_file = "{key}"\njku = "https://keys.example.org/jwks.json"')
    report = check_config(config(tmp_path, auth=smart))
    assert report.exit_code() == 0, [(c.name, c.detail) for c in report.checks if c.status is Status.FAIL]


# -- issue 20 / issue 14 item 9: the right fix for the token URL and for a ledger this user cannot write ----------


@pytest.mark.parametrize("status", [404, 405])
def test_a_token_endpoint_that_is_not_there_says_check_token_url(tmp_path: Path, status: int) -> None:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        stub_server(rsps)
        rsps.add(responses.POST, TOKEN_URL, status=status, body="<html>Not Found</html>")
        report = run_doctor(_client_credentials(tmp_path))
    check = one(report, "auth")
    assert check.status is Status.FAIL and "check auth.token_url" in check.fix and "auth.token_url" in check.detail
    assert "credentials" not in check.fix and report.exit_code() == ExitCode.CONFIG_ERROR


def test_a_mistyped_setting_in_the_environment_is_reported_once(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEERSYNC_SERVER__BASEURL", "https://typo.example")
    report = check_config(config(tmp_path))
    mentions = [c for c in report.checks if "PEERSYNC_SERVER__BASEURL" in c.detail]
    assert [(c.name, c.status) for c in mentions] == [("server.baseurl", Status.FAIL)]


def test_a_ledger_in_a_read_only_folder_gets_the_permission_fix_not_move_it_aside(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import connector.plan.ledger
    from connector.plan.ledger import Ledger

    path = config(tmp_path)
    with Ledger(tmp_path / "state" / "ledger.sqlite"):
        pass
    state = tmp_path / "state"
    real_access = os.access
    # The tests run as root, for whom every folder is writable: the folder's permission bits are simulated.
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != state and real_access(p, mode, **kw))
    monkeypatch.setattr(connector.plan.ledger.os, "access", os.access)
    report = check_config(path)
    (failed,) = [c for c in report.checks if c.status is Status.FAIL]
    assert f"the folder {state} is not writable" in failed.detail and report.exit_code() == ExitCode.CONFIG_ERROR
    assert "write access" in failed.fix and "do not move the ledger aside" in failed.fix
    assert "mv " not in str(report.as_dict())


def test_a_read_only_wal_file_gets_the_permission_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from connector.plan.ledger import Ledger

    path = config(tmp_path)
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite")  # kept open: its -wal file exists
    try:
        wal = tmp_path / "state" / "ledger.sqlite-wal"
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != wal and real_access(p, mode, **kw))
        check = one(check_config(path), "ledger")
    finally:
        ledger.close()
    assert check.status is Status.FAIL and "ledger.sqlite-wal" in check.detail
    assert "do not move the ledger aside" in check.fix and "write access" in check.fix


# -- ledger matches server (a sample read back, as peersync verify does) -------------------------------------


def ledger_with_sent_goals(tmp_path: Path, n: int) -> None:
    from connector.plan.ledger import Ledger

    with Ledger(tmp_path / "state" / "ledger.sqlite") as ledger:
        for i in range(n):
            ledger.record_confirmed(f"goal:G{i}", kind="goal", participant="E1", unit_hash="h", voided=False,
                                    patient_id="p", resources=[("Goal", "https://x/sid/goal", f"G{i}", str(i), "1")],
                                    detail="201", run_id="r")


def doctor_with_goals(tmp_path: Path, goals: list[dict[str, Any]]) -> Report:
    path = config(tmp_path)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        stub_server(rsps)
        rsps.add(responses.GET, f"{BASE}/Goal", json={"resourceType": "Bundle", "type": "searchset",
                                                       "entry": [{"resource": g} for g in goals]})
        return run_doctor(path)


def goal(server_id: int, version: str = "1") -> dict[str, Any]:
    return {"resourceType": "Goal", "id": str(server_id), "meta": {"versionId": version}}


def test_doctor_passes_when_the_sampled_ledger_resources_are_on_the_server(tmp_path: Path) -> None:
    ledger_with_sent_goals(tmp_path, 3)
    check = one(doctor_with_goals(tmp_path, [goal(i) for i in range(3)]), "ledger.server")
    assert check.status is Status.PASS and "3 sampled resources" in check.detail


def test_doctor_fails_with_the_repair_advice_when_the_server_lost_what_the_ledger_says_it_has(tmp_path: Path) -> None:
    ledger_with_sent_goals(tmp_path, 30)
    report = doctor_with_goals(tmp_path, [])  # a restored or refreshed server: nothing of ours is there
    check = one(report, "ledger.server")
    assert check.status is Status.FAIL and "20 of 20 sampled resources" in check.detail
    assert "peersync verify --repair" in check.fix
    assert report.exit_code() == 65


def test_doctor_warns_when_sampled_resources_were_edited_on_the_server(tmp_path: Path) -> None:
    ledger_with_sent_goals(tmp_path, 2)
    report = doctor_with_goals(tmp_path, [goal(0), goal(1, "2")])
    check = one(report, "ledger.server")
    assert check.status is Status.WARN and "1 of 2 sampled resources were changed" in check.detail
    assert report.exit_code() == 0


def test_deprecated_terminology_base_is_a_warning_naming_the_one_base(tmp_path: Path) -> None:
    path = config(tmp_path)
    path.write_text(path.read_text() + '\n[program]\nterminology_base = "https://fhir.example.org/ps"\n',
                    encoding="utf-8")
    check = one(check_config(path), "program.terminology_base")
    assert check.status is Status.WARN and "deprecated and ignored" in check.detail
    assert "https://peersync.github.io/fhir" in check.detail and "remove terminology_base" in check.fix
    assert not by_name(check_config(config(tmp_path)), "program.terminology_base")
