"""Configuration: a TOML file, overridden by environment variables (PEERSYNC_SECTION__KEY), secrets from files.

Precedence, highest first: environment variables, the TOML file, secret files in a secrets directory,
defaults. Relative paths in the file are relative to the file's folder. Secrets (client secret, private key,
token) are never required on the command line: give them as ``*_file`` paths (Kubernetes/Docker secrets,
systemd credentials), as files named like the environment variable in a secrets directory
(``/run/secrets/peersync_auth__client_secret``, ``$CREDENTIALS_DIRECTORY/peersync_auth__client_secret``), or
as environment variables. See docs/configuration.md and the commented examples in docs/examples/.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from connector.auth import keys
from connector.auth.methods import AuthMode, ClientAuthMethod, SigningAlg
from connector.auth.scopes import ScopeList, parse_scope, split_scopes
from connector.errors import ConfigError, TransportError
from connector.map.context import ContactProcedures, ReferralTasks
from connector.read.formats.base import ReadLimits
from connector.server.transport import origin_of

ENV_PREFIX = "PEERSYNC_"
SECRETS_DIR_ENV = "PEERSYNC_SECRETS_DIR"
DEFAULT_SECRETS_DIR = Path("/run/secrets")
# Environment variables with our prefix that are not settings (CLI options and test hooks).
NON_SETTING_ENV = frozenset({"PEERSYNC_CONFIG", "PEERSYNC_LOG_FORMAT", "PEERSYNC_SECRETS_DIR", "PEERSYNC_DEBUG",
                             "PEERSYNC_TEST_FHIR_URL"})
_MAX_SECRET_FILE_BYTES = 64 * 1024


class AuthSettings(BaseModel):
    """The ``[auth]`` table of the configuration file (env: ``PEERSYNC_AUTH__<FIELD>``).

    Each secret can be given inline (``password``, ``token``, ``client_secret``,
    ``private_key``) or, preferably, as a file path (``*_file``) such as a Kubernetes/Docker
    secret or a systemd credential; not both.
    """

    # hide_input_in_errors: a ValidationError must not echo the password it was given.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True, str_strip_whitespace=True)

    mode: AuthMode = Field("none", description="none | basic | bearer | client-credentials | smart-backend")
    client_id: str | None = Field(None, description="OAuth client_id assigned by the EHR")
    username: str | None = Field(None, description="HTTP Basic user name (mode basic)")
    password: SecretStr | None = None
    password_file: Path | None = None
    token: SecretStr | None = Field(None, description="static bearer token (mode bearer)")
    token_file: Path | None = None
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    private_key: SecretStr | None = Field(None, description="PEM private key (smart-backend); prefer private_key_file")
    private_key_file: Path | None = None
    token_url: str | None = Field(
        None,
        description="OAuth token endpoint; required for client-credentials; for smart-backend it is "
        "discovered from .well-known/smart-configuration unless set here (setting it skips discovery)",
    )
    client_auth_method: ClientAuthMethod = "client_secret_basic"
    alg: SigningAlg | None = Field(None, description="RS384 | ES384; inferred from the private key if unset")
    kid: str | None = Field(None, description="key id of the signing key, as in the registered JWK Set")
    jku: str | None = Field(None, description="HTTPS URL of our JWK Set, sent in the assertion header if set")
    scope: str | None = Field(
        None, description="space-separated scopes to request, e.g. 'system/Goal.cu system/Patient.rs'"
    )
    required_scopes: ScopeList = Field(
        default_factory=list,
        description="scopes the granted token must cover; defaults to the requested scope",
    )
    refresh_margin_seconds: int = Field(60, ge=0, le=3600, description="re-acquire the token this long before expiry")
    timeout_seconds: float = Field(30.0, gt=0, le=600, description="timeout for discovery and token requests")

    @field_validator("scope", mode="before")
    @classmethod
    def _normalise_scope(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            value = " ".join(str(v) for v in value)
        if isinstance(value, str):
            # Spaces only: commas are legal inside v2 granular scopes (?category=a,b).
            value = " ".join(split_scopes(value)) or None
        return value

    @field_validator("scope")
    @classmethod
    def _check_scope_syntax(cls, value: str | None) -> str | None:
        for s in split_scopes(value):
            parse_scope(s)
        return value

    @field_validator("required_scopes")
    @classmethod
    def _check_required_syntax(cls, value: list[str]) -> list[str]:
        value = split_scopes(value)
        for s in value:
            parse_scope(s)
        return value

    @field_validator("token_url", "jku")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                origin_of(value)
            except TransportError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("kid")
    @classmethod
    def _check_kid(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                keys.check_kid(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _check_mode(self) -> AuthSettings:
        pairs = (
            ("password", "password_file"),
            ("token", "token_file"),
            ("client_secret", "client_secret_file"),
            ("private_key", "private_key_file"),
        )
        for inline, path in pairs:
            if getattr(self, inline) is not None and getattr(self, path) is not None:
                raise ValueError(f"auth.{inline} and auth.{path} are both set; keep only one")

        def need(*names: str) -> None:
            for name in names:
                alternatives = name.split("|")
                if all(getattr(self, n) in (None, "") for n in alternatives):
                    shown = " or ".join(f"auth.{n}" for n in alternatives)
                    raise ValueError(f"auth mode {self.mode!r} needs {shown}")

        if self.mode == "basic":
            need("username", "password|password_file")
            if self.username and ":" in self.username:
                raise ValueError("auth.username must not contain ':' (HTTP Basic cannot carry it)")
        elif self.mode == "bearer":
            need("token|token_file")
        elif self.mode == "client-credentials":
            need("client_id", "client_secret|client_secret_file", "token_url")
        elif self.mode == "smart-backend":
            need("client_id", "kid", "private_key|private_key_file", "scope")
        return self

    def requested_scopes(self) -> list[str]:
        """The scope tokens sent in the token request."""
        return split_scopes(self.scope)

    def effective_required_scopes(self) -> list[str]:
        """Scopes the granted token must cover: ``required_scopes`` or else the requested scopes."""
        return list(self.required_scopes) or self.requested_scopes()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceSettings(_Section):
    """What to read."""

    profile: str = Field(description="Mapping profile: a profile.yaml, its folder, or a name shipped in mappings/.")
    inputs: list[Path] = Field(description="Input files or folders.")
    max_unpacked_mb: int = Field(512, ge=1, le=65536, description="Refuse an Excel workbook that unpacks to more "
                                 "than this (a zip bomb), and a JSON document read through json_path larger than it")
    max_cell_chars: int = Field(64 * 2**20, ge=1, le=2**30, description="Reject a row with a longer cell")
    max_line_kb: int = Field(65536, ge=1, le=1_048_576, description="Refuse a CSV/NDJSON file with a longer line, "
                             "or a JSON array with a longer record")

    def read_limits(self) -> ReadLimits:
        """The limits the readers apply."""
        return ReadLimits(max_unpacked_bytes=self.max_unpacked_mb * 2**20, max_cell_chars=self.max_cell_chars,
                          max_line_bytes=self.max_line_kb * 1024)


class ProgramSettings(_Section):
    """Overrides of the profile's program block for this deployment."""

    # The same rules as the profile's program block: these values end up in every identifier system.
    id: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9-]{0,40}$",
                           description="Short program id used in identifier systems: lower-case letters, digits, '-'")
    name: str | None = Field(None, description="The program's name, as the EHR shows it")
    base_url: str | None = Field(None, pattern=r"^https?://\S+[^/]$",
                                 description="The program's canonical base URL for identifier systems, no trailing /")
    mrn_system: str | None = Field(None, description="The clinic's MRN identifier system (URI)")
    # Deprecated and ignored: peersync's codes have one canonical base everywhere (`peersync check` warns).
    terminology_base: str | None = Field(None, description="Deprecated, ignored: peersync's CodeSystems keep their "
                                         "one canonical base (https://peersync.github.io/fhir); remove this setting")
    phone: str | None = Field(None, description="The program's phone, used when a supporter has none")
    clinical_notes: Literal["off", "also", "only"] = Field(
        "off", description="Clinical-note mode (docs/clinical-notes.md): off = structured resources only; also = a "
        "US Core DocumentReference per participant per period as well; only = the notes (and the supporters and "
        "program they name) instead of the structured resources, for EHRs that accept only documents")
    note_period: Literal["contact", "week", "month"] = Field(
        "month", description="What one clinical note covers: one contact, an ISO week or a calendar month (in the "
        "program's time zone)")


class ServerSettings(_Section):
    """The FHIR server to write to."""

    base_url: str = Field(description="FHIR base URL, e.g. https://ehr.example.org/fhir/r4")
    timeout_seconds: float = Field(60.0, gt=0, le=600, description="longest wait for any one read from the server")
    request_deadline_seconds: float = Field(
        300.0, gt=0, le=3600, description="longest time one request may take, connect to the last byte of the answer")
    verify_tls: bool = True
    ca_bundle: Path | None = Field(None, description="PEM bundle of CAs to trust instead of the system store.")
    allow_insecure_http: bool = Field(False, description="Allow http:// to a non-loopback host (never in production).")
    write_mode: Literal["auto", "conditional", "search"] = Field(
        "auto", description="auto: conditional update where the CapabilityStatement allows it, else search-then-write."
    )
    write_strategy: Literal["auto", "transaction", "batch", "single", "update-as-create"] = Field(
        "auto", description="How writes travel: auto picks transaction, else batch, else single from the "
        "CapabilityStatement; update-as-create (PUT Type/{id derived from the identifier}) only when set "
        "(docs/configuration.md)")
    resolves_conditional_references: bool = Field(
        True, description="The server resolves Type?identifier= references inside a transaction (HAPI does); "
        "false: peersync sends literal Type/id references it resolved itself")
    contact_procedures: ContactProcedures = Field(
        "off", description="Also write each contact as a US Core Procedure ('also'), or only as one ('instead'), for "
        "EHRs that show Procedures and ignore Communications. Choose before the first sync: switching later does "
        "not retract what was written")
    referral_tasks: ReferralTasks = Field(
        "requested", description="The status of an open referral's Task: 'requested' (ready to be acted upon), or "
        "'draft' for receivers that start work on any requested Task they own while the program has already made "
        "the referral by phone or fax (docs/configuration.md)")


class SyncSettings(_Section):
    """How the sync runs."""

    ledger: Path = Field(Path(".peersync/ledger.sqlite"), description="The state ledger (SQLite; keep on local disk).")
    concurrency: int = Field(4, ge=1, le=32, description="Participants written in parallel.")
    max_bundle_entries: int = Field(100, ge=2, le=1000)
    retry_attempts: int = Field(5, ge=0, le=20)
    backoff_factor: float = Field(0.5, ge=0, le=60)
    backoff_max_seconds: float = Field(30.0, ge=0, le=3600)
    retry_after_cap_seconds: float = Field(120.0, ge=0, le=3600)
    max_delete_fraction: float = Field(0.2, ge=0, le=1)
    max_row_drop_fraction: float = Field(
        0.2, ge=0, le=1, description="Hold a record kind whose row count fell by more than this share since the last "
        "completed run (the shape guard, docs/operations.md)")
    accept_shape_change: bool = Field(
        False, description="Accept changed input shapes (a missing column, fewer rows) instead of holding the kind; "
        "set it for one run, then remove it: while it is set the shape guard is off")
    data_problems_exit_zero: bool = Field(
        False, description="Exit 0 instead of 65 when the only problems are single records (rejected, quarantined, "
        "in review), so a scheduler such as a Kubernetes Job does not page IT for the program's data; the metrics "
        "and the summary still show them. An empty input, held deletions or a held record kind still exit 65")
    run_deadline_seconds: float = Field(
        7200.0, gt=0, le=7 * 86400,
        description="a sync stops sending after this long; unsent records stay pending and the run exits 69")
    read_cache: bool = Field(
        True, description="Keep the last sync's staged records next to the ledger (`<ledger>.read-cache.sqlite`, "
        "created with the ledger's file mode) so that the next sync converts only rows that changed. It holds "
        "patient data, as the input files do; false removes it and every sync converts every row")


class OutputSettings(_Section):
    """Where reports go."""

    rejects_dir: Path | None = Field(None, description="rejects.csv/json of each run (default: next to the ledger).")
    metrics_file: Path | None = Field(None, description="Prometheus text file (node_exporter textfile collector).")
    group_readable: bool = Field(False, description="Create the ledger, rejects reports and metrics file 0640 "
                                                    "(folders 0750) instead of 0600 (0700), for a reader in "
                                                    "the peersync user's group such as node_exporter.")
    store_server_diagnostics: bool = Field(
        False, description="Also keep the server's free diagnostics text (scrubbed) in the ledger and review list; "
                           "it can echo patient data.")


class PullSettings(_Section):
    """``peersync pull``: clinic referrals into the program, referral statuses and (with consent) clinical facts."""

    intake_dir: Path | None = Field(None, description="Intake files of clinic referrals (PHI, 0600; default: "
                                                      "next to the ledger, intake/).")
    overlap_minutes: int = Field(10, ge=0, le=1440, description="Each search for new referral Tasks starts this "
                                                                "long before the last one's newest Task (clock skew).")
    referral_codes: list[str] = Field(
        default_factory=list, description="ServiceRequest codes (system|code) the program takes; empty: any code.")
    program_organization: str | None = Field(
        None, description="The program's Organization on the EHR as system|value (default: the one peersync "
                          "writes for the program).")
    clinical_facts: bool = Field(False, description="Fetch the latest HbA1c, blood pressure and upcoming "
                                                    "appointments for participants whose enrollment records consent.")
    reports_dir: Path | None = Field(None, description="referrals.csv/json and clinical-facts.csv (0600; default: "
                                                       "next to the ledger, pull/).")
    mark_received: bool = Field(True, description="Move each delivered Task to received (false: only tag it "
                                                  "delivered, for an EHR that validates Tasks against SDOH Clinical "
                                                  "Care, whose referral Task statuses exclude received).")


class DirectorySettings(_Section):
    """Directory resources (Organization, Practitioner, PractitionerRole) the EHR already holds: many EHRs do
    not let an outside system create them (docs/configuration.md, docs/ehr-compatibility.md)."""

    organization: Literal["write", "existing"] = Field(
        "write", description="write: peersync writes the program's Organization; existing: it references the EHR's "
        "Organization found by organization_identifier and never writes one")
    organization_identifier: str | None = Field(
        None, pattern=r"^\S+\|\S+$", description="The EHR's Organization of the program or clinic as system|value "
        "(required with organization = \"existing\")")
    practitioners: Literal["write", "existing"] = Field(
        "write", description="write: peersync writes a Practitioner per supporter; existing: it references the "
        "EHR's Practitioner found by the supporter's identifier (practitioner_identifier_system) and never writes one")
    practitioner_identifier_system: str = Field(
        "http://hl7.org/fhir/sid/us-npi", description="The identifier system the EHR's Practitioners carry (NPI by "
        "default)")
    practitioner_identifier_field: Literal["npi", "staff_id"] = Field(
        "npi", description="The supporter field holding their identifier in that system: npi (the profile's "
        "supporter npi column) or staff_id (the program's staff id, when the EHR holds it)")
    practitioner_roles: Literal["write", "skip"] | None = Field(
        None, description="write: peersync writes each supporter's PractitionerRole; skip: references name the "
        "supporter's Practitioner instead. Default: follows practitioners (write, or skip with existing)")

    @model_validator(mode="after")
    def _identifier_when_existing(self) -> DirectorySettings:
        if self.organization == "existing" and not self.organization_identifier:
            raise ValueError('organization = "existing" needs organization_identifier = "system|value": the '
                             "identifier of the program's (or clinic's) Organization on the EHR")
        return self

    def writes_roles(self) -> bool:
        """Whether peersync writes the supporters' PractitionerRoles."""
        if self.practitioner_roles is None:
            return self.practitioners == "write"
        return self.practitioner_roles == "write"


# -- secrets directories -----------------------------------------------------------------------------------


def secret_dirs(environ: Mapping[str, str] | None = None) -> list[Path]:
    """The directories searched for ``peersync_<section>__<key>`` files, first match wins.

    ``PEERSYNC_SECRETS_DIR`` (a list separated by ``os.pathsep``; empty = none) replaces the defaults, which
    are ``$CREDENTIALS_DIRECTORY`` (set by systemd for units with ``LoadCredential=``) and ``/run/secrets``
    (Docker and Compose secrets; Kubernetes when a secret is mounted there).
    """
    env = os.environ if environ is None else environ
    if SECRETS_DIR_ENV in env:
        return [Path(p) for p in env[SECRETS_DIR_ENV].split(os.pathsep) if p]
    dirs = [Path(env["CREDENTIALS_DIRECTORY"])] if env.get("CREDENTIALS_DIRECTORY") else []
    return [*dirs, DEFAULT_SECRETS_DIR]


@dataclass(frozen=True)
class SecretFile:
    """A setting found in a secrets directory."""

    section: str
    key: str
    path: Path


def find_secret_files(environ: Mapping[str, str] | None = None) -> list[SecretFile]:
    """Files named ``peersync_<section>__<key>`` (any case) at the top of each secrets directory.

    Only our own names at the top level are looked at: a secrets directory may also hold other services'
    secrets (e.g. a Kubernetes service-account token under /run/secrets/kubernetes.io), which are never read.
    """
    found: dict[tuple[str, str], SecretFile] = {}
    for directory in secret_dirs(environ):
        try:
            entries = sorted(directory.iterdir()) if directory.is_dir() else []
        except OSError:
            continue
        for entry in entries:
            name = entry.name.lower()
            if not name.startswith(ENV_PREFIX.lower()) or not entry.is_file():
                continue
            parts = name[len(ENV_PREFIX):].split("__")
            if len(parts) == 2 and all(parts):
                found.setdefault((parts[0], parts[1]), SecretFile(parts[0], parts[1], entry))
    return list(found.values())


def read_secret_file(path: Path) -> str:
    """A secret file's text without the trailing newline that ``echo``/editors add."""
    with path.open("rb") as handle:
        data = handle.read(_MAX_SECRET_FILE_BYTES + 1)
    if len(data) > _MAX_SECRET_FILE_BYTES:
        raise ConfigError(f"secret file {path} is larger than {_MAX_SECRET_FILE_BYTES} bytes; is it the right file?")
    return data.decode("utf-8").rstrip("\r\n")


class SecretFilesSource(PydanticBaseSettingsSource):
    """Settings from files in the secrets directories, named like the environment variables."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False  # unused: __call__ builds the whole nested dict

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for secret in find_secret_files():
            try:
                text = read_secret_file(secret.path)
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"cannot read secret file {secret.path}: {type(exc).__name__}") from None
            values.setdefault(secret.section, {})[secret.key] = text
        return values


class Settings(BaseSettings):
    """The whole configuration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        hide_input_in_errors=True,  # never echo secrets from the [auth] table in error messages
    )

    source: SourceSettings
    program: ProgramSettings = ProgramSettings()
    server: ServerSettings
    auth: AuthSettings = AuthSettings()
    sync: SyncSettings = SyncSettings()
    output: OutputSettings = OutputSettings()
    pull: PullSettings = PullSettings()
    directory: DirectorySettings = DirectorySettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first, then the TOML file (passed as init values), then files in the secrets directories.
        # pydantic-settings' own secrets_dir source is not used: it reads every file below the directory
        # (including other services' secrets) and needs pydantic-settings >= 2.12 for nested settings.
        return env_settings, init_settings, SecretFilesSource(settings_cls)

    @field_validator("server")
    @classmethod
    def _strip_slash(cls, value: ServerSettings) -> ServerSettings:
        value.base_url = value.base_url.rstrip("/")
        return value

    def rejects_dir(self) -> Path:
        """Where this deployment's rejects reports go."""
        return self.output.rejects_dir or self.sync.ledger.parent / "rejects"

    def intake_dir(self) -> Path:
        """Where intake files of clinic referrals go (PHI)."""
        return self.pull.intake_dir or self.sync.ledger.parent / "intake"

    def pull_reports_dir(self) -> Path:
        """Where the referrals report and the clinical facts file go."""
        return self.pull.reports_dir or self.sync.ledger.parent / "pull"

    def file_mode(self) -> int:
        """The mode of the ledger, rejects and metrics files peersync creates (0600, or 0640 for a group)."""
        from connector.files import file_mode

        return file_mode(self.output.group_readable)


SECTIONS: dict[str, type[BaseModel]] = {
    "source": SourceSettings, "program": ProgramSettings, "server": ServerSettings, "auth": AuthSettings,
    "sync": SyncSettings, "output": OutputSettings, "pull": PullSettings, "directory": DirectorySettings,
}


# -- loading -----------------------------------------------------------------------------------------------


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse the TOML file; ConfigError names the line and column of a syntax error."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder; give the path of the TOML file") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable by this user") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}; fix the syntax at that line") from None


def load_settings(path: Path | None) -> Settings:
    """Load the TOML file (if any) plus environment overrides; raise ConfigError naming each problem and fix."""
    data: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        data = read_config_file(path)
        base = path.resolve().parent
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(format_config_errors(exc, path)) from None
    _resolve_paths(settings, base)
    return settings


@dataclass(frozen=True)
class ConfigProblem:
    """One validation problem: the setting, where its value came from, what is wrong, how to fix it."""

    key: str  # dotted setting name, e.g. server.base_url
    where: str  # "peersync.toml:12", "environment variable PEERSYNC_SERVER__BASE_URL", "secret file ..."
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.where}: {self.key}: {self.message}; fix: {self.fix}"


def config_problems(exc: ValidationError, path: Path | None,
                    environ: Mapping[str, str] | None = None) -> list[ConfigProblem]:
    """Turn a ValidationError into problems with locations and fixes."""
    env = os.environ if environ is None else environ
    text = _read_text(path)
    secrets = {(s.section, s.key): s.path for s in find_secret_files(env)}
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join(loc)
        env_name = ENV_PREFIX + "__".join(p.upper() for p in loc[:2])
        message = err["msg"].removeprefix("Value error, ")
        where = _origin(loc, path, text, env, secrets)
        if err["type"] == "missing":
            if len(loc) == 1:
                required = ", ".join(f"{name} = ..." for name, f in SECTIONS[loc[0]].model_fields.items()
                                     if f.is_required()) if loc[0] in SECTIONS else ""
                fix = f"add a [{loc[0]}] section" + (f" with {required}" if required else "")
            else:
                hint = _description(loc)
                fix = (f"add `{loc[-1]} = ...` under [{'.'.join(loc[:-1])}]" + (f" ({hint})" if hint else "")
                       + f", or set {env_name}")
        elif err["type"] == "extra_forbidden":
            known = ", ".join(SECTIONS) if len(loc) == 1 else ", ".join(SECTIONS[loc[0]].model_fields) \
                if loc[0] in SECTIONS else ""
            near = _closest(loc[-1], known.split(", ")) if known else None
            fix = ("remove it or correct the spelling" + (f" (did you mean {near!r}?)" if near else "")
                   + (f"; known {'sections' if len(loc) == 1 else 'keys'}: {known}" if known else ""))
            message = "unknown " + ("section" if len(loc) == 1 else "setting")
        elif len(loc) == 1 and loc[0] == "auth":
            fix = "complete the [auth] section for this mode (docs/authentication.md lists what each mode needs)"
        else:
            hint = _description(loc)
            fix = "correct the value" + (f" ({hint})" if hint else "") + \
                (f" in {where}" if where.startswith(("environment", "secret")) else "")
        problems.append(ConfigProblem(key, where, message, fix))
    return problems


def format_config_errors(exc: ValidationError, path: Path | None) -> str:
    """One line per problem: where, what is wrong, and how to fix it."""
    problems = config_problems(exc, path)
    where = str(path) if path else "configuration"
    return "\n".join([f"{where}: {len(problems)} problem(s)", *(f"  {p}" for p in problems)])


def unknown_env_settings(environ: Mapping[str, str] | None = None) -> list[str]:
    """PEERSYNC_* variables that look like settings but name none (pydantic-settings ignores them silently).

    Reported: ``PEERSYNC_<X>__<Y>`` names with an unknown section or key, and the common single-underscore
    slip (``PEERSYNC_SERVER_BASE_URL``). Other PEERSYNC_* names (test-harness switches) are not settings.
    """
    env = os.environ if environ is None else environ
    unknown = []
    for name in env:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in NON_SETTING_ENV:
            continue
        rest = upper[len(ENV_PREFIX):]
        if "__" not in rest:
            if any(rest.startswith(section.upper() + "_") for section in SECTIONS):
                unknown.append(name)
            continue
        section, _, key = rest.partition("__")
        model = SECTIONS.get(section.lower())
        if model is None or key.lower() not in model.model_fields:
            unknown.append(name)
    return sorted(unknown)


def locate(text: str | None, section: str, key: str | None = None) -> int | None:
    """The line number of ``[section]`` (or of ``key = ...`` inside it) in TOML text; None if not found."""
    if not text:
        return None
    current = None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        header = re.match(r"^\[\s*([A-Za-z0-9_.-]+)\s*\]", stripped)
        if header:
            current = header.group(1)
            if key is None and current == section:
                return number
            continue
        if key is not None and current == section and re.match(rf"^\"?{re.escape(key)}\"?\s*=", stripped):
            return number
    return None


def _origin(loc: list[str], path: Path | None, text: str | None, env: Mapping[str, str],
            secrets: Mapping[tuple[str, str], Path]) -> str:
    if len(loc) >= 2:
        env_name = ENV_PREFIX + f"{loc[0]}__{loc[1]}".upper()
        if any(name.upper() == env_name for name in env):
            return f"environment variable {env_name}"
        if (loc[0], loc[1]) in secrets and locate(text, loc[0], loc[1]) is None:
            return f"secret file {secrets[(loc[0], loc[1])]}"
    if path is None:
        return "configuration"
    line = locate(text, loc[0], loc[1] if len(loc) >= 2 else None) if loc else None
    if line is None and len(loc) >= 2:
        line = locate(text, loc[0])
    return f"{path}:{line}" if line else str(path)


# Examples shown in fixes, for the settings people most often get wrong.
_EXAMPLES = {
    ("source", "inputs"): 'a list, e.g. inputs = ["exports/"]',
    ("source", "profile"): 'e.g. profile = "peersync-template"',
    ("server", "base_url"): 'e.g. base_url = "https://ehr.example.org/fhir/r4"',
    ("sync", "ledger"): 'e.g. ledger = "/var/lib/peersync/ledger.sqlite"',
}


def _description(loc: list[str]) -> str:
    model = SECTIONS.get(loc[0])
    if model is None or len(loc) < 2 or loc[1] not in model.model_fields:
        return ""
    text = (model.model_fields[loc[1]].description or "").rstrip(".")
    example = _EXAMPLES.get((loc[0], loc[1]))
    if example and example not in text:
        text = f"{text}; {example}" if text else example
    return text


def _closest(word: str, candidates: list[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(word.lower(), candidates, n=1, cutoff=0.6)
    return match[0] if match else None


def _read_text(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _resolve_paths(settings: Settings, base: Path) -> None:
    settings.source.inputs = [p if p.is_absolute() else (base / p).resolve() for p in settings.source.inputs]
    profile = Path(settings.source.profile)
    if not profile.is_absolute() and (base / profile).exists():
        settings.source.profile = str(base / profile)
    if not settings.sync.ledger.is_absolute():
        settings.sync.ledger = (base / settings.sync.ledger).resolve()
    for section, name in (("output", "rejects_dir"), ("output", "metrics_file"), ("server", "ca_bundle")):
        obj = getattr(settings, section)
        value = getattr(obj, name)
        if value is not None and not value.is_absolute():
            setattr(obj, name, (base / value).resolve())
    for name in ("password_file", "token_file", "client_secret_file", "private_key_file"):
        value = getattr(settings.auth, name)
        if value is not None and not value.is_absolute():
            setattr(settings.auth, name, (base / value).resolve())
