"""Business identifiers and logical references.

Every resource peersync writes (except Provenance) carries one business identifier,
``{base_url}/sid/{program_id}/{kind}`` + a value derived from the source id. Mappers reference other
resources with *conditional references* (``Goal?identifier=system|value``): valid FHIR inside a transaction,
and rewritten by the bundle builder to ``urn:uuid:`` (same bundle) or ``Type/id`` (known to the ledger).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache
from typing import Any
from urllib.parse import quote

_SAFE = re.compile(r"[A-Za-z0-9.-]")
_SAFE_ID = re.compile(r"[A-Za-z0-9.-]*")

# Identifier kinds (the last path segment of an identifier system).
KIND_STAFF = "staff"
KIND_ROLE = "role"
KIND_ORGANIZATION = "organization"
KIND_DEVICE = "device"
KIND_CAREPLAN = "careplan"
KIND_CARETEAM = "careteam"
KIND_GOAL = "goal"
KIND_CONTACT = "contact"
KIND_CONTACT_REQUEST = "contact-request"
KIND_CANCELLED_CONTACT = "cancelled-contact"  # the revoked request of a cancelled contact without a planned one
KIND_CONTACT_PROCEDURE = "contact-procedure"  # a contact also (or instead) written as a US Core Procedure
KIND_REFERRAL = "referral"
KIND_REFERRAL_TASK = "referral-task"
KIND_CBO = "cbo"
KIND_NOTE = "note"  # a clinical note (DocumentReference) per participant per period


def identifier_value(source_id: str) -> str:
    """A safe identifier value ([A-Za-z0-9._-]) for a source id; injective, and readable for plain ids.

    Characters outside [A-Za-z0-9.-] (including '_' itself) become '_' + two hex digits per UTF-8 byte.
    """
    if _SAFE_ID.fullmatch(source_id):
        return source_id
    out = []
    for ch in source_id:
        if _SAFE.match(ch):
            out.append(ch)
        else:
            out.extend(f"_{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


@lru_cache(maxsize=1024)
def identifier_system(base_url: str, program_id: str, kind: str, *, retired: bool = False) -> str:
    """The identifier system for one kind of record of one program (``retired`` for moved records)."""
    middle = "retired/" if retired else ""
    return f"{base_url}/sid/{program_id}/{middle}{kind}"


def escape_token(value: str) -> str:
    r"""Escape a token search value per FHIR R4 search §3.1.1.4.19: ``\``, ``|``, ``,`` and ``$`` get a backslash."""
    return value.replace("\\", "\\\\").replace("|", "\\|").replace(",", "\\,").replace("$", "\\$")


def token_query(system: str, value: str) -> str:
    """``system|value`` for an ``identifier=`` search, escaped then percent-encoded (safe in a URL query)."""
    # identifier values are usually [A-Za-z0-9._-] (see identifier_value): nothing to escape or encode
    encoded = value if _UNRESERVED.fullmatch(value) else quote(escape_token(value), safe="")
    return _encoded_system(system) + "%7C" + encoded


_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")  # what quote() never encodes and escape_token() never escapes


@lru_cache(maxsize=1024)
def _encoded_system(system: str) -> str:
    return quote(escape_token(system), safe="")


@lru_cache(maxsize=65536)
def conditional_reference(resource_type: str, system: str, value: str) -> str:
    """A conditional reference ``Type?identifier=system|value`` (unencoded: the canonical logical form)."""
    return f"{resource_type}?identifier={escape_token(system)}|{escape_token(value)}"


def conditional_url(resource_type: str, system: str, value: str) -> str:
    """The request URL of a conditional update ``Type?identifier=...`` with the value properly encoded."""
    return f"{resource_type}?identifier={token_query(system, value)}"


@lru_cache(maxsize=65536)
def parse_conditional_reference(reference: str) -> tuple[str, str, str] | None:
    """(type, system, value) of a conditional reference made by :func:`conditional_reference`, else None."""
    # cached: the same few references (Patient, CarePlan, supporter, program) recur in every bundle
    head, sep, query = reference.partition("?identifier=")
    if not sep:
        return None
    if "\\" not in query:  # nothing escaped: the first '|' separates system and value
        system, bar, value = query.partition("|")
        return (head, system, value) if bar else None
    parts = re.split(r"(?<!\\)\|", query, maxsplit=1)
    if len(parts) != 2:
        return None
    unescape = lambda s: re.sub(r"\\([\\|,$])", r"\1", s)  # noqa: E731
    return head, unescape(parts[0]), unescape(parts[1])


def reference_strings(node: Any) -> Iterator[str]:
    """Every ``Reference.reference`` string inside a resource (or any part of one), in document order."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            else:
                yield from reference_strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from reference_strings(item)
