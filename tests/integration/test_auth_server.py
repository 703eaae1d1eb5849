"""peersync against a real authorization server (oidc-provider) and a HAPI server that enforces SMART scopes.

The fixture ``authenv`` (tests/integration/conftest.py, tests/authserver.py) starts oidc-provider with peersync's
clients, hosts their JWK Sets on a local URL, and starts a HAPI instance on its own port that validates every
bearer token against the authorization server's keys and enforces SMART system scopes per type and interaction.
docs/authentication.md ("Walk-through: a real authorization server") runs the same steps by hand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import authserver
import jwt
import pytest
import requests
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import rsa

from connector.auth.keys import load_private_key
from connector.auth.methods import RefreshingAuth
from connector.auth.smart import CLIENT_ASSERTION_TYPE, SmartBackendAuth
from connector.cli import main
from connector.identifiers import reference_strings

from .conftest import CONDITION_SCOPE, NARROW_MISSING, PROCEDURE_SCOPE, SECRET_CLIENT_SECRET, AuthEnv, KeyPair
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
TRIMMED_EXIT = 65  # the first enrollments too: a contact of E0001 has an unparseable date (contacts.csv row 10)
SUMMARY = demo_summary()
REVIEW = set(SUMMARY["unmatched_enrollments"]) | set(SUMMARY["ambiguous_enrollments"])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


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
              extra: str = "", scopes: tuple[str, ...] = authserver.SYNC_SCOPES) -> None:
    """[auth] smart-backend; without token_url, the token endpoint comes from HAPI's smart-configuration."""
    lines = [
        "[auth]", 'mode = "smart-backend"', f'client_id = "{client_id}"', f'private_key_file = "{key.private_key}"',
        f'kid = "{key.kid}"', f'scope = "{" ".join(scopes)}"',
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


def fhir_json(headers: dict[str, str]) -> dict[str, str]:
    return {**headers, "Content-Type": "application/fhir+json"}


def diagnostics(response: requests.Response) -> str:
    return " ".join(str(issue.get("diagnostics", "")) for issue in response.json().get("issue", []))


def a_goal(patient_id: str, marker: str) -> dict[str, Any]:
    return {"resourceType": "Goal", "identifier": [{"system": "urn:peersync:test:enforcement", "value": marker}],
            "lifecycleStatus": "active", "description": {"text": "walk daily"},
            "subject": {"reference": f"Patient/{patient_id}"}}


@pytest.fixture(scope="module")
def enforcement_data(authenv: AuthEnv) -> dict[str, str]:
    """Three Patients and a Goal about the first, stored with the harness's admin token."""
    admin = fhir_json(authenv.admin_headers())
    base = authenv.fhir_base_url
    patients = [requests.post(f"{base}/Patient", json={"resourceType": "Patient", "active": True}, headers=admin,
                              timeout=60).json()["id"] for _ in range(3)]
    goal = requests.post(f"{base}/Goal", json=a_goal(patients[0], uuid.uuid4().hex), headers=admin, timeout=60)
    assert goal.status_code == 201, goal.text
    return {"patient": patients[0], "goal": goal.json()["id"]}


def test_update_needs_u_and_delete_needs_d(authenv: AuthEnv, enforcement_data: dict[str, str]) -> None:
    base, patient = authenv.fhir_base_url, enforcement_data["patient"]
    create_only = fhir_json(authenv.scoped_headers("system/Goal.c"))
    created = requests.post(f"{base}/Goal", json=a_goal(patient, uuid.uuid4().hex), headers=create_only, timeout=60)
    assert created.status_code == 201, created.text
    goal = created.json()
    goal_id = goal["id"]

    refused = requests.put(f"{base}/Goal/{goal_id}", json=goal, headers=create_only, timeout=60)
    assert refused.status_code == 403 and "needs scope system/Goal.u" in diagnostics(refused)
    updated = requests.put(f"{base}/Goal/{goal_id}", json=goal, headers=fhir_json(authenv.scoped_headers(
        "system/Goal.u")), timeout=60)
    assert updated.status_code == 200, updated.text

    cru = authenv.scoped_headers("system/Goal.c", "system/Goal.r", "system/Goal.u")
    refused = requests.delete(f"{base}/Goal/{goal_id}", headers=cru, timeout=60)
    assert refused.status_code == 403 and "needs scope system/Goal.d" in diagnostics(refused)
    assert requests.get(f"{base}/Goal/{goal_id}", headers=cru, timeout=60).status_code == 200  # still there
    deleted = requests.delete(f"{base}/Goal/{goal_id}", headers=authenv.scoped_headers("system/Goal.d"), timeout=60)
    assert deleted.status_code in (200, 204), deleted.text
    assert requests.get(f"{base}/Goal/{goal_id}", headers=cru, timeout=60).status_code == 410


def test_read_needs_r_and_search_needs_s(authenv: AuthEnv, enforcement_data: dict[str, str]) -> None:
    base, patient = authenv.fhir_base_url, enforcement_data["patient"]
    read_only = authenv.scoped_headers("system/Patient.r")
    search_only = authenv.scoped_headers("system/Patient.s")

    assert requests.get(f"{base}/Patient/{patient}", headers=read_only, timeout=60).status_code == 200
    refused = requests.get(f"{base}/Patient?_id={patient}", headers=read_only, timeout=60)
    assert refused.status_code == 403 and "needs scope system/Patient.s" in diagnostics(refused)
    found = requests.get(f"{base}/Patient?_id={patient}", headers=search_only, timeout=60)
    assert found.status_code == 200 and found.json()["total"] == 1
    refused = requests.get(f"{base}/Patient/{patient}", headers=search_only, timeout=60)
    assert refused.status_code == 403 and "needs scope system/Patient.r" in diagnostics(refused)


def test_every_entry_of_a_transaction_is_checked(authenv: AuthEnv, enforcement_data: dict[str, str]) -> None:
    """One entry of a type the token does not grant refuses the whole transaction: nothing of it is stored."""
    base, patient = authenv.fhir_base_url, enforcement_data["patient"]
    marker = uuid.uuid4().hex
    transaction = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": a_goal(patient, marker), "request": {"method": "POST", "url": "Goal"}},
        {"resource": {"resourceType": "CareTeam", "subject": {"reference": f"Patient/{patient}"}},
         "request": {"method": "POST", "url": "CareTeam"}}]}
    headers = authenv.scoped_headers("system/Goal.c", "system/Goal.s")

    refused = requests.post(base, json=transaction, headers=fhir_json(headers), timeout=60)

    assert refused.status_code == 403 and "needs scope system/CareTeam.c" in diagnostics(refused)
    stored = requests.get(f"{base}/Goal?identifier=urn:peersync:test:enforcement|{marker}", headers=headers,
                          timeout=60)
    assert stored.status_code == 200 and stored.json()["total"] == 0  # the Goal entry was rolled back
    granted = authenv.scoped_headers("system/Goal.c", "system/CareTeam.c")
    assert requests.post(base, json=transaction, headers=fhir_json(granted), timeout=60).status_code == 200


def test_included_resources_and_pages_need_scopes_too(authenv: AuthEnv, enforcement_data: dict[str, str]) -> None:
    """_include/_revinclude of a type the token does not grant, and a page of a search, are refused (403)."""
    base, patient, goal = authenv.fhir_base_url, enforcement_data["patient"], enforcement_data["goal"]
    goals_only = authenv.scoped_headers("system/Goal.r", "system/Goal.s")
    refused = requests.get(f"{base}/Goal?_id={goal}&_include=Goal:subject", headers=goals_only, timeout=60)
    assert refused.status_code == 403
    assert "showing Patient (a read, _include or _revinclude) needs scope system/Patient.r or system/Patient.s" in \
        diagnostics(refused)
    both = authenv.scoped_headers("system/Goal.s", "system/Patient.r")
    included = requests.get(f"{base}/Goal?_id={goal}&_include=Goal:subject", headers=both, timeout=60)
    assert included.status_code == 200
    assert {e["resource"]["resourceType"] for e in included.json()["entry"]} == {"Goal", "Patient"}
    patients_only = authenv.scoped_headers("system/Patient.r", "system/Patient.s")
    refused = requests.get(f"{base}/Patient?_id={patient}&_revinclude=Goal:subject", headers=patients_only,
                           timeout=60)
    assert refused.status_code == 403 and "showing Goal" in diagnostics(refused)

    first = requests.get(f"{base}/Patient?_count=1", headers=patients_only, timeout=60).json()
    next_page = next(link["url"] for link in first["link"] if link["relation"] == "next")
    refused = requests.get(next_page, headers=goals_only, timeout=60)
    assert refused.status_code == 403 and "a page of a search of Patient needs scope system/Patient.s" in \
        diagnostics(refused)
    read_not_search = authenv.scoped_headers("system/Patient.r")
    assert requests.get(next_page, headers=read_not_search, timeout=60).status_code == 403
    assert requests.get(next_page, headers=patients_only, timeout=60).status_code == 200


def mint_access_token(authenv: AuthEnv, *, signing_jwk: dict[str, Any] | None = None,
                      **claims: Any) -> dict[str, str]:
    """A bearer header with a JWT shaped like the authorization server's (RFC 9068), signed with its key unless
    ``signing_jwk`` is given, granting Patient.rs; ``claims`` replace the defaults (iss, aud, exp)."""
    key = jwt.PyJWK(signing_jwk or authserver.signing_jwk(authenv.auth.port))
    now = int(time.time())
    body = {"iss": authenv.auth.issuer, "aud": authenv.fhir_base_url, "sub": "harness-scoped",
            "client_id": "harness-scoped", "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex,
            "scope": "system/Patient.rs"} | claims
    token = jwt.encode(body, key.key, algorithm="RS256", headers={"typ": "at+jwt", "kid": "authz-signing-1"})
    return {"Authorization": f"Bearer {token}"}


def test_invalid_access_tokens_are_refused_with_401(authenv: AuthEnv) -> None:
    """The token's signature, issuer, audience and expiry are each checked: one wrong claim is a 401."""
    url = f"{authenv.fhir_base_url}/Patient?_count=1"
    assert requests.get(url, headers=mint_access_token(authenv), timeout=60).status_code == 200  # the control
    foreign = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa.generate_private_key(65537, 2048))) | {
        "kid": "authz-signing-1", "alg": "RS256"}
    cases = {
        "a foreign key": mint_access_token(authenv, signing_jwk=foreign),
        "a wrong issuer": mint_access_token(authenv, iss="http://127.0.0.1:1/not-the-issuer"),
        "a wrong audience": mint_access_token(authenv, aud="http://127.0.0.1:1/other-fhir"),
        "an expired token": mint_access_token(authenv, iat=int(time.time()) - 120, exp=int(time.time()) - 60),
    }
    for case, headers in cases.items():
        refused = requests.get(url, headers=headers, timeout=60)
        assert refused.status_code == 401, f"{case}: HTTP {refused.status_code}"
        assert 'error="invalid_token"' in refused.headers["WWW-Authenticate"], case


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

    assert result.returncode == TRIMMED_EXIT, result.stderr[-3000:]
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


def peersync_with(patch: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess (like :func:`peersync`) after ``patch``, Python run first in that process."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("PEERSYNC_")}
    clean["PEERSYNC_SECRETS_DIR"] = ""
    code = f"{patch}\nfrom connector.cli import main\nmain()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=clean,
                          timeout=600, check=False)


# The host's clock ten minutes slow, as seen by the code that signs the assertion.
SLOW_CLOCK = "import time, types, connector.auth.smart as smart\n" \
             "smart.time = types.SimpleNamespace(time=lambda: time.time() - 600)"


def same_jti(jti: uuid.UUID) -> str:
    """Every assertion of that process carries this jti."""
    return "import types, uuid, connector.auth.smart as smart\n" \
           f"smart.uuid = types.SimpleNamespace(uuid4=lambda: uuid.UUID('{jti}'))"


def test_expired_assertion_is_refused_with_exit_77(tmp_path: Path, authenv: AuthEnv) -> None:
    program = program_for(tmp_path, authenv, enrollments=1)
    use_smart(program, "peersync-smart", authenv.rs384)

    result = peersync_with(SLOW_CLOCK, "sync", "--config", str(program.config))

    assert result.returncode == 77, result.stderr[-3000:]
    assert "invalid_client" in result.stderr and "this host's clock is correct (NTP)" in result.stderr
    assert authenv.grants("peersync-smart")[-1]["reason"] == "jwt expired"
    assert not server_resources(program)


def test_replayed_assertion_is_refused_with_exit_77(tmp_path: Path, authenv: AuthEnv) -> None:
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

    # Through peersync: `auth test` and then `sync`, both signing with the same jti; the sync is refused.
    program = program_for(tmp_path, authenv, enrollments=1)
    use_smart(program, "peersync-smart", authenv.rs384)
    patch = same_jti(uuid.uuid4())
    assert peersync_with(patch, "auth", "test", "--config", str(program.config)).returncode == 0

    replay = peersync_with(patch, "sync", "--config", str(program.config))

    assert replay.returncode == 77, replay.stderr[-3000:]
    assert "invalid_client" in replay.stderr
    assert "the assertion was not already used: each jti is accepted once" in replay.stderr
    assert authenv.grants("peersync-smart")[-1]["reason"] == "client assertion tokens must only be used once"
    assert not server_resources(program)


# -- key rotation -----------------------------------------------------------------------------------------------------


def test_key_rotation_without_a_failed_run(tmp_path: Path, authenv: AuthEnv) -> None:
    """docs/authentication.md "Rotate (two kids)": publish both, let the server see the new set, switch, retire.

    oidc-provider keeps a client's JWK Set for at least 60 s (longer if the host's cache headers say so) and
    fetches it again only when that time is up (and a signature fails); at each step the harness makes it fetch
    the set now instead (server.mjs, ``/harness/clients/<id>/jwks-stale``): "the EHR has fetched the new set"."""
    host, client = authenv.rotating_host, "peersync-rotating"
    old = authenv.new_key("ES384", "rotation-old")
    new = authenv.new_key("RS384", "rotation-new")
    program = program_for(tmp_path, authenv, enrollments=1)
    before = len(authenv.grants(client))
    exits: list[int] = []
    fetches: list[int] = [host.fetches]

    def step(*published: KeyPair, use: KeyPair) -> None:
        host.publish(*(key.jwks for key in published))
        authenv.auth.refresh_client_jwks(client)
        use_smart(program, client, use)
        exits.append(sync(program).returncode)
        fetches.append(host.fetches)

    step(old, use=old)  # 1: only the old key
    step(old, new, use=old)  # 2: both keys published, still signing with the old one
    step(old, new, use=new)  # 3-4: the server has the set with both; switch
    step(new, use=new)  # 5: retire the old key

    assert exits == [TRIMMED_EXIT] * 4, exits  # no run failed
    assert all(later > earlier for earlier, later in itertools.pairwise(fetches)), fetches
    grants = authenv.grants(client)[before:]
    assert [g["event"] for g in grants] == ["grant.success"] * 4
    use_smart(program, client, old)
    retired = sync(program)
    assert retired.returncode == 77 and "invalid_client" in retired.stderr
    assert not any(g["event"] == "grant.error" for g in grants)
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

    assert result.returncode == TRIMMED_EXIT, result.stderr[-3000:]
    assert_clean_state(program, REVIEW)
    assert authenv.grants("peersync-secret")[-1]["event"] == "grant.success"


# -- a token that expires mid-run -------------------------------------------------------------------------------------

FORCED_EXPIRIES_AT_WRITES = (3, 8)  # the write requests before which the harness lets the current token expire


@dataclass
class WireLog:
    """Every request peersync sends during one in-process run: method, URL without query, body digest, status."""

    token_url: str
    calls: list[tuple[str, str, str, int]] = field(default_factory=list)

    def fhir_calls(self) -> list[tuple[str, str, str, int]]:
        return [call for call in self.calls if call[1] != self.token_url]

    def writes(self) -> list[tuple[str, str, str, int]]:
        """The write requests (POST/PUT/PATCH/DELETE to the FHIR server, not the token endpoint)."""
        return [call for call in self.fhir_calls() if call[0] in ("POST", "PUT", "PATCH", "DELETE")]

    def by_type(self) -> Counter[tuple[str, str, int]]:
        """(method, resource type, status) of each write that was not refused with 401."""
        return Counter((method, url.split("/fhir/", 1)[1].split("?")[0].split("/")[0], status)
                       for method, url, _, status in self.writes() if status != 401)


def wired_sync(program: Program, monkeypatch: pytest.MonkeyPatch, token_url: str,
               expire_before_writes: tuple[int, ...] = ()) -> tuple[Any, WireLog]:
    """``peersync sync -v`` in-process, every request logged at the wire; before each write request numbered in
    ``expire_before_writes`` the harness waits until the bearer token in it has passed its ``exp``."""
    wire = WireLog(token_url)
    send = requests.Session.send

    def logged_send(self: requests.Session, request: requests.PreparedRequest, **kwargs: Any) -> Any:
        url = (request.url or "").split("?")[0]
        is_write = request.method in ("POST", "PUT", "PATCH", "DELETE") and url != token_url
        if is_write and len(wire.writes()) + 1 in expire_before_writes:
            bearer = request.headers["Authorization"].removeprefix("Bearer ")
            exp = jwt.decode(bearer, options={"verify_signature": False})["exp"]
            time.sleep(max(0.0, exp - time.time()) + 0.1)  # the FHIR server allows no clock skew
        response = send(self, request, **kwargs)
        body = request.body if isinstance(request.body, bytes) else str(request.body or "").encode()
        wire.calls.append((str(request.method), request.url or "", hashlib.sha256(body).hexdigest(),
                           response.status_code))
        return response

    with monkeypatch.context() as patch:
        patch.setattr(requests.Session, "send", logged_send)
        result = CliRunner().invoke(main, ["sync", "--config", str(program.config), "-v"])
    return result, wire


def test_token_expiring_mid_run_is_replaced_without_lost_or_repeated_writes(
    tmp_path: Path, authenv: AuthEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's tokens live 3 s; peersync's refresh clock is told they never expire, so it keeps using each
    one until the server refuses it. Before the 3rd and 8th write request the harness waits until the token in
    that request has passed its ``exp``: at least those two requests meet an expired token whatever the run's
    pace (others may too). One request at a time, single writes: every 401 is one new token and one re-sent
    request, and the wire is compared with the same program synced by a client whose tokens do not expire."""
    programs = []
    for name in ("control", "expiring"):
        program = program_for(tmp_path / name, authenv, enrollments=3)
        text = program.config.read_text(encoding="utf-8")
        program.config.write_text(text.replace("[server]\n", '[server]\nwrite_strategy = "single"\n')
                                  .replace("concurrency = 4", "concurrency = 1"), encoding="utf-8")
        programs.append(program)
    control, program = programs
    use_smart(control, "peersync-smart", authenv.rs384, token_url=authenv.auth.token_url)
    use_smart(program, "peersync-short", authenv.rs384, token_url=authenv.auth.token_url)
    control_result, control_wire = wired_sync(control, monkeypatch, authenv.auth.token_url)
    assert control_result.exit_code == TRIMMED_EXIT, control_result.output[-3000:]
    parse = RefreshingAuth._parse_token_response

    def never_due(self: RefreshingAuth, *args: Any) -> Any:
        return dataclasses.replace(parse(self, *args), expires_at=float("inf"), refresh_at=float("inf"))

    monkeypatch.setattr(RefreshingAuth, "_parse_token_response", never_due)
    before = len(authenv.grants("peersync-short"))

    result, wire = wired_sync(program, monkeypatch, authenv.auth.token_url, FORCED_EXPIRIES_AT_WRITES)

    grants = authenv.grants("peersync-short")[before:]
    assert result.exit_code == TRIMMED_EXIT, result.output[-3000:]
    assert all(g["event"] == "grant.success" for g in grants)
    refused = [i for i, call in enumerate(wire.fhir_calls()) if call[3] == 401]
    invalidated = result.stderr.count("access token invalidated after a 401")
    assert len(refused) == invalidated >= len(FORCED_EXPIRIES_AT_WRITES), result.stderr[-3000:]
    assert len(grants) == len(refused) + 1, f"{len(grants)} tokens, {len(refused)} 401s"
    calls = wire.fhir_calls()
    for i in refused:  # the next request is the same one again (method, URL, body), with the new token
        assert calls[i + 1][:3] == calls[i][:3] and calls[i + 1][3] != 401
    retried_writes = sum(call[3] == 401 for call in wire.writes())
    assert retried_writes >= len(FORCED_EXPIRIES_AT_WRITES)
    assert len(wire.writes()) == len(control_wire.writes()) + retried_writes
    assert wire.by_type() == control_wire.by_type()  # the same writes, type by type, none lost or repeated
    expected = expected_identities(program, REVIEW)
    assert {t: n for (method, t, status), n in wire.by_type().items() if status == 201 and method == "PUT"} \
        == dict(expected), "each record created exactly once"
    assert_clean_state(program, REVIEW)  # every record on the server, exactly once
    assert versions_per_identifier(program) == versions_per_identifier(control)


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


def test_without_the_condition_scope_doctor_warns_and_careplans_have_no_addresses(tmp_path: Path,
                                                                                   authenv: AuthEnv) -> None:
    """system/Condition.rs is optional (docs/authentication.md, "Scopes to request"): without it doctor warns
    naming it (exit 0), and the sync writes the CarePlans without addresses; nothing is refused or parked."""
    program = program_for(tmp_path, authenv, enrollments=3)
    use_smart(program, "peersync-no-condition", authenv.rs384,
              scopes=tuple(s for s in authserver.SYNC_SCOPES if s != CONDITION_SCOPE))

    doctor = peersync("doctor", "--config", str(program.config))
    result = sync(program)

    assert doctor.returncode == 0, doctor.stdout[-3000:]
    assert f"the granted scopes do not cover {CONDITION_SCOPE}" in doctor.stdout, doctor.stdout[-3000:]
    assert result.returncode == TRIMMED_EXIT, result.stderr[-3000:]
    assert "Condition search failed; the CarePlan is written without addresses" in result.stderr
    found = assert_clean_state(program, REVIEW)
    careplans = [r for (kind, _), rs in found.items() if kind == "CarePlan" for r in rs]
    assert careplans and not any("addresses" in careplan for careplan in careplans)



def test_contacts_as_procedures_with_the_procedure_scope(tmp_path: Path, authenv: AuthEnv) -> None:
    """[server] contact_procedures = "also" needs system/Procedure.cus (docs/authentication.md): granted, doctor
    passes and the enforcing server takes the Procedures beside the Communications."""
    program = program_for(tmp_path, authenv, enrollments=3)
    text = program.config.read_text(encoding="utf-8")
    program.config.write_text(text.replace("[server]\n", '[server]\ncontact_procedures = "also"\n'), encoding="utf-8")
    use_smart(program, "peersync-procedures", authenv.rs384, scopes=(*authserver.SYNC_SCOPES, PROCEDURE_SCOPE))

    doctor = peersync("doctor", "--config", str(program.config))
    result = sync(program)

    assert doctor.returncode == 0, doctor.stdout[-3000:]
    assert "the granted scopes cover every type peersync writes" in doctor.stdout, doctor.stdout[-3000:]
    assert result.returncode == TRIMMED_EXIT, result.stderr[-3000:]
    found = assert_clean_state(program, REVIEW)
    types = Counter(kind for kind, _ in found)
    assert types["Procedure"] > 0 and types["Procedure"] == types["Communication"], types


# -- the documented walk-through --------------------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs" / "authentication.md"


def walkthrough_block() -> str:
    """The shell block of docs/authentication.md, "By hand", as written."""
    text = DOCS.read_text(encoding="utf-8")
    section = text[text.index("### By hand"):]
    return section[section.index("```sh\n") + len("```sh\n"):section.index("\n```\n")]


def test_the_documented_walk_through_runs_as_written(tmp_path: Path, authenv: AuthEnv) -> None:
    """The block is run by bash with the suite's ports and a temporary folder in place of the documented ones
    (and this interpreter's bin folder for .venv/bin); an ERR trap reports every command that exits non-zero.
    ``PEERSYNC_KEEP_SERVER`` keeps the enforcing HAPI server up at the final ``stop``, as the fixture does."""
    jwks_port = free_port()
    script = walkthrough_block()
    for documented, actual in {"8190": str(authenv.auth.port), "8092": str(authserver.auth_fhir_port()),
                               "8191": str(jwks_port), "/tmp/peersync-auth": str(tmp_path / "peersync-auth"),
                               ".venv/bin/": f"{Path(sys.executable).parent}/"}.items():
        assert documented in script, documented
        script = script.replace(documented, actual)
    trap = "trap 'echo \"walkthrough: exit $? from: $BASH_COMMAND\" >&2' ERR\n"
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("PEERSYNC_")}
    env["PEERSYNC_KEEP_SERVER"] = "1"
    try:
        result = subprocess.run(["bash", "-c", trap + script], cwd=DOCS.parents[1], env=env, capture_output=True,
                                text=True, timeout=900, check=False)
    finally:
        authenv.auth.start()  # the suite's own clients again (the walk-through configured its own)

    failed = [line for line in result.stderr.splitlines() if line.startswith("walkthrough: exit")]
    assert result.returncode == 0, result.stderr[-3000:]
    assert failed == [f"walkthrough: exit 65 from: {Path(sys.executable).parent}/peersync sync --config "
                      "fixtures/demo/peersync.toml"], result.stderr[-3000:]  # 65: the demo's bad rows
    assert "client_secret_file: " in result.stdout
    assert "the granted scopes cover every type peersync writes" in result.stdout, result.stdout[-3000:]
    assert '"event":"grant.success","client_id":"peersync-smart"' in result.stdout
    assert requests.get(f"{authenv.fhir_base_url}/metadata", timeout=60).status_code == 200  # still up
