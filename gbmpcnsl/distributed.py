"""Training on several devices and machines: the tf.distribute strategy and the
multi-worker training loop (WorkerLoop); Slurm's cluster is gbmpcnsl.slurm's.

Keras 3's fit cannot train under MultiWorkerMirroredStrategy with the TensorFlow backend
(keras-team/keras#20585: "Attempt to convert a value (PerReplica...)"), so a multi-worker
run trains with WorkerLoop's custom step and drives the same Keras callbacks by hand.
TensorFlow is imported lazily.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import gbmpcnsl_common as common
from gbmpcnsl.config import TrainConfig
from gbmpcnsl.data import Cohort, HDF5Images, make_shard_dataset, shard_layout
from gbmpcnsl.runs import BACKUP_DIR, BACKUP_FILES, RunFolder
from gbmpcnsl.slurm import is_other_worker, slurm_cluster_resolver, slurm_task
from gbmpcnsl_common import UserError, log

MULTI_WORKER = "MultiWorkerMirroredStrategy"


# ---------------------------------------------------------------------------- the strategy
@dataclass
class Distribution:
    """The tf.distribute strategy of this process and its place in the cluster."""

    strategy: object
    name: str
    is_chief: bool

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync


def start_tensorflow(config: TrainConfig) -> Distribution:
    """Import TensorFlow, create the strategy (first: MultiWorkerMirroredStrategy must come
    before any other TensorFlow work), seed, determinism."""
    tf = common.import_tensorflow(config.verbose)
    import keras

    strategy, strategy_name, is_chief = make_strategy(config.distribute)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    distribution = Distribution(strategy, strategy_name, is_chief)
    log.info(
        "batch size %d per replica x %d replica(s) = global batch %d (%s)",
        config.batch_size,
        distribution.replicas,
        config.batch_size * distribution.replicas,
        strategy_name,
    )
    return distribution


def make_strategy(name: str):
    """(tf.distribute strategy, its name, whether this process is the chief) for --distribute.
    Call it before any other TensorFlow work: MultiWorkerMirroredStrategy must come first.
    multiworker reads the cluster from TF_CONFIG or, without it, from Slurm's variables."""
    import tensorflow as tf

    if name == "multiworker":
        return _multi_worker_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "none"
    if name == "mirrored":
        devices = gpus or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy(devices=[d.name for d in devices]), "MirroredStrategy", True
    return tf.distribute.get_strategy(), "default strategy", True


def _multi_worker_strategy():
    import tensorflow as tf

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
    warn_open_port(cluster, task_type, task_index)
    is_chief = task_type == "chief" or ("chief" not in cluster and task_type == "worker" and task_index == 0)
    return strategy, MULTI_WORKER, is_chief


def warn_open_port(cluster: dict, task_type: str, task_index: int) -> None:
    """One warning line naming this worker's port: TensorFlow's gRPC server binds it on
    every interface ("0.0.0.0:PORT", no option to bind one address) and asks no one for
    credentials, so the workers' network must be private (docs/several-machines.md)."""
    try:
        address = str(cluster[task_type][task_index])  # a list, or a dict by task index
    except (KeyError, IndexError, TypeError):
        address = ""
    port = address.rpartition(":")[2] or "?"
    log.warning(
        "warning: this worker's TensorFlow server listens on port %s of every network interface, "
        "unauthenticated; run multi-worker training only on a private network (firewall or cluster VLAN)",
        port,
    )


def writes_run_folder(config: TrainConfig) -> bool:
    """Whether this process checks and writes the run folder: all but the other workers of
    a multi-worker run (their chief does)."""
    return not (config.distribute == "multiworker" and is_other_worker())


def agree_on_first_epoch(strategy, first_epoch: int, is_chief: bool) -> int:
    """The chief's first epoch, on every worker. A collective: it also waits until every
    worker (the chief above all, which repairs the backup) is past the run folder's set-up."""
    import tensorflow as tf

    share = float(first_epoch) / len(strategy.extended.worker_devices) if is_chief else 0.0
    per_replica = strategy.run(tf.function(lambda: tf.constant(share)))
    return int(round(float(strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))))


# ---------------------------------------------------------------------------- the loop
# (callbacks, EarlyStopping or None) for (config, run, steps per epoch, folder or None)
CallbackFactory = Callable[[TrainConfig, RunFolder, int, "Path | None"], tuple[list, object]]


class WorkerLoop:
    """Training under MultiWorkerMirroredStrategy, where Keras 3's fit fails: a custom step
    (strategy.run; gradients summed across all replicas by the optimizer) over each
    worker's share of the training stream (make_shard_dataset), with the loss and the
    metrics computed from every replica's predictions (strategy.gather), so that all
    workers log the same numbers. It drives the callbacks of fit(): the chief writes
    history.csv, the best-only checkpoints and the backup; the other workers save alike
    (saving takes every worker) into a scratch folder they delete, and restore the chief's
    backup on --resume."""

    def __init__(
        self,
        config: TrainConfig,
        model,
        run: RunFolder,
        cohort: Cohort,
        subset: np.ndarray,
        distribution: Distribution,
        first_epoch: int,
    ):
        self.config, self.model, self.run, self.cohort = config, model, run, cohort
        self.strategy, self.is_chief = distribution.strategy, distribution.is_chief
        self.replicas = distribution.replicas
        train_indices, val_indices = np.flatnonzero(subset == "train"), np.flatnonzero(subset == "val")
        self.train_layout = shard_layout(len(train_indices), self.replicas, config.batch_size)
        self.val_layout = shard_layout(len(val_indices), self.replicas, config.batch_size)
        self.first_epoch = agree_on_first_epoch(self.strategy, first_epoch, self.is_chief)
        reader = HDF5Images(cohort.hdf5, cohort.size)
        epochs = (self.first_epoch, max(config.epochs, self.first_epoch + 1))
        self.train_data = self._distribute(reader, train_indices, self.train_layout, epochs)
        self.val_data = self._distribute(reader, val_indices, self.val_layout, None)
        self.metrics, self.val_metrics = self._make_metrics()
        # Keras 3 keeps a BatchNormalization moving mean and variance per replica (each from
        # its own batches), so replicas drift apart; they are averaged after each epoch's
        # training, as tf.keras did (ON_READ, MEAN), so that validation, checkpoints and
        # every worker agree.
        self.moving_statistics = [v for v in model.non_trainable_variables if "float" in str(v.dtype)]
        import tensorflow as tf

        # The steps take the iterator, not its batches: traced once for any batch size.
        self.train_step = tf.function(self._train_step)
        self.val_step = tf.function(self._val_step)
        self.average_moving_statistics = tf.function(self._average_moving_statistics)

    def _distribute(self, reader: HDF5Images, indices: np.ndarray, layout: np.ndarray, epochs):
        """This worker's share of the stream, one batch per local replica and step."""

        def dataset_fn(context):
            local = context.num_replicas_in_sync // context.num_input_pipelines
            mine = range(context.input_pipeline_id * local, (context.input_pipeline_id + 1) * local)
            config = self.config
            labels = self.cohort.labels
            return make_shard_dataset(
                reader, indices, labels, layout, mine, config.augmentation, config.seed, epochs, config.strong
            )

        return self.strategy.distribute_datasets_from_function(dataset_fn)

    def _make_metrics(self) -> tuple[dict, dict]:
        """The metrics of build_compiled_model, as plain (per-process) Keras metrics fed with
        every replica's predictions: training and validation."""
        import keras

        metrics = {
            "loss": keras.metrics.Mean(name="loss"),
            "accuracy": keras.metrics.BinaryAccuracy(name="accuracy"),
            "auc": keras.metrics.AUC(name="auc"),
        }
        val_metrics = {
            f"val_{name}": metric.__class__.from_config(metric.get_config())
            for name, metric in metrics.items()
        }
        return metrics, val_metrics

    def _replica_step(self, images, labels, global_size, training: bool):
        import tensorflow as tf

        model, optimizer = self.model, self.model.optimizer
        size = tf.cast(tf.shape(labels)[0], tf.float32)
        with tf.GradientTape() as tape:
            probabilities = model(images, training=training)
            # Keras divides each replica's loss by the number of replicas: undo it.
            loss = model.compute_loss(x=images, y=labels, y_pred=probabilities, training=training)
            loss = loss * self.replicas
            # Weighted by the replica's share of the global batch: summed over the
            # replicas, the gradient is that of the global batch's mean loss.
            scaled = optimizer.scale_loss(loss * size / global_size)
        if training:
            gradients = tape.gradient(scaled, model.trainable_weights)
            optimizer.apply_gradients(zip(gradients, model.trainable_weights, strict=True))
        return probabilities, loss[None], size[None]

    def _update(self, tracked: dict, labels, outputs) -> None:
        """Feed the metrics with every replica's loss, labels and predictions."""
        probabilities, losses, sizes = (self.strategy.gather(value, axis=0) for value in outputs)
        labels = self.strategy.gather(labels, axis=0)
        names = list(tracked)
        tracked[names[0]].update_state(losses, sample_weight=sizes)
        for name in names[1:]:
            tracked[name].update_state(labels, probabilities)

    def _train_step(self, iterator) -> None:
        images, labels, _, global_size = next(iterator)
        outputs = self.strategy.run(self._replica_step, args=(images, labels, global_size, True))
        self._update(self.metrics, labels, outputs)

    def _val_step(self, iterator) -> None:
        images, labels, _, global_size = next(iterator)
        outputs = self.strategy.run(self._replica_step, args=(images, labels, global_size, False))
        self._update(self.val_metrics, labels, outputs)

    def _average_moving_statistics(self) -> None:
        import tensorflow as tf

        def replica_fn():
            context = tf.distribute.get_replica_context()
            local = [tf.identity(v.value) for v in self.moving_statistics]
            means = context.all_reduce(tf.distribute.ReduceOp.MEAN, local)
            for variable, mean in zip(self.moving_statistics, means, strict=True):
                variable.assign(mean)

        self.strategy.run(replica_fn)

    def _save_folder(self) -> Path:
        """Where this worker saves: the chief into the run folder, the others (saving reads
        variables with collectives, so every worker saves alike) into a scratch folder of
        their own, with a copy of the chief's backup to restore on --resume."""
        if self.is_chief:
            return self.run.path
        folder = Path(tempfile.mkdtemp(prefix="gbmpcnsl-worker-"))
        if (self.run.backup_dir / BACKUP_FILES[0]).is_file():
            (folder / BACKUP_DIR).mkdir()  # all workers restore the chief's backup (a shared filesystem)
            for name in BACKUP_FILES:
                shutil.copyfile(self.run.backup_dir / name, folder / BACKUP_DIR / name)
        return folder

    def fit(self, make_callbacks: CallbackFactory, callbacks: list | None = None):
        """Train epochs first_epoch..epochs-1 with the callbacks `make_callbacks` gives (then
        `callbacks`); returns the EarlyStopping callback (or None)."""
        import keras

        folder = self._save_folder()
        try:
            ours, early_stopping = make_callbacks(
                self.config, self.run, len(self.train_layout), None if self.is_chief else folder
            )
            callback_list = keras.callbacks.CallbackList(ours + (callbacks or []), model=self.model)
            callback_list.set_params(
                {"epochs": self.config.epochs, "steps": len(self.train_layout), "verbose": 0}
            )
            with self.strategy.scope():
                self._train(callback_list)
            if (
                folder / BACKUP_DIR
            ).exists():  # e.g. nothing left to train: BackupAndRestore did not clean up
                shutil.rmtree(folder / BACKUP_DIR)
        finally:
            if not self.is_chief:
                shutil.rmtree(folder, ignore_errors=True)
        return early_stopping

    def _train(self, callback_list) -> None:
        self.model.stop_training = False
        if self.first_epoch >= self.config.epochs:
            log.info("all %d epochs were already done", self.config.epochs)
            return
        callback_list.on_train_begin()
        train_iterator = iter(self.train_data)
        for epoch in range(self.first_epoch, self.config.epochs):
            for metric in [*self.metrics.values(), *self.val_metrics.values()]:
                metric.reset_state()
            callback_list.on_epoch_begin(epoch)
            logs = self._train_epoch(train_iterator, callback_list)
            callback_list.on_epoch_end(epoch, logs)
            if self.model.stop_training:
                break
        callback_list.on_train_end()

    def _train_epoch(self, train_iterator, callback_list) -> dict:
        """One epoch's training steps, then validation: the epoch's logs."""
        for step in range(len(self.train_layout)):
            callback_list.on_train_batch_begin(step)
            self.train_step(train_iterator)
            callback_list.on_train_batch_end(step)
        if self.moving_statistics:
            self.average_moving_statistics()
        val_iterator = iter(self.val_data)
        for _ in range(len(self.val_layout)):
            self.val_step(val_iterator)
        return {name: float(m.result()) for name, m in [*self.metrics.items(), *self.val_metrics.items()]}
