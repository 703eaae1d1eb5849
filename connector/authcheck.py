"""`peersync auth test`: obtain credentials, report what was granted (never the token), call /metadata."""

from __future__ import annotations

from typing import Any

from connector.app import build_client
from connector.config import Settings


def auth_test(settings: Settings) -> dict[str, Any]:
    """Get a token (if the mode uses one), check its scopes, and read the CapabilityStatement with it.

    Returns a PHI- and secret-free report: auth mode, token endpoint, granted scopes, expiry, and the
    server's FHIR version and software. Raises AuthError / ConfigError / ServerUnavailableError on failure.
    """
    client = build_client(settings, ready_auth=True)
    statement = client.capabilities()
    auth = client.session.auth
    described = auth.describe() if hasattr(auth, "describe") else {"mode": "none"}
    software = statement.get("software") or {}
    return {
        "auth": described,
        "server": {
            "base_url": settings.server.base_url,
            "fhir_version": statement.get("fhirVersion"),
            "software": " ".join(str(software.get(k, "")) for k in ("name", "version")).strip() or None,
        },
        "metadata_status": "ok",
    }
