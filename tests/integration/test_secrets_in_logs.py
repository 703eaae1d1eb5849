"""A real sync with OAuth2 client credentials: no secret or token ever appears in any output.

The token endpoint is mocked (`responses`); FHIR requests pass through to the real local HAPI server, which
ignores the bearer token. Everything the run produces is scanned: stdout, stderr (JSON logs, --verbose),
the ledger's text, the rejects report and the metrics file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import responses
from click.testing import CliRunner

from connector.cli import main

from .syncutil import make_program

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
