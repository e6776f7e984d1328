"""gbmpcnsl.runs, the run folder of step1: created only once every check has passed,
--overwrite that deletes the old run only when the new one starts, the --resume refusals
that leave a run as it is, a resume with more epochs that is SIGKILLed and resumed again,
a resume of a run from before the newer settings, and the fallback from a broken backup
(tiny EfficientNetB0s, 32x32)."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import TINY, add_fit_callbacks, fake_notop_weights, folder_snapshot, last_line, write_h5

import step1_train_model as step1
from gbmpcnsl import training
from gbmpcnsl.config import RESUME_DEFAULTS, RESUME_MUST_MATCH, TrainConfig, jsonable
from gbmpcnsl.runs import backup_epoch, check_run_folder
from gbmpcnsl_common import UserError

ROOT = Path(__file__).resolve().parent.parent


def test_step1_weights_path_errors_leave_no_run_folder(tmp_path, capfd):
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
        assert step1.main(argv) == 2
        captured = capfd.readouterr()
        assert captured.out == ""
        assert "Traceback" not in captured.err
        assert last_line(captured.err).startswith(message), captured.err[-1000:]
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


def history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def kill_after_new_rows(processes, command: list[str], run_dir: Path, rows: int, log: Path) -> None:
    """Start `command` (tracked by the `processes` fixture); SIGKILL it once history.csv
    holds more than `rows` rows (mid-training)."""
    with open(log, "w") as stderr:
        process = processes.popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 240
            while len(history(run_dir)) <= rows and time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.05)
            assert process.poll() is None, log.read_text()[-2000:]
        finally:
            process.kill()  # SIGKILL, also when the test fails
            process.wait()


@pytest.mark.slow  # four trainings, one in a process of its own
@pytest.mark.timeout(900)  # the killed process may take up to 240 s to write its epoch
def test_step1_interrupted_refused_killed_resumed_then_overwritten(tmp_path, monkeypatch, capfd, processes):
    """An interrupted run (Ctrl-C after its first epoch): every --resume refusal leaves it
    as it is. A resume with a raised --epochs is SIGKILLed mid-training (in a process of
    its own); the resume after it lists each epoch once and finishes the run. The learning
    rates in history.csv are the schedule's (decay from epoch 1 here) in every process,
    best-only checkpoints hold across the restarts, and stdout stays empty. Then --overwrite
    of the finished run with --weights PATH and --early-stopping 1 under a val_loss forced
    to rise (1, 2, 3, ...): the old run is gone, the new one records its settings, starts
    from the file's weights and stops after its second epoch of four."""
    import keras

    monkeypatch.setattr(training, "LR_CONSTANT_EPOCHS", 1)  # the decay, within the 8 epochs
    h5_path = write_h5(tmp_path / "d.h5", patients=(3, 3), slices=2)
    run_dir = tmp_path / "run"

    class CtrlCAfterFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise KeyboardInterrupt

    config = TrainConfig(
        h5_path, run_dir, augmentation="base", backbone="efficientnetb0", weights="none", epochs=2,
        learning_rate=1e-3, seed=1,
    )  # fmt: skip
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
    resume = ["--augmentation", "base", *TINY, "--epochs", "8", "--learning-rate", "1e-3", "--seed", "1"]
    resume.append("--resume")
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
        ([*resume, "--seed", "5", str(h5_path), str(run_dir)], "--seed 1 (now 5)"),
    ]
    for arguments, message in refusals:
        assert step1.main(arguments) == 2
        err = capfd.readouterr().err
        assert message in last_line(err), err[-1000:]
        assert folder_snapshot(run_dir) == snapshot

    # The resume, with more epochs, SIGKILLed after at least one epoch of its own.
    code = (
        "import sys\nfrom gbmpcnsl import training\ntraining.LR_CONSTANT_EPOCHS = 1\n"
        "import step1_train_model as step1\nsys.exit(step1.main(sys.argv[1:]))\n"
    )
    command = [sys.executable, "-c", code, *resume, str(h5_path), str(run_dir)]
    kill_after_new_rows(processes, command, run_dir, 1, tmp_path / "stderr.txt")
    finished = backup_epoch(run_dir / "backup")
    rows = history(run_dir)
    assert 2 <= len(rows) < 8 and json.loads((run_dir / "run.json").read_text())["status"] == "running"
    assert len(rows) in (finished, finished + 1)
    if len(rows) == finished:  # simulate a kill between CSVLogger's row and the backup
        with open(run_dir / "history.csv", "a", newline="") as handle:
            csv.writer(handle).writerow([finished] + ["999"] * (len(rows[0]) - 1))

    # Changed settings are refused before anything is touched.
    snapshot = folder_snapshot(run_dir)
    assert step1.main(["--augmentation", "none", *resume[2:], str(h5_path), str(run_dir)]) == 2
    assert len(history(run_dir)) == finished + 1 and folder_snapshot(run_dir) == snapshot
    capfd.readouterr()

    assert step1.main([*resume, str(h5_path), str(run_dir)]) == 0
    captured = capfd.readouterr()
    assert captured.out == ""  # step1 writes nothing to stdout, also from TensorFlow
    rows = history(run_dir)
    assert [row["epoch"] for row in rows] == [str(epoch) for epoch in range(8)]
    assert "999" not in {row["loss"] for row in rows}
    # The schedule written out: 1e-3 for the first LR_CONSTANT_EPOCHS (1 here), then
    # 1e-3 * exp(0.015 * (1 - epoch)).
    expected = [1e-3 if epoch < 1 else 1e-3 * math.exp(0.015 * (1 - epoch)) for epoch in range(8)]
    assert [float(row["learning_rate"]) for row in rows] == pytest.approx(expected, rel=1e-6)
    assert float(rows[2]["learning_rate"]) < float(rows[1]["learning_rate"])  # decayed after epoch 1
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "finished" and run["epochs_done"] == 8 and run["arguments"]["epochs"] == 8
    assert [entry["after_epoch"] for entry in run["resumed"]] == [1, finished]
    assert run["arguments"]["normalization"] == "imagenet"
    assert not (run_dir / "backup").exists()
    # Best-only holds across the restarts: each checkpoint improves on every earlier epoch.
    val_losses = [float(row["val_loss"]) for row in rows]
    for checkpoint in run_dir.glob("ckpt_*.keras"):
        epoch = int(checkpoint.name[5:8])
        assert val_losses[epoch - 1] < min(val_losses[: epoch - 1], default=float("inf"))
    assert step1.main([*resume, str(h5_path), str(run_dir)]) == 2  # finished: nothing to resume
    capfd.readouterr()

    notop = fake_notop_weights(tmp_path / "efficientnetb0_notop.h5")
    (run_dir / "notes.txt").write_text("belongs to the old run")

    class RisingValLoss(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["val_loss"] = float(epoch + 1)  # the logs every later callback is given

    add_fit_callbacks(monkeypatch, first=(RisingValLoss(),))
    weights = ["--backbone", "efficientnetb0", "--weights", str(notop), "--normalization", "paper"]
    argv = [*weights, "--epochs", "4", "--early-stopping", "1", "--overwrite", str(h5_path), str(run_dir)]
    assert step1.main(argv) == 0
    assert capfd.readouterr().out == ""
    assert not (run_dir / "notes.txt").exists()
    second = json.loads((run_dir / "run.json").read_text())
    assert second["start_time"] >= run["end_time"] and "resumed" not in second
    assert second["arguments"]["early_stopping"] == 1 and second["arguments"]["weights"] == str(notop)
    assert second["arguments"]["normalization"] == "paper"
    rows = history(run_dir)
    assert [(row["epoch"], float(row["val_loss"])) for row in rows] == [("0", 1.0), ("1", 2.0)]
    # Patience 1: the second epoch did not improve on the first, so it is the last of 4.
    assert second["epochs_done"] == 2 and second["stopped_early"] is True
    assert second["arguments"]["epochs"] == 4 and second["best_epoch"] == 1
    from gbmpcnsl.checkpoints import load_model_for_inference

    loaded = load_model_for_inference(run_dir / second["best_checkpoint"])
    start = keras.applications.EfficientNetB0(include_top=False, weights=str(notop), input_shape=(32, 32, 3))
    stem, start_stem = (m.get_layer("stem_conv").get_weights()[0].ravel() for m in (loaded, start))
    assert np.corrcoef(stem, start_stem)[0, 1] > 0.9  # trained from the file's weights


def test_a_run_from_before_the_new_settings_can_be_resumed(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = TrainConfig(Path("data.h5"), run_dir, augmentation="base", resume=True)
    old_arguments = {name: jsonable(getattr(config, name)) for name in RESUME_MUST_MATCH}
    for name in RESUME_DEFAULTS:  # run.json written before these flags existed
        del old_arguments[name]
    (run_dir / "run.json").write_text(json.dumps({"status": "running", "arguments": old_arguments}))
    assert check_run_folder(config, run_dir).previous["arguments"] == old_arguments
    changed = TrainConfig(Path("d.h5"), run_dir, augmentation="base", monitor="val_auc", resume=True)
    with pytest.raises(UserError, match="--resume needs the run's own settings: --monitor"):
        check_run_folder(changed, run_dir)


def test_backup_epoch_falls_back_when_the_newest_backup_is_broken(tmp_path):
    backup = tmp_path / "backup"
    backup.mkdir()
    with h5py.File(backup / "latest.weights.h5.bkp", "w") as h5file:
        h5file.create_dataset("layers/dense/vars/0", data=np.arange(1000.0))
    good = (backup / "latest.weights.h5.bkp").read_bytes()
    (backup / "latest.weights.h5").write_bytes(good[: len(good) // 2])  # killed mid-write
    (backup / "training_metadata.json").write_text('{"epoch": 3, "batch": 0}')
    (backup / "training_metadata.json.bkp").write_text('{"epoch": 2, "batch": 0}')
    assert backup_epoch(backup) == 2
    assert (backup / "latest.weights.h5").read_bytes() == good
    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 2
    assert backup_epoch(backup) == 2  # now intact: unchanged
    # A first backup killed before its metadata was written: nothing to resume from.
    (backup / "training_metadata.json").unlink()
    (backup / "training_metadata.json.bkp").unlink()
    assert backup_epoch(backup) == 0 and not backup.exists()
    assert backup_epoch(backup) == 0


# ---------------------------------------------------------------------------- --overwrite
def test_step1_overwrite_refuses_the_current_folder_and_a_folder_holding_the_input(
    tmp_path, monkeypatch, capsys
):
    """A run.json does not make `.` or the HDF5 file's own folder a run folder to delete."""
    runs = tmp_path / "runs"
    runs.mkdir()
    h5_path = write_h5(runs / "train.h5")
    (runs / "run.json").write_text("{}")
    before = folder_snapshot(runs)
    assert step1.main([*TINY, "--overwrite", str(h5_path), str(runs)]) == 2
    assert last_line(capsys.readouterr().err) == (
        f"error: {runs}: holds the input {h5_path}; --overwrite refuses to replace it"
    )
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.json").write_text("{}")
    assert step1.main([*TINY, "--overwrite", str(h5_path), "."]) == 2
    assert last_line(capsys.readouterr().err) == (
        "error: .: --overwrite refuses to replace the current folder or a folder above it"
    )
    assert folder_snapshot(runs) == before


def test_cv_lock_falls_back_to_a_lock_file_without_flock(tmp_path, monkeypatch, caplog):
    """Lustre without flock: ENOSYS becomes one warning line and an exclusive lock file."""
    import errno
    import fcntl

    from gbmpcnsl.runs import cv_lock

    def no_flock(handle, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with cv_lock(tmp_path):
        assert (tmp_path / ".cv.lock.held").is_file()
    assert not (tmp_path / ".cv.lock.held").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        f"warning: {tmp_path}: no flock on this file system (Function not implemented); using a lock file"
    ]
