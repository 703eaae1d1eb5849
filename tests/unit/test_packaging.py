"""The wheel's contents as pyproject.toml declares them, and the shipped data as connector.assets finds it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from connector import assets
from connector.assets import AssetProblem, check_runtime_assets
from connector.map import codes

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_every_package_under_connector_is_listed_for_the_wheel() -> None:
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "connector").rglob("__init__.py")}
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert listed == found | {"connector._assets"}


def test_the_shipped_data_is_the_top_level_mappings_folder() -> None:
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"connector._assets": "mappings"}
    assert assets.shipped_mappings_dir().resolve() == (REPO / "mappings").resolve()
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["connector._assets"]
    shipped = {p for pattern in patterns for p in (REPO / "mappings").glob(pattern)}
    tracked = {p for p in (REPO / "mappings").rglob("*") if p.is_file() and "__pycache__" not in p.parts
               and p.name != "__init__.py"}
    assert tracked <= shipped, f"files in mappings/ the wheel would leave out: {sorted(tracked - shipped)}"


def test_mappings_dir_follows_the_environment(peersync_env: None, monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    assert assets.mappings_dir() == assets.shipped_mappings_dir()
    monkeypatch.setenv(assets.MAPPINGS_ENV, str(tmp_path))
    assert assets.mappings_dir() == tmp_path
    assert assets.terminology_dir() == tmp_path / "terminology"
    # US Core is HL7's, not a program's: always the shipped copy
    assert assets.us_core_dir() == assets.shipped_mappings_dir() / "fhir" / "us-core-6.1.0"


def test_us_core_resources_ship_with_their_license_note() -> None:
    folder = assets.us_core_dir()
    files = sorted(p.name for p in folder.glob("*.json"))
    assert len(files) == 38
    assert "StructureDefinition-us-core-goal.json" in files
    assert "CC0-1.0" in (folder / "README.md").read_text(encoding="utf-8")


def test_the_shipped_terminology_defines_every_source_code() -> None:
    assert codes.undefined_codes() == []
    assert check_runtime_assets() == []


def test_a_missing_terminology_is_a_runtime_asset_problem(peersync_env: None, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    from connector.map import terminology

    monkeypatch.setenv(assets.MAPPINGS_ENV, str(tmp_path))
    terminology._concepts.cache_clear()
    try:
        (problem,) = check_runtime_assets()
    finally:
        terminology._concepts.cache_clear()
    assert isinstance(problem, AssetProblem) and problem.what == "terminology"
    assert "terminology folder not found" in problem.message and assets.MAPPINGS_ENV in problem.fix


def test_config_check_fails_where_sync_would_without_terminology(peersync_env: None, monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    from connector.map import terminology
    from connector.ops.doctor import Status, check_config

    (tmp_path / "in").mkdir()
    config = tmp_path / "peersync.toml"
    config.write_text(f'''
[source]
profile = "{assets.shipped_mappings_dir() / "peersync-template"}"
inputs = ["in"]
[server]
base_url = "http://127.0.0.1:9/fhir"
[auth]
mode = "none"
[sync]
ledger = "state/ledger.sqlite"
''', encoding="utf-8")
    passed = check_config(config, environ={})
    assert [c.status for c in passed.checks if c.name == "assets.terminology"] == [Status.PASS]
    monkeypatch.setenv(assets.MAPPINGS_ENV, str(tmp_path / "nowhere"))
    terminology._concepts.cache_clear()
    try:
        failed = check_config(config, environ={})
    finally:
        terminology._concepts.cache_clear()
    assert [c.status for c in failed.checks if c.name == "assets.terminology"] == [Status.FAIL]
    assert failed.exit_code() == 78


# The import name of each runtime dependency (the distribution names differ for some).
_IMPORT_NAMES = {"fhir.resources": "fhir.resources", "pydantic": "pydantic", "pydantic-settings": "pydantic_settings",
                 "requests": "requests", "urllib3": "urllib3", "click": "click", "PyYAML": "yaml",
                 "openpyxl": "openpyxl", "orjson": "orjson", "filelock": "filelock", "PyJWT": "jwt",
                 "cryptography": "cryptography"}


def test_every_runtime_dependency_is_imported_by_the_package() -> None:
    import re

    declared = [re.split(r"[\[<>=]", d, maxsplit=1)[0] for d in PYPROJECT["project"]["dependencies"]]
    assert sorted(declared) == sorted(_IMPORT_NAMES)
    source = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "connector").rglob("*.py"))
    unused = [name for name, module in _IMPORT_NAMES.items()
              if not re.search(rf"^\s*(from|import) {re.escape(module)}\b", source, re.MULTILINE)]
    assert unused == [], f"declared but never imported: {unused}"


def test_the_canonical_base_belongs_to_the_project_home_the_package_declares() -> None:
    """One terminology base, stated in one place and owned by the GitHub organisation that hosts the project:
    pyproject's [project.urls], the FHIR package, every terminology resource, the connector's User-Agent."""
    import json
    from urllib.parse import urlsplit

    from connector.map.context import TERMINOLOGY_BASE
    from connector.wiring import USER_AGENT

    urls = PYPROJECT["project"]["urls"]
    owner = urlsplit(urls["Repository"]).path.strip("/").split("/")[0]
    assert urls["Terminology"] == TERMINOLOGY_BASE
    assert urlsplit(TERMINOLOGY_BASE).hostname == f"{owner}.github.io"  # GitHub Pages serves it to that owner only
    package = json.loads((REPO / "mappings" / "terminology" / "package.json").read_text(encoding="utf-8"))
    assert package["canonical"] == TERMINOLOGY_BASE and package["url"] == urls["Repository"]
    for path in (REPO / "mappings" / "terminology").glob("*-*.json"):
        resource = json.loads(path.read_text(encoding="utf-8"))
        assert resource["url"].startswith(TERMINOLOGY_BASE + "/"), path.name
    assert urls["Repository"] in USER_AGENT
