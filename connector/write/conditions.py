"""The EHR's own Conditions an enrollment addresses (``CarePlan.addresses``), found, never created.

A program names the conditions it works on as the export has them: ICD-10-CM codes ("E11.9"), ``system|code``
tokens, or free text ("type 2 diabetes"). Codes are looked up among the patient's Conditions at sync time, like
the Patient itself; free text is not a code and is not searched. A Condition counts only when one of its codings
is exactly a wanted (system, code) and it is not entered in error or refuted. A failed search leaves
``addresses`` empty (logged): the plan is written without it rather than not at all.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

from connector.errors import PeersyncError
from connector.identifiers import escape_token
from connector.server.client import FhirClient

log = logging.getLogger(__name__)

ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
# ICD-10-CM code shape: a letter, two characters, optionally a dot and up to four more (E11.9, E11.65, I10)
_ICD10CM_CODE = re.compile(r"^[A-TV-Z][0-9][0-9AB](\.[0-9A-TV-Z]{1,4})?$")
# Conditions that must not be linked: a record made in error, or a diagnosis ruled out
_NOT_LINKED = frozenset({"entered-in-error", "refuted"})
_MAX_CODES = 20  # one search, a short query string


def condition_codes(conditions: Iterable[str]) -> list[tuple[str, str]]:
    """The (system, code) pairs to search for: ICD-10-CM shaped values and explicit ``system|code`` tokens.

    Free text ("type 2 diabetes") yields nothing: it is not a code, and guessing one would link the wrong chart
    entry. Order and duplicates follow the input."""
    out: list[tuple[str, str]] = []
    for raw in conditions:
        value = raw.strip()
        if "|" in value:
            system, _, code = value.partition("|")
            if system.strip() and code.strip():
                out.append((system.strip(), code.strip()))
        elif _ICD10CM_CODE.fullmatch(value.upper()):
            out.append((ICD10CM, value.upper()))
    return list(dict.fromkeys(out))[:_MAX_CODES]


def matching_condition_ids(conditions: Iterable[dict[str, Any]], wanted: Sequence[tuple[str, str]]) -> list[str]:
    """Server ids of the Conditions with a coding exactly in ``wanted``, neither entered in error nor refuted."""
    wanted_set = set(wanted)
    ids = []
    for condition in conditions:
        verification = {c.get("code") for c in condition.get("verificationStatus", {}).get("coding", [])}
        if verification & _NOT_LINKED or not condition.get("id"):
            continue
        codings = {(c.get("system"), c.get("code")) for c in condition.get("code", {}).get("coding", [])}
        if codings & wanted_set:
            ids.append(str(condition["id"]))
    return sorted(set(ids))


def find_condition_refs(client: FhirClient, patient_id: str, conditions: Sequence[str]) -> list[str]:
    """Literal references (``Condition/123``) to the patient's Conditions the enrollment names; [] when it names
    no code, when none is found, or when the search fails (logged without the codes: they are PHI)."""
    wanted = condition_codes(conditions)
    if not wanted:
        return []
    query = ",".join(f"{escape_token(system)}|{escape_token(code)}" for system, code in wanted)
    try:
        found = list(client.search("Condition", {"patient": f"Patient/{patient_id}", "code": query}, max_pages=2))
    except PeersyncError as exc:
        log.warning("Condition search failed; the CarePlan is written without addresses: %s", type(exc).__name__,
                    extra={"event": "condition_lookup_failed"})
        return []
    return [f"Condition/{i}" for i in matching_condition_ids(found, wanted)]
