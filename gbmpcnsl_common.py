"""Shared pieces of the gbm-pcnsl steps: class labels, the HDF5 layout, the image
loader and the model builder/loader.

Everything that two or more steps must agree on lives here, nothing else. TensorFlow is
imported lazily (inside the model functions) so that `--help` and argument errors answer
at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from gbmpcnsl.runs import CV_JSON

__version__ = "1.0.0"

# ---------------------------------------------------------------------------- classes
# The model outputs P(PCNSL): GBM is label 0, PCNSL is label 1.
CLASS_NAMES = ("GBM", "PCNSL")
CLASS_FOLDERS = ("gbm", "pcnsl")
CLASS_LABELS = {"gbm": 0, "pcnsl": 1}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
DEFAULT_SIZE = (380, 380)


class UserError(Exception):
    """An expected failure (bad file, bad flag, existing output): reported in one line."""


log = logging.getLogger("gbmpcnsl")


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr; silence TensorFlow's C++ and Python chatter unless verbose."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
        force=True,
    )
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
        logging.getLogger("absl").setLevel(logging.ERROR)


@contextlib.contextmanager
def _native_stderr_silenced():
    """Point file descriptor 2 at /dev/null for the duration (C++ libraries write there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def import_tensorflow(verbose: bool = False):
    """Import TensorFlow and Keras and find the devices, without TF's start-up chatter.

    TF 2.21 writes absl/oneDNN/CUDA notices to stderr from C++ at import and at device
    discovery whatever TF_CPP_MIN_LOG_LEVEL says; unless verbose, they go to /dev/null.
    Python exceptions still surface (after stderr is restored). Returns the tf module.
    """
    if verbose:
        import tensorflow as tf

        return tf
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _native_stderr_silenced():
        import keras  # noqa: F401
        import tensorflow as tf

        tf.config.list_physical_devices()
    return tf


def run_main(main_body, argv) -> int:
    """Run a step's main body, turning UserError into a one-line message and exit code 2.

    KeyboardInterrupt exits 130 with one line, never a traceback.
    """
    try:
        return main_body(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def interrupt_between_batches():
    """Defer Ctrl-C to a batch boundary: inside, SIGINT is only recorded, and the yielded
    check() raises KeyboardInterrupt where the caller calls it (between batches). A
    KeyboardInterrupt raised in the middle of a TensorFlow call, with tf.data threads
    running, crashed step2 in glibc (free(): invalid next size) instead of exiting 130."""
    import signal

    received = []

    def check() -> None:
        if received:
            raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except ValueError:  # not the main thread: leave Ctrl-C as it is
        yield check
        return
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, previous)
    check()


# ---------------------------------------------------------------------------- images
def is_image_file(path: Path) -> bool:
    """True for a visible file with a supported image extension (any case)."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def find_images(inputs: list[str | Path]) -> list[Path]:
    """Expand files and folders into image paths, in the order given.

    A folder expands recursively to its supported image files, sorted; hidden files and
    folders are skipped. A file is kept as given (a bad one fails later, when loaded).
    A path that does not exist raises UserError.
    """
    images: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise UserError(f"{path}: folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            images.extend(found)
        elif path.exists():
            images.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return images


def _scale_to_uint8(image: Image.Image) -> Image.Image:
    """Window a 16-bit or float image to 0-255 (0.5-99.5 percentiles) as an 8-bit L image.

    PIL's convert("RGB") clips such images at 255, which turns most of a 16-bit MRI export
    white; a robust window keeps the contrast instead.
    """
    values = np.asarray(image, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return Image.fromarray(np.zeros(values.shape, dtype=np.uint8), mode="L")
    low, high = np.percentile(finite, [0.5, 99.5])
    if high <= low:  # constant image (or nearly): keep it flat rather than divide by 0
        low, high = float(finite.min()), float(finite.max())
    if high <= low:
        scaled = np.zeros(values.shape)
    else:
        scaled = (np.nan_to_num(values, nan=low) - low) / (high - low) * 255.0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def load_image(path: str | Path, size: tuple[int, int] = DEFAULT_SIZE) -> np.ndarray:
    """Read an image file as a uint8 array of shape (H, W, 3), size = (H, W).

    8-bit images go through `Image.convert("RGB").resize((W, H), Image.LANCZOS)`, bit for
    bit as the original implementation (published checkpoints were trained on these
    pixels). 16-bit and float images (modes I;16*, I, F) are first windowed to 0-255.
    Any unreadable or truncated file raises UserError naming the file.
    """
    height, width = size
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, inside the try
            if image.mode in ("I", "F") or image.mode.startswith("I;16"):
                image = _scale_to_uint8(image)
            rgb = image.convert("RGB").resize((width, height), Image.LANCZOS)
            return np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise UserError(f"{path}: cannot read image ({error})") from error


# ---------------------------------------------------------------------------- patients
VOLUME_SUFFIXES = (".nii.gz", ".nii")


def split_slice_name(name: str | Path) -> tuple[str, int | None]:
    """ "gbm/p017/t1c.nii.gz#045" -> ("gbm/p017/t1c.nii.gz", 45); a 2-D file -> (name, None)."""
    text = str(name).replace("\\", "/")
    source, hash_sign, index = text.rpartition("#")
    if hash_sign and index.isdigit():
        return source, int(index)
    return text, None


def _source_stem(name: str) -> str:
    """A source file's name without its image or volume extension ("t1c.nii.gz" -> "t1c")."""
    lower = name.lower()
    for suffix in VOLUME_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def patient_id(slice_name: str | Path) -> str:
    """The patient (group) id of a slice, qualified by its class: "gbm/p017".

    The one patient rule of every step (step0's groups, step1's split, step2's per-patient
    output, roc_analysis). `slice_name` is a path relative to DATA (step0) or any path that
    holds the class folder (a predictions CSV), with or without a volume's "#k" suffix:
    - the folder right under the last gbm/ or pcnsl/ folder of the path is the patient, so
      gbm/p01/series2/x.dcm and gbm/p01/series3/y.dcm are one patient, and gbm/001 and
      pcnsl/001 are two (most exports number patients per class);
    - a source directly in a class folder is its own patient ("gbm/img001.png" ->
      "gbm/img001"), and every slice of one volume or series is one patient;
    - a path without a class folder: its folder (a volume: the volume itself).
    """
    source, index = split_slice_name(slice_name)
    parts = [part for part in source.split("/") if part not in ("", ".")]
    for position in range(len(parts) - 2, -1, -1):
        folder = parts[position].lower()
        if folder in CLASS_LABELS:
            rest = parts[position + 1 :]
            return f"{folder}/{rest[0] if len(rest) > 1 else _source_stem(rest[0])}"
    if index is not None or len(parts) < 2:
        return "/".join(parts)
    return "/".join(parts[:-1])


def single_slice_groups_warning(groups: list[str]) -> str | None:
    """A one-line warning when most patient groups hold a single slice, else None.

    That is what a flat class folder (gbm/*.png, the original's layout) gives: each file is
    its own patient, so the validation split is by slice and slices of one patient land on
    both sides. The fix is one folder per patient: DATA/gbm/<patient>/<slice>.png.
    """
    sizes: dict[str, int] = {}
    for group in groups:
        sizes[group] = sizes.get(group, 0) + 1
    single = sum(1 for size in sizes.values() if size == 1)
    if not sizes or single * 2 <= len(sizes):
        return None
    return (
        f"warning: {single} of {len(sizes)} patient groups hold a single slice: is each class folder flat? "
        "The split is then by slice, not by patient; put each patient's slices in a folder of its "
        "own (DATA/gbm/<patient>/<slice>.png)"
    )


# ---------------------------------------------------------------------------- HDF5
# /<class>/<H>_<W>/features  uint8 (N, H, W, 3)
# /<class>/<H>_<W>/labels    uint8 (N,)
# /<class>/<H>_<W>/paths     UTF-8 strings (relative to the data folder)
# /<class>/<H>_<W>/groups    UTF-8 strings (patient id)
HDF5_FORMAT_VERSION = 1


def size_key(size: tuple[int, int]) -> str:
    """(380, 380) -> "380_380", the name of a size group in the HDF5 file."""
    return f"{size[0]}_{size[1]}"


def parse_size_key(key: str) -> tuple[int, int]:
    """ "380_380" -> (380, 380)."""
    height, width = key.split("_")
    return int(height), int(width)


def hdf5_sizes(h5file) -> list[tuple[int, int]]:
    """The image sizes present for every class in an open h5py.File, sorted."""
    per_class = []
    for folder in CLASS_FOLDERS:
        if folder not in h5file:
            return []
        per_class.append({parse_size_key(k) for k in h5file[folder] if "features" in h5file[folder][k]})
    return sorted(set.intersection(*per_class))


def choose_hdf5_size(h5file, size: tuple[int, int] | None, filename: str | Path) -> tuple[int, int]:
    """The size to read: `size` if given (must exist), else the only one in the file."""
    sizes = hdf5_sizes(h5file)
    if not sizes:
        raise UserError(f"{filename}: no gbm/<H>_<W>/features and pcnsl/<H>_<W>/features groups")
    if size is not None:
        if tuple(size) not in sizes:
            listed = ", ".join(f"{h} {w}" for h, w in sizes)
            raise UserError(f"{filename}: no images of size {size[0]} {size[1]} (has: {listed})")
        return tuple(size)
    if len(sizes) > 1:
        listed = ", ".join(f"{h} {w}" for h, w in sizes)
        raise UserError(f"{filename}: holds several sizes ({listed}); pick one with --size H W")
    return sizes[0]


def read_hdf5_index(h5file, size: tuple[int, int]) -> tuple[list[dict], bool]:
    """One record per image {class, row, label, path, group}, and whether the file has groups.

    A file in the original layout (features + labels only) gets synthetic paths
    "<class>/<row>" and each slice becomes its own group (has_groups is then False).
    """
    key = size_key(size)
    records: list[dict] = []
    has_groups = True
    for folder in CLASS_FOLDERS:
        group = h5file[folder][key]
        count = group["features"].shape[0]
        if "paths" in group and "groups" in group:
            paths = [p.decode() if isinstance(p, bytes) else str(p) for p in group["paths"][:]]
            groups = [g.decode() if isinstance(g, bytes) else str(g) for g in group["groups"][:]]
            # Files from step0 1.0 hold unqualified folder names: qualify them by class.
            groups = [g if g.startswith(f"{folder}/") else f"{folder}/{g}" for g in groups]
        else:
            has_groups = False
            paths = [f"{folder}/{row}" for row in range(count)]
            groups = list(paths)
        for row in range(count):
            records.append(
                {
                    "class": folder,
                    "row": row,
                    "label": CLASS_LABELS[folder],
                    "path": paths[row],
                    "group": groups[row],
                }
            )
    return records, has_groups


def hdf5_root_attributes() -> dict:
    """Root attributes written by step0: format version, class mapping, tool version."""
    return {
        "format_version": HDF5_FORMAT_VERSION,
        "class_labels": json.dumps(CLASS_LABELS),
        "tool": "gbm-pcnsl",
        "tool_version": __version__,
    }


# ---------------------------------------------------------------------------- model
BACKBONES = tuple(f"efficientnetb{i}" for i in range(8))
LAST_CONV_LAYER = "top_activation"
LOGIT_LAYER = "logit"
OUTPUT_LAYER = "predictions"
# keras.applications.efficientnet divides by sqrt(stddev) once more when it loads the
# ImageNet weights (tensorflow issue 49930, tf.keras >= 2.9); we fold that into the
# Normalization variance.
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)
# Input scalings of ImageNet-initialised models (build_model's `normalization`):
#   imagenet  (x/255 - mean) / std        what keras.applications gives since tf.keras 2.9
#   paper     (x/255 - mean) / sqrt(std)  what TF 2.5 gave the paper's models
NORMALIZATIONS = ("imagenet", "paper")


HEAD_INITIALIZERS = ("original", "glorot")


def dense_kernel_initializer(head_init: str = "original"):
    """The logit layer's kernel initializer. "original": the original's
    DENSE_KERNEL_INITIALIZER (that of keras.applications' EfficientNet top), uniform in
    +-sqrt(1 / fan_out), i.e. +-1 for our one output. "glorot": Keras's default, about 15x
    smaller for EfficientNetB0; from scratch, the original's large initial logits (a first
    training loss near 6 instead of 0.85) kept the demo model from learning in 40 epochs."""
    import keras

    if head_init not in HEAD_INITIALIZERS:
        raise UserError(f"--head-init {head_init}: expected one of {', '.join(HEAD_INITIALIZERS)}")
    if head_init == "glorot":
        return keras.initializers.GlorotUniform()
    return keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_out", distribution="uniform")


def _backbone_constructor(backbone: str):
    import keras

    names = {f"efficientnetb{i}": f"EfficientNetB{i}" for i in range(8)}
    if backbone not in names:
        raise UserError(f"--backbone {backbone}: expected one of {', '.join(BACKBONES)}")
    return getattr(keras.applications, names[backbone])


def imagenet_cache_hint(backbone: str) -> str:
    """Where Keras caches the ImageNet file and how to give one by hand."""
    keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    name = f"{backbone}_notop.h5"
    return (
        f"Keras caches it as {os.path.join(keras_home, 'models', name)}; copy the file there "
        f"(from https://storage.googleapis.com/keras-applications/{name}) or pass "
        f"--weights /path/to/{name}"
    )


def _imagenet_backbone_weights(backbone: str, input_shape, weights: str) -> list:
    """The backbone's ImageNet weights, through Keras's own download-and-cache path, or
    from a local notop file; returned as a list of arrays for a weights=None backbone."""
    constructor = _backbone_constructor(backbone)
    if weights == "imagenet":
        try:
            reference = constructor(include_top=False, weights="imagenet", input_shape=input_shape)
        except Exception as error:  # urllib/socket errors differ by platform
            raise UserError(
                f"--weights imagenet: could not load the {backbone} ImageNet weights "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
                + imagenet_cache_hint(backbone)
            ) from error
    else:
        if not Path(weights).is_file():
            raise UserError(f"--weights {weights}: no such file")
        try:
            reference = constructor(include_top=False, weights=weights, input_shape=input_shape)
        except Exception as error:
            raise UserError(f"--weights {weights}: not a {backbone} notop weights file ({error})") from error
    return reference.get_weights()


def _scale_normalization_variance(model, factor: np.ndarray) -> None:
    """Multiply the variance of the model's (first) Normalization layer by `factor` per
    channel: how a constant per-channel scaling right after it is folded into it."""
    import keras

    normalization = next(layer for layer in model.layers if isinstance(layer, keras.layers.Normalization))
    mean, variance, count = normalization.get_weights()
    normalization.set_weights([mean, variance * factor, count])
    normalization.finalize_state()  # set_weights alone leaves the layer's cached mean/variance stale


def build_model(
    backbone: str = "efficientnetb4",
    input_shape: tuple[int, int, int] = (380, 380, 3),
    weights: str | None = "imagenet",
    normalization: str = "imagenet",
    head_init: str = "original",
):
    """EfficientNet backbone -> GlobalAveragePooling2D("avg_pool") -> Dropout(0.5) ->
    Dense(1) logit ("logit") -> sigmoid in float32 ("predictions"), giving P(PCNSL).

    Inputs are RGB floats in 0-255 (the backbone scales them itself). `weights` is
    "imagenet" (Keras downloads and caches the file), None, or a path to the backbone's
    notop weights file (the same file Keras downloads).

    The graph is always the weights=None graph of keras.applications, the one TF 2.5
    trained the published checkpoints with. For ImageNet weights Keras would add an extra
    Rescaling layer after Normalization (tensorflow issue 49930); we fold that constant
    into the Normalization variance instead, which gives the same function with one graph
    for every kind of weights (so weights-only and legacy files always load).

    `normalization` (ImageNet weights only; no effect with weights=None): "imagenet"
    scales the input as current Keras does, (x/255 - mean) / std; "paper" as TF 2.5 did for
    the paper's models, (x/255 - mean) / sqrt(std) (the Rescaling is not folded in).
    """
    import keras

    if normalization not in NORMALIZATIONS:
        raise UserError(f"--normalization {normalization}: expected one of {', '.join(NORMALIZATIONS)}")
    constructor = _backbone_constructor(backbone)
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    base = constructor(include_top=False, weights=None, input_tensor=inputs)
    if weights is not None:
        base.set_weights(_imagenet_backbone_weights(backbone, tuple(input_shape), weights))
        if normalization == "imagenet":
            # Keras's extra Rescaling multiplies by 1/sqrt(stddev): the same as variance * stddev.
            _scale_normalization_variance(base, np.asarray(IMAGENET_STDDEV_RGB))
    features = keras.layers.GlobalAveragePooling2D(name="avg_pool")(base.output)
    features = keras.layers.Dropout(0.5, name="top_dropout")(features)
    # Float32 head: with mixed_float16 the logit and the probability stay float32.
    logit = keras.layers.Dense(
        1, dtype="float32", kernel_initializer=dense_kernel_initializer(head_init), name=LOGIT_LAYER
    )(features)
    prob_pcnsl = keras.layers.Activation("sigmoid", dtype="float32", name=OUTPUT_LAYER)(logit)
    return keras.Model(inputs, prob_pcnsl, name=f"{backbone}_gbm_pcnsl")


def model_input_size(model) -> tuple[int, int]:
    """(H, W) of a model's image input."""
    shape = model.inputs[0].shape
    return int(shape[1]), int(shape[2])


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
        blocks = sum(1 for name in layer_names if name.startswith("block") and name.endswith("_project_conv"))
        top_channels = None
        if "top_conv" in weights_group:
            kernels = []  # "top_conv/kernel:0" (tf.keras 2.x) or "top_conv/kernel" (Keras 3)

            def collect_kernel(name, item):
                if "kernel" in name:
                    kernels.append(item.shape)

            weights_group["top_conv"].visititems(collect_kernel)
            top_channels = int(kernels[0][-1]) if kernels else None
        config = h5file.attrs.get("model_config")
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


def _check_image_model(model, path: Path):
    """A model step2/step5 can use: one (H, W, 3) image input, one probability out."""
    input_shape = tuple(model.inputs[0].shape) if len(model.inputs) == 1 else None
    output_shape = tuple(model.outputs[0].shape) if len(model.outputs) == 1 else None
    if input_shape is None or len(input_shape) != 4 or input_shape[-1] != 3 or output_shape[1:] != (1,):
        raise UserError(
            f"{path}: expected a model from (H, W, 3) images to one probability, "
            f"got inputs {[tuple(t.shape) for t in model.inputs]} -> outputs {[tuple(t.shape) for t in model.outputs]}"
        )
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
            model = build_model(run["backbone"], tuple(run["input_shape"]), weights=None)
            model.load_weights(path)
            return model
        if name.endswith(".weights.h5") and not _is_legacy_h5(path):
            raise UserError(f"{path}: a .weights.h5 file needs the run.json of its training run beside it")
        info = _legacy_model_info(path)
        model = build_model(info["backbone"], info["input_shape"], weights=None)
        model.load_weights(path)
        if info["extra_scale"] is not None:  # a multiplication by s is a variance / s**2
            _scale_normalization_variance(model, 1.0 / info["extra_scale"] ** 2)
        return model
    except UserError:
        raise
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{path}: cannot load model ({first_line}); {expected}") from error


def _is_legacy_h5(path: Path) -> bool:
    """True for an HDF5 file in tf.keras 2.x's layout (root or model_weights layer_names)."""
    import h5py

    try:
        with h5py.File(path, "r") as h5file:
            return "layer_names" in h5file.attrs or "model_weights" in h5file
    except OSError:
        return False


# ---------------------------------------------------------------------------- ensembles


def ensemble_checkpoints(items: list[str | Path]) -> list[tuple[str, Path]]:
    """The checkpoints of --model-weights as (name, path), in order; their models' P(PCNSL)
    is averaged.

    An item is a checkpoint file, or a cross-validation run folder (step1 --folds: its
    cv.json lists each fold's best checkpoint); a folder whose folds are not all trained
    raises UserError. Names are "fold<i>" for a single CV folder and "model<i>" otherwise
    (step2's per-model CSV columns). Existence and type of the files are checked when
    each is loaded (load_model_for_inference).
    """
    checkpoints: list[tuple[str | None, Path]] = []
    for item in items:
        path = Path(item)
        if not path.is_dir():
            checkpoints.append((None, path))
            continue
        cv_json = path / CV_JSON
        if not cv_json.is_file():
            raise UserError(
                f"--model-weights {path}: a folder, but not a cross-validation run (no {CV_JSON})"
            )
        try:
            cv = json.loads(cv_json.read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"{cv_json}: cannot read ({error})") from error
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


CHECKPOINT_SUFFIXES = (".keras", ".h5", ".hdf5", ".onnx", ".xml")


def split_model_arguments(model_weights: list[str], inputs: list[str]) -> tuple[list[str], list[str]]:
    """(checkpoints, inputs) from `--model-weights A [B ...] IMAGES...` as argparse parsed it.

    --model-weights takes several values, so argparse also hands it the images that
    follow it on the command line (`--model-weights m.keras scan.png`, the original
    usage). Its first value is always a model; later values stay models while they look
    like one (a checkpoint file name, or a folder with a cv.json), and the rest are
    inputs, put before the ones argparse already found.
    """
    models = list(model_weights[:1])
    rest = list(model_weights[1:])
    while rest and (rest[0].lower().endswith(CHECKPOINT_SUFFIXES) or (Path(rest[0]) / CV_JSON).is_file()):
        models.append(rest.pop(0))
    return models, [*rest, *inputs]
