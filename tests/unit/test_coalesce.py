"""Coalescing small change-sets: the pure decision, grouping, and cutting a shared answer back per change-set."""

from __future__ import annotations

from typing import Any

import pytest

from connector.write.bundle import BuiltBundle, PendingWrite, UnitWrite
from connector.write.coalesce import (
    SHARED_REQUEST_ENTRIES,
    SMALL_CHANGE_SET_ENTRIES,
    Coalescer,
    Parcel,
    coalesces,
    request_capacity,
    requests_of,
    shared_capacity,
    shared_transaction,
    split_confirmation,
)
from connector.write.confirm import confirm_writes
from connector.write.decisions import Strategy


def parcel(name: str, resources: int, *, provenances: int = 1, condition: str | None = None) -> Parcel:
    """A built change-set of ``resources`` conditional updates and ``provenances`` Provenances."""
    entries: list[dict[str, Any]] = [
        {"fullUrl": f"urn:uuid:{name}-{i}", "resource": {"resourceType": "Communication"},
         "request": {"method": "PUT", "url": condition or f"Communication?identifier=s|{name}-{i}"}}
        for i in range(resources)]
    entries += [{"fullUrl": f"urn:uuid:{name}-p{i}", "resource": {"resourceType": "Provenance"},
                 "request": {"method": "POST", "url": "Provenance", "ifNoneExist": f"_tag=s|{name}-{i}"}}
                for i in range(provenances)]
    built = BuiltBundle({"resourceType": "Bundle", "type": "transaction", "entry": entries},
                        [(name, ("Communication", "s", f"{name}-{i}")) for i in range(resources)], provenances)
    return Parcel([PendingWrite(UnitWrite(name, "contact", []), "h")], built, {"participant": name})


@pytest.mark.parametrize(("strategy", "entries", "capacity", "expected"), [
    (Strategy.TRANSACTION, 2, 101, True),  # a changed contact and its Provenance: the 1% re-sync
    (Strategy.TRANSACTION, SMALL_CHANGE_SET_ENTRIES, 101, True),
    (Strategy.TRANSACTION, SMALL_CHANGE_SET_ENTRIES + 1, 101, False),  # a participant's first sync goes alone
    (Strategy.TRANSACTION, 51, 101, False),
    (Strategy.TRANSACTION, 5, 9, False),  # two would not fit under a learned limit of 8 resources
    (Strategy.TRANSACTION, 4, 9, True),
    (Strategy.TRANSACTION, 0, 101, False),
    (Strategy.BATCH, 2, 101, False),  # outside a transaction peersync resolves references per participant
    (Strategy.SINGLE, 2, 101, False),
    (Strategy.UPDATE_AS_CREATE, 2, 101, False),
])
def test_only_small_transaction_change_sets_coalesce(strategy: Strategy, entries: int, capacity: int,
                                                     expected: bool) -> None:
    assert coalesces(strategy, entries, capacity) is expected


def test_a_request_carries_the_resources_of_one_chunk_and_a_provenance() -> None:
    assert request_capacity(100) == 101 and request_capacity(7) == 8


def test_shared_requests_stay_small_enough_to_go_in_parallel_and_within_the_limit() -> None:
    assert shared_capacity(100) == SHARED_REQUEST_ENTRIES  # several requests, the worker threads' in parallel
    assert shared_capacity(7) == 8  # a server limit of 8 entries (learnt or configured)


def test_the_coalescer_hands_over_a_request_when_the_next_change_set_would_not_fit() -> None:
    coalescer = Coalescer(capacity=8)
    a, b, c = parcel("a", 2), parcel("b", 3), parcel("c", 3)  # 3 + 4 + 4 entries
    assert coalescer.add(a) == [] and coalescer.add(b) == []
    assert coalescer.add(c) == [a, b]  # 7 + 4 > 8: the waiting ones go, c waits
    assert coalescer.drain() == [c] and coalescer.drain() == []


def test_the_coalescer_hands_over_a_request_as_soon_as_it_is_full() -> None:
    coalescer = Coalescer(capacity=6)
    a, b = parcel("a", 2), parcel("b", 2)
    assert coalescer.add(a) == []
    assert coalescer.add(b) == [a, b]
    assert coalescer.drain() == []


def test_the_same_condition_never_goes_twice_in_one_request() -> None:
    a, b = parcel("a", 1, condition="Goal?identifier=s|g"), parcel("b", 1, condition="Goal?identifier=s|g")
    coalescer = Coalescer(capacity=100)
    assert coalescer.add(a) == []
    assert coalescer.add(b) == [a]
    assert requests_of([a, b, parcel("c", 1)], 100) == [[a], [b, parcel("c", 1)]]


def test_requests_regroup_under_a_limit_learnt_since_they_were_queued() -> None:
    parcels = [parcel(n, 2) for n in "abcd"]  # 3 entries each
    assert [len(group) for group in requests_of(parcels, 101)] == [4]
    assert [len(group) for group in requests_of(parcels, 6)] == [2, 2]
    assert [len(group) for group in requests_of(parcels, 5)] == [1, 1, 1, 1]


def test_a_shared_transaction_keeps_each_change_set_whole_and_in_order() -> None:
    a, b = parcel("a", 2), parcel("b", 1, provenances=2)
    bundle = shared_transaction([a, b])
    assert bundle["type"] == "transaction"
    assert bundle["entry"] == a.built.bundle["entry"] + b.built.bundle["entry"]


def test_the_answer_is_cut_back_per_change_set() -> None:
    a, b = parcel("a", 2), parcel("b", 1)
    bundle = shared_transaction([a, b])
    answered = [{"response": {"status": "201 Created", "location": f"Communication/{i}/_history/1"}}
                for i in range(len(bundle["entry"]))]
    answered[4] = {"response": {"status": "500"}}  # b's Provenance
    confirmation = confirm_writes(bundle, 200, {"resourceType": "Bundle", "type": "transaction-response",
                                                "entry": answered})
    own_a, own_b = split_confirmation(confirmation, [a, b])
    assert [v.server_id for v in own_a.entries] == ["0", "1", "2"] and own_a.all_confirmed
    assert [v.server_id for v in own_b.entries[:1]] == ["3"] and not own_b.all_confirmed


def test_an_unusable_shared_answer_leaves_every_change_set_unconfirmed_with_its_reason() -> None:
    a, b = parcel("a", 2), parcel("b", 1)
    bundle = shared_transaction([a, b])
    confirmation = confirm_writes(bundle, 200, {"resourceType": "Bundle", "type": "transaction-response",
                                                "entry": []})
    for own in split_confirmation(confirmation, [a, b]):
        assert not own.all_confirmed and own.first_reason() == "the server's answer has 0 entries for 5 sent"
