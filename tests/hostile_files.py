"""Hostile input files that more than one test suite builds (unit tests of the read limits, the reliability suite)."""

from __future__ import annotations

import zipfile
from pathlib import Path


def xlsx_zip_bomb(path: Path, unpacked_mb: int) -> Path:
    """A real workbook whose shared strings unpack to ``unpacked_mb`` MB (a small file)."""
    from openpyxl import Workbook

    book = Workbook()
    book.active.title = "Contacts"
    book.active.append(["contact_id", "notes"])
    source = path.with_name("source.xlsx")
    book.save(source)
    chunk = b"a" * 2**20
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bomb:
        for info in original.infolist():
            if info.filename != "xl/sharedStrings.xml":
                bomb.writestr(info, original.read(info))
        with bomb.open("xl/sharedStrings.xml", "w", force_zip64=True) as strings:
            strings.write(b'<sst xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><si><t>')
            for _ in range(unpacked_mb):
                strings.write(chunk)
            strings.write(b"</t></si></sst>")
    source.unlink()
    return path
