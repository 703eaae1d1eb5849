"""Patient look-up by MRN in batches: one search for many participants instead of one search each.

A first sync of thousands of participants otherwise sends one ``Patient?identifier=`` search per participant
next to its transaction: on a busy server that is a tenth of the server's work. The sync asks this cache first;
it searches ``identifier=sys|mrn1,sys|mrn2,...`` (FHIR OR) for the next batch of participants in write order,
once, from whichever worker thread needs it first, and starts the search for the batch after it in the
background, so the workers seldom wait for a look-up.

Only exact (system, value) matches count. An MRN with no exact match in the batch answer is left to the
caller's own one-participant search, so "not found" (and whatever a server matches more loosely) is decided
exactly as without the cache; an MRN with one or more exact matches gets them (two or more: ambiguous).
A batch search the server refuses or cannot answer falls back the same way.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from connector.errors import PeersyncError
from connector.identifiers import escape_token
from connector.read.staging import Staging
from connector.server.client import FhirClient

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (MRN system, MRN)

BATCH = 30  # MRNs per search: ~2 KB of query string, well under servers' URL limits
MIN_PARTICIPANTS = 2 * BATCH  # for a handful of participants, one search each is as cheap


class PatientPrefetch:
    """Patients by (system, MRN), fetched a batch at a time in the order the participants are written."""

    def __init__(self, client: FhirClient, keys: Iterable[Key], batch: int = BATCH, *, ahead: bool = True) -> None:
        self.client = client
        self.batch = batch
        self.order: list[Key] = list(dict.fromkeys(keys))
        self.position = {key: i for i, key in enumerate(self.order)}
        self.found: dict[Key, list[dict[str, Any]]] = {}
        self._done: set[int] = set()
        self._locks: dict[int, threading.Lock] = {}
        self._guard = threading.Lock()
        self._ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peersync-patients") if ahead else None
        self._started: set[int] = set()

    def matches(self, system: str, mrn: str) -> list[dict[str, Any]] | None:
        """The Patients whose identifier is exactly (system, mrn); None when the caller must search itself."""
        key = (system, mrn)
        index = self.position.get(key)
        if index is None:
            return None
        number = index // self.batch
        self._look_ahead(number + 1)
        self._ensure(number)
        return self.found.get(key)

    def close(self) -> None:
        """Wait for a look-ahead search still running (call once the workers are done)."""
        if self._ahead is not None:
            self._ahead.shutdown(wait=True)

    def _ensure(self, number: int) -> None:
        with self._guard:
            lock = self._locks.setdefault(number, threading.Lock())
        with lock:
            if number not in self._done:
                self._fetch(self.order[number * self.batch:(number + 1) * self.batch])
                self._done.add(number)

    def _look_ahead(self, number: int) -> None:
        if self._ahead is None or number * self.batch >= len(self.order):
            return
        with self._guard:
            if number in self._started:
                return
            self._started.add(number)
        context = contextvars.copy_context()  # the run id reaches the look-ahead thread's log lines
        self._ahead.submit(context.run, self._ensure, number)

    def _fetch(self, keys: list[Key]) -> None:
        wanted = set(keys)
        by_system: dict[str, list[str]] = {}
        for system, mrn in keys:
            by_system.setdefault(system, []).append(mrn)
        for system, mrns in by_system.items():
            query = ",".join(f"{escape_token(system)}|{escape_token(mrn)}" for mrn in mrns)
            try:
                patients = list(self.client.search("Patient", {"identifier": query, "_count": str(2 * len(mrns))}))
            except PeersyncError as exc:  # refused or unreachable: each participant searches on its own
                log.debug("batched Patient search failed (%s); searching one participant at a time", exc)
                continue
            for patient in patients:
                for key in {(i.get("system"), i.get("value")) for i in patient.get("identifier", [])}:
                    if key in wanted:
                        self.found.setdefault(key, []).append(patient)


def prefetch_for(client: FhirClient, staging: Staging, participants: list[str],
                 default_system: str) -> PatientPrefetch | None:
    """A cache over the participants about to be written (in that order), or None for a few participants."""
    if len(participants) < MIN_PARTICIPANTS:
        return None
    mrns = {key: (system or default_system, mrn) for key, system, mrn in staging.db.execute(
        "SELECT key, json_extract(body,'$.mrn_system'), json_extract(body,'$.mrn') FROM staged"
        " WHERE kind='enrollment'")}
    return PatientPrefetch(client, [mrns[p] for p in participants if p in mrns and mrns[p][1]])
