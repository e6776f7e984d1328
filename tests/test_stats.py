"""gbmpcnsl.stats: the AUC, its bootstrap (per image and per patient cluster, stratified or
not), weighted AUCs and Wilson intervals, checked against sklearn, textbook formulas and
numbers computed by hand. DeLong's intervals: test_delong.py."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from helpers import correlated_slices, tied_scores
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from gbmpcnsl import stats


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


def test_stratified_bootstrap_keeps_each_class_count():
    """pROC's stratified bootstrap: positives and negatives (patients with a class) drawn
    separately, each as many as there are, so no resample lacks a class."""
    y_true = np.array([1, 0, 0, 0, 0, 0])  # one positive: the plain bootstrap skips a third
    y_score = np.array([0.9, 0.1, 0.2, 0.95, 0.4, 0.5])
    result = stats.cluster_bootstrap_auc(y_true, y_score, n_bootstraps=300, seed=0, stratified=True)
    assert result.n_skipped == 0
    # The documented draws: per chunk, each class's members in sorted class order.
    rng = np.random.default_rng(0)
    negatives, positives = np.flatnonzero(y_true == 0), np.flatnonzero(y_true == 1)
    drawn = np.concatenate(
        [negatives[rng.integers(0, 5, size=(300, 5))], positives[rng.integers(0, 1, size=(300, 1))]], axis=1
    )
    expected = [roc_auc_score(y_true[row], y_score[row]) for row in drawn]
    np.testing.assert_allclose(result.aucs, expected, rtol=0, atol=1e-12)

    y_true, y_score, groups = correlated_slices(n_patients=9, n_slices=3, seed=1)  # 5 GBM, 4 PCNSL patients
    for weights in stats.resample_weights(groups, len(y_true), 50, seed=2, strata=y_true):
        assert ((weights * y_true).sum(axis=1) == 4 * 3).all()  # 4 PCNSL patients of 3 slices
        assert ((weights * (1 - y_true)).sum(axis=1) == 5 * 3).all()
        for row in weights:
            per_patient = pd.Series(row).groupby(groups).agg(["min", "max"])
            assert (per_patient["min"] == per_patient["max"]).all()  # whole patients
    paired = stats.paired_bootstrap_auc_difference(
        y_true, y_score, -y_score, groups, n_bootstraps=50, seed=2, stratified=True
    )
    weights = np.concatenate(list(stats.resample_weights(groups, len(y_true), 50, seed=2, strata=y_true)))
    for row, difference in zip(weights, paired.differences, strict=True):
        expected = roc_auc_score(y_true, y_score, sample_weight=row) - roc_auc_score(
            y_true, -y_score, sample_weight=row
        )
        assert difference == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="one class per patient"):
        next(stats.resample_weights(["a", "a", "b"], 3, 5, seed=0, strata=[0, 1, 1]))


def test_cluster_bootstrap_chunks_are_sized_by_elements():
    """A volume cohort, 10 patients of 200 slices: a chunk holds at most max_chunk_elements
    weights (it held 10,000 resamples x 2,000 slices when sized by patients), and the
    bootstrap's peak memory stays small."""
    import tracemalloc

    y_true, y_score, groups = correlated_slices(n_patients=10, n_slices=200, seed=0)
    chunks = list(stats.resample_weights(groups, len(y_true), 1000, seed=0))
    assert max(chunk.size for chunk in chunks) <= 100_000 and sum(len(c) for c in chunks) == 1000
    tracemalloc.start()
    stats.cluster_bootstrap_auc(y_true, y_score, groups, n_bootstraps=1000, seed=0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20e6, f"peak {peak / 1e6:.0f} MB"
