"""Turn the demo cohort's DICOM series into what a scanner export looks like.

    python demo/make_scanner_export.py DICOM_COHORT EXPORT [--overwrite]

DICOM_COHORT is `make_demo_data.py --format dicom` output (DICOM_COHORT/<class>/<patient>/
IM0001.dcm ..., one axial T1 post-contrast series per patient). EXPORT gets, per patient,
the folders a PACS or scanner export holds:

    EXPORT/<class>/<patient>/
        301_AX_T1_POST/IM0001.dcm ...    the contrast-enhanced axial T1 (SeriesDescription
                                          "AX T1 POST (synthetic)"), copied unchanged
        401_AX_FLAIR/IM0001.dcm ...       a second axial series of other contrast (the T1
                                          inverted and smoothed; SeriesDescription
                                          "AX FLAIR (synthetic)"), new series UID
        001_LOCALIZER/IM0001.dcm          one sagittal localizer image

so that the recipe (docs/recipe.md) has to pick the T1 post-contrast series by its
description (step0 --series) and leave the rest. Synthetic data only: no real header value.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

T1_FOLDER, FLAIR_FOLDER, LOCALIZER_FOLDER = "301_AX_T1_POST", "401_AX_FLAIR", "001_LOCALIZER"


def flair_pixels(stored: np.ndarray) -> np.ndarray:
    """Another contrast from the T1: inverted within the stored range, then smoothed."""
    from scipy.ndimage import uniform_filter

    inverted = stored.max() + stored.min() - stored.astype(np.float64)
    return uniform_filter(inverted, size=5).astype(np.uint16)


def write_series(sources: list[Path], folder: Path, description: str, number: int, transform=None) -> None:
    """`sources` as a new series in `folder`: new series/instance UIDs, `description`,
    SeriesNumber `number`, pixels through `transform` (None: unchanged)."""
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    series_uid = generate_uid(entropy_srcs=[str(folder), "series"])
    for index, source in enumerate(sources):
        ds = pydicom.dcmread(source)
        ds.SeriesInstanceUID, ds.SeriesDescription, ds.SeriesNumber = series_uid, description, number
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(folder), str(index)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if transform is not None:
            ds.PixelData = transform(ds.pixel_array).astype("<u2").tobytes()
        ds.save_as(folder / f"IM{index + 1:04d}.dcm", enforce_file_format=True)


def write_localizer(source: Path, folder: Path) -> None:
    """One sagittal image (ImageOrientationPatient: anterior-posterior, foot-head)."""
    write_series([source], folder, "LOCALIZER (synthetic)", 1)
    import pydicom

    path = folder / "IM0001.dcm"
    ds = pydicom.dcmread(path)
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(path, enforce_file_format=True)


def export_patient(patient: Path, target: Path) -> None:
    """One patient's three series."""
    sources = sorted(patient.glob("*.dcm"))
    write_series(sources, target / T1_FOLDER, "AX T1 POST (synthetic)", 301)
    write_series(sources, target / FLAIR_FOLDER, "AX FLAIR (synthetic)", 401, flair_pixels)
    write_localizer(sources[len(sources) // 2], target / LOCALIZER_FOLDER)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("cohort", type=Path, metavar="DICOM_COHORT")
    parser.add_argument("export", type=Path, metavar="EXPORT")
    parser.add_argument("--overwrite", action="store_true", help="replace EXPORT if this script wrote it")
    args = parser.parse_args(argv)
    patients = sorted(args.cohort.glob("*/*/IM0001.dcm"))
    if not patients:
        print(f"error: {args.cohort}: no make_demo_data.py --format dicom series", file=sys.stderr)
        return 2
    marker = args.export / ".gbmpcnsl-scanner-export"
    if args.export.exists():
        if not (args.overwrite and marker.is_file()):
            print(
                f"error: {args.export}: exists (--overwrite replaces one this script wrote)", file=sys.stderr
            )
            return 2
        shutil.rmtree(args.export)
    args.export.mkdir(parents=True)
    marker.touch()
    for first in patients:
        patient = first.parent
        export_patient(patient, args.export / patient.relative_to(args.cohort))
    print(f"wrote {len(patients)} patients (3 series each) to {args.export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
