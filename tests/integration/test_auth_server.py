"""peersync against a real authorization server (oidc-provider) and a HAPI server that enforces SMART scopes.

The fixture ``authenv`` (tests/integration/conftest.py, tests/authserver.py) starts oidc-provider with peersync's
clients, hosts their JWK Sets on a local URL, and starts a HAPI instance on its own port that validates every
bearer token against the authorization server's keys and enforces SMART system scopes per type and interaction.
docs/authentication.md ("Walk-through: a real authorization server") runs the same steps by hand.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import authserver
import pytest
import requests
from click.testing import CliRunner

from connector.auth.keys import load_private_key
from connector.auth.smart import CLIENT_ASSERTION_TYPE, SmartBackendAuth
from connector.cli import main
from connector.identifiers import reference_strings

from .conftest import NARROW_MISSING, SECRET_CLIENT_SECRET, SHORT_TOKEN_TTL_SECONDS, AuthEnv, KeyPair
from .syncutil import (
    Program,
    assert_clean_state,
    demo_enrollments,
    demo_summary,
    expected_identities,
    make_program,
    server_resources,
    trim_inputs,
)

pytestmark = pytest.mark.integration

DEMO_EXIT = 65  # the demo's bad rows and review participants
SUMMARY = demo_summary()
REVIEW = set(SUMMARY["unmatched_enrollments"]) | set(SUMMARY["ambiguous_enrollments"])


def peersync(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess, without the test environment's PEERSYNC_* settings."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("PEERSYNC_")}
    clean["PEERSYNC_SECRETS_DIR"] = ""
    return subprocess.run([sys.executable, "-m", "connector.cli", *args], capture_output=True, text=True,
                          env=clean, timeout=600, check=False)


def program_for(tmp_path: Path, env: AuthEnv, *, enrollments: int | None = None) -> Program:
    program = make_program(tmp_path, env.fhir_base_url, headers=env.admin_headers())
    if enrollments is not None:
        trim_inputs(program.inputs, set(demo_enrollments()[:enrollments]))
    return program


def use_smart(program: Program, client_id: str, key: KeyPair, *, token_url: str | None = None,
              extra: str = "") -> None:
    """[auth] smart-backend; without token_url, the token endpoint comes from HAPI's smart-configuration."""
    lines = [
        "[auth]", 'mode = "smart-backend"', f'client_id = "{client_id}"', f'private_key_file = "{key.private_key}"',
        f'kid = "{key.kid}"', f'scope = "{" ".join(authserver.SYNC_SCOPES)}"',
    ]
    if token_url:
        lines.append(f'token_url = "{token_url}"')
    set_auth(program, "\n".join(lines) + "\n" + extra)


def set_auth(program: Program, auth_section: str) -> None:
    text = program.config.read_text(encoding="utf-8").split("\n[auth]\n")[0]
    program.config.write_text(text + "\n" + auth_section + "\n", encoding="utf-8")


def sync(program: Program) -> subprocess.CompletedProcess[str]:
    return peersync("sync", "--config", str(program.config))


def unresolved_references(program: Program, resources: list[dict[str, Any]]) -> list[str]:
    """``Type/id -> reference`` for each stored reference that is not a literal one, or that the server (read
    with the harness's admin token) does not have."""
    stored = {f"{r['resourceType']}/{r['id']}" for r in resources}
    broken: list[str] = []
    for resource in resources:
        for reference in reference_strings(resource):
            if reference.startswith("#") or reference in stored:
                continue
            if "?" in reference or reference.count("/") != 1 or requests.get(
                    f"{program.base_url}/{reference}", headers=program.headers, timeout=60).status_code != 200:
                broken.append(f"{resource['resourceType']}/{resource['id']} -> {reference.split('?')[0]}")
    return broken


def versions_per_identifier(program: Program) -> Counter[str]:
    """How many versions each of the program's resources has on the server (1 = written once)."""
    found = server_resources(program)
    return Counter(resource["meta"]["versionId"] for resources in found.values() for resource in resources)


# -- the enforcing server itself --------------------------------------------------------------------------------------


def test_the_fhir_server_enforces_bearer_tokens_and_scopes(authenv: AuthEnv) -> None:
    base = authenv.fhir_base_url
    assert requests.get(f"{base}/metadata", timeout=60).status_code == 200  # stays open
    smart = requests.get(f"{base}/.well-known/smart-configuration", timeout=60).json()
    assert smart["token_endpoint"] == authenv.auth.token_url

    anonymous = requests.get(f"{base}/Patient", timeout=60)
    assert anonymous.status_code == 401 and "invalid_token" in anonymous.headers["WWW-Authenticate"]
    forged = requests.get(f"{base}/Patient", headers={"Authorization": "Bearer eyJhbGciOiJub25lIn0.e30."}, timeout=60)
    assert forged.status_code == 401

    token = authenv.auth.token("peersync-secret", SECRET_CLIENT_SECRET, "system/Patient.rs")
    headers = {"Authorization": f"Bearer {token}"}
    assert requests.get(f"{base}/Patient?_count=1", headers=headers, timeout=60).status_code == 200
    refused = requests.post(f"{base}/Goal", headers={**headers, "Content-Type": "application/fhir+json"},
                            json={"resourceType": "Goal", "lifecycleStatus": "active",
                                  "description": {"text": "x"}, "subject": {"display": "x"}}, timeout=60)
    assert refused.status_code == 403
    assert "needs scope system/Goal.c" in refused.json()["issue"][0]["diagnostics"]
    # The entries of a batch (and a transaction) are checked one by one.
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient?_count=1"}},
        {"request": {"method": "GET", "url": "Goal?_count=1"}}]}
    answer = requests.post(base, json=batch, headers={**headers, "Content-Type": "application/fhir+json"},
                           timeout=60).json()
    statuses = [entry["response"]["status"] for entry in answer["entry"]]
    assert statuses[0].startswith("200") and statuses[1].startswith("403"), statuses


# -- SMART Backend Services: the demo sync end to end -----------------------------------------------------------------


def test_demo_sync_with_an_rs384_assertion_end_to_end(tmp_path: Path, authenv: AuthEnv) -> None:
    program = program_for(tmp_path, authenv)
    use_smart(program, "peersync-smart", authenv.rs384)  # no token_url: found by SMART discovery on HAPI

    result = sync(program)

    assert result.returncode == DEMO_EXIT, result.stderr[-3000:]
    assert_clean_state(program, REVIEW)
    assert set(versions_per_identifier(program)) == {"1"}


def test_sync_with_an_es384_assertion(tmp_path: Path, authenv: AuthEnv) -> None:
    program = program_for(tmp_path, authenv, enrollments=3)
    use_smart(program, "peersync-smart", authenv.es384, token_url=authenv.auth.token_url)

    result = sync(program)

    assert result.returncode in (0, DEMO_EXIT), result.stderr[-3000:]
    assert_clean_state(program, REVIEW)


def test_doctor_and_auth_test_pass_with_the_granted_scopes(tmp_path: Path, authenv: AuthEnv) -> None:
    program = program_for(tmp_path, authenv, enrollments=1)
    use_smart(program, "peersync-smart", authenv.es384)

    assert peersync("auth", "test", "--config", str(program.config)).returncode == 0
    doctor = peersync("doctor", "--config", str(program.config))
    assert "the granted scopes cover every type peersync writes" in doctor.stdout, doctor.stdout
    assert "an authenticated Patient search by MRN works" in doctor.stdout


# -- refused assertions: exit 77 with a clear message, nothing written ------------------------------------------------


def test_wrong_kid_is_refused_with_exit_77(tmp_path: Path, authenv: AuthEnv) -> None:
    program = program_for(tmp_path, authenv, enrollments=1)
    unregistered = KeyPair("peersync-not-registered", "RS384", authenv.rs384.private_key, {})
    use_smart(program, "peersync-smart", unregistered, token_url=authenv.auth.token_url)

    result = sync(program)

    assert result.returncode == 77, result.stderr[-3000:]
    assert "invalid_client" in result.stderr and "auth.kid matches a key in the registered JWK Set" in result.stderr
    assert authenv.grants("peersync-smart")[-1]["event"] == "grant.error"
    assert not server_resources(program)


def test_expired_assertion_is_refused_with_exit_77(tmp_path: Path, authenv: AuthEnv,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    program = program_for(tmp_path, authenv, enrollments=1)
    use_smart(program, "peersync-smart", authenv.rs384)
    ten_minutes_ago = time.time() - 600
    monkeypatch.setattr("connector.auth.smart.time.time", lambda: ten_minutes_ago)

    result = CliRunner().invoke(main, ["auth", "test", "--config", str(program.config)])

    assert result.exit_code == 77, result.output
    assert "invalid_client" in result.output and "clock is correct" in result.output
    assert authenv.grants("peersync-smart")[-1]["reason"] == "jwt expired"


def test_replayed_assertion_is_refused(tmp_path: Path, authenv: AuthEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server keeps the jti of every assertion until it expires: the same assertion works once."""
    # At the token endpoint: one signed assertion, sent twice.
    signer = SmartBackendAuth(authenv.fhir_base_url, requests.Session(),
                              private_key=load_private_key(authenv.rs384.private_key.read_bytes()), alg="RS384",
                              kid=authenv.rs384.kid, client_id="peersync-smart", scope=["system/Patient.rs"],
                              required_scopes=[], token_url=authenv.auth.token_url)
    form = {"grant_type": "client_credentials", "scope": "system/Patient.rs",
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": signer.client_assertion(authenv.auth.token_url)}
    first = requests.post(authenv.auth.token_url, data=form, timeout=60)
    second = requests.post(authenv.auth.token_url, data=form, timeout=60)
    assert first.status_code == 200 and second.status_code == 401
    assert second.json()["error"] == "invalid_client"
    assert authenv.grants("peersync-smart")[-1]["reason"] == "client assertion tokens must only be used once"

    # Through peersync: two runs whose assertions share a jti; the second is refused (exit 77).
    program = program_for(tmp_path, authenv, enrollments=1)
    use_smart(program, "peersync-smart", authenv.rs384)
    same = uuid.uuid4()
    monkeypatch.setattr("connector.auth.smart.uuid.uuid4", lambda: same)
    runner = CliRunner()
    assert runner.invoke(main, ["auth", "test", "--config", str(program.config)]).exit_code == 0
    replay = runner.invoke(main, ["auth", "test", "--config", str(program.config)])
    assert replay.exit_code == 77, replay.output
    assert "invalid_client" in replay.output
    assert authenv.grants("peersync-smart")[-1]["reason"] == "client assertion tokens must only be used once"


# -- key rotation -----------------------------------------------------------------------------------------------------


def test_key_rotation_without_a_failed_run(tmp_path: Path, authenv: AuthEnv) -> None:
    """docs/authentication.md "Rotate (two kids)": publish both, let the server see the new set, switch, retire.

    oidc-provider keeps a client's JWK Set for at least 60 s (longer if the host's cache headers say so) and
    re-fetches it only when that time is up; restarting it stands for "wait until the EHR has fetched the new set".
    """
    host = authenv.rotating_host
    old = authenv.new_key("ES384", "rotation-old")
    new = authenv.new_key("RS384", "rotation-new")
    program = program_for(tmp_path, authenv, enrollments=1)
    exits: list[int] = []

    host.publish(old.jwks)
    authenv.auth.start()  # a fresh cache, so the set with only the old key is what the server sees first
    use_smart(program, "peersync-rotating", old)
    exits.append(sync(program).returncode)

    host.publish(old.jwks, new.jwks)  # step 2: both keys
    exits.append(sync(program).returncode)  # still the old key: fine whatever the server has cached
    authenv.auth.start()  # step 3: the server's cache of the set has expired
    use_smart(program, "peersync-rotating", new)  # step 4: switch
    exits.append(sync(program).returncode)

    host.publish(new.jwks)  # step 5: retire the old key
    authenv.auth.start()
    exits.append(sync(program).returncode)

    assert exits[0] in (0, DEMO_EXIT) and exits == [exits[0]] * 4, exits
    assert sum(e["event"] == "grant.success" for e in authenv.grants("peersync-rotating")) == 1
    use_smart(program, "peersync-rotating", old)
    retired = sync(program)
    assert retired.returncode == 77 and "invalid_client" in retired.stderr
    assert set(versions_per_identifier(program)) == {"1"}  # four runs, each record written once


# -- client credentials with a shared secret --------------------------------------------------------------------------


def test_client_credentials_with_a_secret_from_a_file(tmp_path: Path, authenv: AuthEnv) -> None:
    program = program_for(tmp_path, authenv, enrollments=3)
    secret_file = tmp_path / "client_secret"
    secret_file.write_text(SECRET_CLIENT_SECRET + "\n", encoding="utf-8")  # as `echo` writes it
    secret_file.chmod(0o600)
    set_auth(program, f"""[auth]
mode = "client-credentials"
client_id = "peersync-secret"
client_secret_file = "{secret_file}"
token_url = "{authenv.auth.token_url}"
scope = "{" ".join(authserver.SYNC_SCOPES)}"
""")
    result = sync(program)

    assert result.returncode in (0, DEMO_EXIT), result.stderr[-3000:]
    assert_clean_state(program, REVIEW)
    assert authenv.grants("peersync-secret")[-1]["event"] == "grant.success"


# -- a token that expires mid-run -------------------------------------------------------------------------------------


def test_token_expiring_mid_run_is_replaced_without_lost_or_repeated_writes(tmp_path: Path, authenv: AuthEnv) -> None:
    """Tokens live 3 s; with no refresh margin they expire in use, the server answers 401, peersync gets a new one."""
    program = program_for(tmp_path, authenv)
    use_smart(program, "peersync-short", authenv.rs384, extra="refresh_margin_seconds = 0\n")
    before = len(authenv.grants("peersync-short"))
    started = time.monotonic()

    result = sync(program)

    elapsed = time.monotonic() - started
    grants = authenv.grants("peersync-short")[before:]
    assert result.returncode == DEMO_EXIT, result.stderr[-3000:]
    assert all(g["event"] == "grant.success" for g in grants)
    assert len(grants) >= 2, f"{elapsed:.1f} s run, {SHORT_TOKEN_TTL_SECONDS} s tokens: {len(grants)} token(s)"
    assert_clean_state(program, REVIEW)  # nothing lost, no duplicate
    assert set(versions_per_identifier(program)) == {"1"}, "a record was written twice"


# -- granted scopes that miss one type --------------------------------------------------------------------------------


def test_missing_scope_for_one_type_is_named_before_any_write(tmp_path: Path, authenv: AuthEnv) -> None:
    program = program_for(tmp_path, authenv, enrollments=3)
    use_smart(program, "peersync-narrow", authenv.rs384)

    doctor = peersync("doctor", "--config", str(program.config))
    result = sync(program)

    assert doctor.returncode == 77 and NARROW_MISSING in doctor.stdout, doctor.stdout
    assert result.returncode == 77, result.stderr[-3000:]
    assert f"does not cover the required {NARROW_MISSING}" in result.stderr
    assert not server_resources(program)  # refused before any write


def test_the_fhir_server_names_a_missing_scope_peersync_was_told_not_to_require(tmp_path: Path,
                                                                                authenv: AuthEnv) -> None:
    """An operator who narrows required_scopes meets HAPI's 403 for one type: that type is parked (exit 76, "the
    server refuses some types"), never written; everything else lands, the CareTeam's CarePlan and what refers to
    it included, and every stored reference resolves (none points at the CareTeam that is not there)."""
    program = program_for(tmp_path, authenv, enrollments=3)
    required = " ".join(s for s in authserver.SYNC_SCOPES if s != NARROW_MISSING)
    use_smart(program, "peersync-narrow", authenv.rs384, extra=f'required_scopes = "{required}"\n')

    result = sync(program)

    assert result.returncode == 76, result.stderr[-3000:]
    assert "the server refuses writes of CareTeam (HTTP 403)" in result.stderr, result.stderr[-2500:]
    found = server_resources(program)
    types = Counter(kind for kind, _ in found)
    assert "CareTeam" not in types
    expected = expected_identities(program, REVIEW, frozenset({"CareTeam"}))
    assert expected["CarePlan"] > 0 and expected["Goal"] > 0
    for landed in ("CarePlan", "Goal", "Communication"):
        assert types[landed] == expected[landed], f"{landed}: {types[landed]} on the server of {expected[landed]}"
    assert not unresolved_references(program, [r for rs in found.values() for r in rs])
