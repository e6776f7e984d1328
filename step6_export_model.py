"""Export a trained model for deployment: TensorFlow SavedModel, ONNX or OpenVINO IR.

A checkpoint runs only inside TensorFlow; an export runs where the lab's stack does not:
a TensorFlow Serving container (SavedModel), ONNX Runtime on any platform (ONNX), or
OpenVINO on an Intel/AMD CPU (OpenVINO IR, the fastest on a CPU). step2_predict.py runs
the ONNX and OpenVINO exports itself, without importing TensorFlow.

Usage:
    python step6_export_model.py --model-weights CKPT --format FORMAT OUT [--overwrite]
        [--int8 --calibration DATA.h5 [--max-auroc-drop D]]

CKPT is any checkpoint step2 reads: a step1 checkpoint (.keras), a .weights.h5 file with
its run's run.json, or a tf.keras 2.x .h5/.hdf5 checkpoint of the original model.

FORMAT and OUT:
    saved_model  OUT is a folder: a TensorFlow SavedModel written by Keras's own export
                 (keras.export.ExportArchive), with two serving signatures:
                 "serving_default" takes float32 images and "serve_uint8" uint8 images,
                 both named "images", shape (N, H, W, 3), RGB 0-255; each returns
                 "prob_pcnsl", P(PCNSL) per image. OUT/gbmpcnsl_model.json holds the
                 metadata (TensorFlow Serving ignores it).
    onnx         OUT is a .onnx file (opset 17, from the frozen inference function by
                 tf2onnx): input "images" float32 (N, H, W, 3), output "prob_pcnsl" (N,).
    openvino     OUT is a .xml file, with its weights in the .bin beside it (float32,
                 converted by openvino.convert_model from the same frozen function).
For onnx and openvino the metadata goes beside OUT, named OUT plus .json
(model.onnx.json, model.xml.json), and the model card as OUT plus .MODEL_CARD.md; a
SavedModel holds both (OUT/gbmpcnsl_model.json, OUT/MODEL_CARD.md).

Preprocessing is the training one and is not part of the graph: read each slice with
gbmpcnsl.pixels.load_slice (2-D files: gbmpcnsl_common.load_image, Image.convert("RGB")
and a LANCZOS resize to the model's H x W; DICOM and NIfTI: their window rules first), and
pass RGB values 0-255 as float32 (or uint8 for serve_uint8); the network normalizes them
itself. The metadata records this, the class mapping (GBM = 0, PCNSL = 1; the output is
P(PCNSL)), the input size, the source checkpoint's SHA-256, the tool versions and the
model card: the training cohort's counts, settings and validation metrics (from run.json
and split.csv beside the checkpoint), the input pipeline of the sources it was trained on
(image files, DICOM, NIfTI: the exact slice and window rules) and the intended use (a
research tool, not a medical device).

Every export is checked before it is kept: the exported model is loaded back in its own
runtime (TensorFlow, ONNX Runtime or OpenVINO) and run on a few test images, and must agree
with the Keras model within 1e-4 in P(PCNSL) (float kernels differ between runtimes and
CPUs by about 1e-5). Otherwise the export fails with a one-line error and
leaves nothing behind: everything is written to a temporary folder beside OUT and moved
into place at the end. An existing OUT (or its .bin/.json) is kept unless --overwrite.

--int8 (OpenVINO only) quantizes the checked float IR with NNCF post-training quantization,
calibrated on up to 300 slices of half the patients of DATA.h5 (a step0 file at the
model's input size; drawn across patients and classes). The other half is the check: the
float and the int8 model predict its slices, and the export is refused, in one line, when
the int8 AUROC is more than D (default 0.01) below the float one. Both AUROCs and the
largest change in P(PCNSL) are printed and kept in the metadata ("int8").

Example, then prediction without TensorFlow (step2 reads .onnx and .xml exports):
    python step6_export_model.py --model-weights run/ckpt_120_0.2110.keras --format openvino model.xml
    python step2_predict.py --model-weights model.xml scans/

Exit codes: 0 exported, 2 bad arguments, an unreadable checkpoint, an existing output or a
failed check.

Docs: docs/deployment.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gbmpcnsl.checkpoints import load_model_for_inference, model_input_size
from gbmpcnsl.cli import make_parser
from gbmpcnsl.export import CHECK_IMAGES, FORMATS, check_destination, export_model
from gbmpcnsl.quantize import MAX_AUROC_DROP
from gbmpcnsl_common import UserError, import_tensorflow, log, run_main, setup_logging


def build_parser() -> argparse.ArgumentParser:
    """step6's command line, its options in groups."""
    parser = make_parser("step6_export_model.py", __doc__)
    parser.add_argument("out", type=Path, metavar="OUT", help="SavedModel folder, .onnx or .xml file")
    export = parser.add_argument_group("export")
    export.add_argument(
        "--model-weights", required=True, type=Path, metavar="CKPT", help="checkpoint to export"
    )
    export.add_argument("--format", required=True, choices=FORMATS, help="export format")
    export.add_argument("--overwrite", action="store_true", help="replace an existing export")
    int8 = parser.add_argument_group("int8 (OpenVINO only)")
    int8.add_argument("--int8", action="store_true", help="quantize to int8 with NNCF (needs --calibration)")
    int8.add_argument(
        "--calibration", type=Path, metavar="DATA.h5", help="step0 HDF5 file: calibration and held-out slices"
    )
    int8.add_argument(
        "--max-auroc-drop",
        type=float,
        default=MAX_AUROC_DROP,
        metavar="D",
        help=f"refuse when the held-out AUROC drops by more than D (default {MAX_AUROC_DROP})",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging and TensorFlow's own messages")
    return parser


def _export(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    # Everything that can be checked without TensorFlow, before any work.
    files = check_destination(args.model_weights, args.out, args.format, args.overwrite)
    int8 = int8_options(args)

    started = time.perf_counter()
    import_tensorflow(args.verbose)
    model = load_model_for_inference(args.model_weights)
    height, width = model_input_size(model)
    log.info(f"{args.model_weights}: {model.name}, {height}x{width} input; exporting as {args.format}")
    difference, report = export_model(model, args.model_weights, args.out, args.format, files, int8)
    if report:
        log.info(
            f"int8: AUROC on {report['held_out']['slices']} held-out slices {report['auroc_float']:.4f} "
            f"(float32) -> {report['auroc_int8']:.4f} (int8), a drop of {report['auroc_drop']:.4f}; "
            f"largest P(PCNSL) change {report['max_abs_probability_change']:.3g}"
        )
    log.info(
        f"wrote {', '.join(str(file) for file in files)} in {time.perf_counter() - started:.1f} s "
        f"(checked: at most {difference:.2g} from the Keras model on {CHECK_IMAGES} images"
        + (", before quantization)" if report else ")")
    )
    return 0


def int8_options(args: argparse.Namespace) -> tuple[Path, float] | None:
    """(calibration file, largest AUROC drop) for --int8, else None; misused flags are
    UserErrors."""
    if not args.int8:
        if args.calibration is not None:
            raise UserError("--calibration: only with --int8")
        return None
    if args.format != "openvino":
        raise UserError(f"--int8: only with --format openvino (not {args.format})")
    if args.calibration is None:
        raise UserError("--int8: needs --calibration DATA.h5 (a step0 HDF5 file)")
    if not args.calibration.is_file():
        raise UserError(f"--calibration {args.calibration}: no such file")
    return args.calibration, args.max_auroc_drop


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: see the module docstring. Returns the exit code."""
    return run_main(_export, argv)


if __name__ == "__main__":
    sys.exit(main())
