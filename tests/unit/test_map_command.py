"""`peersync map` with its clinical-note options: every file it writes is private (0600 in 0700 folders, also an
old 0644 file it overwrites), and nothing it prints or logs carries the demo's patient data (issue 16)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cliutil import DEMO

from connector.cli import main
from connector.errors import ExitCode
from connector.files import open_new, write_atomically
from tests.integration.test_logs_phi import leaks, phi_values

pytestmark = pytest.mark.usefixtures("peersync_env")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes_under(folder: Path) -> tuple[dict[str, int], dict[str, int]]:
    """(file modes, folder modes) of everything under ``folder``, by path relative to it."""
    files = {str(p.relative_to(folder)): mode(p) for p in folder.rglob("*") if p.is_file()}
    folders = {str(p.relative_to(folder)): mode(p) for p in folder.rglob("*") if p.is_dir()}
    return files, folders


def test_an_existing_0644_file_becomes_0600_when_written_again(tmp_path: Path) -> None:
    writes = (lambda p: open_new(p).close(), lambda p: write_atomically(p, "x"), lambda p: write_atomically(p, b"x"))
    for write in writes:
        old = tmp_path / "old.json"
        old.write_text("old patient data", encoding="utf-8")
        old.chmod(0o644)
        write(old)
        assert mode(old) == 0o600 and old.read_text(encoding="utf-8") in ("", "x")


@pytest.mark.parametrize("clinical_notes", ["also", "only"])
def test_map_writes_every_file_0600_in_0700_folders(tmp_path: Path, clinical_notes: str) -> None:
    out, preview = tmp_path / "out", tmp_path / "out" / "preview"
    # A folder left by an older peersync that wrote world-readable files: they are overwritten and made private.
    (out / "bundles").mkdir(parents=True, mode=0o700)
    for old in (out / "DocumentReference.ndjson", out / "summary.json", out / "bundles" / "participant-E0002.json"):
        old.write_text("{}", encoding="utf-8")
        old.chmod(0o644)
    out.chmod(0o700)
    result = CliRunner().invoke(main, ["map", "--profile", "peersync-template", str(DEMO), "--out", str(out),
                                       "--clinical-notes", clinical_notes, "--note-period", "week",
                                       "--preview-html", str(preview), "-q"], catch_exceptions=False)
    assert result.exit_code == ExitCode.RECORDS_REJECTED, result.output
    files, folders = modes_under(out)
    assert "DocumentReference.ndjson" in files and "bundles/participant-E0002.json" in files
    assert any(name.startswith("preview/notes-") for name in files) and "rejects.csv" in files
    assert {name: m for name, m in files.items() if m != 0o600} == {}
    assert {name: m for name, m in folders.items() if m != 0o700} == {}


@pytest.mark.parametrize(("clinical_notes", "note_period"), [("also", "contact"), ("only", "month")])
def test_map_with_notes_prints_and_logs_no_patient_data(tmp_path: Path, clinical_notes: str, note_period: str) -> None:
    out = tmp_path / "out"
    args = ["map", "--profile", "peersync-template", str(DEMO), "--out", str(out), "--clinical-notes", clinical_notes,
            "--note-period", note_period, "--preview-html", str(out / "preview"), "-v", "--log-format", "json"]
    values = phi_values()
    for extra in ([], ["--json"], ["--participant", "E0002"], ["--participant", "E0002", "--json"]):
        result = CliRunner().invoke(main, args + extra, catch_exceptions=False)
        assert result.exit_code == ExitCode.RECORDS_REJECTED, result.output
        printed = result.stdout + result.stderr
        # The one value the operator typed may come back in an error about it, nothing else may.
        assert leaks(printed, values) == [], f"map {' '.join(extra)} printed patient data"
        if "--json" in extra:
            summary = json.loads(result.stdout)
            assert summary["resources"]["DocumentReference"] > 0 and summary["previews"] >= 1
    # The files do hold the patient data (so the scan above would have found it had it been printed).
    page = next((out / "preview").glob("notes-*.html")).read_text(encoding="utf-8")
    assert leaks(page, values)
    assert {m for m in modes_under(out)[0].values()} == {0o600}
