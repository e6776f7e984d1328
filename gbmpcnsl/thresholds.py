"""Calls at a threshold: predicted labels, confusion counts, sensitivity, specificity, PPV, NPV
and accuracy, the confusion matrix, and Youden's threshold chosen on validation predictions.

Labels follow gbmpcnsl_common: GBM = 0, PCNSL = 1; an image is called PCNSL when
prob_pcnsl > threshold (the rule of Keras's binary accuracy).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from gbmpcnsl.stats import binary_arrays
from gbmpcnsl_common import CLASS_NAMES


def predict_labels(prob_pcnsl, threshold: float = 0.5) -> np.ndarray:
    """Predicted labels: PCNSL (1) where prob_pcnsl > threshold, else GBM (0).

    One call per image, the rule of Keras's binary accuracy; GBM's sensitivity is then
    PCNSL's specificity and the other way round.
    """
    return (np.asarray(prob_pcnsl, dtype=np.float64) > threshold).astype(int)


def threshold_metrics(y_true, y_pred, positive_label: int = 1) -> dict[str, float]:
    """Confusion counts, sensitivity, specificity, PPV, NPV and accuracy for one class.

    y_true and y_pred hold labels (GBM 0, PCNSL 1); positive_label says which class is the
    positive one. A rate with an empty denominator is NaN.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    is_pos, called_pos = y_true == positive_label, y_pred == positive_label
    tp = int((is_pos & called_pos).sum())
    fn = int((is_pos & ~called_pos).sum())
    tn = int((~is_pos & ~called_pos).sum())
    fp = int((~is_pos & called_pos).sum())

    def rate(numerator: int, denominator: int) -> float:
        return numerator / denominator if denominator else float("nan")

    return {
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
        "sensitivity": rate(tp, tp + fn),
        "specificity": rate(tn, tn + fp),
        "ppv": rate(tp, tp + fp),
        "npv": rate(tn, tn + fn),
        "accuracy": rate(tp + tn, tp + fn + tn + fp),
    }


def confusion_frame(y_true, y_pred) -> pd.DataFrame:
    """2x2 confusion matrix as a DataFrame: rows true GBM/PCNSL, columns predicted."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    counts = [[int(((y_true == t) & (y_pred == p)).sum()) for p in (0, 1)] for t in (0, 1)]
    return pd.DataFrame(
        counts,
        index=[f"true {name}" for name in CLASS_NAMES],
        columns=[f"predicted {name}" for name in CLASS_NAMES],
    )


def youden_threshold(y_true, prob_pcnsl) -> float:
    """The threshold on prob_pcnsl that maximises Youden's J = sensitivity + specificity - 1
    under predict_labels' rule (PCNSL when prob_pcnsl > threshold).

    y_true holds labels (GBM 0, PCNSL 1); J is the same with either class as the positive
    one. Candidates are the midpoints between consecutive distinct probabilities (and
    just below the smallest), so the threshold carries over to new data without sitting
    on a validation image's value; among equal J, the candidate closest to 0.5.
    Choose it on validation predictions and apply it to the test predictions.
    """
    is_pcnsl, prob_pcnsl = binary_arrays(y_true, prob_pcnsl)
    if is_pcnsl.all() or not is_pcnsl.any():
        raise ValueError("Youden's threshold needs both classes")
    values = np.unique(prob_pcnsl)
    candidates = np.concatenate([[values[0] - 1e-9], (values[:-1] + values[1:]) / 2])
    called = prob_pcnsl[None, :] > candidates[:, None]
    sensitivity = (called & is_pcnsl).sum(axis=1) / is_pcnsl.sum()
    specificity = (~called & ~is_pcnsl).sum(axis=1) / (~is_pcnsl).sum()
    youden_j = sensitivity + specificity - 1
    best = np.flatnonzero(np.isclose(youden_j, youden_j.max(), rtol=0, atol=1e-12))
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])
