"""The source model: what a peer-support program records, independent of any export format or FHIR.

Readers and mapping profiles turn a program's files into these records; mappers turn them into FHIR.
Every field is documented in ``docs/source-model.md``. Code values are the codes of our local
CodeSystems in ``mappings/terminology/`` (or FHIR's own codes where FHIR defines the concept).
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)

# A source id as the program writes it: any printable text. Business identifier values sent to FHIR are
# derived from it by connector.identifiers.identifier_value, which restricts them to a safe alphabet.
SourceId = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")
]
NonEmptyText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
# The id of a resource on the EHR (``Observation/123`` or ``123``): FHIR's id alphabet, at most 64 characters.
ServerObservationId = Annotated[
    str, StringConstraints(strip_whitespace=True, pattern=r"^(Observation/)?[A-Za-z0-9\-.]{1,64}$")
]


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("date-time has no time zone; set program.timezone in the profile")
    return value


AwareDatetime = Annotated[datetime, AfterValidator(_aware)]


class RecordKind(StrEnum):
    """The kinds of source record a profile can describe."""

    SUPPORTER = "supporter"
    ENROLLMENT = "enrollment"
    GOAL = "goal"
    GOAL_NOTE = "goal_note"
    CONTACT = "contact"
    REFERRAL = "referral"
    PLANNED_CONTACT = "planned_contact"


class SupporterTitle(StrEnum):
    COMMUNITY_HEALTH_WORKER = "community-health-worker"
    PROMOTORA = "promotora"
    PEER_COACH = "peer-coach"
    PEER_LEADER = "peer-leader"
    PEER_MENTOR = "peer-mentor"
    LAY_HEALTH_WORKER = "lay-health-worker"
    OTHER = "other"


class EnrollmentStatus(StrEnum):
    ACTIVE = "active"
    ON_HOLD = "on-hold"
    COMPLETED = "completed"  # finished the program
    WITHDRAWN = "withdrawn"  # left early
    DECLINED = "declined"  # referred, but declined to join (answers a clinic referral: Task cancelled)
    NOT_REACHED = "not-reached"  # referred, but could not be reached (answers a clinic referral: Task cancelled)


class ContactMode(StrEnum):
    FACE_TO_FACE = "face-to-face"
    TELEPHONE = "telephone"
    VIDEO = "video"
    TEXT_MESSAGE = "text-message"
    EMAIL = "email"
    GROUP = "group"


class ContactSetting(StrEnum):
    COMMUNITY_SITE = "community-site"
    HOME = "home"
    CLINIC = "clinic"
    FAITH_BASED = "faith-based"
    REMOTE = "remote"
    OTHER = "other"


class ContactOutcome(StrEnum):
    COMPLETED = "completed"
    NOT_REACHED = "not-reached"  # attempted, participant not reached: a real event
    CANCELLED = "cancelled"


class ContactPurpose(StrEnum):
    """Why the contact took place, as the program records it (a contact kind or visit type)."""

    INTAKE = "intake"  # the first visit: getting to know the participant's situation and needs
    ASSESSMENT = "assessment"  # a (re)assessment of needs, barriers, self-care
    GOAL_SETTING = "goal-setting"  # setting or revising goals and action plans together
    FOLLOW_UP = "follow-up"  # a routine check-in
    EDUCATION = "education"  # a class or teaching session
    OTHER = "other"


class SupportType(StrEnum):
    EMOTIONAL = "emotional"
    INSTRUMENTAL = "instrumental"
    EDUCATION = "education"
    SKILLS_TRAINING = "skills-training"
    FOLLOW_UP = "follow-up"
    OUTREACH = "outreach"
    CARE_COORDINATION = "care-coordination"
    COMMUNITY_LINKAGE = "community-linkage"
    CLINICAL_ACCESS_ASSISTANCE = "clinical-access-assistance"
    OTHER = "other"


class EssentialElement(StrEnum):
    """The six essential elements of self-management support (Brownson & Heisler 2009)."""

    CLINICAL_CARE_ACCESS = "clinical-care-access"
    INDIVIDUALIZED_ASSESSMENT = "individualized-assessment"
    COLLABORATIVE_GOAL_SETTING = "collaborative-goal-setting"
    EDUCATION_SKILLS_TRAINING = "education-skills-training"
    ONGOING_FOLLOW_UP_SUPPORT = "ongoing-follow-up-support"
    COMMUNITY_RESOURCE_LINKAGE = "community-resource-linkage"


class Behavior(StrEnum):
    """ADCES7 self-care behaviours."""

    HEALTHY_COPING = "healthy-coping"
    HEALTHY_EATING = "healthy-eating"
    BEING_ACTIVE = "being-active"
    TAKING_MEDICATION = "taking-medication"
    MONITORING = "monitoring"
    REDUCING_RISKS = "reducing-risks"
    PROBLEM_SOLVING = "problem-solving"


class TargetMeasure(StrEnum):
    """Measurable goal targets peersync knows how to code (LOINC in the mapper)."""

    HBA1C = "hba1c"
    STEPS_PER_DAY = "steps-per-day"
    ACTIVITY_MINUTES_PER_WEEK = "activity-minutes-per-week"
    ACTIVE_DAYS_PER_WEEK = "active-days-per-week"
    BODY_WEIGHT = "body-weight"
    FASTING_GLUCOSE = "fasting-glucose"


class Comparator(StrEnum):
    LT = "<"
    LE = "<="
    EQ = "="
    GE = ">="
    GT = ">"


class GoalLifecycle(StrEnum):
    """FHIR goal-status codes."""

    PROPOSED = "proposed"
    PLANNED = "planned"
    ACCEPTED = "accepted"
    ACTIVE = "active"
    ON_HOLD = "on-hold"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"


class GoalAchievement(StrEnum):
    """FHIR goal-achievement codes."""

    IN_PROGRESS = "in-progress"
    IMPROVING = "improving"
    WORSENING = "worsening"
    NO_CHANGE = "no-change"
    ACHIEVED = "achieved"
    SUSTAINING = "sustaining"
    NOT_ACHIEVED = "not-achieved"
    NO_PROGRESS = "no-progress"
    NOT_ATTAINABLE = "not-attainable"


class GoalSetBy(StrEnum):
    PARTICIPANT = "participant"
    SUPPORTER = "supporter"
    TOGETHER = "together"  # participant, supporter and clinician together


class NeedCategory(StrEnum):
    FOOD = "food"
    HOUSING = "housing"
    TRANSPORTATION = "transportation"
    SOCIAL_CONNECTION = "social-connection"
    STRESS = "stress"
    PHYSICAL_ACTIVITY = "physical-activity"
    FINANCIAL = "financial"
    MEDICATION_ACCESS = "medication-access"
    OTHER = "other"


class ReferralStatus(StrEnum):
    MADE = "made"
    ACCEPTED = "accepted"
    COMPLETED = "completed"
    DECLINED = "declined"  # the community organization declined to serve the participant
    CANCELLED = "cancelled"
    PARTICIPANT_DECLINED = "participant-declined"  # the participant declined the referral


class PlannedStatus(StrEnum):
    PLANNED = "planned"
    DONE = "done"
    DROPPED = "dropped"


class SourceRecord(BaseModel):
    """Common base: every record has a stable source id and may be voided at the source."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    kind: str = "base"  # each record kind narrows it to its own Literal
    void: bool = Field(False, description="The program marked the record as entered in error, deleted or replaced.")
    original_text: dict[str, str] = Field(
        default_factory=dict, description="Source text of codes mapped to 'other' (unknown-code policy), by field."
    )

    @property
    def key(self) -> str:
        """The record's source id (unique within its kind)."""
        raise NotImplementedError


class Supporter(SourceRecord):
    """A peer supporter: community health worker, promotora, peer coach or leader..."""

    kind: Literal["supporter"] = "supporter"
    staff_id: SourceId
    given_name: NonEmptyText
    family_name: NonEmptyText
    title: SupporterTitle
    title_text: str | None = Field(None, description="The title exactly as the program writes it.")
    organization: str | None = None
    phone: str | None = None
    email: str | None = None
    npi: Annotated[str, StringConstraints(pattern=r"^\d{10}$")] | None = None
    active: bool = True

    @property
    def key(self) -> str:
        return self.staff_id


class Enrollment(SourceRecord):
    """One participant's enrollment in the program: becomes a CarePlan and a CareTeam."""

    kind: Literal["enrollment"] = "enrollment"
    enrollment_id: SourceId
    participant_id: SourceId | None = Field(None, description="The program's participant id, if it differs.")
    mrn: NonEmptyText
    mrn_system: str | None = Field(None, description="MRN identifier system when it varies by row.")
    start_date: date
    end_date: date | None = None
    status: EnrollmentStatus = EnrollmentStatus.ACTIVE
    supporter_id: SourceId
    conditions: tuple[str, ...] = ()
    clinic_referral: str | None = Field(
        None, description="The clinic's referral Task this enrollment answers (its id, from the intake file).")
    clinical_consent: bool = Field(
        False, description="The participant consented to the program reading their HbA1c, blood pressure and "
                           "appointments from the EHR (peersync pull). Off unless the row says so.")

    @property
    def key(self) -> str:
        return self.enrollment_id

    @field_validator("end_date")
    @classmethod
    def _end_after_start(cls, value: date | None, info: object) -> date | None:
        start = getattr(info, "data", {}).get("start_date")
        if value is not None and start is not None and value < start:
            raise ValueError("end date is before the start date")
        return value


class Contact(SourceRecord):
    """One peer contact with one participant (a group session yields one contact per attendee)."""

    kind: Literal["contact"] = "contact"
    contact_id: SourceId
    enrollment_id: SourceId
    supporter_id: SourceId
    occurred_at: AwareDatetime
    duration_minutes: Annotated[int, Field(ge=0, le=24 * 60)] | None = None
    mode: ContactMode
    setting: ContactSetting | None = None
    outcome: ContactOutcome = ContactOutcome.COMPLETED
    purpose: ContactPurpose | None = None
    support_types: tuple[SupportType, ...] = ()
    essential_elements: tuple[EssentialElement, ...] = ()
    goal_ids: tuple[SourceId, ...] = ()
    notes: str | None = None
    group_session_id: SourceId | None = None
    planned_contact_id: SourceId | None = None
    @property
    def key(self) -> str:
        return self.contact_id


class GoalNote(SourceRecord):
    """A dated progress note on a goal."""

    kind: Literal["goal_note"] = "goal_note"
    note_id: SourceId
    goal_id: SourceId
    noted_on: date
    text: NonEmptyText
    supporter_id: SourceId | None = None

    @property
    def key(self) -> str:
        return self.note_id


class GoalTarget(BaseModel):
    """A measurable target, e.g. HbA1c < 7 % or steps per day >= 7000."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    measure: TargetMeasure
    comparator: Comparator = Comparator.EQ
    value: Decimal
    unit: str | None = None


class Goal(SourceRecord):
    """A self-management goal in the participant's own words."""

    kind: Literal["goal"] = "goal"
    goal_id: SourceId
    enrollment_id: SourceId
    description: NonEmptyText
    behavior: Behavior
    target: GoalTarget | None = None
    start_date: date
    due_date: date | None = None
    lifecycle_status: GoalLifecycle = GoalLifecycle.ACTIVE
    achievement_status: GoalAchievement | None = None
    status_date: date | None = Field(None, description="When the program recorded the current status.")
    set_by: GoalSetBy = GoalSetBy.PARTICIPANT
    supporter_id: SourceId | None = None
    outcome_observation: ServerObservationId | None = Field(
        None, description="The EHR's result that shows the outcome (e.g. the HbA1c Observation `peersync pull` "
                          "lists in clinical-facts.csv), as the program recorded it.")
    notes: tuple[GoalNote, ...] = ()

    @property
    def key(self) -> str:
        return self.goal_id


class Referral(SourceRecord):
    """A linkage to a community resource (food bank, YMCA diabetes program, transport...)."""

    kind: Literal["referral"] = "referral"
    referral_id: SourceId
    enrollment_id: SourceId
    supporter_id: SourceId | None = None
    resource_name: NonEmptyText
    resource_id: SourceId | None = None
    need: NeedCategory
    referred_on: date
    status: ReferralStatus = ReferralStatus.MADE
    status_date: date | None = Field(None, description="When the referral reached its current status.")
    outcome_notes: str | None = None

    @property
    def key(self) -> str:
        return self.referral_id


class PlannedContact(SourceRecord):
    """A planned next contact: becomes a CommunicationRequest."""

    kind: Literal["planned_contact"] = "planned_contact"
    planned_contact_id: SourceId
    enrollment_id: SourceId
    supporter_id: SourceId | None = None
    due_at: AwareDatetime
    mode: ContactMode
    status: PlannedStatus = PlannedStatus.PLANNED

    @property
    def key(self) -> str:
        return self.planned_contact_id


RECORD_MODELS: dict[RecordKind, type[SourceRecord]] = {
    RecordKind.SUPPORTER: Supporter,
    RecordKind.ENROLLMENT: Enrollment,
    RecordKind.GOAL: Goal,
    RecordKind.GOAL_NOTE: GoalNote,
    RecordKind.CONTACT: Contact,
    RecordKind.REFERRAL: Referral,
    RecordKind.PLANNED_CONTACT: PlannedContact,
}

# The field holding each kind's source id.
ID_FIELDS: dict[RecordKind, str] = {
    RecordKind.SUPPORTER: "staff_id",
    RecordKind.ENROLLMENT: "enrollment_id",
    RecordKind.GOAL: "goal_id",
    RecordKind.GOAL_NOTE: "note_id",
    RecordKind.CONTACT: "contact_id",
    RecordKind.REFERRAL: "referral_id",
    RecordKind.PLANNED_CONTACT: "planned_contact_id",
}

# Fields whose values are patient data or free text: masked in rejects reports and never logged.
SENSITIVE_FIELDS: frozenset[str] = frozenset(
    {"mrn", "given_name", "family_name", "notes", "text", "description", "outcome_notes", "phone", "email", "npi"}
)
