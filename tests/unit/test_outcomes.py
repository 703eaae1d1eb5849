"""CarePlan outcome links to contacts that did not land (connector/write/outcomes.py)."""

from __future__ import annotations

from typing import Any

from connector.identifiers import conditional_reference
from connector.write.outcomes import without_unknown_outcomes

SYSTEM = "https://ps.example.org/sid/demo/contact"


def ref(value: str) -> dict[str, str]:
    return {"reference": conditional_reference("Communication", SYSTEM, value)}


def careplan() -> dict[str, Any]:
    return {"resourceType": "CarePlan", "activity": [
        {"outcomeReference": [ref("C1"), ref("BAD")], "reference": {"reference": "CommunicationRequest/1"}},
        {"reference": {"reference": "ServiceRequest/2"}},
        {"outcomeReference": [ref("BAD2")]},
    ]}


def test_only_links_to_unknown_contacts_are_dropped_and_empty_activities_with_them() -> None:
    original = careplan()
    out, dropped = without_unknown_outcomes(original, lambda identity: identity[2] == "C1")
    assert dropped == 2
    assert out["activity"] == [
        {"outcomeReference": [ref("C1")], "reference": {"reference": "CommunicationRequest/1"}},
        {"reference": {"reference": "ServiceRequest/2"}},
    ]
    assert original == careplan()  # the unit's own resource is left as mapped


def test_nothing_to_drop_leaves_the_careplan_as_it_was() -> None:
    out, dropped = without_unknown_outcomes(careplan(), lambda identity: True)
    assert (out, dropped) == (careplan(), 0)
    out, dropped = without_unknown_outcomes({"resourceType": "CarePlan"}, lambda identity: False)
    assert (out, dropped) == ({"resourceType": "CarePlan"}, 0)
