"""DeLong's variance of the AUC, its CI and the paired test of two AUCs, for independent
predictions and for predictions clustered in patients (Obuchowski 1997), as pure functions.

One computation serves both: each prediction is its own cluster when groups is None, and
Obuchowski's clustered estimator then equals DeLong's (DeLong, DeLong & Clarke-Pearson
1988) exactly. Structural components come from midranks (fast DeLong, Sun & Xu 2014).
Labels follow gbmpcnsl_common: GBM = 0, PCNSL = 1, the model outputs P(PCNSL).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm, rankdata

from gbmpcnsl.stats import binary_arrays, group_codes


def _delong_components(positive: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components by midranks: V10 per positive (the share of negatives
    it outscores), V01 per negative (the share of positives that outscore it); ties half."""
    pos_scores, neg_scores = y_score[positive], y_score[~positive]
    n_pos, n_neg = len(pos_scores), len(neg_scores)
    ranks_all = rankdata(np.concatenate([pos_scores, neg_scores]))
    v10 = (ranks_all[:n_pos] - rankdata(pos_scores)) / n_neg
    v01 = 1.0 - (ranks_all[n_pos:] - rankdata(neg_scores)) / n_pos
    return v10, v01


def auc_covariance(y_true, scores, groups=None) -> tuple[np.ndarray, np.ndarray]:
    """(AUCs, their covariance matrix) of several models' scores of the same predictions.

    Obuchowski (1997), for I clusters (patients), M positives and N negatives in all, and
    cluster i holding m_i positives and n_i negatives: V10_i is the sum over its positives
    of the share of all negatives each outscores, V01_i the sum over its negatives of the
    share of all positives that outscore it; D10_i = V10_i - m_i AUC, D01_i = V01_i - n_i AUC.
    S10 = I10 / ((I10 - 1) M) sum D10 D10', S01 = I01 / ((I01 - 1) N) sum D01 D01',
    S11 = I / (I - 1) sum D10 D01' (I10, I01: clusters holding positives, negatives), and
    cov = S10 / M + S01 / N + (S11 + S11') / (M N). groups=None: every prediction its
    own cluster, where this is DeLong's covariance (S11 = 0). Needs two clusters holding
    positives and two holding negatives.
    """
    positive, _ = binary_arrays(y_true, scores[0])
    scores = [binary_arrays(positive, score)[1] for score in scores]
    codes, n_clusters = group_codes(groups, len(positive))
    m_i = np.bincount(codes[positive], minlength=n_clusters)
    n_i = np.bincount(codes[~positive], minlength=n_clusters)
    i10, i01 = int((m_i > 0).sum()), int((n_i > 0).sum())
    if i10 < 2 or i01 < 2:
        unit = "predictions" if groups is None else "patients"
        raise ValueError(f"DeLong's variance needs at least two positives and two negatives ({unit})")
    n_pos, n_neg = int(m_i.sum()), int(n_i.sum())
    aucs, d10, d01 = [], [], []
    for score in scores:
        v10, v01 = _delong_components(positive, score)
        auc = float(v10.mean())
        aucs.append(auc)
        d10.append(np.bincount(codes[positive], weights=v10, minlength=n_clusters) - m_i * auc)
        d01.append(np.bincount(codes[~positive], weights=v01, minlength=n_clusters) - n_i * auc)
    d10, d01 = np.array(d10), np.array(d01)
    s10 = i10 / ((i10 - 1) * n_pos) * (d10 @ d10.T)
    s01 = i01 / ((i01 - 1) * n_neg) * (d01 @ d01.T)
    s11 = n_clusters / (n_clusters - 1) * (d10 @ d01.T)
    covariance = s10 / n_pos + s01 / n_neg + (s11 + s11.T) / (n_pos * n_neg)
    return np.array(aucs), covariance


def delong_variance(y_true, y_score, groups=None) -> tuple[float, float]:
    """(AUC, variance of the AUC) by DeLong's method; with groups (a patient per
    prediction), Obuchowski's clustered variance (auc_covariance)."""
    aucs, covariance = auc_covariance(y_true, [y_score], groups)
    return float(aucs[0]), float(max(0.0, covariance[0, 0]))


def delong_ci(y_true, y_score, confidence: float = 0.95, groups=None) -> tuple[float, float]:
    """Normal-approximation confidence interval of the AUC from the DeLong variance
    (clustered by groups when given), clipped to [0, 1]."""
    auc, variance = delong_variance(y_true, y_score, groups)
    half_width = norm.ppf(0.5 + confidence / 2) * np.sqrt(variance)
    return float(max(0.0, auc - half_width)), float(min(1.0, auc + half_width))


def delong_paired_test(y_true, score_a, score_b, confidence: float = 0.95, groups=None) -> dict[str, float]:
    """DeLong's test of two correlated AUCs: two models' scores on the same predictions
    (with groups, Obuchowski's clustered covariance).

    AUC_a - AUC_b has variance var_a + var_b - 2 cov (auc_covariance), a normal-
    approximation CI and the two-sided p-value of z = difference / its standard error.
    Returns auc_a, auc_b, difference, variance, ci_low, ci_high, z and p_value. With a
    variance of 0 (e.g. two models ranking every pair alike): z NaN and p 1 when the
    difference is 0 too, else z infinite and p 0 (as pROC).
    """
    aucs, covariance = auc_covariance(y_true, [score_a, score_b], groups)
    auc_a, auc_b = float(aucs[0]), float(aucs[1])
    difference = auc_a - auc_b
    variance = float(max(0.0, covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]))
    half_width = norm.ppf(0.5 + confidence / 2) * np.sqrt(variance)
    if variance > 0:
        z = difference / np.sqrt(variance)
        p_value = float(2 * norm.sf(abs(z)))
    elif difference == 0:
        z, p_value = float("nan"), 1.0
    else:
        z, p_value = float(np.copysign(np.inf, difference)), 0.0
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
