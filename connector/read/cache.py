"""The read cache: the last sync's staging file, kept next to the ledger, so that an unchanged row is staged
again without being converted (issue 15: a re-sync's cost follows what changed, not the size of the input).

Each staged row carries a digest of its raw values (after column renames) and its record kind. A row whose
digest is in the cache is staged from the cached record; any other row is converted as usual. The cache is
keyed by a fingerprint of peersync's code and the profile (code tables, options): any change to either
empties it. It holds exactly the rows the last completed read accepted, so records gone from the input leave
it with the next run. It holds patient data, like the input files: it is created with the ledger's file mode
(0600 by default) and ``[sync] read_cache = false`` removes it. It is never needed: deleting it costs one
slower read.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
from functools import cache
from pathlib import Path
from typing import Any

import orjson

import connector
from connector.read.profile import Profile

log = logging.getLogger(__name__)

CACHE_SUFFIX = ".read-cache.sqlite"
STAGING_SUFFIX = ".staging.sqlite"  # the run's staging, renamed to the cache once the read completed

def cache_path(ledger_path: Path) -> Path:
    """The read cache of the sync that keeps its ledger at ``ledger_path``."""
    return ledger_path.with_name(ledger_path.name + CACHE_SUFFIX)


def run_staging_path(ledger_path: Path) -> Path:
    """Where a sync with a read cache stages its rows (next to the ledger, under the ledger lock)."""
    return ledger_path.with_name(ledger_path.name + STAGING_SUFFIX)


@cache
def _code_digest() -> str:
    """A digest of peersync's own source: a new version, or an edit during development, empties the cache."""
    root = Path(connector.__file__).parent
    digest = hashlib.sha256(connector.__version__.encode())
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def reader_fingerprint(profile: Profile) -> str:
    """What a row's record depends on besides its values: peersync's code and the whole profile."""
    return hashlib.sha256(_code_digest().encode() + profile.model_dump_json().encode()).hexdigest()


def row_digest(kind: str, values: dict[str, Any]) -> bytes | None:
    """A digest of a raw row's values as read for ``kind``; None for values JSON cannot hold."""
    try:
        body = orjson.dumps(values, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return None
    return hashlib.blake2b(kind.encode() + b"\0" + body, digest_size=16).digest()


class ReadCache:
    """The previous run's cache file, when it was written for this fingerprint (checked once, here)."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        """Check the cache at ``path``: ``usable`` when it exists and was written for ``fingerprint``."""
        self.path = path
        self.fingerprint = fingerprint
        self.usable = False
        if not path.is_file():
            return
        try:
            with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
                row = db.execute("SELECT value FROM cache_meta WHERE key='fingerprint'").fetchone()
                db.execute("SELECT digest FROM staged LIMIT 1").fetchall()
        except sqlite3.Error as exc:  # damaged or foreign: read without it, and the run replaces it
            log.warning("read cache %s is unreadable (%s): reading every row", path, exc,
                        extra={"event": "read-cache-unreadable"})
            return
        if row is None or row[0] != fingerprint:
            log.info("read cache is for another profile or peersync version: reading every row",
                     extra={"event": "read-cache-stale"})
            return
        self.usable = True


def keep_as_cache(staging_path: Path, path: Path, fingerprint: str) -> None:
    """Make a completed run's staging file the next run's cache (it has the file mode it was created with)."""
    try:
        with sqlite3.connect(str(staging_path), isolation_level=None) as db:
            db.execute("CREATE INDEX IF NOT EXISTS staged_digest ON staged(digest)")
            db.execute("CREATE TABLE IF NOT EXISTS cache_meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute("INSERT OR REPLACE INTO cache_meta VALUES('fingerprint', ?)", (fingerprint,))
        db.close()
        os.replace(staging_path, path)
    except (OSError, sqlite3.Error) as exc:  # the run is fine without it: the next one reads every row
        log.warning("read cache not kept (%s): the next sync reads every row", exc,
                    extra={"event": "read-cache-not-kept"})
        remove_quietly(staging_path)


def remove_quietly(path: Path) -> None:
    """Remove a cache or staging file if it is there."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc, extra={"event": "read-cache-not-removed"})
