"""The AUC and its uncertainty, as pure functions over arrays: the AUC of the data, the slice,
cluster (patient) and paired bootstraps, DeLong's variance, CI and paired test, and the
Wilson interval of a proportion.

The AUC is the Mann-Whitney U of the data, ties counted half (sklearn's roc_auc_score). A
bootstrap resample's AUC comes from counts per score value (no sort), vectorised over
chunks of resamples. DeLong's method uses midranks (fast DeLong, Sun & Xu 2014). Labels
follow gbmpcnsl_common: GBM = 0, PCNSL = 1, the model outputs P(PCNSL).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import norm, rankdata

# ---------------------------------------------------------------------------- AUC


def binary_arrays(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert: y_true of 0/1 (or booleans) -> a boolean array (True: positive),
    y_score -> finite float64, both 1-D and of the same length; ValueError otherwise."""
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
    positive, y_score = binary_arrays(y_true, y_score)
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
    positive, y_score = binary_arrays(y_true, y_score)
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


def resample_weights(
    groups, n: int, n_bootstraps: int, seed: int | None, max_chunk_elements: int = 100_000
) -> Iterator[np.ndarray]:
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
    positive, y_score = binary_arrays(y_true, y_score)
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
    positive, y_score = binary_arrays(y_true, y_score)
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
    positive, score_a = binary_arrays(y_true, score_a)
    _, score_b = binary_arrays(y_true, score_b)
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
    positive, y_score = binary_arrays(y_true, y_score)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos < 2 or n_neg < 2:
        raise ValueError("the DeLong variance needs at least two positives and two negatives")
    v10, v01 = _delong_components(positive, y_score)
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
    positive, score_a = binary_arrays(y_true, score_a)
    _, score_b = binary_arrays(y_true, score_b)
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


# ---------------------------------------------------------------------------- proportions


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
