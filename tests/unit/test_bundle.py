"""The transaction builder: conditional PUTs, escaping, reference rewriting, no duplicate conditions."""

from __future__ import annotations

from urllib.parse import unquote

from connector.identifiers import (
    conditional_reference,
    escape_token,
    identifier_value,
    parse_conditional_reference,
    token_query,
)
from connector.write.bundle import (
    UnitWrite,
    build_transaction,
    full_url,
    identity_of,
    parse_location,
)

SYS_GOAL = "https://p.example.org/ps/sid/demo/goal"
SYS_PLAN = "https://p.example.org/ps/sid/demo/careplan"
MRN = ("Patient", "urn:oid:1.2.3", "MRN0001")


def goal(value: str) -> dict:
    return {"resourceType": "Goal", "identifier": [{"system": SYS_GOAL, "value": value}],
            "subject": {"reference": conditional_reference(*MRN)}}


def careplan(goals: list[str]) -> dict:
    return {"resourceType": "CarePlan", "identifier": [{"system": SYS_PLAN, "value": "E1"}],
            "subject": {"reference": conditional_reference(*MRN)},
            "goal": [{"reference": conditional_reference("Goal", SYS_GOAL, g)} for g in goals]}


def test_entries_are_conditional_puts_with_deterministic_fullurls() -> None:
    built = build_transaction([UnitWrite("goal:G1", "goal", [goal("G1")])], patient=(MRN, "Patient/7"),
                              resolve=lambda i: None)
    entry = built.bundle["entry"][0]
    assert entry["request"] == {"method": "PUT", "url": f"Goal?identifier={token_query(SYS_GOAL, 'G1')}"}
    assert entry["fullUrl"] == full_url(("Goal", SYS_GOAL, "G1")) == full_url(("Goal", SYS_GOAL, "G1"))
    assert entry["resource"]["subject"]["reference"] == "Patient/7"
    assert built.entries == [("goal:G1", ("Goal", SYS_GOAL, "G1"))]


def test_references_rewritten_in_bundle_known_or_left_conditional() -> None:
    units = [UnitWrite("goal:G1", "goal", [goal("G1")]),
             UnitWrite("enrollment:E1", "enrollment", [careplan(["G1", "G2", "G3"])])]
    known = {("Goal", SYS_GOAL, "G2"): "42"}
    built = build_transaction(units, patient=(MRN, "Patient/7"), resolve=known.get)
    refs = [g["reference"] for g in built.bundle["entry"][1]["resource"]["goal"]]
    assert refs[0] == built.bundle["entry"][0]["fullUrl"]  # same bundle -> urn:uuid
    assert refs[1] == "Goal/42"  # known to the ledger -> literal
    assert parse_conditional_reference(refs[2]) == ("Goal", SYS_GOAL, "G3")  # unknown -> server resolves


def test_same_condition_never_twice_and_provenance_targets_every_entry() -> None:
    units = [UnitWrite("goal:G1", "goal", [goal("G1")]), UnitWrite("goal:G1b", "goal", [goal("G1")])]
    built = build_transaction(units, patient=None, resolve=lambda i: None,
                              provenances=lambda bundled: [({"resourceType": "Provenance",
                                                             "target": [{"reference": b.full_url} for b in bundled]},
                                                            None)])
    urls = [e["request"]["url"] for e in built.bundle["entry"]]
    assert len(urls) == 2 and urls.count(urls[0]) == 1
    assert built.bundle["entry"][-1]["request"] == {"method": "POST", "url": "Provenance"}
    assert built.bundle["entry"][-1]["resource"]["target"] == [{"reference": built.bundle["entry"][0]["fullUrl"]}]


def test_token_escaping_then_percent_encoding() -> None:
    assert escape_token("a|b,c$d\\e") == "a\\|b\\,c\\$d\\\\e"
    query = token_query("https://x/sid/p/goal", "a+b c|d")
    assert "+" not in query and " " not in query and "|" not in query
    system, _, value = unquote(query).partition("|")
    assert system == "https://x/sid/p/goal" and value == "a+b c\\|d"


def test_identifier_values_are_safe_and_injective() -> None:
    samples = ["C1", "a|b", "a_7Cb", "x,y", "$", "\\", "=HYPERLINK(\"x\")", "é", "_", "a b"]
    values = [identifier_value(s) for s in samples]
    assert len(set(values)) == len(samples)
    assert all(set(v) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") for v in values)


def test_parse_location_variants() -> None:
    assert parse_location("Goal/123/_history/2") == ("123", "2")
    assert parse_location("http://h/fhir/Goal/abc/_history/10") == ("abc", "10")
    assert parse_location("Goal/123") == ("123", None)
    assert parse_location(None) == (None, None)
    assert identity_of(goal("G9")) == ("Goal", SYS_GOAL, "G9")
