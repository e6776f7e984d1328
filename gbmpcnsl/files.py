"""Writing files: the one atomic writer every output goes through, and a file's hash.

An output is never left half-written: it is written to a temporary file beside its target
(`mkstemp`: an unguessable name, created exclusively, so a planted symlink is never
followed), flushed to disk, renamed over the target, and the folder is flushed too.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gbmpcnsl_common import UserError


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def private_mode(folder: bool = False) -> int:
    """The mode of a new output that holds patient images or predictions: 0600 (a folder
    0700), less whatever else the user's umask removes; never readable by the group or
    others unless the user widens it (docs/security.md: sharing with a group)."""
    return (0o700 if folder else 0o600) & ~_umask()


def _default_mode(target: Path, private: bool) -> int:
    """The old file's mode (a chmod to share it survives a rewrite), else a new file's:
    private_mode(), or what a plain open() gives (0666 less the umask)."""
    if target.exists():
        return target.stat().st_mode & 0o777
    return private_mode() if private else 0o666 & ~_umask()


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_write(target: str | Path, mode: int | None = None, private: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target`; when the block ends without an error, the
    file written there replaces `target` (fsync, rename, fsync of the folder). On any
    error, Ctrl-C included, the temporary file is removed and `target` is untouched.
    `mode`: the file's permissions (default: the old file's, else those of a plain open(),
    or private_mode() with `private`: patient images and predictions)."""
    target = Path(target)
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        try:
            yield temporary
        except (OSError, MemoryError, RuntimeError) as error:  # h5py: RuntimeError with the errno
            if not is_out_of_space(error):
                raise
            raise UserError(
                f"{target}: not written, {out_of_space_reason(error)}; the old file is unchanged"
            ) from error
        os.chmod(temporary, _default_mode(target, private) if mode is None else mode)
        _fsync(temporary)
        os.replace(temporary, target)
        _fsync(target.parent)
    finally:
        temporary.unlink(missing_ok=True)


DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no space, file too large, quota


def is_out_of_space(error: BaseException) -> bool:
    """A MemoryError, or a write that found no room (h5py puts the errno in its message)."""
    if isinstance(error, MemoryError):
        return True
    numbers = [error.errno] if isinstance(error, OSError) else []
    numbers += [int(n) for n in re.findall(r"errno = (\d+)", str(error))]
    return any(number in DISK_FULL for number in numbers)


def out_of_space_reason(error: BaseException) -> str:
    if isinstance(error, MemoryError):
        return "out of memory"
    return "the disk is full or the file too large (a size limit or quota)"


def write_text(path: str | Path, text: str) -> None:
    """A text file, written atomically."""
    with atomic_write(path) as temporary:
        temporary.write_text(text)


def write_json(path: str | Path, data: dict) -> None:
    """A JSON file (indented, newline-terminated), written atomically."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_csv(path: str | Path, header: list[str], rows, private: bool = False) -> None:
    """A CSV file with a header, floats at full precision (repr), written atomically;
    `private`: it holds predictions (atomic_write's `private`)."""
    with atomic_write(path, private=private) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([repr(v) if isinstance(v, float) else v for v in row] for row in rows)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (what `sha256sum` prints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
