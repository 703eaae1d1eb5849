"""The `peersync` command: a thin layer over the library. It parses options, calls the library, prints,
and turns library errors into documented exit codes (see docs/exit-codes.md).

stdout carries results (tables, or JSON with --json); stderr carries logs (text or JSON lines), the progress
bar (terminals only) and errors. Nothing printed here contains patient data.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from connector import __version__
from connector.errors import ConfigError, ExitCode, PeersyncError, path_error_message
from connector.ops.logs import (
    RUN_ID,
    configure_logging,
    flush_repeated_warnings,
    format_frames,
    is_verbose,
    log_format,
    new_run_id,
)

if TYPE_CHECKING:
    from connector.run import RunSummary

log = logging.getLogger("connector.cli")


class PeersyncCommandError(click.ClickException):
    """A library error on its way out of the CLI, with its exit code."""

    def __init__(self, error: PeersyncError) -> None:
        super().__init__(str(error))
        self.exit_code = int(error.exit_code)  # type: ignore[misc]  # click types it a ClassVar; ours varies by error
        self.error_type = type(error).__name__

    def show(self, file: Any = None) -> None:
        _emit_error(self.format_message(), self.exit_code, error_type=self.error_type)


def _emit_error(message: str, exit_code: int, **extra: Any) -> None:
    """An error on stderr: ``error: ...`` as text, or one more JSON line (with the run id) in JSON mode."""
    if log_format() == "json":
        log.error("%s", message, extra={"event": "error", "exit_code": int(exit_code), **extra})
    else:
        click.echo(f"error: {message}", err=True)


class PeersyncGroup(click.Group):
    """The root group: unexpected exceptions become exit 1 with a PHI-free message instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except BrokenPipeError:
            raise  # stdout closed early (`peersync status | head`): click's main() exits quietly
        except Exception as exc:
            if os.environ.get("PEERSYNC_DEBUG"):
                raise  # the full traceback, for a developer; it may contain record values
            _report_unexpected(exc)
            ctx.exit(int(ExitCode.UNEXPECTED))


def _report_unexpected(exc: BaseException) -> None:
    """Where it failed (type, file:line) but not the message, which could quote a record's values."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}" if tb is not None else ""
    message = (f"unexpected {type(exc).__name__}{where} (a bug: please report it with this line; rerun with "
               "-v for the call stack, or PEERSYNC_DEBUG=1 for the full traceback, which may contain record values)")
    frames = format_frames(exc.__traceback__) if is_verbose() else ""
    if log_format() == "json":
        extra = {"frames": [line.strip() for line in frames.splitlines()]} if frames else {}
        _emit_error(message, ExitCode.UNEXPECTED, error_type=type(exc).__name__, **extra)
    else:
        _emit_error(message, ExitCode.UNEXPECTED)
        if frames:
            click.echo(frames, err=True)


def translate_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn PeersyncError into a clean message + exit code (no traceback, no patient data)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except PeersyncError as exc:
            raise PeersyncCommandError(exc) from None
        except BrokenPipeError:
            raise
        except OSError as exc:
            if exc.filename is None:
                raise  # not about a path we were given: unexpected
            raise PeersyncCommandError(ConfigError(path_error_message(exc))) from None

    return wrapper


def logging_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--log-format/--verbose/--quiet, shared by every command that does work."""

    @click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
                  envvar="PEERSYNC_LOG_FORMAT",
                  help="Log lines on stderr: text, or one JSON object per line (env PEERSYNC_LOG_FORMAT).")
    @click.option("-v", "--verbose", is_flag=True, help="More detail in logs (still no patient data).")
    @click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors in logs; no progress bar.")
    @functools.wraps(func)
    def wrapper(*args: Any, log_format: str, verbose: bool, quiet: bool, **kwargs: Any) -> Any:
        configure_logging(fmt=log_format, verbose=verbose, quiet=quiet)
        new_run_id()
        click.get_current_context().meta["peersync.quiet"] = quiet
        try:
            return func(*args, **kwargs)
        finally:
            flush_repeated_warnings()  # "... (repeated N more times)" for warnings shown once

    return wrapper


config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), envvar="PEERSYNC_CONFIG",
    help="TOML configuration file (env PEERSYNC_CONFIG); PEERSYNC_SECTION__KEY variables override it.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="JSON on stdout.")


def _settings(config_path: Path | None) -> Any:
    from connector.ops.config import load_settings

    return load_settings(config_path)


def _ledger(config_path: Path | None) -> Any:
    """The configured ledger, created (if it is new) with the configured file mode."""
    from connector.plan.ledger import Ledger

    settings = _settings(config_path)
    return Ledger(settings.sync.ledger, mode=settings.file_mode())


def _warn(message: str) -> None:
    """A warning on stderr, in the chosen log format."""
    log.warning("%s", message)


def _fail(message: str, code: ExitCode) -> None:
    """Exit with an error message on stderr, in the chosen log format."""
    _emit_error(message, code)
    sys.exit(int(code))


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(cls=PeersyncGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="peersync")
def main() -> None:
    """peersync carries diabetes peer-support records (contacts, goals, referrals, planned contacts)
    into a clinic EHR as FHIR R4 resources.

    \b
    Start here:  peersync config check FILE   (offline)
                 peersync doctor --config FILE (server, auth, ledger)
    Exit codes: 0 ok, 1 unexpected error, 2 usage, 65 records rejected or in review,
    69 server unavailable / retries exhausted, 75 lock held, 77 auth failure, 78 configuration error
    (docs/exit-codes.md).
    """


# -- config check, doctor ------------------------------------------------------------------------------


@main.group("config")
def config_group() -> None:
    """Check a configuration file (docs/configuration.md lists every setting)."""


@config_group.command("check")
@click.argument("config_file", metavar="[FILE]", required=False, type=click.Path(dir_okay=False, path_type=Path))
@config_option
@json_option
@logging_options
@translate_errors
def config_check(config_file: Path | None, config_path: Path | None, as_json: bool) -> None:
    """Validate FILE (or --config FILE, or PEERSYNC_CONFIG) without network access: unknown keys, wrong types,
    missing values, unsafe URLs, secret files, the private key, the mapping profile, and writable ledger and
    report folders.

    PEERSYNC_* environment variables and secrets directories are applied, as for a sync.
    Exits 78 when any check fails (each failure names its fix), 0 otherwise (warnings allowed).
    """
    from connector.ops.doctor import check_config

    if config_file and config_path and config_file != config_path:
        raise click.UsageError(f"two configuration files given ({config_file} and --config {config_path}): "
                               "give one")
    config_file = config_file or config_path
    if config_file is None:
        raise click.UsageError("which configuration? give FILE, --config FILE or set PEERSYNC_CONFIG")

    report = check_config(config_file)
    _print_report(report, as_json, title=f"config check {config_file}")
    sys.exit(report.exit_code())


@main.command()
@config_option
@click.option("--timeout", default=30.0, show_default=True, type=click.FloatRange(1, 600),
              help="Seconds to wait for each server request.")
@json_option
@logging_options
@translate_errors
def doctor(config_path: Path | None, timeout: float, as_json: bool) -> None:
    """Pre-flight check: the configuration, the server and its CapabilityStatement (FHIR R4, transaction,
    conditional update and identifier search per resource type), authentication and granted scopes,
    and the ledger. Writes nothing to the server.

    Exits 0 when nothing failed, 78 configuration, 77 authentication, 69 server unreachable.
    """
    from connector.ops.doctor import run_doctor

    report = run_doctor(config_path, timeout=timeout)
    _print_report(report, as_json, title=f"doctor {config_path or '(environment only)'}")
    sys.exit(report.exit_code())


_MARKS = {"pass": "PASS", "warn": "WARN", "fail": "FAIL", "skip": "skip"}


def _print_report(report: Any, as_json: bool, *, title: str) -> None:
    if as_json:
        _echo_json(report.as_dict())
        return
    width = max([len(c.name) for c in report.checks] + [10]) + 2
    click.echo(title)
    click.echo(f"{'STATUS':<8}{'CHECK':<{width}}DETAIL")
    for check in report.checks:
        click.echo(f"{_MARKS[check.status.value]:<8}{check.name:<{width}}{check.detail}")
        if check.fix:
            click.echo(f"{'':<8}{'':<{width}}fix: {check.fix}")
    counts = report.counts()
    click.echo(f"{counts['pass']} passed, {counts['warn']} warning(s), {counts['fail']} failed, "
               f"{counts['skip']} skipped: exit {report.exit_code()}")


# -- keys, auth -------------------------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """Signing keys for SMART Backend Services (docs/authentication.md)."""


@keys.command("generate")
@click.option("--alg", type=click.Choice(["ES384", "RS384"]), default="ES384", show_default=True,
              help="Signing algorithm: ES384 (EC P-384) or RS384 (RSA 3072).")
@click.option("--kid", required=True, help="Key id, e.g. peersync-2026-11 (a new one for every rotation).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for <kid>.private.pem (mode 0600) and <kid>.jwks.json (register or host this).")
@click.option("--force", is_flag=True, help="Overwrite existing files of this kid.")
@logging_options
@translate_errors
def keys_generate(alg: str, kid: str, out_dir: Path, force: bool) -> None:
    """Generate a signing key and its public JWK Set."""
    from connector.auth.keys import generate_keypair

    key_path, jwks_path = generate_keypair(alg, kid, out_dir, overwrite=force)  # type: ignore[arg-type]
    click.echo(f"private key: {key_path} (keep it secret; set auth.private_key_file to it)")
    click.echo(f"JWK Set:     {jwks_path} (register it with the EHR, or host it at an HTTPS URL)")


@main.group()
def auth() -> None:
    """Authentication against the configured FHIR server."""


@auth.command("test")
@config_option
@json_option
@logging_options
@translate_errors
def auth_test_command(config_path: Path | None, as_json: bool) -> None:
    """Obtain a token (if the mode uses one), check the granted scopes, and read /metadata with it.

    Prints what was granted, never the token. Exits 77 when authentication fails.
    """
    from connector.ops.doctor import auth_test

    result = auth_test(_settings(config_path))
    if as_json:
        _echo_json(result)
        return
    info = result.get("auth", {})
    click.echo(f"auth mode {info.get('mode')}: ok")
    for key, value in info.items():
        if key != "mode" and value not in (None, [], ""):
            click.echo(f"  {key}: {' '.join(value) if isinstance(value, list) else value}")
    server = result.get("server", {})
    click.echo(f"server {server.get('base_url')}: FHIR {server.get('fhir_version')} ({server.get('software')})")


# -- profile -------------------------------------------------------------------------------------------


@main.group()
def profile() -> None:
    """Work with mapping profiles (mappings/*/profile.yaml)."""


@profile.command("check")
@click.argument("profile_ref", metavar="PROFILE")
@translate_errors
def profile_check(profile_ref: str) -> None:
    """Validate a mapping profile and list every problem with its line number.

    PROFILE is a profile.yaml, its folder, or the name of a profile shipped in mappings/.
    """
    from connector.read.profile import check_profile, resolve_profile_path

    path = resolve_profile_path(profile_ref)
    loaded, problems = check_profile(path)
    if loaded is None:
        click.echo(f"{path}: {len(problems)} problem(s)", err=True)
        for problem in problems:
            click.echo(f"  {path}:{problem.line}: {problem.path + ': ' if problem.path else ''}{problem.message}",
                       err=True)
        sys.exit(ExitCode.CONFIG_ERROR)
    kinds = ", ".join(k.value for k in loaded.records)
    click.echo(f"{path}: ok (profile {loaded.name!r}, program {loaded.program.id!r}, kinds: {kinds})")


# -- check ---------------------------------------------------------------------------------------------


@main.command()
@click.option("--profile", "profile_ref", required=True, help="Mapping profile (file, folder or shipped name).")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--rejects-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep rejects.csv and rejects.json here (default: the first rejects are printed and the "
                   "report is not kept).")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON on stdout.")
@logging_options
@translate_errors
def check(profile_ref: str, inputs: tuple[Path, ...], rejects_dir: Path | None, as_json: bool) -> None:
    """Read INPUTS through a profile: per-kind counts and a rejects report. Sends nothing.

    Exits 65 when any row is rejected, 0 when all rows are accepted.
    """
    from connector.read.profile import load_profile
    from connector.read.program import read_program, write_rejects
    from connector.read.staging import Staging

    loaded = load_profile(profile_ref)
    # Without --rejects-dir the report is written inside the run's temporary folder and goes with it: a check
    # run every few minutes must not leave a folder of rejected values behind each time.
    with tempfile.TemporaryDirectory(prefix="peersync-check-") as tmp, Staging(Path(tmp) / "staging.sqlite") as st:
        report = read_program(loaded, inputs, st)
        csv_path, json_path, problems = write_rejects(st, rejects_dir or Path(tmp) / "rejects")
        first_rejects = csv_path.read_text(encoding="utf-8").splitlines()
    kept = rejects_dir is not None
    summary = report.as_dict() | {"rejects_report": {"csv": str(csv_path) if kept else None,
                                                     "json": str(json_path) if kept else None,
                                                     "problems": problems}}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_read_report(summary, first_rejects)
    sys.exit(ExitCode.RECORDS_REJECTED if report.total_rejected else ExitCode.OK)


def _print_read_report(summary: dict[str, Any], lines: list[str]) -> None:
    click.echo(f"{'kind':<18}{'read':>8}{'accepted':>10}{'rejected':>10}")
    for kind, c in summary["kinds"].items():
        click.echo(f"{kind:<18}{c['read']:>8}{c['accepted']:>10}{c['rejected']:>10}")
    t = summary["total"]
    click.echo(f"{'total':<18}{t['read']:>8}{t['accepted']:>10}{t['rejected']:>10}")
    if summary["blank_rows"]:
        click.echo(f"blank rows skipped: {summary['blank_rows']}")
    for warning in summary["warnings"]:
        _warn(warning)
    rejects = summary["rejects_report"]
    if t["rejected"]:
        where = (f"report: {rejects['csv']} and {rejects['json']}" if rejects["csv"]
                 else "to keep the report, rerun with --rejects-dir DIR")
        click.echo(f"rejected rows: {t['rejected']} ({rejects['problems']} problems); {where}")
        for line in lines[1:21]:
            click.echo(f"  {line}")
        if len(lines) > 21:
            click.echo(f"  ... {len(lines) - 21} more" + (" in the report" if rejects["csv"] else ""))


# -- map, terminology --------------------------------------------------------------------------------


@main.command("map")
@click.option("--profile", "profile_ref", required=True, help="Mapping profile (file, folder or shipped name).")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for bundles/, <Type>.ndjson and summary.json.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--clinical-notes", type=click.Choice(["off", "also", "only"]), default="off", show_default=True,
              help="Clinical-note mode, as program.clinical_notes in the config (docs/clinical-notes.md).")
@click.option("--note-period", type=click.Choice(["contact", "week", "month"]), default="month", show_default=True,
              help="What one clinical note covers, as program.note_period.")
@click.option("--preview-html", "preview_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also render what the clinic will see (the notes, and the structured resources' narratives) "
                   "to DIR/notes-<participant>.html (0600).")
@click.option("--participant", help="With --preview-html: only this participant (enrollment id).")
@logging_options
@translate_errors
def map_command(profile_ref: str, inputs: tuple[Path, ...], out_dir: Path, as_json: bool, clinical_notes: str,
                note_period: str, preview_dir: Path | None, participant: str | None) -> None:
    """Map INPUTS to FHIR without a server: transaction bundles per participant (at most 100 entries
    each), NDJSON per type, a summary.

    Exits 65 when rows were rejected (see the rejects report in OUT), 0 otherwise.
    """
    from connector.map import MappingContext
    from connector.map.export import map_program, write_note_previews
    from connector.read.profile import load_profile
    from connector.read.program import write_rejects
    from connector.read.staging import Staging

    loaded = load_profile(profile_ref)
    ctx = MappingContext.from_profile(loaded, clinical_notes=clinical_notes, note_period=note_period)
    previews: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="peersync-map-") as tmp, Staging(Path(tmp) / "s.sqlite") as st:
        summary = map_program(loaded, list(inputs), ctx, out_dir, st)
        write_rejects(st, out_dir)
        if preview_dir is not None:
            if participant is not None and participant not in st.participants():
                raise click.BadParameter("no accepted enrollment has this id; check the id (an enrollment id) and "
                                         "the rejects report", param_hint="--participant")
            if clinical_notes == "off":
                click.echo("warning: --preview-html with --clinical-notes off: the clinic receives no notes, so the "
                           "preview shows only the narratives of the structured resources; add --clinical-notes "
                           "also (or only) to see the notes too", err=True)
            previews = write_note_previews(st, ctx, preview_dir, participant)
    summary["previews"] = len(previews)  # a count: the files are named by enrollment id, an identifier of the person
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        total = summary["read"]["total"]
        click.echo(f"read {total['read']} rows: {total['accepted']} accepted, {total['rejected']} rejected")
        click.echo(f"wrote {summary['bundles']} transaction bundles to {out_dir / 'bundles'}")
        for resource_type, count in summary["resources"].items():
            click.echo(f"  {resource_type:<22}{count:>8}")
        if preview_dir is not None:
            click.echo(f"wrote {len(previews)} clinical-note previews to {preview_dir}")
    sys.exit(ExitCode.RECORDS_REJECTED if summary["read"]["total"]["rejected"] else ExitCode.OK)


@main.group()
def terminology() -> None:
    """peersync's own CodeSystems and extension definitions (mappings/terminology/)."""


@terminology.command("publish")
@config_option
@click.option("--dry-run", is_flag=True, help="Print the transaction bundle instead of sending it.")
@logging_options
@translate_errors
def terminology_publish(config_path: Path | None, dry_run: bool) -> None:
    """Load our CodeSystems, ValueSets and extension StructureDefinitions into the server (conditional by url)."""
    from connector.map.terminology import load_terminology, terminology_bundle

    settings = _settings(config_path)
    bundle = terminology_bundle(load_terminology())
    if dry_run:
        click.echo(json.dumps(bundle, indent=2))
        return
    from connector.wiring import build_client

    response = build_client(settings).transaction(bundle)
    statuses = [e.get("response", {}).get("status", "") for e in response.get("entry", [])]
    click.echo(f"published {len(statuses)} terminology resources to {settings.server.base_url} "
               f"({', '.join(sorted(set(statuses)))})")


@main.command()
@config_option
@click.option("--profile", "profile_ref", help="Mapping profile (file, folder or shipped name), with INPUTS "
              "instead of --config.")
@click.argument("inputs", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--server", "server_url", help="FHIR base URL of a test server (no credentials), instead of the "
              "configured server.")
@click.option("--offline", is_flag=True, help="Check structure with the fhir.resources models; no server.")
@click.option("--load-us-core", is_flag=True, help="First put the shipped US Core 6.1.0 conformance resources and "
              "our terminology on the server (test servers only: it writes them).")
@click.option("--base-only", is_flag=True, help="Validate against base R4 only, not the US Core profiles.")
@click.option("--json", "as_json", is_flag=True, help="Print the grouped findings as JSON on stdout.")
@logging_options
@translate_errors
def validate(config_path: Path | None, profile_ref: str | None, inputs: tuple[Path, ...], server_url: str | None,
             offline: bool, load_us_core: bool, base_only: bool, as_json: bool) -> None:
    """Check what a sync would write: $validate against base R4 and US Core 6.1.0, or --offline for structure.

    Give --config FILE, or --profile PROFILE INPUTS... (with --server URL unless --offline). Writes nothing
    but, with --load-us-core, the conformance resources. Exits 65 when any resource has an error, 0 otherwise.
    """
    from connector.map import MappingContext
    from connector.map.export import iter_bundles
    from connector.ops import validate as checks
    from connector.read.profile import load_profile
    from connector.read.program import read_program
    from connector.read.staging import Staging

    if profile_ref is not None:
        if not inputs:
            raise click.UsageError("--profile needs INPUTS (files or folders)")
        settings = None
        loaded, sources = load_profile(profile_ref), list(inputs)
        ctx = MappingContext.from_profile(loaded)
    elif inputs:
        raise click.UsageError("INPUTS go with --profile; with --config the inputs come from the configuration")
    else:
        from connector.wiring import mapping_context

        settings = _settings(config_path)
        loaded, sources = load_profile(settings.source.profile), list(settings.source.inputs)
        ctx = mapping_context(settings)
    client = None
    if not offline:
        from connector.wiring import anonymous_client, build_client

        if server_url:
            client = anonymous_client(server_url)
        elif settings is not None:
            client = build_client(settings)
        else:
            raise click.UsageError("give --server URL (or --offline) with --profile")
    with tempfile.TemporaryDirectory(prefix="peersync-validate-") as tmp, \
            Staging(Path(tmp) / "staging.sqlite") as staging:
        read = read_program(loaded, sources, staging).as_dict()["total"]
        resources = checks.resources_of(iter_bundles(staging, ctx))
        if client is None:
            report = checks.validate_offline(resources)
        else:
            if load_us_core:
                loaded_count = checks.load_us_core(client)
                log.info("loaded %d conformance resources", loaded_count)
            report = checks.validate_on_server(client, resources, us_core=not base_only)
    result = report.as_dict() | {"read": read}
    if as_json:
        _echo_json(result)
    else:
        _print_validation(result)
    sys.exit(int(report.exit_code()))


def _print_validation(result: dict[str, Any]) -> None:
    checked = sum(result["resources"].values())
    click.echo(f"checked {checked} resources ({result['checks']} checks, {result['mode']}): "
               f"{result['errors']} errors, {result['warnings']} warnings")
    if result["read"]["rejected"]:
        click.echo(f"not checked: {result['read']['rejected']} rejected rows (see peersync check)")
    for group in result["groups"]:
        if group["severity"] == "information":
            continue
        where = f" at {', '.join(group['locations'])}" if group["locations"] else ""
        click.echo(f"{group['severity'].upper():<8}{group['count']:>6}x {group['resource_type']} "
                   f"[{group['profile']}]{where}: {group['message']}")


# -- sync, plan, status, review ------------------------------------------------------------------------

@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON on stdout.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr (default: only on a terminal, never with --quiet).")
@click.option("--accept-shape-change", is_flag=True,
              help="Confirm on purpose that the input lost a column or many rows since the last completed run: "
                   "write the record kinds the shape guard would hold, and remember the new shape.")
@click.option("--exit-zero-on-data-problems", is_flag=True,
              help="Exit 0 instead of 65 when the only problems are rejected, quarantined or in-review records "
                   "(as [sync] data_problems_exit_zero = true); the metrics and the summary still count them.")
@click.option("--retry-parked", is_flag=True,
              help="Send again the records parked because the server refused their type (otherwise retried only "
                   "when the server's CapabilityStatement or the settings change).")
@logging_options
@translate_errors
def sync(config_path: Path | None, as_json: bool, progress: bool | None, accept_shape_change: bool,
         exit_zero_on_data_problems: bool, retry_parked: bool) -> None:
    """Push the program's records to the FHIR server: idempotent, incremental, safe to rerun at any time.

    Exit codes: 0 all landed; 65 rows rejected, quarantined or in review (the rest landed), no input rows, or
    deletions held (a truncated input); 76 the server refuses some resource types (those records are parked,
    the rest landed); 69 server unavailable (pending records are sent next run); 75 another
    run holds the lock; 77 auth; 78 config.
    A record kind whose input lost a column or more than sync.max_row_drop_fraction of its rows is held (not
    updated or voided; exit 65) until the export is fixed or --accept-shape-change confirms the change.
    With --json the summary is printed even when the run fails; [output] metrics_file is written after
    every run that got as far as the ledger.
    """
    from connector.run import Syncer
    from connector.server.transport import redact_url
    from connector.wiring import build_client, sync_options

    started = datetime.now(UTC)
    try:
        settings = _settings(config_path)
    except PeersyncError as exc:  # 78: the alert rules must see it even though the settings do not load
        _write_metrics_of_broken_config(config_path, _failed_summary(None, exc, started))
        raise
    syncer: Syncer | None = None
    bar: _ProgressBar | None = None
    try:
        opts = sync_options(settings)
        opts.accept_shape_change = opts.accept_shape_change or accept_shape_change
        opts.data_problems_exit_zero = opts.data_problems_exit_zero or exit_zero_on_data_problems
        opts.retry_parked = retry_parked
        log.info("sync started: peersync %s, server %s, auth %s, profile %s, %d input path(s)", __version__,
                 redact_url(settings.server.base_url), settings.auth.mode, opts.profile.name, len(opts.inputs),
                 extra={"event": "run-started"})
        client = build_client(settings)
        quiet = click.get_current_context().meta.get("peersync.quiet", False)
        show_bar = (sys.stderr.isatty() and not quiet) if progress is None else progress
        bar = _ProgressBar() if show_bar else None
        syncer = Syncer(opts, client, on_progress=bar.update if bar else None)
        summary = syncer.run(RUN_ID.get())
    except PeersyncError as exc:
        # Report the failed run too: monitoring reads the metrics file, scripts read --json.
        failed = _failed_summary(syncer.summary if syncer else None, exc, started)
        _write_metrics(settings, failed)
        if log_format() == "json":
            _echo_summary_line(failed)
        elif as_json:
            _echo_json(failed)
        raise
    except Exception:  # a bug (exit 1): the run's metrics still say so
        _write_metrics(settings, _failed_summary(syncer.summary if syncer else None, None, started))
        raise
    finally:
        if bar:
            bar.close()
    result = summary.as_dict()
    _write_metrics(settings, result)
    if log_format() == "json":
        _echo_summary_line(result)
        _warn_summary(result)
    elif as_json:
        _echo_json(result)
    else:
        _print_summary(result)
    sys.exit(summary.exit_code)


def _echo_summary_line(summary: dict[str, Any]) -> None:
    """The run summary as one JSON line on stdout (with --log-format json), so that a scheduler that sends
    stdout and stderr to one file gets one JSON object per line; ``event`` tells it from the log lines."""
    click.echo(json.dumps({"event": "run-summary", **summary}, default=str, ensure_ascii=False))


def _failed_summary(summary: RunSummary | None, exc: PeersyncError | None, started: datetime) -> dict[str, Any]:
    """The summary of a run that raised (``exc`` None: a bug, exit 1): the run's own if it got as far as the
    ledger, else a minimal one."""
    from connector.run import RunSummary, outcome_of_error

    if summary is None or summary.outcome == "running":  # failed before the run was recorded (lock, auth...)
        now = datetime.now(UTC)
        exit_code = int(exc.exit_code) if exc is not None else int(ExitCode.UNEXPECTED)
        summary = RunSummary(run_id=RUN_ID.get(), command="sync", started_at=started.isoformat(timespec="seconds"),
                             finished_at=now.isoformat(timespec="seconds"),
                             duration_s=(now - started).total_seconds(),
                             outcome=outcome_of_error(exit_code), exit_code=exit_code,
                             error=str(exc) if exc is not None else "unexpected error")
    return summary.as_dict()


def _write_metrics_of_broken_config(config_path: Path | None, summary: dict[str, Any]) -> None:
    """The metrics of a run whose settings did not load, where the raw config or environment names the file."""
    from connector.ops.metrics import metrics_file_of_broken_config, write_textfile

    path = metrics_file_of_broken_config(config_path)
    if path is None:
        return
    try:
        write_textfile(path, summary)
    except (OSError, PeersyncError) as exc:
        _warn(f"could not write the metrics file {path}: {type(exc).__name__}")


class _ProgressBar:
    """click's progress bar on stderr (never stdout: it would corrupt --json), driven by (done, total)."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.done = 0

    def update(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=max(total, 1), label="participants", file=sys.stderr)
            self.bar.__enter__()
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


def _write_pull_metrics(settings: Any, summary: Any) -> None:
    """The pull's own metrics file beside the sync's (``<metrics_file stem>-pull.prom``, peersync_pull_* names)."""
    if settings.output.metrics_file is None:
        return
    from connector.ops.metrics import pull_metrics_path, write_pull_textfile

    path = pull_metrics_path(settings.output.metrics_file)
    try:
        write_pull_textfile(path, summary.as_dict(), mode=settings.file_mode())
    except (OSError, PeersyncError) as exc:
        _warn(f"could not write the metrics file {path}: {type(exc).__name__}")


def _write_metrics(settings: Any, summary: dict[str, Any]) -> None:
    if settings.output.metrics_file is None:
        return
    from connector.ops.metrics import write_textfile
    from connector.ops.status import backlog
    from connector.plan.ledger import Ledger

    waiting: dict[str, int] | None = None
    try:
        # A run refused the lock leaves the ledger to the run that holds it (not even a read that could migrate it).
        if settings.sync.ledger.is_file() and summary.get("exit_code") != ExitCode.LOCK_HELD:
            with Ledger(settings.sync.ledger) as ledger:
                waiting = backlog(ledger)
    except PeersyncError:
        waiting = None  # the run's exit code (e.g. 78, ledger not writable) must still reach the alert rules
    try:
        write_textfile(settings.output.metrics_file, summary, backlog=waiting, mode=settings.file_mode())
    except (OSError, PeersyncError) as exc:
        # Metrics are secondary: a full disk or a bad path must not change the run's exit code.
        _warn(f"could not write the metrics file {settings.output.metrics_file}: {type(exc).__name__}")


def _print_summary(summary: dict[str, Any]) -> None:
    counts = summary["counts"]
    click.echo(f"run {summary['run_id']}: {summary['outcome']} (exit {summary['exit_code']}) "
               f"in {summary['duration_s']}s")
    durations = summary.get("durations") or {}
    if durations:
        click.echo("  phases: " + ", ".join(f"{name.removesuffix('_s')} {value}s" for name, value in durations.items()
                                            if name != "total_s"))
    read = summary.get("read") or {}
    if read:
        click.echo(f"  read {read.get('read', 0)} rows: {read.get('accepted', 0)} accepted, "
                   f"{read.get('rejected', 0)} rejected")
    click.echo("  " + ", ".join(f"{name.replace('_', ' ')} {counts[name]}" for name in counts))
    click.echo(f"  requests {summary['requests']} (writes {summary['write_requests']}, retries {summary['retries']})")
    _warn_summary(summary)
    for reason, records in (summary.get("pending_reasons") or {}).items():
        click.echo(f"  pending {records}: {reason}")
    for adaptation in summary.get("adaptations") or []:
        click.echo(f"  adapted: {adaptation}")
    if summary.get("not_permitted"):
        click.echo("  not permitted by the server (parked): " + ", ".join(
            f"{resource_type} {records}" for resource_type, records in summary["not_permitted"].items()))
    if summary.get("rejects_report") and counts.get("rejected"):
        click.echo(f"  rejects report: {summary['rejects_report']}")
    if summary.get("error"):
        _warn(f"run error: {summary['error']}")


def _warn_summary(summary: dict[str, Any]) -> None:
    """What the run held back and what reading warned about, as warnings on stderr."""
    for held in summary.get("deletions_held") or []:
        _warn(held)
    for held in summary.get("shape_held") or []:
        _warn(held)
    for warning in summary.get("warnings") or []:
        _warn(warning)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON on stdout.")
@logging_options
@translate_errors
def plan(config_path: Path | None, as_json: bool) -> None:
    """Dry run: what a sync would create, update, void or leave unchanged, per resource type and participant.

    Reads the inputs and the ledger only; sends nothing to the server. Counts what the sync would report
    (its `created`, `updated`, `voided`... in the same words), the rows it would reject (written to the rejects
    report), and the records an open review names. Exits 65 when rows would be rejected or the shape guard
    holds a record kind, as the sync would (docs/exit-codes.md).
    """
    from collections import Counter

    from connector.plan.ledger import Ledger
    from connector.plan.planner import SYNC_COUNT_NAMES, retried_units, review_candidates
    from connector.read.staging import Staging
    from connector.run import exit_for, read_and_plan
    from connector.wiring import sync_options

    opts = sync_options(_settings(config_path))
    with tempfile.TemporaryDirectory(prefix="peersync-plan-") as tmp, Staging(Path(tmp) / "s.sqlite") as staging, \
            Ledger(opts.ledger_path, mode=opts.file_mode) as ledger:
        report, computed, rejects = read_and_plan(opts, ledger, staging)
        review = ledger.reviews()
        last_strategy = ledger.meta("write_strategy")
        in_review = review_candidates(staging, {entry["subject"] for entry in review})
        retried = retried_units(staging)
    expected: Counter[str] = Counter({name: computed.reported.get(name, 0) for name in SYNC_COUNT_NAMES})
    expected["rejected"], expected["retried"] = report.total_rejected, retried
    code, outcome = exit_for(expected, shape_held=bool(computed.shape_held))
    result = computed.as_dict() | {"read": report.as_dict()["total"], "rejects_report": str(rejects),
                                   "open_reviews": len(review), "sync_counts": dict(expected),
                                   "review_candidates": in_review, "warnings": report.warnings,
                                   "exit_code": code, "outcome": outcome,
                                   "write_strategy": _planned_strategy(opts.write_strategy, last_strategy)}
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        _print_plan(result)
    sys.exit(code)


def _planned_strategy(configured: str, last: str | None) -> str:
    """The write strategy a sync would use: the configured one, or (auto, chosen from the CapabilityStatement at
    sync time; plan sends nothing) the one the last sync used."""
    if configured != "auto":
        return f"{configured} (server.write_strategy)"
    return f"auto: last sync wrote as {last}" if last else \
        "auto: chosen from the CapabilityStatement of the server when the sync starts (peersync doctor shows it)"


def _print_plan(result: dict[str, Any]) -> None:
    """The plan as the operator reads it: per resource type, in the words `sync` reports."""
    columns = ("created", "updated", "voided", "deleted", "unchanged", "held", "skipped_quarantined",
               "not_permitted")
    heads = {"skipped_quarantined": "quarantined", "not_permitted": "parked"}
    click.echo(f"{'resource type':<22}" + "".join(f"{heads.get(c, c):>12}" for c in columns))
    for resource_type, counts in result["sync_counts_by_resource_type"].items():
        click.echo(f"{resource_type:<22}" + "".join(f"{counts.get(c, 0):>12}" for c in columns))
    totals = result["sync_counts"]
    click.echo(f"{'units (records)':<22}" + "".join(f"{totals.get(c, 0):>12}" for c in columns))
    if totals.get("retried"):
        click.echo(f"  of which sent again after an earlier run left them unconfirmed: {totals['retried']}")
    write_actions = ("create", "update", "void", "delete", "retry")
    changed = sum(1 for c in result["participants"].values() if any(c.get(a) for a in write_actions))
    click.echo(f"participants with changes: {changed}")
    click.echo(f"write strategy: {result['write_strategy']}")
    read = result["read"]
    if read.get("rejected"):
        click.echo(f"rows the sync would reject: {read['rejected']} (rejects report: {result['rejects_report']})")
    for subject, units in result["review_candidates"].items():
        what = ("of participants whose Patient was not found or not unique: they go to review again unless the "
                "EHR has it now") if subject == "participant" else "that a review names (duplicates on the server)"
        click.echo(f"  {units} record(s) to send {what}")
    for warning in result["warnings"]:
        _warn(warning)
    for held in result["deletions_held"] + result["shape_held"]:
        _warn(held)


@main.command()
@config_option
@json_option
@logging_options
@translate_errors
def pull(config_path: Path | None, as_json: bool) -> None:
    """Bring back what the program needs from the EHR: new clinic referrals to an intake file (PHI, 0600; each Task
    moves to received, or is only tagged with pull.mark_received off), the status community organizations set on
    the program's referrals (referrals.csv/json), and, with pull.clinical_facts on, clinical facts of consenting
    participants. Takes the ledger lock; recorded in the ledger's runs (`peersync status`).

    Exit codes: 0 done; 65 a referral was newly skipped, one Task was refused, or a step failed (see the summary);
    69 server unavailable; 75 another run holds the lock; 77 auth; 78 config.
    """
    from connector.plan.ledger import Ledger
    from connector.pull.puller import Puller, PullSummary
    from connector.run import LedgerLock
    from connector.wiring import build_client, pull_options

    settings = _settings(config_path)
    puller: Puller | None = None
    try:
        with LedgerLock(settings.sync.ledger), Ledger(settings.sync.ledger, mode=settings.file_mode()) as ledger:
            puller = Puller(pull_options(settings), build_client(settings))
            summary = puller.run_recorded(ledger, RUN_ID.get())
    except PeersyncError as exc:
        failed = puller.summary if puller else PullSummary(error=str(exc)[:300], error_exit_code=int(exc.exit_code))
        _write_pull_metrics(settings, failed)
        raise
    _write_pull_metrics(settings, summary)
    result = summary.as_dict()
    if as_json:
        _echo_json(result)
    else:
        click.echo(f"clinic referrals: {summary.delivered} new to intake, {summary.already_delivered} delivered "
                   f"before, {summary.received} Task(s) moved to received, {len(summary.skipped)} skipped")
        if summary.intake_file:
            click.echo(f"  intake file (PHI): {summary.intake_file}")
        for skip in summary.skipped[:20]:
            click.echo(f"  skipped Task/{skip['task']}: {skip['reason']}")
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(summary.referral_statuses.items())) or "none"
        click.echo(f"community referrals: {statuses} ({summary.changed_by_organization} changed by the "
                   f"organization); report: {summary.referrals_report}")
        if summary.clinical_file:
            click.echo(f"clinical facts (PHI): {summary.clinical_participants} consenting participant(s): "
                       f"{summary.clinical_file}")
        for problem in summary.problems:
            click.echo(f"problem: {problem}")
    sys.exit(summary.exit_code())


@main.command()
@config_option
@json_option
@click.option("--runs", default=5, show_default=True, type=click.IntRange(1, 1000),
              help="How many recent runs to show.")
@logging_options
@translate_errors
def status(config_path: Path | None, as_json: bool, runs: int) -> None:
    """The last runs, the last success, and the backlog: pending, quarantined and in-review records, open reviews.

    Reads the ledger only (a running sync is not disturbed).
    """
    from connector.ops.status import status_report

    settings = _settings(config_path)
    result = status_report(settings.sync.ledger, runs)
    if as_json:
        _echo_json(result)
        return
    click.echo(f"ledger: {result['ledger']}")
    if not result["ledger_exists"]:
        click.echo("no ledger yet: no sync has run with this configuration")
        return
    last = result["last_run"]
    if last:
        ended = f" (exit {last['exit_code']})" if last["exit_code"] is not None else ""
        click.echo(f"last run:     {last['run_id']} {last['started_at']} {last['outcome']}{ended}"
                   + (f" in {last['duration_s']}s" if last["duration_s"] is not None else ""))
        read = last["read"]
        if read:
            changes = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in last["counts"].items() if v)
            click.echo(f"              read {read.get('read', 0)} rows, {read.get('rejected', 0)} rejected; "
                       + (changes or "no changes"))
    success = result["last_success"]
    click.echo("last success: " + (f"{success['run_id']} finished {success['finished_at']} "
                                   f"({_age(success['finished_at'])} ago, exit {success['exit_code']})"
                                   if success else "never"))
    for held in (last or {}).get("shape_held") or []:
        click.echo(f"held:         {held}")
    b = result["backlog"]
    click.echo(f"backlog:      pending {b['pending']}, quarantined {b['quarantined']}, in review {b['in_review']}, "
               f"parked {b['not_permitted']}, open reviews {b['open_reviews']}")
    parked = result["parked"]
    if parked["records_by_kind"]:
        click.echo("parked:       " + ", ".join(f"{kind} {n}" for kind, n in parked["records_by_kind"].items())
                   + " (the server does not accept " + ", ".join(sorted(parked["refused_types"])) + "; "
                   "sent again when its CapabilityStatement or the settings change, or with sync --retry-parked)")
    referrals = result.get("referrals") or {}
    if referrals.get("community") or referrals.get("clinic_referrals_delivered") \
            or referrals.get("clinic_referrals_waiting"):
        community = ", ".join(f"{k} {v}" for k, v in referrals["community"].items()) or "none"
        click.echo(f"referrals:    community {community} ({referrals['changed_by_organization']} changed by the "
                   f"organization, seen {referrals['last_seen'] or 'never'}); clinic referrals delivered to intake "
                   f"{referrals['clinic_referrals_delivered']}")
        _echo_referrals(referrals)
    pulled = result.get("last_pull")
    if pulled:
        click.echo(f"last pull:    {pulled['run_id']} {pulled['started_at']} {pulled['outcome']}"
                   + (f" (exit {pulled['exit_code']})" if pulled["exit_code"] is not None else "")
                   + (f": {pulled['error']}" if pulled["error"] else ""))
    click.echo(f"{'run':<14}{'started':<27}{'outcome':<12}{'exit':>5}{'secs':>9}  counts")
    for run in result["runs"]:
        shown = ", ".join(f"{k} {v}" for k, v in run["counts"].items() if v)
        secs = "" if run["duration_s"] is None else f"{run['duration_s']:.1f}"
        code = "-" if run["exit_code"] is None else str(run["exit_code"])
        click.echo(f"{run['run_id']:<14}{run['started_at']:<27}{run['outcome']!s:<12}{code:>5}{secs:>9}  {shown}")


def _echo_referrals(referrals: dict[str, Any], limit: int = 20) -> None:
    """The community referrals (id, status, when, by whom) and the clinic referrals waiting, as short tables."""
    rows = referrals.get("community_referrals") or []
    if rows:
        click.echo(f"  {'referral':<16}{'status':<13}{'changed':<27}by")
        for row in rows[:limit]:
            changed = row["changed_at"] or "-"
            click.echo(f"  {row['referral_id']:<16}{row['status']:<13}{changed:<27}{row['changed_by']}")
        if len(rows) > limit:
            click.echo(f"  ... {len(rows) - limit} more (status --json lists them all)")
    for waiting in (referrals.get("clinic_referrals_waiting") or [])[:limit]:
        click.echo(f"  clinic referral Task/{waiting['task']} waiting: {waiting['reason']}")


def _age(iso: str | None) -> str:
    if not iso:
        return "?"
    try:
        seconds = (datetime.now(UTC) - datetime.fromisoformat(iso)).total_seconds()
    except ValueError:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{max(seconds, 0):.0f} s"


@main.command()
@config_option
@json_option
@logging_options
@translate_errors
def landed(config_path: Path | None, as_json: bool) -> None:
    """What is on the server for this program, counted by the server itself (read-only)."""
    from connector.ops.landed import landed_counts
    from connector.wiring import build_client, mapping_context

    settings = _settings(config_path)
    rows = landed_counts(build_client(settings), mapping_context(settings))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"on {settings.server.base_url}:")
    click.echo(f"  {'resource type':<22}{'identifier kind':<18}{'total':>8}{'entered-in-error':>18}")
    for row in rows:
        click.echo(f"  {row['resource_type']:<22}{row['kind']:<18}{row['total']:>8}{row['entered_in_error']:>18}")


@main.command()
@config_option
@click.option("--repair", is_flag=True,
              help="Then re-send what is missing or changed on the server (a normal sync of exactly those records).")
@click.option("--references", is_flag=True,
              help="Also scan the program's resources on the server for references that do not resolve.")
@json_option
@logging_options
@translate_errors
def verify(config_path: Path | None, repair: bool, references: bool, as_json: bool) -> None:
    """Read back what the ledger says the server confirmed, and report per resource type: identical, changed on
    the server (another version), or missing (deleted on the server). Takes the ledger lock.

    With --references, also report stored references that do not resolve (65 when there are any).

    Exit codes: 0 all identical; 65 drift found (with --repair: the repair sync's own exit code); 69 server
    unavailable; 75 another run holds the lock; 77 auth; 78 config.
    """
    from connector.ops.verify import mark_for_repair, verify_ledger
    from connector.plan.ledger import Ledger
    from connector.run import LedgerLock, Syncer
    from connector.wiring import build_client, sync_options

    settings = _settings(config_path)
    if not settings.sync.ledger.is_file():
        _fail(f"no ledger at {settings.sync.ledger}: nothing was sent with this configuration, so there is nothing "
              "to verify (check sync.ledger)", ExitCode.CONFIG_ERROR)
    client = build_client(settings)
    with LedgerLock(settings.sync.ledger), Ledger(settings.sync.ledger) as ledger:
        report = verify_ledger(client, ledger)
        marked = mark_for_repair(ledger, report, run_id=RUN_ID.get()) if repair and report.drifted else 0
    result: dict[str, Any] = {"verify": report.as_dict()}
    exit_code = report.exit_code()
    if references:
        from connector.ops.references import check_references
        from connector.wiring import mapping_context

        checked = check_references(client, mapping_context(settings))
        result["references"] = checked.as_dict()
        if checked.broken and exit_code == ExitCode.OK:
            exit_code = int(ExitCode.RECORDS_REJECTED)
    if marked:
        summary = Syncer(sync_options(settings), build_client(settings)).run(RUN_ID.get())
        _write_metrics(settings, summary.as_dict())
        result["repair"] = {"marked": marked} | summary.as_dict()
        exit_code = summary.exit_code
    elif repair:
        result["repair"] = {"marked": 0}
        exit_code = int(ExitCode.OK)
    if as_json:
        _echo_json(result)
    else:
        _print_verify(result)
        if references:
            _print_references(result["references"])
    sys.exit(exit_code)


def _print_references(report: dict[str, Any]) -> None:
    broken = report["broken"]
    click.echo(f"references: {report['checked']} checked in {sum(report['scanned'].values())} resources, "
               f"{len(broken)} do not resolve")
    for finding in broken[:20]:
        click.echo(f"  {finding['referrer']}.{finding['element']} -> {finding['target']}: {finding['why']}")


def _print_verify(result: dict[str, Any]) -> None:
    report = result["verify"]
    click.echo(f"{'resource type':<22}{'identical':>11}{'changed':>9}{'missing':>9}")
    for resource_type, counts in report["resources"].items():
        click.echo(f"{resource_type:<22}{counts['identical']:>11}{counts['changed']:>9}{counts['missing']:>9}")
    totals = report["totals"]
    click.echo(f"{'total':<22}{totals['identical']:>11}{totals['changed']:>9}{totals['missing']:>9}"
               f"  ({report['requests']} requests)")
    for finding in report["drifted"][:20]:
        click.echo(f"  {finding['drift']:<8} {finding['resource_type']}/{finding['server_id']} "
                   f"({finding['unit']}): {finding['why']}")
    if len(report["drifted"]) > 20:
        click.echo(f"  ... and {len(report['drifted']) - 20} more (--json lists all)")
    repair = result.get("repair")
    if repair is None:
        if report["drifted"]:
            click.echo(f"{len(report['drifted_units'])} record(s) drifted: "
                       "run peersync verify --repair to re-send them")
        return
    click.echo(f"repair: {repair['marked']} record(s) marked for re-sending")
    if repair["marked"]:
        _print_summary(repair)


@main.group()
def review() -> None:
    """The review queue: participants whose Patient was not found or is ambiguous, duplicates on the server, and
    the program's Organization or supporters' Practitioners the EHR lacks ([directory])."""


@review.command("list")
@config_option
@click.option("--all", "include_closed", is_flag=True, help="Include dismissed and resolved entries.")
@click.option("--quarantined", is_flag=True,
              help="List the records the server refused (quarantined) instead: opaque key, kind, reason codes.")
@json_option
@logging_options
@translate_errors
def review_list(config_path: Path | None, include_closed: bool, quarantined: bool, as_json: bool) -> None:
    """List review entries (subjects are source ids; no patient data)."""
    if quarantined:
        _list_quarantined(config_path, as_json)
        return
    with _ledger(config_path) as ledger:
        entries = ledger.reviews(include_closed=include_closed)
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    if not entries:
        click.echo("review queue is empty")
    for e in entries:
        click.echo(f"{e['id']:>5}  {e['status']:<9} {e['reason']:<20} {e['subject']:<28} {e['detail'] or ''}")


@review.command("retry")
@config_option
@click.argument("review_id", type=int, required=False)
@click.option("--all-quarantined", is_flag=True, help="Send every quarantined record again on the next sync.")
@logging_options
@translate_errors
def review_retry(config_path: Path | None, review_id: int | None, all_quarantined: bool) -> None:
    """Send a quarantined or reviewed record again on the next sync (REVIEW_ID from review list, or
    --all-quarantined)."""
    if all_quarantined == (review_id is not None):
        raise click.UsageError("give a REVIEW_ID or --all-quarantined (one of them)")
    if all_quarantined:
        with _ledger(config_path) as ledger:
            count = ledger.retry_quarantined()
        click.echo(f"{count} quarantined record(s) will be sent again on the next sync")
        return
    assert review_id is not None
    _set_review(config_path, review_id, "retry")


def _list_quarantined(config_path: Path | None, as_json: bool) -> None:
    """Quarantined records by opaque key (no source ids, no patient data) with the server's reason codes."""
    from connector.ops.logs import opaque_key

    with _ledger(config_path) as ledger:
        rows = [{"key": opaque_key(row["unit_key"]), "kind": row["kind"], "reason": row["detail"] or "",
                 "attempts": row["attempts"], "updated_at": row["updated_at"]} for row in ledger.quarantined()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no quarantined records")
    for row in rows:
        click.echo(f"{row['key']:<16} {row['kind']:<16} {row['updated_at']:<26} {row['reason']}")
    if rows:
        click.echo(f"{len(rows)} quarantined; peersync review retry --all-quarantined sends them again next sync")


@review.command("dismiss")
@config_option
@click.argument("review_id", type=int)
@logging_options
@translate_errors
def review_dismiss(config_path: Path | None, review_id: int) -> None:
    """Dismiss a review entry (it stays in the history; the record is not retried automatically)."""
    _set_review(config_path, review_id, "dismissed")


def _set_review(config_path: Path | None, review_id: int, status_value: str) -> None:
    with _ledger(config_path) as ledger:
        if not ledger.set_review_status(review_id, status_value):
            _fail(f"no review entry {review_id} (see peersync review list --all)", ExitCode.USAGE)
    click.echo(f"review {review_id}: {status_value}")


if __name__ == "__main__":  # pragma: no cover
    main()
