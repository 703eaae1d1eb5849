"""What the test suite's loopback proxies share (the fault proxy of tests/reliability and the EHR-restriction
proxy of tests/ehr): a threaded HTTP server on 127.0.0.1 in front of a loopback FHIR server, its lifecycle,
and forwarding a request upstream. What each proxy does to the traffic is its own."""

from __future__ import annotations

import http.client
import ipaddress
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "content-length"}


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses: the proxies never forward anywhere else."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # the client went away mid-answer (killed, or timed out): not worth a traceback
        super().handle_error(request, client_address)


class ProxyHandler(BaseHTTPRequestHandler):
    """Every method goes to ``_handle``; nothing is logged (URLs hold identifiers)."""

    protocol_version = "HTTP/1.1"
    timeout = 300  # idle keep-alive connections are closed after this

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _handle(self) -> None:
        raise NotImplementedError


class LoopbackProxy:
    """A reverse proxy on 127.0.0.1 (a free port) in front of ``upstream``, a loopback FHIR base URL."""

    def __init__(self, upstream: str, *, name: str, upstream_timeout: float = 120.0,
                 max_body: int = 64 << 20) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or not is_loopback(parts.hostname):
            raise ValueError(f"the {name} forwards only to http:// on a loopback address, not {upstream!r}")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.upstream_path = parts.path.rstrip("/")
        self.upstream_timeout = upstream_timeout
        self.max_body = max_body
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=name, daemon=True)

    def _handler_class(self) -> type[ProxyHandler]:
        raise NotImplementedError

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """The FHIR base URL to give the client (the upstream's path, on the proxy's port)."""
        return f"http://127.0.0.1:{self.port}{self.upstream_path}"

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def forward(self, handler: BaseHTTPRequestHandler, body: bytes, *,
                identity: bool = False) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """Send the handler's request upstream: (status, reason, headers without hop-by-hop ones, body).
        ``identity`` asks for an uncompressed answer (one the proxy reads or rewrites). Raises OSError."""
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=self.upstream_timeout)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            headers["Connection"] = "close"
            if identity:
                headers = {k: v for k, v in headers.items() if k.lower() != "accept-encoding"}
                headers["Accept-Encoding"] = "identity"
            # The Host header is passed through: HAPI builds paging links from it, so they point here.
            conn.request(handler.command, handler.path, body=body if body or handler.command != "GET" else None,
                         headers=headers)
            response = conn.getresponse()
            payload = response.read()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
            return response.status, response.reason, kept, payload
        finally:
            conn.close()
