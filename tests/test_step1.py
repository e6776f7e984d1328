"""step1: command line, split by patient, augmentations, the tf.data stream, the run folder
written by the session's tiny training run, and the ImageNet weights' offline failure
(training from them, and checkpoint fidelity: test_training.py)."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import gray_batch, write_h5

import step1_train_model as step1
from gbmpcnsl.augment import augment_image
from gbmpcnsl.data import HDF5Images, make_dataset, split_by_group
from gbmpcnsl_common import UserError


# ---------------------------------------------------------------------------- command line
def test_default_backbone_is_efficientnetb4(step1_config):
    """The paper's EfficientNetB4 is step1's default (the session's trained_run is a B0, for
    speed: a B4 is only configured here, never built)."""
    assert step1_config(["a.h5", "run"]).backbone == "efficientnetb4"
    assert step1_config(["--backbone", "efficientnetb0", "a.h5", "run"]).backbone == "efficientnetb0"


def test_config_file_gives_defaults_that_flags_override(step1_config, tmp_path, capsys):
    """--config: a run.json's "arguments" (or a plain JSON object of settings) are defaults;
    flags on the command line win; the command line itself is kept for run.json."""
    run_json = tmp_path / "run.json"
    arguments = {"hdf5": "old.h5", "run_dir": "old", "epochs": 7, "size": [48, 40], "xla": True}
    run_json.write_text(json.dumps({"arguments": {**arguments, "resume": True, "weights": "none"}}))
    config = step1_config(["--config", str(run_json), "--epochs", "3", "a.h5", "run"])
    assert (config.epochs, config.size, config.xla, config.weights) == (3, (48, 40), True, "none")
    assert (config.hdf5, config.run_dir, config.resume) == (Path("a.h5"), Path("run"), False)
    assert config.command == (
        "step1_train_model.py",
        "--config",
        str(run_json),
        "--epochs",
        "3",
        "a.h5",
        "run",
    )
    plain = tmp_path / "settings.json"
    plain.write_text(json.dumps({"batch-size": 4, "monitor": "val_auc"}))
    config = step1_config(["--config", str(plain), "a.h5", "run"])
    assert (config.batch_size, config.monitor, config.epochs) == (4, "val_auc", 300)
    for content, message in (
        ({"epoch": 3}, f"--config {plain}: 'epoch' is not a step1 setting"),
        ({"epochs": 0}, "argument --epochs: 0: expected an integer >= 1"),
        ([1], f"--config {plain}: expected a JSON object of settings or a run.json"),
    ):
        plain.write_text(json.dumps(content))
        with pytest.raises(SystemExit) as exit_info:
            step1.main(["--config", str(plain), "a.h5", "run"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("usage: ") and message in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--val-fraction", "0"], "--val-fraction: 0: expected a fraction between 0 and 1"),
        (["--epochs", "0"], "expected an integer >= 1"),
        (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    ],
)
def test_bad_options_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        step1.main(["--augmentation", "none", *argv, "data.h5", "run"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_expected_failures_are_one_line(tmp_path, capfd):
    h5_path = write_h5(tmp_path / "d.h5")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt_001_0.5000.keras").write_text("x")
    with h5py.File(tmp_path / "two.h5", "w") as h5file:  # two sizes and no --size
        for key in ("32_32", "64_64"):
            for folder in ("gbm", "pcnsl"):
                h5file.create_dataset(f"{folder}/{key}/features", data=np.zeros((2, 4, 4, 3), np.uint8))
    cases = [
        ([str(tmp_path / "missing.h5"), str(tmp_path / "new")], "missing.h5: no such file"),
        ([str(h5_path), str(tmp_path / "run")], "run: exists; pick a new run folder"),
        ([str(h5_path), str(tmp_path / "run"), "--overwrite"], "--overwrite only replaces a run folder"),
        ([str(h5_path), str(tmp_path / "new"), "--resume"], "no run.json, nothing to resume"),
        ([str(tmp_path / "two.h5"), str(tmp_path / "new")], "holds several sizes (32 32, 64 64)"),
        ([str(h5_path), str(tmp_path / "new"), "--size", "64", "64"], "no images of size 64 64"),
    ]
    for argv, message in cases:
        assert step1.main(["--augmentation", "none", *argv]) == 2
        captured = capfd.readouterr()
        assert message in captured.err
        assert "Traceback" not in captured.err and captured.out == ""
    assert (tmp_path / "run" / "ckpt_001_0.5000.keras").exists()  # nothing overwritten
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------- split
def records_for(groups_per_class: dict[int, list[int]]) -> list[dict]:
    """Records with group sizes given per class: {0: [3, 5, ...], 1: [...]}."""
    records = []
    for label, sizes in groups_per_class.items():
        for number, size in enumerate(sizes):
            for s in range(size):
                records.append(
                    {"label": label, "group": f"c{label}g{number}", "path": f"{label}/{number}/{s}"}
                )
    return records


def test_split_by_patient_is_disjoint_stratified_and_seeded():
    rng = np.random.default_rng(1)
    records = records_for({0: list(rng.integers(1, 12, 60)), 1: list(rng.integers(1, 12, 40))})
    labels = np.array([r["label"] for r in records])
    is_val = split_by_group(records, 0.15, seed=3)
    train_groups = {r["group"] for r, v in zip(records, is_val, strict=True) if not v}
    val_groups = {r["group"] for r, v in zip(records, is_val, strict=True) if v}
    assert train_groups and val_groups and not train_groups & val_groups
    for label in (0, 1):  # stratified: each class holds out ~15% of its own slices
        fraction = is_val[labels == label].mean()
        assert 0.10 < fraction < 0.20, fraction
    assert np.array_equal(is_val, split_by_group(records, 0.15, seed=3))
    assert not np.array_equal(is_val, split_by_group(records, 0.15, seed=4))
    # The order of the records does not matter, only the seed.
    reordered = records[::-1]
    assert np.array_equal(is_val[::-1], split_by_group(reordered, 0.15, seed=3))


def test_split_keeps_a_group_on_each_side_and_refuses_single_group_classes():
    is_val = split_by_group(records_for({0: [5, 5], 1: [1, 9]}), 0.9, seed=0)
    assert is_val[:5].sum() + is_val[5:10].sum() == 5  # one of the two GBM groups
    assert 0 < is_val[10:].sum() < 10
    with pytest.raises(UserError, match="PCNSL: 1 patient group"):
        split_by_group(records_for({0: [3, 3], 1: [6]}), 0.15, seed=0)


# ---------------------------------------------------------------------------- augmentation


def augment(images, augmentation, seed=(5, 7)):
    """augment_image on each image, image i with the seed fold_in(seed, i) (as the
    training stream does), in one tf.data pass."""
    import tensorflow as tf

    base_seed = tf.constant(seed, tf.int64)
    dataset = tf.data.Dataset.from_tensor_slices(images).enumerate()
    dataset = dataset.map(
        lambda i, image: augment_image(
            image, tf.random.experimental.stateless_fold_in(base_seed, i), augmentation
        )
    )
    return next(iter(dataset.batch(len(images)))).numpy()


def test_augmentation_none_is_identity_and_results_are_seeded():
    images = gray_batch(8)
    assert np.array_equal(augment(images, "none"), images)
    first, again = augment(images, "base_and_noise"), augment(images, "base_and_noise")
    assert np.array_equal(first, again)
    assert not np.array_equal(first, augment(images, "base_and_noise", seed=(5, 8)))


def test_base_augmentation_flips_exactly_shifts_brightness_and_keeps_gray():
    images = gray_batch(400)
    out = augment(images, "base")
    assert out.dtype == np.float32 and out.shape == images.shape
    assert out.min() >= 0 and out.max() <= 255
    assert np.allclose(out[..., 0], out[..., 1], atol=1e-3)  # hue is a no-op on gray
    assert np.allclose(out[..., 0], out[..., 2], atol=1e-3)
    flips = {"none": 0, "lr": 0, "ud": 0, "both": 0}
    deltas = []
    for image, result in zip(images, out, strict=True):
        candidates = {"none": image, "lr": image[:, ::-1], "ud": image[::-1], "both": image[::-1, ::-1]}
        # Exactly one flip variant, shifted by one constant (the brightness delta).
        matches = [n for n, c in candidates.items() if np.ptp(result - c) < 1e-3]
        assert len(matches) == 1, matches
        flips[matches[0]] += 1
        deltas.append(float(np.mean(result - candidates[matches[0]])))
    assert all(70 < count < 130 for count in flips.values()), flips  # 100 expected each
    deltas = np.array(deltas)
    assert np.abs(deltas).max() <= 2.0 + 1e-3 and deltas.std() > 0.9  # U(-2, 2): std 1.15


def test_base_augmentation_turns_hue_of_colour_images():
    import colorsys

    red = np.zeros((200, 4, 4, 3), np.float32)
    red[..., 0], red[..., 1], red[..., 2] = 200, 60, 60
    out = augment(red, "base")
    hues = [colorsys.rgb_to_hsv(*(pixel / 255))[0] for pixel in out[:, 0, 0]]
    shift = (np.array(hues) + 0.5) % 1.0 - 0.5  # red has hue 0: signed turn in -0.5..0.5
    assert np.abs(shift).max() <= 0.25 + 1e-3 and np.abs(shift).max() > 0.2
    assert np.allclose(out.max(axis=-1), 200, atol=2.01)  # value (max) kept, up to brightness


def test_noise_appears_in_about_ten_percent_of_images():
    images = np.full((3000, 8, 8, 3), 128.0, np.float32)
    out = augment(images, "base_and_noise")
    per_image_std = (out - out.mean(axis=(1, 2, 3), keepdims=True)).std(axis=(1, 2, 3))
    noisy = per_image_std > 1.0
    assert 0.08 < noisy.mean() < 0.12, noisy.mean()
    assert per_image_std[noisy].mean() == pytest.approx(12.75, rel=0.05)
    assert per_image_std[~noisy].max() < 1e-3
    assert augment(np.full((500, 8, 8, 3), 250.0, np.float32), "base_and_noise").max() <= 255
    assert out.min() >= 0
    base = augment(images, "base")
    assert (base - base.mean(axis=(1, 2, 3), keepdims=True)).std(axis=(1, 2, 3)).max() < 1e-3


# ---------------------------------------------------------------------------- pipeline
def test_training_stream_reshuffles_every_epoch_and_visits_each_image_once(tmp_path):
    h5_path = write_h5(tmp_path / "d.h5", size=16, patients=(5, 5), slices=3)
    reader = HDF5Images(h5_path, (16, 16))
    labels = np.array([0] * 15 + [1] * 15, np.float32)
    train = np.array([i for i in range(30) if i % 5], np.int64)  # 24 records
    dataset = make_dataset(reader, train, labels, 5, "none", seed=1, epochs=(0, 3))
    batches = [(x.numpy(), y.numpy()) for x, y in dataset]
    assert [len(x) for x, _ in batches] == [5, 5, 5, 5, 4] * 3  # per epoch: ceil(24 / 5)
    assert batches[0][0].dtype == np.float32 and batches[0][1].shape == (5, 1)
    seen = np.concatenate([x[:, 0, 0, 0] for x, _ in batches]).astype(int)
    seen_labels = np.concatenate([y[:, 0] for _, y in batches])
    orders = seen.reshape(3, 24)
    for order in orders:
        assert sorted(order) == sorted(train)
    assert not np.array_equal(orders[0], orders[1])
    assert np.array_equal(seen_labels, labels[seen])
    # The same seed gives the same stream; epoch 2 alone equals epoch 2 of the full stream.
    resumed = make_dataset(reader, train, labels, 5, "none", seed=1, epochs=(2, 3))
    assert np.array_equal(np.concatenate([x[:, 0, 0, 0] for x, _ in resumed]).astype(int), orders[2])
    ordered = make_dataset(reader, train, labels, 7)
    assert np.concatenate([x[:, 0, 0, 0] for x, _ in ordered]).astype(int).tolist() == train.tolist()


# ---------------------------------------------------------------------------- the run folder
def test_trained_run_folder(trained_run, demo_h5):
    run = json.loads((trained_run / "run.json").read_text())
    assert run["backbone"] == "efficientnetb0" and run["input_shape"] == [64, 64, 3]
    assert run["arguments"]["backbone"] == "efficientnetb0"
    assert run["arguments"]["augmentation"] == "base" and run["arguments"]["epochs"] == 2
    assert run["arguments"]["weights"] == "none" and run["split_seed"] == 0
    assert run["hdf5_size_key"] == "64_64" and run["class_labels"] == {"gbm": 0, "pcnsl": 1}
    assert run["hdf5_sha256"] == hashlib.sha256(demo_h5.read_bytes()).hexdigest()
    assert run["status"] == "finished" and run["global_batch_size"] == 8
    assert {"tensorflow", "keras", "numpy", "h5py", "python"} <= set(run["versions"])
    assert run["start_time"] <= run["end_time"]

    with open(trained_run / "history.csv", newline="") as handle:
        history = list(csv.DictReader(handle))
    assert [row["epoch"] for row in history] == ["0", "1"]
    assert {"loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc", "learning_rate"} <= set(
        history[0]
    )
    val_losses = [float(row["val_loss"]) for row in history]
    assert run["best_val_loss"] == pytest.approx(min(val_losses))
    assert run["best_epoch"] == int(np.argmin(val_losses)) + 1

    checkpoints = sorted(p.name for p in trained_run.glob("ckpt_*.keras"))
    assert checkpoints[0] == f"ckpt_001_{val_losses[0]:.4f}.keras"
    assert run["best_checkpoint"] == checkpoints[-1]
    assert all(re.fullmatch(r"ckpt_\d{3}_\d\.\d{4}\.keras", name) for name in checkpoints)
    assert not (trained_run / "backup").exists()

    with open(trained_run / "split.csv", newline="") as handle:
        split = list(csv.DictReader(handle))
    with h5py.File(demo_h5, "r") as h5file:
        total = sum(h5file[f"{c}/64_64/features"].shape[0] for c in ("gbm", "pcnsl"))
    assert len(split) == total and set(split[0]) == {"path", "group", "label", "subset"}
    train_groups = {r["group"] for r in split if r["subset"] == "train"}
    val_groups = {r["group"] for r in split if r["subset"] == "val"}
    assert train_groups.isdisjoint(val_groups)
    assert {r["label"] for r in split if r["subset"] == "val"} == {"0", "1"}
    assert run["split"]["val_slices"] == sum(r["subset"] == "val" for r in split)


# ---------------------------------------------------------------------------- checkpoints


def test_imagenet_weights_offline_fail_at_once_with_the_cache_hint(tmp_path, monkeypatch, capsys):
    from keras.src.applications import efficientnet

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- [Errno -3]")

    monkeypatch.setattr(efficientnet.file_utils, "get_file", offline)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    h5_path = write_h5(tmp_path / "d.h5")
    argv = ["--augmentation", "none", "--backbone", "efficientnetb0", str(h5_path), str(tmp_path / "run")]
    assert step1.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --weights imagenet: could not load the efficientnetb0 ImageNet weights")
    assert str(tmp_path / "keras_home" / "models" / "efficientnetb0_notop.h5") in err
    assert "--weights /path/to/efficientnetb0_notop.h5" in err
    assert not (tmp_path / "run").exists()  # failed before anything was written
