"""Coalescing: small change-sets of several participants share one transaction.

A re-sync where a few contacts changed has, per touched participant, a change-set of one or two resources and its
Provenance. Sent one per request, the server's per-request cost dominates (issue 15: 771 requests for 1,000
changed rows). Small change-sets therefore wait in a :class:`Coalescer` until a request is full, and travel
together. Each keeps what makes it a change-set (:mod:`connector.write.changeset`): its own resources in reference
order, its own Provenances and change-set codes, so a replay is idempotent whichever change-sets it was grouped
with. The answer is cut back into one :class:`~connector.write.confirm.Confirmation` per change-set and verified as
if it had been sent alone; a refused shared request is sent again one change-set per request, where today's
splitting isolates the bad records: one participant's bad data never quarantines another's.

The decision and the assembly are pure; the writer owns the sending.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from connector.write.bundle import BuiltBundle, PendingWrite
from connector.write.confirm import Confirmation
from connector.write.decisions import Strategy

# A change-set of at most this many entries (resources and Provenances) is small: the server's cost per request
# (about 13 entries' worth on the local HAPI, docs/benchmarks.md) outweighs its own. A participant's first sync
# (about 10 entries in the demo program, 50 in the 100k-row one) travels alone, as before.
SMALL_CHANGE_SET_ENTRIES = 8


# A shared request carries at most this many entries. HAPI works through one transaction on one thread: a few
# requests of this size keep the run's worker threads' requests in parallel, where one large request would not,
# and about ten entries already spread the cost of a request (a first sync's 9-entry bundles reach the server's
# own rate, docs/benchmarks.md).
SHARED_REQUEST_ENTRIES = 20


def request_capacity(max_entries: int) -> int:
    """Entries one request may carry: ``max_entries`` resources and a Provenance, as a participant's chunk."""
    return max_entries + 1


def shared_capacity(max_entries: int) -> int:
    """Entries one shared request carries: :data:`SHARED_REQUEST_ENTRIES`, less under a smaller bundle limit."""
    return min(request_capacity(max_entries), SHARED_REQUEST_ENTRIES)


def coalesces(strategy: Strategy, entries: int, capacity: int) -> bool:
    """Whether a change-set of ``entries`` bundle entries waits to share a request with others'.

    Only transactions coalesce (the strategies outside a transaction resolve references per participant); only a
    small change-set does, and only when at least two fit in one request under the limit in force.
    """
    return strategy is Strategy.TRANSACTION and 0 < entries <= min(SMALL_CHANGE_SET_ENTRIES, capacity // 2)


@dataclass
class Parcel:
    """One participant's built change-set, waiting for a shared request, and what its sending needs."""

    units: list[PendingWrite]
    built: BuiltBundle
    resend: dict[str, Any]  # the writer's per-participant send arguments (patient, participant, deferred, ...)
    resolved: dict[Any, str | None] = field(default_factory=dict)
    incomplete: dict[str, PendingWrite] = field(default_factory=dict)
    after: Callable[[], None] = lambda: None  # the participant's remaining work once this is recorded

    @property
    def size(self) -> int:
        """Bundle entries this change-set takes."""
        return len(self.built.bundle["entry"])

    @property
    def conditions(self) -> frozenset[str]:
        """Its conditional request URLs: two entries with the same condition never share a transaction."""
        return frozenset(e["request"]["url"] for e in self.built.bundle["entry"] if e["request"]["method"] == "PUT")


class Coalescer:
    """Collects parcels until the next one would not fit in a request; shared by the write threads."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._waiting: list[Parcel] = []
        self._lock = threading.Lock()

    def add(self, parcel: Parcel) -> list[Parcel]:
        """Queue a parcel; returns the parcels to send now (a full request's worth), or [] to keep waiting."""
        with self._lock:
            full: list[Parcel] = []
            if self._waiting and not fits(self._waiting, parcel, self.capacity):
                full, self._waiting = self._waiting, []
            self._waiting.append(parcel)
            if sum(p.size for p in self._waiting) >= self.capacity:
                full, self._waiting = [*full, *self._waiting], []
            return full

    def drain(self) -> list[Parcel]:
        """Everything still waiting (the end of the participants)."""
        with self._lock:
            waiting, self._waiting = self._waiting, []
            return waiting


def fits(waiting: Sequence[Parcel], parcel: Parcel, capacity: int) -> bool:
    """Whether ``parcel`` joins ``waiting`` in one request: within ``capacity`` entries, no condition twice."""
    if sum(p.size for p in waiting) + parcel.size > capacity:
        return False
    taken = frozenset().union(*(p.conditions for p in waiting))
    return not taken & parcel.conditions


def requests_of(parcels: Sequence[Parcel], capacity: int) -> list[list[Parcel]]:
    """Parcels, in order, grouped into requests that fit ``capacity`` (smaller when a limit was learned since)."""
    groups: list[list[Parcel]] = []
    for parcel in parcels:
        if groups and fits(groups[-1], parcel, capacity):
            groups[-1].append(parcel)
        else:
            groups.append([parcel])
    return groups


def shared_transaction(parcels: Sequence[Parcel]) -> dict[str, Any]:
    """One transaction of the parcels' entries: each change-set whole and in its own order, one after another."""
    return {"resourceType": "Bundle", "type": "transaction",
            "entry": [entry for p in parcels for entry in p.built.bundle["entry"]]}


def split_confirmation(confirmation: Confirmation, parcels: Sequence[Parcel]) -> list[Confirmation]:
    """The shared answer's verdicts cut back per parcel (same order); an unusable answer keeps its reason."""
    out: list[Confirmation] = []
    at = 0
    for parcel in parcels:
        out.append(Confirmation(confirmation.entries[at:at + parcel.size], confirmation.reason))
        at += parcel.size
    return out
