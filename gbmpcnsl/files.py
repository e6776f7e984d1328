"""Writing files: the one atomic writer every output goes through, and a file's hash.

An output is never left half-written: it is written to a temporary file beside its target
(`mkstemp`: an unguessable name, created exclusively, so a planted symlink is never
followed), flushed to disk, renamed over the target, and the folder is flushed too.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _default_mode(target: Path) -> int:
    """The mode a plain open() would give: the old file's, else 0666 less the umask."""
    if target.exists():
        return target.stat().st_mode & 0o777
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_write(target: str | Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `target`; when the block ends without an error, the
    file written there replaces `target` (fsync, rename, fsync of the folder). On any
    error, Ctrl-C included, the temporary file is removed and `target` is untouched.
    `mode`: the file's permissions (default: those a plain open() would give)."""
    target = Path(target)
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, _default_mode(target) if mode is None else mode)
        _fsync(temporary)
        os.replace(temporary, target)
        _fsync(target.parent)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """A text file, written atomically."""
    with atomic_write(path) as temporary:
        temporary.write_text(text)


def write_json(path: str | Path, data: dict) -> None:
    """A JSON file (indented, newline-terminated), written atomically."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_csv(path: str | Path, header: list[str], rows) -> None:
    """A CSV file with a header, floats at full precision (repr), written atomically."""
    with atomic_write(path) as temporary, open(temporary, "w", newline="") as handle:
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
