"""docs/library.md's sync example, with the examples before it, against the local HAPI server."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.library_docs import demo_folder, run_examples

pytestmark = pytest.mark.integration


def test_the_library_examples_sync_the_demo(fhir_base_url: str, tmp_path: Path) -> None:
    assert run_examples(demo_folder(tmp_path, fhir_base_url)) == []
