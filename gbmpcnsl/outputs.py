"""Replacing an output folder: only one this project wrote, never a folder that holds the
user's own files, and the old one removed only once the new one is in place.

Each kind of output folder carries its own marker: run.json (a run folder), cv.json (a
cross-validation run), gbmpcnsl_model.json beside saved_model.pb (an exported SavedModel),
`.gbmpcnsl-demo` (a folder of synthetic demo data or demo results). A folder without its
marker is somebody else's: --overwrite refuses it, and so do the demo scripts.

`python -m gbmpcnsl.outputs DIR` is the demo scripts' guarded `rm -rf DIR; mkdir DIR`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from gbmpcnsl_common import UserError, split_slice_name

DEMO_MARKER = ".gbmpcnsl-demo"  # in every folder the demo scripts create


def _resolved(path: str | Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(path))).resolve()


def refuse_unsafe_folder(folder: Path, inputs: Iterable[str | Path] = (), flag: str = "--overwrite") -> None:
    """UserError when `folder` must never be replaced: the current folder or one above it
    (`.`, `..`), the home folder or one above it (`/`), or a folder holding an input."""
    target = _resolved(folder)
    for protected, what in ((_resolved("."), "the current folder"), (_resolved("~"), "the home folder")):
        if target == protected or target in protected.parents:
            raise UserError(f"{folder}: {flag} refuses to replace {what} or a folder above it")
    for item in inputs:
        source = _resolved(split_slice_name(item)[0])  # a slice name `volume#012`: its file
        if source == target or target in source.parents:
            raise UserError(f"{folder}: holds the input {item}; {flag} refuses to replace it")


def refuse_inputs_as_outputs(
    inputs: Iterable[str | Path], outputs: Iterable[Path], flag: str = "--output-dir"
) -> None:
    """UserError when an output path is an input file (an overlay must never replace a scan)."""
    sources = {_resolved(split_slice_name(item)[0]): item for item in inputs}
    for output in outputs:
        if _resolved(output) in sources:
            raise UserError(f"{output}: is the input {sources[_resolved(output)]}; pick another {flag}")


def check_replaceable(
    folder: Path, markers: Iterable[str], inputs: Iterable[str | Path] = (), flag: str = "--overwrite"
) -> None:
    """May `folder` be replaced? Yes when it is absent or empty, or when it carries all of
    `markers` and is not a protected folder (refuse_unsafe_folder). UserError otherwise."""
    if not os.path.lexists(folder):
        return
    if folder.is_symlink() or not folder.is_dir():
        raise UserError(
            f"{folder}: exists and is not a folder; {flag} replaces only this tool's output folders"
        )
    refuse_unsafe_folder(folder, inputs, flag)
    markers = list(markers)
    if any(folder.iterdir()) and not all((folder / marker).is_file() for marker in markers):
        raise UserError(
            f"{folder}: not written by this tool (no {' and '.join(markers)}); "
            f"{flag} only replaces this tool's own outputs"
        )


def move_aside(folder: Path) -> Path | None:
    """Rename an existing `folder` to a fresh hidden name beside it (same file system, so a
    rename); returns that name (None when there was nothing). `discard` removes it later."""
    if not os.path.lexists(folder):
        return None
    aside = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
    os.replace(folder, aside / folder.name)
    return aside


def discard(aside: Path | None) -> None:
    """Remove what move_aside set aside."""
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def restore(aside: Path | None, folder: Path) -> None:
    """Put what move_aside set aside back at `folder` after a failure, in place of whatever
    half-written new output is there."""
    if aside is not None:
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)
        os.replace(aside / folder.name, folder)
        discard(aside)


@contextlib.contextmanager
def replacing(folder: Path) -> Iterator[None]:
    """The old `folder` is moved aside for the block; on success it is removed, on any
    error put back in place of what the block left there."""
    aside = move_aside(folder)
    try:
        yield
    except BaseException:
        restore(aside, folder)
        raise
    discard(aside)


def mark_demo_folder(folder: Path) -> None:
    """Create `folder` (if needed) with DEMO_MARKER in it: from now on the demo may replace it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DEMO_MARKER).write_text("synthetic demo output of gbm-pcnsl; safe to delete\n")


def fresh_demo_folder(folder: Path) -> None:
    """The demo scripts' `rm -rf DIR; mkdir DIR`, refusing any folder without DEMO_MARKER."""
    check_replaceable(folder, [DEMO_MARKER], flag="the demo")
    discard(move_aside(folder))
    mark_demo_folder(folder)


def main(argv: list[str] | None = None) -> int:
    """`python -m gbmpcnsl.outputs DIR`: fresh_demo_folder(DIR), errors in one line."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m gbmpcnsl.outputs DIR", file=sys.stderr)
        return 2
    try:
        fresh_demo_folder(Path(args[0]))
    except (UserError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
