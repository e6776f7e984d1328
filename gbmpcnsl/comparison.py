"""Comparing models scored on the same images: the pairing of their predictions, DeLong's
paired test and the paired bootstrap of the AUC difference per pair at the patient and slice
levels, and the table a paper reports."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from gbmpcnsl.delong import delong_paired_test
from gbmpcnsl.patients import aggregate_by_patient
from gbmpcnsl.predictions import normalise_path
from gbmpcnsl.report import confidence_label, format_number
from gbmpcnsl.stats import paired_bootstrap_auc_difference


def paired_frames(frame_a: pd.DataFrame, frame_b: pd.DataFrame) -> pd.DataFrame | None:
    """Two models' predictions on the same images, row by row (path, label, patient_id if
    known, prob_pcnsl_a, prob_pcnsl_b), or None when the image sets or labels differ."""
    paths_a, paths_b = frame_a["path"].map(normalise_path), frame_b["path"].map(normalise_path)
    if len(frame_a) != len(frame_b) or set(paths_a) != set(paths_b) or paths_a.duplicated().any():
        return None
    merged = frame_a.assign(key=paths_a).merge(
        frame_b.assign(key=paths_b)[["key", "label", "prob_pcnsl"]], on="key", suffixes=("_a", "_b")
    )
    if (merged["label_a"] != merged["label_b"]).any():
        return None
    columns = {"path": merged["path"], "label": merged["label_a"]}
    if "patient_id" in merged:
        columns["patient_id"] = merged["patient_id"]
    columns["prob_pcnsl_a"], columns["prob_pcnsl_b"] = merged["prob_pcnsl_a"], merged["prob_pcnsl_b"]
    return pd.DataFrame(columns)


def compare_models(
    predictions: Mapping[str, pd.DataFrame],
    n_bootstraps: int = 10_000,
    seed: int | None = 0,
    confidence: float = 0.95,
    bootstrap_unit: str = "patient",
    stratified_bootstrap: bool = False,
) -> pd.DataFrame:
    """Every pair of models scored on the same images: AUC(a) - AUC(b) with DeLong's
    paired test (difference, CI, z, p) and the paired bootstrap (CI and p of the
    difference), at the patient level (the mean probability per patient, patients as the
    cases) when patient ids are known, then at the slice level. At the slice level both
    account for patients when their ids are known and bootstrap_unit is "patient": the
    DeLong covariance is Obuchowski's clustered one and the bootstrap resamples patients;
    with "slice" both treat slices as independent (delong_unit, bootstrap_unit say which).
    stratified_bootstrap: pROC's stratified bootstrap. One row per pair and level, in the
    models' order; pairs whose images differ are left out.

    The AUCs are PCNSL's; with one sigmoid output GBM's are the same numbers.
    """
    rows = []
    names = list(predictions)
    for i, name_a in enumerate(names):
        for name_b in names[i + 1 :]:
            pair = paired_frames(predictions[name_a], predictions[name_b])
            if pair is None:
                continue
            has_patients = "patient_id" in pair
            common = {
                "model_a": name_a,
                "model_b": name_b,
                "n_images": len(pair),
                "n_patients": pair["patient_id"].nunique() if has_patients else np.nan,
            }
            options = (n_bootstraps, seed, confidence, stratified_bootstrap)
            if has_patients:
                rows.append({**common, **_paired_numbers(_patient_pair(pair), None, "patient", *options)})
            groups = pair["patient_id"] if bootstrap_unit == "patient" and has_patients else None
            rows.append({**common, **_paired_numbers(pair, groups, "slice", *options)})
    return pd.DataFrame(rows)


def _patient_pair(pair: pd.DataFrame) -> pd.DataFrame:
    """A paired frame with one row per patient, sorted by patient_id (as report.patient_level):
    its label and each model's mean prob_pcnsl (gbmpcnsl.patients' mean, as step2 --per-patient)."""
    columns = {}
    for model in ("a", "b"):
        rows = aggregate_by_patient(pair["patient_id"], pair[f"prob_pcnsl_{model}"], "mean")
        columns[f"prob_pcnsl_{model}"] = pd.Series([p for _, _, p in rows], index=[pid for pid, _, _ in rows])
    patients = pd.DataFrame(columns)
    patients["label"] = pair.groupby("patient_id")["label"].first()
    return patients.sort_index()


def _paired_numbers(
    pair: pd.DataFrame,
    groups,
    level: str,
    n_bootstraps: int,
    seed: int | None,
    confidence: float,
    stratified: bool,
) -> dict:
    """DeLong's paired test and the paired bootstrap of one pair at one level (groups:
    patients to cluster by, or None: the rows as independent cases)."""
    is_pcnsl = pair["label"].to_numpy()
    delong = delong_paired_test(is_pcnsl, pair["prob_pcnsl_a"], pair["prob_pcnsl_b"], confidence, groups)
    bootstrap = paired_bootstrap_auc_difference(
        is_pcnsl,
        pair["prob_pcnsl_a"],
        pair["prob_pcnsl_b"],
        groups,
        n_bootstraps,
        seed,
        stratified=stratified,
    )
    unit = "patient" if level == "patient" or groups is not None else "slice"
    return {
        "level": level,
        "n_cases": len(pair),
        "auc_a": delong["auc_a"],
        "auc_b": delong["auc_b"],
        "auc_difference": delong["difference"],
        "delong_unit": unit,
        "delong_ci_low": delong["ci_low"],
        "delong_ci_high": delong["ci_high"],
        "delong_z": delong["z"],
        "delong_p": delong["p_value"],
        "bootstrap_unit": unit,
        "bootstrap_stratified": bool(stratified),
        "bootstrap_ci_low": bootstrap.ci(confidence)[0],
        "bootstrap_ci_high": bootstrap.ci(confidence)[1],
        "bootstrap_p": bootstrap.p_value(),
        "n_bootstraps": n_bootstraps,
        "n_skipped": bootstrap.n_skipped,
        "confidence": confidence,
    }


def comparison_summary(comparison: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """The comparison table as a paper reports it: text cells, CIs at the comparison's
    confidence level."""

    def number(value) -> str:
        return format_number(value, digits)

    def interval(method: str) -> list[str]:  # "low to high (patients)", by DeLong or bootstrap
        columns = [comparison[f"{method}_{key}"] for key in ("ci_low", "ci_high", "unit")]
        return [f"{number(lo)} to {number(hi)} ({unit}s)" for lo, hi, unit in zip(*columns, strict=True)]

    def p_text(value) -> str:
        return "n/a" if pd.isna(value) else ("<0.001" if value < 0.001 else f"{value:.3f}")

    ci = confidence_label(float(comparison["confidence"].iloc[0])) if len(comparison) else "95%"
    return pd.DataFrame(
        {
            "Model A": comparison["model_a"],
            "Model B": comparison["model_b"],
            "Images": comparison["n_images"],
            "Patients": comparison["n_patients"].map(lambda n: "n/a" if pd.isna(n) else str(int(n))),
            "Level": comparison["level"],
            "AUROC A": comparison["auc_a"].map(number),
            "AUROC B": comparison["auc_b"].map(number),
            "Difference": comparison["auc_difference"].map(number),
            f"{ci} CI (DeLong)": interval("delong"),
            "p (DeLong)": comparison["delong_p"].map(p_text),
            f"{ci} CI (bootstrap)": interval("bootstrap"),
            "p (bootstrap)": comparison["bootstrap_p"].map(p_text),
        }
    )
