"""Cross-validation on a cohort with no signal: labels drawn at random per patient,
independently of the pixels. With nested selection (each fold's checkpoint chosen on
validation patients drawn from its training patients) the pooled out-of-fold AUROC stays
near 0.5; choosing each fold's epoch on its own test fold would not. In a module of its own
so that pytest-xdist can run it beside test_cross_validation.py's other long tests. The
same run shows that the folds of one call, trained on one model whose steps are traced
once, train as each fold would alone."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import read_csv, write_h5

from gbmpcnsl.config import TrainConfig
from gbmpcnsl.cross_validation import train_cross_validation

# ---------------------------------------------------------------------------- a cohort with no signal
NO_SIGNAL = {"patients": 12, "slices": 2, "size": 32, "folds": 3, "epochs": 10}


def no_signal_h5(path: Path) -> tuple[Path, np.ndarray]:
    """NO_SIGNAL's cohort: every patient one random pattern (its slices that pattern plus
    noise), drawn alike for both classes, so that the labels are independent of the
    pixels. Returns the file and every slice's pixels (float32, HDF5 order)."""
    size, slices = NO_SIGNAL["size"], NO_SIGNAL["slices"]
    write_h5(path, size=size, patients=(NO_SIGNAL["patients"],) * 2, slices=slices)
    rng = np.random.default_rng(7)
    pixels = []
    with h5py.File(path, "r+") as h5file:
        for folder in ("gbm", "pcnsl"):
            features = h5file[f"{folder}/{size}_{size}/features"]
            patterns = rng.uniform(0, 255, (features.shape[0] // slices, size, size, 1))
            gray = np.repeat(patterns, slices, axis=0) + rng.normal(0, 10, (features.shape[0], size, size, 1))
            features[...] = np.repeat(np.clip(gray, 0, 255).astype(np.uint8), 3, axis=-1)
            pixels.append(features[:].astype(np.float32))
    return path, np.concatenate(pixels)


def epoch_predictions(pixels: np.ndarray):
    """A Keras callback that keeps, per fold trained (one fit each), every epoch's P(PCNSL)
    of every slice: the material for choosing an epoch on the test fold afterwards."""
    import keras

    class EpochPredictions(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.folds: list[list[np.ndarray]] = []
            self.train_functions: list = []

        def on_train_begin(self, logs=None):
            self.folds.append([])
            self.train_functions.append(self.model.train_function)

        def on_epoch_end(self, epoch, logs=None):
            # predict_on_batch: one traced call per fold (an eager call costs about 0.6 s).
            prob = np.asarray(self.model.predict_on_batch(pixels))[:, 0]
            self.folds[-1].append(prob.astype(np.float64))

    return EpochPredictions()


def pair_aucs(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC of each row of `labels` (draws, n; 0/1) against each row of `scores`
    (epochs, n), ties counting 1/2: (draws, epochs)."""
    above = (scores[:, :, None] > scores[:, None, :]) + 0.5 * (scores[:, :, None] == scores[:, None, :])
    positive = labels.astype(np.float64)
    pairs = positive.sum(axis=1) * (1 - positive).sum(axis=1)
    return np.einsum("ri,eij,rj->re", positive, above, 1 - positive) / pairs[:, None]


def patient_means(values: np.ndarray, patients: np.ndarray, names: list[str]) -> np.ndarray:
    """The mean over each patient's slices (last axis), in the order of `names`."""
    return np.stack([values[..., patients == name].mean(axis=-1) for name in names], axis=-1)


@pytest.fixture(scope="module")
def no_signal_run(tmp_path_factory):
    """NO_SIGNAL's cross-validation, with every epoch's predictions of every slice
    (epoch_predictions): returns the folder, the TrainConfig, the pixels and the recorder."""
    folder = tmp_path_factory.mktemp("no_signal")
    h5_path, pixels = no_signal_h5(folder / "noise.h5")
    recorder = epoch_predictions(pixels)
    tiny = {"backbone": "efficientnetb0", "weights": "none", "head_init": "glorot", "batchnorm_momentum": 0.9}
    # A high learning rate and strong augmentation: epochs that differ, so that the choice matters.
    settings = {"learning_rate": 3e-3, "augmentation": "strong", "val_fraction": 0.25, "monitor": "val_auc"}
    config = TrainConfig(
        h5_path,
        folder / "cv",
        **tiny,
        **settings,
        epochs=NO_SIGNAL["epochs"],
        folds=NO_SIGNAL["folds"],
        deterministic=True,
    )
    train_cross_validation(config, callbacks=[recorder])
    return folder, config, pixels, recorder


@pytest.mark.slow  # three folds of 10 epochs
@pytest.mark.timeout(900)
def test_no_signal_cohort_stays_near_chance_with_nested_selection(no_signal_run):
    """Labels independent of the pixels: the pooled out-of-fold patient AUROC of the nested
    rule stays near 0.5; choosing each fold's epoch on its own test patients (from the same
    training's per-epoch predictions) gives more. Numbers: benchmarks/RESULTS.md."""
    from sklearn.metrics import roc_auc_score

    from gbmpcnsl.stats import bootstrap_auc

    folder, _, _, recorder = no_signal_run
    cv = json.loads((folder / "cv" / "cv.json").read_text())
    assert cv["selection"] == {
        "select": "best",
        "monitor": "val_auc",
        "early_stopping": None,
        "chosen_on": "val",
        "val_fraction": 0.25,
    }
    oof = read_csv(folder / "cv" / "oof_predictions.csv")
    patients = np.array([r["patient_id"] for r in oof])
    names = sorted(set(patients))
    label = patient_means(np.array([float(r["label"]) for r in oof]), patients, names).astype(int)
    fold = patient_means(np.array([float(r["fold"]) for r in oof]), patients, names).astype(int)
    nested = patient_means(np.array([float(r["prob_pcnsl"]) for r in oof]), patients, names)

    # Per fold: the per-epoch patient means; the nested rule's are those of its chosen epoch.
    epochs, best = [], []
    for k, per_epoch in enumerate(recorder.folds):
        assert len(per_epoch) == NO_SIGNAL["epochs"]
        epochs.append(patient_means(np.stack(per_epoch), patients, names))
        best.append(json.loads((folder / "cv" / f"fold_{k}" / "run.json").read_text())["best_epoch"] - 1)
        np.testing.assert_allclose(nested[fold == k], epochs[k][best[k]][fold == k], rtol=0, atol=1e-4)

    # Selection on the test fold, on the real labels and on 500 relabellings of each fold's
    # test patients (as random as the real ones): the epoch with the best test-fold AUROC.
    rng = np.random.default_rng(0)
    draws = np.stack([label] + [label.copy() for _ in range(500)])
    for k in range(len(epochs)):
        for draw in draws[1:]:
            draw[fold == k] = rng.permutation(draw[fold == k])
    peeking, chosen = np.empty((len(draws), len(names))), np.empty((len(draws), len(names)))
    for k in range(len(epochs)):
        test = fold == k
        aucs = pair_aucs(draws[:, test], epochs[k][:, test])
        peeking[:, test] = epochs[k][aucs.argmax(axis=1)][:, test]
        chosen[:, test] = epochs[k][best[k]][test]
        assert np.all(aucs.max(axis=1) >= aucs[:, best[k]])
    pooled = {
        "nested": np.diag(pair_aucs(draws, chosen)),
        "peeking": np.diag(pair_aucs(draws, peeking)),
    }
    assert pooled["nested"][0] == pytest.approx(roc_auc_score(label, nested), abs=1e-9)
    nested_ci = bootstrap_auc(label, nested, n_bootstraps=2000, seed=0).ci()
    peeking_ci = bootstrap_auc(label, peeking[0], n_bootstraps=2000, seed=0).ci()
    print(
        f"\nno-signal cohort, {len(names)} patients, {NO_SIGNAL['folds']} folds, {NO_SIGNAL['epochs']} epochs: "
        f"nested AUROC {pooled['nested'][0]:.3f} [{nested_ci[0]:.3f}, {nested_ci[1]:.3f}], "
        f"chosen epochs {[b + 1 for b in best]}; selected on the test fold {pooled['peeking'][0]:.3f} "
        f"[{peeking_ci[0]:.3f}, {peeking_ci[1]:.3f}]; over 500 relabellings: nested "
        f"{pooled['nested'][1:].mean():.3f}, selected on the test fold {pooled['peeking'][1:].mean():.3f} "
        f"(above 0.6 in {np.mean(pooled['peeking'][1:] > 0.6):.0%})"
    )
    assert nested_ci[0] <= 0.5 <= nested_ci[1] and abs(pooled["nested"][0] - 0.5) < 0.2
    assert abs(pooled["nested"][1:].mean() - 0.5) < 0.02
    assert pooled["peeking"][1:].mean() > pooled["nested"][1:].mean() + 0.05


@pytest.mark.slow  # a fold of one epoch, and the fixture's three folds
@pytest.mark.timeout(900)
def test_a_fold_alone_trains_as_after_the_other_folds(no_signal_run, tmp_path):
    """The folds of one call share one model, traced once (the same train function), its
    variables and optimizer reset for each fold: fold 2 trained alone for one epoch under
    --deterministic predicts as fold 2 did after its first epoch in the three-fold run."""
    _, config, pixels, recorder = no_signal_run
    assert len(recorder.train_functions) == NO_SIGNAL["folds"] and recorder.train_functions[0] is not None
    assert all(function is recorder.train_functions[0] for function in recorder.train_functions)
    alone = epoch_predictions(pixels)
    train_cross_validation(
        dataclasses.replace(config, run_dir=tmp_path / "cv", fold=2, epochs=1), callbacks=[alone]
    )
    assert len(alone.folds) == 1 and len(alone.folds[0]) == 1
    np.testing.assert_array_equal(alone.folds[0][0], recorder.folds[2][0])
