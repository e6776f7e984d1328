"""Predictors: uint8 image batches in, P(PCNSL) out, for Keras models, exported models
(ONNX Runtime, OpenVINO), test-time flips and ensembles; and the image batches they read.

A predict-batch function maps a batch of images (N, H, W, 3), uint8 or float 0-255, to
P(PCNSL) (N,) as numpy. Every kind of model becomes one; test-time augmentation wraps one
(with_flips); an ensemble is a list of them whose probabilities are averaged.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gbmpcnsl.checkpoints import load_model_for_inference, model_input_size
from gbmpcnsl.cli import Progress
from gbmpcnsl.files import write_csv
from gbmpcnsl.patients import PATIENT_COLUMNS, aggregate_patients
from gbmpcnsl.pixels import load_slice
from gbmpcnsl.sources import FoundSlices, find_slices
from gbmpcnsl_common import CLASS_NAMES, UserError, import_tensorflow, interrupt_between_batches, log

PredictBatch = Callable[[np.ndarray], np.ndarray]

LINE_FORMAT = "{path:<40} {percent:.2f} % {name}"
EXPORTED_MODEL_RUNTIMES = {".onnx": ("ONNX Runtime", "onnxruntime"), ".xml": ("OpenVINO", "openvino")}


def result_line(path: str, prob_pcnsl: float) -> str:
    """The original's output line: the more likely class and its probability in percent."""
    if prob_pcnsl > 1 - prob_pcnsl:
        return LINE_FORMAT.format(path=str(path), percent=100 * prob_pcnsl, name=CLASS_NAMES[1])
    return LINE_FORMAT.format(path=str(path), percent=100 * (1 - prob_pcnsl), name=CLASS_NAMES[0])


def expand_inputs(inputs: list[str], options: dict | None = None, purpose: str = "predict") -> FoundSlices:
    """Slice names (`.names`), as given: a file stays the string the user typed (a volume
    becomes "<file>#<k>" per slice), a folder expands to its slices (sorted, recursive,
    series in position order), with each slice's series and patient. `options`:
    gbmpcnsl.sources.find_slices keywords. A missing path raises UserError, and so does
    finding no slice ("no slices to <purpose>"); non-axial series and volumes, and patients
    with several series, are skipped with a warning."""
    found = find_slices(inputs, **(options or {}))
    for line in found.skipped["non-axial"]:
        log.warning("warning: skipped %s", line)
    for line in found.warnings:
        log.warning(line)
    counts = [f"{len(v)} {k}" for k, v in found.skipped.items() if v and k not in ("hidden", "non-axial")]
    if counts:  # not images (by kind), other series, patients with several series
        log.info(f"skipped {', '.join(counts)}")
    if not found.names:
        raise UserError(f"{' '.join(inputs)}: no slices to {purpose} (see the warnings above)")
    return found


# ---------------------------------------------------------------------------- Keras models
def predict_function(model):
    """A tf.function: uint8 batch (N, H, W, 3) at the model's input size -> P(PCNSL) (N,)."""
    import tensorflow as tf

    height, width = model_input_size(model)

    @tf.function(input_signature=[tf.TensorSpec((None, height, width, 3), tf.uint8)])
    def predict(images):
        return model(tf.cast(images, tf.float32), training=False)[:, 0]

    return predict


def keras_predictor(model) -> PredictBatch:
    """predict_function as a predict-batch function (numpy in, numpy out)."""
    predict = predict_function(model)
    return lambda images: predict(images).numpy()


# ---------------------------------------------------------------------------- test-time augmentation
def with_flips(predict: PredictBatch) -> PredictBatch:
    """--tta for any predict-batch function: the mean P(PCNSL) over the four flips that
    training augmentation draws from (identity, left-right, up-down, both), run as one
    batch of 4N images."""

    def predict_with_flips(images):
        flips = np.concatenate([images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]])
        return predict(flips).reshape(4, -1).mean(axis=0)

    return predict_with_flips


# ---------------------------------------------------------------------------- exported models
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


def _onnx_predictor(onnxruntime, path: Path) -> tuple[PredictBatch, list]:
    """(predict-batch function, input shape) of an ONNX model, on the CPU."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image_input = session.get_inputs()[0]
    input_name = image_input.name

    def predict(images):
        return session.run(None, {input_name: np.asarray(images, dtype=np.float32)})[0].reshape(-1)

    return predict, list(image_input.shape)


def _openvino_predictor(openvino, path: Path) -> tuple[PredictBatch, list]:
    """(predict-batch function, input shape) of an OpenVINO IR, compiled for the CPU in
    float32 with the compiled-model cache."""
    core = openvino.Core()
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
    shape = [dim.get_length() if dim.is_static else None for dim in compiled.inputs[0].get_partial_shape()]

    def predict(images):
        images = np.asarray(images, dtype=np.float32)
        # OpenVINO 2026.4 crashes (SIGSEGV) running an NNCF int8 IR on a one-image batch of
        # its dynamic batch dimension; two copies run, and the first answer is kept.
        request.infer({0: np.concatenate([images, images]) if len(images) == 1 else images})
        return request.get_output_tensor(0).data.reshape(-1)[: len(images)].copy()

    return predict, shape


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
            predict, shape = _onnx_predictor(runtime, path)
        else:
            predict, shape = _openvino_predictor(runtime, path)
    except Exception as error:  # the runtimes raise their own types for unreadable files
        message = str(error).strip().splitlines()
        raise UserError(
            f"{path}: cannot load exported model ({message[0] if message else type(error).__name__})"
        ) from error
    if len(shape) != 4 or shape[3] != 3 or not all(isinstance(dim, int) for dim in shape[1:3]):
        raise UserError(f"{path}: expected an image model with input (N, H, W, 3), got input shape {shape}")
    name = EXPORTED_MODEL_RUNTIMES[path.suffix.lower()][0]
    return predict, (int(shape[1]), int(shape[2])), f"exported model run by {name}"


# ---------------------------------------------------------------------------- ensembles
def ensemble_input_size(sizes: list[tuple[Path, tuple[int, int]]]) -> tuple[int, int]:
    """The one input size of an ensemble's models, from (checkpoint, (H, W)) pairs in the
    order given; a model whose size differs from the first's raises UserError."""
    first_path, first_size = sizes[0]
    for path, size in sizes[1:]:
        if size != first_size:
            raise UserError(
                f"--model-weights {path}: input size {size} differs from "
                f"{first_path}'s {first_size}; an ensemble needs one image size"
            )
    return first_size


@dataclass(frozen=True)
class Ensemble:
    """One or more models that predict together: P(PCNSL) is the mean of `predicts`."""

    checkpoints: list[tuple[str, Path]]  # (column name, path) per model, as ensemble_checkpoints
    predicts: list[PredictBatch]
    input_size: tuple[int, int]
    description: str  # for the log: the model, or "ensemble of N models"
    needs_tensorflow: bool  # False when every model is an export, run in its own runtime


def load_predictor(path: Path) -> tuple[PredictBatch, tuple[int, int], str]:
    """(predict-batch function, (H, W) input size, description) of any model step2 reads:
    an exported model in its runtime, else a checkpoint in Keras."""
    if is_exported_model(path):
        return load_exported_model(path)
    model = load_model_for_inference(path)
    return keras_predictor(model), model_input_size(model), model.name


def load_ensemble(checkpoints: list[tuple[str, Path]], tta: bool = False, verbose: bool = False) -> Ensemble:
    """Load every model of `checkpoints` (ensemble_checkpoints' list), with the 4 flips
    when `tta`. TensorFlow is imported only when a model needs it."""
    needs_tensorflow = not all(is_exported_model(path) for _, path in checkpoints)
    if needs_tensorflow:
        import_tensorflow(verbose)  # without TF's C++ start-up notices on stderr
    predicts, sizes = [], []
    for _, path in checkpoints:
        predict, size, description = load_predictor(path)
        predicts.append(with_flips(predict) if tta else predict)
        sizes.append((path, size))
    input_size = ensemble_input_size(sizes)
    if len(checkpoints) > 1:
        log.info(
            f"ensemble of {len(checkpoints)} models (P(PCNSL) is their mean): "
            + ", ".join(f"{name} = {path}" for name, path in checkpoints)
        )
        description = f"ensemble of {len(checkpoints)} models"
    else:
        description = f"{checkpoints[0][1]}: {description}"
    return Ensemble(checkpoints, predicts, input_size, description, needs_tensorflow)


def member_probabilities(predicts: list[PredictBatch], images: np.ndarray) -> np.ndarray:
    """Each model's P(PCNSL) for a batch, float64 (models, N); their mean is the ensemble's."""
    return np.stack([predict(images) for predict in predicts]).astype(np.float64)


# ---------------------------------------------------------------------------- image batches
def image_dataset(paths: list[str], size: tuple[int, int], batch_size: int, errors: dict):
    """tf.data batches of (index, uint8 image, ok) in input order, the first of one image;
    images are decoded in parallel (load_slice in tf.data's threads) while the model runs.

    A file that load_slice cannot read gives a zero image with ok=False and its message
    in `errors[index]`, so one bad file does not stop the others.
    """
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


def slice_batches(
    paths: list[str], size: tuple[int, int], batch_size: int, errors: dict, tensorflow: bool
) -> Iterator[tuple]:
    """Numpy batches of (index, uint8 image, ok): from tf.data when TensorFlow runs the
    models anyway, else from a thread pool (image_batches)."""
    if not tensorflow:
        return image_batches(paths, size, batch_size, errors)
    return (
        tuple(tensor.numpy() for tensor in batch) for batch in image_dataset(paths, size, batch_size, errors)
    )


# ---------------------------------------------------------------------------- prediction
def predict_slices(
    paths: list[str], predicts: list[PredictBatch], batches: Iterator[tuple], errors: dict
) -> tuple[list[tuple[str, float]], list[np.ndarray]]:
    """Predict batch by batch, printing each readable slice's result_line on stdout as
    soon as its batch is done; an unreadable one is reported on stderr (errors[index]), each
    message once (all the slices of an unreadable volume share one).

    Returns (slice name, mean P(PCNSL)) per predicted slice, and each model's P(PCNSL)
    for the same slices. Ctrl-C is taken at a batch boundary.
    """
    rows, member_rows, reported = [], [], set()
    with interrupt_between_batches() as check_interrupt, Progress(len(paths), "predicted") as progress:
        for indices, images, ok in batches:
            check_interrupt()
            member_probs = member_probabilities(predicts, images)
            prob_pcnsl = member_probs.mean(axis=0)  # one model: its own float32 values
            for index, prob, readable, members in zip(indices, prob_pcnsl, ok, member_probs.T, strict=True):
                if not readable:
                    if errors[int(index)] not in reported:  # an unreadable volume: one line
                        reported.add(errors[int(index)])
                        progress.write(f"error: {errors[int(index)]}")
                    continue
                rows.append((paths[index], float(prob)))
                member_rows.append(members)
                print(result_line(paths[index], float(prob)))
            sys.stdout.flush()
            progress.update(len(prob_pcnsl))
    return rows, member_rows


# ---------------------------------------------------------------------------- outputs
def prediction_table(
    rows: list[tuple[str, float]],
    member_rows: list[np.ndarray],
    member_names: list[str],
    per_model: bool,
    series: dict[str, str] | None = None,
) -> tuple[list[str], list[list]]:
    """(header, rows) of step2's --csv: path,prob_gbm,prob_pcnsl for one model; an
    ensemble (or --per-model) adds prob_pcnsl_std, and with per_model one
    prob_pcnsl_<name> column per model. `series` ({slice name: series}) adds a last
    column `series` when any slice has one (DICOM and NIfTI inputs)."""
    named = series is not None and any(series.get(path) for path, _ in rows)
    last = (lambda path: [series.get(path, "")]) if named else (lambda path: [])
    if len(member_names) == 1 and not per_model:
        header = ["path", "prob_gbm", "prob_pcnsl"] + ["series"] * named
        return header, [[path, 1.0 - prob, prob, *last(path)] for path, prob in rows]
    header = ["path", "prob_gbm", "prob_pcnsl", "prob_pcnsl_std"]
    if per_model:
        header += [f"prob_pcnsl_{name}" for name in member_names]
    table = []
    for (path, prob), members in zip(rows, member_rows, strict=True):
        extra = [float(value) for value in members] if per_model else []
        table.append([path, 1.0 - prob, prob, float(np.std(members)), *extra, *last(path)])
    return header + ["series"] * named, table


def report_patients(
    rows: list[tuple[str, float]], destination: str, aggregate: str, patient_of: dict[str, str] | None = None
) -> None:
    """--per-patient: the patients of `rows` (slice name, P(PCNSL)) as lines on stdout in
    result_line's format (destination "-"), else as a CSV file (PATIENT_COLUMNS).
    `patient_of`: {slice name: patient} (find_slices'); else the patient rule."""
    patients = aggregate_patients(rows, aggregate, patient_of)
    if destination == "-":
        for patient, _, prob in patients:
            print(result_line(patient, prob))
        return
    table = [[patient, n_slices, 1.0 - prob, prob] for patient, n_slices, prob in patients]
    write_csv(Path(destination), PATIENT_COLUMNS, table, private=True)
    log.info(f"wrote {destination} ({len(patients)} patients, {aggregate} of their slices)")
