"""gbmpcnsl.report: the metrics tables (per image and per patient, markdown), per-fold AUCs,
and the notebooks' parameters."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from helpers import write_predictions
from scipy.special import expit
from sklearn.metrics import brier_score_loss, roc_auc_score

from gbmpcnsl import predictions, report, stats


def test_metrics_table_and_markdown(tmp_path):
    rng = np.random.default_rng(4)
    labels = np.repeat([0, 1], 24)
    patients = [f"t/{'gbm' if y == 0 else 'pcnsl'}/p{i // 3}" for i, y in enumerate(labels)]
    prob_pcnsl = np.clip(0.5 + 0.25 * (labels - 0.5) + rng.normal(0, 0.2, len(labels)), 0, 1)
    frame = pd.DataFrame(
        {
            "path": [f"{p}/s{i}.png" for i, p in enumerate(patients)],
            "prob_gbm": 1 - prob_pcnsl,
            "prob_pcnsl": prob_pcnsl,
        }
    )
    frame.to_csv(tmp_path / "p.csv", index=False)
    frames = {"m": predictions.read_predictions(tmp_path / "p.csv")}
    metrics = report.metrics_table(frames, n_bootstraps=200, seed=1)
    assert metrics[["level", "positive_class"]].values.tolist() == [
        ["patient", "GBM"],
        ["patient", "PCNSL"],
        ["slice", "GBM"],
        ["slice", "PCNSL"],
    ]  # the patient level first
    gbm, pcnsl = metrics.iloc[2], metrics.iloc[3]
    assert pcnsl["auc"] == pytest.approx(roc_auc_score(labels, prob_pcnsl), abs=1e-12)
    assert gbm["auc"] == pytest.approx(roc_auc_score(1 - labels, 1 - prob_pcnsl), abs=1e-12)
    assert gbm["sensitivity"] == pcnsl["specificity"] and gbm["tp"] == pcnsl["tn"]
    assert (pcnsl["bootstrap_unit"], pcnsl["delong_unit"], pcnsl["wilson_unit"]) == (
        "patient",
        "patient",
        "slice",
    )
    mean_prob = pd.Series(prob_pcnsl).groupby(patients).mean()
    patient_labels = pd.Series(labels).groupby(patients).first()
    patient_pcnsl = metrics.iloc[1]
    assert pcnsl["n_patients"] == 16 and patient_pcnsl["n_patients"] == 16
    assert (patient_pcnsl["n_positive"], patient_pcnsl["n_negative"]) == (8, 8)
    assert patient_pcnsl["auc"] == pytest.approx(roc_auc_score(patient_labels, mean_prob), abs=1e-12)

    markdown = report.markdown_table(report.summary_table(metrics)).splitlines()
    assert markdown[1] == "|" + "|".join(["---"] * 10) + "|"
    assert (
        f"| m | slice | PCNSL | 16 | 24/24 | {pcnsl['auc']:.3f} | {pcnsl['auc_ci_low']:.3f}-{pcnsl['auc_ci_high']:.3f} |"
        in markdown[5]
    )
    assert markdown[0].count("95% CI") == 4 and "Slices as independent" in report.detail_table(metrics)
    at_90 = report.metrics_table(frames, n_bootstraps=50, confidence=0.9)
    for table in (report.summary_table(at_90), report.detail_table(at_90)):
        headers = " ".join(table.columns)
        assert "90% CI" in headers and "95%" not in headers  # the headers follow the confidence level
    assert report.confidence_label(0.975) == "97.5%"
    assert report.markdown_table(pd.DataFrame({"a|b": ["x|y"]})) == "| a\\|b |\n|---|\n| x\\|y |\n"


def test_metrics_table_without_patients_and_with_one_class(tmp_path):
    write_predictions(
        tmp_path / "p.csv",
        [
            ("t/gbm/a.png", 0.8, 0.2),
            ("t/gbm/b.png", 0.4, 0.6),
            ("t/pcnsl/c.png", 0.3, 0.7),
            ("t/pcnsl/d.png", 0.1, 0.9),
        ],
    )
    with pytest.warns(RuntimeWarning, match="calibration slope undefined"):  # AUC 1: separated
        metrics = report.metrics_table(
            {"m": predictions.read_predictions(tmp_path / "p.csv")}, n_bootstraps=50
        )
    assert metrics["auc"].tolist() == [1.0, 1.0] and metrics["n_patients"].isna().all()
    assert metrics["level"].tolist() == ["slice", "slice"]  # no patient ids: no patient rows
    summary = report.summary_table(metrics)
    assert summary["Patients"].tolist() == ["n/a", "n/a"] and summary["AUROC"].tolist() == ["1.000", "1.000"]

    write_predictions(tmp_path / "gbm_only.csv", [("t/gbm/a.png", 0.8, 0.2), ("t/gbm/b.png", 0.4, 0.6)])
    with pytest.raises(ValueError, match="only-gbm, GBM as the positive class: the AUC needs"):
        report.metrics_table(
            {"only-gbm": predictions.read_predictions(tmp_path / "gbm_only.csv")}, n_bootstraps=50
        )


def test_notebook_parameter_parsing():
    assert (
        report.as_list('["a", "b"]') == ["a", "b"]
        and report.as_list("run") == ["run"]
        and report.as_list(("a",)) == ["a"]
    )
    assert report.as_mapping('{"m": "p.csv"}') == {"m": "p.csv"}
    assert report.as_mapping("out/preds.csv") == {"preds": "out/preds.csv"}
    assert report.as_mapping(["x/a.csv", "x/b.csv"]) == {"a": "x/a.csv", "b": "x/b.csv"}


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


def test_patient_level_numbers_equal_a_computation_from_the_patient_means():
    """Must show (issue 20): the patient level's sensitivity, specificity (Wilson intervals),
    AUROC, Brier, ECE and calibration intercept and slope equal an independent computation
    from each patient's mean probability: pandas' groupby, sklearn and scipy's optimiser."""
    from scipy.optimize import minimize
    from scipy.special import logit
    from scipy.stats import norm
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(11)
    rows = []
    for folder, label in (("gbm", 0), ("pcnsl", 1)):
        for patient in range(15):
            shift = rng.normal(0, 1.2)
            for slice_number in range(rng.integers(1, 7)):
                prob = expit(0.9 * (2 * label - 1) + shift + rng.normal(0, 1))
                rows.append((f"t/{folder}/p{patient:02d}/s{slice_number}.png", 1 - prob, prob))
    frame = pd.DataFrame(rows, columns=["path", "prob_gbm", "prob_pcnsl"])
    frame["label"] = frame["path"].str.contains("/pcnsl/").astype(int)
    frame["patient_id"] = frame["path"].str.rsplit("/", n=1).str[0]
    threshold = 0.43
    metrics = report.metrics_table(
        {"m": frame}, n_bootstraps=300, seed=2, threshold=threshold, calibration_bins=5
    )
    means = frame.groupby("patient_id")[["prob_pcnsl", "label"]].mean()
    y, p = means["label"].to_numpy().astype(int), means["prob_pcnsl"].to_numpy()
    z = norm.ppf(0.975)

    def wilson(k, n):
        centre, half = (k / n + z * z / (2 * n)), z * np.sqrt(k / n * (1 - k / n) / n + z * z / (4 * n * n))
        return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)

    def nll(params, x, y_positive, slope=None):
        a, b = (params[0], slope) if slope is not None else params
        eta = a + b * x
        return np.sum(np.logaddexp(0, eta) - y_positive * eta)

    for positive_class, y_positive, p_positive, called in (
        ("PCNSL", y, p, p > threshold),
        ("GBM", 1 - y, 1 - p, ~(p > threshold)),
    ):
        row = metrics[(metrics["level"] == "patient") & (metrics["positive_class"] == positive_class)].iloc[0]
        tp, fn = int((called & (y_positive == 1)).sum()), int((~called & (y_positive == 1)).sum())
        tn, fp = int((~called & (y_positive == 0)).sum()), int((called & (y_positive == 0)).sum())
        assert (row["tp"], row["fn"], row["tn"], row["fp"]) == (tp, fn, tn, fp)
        assert row["sensitivity"] == pytest.approx(tp / (tp + fn)) and row["specificity"] == pytest.approx(
            tn / (tn + fp)
        )
        assert (row["sensitivity_ci_low"], row["sensitivity_ci_high"]) == pytest.approx(wilson(tp, tp + fn))
        assert (row["specificity_ci_low"], row["specificity_ci_high"]) == pytest.approx(wilson(tn, tn + fp))
        assert row["auc"] == pytest.approx(roc_auc_score(y_positive, p_positive), abs=1e-12)
        assert row["brier"] == pytest.approx(brier_score_loss(y_positive, p_positive), abs=1e-12)
        prob_true, prob_pred = calibration_curve(y_positive, p_positive, n_bins=5)
        counts = np.histogram(p_positive, bins=np.linspace(0, 1, 6))[0]
        counts = counts[counts > 0]
        assert row["ece"] == pytest.approx(np.sum(counts / len(y) * np.abs(prob_true - prob_pred)), abs=1e-12)
        x = logit(p_positive)
        a_fixed = minimize(nll, [0.0], args=(x, y_positive, 1.0), method="BFGS", options={"gtol": 1e-10}).x[0]
        a, b = minimize(nll, [0.0, 1.0], args=(x, y_positive), method="BFGS", options={"gtol": 1e-10}).x
        assert row["calibration_intercept"] == pytest.approx(a_fixed, abs=1e-5)
        assert row["calibration_slope"] == pytest.approx(b, abs=1e-5)
        assert (row["n_positive"], row["n_negative"], row["n_images"]) == (
            int(y_positive.sum()),
            int(len(y) - y_positive.sum()),
            len(frame),
        )
        assert (row["bootstrap_unit"], row["delong_unit"], row["wilson_unit"]) == ("patient",) * 3
        assert report.independent_slices(row) == "none"
    slice_row = metrics[(metrics["level"] == "slice") & (metrics["positive_class"] == "PCNSL")].iloc[0]
    assert slice_row["sensitivity"] != pytest.approx(
        metrics[(metrics["level"] == "patient") & (metrics["positive_class"] == "PCNSL")].iloc[0][
            "sensitivity"
        ]
    )
    assert report.independent_slices(slice_row) == "Wilson"


def test_folds_counted_only_when_their_auc_exists_and_the_stratified_option():
    frame = pd.DataFrame(
        {
            "path": [f"d/{c}/p{i}/s.png" for i, c in enumerate(["gbm", "pcnsl"] * 4 + ["gbm"] * 2)],
            "prob_pcnsl": [0.2, 0.7, 0.4, 0.6, 0.3, 0.9, 0.6, 0.4, 0.1, 0.5],
            "label": [0, 1] * 4 + [0, 0],
            "fold": [0, 0, 0, 0, 1, 1, 1, 1, 2, 2],  # fold 2 holds GBM only: no AUC
        }
    )
    frame["prob_gbm"] = 1 - frame["prob_pcnsl"]
    row = report.class_metrics(frame, "PCNSL", n_bootstraps=100)
    assert row["n_folds"] == 2 and np.isnan(row["auc_fold_2"])
    assert row["fold_auc_mean"] == pytest.approx((1.0 + 0.75) / 2)
    assert row["fold_auc_sd"] == pytest.approx(np.std([1.0, 0.75], ddof=1))
    assert "2 folds" in report.detail_table(pd.DataFrame([{"model": "m", **row}]))["Fold AUROC mean (SD)"][0]
    stratified = report.class_metrics(frame, "PCNSL", n_bootstraps=100, stratified_bootstrap=True)
    expected = stats.cluster_bootstrap_auc(frame["label"], frame["prob_pcnsl"], None, 100, 0, stratified=True)
    assert stratified["bootstrap_stratified"] and stratified["n_skipped"] == 0
    assert (stratified["auc_ci_low"], stratified["auc_ci_high"]) == pytest.approx(expected.ci())
    assert (
        "stratified" in report.detail_table(pd.DataFrame([{"model": "m", **stratified}]))["Bootstrap over"][0]
    )
