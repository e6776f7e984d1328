"""step1 cross-validation (--folds, --fold, --resume per fold, --select), its nested
selection (each fold's checkpoint chosen on validation patients drawn from its training
patients, never on its test patients), and the predictions of a run (val_predictions.csv)
and of a cross-validation run (test_predictions.csv, oof_predictions.csv), checked against
the HDF5 file, the split.csv files and the checkpoints themselves."""

from __future__ import annotations

import csv
import json
import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import TINY, read_csv, write_h5

import step1_train_model as step1
from gbmpcnsl.config import TrainConfig
from gbmpcnsl.cross_validation import (
    cv_settings,
    fold_subsets,
    make_folds,
    train_cross_validation,
    update_cv_json,
)
from gbmpcnsl.data import Cohort, split_subsets
from gbmpcnsl.files import write_csv
from gbmpcnsl_common import UserError

COLUMNS = ["path", "prob_gbm", "prob_pcnsl", "label", "patient_id"]


def h5_slices(h5_path: Path, size: int) -> list[tuple[str, str, int, np.ndarray]]:
    """(path, group, label, uint8 pixels) of every slice, GBM rows then PCNSL rows, read
    with h5py (not with step1's reader)."""
    slices = []
    with h5py.File(h5_path, "r") as h5file:
        for label, folder in enumerate(("gbm", "pcnsl")):
            group = h5file[f"{folder}/{size}_{size}"]
            for path, patient, pixels in zip(
                group["paths"], group["groups"], group["features"][:], strict=True
            ):
                patient = patient.decode()
                patient = patient if patient.startswith(f"{folder}/") else f"{folder}/{patient}"
                slices.append((path.decode(), patient, label, pixels))
    return slices


def predict_checkpoint(checkpoint: Path, pixels: np.ndarray) -> np.ndarray:
    """P(PCNSL) of uint8 images by the checkpoint, loaded and called with Keras directly."""
    import keras

    model = keras.saving.load_model(checkpoint, compile=False)
    return model.predict(pixels.astype(np.float32), verbose=0)[:, 0]


# ---------------------------------------------------------------------------- fold assignment
def cohort_records(patients: dict[str, int], slices: int) -> list[dict]:
    """Records as read_hdf5_index gives them: patients "p0".. of each class, `slices` each;
    the same patient names in both classes (they are different patients)."""
    return [
        {"class": folder, "label": label, "path": f"{folder}/p{p}/s{s}.png", "group": f"{folder}/p{p}"}
        for label, folder in enumerate(("gbm", "pcnsl"))
        for p in range(patients[folder])
        for s in range(slices)
    ]


@pytest.mark.parametrize("patients, folds", [({"gbm": 7, "pcnsl": 5}, 3), ({"gbm": 10, "pcnsl": 6}, 5)])
def test_folds_are_patient_disjoint_stratified_and_seeded(patients, folds):
    records = cohort_records(patients, slices=3)
    fold_of = make_folds(records, folds, seed=0)
    assert fold_of.shape == (len(records),) and set(fold_of.tolist()) == set(range(folds))

    # Every patient in exactly one fold (all its slices there).
    folds_of_patient: dict[str, set[int]] = {}
    for record, fold in zip(records, fold_of, strict=True):
        folds_of_patient.setdefault(record["group"], set()).add(int(fold))
    assert len(folds_of_patient) == sum(patients.values())
    assert all(len(folds) == 1 for folds in folds_of_patient.values())

    # Stratified: each class's patients (all of 3 slices) spread as evenly as they can.
    for folder, count in patients.items():
        per_fold = Counter(next(iter(f)) for g, f in folds_of_patient.items() if g.startswith(f"{folder}/"))
        assert sorted(per_fold) == list(range(folds))
        assert max(per_fold.values()) - min(per_fold.values()) <= 1
        assert sum(per_fold.values()) == count

    # Seeded: the same seed gives the same folds whatever the record order; another seed differs.
    order = np.random.default_rng(1).permutation(len(records))
    shuffled = make_folds([records[i] for i in order], folds, seed=0)
    assert {records[i]["group"]: int(f) for i, f in zip(order, shuffled, strict=True)} == {
        r["group"]: int(f) for r, f in zip(records, fold_of, strict=True)
    }
    assert any(not np.array_equal(make_folds(records, folds, seed), fold_of) for seed in (1, 2, 3))


def test_folds_need_enough_patients_per_class_and_valid_options(capsys):
    records = cohort_records({"gbm": 5, "pcnsl": 2}, slices=2)
    with pytest.raises(UserError, match=r"PCNSL: 2 patient group\(s\); --folds 3 needs at least 3"):
        make_folds(records, 3, seed=0)
    # Each fold's training patients must leave validation patients of both classes.
    records = cohort_records({"gbm": 2, "pcnsl": 3}, slices=2)
    config = TrainConfig(Path("d.h5"), Path("run"), folds=2)
    cohort = Cohort(Path("d.h5"), (32, 32), records, True)
    with pytest.raises(UserError, match=r"--folds 2: fold 0's training patients: GBM: 1 patient group\(s\)"):
        fold_subsets(config, cohort, make_folds(records, 2, seed=0))
    for argv, message in (
        (["--folds", "1"], "--folds 1: cross-validation needs at least 2 folds"),
        (
            ["--select", "final", "--early-stopping", "5"],
            "--early-stopping chooses the stopping epoch on validation; --select final chooses none",
        ),
        (["--select", "last"], "argument --select: invalid choice: 'last'"),
        (["--fold", "0"], "--fold needs --folds K"),
        (["--folds", "3", "--fold", "3"], "--fold 3: expected 0 ... 2"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            step1.main([*argv, "d.h5", "run"])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_fold_subsets_hold_the_fold_out_and_draw_validation_from_the_rest():
    records = cohort_records({"gbm": 9, "pcnsl": 7}, slices=2)
    fold_of = make_folds(records, 3, seed=1)
    config = TrainConfig(Path("d.h5"), Path("run"), folds=3, val_fraction=0.25, seed=1)
    subsets = fold_subsets(config, Cohort(Path("d.h5"), (32, 32), records, True), fold_of)
    groups = np.array([r["group"] for r in records])
    for fold, subset in enumerate(subsets):
        assert set(subset.tolist()) == {"train", "val", "test"}
        np.testing.assert_array_equal(subset == "test", fold_of == fold)  # the fold, and only it
        roles = {name: set(groups[subset == name]) for name in ("train", "val", "test")}
        assert roles["train"].isdisjoint(roles["val"]) and roles["test"].isdisjoint(
            roles["train"] | roles["val"]
        )
        for folder in ("gbm", "pcnsl"):  # validation patients of both classes
            assert any(g.startswith(f"{folder}/") for g in roles["val"])
        # the validation patients are split_by_group's, drawn from the remaining records alone
        rest = np.flatnonzero(fold_of != fold)
        expected = split_subsets([records[i] for i in rest], 0.25, seed=1)
        assert subset[rest].tolist() == expected.tolist()
    # without a test mask: the single split, as before
    assert set(split_subsets(records, 0.25, seed=1).tolist()) == {"train", "val"}


def test_resume_refuses_a_run_of_the_old_scheme(tmp_path, capsys):
    """A cv.json without "selection" chose each fold's checkpoint on its test patients."""
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    cv = {"folds": 2, "seed": 0, "fold_assignment": [], "complete": False}
    (run_dir / "cv.json").write_text(json.dumps(cv))
    before = (run_dir / "cv.json").read_bytes()
    for extra in (["--resume"], ["--fold", "1"]):
        assert step1.main([*TINY, "--folds", "2", *extra, str(tmp_path / "d.h5"), str(run_dir)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"error: {run_dir / 'cv.json'}: made by the old scheme (each fold chose its checkpoint on its "
            "own test patients); it cannot be resumed or joined: train a new run folder or --overwrite it"
        ]
    assert sorted(p.name for p in run_dir.iterdir()) == ["cv.json"]
    assert (run_dir / "cv.json").read_bytes() == before


# ---------------------------------------------------------------------------- cv.json from several jobs
def _update_cv_json_repeatedly(run_dir: str, settings: dict, records: list[dict], fold_of: list[int]) -> None:
    cohort = Cohort(Path("d.h5"), (32, 32), records, True)
    for _ in range(25):
        update_cv_json(Path(run_dir), settings, cohort, np.array(fold_of))


def test_cv_json_and_pooled_predictions_survive_concurrent_jobs(tmp_path, processes):
    """Four processes (as four fold jobs finishing together) rewrite cv.json and
    oof_predictions.csv at once: every write succeeds and the files stay whole."""
    import multiprocessing

    records = cohort_records({"gbm": 4, "pcnsl": 4}, slices=2)
    fold_of = make_folds(records, 2, seed=0)
    config = TrainConfig(Path("d.h5"), tmp_path, folds=2)
    cohort = Cohort(Path("d.h5"), (32, 32), records, True)
    settings = cv_settings(config, cohort, fold_of, fold_subsets(config, cohort, fold_of))
    expected = []
    for fold in range(2):
        fold_dir = tmp_path / f"fold_{fold}"
        fold_dir.mkdir()
        (fold_dir / "run.json").write_text(
            json.dumps({"status": "finished", "best_checkpoint": "ckpt_001.keras"})
        )
        rows = [[r["path"], repr(0.25 + i / 100), repr(0.75 - i / 100), r["label"], r["group"]]
                for i, r in enumerate(records) if fold_of[i] == fold]  # fmt: skip
        write_csv(fold_dir / "test_predictions.csv", COLUMNS, rows)
    for i, r in enumerate(records):
        expected.append(
            [
                r["path"],
                repr(0.25 + i / 100),
                repr(0.75 - i / 100),
                str(r["label"]),
                r["group"],
                str(fold_of[i]),
            ]
        )

    context = multiprocessing.get_context("spawn")
    jobs = [
        context.Process(
            target=_update_cv_json_repeatedly, args=(str(tmp_path), settings, records, fold_of.tolist())
        )
        for _ in range(4)
    ]
    for job in jobs:
        job.start()
        processes.track(job)  # a hung job is killed at teardown, not joined forever at exit
    deadline = time.monotonic() + 120
    for job in jobs:
        job.join(max(0.0, deadline - time.monotonic()))
    assert [job.exitcode for job in jobs] == [0, 0, 0, 0]
    cv = json.loads((tmp_path / "cv.json").read_text())
    assert cv["complete"] is True and cv["best_checkpoints"] == [
        "fold_0/ckpt_001.keras",
        "fold_1/ckpt_001.keras",
    ]
    with open(tmp_path / "oof_predictions.csv", newline="") as handle:
        assert list(csv.reader(handle)) == [[*COLUMNS, "fold"], *expected]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".cv.lock",
        "cv.json",
        "fold_0",
        "fold_1",
        "oof_predictions.csv",
    ]


# ---------------------------------------------------------------------------- a cross-validation run
class Interrupted(Exception):
    pass


def stop_after_first_epoch():
    """A Keras callback that interrupts training after the first epoch (as a kill would,
    after the backup of that epoch)."""
    import keras

    class Stop(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise Interrupted

    return Stop()


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory):
    """A 2-fold run with --select final built the way a cluster would: fold 1 alone
    (--fold 1), fold 0 alone and interrupted after 1 of 2 epochs, then --resume (fold 1
    skipped, fold 0 resumed). Returns the HDF5 file, the run folder and what each stage left
    behind. (--select best, the default, in cross-validation: test_no_signal.py, test_recipe.py.)"""
    folder = tmp_path_factory.mktemp("cv")
    h5_path = write_h5(folder / "d.h5", size=32, patients=(4, 4), slices=2)
    run_dir = folder / "run"
    common = [*TINY, "--augmentation", "base", "--folds", "2", "--seed", "3", "--select", "final"]
    stages = {}

    assert step1.main([*common, "--epochs", "1", "--fold", "1", str(h5_path), str(run_dir)]) == 0
    stages["fold_1"] = {
        "listing": listing(run_dir),
        "cv": json.loads((run_dir / "cv.json").read_text()),
        "fold_1_files": {p.name: p.stat().st_mtime_ns for p in (run_dir / "fold_1").iterdir()},
    }
    tiny = {"backbone": "efficientnetb0", "weights": "none", "augmentation": "base"}
    config = TrainConfig(h5_path, run_dir, **tiny, folds=2, seed=3, select="final", epochs=2, fold=0)
    with pytest.raises(Interrupted):
        train_cross_validation(config, callbacks=[stop_after_first_epoch()])
    stages["interrupted"] = {"cv": json.loads((run_dir / "cv.json").read_text())}
    assert step1.main([*common, "--epochs", "2", "--resume", str(h5_path), str(run_dir)]) == 0
    return h5_path, run_dir, stages


@pytest.mark.slow
def test_fold_option_trains_that_fold_only(cv_run, capsys):
    h5_path, run_dir, stages = cv_run
    first = stages["fold_1"]
    assert [name for name in first["listing"] if "/" not in name] == [".cv.lock", "cv.json", "fold_1"]
    assert {"run.json", "history.csv", "split.csv", "val_predictions.csv", "test_predictions.csv"} <= set(
        first["fold_1_files"]
    )
    cv = first["cv"]
    assert cv["folds"] == 2 and cv["seed"] == 3 and cv["complete"] is False and "best_checkpoints" not in cv
    assert [f["status"] for f in cv["fold_assignment"]] == ["pending", "finished"]
    assert cv["fold_assignment"][0]["best_checkpoint"] is None
    assert cv["fold_assignment"][1]["best_checkpoint"] == "fold_1/ckpt_001_final.keras"
    assert stages["interrupted"]["cv"]["complete"] is False
    assert [f["status"] for f in stages["interrupted"]["cv"]["fold_assignment"]] == ["running", "finished"]

    # A fold that exists is not trained again without --resume or --overwrite; the run's
    # settings and folds are its own.
    common = [*TINY, "--augmentation", "base", "--epochs", "1", "--seed", "3", "--select", "final"]
    paths = [str(h5_path), str(run_dir)]
    assert step1.main([*common, "--folds", "2", "--fold", "1", *paths]) == 2
    assert "fold_1: exists" in capsys.readouterr().err
    assert step1.main([*common, "--folds", "3", "--resume", *paths]) == 2
    assert "the run has 2 folds (now --folds 3)" in capsys.readouterr().err
    assert (
        step1.main([*common, "--folds", "2", "--fold", "1", "--overwrite", "--augmentation", "none", *paths])
        == 2
    )
    assert "--augmentation base (now none)" in capsys.readouterr().err
    assert step1.main([*common, "--folds", "2", *paths]) == 2
    assert "exists; pick a new run folder, --resume it or --overwrite it" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_skips_finished_folds_and_resumes_interrupted_ones(cv_run):
    _, run_dir, stages = cv_run
    # fold 1 (finished) untouched by --resume
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "fold_1").iterdir()} == stages["fold_1"][
        "fold_1_files"
    ]
    # fold 0 resumed after its first epoch: two epochs in its history, once each
    info = json.loads((run_dir / "fold_0" / "run.json").read_text())
    assert info["status"] == "finished" and info["epochs_done"] == 2
    assert [r["after_epoch"] for r in info["resumed"]] == [1]
    assert [row["epoch"] for row in read_csv(run_dir / "fold_0" / "history.csv")] == ["0", "1"]
    assert not (run_dir / "fold_0" / "backup").exists()

    cv = json.loads((run_dir / "cv.json").read_text())
    assert cv["complete"] is True
    assert [f["status"] for f in cv["fold_assignment"]] == ["finished", "finished"]
    best = [
        f"fold_{i}/{json.loads((run_dir / f'fold_{i}' / 'run.json').read_text())['best_checkpoint']}"
        for i in range(2)
    ]
    assert cv["best_checkpoints"] == best == [f["best_checkpoint"] for f in cv["fold_assignment"]]
    assert all((run_dir / name).is_file() for name in best)


@pytest.mark.slow
def test_each_folds_test_patients_are_disjoint_from_its_training_and_selection_patients(cv_run):
    """From the files alone: every fold's split.csv gives each slice its role, the test
    patients are the fold's own (cv.json), and no test patient trained or chose anything."""
    h5_path, run_dir, _ = cv_run
    cv = json.loads((run_dir / "cv.json").read_text())
    slices = h5_slices(h5_path, 32)
    patients_of_fold = []
    for fold in cv["fold_assignment"]:
        split = read_csv(run_dir / fold["run_dir"] / "split.csv")
        assert [(r["path"], r["group"], int(r["label"])) for r in split] == [s[:3] for s in slices]
        assert {r["subset"] for r in split} == {"train", "val", "test"}
        roles = {
            name: {r["group"] for r in split if r["subset"] == name} for name in ("train", "val", "test")
        }
        by_class = {
            name: {
                folder: sorted(g for g in roles[name] if g.startswith(f"{folder}/"))
                for folder in ("gbm", "pcnsl")
            }
            for name in ("val", "test")
        }
        assert fold["patients"] == by_class["test"] and fold["validation_patients"] == by_class["val"]
        assert all(by_class["val"].values()) and all(by_class["test"].values())  # both classes each
        assert fold["slices"] == {
            folder: sum(r["path"].startswith(f"{folder}/") and r["subset"] == "test" for r in split)
            for folder in ("gbm", "pcnsl")
        }
        assert roles["test"].isdisjoint(roles["train"]) and roles["test"].isdisjoint(roles["val"])
        assert roles["val"].isdisjoint(roles["train"])
        # the fold's predictions: validation (selection) and test, each of its own subset
        for name, file in (("val", "val_predictions.csv"), ("test", "test_predictions.csv")):
            rows = read_csv(run_dir / fold["run_dir"] / file)
            assert [(r["path"], r["patient_id"]) for r in rows] == [
                (r["path"], r["group"]) for r in split if r["subset"] == name
            ]
        info = json.loads((run_dir / fold["run_dir"] / "run.json").read_text())
        assert info["select"] == "final" and info["split"] == {
            f"{name}_{what}": len(members) if what == "groups" else sum(r["subset"] == name for r in split)
            for name, members in roles.items()
            for what in ("slices", "groups")
        }
        patients_of_fold.append(roles["test"])
    assert patients_of_fold[0].isdisjoint(patients_of_fold[1])
    assert patients_of_fold[0] | patients_of_fold[1] == {s[1] for s in slices}


@pytest.mark.slow
def test_out_of_fold_predictions_are_each_folds_checkpoint_predictions(cv_run):
    h5_path, run_dir, _ = cv_run
    cv = json.loads((run_dir / "cv.json").read_text())
    slices = h5_slices(h5_path, 32)
    oof = read_csv(run_dir / "oof_predictions.csv")
    assert list(oof[0]) == [*COLUMNS, "fold"]
    # one row per slice, in HDF5 order, with its label and patient
    assert [(r["path"], r["patient_id"], int(r["label"])) for r in oof] == [s[:3] for s in slices]
    fold_of_patient = {
        p: f["fold"] for f in cv["fold_assignment"] for ps in f["patients"].values() for p in ps
    }
    assert [int(r["fold"]) for r in oof] == [fold_of_patient[s[1]] for s in slices]

    for fold in cv["fold_assignment"]:
        rows = [r for r in oof if int(r["fold"]) == fold["fold"]]
        # the fold's own test_predictions.csv, value for value
        test_rows = read_csv(run_dir / fold["run_dir"] / "test_predictions.csv")
        assert [{k: r[k] for k in COLUMNS} for r in rows] == test_rows
        # ... which are its best checkpoint's predictions of the HDF5 pixels
        pixels = np.stack([s[3] for s in slices if fold_of_patient[s[1]] == fold["fold"]])
        expected = predict_checkpoint(run_dir / fold["best_checkpoint"], pixels)
        prob_pcnsl = np.array([float(r["prob_pcnsl"]) for r in rows])
        np.testing.assert_allclose(prob_pcnsl, expected, rtol=0, atol=1e-6)
        np.testing.assert_allclose([float(r["prob_gbm"]) for r in rows], 1 - prob_pcnsl, rtol=0, atol=1e-12)


@pytest.mark.slow
def test_select_final_keeps_the_last_epoch_and_records_the_rule(cv_run):
    """Fold 0 was interrupted after epoch 1 and resumed: its epoch-1 checkpoint is gone."""
    h5_path, run_dir, _ = cv_run
    cv = json.loads((run_dir / "cv.json").read_text())
    assert cv["selection"] == {
        "select": "final",
        "monitor": None,
        "early_stopping": None,
        "chosen_on": None,
        "val_fraction": 0.15,
    }
    fold_dir = run_dir / "fold_0"
    assert sorted(p.name for p in fold_dir.glob("*.keras")) == ["ckpt_002_final.keras"]  # the last only
    info = json.loads((fold_dir / "run.json").read_text())
    assert info["select"] == "final" and info["best_epoch"] == 2 and info["epochs_done"] == 2
    assert info["best_checkpoint"] == "ckpt_002_final.keras"
    assert cv["fold_assignment"][0]["best_checkpoint"] == "fold_0/ckpt_002_final.keras"
    split = {r["path"]: r["subset"] for r in read_csv(fold_dir / "split.csv")}
    rows = read_csv(fold_dir / "test_predictions.csv")
    pixels = {s[0]: s[3] for s in h5_slices(h5_path, 32)}
    assert rows and all(split[r["path"]] == "test" for r in rows)
    expected = predict_checkpoint(
        fold_dir / info["best_checkpoint"], np.stack([pixels[r["path"]] for r in rows])
    )
    np.testing.assert_allclose([float(r["prob_pcnsl"]) for r in rows], expected, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_resume_of_a_complete_run_trains_nothing_and_rewrites_the_pooled_files(cv_run, tmp_path):
    h5_path, run_dir, _ = cv_run
    before = {p: p.stat().st_mtime_ns for p in run_dir.glob("fold_*/*")}
    oof = (run_dir / "oof_predictions.csv").read_bytes()
    (run_dir / "oof_predictions.csv").unlink()
    argv = [*TINY, "--augmentation", "base", "--folds", "2", "--seed", "3", "--select", "final"]
    argv += ["--epochs", "2", "--resume"]
    assert step1.main([*argv, str(h5_path), str(run_dir)]) == 0
    assert {p: p.stat().st_mtime_ns for p in run_dir.glob("fold_*/*")} == before
    assert (run_dir / "oof_predictions.csv").read_bytes() == oof
    assert json.loads((run_dir / "cv.json").read_text())["complete"] is True


# ---------------------------------------------------------------------------- a single run
@pytest.mark.slow  # loads the session's step1 checkpoint
def test_single_run_val_predictions_are_its_best_checkpoints(trained_run, demo_h5):
    info = json.loads((trained_run / "run.json").read_text())
    size = info["input_shape"][0]
    rows = read_csv(trained_run / "val_predictions.csv")
    assert rows and list(rows[0]) == COLUMNS
    split = read_csv(trained_run / "split.csv")
    val = [(r["path"], r["label"], r["group"]) for r in split if r["subset"] == "val"]
    assert [(r["path"], r["label"], r["patient_id"]) for r in rows] == val

    slices = {s[0]: s[3] for s in h5_slices(demo_h5, size)}
    expected = predict_checkpoint(
        trained_run / info["best_checkpoint"], np.stack([slices[p] for p, _, _ in val])
    )
    prob_pcnsl = np.array([float(r["prob_pcnsl"]) for r in rows])
    np.testing.assert_allclose(prob_pcnsl, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose([float(r["prob_gbm"]) for r in rows], 1 - prob_pcnsl, rtol=0, atol=1e-12)
