"""gbmpcnsl.thresholds: sensitivity, specificity and the other threshold metrics by hand,
and Youden's threshold, chosen on validation predictions (one per model and level:
gbmpcnsl.predictions.thresholds_from_validation)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit

from gbmpcnsl import predictions, thresholds


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


def test_youden_threshold_maximises_j_and_is_chosen_on_validation():
    rng = np.random.default_rng(5)
    val_labels = np.repeat([0, 1], 40)
    val_prob = expit(rng.normal(0, 1, 80) + 2.0 * val_labels - 1.5)  # shifted low
    test_labels = np.repeat([0, 1], 40)
    test_prob = expit(rng.normal(0, 1, 80) + 2.0 * test_labels)
    threshold = thresholds.youden_threshold(val_labels, val_prob)

    def youden_j(labels, prob, t):
        called = prob > t
        return (called & (labels == 1)).sum() / 40 + (~called & (labels == 0)).sum() / 40 - 1

    grid = np.concatenate([[0.0], np.sort(val_prob)])  # every distinct split of the data
    assert youden_j(val_labels, val_prob, threshold) == pytest.approx(
        max(youden_j(val_labels, val_prob, t) for t in grid)
    )
    test_threshold = thresholds.youden_threshold(test_labels, test_prob)
    assert threshold < 0.4 < test_threshold  # validation's choice, not the test set's
    metrics = thresholds.threshold_metrics(test_labels, thresholds.predict_labels(test_prob, threshold))
    assert metrics["sensitivity"] == ((test_prob > threshold) & (test_labels == 1)).sum() / 40


def test_thresholds_from_validation_one_per_model_and_per_level(tmp_path):
    """Each model's threshold comes from its own validation CSV; one CSV for several models
    is refused (it would give every model the threshold of one model's predictions). At the
    patient level Youden's J is maximised over the validation patients' mean probabilities."""
    rng = np.random.default_rng(3)
    rows = []
    for folder, label in (("gbm", 0), ("pcnsl", 1)):
        for patient in range(8):
            shift = rng.normal(0, 1)
            for slice_number in range(4):
                prob = expit(1.2 * (2 * label - 1) + shift + rng.normal(0, 1.5) - 1.0)
                rows.append((f"val/{folder}/p{patient}/s{slice_number}.png", 1 - prob, prob))
    val = pd.DataFrame(rows, columns=["path", "prob_gbm", "prob_pcnsl"])
    val.to_csv(tmp_path / "val.csv", index=False)
    with pytest.raises(ValueError, match="one validation CSV .* for 2 models; give each model its own"):
        predictions.thresholds_from_validation(str(tmp_path / "val.csv"), ["a", "b"])
    mapping = {"a": str(tmp_path / "val.csv"), "b": str(tmp_path / "val.csv")}
    slice_level = predictions.thresholds_from_validation(mapping, ["a", "b"])
    patient_level = predictions.thresholds_from_validation(json.dumps(mapping), ["a", "b"], level="patient")
    is_pcnsl = val["path"].str.contains("/pcnsl/").to_numpy()
    means = val.assign(y=is_pcnsl, patient=val["path"].str.rsplit("/", n=1).str[0]).groupby("patient")
    means = means[["prob_pcnsl", "y"]].mean()

    def best_j(labels, prob):
        def j(t):
            called = prob > t
            return (called & labels).sum() / labels.sum() + (~called & ~labels).sum() / (~labels).sum() - 1

        return j, max(j(t) for t in np.concatenate([[-1.0], prob]))

    j, best = best_j(is_pcnsl, val["prob_pcnsl"].to_numpy())
    assert j(slice_level["a"][0]) == pytest.approx(best) and slice_level["a"] == slice_level["b"]
    j, best = best_j(means["y"].to_numpy(dtype=bool), means["prob_pcnsl"].to_numpy())
    assert j(patient_level["a"][0]) == pytest.approx(best) and patient_level["a"][1] == mapping["a"]
    assert patient_level["a"][0] != slice_level["a"][0]
    one_model = predictions.thresholds_from_validation(str(tmp_path / "val.csv"), ["only"])
    assert one_model["only"] == slice_level["a"]
