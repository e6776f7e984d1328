"""What the step 4 notebook computes: the metrics of each model, level (patient, slice) and
class (class_metrics, metrics_table), patient-level rows, per-fold AUCs, and the notebooks'
list and mapping parameters. The text tables a paper reports are in gbmpcnsl.tables.

Numbers come from gbmpcnsl.stats, delong, thresholds and calibration; the frames from
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
from gbmpcnsl.delong import delong_ci
from gbmpcnsl.patients import aggregate_by_patient
from gbmpcnsl.stats import auc_score, bootstrap_auc, cluster_bootstrap_auc, wilson_interval
from gbmpcnsl.thresholds import predict_labels, threshold_metrics
from gbmpcnsl_common import CLASS_NAMES


def patient_level(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per patient, sorted by patient_id: label, n_images and the mean prob_pcnsl of
    its images (gbmpcnsl.patients, the aggregation step2 --per-patient uses), prob_gbm = 1 -
    that, and the patient's fold when the frame has a fold column."""
    rows = aggregate_by_patient(frame["patient_id"], frame["prob_pcnsl"], "mean")
    table = pd.DataFrame(rows, columns=["patient_id", "n_images", "prob_pcnsl"]).sort_values("patient_id")
    table.insert(1, "label", table["patient_id"].map(frame.groupby("patient_id")["label"].first()))
    table.insert(3, "prob_gbm", 1.0 - table["prob_pcnsl"])
    if "fold" in frame:
        table["fold"] = table["patient_id"].map(frame.groupby("patient_id")["fold"].first())
    return table.reset_index(drop=True)


def class_score(frame: pd.DataFrame, positive_class: str) -> np.ndarray:
    """The score that ranks images for a positive class: prob_pcnsl for PCNSL, and
    -prob_pcnsl for GBM (the same order as prob_gbm = 1 - prob_pcnsl, without the ties that
    rounding 1 - p creates when a saturated sigmoid gives p near 0)."""
    if positive_class not in CLASS_NAMES:
        raise ValueError(f"positive class {positive_class!r}: expected one of {', '.join(CLASS_NAMES)}")
    prob_pcnsl = frame["prob_pcnsl"].to_numpy(dtype=np.float64)
    return prob_pcnsl if CLASS_NAMES.index(positive_class) == 1 else -prob_pcnsl


LEVELS = ("patient", "slice")


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
    level: str = "slice",
    stratified_bootstrap: bool = False,
) -> dict:
    """All numbers for one model, one positive class (GBM or PCNSL) and one level, as a
    flat dict.

    frame is read_predictions' output. level "patient": every number is computed on the
    patients, each one case with the mean probability of its slices (patient_level);
    "slice": on the slices. The AUC is the AUC of the data; its CIs are the bootstrap
    percentile CI and the DeLong CI. At the slice level, when patient ids are known and
    bootstrap_unit is "patient", both account for patients: the bootstrap resamples
    patients (cluster_bootstrap_auc) and the DeLong variance is Obuchowski's clustered
    one; else both treat slices as independent. stratified_bootstrap: pROC's stratified
    bootstrap. bootstrap_unit, delong_unit and wilson_unit say what each interval counts
    (slice-level Wilson intervals count slices as if independent). Sensitivity etc. use
    predict_labels(prob_pcnsl, threshold); calibration is of the positive class's
    probability; with a fold column, each fold's AUC (auc_fold_<i>), their mean and SD.
    """
    cases = _cases(frame, level, bootstrap_unit)
    has_patients = "patient_id" in frame
    score = class_score(cases, positive_class)
    positive_label = CLASS_NAMES.index(positive_class)
    is_positive = (cases["label"].to_numpy() == positive_label).astype(int)

    row: dict = {
        "level": level,
        "positive_class": positive_class,
        "n_images": len(frame),
        "n_patients": frame["patient_id"].nunique() if has_patients else np.nan,
        "n_positive": int(is_positive.sum()),
        "n_negative": int(len(cases) - is_positive.sum()),
        "confidence": confidence,
    }
    groups = (
        frame["patient_id"] if level == "slice" and bootstrap_unit == "patient" and has_patients else None
    )
    options = (n_bootstraps, seed, confidence, stratified_bootstrap)
    row.update(_auc_numbers(is_positive, score, groups, *options))
    if level == "patient":
        row["bootstrap_unit"] = row["delong_unit"] = "patient"
    row.update(_threshold_numbers(cases["label"], cases["prob_pcnsl"], positive_label, threshold, confidence))
    row["wilson_unit"] = level
    prob_positive = cases["prob_pcnsl"].to_numpy(dtype=np.float64)
    prob_positive = prob_positive if positive_label == 1 else 1.0 - prob_positive
    row.update(calibration_metrics(is_positive, prob_positive, calibration_bins, calibration_strategy))
    if "fold" in cases:
        row.update(_fold_numbers(cases, positive_class))
    return row


def _cases(frame: pd.DataFrame, level: str, bootstrap_unit: str) -> pd.DataFrame:
    """The cases of a level, options checked: the slices, or one row per patient."""
    if bootstrap_unit not in ("patient", "slice"):
        raise ValueError(f"bootstrap_unit {bootstrap_unit!r}: expected 'patient' or 'slice'")
    if level not in LEVELS:
        raise ValueError(f"level {level!r}: expected 'patient' or 'slice'")
    if level == "patient" and "patient_id" not in frame:
        raise ValueError("the patient level needs patient ids")
    return patient_level(frame) if level == "patient" else frame


def _auc_numbers(
    is_positive, score, groups, n_bootstraps: int, seed: int | None, confidence: float, stratified: bool
) -> dict:
    """The AUC with its bootstrap CI and DeLong CI, both over patients (cluster bootstrap,
    clustered DeLong) when groups are given, else over the cases as independent; the
    DeLong CI is NaN with fewer than two of a class."""
    numbers: dict = {"auc": auc_score(is_positive, score)}
    if groups is None and not stratified:
        bootstrap = bootstrap_auc(is_positive, score, n_bootstraps=n_bootstraps, seed=seed)
    else:
        bootstrap = cluster_bootstrap_auc(
            is_positive, score, groups, n_bootstraps, seed, stratified=stratified
        )
    numbers["bootstrap_unit"] = numbers["delong_unit"] = "slice" if groups is None else "patient"
    numbers["bootstrap_stratified"] = bool(stratified)
    numbers["auc_ci_low"], numbers["auc_ci_high"] = bootstrap.ci(confidence)
    numbers["n_bootstraps"] = bootstrap.n_bootstraps
    numbers["n_skipped"] = bootstrap.n_skipped
    try:
        numbers["delong_ci_low"], numbers["delong_ci_high"] = delong_ci(
            is_positive, score, confidence, groups
        )
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


def _fold_numbers(frame: pd.DataFrame, positive_class: str) -> dict:
    """n_folds (the folds whose AUC exists: both classes), the mean and SD of their AUCs,
    and each fold's AUC (auc_fold_<i>, NaN for a fold with one class only)."""
    folds = fold_aucs(frame, positive_class)
    valid = folds["auc"].dropna()
    numbers: dict = {
        "n_folds": len(valid),
        "fold_auc_mean": float(valid.mean()) if len(valid) else float("nan"),
        "fold_auc_sd": float(valid.std(ddof=1)) if len(valid) > 1 else float("nan"),
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
    patient_threshold: float | Mapping[str, float] | None = None,
    **options,
) -> pd.DataFrame:
    """One row per model, level and positive class (class_metrics), model name first; per
    model the patient rows (when patient ids are known) come before the slice rows.
    threshold: one for every model, or model name -> threshold (e.g. each model's
    youden_threshold on its validation predictions); patient_threshold the same for the
    patient level (None: threshold). options go to class_metrics."""
    rows = []
    for name, frame in predictions.items():
        levels = LEVELS if "patient_id" in frame else ("slice",)
        for level in levels:
            chosen = threshold if level == "slice" or patient_threshold is None else patient_threshold
            model_threshold = chosen[name] if isinstance(chosen, Mapping) else chosen
            for positive_class in positive_classes:
                try:
                    row = class_metrics(
                        frame,
                        positive_class,
                        n_bootstraps,
                        seed,
                        confidence,
                        model_threshold,
                        **options,
                        level=level,
                    )
                except ValueError as error:
                    raise ValueError(
                        f"{name}, {positive_class} as the positive class: {error} ({level} level)"
                    ) from error
                rows.append({"model": name, **row})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- text tables


def confidence_label(confidence: float) -> str:
    """A confidence level as a header names it: 0.95 -> "95%", 0.975 -> "97.5%"."""
    return f"{100 * confidence:.10g}%"


def _table_confidence(metrics: pd.DataFrame) -> str:
    """The header label of the metrics' confidence level (its confidence column; 95% without)."""
    levels = metrics["confidence"].unique() if "confidence" in metrics else [0.95]
    if len(levels) != 1:
        raise ValueError(f"one confidence level per table (got {', '.join(map(str, levels))})")
    return confidence_label(float(levels[0]))


def _interval(low, high, digits: int) -> str:
    return "n/a" if pd.isna(low) else f"{format_number(low, digits)}-{format_number(high, digits)}"


def _with_ci(value, low, high, digits: int) -> str:
    return "n/a" if pd.isna(value) else f"{format_number(value, digits)} ({_interval(low, high, digits)})"


def _rate_columns(metrics: pd.DataFrame, ci: str, digits: int) -> dict[str, list[str]]:
    """The "Sensitivity (CI)" and "Specificity (CI)" text columns of both tables."""
    return {
        f"{rate.capitalize()} ({ci} CI)": [
            _with_ci(*values, digits)
            for values in metrics[[rate, f"{rate}_ci_low", f"{rate}_ci_high"]].to_numpy()
        ]
        for rate in ("sensitivity", "specificity")
    }


def summary_table(metrics: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """The metrics table as a paper reports it: text cells, one row per model, level and
    class; cases are patients or slices as the level says, AUROC with its CIs at the
    metrics' confidence level."""
    ci = _table_confidence(metrics)
    return pd.DataFrame(
        {
            "Model": metrics["model"],
            "Level": metrics["level"],
            "Positive class": metrics["positive_class"],
            "Patients": metrics["n_patients"].map(lambda n: "n/a" if pd.isna(n) else str(int(n))),
            "Cases (pos/neg)": [
                f"{p}/{n}" for p, n in zip(metrics["n_positive"], metrics["n_negative"], strict=True)
            ],
            "AUROC": metrics["auc"].map(lambda value: format_number(value, digits)),
            f"{ci} CI (bootstrap)": [
                _interval(lo, hi, digits)
                for lo, hi in zip(metrics["auc_ci_low"], metrics["auc_ci_high"], strict=True)
            ],
            f"{ci} CI (DeLong)": [
                _interval(lo, hi, digits)
                for lo, hi in zip(metrics["delong_ci_low"], metrics["delong_ci_high"], strict=True)
            ],
            **_rate_columns(metrics, ci, digits),
        }
    )


def independent_slices(row) -> str:
    """Which of a metrics row's intervals treat slices as independent ("none" at the
    patient level or when every interval accounts for patients)."""
    names = [
        name
        for name, column in (
            ("bootstrap", "bootstrap_unit"),
            ("DeLong", "delong_unit"),
            ("Wilson", "wilson_unit"),
        )
        if row[column] == "slice"
    ]
    return ", ".join(names) or "none"


def detail_table(metrics: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """Threshold, calibration and cross-validation numbers of the metrics table as text
    cells: sensitivity and specificity with their Wilson CIs, Brier score, ECE,
    calibration intercept and slope, what each interval resamples or counts (and which
    treat slices as independent), and (for out-of-fold predictions) the folds' AUCs."""

    def number(value) -> str:
        return format_number(value, digits)

    ci = _table_confidence(metrics)
    table = pd.DataFrame(
        {
            "Model": metrics["model"],
            "Level": metrics["level"],
            "Positive class": metrics["positive_class"],
            "Threshold": metrics["threshold"].map(number),
            **_rate_columns(metrics, ci, digits),
            "Brier": metrics["brier"].map(number),
            "ECE": metrics["ece"].map(number),
            "Calibration intercept": metrics["calibration_intercept"].map(number),
            "Calibration slope": metrics["calibration_slope"].map(number),
            "Bootstrap over": metrics["bootstrap_unit"]
            + "s"
            + metrics.get("bootstrap_stratified", pd.Series(False, index=metrics.index)).map(
                {True: ", stratified", False: ""}
            ),
            "Slices as independent": [independent_slices(row) for _, row in metrics.iterrows()],
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
