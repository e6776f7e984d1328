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


def _transfer_syntax(ds) -> str:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return f"transfer syntax {uid.name}" if uid is not None else "no transfer syntax"


def _read_dicom(path: Path):
    """The dataset and its decoded pixels (frames first for multi-frame files)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=path.suffix.lower() in DICOM_EXTENSIONS)
    except Exception as error:
        raise UserError(f"{path}: cannot read DICOM ({first_line(error)})") from error
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
            f"{path}: cannot decode DICOM pixels ({_transfer_syntax(ds)}: {first_line(error)})"
        ) from error
    return ds, pixels


def _voi_input_bounds(ds) -> tuple[float, float] | None:
    """The first VOI window of a dataset as (lowest, highest) input value: the VOI LUT's
    input range, or the window's edges (PS3.3 C.11.2.1.2); None when there is none."""
    if ds.get("VOILUTSequence") and ds.VOILUTSequence[0].get("LUTDescriptor") is not None:
        entries, first_mapped = ds.VOILUTSequence[0].LUTDescriptor[:2]
        return float(first_mapped), float(first_mapped + (entries or 2**16) - 1)
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None
    center, width = (
        v[0] if getattr(v, "VM", 1) > 1 or isinstance(v, list) else v
        for v in (ds.WindowCenter, ds.WindowWidth)
    )
    function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
    if function == "LINEAR":
        return float(center) - 0.5 - (float(width) - 1) / 2, float(center) - 0.5 + (float(width) - 1) / 2
    if function == "SIGMOID":  # never reaches its ends: take them far out
        return float(center) - 50 * float(width), float(center) + 50 * float(width)
    return float(center) - float(width) / 2, float(center) + float(width) / 2


def dicom_gray_to_uint8(stored: np.ndarray, ds, window: tuple[float, float] | None = None) -> np.ndarray:
    """Stored grey values of a DICOM image -> uint8 display values.

    Modality LUT first (RescaleSlope/RescaleIntercept: stored values -> scanner units),
    then the file's first VOI window or VOI LUT (what the radiologist saw), scaled from the
    window's own output bounds to 0-255 (pydicom maps it onto the stored-bits range);
    without one, `window` (low, high) in scanner units, or the 0.5-99.5 percentile
    window 16-bit images get. MONOCHROME1 (0 = white) is inverted.

    Integer images are mapped level by level, as viewers do: the pipeline runs once per
    stored value between the image's minimum and maximum and the pixels index that table
    (the same result, several times faster than running it on every pixel).
    """
    from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

    bounds = _voi_input_bounds(ds)
    if bounds is not None:
        try:  # a broken window (e.g. width < 1) counts as none
            apply_voi_lut(np.asarray(bounds, dtype=np.int64 if ds.get("VOILUTSequence") else np.float64), ds)
        except (ValueError, NotImplementedError, TypeError):
            bounds = None
    if bounds is None and window is None:
        window = percentile_window(apply_modality_lut(stored, ds))
    if np.issubdtype(stored.dtype, np.integer) and stored.size:
        first, last = int(stored.min()), int(stored.max())
        if last - first < stored.size:
            levels = np.arange(first, last + 1).astype(stored.dtype)
            table = _gray_levels_to_uint8(levels, ds, bounds, window)
            return table[stored.astype(np.int64) - first]
    return _gray_levels_to_uint8(stored, ds, bounds, window)


def _gray_levels_to_uint8(stored: np.ndarray, ds, bounds, window) -> np.ndarray:
    """dicom_gray_to_uint8 on every element of `stored`, with the VOI input bounds (None:
    no usable VOI) or the fallback window already decided."""
    from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(stored, ds)
    if bounds is not None:
        lut = bool(ds.get("VOILUTSequence"))
        if lut:  # LUTs index integer values; outside the LUT's inputs, its end entries apply
            # (clipped here: pydicom's uint8 index array wraps for 8-bit LUTs)
            values = np.clip(np.rint(values), *bounds).astype(np.int64)
        windowed = apply_voi_lut(values, ds, index=0)
        out_low, out_high = apply_voi_lut(
            np.asarray(bounds, dtype=np.int64 if lut else np.float64), ds, index=0
        )
        display = window_to_uint8(windowed, float(out_low), float(out_high))
    else:
        display = window_to_uint8(values, *window)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        display = 255 - display
    return display


def _dicom_color_to_uint8(pixels: np.ndarray, ds) -> np.ndarray:
    """RGB (pydicom already converted YBR_* to RGB) or PALETTE COLOR -> uint8 RGB."""
    from pydicom.pixels.processing import apply_color_lut

    if str(ds.PhotometricInterpretation).upper() == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    if pixels.dtype != np.uint8:  # 16-bit colour or palette entries: keep the top 8 bits
        bits = 16 if pixels.max(initial=0) > 255 else 8
        pixels = (pixels.astype(np.uint32) >> (bits - 8)).astype(np.uint8)
    return pixels


def _dicom_spacing(ds) -> tuple[float, float] | None:
    spacing = _functional_group_value(ds, "PixelMeasuresSequence", "PixelSpacing")
    if spacing is None:
        spacing = ds.get("ImagerPixelSpacing")
    try:
        return (float(spacing[0]), float(spacing[1])) if spacing is not None else None
    except (TypeError, ValueError, IndexError):
        return None


def _dicom_frames_to_uint8(ds, pixels: np.ndarray, frames: int) -> np.ndarray:
    """All frames as uint8 (F, H, W) or (F, H, W, 3); one percentile window for the whole
    file when it has no VOI window, so the frames share one intensity scale."""
    color = (
        int(ds.get("SamplesPerPixel", 1)) > 1 or str(ds.PhotometricInterpretation).upper() == "PALETTE COLOR"
    )
    stack = pixels if frames > 1 else pixels[np.newaxis]
    if color:
        return _dicom_color_to_uint8(stack, ds)
    window = None
    if frames > 1 and _voi_input_bounds(ds) is None:
        from pydicom.pixels.processing import apply_modality_lut

        window = percentile_window(apply_modality_lut(stack, ds))
    return dicom_gray_to_uint8(stack, ds, window)


def read_single_frame(path: Path) -> tuple[np.ndarray, tuple[float, float] | None]:
    """A single-frame DICOM file -> uint8 display pixels (H, W) or (H, W, 3), pixel spacing."""
    ds, pixels = _read_dicom(path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise UserError(f"{path}: a multi-frame DICOM file ({frames} frames): name a frame as {path}#<k>")
    return _dicom_frames_to_uint8(ds, pixels, 1)[0], _dicom_spacing(ds)


def read_multiframe(path: Path) -> tuple[np.ndarray, tuple[float, float] | None]:
    """A multi-frame DICOM file -> uint8 frames in inferior-to-superior order, spacing."""
    ds, pixels = _read_dicom(path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    display = _dicom_frames_to_uint8(ds, pixels, frames)
    return display[_frame_order(ds)], _dicom_spacing(ds)
