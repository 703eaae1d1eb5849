"""A network with latency between the client and the server: Toxiproxy in front of the local HAPI server.

On loopback a request costs the client almost nothing but the server's own work, so a one-request-per-resource
client is nearly as fast as any batching one and "peersync ≥ 10× naive" is out of reach (the server is the
bound). A clinic's connector talks to a cloud-hosted EHR: every request pays a round trip. The first-sync-latency
section runs the three first-sync sides through a Toxiproxy proxy (the reliability suite's build and wrapper,
tests/reliability/toxiproxy.py) with a ``latency`` toxic on each direction.

``ONE_WAY_LATENCY_MS = 10``: 10 ms client → server and 10 ms server → client, about 20 ms round trip, which is
typical from a clinic's network to a cloud region in its own country or a neighbouring one (same-metro RTTs
are a few ms, cross-continent 60–100 ms, the same region over broadband 10–30 ms). ``--latency-ms`` of
``python -m tests.bench.run`` changes it.

How Toxiproxy applies it (v2.12.0, toxics/latency.go): each chunk of bytes read from one side is held until
``latency`` after the proxy read it, then forwarded; chunks are processed in order but the delays overlap
(a chunk that waited in the queue is not delayed again), so it is a propagation delay with no bandwidth limit.
The TCP handshake is with the proxy itself and costs no latency (a real network would add one RTT per new
connection, plus TLS; clients here keep their connections alive, and HAPI closes one after 100 requests, so
that is about 1% of the requests). The section also measures what the proxy
adds to a small GET (``/metadata?_elements=fhirVersion``, 300 bytes, same connection) so the table shows the
effective round trip, not only the configured one.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from ..reliability import toxiproxy

ONE_WAY_LATENCY_MS = 10  # each direction: ~20 ms round trip, a clinic to a cloud region (see the docstring)
RTT_PROBE = "/metadata?_elements=fhirVersion"  # the CapabilityStatement endpoint, but a ~300-byte answer


class ProxyUnavailable(RuntimeError):
    """Toxiproxy could not be built or started (the section is then reported as skipped)."""


def start_proxy(upstream_url: str, one_way_ms: int, log_path: Path, *, seed: int = 20261126) -> toxiproxy.Toxiproxy:
    """A toxiproxy-server on 127.0.0.1 in front of ``upstream_url`` (a loopback server) with a latency toxic of
    ``one_way_ms`` on each direction; the caller stops it. Raises ProxyUnavailable when it cannot be had."""
    try:
        binary = toxiproxy.build()
        if not binary.is_file():
            raise toxiproxy.ToxiproxyUnavailable(f"no toxiproxy-server at {binary}")  # noqa: TRY301 - handled below
        proxy = toxiproxy.Toxiproxy(binary, upstream_url, seed=seed, log_path=log_path)
    except (toxiproxy.ToxiproxyUnavailable, OSError, ValueError, requests.RequestException) as exc:
        raise ProxyUnavailable(f"{type(exc).__name__}: {exc}") from exc
    try:
        for stream in ("upstream", "downstream"):  # upstream = client → server, downstream = server → client
            proxy.add(f"latency-{stream}", "latency", {"latency": one_way_ms, "jitter": 0}, stream=stream)
    except requests.RequestException as exc:
        proxy.stop()
        raise ProxyUnavailable(f"could not add the latency toxics: {exc}") from exc
    return proxy


@dataclass
class RoundTrip:
    """Median seconds of the same small GET, directly and through the proxy."""

    direct_ms: float
    proxied_ms: float
    samples: int

    @property
    def added_ms(self) -> float:
        return self.proxied_ms - self.direct_ms


def round_trip(direct_url: str, proxied_url: str, *, samples: int = 30) -> RoundTrip:
    """Time ``RTT_PROBE`` on a kept-alive connection, alternating direct and proxied, ``samples`` each."""
    headers = {"Accept": "application/fhir+json"}
    times: dict[str, list[float]] = {direct_url: [], proxied_url: []}
    with requests.Session() as direct, requests.Session() as proxied:
        sessions = {direct_url: direct, proxied_url: proxied}
        for url, session in sessions.items():
            session.get(url + RTT_PROBE, headers=headers, timeout=30).raise_for_status()  # connect, warm up
        for _ in range(samples):
            for url, session in sessions.items():
                started = time.perf_counter()
                session.get(url + RTT_PROBE, headers=headers, timeout=30).raise_for_status()
                times[url].append(time.perf_counter() - started)
    return RoundTrip(statistics.median(times[direct_url]) * 1000, statistics.median(times[proxied_url]) * 1000,
                     samples)


def accepted_connections(log_path: Path) -> int:
    """Client connections the proxy accepted so far (its log has one "Accepted client" line per connection):
    proof that a side's traffic went through the proxy."""
    try:
        return log_path.read_text(encoding="utf-8", errors="replace").count("Accepted client")
    except OSError:
        return 0
