"""gbmpcnsl.training through step1: the learning-rate schedule, --monitor (best epoch,
checkpoint names, run.json), the warning for a run that did not learn, --batchnorm-momentum
and --tensorboard (event files that hold the epoch losses); and trainings in a process of
their own: reproducibility with --deterministic, and MirroredStrategy on two logical CPUs
(MultiWorkerMirroredStrategy: test_multiworker.py; --resume after a SIGKILL: test_runs.py)."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import TINY, add_fit_callbacks, fake_notop_weights, write_h5

import step1_train_model as step1
from gbmpcnsl import training
from gbmpcnsl.adam import use_fused_adam_kernel
from gbmpcnsl.augment import StrongAugmentation
from gbmpcnsl.config import RESUME_MUST_MATCH
from gbmpcnsl.runs import RunFolder
from gbmpcnsl.training import finish_run

ROOT = Path(__file__).resolve().parent.parent
HEADER = ["epoch", "accuracy", "auc", "learning_rate", "loss", "val_accuracy", "val_auc", "val_loss"]


def fake_run(tmp_path: Path, val_losses, val_aucs, monitor: str) -> tuple[RunFolder, dict]:
    """A run folder with a history.csv of these validation values and one checkpoint per epoch."""
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    with open(run.history_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        for epoch, (loss, auc) in enumerate(zip(val_losses, val_aucs, strict=True)):
            writer.writerow([epoch, 0.9, 0.95, 1e-3, 0.2, 0.8, auc, loss])
            value = loss if monitor == "val_loss" else auc
            (run.path / f"ckpt_{epoch + 1:03d}_{value:.4f}.keras").write_text("x")
    return run, {"arguments": {"monitor": monitor}}


def adam_steps(fused: bool, optimizer_class=None) -> tuple[list, object]:
    """20 steps of a Keras Adam (3e-3) on three variables, with gradients from 1e-6 to 10;
    fused: after use_fused_adam_kernel. Returns the variables and the step's graph."""
    import keras
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    shapes = [(3, 3, 8, 16), (16,), (5,)]
    start = [rng.normal(size=shape).astype(np.float32) for shape in shapes]
    variables = [keras.Variable(value) for value in start]
    optimizer = keras.optimizers.Adam(3e-3)
    if optimizer_class is not None:
        optimizer = optimizer_class(optimizer)
    optimizer.build(variables)
    if fused:
        assert use_fused_adam_kernel(optimizer)
    step = tf.function(lambda grads: optimizer.apply_gradients(zip(grads, variables, strict=True)))
    for _ in range(20):
        grads = [rng.normal(size=shape).astype(np.float32) * 10 ** rng.uniform(-6, 1) for shape in shapes]
        step([tf.constant(grad) for grad in grads])
    graph = step.get_concrete_function([tf.TensorSpec(shape, tf.float32) for shape in shapes]).graph
    return [variable.numpy() for variable in variables], graph


def test_fused_adam_kernel_gives_keras_adams_update():
    """The fused kernel (one ResourceApplyAdam per variable) against Keras's own Adam:
    the same variables after 20 steps, to float32 rounding, with fewer ops; the optimizer
    keeps Keras's class and config; mixed precision's LossScaleOptimizer gets it inside."""
    import keras
    import numpy as np

    keras_adam, keras_graph = adam_steps(fused=False)
    fused, fused_graph = adam_steps(fused=True)
    for expected, got in zip(keras_adam, fused, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    kernels = [op.type for op in fused_graph.get_operations()].count("ResourceApplyAdam")
    assert kernels == 3 and "ResourceApplyAdam" not in {op.type for op in keras_graph.get_operations()}
    assert len(fused_graph.get_operations()) < 0.6 * len(keras_graph.get_operations())
    scaled = [adam_steps(fused, keras.optimizers.LossScaleOptimizer)[0] for fused in (False, True)]
    for expected, got, unscaled in zip(*scaled, keras_adam, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        assert not np.allclose(got, unscaled, rtol=1e-3)  # its gradients were divided by the loss scale

    optimizer = keras.optimizers.Adam(1e-3)
    assert use_fused_adam_kernel(optimizer)
    assert keras.optimizers.serialize(optimizer)["class_name"] == "Adam"
    assert not use_fused_adam_kernel(keras.optimizers.Adam(amsgrad=True))
    assert not use_fused_adam_kernel(keras.optimizers.SGD())


@pytest.mark.parametrize(
    ("monitor", "best_epoch"),
    [("val_loss", 2), ("val_auc", 4)],  # lowest val_loss at epoch 2, first highest val_auc at 4
)
def test_finish_run_picks_the_best_epoch_by_the_monitored_metric(tmp_path, monitor, best_epoch, caplog):
    val_losses = [0.69, 0.40, 0.55, 0.61, 0.70]
    val_aucs = [0.50, 0.70, 0.80, 0.90, 0.90]
    run, info = fake_run(tmp_path, val_losses, val_aucs, monitor)
    with caplog.at_level("INFO", logger="gbmpcnsl"):
        finish_run(run, info, None)
    saved = json.loads(run.run_json.read_text())
    assert saved["monitor"] == monitor and saved["best_epoch"] == best_epoch
    assert saved["best_val_loss"] == val_losses[best_epoch - 1]
    assert saved["best_val_auc"] == 0.90  # the best over all epochs
    assert saved["best_checkpoint"].startswith(f"ckpt_{best_epoch:03d}_")
    assert "warning" not in caplog.text


@pytest.mark.parametrize(
    ("val_losses", "val_aucs", "reason"),
    [
        ([0.69, 0.70, 0.72], [0.5, 0.8, 0.9], "the best epoch by val_loss is the first"),
        ([0.69, 0.60, 0.65], [0.5, 0.55, 0.58], "the best validation AUC is 0.580 (< 0.6)"),
    ],
)
def test_a_run_that_did_not_learn_gets_a_one_line_warning(tmp_path, val_losses, val_aucs, reason, caplog):
    run, info = fake_run(tmp_path, val_losses, val_aucs, "val_loss")
    with caplog.at_level("INFO", logger="gbmpcnsl"):
        finish_run(run, info, None)
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("warning")]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert reason in warnings[0] and "--augmentation strong" in warnings[0]
    assert "--learning-rate" in warnings[0] and "more data" in warnings[0]


def test_monitor_flag_choices(capsys, step1_config):
    assert step1_config(["a", "b"]).monitor == "val_loss"  # as the original
    with pytest.raises(SystemExit):
        step1.main(["--monitor", "loss", "a", "b"])
    assert "invalid choice: 'loss'" in capsys.readouterr().err
    assert {"monitor", "batchnorm_momentum"} <= set(RESUME_MUST_MATCH)


def read_event_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar summary in a TensorBoard log folder, read with tensorboard's own reader."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    accumulator.Reload()
    return {
        tag: [(event.step, float(tf.make_ndarray(event.tensor_proto))) for event in accumulator.Tensors(tag)]
        for tag in accumulator.Tags()["tensors"]
    }


@pytest.mark.slow
def test_imagenet_strong_val_auc_tensorboard_and_batchnorm_momentum_run(tmp_path, monkeypatch, capfd):
    """One step1 run of many settings: --weights imagenet (served from a fake cache file) on
    a file in the original layout, --augmentation strong, --monitor val_auc,
    --batchnorm-momentum and --tensorboard. Each .keras checkpoint, loaded by the inference
    loader, predicts what the model predicted at the end of its epoch."""
    import keras
    import numpy as np
    from keras.src.applications import efficientnet

    from gbmpcnsl.checkpoints import load_model_for_inference

    notop = fake_notop_weights(tmp_path / "efficientnetb0_notop.h5")
    monkeypatch.setattr(efficientnet.file_utils, "get_file", lambda *args, **kwargs: str(notop))
    h5_path = write_h5(tmp_path / "original.h5", patients=(4, 4), slices=2, groups=False)
    probe = np.stack([np.full((32, 32, 3), v, np.float32) for v in (30, 90, 160, 230)])
    probe[1, :16] = 10  # not all flat: exercise the convolutions
    predictions: dict[int, np.ndarray] = {}  # 1-based epoch -> in-memory model's output

    class RecordPredictions(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            predictions[epoch + 1] = self.model.predict(probe, verbose=0)

    add_fit_callbacks(monkeypatch, last=(RecordPredictions(),))
    run_dir = tmp_path / "run"
    argv = ["--augmentation", "strong", "--rotation-degrees", "20", "--epochs", "2", "--weights", "imagenet"]
    argv += ["--backbone", "efficientnetb0", "--monitor", "val_auc", "--batchnorm-momentum", "0.9"]
    argv += ["--learning-rate", "1e-3", "--tensorboard", "--seed", "2", str(h5_path), str(run_dir)]
    assert step1.main(argv) == 0
    assert "has no patient groups (original layout)" in capfd.readouterr().err
    with open(run_dir / "split.csv", newline="") as handle:
        split = list(csv.DictReader(handle))
    assert len({r["group"] for r in split}) == len(split) == 16  # each slice its own group
    with open(run_dir / "history.csv", newline="") as handle:
        history = list(csv.DictReader(handle))
    assert len(history) == 2
    run = json.loads((run_dir / "run.json").read_text())
    assert run["arguments"]["augmentation"] == "strong" and run["arguments"]["rotation_degrees"] == 20
    assert run["arguments"]["scale"] == StrongAugmentation().scale
    assert run["monitor"] == "val_auc" and run["arguments"]["batchnorm_momentum"] == 0.9
    val_aucs = [float(row["val_auc"]) for row in history]
    assert run["best_val_auc"] == max(val_aucs)
    assert run["best_epoch"] == val_aucs.index(max(val_aucs)) + 1

    # Checkpoints carry the monitored value: written on each strict improvement of val_auc,
    # each predicting what the in-memory model predicted at the end of its epoch.
    names = sorted(p.name for p in run_dir.glob("ckpt_*.keras"))
    assert names[0] == f"ckpt_001_{val_aucs[0]:.4f}.keras"
    assert all(re.fullmatch(r"ckpt_\d{3}_[01]\.\d{4}\.keras", name) for name in names)
    assert run["best_checkpoint"] == names[-1]
    for name in names:
        loaded = load_model_for_inference(run_dir / name)
        np.testing.assert_allclose(loaded.predict(probe, verbose=0), predictions[int(name[5:8])], atol=1e-5)
    momenta = {
        layer.momentum
        for layer in loaded._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization)
    }
    assert momenta == {0.9}
    # The (fake) ImageNet weights were the starting point: the stem kernel moved only a little.
    stem = loaded.get_layer("stem_conv").get_weights()[0]
    start = keras.applications.EfficientNetB0(include_top=False, weights=str(notop), input_shape=(32, 32, 3))
    assert np.corrcoef(stem.ravel(), start.get_layer("stem_conv").get_weights()[0].ravel())[0, 1] > 0.9

    # TensorBoard: one event file per side, holding the epoch losses and the learning rate.
    train = read_event_scalars(run_dir / "tensorboard" / "train")
    validation = read_event_scalars(run_dir / "tensorboard" / "validation")
    for scalars, column in ((train["epoch_loss"], "loss"), (validation["epoch_loss"], "val_loss")):
        assert [step for step, _ in scalars] == [0, 1]
        assert [value for _, value in scalars] == pytest.approx(
            [float(row[column]) for row in history], rel=1e-6
        )
    learning_rates = [value for _, value in train["epoch_learning_rate"]]
    assert learning_rates == pytest.approx([float(row["learning_rate"]) for row in history])
    assert all(math.isclose(rate, 1e-3, rel_tol=1e-6) for rate in learning_rates)


def history_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "history.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def run_python(code: str, tmp_path: Path, env: dict | None = None, timeout: int = 300):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# Python run in a child before step1: records, per training run, whether op determinism is
# on at each training batch (`seen`, printed as the child's last stdout line).
LOOK_AT_DETERMINISM = """
import atexit, json
from gbmpcnsl import training
from gbmpcnsl.adam import use_fused_adam_kernel
from tensorflow.python.framework.config import is_op_determinism_enabled  # not in tf.config

seen = []
real_training_callbacks = training.training_callbacks

def with_a_look_at_determinism(*args, **kwargs):
    import keras

    class LookAtDeterminism(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen[-1].append(is_op_determinism_enabled())

    callbacks, early_stopping = real_training_callbacks(*args, **kwargs)
    seen.append([])
    return [*callbacks, LookAtDeterminism()], early_stopping

training.training_callbacks = with_a_look_at_determinism
atexit.register(lambda: print(json.dumps(seen)))
"""


@pytest.mark.slow  # three trainings in a process of their own
@pytest.mark.timeout(660)  # a subprocess of up to 600 s
def test_mirrored_then_deterministic_run_replayed_from_its_run_json_into_mlflow(tmp_path, monkeypatch):
    """In one process with two logical CPUs: a --distribute mirrored run (two replicas)
    without --deterministic, the control: op determinism is off during its fit. Then a
    run with --deterministic, and `step1 --config RUN/run.json` with the original moved
    aside and the replay written where it was: op determinism on during both fits, the
    same history, split and checkpoint names, and a run.json that is the original's but
    for the times and the command line. The replay also goes to a local MLflow store
    (--mlflow): settings, command, each epoch's metrics, the run folder."""
    h5_path = write_h5(tmp_path / "d.h5", patients=(4, 4), slices=3)
    mirrored_dir, run_dir = tmp_path / "mirrored", tmp_path / "run"
    original, store = tmp_path / "original", tmp_path / "mlruns"
    mirrored = [
        "--augmentation",
        "base",
        "--epochs",
        "1",
        *TINY,
        "--batch-size",
        "4",
        "--distribute",
        "mirrored",
    ]
    argv = ["--augmentation", "base_and_noise", "--epochs", "2", *TINY, "--seed", "3", "--batch-size", "4"]
    replay_argv = ["--config", str(original / "run.json"), "--mlflow", str(store), str(h5_path), str(run_dir)]
    result = run_python(
        LOOK_AT_DETERMINISM
        + f"""
import os
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import step1_train_model as step1
assert step1.main({mirrored!r} + [{str(h5_path)!r}, {str(mirrored_dir)!r}]) == 0
assert not is_op_determinism_enabled()
assert step1.main({argv!r} + ["--deterministic", {str(h5_path)!r}, {str(run_dir)!r}]) == 0
os.rename({str(run_dir)!r}, {str(original)!r})
assert step1.main({replay_argv!r}) == 0
""",
        tmp_path,
        timeout=600,
    )
    assert "batch size 4 per replica x 2 replica(s) = global batch 8 (MirroredStrategy)" in result.stderr
    run = json.loads((mirrored_dir / "run.json").read_text())
    assert run["replicas"] == 2 and run["global_batch_size"] == 8 and run["strategy"] == "MirroredStrategy"
    assert len(history_rows(mirrored_dir)) == 1 and list(mirrored_dir.glob("ckpt_001_*.keras"))
    seen = json.loads(result.stdout.splitlines()[-1])
    assert len(seen) == 3 and seen[0] and not any(seen[0])  # the control: off without the flag
    assert all(seen[1:]) and all(all(run) for run in seen[1:])
    first, replay = (json.loads((folder / "run.json").read_text()) for folder in (original, run_dir))
    assert first["command"][0] == "step1_train_model.py" and first["command"][-1] == str(run_dir)
    assert replay["command"][1:3] == ["--config", str(original / "run.json")]
    assert replay["arguments"]["batch_size"] == 4 and replay["arguments"]["deterministic"]
    assert first["strategy"] == replay["strategy"] == "default strategy" and first["replicas"] == 1
    for info in (first, replay):
        for key in ("command", "start_time", "end_time"):
            del info[key]
    assert replay == first
    history = (run_dir / "history.csv").read_text()
    assert len(history.splitlines()) == 3 and history == (original / "history.csv").read_text()
    assert (run_dir / "split.csv").read_text() == (original / "split.csv").read_text()
    names = [sorted(p.name for p in folder.glob("ckpt_*")) for folder in (original, run_dir)]
    assert names[0] == names[1]

    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as gbmpcnsl.tracking opts in for step1
    client = mlflow.MlflowClient(tracking_uri=store.resolve().as_uri())
    (logged,) = client.search_runs([client.get_experiment_by_name("gbm-pcnsl").experiment_id])
    assert logged.info.run_name == "run" and logged.info.status == "FINISHED"
    assert logged.data.params["batch_size"] == "4" and logged.data.params["deterministic"] == "True"
    assert logged.data.tags["command"] == " ".join(["step1_train_model.py", *replay_argv])
    val_loss = client.get_metric_history(logged.info.run_id, "val_loss")
    assert [metric.step for metric in val_loss] == [0, 1]
    assert min(metric.value for metric in val_loss) == pytest.approx(replay["best_val_loss"])
    artifacts = {artifact.path for artifact in client.list_artifacts(logged.info.run_id)}
    assert {"run.json", "history.csv", "split.csv", replay["best_checkpoint"]} <= artifacts
    assert "backup" not in artifacts


def test_learning_rate_schedule():
    assert training.learning_rate_at(0) == training.learning_rate_at(49) == 1e-4
    assert training.learning_rate_at(50) == pytest.approx(1e-4)
    assert training.learning_rate_at(51) == pytest.approx(1e-4 * math.exp(-0.015))  # decay from epoch 50
    assert training.learning_rate_at(150) == pytest.approx(1e-4 * math.exp(-1.5))
    assert training.learning_rate_at(60, initial=3e-4) == pytest.approx(3e-4 * math.exp(-0.15))
