"""The AUC and its uncertainty, as pure functions over arrays: the AUC of the data, the slice,
cluster (patient) and paired bootstraps (optionally stratified by class, as pROC's), and the
Wilson interval of a proportion. DeLong's variance and test are in gbmpcnsl.delong.

The AUC is the Mann-Whitney U of the data, ties counted half (sklearn's roc_auc_score). A
bootstrap resample's AUC comes from counts per score value (no sort), vectorised over
chunks of resamples. Labels
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


def group_codes(groups, n: int) -> tuple[np.ndarray, int]:
    """Each prediction's group as 0..n_groups-1 in order of first appearance; None: every
    prediction its own group (the slice bootstrap)."""
    if groups is None:
        return np.arange(n), n
    codes, uniques = pd.factorize(pd.Series(np.asarray(groups)), sort=False)
    if len(codes) != n:
        raise ValueError(f"groups must have one entry per prediction ({len(codes)} for {n})")
    return codes, len(uniques)


def resample_weights(
    groups,
    n: int,
    n_bootstraps: int,
    seed: int | None,
    max_chunk_elements: int = 100_000,
    strata=None,
) -> Iterator[np.ndarray]:
    """Chunks of bootstrap resamples as weights: an int array (rows, n), how often each of
    the n predictions is drawn in each resample; a chunk holds at most max_chunk_elements
    weights (at least one row), whatever the number of groups.

    Groups (patients) are drawn with replacement, n_groups per resample, and a group's
    predictions come with it (cluster bootstrap); groups=None draws the predictions
    themselves. The draws are `rng.integers(0, n_groups, size=(rows, n_groups))` in chunks
    as bootstrap_auc's, so with one prediction per group (in order) both draw the same
    resamples. strata (one class per prediction, constant within a group): pROC's
    stratified bootstrap, each stratum's groups drawn separately, as many as it holds
    (`rng.integers(0, n_s, size=(rows, n_s))` per stratum in sorted order, each chunk).
    """
    codes, n_groups = group_codes(groups, n)
    if n_bootstraps < 1:
        raise ValueError(f"n_bootstraps must be at least 1 (got {n_bootstraps})")
    members = [np.arange(n_groups)] if strata is None else _stratum_groups(codes, n_groups, strata)
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, max_chunk_elements // max(n, 1))
    for start in range(0, n_bootstraps, rows_per_chunk):
        rows = min(rows_per_chunk, n_bootstraps - start)
        drawn = np.concatenate(
            [
                group_ids[rng.integers(0, len(group_ids), size=(rows, len(group_ids)))]
                for group_ids in members
            ],
            axis=1,
        )
        drawn += n_groups * np.arange(rows)[:, None]
        group_counts = np.bincount(drawn.ravel(), minlength=rows * n_groups).reshape(rows, n_groups)
        yield group_counts[:, codes]


def _stratum_groups(codes: np.ndarray, n_groups: int, strata) -> list[np.ndarray]:
    """The groups of each stratum (sorted strata); ValueError when a group spans two."""
    strata = np.asarray(strata)
    if len(strata) != len(codes):
        raise ValueError(f"strata must have one entry per prediction ({len(strata)} for {len(codes)})")
    stratum_values, stratum_codes = np.unique(strata, return_inverse=True)
    group_stratum = np.full(n_groups, -1)
    group_stratum[codes] = stratum_codes
    if (group_stratum[codes] != stratum_codes).any():
        raise ValueError("a stratified bootstrap needs one class per patient (a patient holds both)")
    return [np.flatnonzero(group_stratum == k) for k in range(len(stratum_values))]


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
    stratified: bool = False,
) -> BootstrapResult:
    """Bootstrap of the slice-level AUC that resamples patients (groups), not slices.

    Slices of one patient are correlated, so resampling them as if independent gives too
    narrow an interval; drawing whole patients keeps each patient's slices together. The
    AUC of a resample is the slice-level AUC of every slice of the drawn patients (a
    patient drawn twice counts twice). groups=None resamples slices (bootstrap_auc's
    resamples, bit for bit). stratified: positives and negatives (positive and negative
    patients) resampled separately, each keeping its count (pROC's stratified bootstrap;
    no resample then lacks a class).
    """
    positive, y_score = binary_arrays(y_true, y_score)
    if len(y_score) == 0:
        raise ValueError("no predictions to resample")
    aucs = np.concatenate(
        [
            weighted_aucs(positive, y_score, weights)
            for weights in resample_weights(
                groups, len(y_score), n_bootstraps, seed, max_chunk_elements, positive if stratified else None
            )
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
    stratified: bool = False,
) -> PairedBootstrapResult:
    """AUC(score_a) - AUC(score_b) on the same resamples: patients (groups) drawn with
    replacement, or images when groups is None; stratified as cluster_bootstrap_auc."""
    positive, score_a = binary_arrays(y_true, score_a)
    _, score_b = binary_arrays(y_true, score_b)
    differences = np.concatenate(
        [
            weighted_aucs(positive, score_a, weights) - weighted_aucs(positive, score_b, weights)
            for weights in resample_weights(
                groups, len(score_a), n_bootstraps, seed, max_chunk_elements, positive if stratified else None
            )
        ]
    )
    return PairedBootstrapResult(differences, int(np.isnan(differences).sum()), seed)


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
