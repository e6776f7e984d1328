"""The contract every gbm-pcnsl step shares: class labels, the names of the HDF5 layout,
the image loader and its one intensity window, the patient rule, and how a step reports
an expected failure.

Everything that two or more steps must agree on lives here, nothing else; the machinery is
in the gbmpcnsl/ package beside it. TensorFlow is imported lazily (import_tensorflow) so
that `--help` and argument errors answer at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from gbmpcnsl import __version__ as __version__  # one version: the package's

# ---------------------------------------------------------------------------- classes
# The model outputs P(PCNSL): GBM is label 0, PCNSL is label 1.
CLASS_NAMES = ("GBM", "PCNSL")
CLASS_FOLDERS = ("gbm", "pcnsl")
CLASS_LABELS = {"gbm": 0, "pcnsl": 1}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
DEFAULT_SIZE = (380, 380)


# ---------------------------------------------------------------------------- errors and logging
class UserError(Exception):
    """An expected failure (bad file, bad flag, existing output): reported in one line."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


log = logging.getLogger("gbmpcnsl")


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr; silence TensorFlow's C++ and Python chatter unless verbose."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
        force=True,
    )
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
        logging.getLogger("absl").setLevel(logging.ERROR)


@contextlib.contextmanager
def _native_stderr_silenced():
    """Point file descriptor 2 at /dev/null for the duration (C++ libraries write there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def import_tensorflow(verbose: bool = False):
    """Import TensorFlow and Keras and find the devices, without TF's start-up chatter.

    TF 2.21 writes absl/oneDNN/CUDA notices to stderr from C++ at import and at device
    discovery whatever TF_CPP_MIN_LOG_LEVEL says; unless verbose, they go to /dev/null.
    Python exceptions still surface (after stderr is restored). Returns the tf module.
    """
    if verbose:
        import tensorflow as tf

        return tf
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _native_stderr_silenced():
        import keras  # noqa: F401
        import tensorflow as tf

        tf.config.list_physical_devices()
    return tf


def run_main(main_body, argv) -> int:
    """Run a step's main body, turning UserError into a one-line message and exit code 2.

    KeyboardInterrupt exits 130 with one line, never a traceback.
    """
    try:
        return main_body(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except MemoryError:  # the readers' limits (docs/security.md) should have stopped it earlier
        print("error: out of memory; nothing was written", file=sys.stderr)
        return 2


@contextlib.contextmanager
def interrupt_between_batches():
    """Defer Ctrl-C to a batch boundary: inside, SIGINT is only recorded, and the yielded
    check() raises KeyboardInterrupt where the caller calls it (between batches). A
    KeyboardInterrupt raised in the middle of a TensorFlow call, with tf.data threads
    running, crashed step2 in glibc (free(): invalid next size) instead of exiting 130."""
    import signal

    received = []

    def check() -> None:
        if received:
            raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except ValueError:  # not the main thread: leave Ctrl-C as it is
        yield check
        return
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, previous)
    check()


# ---------------------------------------------------------------------------- images
PERCENTILE_WINDOW = (0.5, 99.5)  # percentiles: a robust window, outliers do not set it


def window_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly onto 0-255 (rounded, clipped; NaN as low); a flat window gives 0."""
    values = np.asarray(values, dtype=np.float64)
    if not high > low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (np.nan_to_num(values, nan=low) - low) / (high - low) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def percentile_window(values: np.ndarray) -> tuple[float, float]:
    """The 0.5-99.5 percentile window of the finite values (min-max when that is flat;
    (0, 0) when none is finite): the one window of 16-bit and float images, DICOM files
    without a window of their own and NIfTI volumes without a display range."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 0.0
    low, high = np.percentile(finite, PERCENTILE_WINDOW)
    if high <= low:
        low, high = float(finite.min()), float(finite.max())
    return float(low), float(high)


def load_image(path: str | Path, size: tuple[int, int] = DEFAULT_SIZE) -> np.ndarray:
    """Read an image file as a uint8 array of shape (H, W, 3), size = (H, W).

    8-bit images go through `Image.convert("RGB").resize((W, H), Image.LANCZOS)`, bit for
    bit as the original implementation (published checkpoints were trained on these
    pixels). 16-bit and float images (modes I;16*, I, F) are first windowed to 0-255.
    Any unreadable or truncated file raises UserError naming the file.
    """
    height, width = size
    try:
        with Image.open(path) as image:
            wide = image.mode in ("I", "F") or image.mode.startswith("I;16")
            if wide:  # windowed as float64: PIL's own bound (179 Mpx) is far too high for it
                from gbmpcnsl.limits import check_shape

                check_shape(image.size, "GBMPCNSL_MAX_PIXELS", path, "pixels")
            image.load()  # decode now: a truncated file fails here, inside the try
            if wide:
                # convert("RGB") clips these at 255 (most of a 16-bit MRI export turns white)
                values = np.asarray(image, dtype=np.float64)
                image = Image.fromarray(window_to_uint8(values, *percentile_window(values)), mode="L")
            rgb = image.convert("RGB").resize((width, height), Image.LANCZOS)
            return np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise UserError(f"{path}: cannot read image ({error})") from error
    except MemoryError as error:
        raise UserError(f"{path}: out of memory reading this image") from error


# ---------------------------------------------------------------------------- patients
VOLUME_SUFFIXES = (".nii.gz", ".nii")


def split_slice_name(name: str | Path) -> tuple[str, int | None]:
    """ "gbm/p017/t1c.nii.gz#045" -> ("gbm/p017/t1c.nii.gz", 45); a 2-D file -> (name, None)."""
    text = str(name).replace("\\", "/")
    source, hash_sign, index = text.rpartition("#")
    if hash_sign and index.isdigit():
        return source, int(index)
    return text, None


def _source_stem(name: str) -> str:
    """A source file's name without its image or volume extension ("t1c.nii.gz" -> "t1c")."""
    lower = name.lower()
    for suffix in VOLUME_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def patient_id(slice_name: str | Path, root: str | Path | None = None) -> str:
    """The patient (group) id of a slice, qualified by its class: "gbm/p017".

    The one patient rule of every step (step0's groups, step1's split, step2's per-patient
    output, roc_analysis). `slice_name` is a path relative to DATA (step0) or any path that
    holds the class folder (a predictions CSV), with or without a volume's "#k" suffix:
    - the folder right under the last gbm/ or pcnsl/ folder of the path is the patient, so
      gbm/p01/series2/x.dcm and gbm/p01/series3/y.dcm are one patient, and gbm/001 and
      pcnsl/001 are two (most exports number patients per class);
    - a source directly in a class folder is its own patient ("gbm/img001.png" ->
      "gbm/img001"), and every slice of one volume or series is one patient;
    - without a class folder, under `root` (the folder named on the command line, which
      then holds one folder per patient): the folder right under root, so
      pacs/P017/ST1/SE2/x.dcm is "pacs/P017" for root "pacs";
    - otherwise (a source directly in root, a file named on the command line): its folder
      (a volume: the volume itself).
    The path stays as written: an absolute one keeps its leading "/".
    """
    source, index = split_slice_name(slice_name)
    parts = [part for part in source.split("/") if part not in ("", ".")]
    for position in range(len(parts) - 2, -1, -1):
        folder = parts[position].lower()
        if folder in CLASS_LABELS:
            rest = parts[position + 1 :]
            return f"{folder}/{rest[0] if len(rest) > 1 else _source_stem(rest[0])}"
    lead = "/" if source.startswith("/") else ""
    if root is not None:
        top = [part for part in str(root).replace("\\", "/").split("/") if part not in ("", ".")]
        if parts[: len(top)] == top and len(parts) > len(top) + 1:
            return lead + "/".join(parts[: len(top) + 1])
    if index is not None or len(parts) < 2:
        return lead + "/".join(parts)
    return lead + "/".join(parts[:-1])


# ---------------------------------------------------------------------------- HDF5
# /<class>/<H>_<W>/features  uint8 (N, H, W, 3)
# /<class>/<H>_<W>/labels    uint8 (N,)
# /<class>/<H>_<W>/paths     UTF-8 strings (relative to the data folder)
# /<class>/<H>_<W>/groups    UTF-8 strings (patient id)
# /<class>/<H>_<W>/series    UTF-8 strings (the slice's series: its SeriesDescription or
#                            volume file name; "" for a 2-D image); absent in older files
# Reading and writing it: gbmpcnsl/hdf5.py.
HDF5_FORMAT_VERSION = 1
FEATURES, LABELS, PATHS, GROUPS, SERIES = "features", "labels", "paths", "groups", "series"


def size_key(size: tuple[int, int]) -> str:
    """(380, 380) -> "380_380", the name of a size group in the HDF5 file."""
    return f"{size[0]}_{size[1]}"


def parse_size_key(key: str) -> tuple[int, int]:
    """ "380_380" -> (380, 380)."""
    height, width = key.split("_")
    return int(height), int(width)
