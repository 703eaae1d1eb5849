"""SMART Backend Services: discovery of the token endpoint and signed client assertions (private_key_jwt)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt
import requests
from pydantic import SecretStr

from connector.auth import keys
from connector.auth.methods import NO_CREDENTIALS, RefreshingAuth, SigningAlg, json_body
from connector.auth.scopes import uses_v2_syntax
from connector.errors import (
    ConfigError,
    ServerUnavailableError,
    TransportError,
)
from connector.server.transport import check_url_safety, redact_url

if TYPE_CHECKING:
    from connector.ops.config import AuthSettings

logger = logging.getLogger(__name__)

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# SMART caps the assertion at 5 minutes ahead; 240 s leaves room for our clock running ahead of
# the server's, which would otherwise make a 300 s assertion look too long-lived.
ASSERTION_LIFETIME_SECONDS = 240
SMART_CONFIGURATION_PATH = "/.well-known/smart-configuration"


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
        resp = session.get(url, headers={"Accept": "application/json"}, auth=NO_CREDENTIALS, timeout=timeout_seconds)
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
    doc = json_body(resp)
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{where} is not a JSON object; check the FHIR base URL")
    return SmartConfiguration.from_json(doc, where)


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
                if "permission-v1" in caps and "permission-v2" not in caps and uses_v2_syntax(self.scope):
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
                "that the key's alg is allowed, that this host's clock is correct (NTP), and that the assertion "
                "was not already used: each jti is accepted once, so a replayed assertion is refused"
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



def load_signing_key(settings: AuthSettings) -> tuple[keys.PrivateKey, SigningAlg]:
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
