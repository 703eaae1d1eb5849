"""The local Medplum test server (tests/medplum-server/) from Python: start it, stop it, find its URL.

Used by tests/conftest.py (the ``medplum_base_url`` fixture). The server itself is managed by
``tests/medplum-server/server.sh``; see its README. Environment: ``PEERSYNC_MEDPLUM_PORT`` (local port, default
8103), ``PEERSYNC_MEDPLUM_START_TIMEOUT`` (seconds, default 120).

As a script::

    python tests/medplumserver.py url | ensure | status | stop
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fhirserver import ServerError, is_ready

SERVER_SH = Path(__file__).resolve().parent / "medplum-server" / "server.sh"

# npm ci may have to download the packages (~120 MB unpacked) before node starts.
INSTALL_ALLOWANCE_SECONDS = 600


def local_port() -> int:
    return int(os.environ.get("PEERSYNC_MEDPLUM_PORT") or 8103)


def local_base_url() -> str:
    """Base URL of the server that server.sh manages (127.0.0.1 only)."""
    return f"http://127.0.0.1:{local_port()}/fhir/R4"


def start_timeout() -> int:
    return int(os.environ.get("PEERSYNC_MEDPLUM_START_TIMEOUT") or 120)


def _server_sh(command: str, timeout: float) -> subprocess.CompletedProcess[str]:
    if not SERVER_SH.is_file():
        raise ServerError(f"{SERVER_SH} not found")
    try:
        return subprocess.run(["bash", str(SERVER_SH), command], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ServerError(f"medplum-server/server.sh {command} did not finish within {timeout:.0f} s") from exc


def start_server() -> str:
    """``server.sh start`` (npm ci first when needed); returns the base URL. Raises ServerError with the output."""
    result = _server_sh("start", timeout=start_timeout() + INSTALL_ALLOWANCE_SECONDS)
    if result.returncode != 0:
        raise ServerError(f"medplum-server/server.sh start failed (exit {result.returncode}).\n--- output ---\n"
                          f"{result.stdout}{result.stderr}".rstrip())
    url = local_base_url()
    if not is_ready(url):
        raise ServerError(f"medplum-server/server.sh start succeeded but {url}/metadata does not answer")
    return url


def stop_server() -> None:
    """``server.sh stop`` (TERM, then KILL after the grace period)."""
    result = _server_sh("stop", timeout=60)
    if result.returncode != 0:
        raise ServerError(f"medplum-server/server.sh stop failed: {result.stdout}{result.stderr}")


def ensure_server_for_session() -> tuple[str, bool]:
    """The base URL, and whether this call started the server (so the caller should stop it).

    A server already answering on the local port is used as it is (a developer's: not ours to stop).
    """
    url = local_base_url()
    if is_ready(url):
        return url, False
    return start_server(), True


def main(argv: list[str]) -> int:
    command = argv[1] if len(argv) > 1 else ""
    if command == "url":
        print(local_base_url())
    elif command == "ensure":
        print(ensure_server_for_session()[0])
    elif command == "status":
        return _server_sh("status", timeout=30).returncode
    elif command == "stop":
        stop_server()
    else:
        print("usage: medplumserver.py url|ensure|status|stop", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
