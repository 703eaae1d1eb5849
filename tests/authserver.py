"""A real authorization server and a SMART-enforcing HAPI server for the auth integration tests.

Three local processes, all on 127.0.0.1:

- the **JWK Set host**: :class:`JwksHost`, a tiny ``http.server`` in the test process serving one file that the
  test rewrites (key rotation), like the HTTPS URL a clinic registers with its EHR;
- the **authorization server**: oidc-provider (npm, OpenID Certified), started by ``tests/auth-server/server.sh``
  with a configuration this module writes (:class:`AuthServer`): clients, the scopes each may be granted, token
  lifetimes and the key that signs access tokens;
- the **FHIR server**: a second instance of the local HAPI server (``tests/fhir-server/server.sh``) with SMART
  enforcement on (``PEERSYNC_FHIR_AUTH_*``), on its own port so the rest of the suite keeps its plain server.

Ports (environment): ``PEERSYNC_AUTH_FHIR_PORT`` (default 8092) and ``PEERSYNC_AUTHZ_PORT`` (default 8190); the
JWK Set host takes a free port.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import requests
from cryptography.hazmat.primitives.asymmetric import rsa

TESTS_DIR = Path(__file__).resolve().parent
AUTH_SERVER_SH = TESTS_DIR / "auth-server" / "server.sh"
FHIR_SERVER_SH = TESTS_DIR / "fhir-server" / "server.sh"
AUTH_RUN_DIR = TESTS_DIR / "auth-server" / "target" / "run"

# What peersync writes (create/update) and reads, as SMART v2 system scopes (docs/authentication.md).
WRITTEN_TYPES = ("Goal", "CarePlan", "CareTeam", "Communication", "CommunicationRequest", "ServiceRequest", "Task",
                 "Practitioner", "PractitionerRole", "Organization", "Device", "Provenance")
# Condition.rs: the sync searches the patient's Conditions for CarePlan.addresses (docs/authentication.md).
SYNC_SCOPES = (*tuple(f"system/{t}.cu" for t in WRITTEN_TYPES), "system/Patient.rs", "system/Condition.rs")
ADMIN_SCOPE = "system/*.cruds"  # the harness's own client: load Patients, count resources, $expunge


def authz_port() -> int:
    return int(os.environ.get("PEERSYNC_AUTHZ_PORT") or 8190)


def auth_fhir_port() -> int:
    return int(os.environ.get("PEERSYNC_AUTH_FHIR_PORT") or 8092)


class JwksHost:
    """Serves ``path`` at ``url`` (``Cache-Control: no-cache``), counting the GETs; rewrite the file to rotate."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fetches = 0
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.fetches += 1
                body = host.path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/jwks.json"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def publish(self, *jwks_docs: dict[str, Any]) -> None:
        """Serve the union of these public JWK Sets from now on."""
        from connector.auth.keys import merge_jwks

        self.path.write_text(json.dumps(merge_jwks(jwks_docs)), encoding="utf-8")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class Client:
    """One client registration on the authorization server."""

    client_id: str
    scope: str  # what this client may be granted
    jwks_uri: str | None = None
    client_secret: str | None = None
    token_ttl_seconds: int = 300

    def as_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"client_id": self.client_id, "scope": self.scope,
                                  "token_ttl_seconds": self.token_ttl_seconds}
        if self.jwks_uri:
            config |= {"token_endpoint_auth_method": "private_key_jwt", "jwks_uri": self.jwks_uri}
        else:
            config |= {"token_endpoint_auth_method": "client_secret_basic", "client_secret": self.client_secret}
        return config


def signing_jwk(port: int) -> dict[str, Any]:
    """The key that signs access tokens: one per port, kept in the run folder (0600) and reused, so a FHIR server
    left running from an earlier session (PEERSYNC_KEEP_SERVER) still holds the right key in its cached JWK Set."""
    path = AUTH_RUN_DIR / f"signing-key-{port}.jwk.json"
    if path.is_file():
        return dict(json.loads(path.read_text(encoding="utf-8")))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key)) | {"kid": "authz-signing-1", "alg": "RS256", "use": "sig"}
    AUTH_RUN_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(jwk, handle)
    return dict(jwk)


@dataclass
class AuthServer:
    """oidc-provider with the clients given; (re)started by :meth:`start` from a configuration file written here."""

    workdir: Path
    resource: str  # the FHIR base URL: the audience of every access token
    clients: list[Client] = field(default_factory=list)
    port: int = field(default_factory=authz_port)

    def __post_init__(self) -> None:
        self._signing_jwk = signing_jwk(self.port)
        self.config_path = self.workdir / "auth-server.json"

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/token"

    @property
    def jwks_url(self) -> str:
        return f"{self.issuer}/jwks"

    def _env(self) -> dict[str, str]:
        return {**os.environ, "PEERSYNC_AUTHZ_PORT": str(self.port)}

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(AUTH_SERVER_SH), *args], env=self._env(), capture_output=True, text=True,
                              timeout=300, check=False)

    def start(self) -> None:
        """Write the configuration (0600: it holds a client secret and the signing key) and (re)start."""
        config = {"issuer": self.issuer, "port": self.port, "resource": self.resource,
                  "signing_key": self._signing_jwk, "clients": [c.as_config() for c in self.clients]}
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(config, handle)
        self._run("stop")
        result = self._run("start", str(self.config_path))
        if result.returncode != 0:
            raise RuntimeError(f"auth-server start failed:\n{result.stdout}{result.stderr}")

    def stop(self) -> None:
        self._run("stop")

    def events(self) -> list[dict[str, Any]]:
        """The server's JSON log lines (token requests granted and refused) since the last (re)start."""
        result = self._run("log", "100000")
        lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        starts = [i for i, e in enumerate(lines) if e.get("event") == "listening"]
        return lines[starts[-1]:] if starts else lines

    def refresh_client_jwks(self, client_id: str) -> None:
        """Make the server fetch this client's JWK Set again now (harness-only route of server.mjs): what the
        expiry of the server's cache of the set leads to, without waiting or a restart."""
        requests.post(f"{self.issuer}/harness/clients/{client_id}/jwks-stale", timeout=30).raise_for_status()

    def token(self, client_id: str, secret: str, scope: str) -> str:
        """An access token for a secret client (the harness's admin client)."""
        response = requests.post(self.token_url, data={"grant_type": "client_credentials", "scope": scope},
                                 auth=(client_id, secret), timeout=30)
        response.raise_for_status()
        return str(response.json()["access_token"])


def start_enforcing_fhir_server(auth: AuthServer) -> str:
    """Start the HAPI instance on :func:`auth_fhir_port` with SMART enforcement (restarted if it runs with other
    settings); return its base URL."""
    env = {**os.environ, "PEERSYNC_FHIR_PORT": str(auth_fhir_port()), "PEERSYNC_FHIR_AUTH_JWKS_URL": auth.jwks_url,
           "PEERSYNC_FHIR_AUTH_ISSUER": auth.issuer, "PEERSYNC_FHIR_AUTH_AUDIENCE": auth.resource,
           "PEERSYNC_FHIR_AUTH_TOKEN_URL": auth.token_url}
    def start() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(FHIR_SERVER_SH), "start"], env=env, capture_output=True, text=True,
                              timeout=2400, check=False)

    result = start()  # a no-op when this instance already runs with these settings (a developer's re-run)
    if "already running with auth_jwks_url" in result.stderr:  # running, but with other settings
        subprocess.run(["bash", str(FHIR_SERVER_SH), "stop"], env=env, capture_output=True, timeout=300, check=False)
        result = start()
    if result.returncode != 0:
        raise RuntimeError(f"enforcing FHIR server did not start:\n{result.stdout}{result.stderr}")
    return result.stdout.strip().splitlines()[-1]


def stop_enforcing_fhir_server() -> None:
    env = {**os.environ, "PEERSYNC_FHIR_PORT": str(auth_fhir_port())}
    subprocess.run(["bash", str(FHIR_SERVER_SH), "stop"], env=env, capture_output=True, timeout=300, check=False)


def fhir_base_for(port: int) -> str:
    return f"http://127.0.0.1:{port}/fhir"


# -- command line: the walk-through in docs/authentication.md -------------------------------------------------------

WALKTHROUGH_DIR = AUTH_RUN_DIR / "walkthrough"
DEMO_PATIENTS = TESTS_DIR.parent / "fixtures" / "demo" / "clinic" / "patients.json"


def walkthrough_start(jwks_uri: str) -> dict[str, str]:
    """The tests' setup by hand: clients peersync-smart (private_key_jwt, keys from ``jwks_uri``) and
    peersync-secret (client secret, written to a 0600 file), the enforcing HAPI server, the demo's Patients."""
    import secrets

    WALKTHROUGH_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret_file = WALKTHROUGH_DIR / "peersync-secret.client_secret"
    secret = secrets.token_urlsafe(24)
    secret_file.unlink(missing_ok=True)
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(secret + "\n")
    admin_secret = secrets.token_urlsafe(24)
    fhir_base = fhir_base_for(auth_fhir_port())
    scope = " ".join(SYNC_SCOPES)
    auth = AuthServer(WALKTHROUGH_DIR, fhir_base, [
        Client("harness-admin", ADMIN_SCOPE, client_secret=admin_secret),
        Client("peersync-smart", scope, jwks_uri=jwks_uri),
        Client("peersync-secret", scope, client_secret=secret),
    ])
    auth.start()
    fhir_base = start_enforcing_fhir_server(auth)
    token = auth.token("harness-admin", admin_secret, ADMIN_SCOPE)
    response = requests.post(fhir_base, data=DEMO_PATIENTS.read_bytes(), timeout=300,
                             headers={"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"})
    response.raise_for_status()
    return {"issuer": auth.issuer, "token_url": auth.token_url, "fhir_base_url": fhir_base,
            "client_secret_file": str(secret_file), "scope": scope}


def main(argv: list[str]) -> int:
    usage = "usage: authserver.py start JWKS_URI | stop"
    if argv[:1] == ["start"] and len(argv) == 2:
        for name, value in walkthrough_start(argv[1]).items():
            print(f"{name}: {value}")
        return 0
    if argv == ["stop"]:
        if os.environ.get("PEERSYNC_KEEP_SERVER", "").strip().lower() in ("", "0", "false", "no"):
            stop_enforcing_fhir_server()  # kept with PEERSYNC_KEEP_SERVER, like the suite's fixture does
        env = {**os.environ, "PEERSYNC_AUTHZ_PORT": str(authz_port())}
        subprocess.run(["bash", str(AUTH_SERVER_SH), "stop"], env=env, check=False, timeout=120)
        return 0
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
