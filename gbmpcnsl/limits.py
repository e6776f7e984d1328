"""Limits on what a file's header may declare, checked before anything is allocated: a few
bytes of header must not make a step (or one of step0's workers) use more memory than a
4 GB-per-worker machine has. Each limit is raised by an environment variable of its name
(docs/security.md), e.g. GBMPCNSL_MAX_VOXELS=300000000.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

from gbmpcnsl_common import UserError

DEFAULTS = {
    # pixels of one 2-D image: a 16-bit image takes about 30 bytes a pixel while it is
    # windowed (float64 copies), so 64 Mpx is about 2 GB
    "GBMPCNSL_MAX_PIXELS": 64 * 2**20,
    # voxels of one volume (NIfTI, multi-frame DICOM): 512^3, about 2 GB as float32 and copies
    "GBMPCNSL_MAX_VOXELS": 512**3,
    # slices of one volume or frames of one DICOM file
    "GBMPCNSL_MAX_SLICES": 10_000,
    # images (rows) of one HDF5 file
    "GBMPCNSL_MAX_ROWS": 10_000_000,
    # pixels of a checkpoint's input (height x width): every image is resized to it
    "GBMPCNSL_MAX_INPUT_PIXELS": 2048 * 2048,
}


def limit(name: str) -> int:
    """The limit `name` (one of DEFAULTS): its environment variable, else the default."""
    text = os.environ.get(name)
    if text is None:
        return DEFAULTS[name]
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{name}={text!r}: not a whole number") from None
    if value < 1:
        raise UserError(f"{name}={text!r}: must be at least 1")
    return value


def check_count(what: str, count: int, name: str, source: object) -> None:
    """UserError when `count` (of `what`, declared by `source`) exceeds limit `name`."""
    most = limit(name)
    if count > most:
        raise UserError(
            f"{source}: declares {count:,} {what}, more than the limit of {most:,} "
            f"(set {name} to allow more on a machine with the memory for it)"
        )


def check_shape(shape: Iterable[int], name: str, source: object, what: str = "voxels") -> None:
    """check_count on the product of a declared shape."""
    check_count(what, math.prod(int(n) for n in shape), name, source)
