"""Mapping profiles: the shipped ones load, and broken ones are reported at the right line and path."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from connector import assets
from connector.cli import main
from connector.errors import ExitCode, ProfileError
from connector.model import RecordKind
from connector.read.profile import (
    PROFILE_FORMAT_VERSION,
    Profile,
    ProfileProblem,
    allowed_modifiers,
    check_profile,
    load_profile,
    resolve_profile_path,
)

MAPPINGS = assets.mappings_dir()
TEMPLATE = MAPPINGS / "peersync-template" / "profile.yaml"
TEMPLATE_LINES = TEMPLATE.read_text(encoding="utf-8").splitlines()


def line_of(text: str, lines: list[str] = TEMPLATE_LINES) -> int:
    """1-based number of the only line starting with ``text``."""
    found = [i + 1 for i, line in enumerate(lines) if line.startswith(text)]
    assert len(found) == 1, (text, found)
    return found[0]


def broken(tmp_path: Path, replace: str, by: str | None) -> Path:
    """The template with one line replaced (``by`` None: removed), written as tmp_path/profile.yaml."""
    lines = list(TEMPLATE_LINES)
    index = line_of(replace) - 1
    if by is None:
        del lines[index]
    else:
        lines[index] = by
    path = tmp_path / "profile.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def only_problem(path: Path) -> ProfileProblem:
    profile, problems = check_profile(path)
    assert profile is None
    assert len(problems) == 1, problems
    return problems[0]


# -- shipped profiles ----------------------------------------------------------------------------


def test_the_shipped_template_loads() -> None:
    profile = load_profile("peersync-template")
    assert isinstance(profile, Profile)
    assert profile.format_version == PROFILE_FORMAT_VERSION == 1
    assert set(profile.records) == set(RecordKind)
    assert profile.program.timezone == "America/Chicago"
    assert check_profile(TEMPLATE) == (profile, [])


@pytest.mark.parametrize("profile_dir", sorted(p.parent.name for p in MAPPINGS.glob("*/profile.yaml")))
def test_every_shipped_profile_checks_clean(profile_dir: str) -> None:
    profile, problems = check_profile(MAPPINGS / profile_dir / "profile.yaml")
    assert problems == [] and profile is not None and profile.name == profile_dir


def test_the_worked_example_profile_checks_clean() -> None:
    profile, problems = check_profile(MAPPINGS / "examples" / "sheets-es" / "profile.yaml")
    assert problems == [] and profile is not None


def test_profile_reference_forms(tmp_path: Path) -> None:
    assert resolve_profile_path("peersync-template") == TEMPLATE
    assert resolve_profile_path(TEMPLATE.parent) == TEMPLATE
    assert resolve_profile_path(TEMPLATE) == TEMPLATE
    with pytest.raises(ProfileError, match="profile not found"):
        resolve_profile_path(tmp_path / "nope")


def test_load_profile_raises_with_every_problem(tmp_path: Path) -> None:
    path = broken(tmp_path, "  timezone: America/Chicago", "  timezone: Mars/Olympus_Mons")
    with pytest.raises(ProfileError) as caught:
        load_profile(path)
    line = line_of("  timezone:")
    assert f"line {line}: program.timezone: unknown time zone 'Mars/Olympus_Mons'" in str(caught.value)
    assert caught.value.exit_code == ExitCode.CONFIG_ERROR


# -- problems with line numbers ------------------------------------------------------------------


def test_bad_yaml_tab(tmp_path: Path) -> None:
    path = broken(tmp_path, "  timezone: America/Chicago", "\ttimezone: America/Chicago")
    problem = only_problem(path)
    assert problem.line == line_of("  timezone:")
    assert problem.message.startswith("not valid YAML: found character '\\t'")


def test_bad_yaml_indentation(tmp_path: Path) -> None:
    path = broken(tmp_path, "  timezone: America/Chicago", "     timezone: America/Chicago")
    problem = only_problem(path)
    assert problem.line == line_of("  timezone:")
    assert problem.message.startswith("not valid YAML")


def test_bad_yaml_unclosed_bracket(tmp_path: Path) -> None:
    path = broken(tmp_path, "  list_separator:", '  list_separator: [";"')
    problem = only_problem(path)
    assert problem.message.startswith("not valid YAML")
    assert problem.line >= line_of("  list_separator:")


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = broken(tmp_path, "description:", "descripton: a typo")
    problem = only_problem(path)
    assert (problem.line, problem.path, problem.message) == (line_of("description:"), "descripton",
                                                             "Extra inputs are not permitted")


def test_unknown_key_in_a_field_spec(tmp_path: Path) -> None:
    path = broken(tmp_path, "      setting: {column: setting", "      setting: {colum: setting, codes: settings}")
    problems = check_profile(path)[1]
    assert {p.line for p in problems} == {line_of("      setting: {column: setting")}
    assert [(p.path, p.message) for p in problems] == [("records.contact.fields.setting.colum",
                                                       "Extra inputs are not permitted")]


def test_unknown_field_name_for_a_kind(tmp_path: Path) -> None:
    path = broken(tmp_path, "      group_session_id: group_session_id", "      group_id: group_session_id")
    problem = only_problem(path)
    assert problem.line == line_of("      group_session_id: group_session_id")
    assert problem.path == "records.contact.fields.group_id"
    assert problem.message.startswith("no such field for contact (known: contact_id, duration_minutes")


def test_missing_required_field_mapping(tmp_path: Path) -> None:
    path = broken(tmp_path, "      noted_on: date", None)
    problem = only_problem(path)
    goal_note_fields = line_of("  goal_note:") + 2  # records.goal_note.fields
    assert TEMPLATE_LINES[goal_note_fields - 1].strip() == "fields:"
    assert (problem.line, problem.path, problem.message) == (goal_note_fields, "records.goal_note.fields",
                                                             "required field(s) not mapped: noted_on")


def test_missing_enrollments(tmp_path: Path) -> None:
    text = TEMPLATE.read_text(encoding="utf-8").replace("  enrollment:\n", "  enrolment:\n")
    (tmp_path / "profile.yaml").write_text(text, encoding="utf-8")
    problems = check_profile(tmp_path / "profile.yaml")[1]
    assert problems[0].line == line_of("  enrollment:")
    assert problems[0].path.startswith("records.enrolment")


def test_code_table_that_does_not_exist(tmp_path: Path) -> None:
    path = broken(tmp_path, "      outcome: {column: outcome, codes: outcomes}",
                  "      outcome: {column: outcome, codes: outcome_codes}")
    problem = only_problem(path)
    assert problem.line == line_of("      outcome: {column: outcome, codes: outcomes}")
    assert problem.path == "records.contact.fields.outcome.codes"
    assert problem.message == "no code table named 'outcome_codes'"


def test_two_sources_in_one_field_spec(tmp_path: Path) -> None:
    path = broken(tmp_path, "      outcome: {column: outcome, codes: outcomes}",
                  "      outcome: {column: outcome, const: completed}")
    problem = only_problem(path)
    assert problem.line == line_of("      outcome: {column: outcome, codes: outcomes}")
    assert problem.path == "records.contact.fields.outcome"
    assert problem.message == "give exactly one of column, const, template or checkboxes (found column, const)"


def test_no_source_in_a_field_spec(tmp_path: Path) -> None:
    path = broken(tmp_path, "      outcome: {column: outcome, codes: outcomes}", "      outcome: {codes: outcomes}")
    assert only_problem(path).message == "give exactly one of column, const, template or checkboxes"


def test_bad_time_zone(tmp_path: Path) -> None:
    path = broken(tmp_path, "  timezone: America/Chicago", "  timezone: CST")
    problem = only_problem(path)
    assert (problem.line, problem.path) == (line_of("  timezone:"), "program.timezone")
    assert "unknown time zone 'CST'" in problem.message


@pytest.mark.parametrize("version", ["2", "0", "one"])
def test_wrong_format_version(tmp_path: Path, version: str) -> None:
    path = broken(tmp_path, "format_version: 1", f"format_version: {version}")
    problem = only_problem(path)
    assert (problem.line, problem.path) == (line_of("format_version: 1"), "format_version")
    if version.isdigit():
        assert problem.message == f"unsupported format_version {version}; this peersync reads 1"


def test_bad_codes_in_element_rules(tmp_path: Path) -> None:
    path = broken(tmp_path, "  outreach: [ongoing-follow-up-support]", "  outreach: [hugs]")
    problem = only_problem(path)
    assert (problem.line, problem.path) == (line_of("  outreach: [ongoing-follow-up-support]"),
                                            "element_rules.outreach.0")


def test_unquoted_numbers_in_code_tables_are_reported(tmp_path: Path) -> None:
    # Documented pitfall: REDCap codes must be quoted ("2"), YAML reads 2 as a number.
    path = broken(tmp_path, '    video: ["video call", "videollamada", "zoom"]', "    video: [3, zoom]")
    problem = only_problem(path)
    assert (problem.line, problem.path) == (line_of('    video: ["video call"'), "code_tables.modes.video.0")


def test_missing_program_key(tmp_path: Path) -> None:
    path = broken(tmp_path, "  mrn_system:", None)
    problem = only_problem(path)
    assert (problem.line, problem.path, problem.message) == (line_of("program:"), "program.mrn_system",
                                                             "Field required")


def test_not_a_mapping_and_empty_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("- just\n- a list\n")
    assert check_profile(tmp_path / "a.yaml") == (None, [ProfileProblem(1, "", "a profile must be a YAML mapping "
                                                                               "(key: value lines)")])
    (tmp_path / "b.yaml").write_text("")
    assert check_profile(tmp_path / "b.yaml")[1][0].line == 1


def test_problem_text() -> None:
    assert str(ProfileProblem(12, "program.timezone", "bad")) == "line 12: program.timezone: bad"
    assert str(ProfileProblem(0, "", "cannot read")) == "file: cannot read"


# -- the CLI -------------------------------------------------------------------------------------


def test_cli_profile_check_ok() -> None:
    result = CliRunner().invoke(main, ["profile", "check", "peersync-template"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{TEMPLATE}: ok (profile 'peersync-template', program 'demo-program', kinds:")


def test_cli_profile_check_broken(tmp_path: Path) -> None:
    path = broken(tmp_path, "      outcome: {column: outcome, codes: outcomes}",
                  "      outcome: {column: outcome, codes: outcome_codes}")
    result = CliRunner().invoke(main, ["profile", "check", str(tmp_path)])
    assert result.exit_code == ExitCode.CONFIG_ERROR == 78
    line = line_of("      outcome: {column: outcome, codes: outcomes}")
    assert f"{path}:{line}: records.contact.fields.outcome.codes: no code table named 'outcome_codes'" in result.stderr
    assert result.stdout == ""


def test_cli_profile_check_bad_yaml_and_missing(tmp_path: Path) -> None:
    path = broken(tmp_path, "  timezone: America/Chicago", "\ttimezone: America/Chicago")
    result = CliRunner().invoke(main, ["profile", "check", str(path)])
    assert result.exit_code == 78
    assert f"{path}:{line_of('  timezone:')}: not valid YAML" in result.stderr
    result = CliRunner().invoke(main, ["profile", "check", str(tmp_path / "nowhere")])
    assert result.exit_code == 78 and "profile not found" in result.stderr


# -- modifiers that do not apply to a field ---------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "replacement", "modifier"),
    [
        ("      target_unit: target_unit", "      target_unit: {column: target_unit, codes: outcomes}", "codes"),
        ("      target_unit: target_unit", "      target_unit: {column: target_unit, unknown: other}", "unknown"),
        ("      target_value: target_value", "      target_value: {column: target_value, split: ','}", "split"),
        ("      description: goal_in_own_words",
         "      description: {column: goal_in_own_words, formats: ['%Y']}", "formats"),
        ("      target_unit: target_unit", "      target_unit: {column: target_unit, true_values: ['x']}",
         "true_values"),
    ],
)
def test_a_modifier_that_does_not_apply_is_an_error_at_its_line(
    tmp_path: Path, line: str, replacement: str, modifier: str
) -> None:
    problem = only_problem(broken(tmp_path, line, replacement))
    assert problem.line == line_of(line)
    field = line.strip().split(":")[0]
    assert problem.path == f"records.goal.fields.{field}.{modifier}"
    assert "does not apply" in problem.message and "remove it" in problem.message


def test_allowed_modifiers_follow_the_field_type() -> None:
    assert allowed_modifiers(RecordKind.CONTACT, "mode") == {"codes", "unknown", "default", "when"}
    assert allowed_modifiers(RecordKind.CONTACT, "support_types") == {
        "codes", "unknown", "split", "default", "when"}
    assert allowed_modifiers(RecordKind.CONTACT, "occurred_at") == {"formats", "default", "when"}
    assert allowed_modifiers(RecordKind.CONTACT, "void") == {"true_values", "default", "when"}
    assert allowed_modifiers(RecordKind.GOAL, "target_unit") == {"default", "when"}


def test_code_table_null_entry_and_when_conditions_check_clean(tmp_path: Path) -> None:
    text = TEMPLATE.read_text(encoding="utf-8")
    text = text.replace("      target_measure: target_measure",
                        "      target_measure: {const: hba1c, when: {column: target_value, present: true}}")
    path = tmp_path / "profile.yaml"
    path.write_text(text, encoding="utf-8")
    profile, problems = check_profile(path)
    assert problems == [] and profile is not None
    spec = profile.records[RecordKind.GOAL].fields["target_measure"]
    assert spec.when is not None and spec.columns_used() == ["target_value"]


def test_a_condition_needs_exactly_one_test(tmp_path: Path) -> None:
    line = "      target_measure: target_measure"
    problem = only_problem(broken(tmp_path, line, "      target_measure: {const: hba1c, when: {column: x}}"))
    assert problem.line == line_of(line)
    assert "give exactly one of equals, in or present" in problem.message


def test_duplicates_policy_is_refused_on_enrollments(tmp_path: Path) -> None:
    line = "  enrollment:"
    path = broken(tmp_path, line, "  enrollment:\n    duplicates: {keep: latest, by: received_on}")
    problem = only_problem(path)
    assert problem.path == "records.enrollment.duplicates"
    assert problem.line == line_of(line) + 1
