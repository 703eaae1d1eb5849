"""Staging: accepted records of one run, kept on disk in SQLite so memory does not grow with the input.

The store also finds what needs every row at once: duplicate ids and references to records that are
missing or were rejected. Those rows move to the rejects table, so read = accepted + rejected always holds.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import orjson

from connector.model import ID_FIELDS, RECORD_MODELS, RecordKind, SourceRecord
from connector.read.formats.base import RowLocation, describe_row

_SCHEMA = """
CREATE TABLE IF NOT EXISTS staged (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    participant TEXT,
    hash TEXT NOT NULL,
    body TEXT NOT NULL,
    file TEXT NOT NULL,
    sheet TEXT,
    unit TEXT NOT NULL,
    row INTEGER NOT NULL,
    line INTEGER,            -- CSV: the file line the row starts on (differs from row when notes span lines)
    received TEXT,           -- when this copy was received (UTC ISO), for duplicates: {keep: latest}
    digest BLOB              -- the raw row's digest, by which the next sync's read cache finds it
);
CREATE TABLE IF NOT EXISTS rejects (
    seq INTEGER PRIMARY KEY,
    file TEXT NOT NULL,
    sheet TEXT,
    unit TEXT NOT NULL,
    row INTEGER NOT NULL,
    line INTEGER,
    kind TEXT NOT NULL,
    key TEXT,                -- the row's record id when it could be read (protects it from deletion)
    field TEXT NOT NULL,
    value TEXT NOT NULL,
    reason TEXT NOT NULL
);
"""

_INDEXES = """
CREATE INDEX IF NOT EXISTS staged_kind_key ON staged(kind, key);
CREATE INDEX IF NOT EXISTS staged_participant ON staged(participant, kind);
"""

# (kind, JSON field, referenced kind, reason) checked in this order, so a rejection cascades to dependants.
_REFERENCES: list[tuple[RecordKind, str, RecordKind]] = [
    (RecordKind.ENROLLMENT, "supporter_id", RecordKind.SUPPORTER),
    (RecordKind.GOAL, "enrollment_id", RecordKind.ENROLLMENT),
    (RecordKind.GOAL, "supporter_id", RecordKind.SUPPORTER),
    (RecordKind.GOAL_NOTE, "goal_id", RecordKind.GOAL),
    (RecordKind.GOAL_NOTE, "supporter_id", RecordKind.SUPPORTER),
    (RecordKind.PLANNED_CONTACT, "enrollment_id", RecordKind.ENROLLMENT),
    (RecordKind.PLANNED_CONTACT, "supporter_id", RecordKind.SUPPORTER),
    (RecordKind.REFERRAL, "enrollment_id", RecordKind.ENROLLMENT),
    (RecordKind.REFERRAL, "supporter_id", RecordKind.SUPPORTER),
    (RecordKind.CONTACT, "enrollment_id", RecordKind.ENROLLMENT),
    (RecordKind.CONTACT, "supporter_id", RecordKind.SUPPORTER),
    (RecordKind.CONTACT, "planned_contact_id", RecordKind.PLANNED_CONTACT),
]


def record_hash(record: SourceRecord) -> str:
    """Canonical content hash of a record (sorted keys, compact JSON)."""
    return hashlib.sha256(record_json(record)).hexdigest()[:32]


def record_json(record: SourceRecord) -> bytes:
    """Canonical JSON of a record."""
    return orjson.dumps(record.model_dump(mode="json", exclude_defaults=False), option=orjson.OPT_SORT_KEYS)


@dataclass(frozen=True, slots=True)
class Superseded:
    """A resubmitted copy left out because a later copy of the same record was kept (no values: PHI-free)."""

    kind: str
    file: str
    unit: str
    row: int
    kept_unit: str
    kept_row: int
    line: int | None = None
    kept_line: int | None = None

    def __str__(self) -> str:
        return (f"{self.file} {describe_row(self.unit, self.row, self.line)}: an earlier copy of a {self.kind} "
                f"resubmitted at {describe_row(self.kept_unit, self.kept_row, self.kept_line)}; the later copy "
                "is kept (duplicates: keep latest)")


@dataclass(frozen=True, slots=True)
class Reject:
    """One rejected row for the rejects report."""

    file: str
    sheet: str | None
    unit: str
    row: int
    line: int | None  # CSV: the file line the row starts on
    kind: str
    field: str
    value: str
    reason: str

    @property
    def where(self) -> str:
        """The row as people name it: "row 46", or "row 46 (line 51)" where the editor's line differs."""
        return describe_row(self.unit, self.row, self.line)


class Staging:
    """A run's accepted records and rejected rows. Use as a context manager; the file is the caller's."""

    def __init__(self, path: Path | str = ":memory:", *, create: bool = True) -> None:
        """Open (``create``: set up) the staging file; ``create=False`` opens another connection to one that
        exists, for a worker thread that only reads it."""
        self.path = path
        self.db = sqlite3.connect(str(path), isolation_level=None)
        if create:
            self.db.execute("PRAGMA journal_mode=OFF")
            self.db.execute("PRAGMA synchronous=OFF")
            self.db.executescript(_SCHEMA)
        self._pending: list[tuple] = []
        self._pending_rejects: list[tuple] = []
        self._pending_cached: list[tuple] = []  # rows staged from the read cache: their location and digest
        self._seq = 0  # rows are numbered here, so that converted and cached rows keep their input order
        self.superseded: list[Superseded] = []
        self.finalized = False  # every row was read and the whole-input checks ran

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the database."""
        self.db.close()

    # -- writing ---------------------------------------------------------------------------------------

    def add(self, record: SourceRecord, location: RowLocation, received: str | None = None,
            digest: bytes | None = None) -> None:
        """Stage an accepted record (batched); ``received`` orders resubmitted copies (UTC ISO date-time),
        ``digest`` is its raw row's (connector.read.cache)."""
        body = record_json(record)
        participant = getattr(record, "enrollment_id", None)
        self.add_staged((record.kind, record.key, participant, hashlib.sha256(body).hexdigest()[:32], body.decode()),
                        location, received, digest)

    def add_staged(self, staged: tuple[str, str, str | None, str, str], location: RowLocation,
                   received: str | None = None, digest: bytes | None = None) -> None:
        """Stage a record as (kind, key, participant, hash, canonical JSON)."""
        self._seq += 1
        self._pending.append((self._seq, *staged, location.file, location.sheet, location.unit, location.row,
                              location.line, received, digest))
        if len(self._pending) >= 2000:
            self.flush()

    def attach_cache(self, path: Path) -> None:
        """Read the read cache's records (connector.read.cache) through this connection, until finalize()."""
        self.db.execute("ATTACH DATABASE ? AS read_cache", (str(path),))

    def cached(self, digests: list[bytes]) -> set[bytes]:
        """Those of ``digests`` the attached read cache holds a record for."""
        found: set[bytes] = set()
        for start in range(0, len(digests), 500):
            part = digests[start:start + 500]
            found.update(digest for (digest,) in self.db.execute(
                f"SELECT digest FROM read_cache.staged WHERE digest IN ({','.join('?' * len(part))})", part))
        return found

    def add_cached(self, digest: bytes, location: RowLocation, received: str | None = None) -> None:
        """Stage the read cache's record for a row of this ``digest`` (copied by SQLite, never converted)."""
        self._seq += 1
        self._pending_cached.append((self._seq, location.file, location.sheet, location.unit, location.row,
                                     location.line, received, digest))
        if len(self._pending_cached) >= 2000:
            self.flush()

    def reject(self, location: RowLocation, kind: str, field: str, value: str, reason: str,
               key: str | None = None) -> None:
        """Record a rejected row (one entry per problem); ``key`` is its record id if known."""
        self._pending_rejects.append(
            (location.file, location.sheet, location.unit, location.row, location.line, kind, key, field, value,
             reason)
        )
        if len(self._pending_rejects) >= 2000:
            self.flush()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN ... COMMIT. The connection is in autocommit mode: without it every inserted row would be a
        transaction of its own (3.5x the cost of staging a row)."""
        self.db.execute("BEGIN")
        try:
            yield
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def flush(self) -> None:
        """Write batched rows."""
        with self._transaction():
            if self._pending:
                self.db.executemany(
                    "INSERT INTO staged(seq,kind,key,participant,hash,body,file,sheet,unit,row,line,received,digest)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    self._pending,
                )
                self._pending.clear()
            if self._pending_cached:
                self.db.executemany(
                    "INSERT INTO staged(seq,kind,key,participant,hash,body,file,sheet,unit,row,line,received,digest)"
                    " SELECT ?,kind,key,participant,hash,body,?,?,?,?,?,?,digest FROM read_cache.staged"
                    " WHERE digest=? LIMIT 1",
                    self._pending_cached,
                )
                self._pending_cached.clear()
            if self._pending_rejects:
                self.db.executemany(
                    "INSERT INTO rejects(file,sheet,unit,row,line,kind,key,field,value,reason)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?)",
                    self._pending_rejects,
                )
                self._pending_rejects.clear()

    # -- whole-input checks ----------------------------------------------------------------------------

    def finalize(self, keep_latest: Collection[str] = ()) -> None:
        """Reject duplicate ids (for kinds in ``keep_latest``, keep the latest received copy when that is
        clear) and dangling references; set each goal note's participant."""
        self.flush()
        if any(name == "read_cache" for _, name, _ in self.db.execute("PRAGMA database_list")):
            self.db.execute("DETACH DATABASE read_cache")
        self.db.executescript(_INDEXES)
        if keep_latest:
            self._keep_latest_copies(set(keep_latest))
        self._reject_duplicates(set(keep_latest))
        for kind, field, target in _REFERENCES:
            self._reject_dangling(kind, field, target)
        self._reject_unknown_goal_links()
        self._reject_foreign_planned_contacts()
        with self._transaction():
            self.db.execute(
                """UPDATE staged SET participant = (
                       SELECT g.participant FROM staged g
                       WHERE g.kind='goal' AND g.key=json_extract(staged.body,'$.goal_id'))
                   WHERE kind='goal_note'"""
            )
        self.finalized = True

    def _move_to_rejects(self, seqs: list[int], field: str, reason_of: dict[int, str]) -> None:
        with self._transaction():
            for seq in seqs:
                self.db.execute(
                    """INSERT INTO rejects(file,sheet,unit,row,line,kind,key,field,value,reason)
                       SELECT file, sheet, unit, row, line, kind, key, ?, '<masked: identifier>', ?
                       FROM staged WHERE seq=?""",
                    (field, reason_of[seq], seq),
                )
                self.db.execute("DELETE FROM staged WHERE seq=?", (seq,))

    def _keep_latest_copies(self, kinds: set[str]) -> None:
        """Resubmitted records: of the copies sharing an id, keep the one received last and drop the others
        (listed in ``superseded``). When a copy has no received time, or two share the latest one, nothing is
        dropped and the duplicate check rejects them all (which copy is right is not known)."""
        groups = self.db.execute(
            """SELECT s.seq, s.kind, s.key, s.received, s.file, s.unit, s.row, s.line FROM staged s
               JOIN (SELECT kind, key FROM staged GROUP BY kind, key HAVING count(*) > 1) d
               ON s.kind=d.kind AND s.key=d.key ORDER BY s.kind, s.key, s.seq"""
        ).fetchall()
        by_record: dict[tuple[str, str], list[tuple]] = {}
        for row in groups:
            if row[1] in kinds:
                by_record.setdefault((row[1], row[2]), []).append(row)
        drop: list[int] = []
        for copies in by_record.values():
            times = [c[3] for c in copies]
            if None in times:
                continue
            latest = max(times)
            if times.count(latest) > 1:
                continue
            kept = next(c for c in copies if c[3] == latest)
            for seq, kind, _key, _received, file, unit, row, line in copies:
                if seq != kept[0]:
                    drop.append(seq)
                    self.superseded.append(Superseded(kind, file, unit, row, kept[5], kept[6], line, kept[7]))
        if drop:
            with self._transaction():
                self.db.executemany("DELETE FROM staged WHERE seq=?", [(seq,) for seq in drop])

    def superseded_counts(self) -> dict[str, int]:
        """Resubmitted copies dropped per kind (a later copy was kept)."""
        counts: dict[str, int] = {}
        for item in self.superseded:
            counts[item.kind] = counts.get(item.kind, 0) + 1
        return counts

    def _reject_duplicates(self, keep_latest: set[str]) -> None:
        duplicates = self.db.execute(
            """SELECT s.seq, s.kind, s.unit, s.row, d.n FROM staged s
               JOIN (SELECT kind, key, count(*) AS n FROM staged GROUP BY kind, key HAVING n > 1) d
               ON s.kind=d.kind AND s.key=d.key ORDER BY s.kind, s.key, s.seq"""
        ).fetchall()
        if not duplicates:
            return
        undecided = (" (duplicates: keep latest cannot choose: a copy has no readable received time, or two "
                     "share the latest)")
        reasons = {
            seq: f"duplicate {kind} id: {n} rows share it; none is sent until the source is fixed"
            + (undecided if kind in keep_latest else "")
            for seq, kind, _unit, _row, n in duplicates
        }
        for kind in {kind for _, kind, *_ in duplicates}:
            seqs = [seq for seq, k, *_ in duplicates if k == kind]
            self._move_to_rejects(seqs, ID_FIELDS[RecordKind(kind)], reasons)

    def _reject_dangling(self, kind: RecordKind, field: str, target: RecordKind) -> None:
        rows = self.db.execute(
            f"""SELECT s.seq FROM staged s
                WHERE s.kind=? AND json_extract(s.body,'$.{field}') IS NOT NULL
                AND NOT EXISTS (SELECT 1 FROM staged t WHERE t.kind=? AND t.key=json_extract(s.body,'$.{field}'))""",
            (kind.value, target.value),
        ).fetchall()
        if rows:
            noun = target.value.replace("_", " ")
            reason = f"refers to {'an' if noun[0] in 'aeiou' else 'a'} {noun} that is not in the input or was rejected"
            seqs = [r[0] for r in rows]
            self._move_to_rejects(seqs, field, dict.fromkeys(seqs, reason))

    def _reject_unknown_goal_links(self) -> None:
        rows = self.db.execute(
            """SELECT DISTINCT s.seq FROM staged s, json_each(s.body,'$.goal_ids') g
               WHERE s.kind='contact' AND NOT EXISTS (
                   SELECT 1 FROM staged t WHERE t.kind='goal' AND t.key=g.value AND t.participant=s.participant)"""
        ).fetchall()
        if rows:
            seqs = [r[0] for r in rows]
            reason = "refers to a goal that is not this participant's, is not in the input, or was rejected"
            self._move_to_rejects(seqs, "goal_ids", dict.fromkeys(seqs, reason))

    def _reject_foreign_planned_contacts(self) -> None:
        """A contact may fulfil only its own participant's planned contact: another's would put a reference to
        a different patient's record on the server."""
        rows = self.db.execute(
            """SELECT s.seq FROM staged s JOIN staged t
               ON t.kind='planned_contact' AND t.key=json_extract(s.body,'$.planned_contact_id')
               WHERE s.kind='contact' AND t.participant IS NOT s.participant"""
        ).fetchall()
        if rows:
            seqs = [r[0] for r in rows]
            reason = "refers to a planned contact of another participant"
            self._move_to_rejects(seqs, "planned_contact_id", dict.fromkeys(seqs, reason))

    # -- reading ---------------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Accepted records per kind."""
        return dict(self.db.execute("SELECT kind, count(*) FROM staged GROUP BY kind").fetchall())

    def rejected_rows(self) -> dict[str, int]:
        """Rejected rows (not problems) per kind."""
        return dict(
            self.db.execute(
                "SELECT kind, count(*) FROM (SELECT DISTINCT kind, file, sheet, unit, row FROM rejects) GROUP BY kind"
            ).fetchall()
        )

    def rejects(self) -> Iterator[Reject]:
        """Every reject, in input order."""
        for row in self.db.execute(
            "SELECT file,sheet,unit,row,line,kind,field,value,reason FROM rejects ORDER BY file, sheet, row, seq"
        ):
            yield Reject(*row)

    def records(self, kind: RecordKind, participant: str | None = None) -> Iterator[SourceRecord]:
        """Staged records of a kind (optionally one participant's), in input order."""
        model = RECORD_MODELS[kind]
        if participant is None:
            cursor = self.db.execute("SELECT body FROM staged WHERE kind=? ORDER BY seq", (kind.value,))
        else:
            cursor = self.db.execute(
                "SELECT body FROM staged WHERE kind=? AND participant=? ORDER BY seq", (kind.value, participant)
            )
        for (body,) in cursor:
            yield model.model_validate_json(body)

    def rejected_keys(self) -> tuple[set[tuple[str, str]], set[str]]:
        """((kind, key) of rejected rows whose id was readable, kinds with rejected rows of unknown id)."""
        known = {(k, key) for k, key in self.db.execute("SELECT DISTINCT kind, key FROM rejects WHERE key IS NOT NULL")}
        unknown = {k for (k,) in self.db.execute("SELECT DISTINCT kind FROM rejects WHERE key IS NULL")}
        return known, unknown

    def record(self, kind: RecordKind, key: str) -> SourceRecord | None:
        """One staged record by kind and source id."""
        row = self.db.execute("SELECT body FROM staged WHERE kind=? AND key=?", (kind.value, key)).fetchone()
        return RECORD_MODELS[kind].model_validate_json(row[0]) if row else None

    def keys(self, kind: RecordKind, participant: str) -> list[str]:
        """Source ids of a participant's records of one kind, in input order."""
        return [r[0] for r in self.db.execute(
            "SELECT key FROM staged WHERE kind=? AND participant=? ORDER BY seq", (kind.value, participant))]

    def participant_rows(self, participant: str) -> list[tuple[str, str, str]]:
        """(kind, key, body) of every staged record of one participant, in input order: one query per
        participant instead of one per record when mapping its units."""
        return self.db.execute(
            "SELECT kind, key, body FROM staged WHERE participant=? ORDER BY seq", (participant,)).fetchall()

    def first_referral_for_cbo(self, resource_id: str) -> SourceRecord | None:
        """A referral naming a community resource id (to map the CBO Organization)."""
        row = self.db.execute(
            "SELECT body FROM staged WHERE kind='referral' AND json_extract(body,'$.resource_id')=?"
            " ORDER BY seq LIMIT 1",
            (resource_id,),
        ).fetchone()
        return RECORD_MODELS[RecordKind.REFERRAL].model_validate_json(row[0]) if row else None

    def participants(self) -> list[str]:
        """Enrollment ids of all accepted enrollments."""
        return [r[0] for r in self.db.execute("SELECT key FROM staged WHERE kind='enrollment' ORDER BY seq")]

