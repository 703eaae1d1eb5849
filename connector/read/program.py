"""Read a program's input files through its profile into a staging store, and report what happened.

This is the "read" stage of read -> map -> plan -> write: files are matched to record kinds by the
profile's globs, rows are routed by `where` filters, converted by :mod:`connector.read.convert`, and staged.
"""

from __future__ import annotations

import csv
import fnmatch
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from connector.errors import InputError, ProfileError
from connector.files import PRIVATE_FILE_MODE, make_folder, open_new
from connector.model import RecordKind
from connector.read.cache import ReadCache, row_digest
from connector.read.columns import HeaderMatcher, missing_note, nested_paths, profile_columns
from connector.read.convert import RowConverter, RowRejected
from connector.read.formats import (
    DEFAULT_LIMITS,
    SUPPORTED_SUFFIXES,
    RawRow,
    ReadLimits,
    read_rows,
    sheet_names,
)
from connector.read.profile import Profile, RecordSpec
from connector.read.staging import Staging
from connector.read.values import has_path, key_paths

_MAX_SUGGESTION_NAMES = 2000  # key paths kept per file to suggest a close name from (bounded memory)

NO_KIND = "(no kind)"


@dataclass
class ReadReport:
    """Counts and notes from reading one program's inputs. read = accepted + rejected, per kind."""

    files: list[str] = field(default_factory=list)
    read: Counter[str] = field(default_factory=Counter)
    accepted: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    blank_rows: int = 0
    warnings: list[str] = field(default_factory=list)
    # The input's shape, for the shape guard (column names only, never values): per kind, the profile's
    # columns it reads, and those of them that some file of the kind has.
    mapped_columns: dict[str, set[str]] = field(default_factory=dict)
    present_columns: dict[str, set[str]] = field(default_factory=dict)
    # resubmitted copies left out because a later copy was kept (profile `duplicates: {keep: latest}`)
    superseded: dict[str, int] = field(default_factory=dict)
    cached: int = 0  # rows staged from the read cache, unconverted (connector.read.cache)

    @property
    def total_read(self) -> int:
        return sum(self.read.values())

    @property
    def total_rejected(self) -> int:
        return sum(self.rejected.values())

    def balanced(self) -> bool:
        """True when every read row is accounted for as accepted or rejected."""
        kinds = set(self.read) | set(self.accepted) | set(self.rejected)
        return all(self.read[k] == self.accepted.get(k, 0) + self.rejected.get(k, 0) + self.superseded.get(k, 0)
                   for k in kinds)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        kinds = sorted(set(self.read) | set(self.accepted) | set(self.rejected))
        return {
            "files": self.files,
            "kinds": {k: {"read": self.read[k], "accepted": self.accepted.get(k, 0),
                          "rejected": self.rejected.get(k, 0)} for k in kinds},
            "total": {"read": self.total_read, "accepted": sum(self.accepted.values()),
                      "rejected": self.total_rejected},
            "blank_rows": self.blank_rows,
            "superseded": self.superseded,
            "warnings": self.warnings,
        }


def expand_inputs(inputs: Iterable[Path]) -> list[Path]:
    """Files given directly, plus supported files inside given folders (sorted, non-recursive)."""
    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"{path}: input not found")
    unique: dict[Path, Path] = {}  # a file given twice (itself and its folder) is read once
    for path in files:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def read_program(profile: Profile, inputs: Iterable[Path], staging: Staging,
                 limits: ReadLimits = DEFAULT_LIMITS, cache: ReadCache | None = None) -> ReadReport:
    """Read every input into ``staging``; reject bad rows with reasons; return the counts. A file over
    ``limits`` raises InputError naming it. With a ``cache``, rows it holds are staged without converting them,
    and every staged row carries its digest (so that staging can become the next run's cache)."""
    report = ReadReport()
    stager = _Stager({kind: RowConverter(profile, kind) for kind in profile.records}, staging, cache)
    report.mapped_columns = {kind.value: profile_columns(spec) for kind, spec in profile.records.items()}
    report.present_columns = {kind.value: set() for kind in profile.records}
    files = expand_inputs(inputs)
    # Reports locate rows by file name; same-named files (a/contacts.csv, b/contacts.csv) are named by their
    # path instead, so their rows stay apart in the report and in the counts.
    clashing = {name for name, n in Counter(p.name for p in files).items() if n > 1}
    for path in files:
        kinds = [k for k, spec in profile.records.items() if _matches(path, spec)]
        if not kinds:
            report.warnings.append(f"{path.name}: no record kind of profile {profile.name!r} reads this file; skipped")
            continue
        shown = str(path) if path.name in clashing else None
        report.files.append(shown or path.name)
        if path.suffix.lower() in (".xlsx", ".xlsm"):
            kinds = _kinds_with_sheets(path, kinds, profile, report, limits)
        for group in _groups(path, kinds, profile):
            _read_group(path, group, profile, stager, staging, report, shown, limits)
    stager.flush()
    report.cached = stager.cached
    staging.finalize(keep_latest={kind.value for kind, spec in profile.records.items() if spec.duplicates})
    report.accepted = staging.counts()
    report.rejected = staging.rejected_rows()
    report.superseded = staging.superseded_counts()
    report.warnings.extend(str(item) for item in staging.superseded)
    return report


def _matches(path: Path, spec: RecordSpec) -> bool:
    return any(fnmatch.fnmatch(path.name, pattern) for pattern in spec.source.files)


def _kinds_with_sheets(path: Path, kinds: list[RecordKind], profile: Profile, report: ReadReport,
                       limits: ReadLimits) -> list[RecordKind]:
    """A workbook may leave out sheets (a program with no referrals): say so, and read the rest."""
    present = set(sheet_names(path, limits))
    kept = []
    for kind in kinds:
        sheet = profile.records[kind].source.sheet
        if sheet in present:
            kept.append(kind)
        else:
            report.warnings.append(f"{path.name}: no sheet {sheet!r}, so no {kind.value} records were read from it")
    return kept


def _groups(path: Path, kinds: list[RecordKind], profile: Profile) -> list[list[RecordKind]]:
    """Kinds that read the same rows (same sheet / JSON path) form one group, so the rows are read once."""
    by_place: dict[tuple[str | None, str | None], list[RecordKind]] = {}
    for kind in kinds:
        source = profile.records[kind].source
        by_place.setdefault((source.sheet, source.json_path), []).append(kind)
    groups = list(by_place.values())
    for group in groups:
        if len(group) > 1 and any(profile.records[k].source.where is None for k in group):
            names = ", ".join(k.value for k in group)
            raise ProfileError(f"{path.name}: kinds {names} read the same rows; give each a `where` filter")
    return groups


def _read_group(
    path: Path,
    group: list[RecordKind],
    profile: Profile,
    stager: _Stager,
    staging: Staging,
    report: ReadReport,
    shown: str | None = None,
    limits: ReadLimits = DEFAULT_LIMITS,
) -> None:
    source = profile.records[group[0]].source
    missing_reported: set[RecordKind] = set()
    matcher = HeaderMatcher(set().union(*(report.mapped_columns[k.value] for k in group)))
    headers: tuple[str, ...] | None = None
    renames: dict[str, str] = {}
    # nested JSON paths no record of the file has had yet -> what reads them; warned about at the end of file
    unseen: dict[str, str] = {}
    for member in group:
        unseen.update(nested_paths(member.value, profile.records[member]))
    read_paths = set(unseen)  # never suggested for a mistyped one: they are another field's
    names_seen: set[str] = set()
    for row in read_rows(path, sheet=source.sheet, json_path=source.json_path, limits=limits):
        if shown is not None:
            row = replace(row, location=replace(row.location, file=shown))
        keys = tuple(row.values)
        if keys != headers:  # once per file for CSV and Excel; JSON records may each have their own keys
            headers, renames = keys, matcher.renames(keys, path.name)
            present = matcher.present(renames.get(k, k) for k in keys)
            shaped: set[RecordKind] = set()  # kinds whose present columns these headers were added to
        if renames:
            row = replace(row, values={renames.get(k, k): v for k, v in row.values.items()})
        if row.is_blank():
            report.blank_rows += 1
            continue
        if unseen:
            for found in [p for p in unseen if has_path(row.values, p)]:
                del unseen[found]
            if len(names_seen) < _MAX_SUGGESTION_NAMES:
                names_seen |= key_paths(row.values)
        kind = _route(row, group, profile)
        if kind is None:
            report.read[NO_KIND] += 1
            staging.reject(row.location, NO_KIND, "(row)", "", "the row matches no record kind in the profile")
            continue
        report.read[kind.value] += 1
        if kind not in shaped:
            shaped.add(kind)
            report.present_columns[kind.value].update(present & report.mapped_columns[kind.value])
        if kind not in missing_reported and row.values:
            missing_reported.add(kind)
            for field_name, column in stager.converters[kind].missing_columns(set(row.values)).items():
                report.warnings.append(
                    missing_note(path.name, column, f"{kind.value}.{field_name}",
                                 set(row.values) - report.mapped_columns[kind.value], path=False))
        stager.stage(row, kind)
    if headers is not None:  # only files that had rows: an empty file says nothing about paths
        for nested, reader in unseen.items():
            report.warnings.append(missing_note(path.name, nested, reader, names_seen - read_paths, path=True))


class _Stager:
    """Converts and stages rows; with a usable read cache, in batches (in input order), and rows the cache holds
    are staged from it without converting them."""

    BATCH = 500

    def __init__(self, converters: dict[RecordKind, RowConverter], staging: Staging, cache: ReadCache | None) -> None:
        self.converters = converters
        self.staging = staging
        self.digests = cache is not None  # every staged row carries its digest: staging becomes the next cache
        self.cache = cache if cache is not None and cache.usable else None
        if self.cache is not None:
            staging.attach_cache(self.cache.path)
        self.cached = 0  # rows staged from the cache
        self._batch: list[tuple[RawRow, RowConverter, bytes | None]] = []

    def stage(self, row: RawRow, kind: RecordKind) -> None:
        """Stage a row of ``kind`` (or reject it with its problems); with a cache, once its batch is full."""
        converter = self.converters[kind]
        digest = row_digest(kind.value, row.values) if self.digests and not row.error else None
        if self.cache is None:
            self._convert(row, converter, digest)
            return
        self._batch.append((row, converter, digest))
        if len(self._batch) >= self.BATCH:
            self.flush()

    def flush(self) -> None:
        """Stage the batch, in input order."""
        if not self._batch:
            return
        found = self.staging.cached([digest for _, _, digest in self._batch if digest is not None])
        for row, converter, digest in self._batch:
            if digest in found:
                assert digest is not None
                self.staging.add_cached(digest, row.location, converter.received_at(row))
                self.cached += 1
            else:
                self._convert(row, converter, digest)
        self._batch.clear()

    def _convert(self, row: RawRow, converter: RowConverter, digest: bytes | None) -> None:
        try:
            record = converter.convert(row)
        except RowRejected as rejected:
            key = converter.source_key(row)
            for problem in rejected.problems:
                self.staging.reject(row.location, converter.kind.value, problem.field, problem.value, problem.reason,
                                    key)
            return
        self.staging.add(record, row.location, converter.received_at(row), digest)


def _route(row: RawRow, group: list[RecordKind], profile: Profile) -> RecordKind | None:
    if row.error and len(group) > 1:
        return None
    for kind in group:
        if profile.records[kind].source.accepts(row.values):
            return kind
    return None


# -- rejects report ------------------------------------------------------------------------------------

# "row" names the row as people do ("row 46 (line 51)" where a quoted cell spans lines); "line" is the file
# line the row starts on (CSV; empty for other formats), the number an editor jumps to.
REJECT_COLUMNS = ["file", "sheet", "row", "line", "kind", "field", "value", "reason"]


def write_rejects(staging: Staging, out_dir: Path, mode: int = PRIVATE_FILE_MODE) -> tuple[Path, Path, int]:
    """Write rejects.csv and rejects.json into ``out_dir``; return both paths and the number of problems.

    The report quotes rejected values, so its folder and files are created private (``mode``, 0600 default).
    """
    make_folder(out_dir, mode)
    csv_path, json_path = out_dir / "rejects.csv", out_dir / "rejects.json"
    count = 0
    with open_new(csv_path, mode, newline="") as csv_file, open_new(json_path, mode) as js:
        writer = csv.writer(csv_file)
        writer.writerow(REJECT_COLUMNS)
        js.write("[\n")
        for reject in staging.rejects():
            row = {
                "file": reject.file,
                "sheet": reject.sheet or "",
                "row": reject.where,
                "line": reject.line,
                "kind": reject.kind,
                "field": reject.field,
                "value": reject.value,
                "reason": reject.reason,
            }
            writer.writerow(["" if row[c] is None else _csv_safe(str(row[c])) for c in REJECT_COLUMNS])
            js.write((",\n" if count else "") + json.dumps(row, ensure_ascii=False))
            count += 1
        js.write("\n]\n")
    return csv_path, json_path, count


def _csv_safe(text: str) -> str:
    """Neutralise spreadsheet formulas (CSV injection) in report cells."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
