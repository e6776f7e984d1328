"""Series: which of a patient's series are read, which DICOM objects are images, and the
folder walk that finds them.

A patient folder exported from a scanner or a PACS holds several series (T1 before and
after contrast, FLAIR, localizers) and objects that are not images (SEG, SR, RTSTRUCT ...).
gbmpcnsl.sources groups the files it finds into *units*: a DICOM series (its single-frame
files of one folder and SeriesInstanceUID), a multi-frame DICOM file, a NIfTI volume (the
*candidate series*), or a 2-D image file. Here:

    non_image_kind(header)   "SEG", "SR" ... for a DICOM object that is not an image, else None
    walk_folder(folder)      its files, recursively, following symlinks (loop-guarded)
    select_series(...)       --series REGEX, then one candidate series per patient (or
                             --all-series); a patient with several is skipped, named

A series is named by its SeriesDescription (else its folder's name); a volume by its file
name. That name is the one header value that is shown and written (the HDF5 `series`
dataset, step2's CSV), so that a reader can audit which series was used.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from gbmpcnsl_common import UserError

# SOP Class UIDs (PS3.4 B.5) of objects that hold no image to classify; a prefix ending in
# "." covers its family. Modality is the fallback for files without a SOP Class UID.
_STORAGE = "1.2.840.10008.5.1.4.1.1."
NON_IMAGE_SOP_CLASSES = {
    _STORAGE + "66.4": "SEG",
    _STORAGE + "66.5": "SEG",  # surface segmentation
    _STORAGE + "481.3": "RTSTRUCT",
    _STORAGE + "481.2": "RTDOSE",
    _STORAGE + "481.": "RT",  # plans, treatment records, ion plans ...
    _STORAGE + "88.59": "KO",
    _STORAGE + "88.": "SR",
    _STORAGE + "11.": "PR",
    _STORAGE + "104.": "DOC",  # encapsulated PDF, CDA, STL ...
    _STORAGE + "66": "RAW",  # raw data; 66.1-66.3: registrations and fiducials
    _STORAGE + "9.": "WAVEFORM",
    _STORAGE + "4.2": "MRS",  # MR spectroscopy
}
NON_IMAGE_MODALITIES = {
    "SEG": "SEG",
    "RTSTRUCT": "RTSTRUCT",
    "RTDOSE": "RTDOSE",
    "RTPLAN": "RT",
    "RTRECORD": "RT",
    "SR": "SR",
    "PR": "PR",
    "KO": "KO",
    "DOC": "DOC",
    "REG": "RAW",
    "FID": "RAW",
    "PLAN": "RT",
}


def non_image_kind(header) -> str | None:
    """The kind of a DICOM object that is not an image ("SEG", "RTSTRUCT", "RTDOSE", "RT",
    "SR", "KO", "PR", "DOC", ...), from its SOP Class UID, else its Modality; None for an image."""
    uid = header.sop_class.strip()
    for prefix in sorted(NON_IMAGE_SOP_CLASSES, key=len, reverse=True):  # the longest first
        stem = prefix.rstrip(".")
        if uid == stem or uid.startswith(stem + "."):
            return NON_IMAGE_SOP_CLASSES[prefix]
    if uid.startswith("1.2.840.10008."):
        return None  # a standard image storage class
    return NON_IMAGE_MODALITIES.get(header.modality)


def walk_folder(folder: Path) -> list[Path]:
    """Every file under `folder`, sorted, following symlinked folders (each real folder is
    entered once, so a link back up ends the walk there)."""
    seen: set[tuple[int, int]] = set()
    files: list[Path] = []
    for here, subfolders, names in os.walk(folder, followlinks=True):
        info = os.stat(here)
        if (info.st_dev, info.st_ino) in seen:
            subfolders[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        files.extend(Path(here) / name for name in names if (Path(here) / name).is_file())
    return sorted(files)


# ---------------------------------------------------------------------------- selection
@dataclass
class Unit:
    """Slices read together: a candidate series (a DICOM series, a multi-frame file, a
    NIfTI volume) or a 2-D image / unreadable file (never a candidate)."""

    names: list[str]
    series: str = ""
    candidate: bool = False
    patient: str = ""
    extra: dict = field(default_factory=dict)


def series_label(text: str) -> str:
    """A series name fit for one line: printable, at most 64 characters."""
    printable = "".join(ch for ch in text if ch.isprintable()).strip()
    return printable[:61] + "..." if len(printable) > 64 else printable


def _candidates_text(units: list[Unit]) -> str:
    return ", ".join(
        f"'{unit.series or '(no description)'}' ({len(unit.names)} slice{'s' * (len(unit.names) != 1)})"
        for unit in units
    )


def select_series(units: list[Unit], options: dict, skipped: dict[str, list[str]], warnings: list[str]):
    """The units to read, in order: candidates whose name --series matches (all without it);
    then, unless --all-series or options["one_per_patient"] is False, a patient left with
    several candidate series is skipped whole with one warning naming them (an error under
    --strict). Skipped slices are listed in `skipped` ("other series", "several series")."""
    pattern = options.get("series")
    kept = []
    for unit in units:
        if unit.candidate and pattern is not None and not pattern.search(unit.series):
            skipped.setdefault("other series", []).extend(unit.names)
        else:
            kept.append(unit)
    if options.get("all_series") or not options.get("one_per_patient", True):
        return kept
    by_patient: dict[str, list[Unit]] = {}
    for unit in kept:
        if unit.candidate:
            by_patient.setdefault(unit.patient, []).append(unit)
    several = {patient: found for patient, found in by_patient.items() if len(found) > 1}
    for patient, found in several.items():
        line = (
            f"patient {patient}: {len(found)} series ({_candidates_text(found)}); choose one with "
            f"--series REGEX{' (a narrower one)' if pattern is not None else ''} or keep all with --all-series"
        )
        if options.get("strict"):
            raise UserError(f"{line}; --strict: nothing written")
        warnings.append(f"warning: skipped {line}")
    for unit in kept:
        if unit.patient in several:
            skipped.setdefault("several series", []).extend(unit.names)
    return [unit for unit in kept if unit.patient not in several]


# ---------------------------------------------------------------------------- flags
def series_pattern(text: str) -> re.Pattern:
    """--series REGEX, an argparse type: compiled case-insensitive."""
    try:
        return re.compile(text, re.IGNORECASE)
    except re.error as error:
        raise argparse.ArgumentTypeError(f"{text!r}: not a regular expression ({error})") from error


def add_series_arguments(group, strict: bool = True) -> None:
    """--series, --all-series, --cohort (and --strict when `strict`), shared by step0,
    step2 and step5 (step0 has its own --strict)."""
    choice = group.add_mutually_exclusive_group()
    choice.add_argument(
        "--series",
        type=series_pattern,
        metavar="REGEX",
        help="keep the series whose SeriesDescription (a NIfTI volume: its file name) matches "
        "REGEX (case-insensitive search); docs/data.md",
    )
    choice.add_argument(
        "--all-series",
        action="store_true",
        help="keep every series of a patient (default: a patient with several is skipped, named)",
    )
    group.add_argument(
        "--cohort",
        type=Path,
        metavar="FILE.csv",
        help="a table path,label,patient_id naming the images, series folders and volumes "
        "(paths relative to the CSV's folder); docs/data.md",
    )
    if strict:
        group.add_argument(
            "--strict", action="store_true", help="a patient with several series is an error, not a skip"
        )


# ---------------------------------------------------------------------------- training vs prediction
def training_slices_warning(checkpoints: list[Path], options: dict, series: list[str]) -> str | None:
    """One warning line when a checkpoint's run.json says its model was trained on
    mask-selected slices (step0 --lesion-masks) and step2 now predicts every slice of its
    volumes and series (no --lesion-masks, --slices all); else None."""
    import json

    from gbmpcnsl.sources import ALL_SLICES

    if options.get("lesion_masks") or options.get("selection", ALL_SLICES) != ALL_SLICES or not any(series):
        return None
    for checkpoint in checkpoints:
        for folder in (checkpoint.parent, checkpoint.parent.parent):
            try:
                run = json.loads((folder / "run.json").read_text())
                trained = run.get("hdf5_slice_selection") or {}
            except (OSError, ValueError, AttributeError):
                continue
            if trained.get("lesion_masks"):
                return (
                    f"warning: {checkpoint} was trained on slices with at least "
                    f"{trained.get('min_lesion_pixels', 1)} lesion voxel(s) (step0 --lesion-masks), and every "
                    "slice of each volume is predicted now: give --lesion-masks PATTERN --min-lesion-pixels N "
                    "to predict the same kind of slices (docs/prediction.md)"
                )
    return None
