"""The seeded synthetic program generator (tests.demogen) and the profiles that read its output."""

from __future__ import annotations

import csv
import filecmp
import json
import tracemalloc
import zipfile
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import pytest

from connector.model import (
    Behavior,
    ContactMode,
    ContactOutcome,
    ContactSetting,
    EssentialElement,
    RecordKind,
    SupportType,
    TargetMeasure,
)
from connector.read.convert import RowConverter
from connector.read.formats.base import RawRow, RowLocation
from connector.read.profile import load_profile
from connector.read.program import read_program
from connector.read.staging import Staging
from tests import demogen as demo
from tests.demogen import (
    MRN_SYSTEM,
    TEMPLATE_ALIASES,
    TEMPLATE_COLUMNS,
    TEMPLATE_FILES,
    TEMPLATE_SHEETS,
    GenerationSummary,
    generate_program,
    write_blank_template,
)

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fixtures" / "demo"
BLANK_TEMPLATE = REPO / "mappings" / "peersync-template" / "peersync-template.xlsx"
PROFILES = {"template": "peersync-template", "xlsx": "peersync-template", "redcap": "redcap-example"}


def _read(fmt: str, folder: Path, staging: Staging):
    return read_program(load_profile(PROFILES[fmt]), [folder], staging)


@pytest.fixture(scope="module")
def default_demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, GenerationSummary]]:
    """The default demo in all three formats (same seed)."""
    root = tmp_path_factory.mktemp("demo")
    return {fmt: (root / fmt, generate_program(root / fmt, fmt=fmt)) for fmt in ("template", "redcap", "xlsx")}


@pytest.fixture(scope="module")
def template_records(default_demo) -> dict[RecordKind, list]:
    folder, _ = default_demo["template"]
    with Staging() as staging:
        _read("template", folder, staging)
        return {kind: list(staging.records(kind)) for kind in RecordKind}


# -- the template's shape --------------------------------------------------------------------------------------


def test_template_columns_files_and_sheets_match_the_profile() -> None:
    profile = load_profile("peersync-template")
    for kind, spec in profile.records.items():
        used = list(dict.fromkeys(c for f in spec.fields.values() for c in f.columns_used()))
        assert TEMPLATE_COLUMNS[kind.value] == used, kind
        assert spec.source.sheet == TEMPLATE_SHEETS[kind.value]
        assert any(Path(TEMPLATE_FILES[kind.value]).match(g) for g in spec.source.files)


def test_alias_spellings_are_in_the_template_code_tables() -> None:
    profile = load_profile("peersync-template")
    tables = {"mode": "modes", "outcome": "outcomes", "setting": "settings", "support_types": "support_types"}
    for field, by_code in TEMPLATE_ALIASES.items():
        table = {s.casefold(): code
                 for code, spellings in profile.code_tables[tables[field]].items() for s in spellings}
        for code, spellings in by_code.items():
            for spelling in spellings:
                assert table.get(spelling.casefold()) == code, (field, spelling)


# -- determinism and streaming -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["template", "redcap", "xlsx"])
def test_same_seed_gives_byte_identical_files(tmp_path: Path, fmt: str) -> None:
    first = generate_program(tmp_path / "a", fmt=fmt, participants=12, months=3)
    second = generate_program(tmp_path / "b", fmt=fmt, participants=12, months=3)
    assert first == second
    assert first.files and all(filecmp.cmp(tmp_path / "a" / f, tmp_path / "b" / f, shallow=False)
                               for f in first.files)
    generate_program(tmp_path / "c", fmt=fmt, participants=12, months=3, seed=7)
    assert any(not filecmp.cmp(tmp_path / "a" / f, tmp_path / "c" / f, shallow=False) for f in first.files)


def _peak_bytes(out: Path, contacts: int) -> tuple[int, GenerationSummary]:
    tracemalloc.start()
    try:
        summary = generate_program(out, contacts=contacts, bad_rows=False, participants=20, months=3)
        return tracemalloc.get_traced_memory()[1], summary
    finally:
        tracemalloc.stop()


def test_contacts_are_streamed_to_disk(tmp_path: Path) -> None:
    small_peak, small = _peak_bytes(tmp_path / "small", 2_000)
    large_peak, large = _peak_bytes(tmp_path / "large", 20_000)
    assert small.rows["contact"] == small.counts["contact"] == 2_000
    assert large.rows["contact"] == large.counts["contact"] == 20_000
    assert large.expected_rejects == 0
    # Ten times the contacts, about the same peak: nothing holds the contact rows.
    assert large_peak < small_peak * 1.3 + 256 * 1024, (small_peak, large_peak)
    with (tmp_path / "large" / "contacts.csv").open(encoding="utf-8", newline="") as handle:
        assert sum(1 for _ in csv.reader(handle)) == 20_001


def test_contacts_override_small_program(tmp_path: Path) -> None:
    summary = generate_program(tmp_path, participants=3, supporters=2, months=2, contacts=5)
    assert summary.counts["contact"] == 5
    with Staging() as staging:
        report = _read("template", tmp_path, staging)
    assert report.accepted == {k: v for k, v in summary.counts.items() if v}
    assert report.total_rejected == summary.expected_rejects


# -- the default demo's content --------------------------------------------------------------------------------


def test_default_demo_covers_every_code(template_records) -> None:
    contacts = template_records[RecordKind.CONTACT]
    goals = template_records[RecordKind.GOAL]
    assert {c.mode for c in contacts} == set(ContactMode)
    assert {c.setting for c in contacts if c.setting} == set(ContactSetting)
    assert {c.outcome for c in contacts} == set(ContactOutcome)
    assert {s for c in contacts for s in c.support_types} == set(SupportType) - {SupportType.OTHER}
    assert {e for c in contacts for e in c.essential_elements} == set(EssentialElement)
    assert {g.behavior for g in goals} == set(Behavior)
    assert {g.target.measure for g in goals if g.target} == set(TargetMeasure)
    assert 80 <= len(goals) <= 100
    assert sum(1 for g in goals if g.target) >= 10 and sum(1 for g in goals if not g.target) >= 40


def test_default_demo_is_realistic(default_demo, template_records) -> None:
    _, summary = default_demo["template"]
    contacts = template_records[RecordKind.CONTACT]
    enrollments = template_records[RecordKind.ENROLLMENT]
    assert len(enrollments) == 40 and len(template_records[RecordKind.SUPPORTER]) == 6
    assert Counter(e.status.value for e in enrollments)["active"] >= 30
    assert {e.status.value for e in enrollments} >= {"completed", "withdrawn"}
    assert len({e.start_date for e in enrollments}) >= 30
    # Mostly completed contacts; a few per participant per month.
    outcomes = Counter(c.outcome.value for c in contacts)
    assert outcomes["completed"] > 0.8 * len(contacts) and outcomes["not-reached"] and outcomes["cancelled"]
    assert 400 <= len(contacts) <= 800
    assert all(1 <= len(c.support_types) <= 3 for c in contacts if c.outcome is ContactOutcome.COMPLETED)
    # Group sessions: one id, one date-time, mode group, several participants.
    sessions: dict[str, set] = {}
    for c in contacts:
        if c.group_session_id:
            assert c.mode is ContactMode.GROUP
            sessions.setdefault(c.group_session_id, set()).add((c.occurred_at, c.enrollment_id))
    assert len(sessions) == summary.group_sessions >= 4
    assert all(len({when for when, _ in s}) == 1 and len(s) >= 2 for s in sessions.values())
    assert sum(1 for c in contacts if c.planned_contact_id) == summary.contacts_fulfilling_plans > 0
    assert sum(1 for c in contacts if c.void) == summary.voided_contacts >= 2
    assert sum(1 for c in contacts if c.goal_ids) > 50
    assert any(c.original_text for c in contacts)  # free-text setting kept as "other"
    assert any("\n" in (c.notes or "") for c in contacts) and any('"' in (c.notes or "") for c in contacts)
    referrals = template_records[RecordKind.REFERRAL]
    assert 25 <= len(referrals) <= 60 and len({r.need for r in referrals}) >= 6
    assert {p.status.value for p in template_records[RecordKind.PLANNED_CONTACT]} == {"planned", "done", "dropped"}
    assert template_records[RecordKind.GOAL_NOTE]
    # Ids are ids: never an MRN.
    mrns = {e.mrn for e in enrollments}
    assert all(m.startswith("MRN") and len(m) == 10 and m[3:].isdigit() for m in mrns)
    ids = [e.enrollment_id for e in enrollments] + [c.contact_id for c in contacts]
    assert not any(m in i or m[3:] in i for m in mrns for i in ids)


def test_template_rows_use_offsets_and_alias_spellings(default_demo) -> None:
    folder, _ = default_demo["template"]
    text = (folder / "contacts.csv").read_text(encoding="utf-8")
    assert "-06:00," in text and "-05:00," in text
    for spelling in (",Tel,", ",en persona,", ",no answer,"):
        assert spelling in text


# -- reading the output back through the profiles ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["template", "redcap", "xlsx"])
def test_read_program_accepts_and_rejects_exactly_as_expected(default_demo, fmt: str) -> None:
    folder, summary = default_demo[fmt]
    assert summary.expected_rejects == 8 and summary.expected_rejects_by_kind == {"enrollment": 1, "goal": 1,
                                                                                "contact": 6}
    with Staging() as staging:
        report = _read(fmt, folder, staging)
        rejected_rows = {(r.file if not r.sheet else f"{r.file}[{r.sheet}]", r.row) for r in staging.rejects()}
    assert report.accepted == summary.counts
    assert dict(report.read) == summary.rows
    assert report.total_rejected == summary.expected_rejects
    assert report.rejected == summary.expected_rejects_by_kind
    assert report.balanced() and report.total_read == sum(report.accepted.values()) + report.total_rejected
    assert rejected_rows == {(b.file, b.row) for b in summary.bad_rows}
    assert report.warnings == [f"summary.json: no record kind of profile {PROFILES[fmt]!r} reads this file; skipped"]


def test_all_formats_carry_the_same_program(default_demo) -> None:
    def projection(fmt: str) -> dict[str, Counter]:
        folder, _ = default_demo[fmt]
        with Staging() as staging:
            _read(fmt, folder, staging)
            contacts = Counter(
                (c.enrollment_id, c.occurred_at, c.mode, c.setting, c.outcome, c.duration_minutes,
                 frozenset(c.support_types), frozenset(c.essential_elements), len(c.goal_ids), c.notes,
                 c.group_session_id, c.planned_contact_id is not None, c.void)
                for c in staging.records(RecordKind.CONTACT))
            goals = Counter((g.enrollment_id, g.description, g.behavior, g.target, g.start_date, g.due_date,
                             g.lifecycle_status, g.achievement_status, g.set_by)
                            for g in staging.records(RecordKind.GOAL))
            enrollments = Counter(e.model_dump_json() for e in staging.records(RecordKind.ENROLLMENT))
            referrals = Counter((r.enrollment_id, r.resource_name, r.need, r.referred_on, r.status)
                                for r in staging.records(RecordKind.REFERRAL))
            plans = Counter((p.enrollment_id, p.due_at, p.mode, p.status)
                            for p in staging.records(RecordKind.PLANNED_CONTACT))
        return {"contacts": contacts, "goals": goals, "enrollments": enrollments, "referrals": referrals,
                "plans": plans}

    template = projection("template")
    assert projection("redcap") == template
    assert projection("xlsx") == template


def test_without_bad_rows_nothing_is_rejected(tmp_path: Path) -> None:
    for fmt in ("template", "redcap"):
        summary = generate_program(tmp_path / fmt, fmt=fmt, bad_rows=False, participants=15, months=4)
        assert summary.expected_rejects == 0 and not summary.bad_rows
        with Staging() as staging:
            report = _read(fmt, tmp_path / fmt, staging)
        assert report.total_rejected == 0 and report.accepted == summary.counts


def test_redcap_profile_reads_label_exports() -> None:
    """REDCap can export choice labels (English or Spanish) instead of codes, and Checked/Unchecked boxes."""
    profile = load_profile("redcap-example")
    values = {c: "" for c in demo.REDCAP_COLUMNS}
    values.update({
        "record_id": "E0001", "redcap_repeat_instrument": "Peer Contact", "redcap_repeat_instance": "4",
        "contact_datetime": "2026-03-04 10:30", "contact_staff": "S001", "contact_mode": "En persona",
        "contact_setting": "Iglesia", "contact_outcome": "No contestó", "support___6": "Checked",
        "support___1": "Unchecked", "contact_void": "No", "contact_goal_ids": "E0001-g1, E0001-g2",
        "contact_next_instance": "2",
    })
    record = RowConverter(profile, RecordKind.CONTACT).convert(RawRow(RowLocation("x.csv", 2), values))
    assert (record.contact_id, record.mode.value, record.setting.value, record.outcome.value) == (
        "E0001-c4", "face-to-face", "faith-based", "not-reached")
    assert [s.value for s in record.support_types] == ["outreach"]
    assert [e.value for e in record.essential_elements] == ["ongoing-follow-up-support"]  # element_rules
    assert record.goal_ids == ("E0001-g1", "E0001-g2") and record.planned_contact_id == "E0001-nc2"
    assert record.occurred_at.utcoffset().total_seconds() == -6 * 3600 and not record.void


# -- the clinic's Patients -----------------------------------------------------------------------------------


def test_patients_bundle_has_the_review_cases(default_demo) -> None:
    folder, summary = default_demo["template"]
    bundle = json.loads((folder / "clinic" / "patients.json").read_text(encoding="utf-8"))
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    by_mrn: Counter = Counter()
    for entry in bundle["entry"]:
        patient, request = entry["resource"], entry["request"]
        (identifier,) = patient["identifier"]
        assert identifier["system"] == MRN_SYSTEM and identifier["type"]["coding"][0]["code"] == "MR"
        assert patient["name"] and patient["gender"] and patient["birthDate"]
        assert request["method"] == "PUT"
        if request["url"].startswith("Patient?"):
            query = request["url"].removeprefix("Patient?identifier=")
            assert "|" not in query and ":" not in query  # percent-encoded
            assert unquote(query) == f"{MRN_SYSTEM}|{identifier['value']}"
        else:
            assert request["url"] == f"Patient/{patient['id']}" and patient["id"].startswith("demo-dup-")
        by_mrn[identifier["value"]] += 1
    with Staging() as staging:
        _read("template", folder, staging)
        mrn_of = {e.enrollment_id: e.mrn for e in staging.records(RecordKind.ENROLLMENT)}
    assert len(summary.unmatched_enrollments) == 1 and len(summary.ambiguous_enrollments) == 1
    assert summary.unmatched_enrollments != summary.ambiguous_enrollments
    assert by_mrn[mrn_of[summary.unmatched_enrollments[0]]] == 0
    assert by_mrn[mrn_of[summary.ambiguous_enrollments[0]]] == 2
    others = set(mrn_of) - set(summary.unmatched_enrollments) - set(summary.ambiguous_enrollments)
    assert all(by_mrn[mrn_of[e]] == 1 for e in others)
    assert summary.patients == len(bundle["entry"]) == len(mrn_of) - 1 + 1  # one missing, one extra


def test_patients_bundle_is_valid_fhir(default_demo) -> None:
    bundle_model = pytest.importorskip("fhir.resources.bundle").Bundle
    folder, _ = default_demo["redcap"]
    bundle = bundle_model.model_validate_json((folder / "clinic" / "patients.json").read_bytes())
    assert len(bundle.entry) == 40


def test_summary_json_matches_the_summary(default_demo) -> None:
    folder, summary = default_demo["redcap"]
    assert json.loads((folder / "summary.json").read_text(encoding="utf-8")) == summary.as_dict()
    assert summary.files == ["staff.csv", "PeerSupport_DATA.csv", "clinic/patients.json", "summary.json"]


# -- committed files -------------------------------------------------------------------------------------------


def test_committed_fixtures_match_the_generator(tmp_path: Path) -> None:
    demo.write_demo_fixtures(tmp_path)
    expected = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    # Other files may live next to the demo (e.g. a connector configuration); the generated ones must match.
    stale = [f for f in expected if not (FIXTURES / f).is_file()
             or not filecmp.cmp(tmp_path / f, FIXTURES / f, shallow=False)]
    assert not stale, f"regenerate with `{demo.FIXTURES_CALL}`: {stale}"
    assert sum((FIXTURES / f).stat().st_size for f in expected) < 1_000_000


def test_committed_fixtures_read_as_documented() -> None:
    for fmt in ("template", "redcap"):
        summary = json.loads((FIXTURES / fmt / "summary.json").read_text(encoding="utf-8"))
        with Staging() as staging:
            report = _read(fmt, FIXTURES / fmt, staging)
        assert report.accepted == summary["counts"] and report.total_rejected == summary["expected_rejects"]


def test_blank_template_workbook(tmp_path: Path) -> None:
    from openpyxl import load_workbook

    path = write_blank_template(tmp_path / "blank.xlsx")
    # Compare the workbook parts, not the zip bytes (those depend on the zlib build).
    with zipfile.ZipFile(path) as fresh, zipfile.ZipFile(BLANK_TEMPLATE) as committed:
        assert fresh.namelist() == committed.namelist()
        stale = [n for n in fresh.namelist() if fresh.read(n) != committed.read(n)]
    assert not stale, f"regenerate with `python -m tests.demogen blank-template`: {stale}"
    workbook = load_workbook(path, read_only=True)
    assert workbook.sheetnames == ["Instructions", *TEMPLATE_SHEETS.values()]
    for kind, sheet in TEMPLATE_SHEETS.items():
        rows = list(workbook[sheet].iter_rows(values_only=True))
        assert [list(r) for r in rows] == [TEMPLATE_COLUMNS[kind]]
    instructions = list(workbook["Instructions"].iter_rows(values_only=True))
    listed = {(r[0], r[1]) for r in instructions if r and r[0] in TEMPLATE_SHEETS.values()}
    assert listed == {(TEMPLATE_SHEETS[k], c) for k, cols in TEMPLATE_COLUMNS.items() for c in cols}
    assert any(r[1] == "mode" and "telephone" in (r[5] or "") and "en persona" in (r[6] or "")
               for r in instructions if r and len(r) > 6)
    workbook.close()
    with Staging() as staging:
        report = read_program(load_profile("peersync-template"), [path], staging)
    assert report.total_read == 0 and not report.warnings


def test_code_tables_follow_the_profile_even_when_ids_are_reused() -> None:
    """Regression: ingest cached code tables by id(profile); a freed profile's id was reused by the next one,
    which then read the old profile's tables (REDCap's numeric codes were unknown)."""
    import gc

    from connector.read.convert import _table_key

    loaded = {name: load_profile(name) for name in ("peersync-template", "redcap-example")}
    for i in range(120):  # the old cache failed within a few rounds
        name = "peersync-template" if i % 2 else "redcap-example"
        profile = loaded[name].model_copy()  # a new object, often at a freed one's address
        assert ("1" in (_table_key(profile, "modes") or {})) == (name == "redcap-example"), i
        del profile
        if i % 3 == 0:
            gc.collect()
