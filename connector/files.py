"""Files peersync writes that may hold patient data, or describe it: created private from the start.

The ledger (and SQLite's -wal/-shm files beside it), the rejects report and the metrics file are created
0600 (folders 0700), or 0640 (folders 0750) when ``output.group_readable`` is set, so that a monitoring
agent in the peersync user's group can read them. The mode is given when the file is created, never by a
chmod afterwards, so there is no moment at which another user could open it; a file that already exists is set to
the mode before it is emptied and written (``peersync map`` run into an old folder of 0644 files).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO, TextIO

PRIVATE_FILE_MODE = 0o600
GROUP_FILE_MODE = 0o640


def file_mode(group_readable: bool = False) -> int:
    """The mode of the files peersync creates: 0600, or 0640 for a group."""
    return GROUP_FILE_MODE if group_readable else PRIVATE_FILE_MODE


def folder_mode(mode: int) -> int:
    """The folder mode that goes with a file mode (search permission where read permission is)."""
    return mode | ((mode & 0o444) >> 2)


def make_folder(path: Path, mode: int = PRIVATE_FILE_MODE) -> None:
    """Create ``path`` and its missing parents with the folder mode for ``mode``; existing folders are left as
    they are (an operator may have set them up on purpose)."""
    missing = []
    current = path
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it in between
            folder.mkdir()
            os.chmod(folder, folder_mode(mode))  # mkdir's mode is cut by the umask; this is exact


def create_file(path: Path, mode: int = PRIVATE_FILE_MODE) -> bool:
    """Create ``path`` empty with exactly ``mode`` unless it exists; True if it was created."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, mode)  # os.open's mode is cut by the umask; a 0640 request must stay 0640
    finally:
        os.close(fd)
    return True


def open_new(path: Path, mode: int = PRIVATE_FILE_MODE, *, newline: str | None = None) -> TextIO:
    """Open ``path`` for writing text (UTF-8), truncated, with exactly ``mode``: a new file is created with it, an
    existing one is set to it before it is emptied (an old 0644 file must not go on holding patient data)."""
    return open(_private_fd(path, mode), "w", encoding="utf-8", newline=newline)


def open_new_binary(path: Path, mode: int = PRIVATE_FILE_MODE) -> BinaryIO:
    """:func:`open_new` for bytes."""
    return open(_private_fd(path, mode), "wb")


def _private_fd(path: Path, mode: int) -> int:
    """A write descriptor on ``path`` with exactly ``mode`` (created with it, or set before truncating)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, mode)
    try:
        os.fchmod(fd, mode)  # the umask cuts a new file's mode; an existing file has whatever it had
        os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_atomically(path: Path, text: str | bytes, mode: int = PRIVATE_FILE_MODE) -> None:
    """Write ``text`` (or bytes) to ``path``, with exactly ``mode``, through a temporary file in the same folder and
    a rename, so that a reader sees the old file or the new one, never half of one. The temporary file is removed
    if anything fails."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # left by a process with our pid that was killed mid-write
        if isinstance(text, bytes):
            with open_new_binary(tmp, mode) as binary:
                binary.write(text)
        else:
            with open_new(tmp, mode) as handle:
                handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
