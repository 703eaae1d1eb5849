"""Shared pytest setup for the whole suite."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fhirserver
import medplumserver

# -- FHIR test server: `integration` marker and the `fhir_base_url` fixture ------------------------------------------
#
# Integration tests (marked `integration`) need a real FHIR server: PEERSYNC_TEST_FHIR_URL if set, else the local
# HAPI server of tests/fhir-server/ (started here if it is not already running). When no server can be had they
# FAIL, unless PEERSYNC_SKIP_INTEGRATION=1 is set explicitly (then they are skipped; PEERSYNC_REQUIRE_INTEGRATION=1
# overrides that). A server this session started is stopped at the end unless PEERSYNC_KEEP_SERVER is set; a server
# that was already running (a developer's) is left alone.


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _integration_skipped() -> bool:
    return _env_flag("PEERSYNC_SKIP_INTEGRATION") and not _env_flag("PEERSYNC_REQUIRE_INTEGRATION")


def _register_integration_marker(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: needs a real FHIR server (the local HAPI server unless PEERSYNC_TEST_FHIR_URL is set)"
    )
    config.addinivalue_line(
        "markers", "medplum: needs the second FHIR server, Medplum's engine (tests/medplum-server/, Node.js and npm)"
    )


def _skip_integration_if_asked(items: list[pytest.Item]) -> None:
    if not _integration_skipped():
        return
    skip = pytest.mark.skip(reason="PEERSYNC_SKIP_INTEGRATION=1: integration tests skipped")
    for item in items:
        if item.get_closest_marker("integration") is not None or item.get_closest_marker("medplum") is not None:
            item.add_marker(skip)


def pytest_configure(config: pytest.Config) -> None:
    _register_integration_marker(config)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _skip_integration_if_asked(items)


@pytest.fixture(scope="session")
def fhir_base_url() -> Iterator[str]:
    """Base URL (no trailing slash) of a ready FHIR R4 server for the whole session."""
    if _integration_skipped():
        pytest.skip("PEERSYNC_SKIP_INTEGRATION=1: no FHIR server for this session")
    try:
        url, started_here = fhirserver.ensure_server_for_session()
    except fhirserver.ServerError as exc:
        pytest.fail(
            f"no FHIR server for the integration tests: {exc}\n"
            "(set PEERSYNC_TEST_FHIR_URL to use another server, or PEERSYNC_SKIP_INTEGRATION=1 to skip them)",
            pytrace=False,
        )
    yield url
    # pytest-xdist workers share one server: leave stopping it to whoever runs the suite (.ci/run stops it too)
    if started_here and not _env_flag("PEERSYNC_KEEP_SERVER") and not os.environ.get("PYTEST_XDIST_WORKER"):
        fhirserver.stop_server()


@pytest.fixture(scope="session")
def medplum_base_url() -> Iterator[str]:
    """Base URL of the second FHIR server, Medplum's engine in memory (tests/medplum-server/), for the session.

    Same rules as ``fhir_base_url``: it fails when the server cannot be had (PEERSYNC_SKIP_INTEGRATION=1 skips it,
    PEERSYNC_REQUIRE_INTEGRATION=1 overrides that), and a server this session started is stopped at the end.
    """
    if _integration_skipped():
        pytest.skip("PEERSYNC_SKIP_INTEGRATION=1: no Medplum server for this session")
    try:
        url, started_here = medplumserver.ensure_server_for_session()
    except fhirserver.ServerError as exc:
        pytest.fail(f"no Medplum server for the integration tests: {exc}\n"
                    "(it needs Node.js 20.19+ and npm with the npm registry reachable for the first npm ci)",
                    pytrace=False)
    yield url
    if started_here and not _env_flag("PEERSYNC_KEEP_SERVER") and not os.environ.get("PYTEST_XDIST_WORKER"):
        medplumserver.stop_server()


# -- end of FHIR test server ------------------------------------------------------------------------------------------
