"""The model: an EfficientNet backbone with the original's head, and its ImageNet weights.

    build_model(backbone, input_shape, weights, normalization, head_init)

TensorFlow and Keras are imported inside the functions, so that importing this module
(and a step's `--help`) stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gbmpcnsl_common import UserError

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


def scale_normalization_variance(model, factor: np.ndarray) -> None:
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
            scale_normalization_variance(base, np.asarray(IMAGENET_STDDEV_RGB))
    features = keras.layers.GlobalAveragePooling2D(name="avg_pool")(base.output)
    features = keras.layers.Dropout(0.5, name="top_dropout")(features)
    # Float32 head: with mixed_float16 the logit and the probability stay float32.
    logit = keras.layers.Dense(
        1, dtype="float32", kernel_initializer=dense_kernel_initializer(head_init), name=LOGIT_LAYER
    )(features)
    prob_pcnsl = keras.layers.Activation("sigmoid", dtype="float32", name=OUTPUT_LAYER)(logit)
    return keras.Model(inputs, prob_pcnsl, name=f"{backbone}_gbm_pcnsl")
