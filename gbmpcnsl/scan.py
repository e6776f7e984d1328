"""Step 0's scan: the class folders (or a --cohort table) to slices with their patient
and series, what was skipped and why, and the warnings about patients.

    scan_class_folder(DATA, "gbm", options)   one class folder -> candidates, skipped
    scan_cohort(FILE.csv, options)            --cohort -> candidates of both classes, skipped

A candidate is (slice name relative to DATA or the CSV's folder, patient id, series).
"""

from __future__ import annotations

import collections
from pathlib import Path

from gbmpcnsl.cohort_table import read_cohort
from gbmpcnsl.dicom import dicom_identities, is_dicom
from gbmpcnsl.hdf5 import single_slice_groups_warning
from gbmpcnsl.sources import ALL_SLICES, FoundSlices, find_slices
from gbmpcnsl_common import CLASS_FOLDERS, IMAGE_EXTENSIONS, UserError, log, patient_id, split_slice_name

Candidate = tuple[str, str, str]  # (slice name, patient id, series)


def _relative(name: str, base: Path) -> str:
    """A slice name relative to `base` (posix, "#k" kept); a path outside it stays as is."""
    source, index = split_slice_name(name)
    try:
        relative = Path(source).relative_to(base).as_posix()
    except ValueError:
        relative = Path(source).as_posix()
    return relative + (f"#{index:03d}" if index is not None else "")


def _skipped_relative(found: FoundSlices, base: Path) -> dict[str, list[str]]:
    """found.skipped, hidden and unknown files relative to `base`; warnings logged."""
    for line in found.warnings:
        log.warning(line)
    skipped = dict(found.skipped)
    for reason in ("hidden", "not an image"):
        skipped[reason] = [_relative(p, base) for p in found.skipped[reason]]
    return skipped


def _filtered(found: FoundSlices, options: dict) -> bool:
    return bool(
        found.skipped["non-axial"]
        or options.get("lesion_masks")
        or options.get("series") is not None
        or found.skipped.get("several series")
        or options.get("selection", ALL_SLICES) != ALL_SLICES
    )


def scan_class_folder(
    data_dir: Path, folder: str, options: dict | None = None
) -> tuple[list[Candidate], dict[str, list[str]]]:
    """Slices of one class as candidates, in path order (a series in position order, a
    volume's slices "#k" in order), and the files skipped while scanning, by reason
    ("hidden", "not an image", "non-axial": ["path: why", ...], "DICOM SEG" ...).
    `options`: find_slices keywords (--slices, --lesion-masks, --series ...)."""
    class_dir = data_dir / folder
    if not class_dir.is_dir():
        raise UserError(f"{class_dir}: no such folder (DATA must hold gbm/ and pcnsl/)")
    options = options or {}
    found = find_slices([class_dir], **options)
    candidates = []
    for name, series in zip(found.names, found.series, strict=True):
        relative = _relative(name, data_dir)  # the one patient rule: gbm/<patient folder>, or gbm/<stem>
        candidates.append((relative, patient_id(relative), series))
    if not candidates:
        raise UserError(
            f"{class_dir}: no images ({' '.join(IMAGE_EXTENSIONS)}), DICOM files or NIfTI volumes "
            "directly inside or in patient folders"
            + (
                " left by --slices, --lesion-masks, --series and orientation"
                if _filtered(found, options)
                else ""
            )
        )
    return candidates, _skipped_relative(found, data_dir)


def scan_cohort(
    csv_path: Path, options: dict | None = None
) -> tuple[dict[str, list[Candidate]], dict[str, list[str]]]:
    """--cohort: the candidates of each class, named relative to the CSV's folder; a row's
    patient_id (qualified by its class, "gbm/P017") or, when empty, the patient rule."""
    rows = read_cohort(csv_path, labels_required=True)
    base = csv_path.parent
    found = find_slices(
        [row.path for row in rows], **(options or {}), patients={r.path: r.patient or "" for r in rows}
    )
    label_of = {row.path: row.label for row in rows}
    given = {row.path for row in rows if row.patient}
    candidates: dict[str, list[Candidate]] = {folder: [] for folder in CLASS_FOLDERS}
    owners = _row_of_slices(found, [row.path for row in rows])
    for name, patient, series, row in zip(found.names, found.patients, found.series, owners, strict=True):
        folder = label_of[row]
        relative = _relative(name, base)
        group = patient if row in given else patient_id(relative)
        if not group.startswith(f"{folder}/"):
            group = f"{folder}/{group.lstrip('/')}"
        candidates[folder].append((relative, group, series))
    for folder in CLASS_FOLDERS:
        if not candidates[folder]:
            raise UserError(f"--cohort {csv_path}: no {folder} slices (rows labelled {folder} give none)")
    return candidates, _skipped_relative(found, base)


def _row_of_slices(found: FoundSlices, row_paths: list[str]) -> list[str]:
    """The cohort row each slice came from: the longest row path that holds it."""
    ordered = sorted(row_paths, key=len, reverse=True)
    owners = []
    for name in found.names:
        source = split_slice_name(name)[0]
        owners.append(next(p for p in ordered if source == p or source.startswith(p.rstrip("/") + "/")))
    return owners


def report_skipped(data_dir: Path, strict: bool, skipped: dict[str, list[str]]) -> None:
    """Warn about files that are not images and non-axial sources (--strict: refuse them);
    list hidden files and DICOM objects that are not images at --verbose."""
    for name in skipped["not an image"]:
        if strict:
            raise UserError(
                f"{data_dir / name}: not a supported image ({' '.join(IMAGE_EXTENSIONS)}); --strict: nothing written"
            )
        log.warning("warning: skipped %s: not a supported image file", data_dir / name)
    for line in skipped["non-axial"]:
        if strict:
            raise UserError(f"{line}; --strict: nothing written")
        log.warning("warning: skipped %s", line)
    for name in skipped["hidden"]:
        log.debug("skipped hidden file %s", data_dir / name)
    for reason, names in skipped.items():
        for name in names if reason.startswith("DICOM ") else []:
            log.debug("skipped %s: a %s object, not an image", name, reason)


def warn_about_patients(data_dir: Path, candidates: dict[str, list[Candidate]]) -> None:
    """Warnings about the patient groups: one folder name under both classes, mostly
    single-slice groups (a flat folder), and DICOM files of one person in two folders."""
    # Patients are numbered per class in most exports: gbm/001 and pcnsl/001 stay two patients.
    folder_names = [
        {
            group.split("/", 1)[1]
            for name, group, _ in class_candidates
            if len(Path(split_slice_name(name)[0]).parts) > 2
        }
        for class_candidates in candidates.values()
    ]
    for name in sorted(set.intersection(*folder_names)):
        log.warning(
            "warning: patient folder %s is under both gbm/ and pcnsl/; kept as two patients "
            "(gbm/%s, pcnsl/%s): rename one if they are the same person",
            name,
            name,
            name,
        )
    single_slice = single_slice_groups_warning(
        [g for class_candidates in candidates.values() for _, g, _ in class_candidates]
    )
    if single_slice:
        log.warning(single_slice)
    # One person under two patient folders leaks across the split: say so, never the value.
    all_candidates = [candidate for class_candidates in candidates.values() for candidate in class_candidates]
    for keyword, first, second in shared_dicom_identities(data_dir, all_candidates):
        log.warning(
            "warning: patient folders %s and %s hold DICOM files with the same %s: "
            "if they are one patient, put them in one folder",
            first,
            second,
            keyword,
        )


def shared_dicom_identities(data_dir: Path, candidates: list[Candidate]) -> list[tuple[str, str, str]]:
    """(keyword, patient a, patient b) for patient folders whose DICOM files share a
    PatientID or StudyInstanceUID (one file per folder is read; values stay in memory)."""
    first_file: dict[tuple[str, str], Path] = {}
    for name, group_id, _ in candidates:
        source = Path(split_slice_name(name)[0])
        if is_dicom(data_dir / source):
            first_file.setdefault((group_id, source.parent.as_posix()), data_dir / source)
    owners: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    for (group_id, _), path in first_file.items():
        for keyword, values in dicom_identities([path]).items():
            for value in values:
                owners[(keyword, value)].add(group_id)
    shared = set()
    for (keyword, _), groups in owners.items():
        ordered = sorted(groups)
        shared.update((keyword, a, b) for i, a in enumerate(ordered) for b in ordered[i + 1 :])
    return sorted(shared)
