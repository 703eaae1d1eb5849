"""Loopback-only network guard for the reliability suite (in-process, and in peersync subprocesses through
``sitecustomize``).

Every ``socket.connect``/``connect_ex``/``sendto`` to an address outside 127.0.0.0/8 and ::1, and every name
lookup of a host that is not loopback, is refused (OSError) and recorded: in :data:`VIOLATIONS` and, when
``PEERSYNC_NETGUARD_LOG`` names a file, appended to it. Unix sockets are not affected. The tests assert that
nothing was recorded, so a test can never send traffic off this machine, and a refusal that should happen
*before* any network use (plain http to a remote host) is proven to happen before it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading

VIOLATIONS: list[str] = []
_LOCK = threading.Lock()
_INSTALLED = False
_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_sendto = socket.socket.sendto
_real_getaddrinfo = socket.getaddrinfo


def _loopback_host(host: object) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    text = str(host).strip("[]").lower().rstrip(".")
    if text in ("localhost", "") or text.endswith(".localhost"):
        return True
    try:
        addr = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _record(what: str) -> None:
    with _LOCK:
        VIOLATIONS.append(what)
    path = os.environ.get("PEERSYNC_NETGUARD_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(what + "\n")


def _check(sock: socket.socket, address: object) -> None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    host = address[0] if isinstance(address, tuple) and address else address
    if not _loopback_host(host):
        _record(f"connect to {host!r}")
        raise OSError(101, f"peersync reliability netguard: traffic to non-loopback address {host!r} refused")


def _connect(self: socket.socket, address: object) -> None:
    _check(self, address)
    return _real_connect(self, address)


def _connect_ex(self: socket.socket, address: object) -> int:
    _check(self, address)
    return _real_connect_ex(self, address)


def _sendto(self: socket.socket, data: bytes, *args: object) -> int:
    address = args[-1]
    _check(self, address)
    return _real_sendto(self, data, *args)  # type: ignore[arg-type]


def _getaddrinfo(host: object, *args: object, **kwargs: object) -> list:  # type: ignore[type-arg]
    if not _loopback_host(host):
        _record(f"name lookup of {host!r}")
        raise socket.gaierror(socket.EAI_NONAME, f"peersync reliability netguard: lookup of {host!r} refused")
    return _real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]


def install() -> None:
    """Patch the socket module (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    socket.socket.connect = _connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _connect_ex  # type: ignore[method-assign]
    socket.socket.sendto = _sendto  # type: ignore[method-assign,assignment]
    socket.getaddrinfo = _getaddrinfo  # type: ignore[assignment]
    _INSTALLED = True


def uninstall() -> None:
    """Restore the socket module (the in-process guard is on only while a reliability test runs)."""
    global _INSTALLED
    if not _INSTALLED:
        return
    socket.socket.connect = _real_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _real_connect_ex  # type: ignore[method-assign]
    socket.socket.sendto = _real_sendto  # type: ignore[method-assign]
    socket.getaddrinfo = _real_getaddrinfo
    _INSTALLED = False
