"""The local HAPI FHIR test server (tests/fhir-server/) from Python: start it, reset it, load data into it.

Used by tests/conftest.py (the ``fhir_base_url`` fixture) and by the Makefile. Only the standard library
and ``requests``. The server itself is managed by ``tests/fhir-server/server.sh``; see its README.

As a script::

    python tests/fhirserver.py url                 # base URL the tests would use
    python tests/fhirserver.py ensure              # start the local server if needed, print its base URL
    python tests/fhirserver.py status | stop | reset
    python tests/fhirserver.py load-patients FILE  # POST a transaction/batch Bundle (e.g. the demo Patients)
    python tests/fhirserver.py load-conformance DIR  # PUT CodeSystems, ValueSets, StructureDefinitions by id

Environment: ``PEERSYNC_TEST_FHIR_URL`` (use that server, never start one), ``PEERSYNC_FHIR_PORT`` (local port,
default 8089), ``PEERSYNC_FHIR_START_TIMEOUT`` (seconds, default 300), and the other ``PEERSYNC_FHIR_*``
settings of server.sh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import requests

TESTS_DIR = Path(__file__).resolve().parent
SERVER_DIR = TESTS_DIR / "fhir-server"
SERVER_SH = SERVER_DIR / "server.sh"
FHIR_JSON = "application/fhir+json"
HEADERS = {"Accept": FHIR_JSON, "Content-Type": FHIR_JSON}

# Maven may have to download ~350 MB before the JVM starts: allow for that on top of the readiness timeout.
BUILD_ALLOWANCE_SECONDS = 1800


class ServerError(RuntimeError):
    """The FHIR server could not be started, reached or used."""


# -- where the server is --------------------------------------------------------------------------------------------


def local_port() -> int:
    return int(os.environ.get("PEERSYNC_FHIR_PORT") or 8089)


def local_base_url() -> str:
    """Base URL of the server that server.sh manages (127.0.0.1 only)."""
    return f"http://127.0.0.1:{local_port()}/fhir"


def external_base_url() -> str | None:
    """PEERSYNC_TEST_FHIR_URL without a trailing slash, or None when unset."""
    url = os.environ.get("PEERSYNC_TEST_FHIR_URL", "").strip()
    return url.rstrip("/") or None


def start_timeout() -> int:
    return int(os.environ.get("PEERSYNC_FHIR_START_TIMEOUT") or 300)


# -- health ---------------------------------------------------------------------------------------------------------


def is_ready(base_url: str, timeout: float = 10.0) -> bool:
    """True when GET {base}/metadata answers with a CapabilityStatement."""
    try:
        response = requests.get(f"{base_url}/metadata", headers={"Accept": FHIR_JSON}, timeout=timeout)
        return response.status_code == 200 and response.json().get("resourceType") == "CapabilityStatement"
    except (requests.RequestException, ValueError):
        return False


def wait_until_ready(base_url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not is_ready(base_url):
        if time.monotonic() >= deadline:
            raise ServerError(f"no CapabilityStatement from {base_url}/metadata within {timeout:.0f} s")
        time.sleep(1.0)


# -- server.sh ------------------------------------------------------------------------------------------------------


def _server_sh(command: str, timeout: float) -> subprocess.CompletedProcess[str]:
    if not SERVER_SH.is_file():
        raise ServerError(f"{SERVER_SH} not found")
    try:
        return subprocess.run(
            ["bash", str(SERVER_SH), command],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ServerError(f"server.sh {command} did not finish within {timeout:.0f} s") from exc


def local_server_running() -> bool:
    """True when server.sh has a live server on the local port (its pid file)."""
    return _server_sh("status", timeout=60).returncode == 0


def start_server() -> str:
    """``server.sh start`` (builds with Maven if needed); returns the base URL. Raises ServerError with the log."""
    result = _server_sh("start", timeout=start_timeout() + BUILD_ALLOWANCE_SECONDS)
    if result.returncode != 0:
        raise ServerError(
            f"server.sh start failed (exit {result.returncode}).\n--- output ---\n"
            f"{result.stdout}{result.stderr}".rstrip()
        )
    url = local_base_url()
    if not is_ready(url):
        raise ServerError(f"server.sh start succeeded but {url}/metadata does not answer")
    return url


def stop_server() -> None:
    """``server.sh stop`` (TERM, then KILL after the grace period)."""
    result = _server_sh("stop", timeout=120)
    if result.returncode != 0:
        raise ServerError(f"server.sh stop failed: {result.stdout}{result.stderr}")


def ensure_server_for_session() -> tuple[str, bool]:
    """The base URL to test against, and whether this call started the server (so the caller should stop it).

    PEERSYNC_TEST_FHIR_URL wins (never started or stopped here). Otherwise a server already answering on the
    local port is used as it is (a developer's server: not ours to stop); else server.sh starts one.
    """
    external = external_base_url()
    if external:
        wait_until_ready(external, timeout=min(60, start_timeout()))
        return external, False
    url = local_base_url()
    if is_ready(url):
        return url, False
    return start_server(), True


def ensure_server() -> str:
    """Base URL of a ready FHIR server: PEERSYNC_TEST_FHIR_URL if set, else the local one (started if needed)."""
    return ensure_server_for_session()[0]


# -- data -------------------------------------------------------------------------------------------------------------


def _check(response: requests.Response, what: str) -> Any:
    if response.status_code >= 400:
        raise ServerError(f"{what}: HTTP {response.status_code} {response.text[:2000]}")
    try:
        return response.json()
    except ValueError as exc:
        raise ServerError(f"{what}: not JSON: {response.text[:500]}") from exc


def expunge_everything(base_url: str, timeout: float = 300) -> int:
    """Delete every resource and all history (HAPI ``$expunge`` with expungeEverything=true); returns HAPI's count."""
    body = {"resourceType": "Parameters", "parameter": [{"name": "expungeEverything", "valueBoolean": True}]}
    result = _check(
        requests.post(f"{base_url}/$expunge", json=body, headers=HEADERS, timeout=timeout), "$expunge everything"
    )
    for parameter in result.get("parameter", []):
        if parameter.get("name") == "count":
            return int(parameter.get("valueInteger", 0))
    return 0


def post_bundle(base_url: str, bundle: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    """POST a transaction or batch Bundle to the base URL; returns the response Bundle."""
    if bundle.get("resourceType") != "Bundle" or bundle.get("type") not in ("transaction", "batch"):
        raise ServerError("expected a Bundle of type transaction or batch")
    result = _check(
        requests.post(base_url, json=bundle, headers=HEADERS, timeout=timeout), f"{bundle['type']} Bundle"
    )
    if bundle["type"] == "batch":
        failed = [
            e.get("response", {}).get("status")
            for e in result.get("entry", [])
            if not str(e.get("response", {}).get("status", "")).startswith("2")
        ]
        if failed:
            raise ServerError(f"batch entries failed: {failed}")
    return result


def load_bundle_file(base_url: str, path: str | Path) -> dict[str, Any]:
    """POST a transaction/batch Bundle stored as JSON (e.g. fixtures/demo/clinic/patients.json)."""
    bundle = json.loads(Path(path).read_text(encoding="utf-8"))
    return post_bundle(base_url, bundle)


CONFORMANCE_ORDER = ("CodeSystem", "ValueSet", "StructureDefinition")


def load_conformance_resources(
    base_url: str, directory: str | Path, names: Iterable[str] | None = None, timeout: float = 120
) -> list[str]:
    """PUT conformance resources (``{type}/{id}``) from a folder of JSON files, CodeSystems first.

    ``names`` limits it to those file names (e.g. ``["StructureDefinition-us-core-goal.json"]``).
    Returns the canonical URLs loaded. HAPI's validator then finds them for ``$validate?profile=``.
    """
    folder = Path(directory)
    paths = [folder / n for n in names] if names is not None else sorted(folder.glob("*.json"))
    resources = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
    resources = [r for r in resources if isinstance(r, dict) and r.get("resourceType") and r.get("id")]
    order = {t: i for i, t in enumerate(CONFORMANCE_ORDER)}
    loaded = []
    with requests.Session() as session:
        session.headers.update(HEADERS)
        for resource in sorted(resources, key=lambda r: order.get(r["resourceType"], len(order))):
            url = f"{base_url}/{resource['resourceType']}/{resource['id']}"
            _check(session.put(url, json=resource, timeout=timeout), f"PUT {resource['resourceType']}/{resource['id']}")
            loaded.append(resource.get("url", url))
    return loaded


# -- command line -----------------------------------------------------------------------------------------------------


def _summary(result: dict[str, Any]) -> str:
    statuses: dict[str, int] = {}
    for entry in result.get("entry", []):
        status = str(entry.get("response", {}).get("status", "?"))
        statuses[status] = statuses.get(status, 0) + 1
    return ", ".join(f"{n} x {s}" for s, n in sorted(statuses.items())) or "no entries"


def main(argv: list[str]) -> int:
    usage = "usage: fhirserver.py url|ensure|status|stop|reset|load-patients FILE|load-bundle FILE|load-conformance DIR"
    if not argv:
        print(usage, file=sys.stderr)
        return 2
    command, args = argv[0], argv[1:]
    try:
        if command == "url":
            print(external_base_url() or local_base_url())
        elif command in ("ensure", "start"):
            print(ensure_server())
        elif command == "status":
            url = external_base_url() or local_base_url()
            ready = is_ready(url)
            print(f"{'ready' if ready else 'not answering'} {url}")
            return 0 if ready else 3
        elif command == "stop":
            stop_server()
        elif command == "reset":
            print(f"expunged (HAPI count {expunge_everything(ensure_server())})")
        elif command in ("load-patients", "load-bundle") and len(args) == 1:
            result = load_bundle_file(ensure_server(), args[0])
            print(f"{args[0]}: {_summary(result)}")
        elif command == "load-conformance" and len(args) == 1:
            loaded = load_conformance_resources(ensure_server(), args[0])
            print(f"loaded {len(loaded)} conformance resources from {args[0]}")
        else:
            print(usage, file=sys.stderr)
            return 2
    except (ServerError, OSError, ValueError) as exc:
        print(f"fhirserver: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
