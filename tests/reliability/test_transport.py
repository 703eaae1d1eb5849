"""Transport safety: TLS verification is on by default, so a self-signed HTTPS server (made at test time, served on
loopback) is refused with a clear message and exit 78 before any HTTP request reaches it; plain http:// to a
non-loopback host is refused before any network use (the loopback-only guard records any attempt).

No traffic leaves the machine: the non-loopback URLs are never contacted (that is what is being proven), and the
subprocesses run under the guard (tests/reliability/site), which would refuse and record it.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import shutil
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from .relutil import DEMO_TEMPLATE, assert_no_traceback, cli_env, run_cli

pytestmark = [pytest.mark.reliability]


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost (EC P-256, valid for a day)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peersync self-signed test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class TlsServer:
    """An HTTPS server on 127.0.0.1 answering /metadata with a minimal CapabilityStatement and 503 otherwise;
    it counts the HTTP requests that got past the TLS handshake."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                return

            def do_GET(self) -> None:
                server.requests.append(f"{self.command} {self.path.split('?')[0]}")
                if self.path.split("?")[0].endswith("/metadata"):
                    body = json.dumps({"resourceType": "CapabilityStatement", "status": "active",
                                       "fhirVersion": "4.0.1", "rest": [{"mode": "server", "resource": []}]}).encode()
                    self.send_response(200)
                else:
                    body = b'{"resourceType":"OperationOutcome","issue":[]}'
                    self.send_response(503)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_PUT = do_GET

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.httpd.server_address[1]}/fhir"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def tls_server(tmp_path: Path) -> Iterator[tuple[TlsServer, Path]]:
    cert, key = make_certificate(tmp_path)
    server = TlsServer(cert, key)
    yield server, cert
    server.stop()


def write_config(folder: Path, base_url: str, **server: object) -> Path:
    """A config for the demo program pointing at ``base_url`` (no FHIR server needed to be refused)."""
    inputs = folder / "inputs"
    if not inputs.exists():
        shutil.copytree(DEMO_TEMPLATE, inputs, ignore=shutil.ignore_patterns("summary.json"))
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in server.items())
    config = folder / "peersync.toml"
    config.write_text(f'[source]\nprofile = "peersync-template"\ninputs = ["inputs"]\n[program]\nid = "transport"\n'
                      f'[server]\nbase_url = {json.dumps(base_url)}\ntimeout_seconds = 5\n{extra}'
                      f'[sync]\nledger = "state/ledger.sqlite"\nbackoff_factor = 0.05\n', encoding="utf-8")
    return config


def test_self_signed_https_is_refused_with_a_clear_message(tls_server, tmp_path: Path, record) -> None:
    server, cert = tls_server
    config = write_config(tmp_path / "default", server.url)
    proc = run_cli("sync", "--config", str(config))
    assert_no_traceback(proc)
    assert proc.returncode == 78, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert "TLS verification failed" in proc.stderr and "self-signed certificate" in proc.stderr, proc.stderr
    assert "ca_bundle" in proc.stderr
    assert server.requests == [], f"HTTP requests got through an untrusted TLS connection: {server.requests}"
    # Positive control: trusting that certificate explicitly (server.ca_bundle) lets the client in.
    trusted = write_config(tmp_path / "trusted", server.url, ca_bundle=str(cert))
    proc = run_cli("sync", "--config", str(trusted), "-q")
    assert_no_traceback(proc)
    assert "GET /fhir/metadata" in server.requests, (proc.returncode, proc.stderr[-1500:])
    record("transport-self-signed", "Self-signed HTTPS server: refused by default (TLS verification on)", runs=2,
           faults_injected=1, faults_by_kind={"untrusted certificate": 1}, records_sent=0, duplicates=0, lost=0,
           notes=["exit 78 'TLS verification failed ...: self-signed certificate ... set server.ca_bundle'; "
                  "no HTTP request reached the server",
                  "control: with server.ca_bundle set to that certificate the same server is reached"])


NON_LOOPBACK = ["http://192.0.2.10/fhir", "http://10.1.2.3:8080/fhir", "http://ehr.example.org/fhir/r4",
                "http://[2001:db8::1]/fhir", "http://127.0.0.1.nip.io/fhir", "http://0.0.0.0:8089/fhir"]


@pytest.mark.parametrize("url", NON_LOOPBACK)
def test_plain_http_to_a_non_loopback_host_is_refused_before_any_traffic(url: str, tmp_path: Path, record) -> None:
    guard_log = tmp_path / "netguard.log"
    config = write_config(tmp_path, url)
    proc = run_cli("sync", "--config", str(config), env=cli_env(guard_log=guard_log))
    assert_no_traceback(proc)
    assert proc.returncode == 78, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert "refusing plain http://" in proc.stderr and "https://" in proc.stderr, proc.stderr
    attempts = guard_log.read_text(encoding="utf-8") if guard_log.exists() else ""
    assert attempts == "", f"network use before the refusal: {attempts}"
    _HTTP["urls"].append(url)
    record("transport-plain-http", "Plain http:// to non-loopback hosts: refused before any traffic",
           runs=len(_HTTP["urls"]), faults_injected=len(_HTTP["urls"]),
           faults_by_kind={"non-loopback http URL": len(_HTTP["urls"])}, records_sent=0, duplicates=0, lost=0,
           notes=["exit 78 'refusing plain http:// ...: use https://'; the loopback-only guard saw no connection "
                  "and no name lookup", "URLs: " + ", ".join(_HTTP["urls"])])


def test_user_info_in_the_url_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, "https://user:hunter2pw@127.0.0.1:9/fhir")
    proc = run_cli("sync", "--config", str(config))
    assert_no_traceback(proc)
    assert proc.returncode == 78 and "user name or password" in proc.stderr and "hunter2pw" not in proc.stderr


_HTTP: dict[str, list[str]] = {"urls": []}
