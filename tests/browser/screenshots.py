"""Regenerate the screenshots of docs/clinical-notes.md: headless Chromium photographs the HTML peersync generates
for the demo program (a participant's clinical-note preview, and the narratives of their resources).

    .venv/bin/python -m tests.browser.screenshots      (or: make docs-screenshots)

The demo data is synthetic; the pages are written to a temporary folder and only the PNGs are kept.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from connector.map import MappingContext
from connector.map.export import iter_bundles, write_note_previews
from connector.map.note import html_page
from connector.read.profile import load_profile
from connector.read.program import read_program
from connector.read.staging import Staging

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "fixtures" / "demo" / "template"
OUT = REPO / "docs" / "img"
PARTICIPANT = "E0002"  # a participant with goals, an A1c target and contacts in Spanish and English
NARRATIVE_TYPES = ("DocumentReference", "Communication", "Goal", "CarePlan")


def shoot(page: Path, png: Path, profile_dir: Path, height: int) -> None:
    """A PNG of ``page`` as headless Chromium renders it, 1000 px wide."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("headless Chromium is needed: apt-get install -y chromium")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
                    f"--user-data-dir={profile_dir}", f"--screenshot={png}", f"--window-size=1000,{height}",
                    page.as_uri()], check=True, capture_output=True, timeout=180)


def narratives_page(staging: Staging, ctx: MappingContext) -> str:
    """The narratives (``text.div``) of one resource of each type in NARRATIVE_TYPES for PARTICIPANT."""
    found: dict[str, str] = {}
    for name, bundle in iter_bundles(staging, ctx):
        if not name.startswith(f"participant-{PARTICIPANT}"):
            continue
        for entry in bundle["entry"]:
            resource = entry["resource"]
            if resource["resourceType"] in NARRATIVE_TYPES and "text" in resource:
                found.setdefault(resource["resourceType"], resource["text"]["div"])
    # the divs are the generated XHTML narratives (every source value already escaped)
    sections = "".join(f"<h2>{t}</h2><section class=\"narrative\">{found[t]}</section>"
                       for t in NARRATIVE_TYPES if t in found)
    return html_page(f"Narratives of participant {PARTICIPANT}'s resources", f"<h1>Narratives</h1>{sections}")


def main() -> None:
    """Write docs/img/clinical-note.png and docs/img/narratives.png."""
    profile = load_profile("peersync-template")
    ctx = MappingContext.from_profile(profile, clinical_notes="also", note_period="month")
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="peersync-shots-") as tmp_name, \
            Staging(Path(tmp_name) / "staging.sqlite") as staging:
        tmp = Path(tmp_name)
        read_program(profile, [DEMO], staging)
        (note_page,) = write_note_previews(staging, ctx, tmp / "preview", PARTICIPANT)
        narratives = tmp / "narratives.html"
        narratives.write_text(narratives_page(staging, ctx), encoding="utf-8")
        shoot(note_page, OUT / "clinical-note.png", tmp / "profile", 1300)
        shoot(narratives, OUT / "narratives.png", tmp / "profile", 1500)
    print(f"wrote {OUT / 'clinical-note.png'} and {OUT / 'narratives.png'}")


if __name__ == "__main__":
    main()
