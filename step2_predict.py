"""Predict glioblastoma (GBM) vs primary CNS lymphoma (PCNSL) on brain MRI slices.

Images must be axial, contrast-enhanced T1-weighted MRI slices. Each image gets one line
on stdout, in the order given, with the more likely class and its probability:

    scans/patient017/slice04.png             97.31 % GBM

Nothing else goes to stdout (progress and errors go to stderr), so the output can be
piped or redirected as the original script's could.

Usage:
    python step2_predict.py --model-weights CKPT [--csv out.csv] IMAGE_OR_FOLDER...

CKPT is a step1 checkpoint (.keras), a .weights.h5 file next to its run's run.json, or a
tf.keras 2.x .h5/.hdf5 checkpoint of the original EfficientNetB4 model (the paper era).
It may also be a model exported by step6_export_model.py: an ONNX file (.onnx, run by ONNX
Runtime) or an OpenVINO IR (.xml with its .bin, run by OpenVINO, compiled models cached in
~/.cache/gbm-pcnsl/openvino or $XDG_CACHE_HOME); these run without TensorFlow.
Images are read at the model's input size with the loader that step0 used for training.
A folder expands recursively to its images (.jpg .jpeg .png .tif .tiff .bmp, sorted).
DICOM files, DICOM series folders and NIfTI volumes (.nii, .nii.gz) are read too: every
slice of a volume gets its own line, named "<path>#<k>" (k: 0-based, inferior to superior);
a series is listed in position order. --slices, --lesion-masks, --any-orientation,
--series/--all-series/--strict (one series per patient) and --cohort FILE.csv pick slices as in step0.

--csv also writes path,prob_gbm,prob_pcnsl (full float precision) for the predicted
images, and a last column series for DICOM and NIfTI inputs; an existing file is kept unless --overwrite.

CKPT may also be a run folder of step1: its best checkpoint (run.json's best_checkpoint).

An image that cannot be read is reported on stderr and skipped (no line, no CSV row);
the others are still predicted. Exit status: 0 all predicted, 1 some images could not be
read, 2 bad arguments, missing files or an unusable checkpoint.

--tta averages P(PCNSL) over the four flips that training augmentation draws from:
as is, left-right, up-down, and both (4x the compute).

Ensembles: --model-weights takes several checkpoints, or a cross-validation run folder
(step1 --folds; its folds' best checkpoints, refused until every fold is trained).
P(PCNSL) is then the mean of the models' probabilities; the lines keep their format, and
the CSV gains prob_pcnsl_std (the SD over the models) and, with --per-model, one column
per model (prob_pcnsl_fold<i> for a CV folder, else prob_pcnsl_model<i> in the order
given; the names are logged on stderr). One model: the output is exactly as above.

Patients: --per-patient FILE also writes patient_id,n_slices,prob_gbm,prob_pcnsl, one row
per patient in order of first appearance (the patient rule of step0: the folder under the
gbm/ or pcnsl/ folder, qualified by its class, e.g. gbm/p017; an image directly in a
class folder is its own patient; without class folders, the folder under the one named on
the command line, pacs/P017 for pacs/P017/<study>/<series>/; --cohort's patient_id first). --aggregate says how a patient's slice probabilities
combine: mean (default), median, or max (the most extreme call: the slice probability
farthest from 0.5). --per-patient - prints one line per patient, in the slice lines'
format, after the slice lines.

Docs: docs/prediction.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gbmpcnsl.checkpoints import ensemble_checkpoints, parse_models_and_images
from gbmpcnsl.cli import make_parser, positive_int
from gbmpcnsl.cohort_table import step_slices
from gbmpcnsl.files import write_csv
from gbmpcnsl.patients import AGGREGATES
from gbmpcnsl.predictors import (
    load_ensemble,
    predict_slices,
    prediction_table,
    report_patients,
    slice_batches,
)
from gbmpcnsl.sources import add_slice_arguments
from gbmpcnsl_common import UserError, log, run_main, setup_logging


def build_parser() -> argparse.ArgumentParser:
    """step2's command line, its options in groups."""
    parser = make_parser("step2_predict.py", __doc__)
    parser.add_argument("images", nargs="*", metavar="IMAGE_OR_FOLDER", help="image files or folders")
    models = parser.add_argument_group("model")
    models.add_argument(
        "--model-weights",
        required=True,
        nargs="+",
        metavar="CKPT",
        help="checkpoint (or run folder: its best) to predict with; several, or a CV run folder: their mean",
    )
    models.add_argument("--tta", action="store_true", help="average over the 4 training flips")
    models.add_argument(
        "--batch-size", type=positive_int, default=32, metavar="N", help="images per batch (default 32)"
    )
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument(
        "--csv", type=Path, metavar="FILE", help="also write path,prob_gbm,prob_pcnsl to FILE"
    )
    outputs.add_argument("--overwrite", action="store_true", help="replace an existing --csv file")
    outputs.add_argument(
        "--per-model", action="store_true", help="with several models: one CSV column per model"
    )
    patients = parser.add_argument_group("patients")
    patients.add_argument(
        "--per-patient",
        metavar="FILE",
        help="also write patient_id,n_slices,prob_gbm,prob_pcnsl to FILE ('-': lines on stdout)",
    )
    patients.add_argument(
        "--aggregate",
        choices=AGGREGATES,
        default="mean",
        help="a patient's probability from its slices' (default mean; max: the most extreme call)",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging and TensorFlow's own messages")
    add_slice_arguments(parser)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line; checkpoints given before the images are told apart from them."""
    return parse_models_and_images(build_parser(), argv, "IMAGE_OR_FOLDER")


def check_output(flag: str, path: Path, overwrite: bool) -> None:
    """An output file may be written: new (or --overwrite), in a folder that exists."""
    if path.exists() and not overwrite:
        raise UserError(f"{flag} {path}: exists (use --overwrite to replace it)")
    if not path.parent.is_dir():
        raise UserError(f"{flag} {path}: folder {path.parent} does not exist")


def _predict(argv: list[str] | None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)

    # Everything that can be checked without TensorFlow, before any work.
    checkpoints = ensemble_checkpoints(args.model_weights)
    for _, model_path in checkpoints:
        if not model_path.is_file():
            raise UserError(f"--model-weights {model_path}: no such file")
    if args.csv is not None:
        check_output("--csv", args.csv, args.overwrite)
    if args.per_patient not in (None, "-"):
        check_output("--per-patient", Path(args.per_patient), args.overwrite)
    found = step_slices(args, "predict", [path for _, path in checkpoints])
    paths = found.names

    # Load the models; their input size is the image size. Exported models (.onnx, .xml)
    # run in their own runtime and never import TensorFlow.
    started = time.perf_counter()
    ensemble = load_ensemble(checkpoints, args.tta, args.verbose)
    height, width = ensemble.input_size
    log.info(
        f"{ensemble.description}, {height}x{width} input; predicting {len(paths)} "
        f"image{'s' * (len(paths) != 1)}{' with 4 flips (--tta)' if args.tta else ''}"
    )
    errors: dict[int, str] = {}
    batches = slice_batches(paths, ensemble.input_size, args.batch_size, errors, ensemble.needs_tensorflow)
    rows, member_rows = predict_slices(paths, ensemble.predicts, batches, errors)

    if args.csv is not None:
        member_names = [name for name, _ in checkpoints]
        table = prediction_table(rows, member_rows, member_names, args.per_model, found.lookup("series"))
        write_csv(args.csv, *table, private=True)
        log.info(f"wrote {args.csv}")
    if args.per_patient is not None:
        report_patients(rows, args.per_patient, args.aggregate, found.lookup("patients"))
    elapsed = time.perf_counter() - started
    log.info(
        f"predicted {len(rows)} of {len(paths)} images in {elapsed:.1f} s ({len(rows) / elapsed:.1f} images/s)"
    )
    if errors:
        log.info(f"{len(errors)} image{'s' * (len(errors) != 1)} could not be read (see above)")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: see the module docstring. Returns the exit code."""
    return run_main(_predict, argv)


if __name__ == "__main__":
    sys.exit(main())
