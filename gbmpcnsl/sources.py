"""Sources and slices: from the files and folders a user names to slice names.

A *source* is a 2-D image file, a DICOM file (single- or multi-frame), a folder holding a
DICOM series, or a NIfTI volume (.nii, .nii.gz). A *slice* is the unit of every output,
named by its path, or "<path>#<k>" for slice k (0-based, inferior to superior) of a volume.

    find_slices(inputs, ...)  files and folders -> slice names (+ what was skipped, and why)

Reading a slice's pixels is gbmpcnsl.pixels.load_slice; the format details are in
gbmpcnsl.dicom and gbmpcnsl.nifti.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gbmpcnsl.cli import non_negative_int
from gbmpcnsl.dicom import DicomHeader, is_dicom, plane_name, read_dicom_header, series_sort_key
from gbmpcnsl.limits import check_count, check_shape
from gbmpcnsl.nifti import is_nifti, lesion_mask_path, lesion_slices
from gbmpcnsl.series import (
    Unit,
    add_series_arguments,
    non_image_kind,
    select_series,
    series_label,
    walk_folder,
)
from gbmpcnsl_common import IMAGE_EXTENSIONS, UserError, patient_id, split_slice_name

NON_AXIAL_HINT = "use --any-orientation to read it anyway"


# ---------------------------------------------------------------------------- kinds
def is_slice_source(path: Path) -> bool:
    """A file gbmpcnsl.pixels can read: a 2-D image, a DICOM file or a NIfTI volume."""
    return path.suffix.lower() in IMAGE_EXTENSIONS or is_nifti(path) or is_dicom(path)


def is_image_file(path: Path) -> bool:
    """True for a visible file with a supported image extension (any case)."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


# ---------------------------------------------------------------------------- selection
@dataclass(frozen=True)
class SliceSelection:
    """Which slices of a volume or series: all, the N middle ones, or indices A..B-1."""

    kind: str = "all"  # "all", "middle" or "range"
    first: int = 0
    count: int = 0  # middle: N; range: B

    def text(self) -> str:
        """The --slices text that gives this selection."""
        if self.kind == "middle":
            return f"middle:{self.count}"
        return f"{self.first}:{self.count}" if self.kind == "range" else "all"

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


def add_slice_arguments(parser: argparse.ArgumentParser, strict: bool = True) -> None:
    """The source options step0, step2 and step5 share: --slices, --lesion-masks,
    --min-lesion-pixels, --any-orientation; --series, --all-series, --cohort and (unless
    the step has its own) --strict."""
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
        type=non_negative_int,
        default=1,
        metavar="N",
        help="with --lesion-masks: labelled voxels a slice needs (default 1)",
    )
    group.add_argument(
        "--any-orientation",
        action="store_true",
        help="also read sagittal and coronal DICOM series and volumes",
    )
    add_series_arguments(parser.add_argument_group("series and cohort"), strict)


def slice_options(args: argparse.Namespace) -> dict:
    """The flags of add_slice_arguments but --cohort, as find_slices' keyword arguments."""
    return {
        "selection": args.slices,
        "lesion_masks": args.lesion_masks,
        "min_lesion_pixels": args.min_lesion_pixels,
        "any_orientation": args.any_orientation,
        "series": args.series,
        "all_series": args.all_series,
        "strict": args.strict,
    }


# ---------------------------------------------------------------------------- expansion
@dataclass
class FoundSlices:
    """Slice names in input order, each slice's series name ("" for a 2-D image) and
    patient (the patient rule, or --cohort's patient_id), the files left out by reason
    ("hidden", "not an image", "non-axial" as "path: why" lines, "DICOM SEG" and the
    other non-image kinds, "other series", "several series"), and warning lines."""

    names: list[str] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(
        default_factory=lambda: {"hidden": [], "not an image": [], "non-axial": []}
    )
    series: list[str] = field(default_factory=list)
    patients: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def lookup(self, what: str) -> dict[str, str]:
        """{slice name: its series} (what="series") or {slice name: its patient} ("patients")."""
        return dict(zip(self.names, getattr(self, what), strict=True))

    def add(self, unit: Unit) -> None:
        self.names.extend(unit.names)
        self.series.extend([unit.series] * len(unit.names))
        self.patients.extend([unit.patient] * len(unit.names))


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
    check_count("slices", count, "GBMPCNSL_MAX_SLICES", path)
    check_shape(image.shape, "GBMPCNSL_MAX_VOXELS", path)
    in_plane = [zooms[axis] for axis in range(3) if axis != superior_axis]
    if not options["any_orientation"] and max(in_plane) > 1.5 * zooms[superior_axis]:
        # 2-D sagittal or coronal acquisitions: thick slices across the axial plane.
        found.skipped["non-axial"].append(
            f"{path_text}: acquired in another plane (voxel size {' x '.join(f'{z:g}' for z in zooms)} mm); {NON_AXIAL_HINT}"
        )
        return []
    if options["lesion_masks"]:
        indices = lesion_slices(path, options["lesion_masks"], options["min_lesion_pixels"])
        chosen = [indices[i] for i in options["selection"].indices(len(indices))]
    else:  # --slices first: only the chosen names are built
        chosen = options["selection"].indices(count)
    return [f"{path_text}#{k:03d}" for k in chosen]


def _dicom_units(files: list[tuple[Path, str]], options: dict, found: FoundSlices) -> list[Unit]:
    """The DICOM files found together (one folder, or given one by one) as units: each
    multi-frame file is a volume ("path#k"), single-frame files are grouped into series by
    folder and SeriesInstanceUID and ordered along the slice normal (ImagePositionPatient
    on the ImageOrientationPatient normal; InstanceNumber, then the name, as fallbacks).
    Objects that are not images (SEG, SR ...) are skipped by kind, and so is every
    non-axial file (its plane decided by its own orientation) unless --any-orientation."""
    series: dict[tuple, list[tuple[str, DicomHeader | None]]] = {}
    non_axial: dict[tuple[str, str], int] = {}
    # Only the few values of DicomHeader are kept, so memory stays flat in the number of files.
    headers = options["header_map"](read_dicom_header, [path for path, _ in files])
    for (path, path_text), header in zip(files, headers, strict=True):
        if header is None:
            series.setdefault(("unreadable", path_text), []).append((path_text, None))
            continue
        kind = non_image_kind(header)
        if kind is not None:
            found.skipped.setdefault(f"DICOM {kind}", []).append(path_text)
            continue
        volume = header.frames > 1
        plane = plane_name(header.normal)
        if plane != "axial" and not options["any_orientation"]:
            where = (path_text if volume else str(Path(path_text).parent), plane)
            non_axial[where] = non_axial.get(where, 0) + 1
            continue
        key = ("volume", path_text) if volume else ("series", str(path.parent), header.series_uid)
        series.setdefault(key, []).append((path_text, header))
    for (where, plane), count in non_axial.items():
        found.skipped["non-axial"].append(f"{where}: {plane} DICOM ({count} file(s)); {NON_AXIAL_HINT}")
    units = []
    for key, members in series.items():
        header = members[0][1]
        if header is None:
            units.append(Unit([key[1]]))  # load_slice reports why it cannot be read
        elif key[0] == "volume":
            check_count("frames", header.frames, "GBMPCNSL_MAX_SLICES", key[1])
            names = [f"{key[1]}#{k:03d}" for k in options["selection"].indices(header.frames)]
            units.append(Unit(names, series_label(header.description or Path(key[1]).name), True))
        else:
            members.sort(key=lambda member: series_sort_key(member, header.normal))
            names = [members[i][0] for i in options["selection"].indices(len(members))]
            units.append(Unit(names, series_label(header.description or Path(key[1]).name), True))
    return units


def find_slices(
    inputs: list[str | Path],
    selection: SliceSelection = ALL_SLICES,
    lesion_masks: str | None = None,
    min_lesion_pixels: int = 1,
    any_orientation: bool = False,
    header_map=map,
    **series_options,
) -> FoundSlices:
    """Expand files and folders into slice names, in the order given.

    A file stays the text given (a 2-D image or single-frame DICOM), or becomes its
    slices "<file>#<k>" (NIfTI volume, multi-frame DICOM). A folder expands recursively
    (following symlinks), sorted: 2-D images, volumes, and DICOM series (the single-frame
    DICOM files of one folder and series, in position order). Hidden and unknown files,
    DICOM objects that are not images, and non-axial DICOM files and NIfTI volumes
    (unless any_orientation) are skipped and listed in `.skipped`. --slices (`selection`)
    picks slices within each volume and series; `lesion_masks` (NIfTI) keeps only slices
    with lesion voxels, and the masks are never series. `series_options`: series (a
    compiled --series pattern), all_series, strict, and patients ({input as given:
    patient id}, --cohort's; "": the patient rule without the folder as root) - see
    gbmpcnsl.series.select_series; the one-series-per-
    patient rule applies to folders, not to files named one by one. A missing path raises
    UserError. `header_map(function, paths)` reads DICOM headers (a process pool's map, in step0).
    """
    options = {
        "selection": selection,
        "lesion_masks": lesion_masks,
        "min_lesion_pixels": min_lesion_pixels,
        "any_orientation": any_orientation,
        "header_map": header_map,
        **series_options,
    }
    found = FoundSlices()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            units = _expand_files(_folder_files(path, lesion_masks, found), options, found)
        elif path.exists():
            units = _expand_files([(path, str(item))], options, found)
        else:
            raise UserError(f"{path}: no such file or folder")
        given = (options.get("patients") or {}).get(str(item))  # "": a --cohort row without one
        root = str(item) if path.is_dir() and given is None else None
        for unit in units:
            if unit.names:
                unit.patient = given or patient_id(unit.names[0], root)
        selected = select_series(
            [unit for unit in units if unit.names],
            {**options, "one_per_patient": path.is_dir()},
            found.skipped,
            found.warnings,
        )
        for unit in selected:
            found.add(unit)
    return found


def _folder_files(folder: Path, lesion_masks: str | None, found: FoundSlices) -> list[tuple[Path, str]]:
    """The readable sources under a folder as (path, text), sorted, without the lesion
    masks that --lesion-masks names; hidden and unknown files go to found.skipped."""
    files = []
    for candidate in walk_folder(folder):
        if any(part.startswith(".") for part in candidate.relative_to(folder).parts):
            found.skipped["hidden"].append(str(candidate))
        elif is_slice_source(candidate):
            files.append(candidate)
        else:
            found.skipped["not an image"].append(str(candidate))
    if not files:
        raise UserError(
            f"{folder}: folder holds no images ({', '.join(IMAGE_EXTENSIONS)}), DICOM files or NIfTI volumes"
        )
    masks = {lesion_mask_path(p, lesion_masks) for p in files if is_nifti(p)} if lesion_masks else set()
    return [(p, str(p)) for p in files if p not in masks]


def _expand_files(files: list[tuple[Path, str]], options: dict, found: FoundSlices) -> list[Unit]:
    """Units of files (sorted, from one input): DICOM files are collected into series,
    which take the place of their first file."""
    units: list[Unit] = []
    dicom_files = [(p, t) for p, t in files if is_dicom(p)]
    dicom_done = False
    for path, path_text in files:
        if is_nifti(path):
            names = _nifti_slices(path, path_text, options, found)
            units.append(Unit(names, series_label(path.name), names != [path_text]))
        elif is_dicom(path):
            if not dicom_done:
                units.extend(_dicom_units(dicom_files, options, found))
                dicom_done = True
        else:
            units.append(Unit([path_text]))
    return units


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
