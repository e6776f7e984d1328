"""Two models compared on the same images: the paired bootstrap (gbmpcnsl.stats), the paired
DeLong test (gbmpcnsl.delong) and compare_models at the patient and slice levels
(gbmpcnsl.comparison).

Every number is checked against an independent computation: sklearn (roc_auc_score with
sample weights), textbook formulas and double loops over pairs of images.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from helpers import correlated_slices
from scipy.special import expit
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from gbmpcnsl import comparison, delong, report, stats


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
    result = delong.delong_paired_test(y_true, score_a, score_b)
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
    result = delong.delong_paired_test(y_true, score_a, score_b)
    assert (result["auc_a"], result["auc_b"]) == pytest.approx((auc_a, auc_b), abs=1e-12)
    assert result["variance"] == pytest.approx(variance, abs=1e-12)
    # One model's own variance is delong_variance's; identical models have no difference.
    assert delong.delong_variance(y_true, score_a)[1] == pytest.approx(
        delong.delong_paired_test(y_true, score_a, np.zeros(60))["variance"]
    )
    same = delong.delong_paired_test(y_true, score_a, score_a)
    assert same["difference"] == 0 and same["p_value"] == 1.0


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
    assert compared[["model_a", "model_b", "level"]].values.tolist() == [
        ["a", "b", "patient"],
        ["a", "b", "slice"],
    ]
    row = compared.iloc[1]  # slices: DeLong clustered by patient (Obuchowski), bootstrap over patients
    clustered = delong.delong_paired_test(y_true, score, other, groups=groups)
    assert row["auc_difference"] == pytest.approx(clustered["difference"], abs=1e-12)
    assert row["delong_p"] == pytest.approx(clustered["p_value"], abs=1e-12)
    assert (
        row["delong_p"] > delong.delong_paired_test(y_true, score, other)["p_value"]
    )  # slices as independent
    assert row["bootstrap_unit"] == "patient" and row["delong_unit"] == "patient" and row["n_patients"] == 20
    paired = stats.paired_bootstrap_auc_difference(y_true, score, other, groups, n_bootstraps=200, seed=0)
    assert (row["bootstrap_ci_low"], row["bootstrap_ci_high"]) == pytest.approx(paired.ci(), abs=1e-12)
    # Patients: each patient's mean probability per model, patients as independent cases.
    patient = compared.iloc[0]
    means = pd.DataFrame({"a": expit(score), "b": expit(other), "y": y_true, "g": groups}).groupby("g").mean()
    on_patients = delong.delong_paired_test(means["y"].astype(int), means["a"], means["b"])
    assert patient["n_cases"] == 20 and patient["auc_difference"] == pytest.approx(on_patients["difference"])
    assert patient["delong_p"] == pytest.approx(on_patients["p_value"], abs=1e-12)
    patient_bootstrap = stats.paired_bootstrap_auc_difference(
        means["y"].astype(int), means["a"], means["b"], None, n_bootstraps=200, seed=0
    )
    assert (patient["bootstrap_ci_low"], patient["bootstrap_ci_high"]) == pytest.approx(
        patient_bootstrap.ci(), abs=1e-12
    )
    slices_only = comparison.compare_models(frames, n_bootstraps=200, seed=0, bootstrap_unit="slice")
    assert slices_only.iloc[1]["delong_p"] == pytest.approx(
        delong.delong_paired_test(y_true, score, other)["p_value"]
    )
    assert slices_only.iloc[1]["delong_unit"] == "slice"
    markdown = report.markdown_table(comparison.comparison_summary(compared))
    assert (
        markdown.splitlines()[0].startswith("| Model A | Model B | Images |")
        and "| a | b | 60 | 20 | slice |" in markdown
    )
    at_90 = comparison.comparison_summary(comparison.compare_models(frames, 50, 0, confidence=0.9))
    assert "90% CI (DeLong)" in at_90.columns and not any("95%" in c for c in at_90.columns)
