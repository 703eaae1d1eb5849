"""The ledger: peersync's local state in one SQLite file, with a versioned schema migrated forward.

It records, per *unit* (one source record and the resources mapped from it), the content hash the server
last confirmed, the server ids and versions, the state (sent, pending, quarantined, review), and a history
of runs. A unit is marked sent only in the same SQLite transaction that stores the server's confirmation.

The ledger holds no patient data: no names, MRNs or notes; MRNs only as salted hashes.
If it is lost, the next run re-sends everything, and conditional writes prevent duplicates.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Self

from connector.errors import WRITE_ACCESS_FIX, LedgerError
from connector.files import PRIVATE_FILE_MODE, create_file, make_folder

SCHEMA_VERSION = 4



class UnitState(StrEnum):
    """Where a unit stands with the server (the ``units.state`` column)."""

    SENT = "sent"  # the server confirmed the content whose hash is stored
    PENDING = "pending"  # not confirmed yet (never sent, failed transiently, or interrupted)
    QUARANTINED = "quarantined"  # the server rejected it (4xx); waits for a source change or a retry
    REVIEW = "review"  # a person must look (patient not found or ambiguous, duplicate on the server)
    # The server does not accept writes of one of its types (parked): retried when the server's
    # CapabilityStatement or the configuration changes, or with `sync --retry-parked`
    NOT_PERMITTED = "not_permitted"

# The hash a voided unit keeps: never equal to a content hash, so a record that comes back is re-sent.
VOIDED_HASH = "deleted"
# The hash of a unit whose resources drifted on the server (``peersync verify --repair``): never equal to a
# content hash, so the next sync re-sends the unit (or voids it again, if it had left the source).
DRIFTED_HASH = "drifted"


def _v1(db: sqlite3.Connection) -> None:
    _run_statements(db, """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE units (
            unit_key TEXT PRIMARY KEY,       -- '<kind>:<source id>'
            kind TEXT NOT NULL,
            participant TEXT,                -- enrollment id; NULL for program-wide units
            hash TEXT,                       -- content hash last confirmed by the server
            attempt_hash TEXT,               -- content hash last attempted (to skip known-bad content)
            voided INTEGER NOT NULL DEFAULT 0,
            state TEXT NOT NULL,
            patient_id TEXT,                 -- server Patient id the unit was written under
            detail TEXT,                     -- last outcome: status and OperationOutcome codes, no PHI
            attempts INTEGER NOT NULL DEFAULT 0,
            updated_at TEXT NOT NULL,
            run_id TEXT
        );
        CREATE INDEX units_participant ON units(participant);
        CREATE INDEX units_state ON units(state);
        CREATE TABLE resources (
            resource_type TEXT NOT NULL,
            system TEXT NOT NULL,
            value TEXT NOT NULL,
            unit_key TEXT NOT NULL,
            server_id TEXT,
            version TEXT,
            PRIMARY KEY (resource_type, system, value)
        );
        CREATE INDEX resources_unit ON resources(unit_key);
        CREATE TABLE participants (
            participant TEXT PRIMARY KEY,
            patient_id TEXT,
            mrn_hash TEXT,
            state TEXT NOT NULL,
            detail TEXT,
            updated_at TEXT NOT NULL
        );
        CREATE TABLE review (
            id INTEGER PRIMARY KEY,
            subject TEXT NOT NULL,           -- 'participant:<id>' or a unit key
            reason TEXT NOT NULL,            -- patient-not-found | patient-ambiguous | patient-inactive
                                             -- | duplicate-on-server
            detail TEXT,
            status TEXT NOT NULL DEFAULT 'open',  -- open | retry | dismissed | resolved
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            run_id TEXT,
            UNIQUE (subject, reason)
        );
        CREATE TABLE runs (
            run_id TEXT PRIMARY KEY,
            command TEXT NOT NULL,
            started_at TEXT NOT NULL,
            finished_at TEXT,
            outcome TEXT,
            exit_code INTEGER,
            summary TEXT
        );
        """)


def _v2(db: sqlite3.Connection) -> None:
    """The shape guard's memory: per record kind, the profile's columns the input had and its row count at
    the last completed run (column names only: no values)."""
    _run_statements(db, """
        CREATE TABLE shapes (
            kind TEXT PRIMARY KEY,
            columns TEXT NOT NULL,           -- JSON list of column names, as the profile spells them
            rows INTEGER NOT NULL,
            updated_at TEXT NOT NULL,
            run_id TEXT
        );
        """)


def _v3(db: sqlite3.Connection) -> None:
    """``peersync pull``: the clinic referrals delivered to intake (Task ids only), and the last status seen on
    each referral Task peersync wrote (codes and times only: no free text, no patient data)."""
    _run_statements(db, """
        CREATE TABLE pulled_tasks (
            task_id TEXT PRIMARY KEY,        -- the clinic's referral Task (server id)
            version TEXT,                    -- its version when delivered
            service_request_id TEXT,
            state TEXT NOT NULL,             -- delivered (in an intake file) | received (the Task says so)
            delivered_at TEXT NOT NULL,
            run_id TEXT
        );
        CREATE TABLE referral_statuses (
            referral_id TEXT PRIMARY KEY,    -- the program's referral id (as in its export)
            task_id TEXT NOT NULL,
            version TEXT,
            status TEXT NOT NULL,
            changed_at TEXT,
            changed_by TEXT NOT NULL,        -- organization | program
            seen_at TEXT NOT NULL
        );
        """)


def _v4(db: sqlite3.Connection) -> None:
    """``peersync pull``: the referrals a community organization has changed (sticky: a later version peersync
    writes, keeping the organization's status, does not make the referral the program's again), and the clinic
    referral Tasks skipped for a fixable reason, re-read by id on every pull until delivered or closed (a fix on
    the Patient does not change the Task's lastUpdated, so the incremental search would never see it again).
    Ids, codes and times only."""
    _run_statements(db, """
        CREATE TABLE organization_changes (
            referral_id TEXT PRIMARY KEY,    -- the program's referral id
            task_id TEXT NOT NULL,
            version TEXT NOT NULL,           -- the latest Task version the organization wrote
            status TEXT NOT NULL,            -- the status it set there
            changed_at TEXT,
            recorded_at TEXT NOT NULL
        );
        CREATE TABLE skipped_tasks (
            task_id TEXT PRIMARY KEY,        -- the clinic's referral Task (server id)
            reason TEXT NOT NULL,            -- why (ids and codes, no patient data)
            first_skipped_at TEXT NOT NULL,
            last_seen_at TEXT NOT NULL,
            run_id TEXT
        );
        """)


def _run_statements(db: sqlite3.Connection, script: str) -> None:
    """Run a script's statements one by one: ``executescript`` would commit the migration's transaction."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            db.execute(statement)
            statement = ""


# Ordered migrations: MIGRATIONS[i] takes the schema from version i to i + 1. Ledger._migrate runs them, with
# the user_version bumps, in one transaction.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1, _v2, _v3, _v4]


def now_iso() -> str:
    """Current UTC time as ISO 8601."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class LedgerUnit:
    """A unit's ledger row."""

    unit_key: str
    kind: str
    participant: str | None
    hash: str | None
    voided: bool
    state: str
    patient_id: str | None
    detail: str | None
    attempts: int


def _ledger_unit(row: Sequence[Any]) -> LedgerUnit:
    """A ``units`` row (unit_key, kind, participant, hash, voided, state, patient_id, detail, attempts)."""
    unit_key, kind, participant, unit_hash, voided, state, patient_id, detail, attempts = row
    return LedgerUnit(unit_key, kind, participant, unit_hash, bool(voided), state, patient_id, detail, attempts)


@dataclass(frozen=True)
class LedgerResource:
    """A resource the server confirmed for a unit: its business identifier and its server id."""

    resource_type: str
    system: str
    value: str
    server_id: str
    version: str | None


@dataclass(frozen=True)
class SentResource:
    """A resource of a unit the server confirmed: what ``peersync verify`` expects to find on the server."""

    unit_key: str
    resource_type: str
    system: str
    value: str
    server_id: str | None
    version: str | None
    retracted: bool  # voided by peersync after its record left the source (its stored version predates the void)


@dataclass(frozen=True)
class ConfirmedUnit:
    """A unit the server confirmed: its hash and its resources' (type, system, value, server id, version)."""

    unit_key: str
    kind: str
    participant: str | None
    unit_hash: str
    voided: bool
    patient_id: str | None
    resources: list[tuple[str, str, str, str | None, str | None]]
    detail: str
    # SENT, or NOT_PERMITTED for a unit sent without the resources of a type the server refuses: its landed
    # resources are known (referrers resolve them), and the whole unit is sent again once the type is permitted.
    state: UnitState = UnitState.SENT


def _switch_to_wal(db: sqlite3.Connection, *, patience: float = 30.0) -> None:
    """Put the ledger in WAL mode (persistent in the file). SQLite answers "database is locked" at once, without
    waiting for its busy timeout, when another connection switches a new file at the same moment: try again."""
    deadline = time.monotonic() + patience
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
        else:
            return


class Ledger:
    """Thread-safe access to the ledger file. Writes are serialised; each write is one SQLite transaction."""

    def __init__(self, path: Path | str, *, mode: int = PRIVATE_FILE_MODE) -> None:
        """Open (or create, with ``mode``: SQLite gives its -wal and -shm files the same) the ledger at ``path``."""
        self.path = Path(path)
        self._lock = threading.RLock()
        self._salt = ""  # set by _migrate(): the MRN salt, created with the ledger
        check_ledger_access(self.path)
        try:
            make_folder(self.path.parent, mode)
            create_file(self.path, mode)  # an empty file is an empty SQLite database
            self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
            _switch_to_wal(self.db)
            # NORMAL, not FULL: in WAL mode a commit survives a crash of peersync; only a power loss or OS crash
            # may undo the last commits. That costs a resend, never a duplicate: every write is a conditional
            # update by business identifier and Provenance a conditional create (the "ledger deleted" and
            # "lost response" scenarios in tests/reliability prove it). FULL fsyncs every commit, and the write
            # threads queued behind those commits (benchmarks: a tenth of their time).
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
            self.db.execute("SELECT count(*) FROM units").fetchone()
            # Damage inside the file (clobbered pages, a cut-off tail) is otherwise found only when a page is
            # read, in the middle of a run; quick_check reads every page once (about 1 s per 400 MB).
            problems = [row[0] for row in self.db.execute("PRAGMA quick_check(3)")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(problems)[:200])  # noqa: TRY301 - reported as corruption below
        except sqlite3.OperationalError as exc:
            if _is_access_error(exc):  # a read-only folder or file system: the ledger itself is fine
                raise LedgerError(_access_message(self.path, str(exc))) from exc
            raise LedgerError(_corrupt_message(self.path, exc)) from exc
        except sqlite3.DatabaseError as exc:
            raise LedgerError(_corrupt_message(self.path, exc)) from exc
        except OSError as exc:
            raise LedgerError(f"cannot open ledger {self.path}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema ----------------------------------------------------------------------------------------

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"ledger {self.path} has schema version {version}, newer than this peersync understands "
                f"({SCHEMA_VERSION}); upgrade peersync"
            )
        salt = self.meta("salt") if version else None
        if version < SCHEMA_VERSION or salt is None:
            # Under the write lock, and read again: two processes may open a new ledger at once (a sync and the
            # metrics of a run refused its lock), and only one may create the tables and the salt.
            with self.transaction() as db:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                for target in range(version, SCHEMA_VERSION):
                    MIGRATIONS[target](db)
                    db.execute(f"PRAGMA user_version = {target + 1}")
                row = db.execute("SELECT value FROM meta WHERE key = 'salt'").fetchone()
                salt = row[0] if row else secrets.token_hex(16)
                if row is None:
                    db.execute("INSERT INTO meta(key, value) VALUES('salt', ?)", (salt,))
        self._salt = salt

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write (BEGIN IMMEDIATE ... COMMIT), serialised across threads."""
        with self._lock:
            try:
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    yield self.db
                    self.db.execute("COMMIT")
                except BaseException:
                    # SQLite may already have rolled back by itself (SQLITE_FULL, SQLITE_IOERR...): a second
                    # ROLLBACK would fail and hide the real error ("disk is full") behind "no transaction is active".
                    if self.db.in_transaction:
                        self.db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:
                raise LedgerError(_write_failure(self.path, exc)) from exc

    # -- pull: clinic referrals and referral statuses ---------------------------------------------------

    def pulled_tasks(self) -> dict[str, str]:
        """Clinic referral Task id -> state (delivered | received | closed) for every Task delivered to intake
        (closed: the EHR ended or deleted it before it was received)."""
        with self._lock:
            return dict(self.db.execute("SELECT task_id, state FROM pulled_tasks").fetchall())

    def record_pulled_task(self, task_id: str, *, version: str, service_request_id: str, state: str,
                           run_id: str) -> None:
        """A clinic referral was delivered to intake (``delivered``), or its Task now says ``received``."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO pulled_tasks(task_id, version, service_request_id, state, delivered_at, run_id) "
                "VALUES(?,?,?,?,?,?) ON CONFLICT(task_id) DO UPDATE SET state=excluded.state, "
                "version=excluded.version", (task_id, version, service_request_id, state, now_iso(), run_id))

    def skipped_tasks(self) -> dict[str, str]:
        """Clinic referral Task id -> reason, for every Task skipped and not yet delivered or closed."""
        with self._lock:
            return dict(self.db.execute("SELECT task_id, reason FROM skipped_tasks").fetchall())

    def record_skipped_tasks(self, skipped: dict[str, str], *, resolved: set[str], run_id: str) -> None:
        """Task id -> reason of the Tasks this pull skipped; ``resolved`` (delivered, closed, or no longer the
        program's) are forgotten."""
        seen = now_iso()
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO skipped_tasks(task_id, reason, first_skipped_at, last_seen_at, run_id) VALUES(?,?,?,?,?) "
                "ON CONFLICT(task_id) DO UPDATE SET reason=excluded.reason, last_seen_at=excluded.last_seen_at, "
                "run_id=excluded.run_id", [(task_id, reason, seen, seen, run_id) for task_id, reason in skipped.items()
                                           if task_id not in resolved])
            db.executemany("DELETE FROM skipped_tasks WHERE task_id=?", [(task_id,) for task_id in resolved])

    def organization_changes(self) -> dict[str, dict[str, str]]:
        """Referral id -> {task_id, version, status, changed_at} of the latest change a community organization
        made to the referral's Task."""
        with self._lock:
            rows = self.db.execute("SELECT referral_id, task_id, version, status, changed_at "
                                   "FROM organization_changes").fetchall()
        return {r[0]: {"task_id": r[1], "version": r[2], "status": r[3], "changed_at": r[4]} for r in rows}

    def record_organization_changes(self, rows: list[tuple[str, str, str, str, str]]) -> None:
        """(referral id, task id, version, status, changed at) of Task versions an organization wrote."""
        recorded = now_iso()
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO organization_changes(referral_id, task_id, version, status, changed_at, recorded_at) "
                "VALUES(?,?,?,?,?,?) ON CONFLICT(referral_id) DO UPDATE SET task_id=excluded.task_id, "
                "version=excluded.version, status=excluded.status, changed_at=excluded.changed_at, "
                "recorded_at=excluded.recorded_at", [(*row, recorded) for row in rows])

    def confirmed_versions(self, resource_type: str, system: str) -> dict[str, tuple[str | None, str | None]]:
        """Identifier value -> (server id, version) peersync last confirmed, for one identifier system."""
        with self._lock:
            rows = self.db.execute("SELECT value, server_id, version FROM resources WHERE resource_type=? AND "
                                   "system=?", (resource_type, system)).fetchall()
        return {value: (server_id, version) for value, server_id, version in rows}

    def record_referral_statuses(self, rows: list[tuple[str, str, str, str, str, str]]) -> None:
        """(referral id, task id, version, status, changed at, changed by) as last seen on the server."""
        seen = now_iso()
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO referral_statuses(referral_id, task_id, version, status, changed_at, changed_by, "
                "seen_at) VALUES(?,?,?,?,?,?,?) ON CONFLICT(referral_id) DO UPDATE SET task_id=excluded.task_id, "
                "version=excluded.version, status=excluded.status, changed_at=excluded.changed_at, "
                "changed_by=excluded.changed_by, seen_at=excluded.seen_at", [(*row, seen) for row in rows])

    def referral_statuses(self) -> list[dict[str, Any]]:
        """The last status seen on each referral Task peersync wrote (no free text)."""
        with self._lock:
            cursor = self.db.execute("SELECT referral_id, task_id, version, status, changed_at, changed_by, seen_at "
                                     "FROM referral_statuses ORDER BY referral_id")
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    # -- meta ------------------------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        """A meta value, or None."""
        with self._lock:
            row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        """Set a meta value."""
        with self.transaction() as db:
            db.execute("INSERT INTO meta(key,value) VALUES(?,?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                       (key, value))

    def mrn_hash(self, mrn_system: str, mrn: str) -> str:
        """A salted hash of an MRN, so the ledger can notice MRN changes without storing MRNs."""
        return hashlib.sha256(f"{self._salt}|{mrn_system}|{mrn}".encode()).hexdigest()[:32]

    # -- units -----------------------------------------------------------------------------------------

    def unit(self, unit_key: str) -> LedgerUnit | None:
        """One unit's row."""
        with self._lock:
            row = self.db.execute(
                "SELECT unit_key,kind,participant,hash,voided,state,patient_id,detail,attempts FROM units"
                " WHERE unit_key=?",
                (unit_key,),
            ).fetchone()
        return _ledger_unit(row) if row else None

    def server_ids(self, keys: list[tuple[str, str, str]]) -> dict[tuple[str, str, str], str]:
        """(type, system, value) -> server id for the identifiers the ledger knows."""
        found: dict[tuple[str, str, str], str] = {}
        with self._lock:
            for key in keys:
                row = self.db.execute(
                    "SELECT server_id FROM resources"
                    " WHERE resource_type=? AND system=? AND value=? AND server_id IS NOT NULL",
                    key,
                ).fetchone()
                if row:
                    found[key] = row[0]
        return found

    def versions(self, keys: list[tuple[str, str, str]]) -> dict[tuple[str, str, str], str]:
        """(type, system, value) -> the version id the server last confirmed, for the identifiers that have one."""
        found: dict[tuple[str, str, str], str] = {}
        with self._lock:
            for key in keys:
                row = self.db.execute(
                    "SELECT version FROM resources"
                    " WHERE resource_type=? AND system=? AND value=? AND version IS NOT NULL",
                    key,
                ).fetchone()
                if row:
                    found[key] = row[0]
        return found

    def resources_of(self, unit_key: str) -> list[LedgerResource]:
        """The resources the server confirmed for a unit (those with a server id)."""
        with self._lock:
            rows = self.db.execute(
                "SELECT resource_type, system, value, server_id, version FROM resources "
                "WHERE unit_key=? AND server_id IS NOT NULL ORDER BY rowid", (unit_key,)).fetchall()
        return [LedgerResource(*row) for row in rows]

    def record_voided(self, unit_key: str, *, run_id: str) -> None:
        """The unit's resources were marked entered-in-error on the server: it is settled as voided."""
        with self.transaction() as db:
            db.execute("UPDATE units SET voided=1, hash=?, state=?, detail='voided: gone from source', "
                       "updated_at=?, run_id=? WHERE unit_key=?",
                       (VOIDED_HASH, UnitState.SENT, now_iso(), run_id, unit_key))

    def forget_resource(self, resource_type: str, system: str, value: str) -> None:
        """Drop a resource row (its identifier was retired on the server; a fresh resource replaces it)."""
        with self.transaction() as db:
            db.execute("DELETE FROM resources WHERE resource_type=? AND system=? AND value=?",
                       (resource_type, system, value))

    def sent_resources(self, *, sample: int | None = None) -> list[SentResource]:
        """The resources of every unit in state sent, by type and server id; ``sample``: that many, at random."""
        query = ("SELECT r.unit_key, r.resource_type, r.system, r.value, r.server_id, r.version, u.hash = ? "
                 "FROM resources r JOIN units u ON u.unit_key = r.unit_key WHERE u.state = ? ")
        args: tuple[Any, ...] = (VOIDED_HASH, UnitState.SENT)
        if sample is None:
            query += "ORDER BY r.resource_type, r.server_id"
        else:
            query += "ORDER BY random() LIMIT ?"
            args += (sample,)
        with self._lock:
            rows = self.db.execute(query, args).fetchall()
        return [SentResource(unit_key, resource_type, system, value, server_id, version, bool(retracted))
                for unit_key, resource_type, system, value, server_id, version, retracted in rows]

    def mark_drifted(self, unit_keys: list[str], missing: list[tuple[str, str, str]], *, detail: str,
                     run_id: str) -> int:
        """Units whose resources were changed or deleted on the server: the next sync re-sends them.

        ``missing`` are (type, system, value) of resources the server no longer has: their rows are dropped, so
        the re-send finds them by identifier and references to them are written as conditional references.
        A unit voided after its record left the source is armed to be voided again. One transaction; returns
        the number of units marked.
        """
        with self.transaction() as db:
            db.executemany("DELETE FROM resources WHERE resource_type=? AND system=? AND value=?", missing)
            marked = 0
            for unit_key in unit_keys:
                marked += db.execute(
                    "UPDATE units SET voided = CASE WHEN hash = ? THEN 0 ELSE voided END, hash = ?, state = ?, "
                    "detail = ?, updated_at = ?, run_id = ? WHERE unit_key = ?",
                    (VOIDED_HASH, DRIFTED_HASH, UnitState.PENDING, detail, now_iso(), run_id, unit_key)).rowcount
        return marked

    def unit_keys_of(self, identities: list[tuple[str, str, str]]) -> dict[tuple[str, str, str], str]:
        """(type, system, value) -> the unit that wrote that resource, for the identities the ledger knows."""
        found: dict[tuple[str, str, str], str] = {}
        with self._lock:
            for identity in identities:
                row = self.db.execute("SELECT unit_key FROM resources WHERE resource_type=? AND system=? AND value=?",
                                      identity).fetchone()
                if row:
                    found[identity] = row[0]
        return found

    def quarantined(self) -> list[dict[str, Any]]:
        """Quarantined units (opaque to the server: no content), oldest first: key, kind, reason, attempts."""
        with self._lock:
            rows = self.db.execute("SELECT unit_key, kind, detail, attempts, updated_at FROM units WHERE state=? "
                                   "ORDER BY updated_at, unit_key", (UnitState.QUARANTINED,)).fetchall()
        keys = ("unit_key", "kind", "detail", "attempts", "updated_at")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def retry_quarantined(self) -> int:
        """Every quarantined unit back to pending (its hash cleared): the next sync sends it again. Returns how
        many."""
        with self.transaction() as db:
            return db.execute("UPDATE units SET state=?, hash=NULL, detail='retry requested', updated_at=? "
                              "WHERE state=?", (UnitState.PENDING, now_iso(), UnitState.QUARANTINED)).rowcount

    def refused_types(self) -> tuple[str | None, dict[str, str]]:
        """(permissions fingerprint, type -> reason) of the types the server refused, as the last run saw them."""
        stored = self.meta("refused_types")
        if not stored:
            return None, {}
        saved = json.loads(stored)
        return saved.get("fingerprint"), dict(saved.get("types", {}))

    def set_refused_types(self, fingerprint: str, types: dict[str, str]) -> None:
        """Remember the types the server refused, with the fingerprint of what decided it."""
        self.set_meta("refused_types", json.dumps({"fingerprint": fingerprint, "types": types}, sort_keys=True))

    def retry_parked(self) -> int:
        """Every parked unit (not permitted by the server) back to pending, and the refused types forgotten: the
        next sync sends them again. Returns how many units."""
        with self.transaction() as db:
            db.execute("DELETE FROM meta WHERE key='refused_types'")
            return db.execute("UPDATE units SET state=?, attempt_hash=NULL, detail='retry: parked types', "
                              "updated_at=? WHERE state=?",
                              (UnitState.PENDING, now_iso(), UnitState.NOT_PERMITTED)).rowcount

    def parked_by_kind(self) -> dict[str, int]:
        """Parked units (not permitted by the server) per record kind."""
        with self._lock:
            return dict(self.db.execute("SELECT kind, count(*) FROM units WHERE state=? GROUP BY kind ORDER BY kind",
                                        (UnitState.NOT_PERMITTED,)).fetchall())

    def is_settled(self, unit_key: str, unit_hash: str | None) -> bool:
        """True when the server already confirmed exactly this content for the unit."""
        unit = self.unit(unit_key)
        return unit is not None and unit.state == UnitState.SENT and unit.hash == unit_hash

    def record_confirmed(
        self,
        unit_key: str,
        *,
        kind: str,
        participant: str | None,
        unit_hash: str,
        voided: bool,
        patient_id: str | None,
        resources: list[tuple[str, str, str, str | None, str | None]],
        detail: str,
        run_id: str,
    ) -> None:
        """The server confirmed a unit's resources: store ids/versions and mark it sent, atomically."""
        self.record_confirmed_many([ConfirmedUnit(unit_key, kind, participant, unit_hash, voided, patient_id,
                                                  resources, detail)], run_id=run_id)

    def record_confirmed_many(self, units: list[ConfirmedUnit], *, run_id: str) -> None:
        """Several units confirmed by the same server transaction, stored in one ledger transaction (one commit
        per server transaction, not one per unit: commits serialise the write threads)."""
        with self.transaction() as db:
            for unit in units:
                self._upsert_unit(db, unit.unit_key, unit.kind, unit.participant, unit.unit_hash, unit.voided,
                                  unit.state, unit.patient_id, unit.detail, run_id, reset_attempts=True)
                if unit.state is not UnitState.SENT:  # parked with this content (the plan's `parked` act)
                    db.execute("UPDATE units SET attempt_hash=? WHERE unit_key=?", (unit.unit_hash, unit.unit_key))
                db.executemany(
                    """INSERT INTO resources(resource_type,system,value,unit_key,server_id,version) VALUES(?,?,?,?,?,?)
                       ON CONFLICT(resource_type,system,value) DO UPDATE SET unit_key=excluded.unit_key,
                       server_id=excluded.server_id, version=excluded.version""",
                    [(resource_type, system, value, unit.unit_key, server_id, version)
                     for resource_type, system, value, server_id, version in unit.resources],
                )

    def record_state(
        self,
        unit_key: str,
        *,
        kind: str,
        participant: str | None,
        state: UnitState,
        detail: str,
        run_id: str,
        attempt_hash: str | None = None,
    ) -> None:
        """Record a unit that is not (yet) confirmed: pending, quarantined or in review. Keeps its last hash."""
        with self.transaction() as db:
            self._upsert_unit(db, unit_key, kind, participant, None, None, state, None, detail, run_id,
                              reset_attempts=False)
            if attempt_hash is not None:
                db.execute("UPDATE units SET attempt_hash=? WHERE unit_key=?", (attempt_hash, unit_key))

    @staticmethod
    def _upsert_unit(db: sqlite3.Connection, unit_key: str, kind: str, participant: str | None,
                     unit_hash: str | None, voided: bool | None, state: str, patient_id: str | None, detail: str,
                     run_id: str, *, reset_attempts: bool) -> None:
        db.execute(
            """INSERT INTO units(unit_key,kind,participant,hash,voided,state,patient_id,detail,attempts,updated_at,
                                 run_id)
               VALUES(?,?,?,?,?,?,?,?,?,?,?)
               ON CONFLICT(unit_key) DO UPDATE SET
                 participant=excluded.participant,
                 hash=COALESCE(excluded.hash, units.hash),
                 voided=CASE WHEN ? IS NULL THEN units.voided ELSE excluded.voided END,
                 state=excluded.state,
                 patient_id=COALESCE(excluded.patient_id, units.patient_id),
                 detail=excluded.detail,
                 attempts=CASE WHEN ? THEN 0 ELSE units.attempts + 1 END,
                 updated_at=excluded.updated_at, run_id=excluded.run_id""",
            (unit_key, kind, participant, unit_hash, int(bool(voided)), state, patient_id, detail,
             0 if reset_attempts else 1, now_iso(), run_id, voided, int(reset_attempts)),
        )

    def units_in_state(self, *states: str) -> list[LedgerUnit]:
        """Units currently in any of the given states."""
        marks = ",".join("?" * len(states))
        with self._lock:
            rows = self.db.execute(
                f"SELECT unit_key,kind,participant,hash,voided,state,patient_id,detail,attempts FROM units "
                f"WHERE state IN ({marks}) ORDER BY participant, unit_key",
                states,
            ).fetchall()
        return [_ledger_unit(r) for r in rows]

    def state_counts(self) -> dict[str, int]:
        """Units per state."""
        with self._lock:
            return dict(self.db.execute("SELECT state, count(*) FROM units GROUP BY state").fetchall())

    # -- participants ----------------------------------------------------------------------------------

    def participant_patients(self) -> dict[str, str]:
        """Participant (enrollment id) -> the server Patient id it was last matched to."""
        with self._lock:
            return dict(self.db.execute("SELECT participant, patient_id FROM participants "
                                        "WHERE patient_id IS NOT NULL").fetchall())

    def set_participant(self, participant: str, *, patient_id: str | None, mrn_hash: str, state: str,
                        detail: str, close_review: bool = False) -> None:
        """Record how a participant's Patient was resolved; ``close_review`` also closes the participant's open
        review entries, in the same transaction."""
        with self.transaction() as db:
            db.execute(
                """INSERT INTO participants(participant,patient_id,mrn_hash,state,detail,updated_at) VALUES(?,?,?,?,?,?)
                   ON CONFLICT(participant) DO UPDATE SET patient_id=excluded.patient_id, mrn_hash=excluded.mrn_hash,
                   state=excluded.state, detail=excluded.detail, updated_at=excluded.updated_at""",
                (participant, patient_id, mrn_hash, state, detail, now_iso()),
            )
            if close_review:
                self._resolve_review(db, f"participant:{participant}")

    # -- review queue ----------------------------------------------------------------------------------

    def open_review(self, subject: str, reason: str, detail: str, run_id: str) -> None:
        """Put a subject in the review queue (or refresh its open entry)."""
        with self.transaction() as db:
            db.execute(
                """INSERT INTO review(subject,reason,detail,status,created_at,updated_at,run_id)
                   VALUES(?,?,?,'open',?,?,?)
                   ON CONFLICT(subject,reason) DO UPDATE SET detail=excluded.detail, updated_at=excluded.updated_at,
                   run_id=excluded.run_id,
                   status=CASE WHEN review.status='dismissed' THEN 'dismissed' ELSE 'open' END""",
                (subject, reason, detail, now_iso(), now_iso(), run_id),
            )

    def close_review(self, subject: str, reason: str) -> None:
        """Close a subject's open entry for one reason: what it waited for has been found."""
        with self.transaction() as db:
            db.execute("UPDATE review SET status='resolved', updated_at=? WHERE subject=? AND reason=? "
                       "AND status IN ('open','retry')", (now_iso(), subject, reason))

    @staticmethod
    def _resolve_review(db: sqlite3.Connection, subject: str) -> None:
        """Close open review entries of a subject that has since gone through."""
        db.execute("UPDATE review SET status='resolved', updated_at=? WHERE subject=? AND status IN ('open','retry')",
                   (now_iso(), subject))

    def reviews(self, *, include_closed: bool = False) -> list[dict[str, Any]]:
        """Review entries, newest first."""
        where = "" if include_closed else "WHERE status IN ('open','retry')"
        with self._lock:
            rows = self.db.execute(
                f"SELECT id,subject,reason,detail,status,created_at,updated_at FROM review {where} ORDER BY id"
            ).fetchall()
        keys = ("id", "subject", "reason", "detail", "status", "created_at", "updated_at")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def set_review_status(self, review_id: int, status: str) -> bool:
        """Mark a review entry retry/dismissed; True if it existed."""
        with self.transaction() as db:
            cursor = db.execute("UPDATE review SET status=?, updated_at=? WHERE id=?", (status, now_iso(), review_id))
            if status == "retry":
                subject = db.execute("SELECT subject FROM review WHERE id=?", (review_id,)).fetchone()
                if subject and not subject[0].startswith("participant:"):
                    db.execute("UPDATE units SET state=?, hash=NULL WHERE unit_key=?", (UnitState.PENDING, subject[0]))
            return cursor.rowcount > 0

    def dismissed_subjects(self) -> set[str]:
        """Subjects a person dismissed: not retried automatically."""
        with self._lock:
            return {r[0] for r in self.db.execute("SELECT subject FROM review WHERE status='dismissed'")}

    # -- input shapes (the shape guard) ---------------------------------------------------------------

    def shapes(self) -> dict[str, tuple[list[str], int]]:
        """Record kind -> (columns, rows) remembered from the last completed run."""
        with self._lock:
            rows = self.db.execute("SELECT kind, columns, rows FROM shapes").fetchall()
        return {kind: (json.loads(columns), int(count)) for kind, columns, count in rows}

    def record_shapes(self, shapes: dict[str, tuple[list[str], int]], *, run_id: str) -> None:
        """Remember these kinds' shapes (the others keep theirs), in one transaction."""
        with self.transaction() as db:
            db.executemany(
                """INSERT INTO shapes(kind,columns,rows,updated_at,run_id) VALUES(?,?,?,?,?)
                   ON CONFLICT(kind) DO UPDATE SET columns=excluded.columns, rows=excluded.rows,
                   updated_at=excluded.updated_at, run_id=excluded.run_id""",
                [(kind, json.dumps(sorted(columns)), rows, now_iso(), run_id)
                 for kind, (columns, rows) in sorted(shapes.items())])

    # -- runs ------------------------------------------------------------------------------------------

    def start_run(self, run_id: str, command: str) -> None:
        """Record the start of a run."""
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO runs(run_id,command,started_at) VALUES(?,?,?)",
                       (run_id, command, now_iso()))

    def finish_run(self, run_id: str, outcome: str, exit_code: int, summary: dict[str, Any]) -> None:
        """Record the end of a run with its summary."""
        with self.transaction() as db:
            db.execute("UPDATE runs SET finished_at=?, outcome=?, exit_code=?, summary=? WHERE run_id=?",
                       (now_iso(), outcome, exit_code, json.dumps(summary, default=str), run_id))

    def runs(self, limit: int = 10, *, command: str | None = None) -> list[dict[str, Any]]:
        """The latest runs (of one ``command``, or all), newest first."""
        with self._lock:
            rows = self.db.execute(
                "SELECT run_id,command,started_at,finished_at,outcome,exit_code,summary FROM runs "
                "WHERE ? IS NULL OR command = ? ORDER BY started_at DESC, rowid DESC LIMIT ?",
                (command, command, limit),
            ).fetchall()
        keys = ("run_id", "command", "started_at", "finished_at", "outcome", "exit_code", "summary")
        out = []
        for row in rows:
            entry = dict(zip(keys, row, strict=True))
            entry["summary"] = json.loads(entry["summary"]) if entry["summary"] else None
            out.append(entry)
        return out

    def last_run_with_exit(self, exit_codes: tuple[int, ...], *, command: str | None = None) -> dict[str, Any] | None:
        """The newest run (of one ``command``, or any) that ended with one of ``exit_codes`` (run id, start, finish,
        exit code), or None."""
        marks = ",".join("?" * len(exit_codes))
        with self._lock:
            row = self.db.execute(
                f"SELECT run_id, started_at, finished_at, exit_code FROM runs WHERE exit_code IN ({marks}) "
                "AND (? IS NULL OR command = ?) ORDER BY started_at DESC, rowid DESC LIMIT 1",
                (*exit_codes, command, command)).fetchone()
        if row is None:
            return None
        return dict(zip(("run_id", "started_at", "finished_at", "exit_code"), row, strict=True))

    def attach_to(self, db: sqlite3.Connection, alias: str = "ledger") -> None:
        """Attach this ledger file to another connection (the staging DB) so the planner can join in SQL."""
        db.execute(f"ATTACH DATABASE ? AS {alias}", (str(self.path),))

    @staticmethod
    def detach_from(db: sqlite3.Connection, alias: str = "ledger") -> None:
        """Undo :meth:`attach_to` (before the ledger file goes away)."""
        db.execute(f"DETACH DATABASE {alias}")


def ledger_access_problem(path: Path) -> str | None:
    """Why this user cannot use the ledger at ``path``, or None. SQLite needs the folder too: it creates the
    -wal and -shm files (and peersync the .lock file) beside the ledger."""
    folder = path.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"the folder {existing} is not writable by this user"
    for companion in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}.lock")):
        if companion.exists() and not os.access(companion, os.R_OK | os.W_OK):
            return f"{companion} is not readable and writable by this user"
    return None


def check_ledger_access(path: Path) -> None:
    """Raise LedgerError (exit 78) with the fix when this user cannot write the ledger or its folder."""
    problem = ledger_access_problem(path)
    if problem is not None:
        raise LedgerError(_access_message(path, problem))


def _access_message(path: Path, problem: str) -> str:
    keep = (" Do not move the ledger aside: it is intact, and without it the next sync would re-send every record."
            if path.is_file() else "")
    return f"cannot write ledger {path}: {problem}. Fix: {WRITE_ACCESS_FIX}.{keep}"


def _is_access_error(exc: sqlite3.OperationalError) -> bool:
    """SQLite's words for a file or folder it may not write (read-only mount, permissions)."""
    text = str(exc).lower()
    return "readonly" in text or "read-only" in text or "unable to open" in text


def _corrupt_message(path: Path, exc: sqlite3.DatabaseError) -> str:
    return (f"ledger {path} is unreadable or corrupt ({exc}). Recovery: move it aside (mv {path} {path}.broken) "
            "and run sync again; writes are conditional on business identifiers, so a full re-send creates no "
            "duplicates.")


def _write_failure(path: Path, exc: sqlite3.OperationalError) -> str:
    text = str(exc)
    if "full" in text or "disk" in text:
        return (f"cannot write ledger {path}: the disk is full. Nothing was marked as sent that the server did not "
                "confirm; free space and run sync again (it re-sends the unconfirmed records, without duplicates).")
    if "locked" in text:
        return f"ledger {path} is locked by another process ({text})"
    if _is_access_error(exc):
        return _access_message(path, text)
    return f"cannot write ledger {path}: {text}"

