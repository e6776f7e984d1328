"""One worker process of test_multiworker.py's clusters: step1's main, plus what the test
compares across the workers, written into DUMP_DIR when training ends:

    <task>_weights.npz   the worker's final weights (a Keras callback, on_train_end)
    <task>_seen.json     the records it trained on, per epoch, as its own training stream
                         delivered them (each batch of make_shard_dataset carries its
                         record indices; they are noted as the batches go by)

<task> is worker_<index> of TF_CONFIG. Nothing here is part of step1: the callback goes in
through training.train's `callbacks`, the stream is wrapped from outside.

Usage: python tests/multiworker_worker.py DUMP_DIR STEP1_ARGUMENTS...
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

import step1_train_model as step1  # noqa: E402
from gbmpcnsl import distributed, training  # noqa: E402
from gbmpcnsl.files import write_json  # noqa: E402


def note_training_batches(steps: list[tuple[int, list[int]]]):
    """Wrap distributed.make_shard_dataset: every batch of a training stream appends
    (epoch, its record indices) to `steps` when the stream yields it."""
    make_shard_dataset = distributed.make_shard_dataset

    def noted(
        reader, indices, labels, layout, replicas, augmentation="none", seed=0, epochs=None, strong=None
    ):
        dataset = make_shard_dataset(
            reader, indices, labels, layout, replicas, augmentation, seed, epochs, strong
        )
        if epochs is None:  # validation
            return dataset
        import tensorflow as tf

        batches_per_epoch = len(layout) * len(replicas)

        def note(records):
            steps.append((epochs[0] + len(steps) // batches_per_epoch, records.tolist()))
            return records

        def tap(images, labels, records, global_size):
            noted_records = tf.numpy_function(note, [records], tf.int64, stateful=True)
            noted_records.set_shape(records.shape)
            return images, labels, noted_records, global_size

        return dataset.map(tap)

    distributed.make_shard_dataset = noted


def recorder(dump: Path, task: str, steps: list[tuple[int, list[int]]]):
    """A Keras callback that writes the worker's weights and the noted records at the end."""
    import keras

    class WorkerRecorder(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            np.savez(dump / f"{task}_weights.npz", *self.model.get_weights())
            seen: dict[str, list[int]] = {}
            for epoch, records in steps:
                seen.setdefault(str(epoch), []).extend(records)
            write_json(dump / f"{task}_seen.json", seen)

    return WorkerRecorder()


def main(dump: Path, argv: list[str]) -> int:
    task = json.loads(os.environ["TF_CONFIG"])["task"]
    steps: list[tuple[int, list[int]]] = []
    note_training_batches(steps)
    callback = recorder(dump, f"{task['type']}_{task['index']}", steps)
    training.train = functools.partial(training.train, callbacks=[callback])
    return step1.main(argv)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
