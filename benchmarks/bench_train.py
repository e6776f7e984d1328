"""Training throughput and memory: step1's streaming pipeline vs the original in-memory one.

    python benchmarks/bench_train.py [--images 400] [--size 128] [--backbone efficientnetb0]
                                     [--batch-size 8] [--steps 20] [--epochs 3] [--scales 1 4]
                                     [--mixed-precision] [--xla] [--work-dir DIR]
                                     [--variants original ours ours-mixed ours-keras-adam]
    # GPU, the paper's setting:
    python benchmarks/bench_train.py --backbone efficientnetb4 --size 380 --batch-size 32 \\
        --images 800 --mixed-precision --xla

The same model (step1's: gbmpcnsl.model.build_model, weights=None, Adam, binary
cross-entropy, accuracy and AUC) is trained with `base` augmentation from a synthetic HDF5
file in step0's layout (gzip, one image per chunk) holding N and 4N images (--scales):
- original: the original step1's data path, re-implemented: every image read into memory
  and cast to float32, a random 85/15 split by slice, tf.data.Dataset.from_tensor_slices,
  .map(augment) (tf.image.random_* per image, not parallel), .shuffle(1000), .batch(8),
  no prefetch;
- ours: gbmpcnsl.data.make_dataset (step1's): uint8 images streamed from the HDF5 file, per-epoch
  seeded shuffle of indices, parallel reads and augmentation of whole batches, prefetch;
- ours, mixed_float16 (with --mixed-precision): the same, under the mixed_float16 policy;
- ours-keras-adam (only when asked for): ours with Keras 3's element-wise Adam update, as
  the original's compile gets it today, instead of the fused ResourceApplyAdam kernel that
  step1 and the other rows apply (gbmpcnsl.adam.use_fused_adam_kernel, as tf.keras 2
  did): "ours / ours-keras-adam" is what the kernel alone gives.
--xla compiles the training step with XLA for every row alike, so that the ratio measures
the input pipeline. Each row runs in a fresh subprocess: --epochs epochs of --steps steps;
images/s is the median over the epochs after the first (which traces the model), and CPU
ms/image the process's CPU time (all threads) per training image over the same epochs, a
measure of work that other load on the machine disturbs less than wall time. Memory:
"data" is the RSS that building the dataset added (the original's arrays and tensors),
"training" the largest RSS sampled during the epochs after the first, "peak" the
process's ru_maxrss (on CPU often set by tracing the model, not by the data). With
--repeat R every row runs R times, the variants alternating, and the fastest run counts
(other load on a shared machine then favours neither side).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def write_synthetic_h5(path: Path, images: int, size: int, seed: int = 0) -> None:
    """A step0-layout HDF5 file: half GBM, half PCNSL, 8 slices per patient; gray discs
    with a bright blob plus noise (compresses like real slices rather than like zeros)."""
    import h5py

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    with h5py.File(path, "w") as h5file:
        for label, folder in enumerate(("gbm", "pcnsl")):
            count = images // 2
            group = h5file.create_group(f"{folder}/{size}_{size}")
            features = group.create_dataset(
                "features", (count, size, size, 3), np.uint8, chunks=(1, size, size, 3), compression="gzip"
            )
            for row in range(count):
                cy, cx = rng.uniform(0.3, 0.7, 2)
                gray = ((yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.16) * 90.0 + rng.normal(0, 6, (size, size))
                gray += 150.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.004)
                features[row] = np.repeat(np.clip(gray, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
            group.create_dataset("labels", data=np.full(count, label, np.uint8))
            group.create_dataset("paths", data=[f"{folder}/p{r // 8}/{r}.png" for r in range(count)])
            group.create_dataset("groups", data=[f"{folder}_p{r // 8}" for r in range(count)])


# ---------------------------------------------------------------------------- the original
def original_augment_base(x, y):
    """The original step1's augment_base (tf.image.random_*, per image, 0-255, no clip)."""
    import tensorflow as tf

    x = tf.image.random_brightness(x, max_delta=2)
    x = tf.image.random_flip_left_right(x)
    x = tf.image.random_flip_up_down(x)
    x = tf.image.random_hue(x, max_delta=0.25)
    return x, y


def original_train_dataset(h5_path: Path, size: int, batch_size: int):
    """The original step1's load_data_into_train_val, training half, at any size."""
    import h5py
    import tensorflow as tf

    with h5py.File(h5_path, "r") as f:
        x_gbm = f[f"/gbm/{size}_{size}/features"][:]
        y_gbm = f[f"/gbm/{size}_{size}/labels"][:]
        x_pcnsl = f[f"/pcnsl/{size}_{size}/features"][:]
        y_pcnsl = f[f"/pcnsl/{size}_{size}/labels"][:]
    x = np.concatenate((x_gbm, x_pcnsl)).astype(np.float32)
    y = np.concatenate((y_gbm, y_pcnsl)).astype(np.float32)
    del x_gbm, x_pcnsl
    shuffle_inds = np.arange(y.shape[0])
    np.random.seed(42)
    np.random.shuffle(shuffle_inds)
    x = x[shuffle_inds]
    y = y[shuffle_inds]
    inds = np.random.choice([0, 1], size=y.size, p=[0.85, 0.15])
    x_train, y_train = x[inds == 0], y[inds == 0]
    x_val, y_val = x[inds == 1], y[inds == 1]  # noqa: F841 (kept, as the original keeps it)
    dset_train = tf.data.Dataset.from_tensor_slices((x_train, y_train))
    dset_train = dset_train.map(original_augment_base)
    dset_train = dset_train.shuffle(1000, reshuffle_each_iteration=True)
    return dset_train.batch(batch_size), len(y_train)


def ours_train_dataset(h5_path: Path, size: int, batch_size: int, epochs: int):
    """step1's training stream (same split and pipeline as gbmpcnsl.training.train)."""
    import h5py

    from gbmpcnsl.data import HDF5Images, make_dataset, split_by_group
    from gbmpcnsl.hdf5 import read_hdf5_index

    with h5py.File(h5_path, "r") as h5file:
        records, _ = read_hdf5_index(h5file, (size, size))
    is_val = split_by_group(records, 0.15, seed=0)
    labels = np.array([r["label"] for r in records], np.float32)
    train = np.flatnonzero(~is_val)
    reader = HDF5Images(h5_path, (size, size))
    return make_dataset(reader, train, labels, batch_size, "base", 0, (0, epochs)), len(train)


def run_child(args: argparse.Namespace) -> None:
    """One benchmark row in this process; prints one JSON line."""
    import keras
    import psutil
    import tensorflow as tf

    from gbmpcnsl.adam import use_fused_adam_kernel
    from gbmpcnsl.model import build_model

    if args.child_variant == "ours-mixed":
        keras.mixed_precision.set_global_policy("mixed_float16")
    model = build_model(args.backbone, (args.size, args.size, 3), weights=None)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
        jit_compile=bool(args.xla),
    )
    if args.child_variant != "original":  # as step1 does: Adam's slots before the first step
        model.optimizer.build(model.trainable_variables)
    if args.child_variant in ("ours", "ours-mixed"):
        use_fused_adam_kernel(model.optimizer)
    baseline_rss = psutil.Process().memory_info().rss
    h5_path = Path(args.child_h5)
    if args.child_variant == "original":
        dataset, n_train = original_train_dataset(h5_path, args.size, args.batch_size)
        dataset = dataset.repeat()  # harness only: --steps per epoch never stops short
    else:
        dataset, n_train = ours_train_dataset(h5_path, args.size, args.batch_size, args.epochs)
    data_rss = psutil.Process().memory_info().rss

    epoch_seconds, epoch_cpu_seconds, epoch_images, training_rss = [], [], [], [0]
    process = psutil.Process()

    class Timer(keras.callbacks.Callback):
        """Epoch times, and the RSS sampled every 10 batches once the model is traced."""

        def on_epoch_begin(self, epoch, logs=None):
            self.start, self.start_cpu, self.batches = time.perf_counter(), time.process_time(), 0

        def on_train_batch_end(self, batch, logs=None):
            self.batches += 1
            if epoch_seconds and batch % 10 == 0:
                training_rss[0] = max(training_rss[0], process.memory_info().rss)

        def on_epoch_end(self, epoch, logs=None):
            epoch_seconds.append(time.perf_counter() - self.start)
            epoch_cpu_seconds.append(time.process_time() - self.start_cpu)
            # Counted, not assumed: Keras ends an epoch early when a finite dataset runs out.
            epoch_images.append(self.batches * args.batch_size)
            training_rss[0] = max(training_rss[0], process.memory_info().rss)

    model.fit(
        dataset, epochs=args.epochs, steps_per_epoch=args.steps, callbacks=[Timer()], shuffle=False, verbose=0
    )
    timed = slice(1, None) if len(epoch_seconds) > 1 else slice(None)
    images_per_s = [n / t for n, t in zip(epoch_images[timed], epoch_seconds[timed], strict=True)]
    cpu_ms = [1000 * c / n for n, c in zip(epoch_images[timed], epoch_cpu_seconds[timed], strict=True)]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(
        json.dumps(
            {
                "variant": args.child_variant,
                "train_images": n_train,
                "images_per_s": float(np.median(images_per_s)),
                "cpu_ms_per_image": float(np.median(cpu_ms)),
                "first_epoch_s": epoch_seconds[0],
                "peak_rss_mib": peak_rss / 2**20,
                "training_rss_mib": training_rss[0] / 2**20,
                "data_rss_mib": (data_rss - baseline_rss) / 2**20,
                "device": "GPU" if tf.config.list_physical_devices("GPU") else "CPU",
            }
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=400, help="images in the 1x file (default 400)")
    parser.add_argument("--size", type=int, default=128, help="image height = width (default 128)")
    parser.add_argument("--backbone", default="efficientnetb0", help="default efficientnetb0 (CPU)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="training steps per epoch (default 20)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs; the first is not timed (default 3)")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4], help="dataset sizes, x --images")
    parser.add_argument("--mixed-precision", action="store_true", help="add 'ours, mixed_float16' rows")
    parser.add_argument("--xla", action="store_true", help="jit_compile the training step (all rows)")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=["original", "ours", "ours-mixed", "ours-keras-adam"],
        help="rows to run (default: original, ours, and ours-mixed with --mixed-precision)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per row, fastest counts (default 1)")
    parser.add_argument("--work-dir", type=Path, help="where the HDF5 files go (default: a temp dir)")
    parser.add_argument("--child-variant", help=argparse.SUPPRESS)
    parser.add_argument("--child-h5", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_variant:
        run_child(args)
        return 0

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    variants = args.variants or ["original", "ours"] + (["ours-mixed"] if args.mixed_precision else [])
    print(
        f"{args.backbone} {args.size}x{args.size}, batch {args.batch_size}, {args.steps} steps x "
        f"{args.epochs} epochs, xla={args.xla}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results = []
    for scale in args.scales:
        h5_path = work / f"bench_{args.size}_{scale}x.h5"
        if not h5_path.exists():
            write_synthetic_h5(h5_path, args.images * scale, args.size)
        runs: dict[str, list[dict]] = {variant: [] for variant in variants}
        for repeat in range(args.repeat):
            for variant in variants if repeat % 2 == 0 else variants[::-1]:
                passed = [a for a in sys.argv[1:] if not a.startswith("--child")]
                command = [
                    sys.executable,
                    __file__,
                    *passed,
                    "--child-variant",
                    variant,
                    "--child-h5",
                    str(h5_path),
                ]
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode != 0:
                    print(result.stderr[-3000:], file=sys.stderr)
                    return 1
                runs[variant].append(json.loads(result.stdout.strip().splitlines()[-1]))
        for variant in variants:
            row = max(runs[variant], key=lambda run: run["images_per_s"])
            row.update(
                scale=scale,
                images=args.images * scale,
                all_images_per_s=[r["images_per_s"] for r in runs[variant]],
            )
            results.append(row)
            print(
                f"{scale}x {row['images']:>6} images  {variant:<10} {row['images_per_s']:8.1f} images/s  "
                f"{row['cpu_ms_per_image']:6.1f} CPU ms/image  "
                f"RSS: data {row['data_rss_mib']:+5.0f} MiB, training {row['training_rss_mib']:6.0f} MiB, "
                f"peak {row['peak_rss_mib']:6.0f} MiB  first epoch {row['first_epoch_s']:.0f} s  "
                f"[{row['device']}; runs: {', '.join(f'{v:.1f}' for v in row['all_images_per_s'])}]",
                flush=True,
            )
    by_key = {(r["scale"], r["variant"]): r for r in results}
    for scale in args.scales:
        original, ours = by_key.get((scale, "original")), by_key.get((scale, "ours"))
        if original and ours:
            print(
                f"{scale}x: ours / original throughput = {ours['images_per_s'] / original['images_per_s']:.2f}"
            )
        if (scale, "ours-keras-adam") in by_key and ours:
            keras_adam = by_key[(scale, "ours-keras-adam")]
            print(
                f"{scale}x: fused Adam kernel / Keras Adam: throughput "
                f"{ours['images_per_s'] / keras_adam['images_per_s']:.2f}, first epoch "
                f"{ours['first_epoch_s']:.1f} s / {keras_adam['first_epoch_s']:.1f} s"
            )
        if (scale, "ours-mixed") in by_key and ours:
            mixed = by_key[(scale, "ours-mixed")]
            print(
                f"{scale}x: mixed_float16 / float32 throughput = {mixed['images_per_s'] / ours['images_per_s']:.2f}"
            )
    if len(args.scales) > 1 and len(results) == len(args.scales) * len(variants):
        low, high = min(args.scales), max(args.scales)
        for variant in variants:
            growth = [
                by_key[(high, variant)][k] - by_key[(low, variant)][k]
                for k in ("training_rss_mib", "peak_rss_mib")
            ]
            print(
                f"{variant}: RSS {high}x - {low}x: during training {growth[0]:+.0f} MiB, peak {growth[1]:+.0f} MiB"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
