"""Ingest: every mapping-profile feature, row by row (RowConverter is pure: no files needed)."""

from __future__ import annotations

import json
import re
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from connector.identifiers import identifier_value
from connector.model import Contact, Enrollment, Goal, RecordKind, SourceRecord
from connector.read.convert import FieldProblem, RowConverter, RowRejected, show_value
from connector.read.formats.base import RawRow, RowLocation
from connector.read.profile import Profile, Where, load_profile

PROGRAM = {
    "id": "test-program",
    "name": "Test program",
    "base_url": "https://fhir.example.org/peer-support",
    "timezone": "America/Chicago",
    "mrn_system": "urn:oid:2.16.840.1.113883.3.9999.1",
}
ENROLLMENT = {
    "source": {"files": ["enrollments*.csv"]},
    "fields": {"enrollment_id": "enrollment_id", "mrn": "mrn", "start_date": "start_date",
               "supporter_id": "supporter_id"},
}
CONTACT_FIELDS = {"contact_id": "contact_id", "enrollment_id": "enrollment_id", "supporter_id": "supporter_id",
                  "occurred_at": "when", "mode": "mode"}
CONTACT_ROW = {"contact_id": "C1", "enrollment_id": "E1", "supporter_id": "S1", "when": "2024-03-01 10:00",
               "mode": "telephone"}


def make_profile(records: dict[str, Any] | None = None, **top: Any) -> Profile:
    data: dict[str, Any] = {"format_version": 1, "name": "test", "program": PROGRAM,
                            "records": {"enrollment": ENROLLMENT, **(records or {})}}
    data.update(top)
    return Profile.model_validate(data)


def contact_profile(extra_fields: dict[str, Any] | None = None, **top: Any) -> Profile:
    fields = {**CONTACT_FIELDS, **(extra_fields or {})}
    return make_profile({"contact": {"source": {"files": ["contacts*.csv"]}, "fields": fields}}, **top)


def convert(profile: Profile, kind: RecordKind, **values: Any) -> Any:
    return RowConverter(profile, kind).convert(RawRow(RowLocation("t.csv", 2), values))


def contact(profile: Profile, **values: Any) -> Contact:
    return convert(profile, RecordKind.CONTACT, **{**CONTACT_ROW, **values})


def problems(profile: Profile, kind: RecordKind, **values: Any) -> list[FieldProblem]:
    with pytest.raises(RowRejected) as caught:
        convert(profile, kind, **values)
    return caught.value.problems


def contact_problems(profile: Profile, **values: Any) -> dict[str, FieldProblem]:
    return {p.field: p for p in problems(profile, RecordKind.CONTACT, **{**CONTACT_ROW, **values})}


@pytest.fixture(scope="module")
def template() -> Profile:
    return load_profile("peersync-template")


# -- column shorthand, const, default, dotted columns ------------------------------------------------


def test_column_shorthand_equals_the_long_form() -> None:
    short = contact_profile()
    long = contact_profile({k: {"column": v} for k, v in CONTACT_FIELDS.items()})
    assert short.records[RecordKind.CONTACT] == long.records[RecordKind.CONTACT]
    assert short.records[RecordKind.CONTACT].fields["occurred_at"].column == "when"
    assert contact(short) == contact(long)


def test_const_fills_a_field_for_every_row() -> None:
    profile = contact_profile({"mode": {"const": "group"}, "void": {"const": False},
                               "duration_minutes": {"const": 90}})
    record = contact(profile, mode="ignored: the column is not read")
    assert (record.mode, record.void, record.duration_minutes) == ("group", False, 90)


def test_default_when_the_cell_is_empty() -> None:
    profile = contact_profile({"outcome": {"column": "outcome", "default": "not-reached"}})
    assert contact(profile, outcome="").outcome == "not-reached"
    assert contact(profile, outcome="   ").outcome == "not-reached"
    assert contact(profile, outcome="completed").outcome == "completed"
    assert contact(profile).outcome == "not-reached"  # column absent from the row


def test_dotted_column_reads_nested_json() -> None:
    enrollment = {**ENROLLMENT, "fields": {**ENROLLMENT["fields"], "mrn": "participant.mrn"}}
    profile = Profile.model_validate({"format_version": 1, "name": "t", "program": PROGRAM,
                                      "records": {"enrollment": enrollment}})
    record = convert(profile, RecordKind.ENROLLMENT, enrollment_id="E1", participant={"mrn": "M-77"},
                     start_date="2024-01-01", supporter_id="S1")
    assert record.mrn == "M-77"


def test_optional_fields_may_be_left_unmapped_and_model_defaults_apply() -> None:
    record = contact(contact_profile())
    assert (record.outcome, record.void, record.support_types, record.notes) == ("completed", False, (), None)


# -- template ids ----------------------------------------------------------------------------------


def test_template_builds_ids_from_several_columns() -> None:
    profile = contact_profile({"contact_id": {"template": "{record_id}-{redcap_repeat_instance}"},
                               "group_session_id": {"template": "grp-{session}"}})
    record = contact(profile, record_id="1042", redcap_repeat_instance=3.0, session="")
    assert record.contact_id == "1042-3"  # an Excel float 3.0 is "3" in an id
    assert record.group_session_id is None  # an empty part makes no id


def test_template_with_an_empty_part_is_a_missing_id() -> None:
    profile = contact_profile({"contact_id": {"template": "{record_id}-{redcap_repeat_instance}"}})
    found = contact_problems(profile, record_id="1042", redcap_repeat_instance=" ")
    assert found["contact_id"].reason == "required value is missing"


# -- code tables and unknown codes -----------------------------------------------------------------


@pytest.mark.parametrize(
    "cell, code",
    [
        ("telephone", "telephone"), ("TELEPHONE", "telephone"), ("  Tel ", "telephone"), ("Teléfono", "telephone"),
        ("LLAMADA", "telephone"), ("face to face", "face-to-face"), ("FACE_TO_FACE", "face-to-face"),
        ("Face To  Face", "face-to-face"), ("presencial", "face-to-face"), ("En persona", "face-to-face"),
        ("text message", "text-message"), ("Mensaje de texto", "text-message"), ("sesión de grupo", "group"),
        ("Correo electrónico", "email"), ("Zoom", "video"),
    ],
)
def test_code_table_matching_ignores_case_spaces_underscores(template: Profile, cell: str, code: str) -> None:
    row = {"contact_id": "C1", "enrollment_id": "E1", "supporter_id": "S1", "contact_datetime": "2024-03-01 10:00",
           "mode": cell}
    assert convert(template, RecordKind.CONTACT, **row).mode == code


def test_canonical_codes_match_without_a_code_table() -> None:
    profile = contact_profile({"setting": "setting"})
    assert contact(profile, mode="Text Message", setting="FAITH_BASED").setting == "faith-based"


@pytest.mark.parametrize("cell", ["2", 2, 2.0, " 2 ", "tel"])
def test_numeric_redcap_codes(cell: Any) -> None:
    profile = contact_profile({"mode": {"column": "mode", "codes": "redcap_modes"}},
                              code_tables={"redcap_modes": {"face-to-face": ["1"], "telephone": ["2", "tel"],
                                                            "video": ["3"]}})
    assert contact(profile, mode=cell).mode == "telephone"


def test_unknown_code_rejects_by_default() -> None:
    found = contact_problems(contact_profile(), mode="carrier pigeon")
    assert found["mode"].value == "carrier pigeon"
    assert found["mode"].reason.startswith("unknown code 'carrier pigeon' (allowed: face-to-face, telephone")


def test_unknown_code_other_keeps_the_original_text() -> None:
    profile = contact_profile({"setting": {"column": "setting", "unknown": "other"}})
    record = contact(profile, setting="Parking lot of the laundromat")
    assert record.setting == "other"
    assert record.original_text == {"setting": "Parking lot of the laundromat"}
    assert contact(profile, setting="home").original_text == {}


def test_unknown_code_other_in_a_list_keeps_every_original_spelling() -> None:
    profile = contact_profile({"support_types": "support"}, options={"unknown_codes": "other"})
    record = contact(profile, support="emotional; bingo; yoga class; bingo")
    assert record.support_types == ("emotional", "other")
    assert record.original_text["support_types"] == "bingo; yoga class; bingo"


def test_unknown_code_other_is_impossible_where_the_field_has_no_other() -> None:
    # ContactMode has no 'other' code: the row is rejected even under the 'other' policy.
    profile = contact_profile({"mode": {"column": "mode", "unknown": "other"}})
    assert "mode" in contact_problems(profile, mode="pigeon")


def test_field_policy_overrides_the_profile_policy() -> None:
    profile = contact_profile({"setting": {"column": "setting", "unknown": "reject"}},
                              options={"unknown_codes": "other"})
    assert contact_problems(profile, setting="parking lot")["setting"].reason.startswith("unknown code")


# -- lists and checkboxes --------------------------------------------------------------------------


def test_split_lists_trim_and_deduplicate() -> None:
    profile = contact_profile({"support_types": "support", "goal_ids": {"column": "goals", "split": ","}})
    record = contact(profile, support=" emotional ;education;; Emotional;EDUCATION ", goals="G1, G2 ,G1,")
    assert record.support_types == ("emotional", "education")
    assert record.goal_ids == ("G1", "G2")


def test_profile_list_separator_and_json_lists() -> None:
    profile = contact_profile({"support_types": "support"}, options={"list_separator": "|"})
    assert contact(profile, support="outreach|follow up").support_types == ("outreach", "follow-up")
    assert contact(profile, support=["outreach", "Follow_Up", "outreach"]).support_types == ("outreach", "follow-up")


def test_redcap_checkboxes() -> None:
    checkboxes = {"prefix": "support___", "options": {"1": "emotional", "2": "instrumental", "3": "education",
                                                      "4": "follow-up"}}
    profile = contact_profile({"support_types": {"checkboxes": checkboxes}},
                              element_rules={"education": ["education-skills-training"]})
    record = contact(profile, support___1="1", support___2="0", support___3="Checked", support___4="")
    assert record.support_types == ("emotional", "education")
    assert record.essential_elements == ("education-skills-training",)
    assert contact(profile, support___1="Unchecked").support_types == ()
    assert contact(profile, support___1=1, support___2=0.0).support_types == ("emotional",)  # Excel numbers


def test_checkbox_with_a_non_boolean_cell_is_rejected() -> None:
    profile = contact_profile({"support_types": {"checkboxes": {"prefix": "s___", "options": {"1": "emotional"}}}})
    assert contact_problems(profile, s___1="maybe")["support_types"].reason.startswith("not a yes/no value")


# -- booleans ----------------------------------------------------------------------------------------


def test_true_values_for_void() -> None:
    profile = contact_profile({"void": {"column": "status_flag", "true_values": ["DELETED", "entered in error"]}})
    assert contact(profile, status_flag="deleted").void is True
    assert contact(profile, status_flag=" Entered in error ").void is True
    assert contact(profile, status_flag="active").void is False  # anything else is false with true_values
    assert contact(profile, status_flag="").void is False


@pytest.mark.parametrize("cell, value", [("1", True), ("Sí", True), ("x", True), ("YES", True), ("0", False),
                                         ("No", False), ("", False), (True, True), (0, False)])
def test_default_true_and_false_values(cell: Any, value: bool) -> None:
    assert contact(contact_profile({"void": "void"}), void=cell).void is value


def test_not_a_boolean_is_rejected() -> None:
    found = contact_problems(contact_profile({"void": "void"}), void="perhaps")
    assert found["void"].reason == "not a yes/no value: 'perhaps'"


# -- dates, date-times, time zone --------------------------------------------------------------------


def test_date_formats_and_excel_serials_in_csv() -> None:
    profile = make_profile()
    enrollment = {"enrollment_id": "E1", "mrn": "M1", "supporter_id": "S1"}
    for cell in ("2024-03-01", "03/01/2024", "45352", 45352, 45352.0, "45352.75", datetime(2024, 3, 1, 9),
                 date(2024, 3, 1), "2024-03-01T08:00:00"):
        assert convert(profile, RecordKind.ENROLLMENT, **enrollment, start_date=cell).start_date == date(2024, 3, 1)


def test_field_formats_override_the_profile_formats() -> None:
    profile = contact_profile({"occurred_at": {"column": "when", "formats": ["%d/%m/%Y %H:%M"]}})
    assert contact(profile, when="01/07/2024 09:15").occurred_at.replace(tzinfo=None) == datetime(2024, 7, 1, 9, 15)
    found = contact_problems(profile, when="July 1st")
    assert found["occurred_at"].reason == "not a date in an expected format (%d/%m/%Y %H:%M)"
    assert found["occurred_at"].value == "July 1st"


def test_excel_serial_date_time() -> None:
    occurred = contact(contact_profile(), when="45352.5").occurred_at
    assert occurred.isoformat() == "2024-03-01T12:00:00-06:00"


def test_local_times_get_the_program_time_zone_with_dst() -> None:
    profile = contact_profile()
    july = contact(profile, when="2024-07-15 10:00").occurred_at
    january = contact(profile, when="2024-01-15 10:00").occurred_at
    assert july.utcoffset() == timedelta(hours=-5) and july.isoformat() == "2024-07-15T10:00:00-05:00"
    assert january.utcoffset() == timedelta(hours=-6) and january.isoformat() == "2024-01-15T10:00:00-06:00"
    assert contact(profile, when=datetime(2024, 7, 15, 10)).occurred_at.utcoffset() == timedelta(hours=-5)


def test_explicit_offsets_are_kept() -> None:
    profile = contact_profile()
    assert contact(profile, when="2024-07-15T10:00:00+02:00").occurred_at.isoformat() == "2024-07-15T10:00:00+02:00"
    assert contact(profile, when="2024-07-15T15:00:00Z").occurred_at.utcoffset() == timedelta(0)


@pytest.mark.parametrize("cell", ["0001-01-01", "9999-12-31", "1899-12-31", "2101-01-01", "2958465", 1, "1"])
def test_implausible_dates_are_rejected(cell: Any) -> None:
    found = problems(make_profile(), RecordKind.ENROLLMENT, enrollment_id="E1", mrn="M1", supporter_id="S1",
                     start_date=cell)
    assert [p.field for p in found] == ["start_date"]
    assert "outside 1900-01-01 .. 2100-12-31" in found[0].reason or "not a" in found[0].reason


def test_implausible_date_times_are_rejected() -> None:
    for cell in ("9999-12-31 23:59", "0001-01-01 00:00", "0001-01-01T00:00:00+01:00"):
        assert "outside" in contact_problems(contact_profile(), when=cell)["occurred_at"].reason


@pytest.mark.parametrize("cell", [pytest.param(10**400, id="10**400"), -5, float("nan"), float("inf"), True, "1e400",
                                  [], {}])
def test_strange_date_cells_are_rejected_not_crashing(cell: Any) -> None:
    found = problems(make_profile(), RecordKind.ENROLLMENT, enrollment_id="E1", mrn="M1", supporter_id="S1",
                     start_date=cell)
    assert [p.field for p in found] == ["start_date"]


def test_end_date_before_start_date_is_rejected(template: Profile) -> None:
    found = problems(template, RecordKind.ENROLLMENT, enrollment_id="E1", mrn="M1", supporter_id="S1",
                     start_date="2024-03-01", end_date="2024-02-01")
    assert [(p.field, p.reason) for p in found] == [("end_date", "end date is before the start date")]


# -- numbers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell, expected", [("30", 30), ("30.0", 30), (45.0, 45), (" 15 ", 15)])
def test_whole_numbers(cell: Any, expected: int) -> None:
    assert contact(contact_profile({"duration_minutes": "minutes"}), minutes=cell).duration_minutes == expected


@pytest.mark.parametrize("cell", ["30.5", "abc", "inf", "-Infinity", "NaN", "1e999999999", float("inf"), True,
                                  "-5", "1441"])
def test_bad_whole_numbers_are_rejected_not_crashing(cell: Any) -> None:
    found = contact_problems(contact_profile({"duration_minutes": "minutes"}), minutes=cell)
    assert list(found) == ["duration_minutes"]


# -- element rules -------------------------------------------------------------------------------------


def test_element_rules_derive_elements_when_none_are_recorded(template: Profile) -> None:
    row = {"contact_id": "C1", "enrollment_id": "E1", "supporter_id": "S1", "contact_datetime": "2024-03-01 10:00",
           "mode": "phone", "support_types": "educación; apoyo práctico; education"}
    record = convert(template, RecordKind.CONTACT, **row)
    assert record.support_types == ("education", "instrumental")
    assert record.essential_elements == ("education-skills-training", "community-resource-linkage")
    recorded = convert(template, RecordKind.CONTACT, **row, essential_elements="clinical-care-access")
    assert recorded.essential_elements == ("clinical-care-access",)  # recorded elements are never overridden
    nothing = convert(template, RecordKind.CONTACT, **{**row, "support_types": ""})
    assert nothing.essential_elements == ()


def test_no_element_rules_means_no_derived_elements() -> None:
    record = contact(contact_profile({"support_types": "support"}), support="education")
    assert record.essential_elements == ()


# -- goal targets --------------------------------------------------------------------------------------

GOAL_ROW = {"goal_id": "G1", "enrollment_id": "E1", "goal_in_own_words": "Walk after dinner", "behavior": "activity",
            "start_date": "2024-03-01"}


def test_goal_target_is_assembled(template: Profile) -> None:
    goal: Goal = convert(template, RecordKind.GOAL, **GOAL_ROW, target_measure="Steps per day",
                         target_comparator=">=", target_value="7000", target_unit="steps/d")
    assert goal.behavior == "being-active"
    assert goal.target is not None
    assert (goal.target.measure, goal.target.comparator, goal.target.value, goal.target.unit) == (
        "steps-per-day", ">=", Decimal("7000"), "steps/d")
    hba1c = convert(template, RecordKind.GOAL, **GOAL_ROW, target_measure="hba1c", target_value="6,5")
    assert hba1c.target.comparator == "=" and hba1c.target.value == Decimal("6.5")
    assert convert(template, RecordKind.GOAL, **GOAL_ROW).target is None


def test_goal_target_value_without_measure_is_rejected(template: Profile) -> None:
    found = problems(template, RecordKind.GOAL, **GOAL_ROW, target_value="7")
    assert [(p.field, p.reason) for p in found] == [("target_measure", "a target value was given without a measure")]
    found = problems(template, RecordKind.GOAL, **GOAL_ROW, target_measure="hba1c")
    assert [(p.field, p.reason) for p in found] == [("target_value", "a target measure was given without a value")]


def test_goal_target_bad_parts_are_rejected(template: Profile) -> None:
    assert {p.field for p in problems(template, RecordKind.GOAL, **GOAL_ROW, target_measure="cholesterol",
                                      target_value="7")} == {"target_measure"}
    assert {p.field for p in problems(template, RecordKind.GOAL, **GOAL_ROW, target_measure="hba1c",
                                      target_value="seven")} == {"target_value"}
    assert {p.field for p in problems(template, RecordKind.GOAL, **GOAL_ROW, target_measure="hba1c",
                                      target_comparator="about", target_value="7")} == {"target_comparator"}


# -- identifiers -----------------------------------------------------------------------------------

AWKWARD_IDS = ["A|B", "A,B", "A$B", "A\\B", '=HYPERLINK("http://x","y")', "+1", "-1", "@SUM(A1)", "a b", "ñ-1",
               "A_B", "A_5FB", "1042", "C-1042.a", "%41", "A/B", "A?identifier=x", "🙂"]


@pytest.mark.parametrize("source_id", AWKWARD_IDS)
def test_awkward_source_ids_are_accepted(source_id: str) -> None:
    record = contact(contact_profile(), contact_id=source_id, enrollment_id=source_id)
    assert record.contact_id == source_id and record.enrollment_id == source_id


def test_identifier_values_are_safe_and_injective() -> None:
    values = [identifier_value(i) for i in AWKWARD_IDS]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", v) for v in values)
    assert len(set(values)) == len(AWKWARD_IDS)
    assert identifier_value("C-1042.a") == "C-1042.a"  # plain ids stay readable
    assert identifier_value("A|B") == "A_7CB"
    assert identifier_value("A_B") == "A_5FB" != identifier_value("A_5FB")


@pytest.mark.parametrize("source_id", ["C\x001", "C\t1", "C\n1", "x" * 129, "   "])
def test_unusable_source_ids_are_rejected(source_id: str) -> None:
    found = contact_problems(contact_profile(), contact_id=source_id)
    assert list(found) == ["contact_id"]
    assert source_id.strip() == "" or found["contact_id"].value == f"<masked: {len(source_id.strip())} characters>"


def test_ids_are_trimmed() -> None:
    assert contact(contact_profile(), contact_id="  C7  ").contact_id == "C7"


# -- masking in FieldProblems ------------------------------------------------------------------------


def test_sensitive_and_id_values_are_masked() -> None:
    assert show_value("mrn", "MRN-0012345") == "<masked: 11 characters>"
    assert show_value("notes", "She is worried about her A1c") == "<masked: 28 characters>"
    assert show_value("given_name", "Guadalupe") == "<masked: 9 characters>"
    assert show_value("contact_id", "C-1") == "<masked: 3 characters>"
    assert show_value("goal_ids", "G1;G2") == "<masked: 5 characters>"
    assert show_value("mode", "pigeon") == "pigeon"
    assert show_value("mode", "x" * 200) == "x" * 77 + "..."
    assert show_value("mode", None) == ""


def test_masked_values_in_row_problems(template: Profile) -> None:
    supporter = {"staff_id": "S\x01", "given_name": "Guadalupe", "family_name": "Zamarripa", "title": "CHW",
                 "npi": "12345"}
    found = {p.field: p for p in problems(template, RecordKind.SUPPORTER, **supporter)}
    assert found["npi"].value == "<masked: 5 characters>"
    assert found["staff_id"].value == "<masked: 2 characters>"
    for problem in found.values():
        assert "12345" not in problem.value + problem.reason
        assert "Guadalupe" not in problem.value + problem.reason


def test_row_with_a_reader_error_is_rejected_as_a_whole(template: Profile) -> None:
    row = RawRow(RowLocation("c.csv", 9), {}, error="the row has bytes that are not valid utf-8 text")
    with pytest.raises(RowRejected) as caught:
        RowConverter(template, RecordKind.CONTACT).convert(row)
    assert caught.value.problems == [FieldProblem("(row)", "", "the row has bytes that are not valid utf-8 text")]


def test_every_problem_in_a_row_is_reported_at_once(template: Profile) -> None:
    row = {"contact_id": "", "enrollment_id": "E1", "supporter_id": "S1", "contact_datetime": "yesterday",
           "mode": "pigeon", "duration_minutes": "long"}
    # Every cell that cannot be read is reported together; model checks (such as the missing contact_id)
    # come after the cells are read, so they show up once these are fixed.
    fields = {p.field for p in problems(template, RecordKind.CONTACT, **row)}
    assert fields == {"occurred_at", "mode", "duration_minutes"}
    row.update(contact_datetime="2024-03-01 10:00", mode="phone", duration_minutes="20")
    assert [p.field for p in problems(template, RecordKind.CONTACT, **row)] == ["contact_id"]


def test_missing_columns_are_named(template: Profile) -> None:
    converter = RowConverter(template, RecordKind.CONTACT)
    missing = converter.missing_columns({"contact_id", "enrollment_id", "supporter_id", "contact_datetime"})
    assert missing["mode"] == "mode" and "contact_id" not in missing


# -- where filters (several kinds in one file) -----------------------------------------------------


def test_where_filter_routes_rows_of_one_file_to_kinds(tmp_path: Path) -> None:
    from connector.read.program import read_program
    from connector.read.staging import Staging

    profile = Profile.model_validate({
        "format_version": 1, "name": "redcap-like", "program": PROGRAM,
        "records": {
            "supporter": {"source": {"files": ["export.csv"], "where": {"column": "instrument", "equals": "staff"}},
                          "fields": {"staff_id": "id", "given_name": "first", "family_name": "last",
                                     "title": {"const": "promotora"}}},
            "enrollment": {"source": {"files": ["export.csv"],
                                      "where": {"column": "instrument", "in": ["", "enrollment"]}},
                           "fields": {"enrollment_id": "id", "mrn": "mrn", "start_date": "start",
                                      "supporter_id": "staff"}},
        },
    })
    (tmp_path / "export.csv").write_text(
        "instrument,id,first,last,mrn,start,staff\n"
        "staff,S1,Ana,Peña,,,\n"
        ",E1,,,M1,2024-01-02,S1\n"
        "enrollment,E2,,,M2,2024-01-03,S1\n"
        "survey,X9,,,,,\n"
    )
    with Staging() as staging:
        report = read_program(profile, [tmp_path], staging)
    assert report.as_dict()["kinds"] == {
        "(no kind)": {"read": 1, "accepted": 0, "rejected": 1},
        "enrollment": {"read": 2, "accepted": 2, "rejected": 0},
        "supporter": {"read": 1, "accepted": 1, "rejected": 0},
    }


def test_the_template_profile_reads_its_own_documented_columns(template: Profile) -> None:
    row = {"contact_id": "C1", "enrollment_id": "E1", "supporter_id": "S1", "contact_datetime": "2024-03-01 10:00",
           "duration_minutes": "25", "mode": "Tel", "setting": "iglesia", "outcome": "No contestó",
           "support_types": "seguimiento", "essential_elements": "", "goal_ids": "G1;G2", "notes": "  ok  ",
           "group_session_id": "", "planned_contact_id": "P1", "void": "no"}
    record = convert(template, RecordKind.CONTACT, **row)
    assert isinstance(record, SourceRecord)
    assert record.model_dump(mode="json", exclude={"original_text"}) == {
        "kind": "contact", "void": False, "contact_id": "C1", "enrollment_id": "E1", "supporter_id": "S1",
        "occurred_at": "2024-03-01T10:00:00-06:00", "duration_minutes": 25, "mode": "telephone",
        "setting": "faith-based", "outcome": "not-reached", "purpose": None, "support_types": ["follow-up"],
        "essential_elements": ["ongoing-follow-up-support"], "goal_ids": ["G1", "G2"], "notes": "ok",
        "group_session_id": None, "planned_contact_id": "P1",
    }
    enrollment: Enrollment = convert(template, RecordKind.ENROLLMENT, enrollment_id="E1", mrn="M1",
                                     start_date="2024-01-01", supporter_id="S1", status="Completed",
                                     conditions="type 2 diabetes; prediabetes")
    assert enrollment.conditions == ("type 2 diabetes", "prediabetes")
    assert enrollment.status == "completed"


# -- onboarding features: conditional values, no-value codes, target messages, JSON scalars, nested where ----

GOAL_FIELDS = {"goal_id": "goal_id", "enrollment_id": "enrollment_id", "description": "goal_in_own_words",
               "behavior": {"column": "behavior", "codes": "behaviors"}, "start_date": "start_date"}
A1C_WHEN = {"column": "objetivo_a1c", "present": True}


def goal_profile(extra: dict[str, Any], tables: dict[str, Any] | None = None) -> Profile:
    return make_profile({"goal": {"source": {"files": ["goals*.csv"]}, "fields": {**GOAL_FIELDS, **extra}}},
                        code_tables={"behaviors": {"being-active": ["activity"]}, **(tables or {})})


def test_a_conditional_constant_applies_only_when_its_column_has_a_value() -> None:
    profile = goal_profile({"target_measure": {"const": "hba1c", "when": A1C_WHEN},
                            "target_comparator": {"const": "<", "when": A1C_WHEN},
                            "target_value": "objetivo_a1c"})
    with_target: Goal = convert(profile, RecordKind.GOAL, **GOAL_ROW, objetivo_a1c="7.2")
    assert with_target.target is not None
    assert (with_target.target.measure, with_target.target.comparator, with_target.target.value) == (
        "hba1c", "<", Decimal("7.2"))
    assert with_target.target.unit is None  # the mapper writes HbA1c's default unit, % (UCUM)
    without: Goal = convert(profile, RecordKind.GOAL, **GOAL_ROW, objetivo_a1c="  ")
    assert without.target is None


def test_a_conditional_template_and_equals_condition() -> None:
    profile = contact_profile({"notes": {"template": "Visit by {visitor}",
                                         "when": [{"column": "type", "equals": "home"},
                                                  {"column": "visitor", "present": True}]}})
    assert contact(profile, type="home", visitor="Ana").notes == "Visit by Ana"
    assert contact(profile, type="phone", visitor="Ana").notes is None


def test_a_code_table_can_map_a_spelling_to_no_value() -> None:
    profile = goal_profile({"achievement_status": {"column": "estado", "codes": "logro"}},
                           {"logro": {"achieved": ["logrado"], None: ["en pausa", "pausa"]}})
    assert convert(profile, RecordKind.GOAL, **GOAL_ROW, estado="Logrado").achievement_status == "achieved"
    paused: Goal = convert(profile, RecordKind.GOAL, **GOAL_ROW, estado="En pausa")
    assert paused.achievement_status is None and not paused.original_text
    found = problems(profile, RecordKind.GOAL, **GOAL_ROW, estado="Quizás")
    assert [p.field for p in found] == ["achievement_status"]


def test_a_no_value_spelling_in_a_list_field_is_left_out() -> None:
    profile = contact_profile({"support_types": {"column": "apoyo", "codes": "apoyos"}},
                              code_tables={"apoyos": {"emotional": ["emocional"], None: ["ninguno"]}})
    assert contact(profile, apoyo="Emocional; Ninguno").support_types == ("emotional",)


@pytest.mark.parametrize(
    ("given", "field", "reason"),
    [
        ({"v": "7"}, "target_measure", "a target value was given without a measure"),
        ({"m": "hba1c"}, "target_value", "a target measure was given without a value"),
        ({"m": "hba1c", "c": "<", "u": "%"}, "target_value",
         "a target measure was given without a value (only a comparator and unit)"),
        ({"c": "<"}, "target_value", "a target comparator was given without a measure or value"),
        ({"u": "%"}, "target_value", "a target unit was given without a measure or value"),
        ({"c": "<", "u": "%"}, "target_value", "a target comparator and unit was given without a measure or value"),
    ],
)
def test_each_incomplete_target_has_its_own_message(
    template: Profile, given: dict[str, str], field: str, reason: str
) -> None:
    names = {"m": "target_measure", "c": "target_comparator", "v": "target_value", "u": "target_unit"}
    row = {**GOAL_ROW, **{names[k]: v for k, v in given.items()}}
    found = problems(template, RecordKind.GOAL, **row)
    assert [p.field for p in found] == [field]
    assert found[0].reason.startswith(reason)


def test_json_booleans_and_numbers_become_text_as_json_spells_them() -> None:
    profile = contact_profile({"notes": {"template": "{form.archived}/{form.score}/{form.count}"},
                               "outcome": {"column": "form.done", "codes": "done"}},
                              code_tables={"done": {"completed": ["true"], "not-reached": ["false"]}})
    row = {**CONTACT_ROW, "form": {"archived": False, "score": 7.5, "count": 3.0, "done": False}}
    record = convert(profile, RecordKind.CONTACT, **row)
    assert record.notes == "false/7.5/3"
    assert record.outcome == "not-reached"
    assert show_value("duration_minutes", True) == "true"


def test_json_true_false_in_a_text_field_and_a_where_filter() -> None:
    profile = contact_profile({"notes": "form.flag"})
    assert contact(profile, form={"flag": True}).notes == "true"
    where = Where.model_validate({"column": "form.archived", "equals": "false"})
    assert where.matches({"form": {"archived": False}})
    assert not where.matches({"form": {"archived": True}})


def test_where_reads_nested_json_paths_like_fields(tmp_path: Path) -> None:
    from connector.read.program import read_program
    from connector.read.staging import Staging

    profile = Profile.model_validate({
        "format_version": 1, "name": "app", "program": PROGRAM,
        "records": {
            "enrollment": {"source": {"files": ["forms.ndjson"], "where": {"column": "form.@name", "equals": "Intake"}},
                           "fields": {"enrollment_id": "form.case.@case_id", "mrn": "form.mrn",
                                      "start_date": "form.start", "supporter_id": "form.meta.user"}},
            "supporter": {"source": {"files": ["forms.ndjson"],
                                     "where": [{"column": "form.@name", "equals": "Staff"},
                                               {"column": "archived", "equals": "false"}]},
                          "fields": {"staff_id": "form.meta.user", "given_name": "form.first",
                                     "family_name": "form.last", "title": {"const": "promotora"}}},
        },
    })
    lines = [
        {"archived": False, "form": {"@name": "Staff", "meta": {"user": "S1"}, "first": "Ana", "last": "Peña"}},
        {"archived": True, "form": {"@name": "Staff", "meta": {"user": "S2"}, "first": "Old", "last": "Copy"}},
        {"form": {"@name": "Intake", "case": {"@case_id": "E1"}, "mrn": "M1", "start": "2024-01-02",
                  "meta": {"user": "S1"}}},
    ]
    (tmp_path / "forms.ndjson").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    with Staging() as staging:
        report = read_program(profile, [tmp_path], staging)
    assert report.as_dict()["kinds"] == {
        "(no kind)": {"read": 1, "accepted": 0, "rejected": 1},
        "enrollment": {"read": 1, "accepted": 1, "rejected": 0},
        "supporter": {"read": 1, "accepted": 1, "rejected": 0},
    }


def test_a_mistyped_column_or_nested_path_warns_once_with_the_closest_name(tmp_path: Path) -> None:
    from connector.read.program import read_program
    from connector.read.staging import Staging

    profile = Profile.model_validate({
        "format_version": 1, "name": "app", "program": PROGRAM,
        "records": {
            "enrollment": {"source": {"files": ["forms.ndjson"]},
                           "fields": {"enrollment_id": "form.case.@case_id", "mrn": "form.mrn",
                                      "start_date": "form.start", "supporter_id": "form.meta.userId",
                                      "end_date": "qqq.zzz"}},
            "supporter": {"source": {"files": ["staff.csv"]},
                          "fields": {"staff_id": "staff", "given_name": "Given name", "family_name": "family",
                                     "title": {"const": "promotora"}}},
        },
    })
    record = {"form": {"case": {"@case_id": "E1"}, "mrn": "M1", "start": "2024-01-02", "meta": {"userID": "S1"}}}
    (tmp_path / "forms.ndjson").write_text("\n".join(json.dumps(record) for _ in range(3)) + "\n")
    (tmp_path / "staff.csv").write_text("staff,Given_name,family\nS1,Ana,Peña\n")
    with Staging() as staging:
        report = read_program(profile, [tmp_path], staging)
    assert report.warnings == [
        "forms.ndjson: path 'form.meta.userId' (for enrollment.supporter_id) is in no record of the file; "
        "did you mean 'form.meta.userID'?",
        "forms.ndjson: path 'qqq.zzz' (for enrollment.end_date) is in no record of the file",
        "staff.csv: column 'Given name' (for supporter.given_name) is missing from the file; "
        "did you mean 'Given_name'?",
    ]


def _resubmission_report(tmp_path: Path, duplicates: dict[str, str] | None, times: list[str]) -> Any:
    from connector.read.program import read_program
    from connector.read.staging import Staging

    contact_spec: dict[str, Any] = {"source": {"files": ["contacts.csv"]},
                                    "fields": {**CONTACT_FIELDS, "notes": "notes"}}
    if duplicates is not None:
        contact_spec["duplicates"] = duplicates
    profile = make_profile({"contact": contact_spec,
                            "supporter": {"source": {"files": ["staff.csv"]},
                                          "fields": {"staff_id": "staff_id", "given_name": "given",
                                                     "family_name": "family", "title": {"const": "promotora"}}}})
    (tmp_path / "staff.csv").write_text("staff_id,given,family\nS1,Ana,Peña\n")
    (tmp_path / "enrollments.csv").write_text("enrollment_id,mrn,start_date,supporter_id\nE1,M1,2024-01-02,S1\n")
    rows = "".join(f"C1,E1,S1,2024-03-01 10:00,telephone,copy {i},{t}\n" for i, t in enumerate(times))
    (tmp_path / "contacts.csv").write_text(
        "contact_id,enrollment_id,supporter_id,when,mode,notes,received_on\n" + rows)
    with Staging() as staging:
        report = read_program(profile, [tmp_path], staging)
        kept = [r.notes for r in staging.records(RecordKind.CONTACT)]
        reasons = [r.reason for r in staging.rejects()]
    return report, kept, reasons


def test_resubmitted_records_are_all_rejected_by_default(tmp_path: Path) -> None:
    report, kept, reasons = _resubmission_report(tmp_path, None, ["2024-03-01T10:00:00Z", "2024-03-02T09:00:00Z"])
    assert kept == [] and report.rejected == {"contact": 2} and report.superseded == {}
    assert reasons == ["duplicate contact id: 2 rows share it; none is sent until the source is fixed"] * 2


def test_duplicates_keep_latest_keeps_the_latest_copy_and_notes_the_others(tmp_path: Path) -> None:
    policy = {"keep": "latest", "by": "received_on"}
    times = ["2024-03-02T09:00:00Z", "2024-03-02 10:30", "2024-03-01T10:00:00Z"]  # 10:30 Chicago is latest
    report, kept, reasons = _resubmission_report(tmp_path, policy, times)
    assert kept == ["copy 1"] and reasons == []
    assert report.superseded == {"contact": 2} and report.balanced()
    assert "contacts.csv row 2: an earlier copy of a contact resubmitted at row 3; the later copy is kept" in (
        " ".join(report.warnings))


def test_duplicates_keep_latest_cannot_choose_between_equal_times(tmp_path: Path) -> None:
    policy = {"keep": "latest", "by": "received_on"}
    report, kept, reasons = _resubmission_report(tmp_path, policy, ["2024-03-02T09:00:00Z", "2024-03-02T09:00:00Z"])
    assert kept == [] and report.rejected == {"contact": 2} and report.superseded == {}
    assert all("keep latest cannot choose" in reason for reason in reasons)


def test_the_app_json_example_reads_its_sample() -> None:
    from connector.read.program import read_program
    from connector.read.staging import Staging

    example = Path(__file__).parents[2] / "mappings" / "examples" / "app-json"
    with Staging() as staging:
        report = read_program(load_profile(example), [example / "sample"], staging)
        goals = {g.goal_id: g for g in staging.records(RecordKind.GOAL)}
        (visit,) = staging.records(RecordKind.CONTACT)
    assert report.accepted == {"supporter": 1, "enrollment": 1, "goal": 2, "contact": 1}
    assert report.rejected == {"(no kind)": 1} and report.superseded == {"contact": 1}
    assert goals["f-002"].target is not None and goals["f-002"].target.comparator == "<"
    assert goals["f-003"].target is None and goals["f-003"].achievement_status is None
    assert visit.support_types == ("emotional", "education", "community-linkage")  # the later copy


def test_a_column_another_field_reads_is_never_suggested(tmp_path: Path) -> None:
    from connector.read.program import read_program
    from connector.read.staging import Staging

    profile = make_profile({"supporter": {"source": {"files": ["staff.csv"]},
                                          "fields": {"staff_id": "staff_id", "given_name": "given",
                                                     "family_name": "family", "title": {"const": "promotora"},
                                                     "phone": "staff_idd"}}})
    (tmp_path / "staff.csv").write_text("staff_id,given,family\nS1,Ana,Peña\n")
    with Staging() as staging:
        report = read_program(profile, [tmp_path], staging)
    assert report.warnings == ["staff.csv: column 'staff_idd' (for supporter.phone) is missing from the file"]
