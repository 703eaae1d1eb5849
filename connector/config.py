"""Configuration: a TOML file, overridden by environment variables (PEERSYNC_SECTION__KEY), secrets from files.

Precedence, highest first: environment variables, the TOML file, defaults. Relative paths in the file are
relative to the file's folder. Secrets (client secret, private key, token) are never required on the command
line: give them as ``*_file`` paths (Kubernetes/Docker secrets, systemd credentials) or environment variables.
See docs/configuration.md and the commented examples in docs/examples/.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from connector.auth import AuthSettings
from connector.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceSettings(_Section):
    """What to read."""

    profile: str = Field(description="Mapping profile: a profile.yaml, its folder, or a name shipped in mappings/.")
    inputs: list[Path] = Field(description="Input files or folders.")


class ProgramSettings(_Section):
    """Overrides of the profile's program block for this deployment."""

    id: str | None = None
    name: str | None = None
    base_url: str | None = None
    mrn_system: str | None = None
    terminology_base: str | None = None
    phone: str | None = None


class ServerSettings(_Section):
    """The FHIR server to write to."""

    base_url: str = Field(description="FHIR base URL, e.g. https://ehr.example.org/fhir/r4")
    timeout_seconds: float = Field(60.0, gt=0, le=600)
    verify_tls: bool = True
    ca_bundle: Path | None = Field(None, description="PEM bundle of CAs to trust instead of the system store.")
    allow_insecure_http: bool = Field(False, description="Allow http:// to a non-loopback host (never in production).")
    write_mode: Literal["auto", "conditional", "search"] = Field(
        "auto", description="auto: conditional update where the CapabilityStatement allows it, else search-then-write."
    )


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


class OutputSettings(_Section):
    """Where reports go."""

    rejects_dir: Path | None = Field(None, description="rejects.csv/json of each run (default: next to the ledger).")
    metrics_file: Path | None = Field(None, description="Prometheus text file (node_exporter textfile collector).")


class Settings(BaseSettings):
    """The whole configuration."""

    model_config = SettingsConfigDict(
        env_prefix="PEERSYNC_",
        env_nested_delimiter="__",
        extra="forbid",
        secrets_dir=None,
        hide_input_in_errors=True,  # never echo secrets from the [auth] table in error messages
    )

    source: SourceSettings
    program: ProgramSettings = ProgramSettings()
    server: ServerSettings
    auth: AuthSettings = AuthSettings()
    sync: SyncSettings = SyncSettings()
    output: OutputSettings = OutputSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first, then the TOML file (passed as init values), then secret files.
        return env_settings, init_settings, file_secret_settings

    @field_validator("server")
    @classmethod
    def _strip_slash(cls, value: ServerSettings) -> ServerSettings:
        value.base_url = value.base_url.rstrip("/")
        return value

    def rejects_dir(self) -> Path:
        """Where this deployment's rejects reports go."""
        return self.output.rejects_dir or self.sync.ledger.parent / "rejects"


def load_settings(path: Path | None) -> Settings:
    """Load the TOML file (if any) plus environment overrides; raise ConfigError naming each problem and fix."""
    data: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        base = path.resolve().parent
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(format_config_errors(exc, path)) from None
    _resolve_paths(settings, base)
    return settings


def format_config_errors(exc: ValidationError, path: Path | None) -> str:
    """One line per problem: where, what is wrong, and how to fix it."""
    where = str(path) if path else "configuration"
    lines = [f"{where}: {exc.error_count()} problem(s)"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        env = "PEERSYNC_" + "__".join(str(p).upper() for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            fix = f"add `{err['loc'][-1]} = ...` under [{'.'.join(str(p) for p in err['loc'][:-1])}] or set {env}"
        elif err["type"] == "extra_forbidden":
            fix = "remove it (unknown setting; check the spelling against docs/configuration.md)"
        else:
            fix = f"correct the value (or set {env})"
        lines.append(f"  {key}: {message}; fix: {fix}")
    return "\n".join(lines)


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
