"""DICOM files: what their headers say (kind, geometry, series, identity) and their pixels.

pydicom does the reading and the intensity transforms (modality LUT, VOI window or LUT,
colour); headers are read for grouping and ordering only, and no header value is ever
shown or written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gbmpcnsl.limits import check_count, check_shape
from gbmpcnsl.nifti import is_nifti
from gbmpcnsl_common import IMAGE_EXTENSIONS, UserError, first_line, percentile_window, window_to_uint8

DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima")


# ---------------------------------------------------------------------------- kinds
def has_dicom_preamble(path: Path) -> bool:
    """True for a file whose bytes 128-131 are "DICM" (a DICOM Part 10 file)."""
    try:
        with open(path, "rb") as file:
            return file.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_dicom(path: Path) -> bool:
    """A DICOM file: a .dcm/.dicom/.ima extension or the DICM preamble (a DICOMDIR index is not)."""
    if path.name.upper() == "DICOMDIR":
        return False
    return path.suffix.lower() in DICOM_EXTENSIONS or (
        path.suffix.lower() not in IMAGE_EXTENSIONS and not is_nifti(path) and has_dicom_preamble(path)
    )


# ---------------------------------------------------------------------------- headers
def _read_dicom_header(path: Path):
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True, force=path.suffix.lower() in DICOM_EXTENSIONS)


def _functional_group_value(ds, sequence: str, keyword: str):
    """A value from the top level of a dataset, else from its shared functional groups
    (enhanced multi-frame files keep geometry there)."""
    if keyword in ds:
        return ds.get(keyword)
    try:
        return ds.SharedFunctionalGroupsSequence[0][sequence][0].get(keyword)
    except (AttributeError, IndexError, KeyError):
        return None


def _slice_normal(orientation) -> np.ndarray | None:
    """Unit normal of an ImageOrientationPatient, its largest component made positive
    (so that positions along it run inferior to superior for axial slices)."""
    if orientation is None or len(orientation) != 6:
        return None
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    return normal * np.sign(normal[np.argmax(np.abs(normal))])


def plane_name(normal: np.ndarray | None) -> str:
    """ "axial", "coronal" or "sagittal": the patient axis closest to the slice normal (LPS)."""
    if normal is None:
        return "axial"  # no geometry: nothing to refuse on
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]


def _frame_order(ds) -> list[int]:
    """Frames of a multi-frame DICOM in inferior-to-superior order (stored order when the
    file has no per-frame positions)."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    normal = _slice_normal(_multiframe_orientation(ds))
    positions = []
    for frame in range(frames):
        try:
            position = (
                ds.PerFrameFunctionalGroupsSequence[frame].PlanePositionSequence[0].ImagePositionPatient
            )
        except (AttributeError, IndexError, KeyError):
            return list(range(frames))
        positions.append(np.asarray(position, float))
    if normal is None:
        return list(range(frames))
    return sorted(range(frames), key=lambda frame: (float(positions[frame] @ normal), frame))


def _multiframe_orientation(ds):
    orientation = _functional_group_value(ds, "PlaneOrientationSequence", "ImageOrientationPatient")
    if orientation is None:
        try:
            return ds.PerFrameFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
        except (AttributeError, IndexError, KeyError):
            return None
    return orientation


@dataclass(frozen=True)
class DicomHeader:
    """What series grouping and ordering need from a DICOM header (nothing identifying)."""

    frames: int
    normal: np.ndarray | None
    position: np.ndarray | None
    instance_number: int | None
    series_uid: str  # groups files into series; never shown or written
    description: str = ""  # SeriesDescription: the series' name in messages and outputs
    sop_class: str = ""  # SOPClassUID and Modality: tell images from SEG, SR, RTSTRUCT ...
    modality: str = ""


def _dicom_header(path: Path) -> DicomHeader:
    header = _read_dicom_header(path)
    position = header.get("ImagePositionPatient")
    number = header.get("InstanceNumber")
    return DicomHeader(
        frames=int(header.get("NumberOfFrames", 1) or 1),
        normal=_slice_normal(_multiframe_orientation(header)),
        position=np.asarray(position, float) if position is not None and len(position) == 3 else None,
        instance_number=int(number) if number is not None else None,
        series_uid=str(header.get("SeriesInstanceUID", "")),
        description=" ".join(str(header.get("SeriesDescription", "") or "").split()),
        sop_class=str(
            header.get("SOPClassUID", "")
            or getattr(getattr(header, "file_meta", None), "MediaStorageSOPClassUID", "")
        ),
        modality=str(header.get("Modality", "") or "").strip().upper(),
    )


def read_dicom_header(path: Path) -> DicomHeader | None:
    """The grouping and ordering values of one DICOM file, None when its header cannot be
    read (load_slice names the problem later). A top-level function: pools can map it."""
    try:
        return _dicom_header(path)
    except Exception:
        return None


def series_sort_key(member: tuple[str, DicomHeader], normal: np.ndarray | None) -> tuple:
    """Order of a series member: its position along the slice normal, else its
    InstanceNumber; then its name."""
    path_text, header = member
    if normal is not None and header.position is not None:
        return (0, float(header.position @ normal), path_text)
    return (1, header.instance_number or 0, path_text)


def dicom_identities(paths: list[Path]) -> dict[str, set[str]]:
    """{"PatientID": {...}, "StudyInstanceUID": {...}} found in these DICOM files' headers.

    Only for comparing patient folders in memory: the values are never printed or written.
    """
    import pydicom

    found: dict[str, set[str]] = {"PatientID": set(), "StudyInstanceUID": set()}
    for path in paths:
        try:
            header = pydicom.dcmread(
                path,
                stop_before_pixels=True,
                specific_tags=list(found),
                force=path.suffix.lower() in DICOM_EXTENSIONS,
            )
        except Exception:
            continue
        for keyword, values in found.items():
            value = str(header.get(keyword, "") or "").strip()
            if value:
                values.add(value)
    return found


# ---------------------------------------------------------------------------- pixels
def _header_int(ds, keyword: str) -> int:
    """A count from the header (1 when absent or empty); UserError when not a number."""
    try:
        return int(ds.get(keyword, 1) or 1)
    except (TypeError, ValueError) as error:
        raise UserError(f"{ds.filename}: {keyword} is not a number") from error


# The pixel part's own imports (kept here, apart from the header part's).
import functools  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import warnings  # noqa: E402

from gbmpcnsl.dicom_display import (  # noqa: E402
    color_to_uint8,
    frame_views,
    frames_by_view,
    series_members,
    unpadded_values,
    voi_to_display,
)


def _transfer_syntax(ds) -> str:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if uid is None:
        return "no transfer syntax"
    return f"transfer syntax {uid.name}" if uid.name != str(uid) else "an unknown transfer syntax"


def problem(error: BaseException) -> str:
    """An exception's first line (and the next, when the first ends with a colon), with
    anything quoted in it left out: pydicom quotes the header values it complains about,
    and no header value may reach any output."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [first_line(error)]
    text = lines[0] + (f" {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else "")
    text = re.sub(r"(?<!\w)('[^']*'|\"[^\"]*\")(?!\w)", "...", text)
    return text if len(text) <= 200 else text[:197] + "..."


def _read_dicom(path: Path):
    """The dataset and its decoded pixels (frames first for multi-frame files)."""
    import pydicom

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE  # header values unquoted
    try:
        ds = pydicom.dcmread(path, force=path.suffix.lower() in DICOM_EXTENSIONS)
    except Exception as error:
        raise UserError(f"{path}: cannot read DICOM ({problem(error)})") from error
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise UserError(f"{path}: DICOM file without pixel data")
    declared = [
        _header_int(ds, keyword) for keyword in ("NumberOfFrames", "Rows", "Columns", "SamplesPerPixel")
    ]
    check_count("frames", declared[0], "GBMPCNSL_MAX_SLICES", path)
    check_shape(declared, "GBMPCNSL_MAX_VOXELS", path, "pixels (frames x rows x columns x samples)")
    try:
        pixels = ds.pixel_array
    except MemoryError as error:
        raise UserError(
            f"{path}: out of memory decoding {declared[0]} frame(s) of {declared[1]}x{declared[2]}"
        ) from error
    except Exception as error:  # no decoder, truncated, inconsistent tags
        raise UserError(
            f"{path}: cannot decode DICOM pixels ({_transfer_syntax(ds)}: {problem(error)})"
        ) from error
    return ds, pixels


def quiet_pydicom() -> None:
    """Nothing from pydicom on any output: its logger (decoders log whole tracebacks) and
    its warnings (validation warnings quote header values, e.g. an invalid UID). Run at
    import, so worker processes inherit it (fork) or repeat it (forkserver, spawn)."""
    logger = logging.getLogger("pydicom")
    logger.propagate = False
    if not any(isinstance(handler, logging.NullHandler) for handler in logger.handlers):
        logger.addHandler(logging.NullHandler())  # else logging's last resort prints warnings
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    warnings.filterwarnings(
        "ignore", module=r"gbmpcnsl\.(dicom|sources|convert|pixels)$", category=UserWarning
    )
    config = sys.modules.get("pydicom.config")
    if config is not None:
        config.settings.reading_validation_mode = config.IGNORE


# ---------------------------------------------------------------------------- grey levels
_series_lock = threading.Lock()


@functools.lru_cache(maxsize=16)
def _series_window(members: tuple[Path, ...]) -> tuple[float, float]:
    """The percentile window of a series of single-frame files: over the Modality LUT
    values of every grey file of it that decodes, PixelPaddingValue pixels excluded."""
    values = []
    for member in members:
        try:
            ds, stored = _read_dicom(member)
        except UserError:
            continue
        if int(ds.get("NumberOfFrames", 1) or 1) == 1 and _photometric(ds) in GREY:
            values.append(unpadded_values(stored[np.newaxis], ds, frame_views(ds, 1)))
    return percentile_window(np.concatenate(values) if values else np.zeros(0))


def _photometric(ds) -> str:
    return str(ds.get("PhotometricInterpretation", "")).upper()


def _gray_to_uint8(stored: np.ndarray, view, window) -> np.ndarray:
    """Stored grey values -> uint8: the Modality LUT, then the view's first VOI (or, with
    none, `window()`, the series' or volume's percentile window), MONOCHROME1 inverted.

    Integer images are mapped level by level, as viewers do: the pipeline runs once per
    stored value between the image's minimum and maximum and the pixels index that table
    (the same result, several times faster than running it on every pixel).
    """
    if np.issubdtype(stored.dtype, np.integer) and stored.size:
        first, last = int(stored.min()), int(stored.max())
        if last - first < stored.size:
            levels = np.arange(first, last + 1).astype(stored.dtype)
            return _gray_levels_to_uint8(levels, view, window)[stored.astype(np.int64) - first]
    return _gray_levels_to_uint8(stored, view, window)


def _gray_levels_to_uint8(stored: np.ndarray, view, window) -> np.ndarray:
    """_gray_to_uint8 on every element of `stored`."""
    from pydicom.pixels.processing import apply_modality_lut

    values = apply_modality_lut(stored, view)
    display = voi_to_display(values, view)
    if display is None:
        display = window_to_uint8(values, *window())
    else:
        display = np.clip(np.rint(display), 0, 255).astype(np.uint8)
    if _photometric(view) == "MONOCHROME1":
        display = 255 - display
    return display


def _frames_to_uint8(path: Path, ds, pixels: np.ndarray, frames: int) -> np.ndarray:
    """All frames as uint8 (F, H, W) or (F, H, W, 3). Grey frames without a VOI of their
    own share one percentile window: the multi-frame file's, or the series' for a
    single-frame file."""
    stack = pixels if frames > 1 else pixels[np.newaxis]
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1 or _photometric(ds) == "PALETTE COLOR":
        try:
            return color_to_uint8(stack, ds)
        except ValueError as error:
            raise UserError(f"{path}: {error}") from error
    if _photometric(ds) not in GREY:
        raise UserError(f"{path}: unsupported photometric interpretation")
    views = frame_views(ds, frames)
    window_cache: list[tuple[float, float]] = []

    def window() -> tuple[float, float]:
        if not window_cache:
            if frames > 1:
                window_cache.append(percentile_window(unpadded_values(stack, ds, views)))
            else:
                with _series_lock:
                    window_cache.append(_series_window(tuple(series_members(path))))
        return window_cache[0]

    display = np.empty(stack.shape, dtype=np.uint8)
    for key_frames in frames_by_view(views).values():
        display[key_frames] = _gray_to_uint8(stack[key_frames], views[key_frames[0]], window)
    return display


def _dicom_spacing(ds) -> tuple[float, float] | None:
    spacing = _functional_group_value(ds, "PixelMeasuresSequence", "PixelSpacing")
    if spacing is None:
        spacing = ds.get("ImagerPixelSpacing")
    try:
        return (float(spacing[0]), float(spacing[1])) if spacing is not None else None
    except (TypeError, ValueError, IndexError):
        return None


def read_single_frame(path: Path) -> tuple[np.ndarray, tuple[float, float] | None]:
    """A single-frame DICOM file -> uint8 display pixels (H, W) or (H, W, 3), pixel spacing."""
    ds, pixels = _read_dicom(path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise UserError(f"{path}: a multi-frame DICOM file ({frames} frames): name a frame as {path}#<k>")
    return _frames_to_uint8(path, ds, pixels, 1)[0], _dicom_spacing(ds)


def read_multiframe(path: Path) -> tuple[np.ndarray, tuple[float, float] | None]:
    """A multi-frame DICOM file -> uint8 frames in inferior-to-superior order, spacing."""
    ds, pixels = _read_dicom(path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    display = _frames_to_uint8(path, ds, pixels, frames)
    return display[_frame_order(ds)], _dicom_spacing(ds)


GREY = ("MONOCHROME1", "MONOCHROME2")
quiet_pydicom()
