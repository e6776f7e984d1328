"""Step 0: convert a folder of GBM / PCNSL slices into one HDF5 file for training.

    python step0_convert_images_to_hdf5.py DATA OUT.h5 [--resize 380 380] [--workers N]
        [--compression gzip|lzf|none] [--strict] [--overwrite] [--verbose]
        [--slices all|middle:N|A:B] [--lesion-masks PATTERN] [--min-lesion-pixels N]
        [--any-orientation] [--series REGEX | --all-series]
    python step0_convert_images_to_hdf5.py --cohort FILE.csv OUT.h5 [...]

DATA holds gbm/ and pcnsl/. Sources are 2-D images (.jpg .jpeg .png .tif .tiff .bmp, any
case), DICOM files (.dcm .dicom .ima or any file with the DICM preamble; a folder's
single-frame files form a series, ordered along the slice normal; a multi-frame file is a
volume) and NIfTI volumes (.nii, .nii.gz). They sit either in a folder per patient
(DATA/gbm/patient017/slice04.png; the folder name is the patient id, deeper sub-folders
belong to that patient) or directly in the class folder (DATA/gbm/img001.png; each such
source is its own group, named "gbm/img001"). Every slice of a volume is one HDF5 row,
its path "gbm/patient017/t1c.nii.gz#045" (k: 0-based, inferior to superior).

Every slice is read with gbmpcnsl.pixels.load_slice (the loader step2 and step5 use too:
2-D images through gbmpcnsl_common.load_image, i.e. convert("RGB") and a LANCZOS resize to
H x W, 16-bit and float images windowed to 0-255 first; DICOM and NIfTI through their
intensity rules, see the README) and written to

    /gbm/{H}_{W}/features    uint8 (N, H, W, 3), one image per chunk, compressed
    /gbm/{H}_{W}/labels      uint8 (N,), all 0
    /gbm/{H}_{W}/paths       UTF-8 source paths relative to DATA (posix)
    /gbm/{H}_{W}/groups      UTF-8 patient / group ids
    /pcnsl/{H}_{W}/...       the same, labels all 1

Images are decoded and resized by a pool of worker processes and streamed to disk, so
memory stays flat however many images there are. Hidden files are skipped; other files
and unreadable images are skipped with a warning (an error with --strict); every skip is
counted in the summary on stderr. Non-axial DICOM series and volumes are skipped the same
way unless --any-orientation, and so are DICOM objects that are not images (SEG, SR,
RTSTRUCT ...; counted by kind). A patient with several series (DICOM series, multi-frame
files, NIfTI volumes) is skipped with one warning naming them: --series REGEX keeps the
series whose SeriesDescription (a volume: its file name) matches, --all-series keeps all,
--strict makes it an error. Each slice's series is written to /<class>/{H}_{W}/series.
--cohort FILE.csv (path,label,patient_id) names the sources instead of DATA's class
folders (paths are then relative to the CSV's folder). --slices picks slices of each volume and series;
--lesion-masks '{stem}_seg.nii.gz' keeps the slices of each NIfTI volume whose mask (beside
it) has at least --min-lesion-pixels labelled voxels. No DICOM header value is written
anywhere; two patient folders with DICOM files of one PatientID or StudyInstanceUID get a
warning (without the value). OUT.h5 is written to a temporary file beside it and
renamed at the end: an interrupted or failed run leaves the previous OUT.h5 untouched.
Sizes already in OUT.h5 are kept; converting a size that is already there is an error
unless --overwrite. --resize was called --size before version 1.1 (still accepted, for one
release: step1's --size picks one of the sizes stored in OUT.h5).

Docs: docs/data.md
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gbmpcnsl.cli import hidden_alias, make_parser, positive_int
from gbmpcnsl.convert import ConvertSettings, convert
from gbmpcnsl.sources import add_slice_arguments, slice_options
from gbmpcnsl_common import DEFAULT_SIZE, run_main, setup_logging

SKIPPED = "Skipped inputs (exit 1): unreadable images, DICOM files and volumes; hidden files,\n\
other files and non-axial series (without --any-orientation) are skipped but do not count."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; --workers defaults to the cores this process may use."""
    parser = make_parser("step0_convert_images_to_hdf5.py", __doc__, SKIPPED)
    parser.add_argument(
        "data_dir",
        type=Path,
        nargs="?",
        metavar="DATA",
        help="folder holding gbm/ and pcnsl/ (not with --cohort)",
    )
    parser.add_argument("output", type=Path, metavar="OUT.h5", help="HDF5 file to write or add a size to")
    output = parser.add_argument_group("output")
    run = parser.add_argument_group("run")
    # Added in the original order, so that the usage line reads as it always did.
    output.add_argument(
        "--resize",
        type=positive_int,
        nargs=2,
        default=DEFAULT_SIZE,
        metavar=("H", "W"),
        help="size every slice is resized to (default: 380 380)",
    )
    hidden_alias(output, "--size", "--resize", type=positive_int, nargs=2)
    run.add_argument(
        "--workers", type=positive_int, default=None, help="worker processes (default: all cores)"
    )
    output.add_argument(
        "--compression", choices=("gzip", "lzf", "none"), default="gzip", help="default: gzip"
    )
    run.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first unreadable or non-image file or multi-series patient",
    )
    output.add_argument("--overwrite", action="store_true", help="replace this size if OUT.h5 already has it")
    run.add_argument("--verbose", action="store_true", help="also list hidden files that were skipped")
    add_slice_arguments(parser, strict=False)
    args = parser.parse_args(argv)
    if (args.data_dir is None) == (args.cohort is None):
        parser.error("give DATA or --cohort FILE.csv (one of them)")
    args.data_dir = args.cohort.parent if args.cohort is not None else args.data_dir
    if args.workers is None:
        args.workers = (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        )
    args.resize = tuple(args.resize)
    return args


def _main(argv: list[str] | None) -> int:
    """Parse, convert, return 0 (1 if some were unreadable); expected failures raise
    UserError (run_main reports them)."""
    args = parse_args(argv)
    setup_logging(args.verbose)
    settings = ConvertSettings(
        data_dir=args.data_dir,
        output=args.output,
        size=args.resize,
        workers=args.workers,
        compression=args.compression,
        strict=args.strict,
        overwrite=args.overwrite,
        slice_options=slice_options(args),
        cohort=args.cohort,
    )
    return 1 if convert(settings) else 0


def main(argv: list[str] | None = None) -> int:
    """Step 0's entry point: the exit code (0; 1 some sources unreadable; 2 an expected
    failure; 130 Ctrl-C)."""
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
