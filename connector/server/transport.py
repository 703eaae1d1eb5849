"""Safe transport: URL checks, origin comparison and the TLS-verifying ``requests.Session``.

No retries live here (the FHIR client mounts urllib3 ``Retry``); this module only decides
*where* we may send credentials and patient data, and *how* TLS is verified.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from typing import Any, NamedTuple
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests

from connector.errors import TransportError

logger = logging.getLogger(__name__)

_DEFAULT_PORTS = {"http": 80, "https": 443}


class Origin(NamedTuple):
    """RFC 6454 origin: the unit credentials are bound to."""

    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if _DEFAULT_PORTS.get(self.scheme) == self.port:
            return f"{self.scheme}://{host}"
        return f"{self.scheme}://{host}:{self.port}"


def redact_url(url: str) -> str:
    """Return ``url`` without user-info, query and fragment, safe for logs and error messages.

    Query strings can carry patient identifiers (``?identifier=...``) and user-info can carry
    passwords, so neither may reach a log line.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{host}:{parts.port}" if parts.port is not None else host
    except ValueError:
        return "<unparseable URL>"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def origin_of(url: str) -> Origin:
    """Return the (scheme, host, port) origin of an absolute http(s) URL.

    Raises:
        TransportError: the URL is not absolute http(s) or has no host.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # e.g. a non-numeric port
        raise TransportError(f"invalid URL {redact_url(url)!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise TransportError(
            f"URL {redact_url(url)!r} must start with https:// (or http:// for a local test server)"
        )
    if not parts.hostname:
        raise TransportError(f"URL {redact_url(url)!r} has no host name")
    # Trailing dot ("ehr.example.org.") names the same host; normalise so the comparison holds.
    host = parts.hostname.lower().rstrip(".")
    return Origin(scheme, host, port if port is not None else _DEFAULT_PORTS[scheme])


def same_origin(url_a: str, url_b: str) -> bool:
    """True when both URLs share scheme, host and port (invalid URLs never match)."""
    try:
        return origin_of(url_a) == origin_of(url_b)
    except TransportError:
        return False


def is_loopback_host(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1 (traffic that never leaves the machine)."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):  # RFC 6761 §6.3
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def check_url_safety(url: str, allow_insecure_http: bool = False) -> str:
    """Check that ``url`` may carry credentials and PHI; return it unchanged.

    Rules: absolute ``https://`` URL with a host and no embedded user-info; plain ``http://``
    only to a loopback host (local HAPI) unless ``allow_insecure_http`` is set explicitly.

    Raises:
        TransportError: the URL breaks one of the rules (the message names the fix).
    """
    origin = origin_of(url)
    if "@" in (urlsplit(url).netloc or ""):
        # requests would turn user-info into Basic auth and it would end up in logs.
        raise TransportError(
            f"URL {redact_url(url)!r} contains a user name or password; remove it and put "
            "credentials in the [auth] section (or a secret file) instead"
        )
    if origin.scheme == "http" and not is_loopback_host(origin.host):
        if not allow_insecure_http:
            raise TransportError(
                f"refusing plain http:// to {origin}: credentials and patient data would travel "
                "unencrypted. Use https://, or set allow_insecure_http = true only for a test "
                "server on a trusted network"
            )
        logger.warning("plain http:// allowed by configuration for %s; do not use with real data", origin)
    return url


def check_next_link(next_url: str, base_url: str) -> str:
    """Resolve a Bundle ``link[next]`` (or any server-supplied URL) and require the base's origin.

    Servers behind proxies sometimes return paging links with an internal or foreign host;
    following them would leak the bearer token or PHI, so they are refused, not rewritten.

    Returns:
        The absolute URL to request.

    Raises:
        TransportError: the link points to another scheme, host or port.
    """
    absolute = urljoin(base_url, next_url)
    base_origin = origin_of(base_url)
    try:
        link_origin = origin_of(absolute)
    except TransportError:
        link_origin = None
    if link_origin != base_origin:
        shown = str(link_origin) if link_origin is not None else redact_url(absolute)
        raise TransportError(
            f"server returned a link to {shown}, outside the configured FHIR base {base_origin}; "
            "not following it. Check the server's public base URL setting (e.g. HAPI "
            "server_address / reverse-proxy X-Forwarded-* headers)"
        )
    return absolute


class _PeersyncSession(requests.Session):
    """Session whose explicit ``verify`` setting beats ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``.

    Plain requests lets those environment variables override ``session.verify`` (psf/requests
    #3829), so a configured CA bundle — or an explicit ``verify=False`` — could be silently
    replaced. We keep the environment default only when the session uses the default ``True``.

    The environment (proxy and CA bundle variables) is read once per origin and settings, not on
    every request: requests walks all of ``os.environ`` each time, a tenth of a sync's client CPU.
    """

    def __init__(self) -> None:
        super().__init__()
        self._environment: dict[tuple[Any, ...], dict[str, Any]] = {}

    def merge_environment_settings(  # type: ignore[override]
        self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any
    ) -> dict[str, Any]:
        if verify is None and self.verify is not True:
            verify = self.verify
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc, tuple(sorted((proxies or {}).items())), stream, verify,
               cert if not isinstance(cert, list) else tuple(cert))
        if key not in self._environment:
            self._environment[key] = dict(super().merge_environment_settings(url, proxies, stream, verify, cert))
        settings = self._environment[key]
        return {**settings, "proxies": dict(settings["proxies"])}


def new_session(
    verify: bool | str = True,
    user_agent: str = "peersync",
    *,
    client_cert: str | tuple[str, str] | None = None,
) -> requests.Session:
    """Return a ``requests.Session`` with TLS verification on (default) and our User-Agent.

    Args:
        verify: ``True`` (system/certifi CAs, or ``REQUESTS_CA_BUNDLE``), a path to a CA bundle
            file or a c_rehash'ed directory (private hospital CA), or ``False`` (testing only).
        user_agent: sent on every request; include a contact address per Singer practice.
        client_cert: optional client certificate for mutual TLS (PEM path, or (cert, key) paths).

    Raises:
        TransportError: the CA bundle or client certificate path does not exist.
    """
    if isinstance(verify, str):
        if not verify.strip():
            raise TransportError("CA bundle path is empty; omit it to use the system CAs")
        if not os.path.exists(verify):
            raise TransportError(f"CA bundle {verify!r} does not exist; fix the tls CA bundle setting")
    elif verify is False:
        logger.warning("TLS certificate verification is DISABLED; use only against a local test server")
    elif verify is not True:
        raise TransportError("verify must be true, false or a CA bundle path")
    if client_cert is not None:
        for path in (client_cert,) if isinstance(client_cert, str) else client_cert:
            if not os.path.exists(path):
                raise TransportError(f"client certificate file {path!r} does not exist")

    session = _PeersyncSession()
    session.verify = verify
    if client_cert is not None:
        session.cert = client_cert
    session.headers["User-Agent"] = user_agent
    # urllib3 2.x already refuses TLS < 1.2 by default (SMART requires TLS >= 1.2); the FHIR
    # client mounts its own HTTPAdapter for retries, so we do not pin an SSL context here.
    return session
