"""Pixels: load_slice, the one front door from any slice name to the array the model sees.

    load_slice(name, size)    any slice -> uint8 (H, W, 3)

2-D image files go through gbmpcnsl_common.load_image (bit for bit the original's pixels);
DICOM and NIfTI slices are decoded by gbmpcnsl.dicom and gbmpcnsl.nifti, each with its own
intensity rules (see docs/data.md), then take the same last steps as 2-D images.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from gbmpcnsl.dicom import is_dicom, problem, read_multiframe, read_single_frame
from gbmpcnsl.nifti import check_nifti_readable, is_nifti, read_nifti
from gbmpcnsl_common import UserError, load_image, split_slice_name


def _square_pixels(image: Image.Image, spacing: tuple[float, float] | None) -> Image.Image:
    """Resample non-square pixels (row spacing, column spacing in mm) to square ones by
    stretching the coarser axis (LANCZOS), so anatomy keeps its shape at any model size."""
    if spacing is None:
        return image
    row, column = (float(s) for s in spacing)
    if row <= 0 or column <= 0 or abs(row - column) <= 1e-3 * max(row, column):
        return image
    width, height = image.size
    if column > row:
        return image.resize((round(width * column / row), height), Image.LANCZOS)
    return image.resize((width, round(height * row / column)), Image.LANCZOS)


def _finish(pixels: np.ndarray, spacing, size: tuple[int, int] | None) -> np.ndarray:
    """uint8 (h, w) or (h, w, 3) -> square pixels -> convert("RGB") -> LANCZOS resize to size
    (None: keep the square-pixel size), the same last steps as 2-D images."""
    image = _square_pixels(Image.fromarray(pixels), spacing)
    image = image.convert("RGB")
    if size is not None:
        image = image.resize((size[1], size[0]), Image.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


_volume_lock = threading.Lock()
# Volumes that could not be decoded, and why: remembered for the rest of the run, so that
# each of their slices fails at once with the same one line (never decoded again).
_unreadable_volumes: dict[tuple[str, int], str] = {}


@functools.lru_cache(maxsize=2)
def _decoded_volume(path: str, modified_ns: int) -> tuple[np.ndarray, tuple[float, float] | None]:
    """A volume's display slices, decoded once for all the slices asked of it in a row."""
    if is_nifti(path):
        return read_nifti(Path(path))
    return read_multiframe(Path(path))


def load_volume_slice(path: Path, index: int, size: tuple[int, int] | None) -> np.ndarray:
    """Slice `index` (inferior to superior) of a NIfTI volume or multi-frame DICOM."""
    try:
        modified_ns = path.stat().st_mtime_ns
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror})") from error
    key = (str(path), modified_ns)
    with _volume_lock:  # threads (step2's tf.data) wait for one decode rather than repeat it
        if key in _unreadable_volumes:
            raise UserError(_unreadable_volumes[key])
        try:
            slices, spacing = _decoded_volume(*key)
        except Exception as error:
            _unreadable_volumes[key] = str(_as_user_error(path, error))
            raise UserError(_unreadable_volumes[key]) from error
    if not 0 <= index < len(slices):
        raise UserError(f"{path}#{index:03d}: no such slice (the volume has {len(slices)})")
    return _finish(slices[index], spacing, size)


def _as_user_error(path: Path, error: Exception) -> UserError:
    """Any failure to read one file as a one-line UserError naming the file and the
    problem (never a header value, never a traceback)."""
    if isinstance(error, UserError):
        return error
    if isinstance(error, MemoryError):
        return UserError(f"{path}: out of memory reading it")
    return UserError(f"{path}: unreadable ({type(error).__name__}: {problem(error)})")


def load_slice(name: str | Path, size: tuple[int, int] | None) -> np.ndarray:
    """Any slice -> uint8 (H, W, 3) at `size` (H, W), or at its own size for None.

    2-D image files go through gbmpcnsl_common.load_image, bit for bit; DICOM and NIfTI
    through gbmpcnsl.dicom and gbmpcnsl.nifti. Raises UserError naming the file, in one
    line, for any failure to read it.
    """
    try:
        return _load_slice(name, size)
    except Exception as error:
        raise _as_user_error(Path(name), error) from error


def _load_slice(name: str | Path, size: tuple[int, int] | None) -> np.ndarray:
    path = Path(name)
    source, index = split_slice_name(name)
    if index is not None and not path.exists():
        return load_volume_slice(Path(source), index, size)
    if is_nifti(path):
        check_nifti_readable(path)
        raise UserError(f"{path}: a NIfTI volume: name a slice as {path}#<k>")
    if is_dicom(path) and path.exists():
        return _finish(*read_single_frame(path), size)
    if size is None:
        try:
            with Image.open(path) as opened:
                width, height = opened.size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise UserError(f"{path}: cannot read image ({error})") from error
        size = (height, width)
    return load_image(path, size)
