"""Network faults with Toxiproxy between peersync and the local HAPI server: latency, low bandwidth, data sliced
into tiny packets, connections reset by peer, and connections that stall then close. Each scenario syncs a trimmed
demo program through the toxics until it converges, then checks the invariant against a clean sync."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Self

import pytest
import requests

from .relutil import check_invariant, converge, seed_for

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

PARTICIPANTS = 6
FAILING_PARTICIPANTS = 12  # reset_peer and timeout: more connections, so more of them are hit

# scenario -> [(toxic type, attributes, stream, toxicity)]; times in ms, rate in KB/s, slicer delay in µs.
TOXICS: dict[str, list[tuple[str, dict[str, Any], str, float]]] = {
    "latency": [("latency", {"latency": 120, "jitter": 80}, "downstream", 1.0),
                ("latency", {"latency": 40, "jitter": 20}, "upstream", 1.0)],
    "bandwidth": [("bandwidth", {"rate": 48}, "upstream", 1.0), ("bandwidth", {"rate": 48}, "downstream", 1.0)],
    "slicer": [("slicer", {"average_size": 24, "size_variation": 16, "delay": 300}, "upstream", 1.0),
               ("slicer", {"average_size": 24, "size_variation": 16, "delay": 300}, "downstream", 1.0)],
    # A third of the connections are reset 250 ms after they open: requests in flight lose their response,
    # sometimes after the server committed (downstream), sometimes before it saw the whole request (upstream).
    "reset_peer": [("reset_peer", {"timeout": 250}, "downstream", 0.5), ("reset_peer", {"timeout": 400}, "upstream",
                                                                        0.2)],
    # 30% of the connections deliver nothing back (the server may have committed) and are closed after 1 s.
    "timeout": [("timeout", {"timeout": 1000}, "downstream", 0.3)],
}
DEGRADING = {"latency", "bandwidth", "slicer"}  # slow the link; every request goes through them
# Toxicity is drawn per connection when a toxic is added (or a connection opens), and peersync keeps few pooled
# connections alive: the failing toxics are removed and added again every FLAP seconds, so every connection is
# drawn again and again during a run.
FLAP_SECONDS = 1.0


class Flapper:
    """Re-adds the failing toxics every FLAP_SECONDS until stopped (bounded: at most 2000 flips)."""

    def __init__(self, toxiproxy, toxics: list[tuple[str, dict[str, Any], str, float]], name: str) -> None:
        self.toxiproxy, self.toxics, self.name = toxiproxy, toxics, name
        self.stop_event = threading.Event()
        self.flips = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop_event.wait(FLAP_SECONDS) and self.flips < 2000:
            for index, (kind, attributes, stream, toxicity) in enumerate(self.toxics):
                with contextlib.suppress(requests.RequestException):
                    requests.delete(f"{self.toxiproxy.api}/proxies/fhir/toxics/{self.name}-{index}", timeout=5)
                    self.toxiproxy.add(f"{self.name}-{index}", kind, attributes, stream=stream, toxicity=toxicity)
            self.flips += 1

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(10)


@pytest.mark.parametrize("scenario", list(TOXICS))
def test_sync_through_toxiproxy_converges_to_the_clean_state(scenario: str, toxiproxy, program_factory, references,
                                                             record) -> None:
    participants = PARTICIPANTS if scenario in DEGRADING else FAILING_PARTICIPANTS
    ref = references.get(participants)
    for index, (kind, attributes, stream, toxicity) in enumerate(TOXICS[scenario]):
        toxiproxy.add(f"{scenario}-{index}", kind, attributes, stream=stream, toxicity=toxicity)
    assert len(toxiproxy.toxics()) == len(TOXICS[scenario])
    # A degraded link slows every request: the client keeps its default timeout there (a participant's first
    # bundle through the slicer takes longer than 5 s; peersync does not yet split a request that times out).
    # The failing toxics get a short one, so a dropped connection is retried quickly.
    server = {} if scenario in DEGRADING else {"timeout_seconds": 5}
    rel = program_factory(f"toxi-{scenario}", server_url=toxiproxy.base_url, participants=participants,
                          server=server, sync={"retry_attempts": 5})
    requests_made = retries = 0
    codes: list[int] = []

    def step(_attempt: int) -> int:
        nonlocal requests_made, retries
        code, result = rel.sync_code()
        if hasattr(result, "requests"):
            requests_made += result.requests
            retries += result.retries
        else:  # the run ended on a failure before it could count (e.g. /metadata never answered)
            retries += 1
        return code

    with Flapper(toxiproxy, TOXICS[scenario], scenario) if scenario not in DEGRADING else contextlib.nullcontext():
        codes = converge(step, max_runs=10, max_seconds=240)
    toxiproxy.reset()
    verdict = check_invariant(rel, ref["content"])
    faults = requests_made if scenario in DEGRADING else retries
    described = "; ".join(f"{k} {stream} {a} toxicity {t}" for k, a, stream, t in TOXICS[scenario])
    record(f"toxiproxy-{scenario}", f"Toxiproxy {scenario.replace('_', ' ')} between peersync and HAPI",
           runs=len(codes), faults_injected=faults, faults_by_kind={scenario: faults}, records_sent=verdict.sent,
           duplicates=verdict.duplicates, lost=verdict.lost, content_mismatches=verdict.content_mismatches,
           seed=seed_for("toxiproxy") % 2**62,
           notes=[f"toxics: {described}", f"sync runs until done: exit codes {codes}",
                  ("faults = requests sent through the degraded link" if scenario in DEGRADING
                   else "faults = failed attempts the client saw (retried, or ending a run with 69); the toxics "
                        f"were re-added every {FLAP_SECONDS} s so each connection is drawn again"),
                  f"trimmed demo program: {participants} participants + 2 review cases"])
    if scenario not in DEGRADING:
        assert retries > 0, "the toxic never hit a request: the scenario proved nothing"
