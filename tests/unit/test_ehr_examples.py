"""docs/examples/ehr-*.toml: one ready-made configuration per server of docs/ehr-compatibility.md, each loading
with the real config loader, each naming the write strategy docs/ehr-compatibility.md gives that server."""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.ops.config import load_settings

DOCS = Path(__file__).resolve().parents[2] / "docs"
EXAMPLES = DOCS / "examples"
SERVERS = ["athenahealth", "azure", "epic", "google", "hapi", "healthlake", "medplum", "oracle-health"]
STRATEGIES = {"transaction", "batch", "single", "update-as-create"}
def test_one_example_per_server() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("ehr-*.toml")) == [f"ehr-{s}.toml" for s in SERVERS]


@pytest.mark.parametrize("server", SERVERS)
def test_example_loads_with_the_config_loader(server: str) -> None:
    settings = load_settings(EXAMPLES / f"ehr-{server}.toml")
    assert settings.server.base_url.startswith("https://")
    assert str(settings.sync.ledger).startswith("/var/lib/peersync/")
    auth = settings.auth
    assert auth.password is auth.token is auth.client_secret is auth.private_key is None  # secrets only as files


@pytest.mark.parametrize("server", SERVERS)
def test_example_is_described_in_the_compatibility_doc(server: str) -> None:
    assert f"examples/ehr-{server}.toml" in (DOCS / "ehr-compatibility.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("server", SERVERS)
def test_example_names_the_strategy_of_the_doc_table(server: str) -> None:
    strategy = load_settings(EXAMPLES / f"ehr-{server}.toml").server.write_strategy
    assert strategy in STRATEGIES
    row = next(line for line in (DOCS / "ehr-compatibility.md").read_text(encoding="utf-8").splitlines()
               if line.startswith("|") and f"(examples/ehr-{server}.toml)" in line)
    assert f"`{strategy}`" in row, f"docs/ehr-compatibility.md gives {server} another strategy than the example"
