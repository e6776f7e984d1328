"""Checkpoints: loading a model for inference (Keras 3, weights-only, legacy tf.keras 2.x
HDF5), the checkpoints of an ensemble, and the model arguments of step2 and step5.

    load_model_for_inference(path)       any accepted checkpoint -> a Keras model
    ensemble_checkpoints(items)          files and CV run folders -> (name, checkpoint)
    split_model_arguments(models, rest)  --model-weights A [B ...] IMAGES -> (models, images)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gbmpcnsl.limits import check_shape
from gbmpcnsl.model import IMAGENET_STDDEV_RGB, build_model, scale_normalization_variance
from gbmpcnsl.runs import CV_JSON
from gbmpcnsl_common import UserError, first_line, log


def model_input_size(model) -> tuple[int, int]:
    """(H, W) of a model's image input."""
    shape = model.inputs[0].shape
    return int(shape[1]), int(shape[2])


# ---------------------------------------------------------------------------- legacy tf.keras 2.x files
# Blocks (count of "block*_project_conv" layers) and channels of "top_conv" of each
# keras.applications EfficientNet: together they name the backbone of a legacy file.
_EFFICIENTNET_SIGNATURES = {
    (16, 1280): "efficientnetb0",
    (23, 1280): "efficientnetb1",
    (23, 1408): "efficientnetb2",
    (26, 1536): "efficientnetb3",
    (32, 1792): "efficientnetb4",
    (39, 2048): "efficientnetb5",
    (45, 2304): "efficientnetb6",
    (55, 2560): "efficientnetb7",
}


def _decode(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _read_legacy_layers(path: Path) -> tuple[list[str], int | None, object]:
    """The layer names, the top_conv kernel's output channels (None without one) and the
    saved model config (None in a weights-only file) of a tf.keras 2.x HDF5 file."""
    import h5py

    try:
        h5file = h5py.File(path, "r")
    except OSError as error:
        raise UserError(f"{path}: not an HDF5 file ({error})") from error
    with h5file:
        weights_group = h5file["model_weights"] if "model_weights" in h5file else h5file
        if "layer_names" not in weights_group.attrs:
            raise UserError(f"{path}: an HDF5 file without Keras layer weights (is it step0's image file?)")
        layer_names = [_decode(name) for name in weights_group.attrs["layer_names"]]
        top_channels = None
        if "top_conv" in weights_group:
            kernels = []  # "top_conv/kernel:0" (tf.keras 2.x) or "top_conv/kernel" (Keras 3)

            def collect_kernel(name, item):
                if "kernel" in name:
                    kernels.append(item.shape)

            weights_group["top_conv"].visititems(collect_kernel)
            top_channels = int(kernels[0][-1]) if kernels else None
        config = h5file.attrs.get("model_config")
    return layer_names, top_channels, config


def _legacy_model_info(path: Path) -> dict:
    """What a tf.keras 2.x HDF5 checkpoint (full model or weights only) holds:
    {"backbone", "input_shape", "extra_scale"}.

    The backbone comes from the layer names and the top_conv kernel; the input shape from
    the saved model config (weights-only files: the original 380x380). "extra_scale" is
    the per-channel factor of the scaling op that tf.keras >= 2.9 inserts after
    Normalization when a model is built with weights="imagenet" (tensorflow issue 49930;
    None for TF 2.5 graphs such as the paper's). A full-model file holds its constant in
    the saved config; a weights-only file lists the op in its layer_names (between the
    Normalization layer and "stem_conv_pad"), and the op is then Keras's 1/sqrt(stddev).
    """
    layer_names, top_channels, config = _read_legacy_layers(path)
    blocks = sum(1 for name in layer_names if name.startswith("block") and name.endswith("_project_conv"))
    backbone = _EFFICIENTNET_SIGNATURES.get((blocks, top_channels))
    if backbone is None:
        raise UserError(
            f"{path}: not an EfficientNet model of the original architecture "
            f"({blocks} blocks, top_conv with {top_channels} channels)"
        )
    info = {"backbone": backbone, "input_shape": (380, 380, 3), "extra_scale": None}
    normalization = next((i for i, n in enumerate(layer_names) if n.startswith("normalization")), None)
    if normalization is not None and "stem_conv_pad" in layer_names:
        if layer_names.index("stem_conv_pad") > normalization + 1:  # a scaling layer in between
            info["extra_scale"] = 1.0 / np.sqrt(np.asarray(IMAGENET_STDDEV_RGB, dtype=np.float64))
    if config is None:
        return info
    return _read_config_info(path, info, config)


def _read_config_info(path: Path, info: dict, config) -> dict:
    """`info` corrected by a full-model file's saved config: its input shape, and the
    extra ImageNet scaling layer between Normalization and "stem_conv_pad" (if any)."""
    try:
        layers = json.loads(_decode(config))["config"]["layers"]
        for layer in layers:
            if layer["class_name"] == "InputLayer":
                shape = layer["config"].get("batch_input_shape") or layer["config"].get("batch_shape")
                info["input_shape"] = tuple(int(d) for d in shape[1:])
                break
        classes = [layer["class_name"] for layer in layers]
        names = [layer["name"] for layer in layers]
        between = layers[classes.index("Normalization") + 1 : names.index("stem_conv_pad")]
    except (KeyError, TypeError, ValueError):
        return info
    if between:  # tf.math.multiply / tf.math.truediv (TFOpLambda) or Rescaling
        scale = _find_scale(between[0])
        numbers = [float(v) for v in np.ravel(scale)] if scale is not None else []
        if len(numbers) == 1:
            numbers = numbers * 3
        if len(numbers) != 3:  # unreadable: Keras's own constant, 1 / sqrt(stddev)
            log.warning("warning: %s: cannot read the extra ImageNet scaling; using 1/sqrt(stddev)", path)
            numbers = [1.0 / np.sqrt(s) for s in IMAGENET_STDDEV_RGB]
        info["extra_scale"] = np.asarray(numbers, dtype=np.float64)
    elif info["extra_scale"] is not None:
        info["extra_scale"] = None  # the config is the truth: no layer between
    return info


def _find_scale(layer_config: dict) -> np.ndarray | None:
    """The factor the extra ImageNet scaling layer multiplies its input by, read from a
    saved model config: Rescaling's `scale`; a TFOpLambda tf.math.multiply by y (y) or
    tf.math.truediv by y (1 / y). None if the layer is none of these."""
    if layer_config["class_name"] == "Rescaling":
        scale = layer_config["config"].get("scale")
        return None if scale is None else np.asarray(scale, dtype=np.float64)
    if layer_config["class_name"] != "TFOpLambda":
        return None
    function = str(layer_config["config"].get("function", ""))
    try:
        # tf.keras saves a TFOpLambda's call as [[inbound_layer, node, tensor, {"y": constant}]]
        # (older versions nest it once more: [[[inbound_layer, node, tensor, {...}]]]).
        node = layer_config["inbound_nodes"][0]
        if isinstance(node[0], list):
            node = node[0]
        y = np.asarray(node[3]["y"], dtype=np.float64)
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    if function.endswith("multiply"):
        return y
    if function.endswith(("truediv", "divide")):
        return 1.0 / y
    return None


def _is_legacy_h5(path: Path) -> bool:
    """True for an HDF5 file in tf.keras 2.x's layout (root or model_weights layer_names)."""
    import h5py

    try:
        with h5py.File(path, "r") as h5file:
            return "layer_names" in h5file.attrs or "model_weights" in h5file
    except OSError:
        return False


# ---------------------------------------------------------------------------- loading
def _check_image_model(model, path: Path):
    """A model step2/step5 can use: one (H, W, 3) image input, one probability out."""
    input_shape = tuple(model.inputs[0].shape) if len(model.inputs) == 1 else None
    output_shape = tuple(model.outputs[0].shape) if len(model.outputs) == 1 else None
    if input_shape is None or len(input_shape) != 4 or input_shape[-1] != 3 or output_shape[1:] != (1,):
        raise UserError(
            f"{path}: expected a model from (H, W, 3) images to one probability, "
            f"got inputs {[tuple(t.shape) for t in model.inputs]} -> outputs {[tuple(t.shape) for t in model.outputs]}"
        )
    if input_shape[1] is None or input_shape[2] is None:
        raise UserError(f"{path}: the model's input has no fixed size ({input_shape[1]} x {input_shape[2]})")
    # every image is resized to the input: an untrusted file must not declare 40000 x 40000
    check_shape(input_shape[1:3], "GBMPCNSL_MAX_INPUT_PIXELS", path, "input pixels")
    return model


def load_model_for_inference(path: str | Path):
    """Load a checkpoint for prediction or Grad-CAM; never downloads anything.

    - `.keras`: a full Keras 3 model (step1's checkpoints), loaded with safe_mode on.
    - `.weights.h5`: weights only, with a run.json beside it (or one folder up) that
      records the backbone and image size.
    - `.h5` / `.hdf5`: a file saved by tf.keras 2.x with the original architecture
      (an EfficientNet at any size, the paper's B4 at 380x380; full model or weights
      only): the graph is rebuilt and the weights loaded into it. The backbone and input
      size are read from the file; tf.keras >= 2.9's extra ImageNet scaling op, where the
      file has one (in its config, or in the layer names of a weights-only file), is folded into the Normalization variance as in build_model.
    The image size is the model's input size (model_input_size). Anything else raises
    UserError saying what was expected.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--model-weights {path}: no such file")
    name = path.name.lower()
    expected = (
        "expected a .keras model from step1, a .weights.h5 file with its run.json, "
        "or a tf.keras 2.x .h5/.hdf5 checkpoint of the original EfficientNet model"
    )
    if not name.endswith((".keras", ".h5", ".hdf5")):
        raise UserError(f"{path}: unknown checkpoint type; {expected}")
    import keras

    try:
        if name.endswith(".keras"):
            model = keras.saving.load_model(path, compile=False, safe_mode=True)
            return _check_image_model(model, path)
        run_json = next(
            (p / "run.json" for p in (path.parent, path.parent.parent) if (p / "run.json").is_file()),
            None,
        )
        if name.endswith(".weights.h5") and run_json is not None:
            run = json.loads(run_json.read_text())
            check_shape(run["input_shape"][:2], "GBMPCNSL_MAX_INPUT_PIXELS", run_json, "input pixels")
            model = build_model(run["backbone"], tuple(run["input_shape"]), weights=None)
            model.load_weights(path)
            return model
        if name.endswith(".weights.h5") and not _is_legacy_h5(path):
            raise UserError(f"{path}: a .weights.h5 file needs the run.json of its training run beside it")
        info = _legacy_model_info(path)
        check_shape(info["input_shape"][:2], "GBMPCNSL_MAX_INPUT_PIXELS", path, "input pixels")
        model = build_model(info["backbone"], info["input_shape"], weights=None)
        model.load_weights(path)
        if info["extra_scale"] is not None:  # a multiplication by s is a variance / s**2
            scale_normalization_variance(model, 1.0 / info["extra_scale"] ** 2)
        return model
    except UserError:
        raise
    except Exception as error:
        raise UserError(f"{path}: cannot load model ({first_line(error)}); {expected}") from error


# ---------------------------------------------------------------------------- ensembles
def run_best_checkpoint(path: Path) -> Path:
    """The best checkpoint of step1's run folder `path`, as its run.json names it."""
    run_json = path / "run.json"
    if not run_json.is_file():
        raise UserError(f"--model-weights {path}: a folder, but not a run folder (no run.json or {CV_JSON})")
    try:
        best = json.loads(run_json.read_text()).get("best_checkpoint")
    except (OSError, ValueError, AttributeError) as error:
        raise UserError(f"{run_json}: cannot read ({error})") from error
    if not best:
        raise UserError(f"--model-weights {path}: the run has no best checkpoint yet (run.json)")
    return path / best


def ensemble_checkpoints(items: list[str | Path]) -> list[tuple[str, Path]]:
    """The checkpoints of --model-weights as (name, path), in order; their models' P(PCNSL)
    is averaged.

    An item is a checkpoint file, a run folder (run.json names its best checkpoint), or a
    cross-validation run folder (step1 --folds: its cv.json lists each fold's best
    checkpoint); a folder whose folds are not all trained raises UserError. Names are "fold<i>" for a single CV folder and "model<i>" otherwise
    (step2's per-model CSV columns). Existence and type of the files are checked when
    each is loaded (load_model_for_inference).
    """
    checkpoints: list[tuple[str | None, Path]] = []
    for item in items:
        path = Path(item)
        if not path.is_dir():
            checkpoints.append((None, path))
            continue
        if not (path / CV_JSON).is_file():
            checkpoints.append((None, run_best_checkpoint(path)))
            continue
        cv = read_cv_json(path)
        best = cv.get("best_checkpoints")
        if not cv.get("complete") or not best:
            done = sum(1 for fold in cv.get("fold_assignment", []) if fold.get("best_checkpoint"))
            raise UserError(
                f"--model-weights {path}: cross-validation run incomplete ({done} of {cv.get('folds', '?')} "
                "folds have a best checkpoint); train the remaining folds first"
            )
        folds = [fold.get("fold", index) for index, fold in enumerate(cv.get("fold_assignment", []))]
        if len(folds) != len(best):
            folds = list(range(len(best)))
        checkpoints.extend(
            (f"fold{fold}", path / relative) for fold, relative in zip(folds, best, strict=True)
        )
    if len(items) == 1 and all(name is not None for name, _ in checkpoints):
        return [(str(name), path) for name, path in checkpoints]
    return [(f"model{index}", path) for index, (_, path) in enumerate(checkpoints)]


def read_cv_json(path: Path) -> dict:
    """The cv.json of the cross-validation run folder `path` (--model-weights); UserError
    when there is none or it cannot be read."""
    cv_json = path / CV_JSON
    if not cv_json.is_file():
        raise UserError(f"--model-weights {path}: a folder, but not a cross-validation run (no {CV_JSON})")
    try:
        return json.loads(cv_json.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{cv_json}: cannot read ({error})") from error


def held_out_folds(items: list[str | Path]) -> dict[str, int]:
    """step5 --out-of-fold: patient id -> position, in ensemble_checkpoints' list, of the
    fold that held the patient out (cv.json's fold_assignment "patients"), for the one
    cross-validation run folder `items` must be."""
    if len(items) != 1 or not Path(items[0]).is_dir():
        raise UserError(
            f"--out-of-fold: --model-weights must be one cross-validation run folder (got {len(items)} "
            f"item(s){'' if len(items) != 1 else ', not a folder'})"
        )
    assignment = read_cv_json(Path(items[0])).get("fold_assignment") or []
    return {
        patient: position
        for position, fold in enumerate(assignment)
        for patients in (fold.get("patients") or {}).values()
        for patient in patients
    }


CHECKPOINT_SUFFIXES = (".keras", ".h5", ".hdf5", ".onnx", ".xml")


def split_model_arguments(model_weights: list[str], inputs: list[str]) -> tuple[list[str], list[str]]:
    """(checkpoints, inputs) from `--model-weights A [B ...] IMAGES...` as argparse parsed it.

    --model-weights takes several values, so argparse also hands it the images that
    follow it on the command line (`--model-weights m.keras scan.png`, the original
    usage). Its first value is always a model; later values stay models while they look
    like one (a checkpoint file name, or a folder with a cv.json or run.json), and the rest are
    inputs, put before the ones argparse already found.
    """
    models = list(model_weights[:1])
    rest = list(model_weights[1:])

    def is_model(item: str) -> bool:
        folder = Path(item)
        return item.lower().endswith(CHECKPOINT_SUFFIXES) or any(
            (folder / name).is_file() for name in (CV_JSON, "run.json")
        )

    while rest and is_model(rest[0]):
        models.append(rest.pop(0))
    return models, [*rest, *inputs]


def parse_models_and_images(parser, argv: list[str] | None, images_name: str):
    """step2's and step5's command line parsed: --model-weights and the images told apart
    (split_model_arguments); no image and no --cohort is argparse's error for `images_name`."""
    args = parser.parse_args(argv)
    args.model_weights, args.images = split_model_arguments(args.model_weights, args.images)
    if not args.images and getattr(args, "cohort", None) is None:
        parser.error(f"the following arguments are required: {images_name} (or --cohort FILE.csv)")
    return args
