"""The ROC analysis (gbmpcnsl.stats, thresholds, predictions, report): AUC, bootstrap and
DeLong intervals, threshold metrics, ground truth and history reading, checked against
sklearn and against numbers computed by hand."""

from __future__ import annotations

import pickle
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from gbmpcnsl import predictions, report, stats, thresholds


def tied_scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores with many ties (scores rounded to one decimal)."""
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 2, n)
    y_score = np.round(1 / (1 + np.exp(-(y_true - 0.5 + rng.normal(0, 1, n)))), 1)
    return y_true, y_score


# ---------------------------------------------------------------------------- AUC and bootstrap


def test_auc_equals_sklearn_with_ties():
    y_true, y_score = tied_scores(200, seed=0)
    assert len(np.unique(y_score)) < 20  # the case has ties
    assert stats.auc_score(y_true, y_score) == pytest.approx(roc_auc_score(y_true, y_score), abs=1e-12)
    assert stats.auc_score([0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert stats.auc_score([1, 0], [0.9, 0.1]) == 1.0


def test_auc_needs_both_classes_and_valid_input():
    with pytest.raises(ValueError, match="one positive and one negative"):
        stats.auc_score([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="0/1"):
        stats.auc_score([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        stats.auc_score([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="equal length"):
        stats.auc_score([0, 1, 1], [0.1, 0.2])


def test_bootstrap_equals_sklearn_on_every_resample():
    y_true, y_score = tied_scores(40, seed=1)
    n_bootstraps, seed = 500, 7
    result = stats.bootstrap_auc(y_true, y_score, n_bootstraps=n_bootstraps, seed=seed)
    # The documented resamples: row r of default_rng(seed).integers(0, n, size=(n_bootstraps, n)).
    indices = np.random.default_rng(seed).integers(0, len(y_true), size=(n_bootstraps, len(y_true)))
    assert result.aucs.shape == (n_bootstraps,) and result.n_bootstraps == n_bootstraps
    for row, auc in zip(indices, result.aucs, strict=True):
        assert auc == pytest.approx(roc_auc_score(y_true[row], y_score[row]), abs=1e-12)
    # Drawn in small chunks of rows, the resamples (and AUCs) are the same.
    chunked = stats.bootstrap_auc(y_true, y_score, n_bootstraps, seed, max_chunk_elements=3 * len(y_true) + 1)
    np.testing.assert_array_equal(chunked.aucs, result.aucs)
    low, high = result.ci(0.95)
    assert (low, high) == pytest.approx(np.percentile(result.aucs, [2.5, 97.5]))
    assert low < stats.auc_score(y_true, y_score) < high


def test_bootstrap_skips_and_counts_single_class_resamples():
    y_true = np.array([1, 0, 0, 0, 0, 0])  # one positive: about a third of resamples lack it
    y_score = np.array([0.9, 0.1, 0.2, 0.95, 0.4, 0.5])
    n_bootstraps, seed = 300, 0
    result = stats.bootstrap_auc(y_true, y_score, n_bootstraps=n_bootstraps, seed=seed)
    indices = np.random.default_rng(seed).integers(0, len(y_true), size=(n_bootstraps, len(y_true)))
    single_class = np.array([len(np.unique(y_true[row])) < 2 for row in indices])
    assert 50 < single_class.sum() < 150
    assert result.n_skipped == single_class.sum()
    np.testing.assert_array_equal(np.isnan(result.aucs), single_class)
    expected = [roc_auc_score(y_true[row], y_score[row]) for row in indices[~single_class]]
    np.testing.assert_allclose(result.valid_aucs, expected, atol=1e-12)
    assert result.ci() == pytest.approx(np.percentile(expected, [2.5, 97.5]))

    all_one_class = stats.bootstrap_auc([1, 1, 1], [0.1, 0.2, 0.3], n_bootstraps=10)
    assert all_one_class.n_skipped == 10 and np.isnan(all_one_class.ci()).all()


def test_bootstrap_is_repeatable_by_seed():
    y_true, y_score = tied_scores(50, seed=2)
    first = stats.bootstrap_auc(y_true, y_score, n_bootstraps=100, seed=5).aucs
    np.testing.assert_array_equal(first, stats.bootstrap_auc(y_true, y_score, n_bootstraps=100, seed=5).aucs)
    assert not np.array_equal(first, stats.bootstrap_auc(y_true, y_score, n_bootstraps=100, seed=6).aucs)


def test_percentile_ci():
    assert stats.percentile_ci(np.arange(101), 0.95) == pytest.approx((2.5, 97.5))
    assert stats.percentile_ci(np.arange(101), 0.9) == pytest.approx((5.0, 95.0))
    assert np.isnan(stats.percentile_ci([], 0.95)).all()
    with pytest.raises(ValueError):
        stats.percentile_ci([0.5], 1.5)


# ---------------------------------------------------------------------------- DeLong


def delong_by_definition(y_true, y_score) -> tuple[float, float]:
    """DeLong (1988) from its definition: psi over every (positive, negative) pair."""
    positives = [s for s, y in zip(y_score, y_true, strict=True) if y == 1]
    negatives = [s for s, y in zip(y_score, y_true, strict=True) if y == 0]

    def psi(x, y):
        return 1.0 if x > y else 0.5 if x == y else 0.0

    v10 = [sum(psi(x, y) for y in negatives) / len(negatives) for x in positives]
    v01 = [sum(psi(x, y) for x in positives) / len(positives) for y in negatives]
    auc = sum(v10) / len(v10)
    s10 = sum((v - auc) ** 2 for v in v10) / (len(v10) - 1)
    s01 = sum((v - auc) ** 2 for v in v01) / (len(v01) - 1)
    return auc, s10 / len(positives) + s01 / len(negatives)


def test_delong_hand_computed_example():
    # Positives 0.9, 0.8, 0.4; negatives 0.7, 0.4, 0.2, 0.1 (one tie at 0.4).
    # V10 = 1, 1, 5/8 (0.4 beats 0.2 and 0.1, ties 0.4): AUC = 21/8 / 3 = 7/8.
    # V01 = 2/3, 5/6, 1, 1.  S10 = (1/64 + 1/64 + 1/16) / 2 = 3/64.
    # S01 = ((5/24)^2 + (1/24)^2 + (1/8)^2 + (1/8)^2) / 3 = 11/432.
    # Var = S10 / 3 + S01 / 4 = 1/64 + 11/1728 = 19/864.
    y_true = [1, 1, 1, 0, 0, 0, 0]
    y_score = [0.9, 0.8, 0.4, 0.7, 0.4, 0.2, 0.1]
    s10 = (Fraction(1, 8) ** 2 * 2 + Fraction(1, 4) ** 2) / 2
    s01 = (Fraction(5, 24) ** 2 + Fraction(1, 24) ** 2 + 2 * Fraction(1, 8) ** 2) / 3
    assert (s10, s01, s10 / 3 + s01 / 4) == (Fraction(3, 64), Fraction(11, 432), Fraction(19, 864))
    auc, variance = stats.delong_variance(y_true, y_score)
    assert auc == pytest.approx(7 / 8, abs=1e-15)
    assert variance == pytest.approx(19 / 864, abs=1e-15)
    low, high = stats.delong_ci(y_true, y_score, 0.95)
    assert (low, high) == pytest.approx((7 / 8 - 1.959963984540054 * np.sqrt(19 / 864), 1.0))  # clipped at 1


def test_delong_equals_definition_on_tied_data():
    y_true, y_score = tied_scores(60, seed=3)
    auc, variance = stats.delong_variance(y_true, y_score)
    expected_auc, expected_variance = delong_by_definition(y_true, y_score)
    assert auc == pytest.approx(expected_auc, abs=1e-12) and auc == pytest.approx(
        roc_auc_score(y_true, y_score)
    )
    assert variance == pytest.approx(expected_variance, rel=1e-10)
    low, high = stats.delong_ci(y_true, y_score, 0.95)
    assert low < auc < high
    assert (high - low) / 2 == pytest.approx(1.959963984540054 * np.sqrt(variance))


def test_delong_needs_two_of_each_class():
    with pytest.raises(ValueError, match="two positives and two negatives"):
        stats.delong_variance([1, 0, 0], [0.9, 0.1, 0.2])


# ---------------------------------------------------------------------------- threshold


def test_threshold_metrics_by_hand():
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    prob_pcnsl = np.array([0.1, 0.2, 0.7, 0.5, 0.9, 0.6, 0.3])
    predicted = thresholds.predict_labels(prob_pcnsl, 0.5)  # 0.5 itself is GBM: PCNSL needs > 0.5
    np.testing.assert_array_equal(predicted, [0, 0, 1, 0, 1, 1, 0])
    pcnsl = thresholds.threshold_metrics(labels, predicted, positive_label=1)
    assert (pcnsl["tp"], pcnsl["fn"], pcnsl["tn"], pcnsl["fp"]) == (2, 1, 3, 1)
    assert pcnsl["sensitivity"] == pytest.approx(2 / 3) and pcnsl["specificity"] == pytest.approx(3 / 4)
    assert pcnsl["ppv"] == pytest.approx(2 / 3) and pcnsl["npv"] == pytest.approx(3 / 4)
    assert pcnsl["accuracy"] == pytest.approx(5 / 7)
    gbm = thresholds.threshold_metrics(labels, predicted, positive_label=0)
    assert gbm["sensitivity"] == pcnsl["specificity"] and gbm["specificity"] == pcnsl["sensitivity"]
    confusion = thresholds.confusion_frame(labels, predicted)
    assert confusion.loc["true GBM"].tolist() == [3, 1] and confusion.loc["true PCNSL"].tolist() == [1, 2]
    assert np.isnan(thresholds.threshold_metrics([0, 0], [0, 0], positive_label=1)["sensitivity"])


# ---------------------------------------------------------------------------- ground truth


def test_labels_and_patients_from_paths():
    assert predictions.label_from_path("demo_test/gbm/gbm_s1_p003/slice02.png") == 0
    assert predictions.label_from_path("/data/PCNSL/p1/s.png") == 1
    assert predictions.label_from_path(r"C:\data\pcnsl\p1\s.png") == 1
    assert predictions.label_from_path("data/pcnsl/gbm/s.png") == 0  # the nearest class folder wins
    with pytest.raises(ValueError, match="gbm/pcnsl folder"):
        predictions.label_from_path("data/other/gbm.png")  # a file name is not a folder
    assert predictions.patient_id_from_path("demo_test/gbm/gbm_s1_p003/slice02.png") == "gbm/gbm_s1_p003"
    assert predictions.patient_id_from_path("data/gbm/flat.png") == "gbm/flat"  # its own group


def write_predictions(path, rows) -> None:
    pd.DataFrame(rows, columns=["path", "prob_gbm", "prob_pcnsl"]).to_csv(path, index=False)


def test_read_predictions_from_folders_with_patients(tmp_path):
    csv_path = tmp_path / "predictions.csv"
    write_predictions(
        csv_path,
        [
            ("t/gbm/p1/a.png", 0.8, 0.2),
            ("t/gbm/p1/b.png", 0.6, 0.4),
            ("t/pcnsl/p1/a.png", 0.3, 0.7),  # same folder name, other class: another patient
            ("t/pcnsl/p2/a.png", 0.1, 0.9),
        ],
    )
    frame = predictions.read_predictions(csv_path)
    assert frame["label"].tolist() == [0, 0, 1, 1]
    assert frame["patient_id"].tolist() == ["gbm/p1", "gbm/p1", "pcnsl/p1", "pcnsl/p2"]
    patients = report.patient_level(frame).set_index("patient_id")
    assert patients.loc["gbm/p1", "prob_pcnsl"] == pytest.approx(0.3)
    assert patients.loc["gbm/p1", "n_images"] == 2 and patients.loc["pcnsl/p2", "label"] == 1
    assert "patient_id" not in predictions.read_predictions(csv_path, patient_ids=False)


def test_read_predictions_auto_drops_one_image_patients(tmp_path):
    csv_path = tmp_path / "predictions.csv"
    write_predictions(csv_path, [("t/gbm/a.png", 0.8, 0.2), ("t/pcnsl/b.png", 0.3, 0.7)])
    assert "patient_id" not in predictions.read_predictions(csv_path)
    assert predictions.read_predictions(csv_path, patient_ids=True)["patient_id"].tolist() == [
        "gbm/a",
        "pcnsl/b",
    ]


def test_read_predictions_with_ground_truth_csv(tmp_path):
    csv_path, truth_path = tmp_path / "predictions.csv", tmp_path / "truth.csv"
    write_predictions(csv_path, [("img/1.png", 0.8, 0.2), ("./img/2.png", 0.3, 0.7), ("img/3.png", 0.4, 0.6)])
    pd.DataFrame(
        {
            "path": ["img/1.png", "img/2.png", "img/3.png"],
            "label": ["GBM", "pcnsl", "1"],
            "patient_id": ["a", "b", "b"],
        }
    ).to_csv(truth_path, index=False)
    frame = predictions.read_predictions(csv_path, ground_truth=truth_path)
    assert frame["label"].tolist() == [0, 1, 1]  # "./img/2.png" matched after normalising
    assert frame["patient_id"].tolist() == ["a", "b", "b"]

    pd.DataFrame({"path": ["img/1.png"], "label": [0]}).to_csv(truth_path, index=False)
    with pytest.raises(ValueError, match="2 of 3 paths have no ground-truth label"):
        predictions.read_predictions(csv_path, ground_truth=truth_path)


def test_read_predictions_rejects_bad_files(tmp_path):
    csv_path = tmp_path / "predictions.csv"
    pd.DataFrame({"filename": ["a.png"], "prob_pcnsl": [0.5]}).to_csv(csv_path, index=False)
    with pytest.raises(ValueError, match="not a step2 predictions CSV"):
        predictions.read_predictions(csv_path)
    write_predictions(csv_path, [("t/gbm/a.png", 0.5, 0.2)])
    with pytest.raises(ValueError, match="prob_gbm \\+ prob_pcnsl != 1"):
        predictions.read_predictions(csv_path)
    write_predictions(csv_path, [("t/gbm/p/a.png", 0.8, 0.2), ("t/gbm/p/b.png", 0.8, 0.2)])
    pd.DataFrame({"path": ["t/gbm/p/a.png", "t/gbm/p/b.png"], "label": [0, 1]}).to_csv(
        tmp_path / "t.csv", index=False
    )
    with pytest.raises(ValueError, match="patients with both labels"):
        predictions.read_predictions(csv_path, ground_truth=tmp_path / "t.csv")


# ---------------------------------------------------------------------------- metrics table


def test_metrics_table_and_markdown(tmp_path):
    rng = np.random.default_rng(4)
    labels = np.repeat([0, 1], 24)
    patients = [f"t/{'gbm' if y == 0 else 'pcnsl'}/p{i // 3}" for i, y in enumerate(labels)]
    prob_pcnsl = np.clip(0.5 + 0.25 * (labels - 0.5) + rng.normal(0, 0.2, len(labels)), 0, 1)
    frame = pd.DataFrame(
        {
            "path": [f"{p}/s{i}.png" for i, p in enumerate(patients)],
            "prob_gbm": 1 - prob_pcnsl,
            "prob_pcnsl": prob_pcnsl,
        }
    )
    frame.to_csv(tmp_path / "p.csv", index=False)
    frames = {"m": predictions.read_predictions(tmp_path / "p.csv")}
    metrics = report.metrics_table(frames, n_bootstraps=200, seed=1)
    gbm, pcnsl = metrics.iloc[0], metrics.iloc[1]
    assert (gbm["positive_class"], pcnsl["positive_class"]) == ("GBM", "PCNSL")
    assert pcnsl["auc"] == pytest.approx(roc_auc_score(labels, prob_pcnsl), abs=1e-12)
    assert gbm["auc"] == pytest.approx(roc_auc_score(1 - labels, 1 - prob_pcnsl), abs=1e-12)
    assert gbm["sensitivity"] == pcnsl["specificity"] and gbm["tp"] == pcnsl["tn"]
    mean_prob = pd.Series(prob_pcnsl).groupby(patients).mean()
    patient_labels = pd.Series(labels).groupby(patients).first()
    assert pcnsl["n_patients"] == 16
    assert pcnsl["patient_auc"] == pytest.approx(roc_auc_score(patient_labels, mean_prob), abs=1e-12)

    markdown = report.markdown_table(report.summary_table(metrics)).splitlines()
    assert markdown[1] == "|" + "|".join(["---"] * 10) + "|"
    assert (
        f"| m | PCNSL | 24/24 | {pcnsl['auc']:.3f} | {pcnsl['auc_ci_low']:.3f}-{pcnsl['auc_ci_high']:.3f} |"
        in markdown[3]
    )
    assert report.markdown_table(pd.DataFrame({"a|b": ["x|y"]})) == "| a\\|b |\n|---|\n| x\\|y |\n"


def test_notebook_parameter_parsing():
    assert (
        report.as_list('["a", "b"]') == ["a", "b"]
        and report.as_list("run") == ["run"]
        and report.as_list(("a",)) == ["a"]
    )
    assert report.as_mapping('{"m": "p.csv"}') == {"m": "p.csv"}
    assert report.as_mapping("out/preds.csv") == {"preds": "out/preds.csv"}
    assert report.as_mapping(["x/a.csv", "x/b.csv"]) == {"a": "x/a.csv", "b": "x/b.csv"}


# ---------------------------------------------------------------------------- history (step 3)


def test_read_history_csv_with_keras_name_variants(tmp_path):
    pd.DataFrame(
        {
            "epoch": [0, 1, 2, 1, 2, 3],  # a resumed run that logged epochs 1 and 2 again
            "binary_accuracy": [0.5, 0.6, 0.7, 0.61, 0.71, 0.8],
            "auc_1": [0.5, 0.6, 0.7, 0.62, 0.72, 0.8],
            "loss": [0.7, 0.6, 0.5, 0.59, 0.49, 0.4],
            "val_binary_accuracy": [0.5, 0.55, 0.6, 0.56, 0.61, 0.6],
            "val_auc_1": [0.5, 0.6, 0.65, 0.61, 0.66, 0.64],
            "val_loss": [0.7, 0.65, 0.6, 0.64, 0.58, 0.62],
        }
    ).to_csv(tmp_path / "history.csv", index=False)
    history = report.read_history(tmp_path)
    assert history["epoch"].tolist() == [1, 2, 3, 4]  # 1-based, as the checkpoint names
    assert history["loss"].tolist() == [0.7, 0.59, 0.49, 0.4]
    assert report.history_columns(history) == {
        "loss": ("loss", "val_loss"),
        "accuracy": ("binary_accuracy", "val_binary_accuracy"),
        "auc": ("auc_1", "val_auc_1"),
    }
    assert report.best_epoch(history) == 3


def test_read_history_pickle_only_behind_the_flag(tmp_path):
    with open(tmp_path / "history.pkl", "wb") as file:
        pickle.dump(
            {"loss": [0.7, 0.5], "acc": [0.5, 0.7], "val_loss": [0.72, 0.6], "val_acc": [0.5, 0.6]}, file
        )
    with pytest.raises(ValueError, match="allow_pickle = True"):
        report.read_history(tmp_path)
    with pytest.warns(UserWarning, match="unpickling runs any code"):
        history = report.read_history(tmp_path / "history.pkl", allow_pickle=True)
    assert history["epoch"].tolist() == [1, 2]
    assert report.history_columns(history)["accuracy"] == ("acc", "val_acc")
    assert report.history_columns(history)["auc"] == (None, None)
    assert report.best_epoch(history) == 2
    with pytest.raises(ValueError, match="no history.csv"):
        report.read_history(tmp_path / "missing")


def test_metrics_table_without_patients_and_with_one_class(tmp_path):
    write_predictions(
        tmp_path / "p.csv",
        [
            ("t/gbm/a.png", 0.8, 0.2),
            ("t/gbm/b.png", 0.4, 0.6),
            ("t/pcnsl/c.png", 0.3, 0.7),
            ("t/pcnsl/d.png", 0.1, 0.9),
        ],
    )
    metrics = report.metrics_table({"m": predictions.read_predictions(tmp_path / "p.csv")}, n_bootstraps=50)
    assert metrics["auc"].tolist() == [1.0, 1.0] and metrics["patient_auc"].isna().all()
    summary = report.summary_table(metrics)
    assert summary["Patients"].tolist() == ["n/a", "n/a"] and summary["AUROC"].tolist() == ["1.000", "1.000"]

    write_predictions(tmp_path / "gbm_only.csv", [("t/gbm/a.png", 0.8, 0.2), ("t/gbm/b.png", 0.4, 0.6)])
    with pytest.raises(ValueError, match="only-gbm, GBM as the positive class: the AUC needs"):
        report.metrics_table(
            {"only-gbm": predictions.read_predictions(tmp_path / "gbm_only.csv")}, n_bootstraps=50
        )
