"""Export: a checkpoint as a TensorFlow SavedModel, ONNX or OpenVINO IR, checked against
Keras in its own runtime before it is kept (step6's machinery)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from gbmpcnsl.checkpoints import model_input_size
from gbmpcnsl.files import file_sha256, private_mode, write_json
from gbmpcnsl.model_card import card_markdown, card_metadata, card_path
from gbmpcnsl.outputs import check_replaceable, discard, move_aside, restore
from gbmpcnsl.predictors import load_exported_model
from gbmpcnsl_common import CLASS_NAMES, UserError, __version__, first_line, log

FORMATS = ("saved_model", "onnx", "openvino")
# Largest |P(PCNSL) export - P(PCNSL) Keras| an export may show: float kernels differ between
# runtimes and CPUs (a correct ONNX export gave 1.07e-5 on one), while a one-grey-level or
# resize error moves it over 10x this (tests/test_export.py, test_deliberate_errors_...).
TOLERANCE = 1e-4
CHECK_IMAGES = 4
ONNX_OPSET = 17
METADATA_NAME = "gbmpcnsl_model.json"  # inside a SavedModel folder
INPUT_NAME, OUTPUT_NAME = "images", "prob_pcnsl"
PREPROCESSING = (
    "RGB values 0-255 as float32, shape (N, H, W, 3), no scaling (the network normalizes "
    "itself); slices read as in training by gbmpcnsl.pixels.load_slice(name, (H, W)): 2-D image "
    'files through gbmpcnsl_common.load_image (Image.convert("RGB") then resize((W, H), '
    "Image.LANCZOS), 16-bit and float images first windowed to 0-255 at their 0.5-99.5 "
    "percentiles), DICOM and NIfTI slices through their own window rules first (input_pipeline)"
)


def output_files(out: Path, export_format: str) -> list[Path]:
    """Every path an export writes (the first is OUT itself), checked before any work."""
    if export_format == "saved_model":
        if out.suffix.lower() in (".onnx", ".xml", ".keras", ".h5"):
            raise UserError(f"{out}: a SavedModel is a folder; give a folder name (e.g. exported/gbm_pcnsl)")
        return [out]
    suffix = {"onnx": ".onnx", "openvino": ".xml"}[export_format]
    if out.suffix.lower() != suffix:
        raise UserError(f"{out}: --format {export_format} writes a {suffix} file; name OUT *{suffix}")
    files = [out, card_path(out, export_format), out.with_name(out.name + ".json")]
    if export_format == "openvino":
        files.insert(1, out.with_suffix(".bin"))
    return files


def check_images(size: tuple[int, int], count: int = CHECK_IMAGES) -> np.ndarray:
    """Fixed test images for the check (float32 0-255): noise, flat grey, and gradients."""
    height, width = size
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (height, width, 3)), np.full((height, width, 3), 128)]
    ramp = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
    images += [ramp, ramp[:, ::-1] * rng.uniform(0.5, 1, 3)]
    return np.stack(images[:count]).astype(np.float32)


# ---------------------------------------------------------------------------- export
def inference_function(model):
    """tf.function: float32 images (N, H, W, 3), 0-255 -> {"prob_pcnsl": (N,)}."""
    import tensorflow as tf

    height, width = model_input_size(model)

    @tf.function(input_signature=[tf.TensorSpec((None, height, width, 3), tf.float32, name=INPUT_NAME)])
    def infer(images):
        return {OUTPUT_NAME: model(images, training=False)[:, 0]}

    return infer


def frozen_inference_function(model):
    """inference_function with every weight and constant folded into the graph.

    tf2onnx and OpenVINO would otherwise turn captured tensors (the Normalization layer's
    mean and variance) into extra model inputs.
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    frozen = convert_variables_to_constants_v2(inference_function(model).get_concrete_function())
    height, width = model_input_size(model)

    @tf.function(input_signature=[tf.TensorSpec((None, height, width, 3), tf.float32, name=INPUT_NAME)])
    def infer(images):
        return {OUTPUT_NAME: tf.identity(frozen(images)[0], name=OUTPUT_NAME)}

    return infer


def write_saved_model(model, folder: Path) -> None:
    """Keras's own SavedModel export with float32 (default) and uint8 serving signatures."""
    import keras
    import tensorflow as tf

    height, width = model_input_size(model)

    def serve_float(images):
        return {OUTPUT_NAME: model(images, training=False)[:, 0]}

    def serve_uint8(images):
        return {OUTPUT_NAME: model(tf.cast(images, tf.float32), training=False)[:, 0]}

    archive = keras.export.ExportArchive()
    archive.track(model)
    for name, function, dtype in (("serve", serve_float, tf.float32), ("serve_uint8", serve_uint8, tf.uint8)):
        spec = tf.TensorSpec((None, height, width, 3), dtype, name=INPUT_NAME)
        archive.add_endpoint(name, function, input_signature=[spec])
    archive.write_out(str(folder), verbose=False)  # "serve" is also "serving_default"


def write_onnx(model, path: Path) -> None:
    import logging

    import tf2onnx

    if not log.isEnabledFor(logging.DEBUG):  # tf2onnx logs each conversion phase at INFO
        logging.getLogger("tf2onnx").setLevel(logging.WARNING)

    infer = frozen_inference_function(model)
    tf2onnx.convert.from_function(
        infer, input_signature=infer.input_signature, opset=ONNX_OPSET, output_path=str(path)
    )


def write_openvino(model, path: Path) -> None:
    """OpenVINO IR (.xml + .bin), float32 weights (save_model would halve them to fp16)."""
    import openvino

    ov_model = openvino.convert_model(frozen_inference_function(model))
    ov_model.inputs[0].get_tensor().set_names({INPUT_NAME})
    ov_model.outputs[0].get_tensor().set_names({OUTPUT_NAME})
    openvino.save_model(ov_model, str(path), compress_to_fp16=False)


def run_export(path: Path, export_format: str, images: np.ndarray) -> dict[str, np.ndarray]:
    """P(PCNSL) of the written export, loaded back in its own runtime, per signature."""
    if export_format == "saved_model":
        import tensorflow as tf

        signatures = tf.saved_model.load(str(path)).signatures
        return {
            "serving_default": signatures["serving_default"](**{INPUT_NAME: tf.constant(images)})[
                OUTPUT_NAME
            ],
            "serve_uint8": signatures["serve_uint8"](**{INPUT_NAME: tf.constant(images.astype(np.uint8))})[
                OUTPUT_NAME
            ],
        }
    predict, _, _ = load_exported_model(path)  # the very engine step2 runs it with
    return {export_format: predict(images)}


def check_export(model, path: Path, export_format: str) -> float:
    """Largest difference between the export and the Keras model on the check images;
    UserError when it exceeds TOLERANCE."""
    images = check_images(model_input_size(model))
    expected = model.predict(images, verbose=0)[:, 0]
    difference = 0.0
    for name, prob_pcnsl in run_export(path, export_format, images).items():
        prob_pcnsl = np.asarray(prob_pcnsl, dtype=np.float64).reshape(-1)
        if prob_pcnsl.shape != expected.shape:
            raise UserError(
                f"export check failed: {name} returned shape {prob_pcnsl.shape}, expected {expected.shape}"
            )
        difference = max(difference, float(np.max(np.abs(prob_pcnsl - expected))))
        if not difference <= TOLERANCE:  # also catches NaN
            raise UserError(
                f"export check failed: {name} differs from the Keras model by {difference:.3g} "
                f"(more than {TOLERANCE:g}) on {len(images)} test images; nothing written"
            )
    return difference


def export_metadata(
    model, checkpoint: Path, export_format: str, files: list[Path], difference: float
) -> dict:
    """What a deployment needs to know besides the graph."""
    import keras
    import tensorflow as tf

    height, width = model_input_size(model)
    versions = {"gbm-pcnsl": __version__, "tensorflow": tf.__version__, "keras": keras.__version__}
    if export_format == "onnx":
        import onnx
        import tf2onnx

        versions |= {"tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__, "onnx_opset": ONNX_OPSET}
    elif export_format == "openvino":
        import openvino

        versions["openvino"] = openvino.__version__
    return {
        "format": export_format,
        "files": [file.name for file in files],
        "model_name": model.name,
        "classes": {name: label for label, name in enumerate(CLASS_NAMES)},
        "output": {"name": OUTPUT_NAME, "shape": [None], "meaning": f"P({CLASS_NAMES[1]}) per image"},
        "input": {"name": INPUT_NAME, "shape": [None, height, width, 3], "dtype": "float32"},
        "input_size": [height, width],
        "preprocessing": PREPROCESSING,
        "signatures": ["serving_default (float32)", "serve_uint8 (uint8)"]
        if export_format == "saved_model"
        else None,
        "source_checkpoint": {"name": checkpoint.name, "sha256": file_sha256(checkpoint)},
        "check": {"images": CHECK_IMAGES, "max_abs_difference": difference, "tolerance": TOLERANCE},
        "tool": f"step6_export_model.py (gbm-pcnsl {__version__})",
        "versions": versions,
        **card_metadata(checkpoint, (height, width)),  # training, input_pipeline, intended_use
    }


def move_into_place(staging: Path, files: list[Path]) -> None:
    """Move the checked export from the staging folder onto its final paths; an older
    SavedModel folder (--overwrite) is moved aside first and removed once the new one is in."""
    for final in files:
        staged = staging / final.name
        os.chmod(staged, private_mode(folder=staged.is_dir()))  # a model of patient data: the user's
        aside = move_aside(final) if final.is_dir() and not final.is_symlink() else None
        try:
            os.replace(staged, final)
        except BaseException:
            restore(aside, final)
            raise
        discard(aside)


def check_destination(checkpoint: Path, out: Path, export_format: str, overwrite: bool) -> list[Path]:
    """Every path the export will write (output_files), after the checks that need no
    TensorFlow: one checkpoint file, OUT's folder exists, no output exists unless
    `overwrite`."""
    if checkpoint.is_dir():  # a run or CV folder: one graph per export, so one checkpoint
        raise UserError(f"--model-weights {checkpoint}: a folder; export one checkpoint file (.keras, .h5)")
    if not checkpoint.is_file():
        raise UserError(f"--model-weights {checkpoint}: no such file")
    files = output_files(out, export_format)
    if not out.parent.is_dir():
        raise UserError(f"{out}: folder {out.parent} does not exist")
    for file in files:
        if file.exists() and not overwrite:
            raise UserError(f"{file}: exists (use --overwrite to replace it)")
    if export_format == "saved_model":  # --overwrite replaces only a SavedModel step6 wrote
        check_replaceable(out, ["saved_model.pb", METADATA_NAME], inputs=[checkpoint])
    elif any(file.exists() for file in files[:-1]) and not files[-1].is_file():
        raise UserError(
            f"{out}: not written by step6 (no {files[-1].name}); --overwrite refuses to replace it"
        )
    return files


def write_export(model, target: Path, export_format: str) -> None:
    """Write the export in `export_format` (one of FORMATS) at `target`."""
    writers = {"saved_model": write_saved_model, "onnx": write_onnx, "openvino": write_openvino}
    writers[export_format](model, target)


def quantize_checked(model, float_xml: Path, int8_xml: Path, int8: tuple[Path, float]) -> dict:
    """--int8: the checked float IR `float_xml` quantized by NNCF on int8's calibration
    file, written at `int8_xml` and checked against the float IR on the file's held-out
    patients (gbmpcnsl.quantize); returns the metadata's "int8" entry."""
    from gbmpcnsl import quantize

    calibration, max_auroc_drop = int8
    data = quantize.read_calibration(calibration, model_input_size(model))
    log.info(
        f"int8: calibrating on {len(data.calibration)} slices of {data.patients[0]} patients, "
        f"checking on {len(data.held_out)} slices of {data.patients[1]} other patients"
    )
    try:
        quantize.quantize_openvino(float_xml, int8_xml, data.calibration)
    except Exception as error:  # NNCF and OpenVINO raise their own types
        raise UserError(f"{int8_xml.name}: int8 quantization failed ({first_line(error)})") from error
    float_predict, int8_predict = (load_exported_model(path)[0] for path in (float_xml, int8_xml))
    return quantize.held_out_check(float_predict, int8_predict, data, max_auroc_drop)


def nncf_version() -> str:
    import nncf

    return nncf.__version__


def export_model(
    model,
    checkpoint: Path,
    out: Path,
    export_format: str,
    files: list[Path],
    int8: tuple[Path, float] | None = None,
) -> tuple[float, dict | None]:
    """Export `model` (loaded from `checkpoint`) to `files` (check_destination's list):
    written into a staging folder beside OUT, checked against Keras, its metadata added,
    then moved into place; on any failure nothing is left behind. `int8` (OpenVINO only):
    (calibration HDF5 file, largest AUROC drop allowed), see quantize_checked. Returns the
    largest difference the float check found and the int8 check's report (or None)."""
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.export-"))  # unguessable
    report = None
    try:
        target = staging / (out.name if int8 is None else "float.xml")
        try:
            write_export(model, target, export_format)
        except Exception as error:  # the converters raise their own types
            raise UserError(f"{out}: {export_format} export failed ({first_line(error)})") from error
        difference = check_export(model, target, export_format)
        if int8 is not None:
            report = quantize_checked(model, target, staging / out.name, int8)
        metadata = export_metadata(model, checkpoint, export_format, files, difference)
        metadata["weights"] = "int8 (NNCF post-training quantization)" if report else "float32"
        metadata["int8"] = report
        if report:
            metadata["versions"]["nncf"] = nncf_version()
        write_json(
            target / METADATA_NAME if export_format == "saved_model" else staging / files[-1].name, metadata
        )
        card = card_path(target if export_format == "saved_model" else staging / out.name, export_format)
        card.write_text(card_markdown(metadata))
        move_into_place(staging, files)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return difference, report
