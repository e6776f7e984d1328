"""Sources and slices: the one front door from what a user points at to model pixels.

A *source* is a 2-D image file, a DICOM file (single- or multi-frame), a folder holding a
DICOM series, or a NIfTI volume (.nii, .nii.gz). A *slice* is the unit of every output,
named by its path, or "<path>#<k>" for slice k (0-based, inferior to superior) of a volume.

    find_slices(inputs, ...)  files and folders -> slice names (+ what was skipped, and why)
    load_slice(name, size)    any slice -> uint8 (H, W, 3), the array the model sees

Each source kind has one small reader that delegates to its format library (PIL through
gbmpcnsl_common.load_image, pydicom, nibabel); the intensity rules, each with its reason,
are in the readers' comments and in the README ("Data from the scanner").
"""

from __future__ import annotations

import argparse
import functools
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from gbmpcnsl_common import IMAGE_EXTENSIONS, UserError, load_image, split_slice_name

DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
PERCENTILE_WINDOW = (0.5, 99.5)  # the window 16-bit 2-D images get (gbmpcnsl_common)
NON_AXIAL_HINT = "use --any-orientation to read it anyway"


# ---------------------------------------------------------------------------- kinds
def is_nifti(path: str | Path) -> bool:
    """True for a .nii or .nii.gz file name (any case)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


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


def is_slice_source(path: Path) -> bool:
    """A file this module can read: a 2-D image, a DICOM file or a NIfTI volume."""
    return path.suffix.lower() in IMAGE_EXTENSIONS or is_nifti(path) or is_dicom(path)


def nifti_stem(path: str | Path) -> str:
    """A volume's file name without .nii / .nii.gz ("t1c.nii.gz" -> "t1c")."""
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[: -len(".nii")]


# ---------------------------------------------------------------------------- selection
@dataclass(frozen=True)
class SliceSelection:
    """Which slices of a volume or series: all, the N middle ones, or indices A..B-1."""

    kind: str = "all"  # "all", "middle" or "range"
    first: int = 0
    count: int = 0  # middle: N; range: B

    def indices(self, total: int) -> list[int]:
        """The selected positions among `total` slices (inferior to superior)."""
        if self.kind == "middle":
            start = max(0, (total - self.count) // 2)
            return list(range(start, min(total, start + self.count)))
        if self.kind == "range":
            return list(range(min(self.first, total), min(self.count, total)))
        return list(range(total))


ALL_SLICES = SliceSelection()


def parse_slice_selection(text: str) -> SliceSelection:
    """--slices all | middle:N | A:B (0-based, B excluded), an argparse type."""
    if text == "all":
        return ALL_SLICES
    head, colon, tail = text.partition(":")
    try:
        if colon and head == "middle" and int(tail) >= 1:
            return SliceSelection("middle", 0, int(tail))
        if colon and 0 <= int(head) < int(tail):
            return SliceSelection("range", int(head), int(tail))
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r}: expected all, middle:N (N >= 1) or A:B (0 <= A < B)")


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 0")
    return value


def add_slice_arguments(parser: argparse.ArgumentParser) -> None:
    """The source options step0, step2 and step5 share: --slices, --lesion-masks,
    --min-lesion-pixels, --any-orientation."""
    group = parser.add_argument_group("volumes and DICOM series")
    group.add_argument(
        "--slices",
        type=parse_slice_selection,
        default=ALL_SLICES,
        metavar="all|middle:N|A:B",
        help="slices of each volume or series, inferior to superior, 0-based, B excluded (default: all)",
    )
    group.add_argument(
        "--lesion-masks",
        metavar="PATTERN",
        help="NIfTI only: a lesion mask beside each volume, e.g. '{stem}_seg.nii.gz' ({stem}: the "
        "volume's name without .nii/.nii.gz); only slices with lesion voxels are used",
    )
    group.add_argument(
        "--min-lesion-pixels",
        type=_non_negative_int,
        default=1,
        metavar="N",
        help="with --lesion-masks: labelled voxels a slice needs (default 1)",
    )
    group.add_argument(
        "--any-orientation",
        action="store_true",
        help="also read sagittal and coronal DICOM series and volumes",
    )


# ---------------------------------------------------------------------------- DICOM geometry
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


# ---------------------------------------------------------------------------- expansion
@dataclass
class FoundSlices:
    """Slice names in input order, and the files left out by reason ("hidden", "not an
    image", "non-axial"; the last as "path: why" lines)."""

    names: list[str] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(
        default_factory=lambda: {"hidden": [], "not an image": [], "non-axial": []}
    )


def _volume_names(path_text: str, count: int) -> list[str]:
    return [f"{path_text}#{k:03d}" for k in range(count)]


def _nifti_slices(path: Path, path_text: str, options: dict, found: FoundSlices) -> list[str]:
    """Slice names of one NIfTI volume: its axial slices after reorientation to RAS+,
    filtered by --lesion-masks and --slices. An unreadable header gives the bare path
    (load_slice then names the problem)."""
    import nibabel as nib

    try:
        image = nib.load(path)
        axes = nib.orientations.io_orientation(image.affine)  # voxel axis -> (RAS axis, flip)
        superior_axis = int(np.flatnonzero(axes[:, 0] == 2)[0])
        count = int(image.shape[superior_axis])
        zooms = np.asarray(image.header.get_zooms()[:3], float)
    except Exception:
        return [path_text]
    in_plane = [zooms[axis] for axis in range(3) if axis != superior_axis]
    if not options["any_orientation"] and max(in_plane) > 1.5 * zooms[superior_axis]:
        # 2-D sagittal or coronal acquisitions: thick slices across the axial plane.
        found.skipped["non-axial"].append(
            f"{path_text}: acquired in another plane (voxel size {' x '.join(f'{z:g}' for z in zooms)} mm); {NON_AXIAL_HINT}"
        )
        return []
    indices = list(range(count))
    if options["lesion_masks"]:
        indices = lesion_slices(path, options["lesion_masks"], options["min_lesion_pixels"])
    chosen = [indices[i] for i in options["selection"].indices(len(indices))]
    return [f"{path_text}#{k:03d}" for k in chosen]


def lesion_mask_path(volume: Path, pattern: str) -> Path:
    """The mask of a volume: `pattern` with {stem} replaced, resolved beside the volume."""
    return volume.parent / pattern.replace("{stem}", nifti_stem(volume))


def lesion_slices(volume: Path, pattern: str, min_lesion_pixels: int) -> list[int]:
    """Axial slice indices (RAS+, inferior to superior) where the volume's lesion mask has
    at least `min_lesion_pixels` labelled (non-zero) voxels. Raises UserError for a
    missing mask or one on another voxel grid."""
    import nibabel as nib

    mask_path = lesion_mask_path(volume, pattern)
    if not mask_path.is_file():
        raise UserError(f"--lesion-masks {pattern}: no mask {mask_path} for {volume}")
    try:
        image, mask = nib.load(volume), nib.load(mask_path)
    except Exception as error:
        raise UserError(f"{mask_path}: cannot read lesion mask ({error})") from error
    if image.shape[:3] != mask.shape[:3] or not np.allclose(image.affine, mask.affine, atol=1e-3):
        raise UserError(
            f"{mask_path}: lesion mask is on another voxel grid than {volume} "
            f"(shape {mask.shape[:3]} vs {image.shape[:3]}, or a different affine)"
        )
    labelled = np.asanyarray(nib.as_closest_canonical(mask).dataobj)
    labelled = labelled.reshape(labelled.shape[:3] + (-1,))[..., 0] != 0
    per_slice = labelled.sum(axis=(0, 1))
    return [int(k) for k in np.flatnonzero(per_slice >= min_lesion_pixels)]


@dataclass(frozen=True)
class _DicomHeader:
    """What series grouping and ordering need from a DICOM header (nothing identifying)."""

    frames: int
    normal: np.ndarray | None
    position: np.ndarray | None
    instance_number: int | None
    series_uid: str  # groups files into series; never shown or written


def _dicom_header(path: Path) -> _DicomHeader:
    header = _read_dicom_header(path)
    position = header.get("ImagePositionPatient")
    number = header.get("InstanceNumber")
    return _DicomHeader(
        frames=int(header.get("NumberOfFrames", 1) or 1),
        normal=_slice_normal(_multiframe_orientation(header)),
        position=np.asarray(position, float) if position is not None and len(position) == 3 else None,
        instance_number=int(number) if number is not None else None,
        series_uid=str(header.get("SeriesInstanceUID", "")),
    )


def read_dicom_header(path: Path) -> _DicomHeader | None:
    """The grouping and ordering values of one DICOM file, None when its header cannot be
    read (load_slice names the problem later). A top-level function: pools can map it."""
    try:
        return _dicom_header(path)
    except Exception:
        return None


def _dicom_slices(files: list[tuple[Path, str]], options: dict, found: FoundSlices) -> list[str]:
    """Slice names of DICOM files found together (one folder, or given one by one): each
    multi-frame file is a volume ("path#k"), single-frame files are grouped into series by
    folder and SeriesInstanceUID and ordered along the slice normal (ImagePositionPatient
    on the ImageOrientationPatient normal; InstanceNumber, then the name, as fallbacks)."""
    series: dict[tuple, list[tuple[str, _DicomHeader | None]]] = {}
    names: list[str] = []
    # Only the few values of _DicomHeader are kept, so memory stays flat in the number of files.
    headers = options["header_map"](read_dicom_header, [path for path, _ in files])
    for (path, path_text), header in zip(files, headers, strict=True):
        if header is None:
            series.setdefault(("unreadable", path_text), []).append((path_text, None))
            continue
        if header.frames > 1:
            series.setdefault(("volume", path_text), []).append((path_text, header))
            continue
        series.setdefault(("series", str(path.parent), header.series_uid), []).append((path_text, header))
    for key, members in series.items():
        if key[0] == "unreadable":
            names.append(key[1])  # load_slice reports why it cannot be read
            continue
        normal = members[0][1].normal
        plane = plane_name(normal)
        if plane != "axial" and not options["any_orientation"]:
            where = key[1] if key[0] == "volume" else str(Path(members[0][0]).parent)
            found.skipped["non-axial"].append(
                f"{where}: {plane} DICOM ({len(members)} file(s)); {NON_AXIAL_HINT}"
            )
            continue
        if key[0] == "volume":
            count = members[0][1].frames
            names.extend(_volume_names(key[1], count)[i] for i in options["selection"].indices(count))
            continue
        members.sort(key=lambda member: _series_sort_key(member, normal))
        chosen = options["selection"].indices(len(members))
        names.extend(members[i][0] for i in chosen)
    return names


def _series_sort_key(member: tuple[str, _DicomHeader], normal: np.ndarray | None) -> tuple:
    path_text, header = member
    if normal is not None and header.position is not None:
        return (0, float(header.position @ normal), path_text)
    return (1, header.instance_number or 0, path_text)


def slice_options(args: argparse.Namespace) -> dict:
    """The slice-selection flags of add_slice_arguments, as find_slices' keyword arguments."""
    return {
        "selection": args.slices,
        "lesion_masks": args.lesion_masks,
        "min_lesion_pixels": args.min_lesion_pixels,
        "any_orientation": args.any_orientation,
    }


def find_slices(
    inputs: list[str | Path],
    selection: SliceSelection = ALL_SLICES,
    lesion_masks: str | None = None,
    min_lesion_pixels: int = 1,
    any_orientation: bool = False,
    header_map=map,
) -> FoundSlices:
    """Expand files and folders into slice names, in the order given.

    A file stays the text given (a 2-D image or single-frame DICOM), or becomes its
    slices "<file>#<k>" (NIfTI volume, multi-frame DICOM). A folder expands recursively,
    sorted: 2-D images, volumes, and DICOM series (the single-frame DICOM files of one
    folder and series, in position order). Hidden and unknown files are skipped and listed
    in `.skipped`; so are non-axial DICOM and NIfTI sources unless any_orientation.
    --slices (`selection`) picks slices within each volume and series; `lesion_masks`
    (NIfTI) keeps only slices with lesion voxels. A missing path raises UserError.
    `header_map(function, paths)` reads DICOM headers (a process pool's map, in step0).
    """
    options = {
        "selection": selection,
        "lesion_masks": lesion_masks,
        "min_lesion_pixels": min_lesion_pixels,
        "any_orientation": any_orientation,
        "header_map": header_map,
    }
    found = FoundSlices()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = []
            for candidate in sorted(path.rglob("*")):
                if not candidate.is_file():
                    continue
                if any(part.startswith(".") for part in candidate.relative_to(path).parts):
                    found.skipped["hidden"].append(str(candidate))
                elif is_slice_source(candidate):
                    files.append(candidate)
                else:
                    found.skipped["not an image"].append(str(candidate))
            if not files:
                raise UserError(
                    f"{path}: folder holds no images ({', '.join(IMAGE_EXTENSIONS)}), DICOM files or NIfTI volumes"
                )
            masks = (
                {lesion_mask_path(p, lesion_masks) for p in files if is_nifti(p)} if lesion_masks else set()
            )
            found.names.extend(_expand_files([(p, str(p)) for p in files if p not in masks], options, found))
        elif path.exists():
            found.names.extend(_expand_files([(path, str(item))], options, found))
        else:
            raise UserError(f"{path}: no such file or folder")
    return found


def _expand_files(files: list[tuple[Path, str]], options: dict, found: FoundSlices) -> list[str]:
    """Slice names of files (sorted, from one input): DICOM files are collected into
    series, which take the place of their first file."""
    names: list[str] = []
    dicom_files = [(p, t) for p, t in files if is_dicom(p)]
    dicom_done = False
    for path, path_text in files:
        if is_nifti(path):
            names.extend(_nifti_slices(path, path_text, options, found))
        elif is_dicom(path):
            if not dicom_done:
                names.extend(_dicom_slices(dicom_files, options, found))
                dicom_done = True
        else:
            names.append(path_text)
    return names


# ---------------------------------------------------------------------------- pixels
def window_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly onto 0-255 (rounded, clipped; NaN as low); a flat window gives 0."""
    values = np.asarray(values, dtype=np.float64)
    if not high > low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (np.nan_to_num(values, nan=low) - low) / (high - low) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def percentile_window(values: np.ndarray) -> tuple[float, float]:
    """The 0.5-99.5 percentile window of the finite values (min-max when that is flat):
    the same window gbmpcnsl_common gives 16-bit and float 2-D images."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 0.0
    low, high = np.percentile(finite, PERCENTILE_WINDOW)
    if high <= low:
        low, high = float(finite.min()), float(finite.max())
    return float(low), float(high)


def head_voxels(volume: np.ndarray) -> np.ndarray:
    """The voxels of a volume that belong to the head: above 10% of its 2-98 percentile
    range (FSL BET's rough foreground threshold), so that air does not set the window."""
    finite = volume[np.isfinite(volume)]
    if finite.size == 0:
        return finite
    low, high = np.percentile(finite, [2, 98])
    head = finite[finite > low + 0.1 * (high - low)]
    return head if head.size else finite


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


def _transfer_syntax(ds) -> str:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return f"transfer syntax {uid.name}" if uid is not None else "no transfer syntax"


def _read_dicom(path: Path):
    """The dataset and its decoded pixels (frames first for multi-frame files)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=path.suffix.lower() in DICOM_EXTENSIONS)
    except Exception as error:
        raise UserError(f"{path}: cannot read DICOM ({_first_line(error)})") from error
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise UserError(f"{path}: DICOM file without pixel data")
    try:
        pixels = ds.pixel_array
    except Exception as error:  # no decoder, truncated, inconsistent tags
        raise UserError(
            f"{path}: cannot decode DICOM pixels ({_transfer_syntax(ds)}: {_first_line(error)})"
        ) from error
    return ds, pixels


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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


def load_dicom_file(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """A single-frame DICOM file -> uint8 (H, W, 3) at `size` (None: its own size)."""
    ds, pixels = _read_dicom(path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise UserError(f"{path}: a multi-frame DICOM file ({frames} frames): name a frame as {path}#<k>")
    return _finish(_dicom_frames_to_uint8(ds, pixels, 1)[0], _dicom_spacing(ds), size)


def _load_multiframe(path: Path) -> tuple[np.ndarray, tuple[float, float] | None]:
    """A multi-frame DICOM file -> uint8 frames in inferior-to-superior order, spacing."""
    ds, pixels = _read_dicom(path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    display = _dicom_frames_to_uint8(ds, pixels, frames)
    return display[_frame_order(ds)], _dicom_spacing(ds)


def _load_nifti(path: Path) -> tuple[np.ndarray, tuple[float, float]]:
    """A NIfTI volume -> uint8 axial slices (K, H, W), inferior to superior, shown as a
    radiology viewer shows them, and the in-plane spacing (rows, columns) in mm.

    Reoriented to the closest canonical orientation (RAS+) first, so every file reads the
    same way whatever its affine; scl_slope/scl_inter applied (get_fdata); windowed by the
    header's display range (cal_min/cal_max) when it has one, else by one 0.5-99.5
    percentile window over the head voxels, so all slices of a patient share one scale.
    """
    import nibabel as nib

    try:
        image = nib.as_closest_canonical(nib.load(path))
        volume = image.get_fdata(dtype=np.float32)
    except Exception as error:
        raise UserError(f"{path}: cannot read NIfTI volume ({_first_line(error)})") from error
    if volume.ndim == 4 and volume.shape[3] == 1:
        volume = volume[..., 0]
    if volume.ndim != 3:
        raise UserError(f"{path}: expected a 3-D volume, got shape {volume.shape}")
    cal_min, cal_max = float(image.header["cal_min"]), float(image.header["cal_max"])
    low, high = (cal_min, cal_max) if cal_max > cal_min else percentile_window(head_voxels(volume))
    display = window_to_uint8(volume, low, high)
    # RAS+ array (i: to the right, j: to the front, k: up) -> (k, rows, columns) with
    # anterior at the top and the patient's right on the image's left (radiological view).
    slices = np.ascontiguousarray(np.transpose(display, (2, 1, 0))[:, ::-1, ::-1])
    zooms = image.header.get_zooms()
    return slices, (float(zooms[1]), float(zooms[0]))


_volume_lock = threading.Lock()


@functools.lru_cache(maxsize=2)
def _decoded_volume(path: str, modified_ns: int) -> tuple[np.ndarray, tuple[float, float] | None]:
    """A volume's display slices, decoded once for all the slices asked of it in a row."""
    if is_nifti(path):
        return _load_nifti(Path(path))
    return _load_multiframe(Path(path))


def load_volume_slice(path: Path, index: int, size: tuple[int, int] | None) -> np.ndarray:
    """Slice `index` (inferior to superior) of a NIfTI volume or multi-frame DICOM."""
    try:
        modified_ns = path.stat().st_mtime_ns
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror})") from error
    with _volume_lock:  # threads (step2's tf.data) wait for one decode rather than repeat it
        slices, spacing = _decoded_volume(str(path), modified_ns)
    if not 0 <= index < len(slices):
        raise UserError(f"{path}#{index:03d}: no such slice (the volume has {len(slices)})")
    return _finish(slices[index], spacing, size)


def load_slice(name: str | Path, size: tuple[int, int] | None) -> np.ndarray:
    """Any slice -> uint8 (H, W, 3) at `size` (H, W), or at its own size for None.

    2-D image files go through gbmpcnsl_common.load_image, bit for bit; DICOM and NIfTI
    through their readers above. Raises UserError naming the file when it cannot be read.
    """
    path = Path(name)
    source, index = split_slice_name(name)
    if index is not None and not path.exists():
        return load_volume_slice(Path(source), index, size)
    if is_nifti(path) or (is_dicom(path) and path.exists()):
        if is_nifti(path):
            raise UserError(f"{path}: a NIfTI volume: name a slice as {path}#<k>")
        return load_dicom_file(path, size)
    if size is None:
        try:
            with Image.open(path) as opened:
                width, height = opened.size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise UserError(f"{path}: cannot read image ({error})") from error
        size = (height, width)
    return load_image(path, size)


def source_slice_names(names: list[str]) -> list[list[int]]:
    """Positions of `names` grouped by the file they read, consecutive runs only: a
    volume's slices form one group (decoded once), every other slice its own."""
    groups: list[list[int]] = []
    previous = None
    for position, name in enumerate(names):
        source, index = split_slice_name(name)
        if index is not None and source == previous:
            groups[-1].append(position)
        else:
            groups.append([position])
        previous = source if index is not None else None
    return groups


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
