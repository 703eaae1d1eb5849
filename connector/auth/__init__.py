"""Authentication for FHIR requests, as ``requests.auth.AuthBase`` objects.

Modes: ``none``, ``basic`` (HTTP Basic), ``bearer`` (static token), ``client-credentials``
(OAuth2, client_secret_basic / client_secret_post) and ``smart-backend`` (SMART Backend
Services: private_key_jwt with RS384 or ES384, token endpoint discovered from
``.well-known/smart-configuration``).

Every auth object attaches credentials only to requests whose origin (scheme, host, port) is
the FHIR base URL's origin; token requests go to the token endpoint with credentials built here,
never through the session's own auth. Tokens are cached and re-acquired shortly before expiry;
after a 401 the HTTP client calls :meth:`PeersyncAuth.invalidate` and retries once::

    resp = session.request(method, url, auth=auth, ...)
    if resp.status_code == 401 and auth.invalidate(resp):
        resp = session.request(method, url, auth=auth, ...)   # new token, once
    if resp.status_code in (401, 403):
        raise auth.unauthorized_error(resp)

Secrets live in ``SecretStr`` until the moment a header or form is built; they never appear in
reprs, ``describe()``, logs or error messages.

The package: :mod:`~connector.auth.scopes` (scope grammar), :mod:`~connector.auth.secrets` (secret files),
:mod:`~connector.auth.methods` (the auth objects), :mod:`~connector.auth.smart` (SMART Backend Services),
:mod:`~connector.auth.keys` (key generation). The ``[auth]`` settings schema is
:class:`connector.ops.config.AuthSettings`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import requests
from pydantic import SecretStr

from connector.auth.methods import (
    DEFAULT_EXPIRES_IN_SECONDS,
    AuthMode,
    BasicAuth,
    ClientAuthMethod,
    ClientCredentialsAuth,
    NoAuth,
    PeersyncAuth,
    RefreshingAuth,
    SigningAlg,
    StaticBearerAuth,
)
from connector.auth.scopes import (
    ResourceScope,
    missing_scopes,
    parse_scope,
    scope_covers,
    split_scopes,
)
from connector.auth.secrets import check_header_safe, resolve_secret
from connector.auth.smart import (
    ASSERTION_LIFETIME_SECONDS,
    CLIENT_ASSERTION_TYPE,
    SMART_CONFIGURATION_PATH,
    SmartBackendAuth,
    SmartConfiguration,
    discover_smart_configuration,
    load_signing_key,
)
from connector.errors import ConfigError
from connector.server.transport import check_url_safety

if TYPE_CHECKING:
    from connector.ops.config import AuthSettings


def build_auth(
    settings: AuthSettings,
    fhir_base_url: str,
    session: requests.Session,
    *,
    allow_insecure_http: bool = False,
) -> PeersyncAuth:
    """Build the auth object for ``settings``; pass it as ``session.auth`` or per request.

    Reads secret files and the private key now (so configuration errors surface before any
    network I/O); SMART discovery and the first token request happen lazily, or eagerly via
    :meth:`PeersyncAuth.ensure_ready`.

    Raises:
        ConfigError: a secret file is missing/unreadable, the key does not fit ``alg``.
        TransportError: the FHIR base, token or jku URL is unsafe (plain http to a remote host).
    """
    check_url_safety(fhir_base_url, allow_insecure_http)
    mode = settings.mode
    if mode == "none":
        return NoAuth(fhir_base_url)
    if mode == "basic":
        if not settings.username:
            raise ConfigError("auth mode 'basic' needs auth.username")
        password = resolve_secret(settings.password, settings.password_file, "password")
        return BasicAuth(fhir_base_url, settings.username, password)
    if mode == "bearer":
        token = resolve_secret(settings.token, settings.token_file, "bearer token")
        token = SecretStr(token.get_secret_value().strip())
        check_header_safe(token, "bearer token")
        return StaticBearerAuth(fhir_base_url, token)

    if not settings.client_id:
        raise ConfigError(f"auth mode {mode!r} needs auth.client_id")
    common: dict[str, Any] = {
        "client_id": settings.client_id,
        "scope": settings.requested_scopes(),
        "required_scopes": settings.effective_required_scopes(),
        "refresh_margin_seconds": settings.refresh_margin_seconds,
        "timeout_seconds": settings.timeout_seconds,
        "allow_insecure_http": allow_insecure_http,
    }
    if mode == "client-credentials":
        if not settings.token_url:
            raise ConfigError("auth mode 'client-credentials' needs auth.token_url")
        secret = resolve_secret(settings.client_secret, settings.client_secret_file, "client secret")
        return ClientCredentialsAuth(
            fhir_base_url,
            session,
            token_url=settings.token_url,
            client_secret=secret,
            client_auth_method=settings.client_auth_method,
            **common,
        )
    if mode == "smart-backend":
        if not settings.kid:
            raise ConfigError("auth mode 'smart-backend' needs auth.kid (the key id in the registered JWK Set)")
        if not settings.scope:
            raise ConfigError("auth mode 'smart-backend' needs auth.scope (e.g. 'system/Goal.cu ...')")
        key, alg = load_signing_key(settings)
        return SmartBackendAuth(
            fhir_base_url,
            session,
            private_key=key,
            alg=alg,
            kid=settings.kid,
            jku=settings.jku,
            token_url=settings.token_url,
            **common,
        )
    raise ConfigError(f"unknown auth mode {mode!r}")  # unreachable while AuthMode is validated


__all__ = [
    "ASSERTION_LIFETIME_SECONDS", "CLIENT_ASSERTION_TYPE", "DEFAULT_EXPIRES_IN_SECONDS", "SMART_CONFIGURATION_PATH",
    "AuthMode", "BasicAuth", "ClientAuthMethod", "ClientCredentialsAuth", "NoAuth", "PeersyncAuth",
    "RefreshingAuth", "ResourceScope", "SigningAlg", "SmartBackendAuth", "SmartConfiguration", "StaticBearerAuth",
    "build_auth", "discover_smart_configuration", "missing_scopes", "parse_scope", "scope_covers", "split_scopes",
]
