"""Runs the examples of docs/library.md: each ```python block in order, in one namespace, in a folder with the
demo configuration and inputs; every ``print(...)  # expected`` line must print what its comment says."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "library.md"
_BLOCK = re.compile(r"^## (?P<title>.+?)$|^```python\n(?P<code>.*?)^```", re.MULTILINE | re.DOTALL)
_EXPECTED = re.compile(r"^\s*print\(.*\)\s+# (?P<expected>.+)$")


def examples() -> list[tuple[str, str]]:
    """(section title, code) for each python block of docs/library.md."""
    out, title = [], ""
    for match in _BLOCK.finditer(DOC.read_text(encoding="utf-8")):
        if match.group("title"):
            title = match.group("title")
        else:
            out.append((title, match.group("code")))
    return out


def demo_folder(folder: Path, base_url: str) -> Path:
    """The demo configuration and inputs, with the ledger and rejects inside ``folder``."""
    shutil.copytree(REPO / "fixtures" / "demo" / "template", folder / "template")
    (folder / "peersync.toml").write_text(f'''
[source]
profile = "peersync-template"
inputs = ["template"]
[server]
base_url = "{base_url}"
[auth]
mode = "none"
[sync]
ledger = "state/ledger.sqlite"
[output]
rejects_dir = "state/rejects"
''', encoding="utf-8")
    return folder


def run_examples(folder: Path, upto: int | None = None) -> list[str]:
    """Execute the examples (the first ``upto``) in ``folder``; return mismatches between printed and expected."""
    namespace: dict[str, object] = {"__name__": "library_docs"}
    problems: list[str] = []
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        for title, code in examples()[:upto]:
            expected = [m.group("expected") for line in code.splitlines() if (m := _EXPECTED.match(line))]
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(code, f"docs/library.md: {title}", "exec"), namespace)  # our own docs
            printed = out.getvalue().splitlines()
            if printed != expected:
                problems.append(f"{title}: printed {printed}, the doc says {expected}")
    finally:
        os.chdir(cwd)
    return problems
