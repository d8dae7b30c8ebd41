"""Small durable key -> offset files (recovery point, log start offset).

File format (text, UTF-8, one item per line, as Kafka's ``CheckpointFile``)::

    line 1      version             "0"
    line 2      entry count         decimal
    line 3..    "<name> <value>"    name: [A-Za-z0-9_.-]+, value: a decimal int64

There is no checksum: the file is replaced atomically (written to ``<path>.tmp``, fsynced, renamed
over ``<path>``, then the directory is fsynced), so a reader sees the old file or the new one,
never a mix.  A file that does not parse is reported as :class:`StorageError`; callers treat it as
missing and fall back to the conservative choice (scan more, keep more).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from shmbroker.errors import StorageError, storage_error

CHECKPOINT_VERSION = 0
TMP_SUFFIX = ".tmp"
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.\-]+")
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_ENTRIES_MAX = 4096  # a checkpoint is small; anything bigger is not ours


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make renames, creations and deletions inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointFile:
    """One checkpoint file.

    Invariant: ``path`` always holds a complete file written by :meth:`write` (or nothing); the
    ``.tmp`` sibling is scratch space that may be left behind by a crash and is overwritten.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.tmp_path = self.path + TMP_SUFFIX

    def write(self, entries: Mapping[str, int]) -> None:
        """Replace the file with ``entries``: tmp -> fsync -> rename -> fsync(dir)."""
        if len(entries) > _ENTRIES_MAX:
            raise ValueError(f"checkpoint {self.path}: {len(entries)} entries, max {_ENTRIES_MAX}")
        lines = [str(CHECKPOINT_VERSION), str(len(entries))]
        for name, value in entries.items():
            if not _NAME_PATTERN.fullmatch(name):
                raise ValueError(f"checkpoint {self.path}: bad entry name {name!r}")
            if not _INT64_MIN <= int(value) <= _INT64_MAX:
                raise ValueError(f"checkpoint {self.path}: {name}={value} is not an int64")
            lines.append(f"{name} {int(value)}")
        data = ("\n".join(lines) + "\n").encode()
        try:
            fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self.tmp_path, self.path)
            fsync_directory(os.path.dirname(self.path) or ".")
        except OSError as error:
            try:
                os.unlink(self.tmp_path)  # gives back what a full disk let us write
            except OSError:
                pass
            raise storage_error(
                f"cannot write checkpoint {self.path}: {error.strerror or error}", error.errno
            ) from error

    def read(self) -> dict[str, int] | None:
        """The entries, or None when the file does not exist.  Raises StorageError if malformed."""
        try:
            with open(self.path, "rb") as file:
                data = file.read(1 << 20)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise StorageError(
                f"cannot read checkpoint {self.path}: {error.strerror or error}"
            ) from error
        try:
            text = data.decode()
            lines = text.split("\n")
            if lines and lines[-1] == "":
                lines.pop()
            version = int(lines[0])
            if version != CHECKPOINT_VERSION:
                raise ValueError(f"unknown version {version}")
            count = int(lines[1])
            if count != len(lines) - 2:
                raise ValueError(f"header says {count} entries, file holds {len(lines) - 2}")
            entries: dict[str, int] = {}
            for line in lines[2:]:
                name, value_text = line.split(" ")
                if not _NAME_PATTERN.fullmatch(name):
                    raise ValueError(f"bad entry name {name!r}")
                value = int(value_text)
                if not _INT64_MIN <= value <= _INT64_MAX:
                    raise ValueError(f"{name}={value} is not an int64")
                entries[name] = value
            return entries
        except (ValueError, IndexError, UnicodeDecodeError) as error:
            raise StorageError(f"checkpoint {self.path} is malformed: {error}") from error

    def remove_stale_tmp(self) -> bool:
        """Delete a ``.tmp`` left by a crash during :meth:`write`; True if there was one."""
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            return False
        return True
