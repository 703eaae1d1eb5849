"""The EHR-restriction proxy (tests/ehr/restriction_proxy.py): its decisions alone, and its batch handling in front
of a stub upstream on loopback (no FHIR server needed)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from ehr.restriction_proxy import (
    Restriction,
    RestrictionProxy,
    bundle_refusal,
    entry_refusal,
    rewrite_capabilities,
)

CAREPLAN = {"resourceType": "CarePlan", "subject": {"reference": "Patient/1"}}
COMMUNICATION = {"resourceType": "Communication", "basedOn": [{"reference": "CarePlan?identifier=s%7Cv"}]}


def test_no_conditional_update_refuses_put_by_condition_only() -> None:
    restriction = Restriction("no-conditional-update")
    refusal = entry_refusal(restriction, "PUT", "CarePlan?identifier=s%7Cv", CAREPLAN)
    assert refusal is not None and (refusal.status, refusal.code) == (400, "not-supported")
    assert entry_refusal(restriction, "PUT", "CarePlan/123", CAREPLAN) is None
    assert entry_refusal(restriction, "POST", "CarePlan", CAREPLAN) is None


def test_no_conditional_references_refuses_a_nested_match_url() -> None:
    restriction = Restriction("no-conditional-references")
    assert entry_refusal(restriction, "PUT", "Communication/1", COMMUNICATION) is not None
    assert entry_refusal(restriction, "PUT", "CarePlan/1", CAREPLAN) is None
    assert entry_refusal(restriction, "GET", "Communication?identifier=x", None) is None


def test_only_communication_provenance_forbids_other_types_and_names_them() -> None:
    restriction = Restriction("only-communication-provenance")
    refusal = entry_refusal(restriction, "PUT", "/CarePlan?identifier=s%7Cv", CAREPLAN)
    assert refusal is not None and (refusal.status, refusal.code, refusal.reason) == (
        403, "forbidden", "type-forbidden:CarePlan")
    assert "CarePlan" in refusal.diagnostics
    assert entry_refusal(restriction, "PUT", "Communication?identifier=s%7Cv", COMMUNICATION) is None
    assert entry_refusal(restriction, "POST", "Provenance", {"resourceType": "Provenance"}) is None
    assert entry_refusal(restriction, "GET", "CarePlan?identifier=x", None) is None


@pytest.mark.parametrize(("restriction", "bundle_type", "entries", "status"), [
    (Restriction("batch-only"), "transaction", 1, 400),
    (Restriction("batch-only", transaction_status=405), "transaction", 1, 405),
    (Restriction("batch-only"), "batch", 50, None),
    (Restriction("max-8-entries"), "transaction", 9, 400),
    (Restriction("max-8-entries"), "batch", 9, 400),
    (Restriction("max-8-entries"), "transaction", 8, None),
    (Restriction("rate-limit"), "transaction", 500, None),
])
def test_bundle_refusals(restriction: Restriction, bundle_type: str, entries: int, status: int | None) -> None:
    refusal = bundle_refusal(restriction, bundle_type, entries)
    assert (refusal.status if refusal else None) == status


def test_the_medplum_style_limit_message_names_no_number() -> None:
    refusal = bundle_refusal(Restriction("max-8-entries", limit_stated=False), "transaction", 9)
    assert refusal is not None and refusal.status == 400
    assert not any(ch.isdigit() for ch in refusal.diagnostics)


def _statement() -> dict[str, Any]:
    every = [{"code": c} for c in ("read", "vread", "search-type", "create", "update", "delete")]
    return {"resourceType": "CapabilityStatement", "rest": [{
        "mode": "server", "interaction": [{"code": "transaction"}, {"code": "history-system"}],
        "resource": [{"type": t, "interaction": list(every), "conditionalUpdate": True, "conditionalCreate": True}
                     for t in ("CarePlan", "Communication", "Provenance")]}]}


def test_capabilities_batch_only_declares_batch_not_transaction() -> None:
    rest = rewrite_capabilities(Restriction("batch-only"), _statement())["rest"][0]
    assert sorted(i["code"] for i in rest["interaction"]) == ["batch", "history-system"]


def test_capabilities_no_conditional_update() -> None:
    rest = rewrite_capabilities(Restriction("no-conditional-update"), _statement())["rest"][0]
    assert [r["conditionalUpdate"] for r in rest["resource"]] == [False, False, False]


def test_capabilities_only_communication_provenance_lists_other_types_read_only() -> None:
    rest = rewrite_capabilities(Restriction("only-communication-provenance"), _statement())["rest"][0]
    by_type = {r["type"]: r for r in rest["resource"]}
    assert sorted(i["code"] for i in by_type["CarePlan"]["interaction"]) == ["read", "search-type", "vread"]
    assert "conditionalUpdate" not in by_type["CarePlan"]
    assert {"create", "update"} <= {i["code"] for i in by_type["Communication"]["interaction"]}


def test_capabilities_unchanged_where_r4_has_no_element_for_the_limit() -> None:
    for mode in ("max-8-entries", "rate-limit"):
        assert rewrite_capabilities(Restriction(mode), _statement()) == _statement()


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown restriction mode"):
        Restriction("no-writes")


# -- the proxy in front of a stub upstream ------------------------------------------------------------------------


class _Upstream:
    """A loopback stand-in for HAPI: records what reaches it, answers a batch with 201 per entry."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                return

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                upstream.received.append(body)
                self._answer({"resourceType": "Bundle", "type": f"{body['type']}-response",
                              "entry": [{"response": {"status": "201 Created", "location":
                                                      f"{e['request']['url'].split('?')[0]}/{i}/_history/1"}}
                                        for i, e in enumerate(body["entry"])]})

            def do_GET(self) -> None:
                upstream.received.append({"GET": self.path})
                self._answer({"resourceType": "Bundle", "type": "searchset", "total": 0})

            def _answer(self, answer: dict[str, Any]) -> None:
                payload = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/fhir"


@pytest.fixture()
def upstream() -> Iterator[_Upstream]:
    stub = _Upstream()
    stub.thread.start()
    yield stub
    stub.server.shutdown()
    stub.server.server_close()


def _bundle(bundle_type: str, *types: str) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": bundle_type,
            "entry": [{"resource": {"resourceType": t}, "request": {"method": "PUT", "url": f"{t}?identifier=s%7C{i}"}}
                      for i, t in enumerate(types)]}


def test_a_batch_is_answered_per_entry_and_only_allowed_entries_reach_the_server(upstream: _Upstream) -> None:
    with RestrictionProxy(upstream.url, Restriction("only-communication-provenance")) as proxy:
        answer = requests.post(proxy.base_url, json=_bundle("batch", "Communication", "CarePlan", "Provenance"),
                               timeout=10).json()
        stats = proxy.take_stats()
    assert [e["request"]["url"].split("?")[0] for e in upstream.received[0]["entry"]] == ["Communication",
                                                                                        "Provenance"]
    statuses = [e["response"]["status"] for e in answer["entry"]]
    assert statuses == ["201 Created", "403 Forbidden", "201 Created"]
    assert answer["entry"][1]["response"]["outcome"]["issue"][0]["code"] == "forbidden"
    assert answer["entry"][2]["response"]["location"].startswith("Provenance/")
    assert stats.refused == {"type-forbidden:CarePlan": 1}
    assert stats.forwarded_writes == {"Communication": 1, "Provenance": 1}
    assert stats.entries[("batch", "CarePlan")] == 1 and stats.writes == 1


def test_a_transaction_with_one_refused_entry_is_refused_whole(upstream: _Upstream) -> None:
    with RestrictionProxy(upstream.url, Restriction("only-communication-provenance")) as proxy:
        response = requests.post(proxy.base_url, json=_bundle("transaction", "Communication", "CarePlan"), timeout=10)
    assert response.status_code == 403 and upstream.received == []


def test_rate_limit_answers_every_nth_request_429_with_retry_after(upstream: _Upstream) -> None:
    with RestrictionProxy(upstream.url, Restriction("rate-limit", rate_every=3, retry_after_seconds=2)) as proxy:
        answers = [requests.get(f"{proxy.base_url}/Communication", timeout=10) for _ in range(6)]
        stats = proxy.take_stats()
    assert [a.status_code for a in answers] == [200, 200, 429, 200, 200, 429]
    assert answers[2].headers["Retry-After"] == "2"
    assert stats.requests[("GET", "Communication")] == 6 and stats.refused["rate-limited"] == 2
    assert len(upstream.received) == 4


def test_the_proxy_forwards_only_to_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        RestrictionProxy("http://example.org/fhir", Restriction("rate-limit"))
