"""Train an EfficientNet to tell glioblastoma (GBM) from primary CNS lymphoma (PCNSL).

Reads the HDF5 file written by step0 and writes a run folder:

    ckpt_{epoch:03d}_{val_loss:.4f}.keras   best-only checkpoints on val_loss (full Keras models;
                                           ckpt_{epoch:03d}_{val_auc:.4f}.keras with --monitor val_auc)
    history.csv                            one row per epoch (Keras CSVLogger; epoch counts from 0)
    split.csv                              path, group, label, subset (train/val) of every slice
    run.json                               arguments, data digest, split, versions, times, best epoch
    val_predictions.csv                    path,prob_gbm,prob_pcnsl,label,patient_id of every validation
                                           slice, predicted by the best checkpoint
    backup/                                training state for --resume (removed when training ends)
    tensorboard/                           with --tensorboard: TensorBoard logs (tensorboard --logdir RUN_DIR)

After McAvoy et al., Sci Rep 11:15219 (2021): EfficientNetB4 with ImageNet weights at the
HDF5's image size, Adam 1e-4 for 50 epochs then 1e-4 * exp(0.015 * (50 - epoch)), binary
cross-entropy, batch 8. Unlike the original script, images stream from the HDF5 file (memory
stays flat as the cohort grows), the validation set holds out whole patients (groups), and
--augmentation base_and_noise really adds the noise.

Augmentations (inside tf.data, on 0-255 float images, a new draw per image and epoch):
  none            nothing
  base            random left-right and up-down flips, brightness +-2 grey levels, hue
                  +-0.25 (a no-op on grayscale slices), values clipped to 0-255
  base_and_noise  base, then Gaussian noise (std 12.75 grey levels = 0.05 of the range)
                  on a random 10% of the images, clipped to 0-255
  strong          for a cohort whose scans differ in pose, size and intensity: flips; one
                  affine transform (rotation +-15 degrees, zoom 1 +- 0.15, shift +- 0.06 of
                  the size; black fill); gamma 1 +- 0.2, contrast 1 +- 0.2, brightness +-10
                  grey levels; noise (std 12.75) on 10% of the images; clipped to 0-255.
                  Each setting has its flag (--rotation-degrees ... --noise-fraction).

A run whose best epoch is the first, or whose best validation AUC stays below 0.6, ends
with a warning: the network most likely memorised its training patients.

Cross-validation (--folds K): the patients are split into K stratified, patient-disjoint
folds (scikit-learn's StratifiedGroupKFold, shuffled with --seed; --val-fraction is not
used), and fold i is trained, with fold i's patients as validation, into the ordinary run
folder RUN/fold_<i>/. RUN/cv.json records the patients and slices of every fold, each
fold's status and, once every fold is done, their best checkpoints; RUN/oof_predictions.csv
then pools the folds' val_predictions.csv (plus a fold column): every slice predicted by the
one model that did not see its patient. --fold i trains fold i only (one job per fold on a
cluster; the jobs may run at once). --resume skips finished folds, resumes interrupted
ones and starts the others; --overwrite replaces the whole RUN, or with --fold i that
fold only.

Example:
  python step1_train_model.py --augmentation base --epochs 300 data.h5 checkpoints/run/
  python step1_train_model.py --augmentation base --epochs 300 --resume data.h5 checkpoints/run/
  python step1_train_model.py --augmentation base --epochs 300 --folds 5 data.h5 checkpoints/cv/
  python step1_train_model.py --augmentation base --epochs 300 --folds 5 --fold 3 data.h5 checkpoints/cv/
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import gbmpcnsl_common as common
from gbmpcnsl.files import file_sha256, write_csv, write_json
from gbmpcnsl.runs import CV_JSON, CV_LOCK, OOF_PREDICTIONS_CSV, PREDICTION_COLUMNS, VAL_PREDICTIONS_CSV
from gbmpcnsl_common import CLASS_FOLDERS, CLASS_LABELS, UserError, log

AUGMENTATIONS = ("none", "base", "base_and_noise", "strong")
# Augmentation parameters, on the 0-255 scale (the paper ran brightness with max_delta=2 on
# 0-255 floats, so it moves a pixel by at most 2 grey levels).
BRIGHTNESS_MAX_DELTA = 2.0
HUE_MAX_DELTA = 0.25
NOISE_STD = 0.05 * 255.0  # 12.75 grey levels
NOISE_FRACTION = 0.10
# What to pick the best epoch by (checkpoints, early stopping, run.json): name -> Keras mode.
MONITORS = {"val_loss": "min", "val_auc": "max"}
# A run whose best epoch is the first, or whose best validation AUC is below this, did not learn.
MIN_LEARNED_VAL_AUC = 0.6
# Learning-rate schedule of the paper: constant for 50 epochs, then exponential decay.
LR_CONSTANT_EPOCHS = 50
LR_DECAY = 0.015
# Arguments that must match when a run is resumed (the rest may change, e.g. --epochs; the
# image size is compared once it is resolved from the HDF5 file).
RESUME_MUST_MATCH = (
    "augmentation",
    "backbone",
    "weights",
    "normalization",
    "batch_size",
    "learning_rate",
    "val_fraction",
    "seed",
    "mixed_precision",
    "rotation_degrees",
    "scale",
    "shift",
    "contrast",
    "brightness",
    "gamma",
    "noise_std",
    "noise_fraction",
    "monitor",
    "batchnorm_momentum",
)


@dataclass(frozen=True)
class StrongAugmentation:
    """Parameters of --augmentation strong (defaults = step1's defaults).

    rotation_degrees: rotation by U(-r, r) degrees about the image centre.
    scale: isotropic zoom by a factor U(1 - s, 1 + s).
    shift: translation by U(-t, t) of the image height / width, along each axis.
    contrast: (image - its mean) * U(1 - c, 1 + c) + mean.
    brightness: + U(-b, b) grey levels.
    gamma: 255 * (image / 255) ** U(1 - g, 1 + g).
    noise_std, noise_fraction: Gaussian noise of this std (grey levels) on this fraction of
    the images.
    """

    rotation_degrees: float = 15.0
    scale: float = 0.15
    shift: float = 0.06
    contrast: float = 0.2
    brightness: float = 10.0
    gamma: float = 0.2
    noise_std: float = NOISE_STD
    noise_fraction: float = NOISE_FRACTION

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> StrongAugmentation:
        """The parameters as the command line set them."""
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__})


# What a run started before these settings existed ran with, so that it can be resumed.
RESUME_DEFAULTS = {
    "monitor": "val_loss",
    "batchnorm_momentum": None,
    "normalization": "imagenet",
    **asdict(StrongAugmentation()),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line: see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="step1_train_model.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("hdf5", type=Path, help="HDF5 file written by step0")
    parser.add_argument("run_dir", type=Path, help="run folder to create (must not exist, unless --resume)")
    parser.add_argument(
        "--augmentation",
        choices=AUGMENTATIONS,
        default="none",
        help="augmentation, see above (default none, as the original)",
    )
    strong = StrongAugmentation()
    for flag, metavar, check, meaning in (
        ("--rotation-degrees", "DEG", _non_negative_float, "strong: rotation by up to +-DEG degrees"),
        ("--scale", "S", _below_one, "strong: isotropic zoom by a factor in 1 +- S"),
        ("--shift", "F", _below_one, "strong: translation by up to +-F of the image size per axis"),
        ("--contrast", "C", _below_one, "strong: contrast factor in 1 +- C about the image mean"),
        ("--brightness", "B", _non_negative_float, "strong: brightness +- B grey levels"),
        ("--gamma", "G", _below_one, "strong: gamma in 1 +- G"),
        ("--noise-std", "STD", _non_negative_float, "strong: std of the Gaussian noise, grey levels"),
        ("--noise-fraction", "P", _probability, "strong: fraction of images that get the noise"),
    ):
        default = getattr(strong, flag[2:].replace("-", "_"))
        parser.add_argument(
            flag, type=check, default=default, metavar=metavar, help=f"{meaning} (default {default:g})"
        )
    parser.add_argument("--epochs", type=_positive_int, default=300, help="number of epochs (default 300)")
    parser.add_argument(
        "--weights",
        default="imagenet",
        help="imagenet (Keras downloads and caches it), none (random init), or the path to a "
        "<backbone>_notop.h5 file (default imagenet)",
    )
    parser.add_argument(
        "--normalization",
        choices=common.NORMALIZATIONS,
        default="imagenet",
        help="input scaling with ImageNet weights: imagenet, (x/255 - mean) / std as current Keras "
        "(default); paper, (x/255 - mean) / sqrt(std) as TF 2.5 gave the paper's models",
    )
    parser.add_argument(
        "--head-init",
        choices=common.HEAD_INITIALIZERS,
        default="original",
        help="kernel initializer of the logit layer: original, the paper's (default); glorot, "
        "Keras's default, for training from scratch (the original's large initial logits stall it)",
    )
    parser.add_argument(
        "--backbone",
        choices=common.BACKBONES,
        default="efficientnetb4",
        metavar="NAME",
        help="efficientnetb0 ... efficientnetb7 (default efficientnetb4)",
    )
    parser.add_argument(
        "--size",
        nargs=2,
        type=_positive_int,
        metavar=("H", "W"),
        help="image size to train on, when the HDF5 file holds several (default: the only one)",
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=8, help="batch size per replica (default 8)"
    )
    parser.add_argument(
        "--learning-rate",
        type=_positive_float,
        default=1e-4,
        help=f"initial learning rate, decayed by exp(-{LR_DECAY}) per epoch after epoch "
        f"{LR_CONSTANT_EPOCHS} (default 1e-4)",
    )
    parser.add_argument(
        "--val-fraction",
        type=_fraction,
        default=0.15,
        help="fraction of each class's slices held out for validation, whole patients at a time "
        "(default 0.15)",
    )
    parser.add_argument(
        "--folds",
        type=_positive_int,
        metavar="K",
        help="K-fold cross-validation by patient into RUN_DIR/fold_<i>/ (K >= 2; default: one split)",
    )
    parser.add_argument(
        "--fold",
        type=int,
        metavar="I",
        help="with --folds: train fold I only (0 ... K-1), e.g. one job per fold",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the split, shuffling, augmentation and init (default 0)"
    )
    parser.add_argument(
        "--early-stopping",
        type=_positive_int,
        metavar="PATIENCE",
        help="stop when the monitored metric has not improved for PATIENCE epochs (default: off)",
    )
    parser.add_argument(
        "--monitor",
        choices=tuple(MONITORS),
        default="val_loss",
        help="the metric that picks the best epoch: best-only checkpoints, early stopping, "
        "run.json (default val_loss, as the original)",
    )
    parser.add_argument(
        "--batchnorm-momentum",
        type=_probability,
        metavar="M",
        help="momentum of every BatchNormalization layer's moving statistics, for training from "
        "scratch (e.g. 0.9); default: Keras's 0.99, as in ImageNet fine-tuning",
    )
    parser.add_argument(
        "--tensorboard",
        action="store_true",
        help="write TensorBoard logs (epoch scalars, learning rate) to RUN_DIR/tensorboard/",
    )
    parser.add_argument(
        "--mixed-precision", action="store_true", help="mixed_float16 (GPU); the output stays float32"
    )
    parser.add_argument("--xla", action="store_true", help="compile the training step with XLA")
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="enable TensorFlow op determinism: same seed, same history.csv (slower)",
    )
    parser.add_argument(
        "--distribute",
        choices=("auto", "none", "mirrored", "multiworker"),
        default="auto",
        help="auto: MirroredStrategy when more than one GPU is visible; mirrored: all local GPUs "
        "(or all logical CPUs); multiworker: MultiWorkerMirroredStrategy over several machines, "
        "cluster from TF_CONFIG or Slurm (see the README) (default auto)",
    )
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run in RUN_DIR")
    parser.add_argument(
        "--overwrite", action="store_true", help="delete an existing run folder (with run.json) first"
    )
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's own log messages")
    args = parser.parse_args(argv)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    if args.folds is not None and args.folds < 2:
        parser.error(f"--folds {args.folds}: cross-validation needs at least 2 folds")
    if args.fold is not None and args.folds is None:
        parser.error("--fold needs --folds K")
    if args.fold is not None and not 0 <= args.fold < args.folds:
        parser.error(f"--fold {args.fold}: expected 0 ... {args.folds - 1} (--folds {args.folds})")
    if args.size is not None:
        args.size = tuple(args.size)
    return args


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected an integer >= 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: expected a number > 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text}: expected a number >= 0")
    return value


def _below_one(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a number in [0, 1)")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a number between 0 and 1")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a fraction between 0 and 1 (exclusive)")
    return value


# ---------------------------------------------------------------------------- schedule
def learning_rate_at(epoch: int, initial: float = 1e-4) -> float:
    """The paper's schedule for a 0-based epoch: `initial` for 50 epochs, then
    initial * exp(0.015 * (50 - epoch)). A closed form, so a resumed run gets the same rate."""
    if epoch < LR_CONSTANT_EPOCHS:
        return initial
    return initial * math.exp(LR_DECAY * (LR_CONSTANT_EPOCHS - epoch))


# ---------------------------------------------------------------------------- split
def split_by_group(records: list[dict], val_fraction: float, seed: int) -> np.ndarray:
    """Hold out whole groups (patients) for validation: a boolean array, True = validation.

    Stratified as far as groups allow: each class (a group counts for its majority class)
    contributes groups in a seeded random order until its validation slices reach
    `val_fraction` of its slices; every class keeps at least one group on each side.
    Raises UserError when a class has fewer than two groups.
    """
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault(record["group"], []).append(index)
    by_class: dict[int, list[str]] = {label: [] for label in CLASS_LABELS.values()}
    for group, members in groups.items():
        labels = [records[i]["label"] for i in members]
        if len(set(labels)) > 1:
            log.warning(
                "warning: group %s holds slices of both classes; kept on one side of the split", group
            )
        by_class[max(set(labels), key=labels.count)].append(group)
    is_val = np.zeros(len(records), dtype=bool)
    for label, class_groups in by_class.items():
        name = common.CLASS_NAMES[label]
        if len(class_groups) < 2:
            raise UserError(
                f"{name}: {len(class_groups)} patient group(s); a validation set by patient needs at "
                "least 2 per class (one for training, one for validation)"
            )
        class_groups = sorted(class_groups)  # the file order must not matter, only the seed
        order = rng.permutation(len(class_groups))
        target = val_fraction * sum(len(groups[g]) for g in class_groups)
        taken, count = [], 0
        for position in order:
            group = class_groups[position]
            size = len(groups[group])
            # Take a group when that brings the count closer to the target (always one).
            if not taken or count + size / 2 <= target:
                taken.append(group)
                count += size
            if len(taken) == len(class_groups) - 1 or count >= target:
                break
        for group in taken:
            is_val[groups[group]] = True
    return is_val


def write_split_csv(path: Path, records: list[dict], is_val: np.ndarray) -> None:
    """split.csv: path, group, label, subset (train or val), in the HDF5 file's order."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "group", "label", "subset"])
        for record, val in zip(records, is_val, strict=True):
            writer.writerow([record["path"], record["group"], record["label"], "val" if val else "train"])


def read_split_csv(path: Path) -> list[tuple[str, str, int, str]]:
    with open(path, newline="") as handle:
        return [(r["path"], r["group"], int(r["label"]), r["subset"]) for r in csv.DictReader(handle)]


# ---------------------------------------------------------------------------- augmentation
def augment_image(image, seed, augmentation: str, strong: StrongAugmentation | None = None):
    """Augment one float32 image (H, W, 3) in 0-255; a pure function of `seed` (a shape-[2]
    integer tensor), so the same seed gives the same image.

    base: left-right and up-down flips (p = 0.5 each), brightness + U(-2, 2) grey levels,
    clip, hue + U(-0.25, 0.25) of a turn of the colour wheel (tf.image.adjust_hue, on the
    image scaled to 0-1; no-op on gray pixels), clip to 0-255.
    base_and_noise: base, then with probability 0.1 Gaussian noise of std 12.75 (0.05 of
    the 0-255 range), clip to 0-255.
    strong: see strong_augment (parameters `strong`, default StrongAugmentation()).
    """
    import tensorflow as tf

    if augmentation == "none":
        return image
    if augmentation == "strong":
        return strong_augment(image, seed, strong or StrongAugmentation())
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=5)
    image = tf.image.stateless_random_flip_left_right(image, seeds[0])
    image = tf.image.stateless_random_flip_up_down(image, seeds[1])
    image = tf.image.stateless_random_brightness(image, BRIGHTNESS_MAX_DELTA, seeds[2])
    image = tf.clip_by_value(image, 0.0, 255.0)
    image = tf.image.stateless_random_hue(image / 255.0, HUE_MAX_DELTA, seeds[3]) * 255.0
    if augmentation == "base_and_noise":
        noise_seeds = tf.random.experimental.stateless_split(seeds[4], num=2)
        image = tf.cond(
            tf.random.stateless_uniform([], noise_seeds[0]) < NOISE_FRACTION,
            lambda: image + tf.random.stateless_normal(tf.shape(image), noise_seeds[1], stddev=NOISE_STD),
            lambda: image,
        )
    return tf.clip_by_value(image, 0.0, 255.0)


def strong_augment(image, seed, params: StrongAugmentation):
    """--augmentation strong on one float32 image (H, W, C) in 0-255, a pure function of
    `seed`: left-right and up-down flips (p = 0.5 each); one affine transform (rotation,
    isotropic zoom, translation; bilinear, black outside the image); gamma, contrast and
    brightness jitter; Gaussian noise (the same in every channel) on a fraction of the
    images; clipped to 0-255."""
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=10)
    uniform = tf.random.stateless_uniform
    image = tf.image.stateless_random_flip_left_right(image, seeds[0])
    image = tf.image.stateless_random_flip_up_down(image, seeds[1])
    angle = uniform([], seeds[2], -1.0, 1.0) * params.rotation_degrees * math.pi / 180.0
    zoom = 1.0 + uniform([], seeds[3], -1.0, 1.0) * params.scale
    shift = uniform([2], seeds[4], -1.0, 1.0) * params.shift
    image = affine_transform(image, angle, zoom, shift)
    # Gamma on the 0-1 scale keeps black black and white white.
    gamma = 1.0 + uniform([], seeds[5], -1.0, 1.0) * params.gamma
    image = 255.0 * tf.pow(tf.clip_by_value(image / 255.0, 0.0, 1.0), gamma)
    if params.contrast > 0:
        image = tf.image.stateless_random_contrast(image, 1 - params.contrast, 1 + params.contrast, seeds[6])
    if params.brightness > 0:
        image = tf.image.stateless_random_brightness(image, params.brightness, seeds[7])
    image = tf.clip_by_value(image, 0.0, 255.0)
    image = tf.cond(
        uniform([], seeds[8]) < params.noise_fraction,
        # One noise value per pixel, the same in every channel: a gray slice stays gray.
        lambda: (
            image
            + tf.random.stateless_normal(tf.shape(image)[:2], seeds[9], stddev=params.noise_std)[..., None]
        ),
        lambda: image,
    )
    return tf.clip_by_value(image, 0.0, 255.0)


def affine_transform(image, angle, zoom, shift):
    """Rotate one image (H, W, C) by `angle` radians about its centre, zoom it by `zoom`
    (> 1 enlarges) and move it by `shift` = (down, right) in fractions of its height and
    width, in one bilinear resampling; black where the output samples outside the image."""
    import tensorflow as tf

    height, width = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
    center_x, center_y = (width - 1) / 2, (height - 1) / 2
    # The transform maps an output pixel (x, y) to the input pixel it samples: the inverse
    # of "rotate and zoom about the centre, then shift".
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    x0 = center_x + shift[1] * width
    y0 = center_y + shift[0] * height
    transform = tf.stack(
        [
            cos,
            -sin,
            center_x - cos * x0 + sin * y0,
            sin,
            cos,
            center_y - sin * x0 - cos * y0,
            0.0,
            0.0,
        ]
    )
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=transform[None],
        output_shape=tf.shape(image)[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )[0]


# ---------------------------------------------------------------------------- input pipeline
class HDF5Images:
    """Reads images of one size from the HDF5 file by record index (the order of
    common.read_hdf5_index: all GBM rows, then all PCNSL rows). The file is opened once,
    lazily, and shared by tf.data's threads (h5py serialises access itself)."""

    def __init__(self, path: Path, size: tuple[int, int]):
        self.path = str(path)
        self.key = common.size_key(size)
        self.size = size
        self._lock = threading.Lock()
        self._datasets = None
        self._offsets = None

    def _open(self):
        import h5py

        with self._lock:
            if self._datasets is None:
                h5file = h5py.File(self.path, "r")
                datasets = [h5file[folder][self.key]["features"] for folder in CLASS_FOLDERS]
                self._offsets = np.cumsum([0] + [d.shape[0] for d in datasets])
                self._datasets = datasets
        return self._datasets

    def read(self, index) -> np.ndarray:
        """uint8 (H, W, 3): the image of one record."""
        datasets = self._open()
        which = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return datasets[which][int(index) - int(self._offsets[which])]


def make_dataset(
    reader: HDF5Images,
    indices: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    augmentation: str = "none",
    seed: int = 0,
    epochs: tuple[int, int] | None = None,
    strong: StrongAugmentation | None = None,
):
    """A tf.data pipeline of (float32 images 0-255, float32 labels (B, 1)) batches.

    With `epochs=(first, end)` it is the training stream of epochs first..end-1: each epoch
    is a permutation of `indices` seeded by (seed, epoch), read from the HDF5 file and
    augmented in parallel, image i of the epoch with the seed (seed, epoch, i), and batched
    (the last batch of an epoch may be smaller). Epoch e is the same whether or not the run
    was resumed. Without `epochs`: one ordered pass, unaugmented (validation, prediction).
    `strong`: the parameters of augmentation "strong".
    """
    import tensorflow as tf

    label_table = tf.constant(labels, tf.float32)
    height, width = reader.size

    def load(index):
        image = tf.numpy_function(reader.read, [index], tf.uint8, stateful=False)
        image = tf.cast(tf.ensure_shape(image, [height, width, 3]), tf.float32)
        return image, tf.gather(label_table, index)[None]

    index_tensor = tf.constant(indices, tf.int64)
    if epochs is None:
        dataset = tf.data.Dataset.from_tensor_slices(index_tensor)
        dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
    else:

        def one_epoch(epoch):
            fold_in = tf.random.experimental.stateless_fold_in
            order = tf.random.experimental.stateless_shuffle(
                index_tensor, fold_in(tf.constant([seed, 1], tf.int64), epoch)
            )
            epoch_seed = fold_in(tf.constant([seed, 2], tf.int64), epoch)

            def load_and_augment(position, index):
                image, label = load(index)
                return augment_image(image, fold_in(epoch_seed, position), augmentation, strong), label

            images = tf.data.Dataset.from_tensor_slices(order).enumerate()
            return images.map(load_and_augment, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)

        dataset = tf.data.Dataset.range(*epochs).flat_map(one_epoch)
    options = tf.data.Options()
    options.deterministic = True  # parallel reads, results in order
    # Each worker reads the whole index stream and keeps its share (no files to shard).
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------- helpers
def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")


def read_history(path: Path) -> tuple[list[str], list[dict]]:
    """history.csv -> (header, rows); ([], []) if absent or empty."""
    if not path.is_file() or path.stat().st_size == 0:
        return [], []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = [row for row in reader if row.get("epoch", "").strip().isdigit()]
        return list(reader.fieldnames or []), rows


def truncate_history(path: Path, finished_epochs: int) -> None:
    """Keep the rows of the first `finished_epochs` epochs, once each: a process killed
    between CSVLogger's row and the backup leaves a row that the resumed run writes again."""
    header, rows = read_history(path)
    if not header:
        return
    kept = {}
    for row in rows:
        if int(row["epoch"]) < finished_epochs:
            kept[int(row["epoch"])] = row  # a repeated epoch keeps its last row
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(kept[epoch] for epoch in sorted(kept))
    os.replace(temporary, path)


def backup_epoch(backup_dir: Path) -> int:
    """Epochs finished according to a usable Keras BackupAndRestore backup (0 if none).

    A process killed while the backup was being written leaves a broken newest generation:
    fall back to the previous one (BackupAndRestore(double_checkpoint=True) keeps it), or,
    with none, start over from the first epoch.
    """
    weights, metadata = backup_dir / "latest.weights.h5", backup_dir / "training_metadata.json"
    previous_weights, previous_metadata = (Path(f"{p}.bkp") for p in (weights, metadata))
    for candidate_weights, candidate_metadata in ((weights, metadata), (previous_weights, previous_metadata)):
        epoch = _backup_metadata_epoch(candidate_metadata)
        if epoch is not None and _readable_hdf5(candidate_weights):
            if candidate_weights != weights:
                log.warning(
                    "warning: the newest backup in %s is incomplete; using the one before it", backup_dir
                )
                shutil.copyfile(candidate_weights, weights)
                shutil.copyfile(candidate_metadata, metadata)
            return epoch
    if backup_dir.exists():
        log.warning(
            "warning: no complete backup in %s; training starts again from the first epoch", backup_dir
        )
        shutil.rmtree(backup_dir)
    return 0


def _backup_metadata_epoch(path: Path) -> int | None:
    try:
        return int(json.loads(path.read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _readable_hdf5(path: Path) -> bool:
    """True if every dataset of the HDF5 file reads back (a truncated write does not)."""
    import h5py

    try:
        with h5py.File(path, "r") as h5file:
            h5file.visititems(lambda name, item: item[()] if isinstance(item, h5py.Dataset) else None)
        return True
    except Exception:  # h5py raises OSError, KeyError, RuntimeError... for damaged files
        return False


def library_versions() -> dict:
    import h5py
    import keras
    import tensorflow as tf

    return {
        "python": sys.version.split()[0],
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "gbmpcnsl": common.__version__,
    }


def make_strategy(name: str):
    """(tf.distribute strategy, its name, whether this process is the chief) for --distribute.
    Call it before any other TensorFlow work: MultiWorkerMirroredStrategy must come first.
    multiworker reads the cluster from TF_CONFIG or, without it, from Slurm's variables."""
    import tensorflow as tf

    if name == "multiworker":
        resolver = None
        if "TF_CONFIG" in os.environ:
            try:
                config = json.loads(os.environ["TF_CONFIG"])
                config["task"]["type"], int(config["task"]["index"]), config["cluster"]  # all present?
            except KeyError as error:
                raise UserError(
                    f"--distribute multiworker: TF_CONFIG lacks {error} (set it on every worker)"
                ) from error
            except (ValueError, TypeError) as error:
                raise UserError(
                    f"--distribute multiworker: TF_CONFIG is not a valid cluster spec ({error})"
                ) from error
        elif slurm_task() is not None:
            resolver = slurm_cluster_resolver()
        else:
            raise UserError(
                "--distribute multiworker: set TF_CONFIG (cluster and task) on every worker, or start "
                "the workers with Slurm's srun"
            )
        # RING: gRPC collectives between the workers' CPUs; NCCL between GPUs (AUTO picks it).
        gpus = tf.config.list_physical_devices("GPU")
        implementation = tf.distribute.experimental.CommunicationImplementation
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=implementation.AUTO if gpus else implementation.RING
        )
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=resolver, communication_options=options
        )
        task_type, task_index = strategy.cluster_resolver.task_type, strategy.cluster_resolver.task_id
        cluster = strategy.cluster_resolver.cluster_spec().as_dict()
        is_chief = task_type == "chief" or (
            "chief" not in cluster and task_type == "worker" and task_index == 0
        )
        return strategy, "MultiWorkerMirroredStrategy", is_chief
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "none"
    if name == "mirrored":
        devices = gpus or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy(devices=[d.name for d in devices]), "MirroredStrategy", True
    return tf.distribute.get_strategy(), "default strategy", True


# ---------------------------------------------------------------------------- several machines
# Keras 3's fit cannot train under MultiWorkerMirroredStrategy with the TensorFlow backend
# (keras-team/keras#20585: "Attempt to convert a value (PerReplica...)"), so a multi-worker
# run trains with the custom step below and drives the same Keras callbacks by hand.
SLURM_PORT_BASE = 20000  # the workers listen on SLURM_PORT_BASE + (job id % 20000) + task on node


def slurm_task() -> int | None:
    """This process's Slurm task number (SLURM_PROCID) inside an srun job step, else None."""
    if "SLURM_PROCID" in os.environ and "SLURM_STEP_NODELIST" in os.environ:
        return int(os.environ["SLURM_PROCID"])
    return None


def is_other_worker() -> bool:
    """True in a worker process of a multi-worker cluster (TF_CONFIG or Slurm) that is not
    its chief; known without importing TensorFlow."""
    try:
        config = json.loads(os.environ["TF_CONFIG"])
        kind, index = config["task"]["type"], int(config["task"]["index"])
        return not (kind == "chief" or (kind == "worker" and index == 0 and "chief" not in config["cluster"]))
    except (KeyError, ValueError, TypeError):
        return (slurm_task() or 0) > 0


def slurm_cluster_resolver():
    """tf.distribute's SlurmClusterResolver for the current srun step: one worker per Slurm
    task, on port SLURM_PORT_BASE + job id % 20000 (+ the task's rank on its node), so that
    two jobs sharing a node pick different ports. A task's GPUs are those Slurm gave it."""
    import tensorflow as tf

    resolver = tf.distribute.cluster_resolver.SlurmClusterResolver
    port_base = SLURM_PORT_BASE + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000
    gpus = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if gpus:
        return resolver(port_base=port_base, gpus_per_node=len(gpus))
    # CPU nodes: no GPU to hand out (the resolver would otherwise run nvidia-smi).
    tasks_per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE", "1")
    most = max(int(part.split("(")[0]) for part in tasks_per_node.split(","))
    return resolver(port_base=port_base, gpus_per_node=most, gpus_per_task=1, auto_set_gpu=False)


def shard_layout(count: int, replicas: int, batch_size: int) -> np.ndarray:
    """How one epoch of `count` slices is cut across `replicas` replicas: an int array
    (steps, replicas + 1) of positions in the epoch's order, replica r taking positions
    [bounds[s, r], bounds[s, r + 1]) at step s. The steps' global batches hold at most
    replicas * batch_size slices and differ in size by at most one; every replica gets at
    least one slice per step (a replica with an empty batch would break BatchNormalization),
    so each step has the same number of slices, +-1, on every replica. Every position is
    taken exactly once. Raises UserError if there are fewer slices than replicas."""
    if count < replicas:
        raise UserError(f"{count} slice(s) cannot be shared by {replicas} replicas (at least one each)")
    steps = max(1, min(math.ceil(count / (replicas * batch_size)), count // replicas))
    starts = np.arange(steps + 1) * count // steps  # the global batches
    sizes = np.diff(starts)
    return starts[:-1, None] + np.arange(replicas + 1)[None, :] * sizes[:, None] // replicas


def make_shard_dataset(
    reader: HDF5Images,
    indices: np.ndarray,
    labels: np.ndarray,
    layout: np.ndarray,
    replicas: range,
    augmentation: str = "none",
    seed: int = 0,
    epochs: tuple[int, int] | None = None,
    strong: StrongAugmentation | None = None,
):
    """One worker's share of make_dataset's stream, for distribute_datasets_from_function:
    batches (images, labels (B, 1), record indices (B,), global batch size) for its
    `replicas` at every step of `layout` (shard_layout), step by step. Each epoch is the
    very permutation, with the very augmentation draws, that make_dataset gives: every
    worker computes it and keeps its own positions, so the workers' shares are disjoint and
    together cover the epoch once. Without `epochs`: one ordered, unaugmented pass."""
    import tensorflow as tf

    label_table = tf.constant(labels, tf.float32)
    height, width = reader.size
    index_tensor = tf.constant(indices, tf.int64)
    pieces = [
        (layout[s, r], layout[s, r + 1], layout[s, -1] - layout[s, 0])
        for s in range(len(layout))
        for r in replicas
    ]
    starts, stops, global_sizes = (
        tf.constant(np.array(column, np.int64)) for column in zip(*pieces, strict=True)
    )

    def epoch_stream(epoch, order, epoch_seed):
        def load(position, index):
            image = tf.numpy_function(reader.read, [index], tf.uint8, stateful=False)
            image = tf.cast(tf.ensure_shape(image, [height, width, 3]), tf.float32)
            if epoch_seed is not None:
                image = augment_image(
                    image,
                    tf.random.experimental.stateless_fold_in(epoch_seed, position),
                    augmentation,
                    strong,
                )
            return image, tf.gather(label_table, index)[None], index

        def piece(start, stop, global_size):
            positions = tf.range(start, stop)
            images = tf.data.Dataset.from_tensor_slices((positions, tf.gather(order, positions)))
            images = images.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(stop - start)
            return images.map(
                lambda image, label, index: (image, label, index, tf.cast(global_size, tf.float32))
            )

        # Each piece is one batch: interleaving them in parallel keeps their order.
        return tf.data.Dataset.from_tensor_slices((starts, stops, global_sizes)).interleave(
            piece, cycle_length=4, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )

    if epochs is None:
        dataset = epoch_stream(0, index_tensor, None)
    else:
        fold_in = tf.random.experimental.stateless_fold_in

        def one_epoch(epoch):  # as in make_dataset
            order = tf.random.experimental.stateless_shuffle(
                index_tensor, fold_in(tf.constant([seed, 1], tf.int64), epoch)
            )
            return epoch_stream(epoch, order, fold_in(tf.constant([seed, 2], tf.int64), epoch))

        dataset = tf.data.Dataset.range(*epochs).flat_map(one_epoch)
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.OFF
    )  # sharded here
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def agree_on_first_epoch(strategy, first_epoch: int, is_chief: bool) -> int:
    """The chief's first epoch, on every worker. A collective: it also waits until every
    worker (the chief above all, which repairs the backup) is past the run folder's set-up."""
    import tensorflow as tf

    share = float(first_epoch) / len(strategy.extended.worker_devices) if is_chief else 0.0
    per_replica = strategy.run(tf.function(lambda: tf.constant(share)))
    return int(round(float(strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))))


# ---------------------------------------------------------------------------- callbacks
def progress_callback(epochs: int, steps_per_epoch: int):
    """One log line per epoch on stderr (metrics and seconds), a tqdm bar while it runs
    (on a terminal only)."""
    import keras
    from tqdm import tqdm

    class EpochProgress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()
            self.bar = tqdm(
                total=steps_per_epoch,
                desc=f"epoch {epoch + 1}/{epochs}",
                unit="batch",
                leave=False,
                file=sys.stderr,
                disable=None,
            )

        def on_train_batch_end(self, batch, logs=None):
            self.bar.update(1)

        def on_epoch_end(self, epoch, logs=None):
            self.bar.close()
            seconds = time.perf_counter() - self.start
            logs = dict(logs or {})
            first = [
                k for k in ("loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc") if k in logs
            ]
            metrics = " ".join(f"{k} {float(logs[k]):.4g}" for k in first + sorted(set(logs) - set(first)))
            log.info("epoch %d/%d: %s (%.1f s)", epoch + 1, epochs, metrics, seconds)

    return EpochProgress()


# ---------------------------------------------------------------------------- phases of train()
# train() is made of named phases so that a cross-validation fold, a resumed run and a
# multi-worker run take the same path: check the run folder -> read the cohort -> split ->
# start TensorFlow -> build the model -> open the run folder -> fit -> finish.


@dataclass
class RunFolder:
    """A run folder and what a previous (interrupted) run left in it."""

    path: Path
    previous: dict | None = None  # run.json of the run being resumed

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def history_csv(self) -> Path:
        return self.path / "history.csv"

    @property
    def backup_dir(self) -> Path:
        return self.path / "backup"

    @property
    def split_csv(self) -> Path:
        return self.path / "split.csv"


@dataclass
class Cohort:
    """The HDF5 file's index at one image size: one record per slice."""

    hdf5: Path
    size: tuple[int, int]
    records: list[dict]
    has_groups: bool

    @property
    def labels(self) -> np.ndarray:
        return np.array([r["label"] for r in self.records], dtype=np.float32)


def check_run_folder(args: argparse.Namespace, run_dir: Path) -> RunFolder:
    """Phase 1: is `run_dir` free (or resumable, or replaceable with --overwrite)? Checks
    only; nothing is created or deleted until the data and the model are known to be good."""
    run = RunFolder(run_dir)
    if args.resume:
        if not run.run_json.is_file():
            raise UserError(f"{run_dir}: no run.json, nothing to resume")
        previous = json.loads(run.run_json.read_text())
        if previous.get("status") == "finished":
            raise UserError(f"{run_dir}: this run finished at {previous.get('end_time')}; nothing to resume")
        changed = [
            name
            for name in RESUME_MUST_MATCH
            if _jsonable(getattr(args, name)) != previous["arguments"].get(name, RESUME_DEFAULTS.get(name))
        ]
        if changed:
            listed = ", ".join(
                f"--{n.replace('_', '-')} {previous['arguments'].get(n)} (now {_jsonable(getattr(args, n))})"
                for n in changed
            )
            raise UserError(f"{run_dir}: --resume needs the run's own settings: {listed}")
        run.previous = previous
    elif args.distribute == "multiworker" and is_other_worker():
        pass  # a worker that is not the chief: the chief checks (and writes) the run folder
    elif run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        if not args.overwrite:
            raise UserError(f"{run_dir}: exists; pick a new run folder, --resume it or --overwrite it")
        if not run.run_json.is_file():
            raise UserError(f"{run_dir}: --overwrite only replaces a run folder (one with run.json)")
    return run


def read_cohort(args: argparse.Namespace) -> Cohort:
    """Phase 2: the HDF5 index (paths, patients, labels) at the image size to train on."""
    import h5py

    if not args.hdf5.is_file():
        raise UserError(f"{args.hdf5}: no such file")
    try:
        with h5py.File(args.hdf5, "r") as h5file:
            size = common.choose_hdf5_size(h5file, args.size, args.hdf5)
            records, has_groups = common.read_hdf5_index(h5file, size)
            for folder in CLASS_FOLDERS:
                group = h5file[folder][common.size_key(size)]
                if "labels" in group and np.any(group["labels"][:] != CLASS_LABELS[folder]):
                    raise UserError(f"{args.hdf5}: {group.name}/labels are not all {CLASS_LABELS[folder]}")
    except OSError as error:
        raise UserError(f"{args.hdf5}: cannot read HDF5 file ({error})") from error
    if not has_groups:
        log.warning(
            "warning: %s has no patient groups (original layout): each slice is its own group, so "
            "slices of one patient can land in both training and validation",
            args.hdf5,
        )
    elif warning := common.single_slice_groups_warning([r["group"] for r in records]):
        log.warning(warning)
    return Cohort(args.hdf5, size, records, has_groups)


def check_resume(args: argparse.Namespace, run: RunFolder, cohort: Cohort, is_val: np.ndarray) -> None:
    """A resumed run must see the image size and the split it started with."""
    if run.previous is None:
        return
    if list(cohort.size) != run.previous["input_shape"][:2]:
        raise UserError(
            f"{run.path}: --resume needs the run's own image size {run.previous['input_shape'][0]} "
            f"{run.previous['input_shape'][1]} (now {cohort.size[0]} {cohort.size[1]})"
        )
    if run.split_csv.is_file():
        expected = [
            (r["path"], r["group"], r["label"], "val" if v else "train")
            for r, v in zip(cohort.records, is_val, strict=True)
        ]
        if read_split_csv(run.split_csv) != expected:
            raise UserError(f"{run.split_csv}: differs from the split of {args.hdf5} with --seed {args.seed}")


def log_split(cohort: Cohort, is_val: np.ndarray) -> None:
    labels = cohort.labels
    for name, subset in (("training", np.flatnonzero(~is_val)), ("validation", np.flatnonzero(is_val))):
        per_class = [int(np.sum(labels[subset] == label)) for label in (0, 1)]
        groups = len({cohort.records[i]["group"] for i in subset})
        log.info("%s: %d slices (%d GBM, %d PCNSL) from %d groups", name, len(subset), *per_class, groups)


@dataclass
class Distribution:
    """The tf.distribute strategy of this process and its place in the cluster."""

    strategy: object
    name: str
    is_chief: bool

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync


def start_tensorflow(args: argparse.Namespace) -> Distribution:
    """Phase 4: import TensorFlow, create the strategy (first: MultiWorkerMirroredStrategy
    must come before any other TensorFlow work), seed, determinism."""
    tf = common.import_tensorflow(args.verbose)
    import keras

    strategy, strategy_name, is_chief = make_strategy(args.distribute)
    keras.utils.set_random_seed(args.seed)
    if args.deterministic:
        tf.config.experimental.enable_op_determinism()
    distribution = Distribution(strategy, strategy_name, is_chief)
    log.info(
        "batch size %d per replica x %d replica(s) = global batch %d (%s)",
        args.batch_size,
        distribution.replicas,
        args.batch_size * distribution.replicas,
        strategy_name,
    )
    return distribution


def build_compiled_model(args: argparse.Namespace, size: tuple[int, int], distribution: Distribution):
    """Phase 5: the model, compiled with the paper's optimizer, loss and metrics (fails here
    at once if the ImageNet weights are missing)."""
    import keras

    weights = None if args.weights.lower() == "none" else args.weights
    policy = keras.mixed_precision.global_policy()
    try:  # the layers keep the policy they were built with; the process default is restored
        if args.mixed_precision:
            keras.mixed_precision.set_global_policy("mixed_float16")
        with distribution.strategy.scope():
            model = common.build_model(args.backbone, (*size, 3), weights, args.normalization, args.head_init)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    if getattr(args, "batchnorm_momentum", None) is not None:
        set_batchnorm_momentum(model, args.batchnorm_momentum)
    with distribution.strategy.scope():
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=args.learning_rate),
            loss=keras.losses.BinaryCrossentropy(),
            metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
            jit_compile=bool(args.xla),
        )
    return model


def set_batchnorm_momentum(model, momentum: float) -> int:
    """Set the momentum of every BatchNormalization layer's moving mean and variance (the
    checkpoint keeps it); returns how many layers were changed. Before the first fit only."""
    import keras

    layers = [
        layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)
    ]
    for layer in layers:
        layer.momentum = momentum
    return len(layers)


def open_run_folder(
    args: argparse.Namespace, run: RunFolder, cohort: Cohort, is_val: np.ndarray, distribution: Distribution
) -> tuple[RunFolder, dict, int]:
    """Phase 6: create (or replace, or reopen) the run folder; write split.csv and run.json;
    cut history.csv back to the backed-up epochs. Returns the folder this process writes to
    (other workers of a multi-worker run keep their files apart), run.json's content and
    the first epoch to train."""
    hdf5_sha256 = file_sha256(cohort.hdf5)
    if run.previous is not None and hdf5_sha256 != run.previous["hdf5_sha256"]:
        raise UserError(f"{cohort.hdf5}: its content changed since the run started (SHA-256 differs)")
    if run.previous is None and args.overwrite and run.run_json.is_file() and distribution.is_chief:
        shutil.rmtree(run.path)
    if not distribution.is_chief:  # the chief writes the run folder, the other workers nothing
        return run, {}, 0
    run.path.mkdir(parents=True, exist_ok=True)
    first_epoch = backup_epoch(run.backup_dir) if run.previous is not None else 0
    if run.previous is not None:
        truncate_history(run.history_csv, first_epoch)
        log.info("resuming %s after epoch %d of %d", run.path, first_epoch, args.epochs)
    if not run.split_csv.is_file():
        write_split_csv(run.split_csv, cohort.records, is_val)
    train_indices, val_indices = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    info = run.previous or {
        "arguments": {name: _jsonable(value) for name, value in vars(args).items()},
        "backbone": args.backbone,
        "input_shape": [*cohort.size, 3],
        "hdf5": str(cohort.hdf5.resolve()),
        "hdf5_size_key": common.size_key(cohort.size),
        "hdf5_sha256": hdf5_sha256,
        "hdf5_has_groups": cohort.has_groups,
        "class_labels": dict(CLASS_LABELS),
        "split_seed": args.seed,
        "split": {
            "train_slices": len(train_indices),
            "val_slices": len(val_indices),
            "train_groups": len({cohort.records[i]["group"] for i in train_indices}),
            "val_groups": len({cohort.records[i]["group"] for i in val_indices}),
        },
        "versions": library_versions(),
        "start_time": now(),
    }
    if run.previous is not None:
        arguments = {name: _jsonable(value) for name, value in vars(args).items()}
        info.setdefault("resumed", []).append(
            {"time": now(), "after_epoch": first_epoch, "arguments": arguments}
        )
        info["arguments"]["epochs"] = args.epochs
    info.update(
        status="running",
        strategy=distribution.name,
        replicas=distribution.replicas,
        global_batch_size=args.batch_size * distribution.replicas,
    )
    write_json(run.run_json, info)
    return run, info, first_epoch


def training_callbacks(
    args: argparse.Namespace, run: RunFolder, steps_per_epoch: int, folder: Path | None = None
) -> tuple[list, object]:
    """The callbacks of both training loops (fit and fit_across_workers), in this order:
    learning-rate schedule, best-only checkpoints on --monitor, history.csv, the backup for
    --resume, progress, TensorBoard, early stopping. Returns (callbacks, EarlyStopping or
    None). `folder` holds the checkpoints and the backup (default: the run folder); the
    other workers of a multi-worker run save into a scratch folder and write no history."""
    import keras

    writes_run = folder is None
    folder = run.path if folder is None else folder
    monitor = getattr(args, "monitor", "val_loss")
    mode = MONITORS[monitor]
    done = [float(r[monitor]) for r in read_history(run.history_csv)[1] if r.get(monitor)]
    initial = args.learning_rate
    callbacks = [
        keras.callbacks.LearningRateScheduler(lambda epoch, lr: learning_rate_at(epoch, initial)),
        keras.callbacks.ModelCheckpoint(
            str(folder / ("ckpt_{epoch:03d}_{" + monitor + ":.4f}.keras")),
            monitor=monitor,
            mode=mode,
            save_best_only=True,
            # A resumed run only saves improvements.
            initial_value_threshold=(min if mode == "min" else max)(done) if done else None,
        ),
    ]
    if writes_run:
        # CSVLogger before BackupAndRestore: a crash between the two repeats a row (cut on
        # resume), never loses one.
        callbacks.append(keras.callbacks.CSVLogger(str(run.history_csv), append=True))
    # Two generations of backup: a kill while the weights are written keeps the older one.
    callbacks.append(keras.callbacks.BackupAndRestore(str(folder / "backup"), double_checkpoint=True))
    callbacks.append(progress_callback(args.epochs, steps_per_epoch))
    if getattr(args, "tensorboard", False) and writes_run:
        # After LearningRateScheduler, which puts the epoch's learning rate into the logs.
        callbacks.append(
            keras.callbacks.TensorBoard(str(run.path / "tensorboard"), write_graph=False, profile_batch=0)
        )
    early_stopping = None
    if args.early_stopping:
        early_stopping = keras.callbacks.EarlyStopping(
            monitor=monitor, mode=mode, patience=args.early_stopping
        )
        callbacks.append(early_stopping)
    return callbacks, early_stopping


def fit(
    args: argparse.Namespace,
    model,
    run: RunFolder,
    cohort: Cohort,
    is_val: np.ndarray,
    distribution: Distribution,
    first_epoch: int,
    callbacks: list | None = None,
):
    """Phase 7: train epochs first_epoch..args.epochs-1 with Keras's fit; returns the
    EarlyStopping callback (or None)."""

    global_batch = args.batch_size * distribution.replicas
    train_indices, val_indices = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    reader = HDF5Images(cohort.hdf5, cohort.size)
    steps_per_epoch = math.ceil(len(train_indices) / global_batch)
    train_data = make_dataset(
        reader,
        train_indices,
        cohort.labels,
        global_batch,
        args.augmentation,
        args.seed,
        (first_epoch, args.epochs),
        StrongAugmentation.from_args(args),
    )
    val_data = make_dataset(reader, val_indices, cohort.labels, global_batch)
    fit_callbacks, early_stopping = training_callbacks(args, run, steps_per_epoch)
    fit_callbacks += callbacks or []
    if first_epoch >= args.epochs:
        log.info("all %d epochs were already done", args.epochs)
    else:
        model.fit(
            train_data,
            epochs=args.epochs,
            initial_epoch=first_epoch,
            steps_per_epoch=steps_per_epoch,
            validation_data=val_data,
            callbacks=fit_callbacks,
            shuffle=False,  # the dataset shuffles itself, per epoch and seed
            verbose=0,
        )
    if run.backup_dir.exists():  # e.g. nothing left to train: BackupAndRestore did not clean up
        shutil.rmtree(run.backup_dir)
    return early_stopping


def fit_across_workers(
    args: argparse.Namespace,
    model,
    run: RunFolder,
    cohort: Cohort,
    is_val: np.ndarray,
    distribution: Distribution,
    first_epoch: int,
    callbacks: list | None = None,
):
    """Phase 7 under MultiWorkerMirroredStrategy, where Keras 3's fit fails: a custom step
    (strategy.run; gradients summed across all replicas by the optimizer) over each
    worker's share of the training stream (make_shard_dataset), with the loss and the
    metrics computed from every replica's predictions (strategy.gather), so that all
    workers log the same numbers. It drives the callbacks of fit(): the chief writes
    history.csv, the best-only checkpoints and the backup; the other workers save alike
    (saving takes every worker) into a scratch folder they delete, and restore the chief's
    backup on --resume. Returns the EarlyStopping callback (or None)."""
    import keras
    import tensorflow as tf

    strategy = distribution.strategy
    replicas = distribution.replicas
    train_indices, val_indices = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    reader = HDF5Images(cohort.hdf5, cohort.size)
    train_layout = shard_layout(len(train_indices), replicas, args.batch_size)
    val_layout = shard_layout(len(val_indices), replicas, args.batch_size)
    first_epoch = agree_on_first_epoch(strategy, first_epoch, distribution.is_chief)

    def shard(indices, layout, epochs):
        def dataset_fn(context: tf.distribute.InputContext):
            local = context.num_replicas_in_sync // context.num_input_pipelines
            mine = range(context.input_pipeline_id * local, (context.input_pipeline_id + 1) * local)
            return make_shard_dataset(
                reader,
                indices,
                cohort.labels,
                layout,
                mine,
                args.augmentation,
                args.seed,
                epochs,
                StrongAugmentation.from_args(args),
            )

        return strategy.distribute_datasets_from_function(dataset_fn)

    train_data = shard(train_indices, train_layout, (first_epoch, max(args.epochs, first_epoch + 1)))
    val_data = shard(val_indices, val_layout, None)

    # The metrics of build_compiled_model, as plain (per-process) Keras metrics fed with
    # every replica's predictions.
    metrics = {
        "loss": keras.metrics.Mean(name="loss"),
        "accuracy": keras.metrics.BinaryAccuracy(name="accuracy"),
        "auc": keras.metrics.AUC(name="auc"),
    }
    val_metrics = {
        f"val_{name}": metric.__class__.from_config(metric.get_config()) for name, metric in metrics.items()
    }
    optimizer = model.optimizer

    def replica_step(images, labels, global_size, training):
        size = tf.cast(tf.shape(labels)[0], tf.float32)
        with tf.GradientTape() as tape:
            probabilities = model(images, training=training)
            # Keras divides each replica's loss by the number of replicas: undo it.
            loss = model.compute_loss(x=images, y=labels, y_pred=probabilities, training=training) * replicas
            # Weighted by the replica's share of the global batch: summed over the
            # replicas, the gradient is that of the global batch's mean loss.
            scaled = optimizer.scale_loss(loss * size / global_size)
        if training:
            gradients = tape.gradient(scaled, model.trainable_weights)
            optimizer.apply_gradients(zip(gradients, model.trainable_weights, strict=True))
        return probabilities, loss[None], size[None]

    def update(tracked, labels, outputs):
        probabilities, losses, sizes = (strategy.gather(value, axis=0) for value in outputs)
        labels = strategy.gather(labels, axis=0)
        names = list(tracked)
        tracked[names[0]].update_state(losses, sample_weight=sizes)
        for name in names[1:]:
            tracked[name].update_state(labels, probabilities)

    # Keras 3 keeps a BatchNormalization moving mean and variance per replica (each from its
    # own batches), so replicas drift apart; average them after each epoch's training, as
    # tf.keras did (ON_READ, MEAN), so that validation, checkpoints and every worker agree.
    moving_statistics = [v for v in model.non_trainable_variables if "float" in str(v.dtype)]

    @tf.function
    def average_moving_statistics():
        def replica_fn():
            context = tf.distribute.get_replica_context()
            local = [tf.identity(v.value) for v in moving_statistics]
            means = context.all_reduce(tf.distribute.ReduceOp.MEAN, local)
            for variable, mean in zip(moving_statistics, means, strict=True):
                variable.assign(mean)

        strategy.run(replica_fn)

    # The steps take the iterator, not its batches: traced once for any batch size.
    @tf.function
    def train_step(iterator):
        images, labels, indices, global_size = next(iterator)
        update(metrics, labels, strategy.run(replica_step, args=(images, labels, global_size, True)))
        return indices

    @tf.function
    def val_step(iterator):
        images, labels, _, global_size = next(iterator)
        update(val_metrics, labels, strategy.run(replica_step, args=(images, labels, global_size, False)))

    # Saving reads variables with collectives, so every worker saves alike: the chief into
    # the run folder, the others into a scratch folder of their own, deleted at the end.
    folder = run.path if distribution.is_chief else Path(tempfile.mkdtemp(prefix="gbmpcnsl-worker-"))
    backup_dir = folder / "backup"
    if not distribution.is_chief and (run.backup_dir / "latest.weights.h5").is_file():
        backup_dir.mkdir()  # all workers restore the chief's backup (a filesystem they share)
        for name in ("latest.weights.h5", "training_metadata.json"):
            shutil.copyfile(run.backup_dir / name, backup_dir / name)
    callback_list, early_stopping = training_callbacks(
        args, run, len(train_layout), None if distribution.is_chief else folder
    )
    callback_list = keras.callbacks.CallbackList(callback_list + (callbacks or []), model=model)
    callback_list.set_params({"epochs": args.epochs, "steps": len(train_layout), "verbose": 0})

    seen = {}  # test-only record (GBMPCNSL_WORKER_DUMP): the records this worker trained on
    try:
        with strategy.scope():
            optimizer.build(model.trainable_variables)
            model.stop_training = False
            if first_epoch >= args.epochs:
                log.info("all %d epochs were already done", args.epochs)
            else:
                callback_list.on_train_begin()
                train_iterator = iter(train_data)
                for epoch in range(first_epoch, args.epochs):
                    for metric in [*metrics.values(), *val_metrics.values()]:
                        metric.reset_state()
                    callback_list.on_epoch_begin(epoch)
                    for step in range(len(train_layout)):
                        callback_list.on_train_batch_begin(step)
                        indices = train_step(train_iterator)
                        seen.setdefault(epoch, []).extend(
                            int(i) for local in strategy.experimental_local_results(indices) for i in local
                        )
                        callback_list.on_train_batch_end(step)
                    if moving_statistics:
                        average_moving_statistics()
                    val_iterator = iter(val_data)
                    for _ in range(len(val_layout)):
                        val_step(val_iterator)
                    logs = {name: float(m.result()) for name, m in [*metrics.items(), *val_metrics.items()]}
                    callback_list.on_epoch_end(epoch, logs)
                    if model.stop_training:
                        break
                callback_list.on_train_end()
        dump_worker_state(model, seen, strategy)
        if backup_dir.exists():  # e.g. nothing left to train: BackupAndRestore did not clean up
            shutil.rmtree(backup_dir)
    finally:
        if not distribution.is_chief:
            shutil.rmtree(folder, ignore_errors=True)
    return early_stopping


def dump_worker_state(model, seen: dict, strategy) -> None:
    """Test-only: with GBMPCNSL_WORKER_DUMP=DIR, each worker writes its final weights
    (DIR/<task>_weights.npz) and the records it trained on per epoch (DIR/<task>_seen.json),
    so that a test can compare the workers. Nothing happens without the variable."""
    folder = os.environ.get("GBMPCNSL_WORKER_DUMP")
    if not folder:
        return
    resolver = strategy.cluster_resolver
    task = f"{resolver.task_type}_{resolver.task_id}"
    np.savez(Path(folder) / f"{task}_weights.npz", *model.get_weights())
    write_json(Path(folder) / f"{task}_seen.json", {str(epoch): indices for epoch, indices in seen.items()})


def finish_run(run: RunFolder, info: dict, early_stopping) -> dict:
    """Phase 8: record the outcome (epochs done, best epoch and checkpoint) in run.json."""
    _, rows = read_history(run.history_csv)
    info["end_time"] = now()
    info["status"] = "finished"
    info["epochs_done"] = len(rows)
    info["stopped_early"] = bool(early_stopping is not None and early_stopping.stopped_epoch > 0)
    monitor = info["arguments"].get("monitor", "val_loss")
    info["monitor"] = monitor
    if rows:
        # The first best epoch: the one ModelCheckpoint kept (it saves strict improvements).
        pick = min if MONITORS[monitor] == "min" else max
        best = pick(rows, key=lambda row: float(row[monitor]))
        info["best_epoch"] = int(best["epoch"]) + 1  # as in the checkpoint names
        info["best_val_loss"] = float(best["val_loss"])
        info["best_val_auc"] = max(float(row["val_auc"]) for row in rows)
        checkpoints = sorted(run.path.glob(f"ckpt_{info['best_epoch']:03d}_*.keras"))
        info["best_checkpoint"] = checkpoints[-1].name if checkpoints else None
        log.info(
            "best epoch %d by %s: val_loss %.4f, val_auc %.4f -> %s",
            info["best_epoch"],
            monitor,
            info["best_val_loss"],
            float(best["val_auc"]),
            run.path / str(info["best_checkpoint"]),
        )
        warning = did_not_learn(info["best_epoch"], info["best_val_auc"], monitor)
        if warning:
            log.warning("%s", warning)
    write_json(run.run_json, info)
    return info


def did_not_learn(best_epoch: int, best_val_auc: float, monitor: str) -> str | None:
    """A one-line warning when a run shows no sign of having learned (None when it does)."""
    if best_epoch == 1:
        reason = f"the best epoch by {monitor} is the first"
    elif best_val_auc < MIN_LEARNED_VAL_AUC:
        reason = f"the best validation AUC is {best_val_auc:.3f} (< {MIN_LEARNED_VAL_AUC})"
    else:
        return None
    return (
        f"warning: {reason}: the model may not have learned to generalize; try --augmentation strong, "
        "a lower --learning-rate or more data (or --monitor val_auc)"
    )


def train_split(
    args: argparse.Namespace,
    run: RunFolder,
    cohort: Cohort,
    is_val: np.ndarray,
    distribution: Distribution,
    callbacks: list | None = None,
):
    """Phases 5-8 for one split of the cohort (the single split, or one fold): build,
    open the run folder, fit, finish. Returns the model as it is after the last epoch."""
    model = build_compiled_model(args, cohort.size, distribution)
    run, info, first_epoch = open_run_folder(args, run, cohort, is_val, distribution)
    if distribution.name == "MultiWorkerMirroredStrategy":  # Keras's fit fails there
        early_stopping = fit_across_workers(
            args, model, run, cohort, is_val, distribution, first_epoch, callbacks
        )
    else:
        early_stopping = fit(args, model, run, cohort, is_val, distribution, first_epoch, callbacks)
    if distribution.is_chief:
        finish_run(run, info, early_stopping)
    if distribution.is_chief:
        write_val_predictions(run.path, cohort, is_val, info.get("best_checkpoint"))
    return model


def train(args: argparse.Namespace, callbacks: list | None = None):
    """Train as the command line asks; returns the model as it is after the last epoch.
    `callbacks` are added after ours (tests use them to look at the in-memory model)."""
    if args.folds is not None:
        return train_cross_validation(args, callbacks)
    run = check_run_folder(args, args.run_dir)
    cohort = read_cohort(args)
    is_val = split_by_group(cohort.records, args.val_fraction, args.seed)  # phase 3: the split
    log_split(cohort, is_val)
    check_resume(args, run, cohort, is_val)
    distribution = start_tensorflow(args)
    return train_split(args, run, cohort, is_val, distribution, callbacks)


# ---------------------------------------------------------------------------- validation predictions


def predict_hdf5(model, cohort: Cohort, indices: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """P(PCNSL) of the HDF5 images `indices` (record order), unaugmented: the validation
    pipeline of training (make_dataset), so the pixels are those the model was scored on."""
    if len(indices) == 0:
        return np.zeros(0, np.float32)
    dataset = make_dataset(HDF5Images(cohort.hdf5, cohort.size), indices, cohort.labels, batch_size)
    return model.predict(dataset.map(lambda images, labels: images), verbose=0)[:, 0]


def write_val_predictions(
    run_path: Path, cohort: Cohort, is_val: np.ndarray, checkpoint: str | None, batch_size: int = 32
) -> Path | None:
    """RUN/val_predictions.csv: path,prob_gbm,prob_pcnsl (step2's columns, full precision),
    label (0 GBM, 1 PCNSL) and patient_id (the group the split held out, class-qualified)
    of every validation slice in HDF5 order, predicted by the run's best checkpoint
    (`checkpoint`, a file name in `run_path`) as step2 would load it."""
    if checkpoint is None:
        log.warning("warning: %s: no best checkpoint, so no %s", run_path, VAL_PREDICTIONS_CSV)
        return None
    model = common.load_model_for_inference(run_path / checkpoint)
    indices = np.flatnonzero(is_val)
    prob_pcnsl = predict_hdf5(model, cohort, indices, batch_size)
    rows = []
    for index, prob in zip(indices, prob_pcnsl, strict=True):
        record, prob = cohort.records[index], float(prob)
        rows.append([record["path"], repr(1.0 - prob), repr(prob), record["label"], record["group"]])
    path = run_path / VAL_PREDICTIONS_CSV
    write_csv(path, list(PREDICTION_COLUMNS), rows)
    log.info("wrote %s (%d validation slices, %s)", path, len(rows), checkpoint)
    return path


# ---------------------------------------------------------------------------- cross-validation
# RUN/fold_<i>/ are ordinary run folders trained by train_split, one per fold; RUN/cv.json
# is derived from them (status, best checkpoint) each time a process writes it, under a lock,
# so that folds trained by separate jobs at the same time leave one consistent file.


def make_folds(records: list[dict], folds: int, seed: int) -> np.ndarray:
    """The fold (0 ... folds-1) of every record: StratifiedGroupKFold(folds, shuffle=True,
    random_state=seed) over the patients (record["group"]), stratified by label, so every
    patient is in exactly one fold and each fold holds about 1/folds of each class.

    Raises UserError when a class has fewer patients than folds, or a fold's validation
    would miss a class.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.array([record["label"] for record in records])
    groups = np.array([record["group"] for record in records])
    for label, name in enumerate(common.CLASS_NAMES):
        count = len(set(groups[labels == label]))
        if count < folds:
            raise UserError(
                f"{name}: {count} patient group(s); --folds {folds} needs at least {folds} per class "
                "(each fold's validation holds patients of both classes)"
            )
    fold_of = np.full(len(records), -1)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (_, val_indices) in enumerate(splitter.split(np.zeros(len(records)), labels, groups)):
        fold_of[val_indices] = fold
    for fold in range(folds):
        if len(set(labels[fold_of == fold])) < len(common.CLASS_NAMES):
            raise UserError(
                f"--folds {folds}: fold {fold}'s validation holds one class only (patients of very "
                "different sizes); use fewer folds or another --seed"
            )
    return fold_of


def fold_assignment(cohort: Cohort, fold_of: np.ndarray) -> list[dict]:
    """cv.json's record of the folds: patients and slices per class, the run folder."""
    assignment = []
    for fold in range(int(fold_of.max()) + 1):
        members = [cohort.records[i] for i in np.flatnonzero(fold_of == fold)]
        assignment.append(
            {
                "fold": fold,
                "patients": {
                    folder: sorted({r["group"] for r in members if r["class"] == folder})
                    for folder in CLASS_FOLDERS
                },
                "slices": {folder: sum(r["class"] == folder for r in members) for folder in CLASS_FOLDERS},
                "run_dir": f"fold_{fold}",
            }
        )
    return assignment


def cv_settings(args: argparse.Namespace, cohort: Cohort, fold_of: np.ndarray) -> dict:
    """What every fold of one cross-validation run shares (cv.json less the fold status)."""
    return {
        "folds": args.folds,
        "seed": args.seed,
        "hdf5": str(cohort.hdf5.resolve()),
        "hdf5_size_key": common.size_key(cohort.size),
        "input_shape": [*cohort.size, 3],
        "arguments": {name: _jsonable(getattr(args, name)) for name in RESUME_MUST_MATCH},
        "fold_assignment": fold_assignment(cohort, fold_of),
    }


def check_cv_folder(args: argparse.Namespace) -> dict | None:
    """Phase 1 of a cross-validation run: may RUN be created, joined (--fold), resumed or
    replaced? Returns the cv.json already there (None when RUN is new or to be replaced)."""
    run_dir, cv_json = args.run_dir, args.run_dir / CV_JSON
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: exists and is not a folder")
    previous = json.loads(cv_json.read_text()) if cv_json.is_file() else None
    in_use = run_dir.is_dir() and any(run_dir.iterdir())
    if args.resume:
        if previous is None:
            raise UserError(f"{run_dir}: no {CV_JSON}, no cross-validation run to resume")
    elif args.overwrite and args.fold is None:
        if in_use and previous is None and not (run_dir / "run.json").is_file():
            raise UserError(
                f"{run_dir}: --overwrite only replaces a run folder (one with {CV_JSON} or run.json)"
            )
        return None
    elif in_use and previous is None and not (args.fold is not None and (run_dir / CV_LOCK).exists()):
        # (a lock file without cv.json: another --fold job is creating the run right now)
        raise UserError(
            f"{run_dir}: exists and holds no {CV_JSON}; pick a new run folder"
            + ("" if args.fold is not None else " or --overwrite it")
        )
    elif in_use and args.fold is None:
        raise UserError(f"{run_dir}: exists; pick a new run folder, --resume it or --overwrite it")
    return previous


def check_cv_settings(args: argparse.Namespace, previous: dict | None, settings: dict) -> None:
    """A process joining or resuming a cross-validation run must train the same folds with
    the same settings as the run's other folds."""
    if previous is None:
        return
    where = args.run_dir / CV_JSON
    if previous.get("folds") != settings["folds"]:
        raise UserError(f"{where}: the run has {previous.get('folds')} folds (now --folds {args.folds})")
    changed = [
        f"--{name.replace('_', '-')} {previous.get('arguments', {}).get(name)} (now {value})"
        for name, value in settings["arguments"].items()
        if previous.get("arguments", {}).get(name) != value
    ]
    if changed:
        raise UserError(f"{where}: every fold needs the run's own settings: {', '.join(changed)}")
    if previous.get("input_shape") != settings["input_shape"]:
        raise UserError(
            f"{where}: the run's image size is {previous.get('input_shape')} (now {settings['input_shape']})"
        )
    stored = [
        {k: v for k, v in fold.items() if k in ("fold", "patients", "slices")}
        for fold in previous["fold_assignment"]
    ]
    current = [
        {k: v for k, v in fold.items() if k in ("fold", "patients", "slices")}
        for fold in settings["fold_assignment"]
    ]
    if stored != current:
        raise UserError(f"{where}: {args.hdf5} with --seed {args.seed} gives other folds than the run's")


def log_folds(cohort: Cohort, fold_of: np.ndarray) -> None:
    labels = cohort.labels
    folds = int(fold_of.max()) + 1
    for fold in range(folds):
        members = np.flatnonzero(fold_of == fold)
        per_class = [int(np.sum(labels[members] == label)) for label in (0, 1)]
        groups = len({cohort.records[i]["group"] for i in members})
        log.info(
            "fold %d (of %d): %d slices (%d GBM, %d PCNSL) from %d groups",
            fold,
            folds,
            len(members),
            *per_class,
            groups,
        )


def fold_status(fold_dir: Path) -> tuple[str, str | None]:
    """(pending | running | finished, best checkpoint file name) of a fold's run folder; a
    fold is finished once its val_predictions.csv is written."""
    run_json = fold_dir / "run.json"
    if not run_json.is_file():
        return "pending", None
    info = json.loads(run_json.read_text())
    if info.get("status") == "finished" and (fold_dir / VAL_PREDICTIONS_CSV).is_file():
        return "finished", info.get("best_checkpoint")
    return "running", None


@contextlib.contextmanager
def cv_lock(run_dir: Path):
    """An exclusive lock on RUN/.cv.lock (flock) while cv.json is read and written."""
    try:
        import fcntl
    except ImportError:  # not POSIX: one process per CV run folder at a time
        yield
        return
    with open(run_dir / CV_LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def update_cv_json(
    run_dir: Path, settings: dict, cohort: Cohort, fold_of: np.ndarray, starting: int | None = None
) -> dict:
    """Write RUN/cv.json from the fold run folders as they are now (fold `starting` counts as
    running), and RUN/oof_predictions.csv when every fold is finished. Under the lock."""
    with cv_lock(run_dir):
        cv_json = run_dir / CV_JSON
        previous = json.loads(cv_json.read_text()) if cv_json.is_file() else {}
        cv = {**settings, "fold_assignment": [dict(fold) for fold in settings["fold_assignment"]]}
        cv["start_time"] = previous.get("start_time") or now()
        for fold in cv["fold_assignment"]:
            status, checkpoint = fold_status(run_dir / fold["run_dir"])
            if fold["fold"] == starting and status == "pending":
                status = "running"
            fold["status"] = status
            fold["best_checkpoint"] = f"{fold['run_dir']}/{checkpoint}" if checkpoint else None
        cv["complete"] = all(fold["status"] == "finished" for fold in cv["fold_assignment"])
        if cv["complete"]:
            cv["best_checkpoints"] = [fold["best_checkpoint"] for fold in cv["fold_assignment"]]
            write_oof_predictions(run_dir, cohort, fold_of)
        cv["update_time"] = now()
        write_json(cv_json, cv)
    return cv


def write_oof_predictions(run_dir: Path, cohort: Cohort, fold_of: np.ndarray) -> Path:
    """RUN/oof_predictions.csv: the folds' val_predictions.csv rows (values as written) plus
    their fold, in HDF5 order: one row per slice, each predicted by the model that did not
    see its patient."""
    rows: list[list[str] | None] = [None] * len(cohort.records)
    for fold in range(int(fold_of.max()) + 1):
        path = run_dir / f"fold_{fold}" / VAL_PREDICTIONS_CSV
        with open(path, newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            fold_rows = list(reader)
        indices = np.flatnonzero(fold_of == fold)
        if header != list(PREDICTION_COLUMNS) or [row[0] for row in fold_rows] != [
            cohort.records[i]["path"] for i in indices
        ]:
            raise UserError(f"{path}: does not hold the validation slices of fold {fold}")
        for index, row in zip(indices, fold_rows, strict=True):
            rows[index] = [*row, str(fold)]
    path = run_dir / OOF_PREDICTIONS_CSV
    write_csv(path, [*PREDICTION_COLUMNS, "fold"], rows)
    log.info("every fold is done: wrote %s (%d slices)", path, len(rows))
    return path


def train_cross_validation(args: argparse.Namespace, callbacks: list | None = None):
    """--folds K: train the selected folds (all, or --fold i) one after the other, each
    through train_split into RUN/fold_<i>/, keeping RUN/cv.json up to date. Returns the
    model of the last fold trained (None when nothing was left to train)."""
    previous = check_cv_folder(args)
    cohort = read_cohort(args)
    fold_of = make_folds(cohort.records, args.folds, args.seed)  # phase 3: the folds
    log_folds(cohort, fold_of)
    settings = cv_settings(args, cohort, fold_of)
    check_cv_settings(args, previous, settings)
    replace_all = args.overwrite and args.fold is None
    plans = []  # (fold, action, fold arguments, RunFolder)
    for fold in [args.fold] if args.fold is not None else range(args.folds):
        fold_dir = args.run_dir / f"fold_{fold}"
        status, _ = fold_status(fold_dir)
        resume = args.resume and status != "pending"
        fold_args = argparse.Namespace(
            **{**vars(args), "run_dir": fold_dir, "fold": fold, "resume": resume, "overwrite": args.overwrite}
        )
        if args.resume and status == "finished":
            plans.append((fold, "skip", fold_args, None))
            continue
        if resume and json.loads((fold_dir / "run.json").read_text()).get("status") == "finished":
            plans.append((fold, "predict", fold_args, RunFolder(fold_dir)))  # killed before its predictions
            continue
        run = RunFolder(fold_dir) if replace_all else check_run_folder(fold_args, fold_dir)
        check_resume(fold_args, run, cohort, fold_of == fold)
        plans.append((fold, "train", fold_args, run))

    distribution = start_tensorflow(args)
    import keras

    if distribution.is_chief:
        if replace_all and args.run_dir.exists():
            shutil.rmtree(args.run_dir)
        args.run_dir.mkdir(parents=True, exist_ok=True)
        update_cv_json(args.run_dir, settings, cohort, fold_of)
    model = None
    for fold, action, fold_args, run in plans:
        is_val = fold_of == fold
        if action == "skip":
            log.info("fold %d (of %d): finished earlier, skipped", fold, args.folds)
            continue
        if action == "predict":
            if distribution.is_chief:
                info = json.loads(run.run_json.read_text())
                write_val_predictions(run.path, cohort, is_val, info.get("best_checkpoint"))
        else:
            log.info(
                "fold %d (of %d): %s %s",
                fold,
                args.folds,
                "resuming" if fold_args.resume else "training",
                run.path,
            )
            log_split(cohort, is_val)
            if distribution.is_chief:
                update_cv_json(args.run_dir, settings, cohort, fold_of, starting=fold)
            keras.utils.set_random_seed(args.seed)  # fold i alone = fold i after other folds
            model = train_split(fold_args, run, cohort, is_val, distribution, callbacks)
        if distribution.is_chief:
            cv = update_cv_json(args.run_dir, settings, cohort, fold_of)
            done = sum(fold["status"] == "finished" for fold in cv["fold_assignment"])
            log.info("fold %d (of %d) done; %d of %d folds finished", fold, args.folds, done, args.folds)
    return model


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    return common.run_main(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    common.setup_logging(args.verbose)
    train(args)
    return 0


def _jsonable(value):
    """Argument values as they are stored in run.json."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


if __name__ == "__main__":
    sys.exit(main())
