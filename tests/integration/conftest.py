"""Fixtures for the integration tests that run against a real authorization server (tests/authserver.py).

``authenv`` (session scope, started on first use only): oidc-provider with peersync's clients, the JWK Set host,
and a HAPI instance that enforces SMART scopes. Tests that do not ask for it never start any of it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import authserver
import pytest

from connector.auth import keys

SECRET_CLIENT_SECRET = "cs-Kq81-UNIQUE-real-authz-client-secret-20vd"
ADMIN_SECRET = "adm-Vb27-harness-admin-secret-71mx"
SCOPED_SECRET = "scp-Tn40-harness-scoped-secret-18qa"
# The enforcement tests' client: one scope per letter, so a token can be asked for exactly the letters a test needs.
SCOPED_TYPES = ("Patient", "Goal", "CareTeam")
SCOPED_SCOPES = tuple(f"system/{t}.{letter}" for t in SCOPED_TYPES for letter in "cruds")
SHORT_TOKEN_TTL_SECONDS = 3
NARROW_MISSING = "system/CareTeam.cu"
CONDITION_SCOPE = "system/Condition.rs"  # optional: without it CarePlans are written without addresses
PROCEDURE_SCOPE = "system/Procedure.cus"  # only with [server] contact_procedures = "also" or "instead"


@dataclass
class KeyPair:
    kid: str
    alg: keys.SigningAlg
    private_key: Path
    jwks: dict


def new_key(workdir: Path, alg: keys.SigningAlg, kid: str) -> KeyPair:
    """A signing key as `peersync keys generate` makes it (private key 0600, public JWK Set)."""
    key_path, jwks_path = keys.generate_keypair(alg, kid, workdir / "keys")
    return KeyPair(kid, alg, key_path, json.loads(jwks_path.read_text(encoding="utf-8")))


@dataclass
class AuthEnv:
    """What the auth integration tests talk to."""

    workdir: Path
    auth: authserver.AuthServer
    jwks_host: authserver.JwksHost  # the JWK Set of the shared clients (RS384 + ES384 keys)
    rotating_host: authserver.JwksHost  # the JWK Set of the key-rotation client, rewritten by that test
    fhir_base_url: str
    rs384: KeyPair
    es384: KeyPair

    def admin_headers(self) -> dict[str, str]:
        token = self.auth.token("harness-admin", ADMIN_SECRET, authserver.ADMIN_SCOPE)
        return {"Authorization": f"Bearer {token}"}

    def scoped_headers(self, *scopes: str) -> dict[str, str]:
        """A bearer header whose token grants exactly ``scopes`` (each one of :data:`SCOPED_SCOPES`)."""
        token = self.auth.token("harness-scoped", SCOPED_SECRET, " ".join(scopes))
        return {"Authorization": f"Bearer {token}"}

    def new_key(self, alg: keys.SigningAlg, kid: str) -> KeyPair:
        return new_key(self.workdir, alg, kid)

    def grants(self, client_id: str) -> list[dict]:
        """The authorization server's log of token requests by this client since its last (re)start."""
        return [e for e in self.auth.events() if e.get("client_id") == client_id and e["event"].startswith("grant.")]


@pytest.fixture(scope="session")
def authenv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthEnv]:
    workdir = tmp_path_factory.mktemp("authenv")
    jwks_host = authserver.JwksHost(workdir / "jwks.json")
    rotating_host = authserver.JwksHost(workdir / "rotating-jwks.json")
    fhir_base_url = authserver.fhir_base_for(authserver.auth_fhir_port())
    sync_scope = " ".join(authserver.SYNC_SCOPES)
    narrow_scope = " ".join(s for s in authserver.SYNC_SCOPES if s != NARROW_MISSING)
    auth = authserver.AuthServer(workdir, fhir_base_url, [
        authserver.Client("harness-admin", authserver.ADMIN_SCOPE, client_secret=ADMIN_SECRET),
        authserver.Client("harness-scoped", " ".join(SCOPED_SCOPES), client_secret=SCOPED_SECRET),
        authserver.Client("peersync-smart", sync_scope, jwks_uri=jwks_host.url),
        authserver.Client("peersync-short", sync_scope, jwks_uri=jwks_host.url,
                          token_ttl_seconds=SHORT_TOKEN_TTL_SECONDS),
        authserver.Client("peersync-narrow", narrow_scope, jwks_uri=jwks_host.url),
        authserver.Client("peersync-procedures", " ".join((*authserver.SYNC_SCOPES, PROCEDURE_SCOPE)),
                          jwks_uri=jwks_host.url),
        authserver.Client("peersync-no-condition", " ".join(s for s in authserver.SYNC_SCOPES if s != CONDITION_SCOPE),
                          jwks_uri=jwks_host.url),
        authserver.Client("peersync-rotating", sync_scope, jwks_uri=rotating_host.url),
        authserver.Client("peersync-secret", sync_scope, client_secret=SECRET_CLIENT_SECRET),
    ])
    rs384 = new_key(workdir, "RS384", "peersync-rs384-1")
    es384 = new_key(workdir, "ES384", "peersync-es384-1")
    jwks_host.publish(rs384.jwks, es384.jwks)
    env = AuthEnv(workdir, auth, jwks_host, rotating_host, fhir_base_url, rs384, es384)
    try:
        auth.start()
        env.fhir_base_url = authserver.start_enforcing_fhir_server(auth)
        yield env
    finally:
        if not os.environ.get("PEERSYNC_KEEP_SERVER"):
            authserver.stop_enforcing_fhir_server()
        auth.stop()
        jwks_host.close()
        rotating_host.close()
