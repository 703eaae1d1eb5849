"""The CLI surface: --help on every command, config check, doctor, keys, auth test, profile, check, map,
terminology, and how errors and exit codes come out (text and JSON log formats)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import responses
from click.testing import CliRunner, Result

from connector.cli import main
from connector.errors import ExitCode
from connector.ops.doctor import WRITTEN_TYPES

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "fixtures" / "demo" / "template"
BASE = "https://ehr.example.org/fhir"


pytestmark = pytest.mark.usefixtures("peersync_env")


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    # click >= 8.2 keeps stderr apart from stdout (result.stdout / result.stderr); logs go to stderr.
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False, prog_name="peersync")


def write_config(tmp_path: Path, *, base_url: str = "http://127.0.0.1:8089/fhir", auth: str = 'mode = "none"',
                 extra: str = "") -> Path:
    path = tmp_path / "peersync.toml"
    path.write_text(f"""
[source]
profile = "peersync-template"
inputs = ["{DEMO}"]
[server]
base_url = "{base_url}"
[auth]
{auth}
[sync]
ledger = "state/ledger.sqlite"
{extra}
""", encoding="utf-8")
    return path


# -- help for every command ----------------------------------------------------------------------------


def _walk(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from _walk(command, (*prefix, name))


COMMANDS = list(_walk(main))


def test_the_command_tree_is_what_the_docs_promise() -> None:
    names = {" ".join(c) for c in COMMANDS}
    assert {"check", "profile check", "map", "sync", "plan", "status", "landed", "review list", "review retry",
            "review dismiss", "terminology publish", "config check", "doctor", "keys generate",
            "auth test"} <= names


@pytest.mark.parametrize("command", [(), *COMMANDS], ids=lambda c: " ".join(c) or "peersync")
def test_help(command: tuple[str, ...]) -> None:
    result = run(*command, "--help")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage: ") and " ".join(("peersync", *command)) in result.stdout.splitlines()[0]
    assert run(*command, "-h").exit_code == 0


def test_version_and_usage_errors() -> None:
    assert run("--version").stdout.startswith("peersync, version ")
    assert run("no-such-command").exit_code == ExitCode.USAGE
    assert run("sync", "--no-such-option").exit_code == ExitCode.USAGE
    assert run("config", "check").exit_code == ExitCode.USAGE  # FILE is required


def test_commands_with_logging_options_accept_them() -> None:
    for command in COMMANDS:
        cmd: click.Command = main
        for part in command:
            cmd = cmd.commands[part]  # type: ignore[attr-defined]
        if isinstance(cmd, click.Group) or command == ("profile", "check"):
            continue
        options = {opt for param in cmd.params for opt in getattr(param, "opts", [])}
        assert {"--log-format", "--verbose", "--quiet"} <= options, command


# -- config check ----------------------------------------------------------------------------------------


def test_config_check_ok(tmp_path: Path) -> None:
    result = run("config", "check", str(write_config(tmp_path)))
    assert result.exit_code == 0, result.output
    assert "PASS    source.profile" in result.stdout and "0 failed" in result.stdout


def test_config_check_reads_peersync_config(tmp_path: Path) -> None:
    result = run("config", "check", env={"PEERSYNC_CONFIG": str(write_config(tmp_path))})
    assert result.exit_code == 0


@pytest.mark.parametrize(("change", "expected"), [
    (("[sync]", "[sync]\ncolour = 'blue'"), "sync.colour"),
    (("[sync]", "[sync]\nconcurrency = 'lots'"), "Input should be a valid integer"),
    (('base_url = "http://127.0.0.1:8089/fhir"', ""), "server.base_url"),
    (("127.0.0.1:8089", "ehr.example.org"), "refusing plain http://"),
    (('mode = "none"', 'mode = "bearer"\ntoken_file = "/nonexistent/token"'), "does not exist"),
    (('"peersync-template"', '"nope-profile"'), "profile not found"),
])
def test_config_check_broken_files(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace(*change), encoding="utf-8")
    result = run("config", "check", str(path))
    assert result.exit_code == ExitCode.CONFIG_ERROR, result.output
    assert expected in result.stdout and "fix: " in result.stdout and "FAIL" in result.stdout


def test_config_check_json(tmp_path: Path) -> None:
    path = write_config(tmp_path, base_url="http://ehr.example.org/fhir")
    result = run("config", "check", "--json", str(path))
    data = json.loads(result.stdout)
    assert result.exit_code == 78 and data["exit_code"] == 78 and data["ok"] is False
    failed = [c for c in data["checks"] if c["status"] == "fail"]
    assert failed[0]["name"] == "server.base_url" and failed[0]["fix"]


def test_config_check_missing_file(tmp_path: Path) -> None:
    result = run("config", "check", str(tmp_path / "nope.toml"))
    assert result.exit_code == 78 and "config file not found" in result.stdout


# -- doctor ----------------------------------------------------------------------------------------------


def _capability(transaction: bool = True) -> dict:
    resources = [{"type": t, "conditionalUpdate": True, "searchParam": [{"name": "identifier"}],
                  "interaction": [{"code": c} for c in ("read", "update", "create", "search-type")]}
                 for t in ("Patient", *WRITTEN_TYPES)]
    rest = {"mode": "server", "resource": resources,
            "interaction": [{"code": "transaction" if transaction else "batch"}]}
    return {"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1", "rest": [rest]}


@pytest.mark.parametrize("transaction", [True, False])
def test_doctor_table_json_and_exit_code(tmp_path: Path, transaction: bool) -> None:
    path = write_config(tmp_path, base_url=BASE)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add(responses.GET, f"{BASE}/metadata", json=_capability(transaction))
        rsps.add(responses.GET, f"{BASE}/Patient", json={"resourceType": "Bundle", "type": "searchset"})
        text = run("doctor", "--config", str(path))
        as_json = run("doctor", "--config", str(path), "--json", "--timeout", "5")
    expected = 0  # a batch-only server is written in batches
    assert text.exit_code == expected and as_json.exit_code == expected
    assert "STATUS  CHECK" in text.stdout and "PASS    server.transaction" in text.stdout
    strategy = "transaction" if transaction else "batch"
    assert re.search(rf"PASS +server\.write_strategy +{strategy}: auto:", text.stdout)
    data = json.loads(as_json.stdout)
    assert data["exit_code"] == expected and {c["name"] for c in data["checks"]} >= {"server.reachable", "auth"}


def test_doctor_unreachable_exits_69(tmp_path: Path) -> None:
    import requests

    path = write_config(tmp_path, base_url=BASE)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add(responses.GET, f"{BASE}/metadata", body=requests.exceptions.ConnectionError("down"))
        result = run("doctor", "--config", str(path))
    assert result.exit_code == ExitCode.SERVER_UNAVAILABLE and "cannot reach" in result.stdout


# -- keys, auth --------------------------------------------------------------------------------------------


def test_keys_generate(tmp_path: Path) -> None:
    result = run("keys", "generate", "--kid", "peersync-test-1", "--out", str(tmp_path / "keys"))
    assert result.exit_code == 0, result.output
    key = tmp_path / "keys" / "peersync-test-1.private.pem"
    assert key.is_file() and (key.stat().st_mode & 0o777) == 0o600
    jwks = json.loads((tmp_path / "keys" / "peersync-test-1.jwks.json").read_text())
    assert jwks["keys"][0]["alg"] == "ES384" and "d" not in jwks["keys"][0]
    assert "BEGIN" not in result.stdout  # the key itself is never printed
    again = run("keys", "generate", "--kid", "peersync-test-1", "--out", str(tmp_path / "keys"))
    assert again.exit_code == 78 and "refusing to overwrite" in again.stderr
    assert run("keys", "generate", "--kid", "peersync-test-1", "--out", str(tmp_path / "keys"), "--force",
               "--alg", "RS384").exit_code == 0


def test_auth_test(tmp_path: Path) -> None:
    path = write_config(tmp_path, base_url=BASE)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add(responses.GET, f"{BASE}/metadata", json=_capability())
        result = run("auth", "test", "--config", str(path))
        as_json = run("auth", "test", "--config", str(path), "--json")
    assert result.exit_code == 0 and "auth mode none: ok" in result.stdout and "FHIR 4.0.1" in result.stdout
    assert json.loads(as_json.stdout)["server"]["fhir_version"] == "4.0.1"


def test_auth_test_failure_is_77(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("static-token-abc", encoding="utf-8")
    path = write_config(tmp_path, base_url=BASE, auth=f'mode = "bearer"\ntoken_file = "{token}"')
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add(responses.GET, f"{BASE}/metadata", status=401)
        result = run("auth", "test", "--config", str(path))
    assert result.exit_code == ExitCode.AUTH_FAILED and "static-token-abc" not in result.output


# -- profile, check, map, terminology -----------------------------------------------------------------------


def test_profile_check() -> None:
    assert run("profile", "check", "peersync-template").exit_code == 0
    assert run("profile", "check", "no-such-profile").exit_code == 78


def test_check_and_map_on_the_demo(tmp_path: Path) -> None:
    result = run("check", "--profile", "peersync-template", str(DEMO), "--json", "--rejects-dir", str(tmp_path / "r"))
    assert result.exit_code == ExitCode.RECORDS_REJECTED and json.loads(result.stdout)["total"]["rejected"] == 8
    result = run("map", "--profile", "peersync-template", str(DEMO), "--out", str(tmp_path / "out"), "--json", "-q")
    assert result.exit_code == 65 and json.loads(result.stdout)["bundles"] > 0


def test_terminology_publish_dry_run(tmp_path: Path) -> None:
    result = run("terminology", "publish", "--config", str(write_config(tmp_path)), "--dry-run")
    assert result.exit_code == 0 and json.loads(result.stdout)["type"] == "transaction"
    resources = [e["resource"] for e in json.loads(result.stdout)["entry"]]
    assert {r["id"] for r in resources} >= {"adces7-behavior", "peer-support-activity", "contact-duration"}
    assert all(r["url"].startswith("https://peersync.github.io/fhir/") and r["version"] == "2.1.0" for r in resources)


def test_terminology_publish_ignores_a_deprecated_terminology_base(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    path.write_text(path.read_text() + '\n[program]\nterminology_base = "https://fhir.example.org/ps"\n')
    result = run("terminology", "publish", "--config", str(path), "--dry-run")
    assert result.exit_code == 0 and "fhir.example.org" not in result.stdout


# -- errors ----------------------------------------------------------------------------------------------


def test_config_error_in_text_and_json(tmp_path: Path) -> None:
    path = write_config(tmp_path, base_url="http://ehr.example.org/fhir")
    text = run("landed", "--config", str(path))
    assert text.exit_code == 78 and text.stderr.startswith("error: refusing plain http://")
    result = run("sync", "--config", str(tmp_path / "missing.toml"), "--log-format", "json")
    assert result.exit_code == 78
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert lines[-1]["level"] == "error" and lines[-1]["exit_code"] == 78 and lines[-1]["run_id"] != "-"
    assert "config file not found" in lines[-1]["message"]


def test_unexpected_errors_exit_1_without_the_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import connector.wiring

    def boom(settings: object) -> None:
        raise KeyError("MRN8841207")  # a message that could carry a value

    monkeypatch.setattr(connector.wiring, "sync_options", boom)
    path = write_config(tmp_path)
    result = run("plan", "--config", str(path))
    assert result.exit_code == ExitCode.UNEXPECTED
    assert "unexpected KeyError at test_cli.py:" in result.stderr and "MRN8841207" not in result.output
    assert "Traceback" not in result.output
    verbose = run("plan", "--config", str(path), "-v", "--log-format", "json")
    assert verbose.exit_code == 1 and "MRN8841207" not in verbose.output
    lines = [json.loads(line) for line in verbose.stderr.splitlines()]  # every line stays JSON
    assert lines[-1]["error_type"] == "KeyError" and any("test_cli.py:" in f for f in lines[-1]["frames"])
    text = run("plan", "--config", str(path), "-v")
    assert "test_cli.py:" in text.stderr and "in boom" in text.stderr and "MRN8841207" not in text.output
    with pytest.raises(KeyError):
        CliRunner().invoke(main, ["plan", "--config", str(path)], env={"PEERSYNC_DEBUG": "1"},
                           catch_exceptions=False)
