"""gbmpcnsl.stats: the AUC, its bootstrap (per image and per patient cluster) and DeLong
intervals, weighted AUCs and Wilson intervals, checked against sklearn, textbook formulas
and numbers computed by hand."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from helpers import correlated_slices
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from gbmpcnsl import stats


def tied_scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores with many ties (scores rounded to one decimal)."""
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 2, n)
    y_score = np.round(1 / (1 + np.exp(-(y_true - 0.5 + rng.normal(0, 1, n)))), 1)
    return y_true, y_score


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


def test_weighted_aucs_equal_sklearn_with_sample_weights():
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 2, 40)
    y_score = np.round(rng.random(40), 1)  # ties
    weights = rng.integers(0, 4, size=(5, 40))
    got = stats.weighted_aucs(y_true, y_score, weights)
    for row, auc in zip(weights, got, strict=True):
        assert auc == pytest.approx(roc_auc_score(y_true, y_score, sample_weight=row), abs=1e-12)


def test_cluster_bootstrap_equals_slice_bootstrap_with_one_slice_per_patient():
    rng = np.random.default_rng(2)
    y_true = rng.integers(0, 2, 50)
    y_score = rng.random(50) + 0.3 * y_true
    patients = [f"gbm/p{i:03d}" for i in rng.permutation(50)]  # distinct ids, any order
    slice_bootstrap = stats.bootstrap_auc(y_true, y_score, n_bootstraps=300, seed=5, max_chunk_elements=1000)
    cluster = stats.cluster_bootstrap_auc(
        y_true, y_score, patients, n_bootstraps=300, seed=5, max_chunk_elements=1000
    )
    np.testing.assert_allclose(cluster.aucs, slice_bootstrap.aucs, rtol=0, atol=1e-12)
    assert cluster.ci() == pytest.approx(slice_bootstrap.ci(), abs=1e-12)
    no_groups = stats.cluster_bootstrap_auc(
        y_true, y_score, None, n_bootstraps=300, seed=5, max_chunk_elements=1000
    )
    np.testing.assert_allclose(no_groups.aucs, slice_bootstrap.aucs, rtol=0, atol=1e-12)


def test_cluster_bootstrap_resamples_whole_patients():
    y_true, y_score, groups = correlated_slices(n_patients=10, n_slices=3)
    weights = next(stats.resample_weights(groups, len(y_true), 4, seed=0))
    for row in weights:
        per_patient = pd.Series(row).groupby(groups).agg(["min", "max"])
        assert (per_patient["min"] == per_patient["max"]).all()  # a patient's slices come together
        assert row.sum() == len(y_true)  # 10 patients drawn, 3 slices each
    # Each resample's AUC is the AUC of the expanded resample.
    result = stats.cluster_bootstrap_auc(y_true, y_score, groups, n_bootstraps=4, seed=0)
    for row, auc in zip(weights, result.aucs, strict=True):
        index = np.repeat(np.arange(len(y_true)), row)
        assert auc == pytest.approx(roc_auc_score(y_true[index], y_score[index]), abs=1e-12)


def test_cluster_bootstrap_is_wider_when_slices_of_a_patient_agree():
    y_true, y_score, groups = correlated_slices(n_patients=30, n_slices=8)
    slice_low, slice_high = stats.bootstrap_auc(y_true, y_score, n_bootstraps=2000, seed=0).ci()
    cluster_low, cluster_high = stats.cluster_bootstrap_auc(
        y_true, y_score, groups, n_bootstraps=2000, seed=0
    ).ci()
    # 8 near-copies of each patient: the slice bootstrap counts 240 images where there is
    # the information of 30 patients, about sqrt(8) too narrow.
    assert (cluster_high - cluster_low) > 2 * (slice_high - slice_low)
    assert cluster_low < stats.auc_score(y_true, y_score) < cluster_high


def test_wilson_interval_by_formula():
    z = norm.ppf(0.975)
    for successes, total in ((8, 10), (0, 12), (12, 12), (37, 91)):
        p = successes / total
        centre = (p + z * z / (2 * total)) / (1 + z * z / total)
        half = z / (1 + z * z / total) * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
        assert stats.wilson_interval(successes, total) == pytest.approx(
            (centre - half, centre + half), abs=1e-12
        )
    assert stats.wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook example
    assert stats.wilson_interval(0, 12)[0] == pytest.approx(0, abs=1e-15)
    assert all(np.isnan(stats.wilson_interval(0, 0)))
