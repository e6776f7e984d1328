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
a series is listed in position order. --slices, --lesion-masks and --any-orientation pick
slices as in step0.

--csv also writes path,prob_gbm,prob_pcnsl (full float precision) for the predicted
images; an existing file is kept unless --overwrite.

An image that cannot be read is reported on stderr and skipped (no line, no CSV row);
the others are still predicted. Exit codes: 0 all predicted, 1 some images could not be
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
class folder is its own patient). --aggregate says how a patient's slice probabilities
combine: mean (default), median, or max (the most extreme call: the slice probability
farthest from 0.5). --per-patient - prints one line per patient, in the slice lines'
format, after the slice lines.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from gbmpcnsl.files import write_csv
from gbmpcnsl_common import (
    CLASS_NAMES,
    UserError,
    ensemble_checkpoints,
    import_tensorflow,
    interrupt_between_batches,
    load_model_for_inference,
    log,
    model_input_size,
    patient_id,
    run_main,
    setup_logging,
    split_model_arguments,
)
from gbmpcnsl_io import add_slice_arguments, find_slices, load_slice, slice_options

LINE_FORMAT = "{path:<40} {percent:.2f} % {name}"
AGGREGATES = ("mean", "median", "max")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="step2_predict.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="*", metavar="IMAGE_OR_FOLDER", help="image files or folders")
    parser.add_argument(
        "--model-weights",
        required=True,
        nargs="+",
        metavar="CKPT",
        help="checkpoint to predict with; several checkpoints or a CV run folder: their mean",
    )
    parser.add_argument(
        "--csv", type=Path, metavar="FILE", help="also write path,prob_gbm,prob_pcnsl to FILE"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --csv file")
    parser.add_argument(
        "--batch-size", type=positive_int, default=32, metavar="N", help="images per batch (default 32)"
    )
    parser.add_argument("--tta", action="store_true", help="average over the 4 training flips")
    parser.add_argument(
        "--per-model", action="store_true", help="with several models: one CSV column per model"
    )
    parser.add_argument(
        "--per-patient",
        metavar="FILE",
        help="also write patient_id,n_slices,prob_gbm,prob_pcnsl to FILE ('-': lines on stdout)",
    )
    parser.add_argument(
        "--aggregate",
        choices=AGGREGATES,
        default="mean",
        help="a patient's probability from its slices' (default mean; max: the most extreme call)",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging and TensorFlow's own messages")
    add_slice_arguments(parser)
    args = parser.parse_args(argv)
    args.model_weights, args.images = split_model_arguments(args.model_weights, args.images)
    if not args.images:
        parser.error("the following arguments are required: IMAGE_OR_FOLDER")
    return args


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def result_line(path: str, prob_pcnsl: float) -> str:
    """The original's output line: the more likely class and its probability in percent."""
    if prob_pcnsl > 1 - prob_pcnsl:
        return LINE_FORMAT.format(path=str(path), percent=100 * prob_pcnsl, name=CLASS_NAMES[1])
    return LINE_FORMAT.format(path=str(path), percent=100 * (1 - prob_pcnsl), name=CLASS_NAMES[0])


def expand_inputs(inputs: list[str], options: dict | None = None) -> list[str]:
    """Slice names to predict, as given: a file stays the string the user typed (a volume
    becomes "<file>#<k>" per slice), a folder expands to its slices (sorted, recursive,
    series in position order). `options`: gbmpcnsl_io.find_slices keywords. A missing path
    raises UserError; non-axial series and volumes are skipped with a warning."""
    found = find_slices(inputs, **(options or {}))
    for line in found.skipped["non-axial"]:
        log.warning("warning: skipped %s", line)
    if not found.names:
        raise UserError(f"{' '.join(inputs)}: no slices to predict (see the warnings above)")
    return found.names


# ---------------------------------------------------------------------------- pipeline
def image_dataset(paths: list[str], size: tuple[int, int], batch_size: int, errors: dict):
    """Batches of (index, uint8 image, ok) in input order, the first of one image; images
    are decoded in parallel (load_image in tf.data's threads) while the model runs.

    A file that load_image cannot read gives a zero image with ok=False and its message
    in `errors[index]`, so one bad file does not stop the others.
    """
    import numpy as np
    import tensorflow as tf

    def load(index, path):
        try:
            return load_slice(path.decode(), size), True
        except UserError as error:
            errors[int(index)] = str(error)
            return np.zeros((*size, 3), np.uint8), False

    def load_in_graph(index, path):
        image, ok = tf.numpy_function(load, [index, path], [tf.uint8, tf.bool], stateful=False)
        image.set_shape((*size, 3))
        ok.set_shape(())
        return index, image, ok

    items = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), paths))
    # The first batch holds one image, so that the first line appears as soon as the model
    # is ready; full batches follow.
    first = items.take(1).map(load_in_graph).batch(1)
    rest = items.skip(1).map(load_in_graph, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return first.concatenate(rest.batch(batch_size)).prefetch(tf.data.AUTOTUNE)


def predict_function(model, tta: bool):
    """uint8 batch -> P(PCNSL) per image; with tta the mean over identity, lr, ud, lr+ud flips."""
    import tensorflow as tf

    height, width = model_input_size(model)

    @tf.function(input_signature=[tf.TensorSpec((None, height, width, 3), tf.uint8)])
    def predict(images):
        images = tf.cast(images, tf.float32)
        if not tta:
            return model(images, training=False)[:, 0]
        flips = [images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]]
        prob_pcnsl = model(tf.concat(flips, axis=0), training=False)[:, 0]
        return tf.reduce_mean(tf.reshape(prob_pcnsl, (4, -1)), axis=0)

    return predict


# ---------------------------------------------------------------------------- patients
def aggregate_patients(
    rows: list[tuple[str, float]], aggregate: str = "mean"
) -> list[tuple[str, int, float]]:
    """(patient_id, n_slices, prob_pcnsl) per patient, in order of first appearance.

    rows: (slice name, prob_pcnsl). aggregate: "mean", "median", or "max", the most
    extreme call: the slice probability farthest from 0.5 (the first such slice on a tie).
    """
    import numpy as np

    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate {aggregate!r}: expected one of {', '.join(AGGREGATES)}")
    by_patient: dict[str, list[float]] = {}
    for path, prob_pcnsl in rows:
        by_patient.setdefault(patient_id(path), []).append(prob_pcnsl)
    patients = []
    for patient, probs in by_patient.items():
        probs = np.asarray(probs, dtype=np.float64)
        if aggregate == "mean":
            value = probs.mean()
        elif aggregate == "median":
            value = np.median(probs)
        else:
            value = probs[np.argmax(np.abs(probs - 0.5))]
        patients.append((patient, len(probs), float(value)))
    return patients


# ---------------------------------------------------------------------------- exported models
# A predict-batch function maps a batch of images (N, H, W, 3), uint8 or float 0-255, to
# P(PCNSL) (N,) as numpy. Exported models get one from their runtime, without TensorFlow;
# several such functions can be averaged (an ensemble of exported models).
PredictBatch = Callable[[np.ndarray], np.ndarray]

EXPORTED_MODEL_RUNTIMES = {".onnx": ("ONNX Runtime", "onnxruntime"), ".xml": ("OpenVINO", "openvino")}


def is_exported_model(path: str | Path) -> bool:
    """True for a model exported by step6 (.onnx or OpenVINO .xml), run without TensorFlow."""
    return Path(path).suffix.lower() in EXPORTED_MODEL_RUNTIMES


def _import_runtime(path: Path):
    """The runtime module for an exported model; a missing one is a one-line UserError."""
    name, module = EXPORTED_MODEL_RUNTIMES[path.suffix.lower()]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise UserError(
            f"{path}: running this model needs {name}, which is not installed "
            f"(pip install -r requirements.txt, or pip install {module})"
        ) from error


def openvino_cache_dir(xml_path: Path) -> Path:
    """Where OpenVINO keeps this model's compiled form (CACHE_DIR), so that later runs
    start fast: one folder per content of the .xml and .bin (OpenVINO's own cache key
    for a model file ignores the .bin, and would serve a stale model after it changed)."""
    digest = hashlib.sha256()
    for path in (xml_path, xml_path.with_suffix(".bin")):
        with open(path, "rb") as file:
            for block in iter(lambda file=file: file.read(1 << 22), b""):
                digest.update(block)
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "gbm-pcnsl" / "openvino" / digest.hexdigest()[:16]


def load_exported_model(path: str | Path) -> tuple[PredictBatch, tuple[int, int], str]:
    """(predict-batch function, (H, W) input size, description) of an exported model:
    ONNX Runtime for .onnx, OpenVINO (CPU, float32, compiled-model cache) for .xml.

    A file the runtime cannot read (corrupt, truncated, a .bin that does not belong to its
    .xml) raises UserError in one line.
    """
    path = Path(path)
    runtime = _import_runtime(path)
    try:
        if path.suffix.lower() == ".onnx":
            session = runtime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            image_input = session.get_inputs()[0]
            shape, input_name = list(image_input.shape), image_input.name

            def predict(images):
                feed = {input_name: np.asarray(images, dtype=np.float32)}
                return session.run(None, feed)[0].reshape(-1)

        else:
            core = runtime.Core()
            cache_dir = openvino_cache_dir(path)
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
                core.set_property({"CACHE_DIR": str(cache_dir)})
            except OSError:  # a read-only home: run without the cache
                pass
            # float32 as exported (this CPU would otherwise pick bf16); one request, all cores.
            config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
            compiled = core.compile_model(str(path), "CPU", config)
            request = compiled.create_infer_request()
            shape = [
                dim.get_length() if dim.is_static else None for dim in compiled.inputs[0].get_partial_shape()
            ]

            def predict(images):
                request.infer({0: np.asarray(images, dtype=np.float32)})
                return request.get_output_tensor(0).data.reshape(-1).copy()

    except Exception as error:  # the runtimes raise their own types for unreadable files
        message = str(error).strip().splitlines()
        raise UserError(
            f"{path}: cannot load exported model ({message[0] if message else type(error).__name__})"
        ) from error
    if len(shape) != 4 or shape[3] != 3 or not all(isinstance(dim, int) for dim in shape[1:3]):
        raise UserError(f"{path}: expected an image model with input (N, H, W, 3), got input shape {shape}")
    name = EXPORTED_MODEL_RUNTIMES[path.suffix.lower()][0]
    return predict, (int(shape[1]), int(shape[2])), f"exported model run by {name}"


def with_flips(predict: PredictBatch) -> PredictBatch:
    """--tta for a predict-batch function: the mean over identity, lr, ud and lr+ud flips."""

    def predict_with_flips(images):
        flips = np.concatenate([images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]])
        return predict(flips).reshape(4, -1).mean(axis=0)

    return predict_with_flips


def image_batches(paths: list[str], size: tuple[int, int], batch_size: int, errors: dict) -> Iterator[tuple]:
    """image_dataset without TensorFlow: numpy batches of (index, uint8 image, ok), the
    first of one image, decoded by a thread pool up to two batches ahead of the model."""

    def load(index):
        try:
            return load_slice(paths[index], size), True
        except UserError as error:
            errors[index] = str(error)
            return np.zeros((*size, 3), np.uint8), False

    bounds = [0, *range(1, len(paths), batch_size), len(paths)]
    batches = [range(start, stop) for start, stop in zip(bounds, bounds[1:], strict=False) if stop > start]

    def collect(batch, futures):
        images, ok = zip(*(future.result() for future in futures), strict=True)
        return np.array(batch), np.stack(images), np.array(ok)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        ahead = deque()
        for batch in batches:
            ahead.append((batch, [pool.submit(load, index) for index in batch]))
            if len(ahead) > 2:
                yield collect(*ahead.popleft())
        while ahead:
            yield collect(*ahead.popleft())


# ---------------------------------------------------------------------------- output
def _main(argv) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)

    # Everything that can be checked without TensorFlow, before any work.
    checkpoints = ensemble_checkpoints(args.model_weights)
    for _, model_path in checkpoints:
        if not model_path.is_file():
            raise UserError(f"--model-weights {model_path}: no such file")
    if args.csv is not None:
        if args.csv.exists() and not args.overwrite:
            raise UserError(f"--csv {args.csv}: exists (use --overwrite to replace it)")
        if not args.csv.parent.is_dir():
            raise UserError(f"--csv {args.csv}: folder {args.csv.parent} does not exist")
    if args.per_patient not in (None, "-"):
        per_patient = Path(args.per_patient)
        if per_patient.exists() and not args.overwrite:
            raise UserError(f"--per-patient {per_patient}: exists (use --overwrite to replace it)")
        if not per_patient.parent.is_dir():
            raise UserError(f"--per-patient {per_patient}: folder {per_patient.parent} does not exist")
    paths = expand_inputs(args.images, slice_options(args))

    # Load the model; its input size is the image size. An exported model (.onnx, .xml)
    # runs in its own runtime and never imports TensorFlow.
    started = time.perf_counter()
    errors: dict[int, str] = {}
    if not all(is_exported_model(path) for _, path in checkpoints):
        import_tensorflow(args.verbose)  # without TF's C++ start-up notices on stderr
    predicts: list[PredictBatch] = []  # one per model; an ensemble averages them
    size = None
    for _, model_path in checkpoints:
        if is_exported_model(model_path):
            predict, model_size, description = load_exported_model(model_path)
            predicts.append(with_flips(predict) if args.tta else predict)
        else:
            model = load_model_for_inference(model_path)
            model_size, description = model_input_size(model), model.name
            tf_predict = predict_function(model, args.tta)
            predicts.append(lambda images, tf_predict=tf_predict: tf_predict(images).numpy())
        if size is not None and model_size != size:
            raise UserError(
                f"--model-weights {model_path}: input size {model_size} differs from "
                f"{checkpoints[0][1]}'s {size}; an ensemble needs one image size"
            )
        size = model_size
    if len(checkpoints) > 1:
        log.info(
            f"ensemble of {len(checkpoints)} models (P(PCNSL) is their mean): "
            + ", ".join(f"{name} = {path}" for name, path in checkpoints)
        )
    if all(is_exported_model(path) for _, path in checkpoints):
        batches = image_batches(paths, size, args.batch_size, errors)
    else:
        batches = (
            tuple(tensor.numpy() for tensor in batch)
            for batch in image_dataset(paths, size, args.batch_size, errors)
        )
    source = (
        f"{model_path}: {description}" if len(checkpoints) == 1 else f"ensemble of {len(checkpoints)} models"
    )
    log.info(
        f"{source}, {size[0]}x{size[1]} input; "
        f"predicting {len(paths)} image{'s' * (len(paths) != 1)}{' with 4 flips (--tta)' if args.tta else ''}"
    )

    # Predict batch by batch, printing each batch's lines as soon as it is done.
    import numpy as np
    from tqdm import tqdm

    rows, member_rows = [], []  # (path, mean prob_pcnsl); each model's prob_pcnsl per row
    with (
        interrupt_between_batches() as check_interrupt,
        tqdm(total=len(paths), unit="img", file=sys.stderr, disable=None, leave=False) as progress,
    ):
        for indices, images, ok in batches:
            check_interrupt()
            member_probs = np.stack([predict(images) for predict in predicts]).astype(np.float64)
            prob_pcnsl = member_probs.mean(axis=0)  # one model: its own float32 values
            for index, prob, readable, members in zip(indices, prob_pcnsl, ok, member_probs.T, strict=True):
                if not readable:
                    progress.write(f"error: {errors[int(index)]}", file=sys.stderr)
                    continue
                rows.append((paths[index], float(prob)))
                member_rows.append(members)
                print(result_line(paths[index], float(prob)))
            sys.stdout.flush()
            progress.update(len(prob_pcnsl))

    if args.csv is not None and len(predicts) == 1 and not args.per_model:
        write_csv(
            args.csv, ["path", "prob_gbm", "prob_pcnsl"], [[path, 1.0 - prob, prob] for path, prob in rows]
        )
        log.info(f"wrote {args.csv}")
    elif args.csv is not None:
        header = ["path", "prob_gbm", "prob_pcnsl", "prob_pcnsl_std"]
        if args.per_model:
            header += [f"prob_pcnsl_{name}" for name, _ in checkpoints]
        table = []
        for (path, prob), members in zip(rows, member_rows, strict=True):
            extra = [float(v) for v in members] if args.per_model else []
            table.append([path, 1.0 - prob, prob, float(np.std(members)), *extra])
        write_csv(args.csv, header, table)
        log.info(f"wrote {args.csv}")
    if args.per_patient is not None:
        patients = aggregate_patients(rows, args.aggregate)
        if args.per_patient == "-":
            for patient, _, prob in patients:
                print(result_line(patient, prob))
        else:
            write_csv(
                Path(args.per_patient),
                ["patient_id", "n_slices", "prob_gbm", "prob_pcnsl"],
                [[patient, n_slices, 1.0 - prob, prob] for patient, n_slices, prob in patients],
            )
            log.info(f"wrote {args.per_patient} ({len(patients)} patients, {args.aggregate} of their slices)")
    elapsed = time.perf_counter() - started
    log.info(
        f"predicted {len(rows)} of {len(paths)} images in {elapsed:.1f} s ({len(rows) / elapsed:.1f} images/s)"
    )
    if errors:
        log.info(f"{len(errors)} image{'s' * (len(errors) != 1)} could not be read (see above)")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
