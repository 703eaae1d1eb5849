"""The auth objects: credentials attached to FHIR requests, and tokens fetched, cached and refreshed.

See :mod:`connector.auth` for the flow; SMART Backend Services is in :mod:`connector.auth.smart`.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote_plus

import requests
from pydantic import SecretStr
from requests.auth import AuthBase

from connector.auth import keys
from connector.auth.scopes import missing_scopes, split_scopes
from connector.auth.secrets import scrub
from connector.errors import (
    AuthError,
    ConfigError,
    ServerUnavailableError,
    TransportError,
)
from connector.server.transport import Origin, check_url_safety, origin_of, redact_url

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

AuthMode = Literal["none", "basic", "bearer", "client-credentials", "smart-backend"]
ClientAuthMethod = Literal["client_secret_basic", "client_secret_post"]
SigningAlg = keys.SigningAlg
# Used when the token response omits expires_in (RFC 6749 makes it only RECOMMENDED); SMART
# servers SHOULD NOT issue tokens longer than this, so it errs on the early side.
DEFAULT_EXPIRES_IN_SECONDS = 300


def json_body(resp: requests.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return None


_NAMED_SCOPE_RE = re.compile(r"\b(?:system|user|patient)/(?:[A-Z][A-Za-z]+|\*)\.(?:read|write|[cruds]+|\*)")


def scopes_named_by_server(response: requests.Response) -> list[str]:
    """SMART scopes that a 401/403 OperationOutcome's text names (e.g. HAPI: "needs scope system/Goal.c").

    Only strings in scope grammar are taken from the server's text, so no patient data it may quote can pass.
    """
    body = json_body(response)
    if not isinstance(body, Mapping) or body.get("resourceType") != "OperationOutcome":
        return []
    text = " ".join(
        str(issue.get("diagnostics") or "") + " " + str((issue.get("details") or {}).get("text") or "")
        for issue in body.get("issue") or []
        if isinstance(issue, Mapping)
    )
    return list(dict.fromkeys(_NAMED_SCOPE_RE.findall(text)))


# --------------------------------------------------------------------------------------------
# Auth objects


class _NoCredentials(AuthBase):
    """Explicit "no auth" for our own discovery/token calls, so a session-level auth never applies."""

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        return r


NO_CREDENTIALS = _NoCredentials()


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
            named = scopes_named_by_server(response)
            if named:
                hint = f"the server names the missing scope {' '.join(named)}; " + hint
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
                auth=NO_CREDENTIALS,
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
        if status in (404, 405):  # nothing that takes tokens lives at that URL
            raise ConfigError(
                f"token endpoint {where} answered HTTP {status}: there is no token endpoint at that URL; check "
                "auth.token_url (or, with SMART discovery, the server's .well-known/smart-configuration)"
            )
        body = json_body(resp)
        if status != 200:
            error = description = ""
            if isinstance(body, Mapping):
                error = scrub(str(body.get("error") or ""), self._secrets())
                description = scrub(str(body.get("error_description") or ""), self._secrets())
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
            info["token_expires_at"] = datetime.fromtimestamp(token.expires_at, UTC).isoformat()
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
