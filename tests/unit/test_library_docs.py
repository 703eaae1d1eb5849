"""docs/library.md: every export of ``connector`` is documented, and the examples run as written (all but the
sync, which needs a server: tests/integration/test_library_sync.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import connector
from tests.library_docs import DOC, demo_folder, examples, run_examples


def test_every_export_has_a_docstring_and_an_example() -> None:
    code = "\n".join(c for _title, c in examples())
    for name in connector.__all__:
        if name == "__version__":
            continue
        assert getattr(connector, name).__doc__, f"connector.{name} has no docstring"
        assert f"connector.{name}" in code, f"docs/library.md has no example of connector.{name}"
    assert f"`{name}`" in DOC.read_text(encoding="utf-8")


def test_import_connector_is_cheap() -> None:
    probe = "import sys, connector; print(sorted(m for m in sys.modules if m.startswith('connector')))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['connector']"


def test_the_offline_examples_run_as_written(peersync_env: None, tmp_path: Path) -> None:
    offline = [n for n, (title, _code) in enumerate(examples()) if title.startswith("Sync")]
    assert offline, "docs/library.md lost its sync example"
    assert run_examples(demo_folder(tmp_path, "http://127.0.0.1:9/fhir"), upto=offline[0]) == []
