"""Grad-CAM overlays: which part of each MRI slice drove the GBM / PCNSL prediction.

    python step5_plot_grad_cam.py --model-weights CKPT --output-dir DIR images...

For every input image, writes one PNG overlay at the image's original size: the Grad-CAM
heatmap in the jet colormap at alpha 0.4 over the image, as in the keras-io recipe the
original script followed (https://keras.io/examples/vision/grad_cam/; Selvaraju et al.,
ICCV 2017): the jet-coloured heatmap is resized (bicubic) to the image, added at 0.4, and
the sum scaled to 0-255 by its minimum and maximum (keras.utils.array_to_img). Unlike
the original, the overlay is drawn on the image at its own size, not on the 380x380 copy.

Grad-CAM is taken on the logit (the Dense(1) output before the sigmoid) at the last
convolutional activation ("top_activation"), never on the saturated sigmoid. The model
outputs P(PCNSL) = sigmoid(logit), so PCNSL is explained by the logit and GBM by the
negated logit. Channel weights are the spatial mean of the gradients; the heatmap is the
ReLU of the weighted sum of channels, divided by its maximum (0-1 per image). An image
with no positive evidence for the explained class gets an all-zero heatmap (reported).

Inputs are image files and folders (searched recursively for .jpg .jpeg .png .tif .tiff
.bmp). Outputs mirror the inputs' paths relative to their common parent folder, so
`data/gbm/p01/s1.jpg` and `data/pcnsl/p01/s1.jpg` give `DIR/gbm/p01/s1.png` and
`DIR/pcnsl/p01/s1.png` (inputs that differ only by extension keep it: `s1.jpg.png`).
DICOM files, DICOM series folders and NIfTI volumes are read too (--slices, --lesion-masks,
--any-orientation, --series/--all-series/--strict and --cohort FILE.csv as in step0); slice k of a volume `data/gbm/p01/t1c.nii.gz` gives
`DIR/gbm/p01/t1c_<k>.png` (k zero-padded to 3 digits), drawn at the slice's own size.
An existing output is an error unless --overwrite, checked before any work. Unreadable
images are reported on stderr and skipped; the exit code is then 1.

Checkpoints: step1's .keras models, .weights.h5 files with their run.json, and tf.keras
2.x .h5/.hdf5 checkpoints of the original EfficientNetB4 model. Several checkpoints, or a
cross-validation run folder (its folds' best checkpoints), explain an ensemble: the
explained class is the ensemble's call (mean P(PCNSL) > 0.5) unless --class says, each
model's heatmap is taken for that class, and the overlay shows their mean, scaled to a
peak of 1 (--annotate shows the ensemble's probability). With --out-of-fold and a
cross-validation run folder, each image is explained by the model of the fold that held its
patient out (cv.json), never by one that trained on it; images of patients outside the
cohort get the whole ensemble, and the log counts them.

Docs: docs/gradcam.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gbmpcnsl.checkpoints import ensemble_checkpoints, held_out_folds, parse_models_and_images
from gbmpcnsl.cli import make_parser, positive_int
from gbmpcnsl.cohort_table import step_slices
from gbmpcnsl.gradcam import (
    EXPLAIN_CHOICES,
    HEATMAPS_FILE,
    GradCamRun,
    gradcam_function,
    load_grad_models,
    out_of_fold_groups,
    plan_outputs,
    write_heatmaps,
)
from gbmpcnsl.model import LAST_CONV_LAYER
from gbmpcnsl.sources import add_slice_arguments
from gbmpcnsl_common import import_tensorflow, log, run_main, setup_logging


def build_parser() -> argparse.ArgumentParser:
    """step5's command line, its options in groups."""
    parser = make_parser(
        "step5_plot_grad_cam.py", __doc__, "Skipped inputs (exit 1): unreadable images, unwritable overlays."
    )
    parser.add_argument("images", nargs="*", help="image files and/or folders")
    models = parser.add_argument_group("model")
    models.add_argument(
        "--model-weights",
        required=True,
        nargs="+",
        metavar="CKPT",
        help="checkpoint (.keras, .weights.h5, .h5) or run folder (its best); several, or a CV run "
        "folder: an ensemble",
    )
    models.add_argument(
        "--out-of-fold",
        action="store_true",
        help="with a CV run folder: explain each image by the fold that held its patient out "
        "(patients outside the cohort: the whole ensemble)",
    )
    models.add_argument(
        "--layer", default=LAST_CONV_LAYER, help=f"convolutional layer to explain (default {LAST_CONV_LAYER})"
    )
    models.add_argument(
        "--batch-size",
        type=positive_int,
        default=8,
        metavar="N",
        help="images per gradient batch (default 8)",
    )
    explained = parser.add_argument_group("what is explained and drawn")
    explained.add_argument(
        "--class",
        dest="explain",
        choices=EXPLAIN_CHOICES,
        default="auto",
        help="class to explain: auto = the predicted one (default), gbm or pcnsl",
    )
    explained.add_argument(
        "--annotate", action="store_true", help="write the explained class and its probability in a corner"
    )
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument(
        "--output-dir", required=True, type=Path, metavar="DIR", help="folder for the overlays (created)"
    )
    outputs.add_argument(
        "--save-heatmaps",
        action="store_true",
        help=f"also write DIR/{HEATMAPS_FILE}: each raw 0-1 heatmap (layer resolution, float32), "
        "keyed by its overlay's path relative to DIR",
    )
    outputs.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's logs")
    add_slice_arguments(parser)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line; checkpoints given before the images are told apart from them."""
    return parse_models_and_images(build_parser(), argv, "images")


def _explain(argv: list[str] | None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)

    # Plan every output first: a clash or an existing file stops us before any work.
    slices = step_slices(args, "explain").names
    images = list(dict.fromkeys(slices))  # a file given twice is done once
    outputs = plan_outputs(images, args.output_dir, args.save_heatmaps, args.overwrite)
    checkpoints = ensemble_checkpoints(args.model_weights)
    fold_of_patient = held_out_folds(args.model_weights) if args.out_of_fold else None

    import_tensorflow(args.verbose)
    grad_models, input_size = load_grad_models(checkpoints, args.layer)
    groups = [(list(range(len(grad_models))), list(range(len(images))))]  # every model, every image
    if fold_of_patient is not None:
        groups = out_of_fold_groups(images, fold_of_patient, [name for name, _ in checkpoints])
    runner = GradCamRun(None, input_size, args.output_dir, args.annotate)
    for members, indices in groups:
        runner.compute = gradcam_function([grad_models[m] for m in members], args.explain)
        runner.run([images[i] for i in indices], [outputs[i] for i in indices], args.batch_size)
    results = runner.results

    if args.save_heatmaps:
        write_heatmaps(args.output_dir / HEATMAPS_FILE, results.heatmaps)
    if results.no_evidence:
        log.warning(
            "%d image(s) have an all-zero heatmap: nothing in them raises the explained "
            "class's logit at --layer %s (their overlay is uniformly blue)",
            results.no_evidence,
            args.layer,
        )
    failed = f"; {results.failed} failed" if results.failed else ""
    log.info("wrote %d overlay(s) to %s%s", results.written, args.output_dir, failed)
    return 1 if results.failed else 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: see the module docstring. Returns the exit code."""
    return run_main(_explain, argv)


if __name__ == "__main__":
    sys.exit(main())
