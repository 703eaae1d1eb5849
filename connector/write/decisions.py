"""The write stage's decisions, as pure functions (no I/O, no clock): each is unit-tested alone.

* how a group of units is cut into transactions (:func:`chunk_writes`, used by sync and by ``peersync map``);
* what to do after a transaction fails (:func:`step_after_failure`, :func:`halves`,
  :func:`is_unresolved_reference`);
* how each resource type is written on this server (:func:`write_plan`, from its CapabilityStatement).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from connector.server.capabilities import Capabilities
from connector.server.client import Action
from connector.server.hapi import UNRESOLVED_REFERENCE_CODES
from connector.write.bundle import PendingWrite

T = TypeVar("T")


def chunk_writes(writes: Iterable[PendingWrite], max_entries: int) -> Iterator[list[PendingWrite]]:
    """Cut units, in order, into groups of at most ``max_entries`` resources (plus the Provenance each
    transaction adds). A unit is never split: one larger than the limit travels alone. Lazy, so a
    participant's units are mapped only as their transaction is built."""
    chunk: list[PendingWrite] = []
    size = 0
    for write in writes:
        if chunk and size + write.size > max_entries:
            yield chunk
            chunk, size = [], 0
        chunk.append(write)
        size += write.size
    if chunk:
        yield chunk


def halves(items: Sequence[T]) -> tuple[list[T], list[T]]:
    """The two halves a rejected transaction is split into (the first half is the smaller one)."""
    middle = len(items) // 2
    return list(items[:middle]), list(items[middle:])


class FailureStep(StrEnum):
    """What the writer does after a transaction failed."""

    SPLIT = "split"  # send each half on its own, to find the units at fault
    DEFER = "defer"  # send again after the participant's other units have landed
    RECORD = "record"  # record the units' state (quarantined, in review, pending); the run goes on
    STOP = "stop"  # record the units' state, then end the run: the server cannot take these writes at all


# Failures that one unit's content (or a duplicate on the server) can cause: splitting finds the unit.
_ISOLATING = frozenset({Action.ISOLATE, Action.REVIEW, Action.CONFLICT})


def is_unresolved_reference(status: int, outcome_text: str) -> bool:
    """The server could not resolve a reference (a 404, or HAPI's conditional or literal reference codes)."""
    return status == 404 or any(code in outcome_text for code in UNRESOLVED_REFERENCE_CODES)


def step_after_failure(action: Action, *, units: int, unresolved_reference: bool, can_defer: bool) -> FailureStep:
    """The next step after a transaction of ``units`` units failed with ``action``.

    A single unit whose only fault is a reference to something not yet written is deferred, not quarantined,
    when the caller still has a later pass (``can_defer``): its target may land later in the same run.
    """
    if action in _ISOLATING and units > 1:
        return FailureStep.SPLIT
    if can_defer and unresolved_reference:
        return FailureStep.DEFER
    if action is Action.FATAL:
        return FailureStep.STOP
    return FailureStep.RECORD


@dataclass(frozen=True)
class WritePlan:
    """How this run writes each resource type."""

    conditional_types: frozenset[str] | None = None  # None: conditional update for every type
    provenance_conditional_create: bool = True
    search_types: tuple[str, ...] = ()  # written types that fall back to search-then-write (sorted)
    transaction_declared: bool = True  # False: the statement lists system interactions, but not transaction

    def uses_conditional(self, resource_type: str) -> bool:
        """Whether a type is written as ``PUT Type?identifier=...`` (else: search, then PUT by id or POST)."""
        return self.conditional_types is None or resource_type in self.conditional_types


CONDITIONAL_EVERYWHERE = WritePlan()


def write_plan(write_mode: str, capabilities: Capabilities | None, written_types: Iterable[str]) -> WritePlan:
    """The write plan for ``server.write_mode`` and the server's capabilities.

    ``conditional`` (or no readable CapabilityStatement) trusts the standard conditional update everywhere: a
    server that lacks it rejects the writes, and those records are quarantined or left pending with the reason.
    ``auto`` uses conditional update where the server declares it and search-then-write elsewhere; ``search``
    uses search-then-write everywhere. A Provenance is a conditional create unless the server says it cannot.
    """
    if write_mode == "conditional" or capabilities is None:
        return CONDITIONAL_EVERYWHERE
    types = capabilities.conditional_update_types() if write_mode == "auto" else frozenset()
    return WritePlan(
        conditional_types=types,
        provenance_conditional_create=capabilities.conditional_create("Provenance"),
        search_types=tuple(sorted(set(written_types) - types)),
        transaction_declared=capabilities.supports_transaction or not capabilities.system_interactions,
    )
