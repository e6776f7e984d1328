"""What the step 3 and step 4 notebooks show and save: the metrics of each model and class
(class_metrics, metrics_table), the tables a paper reports (summary, detail, Markdown),
patient-level rows, and the notebooks' list and mapping parameters.

Numbers come from gbmpcnsl.stats, thresholds and calibration; the frames from
gbmpcnsl.predictions.read_predictions. Everything returns DataFrames or dicts; plotting and
file writing stay in the notebooks. Labels follow gbmpcnsl_common: GBM = 0, PCNSL = 1.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from gbmpcnsl.calibration import calibration_metrics
from gbmpcnsl.patients import aggregate_by_patient
from gbmpcnsl.stats import auc_score, bootstrap_auc, cluster_bootstrap_auc, delong_ci, wilson_interval
from gbmpcnsl.thresholds import predict_labels, threshold_metrics
from gbmpcnsl_common import CLASS_NAMES


def patient_level(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per patient, sorted by patient_id: label, n_images and the mean prob_pcnsl of
    its images (gbmpcnsl.patients, the aggregation step2 --per-patient uses), prob_gbm = 1 - that."""
    rows = aggregate_by_patient(frame["patient_id"], frame["prob_pcnsl"], "mean")
    table = pd.DataFrame(rows, columns=["patient_id", "n_images", "prob_pcnsl"]).sort_values("patient_id")
    table.insert(1, "label", table["patient_id"].map(frame.groupby("patient_id")["label"].first()))
    table.insert(3, "prob_gbm", 1.0 - table["prob_pcnsl"])
    return table.reset_index(drop=True)


def class_score(frame: pd.DataFrame, positive_class: str) -> np.ndarray:
    """The score that ranks images for a positive class: prob_pcnsl for PCNSL, and
    -prob_pcnsl for GBM (the same order as prob_gbm = 1 - prob_pcnsl, without the ties that
    rounding 1 - p creates when a saturated sigmoid gives p near 0)."""
    if positive_class not in CLASS_NAMES:
        raise ValueError(f"positive class {positive_class!r}: expected one of {', '.join(CLASS_NAMES)}")
    prob_pcnsl = frame["prob_pcnsl"].to_numpy(dtype=np.float64)
    return prob_pcnsl if CLASS_NAMES.index(positive_class) == 1 else -prob_pcnsl


def class_metrics(
    frame: pd.DataFrame,
    positive_class: str,
    n_bootstraps: int = 10_000,
    seed: int | None = 0,
    confidence: float = 0.95,
    threshold: float = 0.5,
    bootstrap_unit: str = "patient",
    calibration_bins: int = 10,
    calibration_strategy: str = "uniform",
) -> dict:
    """All numbers for one model and one positive class (GBM or PCNSL), as a flat dict.

    frame is read_predictions' output. The AUC is the AUC of the data; its CIs are the
    bootstrap percentile CI and the DeLong CI. The bootstrap resamples patients when
    patient ids are known and bootstrap_unit is "patient" (cluster_bootstrap_auc), else
    slices ("slice": as if independent); the row says which (bootstrap_unit).
    Sensitivity etc. use predict_labels(prob_pcnsl, threshold), with Wilson intervals for
    sensitivity and specificity. Calibration (calibration_metrics) is of the positive
    class's probability. With patient ids, the patient-level AUC uses the mean
    probability per patient, with a bootstrap CI over patients. With a fold column
    (out-of-fold predictions), the AUC of each fold (auc_fold_<i>), their mean and SD.
    Images are ranked by class_score.
    """
    if bootstrap_unit not in ("patient", "slice"):
        raise ValueError(f"bootstrap_unit {bootstrap_unit!r}: expected 'patient' or 'slice'")
    score = class_score(frame, positive_class)
    positive_label = CLASS_NAMES.index(positive_class)
    is_positive = (frame["label"].to_numpy() == positive_label).astype(int)

    row: dict = {
        "positive_class": positive_class,
        "n_images": len(frame),
        "n_positive": int(is_positive.sum()),
        "n_negative": int(len(frame) - is_positive.sum()),
    }
    groups = frame["patient_id"] if bootstrap_unit == "patient" and "patient_id" in frame else None
    row.update(_auc_numbers(is_positive, score, groups, n_bootstraps, seed, confidence))
    row.update(_threshold_numbers(frame["label"], frame["prob_pcnsl"], positive_label, threshold, confidence))
    prob_positive = frame["prob_pcnsl"].to_numpy(dtype=np.float64)
    if positive_label == 0:
        prob_positive = 1.0 - prob_positive
    row.update(calibration_metrics(is_positive, prob_positive, calibration_bins, calibration_strategy))
    row.update(_patient_numbers(frame, positive_class, n_bootstraps, seed, confidence))
    if "fold" in frame:
        row.update(_fold_numbers(frame, positive_class))
    return row


def _auc_numbers(is_positive, score, groups, n_bootstraps: int, seed: int | None, confidence: float) -> dict:
    """The AUC with its bootstrap CI (over patients when groups are given, else slices) and
    its DeLong CI (NaN with fewer than two of a class)."""
    numbers: dict = {"auc": auc_score(is_positive, score)}
    if groups is not None:
        bootstrap = cluster_bootstrap_auc(is_positive, score, groups, n_bootstraps, seed)
        numbers["bootstrap_unit"] = "patient"
    else:
        bootstrap = bootstrap_auc(is_positive, score, n_bootstraps=n_bootstraps, seed=seed)
        numbers["bootstrap_unit"] = "slice"
    numbers["auc_ci_low"], numbers["auc_ci_high"] = bootstrap.ci(confidence)
    numbers["n_bootstraps"] = bootstrap.n_bootstraps
    numbers["n_skipped"] = bootstrap.n_skipped
    try:
        numbers["delong_ci_low"], numbers["delong_ci_high"] = delong_ci(is_positive, score, confidence)
    except ValueError:  # fewer than two of a class
        numbers["delong_ci_low"] = numbers["delong_ci_high"] = float("nan")
    return numbers


def _threshold_numbers(labels, prob_pcnsl, positive_label: int, threshold: float, confidence: float) -> dict:
    """The threshold, threshold_metrics of the calls there, and Wilson intervals of the
    sensitivity and specificity."""
    numbers: dict = {"threshold": threshold}
    numbers.update(threshold_metrics(labels, predict_labels(prob_pcnsl, threshold), positive_label))
    numbers["sensitivity_ci_low"], numbers["sensitivity_ci_high"] = wilson_interval(
        numbers["tp"], numbers["tp"] + numbers["fn"], confidence
    )
    numbers["specificity_ci_low"], numbers["specificity_ci_high"] = wilson_interval(
        numbers["tn"], numbers["tn"] + numbers["fp"], confidence
    )
    return numbers


def _patient_numbers(
    frame: pd.DataFrame, positive_class: str, n_bootstraps: int, seed: int | None, confidence: float
) -> dict:
    """n_patients and the patient-level AUC (mean probability per patient) with its
    bootstrap CI over patients; NaN without patient ids or with one class of patients."""
    numbers: dict = {"n_patients": np.nan}
    numbers["patient_auc"] = numbers["patient_auc_ci_low"] = numbers["patient_auc_ci_high"] = np.nan
    if "patient_id" not in frame:
        return numbers
    patients = patient_level(frame)
    patient_positive = (patients["label"].to_numpy() == CLASS_NAMES.index(positive_class)).astype(int)
    numbers["n_patients"] = len(patients)
    if 0 < patient_positive.sum() < len(patients):
        patient_score = class_score(patients, positive_class)
        numbers["patient_auc"] = auc_score(patient_positive, patient_score)
        patient_bootstrap = bootstrap_auc(patient_positive, patient_score, n_bootstraps, seed)
        numbers["patient_auc_ci_low"], numbers["patient_auc_ci_high"] = patient_bootstrap.ci(confidence)
    return numbers


def _fold_numbers(frame: pd.DataFrame, positive_class: str) -> dict:
    """n_folds, the mean and SD of the folds' AUCs, and each fold's AUC (auc_fold_<i>)."""
    folds = fold_aucs(frame, positive_class)
    numbers: dict = {
        "n_folds": len(folds),
        "fold_auc_mean": float(folds["auc"].mean()),
        "fold_auc_sd": float(folds["auc"].std(ddof=1)) if len(folds) > 1 else float("nan"),
    }
    numbers.update({f"auc_fold_{fold}": auc for fold, auc in zip(folds["fold"], folds["auc"], strict=True)})
    return numbers


def fold_aucs(frame: pd.DataFrame, positive_class: str) -> pd.DataFrame:
    """The AUC of each fold of out-of-fold predictions (a fold column): fold, n_images,
    auc (NaN for a fold with one class only)."""
    rows = []
    for fold, part in frame.groupby("fold", sort=True):
        positive = (part["label"].to_numpy() == CLASS_NAMES.index(positive_class)).astype(int)
        auc = (
            auc_score(positive, class_score(part, positive_class))
            if 0 < positive.sum() < len(part)
            else np.nan
        )
        rows.append({"fold": fold, "n_images": len(part), "auc": auc})
    return pd.DataFrame(rows, columns=["fold", "n_images", "auc"])


def metrics_table(
    predictions: Mapping[str, pd.DataFrame],
    positive_classes: Sequence[str] = CLASS_NAMES,
    n_bootstraps: int = 10_000,
    seed: int | None = 0,
    confidence: float = 0.95,
    threshold: float | Mapping[str, float] = 0.5,
    **options,
) -> pd.DataFrame:
    """One row per model and positive class: class_metrics for each, model name first.
    threshold: one for every model, or model name -> threshold (e.g. each model's
    youden_threshold on its validation predictions); options go to class_metrics."""
    rows = []
    for name, frame in predictions.items():
        model_threshold = threshold[name] if isinstance(threshold, Mapping) else threshold
        for positive_class in positive_classes:
            try:
                row = class_metrics(
                    frame, positive_class, n_bootstraps, seed, confidence, model_threshold, **options
                )
            except ValueError as error:
                raise ValueError(f"{name}, {positive_class} as the positive class: {error}") from error
            rows.append({"model": name, **row})
    return pd.DataFrame(rows)


def summary_table(metrics: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """The metrics table as a paper reports it: text cells, AUROC with its 95% CIs."""

    def number(value) -> str:
        return format_number(value, digits)

    def interval(low, high) -> str:
        return "n/a" if pd.isna(low) else f"{number(low)}-{number(high)}"

    return pd.DataFrame(
        {
            "Model": metrics["model"],
            "Positive class": metrics["positive_class"],
            "Images (pos/neg)": [
                f"{p}/{n}" for p, n in zip(metrics["n_positive"], metrics["n_negative"], strict=True)
            ],
            "AUROC": metrics["auc"].map(number),
            "95% CI (bootstrap)": [
                interval(lo, hi) for lo, hi in zip(metrics["auc_ci_low"], metrics["auc_ci_high"], strict=True)
            ],
            "95% CI (DeLong)": [
                interval(lo, hi)
                for lo, hi in zip(metrics["delong_ci_low"], metrics["delong_ci_high"], strict=True)
            ],
            "Sensitivity": metrics["sensitivity"].map(number),
            "Specificity": metrics["specificity"].map(number),
            "Patients": metrics["n_patients"].map(lambda n: "n/a" if pd.isna(n) else str(int(n))),
            "Patient AUROC (95% CI)": [
                "n/a" if pd.isna(auc) else f"{number(auc)} ({interval(lo, hi)})"
                for auc, lo, hi in zip(
                    metrics["patient_auc"],
                    metrics["patient_auc_ci_low"],
                    metrics["patient_auc_ci_high"],
                    strict=True,
                )
            ],
        }
    )


def detail_table(metrics: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """Threshold, calibration and cross-validation numbers of the metrics table as text
    cells: sensitivity and specificity with their Wilson CIs, Brier score, ECE,
    calibration intercept and slope, and (for out-of-fold predictions) the folds' AUCs."""

    def number(value) -> str:
        return format_number(value, digits)

    def with_ci(value, low, high) -> str:
        return "n/a" if pd.isna(value) else f"{number(value)} ({number(low)}-{number(high)})"

    table = pd.DataFrame(
        {
            "Model": metrics["model"],
            "Positive class": metrics["positive_class"],
            "Threshold": metrics["threshold"].map(number),
            "Sensitivity (95% CI)": [
                with_ci(*values)
                for values in metrics[["sensitivity", "sensitivity_ci_low", "sensitivity_ci_high"]].to_numpy()
            ],
            "Specificity (95% CI)": [
                with_ci(*values)
                for values in metrics[["specificity", "specificity_ci_low", "specificity_ci_high"]].to_numpy()
            ],
            "Brier": metrics["brier"].map(number),
            "ECE": metrics["ece"].map(number),
            "Calibration intercept": metrics["calibration_intercept"].map(number),
            "Calibration slope": metrics["calibration_slope"].map(number),
            "Bootstrap over": metrics["bootstrap_unit"] + "s",
        }
    )
    if "n_folds" in metrics:
        table["Fold AUROC mean (SD)"] = [
            "n/a" if pd.isna(mean) else f"{number(mean)} ({number(sd)}), {int(n)} folds"
            for mean, sd, n in zip(
                metrics["fold_auc_mean"], metrics["fold_auc_sd"], metrics["n_folds"], strict=True
            )
        ]
    return table


def format_number(value, digits: int = 3) -> str:
    """A number as a table cell: `digits` decimals, "n/a" for NaN or None."""
    return "n/a" if pd.isna(value) else f"{value:.{digits}f}"


def markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame as a GitHub-flavoured Markdown table (cells as str, '|' escaped)."""

    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(c) for c in frame.columns) + " |",
        "|" + "|".join("---" for _ in frame.columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- notebook parameters


def as_list(value) -> list:
    """A notebook parameter given as a list, a JSON list string or one plain string."""
    if isinstance(value, str):
        value = json.loads(value) if value.strip().startswith("[") else [value]
    return list(value)


def as_mapping(value) -> dict[str, str]:
    """Models to evaluate: a dict name -> CSV, a JSON object string, a list of CSVs or one
    CSV path (named after the file)."""
    if isinstance(value, str) and value.strip().startswith("{"):
        value = json.loads(value)
    if isinstance(value, Mapping):
        return {str(name): str(path) for name, path in value.items()}
    return {Path(path).stem: str(path) for path in as_list(value)}


# ---------------------------------------------------------------------------- training history (step 3)


# ---------------------------------------------------------------------------- report.html's summary
def data_summary(sets: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Images and patients per class of each set of predictions (read_predictions' frames):
    what report.html's reader needs first."""
    rows = []
    for name, frame in sets.items():
        for label, class_name in enumerate(CLASS_NAMES):
            part = frame[frame["label"] == label]
            patients = part["patient_id"].nunique() if "patient_id" in part else "n/a"
            rows.append({"Set": name, "Class": class_name, "Images": len(part), "Patients": patients})
    return pd.DataFrame(rows)


def levels_table(metrics: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """The AUROC at both levels, one row per model, positive class and level: images
    (slices) and patients (mean probability per patient), each with its bootstrap CI."""
    rows = []
    for _, row in metrics.iterrows():
        for level, prefix in (("image", ""), ("patient", "patient_")):
            auc, low, high = (row.get(f"{prefix}{key}") for key in ("auc", "auc_ci_low", "auc_ci_high"))
            n = row["n_positive"] + row["n_negative"] if level == "image" else row.get("n_patients")
            rows.append(
                {
                    "Model": row["model"],
                    "Positive class": row["positive_class"],
                    "Level": level,
                    "N": "n/a" if n is None or pd.isna(n) else int(n),
                    "AUROC": format_number(auc, digits),
                    "95% CI": "n/a"
                    if low is None or pd.isna(low)
                    else f"{format_number(low, digits)}-{format_number(high, digits)}",
                }
            )
    return pd.DataFrame(rows)
