"""Calibration of predicted probabilities: the reliability table (sklearn's calibration_curve
bins), Brier score, expected calibration error, calibration intercept and slope."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from gbmpcnsl.stats import binary_arrays


def _probability_arrays(y_true, y_prob) -> tuple[np.ndarray, np.ndarray]:
    positive, y_prob = binary_arrays(y_true, y_prob)
    if ((y_prob < 0) | (y_prob > 1)).any():
        raise ValueError("y_prob must hold probabilities in [0, 1]")
    return positive.astype(int), y_prob


def calibration_table(y_true, y_prob, n_bins: int = 10, strategy: str = "uniform") -> pd.DataFrame:
    """The reliability diagram's numbers: one row per non-empty bin of predicted
    probability with n, mean_predicted and observed (the fraction of positives).

    Bins as sklearn's calibration_curve: "uniform" splits [0, 1] into n_bins equal
    widths, "quantile" into bins of equal counts; mean_predicted and observed equal its
    prob_pred and prob_true.
    """
    y_true, y_prob = _probability_arrays(y_true, y_prob)
    if strategy == "quantile":
        edges = np.percentile(y_prob, np.linspace(0, 100, n_bins + 1))
    elif strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    else:
        raise ValueError(f"strategy {strategy!r}: expected 'uniform' or 'quantile'")
    bin_index = np.searchsorted(edges[1:-1], y_prob)  # as calibration_curve
    grouped = pd.DataFrame({"bin": bin_index, "y": y_true, "p": y_prob}).groupby("bin")
    return pd.DataFrame(
        {
            "bin_low": edges[grouped.size().index],
            "bin_high": edges[grouped.size().index + 1],
            "n": grouped.size(),
            "mean_predicted": grouped["p"].mean(),
            "observed": grouped["y"].mean(),
        }
    ).reset_index(drop=True)


def calibration_metrics(
    y_true, y_prob, n_bins: int = 10, strategy: str = "uniform", eps: float = 1e-12
) -> dict[str, float]:
    """Brier score, expected calibration error, calibration intercept and slope.

    - brier: mean (y_prob - y_true)^2.
    - ece: sum over calibration_table's bins of n_bin / n * |observed - mean_predicted|.
    - calibration_slope: b of the logistic recalibration logit P(y) = a + b logit(y_prob)
      (1 is ideal; below 1, predictions too extreme), fitted by maximum likelihood.
    - calibration_intercept: a with b fixed at 1 (calibration-in-the-large; 0 is ideal,
      below 0, probabilities too high), the root of sum(y - sigmoid(a + logit(y_prob))).
    Probabilities are clipped to [eps, 1 - eps] for the logit. NaN where undefined (one
    class only). Under perfect separation (every positive's probability at or above every
    negative's, or at or below) the slope's maximum-likelihood estimate does not exist (it
    grows without bound): the slope is NaN, with a RuntimeWarning.
    """
    from scipy.optimize import brentq
    from scipy.special import expit, logit
    from sklearn.linear_model import LogisticRegression

    y_true, y_prob = _probability_arrays(y_true, y_prob)
    table = calibration_table(y_true, y_prob, n_bins, strategy)
    result = {
        "brier": float(np.mean((y_prob - y_true) ** 2)),
        "ece": float((table["n"] * (table["observed"] - table["mean_predicted"]).abs()).sum() / len(y_true)),
        "calibration_intercept": float("nan"),
        "calibration_slope": float("nan"),
    }
    if 0 < y_true.sum() < len(y_true):
        logits = logit(np.clip(y_prob, eps, 1 - eps))
        bound = 50.0 + np.abs(logits).max()
        result["calibration_intercept"] = float(
            brentq(lambda a: np.sum(y_true - expit(a + logits)), -bound, bound, xtol=1e-12)
        )
        positive, negative = logits[y_true == 1], logits[y_true == 0]
        if positive.min() >= negative.max() or positive.max() <= negative.min():
            warnings.warn(
                "calibration slope undefined (NaN): the probabilities separate the classes perfectly",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            fit = LogisticRegression(C=np.inf, tol=1e-10, max_iter=10_000).fit(logits[:, None], y_true)
            result["calibration_slope"] = float(fit.coef_[0, 0])
    return result
