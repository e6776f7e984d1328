"""Issue 14 (fidelity and hardening): the logit initializer, the ImageNet input scaling
against keras.applications' own graph, --normalization, the single-slice-group warning,
step5's checkpoint errors and atomic outputs, Ctrl-C in step2 and step5 (a real SIGINT),
and step1's --weights PATH, --resume refusals, --overwrite, --early-stopping, learning
rates and quiet stdout. Models are tiny (EfficientNetB0, 32x32, weights=None or a fake
notop file)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import TINY, fake_notop_weights, folder_snapshot, last_line, save_png, write_h5
from PIL import Image

import step0_convert_images_to_hdf5 as step0
import step1_train_model as step1
import step2_predict as step2
import step5_plot_grad_cam as step5
from gbmpcnsl import hdf5, training
from gbmpcnsl.config import RESUME_MUST_MATCH, TrainConfig
from gbmpcnsl.data import read_cohort
from gbmpcnsl.hdf5 import single_slice_groups_warning
from gbmpcnsl.model import IMAGENET_STDDEV_RGB, build_model
from gbmpcnsl_common import setup_logging

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- model (points 1, 5, 10)
def imagenet_like_notop_weights(path: Path, input_shape=(32, 32, 3)) -> Path:
    """An efficientnetb0_notop.h5 in the layout Keras downloads: random weights, with the
    ImageNet mean and stddev in Normalization (the stddev stored as the variance, as in
    Keras's own file: the cause of its extra Rescaling)."""
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    keras.utils.set_random_seed(7)
    backbone = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=input_shape)
    normalization = next(la for la in backbone.layers if isinstance(la, keras.layers.Normalization))
    count = normalization.get_weights()[2]
    normalization.set_weights([np.array([0.485, 0.456, 0.406]), np.array(IMAGENET_STDDEV_RGB), count])
    with h5py.File(path, "w") as h5file:
        legacy_h5_format.save_weights_to_hdf5_group(h5file, backbone)
    return path


def test_logit_kernel_initializer_is_the_originals(step1_config):
    import keras

    model = build_model("efficientnetb0", (32, 32, 3), weights=None)
    initializer = model.get_layer("logit").kernel_initializer
    assert isinstance(initializer, keras.initializers.VarianceScaling)
    config = initializer.get_config()
    assert config["scale"] == pytest.approx(1 / 3)
    assert config["mode"] == "fan_out" and config["distribution"] == "uniform"
    # fan_out of Dense(1) is 1: uniform in +-sqrt(3 * (1/3) / 1) = +-1.
    kernel = model.get_layer("logit").get_weights()[0]
    assert np.abs(kernel).max() <= 1.0 and np.abs(kernel).max() > 0.5
    # --head-init glorot (for training from scratch): Keras's default, +-sqrt(6 / (1280 + 1)).
    glorot = build_model("efficientnetb0", (32, 32, 3), weights=None, head_init="glorot")
    assert isinstance(glorot.get_layer("logit").kernel_initializer, keras.initializers.GlorotUniform)
    limit = np.sqrt(6 / (1280 + 1))
    assert limit / 2 < np.abs(glorot.get_layer("logit").get_weights()[0]).max() <= limit
    assert step1_config(["d.h5", "run"]).head_init == "original"
    assert step1_config(["d.h5", "run", "--head-init", "glorot"]).head_init == "glorot"


def test_imagenet_weights_match_keras_applications_own_graph(tmp_path, monkeypatch):
    """build_model(weights=<notop file>) folds Keras's extra ImageNet Rescaling into the
    Normalization variance: its avg_pool features equal those of keras.applications' own
    weights="imagenet" graph (its download redirected to the same file) within 1e-5 of
    their scale; without the fold (normalization="paper", the TF 2.5 scaling) they do not."""
    import keras
    from keras.src.applications import efficientnet

    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    notop = imagenet_like_notop_weights(tmp_path / "efficientnetb0_notop.h5")
    fetched = []
    monkeypatch.setattr(
        efficientnet.file_utils, "get_file", lambda *args, **kwargs: fetched.append(args) or str(notop)
    )
    reference = keras.applications.EfficientNetB0(
        include_top=False, weights="imagenet", input_shape=(32, 32, 3), pooling="avg"
    )
    assert fetched, "keras.applications did not ask for the ImageNet file"
    rescalings = [layer for layer in reference.layers if isinstance(layer, keras.layers.Rescaling)]
    assert len(rescalings) == 2  # 1/255, then the extra 1/sqrt(stddev)
    expected = reference.predict(images, verbose=0)
    scale = np.abs(expected).max()  # a random backbone's features are small (~1e-6)
    assert scale > 0

    def features(normalization: str) -> np.ndarray:
        model = build_model("efficientnetb0", (32, 32, 3), weights=str(notop), normalization=normalization)
        return keras.Model(model.inputs[0], model.get_layer("avg_pool").output).predict(images, verbose=0)

    assert np.abs(features("imagenet") - expected).max() <= 1e-5 * scale
    assert np.abs(features("paper") - expected).max() > 1e-3 * scale


def test_normalization_paper_is_the_tf25_scaling(tmp_path, step1_config):
    """paper: (x/255 - mean) / sqrt(std) -- the Normalization variance is the file's
    variance; imagenet: variance * stddev, i.e. (x/255 - mean) / std."""
    import keras

    notop = imagenet_like_notop_weights(tmp_path / "efficientnetb0_notop.h5")

    def normalization_variance(model) -> np.ndarray:
        layer = next(la for la in model.layers if isinstance(la, keras.layers.Normalization))
        return layer.get_weights()[1]

    paper = normalization_variance(build_model("efficientnetb0", (32, 32, 3), str(notop), "paper"))
    imagenet = normalization_variance(build_model("efficientnetb0", (32, 32, 3), str(notop), "imagenet"))
    np.testing.assert_allclose(imagenet, paper * np.asarray(IMAGENET_STDDEV_RGB), rtol=1e-6)
    assert not np.allclose(imagenet, paper)
    # Without ImageNet weights there is nothing to scale.
    none = normalization_variance(build_model("efficientnetb0", (32, 32, 3), None, "paper"))
    np.testing.assert_array_equal(
        none, normalization_variance(build_model("efficientnetb0", (32, 32, 3), None))
    )
    assert "normalization" in RESUME_MUST_MATCH
    assert step1_config(["--normalization", "paper", "a.h5", "run"]).normalization == "paper"
    with pytest.raises(SystemExit):
        step1.main(["--normalization", "tf25", "a.h5", "run"])


# ---------------------------------------------------------------------------- patient layout (point 3)
def test_single_slice_group_warning_rule():
    assert single_slice_groups_warning(["gbm/a", "gbm/a", "gbm/b", "gbm/b", "pcnsl/c"]) is None
    assert single_slice_groups_warning(["gbm/a", "gbm/b", "gbm/c", "pcnsl/d", "pcnsl/d"]) is not None
    assert single_slice_groups_warning([]) is None


def test_flat_class_folders_warn_in_step0_and_step1(tmp_path, capsys):
    flat = tmp_path / "flat"
    for label, folder in enumerate(("gbm", "pcnsl")):
        for index in range(4):
            save_png(flat / folder / f"img{index}.png", 40 * index + 20 * label)
    assert step0.main([str(flat), str(tmp_path / "flat.h5"), "--size", "16", "16", "--workers", "1"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "single slice" in line]
    assert len(warnings) == 1
    assert warnings[0].startswith("warning: 8 of 8 patient groups hold a single slice")
    assert "DATA/gbm/<patient>/<slice>.png" in warnings[0]
    setup_logging()  # step1's logging, to the captured stderr
    read_cohort(tmp_path / "flat.h5")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "single slice" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: 8 of 8 patient groups hold a single slice")

    # Patient folders (two slices each): no warning, in either step.
    nested = tmp_path / "nested"
    for label, folder in enumerate(("gbm", "pcnsl")):
        for index in range(4):
            save_png(nested / folder / f"p{index}" / "s1.png", 40 * index + 20 * label)
            save_png(nested / folder / f"p{index}" / "s2.png", 40 * index + 20 * label + 5)
    assert step0.main([str(nested), str(tmp_path / "nested.h5"), "--size", "16", "16", "--workers", "1"]) == 0
    assert "single slice" not in capsys.readouterr().err
    setup_logging()
    read_cohort(tmp_path / "nested.h5")
    assert "single slice" not in capsys.readouterr().err


def test_step0_warns_about_a_patient_folder_under_both_classes(tmp_path, capsys):
    data = tmp_path / "data"
    for folder in ("gbm", "pcnsl"):
        for patient in ("001", f"{folder}_only"):
            save_png(data / folder / patient / "s1.png", 50)
            save_png(data / folder / patient / "s2.png", 90)
    assert step0.main([str(data), str(tmp_path / "out.h5"), "--size", "16", "16", "--workers", "1"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "under both" in line]
    assert warnings == [
        "warning: patient folder 001 is under both gbm/ and pcnsl/; kept as two patients "
        "(gbm/001, pcnsl/001): rename one if they are the same person"
    ]
    with h5py.File(tmp_path / "out.h5", "r") as h5file:
        assert set(h5file["gbm/16_16/groups"].asstr()[:]) == {"gbm/001", "gbm/gbm_only"}
        assert set(h5file["pcnsl/16_16/groups"].asstr()[:]) == {"pcnsl/001", "pcnsl/pcnsl_only"}


# ---------------------------------------------------------------------------- step5 checkpoints (point 6)


def run_step(module, *argv) -> int:
    return module.main([str(a) for a in argv])


def test_step5_checkpoint_problems_are_step2s_one_line_errors(tiny_b0, tmp_path, capsys):
    import keras

    images = tiny_b0 / "images"
    no_logit = tmp_path / "no_logit.keras"
    inputs = keras.Input((32, 32, 3))
    hidden = keras.layers.Conv2D(4, 3, name="top_activation")(inputs)
    hidden = keras.layers.GlobalAveragePooling2D()(hidden)
    keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="predictions")(hidden)).save(
        no_logit
    )
    (tmp_path / "alone").mkdir()
    shutil.copy(tiny_b0 / "run" / "tiny.weights.h5", tmp_path / "alone" / "tiny.weights.h5")
    (tmp_path / "broken.keras").write_text("not a zip")
    (tmp_path / "model.pt").write_bytes(b"\x80\x02")
    for checkpoint in (
        tmp_path / "missing.keras",
        tmp_path / "alone" / "tiny.weights.h5",
        tmp_path / "broken.keras",
        tmp_path / "model.pt",
    ):
        out = tmp_path / "out" / checkpoint.stem
        assert run_step(step5, "--model-weights", checkpoint, "--output-dir", out, images) == 2
        err5 = capsys.readouterr().err
        assert run_step(step2, "--model-weights", checkpoint, images) == 2
        err2 = capsys.readouterr().err
        assert "Traceback" not in err5 and err5.strip().count("\n") == 0, err5
        assert err5.strip() == err2.strip() and str(checkpoint) in err5
        assert not out.exists()
    assert run_step(step5, "--model-weights", no_logit, "--output-dir", tmp_path / "o", images) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"error: {no_logit}: the model has no 'logit' layer (the Dense(1) output before the sigmoid, "
        "which Grad-CAM explains); expected a model built like step1's"
    ]
    # A layer that is not a feature map, and a batch size of 0, with all required arguments.
    argv = ("--model-weights", tiny_b0 / "tiny.keras", "--output-dir", tmp_path / "o")
    assert run_step(step5, *argv, "--layer", "avg_pool", images) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: --layer avg_pool: output shape (None, 1280) is not a convolutional feature map "
        "(batch, height, width, channels)"
    ]
    assert run_step(step5, *argv, "--batch-size", "0", images) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --batch-size 0: must be at least 1"]
    assert not (tmp_path / "o").exists()


def test_step5_accepts_weights_h5_with_run_json(tiny_b0, tmp_path):
    """The same heatmaps from the .keras model and its .weights.h5 + run.json."""
    images = tiny_b0 / "images"
    for name, checkpoint in (
        ("keras", tiny_b0 / "tiny.keras"),
        ("weights", tiny_b0 / "run" / "tiny.weights.h5"),
    ):
        args = ("--model-weights", checkpoint, "--output-dir", tmp_path / name, "--save-heatmaps")
        assert run_step(step5, *args, images) == 0
    from_keras, from_weights = (np.load(tmp_path / name / "heatmaps.npz") for name in ("keras", "weights"))
    assert sorted(from_keras.files) == sorted(from_weights.files) == ["s0.png", "s1.png", "s2.png"]
    for key in from_keras.files:
        np.testing.assert_allclose(from_weights[key], from_keras[key], atol=1e-5)
    assert any(from_keras[key].max() > 0 for key in from_keras.files)


@pytest.mark.slow
def test_step5_accepts_a_tf_keras_hdf5_checkpoint(tf_keras_b0_checkpoint, tmp_path):
    """A real tf.keras 2.x .hdf5 (tf-keras, EfficientNetB0 with a sigmoid Dense named
    "predictions" and no separate logit layer): step5 rebuilds step1's graph and explains it."""
    out_dir, images, _ = tf_keras_b0_checkpoint
    args = ("--model-weights", out_dir / "model.hdf5", "--output-dir", tmp_path / "o", "--save-heatmaps")
    assert run_step(step5, *args, *images) == 0
    heatmaps = np.load(tmp_path / "o" / "heatmaps.npz")
    assert len(heatmaps.files) == len(images)
    assert all(heatmaps[key].shape == (2, 2) and heatmaps[key].max() in (0.0, 1.0) for key in heatmaps.files)
    assert len(list((tmp_path / "o").rglob("*.png"))) == len(images)


# ---------------------------------------------------------------------------- atomic outputs (point 7)
def test_step5_interrupted_while_writing_leaves_no_partial_file(tiny_b0, tmp_path, monkeypatch, capsys):
    """A Ctrl-C in the middle of writing an overlay, then of writing heatmaps.npz: exit 130,
    the finished overlays complete, no partial or temporary file."""
    real_save = Image.Image.save
    calls = []

    def interrupted_save(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 2:
            fp.write(b"\x89PNG partial")  # half an image, then Ctrl-C
            raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", interrupted_save)
    out = tmp_path / "overlays"
    args = ("--model-weights", tiny_b0 / "tiny.keras", "--output-dir", out, "--batch-size", "1")
    assert run_step(step5, *args, tiny_b0 / "images") == 130
    assert last_line(capsys.readouterr().err) == "interrupted"
    assert sorted(p.name for p in out.iterdir()) == ["s0.png"]
    Image.open(out / "s0.png").verify()

    monkeypatch.setattr(Image.Image, "save", real_save)

    def interrupted_savez(file, *args, **kwargs):
        handle = open(file, "wb") if isinstance(file, str | Path) else file  # noqa: SIM115
        handle.write(b"PK partial")
        handle.flush()
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez_compressed", interrupted_savez)
    out = tmp_path / "heatmaps"
    args = ("--model-weights", tiny_b0 / "tiny.keras", "--output-dir", out, "--save-heatmaps")
    assert run_step(step5, *args, tiny_b0 / "images") == 130
    assert sorted(p.name for p in out.iterdir()) == ["s0.png", "s1.png", "s2.png"]


def wait_for(condition, process: subprocess.Popen, timeout: float = 240) -> None:
    """Poll `condition` until it holds (an event: a file, a line), the process ends or
    `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not condition() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the process ended before the event"
    assert condition(), "timed out waiting for the event"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.slow  # a TensorFlow subprocess or two
def test_ctrl_c_in_step2_exits_130_without_a_csv(tiny_b0, tmp_path):
    """A real SIGINT once the first result line is out; 20000 inputs cannot be done first
    (an uninterrupted run would exit 0 and fail the exit-code assertion)."""
    images = tmp_path / "images"
    images.mkdir()
    for index in range(20000):  # hard links: a big folder in a second, not a long command line
        os.link(tiny_b0 / "images" / "s0.png", images / f"s{index:05d}.png")
    csv_path = tmp_path / "out" / "predictions.csv"
    csv_path.parent.mkdir()
    command = [sys.executable, "step2_predict.py", "--model-weights", str(tiny_b0 / "tiny.keras")]
    process = subprocess.Popen(
        [*command, "--csv", str(csv_path), str(images)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = process.stdout.readline()  # blocks until the first batch is predicted
    assert first.startswith(str(images)), process.stderr.read()[-2000:]
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert last_line(err) == "interrupted" and "Traceback" not in err
    assert len(out.splitlines()) + 1 < 20000
    assert list(csv_path.parent.iterdir()) == []


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.slow  # a TensorFlow subprocess or two
def test_ctrl_c_in_step5_exits_130_with_whole_overlays_only(tiny_b0, tmp_path):
    """A real SIGINT once the first overlay exists; 400 inputs cannot be done first."""
    images = tmp_path / "images"
    images.mkdir()
    for index in range(400):
        os.link(tiny_b0 / "images" / "s1.png", images / f"s{index:03d}.png")
    out = tmp_path / "out"
    command = [sys.executable, "step5_plot_grad_cam.py", "--model-weights", str(tiny_b0 / "tiny.keras")]
    process = subprocess.Popen(
        [*command, "--output-dir", str(out), "--save-heatmaps", "--batch-size", "2", str(images)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: out.is_dir() and any(p.suffix == ".png" for p in out.iterdir()), process)
    process.send_signal(signal.SIGINT)
    stdout, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert last_line(err) == "interrupted" and "Traceback" not in err and stdout == ""
    written = sorted(out.iterdir())
    assert 1 <= len(written) < 400
    for path in written:  # whole PNGs only: no heatmaps.npz, no temporary file
        assert path.suffix == ".png" and not path.name.startswith(".")
        with Image.open(path) as overlay:
            overlay.load()


# ---------------------------------------------------------------------------- step1 (points 8, 10)
@pytest.mark.slow  # a TensorFlow subprocess or two
def test_step1_weights_path_errors_leave_no_run_folder(tmp_path, capsys):
    h5_path = write_h5(tmp_path / "d.h5")
    for weights, message in (
        (tmp_path / "missing_notop.h5", f"error: --weights {tmp_path / 'missing_notop.h5'}: no such file"),
        (h5_path, f"error: --weights {h5_path}: not a efficientnetb0 notop weights file"),
    ):
        argv = [
            "--backbone",
            "efficientnetb0",
            "--weights",
            str(weights),
            str(h5_path),
            str(tmp_path / "run"),
        ]
        result = subprocess.run(
            [sys.executable, "step1_train_model.py", *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 2 and result.stdout == ""
        assert "Traceback" not in result.stderr
        assert last_line(result.stderr).startswith(message), result.stderr[-1000:]
        assert not (tmp_path / "run").exists()


def test_step1_failed_checks_create_nothing_and_delete_nothing(tmp_path, capsys):
    """Argument, data and weights errors stop step1 before the run folder is created, and
    --overwrite deletes the old run only once the new one is known to start."""
    good = write_h5(tmp_path / "good.h5")
    one_patient = write_h5(tmp_path / "one.h5", patients=(1, 4))
    old = tmp_path / "old_run"
    old.mkdir()
    (old / "run.json").write_text('{"status": "finished"}')
    (old / "ckpt_001_0.5000.keras").write_text("old checkpoint")
    snapshot = folder_snapshot(old)
    cases = [
        ([*TINY, str(one_patient), str(tmp_path / "new")], "GBM: 1 patient group(s)"),
        ([*TINY, str(tmp_path / "missing.h5"), str(tmp_path / "new")], "missing.h5: no such file"),
        ([*TINY, "--overwrite", str(one_patient), str(old)], "GBM: 1 patient group(s)"),
        ([*TINY, "--overwrite", "--size", "8", "8", str(good), str(old)], "no images of size 8 8"),
        (
            [
                "--backbone",
                "efficientnetb0",
                "--weights",
                str(tmp_path / "nope.h5"),
                "--overwrite",
                str(good),
                str(old),
            ],
            "nope.h5: no such file",
        ),
    ]
    for argv, message in cases:
        assert step1.main(argv) == 2
        assert message in last_line(capsys.readouterr().err)
        assert not (tmp_path / "new").exists()
        assert folder_snapshot(old) == snapshot


def test_step0_failure_and_interrupt_leave_nothing_new(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    for folder in ("gbm", "pcnsl"):
        for patient in range(2):
            save_png(data / folder / f"p{patient}" / "s.png", 60 + patient)
    (data / "pcnsl" / "p1" / "notes.txt").write_text("x")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = [str(data), str(out_dir / "x.h5"), "--size", "8", "8", "--workers", "1"]
    assert step0.main([*argv, "--strict"]) == 2  # a data check fails
    assert list(out_dir.iterdir()) == []

    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(hdf5, "write_image", ctrl_c)
    assert step0.main(argv) == 130  # Ctrl-C while writing
    assert list(out_dir.iterdir()) == []
    assert last_line(capsys.readouterr().err) == "interrupted"


def history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_step1_resume_refusals_then_resume_with_more_epochs(tmp_path, monkeypatch, capfd):
    """An interrupted run (Ctrl-C after its first epoch): every --resume refusal leaves it
    as it is; a resume with a raised --epochs finishes it. The learning rates in
    history.csv are the schedule's (decay from epoch 1 here), and stdout stays empty."""
    import keras

    monkeypatch.setattr(training, "LR_CONSTANT_EPOCHS", 1)  # the decay, within 3 epochs
    h5_path = write_h5(tmp_path / "d.h5", patients=(3, 3), slices=2)
    run_dir = tmp_path / "run"

    class CtrlCAfterFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise KeyboardInterrupt

    config = TrainConfig(
        h5_path, run_dir, backbone="efficientnetb0", weights="none", epochs=2, learning_rate=1e-3
    )
    with pytest.raises(KeyboardInterrupt):
        training.train(config, callbacks=[CtrlCAfterFirstEpoch()])
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
    assert len(history(run_dir)) == 1 and (run_dir / "backup").is_dir()
    snapshot = folder_snapshot(run_dir)
    capfd.readouterr()

    changed_pixels = tmp_path / "pixels.h5"
    shutil.copy(h5_path, changed_pixels)
    with h5py.File(changed_pixels, "r+") as h5file:
        h5file["gbm/32_32/features"][0, 5, 5] = 7
    changed_groups = tmp_path / "groups.h5"
    shutil.copy(h5_path, changed_groups)
    with h5py.File(changed_groups, "r+") as h5file:
        # The same patients, two of their slices swapped: another split.csv.
        h5file["gbm/32_32/groups"][...] = np.array(
            ["gbm_p0", "gbm_p1", "gbm_p0", "gbm_p1", "gbm_p2", "gbm_p2"], object
        )
    with_two_sizes = tmp_path / "sizes.h5"
    shutil.copy(h5_path, with_two_sizes)
    with h5py.File(with_two_sizes, "r+") as h5file:
        for folder in ("gbm", "pcnsl"):
            h5file.copy(h5file[f"{folder}/32_32"], h5file[folder], name="33_33")
    resume = [*TINY, "--epochs", "3", "--learning-rate", "1e-3", "--resume"]
    refusals = [
        ([*resume, str(changed_pixels), str(run_dir)], "its content changed since the run started"),
        (
            [*resume, "--size", "33", "33", str(with_two_sizes), str(run_dir)],
            "needs the run's own image size 32 32",
        ),
        ([*resume, str(changed_groups), str(run_dir)], "split.csv: differs from the split of"),
        ([*resume, "--mixed-precision", str(h5_path), str(run_dir)], "--mixed-precision False (now True)"),
        (
            [*resume, "--normalization", "paper", str(h5_path), str(run_dir)],
            "--normalization imagenet (now paper)",
        ),
        ([*resume, "--seed", "5", str(h5_path), str(run_dir)], "--seed 0 (now 5)"),
    ]
    for arguments, message in refusals:
        assert step1.main(arguments) == 2
        err = capfd.readouterr().err
        assert message in last_line(err), err[-1000:]
        assert folder_snapshot(run_dir) == snapshot

    assert step1.main([*resume, str(h5_path), str(run_dir)]) == 0
    captured = capfd.readouterr()
    assert captured.out == ""  # step1 writes nothing to stdout, also from TensorFlow
    rows = history(run_dir)
    assert [row["epoch"] for row in rows] == ["0", "1", "2"]
    for row in rows:
        assert float(row["learning_rate"]) == pytest.approx(
            training.learning_rate_at(int(row["epoch"]), 1e-3)
        )
    assert float(rows[2]["learning_rate"]) < float(rows[1]["learning_rate"])  # decayed after epoch 1
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "finished" and run["epochs_done"] == 3 and run["arguments"]["epochs"] == 3
    assert run["resumed"][0]["after_epoch"] == 1 and run["arguments"]["normalization"] == "imagenet"


@pytest.mark.slow
def test_step1_weights_path_overwrite_and_early_stopping(tmp_path, capfd):
    """--weights PATH through the command line, then --overwrite of that run with
    --early-stopping: the old run is gone, the new one records its settings."""
    import keras

    notop = fake_notop_weights(tmp_path / "efficientnetb0_notop.h5")
    h5_path = write_h5(tmp_path / "d.h5", patients=(3, 3), slices=2)
    run_dir = tmp_path / "run"
    argv = ["--backbone", "efficientnetb0", "--epochs", "1", str(h5_path), str(run_dir)]
    assert step1.main([*argv, "--weights", str(notop), "--normalization", "paper"]) == 0
    assert capfd.readouterr().out == ""
    first = json.loads((run_dir / "run.json").read_text())
    assert first["arguments"]["weights"] == str(notop) and first["arguments"]["normalization"] == "paper"
    from gbmpcnsl.checkpoints import load_model_for_inference

    loaded = load_model_for_inference(run_dir / first["best_checkpoint"])
    start = keras.applications.EfficientNetB0(include_top=False, weights=str(notop), input_shape=(32, 32, 3))
    stem, start_stem = (m.get_layer("stem_conv").get_weights()[0].ravel() for m in (loaded, start))
    assert np.corrcoef(stem, start_stem)[0, 1] > 0.9  # trained from the file's weights
    (run_dir / "notes.txt").write_text("belongs to the old run")

    assert step1.main([*TINY, "--epochs", "2", "--early-stopping", "1", "--overwrite", *argv[4:]]) == 0
    assert capfd.readouterr().out == ""
    assert not (run_dir / "notes.txt").exists()
    second = json.loads((run_dir / "run.json").read_text())
    assert second["start_time"] >= first["end_time"]
    assert second["arguments"]["early_stopping"] == 1 and second["arguments"]["weights"] == "none"
    rows = history(run_dir)
    losses = [float(row["val_loss"]) for row in rows]
    # Patience 1: stopped after the first epoch that did not improve, if any.
    worse = [i for i in range(1, len(losses)) if losses[i] >= min(losses[:i])]
    assert second["epochs_done"] == len(rows) == (worse[0] + 1 if worse else 2)
    assert second["stopped_early"] == bool(worse)
