"""Every command's exit codes, as docs/exit-codes.md lists them: one table, each row a command, a situation
(a server answer through `responses`, a broken file, a held lock) and the code the operator's scheduler sees.

The server's answers are classified once (connector.server.client.Action) and turned into an exit code once
(connector.errors.ACTION_EXIT_CODES); these rows check that every command goes through that one place.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import responses
from click.testing import CliRunner, Result
from cliutil import DEMO, write_config
from filelock import FileLock

from connector.cli import main
from connector.errors import ACTION_EXIT_CODES, ExitCode, exit_code_for_action
from connector.ops.doctor import WRITTEN_TYPES
from connector.server.client import (
    STATUS_ACTIONS,
    Action,
    FhirHttpError,
    OutcomeSummary,
)

BASE = "https://ehr.example.org/fhir"
ANY = re.compile(re.escape(BASE) + r"(/.*)?(\?.*)?$")
OUTCOME = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing",
                                                          "diagnostics": "HAPI-0450: refused"}]}

pytestmark = pytest.mark.usefixtures("peersync_env")


# -- the one place: action -> exit code --------------------------------------------------------------------------


def test_every_action_has_an_exit_code() -> None:
    assert {str(a) for a in Action} == set(ACTION_EXIT_CODES)


@pytest.mark.parametrize(("status", "expected"), [
    (400, ExitCode.RECORDS_REJECTED), (404, ExitCode.RECORDS_REJECTED), (422, ExitCode.RECORDS_REJECTED),
    (412, ExitCode.RECORDS_REJECTED), (409, ExitCode.SERVER_UNAVAILABLE), (429, ExitCode.SERVER_UNAVAILABLE),
    (503, ExitCode.SERVER_UNAVAILABLE), (401, ExitCode.AUTH_FAILED), (403, ExitCode.AUTH_FAILED),
    (405, ExitCode.CONFIG_ERROR), (501, ExitCode.CONFIG_ERROR),
])
def test_an_http_error_carries_the_exit_code_of_its_action(status: int, expected: ExitCode) -> None:
    error = FhirHttpError("POST", "/", status, OutcomeSummary())
    assert error.exit_code == expected == exit_code_for_action(STATUS_ACTIONS[status])


# -- every command ---------------------------------------------------------------------------------------------


def config(tmp_path: Path, *, extra: str = "") -> Path:
    return write_config(tmp_path, base_url=BASE, sync="retry_attempts = 0", extra=extra)


def _capability(transaction: bool = True) -> dict[str, Any]:
    resources = [{"type": t, "conditionalUpdate": True, "searchParam": [{"name": "identifier"}],
                  "interaction": [{"code": c} for c in ("read", "update", "create", "search-type")]}
                 for t in ("Patient", *WRITTEN_TYPES)]
    rest = {"mode": "server", "resource": resources,
            "interaction": [{"code": "transaction" if transaction else "batch"}]}
    return {"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1", "rest": [rest]}


def _transaction_response(request: Any) -> tuple[int, dict[str, str], str]:
    """A server that accepts every entry of a transaction (201, with a location)."""
    bundle = json.loads(request.body)
    entries = []
    for number, entry in enumerate(bundle.get("entry", []), start=1):
        resource_type = entry["request"]["url"].split("?")[0].split("/")[0]
        entries.append({"response": {"status": "201 Created", "location": f"{resource_type}/{number}/_history/1"}})
    return 200, {}, json.dumps({"resourceType": "Bundle", "type": "transaction-response", "entry": entries})


def _searchset(_request: Any) -> tuple[int, dict[str, str], str]:
    return 200, {}, json.dumps({"resourceType": "Bundle", "type": "searchset", "total": 0, "entry": []})


Server = Callable[[responses.RequestsMock], None]


def answers(status: int, body: Any = OUTCOME) -> Server:
    """Every request answered with ``status``."""
    def install(rsps: responses.RequestsMock) -> None:
        for method in (responses.GET, responses.POST, responses.PUT):
            rsps.add(method, ANY, status=status, json=body)
    return install


def unreachable(rsps: responses.RequestsMock) -> None:
    for method in (responses.GET, responses.POST, responses.PUT):
        rsps.add(method, ANY, body=requests.exceptions.ConnectionError("down"))


def healthy(rsps: responses.RequestsMock, *, transaction: int | None = None) -> None:
    rsps.add(responses.GET, f"{BASE}/metadata", json=_capability())
    if transaction is None:
        rsps.add_callback(responses.POST, re.compile(re.escape(BASE) + "/?$"), callback=_transaction_response)
    else:
        rsps.add(responses.POST, re.compile(re.escape(BASE) + "/?$"), status=transaction, json=OUTCOME)
    rsps.add_callback(responses.GET, ANY, callback=_searchset)


def refuses_transactions(status: int) -> Server:
    return lambda rsps: healthy(rsps, transaction=status)


def no_transaction_support(rsps: responses.RequestsMock) -> None:
    rsps.add(responses.GET, f"{BASE}/metadata", json=_capability(transaction=False))
    rsps.add_callback(responses.GET, ANY, callback=_searchset)


# Situations that need files rather than a server answer.
def ledger_folder_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("not a folder", encoding="utf-8")


def corrupt_ledger(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "ledger.sqlite").write_bytes(b"this is not an SQLite file" * 100)


def missing_config(tmp_path: Path) -> None:
    (tmp_path / "peersync.toml").unlink()


def out_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("a file where a folder should be", encoding="utf-8")


@dataclass
class Case:
    name: str
    args: list[str]
    expected: ExitCode
    server: Server | None = None
    setup: Callable[[Path], None] | None = None
    says: str = ""  # a phrase the message must contain (the fix)
    extra_config: str = ""
    env: dict[str, str] = field(default_factory=dict)


C = "--config"
CFG = "{cfg}"
PROFILE = ["--profile", "peersync-template", str(DEMO)]

CASES = [
    # check / map (offline)
    Case("check: rejected rows", ["check", *PROFILE], ExitCode.RECORDS_REJECTED),
    Case("check: unknown profile", ["check", "--profile", "no-such-profile", str(DEMO)], ExitCode.CONFIG_ERROR),
    Case("check: rejects folder under a file", ["check", *PROFILE, "--rejects-dir", "{tmp}/out/r"],
         ExitCode.CONFIG_ERROR,
         setup=out_is_a_file, says="check the path"),
    Case("map: rejected rows", ["map", *PROFILE, "--out", "{tmp}/out", "-q"], ExitCode.RECORDS_REJECTED),
    Case("map: unknown profile", ["map", "--profile", "nope", str(DEMO), "--out", "{tmp}/out"], ExitCode.CONFIG_ERROR),
    Case("map: out under a file", ["map", *PROFILE, "--out", "{tmp}/out/m", "-q"], ExitCode.CONFIG_ERROR,
         setup=out_is_a_file),
    # plan (inputs + ledger, no server)
    Case("plan: rows the sync would reject", ["plan", C, CFG], ExitCode.RECORDS_REJECTED),
    Case("plan: ledger folder is a file", ["plan", C, CFG], ExitCode.CONFIG_ERROR, setup=ledger_folder_is_a_file,
         says="is a file, not a folder"),
    Case("plan: corrupt ledger", ["plan", C, CFG], ExitCode.CONFIG_ERROR, setup=corrupt_ledger, says="move it aside"),
    Case("plan: no config file", ["plan", C, CFG], ExitCode.CONFIG_ERROR, setup=missing_config),
    # sync
    Case("sync: landed, some rows rejected", ["sync", C, CFG], ExitCode.RECORDS_REJECTED, server=healthy),
    Case("sync: server unreachable", ["sync", C, CFG], ExitCode.SERVER_UNAVAILABLE, server=unreachable),
    Case("sync: server answers 503", ["sync", C, CFG], ExitCode.SERVER_UNAVAILABLE, server=answers(503)),
    Case("sync: server answers 401", ["sync", C, CFG], ExitCode.AUTH_FAILED, server=answers(401)),
    Case("sync: transactions refused with 405", ["sync", C, CFG], ExitCode.CONFIG_ERROR,
         server=refuses_transactions(405)),
    Case("sync: transactions refused with 422", ["sync", C, CFG], ExitCode.RECORDS_REJECTED,
         server=refuses_transactions(422)),
    Case("sync: ledger folder is a file", ["sync", C, CFG], ExitCode.CONFIG_ERROR, setup=ledger_folder_is_a_file,
         says="is a file, not a folder"),
    Case("sync: no config file", ["sync", C, CFG], ExitCode.CONFIG_ERROR, setup=missing_config),
    # status / review (ledger only)
    Case("status: no ledger yet", ["status", C, CFG], ExitCode.OK),
    Case("status: corrupt ledger", ["status", C, CFG], ExitCode.CONFIG_ERROR, setup=corrupt_ledger),
    Case("review list: empty", ["review", "list", C, CFG], ExitCode.OK),
    Case("review list: corrupt ledger", ["review", "list", C, CFG], ExitCode.CONFIG_ERROR, setup=corrupt_ledger),
    Case("review retry: no such entry", ["review", "retry", C, CFG, "7"], ExitCode.USAGE),
    # landed (searches)
    Case("landed: ok", ["landed", C, CFG], ExitCode.OK, server=healthy),
    Case("landed: search refused with 400", ["landed", C, CFG], ExitCode.RECORDS_REJECTED, server=answers(400),
         says="HTTP 400"),
    Case("landed: 501", ["landed", C, CFG], ExitCode.CONFIG_ERROR, server=answers(501)),
    Case("landed: 403", ["landed", C, CFG], ExitCode.AUTH_FAILED, server=answers(403)),
    Case("landed: unreachable", ["landed", C, CFG], ExitCode.SERVER_UNAVAILABLE, server=unreachable),
    # terminology publish (one transaction)
    Case("terminology publish: ok", ["terminology", "publish", C, CFG], ExitCode.OK, server=healthy),
    Case("terminology publish: 422", ["terminology", "publish", C, CFG], ExitCode.RECORDS_REJECTED,
         server=answers(422), says="HTTP 422"),
    Case("terminology publish: 405", ["terminology", "publish", C, CFG], ExitCode.CONFIG_ERROR, server=answers(405)),
    Case("terminology publish: 501", ["terminology", "publish", C, CFG], ExitCode.CONFIG_ERROR, server=answers(501)),
    Case("terminology publish: 503", ["terminology", "publish", C, CFG], ExitCode.SERVER_UNAVAILABLE,
         server=answers(503)),
    Case("terminology publish: 401", ["terminology", "publish", C, CFG], ExitCode.AUTH_FAILED, server=answers(401)),
    # doctor / config check / auth test
    Case("doctor: ok", ["doctor", C, CFG], ExitCode.OK, server=healthy),
    Case("doctor: batch only", ["doctor", C, CFG], ExitCode.OK, server=no_transaction_support),
    Case("doctor: transaction forced, batch only", ["doctor", C, CFG], ExitCode.CONFIG_ERROR,
         server=no_transaction_support, env={"PEERSYNC_SERVER__WRITE_STRATEGY": "transaction"}),
    Case("doctor: unreachable", ["doctor", C, CFG], ExitCode.SERVER_UNAVAILABLE, server=unreachable),
    Case("config check: ok", ["config", "check", CFG], ExitCode.OK),
    Case("config check: --config", ["config", "check", C, CFG], ExitCode.OK),
    Case("config check: bad value", ["config", "check", CFG], ExitCode.CONFIG_ERROR,
         extra_config="concurrency = 'lots'"),
    Case("config check: no file given", ["config", "check"], ExitCode.USAGE),
    Case("auth test: ok", ["auth", "test", C, CFG], ExitCode.OK, server=healthy),
    Case("auth test: 401", ["auth", "test", C, CFG], ExitCode.AUTH_FAILED, server=answers(401)),
    Case("auth test: unreachable", ["auth", "test", C, CFG], ExitCode.SERVER_UNAVAILABLE, server=unreachable),
    # keys generate / profile check
    Case("keys generate: ok", ["keys", "generate", "--kid", "k1", "--out", "{tmp}/keys"], ExitCode.OK),
    Case("keys generate: out under a file", ["keys", "generate", "--kid", "k1", "--out", "{tmp}/out/k"],
         ExitCode.CONFIG_ERROR, setup=out_is_a_file),
    Case("profile check: ok", ["profile", "check", "peersync-template"], ExitCode.OK),
    Case("profile check: unknown", ["profile", "check", "no-such-profile"], ExitCode.CONFIG_ERROR),
]


def _run(case: Case, tmp_path: Path) -> Result:
    cfg = config(tmp_path, extra=case.extra_config)
    if case.setup:
        case.setup(tmp_path)
    args = [a.replace("{cfg}", str(cfg)).replace("{tmp}", str(tmp_path)) for a in case.args]
    runner = CliRunner()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        if case.server:
            case.server(rsps)
        return runner.invoke(main, args, env=case.env, catch_exceptions=False, prog_name="peersync")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_exit_code(case: Case, tmp_path: Path) -> None:
    result = _run(case, tmp_path)
    assert result.exit_code == case.expected, result.output
    assert "a bug" not in result.output
    if case.says:
        assert case.says in result.output


def test_the_table_covers_every_command_the_issue_names() -> None:
    assert {c.name.split(":")[0] for c in CASES} >= {
        "check", "map", "plan", "sync", "status", "review list", "review retry", "landed", "terminology publish",
        "doctor", "config check", "auth test", "keys generate", "profile check"}


def test_sync_while_another_run_holds_the_lock_exits_75(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    (tmp_path / "state").mkdir()
    lock = FileLock(str(tmp_path / "state" / "ledger.sqlite.lock"), timeout=0)
    with lock, responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        healthy(rsps)
        result = CliRunner().invoke(main, ["sync", "--config", str(cfg)], catch_exceptions=False)
    assert result.exit_code == ExitCode.LOCK_HELD
