"""Configuration: TOML + PEERSYNC_* overrides, secrets directories, problems located and explained."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from connector.errors import ConfigError
from connector.ops.config import (
    Settings,
    config_problems,
    find_secret_files,
    load_settings,
    locate,
    secret_dirs,
    unknown_env_settings,
)

MINIMAL = """\
[source]
profile = "peersync-template"
inputs = ["exports"]

[server]
base_url = "https://ehr.example.org/fhir/r4/"
"""


pytestmark = pytest.mark.usefixtures("peersync_env")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "peersync.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_minimal_file_loads_with_defaults_and_resolved_paths(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL))
    assert settings.server.base_url == "https://ehr.example.org/fhir/r4"  # trailing slash dropped
    assert settings.source.inputs == [tmp_path / "exports"]
    assert settings.sync.ledger == tmp_path / ".peersync" / "ledger.sqlite"
    assert settings.auth.mode == "none" and settings.sync.concurrency == 4
    assert settings.rejects_dir() == tmp_path / ".peersync" / "rejects"


def test_environment_beats_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEERSYNC_SERVER__BASE_URL", "https://other.example.org/fhir")
    monkeypatch.setenv("PEERSYNC_SYNC__CONCURRENCY", "2")
    monkeypatch.setenv("PEERSYNC_SOURCE__INPUTS", '["a", "b"]')
    settings = load_settings(write(tmp_path, MINIMAL))
    assert settings.server.base_url == "https://other.example.org/fhir"
    assert settings.sync.concurrency == 2
    assert settings.source.inputs == [tmp_path / "a", tmp_path / "b"]


def test_auth_secret_file_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    text = MINIMAL + '[auth]\nmode = "bearer"\ntoken_file = "secrets/token"\n'
    settings = load_settings(write(tmp_path, text))
    assert settings.auth.token_file == tmp_path / "secrets" / "token"


def test_secrets_directory_supplies_settings_named_like_variables(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "peersync_auth__client_secret").write_text("s3cr3t-value\n", encoding="utf-8")
    (secrets / "PEERSYNC_AUTH__CLIENT_ID").write_text("client-7", encoding="utf-8")  # any case
    (secrets / "unrelated-token").write_text("not ours", encoding="utf-8")
    (secrets / "kubernetes.io").mkdir()  # other services' secrets are never opened
    monkeypatch.setenv("PEERSYNC_SECRETS_DIR", str(secrets))
    text = MINIMAL + '[auth]\nmode = "client-credentials"\ntoken_url = "https://ehr.example.org/token"\n'
    settings = load_settings(write(tmp_path, text))
    assert settings.auth.client_secret is not None
    assert settings.auth.client_secret.get_secret_value() == "s3cr3t-value"  # trailing newline dropped
    assert settings.auth.client_id == "client-7"
    assert {(s.section, s.key) for s in find_secret_files()} == {("auth", "client_secret"), ("auth", "client_id")}


def test_file_and_environment_beat_the_secrets_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "peersync_sync__concurrency").write_text("8", encoding="utf-8")
    (secrets / "peersync_server__timeout_seconds").write_text("5", encoding="utf-8")
    monkeypatch.setenv("PEERSYNC_SECRETS_DIR", str(secrets))
    monkeypatch.setenv("PEERSYNC_SYNC__CONCURRENCY", "3")
    settings = load_settings(write(tmp_path, MINIMAL.replace("[server]\n", "[server]\ntimeout_seconds = 9\n")))
    assert settings.sync.concurrency == 3
    assert settings.server.timeout_seconds == 9


def test_secret_dirs_defaults_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PEERSYNC_SECRETS_DIR")
    assert secret_dirs({}) == [Path("/run/secrets")]
    assert secret_dirs({"CREDENTIALS_DIRECTORY": "/run/credentials/peersync.service"}) == [
        Path("/run/credentials/peersync.service"), Path("/run/secrets")]
    assert secret_dirs({"PEERSYNC_SECRETS_DIR": "/a:/b", "CREDENTIALS_DIRECTORY": "/c"}) == [Path("/a"), Path("/b")]
    assert secret_dirs({"PEERSYNC_SECRETS_DIR": ""}) == []


def test_systemd_credentials_directory_is_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PEERSYNC_SECRETS_DIR")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    (tmp_path / "peersync_auth__token").write_text("tok-123456", encoding="utf-8")
    settings = load_settings(write(tmp_path, MINIMAL + '[auth]\nmode = "bearer"\n'))
    assert settings.auth.token is not None and settings.auth.token.get_secret_value() == "tok-123456"


def test_problems_name_line_fix_and_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = """\
[source]
profile = "peersync-template"
inputs = "exports"
colour = "blue"

[server]
timeout_seconds = "fast"

[sink]
x = 1
"""
    path = write(tmp_path, text)
    monkeypatch.setenv("PEERSYNC_SYNC__CONCURRENCY", "many")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert f"{path}: 6 problem(s)" in message
    assert f"{path}:3: source.inputs: Input should be a valid list" in message
    assert 'inputs = ["exports/"]' in message
    assert f"{path}:4: source.colour: unknown setting" in message
    assert f"{path}:6: server.base_url: Field required; fix: add `base_url = ...` under [server]" in message
    assert "PEERSYNC_SERVER__BASE_URL" in message
    assert f"{path}:7: server.timeout_seconds" in message
    assert f"{path}:9: sink: unknown section" in message and "known sections: source, program" in message
    assert "environment variable PEERSYNC_SYNC__CONCURRENCY: sync.concurrency" in message


def test_misspelt_key_gets_a_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("base_url", "base_ur1"))
    with pytest.raises(ValidationError) as info:
        Settings(**__import__("tomllib").loads(path.read_text()))
    problems = config_problems(info.value, path, {})
    unknown = next(p for p in problems if p.key == "server.base_ur1")
    assert "did you mean 'base_url'" in unknown.fix


def test_missing_section_and_auth_mode_problems(tmp_path: Path) -> None:
    path = write(tmp_path, '[source]\nprofile = "x"\ninputs = []\n[auth]\nmode = "basic"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert "server: Field required; fix: add a [server] section with base_url = ..." in message
    assert "auth: auth mode 'basic' needs auth.username" in message
    assert "docs/authentication.md" in message


def test_secret_values_never_appear_in_problems(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + '[auth]\nmode = "basic"\npassword = "hunter2-secret"\nusername = "a:b"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "hunter2-secret" not in str(info.value)


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\nbase_url = 1\n")
    with pytest.raises(ConfigError, match=r"not valid TOML: .*line 1"):
        load_settings(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.toml")


def test_program_overrides_follow_the_profile_rules(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"program.id: String should match pattern"):
        load_settings(write(tmp_path, MINIMAL + '[program]\nid = "Has Spaces"\n'))
    with pytest.raises(ConfigError, match=r"program.base_url"):
        load_settings(write(tmp_path, MINIMAL + '[program]\nbase_url = "https://example.org/"\n'))


def test_unknown_environment_variables_are_found() -> None:
    env = {"PEERSYNC_SERVER__BASE_URL": "x", "PEERSYNC_SERVERX__A": "1", "PEERSYNC_KEEP_SERVER": "1",
           "PEERSYNC_SYNC__NOPE": "1", "PEERSYNC_CONFIG": "f", "PEERSYNC_LOG_FORMAT": "json", "HOME": "/root",
           "PEERSYNC_SERVER_BASE_URL": "one underscore", "PEERSYNC_FHIR_PORT": "8089"}
    assert unknown_env_settings(env) == ["PEERSYNC_SERVERX__A", "PEERSYNC_SERVER_BASE_URL", "PEERSYNC_SYNC__NOPE"]


def test_locate_finds_sections_and_keys() -> None:
    text = "# c\n[source]\nprofile = 'x'\n\n[server]\n  base_url = 'y'\n[auth]\n"
    assert locate(text, "server") == 5
    assert locate(text, "server", "base_url") == 6
    assert locate(text, "auth", "mode") is None
    assert locate(None, "server") is None


@pytest.mark.parametrize(("setting", "expected"), [(None, "requested"), ('"draft"', "draft")])
def test_server_referral_tasks_reaches_the_mapping_context_and_the_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        setting: str | None, expected: str) -> None:
    """[server] referral_tasks, from the file or the environment, is what the referral mapper sees."""
    from datetime import date

    from connector.map import map_referral
    from connector.model import Enrollment, Referral
    from connector.wiring import mapping_context

    text = MINIMAL if setting is None else MINIMAL.replace("[server]\n", f"[server]\nreferral_tasks = {setting}\n")
    ctx = mapping_context(load_settings(write(tmp_path, text)))
    assert ctx.referral_tasks == expected
    made = Referral(referral_id="R1", enrollment_id="E1", resource_name="Food bank", need="food",
                    referred_on=date(2025, 2, 1))
    enrollment = Enrollment(enrollment_id="E1", mrn="M1", start_date=date(2025, 1, 6), supporter_id="S1")
    assert map_referral(made, enrollment, ctx)[1]["status"] == expected
    monkeypatch.setenv("PEERSYNC_SERVER__REFERRAL_TASKS", "draft")
    assert mapping_context(load_settings(write(tmp_path, MINIMAL))).referral_tasks == "draft"
    monkeypatch.setenv("PEERSYNC_SERVER__REFERRAL_TASKS", "sometimes")
    with pytest.raises(ConfigError, match="referral_tasks"):
        load_settings(write(tmp_path, MINIMAL))
