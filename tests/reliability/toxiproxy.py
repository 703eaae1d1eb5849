"""Toxiproxy for the reliability suite: build (tools/build-toxiproxy.sh), run on 127.0.0.1, drive its HTTP API.

Toxiproxy (github.com/Shopify/toxiproxy) is a TCP proxy whose "toxics" add latency, cut bandwidth, slice data
into tiny packets, reset connections or stall them. Only its binary is used; nothing of it is in the repository.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "tools" / "build-toxiproxy.sh"


def pinned_version() -> str:
    """The Toxiproxy version tools/build-toxiproxy.sh installs (a go-install build reports only "git")."""
    for line in BUILD_SCRIPT.read_text(encoding="utf-8").splitlines():
        if line.startswith("VERSION="):
            return f"{line.split('=', 1)[1].strip()} (github.com/Shopify/toxiproxy/v2, built by go install)"
    return "unknown"


class ToxiproxyUnavailable(RuntimeError):
    """Toxiproxy could not be built or started."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def build(timeout: float = 600) -> Path:
    """Path of toxiproxy-server: PEERSYNC_TOXIPROXY_BIN, else built (once) by the build script."""
    if os.environ.get("PEERSYNC_TOXIPROXY_BIN"):
        return Path(os.environ["PEERSYNC_TOXIPROXY_BIN"])
    try:
        proc = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToxiproxyUnavailable(f"build-toxiproxy.sh did not finish: {exc}") from exc
    if proc.returncode != 0:
        raise ToxiproxyUnavailable(f"build-toxiproxy.sh failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


class Toxiproxy:
    """A running toxiproxy-server on 127.0.0.1 with one proxy in front of a loopback upstream."""

    def __init__(self, binary: Path, upstream_url: str, *, seed: int, log_path: Path) -> None:
        parts = urlsplit(upstream_url)
        host = parts.hostname or ""
        if not (host.startswith("127.") or host in ("localhost", "::1")):
            raise ValueError(f"toxiproxy is only put in front of loopback servers, not {upstream_url!r}")
        self.upstream = f"{host}:{parts.port or 80}"
        self.path = parts.path.rstrip("/")
        self.api_port = free_port()
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.listen_port = free_port()
        self.log = log_path.open("w", encoding="utf-8")
        self.process = subprocess.Popen(
            [str(binary), "-host", "127.0.0.1", "-port", str(self.api_port), "-seed", str(seed)],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.version = self._wait_ready()
        response = requests.post(f"{self.api}/proxies", json={
            "name": "fhir", "listen": f"127.0.0.1:{self.listen_port}", "upstream": self.upstream, "enabled": True},
            timeout=10)
        response.raise_for_status()

    def _wait_ready(self, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ToxiproxyUnavailable(f"toxiproxy-server exited with {self.process.returncode}")
            try:
                return requests.get(f"{self.api}/version", timeout=2).text.strip()
            except requests.RequestException:
                time.sleep(0.1)
        raise ToxiproxyUnavailable("toxiproxy-server did not answer in time")

    @property
    def base_url(self) -> str:
        """The FHIR base URL through the proxy."""
        return f"http://127.0.0.1:{self.listen_port}{self.path}"

    def add(self, name: str, kind: str, attributes: dict[str, Any], *, stream: str = "downstream",
            toxicity: float = 1.0) -> dict[str, Any]:
        """Add a toxic (latency, bandwidth, slicer, reset_peer, timeout, ...) to the proxy."""
        response = requests.post(f"{self.api}/proxies/fhir/toxics", json={
            "name": name, "type": kind, "stream": stream, "toxicity": toxicity, "attributes": attributes}, timeout=10)
        response.raise_for_status()
        return dict(response.json())

    def toxics(self) -> list[dict[str, Any]]:
        return list(requests.get(f"{self.api}/proxies/fhir/toxics", timeout=10).json())

    def reset(self) -> None:
        """Remove every toxic and re-enable the proxy."""
        requests.post(f"{self.api}/reset", timeout=10).raise_for_status()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.log.close()


__all__ = ["Toxiproxy", "ToxiproxyUnavailable", "build", "free_port"]
