"""The estimates beyond the AUC (gbmpcnsl.stats, calibration, thresholds, comparison):
cluster (patient) bootstrap, paired DeLong test and paired bootstrap, calibration, Wilson
intervals, Youden's threshold, per-fold AUCs.

Every number is checked against an independent computation: sklearn (roc_auc_score with
sample weights, brier_score_loss, calibration_curve), scipy's optimiser on the likelihood,
textbook formulas and double loops over pairs of images.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize
from scipy.special import expit, logit
from scipy.stats import norm
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_auc_score

from gbmpcnsl import calibration, comparison, predictions, report, stats, thresholds


def correlated_slices(n_patients: int = 30, n_slices: int = 8, seed: int = 0, noise: float = 0.05):
    """Patients of both classes whose slices share the patient's score (plus a little noise)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_patients) % 2
    patient_score = rng.normal(0, 1, n_patients) + 0.8 * labels
    y_true = np.repeat(labels, n_slices)
    y_score = np.repeat(patient_score, n_slices) + rng.normal(0, noise, n_patients * n_slices)
    groups = np.repeat([f"p{i}" for i in range(n_patients)], n_slices)
    return y_true, y_score, groups


# ---------------------------------------------------------------------------- bootstrap
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


def test_paired_bootstrap_difference():
    y_true, y_score, groups = correlated_slices(n_patients=20, n_slices=3, seed=3)
    other = y_score + np.random.default_rng(0).normal(0, 1.0, len(y_score))
    result = stats.paired_bootstrap_auc_difference(y_true, y_score, other, groups, n_bootstraps=50, seed=1)
    weights = np.concatenate(list(stats.resample_weights(groups, len(y_true), 50, seed=1)))
    for row, difference in zip(weights, result.differences, strict=True):
        a = roc_auc_score(y_true, y_score, sample_weight=row)
        b = roc_auc_score(y_true, other, sample_weight=row)
        assert difference == pytest.approx(a - b, abs=1e-12)
    same = stats.paired_bootstrap_auc_difference(y_true, y_score, y_score, groups, n_bootstraps=50)
    assert (same.differences == 0).all() and same.p_value() == 1.0 and same.ci() == (0.0, 0.0)


# ---------------------------------------------------------------------------- DeLong
def delong_by_definition(y_true, score_a, score_b):
    """DeLong et al. 1988, written out: psi over every (positive, negative) pair."""

    def components(score):
        pos, neg = score[y_true == 1], score[y_true == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        return psi.mean(axis=1), psi.mean(axis=0)  # V10 per positive, V01 per negative

    (v10_a, v01_a), (v10_b, v01_b) = components(score_a), components(score_b)
    m, n = len(v10_a), len(v01_a)
    auc_a, auc_b = v10_a.mean(), v10_b.mean()

    def cov(x, y):
        return ((x - x.mean()) * (y - y.mean())).sum() / (len(x) - 1)

    s_aa = cov(v10_a, v10_a) / m + cov(v01_a, v01_a) / n
    s_bb = cov(v10_b, v10_b) / m + cov(v01_b, v01_b) / n
    s_ab = cov(v10_a, v10_b) / m + cov(v01_a, v01_b) / n
    return auc_a, auc_b, s_aa + s_bb - 2 * s_ab


def test_paired_delong_hand_computed_example():
    # 4 positives, 4 negatives; model a ranks 15 of 16 pairs right, model b 12.
    y_true = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    score_a = np.array([0.9, 0.8, 0.7, 0.4, 0.5, 0.3, 0.2, 0.1])
    score_b = np.array([0.9, 0.6, 0.3, 0.7, 0.5, 0.8, 0.2, 0.1])
    result = stats.delong_paired_test(y_true, score_a, score_b)
    assert result["auc_a"] == 15 / 16 and result["auc_b"] == 12 / 16  # counted by hand
    # By hand, V10 per positive (share of negatives below it) and V01 per negative (share of
    # positives above it): V10_a = (1, 1, 1, 3/4), V01_a = (3/4, 1, 1, 1);
    # V10_b = (1, 3/4, 1/2, 3/4), V01_b = (3/4, 1/4, 1, 1). Sample (co)variances, ddof 1:
    # V10: var_a 1/64, var_b 1/24, cov 0; V01: var_a 1/64, var_b 1/8, cov 0. So
    # var(AUC_a - AUC_b) = (1/64 + 1/24 - 0) / 4 + (1/64 + 1/8 - 0) / 4 = 19/384.
    expected_variance = 19 / 384
    assert result["variance"] == pytest.approx(expected_variance, abs=1e-12)
    assert delong_by_definition(y_true, score_a, score_b)[2] == pytest.approx(expected_variance, abs=1e-12)
    z = (15 / 16 - 12 / 16) / np.sqrt(expected_variance)
    assert result["z"] == pytest.approx(z) and result["p_value"] == pytest.approx(2 * norm.sf(z))
    half = norm.ppf(0.975) * np.sqrt(expected_variance)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((3 / 16 - half, 3 / 16 + half))


def test_paired_delong_equals_definition_on_random_tied_data():
    rng = np.random.default_rng(7)
    y_true = rng.integers(0, 2, 60)
    score_a = np.round(rng.random(60) + 0.4 * y_true, 1)
    score_b = np.round(score_a + rng.normal(0, 0.3, 60), 1)
    auc_a, auc_b, variance = delong_by_definition(y_true, score_a, score_b)
    result = stats.delong_paired_test(y_true, score_a, score_b)
    assert (result["auc_a"], result["auc_b"]) == pytest.approx((auc_a, auc_b), abs=1e-12)
    assert result["variance"] == pytest.approx(variance, abs=1e-12)
    # One model's own variance is delong_variance's; identical models have no difference.
    assert stats.delong_variance(y_true, score_a)[1] == pytest.approx(
        stats.delong_paired_test(y_true, score_a, np.zeros(60))["variance"]
    )
    same = stats.delong_paired_test(y_true, score_a, score_a)
    assert same["difference"] == 0 and same["p_value"] == 1.0


# ---------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_brier_ece_and_calibration_table_equal_sklearn(strategy):
    rng = np.random.default_rng(3)
    y_prob = rng.beta(0.7, 0.7, 500)
    y_true = (rng.random(500) < y_prob**1.3).astype(int)
    table = calibration.calibration_table(y_true, y_prob, n_bins=8, strategy=strategy)
    prob_true, prob_pred = calibration_curve(y_true, y_prob, n_bins=8, strategy=strategy)
    np.testing.assert_allclose(table["observed"], prob_true, rtol=0, atol=1e-12)
    np.testing.assert_allclose(table["mean_predicted"], prob_pred, rtol=0, atol=1e-12)
    assert table["n"].sum() == 500

    metrics = calibration.calibration_metrics(y_true, y_prob, n_bins=8, strategy=strategy)
    assert metrics["brier"] == pytest.approx(brier_score_loss(y_true, y_prob), abs=1e-15)
    counts = table["n"].to_numpy()
    assert metrics["ece"] == pytest.approx(np.sum(counts / 500 * np.abs(prob_true - prob_pred)), abs=1e-12)


def test_calibration_intercept_and_slope_by_maximum_likelihood():
    rng = np.random.default_rng(4)
    true_logit = rng.normal(0, 1.5, 4000)
    y_true = (rng.random(4000) < expit(true_logit)).astype(int)
    overconfident = expit(2 * true_logit - 0.5)  # too extreme and shifted
    metrics = calibration.calibration_metrics(y_true, overconfident)
    x = logit(overconfident)

    def nll(params, offset_slope=None):
        a, b = (params[0], offset_slope) if offset_slope is not None else params
        eta = a + b * x
        return np.sum(np.logaddexp(0, eta) - y_true * eta)

    a_fixed = minimize(nll, [0.0], args=(1.0,), method="BFGS", options={"gtol": 1e-10}).x[0]
    a, b = minimize(nll, [0.0, 1.0], method="BFGS", options={"gtol": 1e-10}).x
    assert metrics["calibration_intercept"] == pytest.approx(a_fixed, abs=1e-5)
    assert metrics["calibration_slope"] == pytest.approx(b, abs=1e-5)
    assert metrics["calibration_slope"] == pytest.approx(0.5, abs=0.05)  # 1 / 2, the exaggeration
    well = calibration.calibration_metrics(y_true, expit(true_logit))
    assert abs(well["calibration_intercept"]) < 0.1 and well["calibration_slope"] == pytest.approx(1, abs=0.1)
    assert np.isnan(calibration.calibration_metrics([1, 1], [0.3, 0.9])["calibration_slope"])


# ---------------------------------------------------------------------------- intervals and thresholds
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


def test_fold_aucs_and_cv_metrics():
    rng = np.random.default_rng(6)
    n = 90
    labels = np.tile([0, 1], n // 2)
    prob_pcnsl = expit(rng.normal(0, 1, n) + 1.5 * labels)
    folds = np.repeat([0, 1, 2], n // 3)
    frame = pd.DataFrame(
        {
            "path": [f"d/{'pcnsl' if y else 'gbm'}/p{i}/s.png" for i, y in enumerate(labels)],
            "prob_gbm": 1 - prob_pcnsl,
            "prob_pcnsl": prob_pcnsl,
            "label": labels,
            "fold": folds,
        }
    )
    per_fold = report.fold_aucs(frame, "PCNSL")
    expected = [roc_auc_score(labels[folds == k], prob_pcnsl[folds == k]) for k in range(3)]
    np.testing.assert_allclose(per_fold["auc"], expected, rtol=0, atol=1e-12)
    row = report.class_metrics(frame, "PCNSL", n_bootstraps=100)
    assert row["n_folds"] == 3 and row["auc_fold_2"] == pytest.approx(expected[2])
    assert row["fold_auc_mean"] == pytest.approx(np.mean(expected)) and row["fold_auc_sd"] == pytest.approx(
        np.std(expected, ddof=1)
    )
    assert row["auc"] == pytest.approx(roc_auc_score(labels, prob_pcnsl))  # pooled out-of-fold
    assert row["bootstrap_unit"] == "slice"  # no patient ids
    called = prob_pcnsl > 0.5
    tp, fn = (called & (labels == 1)).sum(), (~called & (labels == 1)).sum()
    assert (row["sensitivity_ci_low"], row["sensitivity_ci_high"]) == pytest.approx(
        stats.wilson_interval(tp, tp + fn)
    )
    assert row["brier"] == pytest.approx(brier_score_loss(labels, prob_pcnsl))


def test_read_predictions_takes_labels_patients_and_folds_from_oof_csv(tmp_path):
    csv_path = tmp_path / "oof_predictions.csv"
    pd.DataFrame(
        {
            "path": ["a/x1.png", "a/x2.png", "b/y1.png", "b/y2.png"],  # no class folder in the path
            "prob_gbm": [0.8, 0.6, 0.3, 0.1],
            "prob_pcnsl": [0.2, 0.4, 0.7, 0.9],
            "label": [0, 0, 1, 1],
            "patient_id": ["gbm/a", "gbm/a", "pcnsl/b", "pcnsl/b"],
            "fold": [0, 0, 1, 1],
        }
    ).to_csv(csv_path, index=False)
    frame = predictions.read_predictions(csv_path)
    assert frame["label"].tolist() == [0, 0, 1, 1]
    assert frame["patient_id"].tolist() == ["gbm/a", "gbm/a", "pcnsl/b", "pcnsl/b"]
    assert frame["fold"].tolist() == [0, 0, 1, 1]


def test_compare_models_pairs_scored_on_the_same_images():
    y_true, score, groups = correlated_slices(n_patients=20, n_slices=3, seed=8)
    other = score + np.random.default_rng(1).normal(0, 1.0, len(score))

    def frame(prob_pcnsl, order):
        prob_pcnsl = expit(prob_pcnsl)
        return pd.DataFrame(
            {
                "path": [
                    f"t/{'pcnsl' if y else 'gbm'}/{g}/s{i}.png"
                    for i, (y, g) in enumerate(zip(y_true, groups, strict=True))
                ],
                "prob_gbm": 1 - prob_pcnsl,
                "prob_pcnsl": prob_pcnsl,
                "label": y_true,
                "patient_id": groups,
            }
        ).iloc[order]

    n = len(y_true)
    frames = {
        "a": frame(score, np.arange(n)),
        "b": frame(other, np.random.default_rng(2).permutation(n)),  # same images, other order
        "c": frame(score, np.arange(n - 1)),  # one image fewer: not comparable
    }
    compared = comparison.compare_models(frames, n_bootstraps=200, seed=0)
    assert compared[["model_a", "model_b"]].values.tolist() == [["a", "b"]]
    row = compared.iloc[0]
    delong = stats.delong_paired_test(y_true, score, other)
    assert row["auc_difference"] == pytest.approx(delong["difference"], abs=1e-12)
    assert row["delong_p"] == pytest.approx(delong["p_value"], abs=1e-12)
    assert row["bootstrap_unit"] == "patient" and row["n_patients"] == 20
    paired = stats.paired_bootstrap_auc_difference(y_true, score, other, groups, n_bootstraps=200, seed=0)
    assert (row["bootstrap_ci_low"], row["bootstrap_ci_high"]) == pytest.approx(paired.ci(), abs=1e-12)
    markdown = report.markdown_table(comparison.comparison_summary(compared))
    assert (
        markdown.splitlines()[0].startswith("| Model A | Model B | Images |") and "| a | b | 60 |" in markdown
    )
