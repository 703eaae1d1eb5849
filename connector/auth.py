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
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote_plus

import jwt
import requests
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode
from requests.auth import AuthBase

from connector import keys
from connector.errors import AuthError, ConfigError, ServerUnavailableError, TransportError
from connector.transport import Origin, check_url_safety, origin_of, redact_url

logger = logging.getLogger(__name__)

AuthMode = Literal["none", "basic", "bearer", "client-credentials", "smart-backend"]
ClientAuthMethod = Literal["client_secret_basic", "client_secret_post"]
SigningAlg = Literal["RS384", "ES384"]

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# SMART caps the assertion at 5 minutes ahead; 240 s leaves room for our clock running ahead of
# the server's, which would otherwise make a 300 s assertion look too long-lived.
ASSERTION_LIFETIME_SECONDS = 240
# Used when the token response omits expires_in (RFC 6749 makes it only RECOMMENDED); SMART
# servers SHOULD NOT issue tokens longer than this, so it errs on the early side.
DEFAULT_EXPIRES_IN_SECONDS = 300
SMART_CONFIGURATION_PATH = "/.well-known/smart-configuration"
_MAX_SERVER_TEXT = 300


# --------------------------------------------------------------------------------------------
# Scopes


@dataclass(frozen=True)
class ResourceScope:
    """A parsed SMART resource scope, v1 (``system/Goal.write``) or v2 (``system/Goal.cu``)."""

    context: str  # patient | user | system
    resource: str  # a FHIR type or "*"
    permissions: frozenset[str]  # subset of c r u d s
    query: str = ""  # v2 granular restriction ("?category=..."), "" when none


_SCOPE_RE = re.compile(r"^(patient|user|system)/([A-Za-z]+|\*)\.([A-Za-z*]+)(\?.*)?$")
# SMART v2 (scopes-and-launch-context): v1 read = .rs, v1 write = .cud, v1 * = .cruds.
_V1_PERMISSIONS = {"read": frozenset("rs"), "write": frozenset("cud"), "*": frozenset("cruds")}


def parse_scope(scope: str) -> ResourceScope | None:
    """Parse one SMART resource scope; return ``None`` for other scopes (``openid``, ``launch``...).

    Raises:
        ValueError: it looks like a resource scope but the permission part is invalid
            (e.g. ``system/Goal.writ``).
    """
    m = _SCOPE_RE.match(scope)
    if m is None:
        if scope.startswith(("patient/", "user/", "system/")):
            raise ValueError(
                f"scope {scope!r} is not a valid SMART resource scope; expected e.g. system/Goal.cu "
                "(scopes are separated by spaces, not commas)"
            )
        return None
    context, resource, perm, query = m.groups()
    if perm in _V1_PERMISSIONS:
        perms = _V1_PERMISSIONS[perm]
    elif perm.islower() and set(perm) <= set("cruds") and len(set(perm)) == len(perm):
        perms = frozenset(perm)
    else:
        raise ValueError(
            f"scope {scope!r} has invalid permissions {perm!r}: use SMART v2 letters from 'cruds' "
            "in that order (e.g. .cu, .rs) or SMART v1 .read / .write / .*"
        )
    return ResourceScope(context, resource, perms, query or "")


def split_scopes(scopes: str | Iterable[str] | None) -> list[str]:
    """Split a space-separated scope string (or pass a list through), dropping empties/duplicates."""
    if scopes is None:
        return []
    items = scopes.split() if isinstance(scopes, str) else [s for item in scopes for s in str(item).split()]
    return list(dict.fromkeys(items))


def missing_scopes(granted: str | Iterable[str], required: str | Iterable[str]) -> list[str]:
    """Return the required scopes that ``granted`` does not cover (empty list = all covered).

    Coverage rules: same context (``system/`` only covers ``system/``); the granted resource is
    the same type or ``*``; the required permissions are a subset of the union of permissions
    granted for that type (``system/Goal.c system/Goal.u`` covers ``system/Goal.cu``); v1
    ``write`` = v2 ``cud`` and ``read`` = ``rs``; a granular grant (``?category=...``) covers only
    the identical restriction. Non-resource scopes must be granted verbatim.
    """
    granted_list = split_scopes(granted)
    granted_set = set(granted_list)
    parsed: list[ResourceScope] = []
    for g in granted_list:
        try:
            p = parse_scope(g)
        except ValueError:  # a server-side oddity we cannot interpret grants nothing
            p = None
        if p is not None:
            parsed.append(p)

    missing: list[str] = []
    for r in split_scopes(required):
        if r in granted_set:
            continue
        try:
            need = parse_scope(r)
        except ValueError:
            need = None
        if need is None:
            missing.append(r)
            continue
        have: set[str] = set()
        for g in parsed:
            if g.context != need.context or g.resource not in ("*", need.resource):
                continue
            if g.query and g.query != need.query:
                continue
            have |= g.permissions
        if not need.permissions <= have:
            missing.append(r)
    return missing


def scope_covers(granted: str | Iterable[str], required: str | Iterable[str]) -> bool:
    """True when ``granted`` covers every scope in ``required`` (see :func:`missing_scopes`)."""
    return not missing_scopes(granted, required)


def _scope_list(value: Any) -> Any:
    """Accept a space-separated string, a JSON list string, or a list (TOML, env, code)."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = json.loads(text)  # a ValueError becomes a normal validation error
        else:
            return split_scopes(text)
    return value


# NoDecode: pydantic-settings would otherwise insist that PEERSYNC_AUTH__REQUIRED_SCOPES is JSON.
ScopeList = Annotated[list[str], NoDecode, BeforeValidator(_scope_list)]


# --------------------------------------------------------------------------------------------
# Settings


class AuthSettings(BaseModel):
    """The ``[auth]`` table of the configuration file (env: ``PEERSYNC_AUTH__<FIELD>``).

    Each secret can be given inline (``password``, ``token``, ``client_secret``,
    ``private_key``) or, preferably, as a file path (``*_file``) such as a Kubernetes/Docker
    secret or a systemd credential; not both.
    """

    # hide_input_in_errors: a ValidationError must not echo the password it was given.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True, str_strip_whitespace=True)

    mode: AuthMode = Field("none", description="none | basic | bearer | client-credentials | smart-backend")
    client_id: str | None = Field(None, description="OAuth client_id assigned by the EHR")
    username: str | None = Field(None, description="HTTP Basic user name (mode basic)")
    password: SecretStr | None = None
    password_file: Path | None = None
    token: SecretStr | None = Field(None, description="static bearer token (mode bearer)")
    token_file: Path | None = None
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    private_key: SecretStr | None = Field(None, description="PEM private key (smart-backend); prefer private_key_file")
    private_key_file: Path | None = None
    token_url: str | None = Field(
        None,
        description="OAuth token endpoint; required for client-credentials; for smart-backend it is "
        "discovered from .well-known/smart-configuration unless set here (setting it skips discovery)",
    )
    client_auth_method: ClientAuthMethod = "client_secret_basic"
    alg: SigningAlg | None = Field(None, description="RS384 | ES384; inferred from the private key if unset")
    kid: str | None = Field(None, description="key id of the signing key, as in the registered JWK Set")
    jku: str | None = Field(None, description="HTTPS URL of our JWK Set, sent in the assertion header if set")
    scope: str | None = Field(
        None, description="space-separated scopes to request, e.g. 'system/Goal.cu system/Patient.rs'"
    )
    required_scopes: ScopeList = Field(
        default_factory=list,
        description="scopes the granted token must cover; defaults to the requested scope",
    )
    refresh_margin_seconds: int = Field(60, ge=0, le=3600, description="re-acquire the token this long before expiry")
    timeout_seconds: float = Field(30.0, gt=0, le=600, description="timeout for discovery and token requests")

    @field_validator("scope", mode="before")
    @classmethod
    def _normalise_scope(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            value = " ".join(str(v) for v in value)
        if isinstance(value, str):
            # Spaces only: commas are legal inside v2 granular scopes (?category=a,b).
            value = " ".join(split_scopes(value)) or None
        return value

    @field_validator("scope")
    @classmethod
    def _check_scope_syntax(cls, value: str | None) -> str | None:
        for s in split_scopes(value):
            parse_scope(s)
        return value

    @field_validator("required_scopes")
    @classmethod
    def _check_required_syntax(cls, value: list[str]) -> list[str]:
        value = split_scopes(value)
        for s in value:
            parse_scope(s)
        return value

    @field_validator("token_url", "jku")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                origin_of(value)
            except TransportError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("kid")
    @classmethod
    def _check_kid(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                keys.check_kid(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _check_mode(self) -> AuthSettings:
        pairs = (
            ("password", "password_file"),
            ("token", "token_file"),
            ("client_secret", "client_secret_file"),
            ("private_key", "private_key_file"),
        )
        for inline, path in pairs:
            if getattr(self, inline) is not None and getattr(self, path) is not None:
                raise ValueError(f"auth.{inline} and auth.{path} are both set; keep only one")

        def need(*names: str) -> None:
            for name in names:
                alternatives = name.split("|")
                if all(getattr(self, n) in (None, "") for n in alternatives):
                    shown = " or ".join(f"auth.{n}" for n in alternatives)
                    raise ValueError(f"auth mode {self.mode!r} needs {shown}")

        if self.mode == "basic":
            need("username", "password|password_file")
            if self.username and ":" in self.username:
                raise ValueError("auth.username must not contain ':' (HTTP Basic cannot carry it)")
        elif self.mode == "bearer":
            need("token|token_file")
        elif self.mode == "client-credentials":
            need("client_id", "client_secret|client_secret_file", "token_url")
        elif self.mode == "smart-backend":
            need("client_id", "kid", "private_key|private_key_file", "scope")
        return self

    def requested_scopes(self) -> list[str]:
        """The scope tokens sent in the token request."""
        return split_scopes(self.scope)

    def effective_required_scopes(self) -> list[str]:
        """Scopes the granted token must cover: ``required_scopes`` or else the requested scopes."""
        return list(self.required_scopes) or self.requested_scopes()


def _read_secret_file(path: Path, what: str) -> str:
    """Read a secret file; trailing newlines (from ``echo`` or editors) are not part of the secret."""
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except FileNotFoundError:
        raise ConfigError(f"{what} file {str(path)!r} does not exist") from None
    except PermissionError:
        raise ConfigError(f"{what} file {str(path)!r} is not readable by this user") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} file {str(path)!r}: {type(exc).__name__}") from None


def _resolve_secret(value: SecretStr | None, path: Path | None, what: str) -> SecretStr:
    if path is not None:
        text = _read_secret_file(path, what)
    elif value is not None:
        text = value.get_secret_value()
    else:
        raise ConfigError(f"no {what} configured")
    if not text:
        raise ConfigError(f"the configured {what} is empty")
    return SecretStr(text)


def _check_header_safe(secret: SecretStr, what: str) -> None:
    # requests would reject a CR/LF in a header with an error that quotes the header value.
    if any(ch in secret.get_secret_value() for ch in "\r\n\t "):
        raise ConfigError(f"the configured {what} contains whitespace or a line break; check the secret file")


def _scrub(text: str, secrets: Iterable[str]) -> str:
    """Shorten server-supplied text and mask any of our secrets a server might echo back."""
    for s in secrets:  # before truncating, or a cut-off secret would no longer match
        if s and len(s) >= 4:
            text = text.replace(s, "***")
    return re.sub(r"[\x00-\x1f\x7f]", " ", text)[:_MAX_SERVER_TEXT]


def _json_body(resp: requests.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------
# Auth objects


class _NoCredentials(AuthBase):
    """Explicit "no auth" for our own discovery/token calls, so a session-level auth never applies."""

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        return r


_NO_CREDENTIALS = _NoCredentials()


class PeersyncAuth(AuthBase):
    """Base class: attaches credentials only to requests for the FHIR base URL's origin.

    ``requests`` calls an auth object only for the first request of a call; on redirects its
    ``rebuild_auth`` drops ``Authorization`` when the host changes. This class covers the first
    request: a URL on another origin (e.g. a paging link) gets no credentials, and any
    ``Authorization`` header already present is removed.
    """

    mode: str = "none"
    #: whether :meth:`invalidate` can produce different credentials (tokens from an endpoint)
    can_refresh: bool = False

    def __init__(self, fhir_base_url: str) -> None:
        self.fhir_origin: Origin = origin_of(fhir_base_url)

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        if self.applies_to(r.url or ""):
            self._attach(r)
        else:
            r.headers.pop("Authorization", None)
            logger.debug("credentials withheld from %s: not the FHIR server's origin", redact_url(r.url or ""))
        return r

    def applies_to(self, url: str) -> bool:
        """True when credentials may be sent to ``url`` (same origin as the FHIR base)."""
        try:
            return origin_of(url) == self.fhir_origin
        except TransportError:
            return False

    def _attach(self, r: requests.PreparedRequest) -> None:
        """Add credentials to a request already known to go to the FHIR origin."""

    def ensure_ready(self) -> None:
        """Obtain and check credentials now (token + scope check), so a run fails before any write."""

    def invalidate(self, response: requests.Response | None = None) -> bool:
        """Drop cached credentials after a 401; True if the next request will use new ones.

        Static credentials (basic, bearer) cannot change, so they return False and the caller
        should raise :meth:`unauthorized_error` straight away.
        """
        return False

    def unauthorized_error(self, response: requests.Response) -> AuthError:
        """Build the AuthError for a 401/403 from the FHIR server (status, path, OAuth error code)."""
        request = response.request
        method = getattr(request, "method", None) or "request"
        where = redact_url(getattr(request, "url", None) or response.url or "")
        challenge = response.headers.get("WWW-Authenticate", "")
        m = re.search(r'error="?([A-Za-z_]+)"?', challenge)
        code = f", {m.group(1)}" if m else ""
        if response.status_code == 403 or (m and m.group(1) == "insufficient_scope"):
            hint = (
                "the credentials are valid but lack permission for this interaction: request the "
                "needed scope in auth.scope (conditional update also needs search, e.g. .s/.rs) and "
                "ask the EHR administrator to grant it to this client"
            )
        else:
            hint = self._unauthorized_hint()
        return AuthError(f"FHIR server refused {method} {where} (HTTP {response.status_code}{code}): {hint}")

    def _unauthorized_hint(self) -> str:
        return "the server requires authentication; configure the [auth] section"

    def describe(self) -> dict[str, Any]:
        """Metadata for logs and ``status --json``: mode, origin, scopes, expiry. Never secrets."""
        return {"mode": self.mode, "fhir_origin": str(self.fhir_origin)}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} mode={self.mode} origin={self.fhir_origin}>"


class NoAuth(PeersyncAuth):
    """Sends no credentials (a local test server, or a network-level trust arrangement)."""

    mode = "none"


class BasicAuth(PeersyncAuth):
    """HTTP Basic (RFC 7617) to the FHIR origin only."""

    mode = "basic"

    def __init__(self, fhir_base_url: str, username: str, password: SecretStr) -> None:
        super().__init__(fhir_base_url)
        self.username = username
        raw = f"{username}:{password.get_secret_value()}".encode()
        self._header = SecretStr("Basic " + base64.b64encode(raw).decode("ascii"))

    def _attach(self, r: requests.PreparedRequest) -> None:
        r.headers["Authorization"] = self._header.get_secret_value()

    def _unauthorized_hint(self) -> str:
        return "check auth.username and the password (auth.password / auth.password_file)"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "username": self.username}


class StaticBearerAuth(PeersyncAuth):
    """A fixed bearer token (issued out of band) to the FHIR origin only."""

    mode = "bearer"

    def __init__(self, fhir_base_url: str, token: SecretStr) -> None:
        super().__init__(fhir_base_url)
        self._token = token

    def _attach(self, r: requests.PreparedRequest) -> None:
        r.headers["Authorization"] = "Bearer " + self._token.get_secret_value()

    def _unauthorized_hint(self) -> str:
        return "the static token was rejected or has expired; replace auth.token / auth.token_file"


@dataclass
class _Token:
    value: SecretStr
    expires_at: float
    refresh_at: float
    granted_scopes: list[str] | None  # None when the server did not say (= as requested)
    fetched_at: float = field(default=0.0)


class RefreshingAuth(PeersyncAuth):
    """Bearer token obtained from an OAuth2 token endpoint; cached, refreshed, scope-checked.

    Subclasses build the token request (:class:`ClientCredentialsAuth`, :class:`SmartBackendAuth`).
    Thread-safe: one lock guards the cached token so parallel requests fetch it once.
    """

    can_refresh = True

    def __init__(
        self,
        fhir_base_url: str,
        session: requests.Session,
        *,
        client_id: str,
        scope: list[str],
        required_scopes: list[str],
        refresh_margin_seconds: int = 60,
        timeout_seconds: float = 30.0,
        allow_insecure_http: bool = False,
    ) -> None:
        super().__init__(fhir_base_url)
        self.fhir_base_url = fhir_base_url
        self.client_id = client_id
        self.scope = list(scope)
        self.required_scopes = list(required_scopes)
        self.refresh_margin_seconds = refresh_margin_seconds
        self._session = session
        self._timeout = timeout_seconds
        self._allow_insecure_http = allow_insecure_http
        self._lock = threading.RLock()
        self._token: _Token | None = None

    # -- what subclasses provide ------------------------------------------------------------

    def token_endpoint(self) -> str:
        """The token URL (configured or discovered)."""
        raise NotImplementedError

    def _token_request(self, token_url: str) -> tuple[dict[str, str], dict[str, str]]:
        """Return (form fields, extra headers) for one token request."""
        raise NotImplementedError

    def _secrets(self) -> list[str]:
        """Secret strings to mask if a server echoes them in an error description."""
        return []

    # -- token lifecycle --------------------------------------------------------------------

    def _attach(self, r: requests.PreparedRequest) -> None:
        r.headers["Authorization"] = "Bearer " + self._current_token().value.get_secret_value()

    def _current_token(self) -> _Token:
        with self._lock:
            token = self._token
            if token is None or time.time() >= token.refresh_at:
                if token is not None:
                    logger.debug("access token due for refresh (mode=%s)", self.mode)
                token = self._acquire()
                self._token = token
            return token

    def ensure_ready(self) -> None:
        self._current_token()

    def invalidate(self, response: requests.Response | None = None) -> bool:
        with self._lock:
            if response is not None and self._token is not None:
                sent = getattr(response.request, "headers", {}).get("Authorization", "")
                current = "Bearer " + self._token.value.get_secret_value()
                if sent and sent != current:
                    # Another thread already replaced the token that got the 401: keep the new one.
                    return True
            self._token = None
        logger.info("access token invalidated after a 401; a new one will be requested (mode=%s)", self.mode)
        return True

    def _acquire(self) -> _Token:
        token_url = self.token_endpoint()
        form, headers = self._token_request(token_url)
        fetched_at = time.time()  # before the POST: the server's clock starts no earlier
        try:
            resp = self._session.post(
                token_url,
                data=form,
                headers={"Accept": "application/json", **headers},
                auth=_NO_CREDENTIALS,
                timeout=self._timeout,
                # A redirect could re-send the form (client_secret / assertion) elsewhere (307/308).
                allow_redirects=False,
            )
        except requests.exceptions.SSLError as exc:
            raise TransportError(
                f"TLS verification failed for the token endpoint {redact_url(token_url)}; if the EHR "
                "uses a private CA, configure its CA bundle"
            ) from exc
        except requests.RequestException as exc:
            raise ServerUnavailableError(
                f"could not reach the token endpoint {redact_url(token_url)} ({type(exc).__name__}); "
                "check network, proxy and DNS"
            ) from exc
        return self._parse_token_response(resp, token_url, fetched_at)

    def _parse_token_response(self, resp: requests.Response, token_url: str, fetched_at: float) -> _Token:
        where = redact_url(token_url)
        status = resp.status_code
        if status == 429 or status >= 500:
            raise ServerUnavailableError(f"token endpoint {where} returned HTTP {status}; try again later")
        if 300 <= status < 400:
            raise ConfigError(
                f"token endpoint {where} answered with a redirect (HTTP {status}); configure the final "
                "token URL (redirects are not followed for token requests)"
            )
        body = _json_body(resp)
        if status != 200:
            error = description = ""
            if isinstance(body, Mapping):
                error = _scrub(str(body.get("error") or ""), self._secrets())
                description = _scrub(str(body.get("error_description") or ""), self._secrets())
            detail = f" {error}" if error else ""
            detail += f" ({description})" if description else ""
            raise AuthError(
                f"token endpoint {where} refused the request (HTTP {status}{',' if detail else ''}{detail}): "
                + self._token_error_hint(error)
            )
        if not isinstance(body, Mapping):
            raise AuthError(f"token endpoint {where} did not return a JSON object; check auth.token_url")
        access_token = body.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise AuthError(f"token endpoint {where} returned no access_token")
        token_type = body.get("token_type")
        if token_type is not None and str(token_type).lower() != "bearer":
            raise AuthError(f"token endpoint {where} issued a {token_type!r} token; only bearer tokens are supported")
        if any(ch in access_token for ch in "\r\n\t "):
            raise AuthError(f"token endpoint {where} returned a malformed access_token")

        lifetime = self._lifetime(body.get("expires_in"), where)
        granted_raw = body.get("scope")
        granted = split_scopes(granted_raw) if isinstance(granted_raw, (str, list)) else None
        # RFC 6749 §5.1: no scope in the response means the requested scope was granted.
        effective = granted if granted is not None else self.scope
        missing = missing_scopes(effective, self.required_scopes)
        if missing:
            shown = " ".join(effective) or "(none)"
            raise AuthError(
                f"the token endpoint granted scope '{shown}', which does not cover the required "
                f"{' '.join(missing)}. Ask the EHR administrator to grant these to client_id "
                f"{self.client_id!r}, request them in auth.scope, or (if the sync does not need them) "
                "narrow auth.required_scopes"
            )
        # Clamp the margin so a short-lived token is still used for half its life.
        margin = min(float(self.refresh_margin_seconds), lifetime / 2)
        logger.info(
            "obtained access token (mode=%s, expires_in=%ss, scopes=%s)",
            self.mode,
            int(lifetime),
            " ".join(effective),
        )
        return _Token(
            value=SecretStr(access_token),
            expires_at=fetched_at + lifetime,
            refresh_at=fetched_at + lifetime - margin,
            granted_scopes=granted,
            fetched_at=fetched_at,
        )

    @staticmethod
    def _lifetime(raw: Any, where: str) -> float:
        if raw is None:
            logger.warning("token endpoint %s sent no expires_in; assuming %ss", where, DEFAULT_EXPIRES_IN_SECONDS)
            return float(DEFAULT_EXPIRES_IN_SECONDS)
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise AuthError(f"token endpoint {where} sent a non-numeric expires_in") from None
        return max(value, 0.0)

    def _token_error_hint(self, error: str) -> str:
        hints = {
            "invalid_client": "the server did not accept our client credentials; check auth.client_id and the secret",
            "invalid_scope": (
                "the server refused the requested scope; check auth.scope against what the EHR "
                "registered for this client"
            ),
            "unauthorized_client": "this client is not allowed the client_credentials grant; ask the EHR administrator",
            "invalid_grant": "the server refused the grant; check the client registration",
        }
        return hints.get(error, "check the [auth] settings and the client registration on the EHR")

    def _unauthorized_hint(self) -> str:
        return (
            "a freshly issued token was rejected too; check that the client registration on the EHR "
            "allows FHIR access (e.g. Epic: client mapped to a background user) and the scopes"
        )

    def describe(self) -> dict[str, Any]:
        token = self._token
        info = {
            **super().describe(),
            "client_id": self.client_id,
            "scope_requested": list(self.scope),
            "scope_required": list(self.required_scopes),
            "scope_granted": None,
            "token_cached": token is not None,
            "token_expires_at": None,
        }
        if token is not None:
            info["scope_granted"] = token.granted_scopes if token.granted_scopes is not None else list(self.scope)
            info["token_expires_at"] = datetime.fromtimestamp(token.expires_at, timezone.utc).isoformat()
        return info


class ClientCredentialsAuth(RefreshingAuth):
    """OAuth2 client credentials with a shared secret (client_secret_basic or client_secret_post)."""

    mode = "client-credentials"

    def __init__(
        self,
        fhir_base_url: str,
        session: requests.Session,
        *,
        token_url: str,
        client_secret: SecretStr,
        client_auth_method: ClientAuthMethod = "client_secret_basic",
        **kwargs: Any,
    ) -> None:
        super().__init__(fhir_base_url, session, **kwargs)
        self._token_url = check_url_safety(token_url, self._allow_insecure_http)
        self._client_secret = client_secret
        self.client_auth_method = client_auth_method

    def token_endpoint(self) -> str:
        return self._token_url

    def _token_request(self, token_url: str) -> tuple[dict[str, str], dict[str, str]]:
        form = {"grant_type": "client_credentials"}
        if self.scope:
            form["scope"] = " ".join(self.scope)
        headers: dict[str, str] = {}
        secret = self._client_secret.get_secret_value()
        if self.client_auth_method == "client_secret_basic":
            # RFC 6749 §2.3.1: form-urlencode id and secret before base64.
            raw = f"{quote_plus(self.client_id)}:{quote_plus(secret)}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode("ascii")
        else:
            form["client_id"] = self.client_id
            form["client_secret"] = secret
        return form, headers

    def _secrets(self) -> list[str]:
        return [self._client_secret.get_secret_value()]

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "token_url": redact_url(self._token_url),
            "client_auth_method": self.client_auth_method,
        }


@dataclass(frozen=True)
class SmartConfiguration:
    """The parts of ``.well-known/smart-configuration`` that backend services use."""

    token_endpoint: str
    grant_types_supported: list[str] | None
    token_endpoint_auth_methods_supported: list[str] | None
    token_endpoint_auth_signing_alg_values_supported: list[str] | None
    capabilities: list[str]
    scopes_supported: list[str] | None

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], where: str) -> SmartConfiguration:
        """Validate the discovery document's shape.

        Raises:
            ConfigError: ``token_endpoint`` missing, or a listed field is not a list of strings.
        """

        def str_list(name: str) -> list[str] | None:
            value = doc.get(name)
            if value is None:
                return None
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}: {name} must be a list of strings")
            return value

        token_endpoint = doc.get("token_endpoint")
        if not isinstance(token_endpoint, str) or not token_endpoint:
            raise ConfigError(
                f"{where} has no token_endpoint; ask the EHR team for the token URL and set "
                "auth.token_url (which skips discovery)"
            )
        return cls(
            token_endpoint=token_endpoint,
            grant_types_supported=str_list("grant_types_supported"),
            token_endpoint_auth_methods_supported=str_list("token_endpoint_auth_methods_supported"),
            token_endpoint_auth_signing_alg_values_supported=str_list(
                "token_endpoint_auth_signing_alg_values_supported"
            ),
            capabilities=str_list("capabilities") or [],
            scopes_supported=str_list("scopes_supported"),
        )

    def check_backend_services(self, alg: str, where: str = "smart-configuration") -> None:
        """Require client_credentials, private_key_jwt and ``alg``; log softer mismatches.

        A list the server omits is not held against it (only ``token_endpoint`` is strictly
        needed to proceed); a list that is present but lacks what we need is an error.

        Raises:
            ConfigError: naming what the server does not support and what to change.
        """
        grants = self.grant_types_supported
        if grants is not None and "client_credentials" not in grants:
            raise ConfigError(
                f"{where}: grant_types_supported {grants} lacks client_credentials, so this server does "
                "not offer SMART Backend Services; ask the EHR team to enable it"
            )
        if grants is None:
            logger.warning("%s does not list grant_types_supported; assuming client_credentials", where)
        methods = self.token_endpoint_auth_methods_supported
        if methods is not None and "private_key_jwt" not in methods:
            alt = ""
            if "client_secret_basic" in methods:
                alt = " (it lists client_secret_basic: try auth mode 'client-credentials')"
            raise ConfigError(
                f"{where}: token_endpoint_auth_methods_supported {methods} lacks private_key_jwt{alt}"
            )
        if "client-confidential-asymmetric" not in self.capabilities:
            if methods is None:
                raise ConfigError(
                    f"{where} advertises neither capability client-confidential-asymmetric nor "
                    "private_key_jwt; the server does not appear to support SMART Backend Services"
                )
            logger.warning("%s lacks capability client-confidential-asymmetric but lists private_key_jwt", where)
        algs = self.token_endpoint_auth_signing_alg_values_supported
        if algs is not None and alg not in algs:
            usable = [a for a in algs if a in keys.SUPPORTED_ALGS]
            fix = (
                f"generate a key with 'peersync keys generate --alg {usable[0]}' and set auth.alg"
                if usable
                else "the server supports neither RS384 nor ES384"
            )
            raise ConfigError(
                f"{where}: token_endpoint_auth_signing_alg_values_supported {algs} lacks {alg}; {fix}"
            )


def discover_smart_configuration(
    fhir_base_url: str,
    session: requests.Session,
    *,
    timeout_seconds: float = 30.0,
) -> SmartConfiguration:
    """GET ``{base}/.well-known/smart-configuration`` and parse it (no credentials sent).

    Raises:
        ConfigError: not published (404) or not a JSON object, or token_endpoint missing.
        ServerUnavailableError: unreachable, 429 or 5xx.
        TransportError: TLS verification failed.
    """
    url = fhir_base_url.rstrip("/") + SMART_CONFIGURATION_PATH
    where = redact_url(url)
    try:
        resp = session.get(url, headers={"Accept": "application/json"}, auth=_NO_CREDENTIALS, timeout=timeout_seconds)
    except requests.exceptions.SSLError as exc:
        raise TransportError(
            f"TLS verification failed for {where}; if the EHR uses a private CA, configure its CA bundle"
        ) from exc
    except requests.RequestException as exc:
        raise ServerUnavailableError(
            f"could not reach {where} ({type(exc).__name__}); check network, proxy and DNS"
        ) from exc
    if resp.status_code == 429 or resp.status_code >= 500:
        raise ServerUnavailableError(f"{where} returned HTTP {resp.status_code}; try again later")
    if resp.status_code != 200:
        raise ConfigError(
            f"{where} returned HTTP {resp.status_code}: the server does not publish SMART configuration "
            "there. Check the FHIR base URL, or set auth.token_url from the EHR's documentation"
        )
    doc = _json_body(resp)
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{where} is not a JSON object; check the FHIR base URL")
    return SmartConfiguration.from_json(doc, where)


def _uses_v2_syntax(scopes: Iterable[str]) -> bool:
    """True if any resource scope uses SMART v2 letters (``.cu``) rather than v1 read/write."""
    for s in scopes:
        m = _SCOPE_RE.match(s)
        if m is not None and m.group(3) not in _V1_PERMISSIONS:
            return True
    return False


class SmartBackendAuth(RefreshingAuth):
    """SMART Backend Services: a signed client assertion (private_key_jwt) per token request."""

    mode = "smart-backend"

    def __init__(
        self,
        fhir_base_url: str,
        session: requests.Session,
        *,
        private_key: keys.PrivateKey,
        alg: SigningAlg,
        kid: str,
        jku: str | None = None,
        token_url: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(fhir_base_url, session, **kwargs)
        keys.check_key_matches_alg(private_key, alg)
        self._private_key = private_key
        self.alg = alg
        self.kid = kid
        self.jku = check_url_safety(jku, self._allow_insecure_http) if jku else None
        self._configured_token_url = check_url_safety(token_url, self._allow_insecure_http) if token_url else None
        self._token_url: str | None = self._configured_token_url
        self.smart_configuration: SmartConfiguration | None = None
        self._last_assertion = SecretStr("")

    def token_endpoint(self) -> str:
        with self._lock:
            if self._token_url is None:
                config = discover_smart_configuration(self.fhir_base_url, self._session, timeout_seconds=self._timeout)
                where = redact_url(self.fhir_base_url.rstrip("/") + SMART_CONFIGURATION_PATH)
                config.check_backend_services(self.alg, where)
                caps = set(config.capabilities)
                if "permission-v1" in caps and "permission-v2" not in caps and _uses_v2_syntax(self.scope):
                    logger.warning("%s advertises only permission-v1; SMART v2 scopes (.cu, .rs) may be refused", where)
                self.smart_configuration = config
                self._token_url = check_url_safety(config.token_endpoint, self._allow_insecure_http)
            return self._token_url

    def client_assertion(self, token_url: str) -> str:
        """Sign a one-time authentication JWT for ``token_url`` (fresh ``jti`` every call)."""
        now = int(time.time())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": token_url,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_SECONDS,
            "jti": str(uuid.uuid4()),
        }
        headers = {"kid": self.kid, "typ": "JWT"}
        if self.jku:
            headers["jku"] = self.jku
        return jwt.encode(claims, self._private_key, algorithm=self.alg, headers=headers)

    def _token_request(self, token_url: str) -> tuple[dict[str, str], dict[str, str]]:
        assertion = self.client_assertion(token_url)
        self._last_assertion = SecretStr(assertion)
        form = {
            "grant_type": "client_credentials",
            "scope": " ".join(self.scope),
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": assertion,
        }
        return form, {}

    def _secrets(self) -> list[str]:
        return [self._last_assertion.get_secret_value()]

    def _token_error_hint(self, error: str) -> str:
        if error == "invalid_client":
            return (
                "the server did not accept our signed assertion; check auth.client_id, that auth.kid "
                "matches a key in the registered JWK Set (and jku, if set, is the registered URL), "
                "that the key's alg is allowed, and that this host's clock is correct (NTP)"
            )
        return super()._token_error_hint(error)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "token_url": redact_url(self._token_url) if self._token_url else None,
            "token_url_source": "configured" if self._configured_token_url else "discovery",
            "alg": self.alg,
            "kid": self.kid,
            "jku": self.jku,
        }


# --------------------------------------------------------------------------------------------
# Factory


def _load_signing_key(settings: AuthSettings) -> tuple[keys.PrivateKey, SigningAlg]:
    if settings.private_key_file is not None:
        path = settings.private_key_file
        try:
            pem = path.read_bytes()  # bytes as-is: PEM line structure matters
        except FileNotFoundError:
            raise ConfigError(f"private key file {str(path)!r} does not exist") from None
        except PermissionError:
            raise ConfigError(f"private key file {str(path)!r} is not readable by this user") from None
        except OSError as exc:
            raise ConfigError(f"cannot read private key file {str(path)!r}: {type(exc).__name__}") from None
        source = f"private key file {str(path)!r}"
    elif settings.private_key is not None:
        # Env vars sometimes carry "\n" literally instead of line breaks.
        pem = settings.private_key.get_secret_value().replace("\\n", "\n").encode()
        source = "auth.private_key"
    else:
        raise ConfigError("auth mode 'smart-backend' needs auth.private_key_file")
    key = keys.load_private_key(pem, source=source)
    alg = settings.alg or keys.alg_for_key(key)
    keys.check_key_matches_alg(key, alg)
    return key, alg


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
        password = _resolve_secret(settings.password, settings.password_file, "password")
        return BasicAuth(fhir_base_url, settings.username, password)
    if mode == "bearer":
        token = _resolve_secret(settings.token, settings.token_file, "bearer token")
        token = SecretStr(token.get_secret_value().strip())
        _check_header_safe(token, "bearer token")
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
        secret = _resolve_secret(settings.client_secret, settings.client_secret_file, "client secret")
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
        key, alg = _load_signing_key(settings)
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
