"""Human-readable narratives (``Resource.text``) for every resource peersync emits.

A clinician whose EHR shows narratives reads these, so they are short and scannable: what happened, who, when,
in plain words. Each ``*_narrative`` function takes the mapped resource (statuses, codes and displays as coded)
and the few source values the resource does not carry in readable form (the supporter's name and title as the
program writes them, the goals' own words, the program's time zone). Pure: no I/O, no clock.

The XHTML follows the R4 narrative rules (https://hl7.org/fhir/R4/narrative.html, txt-1/txt-2): one ``div`` in
the XHTML namespace, only ``p``, ``b``, ``ul``, ``li``, ``br`` and ``span`` (with ``dir``) inside, no links,
images, scripts or event attributes. Every source value goes through :func:`escape_text`, which also drops what
XML cannot carry and keeps right-to-left text from reordering the labels around it.

``status`` is ``generated`` when the narrative shows core elements only, ``extensions`` when it also shows
extension content (a contact's duration and setting, a goal agreed together): the NarrativeStatus definitions.

The helpers (:func:`escape_text`, :func:`format_date`, :func:`format_datetime`, :func:`xhtml_div`,
:func:`labelled`, :func:`bullets`, :func:`with_narrative`) are public for other renderers (clinical notes).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime
from functools import lru_cache
from html import escape
from typing import Any
from zoneinfo import ZoneInfo

from connector.model import (
    Comparator,
    Goal,
    GoalSetBy,
    Referral,
    Supporter,
    SupporterTitle,
    TargetMeasure,
)

from . import codes, terminology
from ._util import plain_text

XHTML_NAMESPACE = "http://www.w3.org/1999/xhtml"

# The elements and attributes the renderer uses: a small subset of what txt-1/txt-2 allow (tests check it).
ELEMENTS_USED = frozenset({"div", "p", "b", "ul", "li", "br", "span"})
ATTRIBUTES_USED = frozenset({"xmlns", "dir"})

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

# Characters XML 1.0 cannot carry (C0 controls but tab/newline/CR, lone surrogates, U+FFFE/U+FFFF), C1 controls,
# and the explicit bidi embeddings, overrides and isolates (U+202A-202E, U+2066-2069): a stray override in a note
# would reverse the text after it ("Trojan source"); direction is set per value with dir instead.
_DROPPED = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ufffe\uffff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_NEWLINES = re.compile(r"\r\n?|\n")
# Every character of bidi class R, AL or AN lies in these blocks (checked against unicodedata in the tests).
_RIGHT_TO_LEFT = re.compile("[\u0590-\u08ff\u200f\ufb1d-\ufdff\ufe70-\ufefe\U00010800-\U00010fff\U0001e800-\U0001efff]")

_STATUS_WORDS = {
    "entered-in-error": "entered in error: disregard this record",
    "not-done": "not done",
    "on-hold": "on hold",
    "revoked": "stopped",
}

_COMPARATOR_TEXT = {Comparator.LT: "<", Comparator.LE: "≤", Comparator.EQ: "=", Comparator.GE: "≥", Comparator.GT: ">"}

_MEASURE_TEXT = {
    TargetMeasure.HBA1C: "HbA1c",
    TargetMeasure.STEPS_PER_DAY: "Steps per day",
    TargetMeasure.ACTIVITY_MINUTES_PER_WEEK: "Activity minutes per week",
    TargetMeasure.ACTIVE_DAYS_PER_WEEK: "Active days per week",
    TargetMeasure.BODY_WEIGHT: "Body weight",
    TargetMeasure.FASTING_GLUCOSE: "Fasting glucose",
}
# Measures whose coded unit already says what is counted ("7000 steps per day"): no name in front of the value.
_SELF_DESCRIBING_UNITS = frozenset(
    {TargetMeasure.STEPS_PER_DAY, TargetMeasure.ACTIVITY_MINUTES_PER_WEEK, TargetMeasure.ACTIVE_DAYS_PER_WEEK})

_PLANNED_STATUS_WORDS = {"active": "planned", "completed": "done", "revoked": "dropped"}

_ACTIVITY_WORDS = {"CREATE": "created", "UPDATE": "created or updated", "NULLIFY": "marked entered in error"}

_SET_BY_TEXT = {
    GoalSetBy.PARTICIPANT: "the participant",
    GoalSetBy.SUPPORTER: "the peer supporter",
    GoalSetBy.TOGETHER: "the participant and the peer supporter together",
}


# -- helpers ---------------------------------------------------------------------------------------------------------


def clean_text(value: str) -> str:
    """Source text made safe for XML: characters XML 1.0 cannot carry and explicit bidi controls dropped, lone
    surrogates replaced by U+FFFD, line breaks normalised to ``\\n``. Not escaped (see :func:`escape_text`)."""
    value = _SURROGATE.sub("\ufffd", value)
    return _NEWLINES.sub("\n", _DROPPED.sub("", value))


def _direction(value: str) -> str | None:
    """``rtl``/``ltr`` by the first strong character, when the value holds any right-to-left text (else None)."""
    if value.isascii() or not _RIGHT_TO_LEFT.search(value):  # the common case, without a per-character walk
        return None
    first = next((c for c in map(unicodedata.bidirectional, value) if c in ("L", "R", "AL")), "L")
    return "ltr" if first == "L" else "rtl"


def escape_text(value: object) -> str:
    """One source value as XHTML text: cleaned (:func:`clean_text`), escaped (``& < > " '``), line breaks as
    ``<br/>``, and, when it holds right-to-left text, wrapped in ``<span dir>`` so it stays isolated from the
    labels around it (HTML isolates an element with ``dir``)."""
    text = str(value)
    if text.isprintable():  # most values: nothing to drop (all of it unprintable), no line breaks
        html = escape(text, quote=True)
    else:
        text = clean_text(text)
        html = "<br/>".join(escape(line, quote=True) for line in text.split("\n"))
    direction = _direction(text)
    return f'<span dir="{direction}">{html}</span>' if direction else html


def format_date(value: date | str) -> str:
    """A date the way a chart shows it: ``6 Jan 2025`` (month names in English, locale-independent)."""
    day = value if isinstance(value, date) else date.fromisoformat(value[:10])
    return f"{day.day} {_MONTHS[day.month - 1]} {day.year}"


def format_datetime(value: datetime | str, timezone: str) -> str:
    """A date-time in the program's time zone, the zone stated: ``12 Mar 2026 14:30 (America/Chicago)``."""
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    zone, zone_html = _zone(timezone)
    local = moment.replace(tzinfo=zone) if moment.tzinfo is None else moment.astimezone(zone)
    return f"{format_date(local)} {local.hour:02d}:{local.minute:02d} ({zone_html})"


@lru_cache(maxsize=64)
def _zone(timezone: str) -> tuple[ZoneInfo, str]:
    """The zone and its name as XHTML: a program has one, and every contact's time is shown in it."""
    return ZoneInfo(timezone), escape(timezone)


def status_words(code: str) -> str:
    """A FHIR status code in plain words (``not-done`` -> ``not done``)."""
    return _STATUS_WORDS.get(code, code.replace("-", " "))


def labelled(label: str, value_html: str) -> str:
    """``<li><b>label</b>: value</li>``; ``label`` is ours (escaped), ``value_html`` is already XHTML."""
    return f"{_label_html(label)}{value_html}</li>"


@lru_cache(maxsize=256)
def _label_html(label: str) -> str:
    # labels are a few constants of ours, each escaped once
    return f"<li><b>{escape(label)}</b>: "


def bullets(items: Iterable[str]) -> str:
    """A ``<ul>`` of ready ``<li>`` items (empty string when there are none)."""
    items = [i for i in items if i]
    return f"<ul>{''.join(items)}</ul>" if items else ""


def xhtml_div(*blocks: str) -> str:
    """The narrative ``div`` (XHTML namespace) around ready XHTML blocks."""
    return f'<div xmlns="{XHTML_NAMESPACE}">{"".join(b for b in blocks if b)}</div>'


def narrative(div: str, *, extensions: bool = False) -> dict[str, str]:
    """The ``text`` element: ``generated``, or ``extensions`` when the div shows extension content too."""
    return {"status": "extensions" if extensions else "generated", "div": div}


def with_narrative(resource: Mapping[str, Any], text: Mapping[str, str]) -> dict[str, Any]:
    """The resource with ``text`` placed after ``meta`` (where FHIR JSON puts it), any earlier ``text`` replaced."""
    if "meta" in resource and "text" not in resource:  # what the mappers pass: copy the rest in one step
        items = iter(resource.items())
        out = {}
        for key, value in items:
            out[key] = value
            if key == "meta":
                break
        out["text"] = dict(text)
        out.update(items)
        return out
    out = {}
    for key, value in resource.items():
        if key == "text":
            continue
        out[key] = value
        if key == "meta":
            out["text"] = dict(text)
    if "text" not in out:
        out = {"resourceType": out.pop("resourceType"), "text": dict(text), **out}
    return out


ENTERED_IN_ERROR_NOTICE = "<p><b>Entered in error</b>: disregard this record</p>"
SUPERSEDED_NOTICE = "<p><b>Superseded</b>: replaced by the program's newer notes for this period</p>"


def mark_entered_in_error(text: Mapping[str, Any] | None, notice: str = ENTERED_IN_ERROR_NOTICE) -> dict[str, str]:
    """The narrative of a resource set to entered-in-error as it stands on the server (a record gone from the input):
    its old narrative with a notice in front, so the chart does not keep showing it as current. Idempotent.
    ``notice``: :data:`SUPERSEDED_NOTICE` for a note replaced by others rather than withdrawn."""
    div = str((text or {}).get("div") or xhtml_div())
    if notice not in div:
        start = div.index(">") + 1
        empty = div[start - 2] == "/"  # an empty <div .../>
        div = f"{div[: start - 2]}>{notice}</div>" if empty else div[:start] + notice + div[start:]
    return {"status": str((text or {}).get("status") or "generated"), "div": div}


def _heading(title: str, detail_html: str = "") -> str:
    return f"<p><b>{escape(title)}</b>{': ' + detail_html if detail_html else ''}</p>"


def _concept_text(concept: Mapping[str, Any] | None) -> str:
    if not concept:
        return ""
    coding = concept.get("coding") or [{}]
    return str(concept.get("text") or coding[0].get("display") or coding[0].get("code") or "")


def _texts_from(concepts: Iterable[Mapping[str, Any]], code_system_id: str) -> list[str]:
    """The texts of the concepts coded in one of our CodeSystems (by its id, whatever the terminology base)."""
    suffix = f"/CodeSystem/{code_system_id}"
    texts = []
    for concept in concepts:
        for coding in concept.get("coding", ()):
            if coding.get("system", "").endswith(suffix):
                texts.append(_concept_text(concept))
                break
    return texts


def _joined(values: Iterable[str]) -> str:
    return "; ".join(escape_text(v) for v in values if v)


def supporter_name(s: Supporter) -> str:
    """The supporter's name as the program writes it (given family)."""
    return f"{s.given_name} {s.family_name}"


def supporter_title(s: Supporter | None) -> str:
    """The supporter's title as the program writes it, else the title's display; ``Peer supporter`` unknown."""
    if s is None:
        return "Peer supporter"
    if s.title_text:
        return s.title_text
    if s.title is SupporterTitle.OTHER and s.original_text.get("title"):
        return s.original_text["title"]
    return s.title.value.replace("-", " ").capitalize()


def _who(s: Supporter | None) -> str:
    if s is None:
        return "Peer supporter"
    return _who_html(supporter_name(s), supporter_title(s))


@lru_cache(maxsize=1024)
def _who_html(name: str, title: str) -> str:
    # a supporter (staff, not a patient) is named in each of their contacts: escaped once
    return f"{escape_text(name)}, {escape_text(title)}"


def _extension(resource: Mapping[str, Any], sd_id: str) -> Mapping[str, Any] | None:
    suffix = f"/StructureDefinition/{sd_id}"
    extension: Mapping[str, Any]
    for extension in resource.get("extension", ()):
        if str(extension.get("url", "")).endswith(suffix):
            return extension
    return None


# -- Communication ---------------------------------------------------------------------------------------------------


def communication_narrative(resource: Mapping[str, Any], *, supporter: Supporter | None, goals: Sequence[Goal],
                            timezone: str) -> dict[str, str]:
    """A peer contact: outcome, who, when, how, the support given and essential elements, goals discussed, note.

    ``supporter`` is the contact's supporter (None: unknown); ``goals`` the goals it discussed (their own words).
    """
    status = resource.get("status", "")
    if status == "completed":
        outcome = "completed"
    elif status == "not-done":
        outcome = _concept_text(resource.get("statusReason")) or "not done"
    else:
        outcome = status_words(status)
    how = [_concept_text(m) for m in resource.get("medium", ())]
    setting = _extension(resource, codes.EXT_CONTACT_SETTING)
    duration = _extension(resource, codes.EXT_CONTACT_DURATION)
    if setting:
        how.append(_concept_text(setting.get("valueCodeableConcept")))
    if duration:
        how.append(f"{duration['valueDuration']['value']} min")
    categories = resource.get("category", ())
    support = _texts_from(categories, codes.CS_SUPPORT_TYPE)
    elements = _texts_from(categories, codes.CS_ESSENTIAL_ELEMENT)
    completed = status == "completed"
    notes = [plain_text(n["text"]) for n in resource.get("note", ()) if n.get("text")]
    items = [
        labelled("Who", _who(supporter)),
        labelled("When", format_datetime(resource["sent"], timezone)) if resource.get("sent") else "",
        labelled("How", _joined(how)) if how else "",
        labelled("Support given" if completed else "Support planned", _joined(support)) if support else "",
        labelled("Essential elements", _joined(elements)) if elements else "",
        labelled("Goals discussed", _joined(f"“{g.description}”" for g in goals if not g.void)) if goals else "",
        labelled("Note", "<br/>".join(escape_text(n) for n in notes)) if notes else "",
    ]
    div = xhtml_div(_heading("Peer support contact", escape(outcome[:1].upper() + outcome[1:])), bullets(items))
    return narrative(div, extensions=bool(setting or duration))


def procedure_narrative(resource: Mapping[str, Any], *, supporter: Supporter | None, goals: Sequence[Goal],
                        timezone: str) -> dict[str, str]:
    """A peer contact written as a Procedure: outcome, who, when (and until), the kind of procedure, goals, note."""
    status = resource.get("status", "")
    if status == "not-done":
        outcome = _concept_text(resource.get("statusReason")) or "not done"
    else:
        outcome = status_words(status)
    period = resource.get("performedPeriod") or {}
    start = period.get("start") or resource.get("performedDateTime")
    when = format_datetime(start, timezone) if start else ""
    if period.get("end"):
        when += " to " + format_datetime(period["end"], timezone)
    notes = [plain_text(n["text"]) for n in resource.get("note", ()) if n.get("text")]
    items = [
        labelled("Who", _who(supporter)),
        labelled("When", when) if when else "",
        labelled("Kind", escape_text(_concept_text(resource.get("category")))) if resource.get("category") else "",
        labelled("Goals", _joined(f"“{g.description}”" for g in goals if not g.void)) if goals else "",
        labelled("Note", "<br/>".join(escape_text(n) for n in notes)) if notes else "",
    ]
    div = xhtml_div(_heading("Peer support contact", escape(outcome[:1].upper() + outcome[1:])), bullets(items))
    return narrative(div, extensions=False)


# -- Goal ------------------------------------------------------------------------------------------------------------


def goal_target_text(goal: Goal, resource: Mapping[str, Any]) -> str:
    """The goal's target in words, e.g. ``HbA1c < 7 %`` (unit as coded in the resource), or ``""``."""
    t = goal.target
    if t is None:
        return ""
    quantity = (resource.get("target") or [{}])[0].get("detailQuantity", {})
    unit = quantity.get("unit") or t.unit or ""
    name = "" if t.measure in _SELF_DESCRIBING_UNITS and quantity.get("code") else _MEASURE_TEXT[t.measure]
    return " ".join(x for x in (name, _COMPARATOR_TEXT[t.comparator], str(t.value), unit) if x)


def goal_narrative(resource: Mapping[str, Any], goal: Goal) -> dict[str, str]:
    """A goal: the participant's own words, the behaviour, the target and due date, status, who set it, progress."""
    behaviour = _texts_from(resource.get("category", ()), codes.CS_ADCES7)
    target = goal_target_text(goal, resource)
    due = next((t["dueDate"] for t in resource.get("target", ()) if t.get("dueDate")), None)
    if target:
        target_html = escape_text(target) + (f", by {format_date(due)}" if due else "")
    else:
        target_html = f"by {format_date(due)}" if due else ""
    status = status_words(resource.get("lifecycleStatus", ""))
    achievement = _concept_text(resource.get("achievementStatus"))
    status_html = escape(status + (f", {achievement.lower()}" if achievement else ""))
    if resource.get("statusReason"):  # e.g. completed without being achieved: said in words, not only coded
        status_html += f" ({escape_text(resource['statusReason'])})"
    if resource.get("startDate"):
        status_html += f"; since {format_date(resource['startDate'])}"
    progress = [f"<li>{format_date(n['time']) + ': ' if n.get('time') else ''}{escape_text(plain_text(n['text']))}</li>"
                for n in resource.get("note", ()) if n.get("text")]
    items = [
        labelled("Behaviour", _joined(behaviour)) if behaviour else "",
        labelled("Target", target_html) if target_html else "",
        labelled("Status", status_html),
        labelled("Set by", escape(_SET_BY_TEXT[goal.set_by])),
        labelled("Progress", bullets(progress)) if progress else "",
        # the program named the EHR's own result: the chart has it, the narrative says where to look
        labelled("Outcome", "shown by the linked result in the chart") if resource.get("outcomeReference") else "",
    ]
    description = _concept_text(resource.get("description"))
    div = xhtml_div(_heading("Goal", f"“{escape_text(description)}”"), bullets(items))
    return narrative(div, extensions=bool(resource.get("extension")))


# -- CarePlan and CareTeam -------------------------------------------------------------------------------------------


def careplan_narrative(resource: Mapping[str, Any], *, status_text: str, program_name: str, goals: int,
                       goal_words: Sequence[str], planned_contacts: int, referrals: int) -> dict[str, str]:
    """The peer-support plan: program, status, period and what it holds: the goals in the participant's own words
    (shortened), and counts. No internal ids: a clinician cannot use them. The plan's hash covers the goals' words
    (connector/plan/planner.py), so it is re-sent when they change."""
    period = resource.get("period", {})
    dates = f"{format_date(period['start'])} to {format_date(period['end']) if period.get('end') else 'ongoing'}"
    goals_html = str(goals)
    if goal_words:
        goals_html += ": " + "; ".join(f"“{escape_text(_shortened(words))}”" for words in goal_words)
    items = [
        labelled("Enrollment", f"{escape(status_text)}, {dates}"),
        labelled("Goals", goals_html),
        labelled("Planned contacts", str(planned_contacts)),
        labelled("Community referrals", str(referrals)),
    ]
    div = xhtml_div(_heading(str(resource.get("title", "Care plan")), escape_text(program_name)), bullets(items))
    return narrative(div)


def _shortened(text: str, limit: int = 60) -> str:
    """At most ``limit`` characters, cut at a word where one is near, with an ellipsis."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    return (cut.rsplit(" ", 1)[0] if " " in cut[limit // 2:] else cut).rstrip(" ,;:.") + "…"


def careteam_narrative(resource: Mapping[str, Any], *, supporter: Supporter | None,
                       program_name: str) -> dict[str, str]:
    """The participant's care team: the participant and their peer supporter (name and title), the program."""
    period = resource.get("period", {})
    since = f"since {format_date(period['start'])}" if period.get("start") else ""
    if period.get("end"):
        since = f"{format_date(period['start'])} to {format_date(period['end'])}"
    items = [
        "<li>The participant (patient)</li>",
        f"<li>{_who(supporter) + ' (peer supporter)' if supporter else 'Peer supporter'}, "
        f"{escape_text(program_name)}</li>",
    ]
    detail = escape(", ".join(x for x in (status_words(resource.get("status", "")), since) if x))
    return narrative(xhtml_div(_heading(str(resource.get("name", "Care team")), detail), bullets(items)))


# -- requests --------------------------------------------------------------------------------------------------------


def communication_request_narrative(resource: Mapping[str, Any], *, timezone: str) -> dict[str, str]:
    """A planned contact: how, when, and whether it is still planned."""
    status = resource.get("status", "")
    how = _joined(_concept_text(m) for m in resource.get("medium", ()))
    items = [
        labelled("How", how) if how else "",
        labelled("When", format_datetime(resource["occurrenceDateTime"], timezone))
        if resource.get("occurrenceDateTime") else "",
        labelled("Status", escape(_PLANNED_STATUS_WORDS.get(status, status_words(status)))),
    ]
    return narrative(xhtml_div(_heading("Planned peer support contact"), bullets(items)))


def _need_text(resource: Mapping[str, Any]) -> str:
    return next(iter(_texts_from(resource.get("category", ()), codes.CS_REFERRAL_NEED)), "")


def service_request_narrative(resource: Mapping[str, Any], referral: Referral) -> dict[str, str]:
    """A community referral: to what resource, for what need, when, status."""
    need = _need_text(resource)
    items = [
        labelled("Need", escape_text(need)) if need else "",
        labelled("Referred", format_date(resource["authoredOn"])) if resource.get("authoredOn") else "",
        labelled("Status", escape(status_words(resource.get("status", "")))),
    ]
    heading = _heading("Community referral", escape_text(referral.resource_name))
    return narrative(xhtml_div(heading, bullets(items)))


def referral_need_text(referral: Referral) -> str:
    """The referral's need in words: as written for an 'other' need, else the need's display."""
    if referral.need.value == "other" and referral.original_text.get("need"):
        return referral.original_text["need"]
    return terminology.display(codes.CS_REFERRAL_NEED, referral.need.value)


def task_narrative(resource: Mapping[str, Any], referral: Referral) -> dict[str, str]:
    """The referral's follow-up task: the resource and need, status (with its reason), outcome notes."""
    status = status_words(resource.get("status", ""))
    reason = _concept_text(resource.get("statusReason"))
    notes = [plain_text(n["text"]) for n in resource.get("note", ()) if n.get("text")]
    items = [
        labelled("Need", escape_text(referral_need_text(referral))),
        labelled("Status", escape(status) + (f" ({escape_text(reason)})" if reason else "")),
        labelled("Outcome", "<br/>".join(escape_text(n) for n in notes)) if notes else "",
    ]
    heading = _heading("Referral follow-up", escape_text(referral.resource_name))
    return narrative(xhtml_div(heading, bullets(items)))


# -- program, people, provenance -------------------------------------------------------------------------------------


def organization_narrative(resource: Mapping[str, Any], *, community_resource: bool = False) -> dict[str, str]:
    """An organization: the peer-support program (with its phone), or a community resource it refers to."""
    kind = "Community resource" if community_resource else "Diabetes peer-support program"
    phones = [t["value"] for t in resource.get("telecom", ()) if t.get("system") == "phone"]
    items = [labelled("Phone", _joined(phones))] if phones else []
    return narrative(xhtml_div(_heading(kind, escape_text(resource.get("name", ""))), bullets(items)))


def device_narrative(resource: Mapping[str, Any], *, program_name: str) -> dict[str, str]:
    """The connector Device: what it is and for whom it transmits."""
    version = next((v["value"] for v in resource.get("version", ()) if v.get("value")), "")
    name = next((n["name"] for n in resource.get("deviceName", ()) if n.get("name")), "peersync connector")
    detail = f"{escape_text(name)}{' ' + escape_text(version) if version else ''}"
    items = [labelled("Transmits records for", escape_text(program_name))]
    return narrative(xhtml_div(_heading("FHIR data connector software", detail), bullets(items)))


def practitioner_narrative(resource: Mapping[str, Any], supporter: Supporter, *, program_name: str) -> dict[str, str]:
    """A peer supporter: name, title as written, program, active or not."""
    items = [
        labelled("Role", f"{escape_text(supporter_title(supporter))}, {escape_text(program_name)}"),
        "" if resource.get("active", True) else labelled("Status", "no longer active"),
    ]
    return narrative(xhtml_div(_heading("Peer supporter", escape_text(supporter_name(supporter))), bullets(items)))


def practitioner_role_narrative(resource: Mapping[str, Any], supporter: Supporter, *,
                                program_name: str) -> dict[str, str]:
    """A peer supporter's role in the program: title as written (and its taxonomy display), who, contact."""
    role = escape_text(supporter_title(supporter))
    taxonomy = next((_concept_text(s) for s in resource.get("specialty", ())), "")
    contact = [t["value"] for t in resource.get("telecom", ()) if t.get("value")]
    items = [
        labelled("Who", escape_text(supporter_name(supporter))),
        labelled("Program", escape_text(program_name)),
        labelled("Specialty", escape_text(taxonomy)) if taxonomy else "",
        labelled("Contact", _joined(contact)) if contact else "",
        "" if resource.get("active", True) else labelled("Status", "no longer active"),
    ]
    return narrative(xhtml_div(_heading("Peer supporter role", role), bullets(items)))


def provenance_narrative(resource: Mapping[str, Any], *, program_name: str, timezone: str) -> dict[str, str]:
    """Who recorded what, when: the activity, the number of records, the author, the transmitter, the time."""
    code = next((c.get("code", "") for c in resource.get("activity", {}).get("coding", ())), "")
    activity = _ACTIVITY_WORDS.get(code, "changed")
    agents = resource.get("agent", ())
    author = next((a for a in agents if any(c.get("code") == "author" for c in a.get("type", {}).get("coding", ()))),
                  None)
    # a supporter's PractitionerRole, or the EHR's own Practitioner of the supporter ([directory])
    by_supporter = bool(author and str(author.get("who", {}).get("reference", "")).startswith("Practitioner"))
    who = "the participant's peer supporter" if by_supporter else "the program"
    targets = len(resource.get("target", ()))
    items = [
        labelled("Recorded", format_datetime(resource["recorded"], timezone)) if resource.get("recorded") else "",
        labelled("Records", f"{targets} {'record' if targets == 1 else 'records'} {activity}"),
        labelled("Author", f"{who}, {escape_text(program_name)}"),
        labelled("Sent by", "peersync connector"),
    ]
    return narrative(xhtml_div(_heading("Record history"), bullets(items)))
