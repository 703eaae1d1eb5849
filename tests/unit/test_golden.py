"""Golden files: each source record in tests/golden/inputs/ maps to exactly tests/golden/expected/.

Run ``python -m pytest tests/unit/test_golden.py --update-golden`` after a deliberate mapping change, then
review the diff of tests/golden/expected/ like code.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from connector import map as mappers
from connector.map import MappingContext
from connector.map.note import group_notes, map_note, render_note
from connector.model import (
    Contact,
    Enrollment,
    Goal,
    PlannedContact,
    Referral,
    Supporter,
)
from connector.write.bundle import PendingWrite, UnitWrite
from connector.write.changeset import build_change_set

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
INPUTS = GOLDEN / "inputs"
EXPECTED = GOLDEN / "expected"
# the mapping time of every golden file, so they stay stable
MAPPING_TIME = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)

RECORD_TYPES = {
    "map_supporter": Supporter,
    "map_enrollment": Enrollment,
    "map_goal": Goal,
    "map_contact": Contact,
    "map_contact_procedure": Contact,
    "map_planned_contact": PlannedContact,
    "map_referral": Referral,
}


def _shared() -> dict[str, Any]:
    return json.loads((INPUTS / "_shared.json").read_text(encoding="utf-8"))


def golden_cases() -> list[str]:
    return sorted(p.stem for p in INPUTS.glob("*.json") if not p.name.startswith("_"))


def map_case(case: dict[str, Any]) -> list[dict[str, Any]]:
    """Run the mapper a golden input names; always a list of resources."""
    shared = _shared()
    ctx = MappingContext(**shared["context"])
    enrollment = Enrollment.model_validate(shared["enrollment"])
    name = case["mapper"]
    kwargs = dict(case.get("kwargs", {}))
    record = RECORD_TYPES[name].model_validate(case["record"]) if name in RECORD_TYPES else None
    if name == "map_program":
        return mappers.map_program(ctx)
    if name == "map_supporter":
        return mappers.map_supporter(record, ctx)
    if name == "map_enrollment":
        supporter = Supporter.model_validate(shared["supporter"]) if kwargs.pop("with_supporter", False) else None
        team = [mappers.TeamMember(m["supporter_id"], date.fromisoformat(m["since"])) for m in kwargs.pop("team", [])]
        words = {g["goal_id"]: g["description"] for g in shared.get("goals", [])}  # as units.py gives them
        return mappers.map_enrollment(record, ctx=ctx, supporter=supporter, team=team, goal_words=words, **kwargs)
    if name == "map_goal":
        return [mappers.map_goal(record, enrollment, ctx)]
    if name == "map_contact":
        # as units.py maps it: with the contact's supporter and the goals it discussed (for the narrative);
        # "without_supporter" shows the narrative of a contact whose supporter is unknown
        supporter = None if kwargs.pop("without_supporter", False) else Supporter.model_validate(shared["supporter"])
        goals = [Goal.model_validate(g) for g in shared["goals"] if g["goal_id"] in record.goal_ids]
        request = mappers.map_cancelled_contact_request(record, enrollment, ctx)
        return ([request] if request else []) + [mappers.map_contact(record, enrollment, ctx, supporter=supporter,
                                                                      goals=goals)]
    if name == "map_contact_procedure":
        supporter = Supporter.model_validate(shared["supporter"])
        goals = [Goal.model_validate(g) for g in shared["goals"] if g["goal_id"] in record.goal_ids]
        return [mappers.map_contact_procedure(record, enrollment, ctx, supporter=supporter, goals=goals)]
    if name == "map_planned_contact":
        return [mappers.map_planned_contact(record, enrollment, ctx)]
    if name == "map_referral":
        cbo = mappers.map_cbo(record, ctx)
        return mappers.map_referral(record, enrollment, ctx) + ([cbo] if cbo else [])
    if name == "change_set":
        return _change_set_provenances(case, enrollment, ctx)
    if name == "map_note":
        return [map_note(note, ctx) for note in note_case(case, ctx)]
    if name == "map_provenance":
        return [mappers.map_provenance(kwargs.pop("targets"), recorded=MAPPING_TIME, ctx=ctx, **kwargs)]
    raise AssertionError(f"unknown mapper in golden input: {name}")


def _change_set_provenances(case: dict[str, Any], enrollment: Enrollment, ctx: MappingContext) -> list[dict[str, Any]]:
    """The Provenances of one change-set over the case's records (``kind``: goal, contact or referral), each unit
    sent for the first time unless listed in ``updated``: what a sync credits to whom."""
    mappers_by_kind = {"goal": (Goal, lambda r: [mappers.map_goal(r, enrollment, ctx)]),
                       "contact": (Contact, lambda r: [mappers.map_contact(r, enrollment, ctx)]),
                       "referral": (Referral, lambda r: mappers.map_referral(r, enrollment, ctx))}
    writes = []
    for item in case["records"]:
        model, mapper = mappers_by_kind[item["kind"]]
        record = model.model_validate(item["record"])
        unit_key = f"{item['kind']}:{record.key}"
        writes.append(PendingWrite(UnitWrite(unit_key, item["kind"], mapper(record)), "h",
                                   first_send=unit_key not in case.get("updated", [])))
    built = build_change_set(writes, ctx=ctx, patient=None, resolve=lambda _identity: None, recorded=MAPPING_TIME)
    return [e["resource"] for e in built.bundle["entry"] if e["resource"]["resourceType"] == "Provenance"]


def note_case(case: dict[str, Any], ctx: MappingContext) -> list[Any]:
    """The notes of a clinical-note golden input (the shared enrollment and supporter, its records)."""
    shared = _shared()
    return group_notes(
        Enrollment.model_validate(shared["enrollment"]),
        [Contact.model_validate(c) for c in case.get("contacts", [])],
        [Goal.model_validate(g) for g in case.get("goals", [])],
        [Referral.model_validate(r) for r in case.get("referrals", [])],
        [PlannedContact.model_validate(p) for p in case.get("planned", [])],
        {"S01": Supporter.model_validate(shared["supporter"])},
        kind=case["kwargs"]["period"], timezone=ctx.timezone)


def _dump(resources: list[dict[str, Any]]) -> str:
    return json.dumps(resources, indent=2, ensure_ascii=False) + "\n"


@pytest.mark.parametrize("case_name", golden_cases())
def test_golden(case_name: str, update_golden: bool) -> None:
    case = json.loads((INPUTS / f"{case_name}.json").read_text(encoding="utf-8"))
    actual = _dump(map_case(case))
    expected_path = EXPECTED / f"{case_name}.json"
    if update_golden:
        EXPECTED.mkdir(parents=True, exist_ok=True)
        expected_path.write_text(actual, encoding="utf-8")
        return
    assert expected_path.is_file(), f"no golden file {expected_path}; run with --update-golden and review it"
    assert json.loads(actual) == json.loads(expected_path.read_text(encoding="utf-8")), (
        f"{case_name}: mapping differs from {expected_path.relative_to(GOLDEN.parent.parent)}; if the change is "
        "intended, run with --update-golden and review the diff"
    )


NOTE_CASES = [c for c in golden_cases()
              if json.loads((INPUTS / f"{c}.json").read_text(encoding="utf-8"))["mapper"] == "map_note"]


@pytest.mark.parametrize("case_name", NOTE_CASES)
def test_golden_note_text(case_name: str, update_golden: bool) -> None:
    """The clinical notes' plain text and HTML, readable in review (the JSON golden file has them in base64)."""
    case = json.loads((INPUTS / f"{case_name}.json").read_text(encoding="utf-8"))
    ctx = MappingContext(**_shared()["context"])
    rendered = [render_note(note, ctx) for note in note_case(case, ctx)]
    for suffix, actual in (("txt", "\n\f\n".join(r.plain for r in rendered)),
                           ("html", "\n".join(r.html for r in rendered))):
        path = EXPECTED / f"{case_name}.{suffix}"
        if update_golden:
            path.write_text(actual, encoding="utf-8")
            continue
        assert path.is_file(), f"no golden file {path}; run with --update-golden and review it"
        assert actual == path.read_text(encoding="utf-8"), f"{case_name}: note {suffix} differs from {path.name}"


def test_golden_files_have_inputs() -> None:
    """No stale expected file without an input."""
    stale = {p.stem for p in EXPECTED.glob("*.json")} - set(golden_cases())
    assert not stale, f"expected files without inputs: {sorted(stale)}"


def test_golden_inputs_cover_every_mapper() -> None:
    used = {json.loads((INPUTS / f"{c}.json").read_text(encoding="utf-8"))["mapper"] for c in golden_cases()}
    assert used >= {
        "map_program",
        "map_supporter",
        "map_enrollment",
        "map_goal",
        "map_contact",
        "map_contact_procedure",
        "map_planned_contact",
        "map_referral",
        "map_provenance",
        "map_note",
    }


def test_golden_examples_in_docs_match_the_golden_files() -> None:
    """Every JSON example in docs/fhir-mapping.md is a resource of some golden file (no stale docs)."""
    import re

    doc = (GOLDEN.parent.parent / "docs" / "fhir-mapping.md").read_text(encoding="utf-8")
    examples = [json.loads(block) for block in re.findall(r"```json\n(.*?)\n```", doc, flags=re.S)]
    golden = [r for p in EXPECTED.glob("*.json") for r in json.loads(p.read_text(encoding="utf-8"))]
    assert examples
    for example in examples:
        assert example in golden, f"docs/fhir-mapping.md example {example['resourceType']} is not in any golden file"
