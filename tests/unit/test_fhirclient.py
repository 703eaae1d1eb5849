"""HTTP behaviour of the FHIR client: retries, Retry-After, timeouts, lost responses, auth refresh, errors."""

from __future__ import annotations

import time

import pytest
import requests
import responses
from responses import matchers
from responses.registries import OrderedRegistry
from urllib3.response import HTTPResponse

from connector.errors import AuthError, ServerUnavailableError, TransportError
from connector.server.client import (
    STATUS_ACTIONS,
    Action,
    FhirClient,
    FhirHttpError,
    RetryPolicy,
    action_for,
    scrub,
    summarize_outcome,
)

BASE = "https://ehr.test/fhir"
FAST = RetryPolicy(attempts=3, backoff_factor=0.01, backoff_max=0.05, jitter=0.0, retry_after_cap=1.0)
BUNDLE = {"resourceType": "Bundle", "type": "transaction", "entry": []}
OK = {"resourceType": "Bundle", "type": "transaction-response", "entry": []}


def outcome(code: str, diagnostics: str) -> dict:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}]}


@responses.activate(registry=OrderedRegistry)
def test_429_with_retry_after_is_retried_then_succeeds() -> None:
    responses.post(BASE + "/", status=429, headers={"Retry-After": "1"})
    responses.post(BASE + "/", json=OK)
    client = FhirClient(BASE, retry=FAST)
    assert client.transaction(BUNDLE) == OK
    assert client.stats.retries == 1 and client.stats.requests == 2 and client.stats.writes == 2


def _urllib3_response(status: int, retry_after: str) -> HTTPResponse:
    return HTTPResponse(body=b"", status=status, headers={"Retry-After": retry_after}, preload_content=False)


def test_retry_after_is_honoured_and_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib3 sleeps for Retry-After on 429/503; ours never sleeps longer than the cap."""
    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", lambda s: sleeps.append(s))
    retry = FAST.urllib3_retry()
    retry.sleep(_urllib3_response(429, "1"))
    retry.sleep(_urllib3_response(503, "3600"))
    assert sleeps == [1.0, FAST.retry_after_cap]
    assert retry.is_retry("POST", 429, has_retry_after=True) and retry.is_retry("POST", 503)
    assert not retry.is_retry("POST", 400) and not retry.is_retry("POST", 412)


def test_backoff_grows_exponentially_and_is_bounded() -> None:
    policy = RetryPolicy(attempts=8, backoff_factor=0.5, backoff_max=4.0, jitter=0.0)
    retry = policy.urllib3_retry()
    waits = []
    for _ in range(6):
        retry = retry.increment("POST", "/", response=HTTPResponse(body=b"", status=503, preload_content=False))
        waits.append(retry.get_backoff_time())
    assert waits[1] < waits[2] < waits[3] and max(waits) == 4.0


@responses.activate(registry=OrderedRegistry)
def test_503_then_success() -> None:
    responses.post(BASE + "/", status=503)
    responses.post(BASE + "/", status=503)
    responses.post(BASE + "/", json=OK)
    client = FhirClient(BASE, retry=FAST)
    assert client.transaction(BUNDLE) == OK
    assert client.stats.retries == 2


@responses.activate(registry=OrderedRegistry)
def test_retries_are_bounded_then_server_unavailable() -> None:
    for _ in range(4):
        responses.post(BASE + "/", status=502)
    client = FhirClient(BASE, retry=FAST)
    with pytest.raises(ServerUnavailableError) as err:
        client.transaction(BUNDLE)
    assert err.value.exit_code == 69
    assert len(responses.calls) == 4  # 1 + 3 retries, never more


@responses.activate(registry=OrderedRegistry)
def test_timeout_is_retried() -> None:
    responses.post(BASE + "/", body=requests.exceptions.ReadTimeout("read timed out"))
    responses.post(BASE + "/", json=OK)
    # responses raises the exception object directly (below urllib3), so the client sees one timeout:
    # it must surface as ServerUnavailableError with no body or query in the message.
    client = FhirClient(BASE, retry=FAST)
    with pytest.raises(ServerUnavailableError) as err:
        client.transaction(BUNDLE)
    assert "ReadTimeout" in str(err.value) and "entry" not in str(err.value)


@responses.activate(registry=OrderedRegistry)
def test_lost_response_after_commit_is_replayed_safely() -> None:
    """The server commits the transaction but the response is lost (connection reset): the client replays
    the identical bundle; conditional PUTs make the replay a no-op on the server, and the client gets the answer."""
    received: list[bytes] = []

    def committed_then_reset(request: requests.PreparedRequest) -> tuple[int, dict, str]:
        received.append(request.body)
        raise requests.exceptions.ConnectionError("connection reset by peer")

    responses.add_callback(responses.POST, BASE + "/", callback=committed_then_reset)
    responses.post(BASE + "/", json=OK)
    client = FhirClient(BASE, retry=FAST)
    with pytest.raises(ServerUnavailableError):
        client.transaction(BUNDLE)  # the sync leaves the unit pending: nothing marked sent
    assert client.transaction(BUNDLE) == OK  # the next attempt sends the same bytes again
    assert received[0] == responses.calls[1].request.body


@responses.activate
def test_400_raises_isolate_with_scrubbed_outcome() -> None:
    responses.post(BASE + "/", status=400, json=outcome(
        "processing",
        'HAPI-1094: Resource Goal/ps-123 not found, specified in path: Communication.about for "Maria Lopez"'))
    with pytest.raises(FhirHttpError) as err:
        FhirClient(BASE, retry=FAST).transaction(BUNDLE)
    assert err.value.action is Action.ISOLATE and err.value.status == 400
    text = str(err.value)
    assert "HAPI-1094" in text and "Maria" not in text and "ps-123" not in text


@responses.activate
def test_412_duplicate_goes_to_review() -> None:
    responses.post(BASE + "/", status=412, json=outcome(
        "processing",
        'HAPI-0988: Failed to UPDATE resource with match URL "Goal?identifier=x|G1" '
        'because this search matched 2 resources'))
    with pytest.raises(FhirHttpError) as err:
        FhirClient(BASE, retry=FAST).transaction(BUNDLE)
    assert err.value.action is Action.REVIEW and "G1" not in str(err.value)


class _RefreshingAuth(requests.auth.AuthBase):
    def __init__(self) -> None:
        self.token, self.invalidations = "t1", 0

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self.token}"
        return r

    def invalidate(self, response: object = None) -> bool:
        self.invalidations += 1
        self.token = f"t{self.invalidations + 1}"
        return True


@responses.activate(registry=OrderedRegistry)
def test_401_refreshes_once_then_succeeds() -> None:
    responses.get(BASE + "/metadata", status=401, match=[matchers.header_matcher({"Authorization": "Bearer t1"})])
    responses.get(BASE + "/metadata", json={"resourceType": "CapabilityStatement"},
                  match=[matchers.header_matcher({"Authorization": "Bearer t2"})])
    session = requests.Session()
    session.auth = _RefreshingAuth()
    assert FhirClient(BASE, session=session, retry=FAST).capabilities()["resourceType"] == "CapabilityStatement"
    assert session.auth.invalidations == 1


@responses.activate(registry=OrderedRegistry)
def test_401_twice_is_an_auth_error() -> None:
    responses.get(BASE + "/metadata", status=401)
    responses.get(BASE + "/metadata", status=401)
    session = requests.Session()
    session.auth = _RefreshingAuth()
    with pytest.raises(AuthError) as err:
        FhirClient(BASE, session=session, retry=FAST).capabilities()
    assert err.value.exit_code == 77 and session.auth.invalidations == 1


@responses.activate
def test_paging_link_to_another_host_is_refused() -> None:
    responses.get(BASE + "/Goal", json={"resourceType": "Bundle", "type": "searchset", "entry": [],
                                        "link": [{"relation": "next", "url": "https://evil.test/fhir/Goal?page=2"}]})
    with pytest.raises(TransportError):
        list(FhirClient(BASE, retry=FAST).search("Goal", {"patient": "1"}))


def test_status_action_table_is_complete_for_common_statuses() -> None:
    assert STATUS_ACTIONS[429] is Action.RETRY_LATER and STATUS_ACTIONS[503] is Action.RETRY_LATER
    assert STATUS_ACTIONS[400] is Action.ISOLATE and STATUS_ACTIONS[422] is Action.ISOLATE
    assert STATUS_ACTIONS[412] is Action.REVIEW and STATUS_ACTIONS[409] is Action.CONFLICT
    assert action_for(409, "HAPI-0958 ... matched 2 resources") is Action.REVIEW
    assert action_for(418) is Action.ISOLATE and action_for(599) is Action.RETRY_LATER


def test_scrub_keeps_codes_and_drops_values() -> None:
    text = scrub('HAPI-0929: Failed to process conditional update "Goal?identifier=https://p/sid/x/goal|G0042" '
                 'MRN1234567')
    assert "HAPI-0929" in text and "G0042" not in text and "MRN1234567" not in text and "https" not in text
    assert summarize_outcome({"resourceType": "Patient"}).issues == []


@responses.activate
def test_unreadable_capability_statement_falls_back_to_conditional_writes() -> None:
    """A 4xx on /metadata must not crash a sync: it assumes conditional update and goes on."""
    from connector.write.writer import Writer

    responses.get(BASE + "/metadata", status=400, json=outcome("invalid", "HAPI-1821: bad request"))
    writer = Writer.__new__(Writer)  # only the capability check is under test
    writer.client = FhirClient(BASE, retry=FAST)
    writer.opts = type("Opts", (), {"write_mode": "auto", "write_strategy": "auto",
                                    "resolves_conditional_references": True,
                                    "ctx": type("Ctx", (), {"contact_procedures": "off"})()})()
    plan, choice = writer._write_plan()
    assert plan.conditional_types is None and plan.uses_conditional("Communication")
    assert choice.strategy == "transaction" and not choice.peersync_resolves_references
