"""The training data: the HDF5 cohort, its split by patient, and the tf.data pipelines.

Each epoch of a training stream is a permutation of the records seeded by (seed, epoch),
and image i of the epoch is augmented with the seed (seed, epoch, i): `_epoch_stream` is
the one place that draws them, for one machine (make_dataset) and for one worker of
several (make_shard_dataset) alike. TensorFlow is imported lazily.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import gbmpcnsl.hdf5
import gbmpcnsl_common as common
from gbmpcnsl.augment import StrongAugmentation, augment_image
from gbmpcnsl_common import CLASS_FOLDERS, CLASS_LABELS, UserError, log

# A record's subset in a split (split.csv's "subset" column): trained on; validation, the
# patients that choose the checkpoint and stop training early; test, a cross-validation
# fold's held-out patients, predicted once and used for no choice.
TRAIN, VAL, TEST = "train", "val", "test"
SUBSETS = (TRAIN, VAL, TEST)


# ---------------------------------------------------------------------------- the cohort
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


def read_cohort(hdf5: Path, size: tuple[int, int] | None = None) -> Cohort:
    """The HDF5 index (paths, patients, labels) at the image size to train on (`size`, or
    the file's only one). Raises UserError for a missing or unreadable file."""
    import h5py

    if not hdf5.is_file():
        raise UserError(f"{hdf5}: no such file")
    try:
        with h5py.File(hdf5, "r") as h5file:
            size = gbmpcnsl.hdf5.choose_hdf5_size(h5file, size, hdf5)
            records, has_groups = gbmpcnsl.hdf5.read_hdf5_index(h5file, size)
            for folder in CLASS_FOLDERS:
                group = h5file[folder][common.size_key(size)]
                if "labels" in group and np.any(group["labels"][:] != CLASS_LABELS[folder]):
                    raise UserError(f"{hdf5}: {group.name}/labels are not all {CLASS_LABELS[folder]}")
    except OSError as error:
        raise UserError(f"{hdf5}: cannot read HDF5 file ({error})") from error
    if not has_groups:
        log.warning(
            "warning: %s has no patient groups (original layout): each slice is its own group, so "
            "slices of one patient can land in both training and validation",
            hdf5,
        )
    elif warning := gbmpcnsl.hdf5.single_slice_groups_warning([r["group"] for r in records]):
        log.warning(warning)
    return Cohort(hdf5, size, records, has_groups)


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


def split_subsets(
    records: list[dict], val_fraction: float, seed: int, is_test: np.ndarray | None = None
) -> np.ndarray:
    """Every record's subset, as split.csv names it: "test" where `is_test` (a
    cross-validation fold's held-out patients), else "val" for the groups split_by_group
    holds out of the remaining records for validation (checkpoint choice, early stopping),
    else "train". Without `is_test`: the single split, train and val only."""
    is_test = np.zeros(len(records), dtype=bool) if is_test is None else np.asarray(is_test, dtype=bool)
    pool = np.flatnonzero(~is_test)
    is_val = split_by_group([records[i] for i in pool], val_fraction, seed)
    subset = np.full(len(records), TEST, dtype=f"<U{max(map(len, SUBSETS))}")
    subset[pool] = np.where(is_val, VAL, TRAIN)
    return subset


def log_split(cohort: Cohort, subset: np.ndarray) -> None:
    """One log line for each subset of the split (training, validation, test if any)."""
    labels = cohort.labels
    for name, key in (("training", TRAIN), ("validation", VAL), ("test (held out)", TEST)):
        members = np.flatnonzero(subset == key)
        if key == TEST and len(members) == 0:
            continue
        per_class = [int(np.sum(labels[members] == label)) for label in (0, 1)]
        groups = len({cohort.records[i]["group"] for i in members})
        log.info("%s: %d slices (%d GBM, %d PCNSL) from %d groups", name, len(members), *per_class, groups)


# ---------------------------------------------------------------------------- reading images
class HDF5Images:
    """Reads images of one size from the HDF5 file by record index (the order of
    gbmpcnsl.hdf5.read_hdf5_index: all GBM rows, then all PCNSL rows). The file is opened once,
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

    def read_float(self, index):
        """The image of one record (an int64 scalar tensor) as a float32 tensor (H, W, 3), 0-255."""
        import tensorflow as tf

        image = tf.numpy_function(self.read, [index], tf.uint8, stateful=False)
        return tf.cast(tf.ensure_shape(image, [*self.size, 3]), tf.float32)


# ---------------------------------------------------------------------------- tf.data pipelines
def _epoch_stream(epochs: tuple[int, int], seed: int, indices, one_epoch):
    """Epochs first..end-1 of a training stream, one after the other: epoch e is
    one_epoch(order, augment_seed), `order` the permutation of `indices` seeded by
    (seed, e), `augment_seed` the seed that image i of the epoch folds i into."""
    import tensorflow as tf

    fold_in = tf.random.experimental.stateless_fold_in

    def epoch_dataset(epoch):
        order = tf.random.experimental.stateless_shuffle(
            indices, fold_in(tf.constant([seed, 1], tf.int64), epoch)
        )
        return one_epoch(order, fold_in(tf.constant([seed, 2], tf.int64), epoch))

    return tf.data.Dataset.range(*epochs).flat_map(epoch_dataset)


def _augmented(image, augment_seed, position, augmentation: str, strong: StrongAugmentation | None):
    """Image `position` of an epoch, augmented with its own draws (none without a seed)."""
    import tensorflow as tf

    if augment_seed is None:
        return image
    return augment_image(
        image, tf.random.experimental.stateless_fold_in(augment_seed, position), augmentation, strong
    )


def _with_options(dataset, shard_policy):
    import tensorflow as tf

    options = tf.data.Options()
    options.deterministic = True  # parallel reads, results in order
    options.experimental_distribute.auto_shard_policy = shard_policy
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


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
    index_tensor = tf.constant(indices, tf.int64)

    def one_epoch(order, augment_seed):
        def load(position, index):
            image = _augmented(reader.read_float(index), augment_seed, position, augmentation, strong)
            return image, tf.gather(label_table, index)[None]

        images = tf.data.Dataset.from_tensor_slices(order).enumerate()
        return images.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)

    if epochs is None:
        dataset = one_epoch(index_tensor, None)
    else:
        dataset = _epoch_stream(epochs, seed, index_tensor, one_epoch)
    # Each worker reads the whole index stream and keeps its share (no files to shard).
    return _with_options(dataset, tf.data.experimental.AutoShardPolicy.DATA)


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
    index_tensor = tf.constant(indices, tf.int64)
    pieces = [
        (layout[s, r], layout[s, r + 1], layout[s, -1] - layout[s, 0])
        for s in range(len(layout))
        for r in replicas
    ]
    starts, stops, global_sizes = (
        tf.constant(np.array(column, np.int64)) for column in zip(*pieces, strict=True)
    )

    def one_epoch(order, augment_seed):
        def load(position, index):
            image = _augmented(reader.read_float(index), augment_seed, position, augmentation, strong)
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
        dataset = one_epoch(index_tensor, None)
    else:
        dataset = _epoch_stream(epochs, seed, index_tensor, one_epoch)
    return _with_options(dataset, tf.data.experimental.AutoShardPolicy.OFF)  # sharded here
