"""The shipped examples work: every docs/examples/*.toml passes `config check`, the crontab lines have five
valid time fields, the systemd units pass `systemd-analyze verify` (an INI check where systemd is absent).
Every peersync command line in them parses with the real CLI. The Kubernetes manifests are checked in
tests/unit/test_kubernetes_examples.py."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from connector.auth.keys import generate_keypair
from connector.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
DEMO = EXAMPLES.parents[1] / "fixtures" / "demo" / "template"


pytestmark = pytest.mark.usefixtures("peersync_env")


def parse_peersync_args(args: list[str]) -> click.Context:
    """Parse a peersync command line with the real CLI (options, choices, required arguments)."""
    assert args and args[0] in main.commands, args
    command = main.commands[args[0]]
    return command.make_context(f"peersync {args[0]}", list(args[1:]))


def config_check(path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = CliRunner().invoke(main, ["config", "check", "--json", str(path)], env=env, catch_exceptions=False)
    report = json.loads(result.stdout)
    assert result.exit_code == report["exit_code"]
    return report


# -- configuration examples ------------------------------------------------------------------------------


def test_every_example_config_is_covered() -> None:
    # ehr-*.toml (one per server of docs/ehr-compatibility.md) are checked in tests/unit/test_ehr_examples.py
    assert sorted(p.name for p in EXAMPLES.glob("*.toml") if not p.name.startswith("ehr-")) == [
        "local-hapi.toml", "production-smart.toml", "public-hapi.toml"]


@pytest.mark.parametrize("name", ["local-hapi.toml", "public-hapi.toml"])
def test_test_server_examples_pass_config_check(name: str, tmp_path: Path) -> None:
    # The examples keep their state under the repository's .peersync/; point it at tmp_path instead.
    env = {"PEERSYNC_SYNC__LEDGER": str(tmp_path / "ledger.sqlite"),
           "PEERSYNC_OUTPUT__REJECTS_DIR": str(tmp_path / "rejects")}
    if "metrics_file" in (EXAMPLES / name).read_text():
        env["PEERSYNC_OUTPUT__METRICS_FILE"] = str(tmp_path / "peersync.prom")
    report = config_check(EXAMPLES / name, env)
    assert report["exit_code"] == 0, [c for c in report["checks"] if c["status"] != "pass"]
    warnings = {c["name"] for c in report["checks"] if c["status"] == "warn"}
    assert warnings <= {"auth.mode"}  # only the public server's "no authentication" warning
    settings = tomllib.loads((EXAMPLES / name).read_text())
    assert (EXAMPLES / settings["source"]["inputs"][0]).resolve() == DEMO


def test_public_example_warns_about_real_data() -> None:
    text = (EXAMPLES / "public-hapi.toml").read_text()
    assert "https://hapi.fhir.org/baseR4" in text and "SYNTHETIC DATA ONLY" in text and "never real patients" in text


def test_production_example_passes_with_stub_secrets(tmp_path: Path) -> None:
    settings = tomllib.loads((EXAMPLES / "production-smart.toml").read_text())
    auth = settings["auth"]
    assert auth["mode"] == "smart-backend" and auth["private_key_file"].startswith("/run/secrets/")
    assert settings["sync"]["ledger"].startswith("/var/lib/peersync/")
    assert not {"private_key", "client_secret", "password", "token"} & set(auth)  # secrets only as files
    key, _jwks = generate_keypair("ES384", auth["kid"], tmp_path / "keys")
    exports = tmp_path / "exports"
    exports.mkdir()
    env = {"PEERSYNC_AUTH__PRIVATE_KEY_FILE": str(key), "PEERSYNC_SYNC__LEDGER": str(tmp_path / "state" / "l.sqlite"),
           "PEERSYNC_SOURCE__INPUTS": json.dumps([str(exports)]),
           "PEERSYNC_OUTPUT__REJECTS_DIR": str(tmp_path / "state" / "rejects")}
    report = config_check(EXAMPLES / "production-smart.toml", env)
    assert report["exit_code"] == 0, [c for c in report["checks"] if c["status"] != "pass"]
    assert {c["status"] for c in report["checks"]} == {"pass"}
    # Without the stub key the same file fails on exactly that, with a fix.
    del env["PEERSYNC_AUTH__PRIVATE_KEY_FILE"]
    if not Path(auth["private_key_file"]).exists():
        failed = [c for c in config_check(EXAMPLES / "production-smart.toml", env)["checks"] if c["status"] == "fail"]
        assert [c["name"] for c in failed] == ["auth.private_key_file"] and failed[0]["fix"]


# -- crontab -----------------------------------------------------------------------------------------------

_CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
_CRON_NAMES = [{}, {}, {}, {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())},
               {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}]


def cron_field_ok(field: str, index: int) -> bool:
    low, high = _CRON_RANGES[index]

    def value(token: str) -> int:
        token = token.lower()
        number = _CRON_NAMES[index].get(token, token)
        return int(number)

    for part in field.split(","):
        base, _, step = part.partition("/")
        if step and (not step.isdigit() or int(step) == 0):
            return False
        if base == "*":
            continue
        first, _, last = base.partition("-")
        try:
            lo, hi = value(first), value(last) if last else value(first)
        except ValueError:
            return False
        if not (low <= lo <= hi <= high):
            return False
    return True


def crontab_jobs(text: str) -> tuple[dict[str, str], list[tuple[list[str], str]]]:
    env: dict[str, str] = {}
    jobs = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if re.match(r"^[A-Za-z_][A-Za-z0-9_]*\s*=", stripped):
            name, _, value = stripped.partition("=")
            env[name.strip()] = value.strip()
            continue
        fields = stripped.split(None, 5)
        assert len(fields) == 6, f"not five time fields and a command: {line!r}"
        jobs.append((fields[:5], fields[5]))
    return env, jobs


def test_cron_field_validator() -> None:
    assert cron_field_ok("7,37", 0) and cron_field_ok("*/15", 0) and cron_field_ok("1-5", 4)
    assert cron_field_ok("mon-fri", 4) and cron_field_ok("*", 2)
    assert not cron_field_ok("60", 0) and not cron_field_ok("*/0", 0) and not cron_field_ok("x", 1)


def test_crontab_example() -> None:
    text = (EXAMPLES / "peersync.crontab").read_text()
    env, jobs = crontab_jobs(text)
    assert "@" in env["MAILTO"] and env["SHELL"] == "/bin/sh" and "/opt/peersync/bin" in env["PATH"]
    assert jobs and "%" not in text.replace("# ", "")  # % would be turned into a newline by cron
    assert "flock" not in "".join(cmd for _, cmd in jobs)  # peersync's own lock is enough
    for fields, command in jobs:
        assert all(cron_field_ok(f, i) for i, f in enumerate(fields)), fields
        first = command.split(";")[0].split("||")[0].split(">")[0]
        parse_peersync_args(shlex.split(first)[1:])
    _sync_fields, sync_command = next(job for job in jobs if " sync " in job[1])
    assert ">>/var/log/peersync/sync.log 2>&1" in sync_command
    assert "case $rc in 0|65|75) ;;" in sync_command  # mail only for the codes that need IT
    completed = subprocess.run(["sh", "-n", "-c", sync_command], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr


# -- systemd -----------------------------------------------------------------------------------------------


def read_unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",), comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string((EXAMPLES / name).read_text())
    return parser


def test_systemd_units_have_what_the_guide_promises() -> None:
    service, timer = read_unit("peersync.service"), read_unit("peersync.timer")
    s = service["Service"]
    assert s["Type"] == "oneshot" and "65" in s["SuccessExitStatus"].split()
    assert s["LoadCredential"].startswith("signing-key:") and s["Environment"].endswith("=%d/signing-key")
    assert s["StateDirectory"] == "peersync" and s["User"] == "peersync"
    for hardening in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
                      "RestrictAddressFamilies", "SystemCallFilter", "CapabilityBoundingSet"):
        assert hardening in s, hardening
    args = shlex.split(s["ExecStart"])
    assert args[0] == "/opt/peersync/bin/peersync"
    parse_peersync_args(args[1:])
    assert "network-online.target" in service["Unit"]["After"]
    t = timer["Timer"]
    assert t["Unit"] == "peersync.service" and t["Persistent"] == "true" and t["OnCalendar"]
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_systemd_analyze_verify_in_a_root_laid_out_like_a_real_install(tmp_path: Path) -> None:
    """verify with --root: ExecStart, credentials and units resolve inside a root with the install's paths.
    .ci/run installs systemd where it is missing, so this never runs without systemd-analyze."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: install systemd (apt-get install -y systemd), as .ci/run does"
    root = tmp_path / "root"
    # The system's own units (sysinit.target, timers.target...) as a real root has them.
    shutil.copytree("/usr/lib/systemd/system", root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    for name in ("peersync.service", "peersync.timer"):
        shutil.copy(EXAMPLES / name, units / name)
    # What the install steps in docs/operations.md create (the textfile-collector folder is optional: "-").
    executable = root / "opt" / "peersync" / "bin" / "peersync"
    executable.parent.mkdir(parents=True)
    shutil.copy(shutil.which("true") or "/bin/true", executable)
    key = root / "etc" / "peersync" / "keys" / "peersync-2026-11.private.pem"
    key.parent.mkdir(parents=True)
    key.write_text("stand-in\n", encoding="utf-8")
    (root / "etc" / "peersync" / "peersync.toml").write_text("", encoding="utf-8")
    completed = subprocess.run([analyze, "verify", f"--root={root}", str(units / "peersync.service"),
                                str(units / "peersync.timer")], capture_output=True, text=True, check=False)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0 and not output.strip(), output
    # Without the installed program the same check fails: the root is really where paths are resolved.
    executable.unlink()
    missing = subprocess.run([analyze, "verify", f"--root={root}", str(units / "peersync.service")],
                             capture_output=True, text=True, check=False)
    assert missing.returncode != 0 and "/opt/peersync/bin/peersync" in missing.stdout + missing.stderr
    calendar = subprocess.run([analyze, "calendar", read_unit("peersync.timer")["Timer"]["OnCalendar"]],
                              capture_output=True, text=True, check=False)
    assert calendar.returncode == 0, calendar.stderr


def test_systemd_examples_work_as_written() -> None:
    service, timer = read_unit("peersync.service"), read_unit("peersync.timer")
    assert service["Service"]["ReadWritePaths"].startswith("-/")  # no failure where the folder is missing
    operations = (EXAMPLES.parent / "operations.md").read_text()
    for unit in (service, timer):
        documentation = unit["Unit"]["Documentation"].split()[0]
        assert documentation == "file:///usr/share/doc/peersync/operations.md"
        assert "/usr/share/doc/peersync/operations.md" in operations  # the install steps put it there
    text = (EXAMPLES / "peersync.service").read_text()
    for secret in ("client_secret", "password", "token"):  # one credential line per auth mode
        assert f"LoadCredential=peersync_auth__{secret}:/etc/peersync/" in text


def test_crontab_uses_no_predictable_paths_in_tmp() -> None:
    _env, jobs = crontab_jobs((EXAMPLES / "peersync.crontab").read_text())
    assert jobs and not any("/tmp" in command for _fields, command in jobs)
