"""URL safety, origin checks for server-supplied links, and the TLS-verifying session."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import requests
import responses
from urllib3.util.ssl_ import create_urllib3_context

from connector.errors import ConfigError, ExitCode, TransportError
from connector.server.transport import (
    Origin,
    check_next_link,
    check_url_safety,
    is_loopback_host,
    new_session,
    origin_of,
    redact_url,
    same_origin,
)


@pytest.mark.parametrize(
    "url",
    [
        "https://ehr.example.org/fhir/r4",
        "http://localhost:8080/fhir",
        "http://127.0.0.1:8080/fhir",
        "http://127.10.20.30/fhir",
        "http://[::1]:8080/fhir",
        "http://LOCALHOST:8080/fhir",
        "http://app.localhost/fhir",
    ],
)
def test_safe_urls_pass(url: str) -> None:
    assert check_url_safety(url, allow_insecure_http=False) == url


@pytest.mark.parametrize(
    "url",
    [
        "http://ehr.example.org/fhir",
        "http://10.0.0.5/fhir",
        "http://192.168.1.20:8080/fhir",
        "http://localhost.example.org/fhir",  # not loopback, only named like it
        "http://[::2]/fhir",
    ],
)
def test_http_to_non_loopback_refused(url: str) -> None:
    with pytest.raises(TransportError, match="refusing plain http://") as exc_info:
        check_url_safety(url, allow_insecure_http=False)
    assert exc_info.value.exit_code == ExitCode.CONFIG_ERROR
    assert isinstance(exc_info.value, ConfigError)


def test_http_allowed_explicitly(caplog: pytest.LogCaptureFixture) -> None:
    url = "http://hapi.internal:8080/fhir"
    assert check_url_safety(url, allow_insecure_http=True) == url
    assert "plain http://" in caplog.text


@pytest.mark.parametrize("url", ["ftp://ehr.example.org/fhir", "ehr.example.org/fhir", "https:///fhir", "file:///etc/passwd"])
def test_non_http_urls_refused(url: str) -> None:
    with pytest.raises(TransportError):
        check_url_safety(url)


def test_userinfo_refused_without_echoing_password() -> None:
    with pytest.raises(TransportError, match="user name or password") as exc_info:
        check_url_safety("https://alice:s3cr3t-pw@ehr.example.org/fhir")
    assert "s3cr3t-pw" not in str(exc_info.value)
    assert "alice" not in str(exc_info.value)


def test_redact_url_drops_userinfo_query_fragment() -> None:
    assert redact_url("https://u:p@EHR.example.org:8443/fhir/Patient?identifier=123#x") == "https://ehr.example.org:8443/fhir/Patient"
    assert redact_url("http://[::1]:8080/fhir?a=b") == "http://[::1]:8080/fhir"


def test_origin_normalisation() -> None:
    assert origin_of("https://EHR.example.org./fhir") == Origin("https", "ehr.example.org", 443)
    assert origin_of("https://ehr.example.org:443/x") == origin_of("https://ehr.example.org/y")
    assert origin_of("http://localhost/fhir").port == 80
    assert str(origin_of("https://ehr.example.org:8443/fhir")) == "https://ehr.example.org:8443"
    assert same_origin("https://a.example/x", "https://A.example:443/y")
    assert not same_origin("https://a.example/x", "http://a.example/x")
    assert not same_origin("https://a.example/x", "https://a.example:8443/x")
    assert not same_origin("https://a.example/x", "https://b.example/x")
    assert not same_origin("https://a.example/x", "not a url")


def test_is_loopback_host() -> None:
    assert is_loopback_host("127.0.0.1") and is_loopback_host("::1") and is_loopback_host("[::1]")
    assert is_loopback_host("::ffff:127.0.0.1")
    assert not is_loopback_host("128.0.0.1") and not is_loopback_host("example.org")


BASE = "https://ehr.example.org/fhir/r4"


def test_next_link_same_origin_ok() -> None:
    nxt = "https://ehr.example.org/fhir/r4?_getpages=abc&_getpagesoffset=20"
    assert check_next_link(nxt, BASE) == nxt


def test_next_link_relative_is_resolved() -> None:
    assert check_next_link("/fhir/r4?page=2", BASE) == "https://ehr.example.org/fhir/r4?page=2"


@pytest.mark.parametrize(
    "nxt",
    [
        "https://evil.example.net/fhir/r4?page=2",
        "http://ehr.example.org/fhir/r4?page=2",  # downgrade
        "https://ehr.example.org:8443/fhir/r4?page=2",
        "http://hapi-internal:8080/fhir?_getpages=abc",  # proxy leaking its internal name
        "//evil.example.net/page2",
    ],
)
def test_next_link_other_origin_refused(nxt: str) -> None:
    with pytest.raises(TransportError, match="outside the configured FHIR base") as exc_info:
        check_next_link(nxt, BASE)
    assert "page=" not in str(exc_info.value) and "_getpages" not in str(exc_info.value)


def test_session_verifies_tls_by_default() -> None:
    s = new_session(user_agent="peersync/0.1 (ops@example.org)")
    assert s.verify is True
    assert s.headers["User-Agent"] == "peersync/0.1 (ops@example.org)"
    assert isinstance(s, requests.Session)


def test_session_custom_ca_bundle(tmp_path: Path) -> None:
    ca = tmp_path / "hospital-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    s = new_session(verify=str(ca), user_agent="peersync")
    assert s.verify == str(ca)


def test_session_missing_ca_bundle_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="does not exist"):
        new_session(verify=str(tmp_path / "missing.pem"), user_agent="peersync")


def test_session_missing_client_cert_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="client certificate"):
        new_session(user_agent="peersync", client_cert=(str(tmp_path / "c.pem"), str(tmp_path / "k.pem")))


@responses.activate
def test_verify_reaches_the_adapter(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What the adapter actually receives: default True, and env CA bundles cannot override an explicit one."""
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/env/ca.pem")
    responses.get("https://ehr.example.org/fhir/metadata", json={})
    seen: list[object] = []
    real_send = requests.adapters.HTTPAdapter.send

    def spy(self: requests.adapters.HTTPAdapter, request: requests.PreparedRequest, **kw: object) -> object:
        seen.append(kw.get("verify"))
        return real_send(self, request, **kw)

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", spy)
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    new_session(verify=str(ca), user_agent="p").get("https://ehr.example.org/fhir/metadata")
    new_session(user_agent="p").get("https://ehr.example.org/fhir/metadata")
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")  # no env bundle: certifi/system default
    new_session(user_agent="p").get("https://ehr.example.org/fhir/metadata")
    assert seen == [str(ca), "/env/ca.pem", True]


def test_explicit_verify_false_survives_env_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/env/ca.pem")
    s = new_session(verify=False, user_agent="p")
    assert s.merge_environment_settings("https://x/", {}, None, None, None)["verify"] is False


def test_plain_requests_would_let_env_override_explicit_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Documents why new_session uses a Session subclass (psf/requests#3829)."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/env/ca.pem")
    plain = requests.Session()
    plain.verify = "/configured/ca.pem"
    assert plain.merge_environment_settings("https://x/", {}, None, None, None)["verify"] == "/env/ca.pem"


@responses.activate
def test_the_environment_is_read_once_per_origin_and_still_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Proxy variables reach every request, but os.environ is walked once per origin, not per request."""
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.clinic.example:3128")
    monkeypatch.setenv("NO_PROXY", "auth.example.org")
    calls: list[str] = []
    real = requests.sessions.get_environ_proxies

    def counting(url: str, no_proxy: object = None) -> dict[str, str]:
        calls.append(url)
        return real(url, no_proxy=no_proxy)

    monkeypatch.setattr(requests.sessions, "get_environ_proxies", counting)
    session = new_session(user_agent="p")
    ehr = [session.merge_environment_settings(f"https://ehr.example.org/fhir/Goal/{i}", {}, None, None, None)
           for i in range(3)]
    auth = session.merge_environment_settings("https://auth.example.org/token", {}, None, None, None)
    assert [s["proxies"].get("https") for s in ehr] == ["http://proxy.clinic.example:3128"] * 3
    assert "https" not in auth["proxies"]  # NO_PROXY still decides per host
    assert len(calls) == 2
    ehr[0]["proxies"]["https"] = "changed by a caller"
    assert session.merge_environment_settings("https://ehr.example.org/fhir/x", {}, None, None, None)["proxies"][
        "https"] == "http://proxy.clinic.example:3128"


def test_urllib3_refuses_tls_below_1_2() -> None:
    # SMART requires TLS >= 1.2; we rely on urllib3 2.x's default context for that.
    ctx = create_urllib3_context()
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED
