"""The PHI-leak scanner: every name, MRN, birth date, note and identifier value in the demo fixtures, and a search
for them in any text peersync produced (logs, reports, command output, the ledger, the metrics file).

Categories (what a hit means):
  name           a patient's or supporter's given or family name (word match, case-sensitive)
  mrn            a medical record number
  birthdate      a patient's birth date
  participant    a participant id (PT0001: a person's identifier in the program)
  contact-info   a supporter's phone number, e-mail address or NPI
  note           free text: contact notes, goal notes, goals in the participant's own words, referral outcomes
  record-id      a source record id (enrollment, contact, goal...): allowed only where the design keys on it
                 (the ledger, the review queue), never in logs, reports or metrics
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "fixtures" / "demo"
ALL = ("name", "mrn", "birthdate", "participant", "contact-info", "note", "record-id")
PHI = tuple(c for c in ALL if c != "record-id")


@dataclass(frozen=True)
class Hit:
    where: str
    category: str
    token: str
    context: str

    def __str__(self) -> str:
        return f"{self.where}: {self.category} {self.token!r} in ...{self.context}..."


def _rows(name: str) -> list[dict[str, str]]:
    with (DEMO / "template" / name).open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@lru_cache(maxsize=1)
def tokens() -> dict[str, frozenset[str]]:
    """Every sensitive value in the demo fixtures, by category."""
    found: dict[str, set[str]] = {c: set() for c in ALL}
    bundle = json.loads((DEMO / "clinic" / "patients.json").read_text(encoding="utf-8"))
    for entry in bundle["entry"]:
        patient = entry["resource"]
        for name in patient.get("name", []):
            found["name"].update(n for n in [name.get("family", ""), *name.get("given", [])] if n)
        found["mrn"].update(i["value"] for i in patient.get("identifier", []) if i.get("value"))
        if patient.get("birthDate"):
            found["birthdate"].add(patient["birthDate"])
    for row in _rows("supporters.csv"):
        found["name"].update(p for p in f"{row['given_name']} {row['family_name']}".split() if len(p) > 2)
        found["contact-info"].update(v for v in (row["phone"], row["email"], row["npi"]) if v)
        found["record-id"].add(row["staff_id"])
    for row in _rows("enrollments.csv"):
        found["mrn"].update([row["mrn"]] if row["mrn"] else [])
        found["participant"].add(row["participant_id"])
        found["record-id"].add(row["enrollment_id"])
    notes = [(r["notes"], r["contact_id"]) for r in _rows("contacts.csv")] + \
            [(r["note"], r["note_id"]) for r in _rows("goal_notes.csv")] + \
            [(r["goal_in_own_words"], r["goal_id"]) for r in _rows("goals.csv")] + \
            [(r["outcome_notes"], r["referral_id"]) for r in _rows("referrals.csv")] + \
            [("", r["planned_contact_id"]) for r in _rows("planned_contacts.csv")]
    for text, record_id in notes:
        found["record-id"].add(record_id)
        text = text.strip()
        if len(text) >= 12:
            found["note"].add(text)
            found["note"].add(text[:24])  # a cut-off copy is still a leak
    found["record-id"].discard("")
    return {k: frozenset(v) for k, v in found.items()}


@lru_cache(maxsize=8)
def _word_pattern(category: str) -> re.Pattern[str] | None:
    words = sorted(tokens()[category], key=len, reverse=True)
    if not words:
        return None
    return re.compile(r"(?<![\w])(" + "|".join(re.escape(w) for w in words) + r")(?![\w])")


def scan(where: str, text: str, categories: tuple[str, ...] = ALL) -> list[Hit]:
    """Hits of the given categories in ``text`` (word matches for names and ids, substrings for notes)."""
    hits: list[Hit] = []
    for category in categories:
        if category == "note":
            for note in tokens()["note"]:
                at = text.find(note)
                if at >= 0:
                    hits.append(Hit(where, category, note, text[max(0, at - 40):at + len(note) + 40]))
            continue
        pattern = _word_pattern(category)
        if pattern is None:
            continue
        for match in pattern.finditer(text):
            hits.append(Hit(where, category, match.group(1), text[max(0, match.start() - 60):match.end() + 60]))
    return hits


def scan_bytes(where: str, data: bytes, categories: tuple[str, ...] = ALL) -> list[Hit]:
    """Scan binary content (a SQLite file: its text is UTF-8), free pages and all."""
    return scan(where, data.decode("utf-8", errors="replace"), categories)


def scan_values(where: str, text: str, values: dict[str, list[str]]) -> list[Hit]:
    """Hits of values that are not in the fixtures (a test's own simulator: the clinic's names, phones and MRNs,
    a community organization's free text), by category: word matches, and substrings for ``note``."""
    hits: list[Hit] = []
    for category, words in values.items():
        for word in sorted({w for w in words if w}, key=len, reverse=True):
            pattern = re.escape(word) if category == "note" else r"(?<![\w])" + re.escape(word) + r"(?![\w])"
            for match in re.finditer(pattern, text):
                hits.append(Hit(where, category, word, text[max(0, match.start() - 60):match.end() + 60]))
    return hits
