"""Unit-test options: ``--update-golden`` rewrites tests/golden/expected/ from the current mappers."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from connector.ops.logs import reset_logging


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite tests/golden/expected/*.json from the mappers instead of comparing (review the diff!)",
    )


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    """True when the run was started with --update-golden."""
    return bool(request.config.getoption("--update-golden", default=False))


@pytest.fixture
def peersync_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No PEERSYNC_* variables from the developer's shell and no real secrets directory; logging reset after
    the test (the CLI installs a handler on a CliRunner stream that is closed once the test ends)."""
    for name in list(os.environ):
        if name.upper().startswith("PEERSYNC_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)
    monkeypatch.setenv("PEERSYNC_SECRETS_DIR", "")
    yield
    reset_logging()
