"""Fixtures of the reliability suite (marker ``reliability``): the loopback-only network guard, the results
recorder, clean-sync references, the fault proxy and Toxiproxy.

Environment:
  PEERSYNC_RELIABILITY_SEED     the suite seed (default 20260801); every scenario derives its own from it
  PEERSYNC_RELIABILITY_RUNS     runs per multi-run scenario (default: a short count per scenario; e.g. 30)
  PEERSYNC_RELIABILITY_RESULTS  where the results JSON goes (default .peersync/reliability-results.json)
  PEERSYNC_TOXIPROXY_BIN        a toxiproxy-server binary to use instead of building one
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from . import toxiproxy as toxiproxy_module
from .faultproxy import FaultProxy, Schedule
from .relutil import (
    RelProgram,
    is_loopback_url,
    new_program,
    normalized_content,
    seed_for,
)
from .results import Recorder

SITE = Path(__file__).resolve().parent / "site"
if str(SITE) not in sys.path:
    sys.path.insert(0, str(SITE))
import peersync_netguard  # noqa: E402 - tests/reliability/site/, importable once on sys.path (above)

_RECORDER = Recorder()
_SESSION: dict[str, Any] = {}


def pytest_sessionstart(session: pytest.Session) -> None:
    _SESSION["started"] = time.monotonic()
    _SESSION["started_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def pytest_runtest_setup(item: pytest.Item) -> None:
    _RECORDER.start_test(item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" or (report.when == "setup" and report.failed):
        _RECORDER.set_outcome(item.nodeid, "passed" if report.passed else "skipped" if report.skipped else "failed")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # merged into the results file that tests/reliability/report.py turns into docs/reliability.md
    reliability = [i for i in session.items if i.get_closest_marker("reliability") is not None]
    _RECORDER.write({
        "started_at": _SESSION.get("started_at"),
        "seconds": round(time.monotonic() - _SESSION.get("started", time.monotonic()), 1),
        "reliability_tests": len(reliability), "all_tests": len(session.items), "exit_status": int(exitstatus),
        "args": " ".join(str(a) for a in session.config.invocation_params.args),
        "PEERSYNC_RELIABILITY_RUNS": os.environ.get("PEERSYNC_RELIABILITY_RUNS") or "default",
    })


@pytest.fixture()
def record(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """``record(name, title, **values)``: add this scenario's measurements to the results file."""

    def add(name: str, title: str, **values: Any) -> Any:
        return _RECORDER.record(request.node.nodeid, name, title, **values)

    return add


@pytest.fixture(autouse=True)
def loopback_only() -> Iterator[None]:
    """Refuse (and fail the test on) any traffic to a non-loopback address while a reliability test runs."""
    peersync_netguard.install()
    before = len(peersync_netguard.VIOLATIONS)
    try:
        yield
    finally:
        peersync_netguard.uninstall()
    violations = peersync_netguard.VIOLATIONS[before:]
    assert not violations, f"traffic to non-loopback addresses was attempted: {violations}"


@pytest.fixture(scope="session")
def hapi_url(fhir_base_url: str) -> str:
    """The FHIR server, which must be on loopback: the suite sends fault traffic and PHI-shaped data to it."""
    if not is_loopback_url(fhir_base_url):
        pytest.skip(f"the reliability suite runs only against a loopback server, not {fhir_base_url}")
    try:
        meta = requests.get(f"{fhir_base_url}/metadata", timeout=30).json()
        _RECORDER.environment["fhir_server"] = f"{meta.get('software', {}).get('name', '?')} " \
                                               f"{meta.get('software', {}).get('version', '')}".strip()
        _RECORDER.environment["fhir_version"] = meta.get("fhirVersion")
    except (requests.RequestException, ValueError):
        pass
    return fhir_base_url


class References:
    """Clean syncs (no faults) of the demo inputs, trimmed or not, into fresh programs: the content every
    faulted, crashed or restarted sync of the same inputs must end with; and how many requests it takes."""

    def __init__(self, hapi: str, root: Path) -> None:
        self.hapi, self.root = hapi, root
        self.cache: dict[int | None, dict[str, Any]] = {}

    def get(self, participants: int | None) -> dict[str, Any]:
        if participants not in self.cache:
            with FaultProxy(self.hapi) as proxy:
                rel = new_program(self.root / f"ref-{participants or 'all'}", self.hapi, server_url=proxy.base_url,
                                  participants=participants)
                started = time.monotonic()
                code, summary = rel.sync_code()
                elapsed = time.monotonic() - started
                assert code in (0, 65), f"the clean reference sync failed: {summary}"
                requests_made = proxy.stats.requests
            self.cache[participants] = {"content": normalized_content(rel.program), "requests": requests_made,
                                        "seconds": elapsed, "program": rel}
        return self.cache[participants]


@pytest.fixture(scope="session")
def references(hapi_url: str, tmp_path_factory: pytest.TempPathFactory) -> References:
    return References(hapi_url, tmp_path_factory.mktemp("references"))


@pytest.fixture()
def faultproxy(hapi_url: str) -> Iterator[Callable[..., FaultProxy]]:
    """``faultproxy(schedule=..., **kw)``: a started FaultProxy in front of the server (stopped after the test)."""
    started: list[FaultProxy] = []

    def make(schedule: Schedule | None = None, **kwargs: Any) -> FaultProxy:
        proxy = FaultProxy(hapi_url, schedule, **kwargs).start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


@pytest.fixture()
def program_factory(hapi_url: str, tmp_path: Path) -> Callable[..., RelProgram]:
    """``program_factory(name, server_url=..., participants=..., **sections)``: a fresh isolated program."""

    def make(name: str = "p", **kwargs: Any) -> RelProgram:
        return new_program(tmp_path / name, hapi_url, **kwargs)

    return make


@pytest.fixture(scope="session")
def toxiproxy_server(hapi_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[toxiproxy_module.Toxiproxy]:
    """toxiproxy-server (built once by tools/build-toxiproxy.sh) on 127.0.0.1 with a proxy in front of the server."""
    try:
        binary = toxiproxy_module.build()
        proxy = toxiproxy_module.Toxiproxy(binary, hapi_url, seed=seed_for("toxiproxy") % 2**62,
                                           log_path=tmp_path_factory.mktemp("toxiproxy") / "toxiproxy.log")
    except toxiproxy_module.ToxiproxyUnavailable as exc:
        if os.environ.get("PEERSYNC_REQUIRE_INTEGRATION", "").strip() not in ("", "0"):
            pytest.fail(f"Toxiproxy unavailable: {exc}", pytrace=False)
        pytest.skip(f"Toxiproxy unavailable: {exc}")
    _RECORDER.environment["toxiproxy"] = toxiproxy_module.pinned_version()
    yield proxy
    proxy.stop()


@pytest.fixture()
def toxiproxy(toxiproxy_server: toxiproxy_module.Toxiproxy) -> Iterator[toxiproxy_module.Toxiproxy]:
    """The session's Toxiproxy with no toxics (removed again after the test)."""
    toxiproxy_server.reset()
    yield toxiproxy_server
    toxiproxy_server.reset()


def dump(data: Any) -> str:
    return json.dumps(data, indent=1, default=str)[:4000]
