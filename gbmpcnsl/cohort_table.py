"""--cohort FILE.csv: a table that names a cohort's sources, their labels and patients,
so that a PACS export can be labelled without copying or renaming it.

Columns path,label,patient_id (in any order; others are ignored):
- path: a 2-D image, a DICOM file, a DICOM series folder, a NIfTI volume, or a folder of
  them, relative to the CSV's folder (or absolute);
- label: gbm/pcnsl (any case) or 0/1; required by step0, may be empty in step2 and step5;
- patient_id: the patient; empty: the patient rule (gbmpcnsl_common.patient_id).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from gbmpcnsl_common import CLASS_FOLDERS, UserError

LABEL_TEXT = {"gbm": "gbm", "pcnsl": "pcnsl", "0": "gbm", "1": "pcnsl"}


@dataclass(frozen=True)
class CohortRow:
    """One row: the path as the steps name it (the CSV's folder joined with the path as
    written), its class folder name ("gbm", "pcnsl" or None) and patient id (or None)."""

    path: str
    label: str | None
    patient: str | None


def read_cohort(csv_path: Path, labels_required: bool) -> list[CohortRow]:
    """The rows of a --cohort table, checked: the columns exist, every label is known
    (and present when `labels_required`), every path exists, one patient has one label.
    UserError naming the file and line otherwise."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as file:
            table = list(csv.DictReader(file))
            columns = set(table[0]) if table else set()
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"--cohort {csv_path}: cannot read ({error})") from error
    missing = {"path", "label", "patient_id"} - columns
    if missing or not table:
        raise UserError(
            f"--cohort {csv_path}: needs a header path,label,patient_id and rows"
            + (f" (missing: {', '.join(sorted(missing))})" if missing and table else "")
        )
    rows, labels = [], {}
    for line, entry in enumerate(table, start=2):
        where = f"--cohort {csv_path}, line {line}"
        text = (entry["path"] or "").strip()
        if not text:
            raise UserError(f"{where}: empty path")
        path = csv_path.parent / text
        if not path.exists():
            raise UserError(f"{where}: {path}: no such file or folder")
        label_text = (entry["label"] or "").strip().lower()
        if label_text and label_text not in LABEL_TEXT:
            raise UserError(f"{where}: label {label_text!r}: expected gbm, pcnsl, 0 or 1 (or empty)")
        if not label_text and labels_required:
            raise UserError(f"{where}: empty label (step0 needs gbm, pcnsl, 0 or 1)")
        label = LABEL_TEXT.get(label_text)
        patient = (entry["patient_id"] or "").strip() or None
        if patient is not None and label is not None and labels.setdefault(patient, label) != label:
            raise UserError(f"{where}: patient {patient} has rows labelled {' and '.join(CLASS_FOLDERS)}")
        rows.append(CohortRow(str(path), label, patient))
    return rows


def cohort_inputs(images: list[str], cohort: Path | None) -> tuple[list[str], dict[str, str]]:
    """step2 and step5: the inputs (the named images, then --cohort's paths) and
    {input: patient id} for the cohort rows ("" where the row names none: the patient
    rule on each slice's path, as for a file named on the command line)."""
    if cohort is None:
        return list(images), {}
    rows = read_cohort(cohort, labels_required=False)
    return [*images, *(row.path for row in rows)], {row.path: row.patient or "" for row in rows}


def step_slices(args, purpose: str, checkpoints: list[Path] | None = None):
    """step2's and step5's slices (gbmpcnsl.sources.FoundSlices) from their parsed command
    line: the images and --cohort's rows, the slice and series flags; with `checkpoints`,
    the warning when their training run selected slices by lesion masks and these are not."""
    from gbmpcnsl.predictors import expand_inputs
    from gbmpcnsl.series import training_slices_warning
    from gbmpcnsl.sources import slice_options
    from gbmpcnsl_common import log

    inputs, patients = cohort_inputs(args.images, args.cohort)
    found = expand_inputs(inputs, {**slice_options(args), "patients": patients}, purpose)
    warning = training_slices_warning(checkpoints or [], slice_options(args), found.series)
    if warning:
        log.warning(warning)
    return found
