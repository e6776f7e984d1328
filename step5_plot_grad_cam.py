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
DICOM files, DICOM series folders and NIfTI volumes are read too (--slices, --lesion-masks
and --any-orientation as in step0); slice k of a volume `data/gbm/p01/t1c.nii.gz` gives
`DIR/gbm/p01/t1c_<k>.png` (k zero-padded to 3 digits), drawn at the slice's own size.
An existing output is an error unless --overwrite, checked before any work. Unreadable
images are reported on stderr and skipped; the exit code is then 1.

Checkpoints: step1's .keras models, .weights.h5 files with their run.json, and tf.keras
2.x .h5/.hdf5 checkpoints of the original EfficientNetB4 model. Several checkpoints, or a
cross-validation run folder (its folds' best checkpoints), explain an ensemble: the
explained class is the ensemble's call (mean P(PCNSL) > 0.5) unless --class says, each
model's heatmap is taken for that class, and the overlay shows their mean, scaled to a
peak of 1 (--annotate shows the ensemble's probability).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from gbmpcnsl_common import (
    CLASS_NAMES,
    LAST_CONV_LAYER,
    LOGIT_LAYER,
    UserError,
    import_tensorflow,
    log,
    run_main,
    setup_logging,
    split_model_arguments,
    split_slice_name,
)
from gbmpcnsl_io import add_slice_arguments, find_slices, is_nifti, load_slice, nifti_stem, slice_options

ALPHA = 0.4  # heatmap opacity, as the original
HEATMAPS_FILE = "heatmaps.npz"
EXPLAIN_CHOICES = ("auto", "gbm", "pcnsl")


# ---------------------------------------------------------------------------- Grad-CAM
def make_grad_model(model, layer_name: str = LAST_CONV_LAYER):
    """A two-output model: image -> (activation of `layer_name`, logit). Built once."""
    import keras

    try:
        layer = model.get_layer(layer_name)
    except ValueError as error:
        raise UserError(f"--layer {layer_name}: the model has no layer of that name") from error
    if len(layer.output.shape) != 4:
        raise UserError(
            f"--layer {layer_name}: output shape {tuple(layer.output.shape)} is not a "
            "convolutional feature map (batch, height, width, channels)"
        )
    return keras.Model(model.inputs[0], [layer.output, model.get_layer(LOGIT_LAYER).output])


def grad_cam(grad_model, images, explain: str = "auto"):
    """Grad-CAM heatmaps for a batch.

    images: float (N, H, W, 3), RGB 0-255 at the model's input size.
    explain: "auto" (the predicted class: logit > 0 is PCNSL, else GBM), "gbm" or "pcnsl",
    or a tensor of class indices (N,), one per image.
    Returns (heatmaps float32 (N, h, w) in 0-1 at the layer's resolution, logits (N,),
    explained class index (N,): 0 GBM, 1 PCNSL). A heatmap with no positive value is
    returned as all zeros (not divided by zero).
    """
    import tensorflow as tf

    with tf.GradientTape() as tape:
        activations, logits = grad_model(images, training=False)
        logits = tf.reshape(tf.cast(logits, tf.float32), [-1])
        if not isinstance(explain, str):
            class_index = tf.cast(explain, tf.int32)
        elif explain == "auto":
            class_index = tf.cast(logits > 0, tf.int32)
        else:
            class_index = tf.fill(tf.shape(logits), CLASS_NAMES.index(explain.upper()))
        # PCNSL is explained by the logit, GBM by the negated logit. Images in a batch are
        # independent at inference, so the gradient of the sum is each image's own gradient.
        signs = tf.where(class_index == 1, 1.0, -1.0)
        target = tf.reduce_sum(signs * logits)
    grads = tf.cast(tape.gradient(target, activations), tf.float32)
    activations = tf.cast(activations, tf.float32)
    channel_weights = tf.reduce_mean(grads, axis=(1, 2))  # (N, C)
    cam = tf.nn.relu(tf.einsum("nhwc,nc->nhw", activations, channel_weights))
    peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
    heatmaps = tf.math.divide_no_nan(cam, peak)  # an all-zero map stays zero
    return heatmaps, logits, class_index


def ensemble_grad_cam(grad_models: list, images, explain: str = "auto"):
    """Grad-CAM of an ensemble: grad_cam's (heatmaps, logits, class index) for a batch.

    The explained class is the ensemble's call (mean P(PCNSL) over the models > 0.5) for
    "auto", else `explain`; every model explains that class, and the heatmap is the mean
    of the models' 0-1 heatmaps divided by its maximum. The logits returned are the
    logit of the mean P(PCNSL).
    """
    import tensorflow as tf

    logits = [
        tf.reshape(tf.cast(grad_model(images, training=False)[1], tf.float32), [-1])
        for grad_model in grad_models
    ]
    prob_pcnsl = tf.reduce_mean(tf.sigmoid(tf.stack(logits)), axis=0)
    if explain == "auto":
        class_index = tf.cast(prob_pcnsl > 0.5, tf.int32)
    else:
        class_index = tf.fill(tf.shape(prob_pcnsl), CLASS_NAMES.index(explain.upper()))
    heatmaps = tf.reduce_mean(
        tf.stack([grad_cam(grad_model, images, class_index)[0] for grad_model in grad_models]), axis=0
    )
    heatmaps = tf.math.divide_no_nan(heatmaps, tf.reduce_max(heatmaps, axis=(1, 2), keepdims=True))
    return heatmaps, tf.math.log(prob_pcnsl) - tf.math.log1p(-prob_pcnsl), class_index


# ---------------------------------------------------------------------------- overlay
def _array_to_uint8(values: np.ndarray) -> np.ndarray:
    """Min-max scale to 0-255 and truncate to uint8, as keras.utils.array_to_img does."""
    values = np.asarray(values, dtype=np.float32)
    values = values - np.min(values)
    peak = np.max(values)
    if peak != 0:
        values /= peak
    values *= 255
    return values.astype(np.uint8)


def overlay_heatmap(image: np.ndarray, heatmap: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """Jet-coloured heatmap over an image, the keras-io recipe step by step.

    image: uint8 (H, W, 3); heatmap: float (h, w) in 0-1. The heatmap becomes 0-255 levels,
    jet colours, an RGB image resized (bicubic) to (H, W); the overlay heat * alpha + image
    is scaled to 0-255 by its minimum and maximum (keras.utils.array_to_img). Returns uint8
    (H, W, 3).
    """
    import matplotlib

    height, width = image.shape[:2]
    levels = np.uint8(255 * heatmap)
    jet_colors = matplotlib.colormaps["jet"](np.arange(256))[:, :3]
    jet_image = Image.fromarray(_array_to_uint8(jet_colors[levels]), "RGB")
    jet_image = jet_image.resize((width, height), Image.BICUBIC)
    superimposed = np.asarray(jet_image, dtype=np.float32) * alpha + image.astype(np.float32)
    return _array_to_uint8(superimposed)


def annotate(overlay: np.ndarray, text: str) -> np.ndarray:
    """The overlay with `text` in white on black in its top-left corner."""
    from PIL import ImageDraw, ImageFont

    image = Image.fromarray(overlay)
    font_size = max(10, round(min(image.size) / 16))
    try:
        font = ImageFont.load_default(size=font_size)
    except (OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(image)
    margin = max(2, font_size // 4)
    left, top, right, bottom = draw.textbbox((margin, margin), text, font=font)
    draw.rectangle((0, 0, right + margin, bottom + margin), fill=(0, 0, 0))
    draw.text((margin, margin), text, fill=(255, 255, 255), font=font)
    return np.asarray(image)


# ---------------------------------------------------------------------------- outputs
def output_paths(images: list[str | Path], output_dir: Path) -> list[Path]:
    """One PNG path per slice under output_dir, mirroring its path relative to the inputs'
    common parent folder: `<parent>/gbm/p1/s1.jpg` -> `output_dir/gbm/p1/s1.png`, and slice
    k of a volume `<parent>/gbm/p1/t1c.nii.gz#045` -> `output_dir/gbm/p1/t1c_045.png`.

    Two inputs that differ only by extension (`s1.jpg`, `s1.png`) keep it in the name
    (`s1.jpg.png`, `s1.png.png`). Raises UserError if two outputs would still collide.
    """
    sources = [split_slice_name(image) for image in images]
    absolute = [Path(os.path.abspath(source)) for source, _ in sources]
    root = Path(os.path.commonpath([p.parent for p in absolute]))
    relative = [p.relative_to(root) for p in absolute]
    indices = [index for _, index in sources]

    def short(path: Path, index: int | None) -> Path:
        if index is None:
            return path.with_suffix(".png")
        stem = nifti_stem(path) if is_nifti(path) else path.stem
        return path.parent / f"{stem}_{index:03d}.png"

    def long(path: Path, index: int | None) -> Path:
        return path.parent / (path.name + ".png" if index is None else f"{path.name}_{index:03d}.png")

    outputs = [output_dir / short(r, i) for r, i in zip(relative, indices, strict=True)]
    counts = Counter(outputs)
    outputs = [
        output_dir / long(r, i) if counts[out] > 1 else out
        for out, r, i in zip(outputs, relative, indices, strict=True)
    ]
    first: dict[Path, str | Path] = {}
    for image, out in zip(images, outputs, strict=True):
        if out in first:
            raise UserError(f"{image} and {first[out]} would both be written to {out}")
        first[out] = image
    return outputs


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-weights",
        required=True,
        nargs="+",
        metavar="CKPT",
        help="checkpoint (.keras, .weights.h5, .h5); several, or a CV run folder: an ensemble",
    )
    parser.add_argument(
        "--output-dir", required=True, type=Path, metavar="DIR", help="folder for the overlays (created)"
    )
    parser.add_argument("images", nargs="*", help="image files and/or folders")
    parser.add_argument(
        "--class",
        dest="explain",
        choices=EXPLAIN_CHOICES,
        default="auto",
        help="class to explain: auto = the predicted one (default), gbm or pcnsl",
    )
    parser.add_argument(
        "--annotate", action="store_true", help="write the explained class and its probability in a corner"
    )
    parser.add_argument(
        "--save-heatmaps",
        action="store_true",
        help=f"also write DIR/{HEATMAPS_FILE}: each raw 0-1 heatmap (layer resolution, float32), "
        "keyed by its overlay's path relative to DIR",
    )
    parser.add_argument(
        "--layer", default=LAST_CONV_LAYER, help=f"convolutional layer to explain (default {LAST_CONV_LAYER})"
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, metavar="N", help="images per gradient batch (default 8)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's logs")
    add_slice_arguments(parser)
    args = parser.parse_args(argv)
    args.model_weights, args.images = split_model_arguments(args.model_weights, args.images)
    if not args.images:
        parser.error("the following arguments are required: images")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    return args


def _write_atomically(path: Path, write) -> None:
    """Call write(file) on a temporary file beside `path`, then rename it to `path`: an
    interrupted or failed write leaves neither a partial file nor the temporary one."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _main(argv) -> int:
    args = _parse_args(argv)
    setup_logging(args.verbose)

    # Plan every output first: a clash or an existing file stops us before any work.
    found = find_slices(args.images, **slice_options(args))
    for line in found.skipped["non-axial"]:
        log.warning("warning: skipped %s", line)
    if not found.names:
        raise UserError(f"{' '.join(args.images)}: no slices to explain (see the warnings above)")
    images = list(dict.fromkeys(found.names))  # a file given twice is done once
    outputs = output_paths(images, args.output_dir)
    heatmaps_path = args.output_dir / HEATMAPS_FILE
    if not args.overwrite:
        planned = [*outputs, heatmaps_path] if args.save_heatmaps else outputs
        existing = [p for p in planned if p.exists()]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise UserError(f"{existing[0]}: output exists{more}; use --overwrite to replace")

    tf = import_tensorflow(args.verbose)
    from scipy.special import expit
    from tqdm import tqdm

    from gbmpcnsl_common import ensemble_checkpoints, load_model_for_inference, model_input_size

    checkpoints = ensemble_checkpoints(args.model_weights)
    models = [load_model_for_inference(path) for _, path in checkpoints]
    for (_, path), model in zip(checkpoints, models, strict=True):
        if LOGIT_LAYER not in {layer.name for layer in model.layers}:
            raise UserError(
                f"{path}: the model has no '{LOGIT_LAYER}' layer (the Dense(1) output "
                "before the sigmoid, which Grad-CAM explains); expected a model built like step1's"
            )
    grad_models = [make_grad_model(model, args.layer) for model in models]
    input_size = model_input_size(models[0])
    for (_, path), model in zip(checkpoints[1:], models[1:], strict=True):
        if model_input_size(model) != input_size:
            raise UserError(f"--model-weights {path}: input size differs from the first model's {input_size}")
    # Traced once per batch shape; the gradient models are built once for the whole run.
    if len(grad_models) == 1:
        compute = tf.function(
            lambda batch: grad_cam(grad_models[0], batch, args.explain), reduce_retracing=True
        )
    else:
        log.info("ensemble of %d models: %s", len(models), ", ".join(str(path) for _, path in checkpoints))
        compute = tf.function(
            lambda batch: ensemble_grad_cam(grad_models, batch, args.explain), reduce_retracing=True
        )

    failed, no_evidence, written = 0, 0, 0
    saved_heatmaps: dict[str, np.ndarray] = {}
    with tqdm(total=len(images), desc="Grad-CAM", unit="img", file=sys.stderr) as progress:
        for start in range(0, len(images), args.batch_size):
            batch = []  # (image path, output path, model input, original uint8 image)
            for path, out in zip(
                images[start : start + args.batch_size], outputs[start : start + args.batch_size], strict=True
            ):
                try:  # the model's input, and the slice at its own size for the overlay
                    batch.append((path, out, load_slice(path, input_size), load_slice(path, None)))
                except (UserError, OSError, ValueError, Image.DecompressionBombError) as error:
                    message = (
                        str(error) if isinstance(error, UserError) else f"{path}: cannot read image ({error})"
                    )
                    progress.write(f"error: {message}", file=sys.stderr)
                    failed += 1
                    progress.update(1)
            if not batch:
                continue
            model_inputs = np.stack([item[2] for item in batch]).astype(np.float32)
            heatmaps, logits, class_index = (t.numpy() for t in compute(tf.constant(model_inputs)))
            prob_pcnsl = expit(logits.astype(np.float64))
            for (path, out, _, original), heatmap, explained, p in zip(
                batch, heatmaps, class_index, prob_pcnsl, strict=True
            ):
                if not heatmap.any():
                    no_evidence += 1
                    log.debug(
                        "%s: all-zero heatmap (no positive evidence for %s)", path, CLASS_NAMES[explained]
                    )
                overlay = overlay_heatmap(original, heatmap)
                if args.annotate:
                    prob = p if explained == 1 else 1.0 - p
                    overlay = annotate(overlay, f"{CLASS_NAMES[explained]} {100 * prob:.1f}%")
                try:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    _write_atomically(
                        out, lambda handle, o=overlay: Image.fromarray(o).save(handle, format="PNG")
                    )
                    written += 1
                    saved_heatmaps[out.relative_to(args.output_dir).as_posix()] = heatmap
                except OSError as error:
                    progress.write(f"error: {out}: cannot write ({error})", file=sys.stderr)
                    failed += 1
                progress.update(1)

    if args.save_heatmaps:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(heatmaps_path, lambda handle: np.savez_compressed(handle, **saved_heatmaps))
    if no_evidence:
        log.warning(
            "%d image(s) have an all-zero heatmap: nothing in them raises the explained "
            "class's logit at --layer %s (their overlay is uniformly blue)",
            no_evidence,
            args.layer,
        )
    log.info("wrote %d overlay(s) to %s%s", written, args.output_dir, f"; {failed} failed" if failed else "")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: see the module docstring. Returns the exit code."""
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
