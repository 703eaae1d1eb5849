"""Authentication: settings, scope coverage, SMART Backend Services, client credentials,
token lifetime, 401 handling, origin binding across redirects, and secret hygiene."""

from __future__ import annotations

import base64
import json
import logging
import re
import time
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote_plus

import jwt
import pydantic
import pytest
import requests
import responses
import time_machine
from pydantic_settings import BaseSettings, SettingsConfigDict

from connector.auth import (
    ASSERTION_LIFETIME_SECONDS,
    CLIENT_ASSERTION_TYPE,
    BasicAuth,
    ClientCredentialsAuth,
    NoAuth,
    PeersyncAuth,
    SmartBackendAuth,
    StaticBearerAuth,
    build_auth,
    keys,
    missing_scopes,
    parse_scope,
    scope_covers,
)
from connector.errors import (
    AuthError,
    ConfigError,
    ExitCode,
    ServerUnavailableError,
    TransportError,
)
from connector.ops.config import AuthSettings
from connector.server.transport import new_session

BASE = "https://ehr.example.org/fhir/r4"
WELL_KNOWN = BASE + "/.well-known/smart-configuration"
# A token endpoint on another host, as with Oracle Health (authorization.cerner.com).
TOKEN_URL = "https://auth.example.org/tenants/t1/oauth2/token"
FOREIGN = "https://elsewhere.example.net"
CLIENT_ID = "peersync-clinic-7"
SCOPE = "system/Goal.cu system/CarePlan.cu system/Patient.rs"
JKU = "https://keys.example.org/peersync/jwks.json"
SECRET = "cl!ent:secret+with/odd=chars"
PASSWORD = "pa55:w0rd-very-secret"
STATIC_TOKEN = "static-bearer-token-value-123"
ALGS = ["RS384", "ES384"]


# --------------------------------------------------------------------------------------------
# fixtures and fakes


@pytest.fixture(scope="module")
def keypairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Any]]]:
    out = tmp_path_factory.mktemp("keys")
    result = {}
    for alg in ALGS:
        key_path, jwks_path = keys.generate_keypair(alg, f"kid-{alg.lower()}", out)
        result[alg] = (key_path, json.loads(jwks_path.read_text()))
    return result


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def session() -> requests.Session:
    return new_session(user_agent="peersync-tests")


def smart_config(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "token_endpoint": TOKEN_URL,
        "grant_types_supported": ["client_credentials", "authorization_code"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "capabilities": ["client-confidential-asymmetric", "permission-v2", "permission-v1"],
        "scopes_supported": ["system/*.cruds"],
    }
    doc.update(overrides)
    return {k: v for k, v in doc.items() if v is not None}


class TokenServer:
    """A token endpoint that verifies what a real SMART/OAuth server would verify."""

    def __init__(
        self,
        rsps: responses.RequestsMock,
        *,
        jwks: dict[str, Any] | None = None,
        alg: str | None = None,
        jku: str | None = None,
        url: str = TOKEN_URL,
        expires_in: int | None = 300,
        granted_scope: str | None = "echo",
        status: int = 200,
        body: Any = None,
    ) -> None:
        self.jwks, self.alg, self.jku, self.url = jwks, alg, jku, url
        self.expires_in, self.granted_scope = expires_in, granted_scope
        self.status, self.body = status, body
        self.forms: list[dict[str, str]] = []
        self.headers: list[dict[str, str]] = []
        self.claims: list[dict[str, Any]] = []
        self.jwt_headers: list[dict[str, Any]] = []
        self.jtis: set[str] = set()
        rsps.add_callback(responses.POST, url, callback=self._callback)

    @property
    def calls(self) -> int:
        return len(self.forms)

    def _callback(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        body = request.body.decode() if isinstance(request.body, bytes) else (request.body or "")
        form = {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}
        self.forms.append(form)
        self.headers.append(dict(request.headers))
        assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
        if self.jwks is not None:
            self._verify_assertion(form)
        if self.status != 200 or self.body is not None:
            return self.status, {"Content-Type": "application/json"}, json.dumps(self.body or {})
        answer: dict[str, Any] = {"access_token": f"tok-{self.calls}", "token_type": "bearer"}
        if self.expires_in is not None:
            answer["expires_in"] = self.expires_in
        if self.granted_scope == "echo":
            answer["scope"] = form.get("scope", "")
        elif self.granted_scope is not None:
            answer["scope"] = self.granted_scope
        return 200, {"Content-Type": "application/json"}, json.dumps(answer)

    def _verify_assertion(self, form: dict[str, str]) -> None:
        assert form["grant_type"] == "client_credentials"
        assert form["client_assertion_type"] == CLIENT_ASSERTION_TYPE
        assert form["scope"] == SCOPE
        assert set(form) == {"grant_type", "scope", "client_assertion_type", "client_assertion"}
        assertion = form["client_assertion"]
        header = jwt.get_unverified_header(assertion)
        # Verify the signature with the key registered for this kid — as the EHR does.
        jwk = jwt.PyJWKSet.from_dict(self.jwks)[header["kid"]]
        now = time.time()
        claims = jwt.decode(
            assertion,
            jwk.key,
            algorithms=[self.alg],
            audience=self.url,
            issuer=CLIENT_ID,
            options={"require": ["iss", "sub", "aud", "exp", "iat", "jti"]},
        )
        assert header["alg"] == self.alg
        assert header["typ"] == "JWT"
        assert header["kid"] == self.jwks["keys"][0]["kid"]
        if self.jku is None:
            assert "jku" not in header
        else:
            assert header["jku"] == self.jku
        assert claims["sub"] == claims["iss"] == CLIENT_ID
        assert claims["aud"] == self.url
        assert now < claims["exp"] <= now + 300
        assert abs(claims["iat"] - now) <= 2
        assert claims["jti"] not in self.jtis, "jti reused"
        self.jtis.add(claims["jti"])
        self.claims.append(claims)
        self.jwt_headers.append(header)


class FhirServer:
    """Records the Authorization header of each FHIR call and answers with scripted statuses."""

    def __init__(self, rsps: responses.RequestsMock, url: str = BASE + "/Patient", statuses: list[int] | None = None,
                 method: str = responses.GET) -> None:
        self.statuses = list(statuses or [])
        self.auth_headers: list[str | None] = []
        rsps.add_callback(method, url, callback=self._callback)

    def _callback(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        self.auth_headers.append(request.headers.get("Authorization"))
        status = self.statuses.pop(0) if self.statuses else 200
        headers = {"Content-Type": "application/fhir+json"}
        if status == 401:
            headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
        return status, headers, json.dumps({"resourceType": "Bundle"})


def send_like_fhir_client(session: requests.Session, auth: PeersyncAuth, method: str, url: str) -> requests.Response:
    """The loop the FHIR HTTP client is expected to run around each request."""
    resp = session.request(method, url, auth=auth)
    if resp.status_code == 401 and auth.invalidate(resp):
        resp = session.request(method, url, auth=auth)
    if resp.status_code in (401, 403):
        raise auth.unauthorized_error(resp)
    return resp


def smart_settings(keypairs: dict[str, tuple[Path, dict[str, Any]]], key_alg: str, /, **kw: Any) -> AuthSettings:
    values: dict[str, Any] = {
        "mode": "smart-backend",
        "client_id": CLIENT_ID,
        "kid": f"kid-{key_alg.lower()}",
        "private_key_file": keypairs[key_alg][0],
        "scope": SCOPE,
    }
    values.update(kw)
    return AuthSettings(**values)


def cc_settings(**kw: Any) -> AuthSettings:
    values: dict[str, Any] = {
        "mode": "client-credentials",
        "client_id": CLIENT_ID,
        "client_secret": SECRET,
        "token_url": TOKEN_URL,
        "scope": SCOPE,
    }
    values.update(kw)
    return AuthSettings(**values)


# --------------------------------------------------------------------------------------------
# scope coverage


@pytest.mark.parametrize(
    ("granted", "required", "covered"),
    [
        ("system/Goal.cu", "system/Goal.cu", True),
        ("system/Goal.cruds", "system/Goal.cu", True),
        ("system/Goal.c system/Goal.u", "system/Goal.cu", True),
        ("system/Goal.c", "system/Goal.cu", False),
        ("system/Goal.write", "system/Goal.cu", True),  # v1 write = v2 cud
        ("system/Goal.write", "system/Goal.cud", True),
        ("system/*.write", "system/CarePlan.cu", True),
        ("system/*.cu", "system/Goal.c", True),
        ("system/Goal.write", "system/Goal.rs", False),  # write does not imply read
        ("system/Goal.read", "system/Goal.rs", True),
        ("system/Goal.read", "system/Goal.s", True),
        ("system/Goal.*", "system/Goal.cruds", True),
        ("system/*.*", "system/Patient.rs", True),
        ("system/Patient.rs", "system/Goal.rs", False),
        ("patient/Goal.cruds", "system/Goal.cu", False),  # context must match
        ("user/*.*", "system/Goal.c", False),
        ("system/Goal.cu", "system/*.cu", False),  # a type grant does not cover the wildcard
        ("system/Observation.rs?category=laboratory", "system/Observation.rs", False),
        ("system/Observation.rs", "system/Observation.rs?category=laboratory", True),
        ("system/Observation.rs?category=laboratory", "system/Observation.rs?category=laboratory", True),
        ("openid fhirUser", "openid", True),
        ("system/*.cruds", "launch", False),
        ("", "system/Goal.c", False),
        ("system/Goal.weird", "system/Goal.c", False),  # uninterpretable grants grant nothing
        ("system/Goal.cu", "", True),
    ],
)
def test_scope_coverage(granted: str, required: str, covered: bool) -> None:
    assert scope_covers(granted, required) is covered


def test_missing_scopes_lists_only_the_gaps() -> None:
    granted = "system/Goal.write system/CarePlan.c system/Patient.read"
    required = ["system/Goal.cu", "system/CarePlan.cu", "system/Patient.rs", "system/Task.cu"]
    assert missing_scopes(granted, required) == ["system/CarePlan.cu", "system/Task.cu"]


def test_parse_scope() -> None:
    s = parse_scope("system/Goal.cu")
    assert s is not None and s.context == "system" and s.resource == "Goal" and s.permissions == frozenset("cu")
    assert parse_scope("openid") is None
    with pytest.raises(ValueError, match="invalid permissions"):
        parse_scope("system/Goal.writ")
    with pytest.raises(ValueError):
        parse_scope("system/Goal.cc")
    with pytest.raises(ValueError, match="not commas"):
        parse_scope("system/Goal.cu,")
    granular = parse_scope("system/Observation.rs?category=laboratory,vital-signs")
    assert granular is not None and granular.query == "?category=laboratory,vital-signs"


# --------------------------------------------------------------------------------------------
# settings


def test_settings_default_is_none() -> None:
    s = AuthSettings()
    assert s.mode == "none" and s.refresh_margin_seconds == 60 and s.required_scopes == []


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"mode": "basic", "username": "u"}, "password"),
        ({"mode": "basic", "password": "x"}, "username"),
        ({"mode": "bearer"}, "token"),
        ({"mode": "client-credentials", "client_id": "c", "client_secret": "s"}, "token_url"),
        ({"mode": "client-credentials", "client_id": "c", "token_url": TOKEN_URL}, "client_secret"),
        ({"mode": "smart-backend", "client_id": "c", "kid": "k", "scope": SCOPE}, "private_key"),
        ({"mode": "smart-backend", "client_id": "c", "private_key_file": "/k.pem", "scope": SCOPE}, "kid"),
        ({"mode": "smart-backend", "client_id": "c", "kid": "k", "private_key_file": "/k.pem"}, "scope"),
        ({"mode": "bearer", "token": "t", "token_file": "/t"}, "both set"),
        ({"mode": "kerberos"}, "mode"),
        ({"scope": "system/Goal.writ"}, "invalid permissions"),
        ({"scope": "system/Goal.cu,system/CarePlan.cu"}, "not commas"),
        ({"required_scopes": ["system/Goal.xyz"]}, "invalid permissions"),
        ({"token_url": "token.example.org/oauth"}, "https://"),
        ({"kid": "../../etc"}, "kid"),
        ({"clientid": "typo"}, "Extra inputs"),
        ({"client_auth_method": "private_key_jwt"}, "client_secret_basic"),
        ({"alg": "HS256"}, "RS384"),
    ],
)
def test_settings_validation(values: dict[str, Any], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        AuthSettings(**values)


def test_settings_scopes_normalised() -> None:
    s = AuthSettings(scope="  system/Goal.cu\n system/CarePlan.cu  system/Goal.cu ",
                     required_scopes="system/Goal.cu  system/CarePlan.cu")
    assert s.scope == "system/Goal.cu system/CarePlan.cu"
    assert s.required_scopes == ["system/Goal.cu", "system/CarePlan.cu"]
    assert AuthSettings(required_scopes='["system/Goal.cu"]').required_scopes == ["system/Goal.cu"]
    assert AuthSettings(scope=["system/Goal.cu", "system/Task.cu"]).scope == "system/Goal.cu system/Task.cu"
    assert s.effective_required_scopes() == ["system/Goal.cu", "system/CarePlan.cu"]
    assert AuthSettings(scope=SCOPE).effective_required_scopes() == SCOPE.split()


def test_settings_from_env_and_toml_like_dict(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """How the config issue will embed AuthSettings (pydantic-settings, nested delimiter '__')."""

    class Settings(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="PEERSYNC_", env_nested_delimiter="__", hide_input_in_errors=True)
        auth: AuthSettings = AuthSettings()

    secret_file = tmp_path / "client_secret"
    secret_file.write_text(SECRET + "\n")
    monkeypatch.setenv("PEERSYNC_AUTH__MODE", "client-credentials")
    monkeypatch.setenv("PEERSYNC_AUTH__CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("PEERSYNC_AUTH__CLIENT_SECRET_FILE", str(secret_file))
    monkeypatch.setenv("PEERSYNC_AUTH__TOKEN_URL", TOKEN_URL)
    monkeypatch.setenv("PEERSYNC_AUTH__SCOPE", SCOPE)
    monkeypatch.setenv("PEERSYNC_AUTH__REQUIRED_SCOPES", "system/Goal.cu system/CarePlan.cu")
    monkeypatch.setenv("PEERSYNC_AUTH__REFRESH_MARGIN_SECONDS", "30")
    s = Settings().auth
    assert s.mode == "client-credentials" and s.client_id == CLIENT_ID
    assert s.client_secret_file == secret_file
    assert s.required_scopes == ["system/Goal.cu", "system/CarePlan.cu"]
    assert s.refresh_margin_seconds == 30

    monkeypatch.setenv("PEERSYNC_AUTH__CLIENT_SECRET", "inline-env-secret-value")
    with pytest.raises(pydantic.ValidationError) as exc_info:
        Settings()
    assert "both set" in str(exc_info.value)
    assert "inline-env-secret-value" not in str(exc_info.value)


def test_secrets_never_rendered(keypairs: dict[str, tuple[Path, dict[str, Any]]]) -> None:
    pem = keypairs["ES384"][0].read_text()
    s = AuthSettings(
        mode="basic", username="svc", password=PASSWORD, token=STATIC_TOKEN, client_secret=SECRET, private_key=pem
    )
    rendered = [repr(s), str(s), json.dumps(s.model_dump(mode="json")), s.model_dump_json(), repr(s.model_dump())]
    for text in rendered:
        for secret in (PASSWORD, STATIC_TOKEN, SECRET, pem.splitlines()[1]):
            assert secret not in text
    assert s.model_dump(mode="json")["password"] == "**********"


def test_validation_errors_do_not_echo_secrets() -> None:
    with pytest.raises(pydantic.ValidationError) as exc_info:
        AuthSettings(mode="basic", username="u:x", password=PASSWORD)
    assert PASSWORD not in str(exc_info.value)

    class Parent(pydantic.BaseModel):
        auth: AuthSettings

    with pytest.raises(pydantic.ValidationError) as exc_info:
        Parent(auth={"mode": "bearer", "token": STATIC_TOKEN, "token_file": "/run/secrets/t"})
    assert STATIC_TOKEN not in str(exc_info.value)
    with pytest.raises(pydantic.ValidationError) as exc_info:
        Parent(auth={"mode": "basic", "username": "u", "password": PASSWORD, "refresh_margin_seconds": -5})
    assert PASSWORD not in str(exc_info.value)


# --------------------------------------------------------------------------------------------
# static modes


def test_none_mode_sends_nothing(rsps: responses.RequestsMock, session: requests.Session) -> None:
    fhir = FhirServer(rsps)
    auth = build_auth(AuthSettings(), BASE, session)
    assert isinstance(auth, NoAuth)
    session.get(BASE + "/Patient", auth=auth)
    assert fhir.auth_headers == [None]
    assert auth.invalidate() is False


def test_basic_auth(rsps: responses.RequestsMock, session: requests.Session, tmp_path: Path) -> None:
    fhir = FhirServer(rsps)
    pw_file = tmp_path / "password"
    pw_file.write_text(PASSWORD + "\n")  # trailing newline from `echo` is not part of it
    auth = build_auth(AuthSettings(mode="basic", username="svc-peersync", password_file=pw_file), BASE, session)
    assert isinstance(auth, BasicAuth)
    session.get(BASE + "/Patient", auth=auth)
    expected = "Basic " + base64.b64encode(f"svc-peersync:{PASSWORD}".encode()).decode()
    assert fhir.auth_headers == [expected]
    assert auth.describe() == {"mode": "basic", "fhir_origin": "https://ehr.example.org", "username": "svc-peersync"}


def test_static_bearer(rsps: responses.RequestsMock, session: requests.Session) -> None:
    fhir = FhirServer(rsps, statuses=[200, 401])
    auth = build_auth(AuthSettings(mode="bearer", token=STATIC_TOKEN), BASE, session)
    assert isinstance(auth, StaticBearerAuth)
    send_like_fhir_client(session, auth, "GET", BASE + "/Patient")
    assert fhir.auth_headers == [f"Bearer {STATIC_TOKEN}"]
    # A static token cannot be refreshed: a 401 fails at once, no second attempt.
    with pytest.raises(AuthError, match="static token") as exc_info:
        send_like_fhir_client(session, auth, "GET", BASE + "/Patient")
    assert exc_info.value.exit_code == ExitCode.AUTH_FAILED
    assert len(fhir.auth_headers) == 2
    assert STATIC_TOKEN not in str(exc_info.value) and STATIC_TOKEN not in repr(auth)


def test_bearer_token_file_with_line_break_inside_rejected(tmp_path: Path, session: requests.Session) -> None:
    f = tmp_path / "token"
    f.write_text("abc\ndef\n")
    with pytest.raises(ConfigError, match="line break") as exc_info:
        build_auth(AuthSettings(mode="bearer", token_file=f), BASE, session)
    assert "abc" not in str(exc_info.value)


def test_missing_secret_file_is_config_error(tmp_path: Path, session: requests.Session) -> None:
    with pytest.raises(ConfigError, match="does not exist") as exc_info:
        build_auth(cc_settings(client_secret=None, client_secret_file=tmp_path / "nope"), BASE, session)
    assert exc_info.value.exit_code == ExitCode.CONFIG_ERROR


def test_empty_secret_file_is_config_error(tmp_path: Path, session: requests.Session) -> None:
    f = tmp_path / "pw"
    f.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        build_auth(AuthSettings(mode="basic", username="u", password_file=f), BASE, session)


# --------------------------------------------------------------------------------------------
# URL safety at build time


def test_http_fhir_base_refused(session: requests.Session) -> None:
    with pytest.raises(TransportError, match="plain http"):
        build_auth(AuthSettings(mode="bearer", token="t"), "http://ehr.example.org/fhir", session)
    assert isinstance(build_auth(AuthSettings(), "http://localhost:8080/fhir", session), NoAuth)


def test_http_token_url_refused(session: requests.Session) -> None:
    with pytest.raises(TransportError, match="plain http"):
        build_auth(cc_settings(token_url="http://auth.example.org/token"), BASE, session)


def test_http_jku_refused(keypairs: dict[str, tuple[Path, dict[str, Any]]], session: requests.Session) -> None:
    with pytest.raises(TransportError, match="plain http"):
        build_auth(smart_settings(keypairs, "ES384", jku="http://keys.example.org/jwks.json"), BASE, session)


# --------------------------------------------------------------------------------------------
# client credentials


def test_client_secret_basic(rsps: responses.RequestsMock, session: requests.Session) -> None:
    server = TokenServer(rsps)
    fhir = FhirServer(rsps)
    auth = build_auth(cc_settings(client_auth_method="client_secret_basic"), BASE, session)
    assert isinstance(auth, ClientCredentialsAuth)
    session.get(BASE + "/Patient", auth=auth)

    assert server.forms == [{"grant_type": "client_credentials", "scope": SCOPE}]
    scheme, encoded = server.headers[0]["Authorization"].split(" ", 1)
    assert scheme == "Basic"
    user, _, pw = base64.b64decode(encoded).decode().partition(":")
    # RFC 6749 §2.3.1: form-urlencoded before base64, so ':' in the secret survives.
    assert (unquote_plus(user), unquote_plus(pw)) == (CLIENT_ID, SECRET)
    assert fhir.auth_headers == ["Bearer tok-1"]


def test_client_secret_post(rsps: responses.RequestsMock, session: requests.Session) -> None:
    server = TokenServer(rsps)
    fhir = FhirServer(rsps)
    auth = build_auth(cc_settings(client_auth_method="client_secret_post"), BASE, session)
    session.get(BASE + "/Patient", auth=auth)
    assert server.forms == [
        {"grant_type": "client_credentials", "scope": SCOPE, "client_id": CLIENT_ID, "client_secret": SECRET}
    ]
    assert "Authorization" not in server.headers[0]
    assert fhir.auth_headers == ["Bearer tok-1"]


def test_session_level_auth_is_not_used_for_token_request(rsps: responses.RequestsMock,
                                                          session: requests.Session) -> None:
    """The FHIR client may set session.auth; the token POST must not recurse into it."""
    server = TokenServer(rsps)
    fhir = FhirServer(rsps)
    auth = build_auth(cc_settings(client_auth_method="client_secret_post"), BASE, session)
    session.auth = auth
    session.get(BASE + "/Patient")
    assert server.calls == 1 and "Authorization" not in server.headers[0]
    assert fhir.auth_headers == ["Bearer tok-1"]


def test_cc_without_scope_sends_no_scope_and_checks_nothing(rsps: responses.RequestsMock,
                                                            session: requests.Session) -> None:
    server = TokenServer(rsps, granted_scope="system/Patient.rs")
    auth = build_auth(cc_settings(scope=None), BASE, session)
    auth.ensure_ready()
    assert server.forms == [{"grant_type": "client_credentials"}]


@pytest.mark.parametrize(
    ("status", "body", "error", "match"),
    [
        (401, {"error": "invalid_client", "error_description": "bad client"}, AuthError, "invalid_client"),
        (400, {"error": "invalid_scope"}, AuthError, "auth.scope"),
        (400, {"error": "unauthorized_client"}, AuthError, "client_credentials grant"),
        (403, None, AuthError, "HTTP 403"),
        (503, None, ServerUnavailableError, "try again later"),
        (429, None, ServerUnavailableError, "HTTP 429"),
        (302, None, ConfigError, "redirect"),
        (200, {"token_type": "bearer"}, AuthError, "no access_token"),
        (200, {"access_token": "x", "token_type": "mac"}, AuthError, "bearer"),
        (200, {"access_token": "x", "expires_in": "soon"}, AuthError, "expires_in"),
        (200, ["not", "an", "object"], AuthError, "JSON object"),
    ],
)
def test_token_endpoint_errors(
    rsps: responses.RequestsMock, session: requests.Session, status: int, body: Any, error: type[Exception], match: str
) -> None:
    TokenServer(rsps, status=status, body=body if body is not None else {"error": "x"})
    auth = build_auth(cc_settings(), BASE, session)
    with pytest.raises(error, match=match) as exc_info:
        auth.ensure_ready()
    assert SECRET not in str(exc_info.value)


def test_token_redirect_not_followed(rsps: responses.RequestsMock, session: requests.Session) -> None:
    rsps.add(responses.POST, TOKEN_URL, status=307, headers={"Location": FOREIGN + "/steal"})
    stolen = rsps.add(responses.POST, FOREIGN + "/steal", json={"access_token": "x"})
    auth = build_auth(cc_settings(client_auth_method="client_secret_post"), BASE, session)
    with pytest.raises(ConfigError, match="redirect"):
        auth.ensure_ready()
    assert stolen.call_count == 0


def test_server_echoing_secret_is_scrubbed(rsps: responses.RequestsMock, session: requests.Session) -> None:
    TokenServer(rsps, status=401, body={"error": "invalid_client", "error_description": f"secret {SECRET} wrong"})
    auth = build_auth(cc_settings(client_auth_method="client_secret_post"), BASE, session)
    with pytest.raises(AuthError) as exc_info:
        auth.ensure_ready()
    assert SECRET not in str(exc_info.value) and "***" in str(exc_info.value)


def test_token_endpoint_unreachable(session: requests.Session, rsps: responses.RequestsMock) -> None:
    rsps.add(responses.POST, TOKEN_URL, body=requests.ConnectionError("refused"))
    auth = build_auth(cc_settings(), BASE, session)
    with pytest.raises(ServerUnavailableError, match="could not reach") as exc_info:
        auth.ensure_ready()
    assert exc_info.value.exit_code == ExitCode.SERVER_UNAVAILABLE


def test_token_tls_failure_is_transport_error(session: requests.Session, rsps: responses.RequestsMock) -> None:
    rsps.add(responses.POST, TOKEN_URL, body=requests.exceptions.SSLError("certificate verify failed"))
    auth = build_auth(cc_settings(), BASE, session)
    with pytest.raises(TransportError, match="CA bundle"):
        auth.ensure_ready()


# --------------------------------------------------------------------------------------------
# SMART Backend Services


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("jku", [None, JKU])
def test_smart_assertion_verified_by_token_endpoint(
    rsps: responses.RequestsMock,
    session: requests.Session,
    keypairs: dict[str, tuple[Path, dict[str, Any]]],
    alg: str,
    jku: str | None,
) -> None:
    discovery = rsps.add(responses.GET, WELL_KNOWN, json=smart_config())
    server = TokenServer(rsps, jwks=keypairs[alg][1], alg=alg, jku=jku)
    fhir = FhirServer(rsps)
    auth = build_auth(smart_settings(keypairs, alg, jku=jku), BASE, session)
    assert isinstance(auth, SmartBackendAuth) and auth.alg == alg

    session.get(BASE + "/Patient", auth=auth)
    assert auth.invalidate() is True
    session.get(BASE + "/Patient", auth=auth)

    assert server.calls == 2  # each verified inside the callback
    assert len(server.jtis) == 2  # fresh jti per assertion
    assert all(c["exp"] - c["iat"] == ASSERTION_LIFETIME_SECONDS <= 300 for c in server.claims)
    assert fhir.auth_headers == ["Bearer tok-1", "Bearer tok-2"]
    assert discovery.call_count == 1  # discovery cached
    disc_req = rsps.calls[0].request
    assert disc_req.url == WELL_KNOWN
    assert disc_req.headers["Accept"] == "application/json"
    assert "Authorization" not in disc_req.headers
    assert "Authorization" not in server.headers[0]


def test_smart_assertion_claims_with_frozen_time(
    rsps: responses.RequestsMock, session: requests.Session, keypairs: dict[str, tuple[Path, dict[str, Any]]]
) -> None:
    rsps.add(responses.GET, WELL_KNOWN, json=smart_config())
    with time_machine.travel(1_750_000_000, tick=False):
        server = TokenServer(rsps, jwks=keypairs["ES384"][1], alg="ES384")
        auth = build_auth(smart_settings(keypairs, "ES384"), BASE, session)
        auth.ensure_ready()
    claims = server.claims[0]
    assert claims["iat"] == 1_750_000_000
    assert claims["exp"] == 1_750_000_000 + ASSERTION_LIFETIME_SECONDS
    assert claims["exp"] <= claims["iat"] + 300


def test_smart_alg_inferred_and_mismatch_rejected(
    keypairs: dict[str, tuple[Path, dict[str, Any]]], session: requests.Session
) -> None:
    auth = build_auth(smart_settings(keypairs, "RS384"), BASE, session)
    assert isinstance(auth, SmartBackendAuth) and auth.alg == "RS384"
    with pytest.raises(ConfigError, match="ES384 needs an EC P-384 key"):
        build_auth(smart_settings(keypairs, "RS384", alg="ES384"), BASE, session)


def test_smart_private_key_inline_with_escaped_newlines(
    rsps: responses.RequestsMock, session: requests.Session, keypairs: dict[str, tuple[Path, dict[str, Any]]]
) -> None:
    rsps.add(responses.GET, WELL_KNOWN, json=smart_config())
    server = TokenServer(rsps, jwks=keypairs["ES384"][1], alg="ES384")
    pem = keypairs["ES384"][0].read_text().replace("\n", "\\n")  # as some env files carry it
    auth = build_auth(smart_settings(keypairs, "ES384", private_key_file=None, private_key=pem), BASE, session)
    auth.ensure_ready()
    assert server.calls == 1


def test_smart_private_key_file_missing(keypairs: dict[str, tuple[Path, dict[str, Any]]], session: requests.Session,
                                        tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        build_auth(smart_settings(keypairs, "ES384", private_key_file=tmp_path / "none.pem"), BASE, session)


def test_smart_configured_token_url_skips_discovery(
    rsps: responses.RequestsMock, session: requests.Session, keypairs: dict[str, tuple[Path, dict[str, Any]]]
) -> None:
    discovery = rsps.add(responses.GET, WELL_KNOWN, json=smart_config())
    server = TokenServer(rsps, jwks=keypairs["RS384"][1], alg="RS384")
    auth = build_auth(smart_settings(keypairs, "RS384", token_url=TOKEN_URL), BASE, session)
    auth.ensure_ready()
    assert server.calls == 1 and discovery.call_count == 0
    assert auth.describe()["token_url_source"] == "configured"


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        (smart_config(token_endpoint=None), ConfigError, "no token_endpoint"),
        (smart_config(token_endpoint_auth_signing_alg_values_supported=["RS384"]), ConfigError,
         r"lacks ES384.*--alg RS384"),
        (smart_config(token_endpoint_auth_methods_supported=["client_secret_basic"]), ConfigError,
         r"lacks private_key_jwt.*client-credentials"),
        (smart_config(grant_types_supported=["authorization_code"]), ConfigError, "lacks client_credentials"),
        (
            smart_config(capabilities=["launch-ehr"], token_endpoint_auth_methods_supported=None),
            ConfigError,
            "client-confidential-asymmetric",
        ),
        (smart_config(token_endpoint="http://auth.example.org/token"), TransportError, "plain http"),
        (smart_config(capabilities="client-confidential-asymmetric"), ConfigError, "list of strings"),
        (["not", "an", "object"], ConfigError, "not a JSON object"),
    ],
)
def test_smart_discovery_problems(
    rsps: responses.RequestsMock,
    session: requests.Session,
    keypairs: dict[str, tuple[Path, dict[str, Any]]],
    config: Any,
    error: type[Exception],
    match: str,
) -> None:
    rsps.add(responses.GET, WELL_KNOWN, json=config)
    server = TokenServer(rsps, jwks=keypairs["ES384"][1], alg="ES384")
    auth = build_auth(smart_settings(keypairs, "ES384"), BASE, session)
    with pytest.raises(error, match=match):
        auth.ensure_ready()
    assert server.calls == 0


@pytest.mark.parametrize(("status", "error"), [(404, ConfigError), (503, ServerUnavailableError)])
def test_smart_discovery_http_errors(
    rsps: responses.RequestsMock, session: requests.Session, keypairs: dict[str, tuple[Path, dict[str, Any]]],
    status: int, error: type[Exception],
) -> None:
    rsps.add(responses.GET, WELL_KNOWN, status=status)
    auth = build_auth(smart_settings(keypairs, "ES384"), BASE, session)
    with pytest.raises(error):
        auth.ensure_ready()


def test_smart_discovery_lenient_where_spec_allows(
    rsps: responses.RequestsMock, session: requests.Session, keypairs: dict[str, tuple[Path, dict[str, Any]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Lists the server leaves out are not held against it; a missing capability only warns."""
    rsps.add(
        responses.GET,
        WELL_KNOWN,
        json=smart_config(
            capabilities=["permission-v1"],
            token_endpoint_auth_signing_alg_values_supported=None,
            grant_types_supported=None,
        ),
    )
    server = TokenServer(rsps, jwks=keypairs["ES384"][1], alg="ES384")
    auth = build_auth(smart_settings(keypairs, "ES384"), BASE, session)
    with caplog.at_level(logging.WARNING, logger="connector.auth"):
        auth.ensure_ready()
    assert server.calls == 1
    assert "client-confidential-asymmetric" in caplog.text
    assert "permission-v1" in caplog.text  # our v2 scopes may be refused by a v1-only server


def test_smart_echoed_assertion_is_scrubbed(
    rsps: responses.RequestsMock, session: requests.Session, keypairs: dict[str, tuple[Path, dict[str, Any]]]
) -> None:
    rsps.add(responses.GET, WELL_KNOWN, json=smart_config())
    echoed: list[str] = []

    def echo(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        assertion = parse_qs(request.body)["client_assertion"][0]
        echoed.append(assertion)
        return 400, {}, json.dumps({"error": "invalid_client", "error_description": f"bad jwt {assertion}"})

    rsps.add_callback(responses.POST, TOKEN_URL, callback=echo)
    auth = build_auth(smart_settings(keypairs, "ES384"), BASE, session)
    with pytest.raises(AuthError) as exc_info:
        auth.ensure_ready()
    assert echoed and echoed[0][:40] not in str(exc_info.value)


def test_smart_invalid_client_hint(
    rsps: responses.RequestsMock, session: requests.Session, keypairs: dict[str, tuple[Path, dict[str, Any]]]
) -> None:
    rsps.add(responses.GET, WELL_KNOWN, json=smart_config())
    TokenServer(rsps, status=400, body={"error": "invalid_client"})
    auth = build_auth(smart_settings(keypairs, "ES384"), BASE, session)
    with pytest.raises(AuthError, match=r"kid.*clock") as exc_info:
        auth.ensure_ready()
    assert exc_info.value.exit_code == ExitCode.AUTH_FAILED


# --------------------------------------------------------------------------------------------
# granted scope check


def test_narrower_granted_scope_is_clear_auth_error(
    rsps: responses.RequestsMock, session: requests.Session, keypairs: dict[str, tuple[Path, dict[str, Any]]]
) -> None:
    rsps.add(responses.GET, WELL_KNOWN, json=smart_config())
    TokenServer(rsps, jwks=keypairs["ES384"][1], alg="ES384", granted_scope="system/Goal.cu system/Patient.read")
    fhir = FhirServer(rsps)
    auth = build_auth(smart_settings(keypairs, "ES384"), BASE, session)
    with pytest.raises(AuthError) as exc_info:
        session.get(BASE + "/Patient", auth=auth)
    message = str(exc_info.value)
    assert exc_info.value.exit_code == ExitCode.AUTH_FAILED
    assert "system/CarePlan.cu" in message and "system/Goal.cu " not in message.split("required")[1]
    assert CLIENT_ID in message and "auth.scope" in message and "required_scopes" in message
    assert "tok-1" not in message
    assert fhir.auth_headers == []  # nothing sent with an insufficient token
    assert auth.describe()["token_cached"] is False


def test_broader_v1_grant_accepted(rsps: responses.RequestsMock, session: requests.Session) -> None:
    TokenServer(rsps, granted_scope="system/*.write system/*.read")
    auth = build_auth(cc_settings(), BASE, session)
    auth.ensure_ready()
    assert auth.describe()["scope_granted"] == ["system/*.write", "system/*.read"]


def test_required_scopes_override(rsps: responses.RequestsMock, session: requests.Session) -> None:
    # The grant is narrower than the requested SCOPE but covers required_scopes: the token is kept and used.
    server = TokenServer(rsps, granted_scope="system/Goal.cu")
    fhir = FhirServer(rsps)
    auth = build_auth(cc_settings(required_scopes=["system/Goal.cu"]), BASE, session)
    session.get(BASE + "/Patient", auth=auth)
    assert server.calls == 1 and fhir.auth_headers == ["Bearer tok-1"]
    info = auth.describe()
    assert info["scope_required"] == ["system/Goal.cu"] and info["scope_granted"] == ["system/Goal.cu"]
    assert info["token_cached"] is True
    # Without the override the whole requested scope is required, and the same grant is refused.
    default = build_auth(cc_settings(), BASE, session)
    with pytest.raises(AuthError, match=r"does not cover the required system/CarePlan\.cu system/Patient\.rs"):
        default.ensure_ready()
    assert default.describe()["token_cached"] is False


def test_no_scope_in_response_means_requested(rsps: responses.RequestsMock, session: requests.Session) -> None:
    TokenServer(rsps, granted_scope=None)
    auth = build_auth(cc_settings(required_scopes=["system/Goal.cu", "system/Task.cu"]), BASE, session)
    with pytest.raises(AuthError, match=r"system/Task\.cu"):
        auth.ensure_ready()  # we never asked for Task: a config error caught before the run


# --------------------------------------------------------------------------------------------
# token lifetime


def test_token_cached_and_reacquired_before_expiry(rsps: responses.RequestsMock, session: requests.Session) -> None:
    server = TokenServer(rsps, expires_in=300)
    fhir = FhirServer(rsps)
    auth = build_auth(cc_settings(refresh_margin_seconds=60), BASE, session)
    with time_machine.travel(1_750_000_000, tick=False) as traveller:
        session.get(BASE + "/Patient", auth=auth)
        traveller.shift(239)
        session.get(BASE + "/Patient", auth=auth)
        assert server.calls == 1
        traveller.shift(2)  # 241 s: inside the 60 s margin
        session.get(BASE + "/Patient", auth=auth)
        assert server.calls == 2
        info = auth.describe()
    assert fhir.auth_headers == ["Bearer tok-1", "Bearer tok-1", "Bearer tok-2"]
    expected = datetime.fromtimestamp(1_750_000_000 + 241 + 300, UTC).isoformat()
    assert info["token_expires_at"] == expected


def test_short_token_margin_clamped(rsps: responses.RequestsMock, session: requests.Session) -> None:
    server = TokenServer(rsps, expires_in=30)
    auth = build_auth(cc_settings(refresh_margin_seconds=60), BASE, session)
    FhirServer(rsps)
    with time_machine.travel(1_750_000_000, tick=False) as traveller:
        session.get(BASE + "/Patient", auth=auth)
        traveller.shift(14)
        session.get(BASE + "/Patient", auth=auth)
        assert server.calls == 1  # margin clamped to 15 s: not a fetch per request
        traveller.shift(2)
        session.get(BASE + "/Patient", auth=auth)
        assert server.calls == 2


def test_missing_expires_in_assumes_300(rsps: responses.RequestsMock, session: requests.Session) -> None:
    server = TokenServer(rsps, expires_in=None)
    auth = build_auth(cc_settings(refresh_margin_seconds=60), BASE, session)
    with time_machine.travel(1_750_000_000, tick=False) as traveller:
        auth.ensure_ready()
        traveller.shift(239)
        auth.ensure_ready()
        assert server.calls == 1
        traveller.shift(2)
        auth.ensure_ready()
        assert server.calls == 2


# --------------------------------------------------------------------------------------------
# 401 mid-run


def test_401_refreshes_once_then_succeeds(rsps: responses.RequestsMock, session: requests.Session,
                                          keypairs: dict[str, tuple[Path, dict[str, Any]]]) -> None:
    rsps.add(responses.GET, WELL_KNOWN, json=smart_config())
    server = TokenServer(rsps, jwks=keypairs["ES384"][1], alg="ES384")
    fhir = FhirServer(rsps, statuses=[200, 401, 200])
    auth = build_auth(smart_settings(keypairs, "ES384"), BASE, session)
    send_like_fhir_client(session, auth, "GET", BASE + "/Patient")
    resp = send_like_fhir_client(session, auth, "GET", BASE + "/Patient")
    assert resp.status_code == 200
    assert fhir.auth_headers == ["Bearer tok-1", "Bearer tok-1", "Bearer tok-2"]
    assert server.calls == 2


def test_second_401_is_auth_error(rsps: responses.RequestsMock, session: requests.Session) -> None:
    server = TokenServer(rsps)
    fhir = FhirServer(rsps, statuses=[401, 401, 200])
    auth = build_auth(cc_settings(), BASE, session)
    with pytest.raises(AuthError, match=r"HTTP 401, invalid_token.*freshly issued") as exc_info:
        send_like_fhir_client(session, auth, "GET", BASE + "/Patient?identifier=sys|MRN123")
    assert exc_info.value.exit_code == ExitCode.AUTH_FAILED
    assert "MRN123" not in str(exc_info.value)  # query strings can hold identifiers
    assert "tok-" not in str(exc_info.value)
    assert fhir.auth_headers == ["Bearer tok-1", "Bearer tok-2"]  # exactly one refresh
    assert server.calls == 2


def test_403_is_auth_error_without_refresh(rsps: responses.RequestsMock, session: requests.Session) -> None:
    server = TokenServer(rsps)
    FhirServer(rsps, statuses=[403])
    auth = build_auth(cc_settings(), BASE, session)
    with pytest.raises(AuthError, match="lack permission"):
        send_like_fhir_client(session, auth, "GET", BASE + "/Patient")
    assert server.calls == 1


def test_403_names_the_missing_scope_from_the_outcome_but_nothing_else(
    rsps: responses.RequestsMock, session: requests.Session
) -> None:
    """The server's text is reduced to the scopes it names: no identifier it may quote reaches the message."""
    TokenServer(rsps)
    outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "forbidden",
               "diagnostics": "insufficient_scope: create of CareTeam needs scope system/CareTeam.c "
                              "(v1: system/CareTeam.write) for Patient?identifier=sys|MRN123"}]}
    rsps.add(responses.POST, BASE, status=403, json=outcome)
    auth = build_auth(cc_settings(), BASE, session)
    with pytest.raises(AuthError) as exc_info:
        send_like_fhir_client(session, auth, "POST", BASE)
    message = str(exc_info.value)
    assert "the server names the missing scope system/CareTeam.c system/CareTeam.write;" in message
    assert "MRN123" not in message


def test_invalidate_ignores_stale_401(rsps: responses.RequestsMock, session: requests.Session) -> None:
    """Two parallel requests got 401 with the old token; only the first invalidation refetches."""
    server = TokenServer(rsps)
    FhirServer(rsps, statuses=[401, 401, 200, 200])
    auth = build_auth(cc_settings(), BASE, session)
    r1 = session.get(BASE + "/Patient", auth=auth)
    r2 = session.get(BASE + "/Patient", auth=auth)
    assert auth.invalidate(r1) is True
    session.get(BASE + "/Patient", auth=auth)  # fetches tok-2
    assert auth.invalidate(r2) is True  # stale: tok-2 is kept
    session.get(BASE + "/Patient", auth=auth)
    assert server.calls == 2


# --------------------------------------------------------------------------------------------
# origin binding: redirects and paging links


def _auth_for(kind: str, session: requests.Session, rsps: responses.RequestsMock) -> PeersyncAuth:
    if kind == "basic":
        return build_auth(AuthSettings(mode="basic", username="u", password=PASSWORD), BASE, session)
    if kind == "bearer":
        return build_auth(AuthSettings(mode="bearer", token=STATIC_TOKEN), BASE, session)
    TokenServer(rsps)
    return build_auth(cc_settings(), BASE, session)


@pytest.mark.parametrize("kind", ["basic", "bearer", "oauth"])
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("on_session", [False, True])
def test_cross_host_redirect_drops_credentials(
    rsps: responses.RequestsMock, session: requests.Session, kind: str, status: int, on_session: bool
) -> None:
    auth = _auth_for(kind, session, rsps)
    rsps.add(responses.GET, BASE + "/Goal", status=status, headers={"Location": FOREIGN + "/fhir/Goal"})
    foreign = FhirServer(rsps, url=FOREIGN + "/fhir/Goal")
    if on_session:
        session.auth = auth
        resp = session.get(BASE + "/Goal")
    else:
        resp = session.get(BASE + "/Goal", auth=auth)
    assert resp.status_code == 200 and resp.url == FOREIGN + "/fhir/Goal"
    assert rsps.calls[-2].request.headers.get("Authorization")  # the FHIR origin got credentials
    assert foreign.auth_headers == [None]


@pytest.mark.parametrize("kind", ["basic", "bearer", "oauth"])
def test_downgrade_and_port_change_redirects_drop_credentials(
    rsps: responses.RequestsMock, session: requests.Session, kind: str
) -> None:
    auth = _auth_for(kind, session, rsps)
    rsps.add(responses.GET, BASE + "/A", status=302, headers={"Location": "http://ehr.example.org/fhir/r4/A"})
    rsps.add(responses.GET, BASE + "/B", status=302, headers={"Location": "https://ehr.example.org:8443/fhir/r4/B"})
    downgraded = FhirServer(rsps, url="http://ehr.example.org/fhir/r4/A")
    other_port = FhirServer(rsps, url="https://ehr.example.org:8443/fhir/r4/B")
    session.get(BASE + "/A", auth=auth)
    session.get(BASE + "/B", auth=auth)
    assert downgraded.auth_headers == [None] and other_port.auth_headers == [None]


def test_same_origin_redirect_keeps_credentials(rsps: responses.RequestsMock, session: requests.Session) -> None:
    """Control for the tests above: the harness does see the header when it should be there."""
    auth = _auth_for("bearer", session, rsps)
    rsps.add(responses.GET, BASE + "/Goal", status=302, headers={"Location": BASE + "/Goal/_history"})
    target = FhirServer(rsps, url=BASE + "/Goal/_history")
    session.get(BASE + "/Goal", auth=auth)
    assert target.auth_headers == [f"Bearer {STATIC_TOKEN}"]


@pytest.mark.parametrize("kind", ["basic", "bearer", "oauth"])
def test_paging_link_to_other_host_gets_no_credentials(
    rsps: responses.RequestsMock, session: requests.Session, kind: str
) -> None:
    auth = _auth_for(kind, session, rsps)
    foreign = FhirServer(rsps, url=FOREIGN + "/fhir?_getpages=abc")
    internal = FhirServer(rsps, url="https://ehr.example.org.internal/fhir?_getpages=abc")
    session.headers["Authorization"] = "Bearer leaked-default"  # even a stray session header is removed
    session.get(FOREIGN + "/fhir?_getpages=abc", auth=auth)
    session.get("https://ehr.example.org.internal/fhir?_getpages=abc", auth=auth)
    assert foreign.auth_headers == [None] and internal.auth_headers == [None]
    assert not auth.applies_to(FOREIGN + "/fhir") and auth.applies_to(BASE + "/Goal")


def test_paging_link_to_other_host_does_not_fetch_token(rsps: responses.RequestsMock,
                                                        session: requests.Session) -> None:
    server = TokenServer(rsps)
    FhirServer(rsps, url=FOREIGN + "/fhir")
    auth = build_auth(cc_settings(), BASE, session)
    session.get(FOREIGN + "/fhir", auth=auth)
    assert server.calls == 0


# --------------------------------------------------------------------------------------------
# secret hygiene across a whole flow


def test_no_secret_in_describe_repr_logs(
    rsps: responses.RequestsMock,
    session: requests.Session,
    keypairs: dict[str, tuple[Path, dict[str, Any]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    rsps.add(responses.GET, WELL_KNOWN, json=smart_config())
    server = TokenServer(rsps, jwks=keypairs["ES384"][1], alg="ES384", jku=JKU)
    FhirServer(rsps, statuses=[200, 401, 200])
    smart = build_auth(smart_settings(keypairs, "ES384", jku=JKU), BASE, session)
    send_like_fhir_client(session, smart, "GET", BASE + "/Patient")
    send_like_fhir_client(session, smart, "GET", BASE + "/Patient")
    cc = build_auth(cc_settings(token_url=TOKEN_URL), BASE, session)
    basic = build_auth(AuthSettings(mode="basic", username="u", password=PASSWORD), BASE, session)
    bearer = build_auth(AuthSettings(mode="bearer", token=STATIC_TOKEN), BASE, session)

    info = smart.describe()
    assert info["mode"] == "smart-backend" and info["kid"] == "kid-es384" and info["jku"] == JKU
    assert info["scope_granted"] == SCOPE.split() and info["token_expires_at"]
    assert info["token_url"] == TOKEN_URL and info["token_url_source"] == "discovery"

    pem_body = keypairs["ES384"][0].read_text().splitlines()[1]
    assertions = [f["client_assertion"] for f in server.forms]
    texts = [json.dumps(a.describe()) + repr(a) + str(vars(a)) for a in (smart, cc, basic, bearer)]
    texts.append(caplog.text)
    for text in texts:
        for secret in ("tok-1", "tok-2", SECRET, PASSWORD, STATIC_TOKEN, pem_body, *assertions):
            assert secret not in text


# --------------------------------------------------------------------------------------------
# documentation examples stay valid


def test_docs_toml_examples_validate() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "authentication.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", doc, flags=re.S)
    assert len(blocks) >= 5
    modes = set()
    for block in blocks:
        settings = AuthSettings(**tomllib.loads(block)["auth"])
        modes.add(settings.mode)
        for s in settings.requested_scopes():
            parse_scope(s)
    assert modes == {"none", "basic", "bearer", "client-credentials", "smart-backend"}
    v2 = AuthSettings(**tomllib.loads(blocks[-1])["auth"]).requested_scopes()
    assert len(v2) == 13 and "system/Patient.rs" in v2
