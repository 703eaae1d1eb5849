"""The six essential elements: recorded directly, or derived from what the contact row says happened; the demo
program shows every one of them in its mapped output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from connector.map import MappingContext
from connector.map.codes import CS_ESSENTIAL_ELEMENT
from connector.map.export import map_program
from connector.model import EssentialElement, SupportType
from connector.read.elements import derived_elements
from connector.read.profile import load_profile
from connector.read.staging import Staging

DEMO = Path(__file__).resolve().parents[2] / "fixtures" / "demo"
RULES = load_profile("peersync-template").element_rules


def derive(*, supports: tuple[str, ...] = (), goals: tuple[str, ...] = (), purpose: str | None = None,
           outcome: str | None = "completed") -> tuple[str, ...]:
    return derived_elements(support_types=supports, goal_ids=goals, purpose=purpose, outcome=outcome,
                            element_rules=RULES)


def test_support_types_imply_the_elements_their_rules_list() -> None:
    assert derive(supports=("education", "community-linkage")) == (
        "education-skills-training", "community-resource-linkage")
    assert derived_elements(support_types=("education",), goal_ids=(), purpose=None, outcome="completed",
                            element_rules={}) == ()


def test_goals_discussed_at_a_completed_contact_are_collaborative_goal_setting() -> None:
    assert derive(goals=("G1",)) == ("collaborative-goal-setting",)
    assert derive(goals=("G1",), outcome="not-reached") == ()  # nobody was reached: no goal was discussed


@pytest.mark.parametrize(("purpose", "expected"), [
    ("intake", ("individualized-assessment",)),
    ("assessment", ("individualized-assessment",)),
    ("goal-setting", ("collaborative-goal-setting",)),
    ("follow-up", ()),  # a check-in implies nothing by itself: its support types say what it delivered
])
def test_a_contact_purpose_implies_its_element(purpose: str, expected: tuple[str, ...]) -> None:
    assert derive(purpose=purpose) == expected
    assert derive(purpose=purpose, outcome="cancelled") == ()


def test_derived_elements_keep_their_order_without_duplicates() -> None:
    got = derive(supports=("outreach", "follow-up", "care-coordination"), goals=("G1", "G2"), purpose="intake")
    assert got == ("ongoing-follow-up-support", "clinical-care-access", "individualized-assessment",
                   "collaborative-goal-setting")
    assert derive(supports=("outreach",), outcome="not-reached") == ("ongoing-follow-up-support",)


def test_the_shipped_profiles_give_every_support_type_but_other_an_element() -> None:
    for name in ("peersync-template", "redcap-example"):
        rules = load_profile(name).element_rules
        assert set(rules) == set(SupportType) - {SupportType.OTHER}, name


@pytest.mark.parametrize(("profile", "folder"), [("peersync-template", "template"), ("redcap-example", "redcap")])
def test_the_demo_shows_all_six_elements(profile: str, folder: str, tmp_path: Path) -> None:
    ctx = MappingContext(program_id="demo", program_name="Demo", base_url="https://demo.example.org",
                         mrn_system="urn:oid:2.16.840.1.113883.3.9999.1")
    with Staging(tmp_path / "s.sqlite") as staging:
        map_program(load_profile(profile), [DEMO / folder], ctx, tmp_path / "out", staging)
    seen: set[str] = set()
    with (tmp_path / "out" / "Communication.ndjson").open(encoding="utf-8") as handle:
        for line in handle:
            for category in json.loads(line).get("category", []):
                seen.update(c["code"] for c in category["coding"] if c["system"].endswith(CS_ESSENTIAL_ELEMENT))
    missing = {e.value for e in EssentialElement} - seen
    assert not missing, f"essential elements never in the demo's mapped output: {sorted(missing)}"
