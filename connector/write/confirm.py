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
