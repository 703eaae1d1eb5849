"""The clinical-note preview and the resources' narratives in a real browser: headless Chromium (Debian's
``chromium``) opens the rendered HTML of the demo's notes, and a page of the narratives (``text.div``) of every
resource type as an EHR would show them (embedded in its own page, without our Content-Security-Policy); the
tests read the DOM Chromium built, as a person would see it, and check that no script in the source data ran.

``.ci/run`` installs chromium; without it these tests fail and say how to install it.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from connector.map import MappingContext
from connector.map.export import iter_bundles, write_note_previews
from connector.map.note import supporter_line
from connector.map.units import participant_notes
from connector.read.profile import load_profile
from connector.read.program import read_program
from connector.read.staging import Staging

DEMO = Path(__file__).resolve().parents[2] / "fixtures" / "demo" / "template"
TERMINOLOGY = Path(__file__).resolve().parents[2] / "mappings" / "terminology"
# Each would write its marker into the page if it ran; the markers are built at run time, so the escaped source
# text shown in the note never contains them.
HOSTILE_NOTE = ("<script>document.title='SCRIPT'+'-RAN';document.body.append('SCRIPT'+'-RAN')</script>"
                "<img src=x onerror=\"document.body.append('IMG'+'-RAN')\"> Said the A1c is better")
MARKERS = ("SCRIPT-RAN", "IMG-RAN")


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("headless Chromium is needed: apt-get install -y chromium (as .ci/run does)")
    return found


def run_chromium(page: Path, tmp_path: Path, *extra: str) -> str:
    """Open ``page`` in headless Chromium; return what it prints (the DOM with --dump-dom)."""
    result = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", *extra, page.as_uri()],
        capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


class _Text(HTMLParser):
    """The visible text of a DOM (what a person reads), scripts and styles left out."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._skip += tag in ("script", "style", "title")

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in ("script", "style", "title")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def visible_text(dom: str) -> str:
    parser = _Text()
    parser.feed(dom)
    return " ".join(" ".join(parser.parts).split())


def demo_inputs(tmp_path: Path, hostile: bool) -> Path:
    inputs = tmp_path / "inputs"
    shutil.copytree(DEMO, inputs, ignore=shutil.ignore_patterns("summary.json"))
    if hostile:
        path = inputs / "contacts.csv"
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        rows[0]["notes"] = HOSTILE_NOTE
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return inputs


def preview(tmp_path: Path, *, hostile: bool = False) -> tuple[dict[str, Path], dict[str, list]]:
    """The demo's note previews (file per participant) and the notes behind them."""
    profile = load_profile("peersync-template")
    ctx = MappingContext.from_profile(profile, clinical_notes="only")
    with Staging(tmp_path / "staging.sqlite") as staging:
        read_program(profile, [demo_inputs(tmp_path, hostile)], staging)
        files = write_note_previews(staging, ctx, tmp_path / "preview")
        notes = {p: participant_notes(staging, p, ctx) for p in staging.participants()}
    return {f.stem.removeprefix("notes-"): f for f in files}, notes


def test_a_person_sees_the_supporter_the_support_and_the_a1c_target(tmp_path: Path) -> None:
    files, notes = preview(tmp_path)
    participant = next(p for p, ns in notes.items() if p in files and any(
        g.target is not None and g.target.measure.value == "hba1c" for n in ns for g in n.goals))
    first = next(n for n in notes[participant] if not n.voided)
    supporter = first.supporter(first.live_contacts()[0].supporter_id)
    text = visible_text(run_chromium(files[participant], tmp_path, "--dump-dom"))
    assert supporter_line(supporter) in text  # name and title as the program writes them
    contact = next(c for c in first.live_contacts() if c.support_types)
    support = ", ".join(s.value.replace("-", " ") for s in dict.fromkeys(contact.support_types))
    assert f"Support given: {support}." in text  # the words of that contact's support, not just the label
    assert "Target: HbA1c < 7" in text
    screenshot = tmp_path / "note.png"
    run_chromium(files[participant], tmp_path, f"--screenshot={screenshot}", "--window-size=1000,1400")
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000


def test_no_script_in_the_source_data_runs(tmp_path: Path) -> None:
    files, notes = preview(tmp_path, hostile=True)
    participant = next(p for p, ns in notes.items() if any("SCRIPT'+'-RAN" in (c.notes or "")
                                                           for n in ns for c in n.contacts))
    dom = run_chromium(files[participant], tmp_path, "--dump-dom")
    assert "Said the A1c is better" in visible_text(dom)  # the note is shown, as text
    assert not any(marker in dom for marker in MARKERS)
    # The same check on a page whose script is real finds its marker: a script that ran would have been seen.
    control = tmp_path / "control.html"
    control.write_text("<html><body><script>document.body.append('SCRIPT'+'-RAN')</script></body></html>",
                       encoding="utf-8")
    assert "SCRIPT-RAN" in run_chromium(control, tmp_path, "--dump-dom")


# -- narratives, as an EHR shows them ------------------------------------------------------------------------------


def narratives(tmp_path: Path, *, hostile: bool = False) -> tuple[dict[str, dict[str, list[str]]], Staging]:
    """Every resource narrative (``text.div``) a first sync of the demo would write, by participant and type."""
    profile = load_profile("peersync-template")
    ctx = MappingContext.from_profile(profile, clinical_notes="also")
    found: dict[str, dict[str, list[str]]] = {}
    staging = Staging(tmp_path / "staging.sqlite")
    read_program(profile, [demo_inputs(tmp_path, hostile)], staging)
    for name, bundle in iter_bundles(staging, ctx):
        participant = name.removeprefix("participant-").split("-")[0] if name.startswith("participant-") else ""
        for entry in bundle["entry"]:
            resource = entry["resource"]
            if "text" in resource:
                found.setdefault(participant, {}).setdefault(resource["resourceType"], []).append(
                    resource["text"]["div"])
    return found, staging


def ehr_page(path: Path, divs: dict[str, list[str]]) -> Path:
    """A page that embeds narratives the way an EHR's chart does: as HTML, with no Content-Security-Policy."""
    body = "".join(f"<h2>{t}</h2>" + "".join(f"<section>{d}</section>" for d in ds) for t, ds in divs.items())
    path.write_text(f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"></head><body>{body}</body></html>",
                    encoding="utf-8")
    return path


class _Dom(HTMLParser):
    """The elements and attribute names of a serialized DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: set[str] = set()
        self.attributes: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.add(tag)
        self.attributes |= {name for name, _ in attrs}


def test_a_person_sees_every_narrative_without_our_csp(tmp_path: Path) -> None:
    found, staging = narratives(tmp_path)
    with staging:
        participant = next(p for p in staging.participants() if p in found and any(
            "HbA1c &lt; 7" in d for d in found[p].get("Goal", [])))
        notes = participant_notes(staging, participant, MappingContext.from_profile(load_profile("peersync-template")))
    contact = next(c for n in notes for c in n.live_contacts() if c.support_types)
    supporter = next(n.supporter(contact.supporter_id) for n in notes if contact in n.contacts)
    assert {"Communication", "Goal", "CarePlan", "CareTeam", "DocumentReference"} <= set(found[participant])
    dom = run_chromium(ehr_page(tmp_path / "narratives.html", found[participant]), tmp_path, "--dump-dom")
    text = visible_text(dom).replace(" : ", ": ")  # "<b>Who</b>: ..." reads "Who: ..."
    displays = {c["code"]: c["display"] for c in json.loads(
        (TERMINOLOGY / "CodeSystem-peer-support-type.json").read_text(encoding="utf-8"))["concept"]}
    support = "; ".join(displays[s.value] for s in dict.fromkeys(contact.support_types))
    assert f"Who: {supporter_line(supporter)}" in text  # the supporter's name and title as the program writes it
    assert f"Support given: {support}" in text  # that contact's support, in the code system's words
    assert "Target: HbA1c < 7 %" in text


def test_hostile_source_text_in_narratives_shows_as_text_and_runs_nothing_without_csp(tmp_path: Path) -> None:
    found, staging = narratives(tmp_path, hostile=True)
    staging.close()
    participant = next(p for p, types in found.items() if any(
        "SCRIPT&#x27;+&#x27;-RAN" in d or "SCRIPT'+'-RAN" in d for d in types.get("Communication", [])))
    dom = run_chromium(ehr_page(tmp_path / "hostile.html", found[participant]), tmp_path, "--dump-dom")
    text = visible_text(dom)
    assert "<script>document.title='SCRIPT'+'-RAN'" in text and "<img src=x onerror=" in text  # literal, visible
    parsed = _Dom()
    parsed.feed(dom)
    assert not {"script", "img", "iframe", "object", "svg"} & parsed.elements
    assert not {a for a in parsed.attributes if a.startswith("on")}
    assert not any(marker in dom for marker in MARKERS)
    control = tmp_path / "control.html"  # the same page with a real script: a script that ran would be seen
    control.write_text(ehr_page(tmp_path / "c.html", found[participant]).read_text(encoding="utf-8").replace(
        "</body>", "<script>document.body.append('SCRIPT'+'-RAN')</script></body>"), encoding="utf-8")
    assert "SCRIPT-RAN" in run_chromium(control, tmp_path, "--dump-dom")
