"""Grad-CAM: heatmaps of one model or an ensemble, jet overlays, and where step5 writes them.

Grad-CAM (Selvaraju et al., ICCV 2017) as in the keras-io recipe
(https://keras.io/examples/vision/grad_cam/), taken on the logit at the last
convolutional activation; the overlay is drawn on each slice at its own size.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from gbmpcnsl.checkpoints import load_model_for_inference, model_input_size
from gbmpcnsl.cli import Progress
from gbmpcnsl.files import atomic_write
from gbmpcnsl.model import LAST_CONV_LAYER, LOGIT_LAYER
from gbmpcnsl.nifti import is_nifti, nifti_stem
from gbmpcnsl.outputs import refuse_inputs_as_outputs
from gbmpcnsl.pixels import load_slice
from gbmpcnsl.predictors import ensemble_input_size
from gbmpcnsl_common import CLASS_NAMES, UserError, log, patient_id, split_slice_name

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
def overlay_names(filename: str, index: int | None = None) -> tuple[str, str]:
    """The overlay file names of a slice (file name, and slice index for a volume): the
    usual one (`s1.jpg` -> `s1.png`; slice 45 of `t1c.nii.gz` -> `t1c_045.png`), and the one
    used when two inputs differ only by extension (`s1.jpg.png`, `t1c.nii.gz_045.png`)."""
    path = Path(filename)
    if index is None:
        return path.with_suffix(".png").name, path.name + ".png"
    stem = nifti_stem(path) if is_nifti(path) else path.stem
    return f"{stem}_{index:03d}.png", f"{path.name}_{index:03d}.png"


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

    names = [overlay_names(r.name, i) for r, i in zip(relative, indices, strict=True)]
    outputs = [output_dir / r.parent / short for r, (short, _) in zip(relative, names, strict=True)]
    counts = Counter(outputs)
    outputs = [
        output_dir / r.parent / long if counts[out] > 1 else out
        for out, r, (_, long) in zip(outputs, relative, names, strict=True)
    ]
    first: dict[Path, str | Path] = {}
    for image, out in zip(images, outputs, strict=True):
        if out in first:
            raise UserError(f"{image} and {first[out]} would both be written to {out}")
        first[out] = image
    return outputs


def plan_outputs(images: list[str], output_dir: Path, save_heatmaps: bool, overwrite: bool) -> list[Path]:
    """output_paths, refused in one line when one of them (or heatmaps.npz with
    save_heatmaps) exists and not `overwrite`, or when one of them is an input: checked
    before any work."""
    outputs = output_paths(images, output_dir)
    planned = [*outputs, output_dir / HEATMAPS_FILE] if save_heatmaps else outputs
    refuse_inputs_as_outputs(images, planned)
    if not overwrite:
        existing = [path for path in planned if path.exists()]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise UserError(f"{existing[0]}: output exists{more}; use --overwrite to replace")
    return outputs


# ---------------------------------------------------------------------------- models
def load_grad_models(
    checkpoints: list[tuple[str, Path]], layer_name: str = LAST_CONV_LAYER
) -> tuple[list, tuple]:
    """(grad models, (H, W) input size) of ensemble_checkpoints' list: every model must
    have the logit layer Grad-CAM explains, and all one input size."""
    models = [load_model_for_inference(path) for _, path in checkpoints]
    for (_, path), model in zip(checkpoints, models, strict=True):
        if LOGIT_LAYER not in {layer.name for layer in model.layers}:
            raise UserError(
                f"{path}: the model has no '{LOGIT_LAYER}' layer (the Dense(1) output "
                "before the sigmoid, which Grad-CAM explains); expected a model built like step1's"
            )
    grad_models = [make_grad_model(model, layer_name) for model in models]
    input_size = ensemble_input_size(
        [(path, model_input_size(model)) for (_, path), model in zip(checkpoints, models, strict=True)]
    )
    if len(models) > 1:
        log.info("ensemble of %d models: %s", len(models), ", ".join(str(path) for _, path in checkpoints))
    return grad_models, input_size


def gradcam_function(grad_models: list, explain: str = "auto") -> Callable:
    """A tf.function: float32 batch -> (heatmaps, logits, class index), grad_cam for one
    model, ensemble_grad_cam for several; traced once per batch shape."""
    import tensorflow as tf

    if len(grad_models) == 1:
        return tf.function(lambda batch: grad_cam(grad_models[0], batch, explain), reduce_retracing=True)
    return tf.function(lambda batch: ensemble_grad_cam(grad_models, batch, explain), reduce_retracing=True)


def out_of_fold_groups(
    images: list[str], fold_of_patient: dict[str, int], names: list[str]
) -> list[tuple[list[int], list[int]]]:
    """step5 --out-of-fold: (model positions, image positions) pairs: each fold's model
    alone for the images of the patients it held out (fold_of_patient, by
    gbmpcnsl_common.patient_id of the image path), every model for the images of patients
    outside the cohort. Logs one line with the counts."""
    by_fold: dict[int, list[int]] = {}
    for index, image in enumerate(images):
        by_fold.setdefault(fold_of_patient.get(patient_id(image), -1), []).append(index)
    outside = by_fold.pop(-1, [])
    groups = [([fold], by_fold[fold]) for fold in sorted(by_fold)]
    counts = ", ".join(f"{names[fold]} {len(indices)}" for fold, indices in sorted(by_fold.items()))
    log.info(
        "--out-of-fold: %d image(s) explained by the fold that held their patient out (%s); %d image(s) "
        "of patients outside the cross-validation cohort explained by the ensemble of all %d folds",
        len(images) - len(outside),
        counts or "none",
        len(outside),
        len(names),
    )
    if outside:
        groups.append((list(range(len(names))), outside))
    return groups


# ---------------------------------------------------------------------------- a run over slices
@dataclass
class GradCamResults:
    """What a run over slices did; `heatmaps` by overlay path relative to the output folder."""

    written: int = 0
    failed: int = 0
    no_evidence: int = 0
    heatmaps: dict[str, np.ndarray] = field(default_factory=dict)


def write_png(path: Path, image: np.ndarray) -> None:
    """An RGB uint8 image as a PNG file, written atomically (its folder created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, private=True) as temporary, open(temporary, "wb") as handle:
        Image.fromarray(image).save(handle, format="PNG")


def write_heatmaps(path: Path, heatmaps: dict[str, np.ndarray]) -> None:
    """Each raw heatmap in one compressed .npz file, written atomically (its folder created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # to an open handle: np.savez_compressed would add .npz to the temporary file's name
    with atomic_write(path, private=True) as temporary, open(temporary, "wb") as handle:
        np.savez_compressed(handle, **heatmaps)


class GradCamRun:
    """Grad-CAM overlays for slices, batch by batch: read each slice twice (at the model's
    input size, and at its own size for the overlay), explain the batch, write overlays.
    An unreadable slice or unwritable overlay is reported on stderr and counted."""

    def __init__(self, compute: Callable, input_size: tuple[int, int], output_dir: Path, annotate: bool):
        self.compute, self.input_size = compute, input_size
        self.output_dir, self.annotate = output_dir, annotate
        self.results = GradCamResults()
        self.reported: set[str] = set()

    def run(self, images: list[str], outputs: list[Path], batch_size: int) -> GradCamResults:
        """Overlays for `images` at `outputs` (plan_outputs' paths), `batch_size` at a time."""
        with Progress(len(images), "Grad-CAM") as progress:
            for start in range(0, len(images), batch_size):
                stop = start + batch_size
                batch = self.read_batch(images[start:stop], outputs[start:stop], progress)
                if batch:
                    self.explain_batch(batch, progress)
        return self.results

    def read_batch(self, images: list[str], outputs: list[Path], progress) -> list[tuple]:
        """(slice name, output path, model input, slice at its own size) per readable slice."""
        batch = []
        for path, out in zip(images, outputs, strict=True):
            try:  # the model's input, and the slice at its own size for the overlay
                batch.append((path, out, load_slice(path, self.input_size), load_slice(path, None)))
            except (UserError, OSError, ValueError, Image.DecompressionBombError) as error:
                message = (
                    str(error) if isinstance(error, UserError) else f"{path}: cannot read image ({error})"
                )
                if message not in self.reported:  # an unreadable volume: one line
                    self.reported.add(message)
                    progress.write(f"error: {message}")
                self.results.failed += 1
                progress.update(1)
        return batch

    def explain_batch(self, batch: list[tuple], progress) -> None:
        """Explain a batch and write one overlay per slice."""
        import tensorflow as tf
        from scipy.special import expit

        model_inputs = np.stack([item[2] for item in batch]).astype(np.float32)
        heatmaps, logits, class_index = (t.numpy() for t in self.compute(tf.constant(model_inputs)))
        prob_pcnsl = expit(logits.astype(np.float64))
        for (path, out, _, original), heatmap, explained, prob in zip(
            batch, heatmaps, class_index, prob_pcnsl, strict=True
        ):
            if not heatmap.any():
                self.results.no_evidence += 1
                log.debug("%s: all-zero heatmap (no positive evidence for %s)", path, CLASS_NAMES[explained])
            overlay = overlay_heatmap(original, heatmap)
            if self.annotate:
                prob_explained = prob if explained == 1 else 1.0 - prob
                overlay = annotate(overlay, f"{CLASS_NAMES[explained]} {100 * prob_explained:.1f}%")
            try:
                write_png(out, overlay)
                self.results.written += 1
                self.results.heatmaps[out.relative_to(self.output_dir).as_posix()] = heatmap
            except OSError as error:
                progress.write(f"error: {out}: cannot write ({error})")
                self.results.failed += 1
            progress.update(1)
