"""Narratives (connector/map/narrative.py): the renderer alone, on every mapped resource, and against hostile text.

The XHTML rules checked are FHIR R4's txt-1 (only basic formatting elements) and txt-2 (only some attributes), see
https://hl7.org/fhir/R4/narrative.html; "no source text unescaped" means every source value comes back, whole, as
text of the parsed div, and nothing of it became an element or an attribute.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector.map import (
    MappingContext,
    map_cbo,
    map_contact,
    map_enrollment,
    map_goal,
    map_planned_contact,
    map_program,
    map_provenance,
    map_referral,
    map_supporter,
)
from connector.map.narrative import (
    ATTRIBUTES_USED,
    ELEMENTS_USED,
    clean_text,
    communication_narrative,
    escape_text,
    format_date,
    format_datetime,
    goal_narrative,
    mark_entered_in_error,
    with_narrative,
)
from connector.map.units import map_participant_units, participant_unit_keys
from connector.model import Contact, Enrollment, Goal, GoalNote, GoalTarget, PlannedContact, Referral, Supporter
from connector.read.profile import load_profile
from connector.read.program import read_program
from connector.read.staging import Staging
from tests.demogen import generate_program

XHTML = "{http://www.w3.org/1999/xhtml}"
# txt-1: the basic formatting elements of HTML 4.0 chapters 7-11 and 15, <a> and images (R4 narrative.html)
FHIR_ELEMENTS = frozenset(
    "a abbr acronym b big blockquote br caption cite code col colgroup dd dfn div dl dt em h1 h2 h3 h4 h5 h6 hr i "
    "img li ol p pre q samp small span strong sub sup table tbody td tfoot th thead tr tt ul var".split())
# txt-2: the attributes it allows
FHIR_ATTRIBUTES = frozenset(
    "abbr accesskey align alt axis bgcolor border cellhalign cellpadding cellspacing cellvalign char charoff charset "
    "cite class colspan compact coords dir frame headers height href hreflang hspace id lang longdesc name nowrap rel "
    "rev rowspan rules scope shape span src start style summary tabindex title type valign value vspace width".split())
GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "expected"
TZ = "America/Chicago"


def ctx(**kw: Any) -> MappingContext:
    values = {"program_id": "demo", "program_name": "Demo Program", "base_url": "https://example.org/ps",
              "mrn_system": "urn:mrn", "timezone": TZ, "program_phone": "+1-555-0100"}
    return MappingContext(**(values | kw))


SUPPORTER = Supporter(staff_id="S1", given_name="Rosa", family_name="López", title="promotora",
                      title_text="Promotora de salud")
ENROLLMENT = Enrollment(enrollment_id="E1", mrn="MRN-1", start_date=date(2026, 1, 5), supporter_id="S1")
GOAL = Goal(goal_id="G1", enrollment_id="E1", description="Bajar mi A1c", behavior="monitoring",
            target=GoalTarget(measure="hba1c", comparator="<", value=Decimal("7.0"), unit="%"),
            start_date=date(2026, 1, 5), due_date=date(2026, 6, 30),
            notes=(GoalNote(note_id="N1", goal_id="G1", noted_on=date(2026, 2, 1), text="A1c 7.4"),))
CONTACT = Contact(contact_id="C1", enrollment_id="E1", supporter_id="S1",
                  occurred_at=datetime(2026, 3, 12, 19, 30, tzinfo=UTC), duration_minutes=30, mode="face-to-face",
                  setting="home", support_types=("emotional",), essential_elements=("collaborative-goal-setting",),
                  goal_ids=("G1",), notes="Talked about meals.")
REFERRAL = Referral(referral_id="R1", enrollment_id="E1", resource_name="Food Bank", resource_id="FB1", need="food",
                    referred_on=date(2026, 2, 2), status="declined", outcome_notes="Prefers the church pantry")
PLANNED = PlannedContact(planned_contact_id="P1", enrollment_id="E1",
                         due_at=datetime(2026, 3, 19, 15, 0, tzinfo=UTC), mode="telephone")


def every_resource(c: MappingContext, *, supporter: Supporter = SUPPORTER, goal: Goal = GOAL,
                   contact: Contact = CONTACT, referral: Referral = REFERRAL) -> list[dict[str, Any]]:
    """One of each resource peersync emits, mapped from the given records."""
    cbo = map_cbo(referral, c)
    return [
        *map_program(c), *map_supporter(supporter, c),
        *map_enrollment(ENROLLMENT, goal_ids=["G1"], planned_contact_ids=["P1"], referral_ids=["R1"], ctx=c,
                        supporter=supporter),
        map_goal(goal, ENROLLMENT, c), map_contact(contact, ENROLLMENT, c, supporter=supporter, goals=[goal]),
        map_planned_contact(PLANNED, ENROLLMENT, c), *map_referral(referral, ENROLLMENT, c), *([cbo] if cbo else []),
        map_provenance(["Goal/1"], activity="UPDATE", author=None, recorded=datetime(2026, 3, 1, tzinfo=UTC), ctx=c),
    ]


def parsed_div(resource: dict[str, Any]) -> ET.Element:
    """The resource's narrative div, parsed as XML, after checking it against txt-1/txt-2 (and our subset)."""
    text = resource["text"]
    assert text["status"] in ("generated", "extensions")
    root = ET.fromstring(text["div"].encode("utf-8"))
    assert root.tag == f"{XHTML}div"
    for element in root.iter():
        assert element.tag.startswith(XHTML), element.tag
        name = element.tag.removeprefix(XHTML)
        assert name in FHIR_ELEMENTS and name in ELEMENTS_USED, name
        for attribute, value in element.attrib.items():
            assert attribute in FHIR_ATTRIBUTES and attribute in ATTRIBUTES_USED, attribute
            assert attribute != "dir" or value in ("ltr", "rtl")
    return root


def visible_text(root: ET.Element) -> str:
    return "".join(root.itertext())


# -- the helpers -------------------------------------------------------------------------------------------------------


def test_datetime_is_shown_in_the_program_time_zone_and_says_which() -> None:
    assert format_datetime("2026-03-12T19:30:00+00:00", TZ) == "12 Mar 2026 14:30 (America/Chicago)"  # CDT
    assert format_datetime(datetime(2026, 1, 12, 19, 30, tzinfo=UTC), TZ) == "12 Jan 2026 13:30 (America/Chicago)"
    assert format_date("2025-07-01") == "1 Jul 2025"


def test_escape_text_escapes_markup_and_keeps_line_breaks() -> None:
    assert escape_text('<b>"hi"</b> & \'x\'') == "&lt;b&gt;&quot;hi&quot;&lt;/b&gt; &amp; &#x27;x&#x27;"
    assert escape_text("one\r\ntwo\nthree") == "one<br/>two<br/>three"


def test_escape_text_drops_what_xml_cannot_carry_and_bidi_overrides() -> None:
    assert clean_text("a\x00b\x07c\x1b\u202ed\u2066e\ufffff") == "abcdef"
    assert clean_text("lone \ud800 surrogate") == "lone \ufffd surrogate"


def test_printable_text_has_nothing_to_clean() -> None:
    # escape_text skips clean_text for printable values: every character clean_text changes must be unprintable
    changed = [c for c in map(chr, range(0x110000)) if c.isprintable() and clean_text(c) != c]
    assert changed == []
    assert escape_text("“Walk daily”") == "“Walk daily”"


def test_right_to_left_text_is_isolated_by_its_own_direction() -> None:
    assert escape_text("שלום") == '<span dir="rtl">שלום</span>'
    assert escape_text("A1c مرتفع") == '<span dir="ltr">A1c مرتفع</span>'
    assert escape_text("plain") == "plain"


def test_with_narrative_puts_text_after_meta_and_replaces_an_old_one() -> None:
    resource = {"resourceType": "Goal", "meta": {"source": "x"}, "text": {"status": "empty"}, "id": "1"}
    out = with_narrative(resource, {"status": "generated", "div": "<div/>"})
    assert list(out) == ["resourceType", "meta", "text", "id"] and out["text"]["status"] == "generated"
    assert list(with_narrative({"resourceType": "Goal", "id": "1"}, {"status": "generated", "div": "d"})) == [
        "resourceType", "text", "id"]


# -- per resource type -------------------------------------------------------------------------------------------------


def test_every_emitted_resource_type_has_a_valid_narrative() -> None:
    resources = every_resource(ctx())
    assert {r["resourceType"] for r in resources} == {
        "Organization", "Device", "Practitioner", "PractitionerRole", "CarePlan", "CareTeam", "Goal",
        "Communication", "CommunicationRequest", "ServiceRequest", "Task", "Provenance"}
    for resource in resources:
        assert list(resource)[:3] == ["resourceType", "meta", "text"]
        parsed_div(resource)


def test_every_golden_resource_has_a_valid_narrative() -> None:
    resources = [r for p in GOLDEN.glob("*.json") for r in json.loads(p.read_text(encoding="utf-8"))]
    assert len(resources) > 20
    for resource in resources:
        parsed_div(resource)


def test_communication_says_who_when_how_what_and_the_note() -> None:
    text = visible_text(parsed_div(map_contact(CONTACT, ENROLLMENT, ctx(), supporter=SUPPORTER, goals=[GOAL])))
    for expected in ("Completed", "Rosa López, Promotora de salud", "12 Mar 2026 14:30 (America/Chicago)",
                     "Face to face", "Home", "30 min", "Emotional support", "Collaborative goal setting",
                     "“Bajar mi A1c”", "Talked about meals."):
        assert expected in text, expected


def test_communication_narrative_is_extensions_only_when_it_shows_extension_content() -> None:
    assert map_contact(CONTACT, ENROLLMENT, ctx())["text"]["status"] == "extensions"  # duration, setting
    bare = CONTACT.model_copy(update={"duration_minutes": None, "setting": None})
    assert map_contact(bare, ENROLLMENT, ctx())["text"]["status"] == "generated"


@pytest.mark.parametrize(("update", "says"), [
    ({"outcome": "not-reached"}, "Participant not reached"),
    ({"outcome": "cancelled"}, "Contact cancelled"),
    ({"void": True}, "Entered in error"),
])
def test_a_contact_that_did_not_happen_says_so(update: dict[str, Any], says: str) -> None:
    root = parsed_div(map_contact(CONTACT.model_copy(update=update), ENROLLMENT, ctx(), supporter=SUPPORTER))
    text = visible_text(root)
    assert root.find(f"{XHTML}p") is not None and says in "".join(root.find(f"{XHTML}p").itertext())
    assert "Support planned" in text and "Support given" not in text


def test_unknown_supporter_is_a_peer_supporter_not_an_id() -> None:
    text = visible_text(parsed_div(map_contact(CONTACT, ENROLLMENT, ctx())))
    assert "Who: Peer supporter" in text and "S1" not in text


def test_goal_shows_the_words_the_target_with_due_date_and_progress() -> None:
    text = visible_text(parsed_div(map_goal(GOAL, ENROLLMENT, ctx())))
    for expected in ("“Bajar mi A1c”", "Monitoring", "HbA1c < 7.0 %, by 30 Jun 2026", "1 Feb 2026: A1c 7.4",
                     "the participant"):
        assert expected in text, expected


def test_renderers_read_statuses_from_the_mapped_resource() -> None:
    """A status the mapper chose (or changes later) is what the narrative says."""
    communication = map_contact(CONTACT, ENROLLMENT, ctx())
    communication["status"] = "on-hold"
    assert "On hold" in communication_narrative(communication, supporter=None, goals=(), timezone=TZ)["div"]
    goal = map_goal(GOAL, ENROLLMENT, ctx())
    goal["lifecycleStatus"] = "cancelled"
    assert "cancelled" in goal_narrative(goal, GOAL)["div"]


def test_no_mrn_in_any_narrative() -> None:
    for resource in every_resource(ctx()):
        assert "MRN-1" not in resource["text"]["div"]


def test_demo_program_units_all_carry_narratives(tmp_path: Path) -> None:
    """What a sync maps (units.py): every resource has a narrative; contacts name their supporter."""
    generate_program(tmp_path, participants=6, seed=5, fmt="template")
    profile = load_profile("peersync-template")
    c = MappingContext.from_profile(profile)
    with Staging() as staging:
        read_program(profile, [tmp_path], staging)
        resources = [r for p in staging.participants()
                     for u in map_participant_units(staging, p, participant_unit_keys(staging, p), c)
                     for r in u.resources]
    assert resources
    for resource in resources:
        parsed_div(resource)
    contacts = [r for r in resources if r["resourceType"] == "Communication"]
    assert contacts and all("Who</b>: Peer supporter<" not in r["text"]["div"] for r in contacts)


# -- hostile text ------------------------------------------------------------------------------------------------------

HOSTILE = st.sampled_from([
    "<script>alert(1)</script>", "<img src=x onerror=alert(1)>", '"><a href="javascript:alert(1)">x</a>',
    "javascript:alert(document.cookie)", "&amp; &lt; &#x3C; &nbsp; &bogus;", "]]><![CDATA[", "<!-- -->",
    "<?xml version='1.0'?>", 'style="x:expression(alert(1))"', "\u202eevil\u202c", "\u2067abc", "\u2069",
    "مرحبا بالعالم", "שלום עולם", "\x00\x01\x08\x0b\x1f\x7f\x85", "\ud800", "\udfff", "\ufffe\uffff", "\r\n\n\r",
    "Promotora de salud — niños", "😀", "x" * 20000,
])
TEXT = st.lists(st.one_of(HOSTILE, st.text(max_size=40), st.characters(codec=None)), min_size=1, max_size=6).map(
    "".join)


def _lines(value: str) -> list[str]:
    return [line for line in clean_text(value).split("\n") if line]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(note=TEXT, name=TEXT, title=TEXT, words=TEXT, resource_name=TEXT, program=TEXT)
def test_hostile_source_text_stays_inert_valid_xhtml(note: str, name: str, title: str, words: str,
                                                     resource_name: str, program: str) -> None:
    """Markup, scripts, javascript: URLs, entities, very long notes, right-to-left text and bidi controls, control
    characters and lone surrogates in any source value: every narrative stays well-formed XHTML with only the
    allowed elements and attributes, and each value comes back whole as text."""
    c = ctx(program_name=program)
    supporter = SUPPORTER.model_copy(update={"given_name": name, "title_text": title})
    goal = GOAL.model_copy(update={"description": words, "notes": (GOAL.notes[0].model_copy(update={"text": note}),)})
    contact = CONTACT.model_copy(update={"notes": note})
    referral = REFERRAL.model_copy(update={"resource_name": resource_name, "outcome_notes": note})
    texts = {}
    for resource in every_resource(c, supporter=supporter, goal=goal, contact=contact, referral=referral):
        texts[resource["resourceType"]] = texts.get(resource["resourceType"], "") + visible_text(parsed_div(resource))
    expected = {
        "Communication": [note, name, title, words], "Goal": [note, words], "Practitioner": [name, title, program],
        "PractitionerRole": [name, title, program], "CareTeam": [name, title, program], "Task": [note, resource_name],
        "ServiceRequest": [resource_name], "Organization": [program, resource_name], "CarePlan": [program],
    }
    for resource_type, values in expected.items():
        for value in values:
            for line in _lines(value):
                assert line in texts[resource_type], (resource_type, line[:80])


def test_a_resource_voided_on_the_server_gets_a_notice_in_front_of_its_narrative() -> None:
    old = map_goal(GOAL, ENROLLMENT, ctx())["text"]
    marked = mark_entered_in_error(old)
    root = parsed_div({"text": marked})
    assert "".join(root[0].itertext()) == "Entered in error: disregard this record"
    assert "Bajar mi A1c" in visible_text(root) and marked["status"] == old["status"]
    assert mark_entered_in_error(marked) == marked
    for bare in (None, {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml"/>'}):
        assert visible_text(parsed_div({"text": mark_entered_in_error(bare)})) == (
            "Entered in error: disregard this record")


def test_the_right_to_left_prefilter_covers_every_right_to_left_character() -> None:
    import sys
    import unicodedata

    from connector.map.narrative import _RIGHT_TO_LEFT

    missed = [hex(c) for c in range(sys.maxunicode + 1)
              if unicodedata.bidirectional(chr(c)) in ("R", "AL", "AN") and not _RIGHT_TO_LEFT.match(chr(c))]
    assert not missed
