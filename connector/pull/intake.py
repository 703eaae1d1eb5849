"""The intake file: clinic referrals in the program's own enrollment columns. It holds PHI (name, phone, MRN),
so it is created 0600 (0640 with ``output.group_readable``), never logged, and documented as PHI.

One CSV file per pull that found new referrals, ``intake-<UTC time>.csv`` in the intake folder. The folder is also
an index of what was delivered: a referral whose Task id is already in one of its files is never written again,
even when the ledger is lost.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import TextIO

from connector.files import make_folder, open_new
from connector.pull.inbound import InboundReferral
from connector.read.profile import Profile

# The template's enrollment fields that an intake row fills (the program completes the others).
ENROLLMENT_FIELDS = ("enrollment_id", "participant_id", "mrn", "start_date", "status", "supporter_id")
# The source field that ties an enrollment to the clinic referral it answers (docs/source-model.md).
REFERRAL_FIELD = "clinic_referral"
# What the program needs to reach the person and to know why they were referred.
EXTRA_COLUMNS = ("referral_date", "referral_reason", "referred_service", "referring_clinician",
                 "given_name", "family_name", "phone", "preferred_language")
INTAKE_GLOB = "intake-*.csv"


def intake_columns(profile: Profile | None) -> dict[str, str]:
    """Source field -> column name, as the program's profile names its enrollment columns (the template's names
    where the profile reads a field from one plain column, else the field's own name)."""
    spec = profile.records.get("enrollment") if profile else None  # type: ignore[call-overload]
    columns: dict[str, str] = {}
    for field in (*ENROLLMENT_FIELDS, REFERRAL_FIELD):
        fspec = spec.fields.get(field) if spec else None
        columns[field] = fspec.column if fspec is not None and fspec.column else field
    return columns


def intake_row(referral: InboundReferral, columns: Mapping[str, str]) -> dict[str, str]:
    """One intake row: the enrollment columns the program fills later are left empty."""
    row = {column: "" for column in columns.values()}
    row[columns["mrn"]] = referral.mrn
    row[columns["status"]] = "referred"
    row[columns[REFERRAL_FIELD]] = referral.task_id
    row.update(referral_date=referral.referral_date, referral_reason=referral.reason,
               referred_service=referral.service, referring_clinician=referral.referring_clinician,
               given_name=referral.given_name, family_name=referral.family_name, phone=referral.phone,
               preferred_language=referral.language)
    return row


def delivered_task_ids(folder: Path, referral_column: str) -> set[str]:
    """Task ids already in the folder's intake files (the index that survives a lost ledger)."""
    found: set[str] = set()
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob(INTAKE_GLOB)):
        with path.open(encoding="utf-8", newline="") as handle:
            for row in csv.DictReader(handle):
                if row.get(referral_column):
                    found.add(row[referral_column])
    return found


class IntakeFile:
    """An intake file opened lazily on the first row; every row is flushed to disk before the Task is touched."""

    def __init__(self, folder: Path, columns: Mapping[str, str], *, started: datetime, mode: int) -> None:
        self.folder = folder
        self.columns = dict(columns)
        self.path = folder / f"intake-{started.strftime('%Y%m%dT%H%M%S%fZ')}.csv"
        self.mode = mode
        self.rows = 0
        self._handle: TextIO | None = None
        self._writer: csv.DictWriter[str] | None = None

    def write(self, referral: InboundReferral) -> None:
        """Append one referral and make it durable (flush + fsync)."""
        if self._writer is None:
            make_folder(self.folder, self.mode)
            self._handle = open_new(self.path, self.mode, newline="")
            self._writer = csv.DictWriter(self._handle, fieldnames=[*self.columns.values(), *EXTRA_COLUMNS])
            self._writer.writeheader()
        assert self._handle is not None
        self._writer.writerow(intake_row(referral, self.columns))
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.rows += 1

    def close(self) -> None:
        """Close the file (nothing to do when no row was written)."""
        if self._handle is not None:
            self._handle.close()


def write_rows(path: Path, rows: Iterable[Mapping[str, object]], fieldnames: list[str], mode: int) -> None:
    """A small CSV report (created with ``mode``)."""
    make_folder(path.parent, mode)
    with open_new(path, mode, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
