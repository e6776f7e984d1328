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
    gbm, pcnsl = metrics.iloc[0], metrics.iloc[1]
    assert (gbm["positive_class"], pcnsl["positive_class"]) == ("GBM", "PCNSL")
    assert pcnsl["auc"] == pytest.approx(roc_auc_score(labels, prob_pcnsl), abs=1e-12)
    assert gbm["auc"] == pytest.approx(roc_auc_score(1 - labels, 1 - prob_pcnsl), abs=1e-12)
    assert gbm["sensitivity"] == pcnsl["specificity"] and gbm["tp"] == pcnsl["tn"]
    mean_prob = pd.Series(prob_pcnsl).groupby(patients).mean()
    patient_labels = pd.Series(labels).groupby(patients).first()
    assert pcnsl["n_patients"] == 16
    assert pcnsl["patient_auc"] == pytest.approx(roc_auc_score(patient_labels, mean_prob), abs=1e-12)

    markdown = report.markdown_table(report.summary_table(metrics)).splitlines()
    assert markdown[1] == "|" + "|".join(["---"] * 10) + "|"
    assert (
        f"| m | PCNSL | 24/24 | {pcnsl['auc']:.3f} | {pcnsl['auc_ci_low']:.3f}-{pcnsl['auc_ci_high']:.3f} |"
        in markdown[3]
    )
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
    metrics = report.metrics_table({"m": predictions.read_predictions(tmp_path / "p.csv")}, n_bootstraps=50)
    assert metrics["auc"].tolist() == [1.0, 1.0] and metrics["patient_auc"].isna().all()
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
