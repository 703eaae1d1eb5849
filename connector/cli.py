"""The `peersync` command: a thin layer over the library. It parses options, calls the library, prints,
and turns library errors into documented exit codes (see docs/exit-codes.md)."""

from __future__ import annotations

import functools
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from connector import __version__
from connector.errors import ExitCode, PeersyncError
from connector.logs import configure_logging, new_run_id


class PeersyncCommandError(click.ClickException):
    """A library error on its way out of the CLI, with its exit code."""

    def __init__(self, error: PeersyncError) -> None:
        super().__init__(str(error))
        self.exit_code = int(error.exit_code)

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def translate_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn PeersyncError into a clean message + exit code (no traceback, no patient data)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except PeersyncError as exc:
            raise PeersyncCommandError(exc) from None

    return wrapper


def logging_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--log-format/--verbose/--quiet, shared by every command that does work."""

    @click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
                  envvar="PEERSYNC_LOG_FORMAT", help="Log lines on stderr as text or JSON lines.")
    @click.option("-v", "--verbose", is_flag=True, help="More detail in logs (still no patient data).")
    @click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors in logs.")
    @functools.wraps(func)
    def wrapper(*args: Any, log_format: str, verbose: bool, quiet: bool, **kwargs: Any) -> Any:
        configure_logging(fmt=log_format, verbose=verbose, quiet=quiet)
        new_run_id()
        return func(*args, **kwargs)

    return wrapper


config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), envvar="PEERSYNC_CONFIG",
    help="TOML configuration file (env PEERSYNC_CONFIG); PEERSYNC_SECTION__KEY variables override it.",
)


def _settings(config_path: Path | None) -> Any:
    from connector.config import load_settings

    return load_settings(config_path)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="peersync")
def main() -> None:
    """peersync carries diabetes peer-support records (contacts, goals, referrals, planned contacts)
    into a clinic EHR as FHIR R4 resources.

    \b
    Exit codes: 0 ok, 1 unexpected error, 2 usage, 65 records rejected or in review,
    69 server unavailable / retries exhausted, 75 lock held, 77 auth failure, 78 configuration error.
    """


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
    from connector.profile import check_profile, resolve_profile_path

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
              help="Write rejects.csv and rejects.json here (default: a temporary folder that is printed).")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON on stdout.")
@logging_options
@translate_errors
def check(profile_ref: str, inputs: tuple[Path, ...], rejects_dir: Path | None, as_json: bool) -> None:
    """Read INPUTS through a profile: per-kind counts and a rejects report. Sends nothing.

    Exits 65 when any row is rejected, 0 when all rows are accepted.
    """
    from connector.profile import load_profile
    from connector.source import read_program, write_rejects
    from connector.staging import Staging

    loaded = load_profile(profile_ref)
    with tempfile.TemporaryDirectory(prefix="peersync-check-") as tmp, Staging(Path(tmp) / "staging.sqlite") as st:
        report = read_program(loaded, inputs, st)
        out = rejects_dir or Path(tempfile.mkdtemp(prefix="peersync-rejects-"))
        csv_path, json_path, problems = write_rejects(st, out)
    summary = report.as_dict() | {"rejects_report": {"csv": str(csv_path), "json": str(json_path),
                                                     "problems": problems}}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_read_report(summary)
    sys.exit(ExitCode.RECORDS_REJECTED if report.total_rejected else ExitCode.OK)


def _print_read_report(summary: dict[str, Any]) -> None:
    click.echo(f"{'kind':<18}{'read':>8}{'accepted':>10}{'rejected':>10}")
    for kind, c in summary["kinds"].items():
        click.echo(f"{kind:<18}{c['read']:>8}{c['accepted']:>10}{c['rejected']:>10}")
    t = summary["total"]
    click.echo(f"{'total':<18}{t['read']:>8}{t['accepted']:>10}{t['rejected']:>10}")
    if summary["blank_rows"]:
        click.echo(f"blank rows skipped: {summary['blank_rows']}")
    for warning in summary["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    rejects = summary["rejects_report"]
    if t["rejected"]:
        click.echo(f"rejected rows: {t['rejected']} ({rejects['problems']} problems); "
                   f"report: {rejects['csv']} and {rejects['json']}")
        with open(rejects["csv"], encoding="utf-8") as report:
            lines = report.read().splitlines()
        for line in lines[1:21]:
            click.echo(f"  {line}")
        if len(lines) > 21:
            click.echo(f"  ... {len(lines) - 21} more in the report")


# -- map, terminology --------------------------------------------------------------------------------


@main.command("map")
@click.option("--profile", "profile_ref", required=True, help="Mapping profile (file, folder or shipped name).")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for bundles/, <Type>.ndjson and summary.json.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@logging_options
@translate_errors
def map_command(profile_ref: str, inputs: tuple[Path, ...], out_dir: Path, as_json: bool) -> None:
    """Map INPUTS to FHIR without a server: a transaction bundle per participant, NDJSON per type, a summary.

    Exits 65 when rows were rejected (see the rejects report in OUT), 0 otherwise.
    """
    from connector.mappers import MappingContext
    from connector.mapstage import map_program
    from connector.profile import load_profile
    from connector.source import write_rejects
    from connector.staging import Staging

    loaded = load_profile(profile_ref)
    ctx = MappingContext.from_profile(loaded)
    with tempfile.TemporaryDirectory(prefix="peersync-map-") as tmp, Staging(Path(tmp) / "s.sqlite") as st:
        summary = map_program(loaded, list(inputs), ctx, out_dir, st)
        write_rejects(st, out_dir)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        total = summary["read"]["total"]
        click.echo(f"read {total['read']} rows: {total['accepted']} accepted, {total['rejected']} rejected")
        click.echo(f"wrote {summary['bundles']} transaction bundles to {out_dir / 'bundles'}")
        for resource_type, count in summary["resources"].items():
            click.echo(f"  {resource_type:<22}{count:>8}")
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
    from connector.terminology import load_terminology, terminology_bundle

    settings = _settings(config_path)
    bundle = terminology_bundle(load_terminology(), terminology_base=settings.program.terminology_base)
    if dry_run:
        click.echo(json.dumps(bundle, indent=2))
        return
    from connector.app import build_client

    response = build_client(settings).transaction(bundle)
    statuses = [e.get("response", {}).get("status", "") for e in response.get("entry", [])]
    click.echo(f"published {len(statuses)} terminology resources to {settings.server.base_url} "
               f"({', '.join(sorted(set(statuses)))})")


# -- sync, plan, status, review ------------------------------------------------------------------------

@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON on stdout.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: only on a terminal).")
@logging_options
@translate_errors
def sync(config_path: Path | None, as_json: bool, progress: bool | None) -> None:
    """Push the program's records to the FHIR server: idempotent, incremental, safe to rerun at any time.

    Exit codes: 0 all landed; 65 rows rejected, quarantined or in review (the rest landed); 69 server
    unavailable (pending records are sent next run); 75 another run holds the lock; 77 auth; 78 config.
    """
    from connector.app import build_client, sync_options
    from connector.logs import RUN_ID
    from connector.sync import Syncer

    settings = _settings(config_path)
    opts = sync_options(settings)
    client = build_client(settings)
    show_bar = sys.stderr.isatty() if progress is None else progress
    bar = _ProgressBar() if show_bar else None
    syncer = Syncer(opts, client, on_progress=bar.update if bar else None)
    try:
        summary = syncer.run(RUN_ID.get())
    finally:
        if bar:
            bar.close()
    _write_metrics(settings, summary)
    if as_json:
        click.echo(json.dumps(summary.as_dict(), indent=2))
    else:
        _print_summary(summary.as_dict())
    sys.exit(summary.exit_code)


class _ProgressBar:
    """click's progress bar on stderr, driven by (done, total) callbacks."""

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


def _write_metrics(settings: Any, summary: Any) -> None:
    if settings.output.metrics_file is None:
        return
    from connector.metrics import write_textfile

    write_textfile(settings.output.metrics_file, summary.as_dict())


def _print_summary(summary: dict[str, Any]) -> None:
    counts = summary["counts"]
    click.echo(f"run {summary['run_id']}: {summary['outcome']} (exit {summary['exit_code']}) in {summary['duration_s']}s")
    read = summary.get("read") or {}
    if read:
        click.echo(f"  read {read.get('read', 0)} rows: {read.get('accepted', 0)} accepted, "
                   f"{read.get('rejected', 0)} rejected")
    click.echo("  " + ", ".join(f"{name.replace('_', ' ')} {counts[name]}" for name in counts))
    click.echo(f"  requests {summary['requests']} (writes {summary['write_requests']}, retries {summary['retries']})")
    for held in summary.get("deletions_held") or []:
        click.echo(f"  warning: {held}", err=True)
    if summary.get("rejects_report") and counts.get("rejected"):
        click.echo(f"  rejects report: {summary['rejects_report']}")
    if summary.get("error"):
        click.echo(f"  error: {summary['error']}", err=True)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON on stdout.")
@logging_options
@translate_errors
def plan(config_path: Path | None, as_json: bool) -> None:
    """Dry run: what a sync would create, update, void or leave unchanged, per resource type and participant.

    Reads the inputs and the ledger only; sends nothing to the server.
    """
    from connector.app import sync_options
    from connector.ledger import Ledger
    from connector.staging import Staging
    from connector.sync import read_and_plan

    opts = sync_options(_settings(config_path))
    with tempfile.TemporaryDirectory(prefix="peersync-plan-") as tmp, Staging(Path(tmp) / "s.sqlite") as staging, \
            Ledger(opts.ledger_path) as ledger:
        report, computed, rejects = read_and_plan(opts, ledger, staging)
        review = ledger.reviews()
    result = computed.as_dict() | {"read": report.as_dict()["total"], "rejects_report": str(rejects),
                                   "open_reviews": len(review)}
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{'resource type':<22}" + "".join(f"{a:>12}" for a in ("create", "update", "void", "delete",
                                                                           "retry", "unchanged")))
    for resource_type, counts in result["resources"].items():
        click.echo(f"{resource_type:<22}" + "".join(f"{counts.get(a, 0):>12}" for a in
                                                   ("create", "update", "void", "delete", "retry", "unchanged")))
    totals = result["totals"]
    click.echo(f"units: {totals}")
    click.echo(f"participants with changes: {sum(1 for c in result['participants'].values() if any(c.get(a) for a in ('create','update','void','delete','retry')))}")
    for held in result["deletions_held"]:
        click.echo(f"warning: {held}", err=True)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout.")
@click.option("--runs", default=5, show_default=True, help="How many recent runs to show.")
@translate_errors
def status(config_path: Path | None, as_json: bool, runs: int) -> None:
    """The last runs and the backlog: pending, quarantined and in-review records, open reviews."""
    from connector.ledger import Ledger

    settings = _settings(config_path)
    with Ledger(settings.sync.ledger) as ledger:
        result = {"ledger": str(settings.sync.ledger), "runs": ledger.runs(runs), "units": ledger.state_counts(),
                  "open_reviews": len(ledger.reviews())}
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
        return
    click.echo(f"ledger: {result['ledger']}")
    click.echo("records by state: " + (", ".join(f"{k} {v}" for k, v in sorted(result["units"].items())) or "none"))
    click.echo(f"open reviews: {result['open_reviews']}")
    click.echo(f"{'run':<14}{'started':<27}{'outcome':<12}{'exit':>5}  counts")
    for run in result["runs"]:
        counts = (run.get("summary") or {}).get("counts", {})
        shown = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
        click.echo(f"{run['run_id']:<14}{run['started_at']:<27}{str(run['outcome']):<12}{str(run['exit_code']):>5}  {shown}")


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout.")
@translate_errors
def landed(config_path: Path | None, as_json: bool) -> None:
    """What is on the server for this program, counted by the server itself (read-only)."""
    from connector.app import build_client, mapping_context
    from connector.landed import landed_counts

    settings = _settings(config_path)
    rows = landed_counts(build_client(settings), mapping_context(settings))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"on {settings.server.base_url}:")
    click.echo(f"  {'resource type':<22}{'identifier kind':<18}{'total':>8}{'entered-in-error':>18}")
    for row in rows:
        click.echo(f"  {row['resource_type']:<22}{row['kind']:<18}{row['total']:>8}{row['entered_in_error']:>18}")


@main.group()
def review() -> None:
    """The review queue: participants whose Patient was not found or is ambiguous, duplicates on the server."""


@review.command("list")
@config_option
@click.option("--all", "include_closed", is_flag=True, help="Include dismissed and resolved entries.")
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout.")
@translate_errors
def review_list(config_path: Path | None, include_closed: bool, as_json: bool) -> None:
    """List review entries (subjects are source ids; no patient data)."""
    from connector.ledger import Ledger

    with Ledger(_settings(config_path).sync.ledger) as ledger:
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
@click.argument("review_id", type=int)
@translate_errors
def review_retry(config_path: Path | None, review_id: int) -> None:
    """Send a quarantined or reviewed record again on the next sync."""
    _set_review(config_path, review_id, "retry")


@review.command("dismiss")
@config_option
@click.argument("review_id", type=int)
@translate_errors
def review_dismiss(config_path: Path | None, review_id: int) -> None:
    """Dismiss a review entry (it stays in the history; the record is not retried automatically)."""
    _set_review(config_path, review_id, "dismissed")


def _set_review(config_path: Path | None, review_id: int, status_value: str) -> None:
    from connector.ledger import Ledger

    with Ledger(_settings(config_path).sync.ledger) as ledger:
        if not ledger.set_review_status(review_id, status_value):
            click.echo(f"error: no review entry {review_id}", err=True)
            sys.exit(ExitCode.USAGE)
    click.echo(f"review {review_id}: {status_value}")


if __name__ == "__main__":  # pragma: no cover
    main()
