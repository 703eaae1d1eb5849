"""Mapping profiles: declarative YAML files that describe one program's export (see mappings/README.md).

A profile says, per record kind, which file/sheet/JSON path holds the records and how each source field is
read from the columns: column names, constants, templates, value maps, multi-value splits, REDCap checkbox
columns, date formats, unknown-code policy. Loading a profile validates it fully and reports every problem
with its line number, so `peersync profile check` can point an IT person at the exact line to fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
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
from connector.model import RECORD_MODELS, EssentialElement, RecordKind, SupportType

PROFILE_FORMAT_VERSION = 1
PROFILE_FILE_NAME = "profile.yaml"

UnknownCodePolicy = Literal["reject", "other"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
        """Column names this field reads (for missing-column checks)."""
        if self.column is not None:
            return [self.column]
        if self.template is not None:
            return re.findall(r"{([^{}]+)}", self.template)
        return []


class Where(_Strict):
    """Row filter for files that hold several kinds (REDCap repeating instruments, typed NDJSON)."""

    column: str
    equals: str | None = None
    is_in: list[str] | None = Field(None, alias="in")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def matches(self, row: dict[str, Any]) -> bool:
        """True when the row belongs to this kind."""
        value = row.get(self.column)
        text = "" if value is None else str(value).strip()
        if self.equals is not None:
            return text == self.equals
        return text in (self.is_in or [])


class SourceSpec(_Strict):
    """Where a kind's records live."""

    files: list[str] = Field(description="File name globs, e.g. ['contacts*.csv'].")
    sheet: str | None = Field(None, description="Worksheet name in an Excel workbook.")
    json_path: str | None = Field(None, description="Dotted path to the array of records in a JSON document.")
    where: Where | list[Where] | None = Field(
        None, description="Row filter; a list means every condition must hold (e.g. instrument and event)."
    )

    def accepts(self, row: dict[str, Any]) -> bool:
        """True when the row passes this kind's `where` filter (or there is none)."""
        if self.where is None:
            return True
        conditions = self.where if isinstance(self.where, list) else [self.where]
        return all(condition.matches(row) for condition in conditions)


class RecordSpec(_Strict):
    """One record kind in a profile."""

    source: SourceSpec
    fields: dict[str, FieldSpec]

    @field_validator("fields", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        # `field: column_name` is shorthand for `field: {column: column_name}`.
        if isinstance(value, dict):
            return {k: ({"column": v} if isinstance(v, str) else v) for k, v in value.items()}
        return value


class ProgramSpec(_Strict):
    """The program's identity: its identifier namespace, time zone and the clinic's MRN system."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,40}$", description="Short program id used in identifier systems.")
    name: str
    base_url: str = Field(pattern=r"^https?://\S+[^/]$", description="Program's canonical base URL, no trailing /.")
    timezone: str
    mrn_system: str = Field(description="The clinic's MRN identifier system (URI).")

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
    code_tables: dict[str, dict[str, list[str]]] = Field(
        default_factory=dict, description="Named value maps: code -> list of source spellings."
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
                if field.codes is not None and field.codes not in self.code_tables:
                    errors.append(f"records.{kind.value}.fields.{name}.codes: no code table named {field.codes!r}")
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
