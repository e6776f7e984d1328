"""Write paper-era checkpoints with tf.keras 2.x (tf-keras) and their own predictions.

Run as one subprocess by conftest's legacy_checkpoints (tf-keras and Keras 3 do not share
one process well), which writes every legacy checkpoint the tests need in one run. Each
model is the original architecture (EfficientNetB4 without top -> GlobalAveragePooling2D
-> Dropout(0.5) -> Dense(1, sigmoid), Model(base.input, out)), built with weights=None (no
download) and its weights perturbed, BatchNormalization statistics and the Normalization
mean/variance included, so that a loader that drops or misplaces any weight gives
different numbers. It is saved as the original's ModelCheckpoint did
(`model.save("x.hdf5")`) and as weights only (`save_weights("w.h5")`).

Usage: python original_tf_keras.py SPEC.json, SPEC a list of {"out_dir", "images",
"size": [H, W] (default 380 380), "imagenet_graph" (default false), "backbone" (default
EfficientNetB4), "seed" (default 0)} -> per entry OUT_DIR/model.hdf5, OUT_DIR/weights.h5,
OUT_DIR/expected.npy (P(PCNSL) per image, one predict call per image).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.pop("TF_USE_LEGACY_KERAS", None)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gbmpcnsl_common import load_image


def build_original(
    input_shape, imagenet_graph: bool = False, scratch: Path | None = None, backbone: str = "EfficientNetB4"
):
    """The original model. imagenet_graph: the graph tf.keras >= 2.9 builds for
    weights="imagenet", with its extra scaling op after Normalization (tensorflow issue
    49930); built offline by handing Keras a notop file of our own instead of a download."""
    import tf_keras
    from tf_keras.src.applications import efficientnet

    weights = None
    if imagenet_graph:
        notop = scratch / f"{backbone.lower()}_notop.h5"
        constructor = getattr(efficientnet, backbone)
        constructor(include_top=False, input_shape=input_shape, weights=None).save_weights(notop)
        efficientnet.data_utils.get_file = lambda *args, **kwargs: str(notop)
        weights = "imagenet"
    base = getattr(efficientnet, backbone)(include_top=False, input_shape=input_shape, weights=weights)
    features = tf_keras.layers.GlobalAveragePooling2D(name="avg_pool")(base.output)
    features = tf_keras.layers.Dropout(0.5)(features)
    prob_pcnsl = tf_keras.layers.Dense(1, activation="sigmoid", name="predictions")(features)
    return tf_keras.Model(inputs=base.input, outputs=prob_pcnsl)


def perturb(model, images: np.ndarray, seed: int = 0) -> None:
    """Move every weight away from its initial value, keeping the network well scaled.

    Kernels, BatchNormalization gamma/beta and the Normalization mean/variance get noise;
    the BatchNormalization moving statistics are then set to the batch statistics of
    `images` (one training-mode pass with momentum 0), so that the random network's
    features differ from image to image as a trained network's do.
    """
    import tf_keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        if isinstance(layer, tf_keras.layers.Normalization):
            mean, variance, count = weights
            mean = rng.uniform(0.3, 0.6, mean.shape).astype(np.float32)  # inputs are /255 here
            variance = rng.uniform(0.04, 0.09, variance.shape).astype(np.float32)
            layer.set_weights([mean, variance, count])
        elif isinstance(layer, tf_keras.layers.BatchNormalization):
            gamma, beta, moving_mean, moving_variance = weights
            gamma = gamma * rng.uniform(0.8, 1.2, gamma.shape).astype(np.float32)
            beta = beta + rng.normal(0, 0.1, beta.shape).astype(np.float32)
            layer.set_weights([gamma, beta, moving_mean, moving_variance])
        else:
            layer.set_weights(
                [w + rng.normal(0, 0.1 * (w.std() + 1e-3), w.shape).astype(w.dtype) for w in weights]
            )
    # Moving statistics from the images, without dropout (stochastic depth included).
    saved = {}
    for layer in model.layers:
        if isinstance(layer, tf_keras.layers.BatchNormalization):
            saved[layer.name] = ("momentum", layer.momentum)
            layer.momentum = 0.0
        elif isinstance(layer, tf_keras.layers.Dropout):
            saved[layer.name] = ("rate", layer.rate)
            layer.rate = 0.0
    model(images, training=True)
    for name, (attribute, value) in saved.items():
        setattr(model.get_layer(name), attribute, value)
    # Head along the features' first principal axis, logits spread by about +-1.5: the
    # smallest kernel that separates the images, so float32 round-off is not magnified.
    features = tf_keras.Model(model.input, model.get_layer("avg_pool").output).predict(images, verbose=0)
    centered = features - features.mean(0)
    direction = np.linalg.svd(centered, full_matrices=False)[2][0]
    kernel = (direction * 1.5 / ((centered @ direction).std() + 1e-6))[:, None]
    bias = 0.2 - np.median(features @ kernel, keepdims=True)[0]
    model.get_layer("predictions").set_weights([kernel.astype(np.float32), bias.astype(np.float32)])


def write_checkpoint(
    out_dir: Path,
    images: list[str],
    size=(380, 380),
    imagenet_graph: bool = False,
    backbone: str = "EfficientNetB4",
    seed: int = 0,
) -> None:
    """One original model, perturbed, saved both ways, with its own predictions."""
    import tf_keras

    tf_keras.backend.clear_session()  # each model's layer names as in a fresh process
    size = tuple(size)
    batch = np.stack([load_image(path, size) for path in images]).astype(np.float32)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_original((*size, 3), imagenet_graph, out_dir, backbone)
    perturb(model, batch, seed)
    model.save(out_dir / "model.hdf5")  # as the original's ModelCheckpoint did
    model.save_weights(out_dir / "weights.h5")
    # The original's step2: one predict call per image.
    expected = np.array([float(model.predict(image[None], verbose=0)[0, 0]) for image in batch])
    np.save(out_dir / "expected.npy", expected)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("spec", type=Path, help="JSON list of the checkpoints to write")
    args = parser.parse_args(argv)
    for entry in json.loads(args.spec.read_text()):
        write_checkpoint(**entry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
