"""Training one split: the learning-rate schedule, the model compiled as the paper's, the
callbacks, Keras's fit (or the multi-worker loop), the outcome in run.json, and the
predictions of the chosen checkpoint (validation; a cross-validation fold's test patients).

train() is made of named phases so that a cross-validation fold, a resumed run and a
multi-worker run take the same path: check the run folder -> read the cohort -> split ->
start TensorFlow -> build the model -> open the run folder -> fit -> finish.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np

import gbmpcnsl.checkpoints
import gbmpcnsl.model
from gbmpcnsl.adam import use_fused_adam_kernel
from gbmpcnsl.cli import Progress
from gbmpcnsl.config import MONITORS, TrainConfig
from gbmpcnsl.data import (
    TEST,
    TRAIN,
    VAL,
    Cohort,
    HDF5Images,
    log_split,
    make_dataset,
    read_cohort,
    split_subsets,
)
from gbmpcnsl.distributed import MULTI_WORKER, Distribution, WorkerLoop, start_tensorflow, writes_run_folder
from gbmpcnsl.files import write_csv, write_json
from gbmpcnsl.outputs import discard
from gbmpcnsl.runs import (
    PREDICTION_COLUMNS,
    TENSORBOARD_DIR,
    TEST_PREDICTIONS_CSV,
    VAL_PREDICTIONS_CSV,
    RunFolder,
    check_resume,
    check_run_folder,
    now,
    open_run_folder,
    read_history,
)
from gbmpcnsl_common import log

# A run whose best epoch is the first, or whose best validation AUC is below this, did not learn.
MIN_LEARNED_VAL_AUC = 0.6
# Learning-rate schedule of the paper: constant for 50 epochs, then exponential decay.
LR_CONSTANT_EPOCHS = 50
LR_DECAY = 0.015


def learning_rate_at(epoch: int, initial: float = 1e-4) -> float:
    """The paper's schedule for a 0-based epoch: `initial` for 50 epochs, then
    initial * exp(0.015 * (50 - epoch)). A closed form, so a resumed run gets the same rate."""
    if epoch < LR_CONSTANT_EPOCHS:
        return initial
    return initial * math.exp(LR_DECAY * (LR_CONSTANT_EPOCHS - epoch))


# ---------------------------------------------------------------------------- the model
def build_compiled_model(config: TrainConfig, size: tuple[int, int], distribution: Distribution, traced=None):
    """The model, compiled with the paper's optimizer, loss and metrics (fails here at once
    if the ImageNet weights are missing). With `traced` (the model of an earlier fold of the
    same cross-validation, its steps traced): that model, given every variable of the new
    one and of its optimizer (weights, BatchNorm statistics, random states, step count,
    moments), so the fold trains as the new model would without tracing its steps again."""
    import keras

    policy = keras.mixed_precision.global_policy()
    try:  # the layers keep the policy they were built with; the process default is restored
        if config.mixed_precision:
            keras.mixed_precision.set_global_policy("mixed_float16")
        with distribution.strategy.scope():
            model = gbmpcnsl.model.build_model(
                config.backbone, (*size, 3), config.backbone_weights, config.normalization, config.head_init
            )
    finally:
        keras.mixed_precision.set_global_policy(policy)
    if config.batchnorm_momentum is not None:
        set_batchnorm_momentum(model, config.batchnorm_momentum)
    with distribution.strategy.scope():
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate),
            loss=keras.losses.BinaryCrossentropy(),
            metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
            jit_compile=bool(config.xla),
        )
        # Adam's slots now, not inside the first traced train step: creating variables there
        # makes TensorFlow trace that step twice (B0 at 32 px on 2 cores: the first fit
        # 56 s -> 26 s; benchmarks/RESULTS.md, step1).
        model.optimizer.build(model.trainable_variables)
    use_fused_adam_kernel(model.optimizer)
    if traced is None:
        return model
    with distribution.strategy.scope():
        for into, source in zip(traced.variables, model.variables, strict=True):
            into.assign(source)
        for into, source in zip(traced.optimizer.variables, model.optimizer.variables, strict=True):
            into.assign(source)
    return traced


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


# ---------------------------------------------------------------------------- callbacks
def progress_callback(epochs: int, steps_per_epoch: int):
    """One log line per epoch on stderr (metrics and seconds), and while it runs a tqdm
    bar on a terminal, else a progress line about every minute (gbmpcnsl.cli.Progress)."""
    import keras

    class EpochProgress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()
            # "batches of ...": not "epoch ...", the per-epoch log line that scripts grep for
            self.bar = Progress(steps_per_epoch, f"batches of epoch {epoch + 1}/{epochs}", unit="batch")

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


def training_callbacks(
    config: TrainConfig, run: RunFolder, steps_per_epoch: int, folder: Path | None = None
) -> tuple[list, object]:
    """The callbacks of both training loops (fit and WorkerLoop), in this order:
    learning-rate schedule, best-only checkpoints on --monitor (--select final: the last
    epoch's checkpoint), history.csv, the backup for --resume, progress, TensorBoard, early
    stopping. Returns (callbacks, EarlyStopping or
    None). `folder` holds the checkpoints and the backup (default: the run folder); the
    other workers of a multi-worker run save into a scratch folder and write no history."""
    import keras

    writes_run = folder is None
    folder = run.path if folder is None else folder
    monitor, mode = config.monitor, MONITORS[config.monitor]
    done = [float(r[monitor]) for r in read_history(run.history_csv)[1] if r.get(monitor)]
    initial = config.learning_rate
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(folder / ("ckpt_{epoch:03d}_{" + monitor + ":.4f}.keras")),
        monitor=monitor,
        mode=mode,
        save_best_only=True,
        # A resumed run only saves improvements.
        initial_value_threshold=(min if mode == "min" else max)(done) if done else None,
    )
    callbacks = [
        keras.callbacks.LearningRateScheduler(lambda epoch, lr: learning_rate_at(epoch, initial)),
        last_epoch_checkpoint(folder) if config.select == "final" else checkpoint,
    ]
    if writes_run:
        # CSVLogger before BackupAndRestore: a crash between the two repeats a row (cut on
        # resume), never loses one.
        callbacks.append(keras.callbacks.CSVLogger(str(run.history_csv), append=True))
    # Two generations of backup: a kill while the weights are written keeps the older one.
    callbacks.append(keras.callbacks.BackupAndRestore(str(folder / "backup"), double_checkpoint=True))
    callbacks.append(progress_callback(config.epochs, steps_per_epoch))
    if config.tensorboard and writes_run:
        # After LearningRateScheduler, which puts the epoch's learning rate into the logs.
        callbacks.append(
            keras.callbacks.TensorBoard(str(run.path / TENSORBOARD_DIR), write_graph=False, profile_batch=0)
        )
    early_stopping = None
    if config.early_stopping:
        early_stopping = keras.callbacks.EarlyStopping(
            monitor=monitor, mode=mode, patience=config.early_stopping
        )
        callbacks.append(early_stopping)
    return callbacks, early_stopping


def last_epoch_checkpoint(folder: Path):
    """--select final: after each epoch, the model as ckpt_<epoch>_final.keras (written
    under another name, then renamed), the previous epoch's file removed; so the run
    always keeps its last finished epoch, a resumed run included."""
    import keras

    class LastEpochCheckpoint(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            path = folder / f"ckpt_{epoch + 1:03d}_final.keras"
            partial = folder / f".partial_{path.name}"
            self.model.save(partial)
            partial.replace(path)
            for older in folder.glob("ckpt_*_final.keras"):
                if older != path:
                    older.unlink()

    return LastEpochCheckpoint()


# ---------------------------------------------------------------------------- fit and finish
def fit(
    config: TrainConfig,
    model,
    run: RunFolder,
    cohort: Cohort,
    subset: np.ndarray,
    distribution: Distribution,
    first_epoch: int,
    callbacks: list | None = None,
):
    """Train epochs first_epoch..epochs-1 with Keras's fit (the "train" records, validated
    on the "val" ones; "test" records are not read); returns the EarlyStopping callback (or
    None)."""
    global_batch = config.batch_size * distribution.replicas
    train_indices, val_indices = np.flatnonzero(subset == TRAIN), np.flatnonzero(subset == VAL)
    reader = HDF5Images(cohort.hdf5, cohort.size)
    steps_per_epoch = math.ceil(len(train_indices) / global_batch)
    epochs = (first_epoch, config.epochs)
    train_data = make_dataset(
        reader,
        train_indices,
        cohort.labels,
        global_batch,
        config.augmentation,
        config.seed,
        epochs,
        config.strong,
    )
    val_data = make_dataset(reader, val_indices, cohort.labels, global_batch)
    fit_callbacks, early_stopping = training_callbacks(config, run, steps_per_epoch)
    fit_callbacks += callbacks or []
    if first_epoch >= config.epochs:
        log.info("all %d epochs were already done", config.epochs)
    else:
        model.fit(
            train_data,
            epochs=config.epochs,
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


def finish_run(run: RunFolder, info: dict, early_stopping) -> dict:
    """Record the outcome (epochs done, chosen epoch and checkpoint) in run.json: the best
    epoch by the monitor on the validation patients, or with --select final the last one
    (still named best_epoch and best_checkpoint, which step2 and cv.json read)."""
    _, rows = read_history(run.history_csv)
    info["end_time"] = now()
    info["status"] = "finished"
    info["epochs_done"] = len(rows)
    info["stopped_early"] = bool(early_stopping is not None and early_stopping.stopped_epoch > 0)
    monitor = info["arguments"].get("monitor", "val_loss")
    info["monitor"] = monitor
    info["select"] = info["arguments"].get("select", "best")
    if rows:
        # The first best epoch: the one ModelCheckpoint kept (it saves strict improvements).
        pick = min if MONITORS[monitor] == "min" else max
        best = rows[-1] if info["select"] == "final" else pick(rows, key=lambda row: float(row[monitor]))
        info["best_epoch"] = int(best["epoch"]) + 1  # as in the checkpoint names
        info["best_val_loss"] = float(best["val_loss"])
        info["best_val_auc"] = max(float(row["val_auc"]) for row in rows)
        checkpoints = sorted(run.path.glob(f"ckpt_{info['best_epoch']:03d}_*.keras"))
        info["best_checkpoint"] = checkpoints[-1].name if checkpoints else None
        log.info(
            "%s epoch %d%s: val_loss %.4f, val_auc %.4f -> %s",
            "final" if info["select"] == "final" else "best",
            info["best_epoch"],
            " (--select final)" if info["select"] == "final" else f" by {monitor}",
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


# ---------------------------------------------------------------------------- validation predictions
def predict_hdf5(model, cohort: Cohort, indices: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """P(PCNSL) of the HDF5 images `indices` (record order), unaugmented: the validation
    pipeline of training (make_dataset), so the pixels are those the model was scored on."""
    if len(indices) == 0:
        return np.zeros(0, np.float32)
    dataset = make_dataset(HDF5Images(cohort.hdf5, cohort.size), indices, cohort.labels, batch_size)
    return model.predict(dataset.map(lambda images, labels: images), verbose=0)[:, 0]


def write_split_predictions(
    run_path: Path, cohort: Cohort, subset: np.ndarray, checkpoint: str | None, batch_size: int = 32
) -> list[Path]:
    """RUN/val_predictions.csv, and for a cross-validation fold RUN/test_predictions.csv:
    path,prob_gbm,prob_pcnsl (step2's columns, full precision), label (0 GBM, 1 PCNSL) and
    patient_id (the group, class-qualified) of every validation (test) slice in HDF5 order,
    predicted once by the run's chosen checkpoint (`checkpoint`, a file name in
    `run_path`) as step2 would load it. Test last: it marks a fold as finished."""
    if checkpoint is None:
        log.warning("warning: %s: no best checkpoint, so no %s", run_path, VAL_PREDICTIONS_CSV)
        return []
    model = gbmpcnsl.checkpoints.load_model_for_inference(run_path / checkpoint)
    val, test = np.flatnonzero(subset == VAL), np.flatnonzero(subset == TEST)
    probs = np.split(predict_hdf5(model, cohort, np.concatenate([val, test]), batch_size), [len(val)])
    written = []
    for indices, prob_pcnsl, filename, what in (
        (val, probs[0], VAL_PREDICTIONS_CSV, "validation"),
        (test, probs[1], TEST_PREDICTIONS_CSV, "test"),
    ):
        if what == "test" and len(indices) == 0:
            continue
        rows = []
        for index, prob in zip(indices, prob_pcnsl, strict=True):
            record, prob = cohort.records[index], float(prob)
            rows.append([record["path"], repr(1.0 - prob), repr(prob), record["label"], record["group"]])
        written.append(run_path / filename)
        write_csv(written[-1], list(PREDICTION_COLUMNS), rows, private=True)
        log.info("wrote %s (%d %s slices, %s)", written[-1], len(rows), what, checkpoint)
    return written


# ---------------------------------------------------------------------------- one split
def train_split(
    config: TrainConfig,
    run: RunFolder,
    cohort: Cohort,
    subset: np.ndarray,
    distribution: Distribution,
    callbacks: list | None = None,
    traced=None,
):
    """Build (on `traced`: see build_compiled_model), open the run folder, fit, finish, for
    one split of the cohort (the single split, or one fold: `subset` as data.split_subsets
    gives it). Returns the model as it is after the last epoch."""
    traced = None if distribution.name == MULTI_WORKER else traced  # WorkerLoop traces anew
    model = build_compiled_model(config, cohort.size, distribution, traced)
    info, first_epoch = open_run_folder(config, run, cohort, subset, distribution)
    if distribution.name == MULTI_WORKER:  # Keras's fit fails there
        loop = WorkerLoop(config, model, run, cohort, subset, distribution, first_epoch)
        early_stopping = loop.fit(training_callbacks, callbacks)
    else:
        early_stopping = fit(config, model, run, cohort, subset, distribution, first_epoch, callbacks)
    if distribution.is_chief:
        finish_run(run, info, early_stopping)
        write_split_predictions(run.path, cohort, subset, info.get("best_checkpoint"))
        discard(run.replaced)  # the run --overwrite replaced, now that this one is in place
    return model


def train(config: TrainConfig, callbacks: list | None = None):
    """Train one split as `config` says (see cross_validation for --folds); returns the
    model as it is after the last epoch. `callbacks` are added after ours (tests use them
    to look at the in-memory model)."""
    run = check_run_folder(config, config.run_dir, writes_run_folder(config))
    cohort = read_cohort(config.hdf5, config.size)
    subset = split_subsets(cohort.records, config.val_fraction, config.seed)
    log_split(cohort, subset)
    check_resume(config, run, cohort, subset)
    distribution = start_tensorflow(config)
    return train_split(config, run, cohort, subset, distribution, callbacks)
