"""Grad-CAM speed: step5's batched heatmaps vs the original per-image approach.

    python benchmarks/bench_gradcam.py [--images 32] [--size 380] [--batch-size 8] [--repeats 1]

Model: EfficientNetB4 (weights=None, nothing downloaded) with step5's head, on synthetic
380x380 slices. Both sides start from the same uint8 arrays in memory and produce the
heatmaps only (image decoding and the overlay are the same cheap code on both sides).

- original: the original step5 (after the keras-io recipe): for every image, build a new
  two-output gradient model, run it eagerly on one image under a GradientTape, pool the
  gradients and weight the channels; it explains "1 - output" when the output < 0.5.
- ours: gbmpcnsl.gradcam.grad_cam: the gradient model built once, batches of
  --batch-size through one tf.function (its tracing is counted in the time).
- ours, eager: the same batched function without tf.function (shows where the gain is).

The timed region includes building the gradient model(s). Prints images/s and the ratio,
and checks that both give the same heatmaps (the original's threshold explains GBM for
every output below 0.5; ours is run with --class gbm for the comparison).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def original_heatmap(
    img_array: np.ndarray, model, last_conv_layer_name: str = "top_activation"
) -> np.ndarray:
    """The original get_gradcam_heatmap, on the logit output (the original model's only output)."""
    import keras
    import tensorflow as tf

    grad_model = keras.models.Model(
        [model.inputs], [model.get_layer(last_conv_layer_name).output, model.get_layer("logit").output]
    )
    with tf.GradientTape() as tape:
        last_conv_layer_output, preds = grad_model(img_array[np.newaxis])
        if preds[0][0] < 0.5:  # the original's threshold, applied to a logit
            preds = 1.0 - preds
    grads = tape.gradient(preds, last_conv_layer_output)
    pooled_grads = tf.reduce_mean(grads, axis=(0, 1, 2))
    heatmap = last_conv_layer_output[0] @ pooled_grads[..., tf.newaxis]
    heatmap = tf.squeeze(heatmap)
    heatmap = tf.maximum(heatmap, 0) / tf.math.reduce_max(heatmap)
    return heatmap.numpy()


def synthetic_slices(count: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 (count, size, size, 3): a bright disc (head) with a brighter blob, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    slices = []
    for _ in range(count):
        cy, cx = rng.uniform(0.3, 0.7, size=2)
        gray = ((yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.16) * 90.0
        gray += 150.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.004) + rng.normal(0, 6, (size, size))
        slices.append(np.repeat(np.clip(gray, 0, 255).astype(np.uint8)[..., None], 3, axis=2))
    return np.stack(slices)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=380)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--skip-eager", action="store_true", help="skip the 'ours, eager' row")
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from gbmpcnsl.gradcam import grad_cam, make_grad_model
    from gbmpcnsl.model import build_model

    keras.utils.set_random_seed(0)
    model = build_model("efficientnetb4", (args.size, args.size, 3), weights=None)
    images = synthetic_slices(args.images, args.size).astype(np.float32)
    devices = [d.device_type for d in tf.config.list_physical_devices()]
    print(
        f"# {platform.node()}: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at start; "
        f"TF {tf.__version__}, Keras {keras.__version__}; devices {devices}",
        flush=True,
    )

    def run_ours(compiled: bool) -> np.ndarray:
        grad_model = make_grad_model(model)

        def compute(batch):
            return grad_cam(grad_model, batch, "gbm")

        if compiled:
            compute = tf.function(compute, reduce_retracing=True)
        batches = [
            compute(tf.constant(images[start : start + args.batch_size]))[0].numpy()
            for start in range(0, len(images), args.batch_size)
        ]
        return np.concatenate(batches)

    def run_original() -> np.ndarray:
        return np.stack([original_heatmap(image, model) for image in images])

    rows = []
    for name, run in (
        ("original (per image, gradient model rebuilt, eager)", run_original),
        (f"ours (batch {args.batch_size}, gradient model once, tf.function)", lambda: run_ours(True)),
        (f"ours, eager (batch {args.batch_size}, gradient model once)", lambda: run_ours(False)),
    ):
        if args.skip_eager and "eager (batch" in name:
            continue
        start = time.perf_counter()
        heatmaps = run()
        seconds = time.perf_counter() - start
        rows.append((name, seconds, heatmaps))
        print(f"{name}: {seconds:.1f} s, {args.images / seconds:.2f} images/s", flush=True)

    reference = rows[0][2]
    print()
    print(
        f"| approach ({args.images} images, {args.size}x{args.size}, EfficientNetB4) | seconds | images/s | vs original |"
    )
    print("| --- | ---: | ---: | ---: |")
    for name, seconds, heatmaps in rows:
        print(f"| {name} | {seconds:.1f} | {args.images / seconds:.2f} | {rows[0][1] / seconds:.2f}x |")
        difference = np.nanmax(np.abs(np.nan_to_num(reference) - heatmaps))
        assert difference < 1e-4, f"{name}: heatmaps differ from the original's by {difference}"
    print(f"\n# load average {os.getloadavg()[0]:.1f} at end; heatmaps agree with the original within 1e-4")
    return 0


if __name__ == "__main__":
    sys.exit(main())
