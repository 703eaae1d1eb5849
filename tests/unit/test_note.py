"""Clinical-note mode: the pure note renderer and mapper (connector/map/note.py) and how notes are planned."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings

from connector.cli import main
from connector.map import MappingContext
from connector.map.export import write_note_previews
from connector.map.note import (
    CLINICAL_NOTE_CATEGORY,
    NOTE_TYPE,
    group_notes,
    map_note,
    period_of,
    render_note,
    replaced,
)
from connector.map.units import iter_planned_units, map_participant_units, participant_notes
from connector.model import Contact, Enrollment, Goal, GoalNote, GoalTarget, PlannedContact, Referral, Supporter
from connector.plan.ledger import Ledger
from connector.plan.planner import Act, PlannedUnit, compute_plan
from connector.read.profile import load_profile
from connector.read.program import read_program
from connector.read.staging import Staging
from connector.write.changeset import void_bundle
from tests.unit.test_narrative import TEXT, _lines, parsed_div, visible_text

DEMO = Path(__file__).resolve().parents[2] / "fixtures" / "demo" / "template"
CST = timezone(timedelta(hours=-6))
CTX = MappingContext(program_id="demo", program_name="Demo Program", base_url="https://example.org/ps",
                     mrn_system="urn:mrn", timezone="America/Chicago")
ENROLLMENT = Enrollment(enrollment_id="E1", mrn="MRN-1", start_date=date(2025, 1, 6), supporter_id="S1")
SUPPORTER = Supporter(staff_id="S1", given_name="Rosa", family_name="Lopez", title="promotora",
                      title_text="Promotora de salud")


def contact(cid: str, when: datetime, **fields: object) -> Contact:
    return Contact(contact_id=cid, enrollment_id="E1", supporter_id="S1", occurred_at=when, mode="telephone",
                   **fields)  # type: ignore[arg-type]


def notes_of(contacts: list[Contact], kind: str = "month", **records: list) -> list:
    return group_notes(ENROLLMENT, contacts, records.get("goals", []), records.get("referrals", []),
                       records.get("planned", []), {"S1": SUPPORTER}, kind=kind, timezone=CTX.timezone)  # type: ignore[arg-type]


def decoded(resource: dict, content_type_prefix: str) -> str:
    attachment = next(c["attachment"] for c in resource["content"]
                      if c["attachment"]["contentType"].startswith(content_type_prefix))
    return base64.b64decode(attachment["data"]).decode("utf-8")


@pytest.mark.parametrize(("kind", "key", "start", "end"), [
    ("month", "2025-03", "2025-03-01T00:00:00-06:00", "2025-03-31T23:59:59-05:00"),
    ("week", "2025-W10", "2025-03-03T00:00:00-06:00", "2025-03-09T23:59:59-05:00"),
    ("contact", "contact-C1", "2025-03-04T11:00:00-06:00", "2025-03-04T11:00:00-06:00"),
])
def test_periods_are_calendar_periods_in_the_program_time_zone(kind: str, key: str, start: str, end: str) -> None:
    period = period_of(contact("C1", datetime(2025, 3, 4, 11, tzinfo=CST)), kind, "America/Chicago")  # type: ignore[arg-type]
    assert (period.key, period.start.isoformat(), period.end.isoformat()) == (key, start, end)


def test_a_contact_late_on_the_last_day_belongs_to_that_day_in_the_program_zone() -> None:
    # 23:30 in Chicago on 31 March is already 1 April in UTC
    late = contact("C1", datetime(2025, 4, 1, 4, 30, tzinfo=UTC))
    assert period_of(late, "month", "America/Chicago").key == "2025-03"


def test_one_note_per_period_with_what_its_contacts_worked_on() -> None:
    goal = Goal(goal_id="G1", enrollment_id="E1", description="Bajar mi A1c a menos de 7", behavior="monitoring",
                target=GoalTarget(measure="hba1c", comparator="<", value=Decimal(7)), start_date=date(2025, 3, 1),
                notes=(GoalNote(note_id="N1", goal_id="G1", noted_on=date(2025, 3, 20), text="A1c 7.4"),
                       GoalNote(note_id="N2", goal_id="G1", noted_on=date(2025, 4, 20), text="A1c 7.1")))
    referral = Referral(referral_id="R1", enrollment_id="E1", resource_name="Food pantry", need="food",
                        referred_on=date(2025, 4, 2))
    planned = PlannedContact(planned_contact_id="P1", enrollment_id="E1", due_at=datetime(2025, 4, 2, 9, tzinfo=CST),
                             mode="video")
    notes = notes_of([contact("C1", datetime(2025, 3, 4, 11, tzinfo=CST), goal_ids=("G1",)),
                      contact("C2", datetime(2025, 4, 2, 11, tzinfo=CST))],
                     goals=[goal], referrals=[referral], planned=[planned])
    march, april = notes
    assert [n.period.key for n in notes] == ["2025-03", "2025-04"]
    assert [g.notes for g in march.goals] == [(goal.notes[0],)]  # only the progress dated in the period
    assert march.planned == (planned,) and march.referrals == ()
    assert april.referrals == (referral,) and april.planned == ()  # P1 is due before C2: planned next for March only
    assert [g.notes for g in april.goals] == [(goal.notes[1],)]  # not discussed, but it has progress in April


def test_the_note_shows_what_a_clinician_needs_and_escapes_every_source_value() -> None:
    goal = Goal(goal_id="G1", enrollment_id="E1", description="Get my A1c <7>", behavior="monitoring",
                target=GoalTarget(measure="hba1c", comparator="<", value=Decimal(7)), start_date=date(2025, 3, 1))
    hostile = "<script>document.body.innerHTML='x'</script><img src=x onerror=alert(1)>"
    notes = notes_of([contact("C1", datetime(2025, 3, 4, 11, tzinfo=CST), goal_ids=("G1",), notes=hostile,
                              support_types=("emotional",)),
                      contact("C2", datetime(2025, 3, 5, 11, tzinfo=CST), outcome="not-reached")], goals=[goal])
    rendered = render_note(notes[0], CTX)
    for text in ("Promotora de salud", "Support given: emotional", "HbA1c < 7 %", "participant not reached",
                 "(America/Chicago)"):
        assert text in rendered.plain
    assert hostile in rendered.plain  # plain text carries the words as written
    assert "<script" not in rendered.html and "<img" not in rendered.html
    assert "&lt;script&gt;" in rendered.html and "Get my A1c &lt;7&gt;" in rendered.html
    assert "Content-Security-Policy" in rendered.html and "default-src 'none'" in rendered.html


def test_the_document_reference_follows_us_core() -> None:
    note = notes_of([contact("C1", datetime(2025, 3, 4, 11, tzinfo=CST))])[0]
    doc = map_note(note, CTX)
    assert doc["status"] == "current" and doc["docStatus"] == "final"
    assert doc["type"]["coding"] == [NOTE_TYPE] and doc["category"][0]["coding"] == [CLINICAL_NOTE_CATEGORY]
    assert doc["identifier"][0]["system"] == "https://example.org/ps/sid/demo/note"
    assert doc["identifier"][0]["value"] == "E1_7C2025-03"
    assert doc["subject"] == {"reference": "Patient?identifier=urn:mrn|MRN-1"}
    assert doc["author"] == [{"reference": "PractitionerRole?identifier=https://example.org/ps/sid/demo/role|S1",
                              "display": "Promotora de salud"}]
    assert doc["custodian"]["reference"].startswith("Organization?identifier=")
    assert doc["context"]["period"] == {"start": "2025-03-01T00:00:00-06:00", "end": "2025-03-31T23:59:59-05:00"}
    assert doc["date"] == "2025-03-04T11:00:00-06:00"
    for content in doc["content"]:
        attachment = content["attachment"]
        data = base64.b64decode(attachment["data"])
        assert attachment["size"] == len(data)
        assert attachment["hash"] == base64.b64encode(hashlib.sha1(data).digest()).decode()
        assert attachment["contentType"].endswith("; charset=utf-8")
    assert {c["attachment"]["contentType"].split(";")[0] for c in doc["content"]} == {"text/plain", "text/html"}
    assert "Rosa Lopez" in decoded(doc, "text/plain")


ASSETS = Path(__file__).resolve().parents[2] / "mappings"


def test_loinc_note_type_is_a_document_code_in_the_us_core_type_value_set() -> None:
    # NOTE_TYPE is written out in note.py; the shipped LOINC excerpt holds the term's published properties
    # (docs/clinical-notes.md cites them). A wrong code, display or a code whose scale is not DOC fails here.
    loinc = json.loads((ASSETS / "fhir" / "loinc" / "CodeSystem-loinc-note-type.json").read_text(encoding="utf-8"))
    assert loinc["url"] == NOTE_TYPE["system"] and loinc["content"] == "fragment"
    assert "Regenstrief Institute" in loinc["copyright"] and "http://loinc.org/license" in loinc["copyright"]
    term = next(c for c in loinc["concept"] if c["code"] == NOTE_TYPE["code"])
    assert term["display"] == NOTE_TYPE["display"]
    properties = {p["code"]: p["valueString"] for p in term["property"]}
    assert properties["COMPONENT"] == "Note" and properties["CLASS"] == "DOC.ONT" and properties["STATUS"] == "ACTIVE"

    value_set = json.loads((ASSETS / "fhir" / "us-core-6.1.0" / "ValueSet-us-core-documentreference-type.json")
                           .read_text(encoding="utf-8"))
    profile = json.loads((ASSETS / "fhir" / "us-core-6.1.0" / "StructureDefinition-us-core-documentreference.json")
                         .read_text(encoding="utf-8"))
    [binding] = [e["binding"] for e in profile["snapshot"]["element"] if e["id"] == "DocumentReference.type"]
    assert binding["strength"] == "required" and binding["valueSet"] == value_set["url"]
    [loinc_rule] = [rule for rule in value_set["compose"]["include"] if rule["system"] == NOTE_TYPE["system"]]
    for rule in loinc_rule["filter"]:  # every filter of the rule holds for the term (LOINC is case-insensitive)
        assert rule["op"] == "=" and properties[rule["property"]].casefold() == rule["value"].casefold(), rule
    assert loinc_rule["filter"], "the rule must filter LOINC, not take all of it"


def test_a_note_whose_contacts_are_all_voided_is_entered_in_error() -> None:
    live, voided = notes_of([contact("C1", datetime(2025, 3, 4, 11, tzinfo=CST)),
                             contact("C2", datetime(2025, 4, 4, 11, tzinfo=CST), void=True, notes="typo")])
    assert not live.voided and voided.voided
    doc = map_note(voided, CTX)
    assert doc["status"] == "entered-in-error"
    assert "Entered in error" in decoded(doc, "text/plain") and "typo" not in decoded(doc, "text/plain")


# -- planning ---------------------------------------------------------------------------------------------------------


def plan_units(staging: Staging, ledger: Ledger, mode: str, period: str = "month") -> dict[str, str]:
    ctx = MappingContext.from_profile(load_profile("peersync-template"), clinical_notes=mode, note_period=period)
    compute_plan(staging, ledger, program_id=ctx.program_id, fingerprint="fp", ctx=ctx, max_delete_fraction=1.0)
    return {key: action for key, action in staging.db.execute("SELECT unit_key, action FROM plan")}


@pytest.fixture()
def demo_staging(tmp_path: Path):  # type: ignore[no-untyped-def]
    with Staging(tmp_path / "s.sqlite") as staging, Ledger(tmp_path / "l.sqlite") as ledger:
        read_program(load_profile("peersync-template"), [DEMO], staging)
        yield staging, ledger


def test_modes_choose_which_units_are_planned(demo_staging) -> None:  # type: ignore[no-untyped-def]
    staging, ledger = demo_staging
    kinds = {mode: {key.split(":")[0] for key in plan_units(staging, ledger, mode)} for mode in ("off", "also", "only")}
    assert "note" not in kinds["off"] and {"note", "contact", "goal"} <= kinds["also"]
    assert kinds["only"] == {"program", "supporter", "note"}


def test_a_mode_never_deletes_what_another_mode_wrote(demo_staging) -> None:  # type: ignore[no-untyped-def]
    staging, ledger = demo_staging
    with ledger.db:
        for unit_key in ("contact:C-old", "note:E-old|2025-01"):
            kind = unit_key.split(":")[0]
            ledger.db.execute("INSERT INTO units (unit_key, kind, participant, hash, voided, state, updated_at) "
                              "VALUES (?, ?, 'E0001', 'h', 0, 'sent', '2025-01-01T00:00:00Z')", (unit_key, kind))
    assert {k for k, a in plan_units(staging, ledger, "only").items() if a == Act.DELETE} == {"note:E-old|2025-01"}
    assert {k for k, a in plan_units(staging, ledger, "off").items() if a == Act.DELETE} == {"contact:C-old"}


def test_preview_files_are_private_and_hold_the_rendered_notes(demo_staging, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    staging, _ = demo_staging
    pages = {}
    for mode in ("off", "also", "only"):
        ctx = MappingContext.from_profile(load_profile("peersync-template"), clinical_notes=mode)
        written = write_note_previews(staging, ctx, tmp_path / mode, "E0001")
        assert [p.name for p in written] == ["notes-E0001.html"]
        assert written[0].stat().st_mode & 0o777 == 0o600
        pages[mode] = written[0].read_text(encoding="utf-8")
        assert not re.search(r"<script", pages[mode], re.I)
    # what the clinic will see: notes unless they are off, the structured resources' narratives unless notes only
    assert '<article class="note">' not in pages["off"] and '<article class="note">' in pages["only"]
    assert '<section class="narrative">' in pages["off"] and '<section class="narrative">' not in pages["only"]
    assert '<article class="note">' in pages["also"] and "<b>Peer support contact</b>" in pages["also"]


def test_map_warns_that_a_preview_without_notes_holds_no_notes(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["map", "--profile", "peersync-template", str(DEMO), "--out",
                                       str(tmp_path / "out"), "--preview-html", str(tmp_path / "p"), "-q"])
    assert "the clinic receives no notes" in result.stderr and "--clinical-notes" in result.stderr


# -- hostile text in every source of a note ----------------------------------------------------------------------------

# The elements and attributes of the note's HTML template (connector/map/note.py html_page and render_note, and
# escape_text's <br/> and <span dir>): a source value must never add to them.
PAGE_ELEMENTS = frozenset("html head meta title style body h1 h2 p ul li b br span".split())
PAGE_ATTRIBUTES = frozenset("lang charset http-equiv content class dir".split())


class _Page(HTMLParser):
    """The tags, attributes and visible text of an HTML page, as a browser's tokenizer would see them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: set[str] = set()
        self.attributes: set[str] = set()
        self.text: list[str] = []
        self._in_head_text = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.add(tag)
        self.attributes |= {name for name, _ in attrs}
        self._in_head_text = tag in ("style", "title")

    def handle_endtag(self, tag: str) -> None:
        self._in_head_text = False

    def handle_data(self, data: str) -> None:
        if not self._in_head_text:
            self.text.append(data)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(note=TEXT, progress=TEXT, words=TEXT, name=TEXT, title=TEXT, resource_name=TEXT, program=TEXT)
def test_hostile_note_sources_stay_inert_in_the_narrative_and_the_html(
        note: str, progress: str, words: str, name: str, title: str, resource_name: str, program: str) -> None:
    """Markup, scripts, entities, very long text, right-to-left text, control characters and lone surrogates in a
    contact's note, a goal's words and progress note, the supporter's name and title, a referral's resource and the
    program's name: the note's narrative is valid inert XHTML, its HTML page keeps only the template's elements
    and shows every value as text, and each attachment's size and hash are those of its data."""
    ctx = MappingContext(program_id="demo", program_name=program, base_url="https://example.org/ps",
                         mrn_system="urn:mrn", timezone="America/Chicago")
    supporter = SUPPORTER.model_copy(update={"given_name": name, "title_text": title})
    # model_copy does not validate, so a value the readers would refuse (a lone surrogate) still gets through
    goal = Goal(goal_id="G1", enrollment_id="E1", description="A1c", behavior="monitoring",
                target=GoalTarget(measure="hba1c", comparator="<", value=Decimal(7)), start_date=date(2025, 3, 1),
                notes=(GoalNote(note_id="N1", goal_id="G1", noted_on=date(2025, 3, 20), text="-"),))
    goal = goal.model_copy(update={"description": words,
                                   "notes": (goal.notes[0].model_copy(update={"text": progress}),)})
    referral = Referral(referral_id="R1", enrollment_id="E1", resource_name="Food bank", need="food",
                        referred_on=date(2025, 3, 10)).model_copy(update={"resource_name": resource_name,
                                                                          "outcome_notes": note})
    [sources] = group_notes(ENROLLMENT, [contact("C1", datetime(2025, 3, 4, 11, tzinfo=CST), goal_ids=("G1",))
                                         .model_copy(update={"notes": note})],
                            [goal], [referral], [], {"S1": supporter}, kind="month", timezone=ctx.timezone)
    values = (note, progress, words, name, title, resource_name)

    doc = map_note(sources, ctx)
    narrative_text = visible_text(parsed_div(doc))  # txt-1/txt-2 and our element subset, or it fails
    for value in values:
        assert all(line in narrative_text for line in _lines(value))

    for content in doc["content"]:
        attachment = content["attachment"]
        data = base64.b64decode(attachment["data"])
        assert attachment["size"] == len(data)
        assert attachment["hash"] == base64.b64encode(hashlib.sha1(data).digest()).decode()
    page = _Page()
    page.feed(decoded(doc, "text/html"))
    page.close()
    assert page.elements <= PAGE_ELEMENTS and page.attributes <= PAGE_ATTRIBUTES
    shown = "".join(page.text)
    for value in (*values, program):
        assert all(line in shown for line in _lines(value)), value[:80]


# -- replaced and amended notes ----------------------------------------------------------------------------------------


def test_a_note_whose_period_other_notes_now_cover_was_replaced_not_withdrawn() -> None:
    contacts = [contact("C1", datetime(2025, 3, 4, 11, tzinfo=CST)),
                contact("C2", datetime(2025, 3, 20, 11, tzinfo=CST))]
    weekly, monthly = notes_of(contacts, kind="week"), notes_of(contacts, kind="month")
    assert replaced("E1|2025-03", weekly, CTX.timezone)  # note_period month -> week
    assert replaced("E1|2025-W10", monthly, CTX.timezone)  # week -> month (W10 is 3 to 9 March 2025)
    assert replaced("E1|contact-C1", monthly, CTX.timezone)  # contact -> month
    assert not replaced("E1|2025-02", weekly, CTX.timezone)  # nothing of February is left: withdrawn
    assert not replaced("E1|2025-W11", weekly, CTX.timezone)
    assert not replaced("E1|contact-C9", monthly, CTX.timezone)
    voided = notes_of([c.model_copy(update={"void": True}) for c in contacts], kind="week")
    assert not replaced("E1|2025-03", voided, CTX.timezone)  # voided contacts replace nothing


def test_a_replaced_note_is_superseded_and_says_so_a_withdrawn_one_entered_in_error() -> None:
    doc = map_note(notes_of([contact("C1", datetime(2025, 3, 4, 11, tzinfo=CST))])[0], CTX) | {"id": "41"}
    goal = {"resourceType": "Goal", "id": "7", "lifecycleStatus": "active"}
    recorded = datetime(2025, 4, 1, tzinfo=UTC)
    superseded = void_bundle("note:E1|2025-03", [doc, goal], ctx=CTX, recorded=recorded, superseded=True)
    withdrawn = void_bundle("note:E1|2025-03", [doc], ctx=CTX, recorded=recorded)
    assert superseded is not None and withdrawn is not None
    new_doc, new_goal = (e["resource"] for e in superseded["entry"][:2])
    assert new_doc["status"] == "superseded" and new_goal["lifecycleStatus"] == "entered-in-error"
    assert "<b>Superseded</b>" in new_doc["text"]["div"] and "Entered in error" not in new_doc["text"]["div"]
    assert withdrawn["entry"][0]["resource"]["status"] == "entered-in-error"


def test_a_new_version_of_a_sent_note_is_amended(demo_staging) -> None:  # type: ignore[no-untyped-def]
    staging, _ = demo_staging
    ctx = MappingContext.from_profile(load_profile("peersync-template"), clinical_notes="only", note_period="month")
    note = participant_notes(staging, "E0001", ctx)[0]
    docs = {}
    for action in (Act.CREATE, Act.UPDATE):
        planned = [PlannedUnit(f"note:{note.source_id}", "note", note.source_id, "h", action)]
        [write] = iter_planned_units(staging, "E0001", planned, ctx)
        docs[action] = write.unit.resources[0]
    assert docs[Act.CREATE]["docStatus"] == "final" and docs[Act.UPDATE]["docStatus"] == "amended"
    assert {k: v for k, v in docs[Act.UPDATE].items() if k != "docStatus"} == \
        {k: v for k, v in docs[Act.CREATE].items() if k != "docStatus"}


def test_a_voided_note_the_clinic_never_received_is_not_sent(demo_staging) -> None:  # type: ignore[no-untyped-def]
    staging, ledger = demo_staging
    ctx = MappingContext.from_profile(load_profile("peersync-template"), clinical_notes="only", note_period="contact")
    voided = [f"note:{n.source_id}" for p in staging.participants() for n in participant_notes(staging, p, ctx)
              if n.voided]
    assert voided  # the demo has contacts voided at the source (one note per contact: their notes are all-voided)
    plan = plan_units(staging, ledger, "only", "contact")
    assert not set(voided) & set(plan)
    # one the clinic did receive is sent again, as entered-in-error
    with ledger.db:
        ledger.db.execute("INSERT INTO units (unit_key, kind, participant, hash, voided, state, updated_at) "
                          "VALUES (?, 'note', 'E0002', 'old', 0, 'sent', '2025-01-01T00:00:00Z')", (voided[0],))
    assert plan_units(staging, ledger, "only", "contact")[voided[0]] == Act.VOID


def test_the_care_plan_is_re_sent_when_a_goal_s_words_change(demo_staging) -> None:  # type: ignore[no-untyped-def]
    # The CarePlan's narrative shows the goals' words, so its unit hash covers them.
    staging, ledger = demo_staging
    ctx = MappingContext.from_profile(load_profile("peersync-template"))

    def careplan_hash() -> str:
        compute_plan(staging, ledger, program_id=ctx.program_id, fingerprint="fp", ctx=ctx)
        return staging.db.execute("SELECT hash FROM plan WHERE unit_key = 'enrollment:E0001'").fetchone()[0]

    before = careplan_hash()
    goal = staging.db.execute("SELECT key FROM staged WHERE kind = 'goal' AND participant = 'E0001'").fetchone()[0]
    with staging.db:
        staging.db.execute("UPDATE staged SET body = json_set(body, '$.description', 'Other words') "
                           "WHERE kind = 'goal' AND key = ?", (goal,))
    assert careplan_hash() != before
    [careplan] = [r for u in map_participant_units(staging, "E0001", [("enrollment", "E0001")], ctx)
                  for r in u.resources if r["resourceType"] == "CarePlan"]
    assert "“Other words”" in careplan["text"]["div"] and "E0001" not in careplan["text"]["div"]
