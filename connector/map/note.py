"""Clinical-note mode: a participant's peer support over one period as a US Core DocumentReference.

Pure: which records a note covers (:func:`group_notes`), the note as plain text and as HTML (:func:`render_note`),
and the DocumentReference that carries both (:func:`map_note`). See docs/clinical-notes.md.

A note covers one participant's contacts in one period (one contact, an ISO week or a calendar month in the
program's time zone). It also lists what those contacts worked on: the goals they discussed or that have a
progress note in the period (with those notes), the referrals made in the period and the planned contacts due
after its last contact, up to 31 days after the period. Every source value is escaped in the HTML, and the HTML
carries a Content-Security-Policy that allows no script, so a note stays inert in any viewer that honours it.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from connector.identifiers import KIND_NOTE, KIND_ROLE
from connector.model import (
    Contact,
    ContactOutcome,
    Enrollment,
    Goal,
    PlannedContact,
    PlannedStatus,
    Referral,
    SourceRecord,
    Supporter,
    SupporterTitle,
    TargetMeasure,
)

from ._util import resource
from .context import MappingContext
from .narrative import bullets, clean_text, escape_text, narrative, with_narrative, xhtml_div

NotePeriodKind = Literal["contact", "week", "month"]

# LOINC 85901-7 "Community health care Note" (Scale DOC, class DOC.ONT: in US Core's DocumentReference type value
# set); sources in docs/clinical-notes.md.
NOTE_TYPE = {"system": "http://loinc.org", "code": "85901-7", "display": "Community health care Note"}
CLINICAL_NOTE_CATEGORY = {
    "system": "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category",
    "code": "clinical-note",
    "display": "Clinical Note",
}
PLAIN_TEXT = "text/plain; charset=utf-8"
HTML_TEXT = "text/html; charset=utf-8"
PLANNED_HORIZON = timedelta(days=31)  # "planned next": planned contacts due up to this long after the period

# No script, no network, no frames: only the inline style below.
CONTENT_SECURITY_POLICY = "default-src 'none'; style-src 'unsafe-inline'"
_STYLE = ("body{font-family:sans-serif;max-width:46em;margin:1.5em auto;line-height:1.4;color:#222}"
          "h1{font-size:1.3em}h2{font-size:1.05em;margin-top:1.2em;border-bottom:1px solid #ccc}"
          ".meta{color:#555}.void{color:#a00;font-weight:bold}")

_MEASURES = {
    TargetMeasure.HBA1C: ("HbA1c", "%"),
    TargetMeasure.STEPS_PER_DAY: ("Steps per day", "steps"),
    TargetMeasure.ACTIVITY_MINUTES_PER_WEEK: ("Activity per week", "min"),
    TargetMeasure.ACTIVE_DAYS_PER_WEEK: ("Active days per week", "days"),
    TargetMeasure.BODY_WEIGHT: ("Body weight", "kg"),
    TargetMeasure.FASTING_GLUCOSE: ("Fasting glucose", "mg/dL"),
}


@dataclass(frozen=True)
class NotePeriod:
    """What one note covers in time: ``key`` is part of its business identifier (``2026-W10``, ``2026-03``,
    ``contact-<id>``); ``start``/``end`` are aware date-times in the program's time zone."""

    key: str
    start: datetime
    end: datetime
    kind: NotePeriodKind

    def covers(self, day: date) -> bool:
        """Whether a date falls in the period (by calendar day)."""
        return self.start.date() <= day <= self.end.date()


def period_of(contact: Contact, kind: NotePeriodKind, timezone: str) -> NotePeriod:
    """The period of the note that covers a contact."""
    local = contact.occurred_at.astimezone(ZoneInfo(timezone))
    if kind == "contact":
        return NotePeriod(f"contact-{contact.contact_id}", local, local, kind)
    zone = ZoneInfo(timezone)
    if kind == "week":
        year, week, _ = local.isocalendar()
        first = local.date() - timedelta(days=local.weekday())
        last = first + timedelta(days=6)
        key = f"{year}-W{week:02d}"
    else:
        first = local.date().replace(day=1)
        last = (first + timedelta(days=32)).replace(day=1) - timedelta(days=1)
        key = f"{first.year}-{first.month:02d}"
    return NotePeriod(key, datetime.combine(first, time(0, 0), zone),
                      datetime.combine(last, time(23, 59, 59), zone), kind)


@dataclass(frozen=True)
class NoteSources:
    """Everything one note renders: its period, the participant's enrollment, the contacts in the period
    (voided ones too: they decide whether the note is entered-in-error), and what the contacts worked on."""

    period: NotePeriod
    enrollment: Enrollment
    contacts: tuple[Contact, ...]
    goals: tuple[Goal, ...] = ()  # with only their progress notes dated in the period
    referrals: tuple[Referral, ...] = ()
    planned: tuple[PlannedContact, ...] = ()
    supporters: Mapping[str, Supporter] | None = None

    @property
    def source_id(self) -> str:
        """The note's source id: participant and period (the unit key is ``note:<source_id>``)."""
        return f"{self.enrollment.enrollment_id}|{self.period.key}"

    @property
    def voided(self) -> bool:
        """Every contact it covers was voided at the source: the note is entered-in-error."""
        return all(c.void for c in self.contacts)

    def live_contacts(self) -> tuple[Contact, ...]:
        """The contacts the note summarizes (voided ones are not)."""
        return tuple(c for c in self.contacts if not c.void)

    def supporter(self, staff_id: str | None) -> Supporter | None:
        """A supporter by staff id, if known."""
        return (self.supporters or {}).get(staff_id or "")

    def records(self) -> list[SourceRecord]:
        """Every record the note's content depends on besides the participant's MRN (what its unit hash covers;
        not the enrollment: its status does not change what past contacts were)."""
        staff = sorted({c.supporter_id for c in self.contacts})
        people = [s for s in (self.supporter(i) for i in staff) if s is not None]
        return [*self.contacts, *self.goals, *self.referrals, *self.planned, *people]


def group_notes(enrollment: Enrollment, contacts: Iterable[Contact], goals: Iterable[Goal],
                referrals: Iterable[Referral], planned: Iterable[PlannedContact],
                supporters: Mapping[str, Supporter], *, kind: NotePeriodKind, timezone: str) -> list[NoteSources]:
    """One participant's notes, in time order: one per period that has at least one contact."""
    by_period: dict[str, tuple[NotePeriod, list[Contact]]] = {}
    for contact in sorted(contacts, key=lambda c: (c.occurred_at, c.contact_id)):
        period = period_of(contact, kind, timezone)
        by_period.setdefault(period.key, (period, []))[1].append(contact)
    goals, referrals, planned = list(goals), list(referrals), list(planned)
    notes = []
    for period, in_period in by_period.values():
        live = [c for c in in_period if not c.void]
        discussed = {g for c in live for g in c.goal_ids}
        period_goals = []
        for goal in goals:
            progress = tuple(n for n in goal.notes if not n.void and period.covers(n.noted_on))
            if not goal.void and (goal.goal_id in discussed or progress):
                period_goals.append(goal.model_copy(update={"notes": progress}))
        horizon = period.end + PLANNED_HORIZON
        last_contact = in_period[-1].occurred_at
        notes.append(NoteSources(
            period=period,
            enrollment=enrollment,
            contacts=tuple(in_period),
            goals=tuple(period_goals),
            referrals=tuple(r for r in referrals if not r.void and period.covers(r.referred_on)),
            planned=tuple(sorted((p for p in planned if not p.void and p.status is PlannedStatus.PLANNED
                                  and last_contact < p.due_at <= horizon), key=lambda p: p.due_at)),
            supporters=dict(supporters),
        ))
    return notes


# -- rendering ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """One line of a section: plain words, and an optional emphasised lead (a date, a goal)."""

    text: str
    lead: str = ""


@dataclass(frozen=True)
class RenderedNote:
    """A note as the clinician reads it."""

    title: str
    plain: str
    html: str


def _words(code: str) -> str:
    return code.replace("-", " ").capitalize()


def _title_text(s: Supporter | None) -> str:
    if s is None:
        return "Peer supporter"
    if s.title_text or s.original_text.get("title"):
        return s.title_text or s.original_text["title"]
    return "Peer supporter" if s.title is SupporterTitle.OTHER else _words(s.title.value)


def supporter_line(s: Supporter | None) -> str:
    """The supporter as a clinician reads them: name and title as the program writes it."""
    if s is None:
        return "Peer supporter"
    return f"{s.given_name} {s.family_name}, {_title_text(s)}"


def _when(moment: datetime, tz: str) -> str:
    return moment.astimezone(ZoneInfo(tz)).strftime("%d %b %Y %H:%M")


def _day(day: date) -> str:
    return day.strftime("%d %b %Y")


def target_text(goal: Goal) -> str:
    """A goal's measurable target in plain words, e.g. ``HbA1c < 7 %``."""
    if goal.target is None:
        return ""
    label, default_unit = _MEASURES[goal.target.measure]
    return f"{label} {goal.target.comparator.value} {goal.target.value} {goal.target.unit or default_unit}"


def period_text(period: NotePeriod, tz: str) -> str:
    """The period in words, with the time zone stated."""
    if period.kind == "contact":
        return f"Contact on {_when(period.start, tz)} ({tz})"
    if period.kind == "week":
        return f"Week {period.key}: {_day(period.start.date())} to {_day(period.end.date())} ({tz})"
    return f"{period.start.strftime('%B %Y')}: {_day(period.start.date())} to {_day(period.end.date())} ({tz})"


def _contact_line(c: Contact, sources: NoteSources, tz: str) -> Line:
    how = [_words(c.mode.value)]
    if c.setting is not None:
        how.append(c.original_text.get("setting") or _words(c.setting.value))
    if c.duration_minutes is not None:
        how.append(f"{c.duration_minutes} min")
    parts = [", ".join(how) + "."]
    if c.outcome is ContactOutcome.NOT_REACHED:
        parts.append("Attempted; participant not reached.")
    elif c.outcome is ContactOutcome.CANCELLED:
        parts.append("Contact cancelled.")
    if c.purpose is not None:
        parts.append(f"Purpose: {_words(c.purpose.value).lower()}.")
    if c.support_types:
        support = ", ".join(_words(s.value).lower() for s in dict.fromkeys(c.support_types))
        parts.append(f"Support given: {support}.")
    if c.essential_elements:
        parts.append("Self-management support: "
                     + ", ".join(_words(e.value).lower() for e in dict.fromkeys(c.essential_elements)) + ".")
    goals = {g.goal_id: g for g in sources.goals}
    discussed = [goals[g].description for g in c.goal_ids if g in goals]
    if discussed:
        parts.append("Goals discussed: " + "; ".join(discussed) + ".")
    parts.append(f"By {supporter_line(sources.supporter(c.supporter_id))}.")
    if c.notes:
        parts.append(f"Note: {c.notes}")
    return Line(" ".join(parts), _when(c.occurred_at, tz))


def note_sections(sources: NoteSources, tz: str) -> list[tuple[str, list[Line]]]:
    """The note's sections (heading, lines): contacts, goals and progress, referrals, planned next."""
    live = sources.live_contacts()
    sections: list[tuple[str, list[Line]]] = [("Contacts", [_contact_line(c, sources, tz) for c in live])]
    goal_lines = []
    for goal in sources.goals:
        words = [f"{_words(goal.behavior.value)}."]
        if goal.target is not None:
            words.append(f"Target: {target_text(goal)}.")
        if goal.due_date is not None:
            words.append(f"By {_day(goal.due_date)}.")
        goal_lines.append(Line(" ".join(words), goal.description))
        goal_lines += [Line(n.text, f"Progress {_day(n.noted_on)}") for n in goal.notes]
    sections.append(("Goals and progress", goal_lines))
    sections.append(("Referrals", [
        Line(f"{_words(r.need.value)} need; referred {_day(r.referred_on)}; {_words(r.status.value).lower()}."
             + (f" Outcome: {r.outcome_notes}" if r.outcome_notes else ""), r.resource_name)
        for r in sources.referrals]))
    sections.append(("Planned next", [
        Line(f"{_words(p.mode.value)} contact with {supporter_line(sources.supporter(p.supporter_id))}.",
             _when(p.due_at, tz)) for p in sources.planned]))
    return [(heading, lines) for heading, lines in sections if lines]


def render_note(sources: NoteSources, ctx: MappingContext) -> RenderedNote:
    """The note as plain text and as a standalone HTML page (every source value escaped)."""
    tz = ctx.timezone
    title = clean_text(f"Peer support note: {ctx.program_name}")  # also the attachments' title
    when = period_text(sources.period, tz)
    staff = dict.fromkeys(c.supporter_id for c in (sources.live_contacts() or sources.contacts))
    by = "; ".join(supporter_line(sources.supporter(s)) for s in staff)
    if sources.voided:
        sections: list[tuple[str, list[Line]]] = []
        status = ("Entered in error: the program voided every contact this note summarized. "
                  "Disregard the earlier versions of this note.")
    else:
        sections, status = note_sections(sources, tz), ""
    plain = [title, when, f"Peer supporter: {by}"]
    if status:
        plain.append(status)
    for heading, lines in sections:
        plain += ["", heading.upper()] + [f"- {line.lead}: {line.text}" if line.lead else f"- {line.text}"
                                          for line in lines]
    esc = escape_text  # escaped, XML-safe, right-to-left text isolated (connector/map/narrative.py)
    body = [f"<h1>{esc(title)}</h1>", f'<p class="meta">{esc(when)}</p>',
            f'<p class="meta">Peer supporter: {esc(by)}</p>']
    if status:
        body.append(f'<p class="void">{esc(status)}</p>')
    for heading, lines in sections:
        items = "".join(f"<li><b>{esc(line.lead)}</b>: {esc(line.text)}</li>" if line.lead
                        else f"<li>{esc(line.text)}</li>" for line in lines)
        body.append(f"<h2>{esc(heading)}</h2><ul>{items}</ul>")
    # the words as written, less what no text can carry (lone surrogates, control characters, bidi overrides)
    return RenderedNote(title, clean_text("\n".join(plain)) + "\n", html_page(title, "".join(body)))


def note_narrative(sources: NoteSources, ctx: MappingContext) -> dict[str, str]:
    """The DocumentReference's own narrative: the note in short, in FHIR's XHTML subset."""
    tz = ctx.timezone
    staff = dict.fromkeys(c.supporter_id for c in (sources.live_contacts() or sources.contacts))
    blocks = [f"<p><b>Peer support note</b>: {escape_text(period_text(sources.period, tz))}</p>",
              f"<p>Peer supporter: {escape_text('; '.join(supporter_line(sources.supporter(s)) for s in staff))}</p>"]
    if sources.voided:
        blocks.append("<p><b>Entered in error</b>: the program voided every contact this note summarized.</p>")
    else:
        for heading, lines in note_sections(sources, tz):
            blocks.append(f"<p><b>{escape_text(heading)}</b></p>")
            # a lead is a source value (a goal's words, a resource's name), escaped like the text, never a label
            blocks.append(bullets(f"<li><b>{escape_text(line.lead)}</b>: {escape_text(line.text)}</li>" if line.lead
                                  else f"<li>{escape_text(line.text)}</li>" for line in lines))
    return narrative(xhtml_div(*blocks))


def amended(doc: dict[str, Any]) -> dict[str, Any]:
    """A new version of a note the clinic already received (its contacts were edited): ``docStatus = amended``,
    its content modified after it was released as final (FHIR R4 composition-status,
    https://hl7.org/fhir/R4/valueset-composition-status.html). The first version of a note is ``final``."""
    return doc | {"docStatus": "amended"}


def replaced(old_source_id: str, current: Iterable[NoteSources], timezone: str) -> bool:
    """Whether a note gone from the source was replaced rather than withdrawn: a live contact of the participant's
    current notes falls in the period it covered (``note_period`` changed, so its contacts are now in weekly notes
    instead of a monthly one, or the reverse). It is then ``superseded``, not ``entered-in-error``: it was not
    wrong. A note whose contacts are gone from the input, or moved out of its period, is withdrawn."""
    key = old_source_id.rsplit("|", 1)[-1]
    live = [c for note in current if not note.voided for c in note.live_contacts()]
    if key.startswith("contact-"):
        return any(c.contact_id == key.removeprefix("contact-") for c in live)
    match = re.fullmatch(r"(\d{4})-W(\d{2})|(\d{4})-(\d{2})", key)
    if match is None:
        return False
    if match.group(1):
        first = date.fromisocalendar(int(match.group(1)), int(match.group(2)), 1)
        last = first + timedelta(days=6)
    else:
        first = date(int(match.group(3)), int(match.group(4)), 1)
        last = (first + timedelta(days=32)).replace(day=1) - timedelta(days=1)
    zone = ZoneInfo(timezone)
    return any(first <= c.occurred_at.astimezone(zone).date() <= last for c in live)


def html_page(title: str, body: str) -> str:
    """A standalone HTML page around already-escaped ``body``, with a policy that lets no script run."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">'
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
            f"<body>{body}</body></html>\n")


def attachment(text: str, content_type: str, title: str, created: str) -> dict[str, Any]:
    """An inline attachment: base64 data, its size in bytes and its SHA-1 (base64), as FHIR R4 defines them."""
    data = text.encode("utf-8")
    return {
        "contentType": content_type,
        "data": base64.b64encode(data).decode("ascii"),
        "size": len(data),
        "hash": base64.b64encode(hashlib.sha1(data).digest()).decode("ascii"),  # FHIR R4 Attachment.hash is SHA-1
        "title": title,
        "creation": created,
    }


def map_note(sources: NoteSources, ctx: MappingContext) -> dict[str, Any]:
    """The note as a US Core DocumentReference: LOINC note type, clinical-note category, the Patient, the
    supporters' PractitionerRoles as authors, the program as custodian, the period it covers, and its content
    as text/plain and text/html."""
    rendered = render_note(sources, ctx)
    last = max(c.occurred_at for c in sources.contacts)
    created = ctx.datetime_str(last)
    staff = dict.fromkeys(c.supporter_id for c in (sources.live_contacts() or sources.contacts))
    description = period_text(sources.period, ctx.timezone)
    return with_narrative(resource(
        "DocumentReference",
        ctx,
        identifier=[ctx.ident(KIND_NOTE, sources.source_id)],
        status="entered-in-error" if sources.voided else "current",
        docStatus="final",
        type={"coding": [dict(NOTE_TYPE)], "text": "Peer support note"},
        category=[{"coding": [dict(CLINICAL_NOTE_CATEGORY)], "text": "Clinical Note"}],
        subject=ctx.patient_ref(sources.enrollment),
        date=created,
        # titles, never names, in displays (the content carries the names)
        author=[ctx.ref("PractitionerRole", KIND_ROLE, s, _title_text(sources.supporter(s))) for s in staff],
        custodian=ctx.organization_ref(),
        description=f"Peer support note: {description}",
        content=[{"attachment": attachment(rendered.plain, PLAIN_TEXT, rendered.title, created)},
                 {"attachment": attachment(rendered.html, HTML_TEXT, rendered.title, created)}],
        context={"period": {"start": ctx.datetime_str(sources.period.start),
                            "end": ctx.datetime_str(sources.period.end)}},
    ), note_narrative(sources, ctx))


def preview_page(notes: Sequence[NoteSources], ctx: MappingContext, heading: str,
                 narratives: Sequence[tuple[str, str]] = ()) -> str:
    """One HTML page for ``peersync map --preview-html`` (escaped, inert): several notes' HTML bodies, then the
    narratives (resource type, ``text.div``) of the structured resources, as the chart shows them."""
    heading = clean_text(heading)
    parts = [f"<h1>{html.escape(heading)}</h1>"]
    for sources in notes:
        page = render_note(sources, ctx).html
        body = page[page.index("<body>") + len("<body>"):page.rindex("</body>")]
        parts.append(f'<article class="note">{body.replace("<h1>", "<h2>").replace("</h1>", "</h2>")}</article><hr>')
    if narratives:
        # the divs are our generated XHTML narratives: every source value in them is already escaped
        parts.append("<h2>Structured resources: their narratives</h2>")
        parts += [f'<section class="narrative"><p class="meta">{html.escape(resource_type)}</p>{div}</section>'
                  for resource_type, div in narratives]
    return html_page(heading, "".join(parts))
