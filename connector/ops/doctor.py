"""Pre-flight checks for IT staff: ``peersync config check`` (offline) and ``peersync doctor`` (online).

``check_config`` validates a configuration without any network access: TOML syntax, unknown keys, types,
missing values (each with the file line or environment variable it came from), transport safety, secret
files, the private key, the mapping profile, the shipped terminology (so that an incomplete install fails
here, not at the first sync), input paths and the writability of the ledger and report folders.

``run_doctor`` adds what only the server can answer: is it reachable, is it FHIR R4, does its
CapabilityStatement offer what peersync uses (transaction, conditional update, identifier search per
resource type), do our credentials work and cover our writes, and is the ledger healthy.

Every check says what was found and, when it is not a pass, what to change. No check prints a token,
a secret or patient data; the server probe searches Patient by a made-up identifier value.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from connector.errors import (
    WRITE_ACCESS_FIX,
    ConfigError,
    ExitCode,
    PeersyncError,
    TransportError,
)
from connector.server.capabilities import Capabilities, ResourceCapability

if TYPE_CHECKING:
    from connector.ops.config import Settings

# What peersync writes, and how (see connector/write/writer.py and docs/fhir-mapping.md).
WRITTEN_TYPES: tuple[str, ...] = ("Organization", "Device", "Practitioner", "PractitionerRole", "CareTeam",
                                  "CarePlan", "Goal", "Communication", "CommunicationRequest", "ServiceRequest",
                                  "Task", "Provenance")


# Provenance is only ever created (R4 Provenance has no identifier); the others are conditional updates.
CREATE_ONLY_TYPES = frozenset({"Provenance"})
# Types whose resources peersync reads back by id (to void them, or to follow Patient.link).
READ_TYPES = frozenset({"Goal", "CarePlan", "CareTeam", "Communication", "CommunicationRequest", "ServiceRequest",
                        "Task", "Patient"})
PROBE_VALUE = "peersync-doctor-probe"  # an MRN no clinic uses: the auth probe must match nothing
CLOCK_SKEW_WARN_SECONDS = 60
DRIFT_SAMPLE = 20  # ledger resources the doctor reads back (a handful of batched searches)
_SECRET_FIELDS = (("password", "password_file", "password"), ("token", "token_file", "bearer token"),
                  ("client_secret", "client_secret_file", "client secret"),
                  ("private_key", "private_key_file", "private key"))


class Status(StrEnum):
    """A check's result."""

    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass
class Check:
    """One line of the pre-flight table."""

    name: str
    status: Status
    detail: str
    fix: str = ""
    # The exit code this check stands for when it fails (78 configuration, 77 auth, 69 server unavailable).
    exit_code: int = int(ExitCode.CONFIG_ERROR)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        out: dict[str, Any] = {"name": self.name, "status": self.status.value, "detail": self.detail}
        if self.fix:
            out["fix"] = self.fix
        return out


# When several checks fail, the exit code is the most actionable one: configuration, then auth, then server.
_EXIT_PRECEDENCE = (ExitCode.CONFIG_ERROR, ExitCode.AUTH_FAILED, ExitCode.SERVER_UNAVAILABLE)


@dataclass
class Report:
    """The checks of one ``config check`` or ``doctor`` run."""

    config: str | None
    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, status: Status, detail: str, fix: str = "",
            exit_code: ExitCode = ExitCode.CONFIG_ERROR) -> Check:
        """Append a check and return it."""
        check = Check(name, status, detail, fix, int(exit_code))
        self.checks.append(check)
        return check

    def failed(self, prefix: str = "") -> bool:
        """True if any check (whose name starts with ``prefix``) failed."""
        return any(c.status is Status.FAIL and c.name.startswith(prefix) for c in self.checks)

    def counts(self) -> dict[str, int]:
        """Checks per status."""
        return {s.value: sum(1 for c in self.checks if c.status is s) for s in Status}

    def exit_code(self) -> int:
        """0 without failures, else the most actionable failure's code."""
        codes = {c.exit_code for c in self.checks if c.status is Status.FAIL}
        if not codes:
            return int(ExitCode.OK)
        return next((int(code) for code in _EXIT_PRECEDENCE if int(code) in codes), min(codes))

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (the ``--json`` output)."""
        return {"config": self.config, "ok": not self.failed(), "exit_code": self.exit_code(),
                "counts": self.counts(), "checks": [c.as_dict() for c in self.checks]}


# -- offline: config check ---------------------------------------------------------------------------------


@dataclass
class _Loaded:
    settings: Any = None  # connector.ops.config.Settings
    raw: dict[str, Any] = field(default_factory=dict)
    auth_ok: bool = False
    server_ok: bool = False


def check_config(path: Path | None, environ: Mapping[str, str] | None = None) -> Report:
    """Validate a configuration without network access; every problem comes with its fix."""
    report = Report(str(path) if path else None)
    _offline(report, path, environ)
    return report


def _offline(report: Report, path: Path | None, environ: Mapping[str, str] | None) -> _Loaded:
    from connector.ops.config import (
        Settings,
        _resolve_paths,
        config_problems,
        find_secret_files,
        read_config_file,
        unknown_env_settings,
    )

    loaded = _Loaded()
    env = os.environ if environ is None else environ
    if path is None:
        report.add("config.file", Status.WARN, "no configuration file given: using environment variables only",
                   "pass --config FILE (or set PEERSYNC_CONFIG) unless every setting comes from PEERSYNC_* variables")
        data: dict[str, Any] = {}
        base = Path.cwd()
    else:
        try:
            data = read_config_file(path)
        except ConfigError as exc:
            report.add("config.file", Status.FAIL, str(exc), _file_fix(str(exc)))
            return loaded
        base = path.resolve().parent
        report.add("config.file", Status.PASS, f"{path}: valid TOML")
    loaded.raw = data
    for secret in find_secret_files(env):
        report.add("config.secrets_dir", Status.PASS, f"{secret.section}.{secret.key} is read from {secret.path}")
    unknown_env = unknown_env_settings(env)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        problems = config_problems(exc, path, env)
        # A variable that fails validation is reported once, as that failure, not also as a warning.
        _warn_unknown_env(report, [name for name in unknown_env if not any(name in p.where for p in problems)])
        for problem in problems:
            report.add(problem.key, Status.FAIL, f"{problem.where}: {problem.message}", problem.fix)
        return loaded
    except ConfigError as exc:  # an unreadable file in a secrets directory
        _warn_unknown_env(report, unknown_env)
        report.add("config.secrets_dir", Status.FAIL, str(exc), "fix the file's permissions or remove it")
        return loaded
    _warn_unknown_env(report, unknown_env)
    _resolve_paths(settings, base)
    loaded.settings = settings
    report.add("config.settings", Status.PASS, "every setting is known and has a valid value")
    loaded.server_ok = _check_server_settings(report, settings)
    loaded.auth_ok = _check_auth_offline(report, settings, data.get("auth") or {}, loaded.server_ok)
    _check_deprecated(report, settings)
    _check_profile(report, settings)
    _check_assets(report)
    _check_inputs(report, settings)
    if _check_writable(report, "sync.ledger", settings.sync.ledger, is_file=True):
        _check_ledger_file(report, settings.sync.ledger)
    else:
        report.add("ledger", Status.SKIP, "not checked: this user cannot write the ledger (see sync.ledger)")
    _check_writable(report, "output.rejects_dir", settings.rejects_dir(), is_file=False)
    if settings.output.metrics_file is not None:
        _check_writable(report, "output.metrics_file", settings.output.metrics_file, is_file=True)
    return loaded


def _warn_unknown_env(report: Report, names: list[str]) -> None:
    for name in names:
        report.add("config.env", Status.WARN, f"environment variable {name} names no setting and is ignored",
                   "correct the name (PEERSYNC_<SECTION>__<KEY> with two underscores, e.g. "
                   "PEERSYNC_SERVER__BASE_URL) or unset it")


def _file_fix(message: str) -> str:
    if "not found" in message:
        return "check the path (relative paths are relative to the current folder) or set PEERSYNC_CONFIG"
    if "not readable" in message:
        return "give the peersync user read access (chmod 640 and the right group)"
    return "fix the file as the message says; docs/configuration.md lists every setting"


def _check_deprecated(report: Report, settings: Any) -> None:
    from connector.map.context import TERMINOLOGY_BASE

    if settings.program.terminology_base is not None:
        report.add("program.terminology_base", Status.WARN,
                   f"program.terminology_base ({settings.program.terminology_base}) is deprecated and ignored: "
                   f"peersync's codes keep their one canonical base, {TERMINOLOGY_BASE}, in every deployment",
                   "remove terminology_base from [program] (and PEERSYNC_PROGRAM__TERMINOLOGY_BASE); codes written "
                   "under the old base are rewritten on the next sync")


def _check_server_settings(report: Report, settings: Any) -> bool:
    from connector.server.transport import check_url_safety, is_loopback_host, origin_of

    server = settings.server
    try:
        origin = origin_of(server.base_url)
        check_url_safety(server.base_url, allow_insecure_http=False)
    except TransportError as exc:
        plain_http = server.base_url.lower().startswith("http://") and "@" not in server.base_url
        if plain_http and server.allow_insecure_http:
            report.add("server.base_url", Status.WARN,
                       f"plain http:// to {server.base_url} is allowed by server.allow_insecure_http",
                       "use https:// for anything but a test server on a trusted network")
        else:
            fix = ("use https://, or for a test server on a trusted network set allow_insecure_http = true "
                   "under [server]") if plain_http else "correct server.base_url"
            report.add("server.base_url", Status.FAIL, str(exc), fix)
            return False
    else:
        where = "loopback test server" if is_loopback_host(origin.host) and origin.scheme == "http" else "ok"
        report.add("server.base_url", Status.PASS, f"{server.base_url} ({where})")
    ok = True
    if server.ca_bundle is not None and not server.ca_bundle.exists():
        report.add("server.ca_bundle", Status.FAIL, f"CA bundle {server.ca_bundle} does not exist",
                   "point server.ca_bundle at the PEM file of the clinic's CA, or remove it to use the system CAs")
        ok = False
    if not server.verify_tls and server.ca_bundle is None:
        report.add("server.verify_tls", Status.WARN, "TLS certificate verification is disabled",
                   "remove verify_tls = false; for a private CA set server.ca_bundle instead")
    return ok


def _check_auth_offline(report: Report, settings: Any, raw_auth: Mapping[str, Any], server_ok: bool) -> bool:
    from connector.auth import build_auth, keys
    from connector.server.transport import is_loopback_host, new_session, origin_of

    auth = settings.auth
    ok = True
    for inline, file_field, what in _SECRET_FIELDS:
        if inline in raw_auth:
            report.add(f"auth.{inline}", Status.WARN, f"the {what} is written in the configuration file",
                       f"move it to a file readable only by the peersync user and set auth.{file_field} "
                       "(or use a secrets directory, see docs/configuration.md)")
        path = getattr(auth, file_field)
        if path is not None:
            ok &= _check_secret_file(report, f"auth.{file_field}", path, what)
    if not ok:
        return False
    if auth.mode == "smart-backend":
        ok = _check_private_key(report, auth, keys)
    if ok and server_ok:
        try:
            build_auth(auth, settings.server.base_url, new_session(),
                       allow_insecure_http=settings.server.allow_insecure_http)
        except PeersyncError as exc:
            report.add("auth", Status.FAIL, str(exc), "correct the [auth] section (docs/authentication.md)")
            return False
    if ok:
        remote = False
        with contextlib.suppress(TransportError):
            remote = not is_loopback_host(origin_of(settings.server.base_url).host)
        if auth.mode == "none" and remote:
            report.add("auth.mode", Status.WARN, "no authentication is configured for a remote server",
                       "fine for a public test server; a clinic EHR needs [auth] (docs/authentication.md)")
        else:
            report.add("auth.mode", Status.PASS, f"mode {auth.mode}" + (f", client_id {auth.client_id}"
                                                                        if auth.client_id else ""))
    return ok


def _check_secret_file(report: Report, name: str, path: Path, what: str) -> bool:
    try:
        info = path.stat()
    except FileNotFoundError:
        report.add(name, Status.FAIL, f"{what} file {path} does not exist",
                   "create it, mount the secret there, or correct the path")
        return False
    except OSError as exc:
        report.add(name, Status.FAIL, f"cannot reach {what} file {path} ({type(exc).__name__})",
                   "check the folder permissions")
        return False
    if not stat.S_ISREG(info.st_mode):
        report.add(name, Status.FAIL, f"{what} file {path} is not a regular file", "point it at the secret file")
        return False
    try:
        with path.open("rb") as handle:
            empty = not handle.read(1)
    except PermissionError:
        report.add(name, Status.FAIL, f"{what} file {path} is not readable by this user",
                   "give the peersync user read access (e.g. chown peersync and chmod 400)")
        return False
    except OSError as exc:
        report.add(name, Status.FAIL, f"cannot read {what} file {path} ({type(exc).__name__})",
                   "check the file")
        return False
    if empty:
        report.add(name, Status.FAIL, f"{what} file {path} is empty", "write the secret into it")
        return False
    if info.st_mode & stat.S_IROTH:
        report.add(name, Status.WARN, f"{what} file {path} is readable by every user on this host",
                   "chmod 400 (Kubernetes: defaultMode: 0400 on the secret volume)")
    else:
        report.add(name, Status.PASS, f"{what} file {path} is readable")
    return True


def _check_private_key(report: Report, auth: Any, keys: Any) -> bool:
    try:
        if auth.private_key_file is not None:
            pem = auth.private_key_file.read_bytes()
            source = f"private key file {auth.private_key_file}"
        elif auth.private_key is not None:
            pem = auth.private_key.get_secret_value().replace("\\n", "\n").encode()
            source = "auth.private_key"
        else:
            return True  # AuthSettings already reported the missing key
        key = keys.load_private_key(pem, source=source)
        alg = auth.alg or keys.alg_for_key(key)
        keys.check_key_matches_alg(key, alg)
    except ConfigError as exc:
        report.add("auth.private_key", Status.FAIL, str(exc),
                   "use the unencrypted PEM written by 'peersync keys generate' (RS384: RSA >= 2048 bits, "
                   "ES384: EC P-384) and make auth.alg match it")
        return False
    except OSError as exc:
        report.add("auth.private_key", Status.FAIL, f"cannot read the private key ({type(exc).__name__})",
                   "check the file's permissions")
        return False
    report.add("auth.private_key", Status.PASS, f"{source}: a usable {alg} signing key (kid {auth.kid})")
    return True


def _check_profile(report: Report, settings: Any) -> None:
    from connector.read.profile import check_profile, resolve_profile_path

    try:
        path = resolve_profile_path(settings.source.profile)
    except ConfigError as exc:
        report.add("source.profile", Status.FAIL, str(exc),
                   "set source.profile to a profile.yaml, its folder, or a name shipped in mappings/")
        return
    loaded, problems = check_profile(path)
    if loaded is None:
        for problem in problems:
            report.add("source.profile", Status.FAIL, f"{path}:{problem.line}: "
                       f"{problem.path + ': ' if problem.path else ''}{problem.message}",
                       f"fix the profile (check it alone with: peersync profile check {path})")
        return
    try:
        from connector.wiring import mapping_context

        mapping_context(settings)
    except (ConfigError, ValueError) as exc:
        report.add("program", Status.FAIL, f"the [program] overrides do not fit the profile: {exc}",
                   "correct the [program] section")
        return
    kinds = ", ".join(k.value for k in loaded.records)
    report.add("source.profile", Status.PASS, f"{path}: profile {loaded.name!r}, program {loaded.program.id!r} "
               f"({kinds})")


def _check_assets(report: Report) -> None:
    # the data a sync loads besides the profile: an incomplete install must fail here, not at the first sync
    from connector.assets import check_runtime_assets, terminology_dir

    problems = check_runtime_assets()
    for problem in problems:
        report.add(f"assets.{problem.what}", Status.FAIL, problem.message, problem.fix)
    if not problems:
        report.add("assets.terminology", Status.PASS, f"{terminology_dir()}: every code the mappers write is defined")


def _check_inputs(report: Report, settings: Any) -> None:
    missing = [p for p in settings.source.inputs if not p.exists()]
    if not settings.source.inputs:
        report.add("source.inputs", Status.FAIL, "no input files or folders are configured",
                   'list the program\'s export files or folders, e.g. inputs = ["exports/"]')
    elif missing:
        for path in missing:
            report.add("source.inputs", Status.WARN, f"input {path} does not exist (yet)",
                       "correct the path; fine only if an export job creates it before each sync")
    else:
        report.add("source.inputs", Status.PASS, f"{len(settings.source.inputs)} input path(s) exist")


def _check_writable(report: Report, name: str, path: Path, *, is_file: bool) -> bool:
    """The file (or folder) can be created or written: the nearest existing folder must take a new file."""
    folder = path.parent if is_file else path
    if is_file and path.exists():
        if path.is_dir():
            report.add(name, Status.FAIL, f"{path} is a folder", "give the path of a file inside it")
            return False
        if not os.access(path, os.R_OK | os.W_OK):
            report.add(name, Status.FAIL, f"{path} is not readable and writable by this user",
                       "give the peersync user read/write access to it")
            return False
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        report.add(name, Status.FAIL, f"cannot create {folder}: {existing} is a file, not a folder",
                   f"choose another path for {name}")
        return False
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".peersync-check-"):
            pass
    except OSError as exc:
        report.add(name, Status.FAIL, f"folder {existing} is not writable by this user ({type(exc).__name__})",
                   WRITE_ACCESS_FIX)
        return False
    note = "" if existing == folder else f" (will be created under {existing})"
    report.add(name, Status.PASS, f"{path} is writable{note}")
    return True


def _check_ledger_file(report: Report, path: Path) -> None:
    """An existing ledger: SQLite, a schema this version understands, not corrupt (opened read-only)."""
    from connector.plan.ledger import SCHEMA_VERSION, ledger_access_problem

    if not path.is_file():
        report.add("ledger", Status.PASS, f"no ledger yet at {path}: the first sync creates it")
        return
    keep_it = f"{WRITE_ACCESS_FIX}; do not move the ledger aside (that makes the next sync re-send every record)"
    problem = ledger_access_problem(path)
    if problem is not None:
        report.add("ledger", Status.FAIL, f"cannot use ledger {path}: {problem}", keep_it)
        return
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:  # its tables may differ from what we know: look no further
                report.add("ledger", Status.FAIL, f"ledger schema version {version} is newer than this peersync "
                           f"understands ({SCHEMA_VERSION})", "upgrade peersync (never downgrade over a newer ledger)")
                return
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            runs = db.execute("SELECT count(*) FROM runs").fetchone()[0] if version >= 1 else 0
        finally:
            db.close()
    except sqlite3.OperationalError as exc:
        if "readonly" in str(exc) or "unable to open" in str(exc):  # a read-only mount, an ACL: the file is fine
            report.add("ledger", Status.FAIL, f"cannot open ledger {path} ({exc})", keep_it)
        else:
            report.add("ledger", Status.FAIL, f"ledger {path} is unreadable or not a peersync ledger ({exc})",
                       f"move it aside (mv {path} {path}.broken); the next sync re-sends everything without "
                       "duplicates")
        return
    except sqlite3.DatabaseError as exc:
        report.add("ledger", Status.FAIL, f"ledger {path} is unreadable or not a peersync ledger ({exc})",
                   f"move it aside (mv {path} {path}.broken); the next sync re-sends everything without duplicates")
        return
    if check != "ok":
        report.add("ledger", Status.FAIL, f"ledger {path} failed SQLite's integrity check",
                   f"move it aside (mv {path} {path}.broken); the next sync re-sends everything without duplicates")
    else:
        upgrade = f", migrated to {SCHEMA_VERSION} by the next sync" if version < SCHEMA_VERSION else ""
        report.add("ledger", Status.PASS, f"{path}: schema version {version}{upgrade}, {runs} run(s) recorded")


# -- online: doctor ----------------------------------------------------------------------------------------


def run_doctor(path: Path | None, environ: Mapping[str, str] | None = None, *, timeout: float = 30.0) -> Report:
    """The offline checks, then the server, its CapabilityStatement, auth, and the ledger lock."""
    report = Report(str(path) if path else None)
    loaded = _offline(report, path, environ)
    settings = loaded.settings
    if settings is None or not loaded.server_ok:
        report.add("server", Status.SKIP, "not checked: fix the configuration first")
        return report
    client = _doctor_client(settings, loaded.auth_ok, timeout)
    statement, needs_auth = _check_metadata(report, client)
    if statement is None and not needs_auth:
        report.add("auth", Status.SKIP, "not checked: the server is not reachable")
    else:
        types = written_types(settings)
        auth_ready = _check_auth_online(report, client, settings, types) if loaded.auth_ok else False
        if not loaded.auth_ok:
            report.add("auth", Status.SKIP, "not checked: fix the [auth] configuration first")
        if statement is None and needs_auth and auth_ready:
            statement = _metadata_with_auth(report, client)
        if statement is not None:
            _check_capabilities(report, Capabilities.parse(statement), settings.server.write_mode, types,
                                write_strategy=settings.server.write_strategy,
                                resolves_conditional_references=settings.server.resolves_conditional_references)
        if auth_ready:
            _check_probe(report, client, settings)
            _check_directory(report, client, settings)
            _check_ledger_on_server(report, client, settings.sync.ledger)
    _check_lock(report, settings.sync.ledger)
    return report


def _doctor_client(settings: Any, auth_ok: bool, timeout: float) -> Any:
    from connector.ops.config import AuthSettings
    from connector.wiring import build_client

    # One quick attempt per request: the doctor reports, the scheduled sync is the one that retries.
    quick = settings.model_copy(deep=True)
    quick.sync.retry_attempts = 0
    quick.server.timeout_seconds = min(quick.server.timeout_seconds, timeout)
    if not auth_ok:
        quick.auth = AuthSettings()
    return build_client(quick, ready_auth=False)


def _no_credentials(request: Any) -> Any:
    return request


def _check_metadata(report: Report, client: Any) -> tuple[dict[str, Any] | None, bool]:
    """GET /metadata without credentials (it is public on most servers): reachability, latency, clock."""
    import requests

    url = client.base_url + "metadata"
    started = time.monotonic()
    try:
        response = client.session.get(url, auth=_no_credentials, timeout=client.timeout, allow_redirects=False,
                                      headers={"Accept": "application/fhir+json"})
    except requests.exceptions.SSLError:
        report.add("server.reachable", Status.FAIL, f"TLS verification failed for {client.base_url}",
                   "if the EHR uses a private CA, set server.ca_bundle to its PEM file")
        return None, False
    except requests.RequestException as exc:
        report.add("server.reachable", Status.FAIL, f"cannot reach {client.base_url} ({type(exc).__name__})",
                   f"check the URL, DNS, proxy and firewall; try: curl -sS {url}",
                   ExitCode.SERVER_UNAVAILABLE)
        return None, False
    elapsed_ms = int((time.monotonic() - started) * 1000)
    if response.status_code in (401, 403):
        report.add("server.reachable", Status.PASS, f"{client.base_url.rstrip('/')} answered in {elapsed_ms} ms "
                   f"(metadata needs authentication: HTTP {response.status_code})")
        return None, True
    if response.status_code >= 500 or response.status_code == 429:
        report.add("server.reachable", Status.FAIL, f"{url} answered HTTP {response.status_code}",
                   "the server is up but failing; try again later or ask its administrators",
                   ExitCode.SERVER_UNAVAILABLE)
        return None, False
    statement = _statement(report, response, url)
    if statement is None:
        return None, False
    name = Capabilities.parse(statement).software
    report.add("server.reachable", Status.PASS, f"{client.base_url.rstrip('/')} answered in {elapsed_ms} ms"
               + (f" ({name})" if name else ""))
    _check_clock(report, response)
    return statement, False


def _statement(report: Report, response: Any, url: str) -> dict[str, Any] | None:
    if response.status_code != 200:
        report.add("server.metadata", Status.FAIL, f"{url} answered HTTP {response.status_code}",
                   "check server.base_url: it must be the FHIR base (the URL that /metadata is under)")
        return None
    try:
        statement = response.json()
    except ValueError:
        statement = None
    if not isinstance(statement, dict) or statement.get("resourceType") != "CapabilityStatement":
        report.add("server.metadata", Status.FAIL, f"{url} did not return a CapabilityStatement",
                   "check server.base_url: it must be the FHIR base (the URL that /metadata is under)")
        return None
    return statement


def _metadata_with_auth(report: Report, client: Any) -> dict[str, Any] | None:
    try:
        response = client.request("GET", "metadata")
    except PeersyncError as exc:
        report.add("server.metadata", Status.FAIL, str(exc), "check server.base_url and the credentials",
                   exc.exit_code)
        return None
    return _statement(report, response, client.base_url + "metadata")


def _check_clock(report: Report, response: Any) -> None:
    """SMART assertions are rejected when our clock is off; HTTP Date tells us the server's clock."""
    header = response.headers.get("Date")
    if not header:
        return
    try:
        skew = time.time() - parsedate_to_datetime(header).timestamp()
    except (TypeError, ValueError):
        return
    if abs(skew) > CLOCK_SKEW_WARN_SECONDS:
        report.add("host.clock", Status.WARN, f"this host's clock differs from the server's by {skew:+.0f} s",
                   "enable time synchronisation (NTP, e.g. systemd-timesyncd or chrony): signed token "
                   "requests are refused when clocks disagree")
    else:
        report.add("host.clock", Status.PASS, f"within {CLOCK_SKEW_WARN_SECONDS} s of the server's clock")


def written_types(settings: Settings) -> tuple[str, ...]:
    """The types peersync writes with these settings: contacts may be Procedures too, or instead (``[server]
    contact_procedures``); the EHR's own Practitioners (``[directory]``) are not written, nor PractitionerRoles
    when skipped. Organization stays: community organizations are written."""
    procedures = settings.server.contact_procedures
    skipped = {"Communication"} if procedures == "instead" else set()
    directory = settings.directory
    if directory.practitioners == "existing":
        skipped.add("Practitioner")
    if not directory.writes_roles():
        skipped.add("PractitionerRole")
    added = ("Procedure",) if procedures in ("also", "instead") else ()
    return (*(t for t in WRITTEN_TYPES if t not in skipped), *added)


def _check_directory(report: Report, client: Any, settings: Any) -> None:
    """``[directory]``: the mode, and that the searches the sync runs once per run are allowed and find the
    Organization (the Practitioner probe matches no one: it only checks the permission)."""
    from connector.identifiers import token_query

    directory = settings.directory
    if directory.organization == "write" and directory.practitioners == "write":
        return
    roles = "written" if directory.writes_roles() else "not written (references name the Practitioner)"
    report.add("directory.mode", Status.PASS,
               f"Organization: {directory.organization}; Practitioner: {directory.practitioners} (by "
               f"{directory.practitioner_identifier_system}, supporter field {directory.practitioner_identifier_field})"
               f"; PractitionerRole: {roles}")
    if directory.organization == "existing":
        system, _, value = (directory.organization_identifier or "").rpartition("|")
        try:
            found = client.search_raw(f"Organization?identifier={token_query(system, value)}&_count=2")
        except PeersyncError as exc:
            report.add("directory.organization", Status.FAIL, f"the Organization search failed: {exc}",
                       "grant search on Organization (system/Organization.rs) to this client", exc.exit_code)
        else:
            if len(found) == 1:
                report.add("directory.organization", Status.PASS, f"found Organization/{found[0].get('id')}")
            else:
                report.add("directory.organization", Status.FAIL,
                           f"{len(found) or 'no'} Organization(s) have identifier {system}|{value}: every record "
                           "would wait in review (organization-not-found)",
                           "set [directory] organization_identifier to the identifier of the program's Organization "
                           "on the EHR (ask the EHR team)", ExitCode.CONFIG_ERROR)
    if directory.practitioners == "existing":
        system = directory.practitioner_identifier_system
        try:
            client.search_raw(f"Practitioner?identifier={token_query(system, PROBE_VALUE)}&_count=1")
        except PeersyncError as exc:
            report.add("directory.practitioners", Status.FAIL, f"the Practitioner search failed: {exc}",
                       "grant search on Practitioner (system/Practitioner.rs) to this client", exc.exit_code)
        else:
            report.add("directory.practitioners", Status.PASS, f"Practitioner search by {system} is allowed "
                       "(supporters not found wait in review: practitioner-not-found)")


def _check_capabilities(report: Report, capabilities: Capabilities, write_mode: str,
                        types: tuple[str, ...] = WRITTEN_TYPES, *, write_strategy: str = "auto",
                        resolves_conditional_references: bool = True) -> None:
    version = capabilities.fhir_version
    if version.startswith("4.0."):
        report.add("server.fhir_version", Status.PASS, f"FHIR {version} (R4)")
    else:
        report.add("server.fhir_version", Status.FAIL, f"the server speaks FHIR {version or '(not stated)'}, not R4 "
                   "(4.0.x)", "point server.base_url at the server's R4 endpoint")
    _check_write_strategy(report, capabilities, write_strategy, resolves_conditional_references, types)
    for resource_type in ("Patient", *types):
        _check_resource(report, resource_type, capabilities.resource(resource_type), write_mode)


def _check_write_strategy(report: Report, capabilities: Capabilities, write_strategy: str,
                          resolves_conditional_references: bool, types: tuple[str, ...] = WRITTEN_TYPES) -> None:
    """How sync will write to this server (the writer's own choice, connector.write.decisions) and whether the
    server declares what that needs."""
    from connector.write.decisions import Strategy, choose_strategy

    choice = choose_strategy(write_strategy, capabilities, written_types=types,
                             resolves_conditional_references=resolves_conditional_references)
    declared = capabilities.system_interactions
    if capabilities.supports_transaction:
        report.add("server.transaction", Status.PASS, "transaction bundles are supported")
    elif choice.strategy is Strategy.TRANSACTION and declared:
        report.add("server.transaction", Status.FAIL, "the CapabilityStatement does not list the 'transaction' "
                   "interaction, but server.write_strategy = transaction",
                   'set write_strategy = "auto" under [server] (batch or single requests), or ask the EHR team to '
                   "enable FHIR transactions for this endpoint")
    elif choice.strategy is Strategy.TRANSACTION:
        report.add("server.transaction", Status.WARN, "the CapabilityStatement lists no system interactions; "
                   "peersync assumes transactions", 'if the server refuses them, set write_strategy = "batch" (or '
                   '"single") under [server]')
    else:
        report.add("server.transaction", Status.PASS, f"no transaction needed: writes go as {choice.strategy}")
    who = "peersync resolves references (literal Type/id)" if choice.peersync_resolves_references \
        else "the server resolves conditional references in each transaction"
    slow = choice.strategy is Strategy.SINGLE and write_strategy == "auto"
    report.add("server.write_strategy", Status.WARN if slow else Status.PASS,
               f"{choice.strategy}: {choice.reason}; {who}",
               "one request per resource is slow on large programs: ask the EHR team whether batch or transaction "
               "can be enabled" if slow else "")


def _check_resource(report: Report, resource_type: str, resource: ResourceCapability | None, write_mode: str) -> None:
    name = f"server.{resource_type}"
    if resource is None:
        needed = "searched by identifier" if resource_type == "Patient" else "written"
        report.add(name, Status.FAIL, f"{resource_type} is not in the CapabilityStatement (peersync needs it "
                   f"{needed})", f"ask the EHR team to enable {resource_type} for this client")
        return
    interactions = resource.interactions
    params = resource.search_params
    if resource_type == "Patient":
        required = {"read", "search-type"}
    else:
        required = {"create"} if resource_type in CREATE_ONLY_TYPES else {"update", "create"}
    if resource_type in READ_TYPES:
        required.add("read")
    # An empty interaction list says nothing either way: only a declared list can lack something.
    missing = sorted(required - interactions) if interactions else []
    if missing:
        report.add(name, Status.FAIL, f"{resource_type} lacks the interaction(s) {', '.join(missing)}",
                   f"ask the EHR team to allow {', '.join(missing)} on {resource_type}")
        return
    notes: list[str] = ["read, search"] if resource_type == "Patient" else []
    status = Status.PASS
    fix = ""
    if resource_type != "Patient" and resource_type not in CREATE_ONLY_TYPES:
        if resource.conditional_update:
            notes.append("conditional update")
        elif write_mode == "conditional":
            report.add(name, Status.FAIL, f"{resource_type} has no conditionalUpdate but server.write_mode is "
                       "'conditional'", "set write_mode = \"auto\" under [server] (search-then-write fallback)")
            return
        elif write_mode == "search":
            notes.append("search-then-write (server.write_mode = search)")
        else:
            status = Status.WARN
            notes.append("no conditionalUpdate: sync falls back to search-then-write (search by identifier, "
                         "then PUT by id or POST)")
            fix = ("nothing required; the fallback costs one extra search per record and two concurrent "
                   "writers could create a duplicate, so keep one peersync per program")
    if resource_type not in CREATE_ONLY_TYPES:
        if params is None:
            if status is Status.PASS:
                status = Status.WARN
                fix = "confirm with the EHR team that identifier search works on this type"
            notes.append("search parameters not declared")
        elif "identifier" not in params:
            report.add(name, Status.FAIL, f"{resource_type} does not support search by identifier",
                       f"ask the EHR team to enable the identifier search parameter on {resource_type}; "
                       "peersync finds its records (and Patients by MRN) that way")
            return
        else:
            notes.append("identifier search")
    report.add(name, status, f"{resource_type}: " + ", ".join(notes or ["supported"]), fix)


def _check_auth_online(report: Report, client: Any, settings: Any = None,
                       types: tuple[str, ...] = WRITTEN_TYPES) -> bool:
    from connector.auth import missing_scopes

    auth = client.session.auth
    try:
        auth.ensure_ready()
    except PeersyncError as exc:
        fix = {int(ExitCode.AUTH_FAILED): "fix the credentials or ask the EHR administrator for the scopes",
               int(ExitCode.SERVER_UNAVAILABLE): "check that the token endpoint is reachable from this host",
               int(ExitCode.CONFIG_ERROR): "check auth.token_url: it must be the token endpoint the EHR team gave "
                                           "you (docs/authentication.md)"}
        report.add("auth", Status.FAIL, str(exc), fix.get(int(exc.exit_code), "correct the [auth] section"),
                   exc.exit_code)
        return False
    info = auth.describe()
    shown = [f"mode {info.get('mode')}"]
    for key in ("client_id", "token_url", "alg", "kid"):
        if info.get(key):
            shown.append(f"{key} {info[key]}")
    if info.get("token_expires_at"):
        shown.append(f"token expires {info['token_expires_at']}")
    granted = info.get("scope_granted")
    if granted is not None:
        shown.append("granted: " + (" ".join(granted) or "(none)"))
    report.add("auth", Status.PASS, ", ".join(shown))
    if granted is not None:
        needed = [f"system/{t}.c" if t in CREATE_ONLY_TYPES else f"system/{t}.cu" for t in types]
        needed.append("system/Patient.rs")
        if settings is not None and settings.directory.practitioners == "existing":
            needed.append("system/Practitioner.rs")
        if settings is not None and settings.directory.organization == "existing":
            needed.append("system/Organization.rs")
        missing = missing_scopes(granted, needed)
        if missing:
            report.add("auth.scopes", Status.WARN, "the granted scopes do not cover " + " ".join(missing),
                       "writes of those types will be refused (403); ask the EHR administrator to grant them "
                       "and add them to auth.scope (docs/authentication.md, 'Scopes to request')")
        else:
            report.add("auth.scopes", Status.PASS, "the granted scopes cover every type peersync writes")
        if settings is not None and pull_configured(settings):
            _check_pull_scopes(report, granted, clinical=settings.pull.clinical_facts)
        if missing_scopes(granted, ["system/Condition.rs"]):
            report.add("auth.scopes.condition", Status.WARN, "the granted scopes do not cover system/Condition.rs: "
                       "CarePlans will not address the patient's Conditions (CarePlan.addresses)",
                       "ask the EHR administrator for system/Condition.rs and add it to auth.scope, or accept "
                       "CarePlans without addresses")
    return True


# What `peersync pull` reads and updates: the program's Organization (its first request,
# Organization?identifier=), referral Tasks (moved to received), their ServiceRequests and Patients, and their
# requesters (Task:requester may be a Practitioner, a PractitionerRole or an Organization); with
# pull.clinical_facts, Observations and Appointments of consenting participants.
PULL_SCOPES = ("system/Organization.rs", "system/Task.rus", "system/ServiceRequest.rs", "system/Patient.rs",
               "system/Practitioner.rs", "system/PractitionerRole.rs")
CLINICAL_SCOPES = ("system/Observation.rs", "system/Appointment.rs")


def pull_configured(settings: Any) -> bool:
    """Whether this site uses `peersync pull`: a ``[pull]`` section (or a PEERSYNC_PULL__ variable) is set. A
    sync-only site is not warned about scopes it never needs."""
    return "pull" in settings.model_fields_set


def _check_pull_scopes(report: Report, granted: Any, *, clinical: bool) -> None:
    from connector.auth import missing_scopes

    needed = [*PULL_SCOPES, *(CLINICAL_SCOPES if clinical else ())]
    missing = missing_scopes(granted, needed)
    if missing:
        report.add("auth.scopes.pull", Status.WARN, "peersync pull needs " + " ".join(missing),
                   "without them pull cannot read clinic referrals (or, with pull.clinical_facts, the clinical "
                   "facts); ask the EHR administrator (docs/care-coordination.md, 'Scopes')")
    else:
        report.add("auth.scopes.pull", Status.PASS, "the granted scopes cover peersync pull"
                   + (" and clinical facts" if clinical else ""))


def _check_probe(report: Report, client: Any, settings: Any) -> None:
    """An authenticated Patient search by MRN, as the sync does, for an MRN no one has."""
    from connector.identifiers import token_query
    from connector.wiring import mapping_context

    try:
        mrn_system = mapping_context(settings).mrn_system
        client.search_raw(f"Patient?identifier={token_query(mrn_system, PROBE_VALUE)}&_count=1")
    except PeersyncError as exc:
        report.add("auth.probe", Status.FAIL, f"an authenticated Patient search failed: {exc}",
                   "grant search on Patient (system/Patient.rs) to this client", exc.exit_code)
        return
    report.add("auth.probe", Status.PASS, "an authenticated Patient search by MRN works")


def _check_ledger_on_server(report: Report, client: Any, ledger_path: Path) -> None:
    """A random sample of what the ledger says the server confirmed, read back (the machinery of verify): a
    server restored from a backup or a refreshed test EHR lost them, and every sync would otherwise "succeed"."""
    from connector.ops.verify import Drift, verify
    from connector.plan.ledger import Ledger

    name = "ledger.server"
    ledger_check = next((c for c in report.checks if c.name == "ledger"), None)
    if not ledger_path.is_file() or ledger_check is None or ledger_check.status is not Status.PASS:
        return  # no ledger yet, or the ledger check already said what is wrong with it
    try:
        with Ledger(ledger_path) as ledger:
            sample = ledger.sent_resources(sample=DRIFT_SAMPLE)
        found = verify(client, sample) if sample else None
    except PeersyncError as exc:
        report.add(name, Status.WARN, f"could not read back a sample of the ledger's resources: {exc}",
                   "run peersync verify to see whether the server still has what peersync wrote")
        return
    if found is None:
        report.add(name, Status.PASS, "nothing confirmed by the server yet")
        return
    totals = found.totals()
    checked = len(sample)
    if totals[Drift.MISSING]:
        report.add(name, Status.FAIL, f"{totals[Drift.MISSING]} of {checked} sampled resources that the ledger says "
                   "the server confirmed are missing on the server (restored from a backup? a refreshed test EHR?); "
                   "syncs would not re-send them", "run peersync verify --repair (it re-sends exactly what is missing "
                   "or changed, without duplicates)", ExitCode.RECORDS_REJECTED)
    elif totals[Drift.CHANGED]:
        report.add(name, Status.WARN, f"{totals[Drift.CHANGED]} of {checked} sampled resources were changed on the "
                   "server since peersync wrote them", "run peersync verify to list them; peersync verify --repair "
                   "writes the program's version again")
    else:
        report.add(name, Status.PASS, f"{checked} sampled resources of the ledger are on the server, unchanged")


def _check_lock(report: Report, ledger: Path) -> None:
    from filelock import FileLock, Timeout

    lock_path = Path(str(ledger) + ".lock")
    if not lock_path.parent.is_dir():
        report.add("ledger.lock", Status.PASS, "no sync has run yet (no ledger folder)")
        return
    lock = FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        report.add("ledger.lock", Status.WARN, "a sync is running now (it holds the ledger lock)",
                   "nothing if it finishes; if no peersync process is running, the lock is stale only on a "
                   "network filesystem: keep the ledger on local disk")
        return
    except OSError as exc:
        report.add("ledger.lock", Status.FAIL, f"cannot create the lock file {lock_path} ({type(exc).__name__})",
                   "give the peersync user write access to the ledger folder")
        return
    lock.release()
    report.add("ledger.lock", Status.PASS, "no other sync is running")


def auth_test(settings: Settings) -> dict[str, Any]:
    """Get a token (if the mode uses one), check its scopes, and read the CapabilityStatement with it.

    Returns a PHI- and secret-free report: auth mode, token endpoint, granted scopes, expiry, and the
    server's FHIR version and software. Raises AuthError / ConfigError / ServerUnavailableError on failure.
    """
    from connector.auth import PeersyncAuth
    from connector.wiring import build_client

    client = build_client(settings, ready_auth=True)
    capabilities = Capabilities.parse(client.capabilities())
    auth = client.session.auth
    described = auth.describe() if isinstance(auth, PeersyncAuth) else {"mode": "none"}
    return {
        "auth": described,
        "server": {
            "base_url": settings.server.base_url,
            "fhir_version": capabilities.fhir_version or None,
            "software": capabilities.software or None,
        },
        "metadata_status": "ok",
    }
