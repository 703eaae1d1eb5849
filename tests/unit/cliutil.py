"""Shared by the CLI unit tests: a `peersync.toml` for the demo program, and running the command in-process."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from connector.cli import main

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "fixtures" / "demo" / "template"


def write_config(tmp_path: Path, *, inputs: Path = DEMO, base_url: str = "http://127.0.0.1:9/fhir",
                 auth: str = 'mode = "none"', sync: str = "", extra: str = "") -> Path:
    """``tmp_path/peersync.toml``: the template profile over ``inputs``, a ledger under ``state/``; ``sync`` adds
    lines to the ``[sync]`` table, ``extra`` more tables (or, with no table header, more ``[sync]`` lines)."""
    path = tmp_path / "peersync.toml"
    path.write_text(f"""
[source]
profile = "peersync-template"
inputs = ["{inputs}"]
[server]
base_url = "{base_url}"
[auth]
{auth}
[sync]
ledger = "state/ledger.sqlite"
{sync}
{extra}
""", encoding="utf-8")
    return path


def run(*args: str) -> Result:
    """``peersync ARGS`` in-process; exceptions the CLI does not handle propagate to the test."""
    return CliRunner().invoke(main, list(args), catch_exceptions=False, prog_name="peersync")
