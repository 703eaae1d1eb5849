"""Does a server answer prove the write? Pure decisions over the request Bundle and the HTTP answer.

A record is marked sent only when the server's answer proves that each of its entries was written: a
``transaction-response`` (or ``batch-response``) Bundle with exactly one entry per request entry, each with a
2xx status and a ``location`` naming the resource written. A conditional create that matched an existing
resource (HAPI's answer to ``ifNoneExist``) may answer 200 or 304 without a location: that too proves the
resource exists. Anything else (an empty or short Bundle, an entry without status or location, JSON that is
not a Bundle, an HTML page, an empty body) confirms nothing; the records stay pending with the reason.

Reasons never contain patient data: only statuses, counts, resource types and content types.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from connector.write.bundle import parse_location

RESPONSE_TYPES = frozenset({"transaction-response", "batch-response"})
_STATUS = re.compile(r"^\s*(\d{3})\b")


@dataclass(frozen=True)
class EntryVerdict:
    """What the answer proves about one request entry."""

    confirmed: bool
    status: str = ""  # the entry's HTTP status code ("201"), "" when missing
    server_id: str | None = None
    version: str | None = None
    reason: str | None = None  # why it is not confirmed (PHI-free)


@dataclass(frozen=True)
class Confirmation:
    """One verdict per request entry (same order) and, when the whole answer is unusable, why."""

    entries: list[EntryVerdict]
    reason: str | None = None

    @property
    def all_confirmed(self) -> bool:
        """Every request entry is proven written."""
        return all(v.confirmed for v in self.entries)

    def first_reason(self) -> str | None:
        """The answer's reason, else the first entry's: what the run summary shows."""
        return self.reason or next((v.reason for v in self.entries if v.reason), None)


def confirm_writes(request: dict[str, Any], status: int, body: Any, content_type: str = "") -> Confirmation:
    """Decide, per entry of the request Bundle, whether the answer (HTTP status, parsed JSON body or None when
    the body was empty or not JSON, Content-Type) proves it was written."""
    requested = request.get("entry", [])
    if not 200 <= status < 300:
        return _nothing(requested, f"the server answered HTTP {status}, not 2xx")
    if body is None:
        return _nothing(requested, f"the server answered HTTP {status} with {_content_kind(content_type)}, "
                                   "not a FHIR Bundle")
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        kind = body.get("resourceType") if isinstance(body, dict) else type(body).__name__
        return _nothing(requested, f"the server answered HTTP {status} with {_safe_token(kind)}, "
                                   "not a transaction-response Bundle")
    if body.get("type") not in RESPONSE_TYPES:
        return _nothing(requested, f"the server answered with a Bundle of type {_safe_token(body.get('type'))}, "
                                   "not a transaction-response")
    answered = body.get("entry") or []
    if not isinstance(answered, list) or len(answered) != len(requested):
        count = len(answered) if isinstance(answered, list) else 0
        return _nothing(requested, f"the server's answer has {count} entries for {len(requested)} sent")
    return Confirmation([confirm_entry(req, ans) for req, ans in zip(requested, answered, strict=True)])


def confirm_entry(requested: dict[str, Any], answered: Any) -> EntryVerdict:
    """What one response entry proves about the request entry at the same position."""
    response = answered.get("response") if isinstance(answered, dict) else None
    if not isinstance(response, dict):
        return EntryVerdict(False, reason="an answer entry has no response")
    match = _STATUS.match(str(response.get("status") or ""))
    if match is None:
        return EntryVerdict(False, reason="an answer entry has no HTTP status")
    status = match.group(1)
    server_id, version = parse_location(response.get("location") if isinstance(response.get("location"), str)
                                        else None)
    conditional_create = (requested.get("request") or {}).get("method") == "POST" \
        and bool((requested.get("request") or {}).get("ifNoneExist"))
    if conditional_create and status in ("200", "304"):
        return EntryVerdict(True, status, server_id, version)  # matched an existing resource
    if not status.startswith("2"):
        return EntryVerdict(False, status, reason=f"an answer entry has HTTP {status}")
    if server_id is None:
        return EntryVerdict(False, status, reason=f"an answer entry has HTTP {status} but no location")
    return EntryVerdict(True, status, server_id, version)


def _nothing(requested: list[Any], reason: str) -> Confirmation:
    return Confirmation([EntryVerdict(False, reason=reason) for _ in requested], reason)


def _content_kind(content_type: str) -> str:
    media = content_type.split(";")[0].strip().lower()
    if not media or "json" in media or _safe_token(media) != media:
        return "an empty or unreadable body"
    return f"a {media} body"


def _safe_token(value: Any) -> str:
    """A resource type or Bundle type as the server sent it, only if it looks like one (never free text)."""
    text = str(value) if value is not None else "none"
    return text if re.fullmatch(r"[A-Za-z][A-Za-z0-9/+.-]{0,40}", text) else "an unexpected value"


def confirm_single(resource_type: str, identifier: tuple[str, str] | None, status: int, body: Any,
                   location: str | None, etag: str | None, *, conditional_create: bool = False) -> EntryVerdict:
    """What the answer to one write outside a bundle proves (``identifier``: the business identifier sent, as
    (system, value); None for a resource without one, the Provenance).

    Believed only when proven: a 2xx with a ``Location`` naming a resource of the type, or a body that is the
    resource of the type with an id and the identifier sent. A conditional create that matched (200 without a
    body or location) is proof the resource exists. The version comes from the location, the ETag or the body.
    """
    code = str(status)
    if not 200 <= status < 300:
        return EntryVerdict(False, code, reason=f"the server answered HTTP {status}, not 2xx")
    server_id, version = parse_location(location) if location and f"{resource_type}/" in location else (None, None)
    if isinstance(body, dict) and body.get("resourceType") == resource_type and isinstance(body.get("id"), str):
        if identifier is not None and not any(
                isinstance(i, dict) and (i.get("system"), i.get("value")) == identifier
                for i in body.get("identifier") or []):
            return EntryVerdict(False, code,
                                reason=f"the {resource_type} the server returned lacks the identifier sent")
        if server_id not in (None, body["id"]):
            return EntryVerdict(False, code, reason="the server's location and body name different resources")
        server_id = body["id"]
        version = version or str((body.get("meta") or {}).get("versionId") or "") or None
    if server_id is None:
        if conditional_create and status == 200:
            return EntryVerdict(True, code)  # matched an existing resource
        return EntryVerdict(False, code, reason=f"HTTP {status} without a location or the resource written")
    if version is None and etag:
        match = re.fullmatch(r'(?:W/)?"([^"]{1,64})"', etag.strip())
        version = match.group(1) if match else None
    return EntryVerdict(True, code, server_id, version)


def stored_conditional_references(resource: Any) -> list[str]:
    """The resource types of references a stored resource still holds as ``Type?identifier=`` (unresolved): a
    server that neither resolves nor rejects them keeps them literally. PHI-free (types only)."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "reference" and isinstance(value, str) and "?" in value:
                    found.append(value.split("?", 1)[0])
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(resource)
    return found
