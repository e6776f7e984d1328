"""gbmpcnsl.delong: DeLong's variance, CI and paired test, for independent predictions and
clustered in patients (Obuchowski 1997), checked against the definitions written out with
loops over pairs, numbers computed by hand and a large cluster bootstrap."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from helpers import correlated_slices, tied_scores
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from gbmpcnsl import delong, stats


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
    auc, variance = delong.delong_variance(y_true, y_score)
    assert auc == pytest.approx(7 / 8, abs=1e-15)
    assert variance == pytest.approx(19 / 864, abs=1e-15)
    low, high = delong.delong_ci(y_true, y_score, 0.95)
    assert (low, high) == pytest.approx((7 / 8 - 1.959963984540054 * np.sqrt(19 / 864), 1.0))  # clipped at 1


def test_delong_equals_definition_on_tied_data():
    y_true, y_score = tied_scores(60, seed=3)
    auc, variance = delong.delong_variance(y_true, y_score)
    expected_auc, expected_variance = delong_by_definition(y_true, y_score)
    assert auc == pytest.approx(expected_auc, abs=1e-12) and auc == pytest.approx(
        roc_auc_score(y_true, y_score)
    )
    assert variance == pytest.approx(expected_variance, rel=1e-10)
    low, high = delong.delong_ci(y_true, y_score, 0.95)
    assert low < auc < high
    assert (high - low) / 2 == pytest.approx(1.959963984540054 * np.sqrt(variance))


def test_delong_needs_two_of_each_class():
    with pytest.raises(ValueError, match="two positives and two negatives"):
        delong.delong_variance([1, 0, 0], [0.9, 0.1, 0.2])


def obuchowski_by_definition(y_true, scores, clusters) -> tuple[list[float], np.ndarray]:
    """Obuchowski (1997), Biometrics 53:567-578, written out: psi over every (positive,
    negative) pair, each cluster's sums V10_i and V01_i, and S10, S01, S11 by their formulas
    (sums over the clusters that hold positives, negatives, and all clusters)."""
    ids = list(dict.fromkeys(clusters))
    positives = [k for k, y in enumerate(y_true) if y == 1]
    negatives = [k for k, y in enumerate(y_true) if y == 0]
    big_m, big_n, n_models = len(positives), len(negatives), len(scores)

    def psi(x, y):
        return 1.0 if x > y else 0.5 if x == y else 0.0

    thetas, v10, v01 = [], [], []
    for score in scores:
        thetas.append(sum(psi(score[k], score[j]) for k in positives for j in negatives) / (big_m * big_n))
        v10.append(
            {
                i: sum(psi(score[k], score[j]) for k in positives if clusters[k] == i for j in negatives)
                / big_n
                for i in ids
            }
        )
        v01.append(
            {
                i: sum(psi(score[k], score[j]) for j in negatives if clusters[j] == i for k in positives)
                / big_m
                for i in ids
            }
        )
    m = {i: sum(1 for k in positives if clusters[k] == i) for i in ids}
    n = {i: sum(1 for j in negatives if clusters[j] == i) for i in ids}
    i10, i01, i_all = sum(m[i] > 0 for i in ids), sum(n[i] > 0 for i in ids), len(ids)
    covariance = np.zeros((n_models, n_models))
    for r in range(n_models):
        for s in range(n_models):
            s10 = (
                sum((v10[r][i] - m[i] * thetas[r]) * (v10[s][i] - m[i] * thetas[s]) for i in ids if m[i] > 0)
                * i10
                / ((i10 - 1) * big_m)
            )
            s01 = (
                sum((v01[r][i] - n[i] * thetas[r]) * (v01[s][i] - n[i] * thetas[s]) for i in ids if n[i] > 0)
                * i01
                / ((i01 - 1) * big_n)
            )
            s11_rs = sum((v10[r][i] - m[i] * thetas[r]) * (v01[s][i] - n[i] * thetas[s]) for i in ids)
            s11_sr = sum((v10[s][i] - m[i] * thetas[s]) * (v01[r][i] - n[i] * thetas[r]) for i in ids)
            s11 = (s11_rs + s11_sr) * i_all / (i_all - 1)
            covariance[r, s] = s10 / big_m + s01 / big_n + s11 / (big_m * big_n)
    return thetas, covariance


def clustered_case(seed: int):
    """Tied scores of two models on patients of 1 to 5 slices; a few patients hold both
    classes (Obuchowski's estimator allows it, e.g. two eyes of one person)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 6, 24)
    clusters = np.repeat([f"p{i}" for i in range(24)], sizes)
    patient_label = np.repeat(np.arange(24) % 2, sizes)
    mixed = np.isin(clusters, ["p3", "p10"]) & (rng.random(len(clusters)) < 0.5)
    y_true = np.where(mixed, 1 - patient_label, patient_label)
    patient_effect = np.repeat(rng.normal(0, 1, 24), sizes)
    score_a = np.round(patient_effect + 0.8 * y_true + rng.normal(0, 0.5, len(y_true)), 1)
    score_b = np.round(score_a + rng.normal(0, 0.7, len(y_true)), 1)
    order = rng.permutation(len(y_true))  # a patient's slices need not be adjacent
    return y_true[order], score_a[order], score_b[order], clusters[order]


def test_clustered_delong_equals_obuchowski_written_out():
    y_true, score_a, score_b, clusters = clustered_case(seed=0)
    thetas, covariance = obuchowski_by_definition(y_true, [score_a, score_b], clusters)
    aucs, got = delong.auc_covariance(y_true, [score_a, score_b], clusters)
    np.testing.assert_allclose(aucs, thetas, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got, covariance, rtol=1e-10, atol=1e-15)
    assert aucs[0] == pytest.approx(roc_auc_score(y_true, score_a), abs=1e-12)
    auc, variance = delong.delong_variance(y_true, score_a, clusters)
    assert (auc, variance) == pytest.approx((thetas[0], covariance[0, 0]), rel=1e-10)
    paired = delong.delong_paired_test(y_true, score_a, score_b, 0.9, clusters)
    expected_variance = covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]
    assert paired["variance"] == pytest.approx(expected_variance, rel=1e-10)
    z = (thetas[0] - thetas[1]) / np.sqrt(expected_variance)
    assert paired["z"] == pytest.approx(z) and paired["p_value"] == pytest.approx(2 * norm.sf(abs(z)))
    half = norm.ppf(0.95) * np.sqrt(expected_variance)
    assert (paired["ci_low"], paired["ci_high"]) == pytest.approx(
        (thetas[0] - thetas[1] - half, thetas[0] - thetas[1] + half)
    )
    low, high = delong.delong_ci(y_true, score_a, 0.95, clusters)
    assert (high - low) / 2 == pytest.approx(norm.ppf(0.975) * np.sqrt(covariance[0, 0]))


def test_clustered_delong_with_one_slice_per_patient_is_delong():
    y_true, y_score = tied_scores(60, seed=4)
    other = np.round(y_score + np.random.default_rng(0).normal(0, 0.2, 60), 1)
    patients = [f"gbm/p{i:03d}" for i in np.random.default_rng(1).permutation(60)]
    assert delong.delong_variance(y_true, y_score, patients) == pytest.approx(
        delong_by_definition(y_true, y_score), rel=1e-12
    )
    clustered = delong.delong_paired_test(y_true, y_score, other, groups=patients)
    independent = delong.delong_paired_test(y_true, y_score, other)
    assert clustered == pytest.approx(independent, rel=1e-12)


def test_clustered_delong_variance_matches_a_large_cluster_bootstrap():
    y_true, y_score, groups = correlated_slices(n_patients=40, n_slices=6, seed=2, noise=0.3)
    _, clustered = delong.delong_variance(y_true, y_score, groups)
    _, independent = delong.delong_variance(y_true, y_score)
    bootstrap = stats.cluster_bootstrap_auc(y_true, y_score, groups, n_bootstraps=20_000, seed=0)
    assert clustered == pytest.approx(bootstrap.valid_aucs.var(ddof=1), rel=0.15)
    assert (
        clustered > 3 * independent
    )  # six correlated slices per patient: slices-as-independent is too narrow


def test_paired_delong_p_is_0_when_the_difference_has_no_variance():
    y_true = np.array([1, 1, 0, 0])
    perfect, constant = np.array([0.9, 0.8, 0.2, 0.1]), np.full(4, 0.5)
    result = delong.delong_paired_test(y_true, perfect, constant)
    assert result["variance"] == 0 and result["difference"] == 0.5
    assert result["p_value"] == 0 and result["z"] == np.inf  # as pROC: a sure difference
    assert delong.delong_paired_test(y_true, constant, perfect)["z"] == -np.inf
    same = delong.delong_paired_test(y_true, perfect, perfect)
    assert same["p_value"] == 1 and np.isnan(same["z"])
    with pytest.raises(ValueError, match="two positives and two negatives \\(patients\\)"):
        delong.delong_variance(y_true, perfect, ["a", "a", "b", "c"])
