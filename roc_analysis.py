"""The numbers behind the step 3 and step 4 notebooks, as small pure functions.

Step 4 (ROC analysis): the AUC of the data (Mann-Whitney U, ties counted half), a
vectorised bootstrap of the AUC with its percentile confidence interval, over slices or
over patients (cluster bootstrap: a patient's slices are resampled together), the DeLong
variance and confidence interval (fast DeLong, Sun & Xu 2014) and DeLong's paired test of
two models on the same images, the paired bootstrap of an AUC difference, sensitivity,
specificity (with Wilson intervals) and the confusion counts at a threshold, Youden's
threshold (chosen on validation predictions), calibration (reliability table, Brier
score, ECE, calibration intercept and slope), per-fold AUCs of out-of-fold predictions,
patient-level aggregation (mean probability per patient), ground truth from a CSV or
from the gbm/pcnsl folder in each path, and the tables the notebook saves. Step 3
(training curves): reading a run's history.

Everything takes and returns arrays or DataFrames; plotting and file writing stay in the
notebooks. Labels follow gbmpcnsl_common: GBM = 0, PCNSL = 1, the model outputs P(PCNSL).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from scipy.stats import norm, rankdata

from gbmpcnsl_common import CLASS_FOLDERS, CLASS_LABELS, CLASS_NAMES, patient_id

# ---------------------------------------------------------------------------- AUC


def _binary_arrays(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert: y_true of 0/1 (or booleans), y_score finite floats, same length."""
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.ndim != 1 or y_score.ndim != 1 or len(y_true) != len(y_score):
        raise ValueError(
            f"y_true and y_score must be 1-D and of equal length ({y_true.shape}, {y_score.shape})"
        )
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("y_true must hold 0/1 labels (1 = the positive class)")
    if not np.isfinite(y_score).all():
        raise ValueError("y_score holds NaN or infinite values")
    return y_true.astype(bool), y_score


def auc_score(y_true, y_score) -> float:
    """Area under the ROC curve of the data (Mann-Whitney U / (n_pos * n_neg)).

    A positive scored above a negative counts 1, a tie counts 1/2, as sklearn's
    roc_auc_score. Raises ValueError when y_true holds one class only.
    """
    positive, y_score = _binary_arrays(y_true, y_score)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("the AUC needs at least one positive and one negative")
    ranks = rankdata(y_score)  # midranks: ties share the mean rank
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# ---------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class BootstrapResult:
    """AUCs of bootstrap resamples of the predictions.

    aucs: one value per resample, in resample order; NaN where the resample held one class
    only (skipped: its AUC is undefined). n_skipped counts those.
    """

    aucs: np.ndarray
    n_skipped: int
    seed: int | None

    @property
    def n_bootstraps(self) -> int:
        return len(self.aucs)

    @property
    def valid_aucs(self) -> np.ndarray:
        return self.aucs[~np.isnan(self.aucs)]

    def ci(self, confidence: float = 0.95) -> tuple[float, float]:
        """Percentile confidence interval of the AUC over the valid resamples."""
        return percentile_ci(self.valid_aucs, confidence)


def bootstrap_auc(
    y_true,
    y_score,
    n_bootstraps: int = 10_000,
    seed: int | None = 0,
    max_chunk_elements: int = 100_000,
) -> BootstrapResult:
    """AUC of each of n_bootstraps resamples (drawn with replacement) of the predictions.

    Resample r uses the indices of row r of
    `np.random.default_rng(seed).integers(0, n, size=(n_bootstraps, n))`, drawn in chunks of
    rows (at most max_chunk_elements indices at a time: bounded memory, and cache-sized
    chunks run fastest), which gives the same rows. Each resample's AUC comes from counts,
    not from a sort: with the scores grouped by value, a resample is a count of positives
    and negatives per score value, and U = sum over values of positives * (negatives below
    + negatives tied / 2). That is O(n) per resample, vectorised over a chunk of resamples.
    """
    positive, y_score = _binary_arrays(y_true, y_score)
    n = len(y_score)
    if n == 0:
        raise ValueError("no predictions to resample")
    if n_bootstraps < 1:
        raise ValueError(f"n_bootstraps must be at least 1 (got {n_bootstraps})")
    # Column of each prediction in a (2, n_values) table: row 0 positives, row 1 negatives.
    score_values, value_index = np.unique(y_score, return_inverse=True)
    n_values = len(score_values)
    table_column = np.where(positive, 0, n_values) + value_index

    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, max_chunk_elements // n)
    aucs = np.empty(n_bootstraps)
    for start in range(0, n_bootstraps, rows_per_chunk):
        rows = min(rows_per_chunk, n_bootstraps - start)
        indices = rng.integers(0, n, size=(rows, n))
        flat_columns = np.take(table_column, indices)
        flat_columns += (2 * n_values) * np.arange(rows)[:, None]  # one table per resample
        counts = np.bincount(flat_columns.ravel(), minlength=rows * 2 * n_values)
        counts = counts.reshape(rows, 2, n_values)
        pos_counts, neg_counts = counts[:, 0], counts[:, 1]
        weights = np.cumsum(neg_counts, axis=1)  # in place below: 2 * negatives below + tied
        weights -= neg_counts
        weights *= 2
        weights += neg_counts
        twice_u = np.einsum("ij,ij->i", pos_counts, weights)  # integers: exact
        pairs = pos_counts.sum(axis=1) * neg_counts.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            aucs[start : start + rows] = np.where(pairs > 0, twice_u / (2.0 * pairs), np.nan)
    return BootstrapResult(aucs=aucs, n_skipped=int(np.isnan(aucs).sum()), seed=seed)


def percentile_ci(values, confidence: float = 0.95) -> tuple[float, float]:
    """(low, high) percentiles enclosing `confidence` of values (NaN, NaN if empty)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (got {confidence})")
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _group_codes(groups, n: int) -> tuple[np.ndarray, int]:
    """Each prediction's group as 0..n_groups-1 in order of first appearance; None: every
    prediction its own group (the slice bootstrap)."""
    if groups is None:
        return np.arange(n), n
    codes, uniques = pd.factorize(pd.Series(np.asarray(groups)), sort=False)
    if len(codes) != n:
        raise ValueError(f"groups must have one entry per prediction ({len(codes)} for {n})")
    return codes, len(uniques)


def resample_weights(groups, n: int, n_bootstraps: int, seed: int | None, max_chunk_elements: int = 100_000):
    """Chunks of bootstrap resamples as weights: an int array (rows, n), how often each of
    the n predictions is drawn in each resample.

    Groups (patients) are drawn with replacement, n_groups per resample, and a group's
    predictions come with it (cluster bootstrap); groups=None draws the predictions
    themselves. The draws are `rng.integers(0, n_groups, size=(rows, n_groups))` in chunks
    as bootstrap_auc's, so with one prediction per group (in order) both draw the same
    resamples.
    """
    codes, n_groups = _group_codes(groups, n)
    if n_bootstraps < 1:
        raise ValueError(f"n_bootstraps must be at least 1 (got {n_bootstraps})")
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, max_chunk_elements // n_groups)
    for start in range(0, n_bootstraps, rows_per_chunk):
        rows = min(rows_per_chunk, n_bootstraps - start)
        drawn = rng.integers(0, n_groups, size=(rows, n_groups))
        drawn += n_groups * np.arange(rows)[:, None]
        group_counts = np.bincount(drawn.ravel(), minlength=rows * n_groups).reshape(rows, n_groups)
        yield group_counts[:, codes]


def weighted_aucs(y_true, y_score, weights) -> np.ndarray:
    """AUC of each row of weights (rows, n): the Mann-Whitney AUC of the predictions, each
    counted as often as its weight (ties half); NaN where a row has one class only."""
    positive, y_score = _binary_arrays(y_true, y_score)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    score_values, value_index = np.unique(y_score, return_inverse=True)
    n_values = len(score_values)
    table_column = np.where(positive, 0, n_values) + value_index
    rows = len(weights)
    flat_columns = table_column[None, :] + (2 * n_values) * np.arange(rows)[:, None]
    counts = np.bincount(flat_columns.ravel(), weights=weights.ravel(), minlength=rows * 2 * n_values)
    pos_counts, neg_counts = counts.reshape(rows, 2, n_values).transpose(1, 0, 2)
    below_twice_plus_tied = 2 * (np.cumsum(neg_counts, axis=1) - neg_counts) + neg_counts
    twice_u = np.einsum("ij,ij->i", pos_counts, below_twice_plus_tied)
    pairs = pos_counts.sum(axis=1) * neg_counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, twice_u / (2.0 * pairs), np.nan)


def cluster_bootstrap_auc(
    y_true,
    y_score,
    groups=None,
    n_bootstraps: int = 10_000,
    seed: int | None = 0,
    max_chunk_elements: int = 100_000,
) -> BootstrapResult:
    """Bootstrap of the slice-level AUC that resamples patients (groups), not slices.

    Slices of one patient are correlated, so resampling them as if independent gives too
    narrow an interval; drawing whole patients keeps each patient's slices together. The
    AUC of a resample is the slice-level AUC of every slice of the drawn patients (a
    patient drawn twice counts twice). groups=None resamples slices (bootstrap_auc's
    resamples, bit for bit).
    """
    positive, y_score = _binary_arrays(y_true, y_score)
    if len(y_score) == 0:
        raise ValueError("no predictions to resample")
    aucs = np.concatenate(
        [
            weighted_aucs(positive, y_score, weights)
            for weights in resample_weights(groups, len(y_score), n_bootstraps, seed, max_chunk_elements)
        ]
    )
    return BootstrapResult(aucs=aucs, n_skipped=int(np.isnan(aucs).sum()), seed=seed)


@dataclass(frozen=True)
class PairedBootstrapResult:
    """AUC(a) - AUC(b) on each bootstrap resample of images scored by both models (NaN
    where the resample held one class only)."""

    differences: np.ndarray
    n_skipped: int
    seed: int | None

    def ci(self, confidence: float = 0.95) -> tuple[float, float]:
        """Percentile confidence interval of the difference over the valid resamples."""
        return percentile_ci(self.differences[~np.isnan(self.differences)], confidence)

    def p_value(self) -> float:
        """Two-sided bootstrap p-value of "no difference": twice the smaller share of
        resamples on either side of 0 (at most 1)."""
        valid = self.differences[~np.isnan(self.differences)]
        if len(valid) == 0:
            return float("nan")
        return float(min(1.0, 2 * min((valid <= 0).mean(), (valid >= 0).mean())))


def paired_bootstrap_auc_difference(
    y_true,
    score_a,
    score_b,
    groups=None,
    n_bootstraps: int = 10_000,
    seed: int | None = 0,
    max_chunk_elements: int = 100_000,
) -> PairedBootstrapResult:
    """AUC(score_a) - AUC(score_b) on the same resamples: patients (groups) drawn with
    replacement, or images when groups is None."""
    positive, score_a = _binary_arrays(y_true, score_a)
    _, score_b = _binary_arrays(y_true, score_b)
    differences = np.concatenate(
        [
            weighted_aucs(positive, score_a, weights) - weighted_aucs(positive, score_b, weights)
            for weights in resample_weights(groups, len(score_a), n_bootstraps, seed, max_chunk_elements)
        ]
    )
    return PairedBootstrapResult(differences, int(np.isnan(differences).sum()), seed)


# ---------------------------------------------------------------------------- DeLong


def delong_variance(y_true, y_score) -> tuple[float, float]:
    """(AUC, variance of the AUC) by DeLong's method, computed with midranks (Sun & Xu 2014).

    Structural components: V10 for each positive is the share of negatives it outscores,
    V01 for each negative the share of positives that outscore it (ties count half);
    variance = var(V10) / n_pos + var(V01) / n_neg, sample variances (ddof 1).
    Needs at least two positives and two negatives.
    """
    positive, y_score = _binary_arrays(y_true, y_score)
    pos_scores, neg_scores = y_score[positive], y_score[~positive]
    n_pos, n_neg = len(pos_scores), len(neg_scores)
    if n_pos < 2 or n_neg < 2:
        raise ValueError("the DeLong variance needs at least two positives and two negatives")
    ranks_pos = rankdata(pos_scores)
    ranks_neg = rankdata(neg_scores)
    ranks_all = rankdata(np.concatenate([pos_scores, neg_scores]))
    v10 = (ranks_all[:n_pos] - ranks_pos) / n_neg
    v01 = 1.0 - (ranks_all[n_pos:] - ranks_neg) / n_pos
    auc = float(v10.mean())
    variance = float(v10.var(ddof=1) / n_pos + v01.var(ddof=1) / n_neg)
    return auc, variance


def delong_ci(y_true, y_score, confidence: float = 0.95) -> tuple[float, float]:
    """Normal-approximation confidence interval of the AUC from the DeLong variance,
    clipped to [0, 1]."""
    auc, variance = delong_variance(y_true, y_score)
    half_width = norm.ppf(0.5 + confidence / 2) * np.sqrt(variance)
    return float(max(0.0, auc - half_width)), float(min(1.0, auc + half_width))


def _delong_components(positive: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components (V10 per positive, V01 per negative) by midranks."""
    pos_scores, neg_scores = y_score[positive], y_score[~positive]
    n_pos, n_neg = len(pos_scores), len(neg_scores)
    ranks_all = rankdata(np.concatenate([pos_scores, neg_scores]))
    v10 = (ranks_all[:n_pos] - rankdata(pos_scores)) / n_neg
    v01 = 1.0 - (ranks_all[n_pos:] - rankdata(neg_scores)) / n_pos
    return v10, v01


def delong_paired_test(y_true, score_a, score_b, confidence: float = 0.95) -> dict[str, float]:
    """DeLong's test of two correlated AUCs (DeLong, DeLong & Clarke-Pearson 1988): two
    models' scores on the same images.

    The covariance of (AUC_a, AUC_b) is S10 / n_pos + S01 / n_neg, S10 and S01 the sample
    covariance matrices (ddof 1) of the models' structural components; the difference
    AUC_a - AUC_b has variance var_a + var_b - 2 cov, a normal-approximation CI and the
    two-sided p-value of z = difference / its standard error. Returns auc_a, auc_b,
    difference, variance, ci_low, ci_high, z and p_value (z NaN and p 1 when the
    variance is 0, e.g. two identical models).
    """
    positive, score_a = _binary_arrays(y_true, score_a)
    _, score_b = _binary_arrays(y_true, score_b)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos < 2 or n_neg < 2:
        raise ValueError("the DeLong test needs at least two positives and two negatives")
    v10_a, v01_a = _delong_components(positive, score_a)
    v10_b, v01_b = _delong_components(positive, score_b)
    covariance = np.cov([v10_a, v10_b]) / n_pos + np.cov([v01_a, v01_b]) / n_neg
    auc_a, auc_b = float(v10_a.mean()), float(v10_b.mean())
    difference = auc_a - auc_b
    variance = float(max(0.0, covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]))
    half_width = norm.ppf(0.5 + confidence / 2) * np.sqrt(variance)
    if variance > 0:
        z = difference / np.sqrt(variance)
        p_value = float(2 * norm.sf(abs(z)))
    else:
        z, p_value = float("nan"), 1.0
    return {
        "auc_a": auc_a,
        "auc_b": auc_b,
        "difference": difference,
        "variance": variance,
        "ci_low": float(difference - half_width),
        "ci_high": float(difference + half_width),
        "z": float(z),
        "p_value": p_value,
    }


# ---------------------------------------------------------------------------- threshold


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


# ---------------------------------------------------------------------------- intervals and thresholds


def wilson_interval(successes: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion successes / total (NaN, NaN when total is 0):
    (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)."""
    if total == 0:
        return float("nan"), float("nan")
    z = norm.ppf(0.5 + confidence / 2)
    proportion = successes / total
    centre = proportion + z**2 / (2 * total)
    half_width = z * np.sqrt(proportion * (1 - proportion) / total + z**2 / (4 * total**2))
    denominator = 1 + z**2 / total
    return float((centre - half_width) / denominator), float((centre + half_width) / denominator)


def youden_threshold(y_true, prob_pcnsl) -> float:
    """The threshold on prob_pcnsl that maximises Youden's J = sensitivity + specificity - 1
    under predict_labels' rule (PCNSL when prob_pcnsl > threshold).

    y_true holds labels (GBM 0, PCNSL 1); J is the same with either class as the positive
    one. Candidates are the midpoints between consecutive distinct probabilities (and
    just below the smallest), so the threshold carries over to new data without sitting
    on a validation image's value; among equal J, the candidate closest to 0.5.
    Choose it on validation predictions and apply it to the test predictions.
    """
    is_pcnsl, prob_pcnsl = _binary_arrays(y_true, prob_pcnsl)
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


# ---------------------------------------------------------------------------- calibration


def _probability_arrays(y_true, y_prob) -> tuple[np.ndarray, np.ndarray]:
    positive, y_prob = _binary_arrays(y_true, y_prob)
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
    class only).
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
        fit = LogisticRegression(C=np.inf, tol=1e-10, max_iter=10_000).fit(logits[:, None], y_true)
        result["calibration_slope"] = float(fit.coef_[0, 0])
    return result


# ---------------------------------------------------------------------------- ground truth


def _path_parts(path: str | os.PathLike) -> tuple[str, ...]:
    return PurePosixPath(str(path).replace("\\", "/")).parts


def label_from_path(path: str | os.PathLike) -> int:
    """GBM 0 / PCNSL 1 from the nearest folder named gbm or pcnsl (any case) in the path."""
    for part in reversed(_path_parts(path)[:-1]):
        if part.lower() in CLASS_LABELS:
            return CLASS_LABELS[part.lower()]
    raise ValueError(f"{path}: no {'/'.join(CLASS_FOLDERS)} folder in the path to take the label from")


def patient_id_from_path(path: str | os.PathLike) -> str:
    """The patient (group) id of a slice path: gbmpcnsl_common.patient_id, the rule every
    step uses (the folder under the class folder, qualified by its class: "gbm/p01")."""
    return patient_id(_normalise_path(path))


def _normalise_path(path: str) -> str:
    return os.path.normpath(str(path)).replace("\\", "/")


def _parse_label(value) -> int:
    text = str(value).strip().lower()
    if text in CLASS_LABELS:
        return CLASS_LABELS[text]
    if text in ("0", "1", "0.0", "1.0"):
        return int(float(text))
    raise ValueError(f"label {value!r}: expected 0/1 or GBM/PCNSL")


def read_ground_truth(csv_path: str | os.PathLike) -> pd.DataFrame:
    """A ground-truth CSV with columns path,label (0/1 or GBM/PCNSL) and optionally
    patient_id (or group) -> DataFrame path, label[, patient_id]."""
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    missing = {"path", "label"} - set(table.columns)
    if missing:
        raise ValueError(f"{csv_path}: needs columns path,label (missing: {', '.join(sorted(missing))})")
    truth = pd.DataFrame({"path": table["path"], "label": [_parse_label(v) for v in table["label"]]})
    for column in ("patient_id", "group"):
        if column in table.columns:
            truth["patient_id"] = table[column]
            break
    return truth


def read_predictions(
    csv_path: str | os.PathLike,
    ground_truth: pd.DataFrame | str | os.PathLike | None = None,
    patient_ids: bool | str | None = "auto",
) -> pd.DataFrame:
    """Step 2's CSV (path,prob_gbm,prob_pcnsl) joined with its ground truth.

    ground_truth: a DataFrame or CSV as read_ground_truth reads it, matched on the path
    (as written, then normalised); None takes the CSV's own label and patient_id columns
    when it has them (step1's val_predictions.csv, oof_predictions.csv), else each label
    from the gbm/pcnsl folder in the path. patient_ids: "auto" uses the ground truth's patient_id column if there is one,
    else the folder layout, and drops the ids when every patient has one image only;
    True always uses them (folder layout unless the ground truth has them); False or None
    never. Returns path, prob_gbm, prob_pcnsl, label and (when known) patient_id, and the
    CSV's fold column when it has one.
    """
    predictions = pd.read_csv(csv_path, dtype={"path": str})
    missing = {"path", "prob_pcnsl"} - set(predictions.columns)
    if missing:
        raise ValueError(
            f"{csv_path}: not a step2 predictions CSV (needs path,prob_gbm,prob_pcnsl; "
            f"missing: {', '.join(sorted(missing))})"
        )
    if len(predictions) == 0:
        raise ValueError(f"{csv_path}: no predictions")
    prob_pcnsl = predictions["prob_pcnsl"].to_numpy(dtype=np.float64)
    if not (np.isfinite(prob_pcnsl).all() and (prob_pcnsl >= 0).all() and (prob_pcnsl <= 1).all()):
        raise ValueError(f"{csv_path}: prob_pcnsl must hold probabilities in [0, 1]")
    frame = pd.DataFrame(
        {"path": predictions["path"], "prob_gbm": 1.0 - prob_pcnsl, "prob_pcnsl": prob_pcnsl}
    )
    if "prob_gbm" in predictions:
        if not np.allclose(predictions["prob_gbm"].to_numpy(dtype=np.float64), frame["prob_gbm"], atol=1e-6):
            raise ValueError(
                f"{csv_path}: prob_gbm + prob_pcnsl != 1; expected step2's output of one sigmoid"
            )

    if "fold" in predictions:  # oof_predictions.csv: the fold whose model predicted the image
        frame["fold"] = predictions["fold"].to_numpy()
    if ground_truth is None and "label" in predictions:  # val/oof_predictions.csv carry their truth
        ground_truth = read_ground_truth(csv_path)

    truth_ids = None
    if ground_truth is None:
        frame["label"] = [label_from_path(p) for p in frame["path"]]
    else:
        truth = ground_truth if isinstance(ground_truth, pd.DataFrame) else read_ground_truth(ground_truth)
        by_path = truth.drop_duplicates("path").set_index("path")
        by_normalised = truth.assign(key=truth["path"].map(_normalise_path)).drop_duplicates("key")
        by_normalised = by_normalised.set_index("key")
        rows = []
        for path in frame["path"]:
            if path in by_path.index:
                rows.append(by_path.loc[path])
            elif _normalise_path(path) in by_normalised.index:
                rows.append(by_normalised.loc[_normalise_path(path)])
            else:
                rows.append(None)
        unmatched = [p for p, row in zip(frame["path"], rows, strict=True) if row is None]
        if unmatched:
            raise ValueError(
                f"{csv_path}: {len(unmatched)} of {len(frame)} paths have no ground-truth label "
                f"(first: {', '.join(unmatched[:3])})"
            )
        frame["label"] = [int(row["label"]) for row in rows]
        if "patient_id" in truth.columns:
            truth_ids = [str(row["patient_id"]) for row in rows]

    if patient_ids in (True, "auto"):
        ids = truth_ids if truth_ids is not None else [patient_id_from_path(p) for p in frame["path"]]
        if patient_ids is True or len(set(ids)) < len(ids):
            frame["patient_id"] = ids
    elif patient_ids not in (False, None):
        raise ValueError(f"patient_ids={patient_ids!r}: expected 'auto', True or False")
    if "patient_id" in frame:
        mixed = frame.groupby("patient_id")["label"].nunique()
        if (mixed > 1).any():
            raise ValueError(
                f"{csv_path}: patients with both labels: {', '.join(mixed[mixed > 1].index[:3])}"
            )
    columns = ("path", "prob_gbm", "prob_pcnsl", "label", "patient_id", "fold")
    return frame[[c for c in columns if c in frame]]


def patient_level(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per patient: patient_id, label, n_images and the mean prob_pcnsl of its
    images (prob_gbm = 1 - that)."""
    grouped = frame.groupby("patient_id", sort=True)
    prob_pcnsl = grouped["prob_pcnsl"].mean()
    return pd.DataFrame(
        {
            "label": grouped["label"].first(),
            "n_images": grouped.size(),
            "prob_gbm": 1.0 - prob_pcnsl,
            "prob_pcnsl": prob_pcnsl,
        }
    ).reset_index()


# ---------------------------------------------------------------------------- metrics table


def class_score(frame: pd.DataFrame, positive_class: str) -> np.ndarray:
    """The score that ranks images for a positive class: prob_pcnsl for PCNSL, and
    -prob_pcnsl for GBM (the same order as prob_gbm = 1 - prob_pcnsl, without the ties that
    rounding 1 - p creates when a saturated sigmoid gives p near 0)."""
    if positive_class not in CLASS_NAMES:
        raise ValueError(f"positive class {positive_class!r}: expected one of {', '.join(CLASS_NAMES)}")
    prob_pcnsl = frame["prob_pcnsl"].to_numpy(dtype=np.float64)
    return prob_pcnsl if CLASS_NAMES.index(positive_class) == 1 else -prob_pcnsl


def class_metrics(
    frame: pd.DataFrame,
    positive_class: str,
    n_bootstraps: int = 10_000,
    seed: int | None = 0,
    confidence: float = 0.95,
    threshold: float = 0.5,
    bootstrap_unit: str = "patient",
    calibration_bins: int = 10,
    calibration_strategy: str = "uniform",
) -> dict:
    """All numbers for one model and one positive class (GBM or PCNSL), as a flat dict.

    frame is read_predictions' output. The AUC is the AUC of the data; its CIs are the
    bootstrap percentile CI and the DeLong CI. The bootstrap resamples patients when
    patient ids are known and bootstrap_unit is "patient" (cluster_bootstrap_auc), else
    slices ("slice": as if independent); the row says which (bootstrap_unit).
    Sensitivity etc. use predict_labels(prob_pcnsl, threshold), with Wilson intervals for
    sensitivity and specificity. Calibration (calibration_metrics) is of the positive
    class's probability. With patient ids, the patient-level AUC uses the mean
    probability per patient, with a bootstrap CI over patients. With a fold column
    (out-of-fold predictions), the AUC of each fold (auc_fold_<i>), their mean and SD.
    Images are ranked by class_score.
    """
    if bootstrap_unit not in ("patient", "slice"):
        raise ValueError(f"bootstrap_unit {bootstrap_unit!r}: expected 'patient' or 'slice'")
    score = class_score(frame, positive_class)
    positive_label = CLASS_NAMES.index(positive_class)
    is_positive = (frame["label"].to_numpy() == positive_label).astype(int)

    row: dict = {
        "positive_class": positive_class,
        "n_images": len(frame),
        "n_positive": int(is_positive.sum()),
        "n_negative": int(len(frame) - is_positive.sum()),
    }
    row["auc"] = auc_score(is_positive, score)
    if bootstrap_unit == "patient" and "patient_id" in frame:
        bootstrap = cluster_bootstrap_auc(is_positive, score, frame["patient_id"], n_bootstraps, seed)
        row["bootstrap_unit"] = "patient"
    else:
        bootstrap = bootstrap_auc(is_positive, score, n_bootstraps=n_bootstraps, seed=seed)
        row["bootstrap_unit"] = "slice"
    row["auc_ci_low"], row["auc_ci_high"] = bootstrap.ci(confidence)
    row["n_bootstraps"] = bootstrap.n_bootstraps
    row["n_skipped"] = bootstrap.n_skipped
    try:
        row["delong_ci_low"], row["delong_ci_high"] = delong_ci(is_positive, score, confidence)
    except ValueError:  # fewer than two of a class
        row["delong_ci_low"] = row["delong_ci_high"] = float("nan")
    row["threshold"] = threshold
    row.update(
        threshold_metrics(frame["label"], predict_labels(frame["prob_pcnsl"], threshold), positive_label)
    )
    row["sensitivity_ci_low"], row["sensitivity_ci_high"] = wilson_interval(
        row["tp"], row["tp"] + row["fn"], confidence
    )
    row["specificity_ci_low"], row["specificity_ci_high"] = wilson_interval(
        row["tn"], row["tn"] + row["fp"], confidence
    )
    prob_positive = frame["prob_pcnsl"].to_numpy(dtype=np.float64)
    if positive_label == 0:
        prob_positive = 1.0 - prob_positive
    row.update(calibration_metrics(is_positive, prob_positive, calibration_bins, calibration_strategy))

    row["n_patients"] = np.nan
    row["patient_auc"] = row["patient_auc_ci_low"] = row["patient_auc_ci_high"] = np.nan
    if "patient_id" in frame:
        patients = patient_level(frame)
        patient_positive = (patients["label"].to_numpy() == positive_label).astype(int)
        row["n_patients"] = len(patients)
        if 0 < patient_positive.sum() < len(patients):
            patient_score = class_score(patients, positive_class)
            row["patient_auc"] = auc_score(patient_positive, patient_score)
            patient_bootstrap = bootstrap_auc(patient_positive, patient_score, n_bootstraps, seed)
            row["patient_auc_ci_low"], row["patient_auc_ci_high"] = patient_bootstrap.ci(confidence)

    if "fold" in frame:
        folds = fold_aucs(frame, positive_class)
        row["n_folds"] = len(folds)
        row["fold_auc_mean"] = float(folds["auc"].mean())
        row["fold_auc_sd"] = float(folds["auc"].std(ddof=1)) if len(folds) > 1 else float("nan")
        row.update({f"auc_fold_{fold}": auc for fold, auc in zip(folds["fold"], folds["auc"], strict=True)})
    return row


def fold_aucs(frame: pd.DataFrame, positive_class: str) -> pd.DataFrame:
    """The AUC of each fold of out-of-fold predictions (a fold column): fold, n_images,
    auc (NaN for a fold with one class only)."""
    rows = []
    for fold, part in frame.groupby("fold", sort=True):
        positive = (part["label"].to_numpy() == CLASS_NAMES.index(positive_class)).astype(int)
        auc = (
            auc_score(positive, class_score(part, positive_class))
            if 0 < positive.sum() < len(part)
            else np.nan
        )
        rows.append({"fold": fold, "n_images": len(part), "auc": auc})
    return pd.DataFrame(rows, columns=["fold", "n_images", "auc"])


def metrics_table(
    predictions: Mapping[str, pd.DataFrame],
    positive_classes: Sequence[str] = CLASS_NAMES,
    n_bootstraps: int = 10_000,
    seed: int | None = 0,
    confidence: float = 0.95,
    threshold: float | Mapping[str, float] = 0.5,
    **options,
) -> pd.DataFrame:
    """One row per model and positive class: class_metrics for each, model name first.
    threshold: one for every model, or model name -> threshold (e.g. each model's
    youden_threshold on its validation predictions); options go to class_metrics."""
    rows = []
    for name, frame in predictions.items():
        model_threshold = threshold[name] if isinstance(threshold, Mapping) else threshold
        for positive_class in positive_classes:
            try:
                row = class_metrics(
                    frame, positive_class, n_bootstraps, seed, confidence, model_threshold, **options
                )
            except ValueError as error:
                raise ValueError(f"{name}, {positive_class} as the positive class: {error}") from error
            rows.append({"model": name, **row})
    return pd.DataFrame(rows)


def summary_table(metrics: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """The metrics table as a paper reports it: text cells, AUROC with its 95% CIs."""

    def number(value) -> str:
        return "n/a" if pd.isna(value) else f"{value:.{digits}f}"

    def interval(low, high) -> str:
        return "n/a" if pd.isna(low) else f"{number(low)}-{number(high)}"

    return pd.DataFrame(
        {
            "Model": metrics["model"],
            "Positive class": metrics["positive_class"],
            "Images (pos/neg)": [
                f"{p}/{n}" for p, n in zip(metrics["n_positive"], metrics["n_negative"], strict=True)
            ],
            "AUROC": metrics["auc"].map(number),
            "95% CI (bootstrap)": [
                interval(lo, hi) for lo, hi in zip(metrics["auc_ci_low"], metrics["auc_ci_high"], strict=True)
            ],
            "95% CI (DeLong)": [
                interval(lo, hi)
                for lo, hi in zip(metrics["delong_ci_low"], metrics["delong_ci_high"], strict=True)
            ],
            "Sensitivity": metrics["sensitivity"].map(number),
            "Specificity": metrics["specificity"].map(number),
            "Patients": metrics["n_patients"].map(lambda n: "n/a" if pd.isna(n) else str(int(n))),
            "Patient AUROC (95% CI)": [
                "n/a" if pd.isna(auc) else f"{number(auc)} ({interval(lo, hi)})"
                for auc, lo, hi in zip(
                    metrics["patient_auc"],
                    metrics["patient_auc_ci_low"],
                    metrics["patient_auc_ci_high"],
                    strict=True,
                )
            ],
        }
    )


def detail_table(metrics: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """Threshold, calibration and cross-validation numbers of the metrics table as text
    cells: sensitivity and specificity with their Wilson CIs, Brier score, ECE,
    calibration intercept and slope, and (for out-of-fold predictions) the folds' AUCs."""

    def number(value) -> str:
        return "n/a" if pd.isna(value) else f"{value:.{digits}f}"

    def with_ci(value, low, high) -> str:
        return "n/a" if pd.isna(value) else f"{number(value)} ({number(low)}-{number(high)})"

    table = pd.DataFrame(
        {
            "Model": metrics["model"],
            "Positive class": metrics["positive_class"],
            "Threshold": metrics["threshold"].map(number),
            "Sensitivity (95% CI)": [
                with_ci(*values)
                for values in metrics[["sensitivity", "sensitivity_ci_low", "sensitivity_ci_high"]].to_numpy()
            ],
            "Specificity (95% CI)": [
                with_ci(*values)
                for values in metrics[["specificity", "specificity_ci_low", "specificity_ci_high"]].to_numpy()
            ],
            "Brier": metrics["brier"].map(number),
            "ECE": metrics["ece"].map(number),
            "Calibration intercept": metrics["calibration_intercept"].map(number),
            "Calibration slope": metrics["calibration_slope"].map(number),
            "Bootstrap over": metrics["bootstrap_unit"] + "s",
        }
    )
    if "n_folds" in metrics:
        table["Fold AUROC mean (SD)"] = [
            "n/a" if pd.isna(mean) else f"{number(mean)} ({number(sd)}), {int(n)} folds"
            for mean, sd, n in zip(
                metrics["fold_auc_mean"], metrics["fold_auc_sd"], metrics["n_folds"], strict=True
            )
        ]
    return table


def markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame as a GitHub-flavoured Markdown table (cells as str, '|' escaped)."""

    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(c) for c in frame.columns) + " |",
        "|" + "|".join("---" for _ in frame.columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- model comparison


def paired_frames(frame_a: pd.DataFrame, frame_b: pd.DataFrame) -> pd.DataFrame | None:
    """Two models' predictions on the same images, row by row (path, label, patient_id if
    known, prob_pcnsl_a, prob_pcnsl_b), or None when the image sets or labels differ."""
    paths_a, paths_b = frame_a["path"].map(_normalise_path), frame_b["path"].map(_normalise_path)
    if len(frame_a) != len(frame_b) or set(paths_a) != set(paths_b) or paths_a.duplicated().any():
        return None
    merged = frame_a.assign(key=paths_a).merge(
        frame_b.assign(key=paths_b)[["key", "label", "prob_pcnsl"]], on="key", suffixes=("_a", "_b")
    )
    if (merged["label_a"] != merged["label_b"]).any():
        return None
    columns = {"path": merged["path"], "label": merged["label_a"]}
    if "patient_id" in merged:
        columns["patient_id"] = merged["patient_id"]
    columns["prob_pcnsl_a"], columns["prob_pcnsl_b"] = merged["prob_pcnsl_a"], merged["prob_pcnsl_b"]
    return pd.DataFrame(columns)


def compare_models(
    predictions: Mapping[str, pd.DataFrame],
    n_bootstraps: int = 10_000,
    seed: int | None = 0,
    confidence: float = 0.95,
    bootstrap_unit: str = "patient",
) -> pd.DataFrame:
    """Every pair of models scored on the same images: AUC(a) - AUC(b) with DeLong's
    paired test (difference, CI, z, p) and, when patient ids are known and bootstrap_unit
    is "patient", the paired bootstrap over patients (CI and p of the difference; with
    "slice", images are resampled instead). One row per pair, in the models' order; pairs
    whose images differ are left out.

    The AUCs are PCNSL's; with one sigmoid output GBM's are the same numbers.
    """
    rows = []
    names = list(predictions)
    for i, name_a in enumerate(names):
        for name_b in names[i + 1 :]:
            pair = paired_frames(predictions[name_a], predictions[name_b])
            if pair is None:
                continue
            is_pcnsl = pair["label"].to_numpy()
            delong = delong_paired_test(is_pcnsl, pair["prob_pcnsl_a"], pair["prob_pcnsl_b"], confidence)
            groups = pair["patient_id"] if bootstrap_unit == "patient" and "patient_id" in pair else None
            bootstrap = paired_bootstrap_auc_difference(
                is_pcnsl, pair["prob_pcnsl_a"], pair["prob_pcnsl_b"], groups, n_bootstraps, seed
            )
            rows.append(
                {
                    "model_a": name_a,
                    "model_b": name_b,
                    "n_images": len(pair),
                    "n_patients": pair["patient_id"].nunique() if "patient_id" in pair else np.nan,
                    "auc_a": delong["auc_a"],
                    "auc_b": delong["auc_b"],
                    "auc_difference": delong["difference"],
                    "delong_ci_low": delong["ci_low"],
                    "delong_ci_high": delong["ci_high"],
                    "delong_z": delong["z"],
                    "delong_p": delong["p_value"],
                    "bootstrap_unit": "patient" if groups is not None else "slice",
                    "bootstrap_ci_low": bootstrap.ci(confidence)[0],
                    "bootstrap_ci_high": bootstrap.ci(confidence)[1],
                    "bootstrap_p": bootstrap.p_value(),
                    "n_bootstraps": n_bootstraps,
                    "n_skipped": bootstrap.n_skipped,
                }
            )
    return pd.DataFrame(rows)


def comparison_summary(comparison: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """The comparison table as a paper reports it: text cells."""

    def number(value) -> str:
        return "n/a" if pd.isna(value) else f"{value:.{digits}f}"

    def p_text(value) -> str:
        return "n/a" if pd.isna(value) else ("<0.001" if value < 0.001 else f"{value:.3f}")

    return pd.DataFrame(
        {
            "Model A": comparison["model_a"],
            "Model B": comparison["model_b"],
            "Images": comparison["n_images"],
            "AUROC A": comparison["auc_a"].map(number),
            "AUROC B": comparison["auc_b"].map(number),
            "Difference": comparison["auc_difference"].map(number),
            "95% CI (DeLong)": [
                f"{number(lo)} to {number(hi)}"
                for lo, hi in zip(comparison["delong_ci_low"], comparison["delong_ci_high"], strict=True)
            ],
            "p (DeLong)": comparison["delong_p"].map(p_text),
            "95% CI (bootstrap)": [
                f"{number(lo)} to {number(hi)} ({unit}s)"
                for lo, hi, unit in zip(
                    comparison["bootstrap_ci_low"],
                    comparison["bootstrap_ci_high"],
                    comparison["bootstrap_unit"],
                    strict=True,
                )
            ],
            "p (bootstrap)": comparison["bootstrap_p"].map(p_text),
        }
    )


# ---------------------------------------------------------------------------- parameters


def as_list(value) -> list:
    """A notebook parameter given as a list, a JSON list string or one plain string."""
    if isinstance(value, str):
        value = json.loads(value) if value.strip().startswith("[") else [value]
    return list(value)


def as_mapping(value) -> dict[str, str]:
    """Models to evaluate: a dict name -> CSV, a JSON object string, a list of CSVs or one
    CSV path (named after the file)."""
    if isinstance(value, str) and value.strip().startswith("{"):
        value = json.loads(value)
    if isinstance(value, Mapping):
        return {str(name): str(path) for name, path in value.items()}
    return {Path(path).stem: str(path) for path in as_list(value)}


def thresholds_from_validation(threshold_from, model_names: Sequence[str]) -> dict[str, tuple[float, str]]:
    """Model name -> (Youden threshold, validation CSV) from validation predictions.

    threshold_from: one CSV for every model (a path), or model name -> CSV (a dict or a
    JSON object string). Each CSV is read as read_predictions reads it (its own label
    column when it has one, as step1's val_predictions.csv, else the gbm/pcnsl folders).
    """
    if isinstance(threshold_from, str) and threshold_from.strip().startswith("{"):
        threshold_from = json.loads(threshold_from)
    if isinstance(threshold_from, Mapping):
        missing = [name for name in model_names if name not in threshold_from]
        if missing:
            raise ValueError(f"threshold_from has no validation predictions for {', '.join(missing)}")
        sources = {name: str(threshold_from[name]) for name in model_names}
    else:
        sources = dict.fromkeys(model_names, str(threshold_from))
    thresholds = {}
    for name, csv_path in sources.items():
        validation = read_predictions(csv_path, patient_ids=False)
        thresholds[name] = (youden_threshold(validation["label"], validation["prob_pcnsl"]), csv_path)
    return thresholds


# ---------------------------------------------------------------------------- training history (step 3)

HISTORY_METRICS = {  # canonical name -> training column pattern (Keras names vary by version)
    "loss": r"loss",
    "accuracy": r"(?:binary_)?acc(?:uracy)?(?:_\d+)?",
    "auc": r"auc(?:_\d+)?",
}


def read_history(run: str | os.PathLike, allow_pickle: bool = False) -> pd.DataFrame:
    """A training history as a DataFrame with a 1-based `epoch` column (as in the checkpoint
    names; Keras's CSVLogger writes 0-based epochs).

    run: a run folder (its history.csv, or its history.pkl when allow_pickle) or the file
    itself. history.pkl is the original's pickled Keras History.history (a dict of lists);
    unpickling runs code from the file, so it is read only with allow_pickle=True, and
    with a warning. An epoch listed twice (a resumed run) keeps its last row.
    """
    run = Path(run)
    csv_path = run if run.suffix == ".csv" else run / "history.csv"
    pickle_path = run if run.suffix in (".pkl", ".pickle") else run / "history.pkl"
    if csv_path.is_file():
        history = pd.read_csv(csv_path)
        if "epoch" in history:
            history = history.drop_duplicates("epoch", keep="last").sort_values("epoch")
            history["epoch"] = history["epoch"].astype(int) + 1
    elif pickle_path.is_file():
        if not allow_pickle:
            raise ValueError(
                f"{pickle_path}: a pickled history; unpickling runs code from the file, so it is read "
                "only with allow_pickle = True (for files you trust)"
            )
        warnings.warn(
            f"{pickle_path}: unpickling runs any code the file holds; do this only for files you trust",
            stacklevel=2,
        )
        with open(pickle_path, "rb") as file:
            loaded = pickle.load(file)  # opt-in only, warned above
        history = pd.DataFrame(getattr(loaded, "history", loaded))
        history.insert(0, "epoch", np.arange(1, len(history) + 1))
    else:
        raise ValueError(f"{run}: no history.csv" + (" or history.pkl" if run.is_dir() else ""))
    if "loss" not in history:
        raise ValueError(f"{run}: the history has no loss column (columns: {', '.join(history.columns)})")
    return history.reset_index(drop=True)


def history_columns(history: pd.DataFrame) -> dict[str, tuple[str | None, str | None]]:
    """canonical metric (loss, accuracy, auc) -> (training column, validation column),
    None where absent; tolerant of Keras naming (binary_accuracy, acc, auc_1...)."""
    columns: dict[str, tuple[str | None, str | None]] = {}
    for metric, pattern in HISTORY_METRICS.items():
        train = next((c for c in history.columns if re.fullmatch(pattern, c)), None)
        val = f"val_{train}" if train and f"val_{train}" in history else None
        if val is None:
            val = next((c for c in history.columns if re.fullmatch(f"val_{pattern}", c)), None)
        columns[metric] = (train, val)
    return columns


def best_epoch(history: pd.DataFrame) -> int | None:
    """The 1-based epoch with the lowest val_loss (the epoch ModelCheckpoint kept), or None."""
    if "val_loss" not in history or history["val_loss"].isna().all():
        return None
    return int(history.loc[history["val_loss"].idxmin(), "epoch"])


def read_run_info(run: str | os.PathLike) -> dict:
    """The run.json of a run folder ({} when there is none)."""
    path = Path(run) / "run.json"
    return json.loads(path.read_text()) if path.is_file() else {}
