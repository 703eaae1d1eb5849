"""A real sync with OAuth2 client credentials: no secret or token ever appears in any output.

The token endpoint is mocked (`responses`); FHIR requests pass through to the real local HAPI server, which
ignores the bearer token; the second test does the same against a real authorization server and a HAPI server
that enforces the tokens (tests/integration/test_auth_server.py). Everything the run produces is scanned:
stdout, stderr (JSON logs, --verbose), the ledger's text, the rejects report and the metrics file.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import authserver
import pytest
import requests
import responses
from click.testing import CliRunner

from connector.auth.methods import RefreshingAuth
from connector.auth.smart import SmartBackendAuth
from connector.cli import main

from .conftest import AuthEnv
from .syncutil import demo_enrollments, make_program, trim_inputs

pytestmark = pytest.mark.integration

CLIENT_SECRET = "cs-7Hq2-UNIQUE-client-secret-value-93kd"
ACCESS_TOKEN = "at-Zx81-UNIQUE-access-token-value-55pq"
TOKEN_URL = "https://auth.clinic.test/oauth2/token"


def test_sync_with_client_credentials_never_outputs_the_secret_or_token(tmp_path: Path, fhir_base_url: str) -> None:
    program = make_program(tmp_path, fhir_base_url)
    secret_file = tmp_path / "client_secret"
    secret_file.write_text(CLIENT_SECRET + "\n", encoding="utf-8")
    secret_file.chmod(0o600)
    metrics = tmp_path / "metrics.prom"
    config = program.config.read_text(encoding="utf-8") + f"""
[auth]
mode = "client-credentials"
client_id = "peersync-demo"
client_secret_file = "{secret_file}"
token_url = "{TOKEN_URL}"
scope = "system/*.cruds"

[output]
metrics_file = "{metrics}"
"""
    program.config.write_text(config, encoding="utf-8")

    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        mock.add_passthru(fhir_base_url)
        mock.post(TOKEN_URL, json={"access_token": ACCESS_TOKEN, "token_type": "bearer", "expires_in": 300,
                                   "scope": "system/*.cruds"})
        runner = CliRunner()
        result = runner.invoke(main, ["sync", "--config", str(program.config), "--log-format", "json", "-v",
                                      "--json"], catch_exceptions=False)
        token_calls = [c for c in mock.calls if c.request.url == TOKEN_URL]

    assert result.exit_code == 65, result.output  # the demo's bad rows and review participants
    # A token was obtained with the secret and the run wrote records with it (so the scan below is meaningful;
    # that the bearer goes only to the FHIR origin is unit-tested in tests/unit/test_auth.py).
    assert len(token_calls) == 1 and token_calls[0].request.headers["Authorization"].startswith("Basic ")
    assert '"created": ' in result.stdout and '"created": 0' not in result.stdout

    ledger = program.settings().sync.ledger
    outputs = {
        "stdout": result.stdout,
        "stderr": result.stderr,
        "ledger": ledger.read_bytes().decode("utf-8", "replace"),
        "metrics": metrics.read_text(encoding="utf-8"),
    }
    for report in program.settings().rejects_dir().glob("rejects.*"):
        outputs[report.name] = report.read_text(encoding="utf-8")
    assert outputs["stderr"].count("\n") > 5  # verbose JSON logs were produced
    for name, text in outputs.items():
        for value in (CLIENT_SECRET, ACCESS_TOKEN):
            assert value not in text, f"{value[:6]}... leaked into {name}"


JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}")  # any JWS: access token or client assertion


def test_a_real_authorization_server_never_outputs_a_token(
    tmp_path: Path, authenv: AuthEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SMART Backend Services with oidc-provider and the enforcing HAPI server: the same scan, plus every JWT,
    over ``auth test``, ``doctor``, a sync that renews its token, ``status``, and a run refused with exit 77.

    Spies keep every access token issued and every client assertion signed, so the scan looks for each of them.
    The sync's first token is made due at its next use, so the sync certainly renews it (two tokens or more)."""
    issued: list[str] = []
    make_due: list[bool] = []  # set before the sync: its first token is due again at once
    assertions: list[str] = []
    parse = RefreshingAuth._parse_token_response
    sign = SmartBackendAuth.client_assertion

    def spy(self: RefreshingAuth, resp: requests.Response, token_url: str, fetched_at: float) -> Any:
        token = parse(self, resp, token_url, fetched_at)  # raises for a refusal (the refused run)
        issued.append(token.value.get_secret_value())
        if make_due:
            make_due.clear()
            return dataclasses.replace(token, refresh_at=float("-inf"))
        return token

    def signing_spy(self: SmartBackendAuth, token_url: str) -> str:
        assertions.append(sign(self, token_url))
        return assertions[-1]

    monkeypatch.setattr(RefreshingAuth, "_parse_token_response", spy)
    monkeypatch.setattr(SmartBackendAuth, "client_assertion", signing_spy)
    program = make_program(tmp_path, authenv.fhir_base_url, headers=authenv.admin_headers())
    trim_inputs(program.inputs, set(demo_enrollments()[:4]))
    metrics = tmp_path / "metrics.prom"
    key = authenv.rs384
    config = program.config.read_text(encoding="utf-8")
    auth_section = f"""
[auth]
mode = "smart-backend"
client_id = "peersync-short"
private_key_file = "{key.private_key}"
kid = "{key.kid}"
scope = "{" ".join(authserver.SYNC_SCOPES)}"
"""
    program.config.write_text(config + auth_section + f"""
[output]
metrics_file = "{metrics}"
""", encoding="utf-8")
    runner = CliRunner()
    logging = ["--log-format", "json", "-v"]
    results = {}
    tokens: dict[str, int] = {}  # tokens issued to each command
    for name, args in {"auth test": ["auth", "test"], "doctor": ["doctor", *logging],
                       "sync": ["sync", *logging, "--json"], "status": ["status", *logging]}.items():
        before = len(issued)
        make_due[:] = [True] if name == "sync" else []
        results[name] = runner.invoke(main, [*args, "--config", str(program.config)], catch_exceptions=False)
        tokens[name] = len(issued) - before
    refused = tmp_path / "refused.toml"
    refused.write_text(program.config.read_text(encoding="utf-8").replace(f'kid = "{key.kid}"',
                                                                        'kid = "not-registered"'), encoding="utf-8")
    results["refused sync"] = runner.invoke(main, ["sync", *logging, "--config", str(refused)],
                                            catch_exceptions=False)

    exits = {name: result.exit_code for name, result in results.items()}
    assert exits == {"auth test": 0, "doctor": 0, "sync": 65, "status": 0, "refused sync": 77}, exits  # 65: the
    # demo's rejected row
    assert tokens["auth test"] == tokens["doctor"] == 1 and tokens["sync"] >= 2 and tokens["status"] == 0, tokens
    assert all(issued) and len(assertions) == len(issued) + 1  # one more: the refused run's
    outputs = {"metrics": metrics.read_text(encoding="utf-8"),
               "ledger": program.settings().sync.ledger.read_bytes().decode("utf-8", "replace")}
    for name, result in results.items():
        outputs[f"{name} stdout"], outputs[f"{name} stderr"] = result.stdout, result.stderr
    for report in program.settings().rejects_dir().glob("rejects.*"):
        outputs[report.name] = report.read_text(encoding="utf-8")
    assert outputs["sync stderr"].count("\n") > 5 and "invalid_client" in outputs["refused sync stderr"]
    for name, text in outputs.items():
        assert not JWT_RE.search(text), f"a JWT leaked into {name}"
        assert "PRIVATE KEY" not in text, f"key material leaked into {name}"
        for secret in (*issued, *assertions):
            assert secret[-24:] not in text, f"an access token or client assertion leaked into {name}"
