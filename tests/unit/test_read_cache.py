"""The read cache (connector.read.cache): a re-read stages exactly what a full read stages, converting only
the rows that changed; a different profile, a damaged cache or an interrupted read never changes the result."""

from __future__ import annotations

import csv
import logging
import shutil
import stat
from pathlib import Path

import pytest

from connector.read.cache import ReadCache, cache_path, keep_as_cache, reader_fingerprint, run_staging_path
from connector.read.profile import Profile, load_profile
from connector.read.program import ReadReport, read_program
from connector.read.staging import Staging
from connector.run import SyncOptions, run_staging

DEMO = Path(__file__).resolve().parents[2] / "fixtures" / "demo" / "template"
PROFILE = load_profile("peersync-template")


def staged_and_rejected(staging: Staging) -> tuple[list[tuple], list[tuple]]:
    """What a read produced, location included, without the run-specific seq numbers."""
    staged = staging.db.execute(
        "SELECT kind, key, participant, hash, body, file, sheet, unit, row, line, received FROM staged "
        "ORDER BY seq").fetchall()
    rejected = staging.db.execute(
        "SELECT file, sheet, unit, row, line, kind, key, field, value, reason FROM rejects ORDER BY seq").fetchall()
    return staged, rejected


def read(inputs: Path, tmp: Path, name: str, cache: ReadCache | None,
         profile: Profile = PROFILE) -> tuple[ReadReport, list[tuple], list[tuple]]:
    """Read ``inputs`` into a new staging file ``tmp/name`` (closed afterwards, left in place)."""
    with Staging(tmp / name) as staging:
        report = read_program(profile, [inputs], staging, cache=cache)
        return (report, *staged_and_rejected(staging))


def change_first_note(folder: Path) -> None:
    path = folder / "contacts.csv"
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    notes = rows[0].index("notes")
    rows[1][notes] += " (updated)"
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "inputs"
    shutil.copytree(DEMO, folder)
    (folder / "summary.json").unlink()
    return folder


def test_a_read_with_the_cache_stages_what_a_full_read_stages(inputs: Path, tmp_path: Path) -> None:
    full, staged, rejected = read(inputs, tmp_path, "full.sqlite", None)
    first, *_ = read(inputs, tmp_path, "first.sqlite", ReadCache(tmp_path / "none.sqlite", "x"))
    keep_as_cache(tmp_path / "first.sqlite", tmp_path / "cache.sqlite", reader_fingerprint(PROFILE))
    again, staged_again, rejected_again = read(inputs, tmp_path, "again.sqlite",
                                               ReadCache(tmp_path / "cache.sqlite", reader_fingerprint(PROFILE)))
    assert full.total_rejected > 0, "the demo has bad rows: they must be rejected again, never taken from the cache"
    assert (staged_again, rejected_again) == (staged, rejected)
    assert first.cached == 0 and again.cached == sum(full.accepted.values()) == len(staged)
    assert again.as_dict() == full.as_dict()


def test_only_changed_rows_are_converted_and_they_carry_their_new_values(inputs: Path, tmp_path: Path) -> None:
    fingerprint = reader_fingerprint(PROFILE)
    read(inputs, tmp_path, "first.sqlite", ReadCache(tmp_path / "none.sqlite", fingerprint))
    keep_as_cache(tmp_path / "first.sqlite", tmp_path / "cache.sqlite", fingerprint)
    change_first_note(inputs)
    _, staged, rejected = read(inputs, tmp_path, "full.sqlite", None)
    again, staged_again, rejected_again = read(inputs, tmp_path, "again.sqlite",
                                               ReadCache(tmp_path / "cache.sqlite", fingerprint))
    assert (staged_again, rejected_again) == (staged, rejected)
    assert again.cached == len(staged) - 1
    assert any("(updated)" in row[4] for row in staged_again)


def test_a_changed_profile_empties_the_cache(inputs: Path, tmp_path: Path) -> None:
    fingerprint = reader_fingerprint(PROFILE)
    read(inputs, tmp_path, "first.sqlite", ReadCache(tmp_path / "none.sqlite", fingerprint))
    keep_as_cache(tmp_path / "first.sqlite", tmp_path / "cache.sqlite", fingerprint)
    changed = PROFILE.model_copy(update={"description": PROFILE.description + " (edited)"})
    assert reader_fingerprint(changed) != fingerprint
    changed_cache = ReadCache(tmp_path / "cache.sqlite", reader_fingerprint(changed))
    again, *_ = read(inputs, tmp_path, "again.sqlite", changed_cache, profile=changed)
    assert again.cached == 0


def test_a_damaged_cache_is_read_around(inputs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, staged, rejected = read(inputs, tmp_path, "full.sqlite", None)
    (tmp_path / "cache.sqlite").write_bytes(b"not a database" * 100)
    with caplog.at_level(logging.WARNING):
        again, staged_again, rejected_again = read(inputs, tmp_path, "again.sqlite",
                                                   ReadCache(tmp_path / "cache.sqlite", reader_fingerprint(PROFILE)))
    assert (again.cached, staged_again, rejected_again) == (0, staged, rejected)
    assert "read cache" in caplog.text and "reading every row" in caplog.text


def options(inputs: Path, tmp_path: Path, *, read_cache: bool = True) -> SyncOptions:
    return SyncOptions(profile=PROFILE, inputs=[inputs], ledger_path=tmp_path / "state" / "ledger.sqlite",
                       ctx=None, rejects_dir=tmp_path / "rejects", read_cache=read_cache)  # type: ignore[arg-type]


def test_a_completed_read_becomes_the_next_runs_cache_created_private(inputs: Path, tmp_path: Path) -> None:
    opts = options(inputs, tmp_path)
    (tmp_path / "state").mkdir()
    for expected_cached in (0, 1):
        with run_staging(opts) as (staging, cache):
            assert cache is not None
            report = read_program(opts.profile, opts.inputs, staging, cache=cache)
            assert (report.cached > 0) == bool(expected_cached)
            assert stat.S_IMODE(run_staging_path(opts.ledger_path).stat().st_mode) == 0o600
    assert stat.S_IMODE(cache_path(opts.ledger_path).stat().st_mode) == 0o600
    assert not run_staging_path(opts.ledger_path).exists()


def test_an_interrupted_read_keeps_the_last_cache_and_leaves_no_staging(inputs: Path, tmp_path: Path) -> None:
    opts = options(inputs, tmp_path)
    (tmp_path / "state").mkdir()
    with run_staging(opts) as (staging, cache):
        read_program(opts.profile, opts.inputs, staging, cache=cache)
    kept = cache_path(opts.ledger_path).read_bytes()
    with pytest.raises(KeyboardInterrupt), run_staging(opts) as (staging, cache):
        raise KeyboardInterrupt
    assert cache_path(opts.ledger_path).read_bytes() == kept
    assert not run_staging_path(opts.ledger_path).exists()


def test_turning_the_cache_off_removes_it(inputs: Path, tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    with run_staging(options(inputs, tmp_path)) as (staging, cache):
        read_program(PROFILE, [inputs], staging, cache=cache)
    assert cache_path(tmp_path / "state" / "ledger.sqlite").exists()
    with run_staging(options(inputs, tmp_path, read_cache=False)) as (staging, cache):
        assert cache is None
        read_program(PROFILE, [inputs], staging)
    assert list((tmp_path / "state").iterdir()) == []
