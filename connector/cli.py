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


if __name__ == "__main__":  # pragma: no cover
    main()
