"""Mapping profiles: declarative YAML files that describe one program's export (see mappings/README.md).

A profile says, per record kind, which file/sheet/JSON path holds the records and how each source field is
read from the columns: column names, constants, templates, value maps, multi-value splits, REDCap checkbox
columns, date formats, unknown-code policy. Loading a profile validates it fully and reports every problem
with its line number, so `peersync profile check` can point an IT person at the exact line to fix.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from connector import assets
from connector.errors import ProfileError
from connector.model import RECORD_MODELS, EssentialElement, GoalTarget, NeedCategory, RecordKind, SupportType
from connector.read.values import cell_text, value_at

PROFILE_FORMAT_VERSION = 1
PROFILE_FILE_NAME = "profile.yaml"

UnknownCodePolicy = Literal["reject", "other"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Where(_Strict):
    """A condition on a row: a kind's row filter (`where`), or when a field applies (`when`).

    The column is read exactly as a field reads it (dotted paths into nested JSON, JSON `true`/`false` as
    text), so `{column: form.@name, equals: "Visit"}` works on an app export."""

    column: str
    equals: str | None = None
    is_in: list[str] | None = Field(None, alias="in")
    present: bool | None = Field(None, description="true: the cell has a value; false: it is empty or absent.")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _one_test(self) -> Where:
        tests = [name for name, value in (("equals", self.equals), ("in", self.is_in), ("present", self.present))
                 if value is not None]
        if len(tests) != 1:
            raise ValueError("give exactly one of equals, in or present"
                             + (f" (found {', '.join(tests)})" if tests else ""))
        return self

    def matches(self, row: dict[str, Any]) -> bool:
        """True when the row meets the condition."""
        text = cell_text(value_at(row, self.column))
        if self.present is not None:
            return bool(text) is self.present
        if self.equals is not None:
            return text == self.equals
        return text in (self.is_in or [])


def _as_list(value: Any) -> Any:
    """A single condition is a list of one (so errors point at it, not at two union branches)."""
    return [value] if isinstance(value, dict) else value


def all_match(conditions: Where | list[Where] | None, row: dict[str, Any]) -> bool:
    """True when every condition holds for the row (or there is none)."""
    if conditions is None:
        return True
    return all(c.matches(row) for c in (conditions if isinstance(conditions, list) else [conditions]))


def condition_columns(conditions: Where | list[Where] | None) -> list[str]:
    """The columns a `where` or `when` reads."""
    if conditions is None:
        return []
    return [c.column for c in (conditions if isinstance(conditions, list) else [conditions])]


class Checkboxes(_Strict):
    """REDCap-style checkbox columns: one column per option, checked when the cell is 1/true/checked."""

    prefix: str = Field(description="Column prefix, e.g. 'support___' for support___1 ... support___9.")
    options: dict[str, str] = Field(description="Column suffix -> code, e.g. {'1': 'emotional'}.")


class FieldSpec(_Strict):
    """How one source-model field is read from a row. Exactly one of column/const/template/checkboxes."""

    column: str | None = None
    const: str | int | float | bool | None = None
    template: str | None = None
    checkboxes: Checkboxes | None = None
    codes: str | None = Field(None, description="Name of a code table in `code_tables` to translate values.")
    split: str | None = Field(None, description="Separator for multi-value cells, e.g. ';'.")
    formats: list[str] | None = Field(None, description="strptime formats for dates/date-times, tried in order.")
    default: str | int | float | bool | None = None
    unknown: UnknownCodePolicy | None = Field(None, description="Override of options.unknown_codes for this field.")
    true_values: list[str] | None = Field(None, description="Cell values meaning true (booleans such as void).")
    when: list[Where] | None = Field(
        None, description="The field has a value only in rows meeting this condition (all of a list)."
    )

    @field_validator("when", mode="before")
    @classmethod
    def _when_list(cls, value: Any) -> Any:
        return _as_list(value)

    @model_validator(mode="after")
    def _one_source(self) -> FieldSpec:
        sources = [s for s in ("column", "const", "template", "checkboxes") if getattr(self, s) is not None]
        if len(sources) != 1:
            raise ValueError(
                "give exactly one of column, const, template or checkboxes"
                + (f" (found {', '.join(sources)})" if sources else "")
            )
        return self

    def columns_used(self) -> list[str]:
        """Column names this field reads, its `when` condition's included (for missing-column checks)."""
        used = condition_columns(self.when)
        if self.column is not None:
            return [self.column, *used]
        if self.template is not None:
            return [*re.findall(r"{([^{}]+)}", self.template), *used]
        return used


class SourceSpec(_Strict):
    """Where a kind's records live."""

    files: list[str] = Field(description="File name globs, e.g. ['contacts*.csv'].")
    sheet: str | None = Field(None, description="Worksheet name in an Excel workbook.")
    json_path: str | None = Field(None, description="Dotted path to the array of records in a JSON document.")
    where: list[Where] | None = Field(
        None, description="Row filter; a list means every condition must hold (e.g. instrument and event)."
    )

    @field_validator("where", mode="before")
    @classmethod
    def _where_list(cls, value: Any) -> Any:
        return _as_list(value)

    def accepts(self, row: dict[str, Any]) -> bool:
        """True when the row passes this kind's `where` filter (or there is none)."""
        return all_match(self.where, row)


class DuplicatePolicy(_Strict):
    """Resubmitted records (same id, later timestamp): keep the copy with the latest `by` date-time."""

    keep: Literal["latest"]
    by: str = Field(description="Column (or dotted JSON path) holding when the copy was received or saved.")


class RecordSpec(_Strict):
    """One record kind in a profile."""

    source: SourceSpec
    fields: dict[str, FieldSpec]
    duplicates: DuplicatePolicy | None = Field(
        None, description="Which copy of a resubmitted record is kept; default: every copy is rejected."
    )

    @field_validator("fields", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        # `field: column_name` is shorthand for `field: {column: column_name}`.
        if isinstance(value, dict):
            return {k: ({"column": v} if isinstance(v, str) else v) for k, v in value.items()}
        return value


class ReferralCode(_Strict):
    """A code for ServiceRequest.code (a US Core procedure code: SNOMED CT, CPT or HCPCS)."""

    system: str = Field(pattern=r"^\S+$")
    code: str = Field(pattern=r"^\S+$")
    display: str = Field(min_length=1)


class ReferralCodeTable(_Strict):
    """What a program really refers to: a code per community resource (``resource_id``), else per need.

    A flat mapping of needs (``{food: {...}}``, the earlier form) reads as ``needs``."""

    resources: dict[Annotated[str, Field(pattern=r"^\S+$")], ReferralCode] = Field(
        default_factory=dict, description="resource_id → the code of the service that resource provides."
    )
    needs: dict[NeedCategory, ReferralCode] = Field(
        default_factory=dict, description="need → a code true for every referral of that need."
    )

    @model_validator(mode="before")
    @classmethod
    def _flat_needs(cls, value: Any) -> Any:
        if isinstance(value, dict) and not set(value) <= {"resources", "needs"}:
            return {"needs": value}
        return value


class ProgramSpec(_Strict):
    """The program's identity: its identifier namespace, time zone and the clinic's MRN system."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,40}$", description="Short program id used in identifier systems.")
    name: str
    base_url: str = Field(pattern=r"^https?://\S+[^/]$", description="Program's canonical base URL, no trailing /.")
    timezone: str
    mrn_system: str = Field(description="The clinic's MRN identifier system (URI).")
    phone: str | None = Field(
        None, min_length=1, description="The program's phone: PractitionerRole.telecom of supporters who have none."
    )
    referral_codes: ReferralCodeTable = Field(
        default_factory=lambda: ReferralCodeTable(),
        description="ServiceRequest.code per community resource and per referral need, before the shipped table.",
    )

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}; use an IANA name such as America/Chicago") from exc
        return value


class Options(_Strict):
    """Profile-wide reading options."""

    unknown_codes: UnknownCodePolicy = "reject"
    list_separator: str = ";"
    date_formats: list[str] = ["%Y-%m-%d", "%m/%d/%Y"]
    datetime_formats: list[str] = ["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M%z", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M"]
    true_values: list[str] = ["1", "true", "yes", "y", "x", "checked", "si", "sí"]
    false_values: list[str] = ["0", "false", "no", "n", "unchecked", ""]
    earliest_date: str = "1900-01-01"
    latest_date: str = "2100-12-31"


class Profile(_Strict):
    """A validated mapping profile."""

    format_version: int
    name: str
    description: str = ""
    program: ProgramSpec
    options: Options = Options()
    code_tables: dict[str, dict[str | None, list[str]]] = Field(
        default_factory=dict,
        description="Named value maps: code -> list of source spellings; the code null means 'no value'.",
    )
    element_rules: dict[SupportType, list[EssentialElement]] = Field(
        default_factory=dict, description="Support type -> essential elements it implies."
    )
    records: dict[RecordKind, RecordSpec]

    @field_validator("format_version")
    @classmethod
    def _supported(cls, value: int) -> int:
        if value != PROFILE_FORMAT_VERSION:
            raise ValueError(f"unsupported format_version {value}; this peersync reads {PROFILE_FORMAT_VERSION}")
        return value

    @model_validator(mode="after")
    def _fields_exist(self) -> Profile:
        errors: list[str] = []
        for kind, spec in self.records.items():
            model_fields = _settable_fields(kind)
            for name, field in spec.fields.items():
                if name not in model_fields:
                    errors.append(
                        f"records.{kind.value}.fields.{name}: no such field for {kind.value} "
                        f"(known: {', '.join(sorted(model_fields))})"
                    )
                    continue
                if field.codes is not None and field.codes not in self.code_tables:
                    errors.append(f"records.{kind.value}.fields.{name}.codes: no code table named {field.codes!r}")
                errors.extend(
                    f"records.{kind.value}.fields.{name}.{modifier}: {reason}"
                    for modifier, reason in misplaced_modifiers(kind, name, field)
                )
            if spec.duplicates is not None and kind is RecordKind.ENROLLMENT:
                errors.append(f"records.{kind.value}.duplicates: enrollments cannot be resubmitted copies: "
                              "remove it (a participant's enrollment id must be unique)")
            missing = sorted(_required_fields(kind) - spec.fields.keys())
            if missing:
                errors.append(f"records.{kind.value}.fields: required field(s) not mapped: {', '.join(missing)}")
        if RecordKind.ENROLLMENT not in self.records:
            errors.append("records.enrollment: every profile must describe enrollments")
        if errors:
            raise ValueError("; ".join(errors))
        return self


# Flat names used in profiles for the nested goal target.
GOAL_TARGET_FIELDS = ("target_measure", "target_comparator", "target_value", "target_unit")
_TARGET_TYPES: dict[str, Any] = {
    "target_measure": GoalTarget.model_fields["measure"].annotation,
    "target_comparator": GoalTarget.model_fields["comparator"].annotation,
    "target_value": Decimal,
    "target_unit": str,
}


def field_type(kind: RecordKind, name: str) -> Any:
    """The plain Python type of a settable field: Optional and Annotated unwrapped, lists kept as tuple[X]."""
    if name in GOAL_TARGET_FIELDS:
        return _TARGET_TYPES[name]
    return _unwrap(RECORD_MODELS[kind].model_fields[name].annotation)


def _unwrap(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0])
    if origin is tuple:
        return tuple[_unwrap(typing.get_args(annotation)[0])]  # type: ignore[misc]
    return annotation


def is_list_type(ftype: Any) -> bool:
    """True for list fields (tuple[X] in the source model)."""
    return typing.get_origin(ftype) is tuple


def allowed_modifiers(kind: RecordKind, name: str) -> set[str]:
    """The modifiers a field accepts, from its type: `codes`/`unknown` for coded fields, `split` for lists,
    `formats` for dates, `true_values` for yes/no fields (and checkbox columns); `default` and `when` always."""
    ftype = field_type(kind, name)
    allowed = {"default", "when"}
    if is_list_type(ftype):
        allowed.add("split")
        ftype = typing.get_args(ftype)[0]
    if isinstance(ftype, type) and issubclass(ftype, StrEnum):
        allowed |= {"codes", "unknown"}
    elif ftype is bool:
        allowed.add("true_values")
    elif ftype in (date, datetime):
        allowed.add("formats")
    return allowed


_MODIFIERS = ("codes", "unknown", "split", "formats", "true_values")


def misplaced_modifiers(kind: RecordKind, name: str, field: FieldSpec) -> list[tuple[str, str]]:
    """(modifier, reason) for each modifier given to a field it does not apply to (it would be ignored)."""
    allowed = allowed_modifiers(kind, name)
    if field.checkboxes is not None:
        allowed = allowed | {"true_values"}  # checkbox cells are yes/no cells
    problems = []
    for modifier in _MODIFIERS:
        if getattr(field, modifier) is not None and modifier not in allowed:
            usable = ", ".join(sorted(allowed - {"default", "when"})) or "none but default and when"
            problems.append((modifier, f"does not apply to {kind.value}.{name} and would be ignored "
                                       f"(its modifiers: {usable}): remove it"))
    return problems


def _settable_fields(kind: RecordKind) -> set[str]:
    names = set(RECORD_MODELS[kind].model_fields) - {"kind", "notes", "original_text", "target"}
    if kind is RecordKind.CONTACT:
        names.add("notes")
    if kind is RecordKind.GOAL:
        names.update(GOAL_TARGET_FIELDS)
    return names


def _required_fields(kind: RecordKind) -> set[str]:
    return {n for n, f in RECORD_MODELS[kind].model_fields.items() if f.is_required()}


@dataclass(frozen=True)
class ProfileProblem:
    """One problem in a profile file, with the line it is on (1-based; 0 when unknown)."""

    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line else "file"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


def resolve_profile_path(name_or_path: str | Path, mappings_dir: Path | None = None) -> Path:
    """Accept a profile file, a profile directory, or the name of a profile shipped in mappings/."""
    candidate = Path(name_or_path)
    if candidate.is_dir():
        candidate = candidate / PROFILE_FILE_NAME
    if candidate.is_file():
        return candidate
    shipped = (mappings_dir or assets.mappings_dir()) / str(name_or_path) / PROFILE_FILE_NAME
    if shipped.is_file():
        return shipped
    raise ProfileError(f"profile not found: {name_or_path} (give a profile.yaml, its folder, or a name in mappings/)")


def check_profile(path: Path) -> tuple[Profile | None, list[ProfileProblem]]:
    """Load and validate a profile; return it (or None) and every problem found, with line numbers."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, [ProfileProblem(0, "", f"cannot read {path}: {exc.__class__.__name__}")]
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        return None, [ProfileProblem(line, "", f"not valid YAML: {getattr(exc, 'problem', exc)}")]
    if not isinstance(data, dict):
        return None, [ProfileProblem(1, "", "a profile must be a YAML mapping (key: value lines)")]
    try:
        return Profile.model_validate(data), []
    except ValidationError as exc:
        return None, _problems_from(exc, node)


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a profile or raise ProfileError listing every problem with its line number."""
    path = resolve_profile_path(name_or_path)
    profile, problems = check_profile(path)
    if profile is None:
        raise ProfileError(f"{path}: invalid profile:\n" + "\n".join(f"  {p}" for p in problems))
    return profile


def _problems_from(exc: ValidationError, root: yaml.Node | None) -> list[ProfileProblem]:
    problems: list[ProfileProblem] = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        message = err["msg"].removeprefix("Value error, ")
        # Model-level errors name their own paths ("records.contact.fields.x: ..."): locate each one.
        if message.count(": ") and message.split(": ", 1)[0].startswith("records."):
            for part in message.split("; "):
                path, _, msg = part.partition(": ")
                problems.append(ProfileProblem(_line_of(root, path.split(".")), path, msg))
            continue
        # Drop pydantic's union/discriminator tags (e.g. 'str', 'function-after[...]') from the path.
        clean = [p for p in loc if not p.startswith(("function-", "constrained-")) and p not in {"str", "int"}]
        problems.append(ProfileProblem(_line_of(root, clean), ".".join(clean), message))
    return sorted(problems, key=lambda p: (p.line, p.path))


def _line_of(root: yaml.Node | None, path: list[str]) -> int:
    """The 1-based line of the deepest node along ``path`` that exists in the YAML tree."""
    node = root
    line = node.start_mark.line + 1 if node is not None else 0
    for key in path:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == key:
                    node, line = value_node, key_node.start_mark.line + 1
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and key.isdigit() and int(key) < len(node.value):
            node = node.value[int(key)]
            line = node.start_mark.line + 1
        else:
            return line
    return line
