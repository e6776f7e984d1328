"""The numbers behind the step 3 and step 4 notebooks, as small pure functions.

Step 4 (ROC analysis): the AUC of the data (Mann-Whitney U, ties counted half), a
vectorised bootstrap of the AUC with its percentile confidence interval, the DeLong
variance and confidence interval (fast DeLong, Sun & Xu 2014), sensitivity, specificity
and the confusion counts at a threshold, patient-level aggregation (mean probability per
patient), ground truth from a CSV or from the gbm/pcnsl folder in each path, and the
metrics table the notebook saves. Step 3 (training curves): reading a run's history.

Everything takes and returns arrays or DataFrames; plotting and file writing stay in the
notebooks. Labels follow gbmpcnsl_common: GBM = 0, PCNSL = 1, the model outputs P(PCNSL).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from scipy.stats import norm, rankdata

from gbmpcnsl_common import CLASS_FOLDERS, CLASS_LABELS, CLASS_NAMES, patient_id

# ---------------------------------------------------------------------------- AUC


def _binary_arrays(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert: y_true of 0/1 (or booleans), y_score finite floats, same length."""
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.ndim != 1 or y_score.ndim != 1 or len(y_true) != len(y_score):
        raise ValueError(
            f"y_true and y_score must be 1-D and of equal length ({y_true.shape}, {y_score.shape})"
        )
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("y_true must hold 0/1 labels (1 = the positive class)")
    if not np.isfinite(y_score).all():
        raise ValueError("y_score holds NaN or infinite values")
    return y_true.astype(bool), y_score


def auc_score(y_true, y_score) -> float:
    """Area under the ROC curve of the data (Mann-Whitney U / (n_pos * n_neg)).

    A positive scored above a negative counts 1, a tie counts 1/2, as sklearn's
    roc_auc_score. Raises ValueError when y_true holds one class only.
    """
    positive, y_score = _binary_arrays(y_true, y_score)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("the AUC needs at least one positive and one negative")
    ranks = rankdata(y_score)  # midranks: ties share the mean rank
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# ---------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class BootstrapResult:
    """AUCs of bootstrap resamples of the predictions.

    aucs: one value per resample, in resample order; NaN where the resample held one class
    only (skipped: its AUC is undefined). n_skipped counts those.
    """

    aucs: np.ndarray
    n_skipped: int
    seed: int | None

    @property
    def n_bootstraps(self) -> int:
        return len(self.aucs)

    @property
    def valid_aucs(self) -> np.ndarray:
        return self.aucs[~np.isnan(self.aucs)]

    def ci(self, confidence: float = 0.95) -> tuple[float, float]:
        """Percentile confidence interval of the AUC over the valid resamples."""
        return percentile_ci(self.valid_aucs, confidence)


def bootstrap_auc(
    y_true,
    y_score,
    n_bootstraps: int = 10_000,
    seed: int | None = 0,
    max_chunk_elements: int = 100_000,
) -> BootstrapResult:
    """AUC of each of n_bootstraps resamples (drawn with replacement) of the predictions.

    Resample r uses the indices of row r of
    `np.random.default_rng(seed).integers(0, n, size=(n_bootstraps, n))`, drawn in chunks of
    rows (at most max_chunk_elements indices at a time: bounded memory, and cache-sized
    chunks run fastest), which gives the same rows. Each resample's AUC comes from counts,
    not from a sort: with the scores grouped by value, a resample is a count of positives
    and negatives per score value, and U = sum over values of positives * (negatives below
    + negatives tied / 2). That is O(n) per resample, vectorised over a chunk of resamples.
    """
    positive, y_score = _binary_arrays(y_true, y_score)
    n = len(y_score)
    if n == 0:
        raise ValueError("no predictions to resample")
    if n_bootstraps < 1:
        raise ValueError(f"n_bootstraps must be at least 1 (got {n_bootstraps})")
    # Column of each prediction in a (2, n_values) table: row 0 positives, row 1 negatives.
    score_values, value_index = np.unique(y_score, return_inverse=True)
    n_values = len(score_values)
    table_column = np.where(positive, 0, n_values) + value_index

    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, max_chunk_elements // n)
    aucs = np.empty(n_bootstraps)
    for start in range(0, n_bootstraps, rows_per_chunk):
        rows = min(rows_per_chunk, n_bootstraps - start)
        indices = rng.integers(0, n, size=(rows, n))
        flat_columns = np.take(table_column, indices)
        flat_columns += (2 * n_values) * np.arange(rows)[:, None]  # one table per resample
        counts = np.bincount(flat_columns.ravel(), minlength=rows * 2 * n_values)
        counts = counts.reshape(rows, 2, n_values)
        pos_counts, neg_counts = counts[:, 0], counts[:, 1]
        weights = np.cumsum(neg_counts, axis=1)  # in place below: 2 * negatives below + tied
        weights -= neg_counts
        weights *= 2
        weights += neg_counts
        twice_u = np.einsum("ij,ij->i", pos_counts, weights)  # integers: exact
        pairs = pos_counts.sum(axis=1) * neg_counts.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            aucs[start : start + rows] = np.where(pairs > 0, twice_u / (2.0 * pairs), np.nan)
    return BootstrapResult(aucs=aucs, n_skipped=int(np.isnan(aucs).sum()), seed=seed)


def percentile_ci(values, confidence: float = 0.95) -> tuple[float, float]:
    """(low, high) percentiles enclosing `confidence` of values (NaN, NaN if empty)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (got {confidence})")
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


# ---------------------------------------------------------------------------- DeLong


def delong_variance(y_true, y_score) -> tuple[float, float]:
    """(AUC, variance of the AUC) by DeLong's method, computed with midranks (Sun & Xu 2014).

    Structural components: V10 for each positive is the share of negatives it outscores,
    V01 for each negative the share of positives that outscore it (ties count half);
    variance = var(V10) / n_pos + var(V01) / n_neg, sample variances (ddof 1).
    Needs at least two positives and two negatives.
    """
    positive, y_score = _binary_arrays(y_true, y_score)
    pos_scores, neg_scores = y_score[positive], y_score[~positive]
    n_pos, n_neg = len(pos_scores), len(neg_scores)
    if n_pos < 2 or n_neg < 2:
        raise ValueError("the DeLong variance needs at least two positives and two negatives")
    ranks_pos = rankdata(pos_scores)
    ranks_neg = rankdata(neg_scores)
    ranks_all = rankdata(np.concatenate([pos_scores, neg_scores]))
    v10 = (ranks_all[:n_pos] - ranks_pos) / n_neg
    v01 = 1.0 - (ranks_all[n_pos:] - ranks_neg) / n_pos
    auc = float(v10.mean())
    variance = float(v10.var(ddof=1) / n_pos + v01.var(ddof=1) / n_neg)
    return auc, variance


def delong_ci(y_true, y_score, confidence: float = 0.95) -> tuple[float, float]:
    """Normal-approximation confidence interval of the AUC from the DeLong variance,
    clipped to [0, 1]."""
    auc, variance = delong_variance(y_true, y_score)
    half_width = norm.ppf(0.5 + confidence / 2) * np.sqrt(variance)
    return float(max(0.0, auc - half_width)), float(min(1.0, auc + half_width))


# ---------------------------------------------------------------------------- threshold


def predict_labels(prob_pcnsl, threshold: float = 0.5) -> np.ndarray:
    """Predicted labels: PCNSL (1) where prob_pcnsl > threshold, else GBM (0).

    One call per image, the rule of Keras's binary accuracy; GBM's sensitivity is then
    PCNSL's specificity and the other way round.
    """
    return (np.asarray(prob_pcnsl, dtype=np.float64) > threshold).astype(int)


def threshold_metrics(y_true, y_pred, positive_label: int = 1) -> dict[str, float]:
    """Confusion counts, sensitivity, specificity, PPV, NPV and accuracy for one class.

    y_true and y_pred hold labels (GBM 0, PCNSL 1); positive_label says which class is the
    positive one. A rate with an empty denominator is NaN.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    is_pos, called_pos = y_true == positive_label, y_pred == positive_label
    tp = int((is_pos & called_pos).sum())
    fn = int((is_pos & ~called_pos).sum())
    tn = int((~is_pos & ~called_pos).sum())
    fp = int((~is_pos & called_pos).sum())

    def rate(numerator: int, denominator: int) -> float:
        return numerator / denominator if denominator else float("nan")

    return {
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
        "sensitivity": rate(tp, tp + fn),
        "specificity": rate(tn, tn + fp),
        "ppv": rate(tp, tp + fp),
        "npv": rate(tn, tn + fn),
        "accuracy": rate(tp + tn, tp + fn + tn + fp),
    }


def confusion_frame(y_true, y_pred) -> pd.DataFrame:
    """2x2 confusion matrix as a DataFrame: rows true GBM/PCNSL, columns predicted."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    counts = [[int(((y_true == t) & (y_pred == p)).sum()) for p in (0, 1)] for t in (0, 1)]
    return pd.DataFrame(
        counts,
        index=[f"true {name}" for name in CLASS_NAMES],
        columns=[f"predicted {name}" for name in CLASS_NAMES],
    )


# ---------------------------------------------------------------------------- ground truth


def _path_parts(path: str | os.PathLike) -> tuple[str, ...]:
    return PurePosixPath(str(path).replace("\\", "/")).parts


def label_from_path(path: str | os.PathLike) -> int:
    """GBM 0 / PCNSL 1 from the nearest folder named gbm or pcnsl (any case) in the path."""
    for part in reversed(_path_parts(path)[:-1]):
        if part.lower() in CLASS_LABELS:
            return CLASS_LABELS[part.lower()]
    raise ValueError(f"{path}: no {'/'.join(CLASS_FOLDERS)} folder in the path to take the label from")


def patient_id_from_path(path: str | os.PathLike) -> str:
    """The patient (group) id of a slice path: gbmpcnsl_common.patient_id, the rule every
    step uses (the folder under the class folder, qualified by its class: "gbm/p01")."""
    return patient_id(_normalise_path(path))


def _normalise_path(path: str) -> str:
    return os.path.normpath(str(path)).replace("\\", "/")


def _parse_label(value) -> int:
    text = str(value).strip().lower()
    if text in CLASS_LABELS:
        return CLASS_LABELS[text]
    if text in ("0", "1", "0.0", "1.0"):
        return int(float(text))
    raise ValueError(f"label {value!r}: expected 0/1 or GBM/PCNSL")


def read_ground_truth(csv_path: str | os.PathLike) -> pd.DataFrame:
    """A ground-truth CSV with columns path,label (0/1 or GBM/PCNSL) and optionally
    patient_id (or group) -> DataFrame path, label[, patient_id]."""
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    missing = {"path", "label"} - set(table.columns)
    if missing:
        raise ValueError(f"{csv_path}: needs columns path,label (missing: {', '.join(sorted(missing))})")
    truth = pd.DataFrame({"path": table["path"], "label": [_parse_label(v) for v in table["label"]]})
    for column in ("patient_id", "group"):
        if column in table.columns:
            truth["patient_id"] = table[column]
            break
    return truth


def read_predictions(
    csv_path: str | os.PathLike,
    ground_truth: pd.DataFrame | str | os.PathLike | None = None,
    patient_ids: bool | str | None = "auto",
) -> pd.DataFrame:
    """Step 2's CSV (path,prob_gbm,prob_pcnsl) joined with its ground truth.

    ground_truth: a DataFrame or CSV as read_ground_truth reads it, matched on the path
    (as written, then normalised); None takes each label from the gbm/pcnsl folder in the
    path. patient_ids: "auto" uses the ground truth's patient_id column if there is one,
    else the folder layout, and drops the ids when every patient has one image only;
    True always uses them (folder layout unless the ground truth has them); False or None
    never. Returns path, prob_gbm, prob_pcnsl, label and (when known) patient_id.
    """
    predictions = pd.read_csv(csv_path, dtype={"path": str})
    missing = {"path", "prob_pcnsl"} - set(predictions.columns)
    if missing:
        raise ValueError(
            f"{csv_path}: not a step2 predictions CSV (needs path,prob_gbm,prob_pcnsl; "
            f"missing: {', '.join(sorted(missing))})"
        )
    if len(predictions) == 0:
        raise ValueError(f"{csv_path}: no predictions")
    prob_pcnsl = predictions["prob_pcnsl"].to_numpy(dtype=np.float64)
    if not (np.isfinite(prob_pcnsl).all() and (prob_pcnsl >= 0).all() and (prob_pcnsl <= 1).all()):
        raise ValueError(f"{csv_path}: prob_pcnsl must hold probabilities in [0, 1]")
    frame = pd.DataFrame(
        {"path": predictions["path"], "prob_gbm": 1.0 - prob_pcnsl, "prob_pcnsl": prob_pcnsl}
    )
    if "prob_gbm" in predictions:
        if not np.allclose(predictions["prob_gbm"].to_numpy(dtype=np.float64), frame["prob_gbm"], atol=1e-6):
            raise ValueError(
                f"{csv_path}: prob_gbm + prob_pcnsl != 1; expected step2's output of one sigmoid"
            )

    truth_ids = None
    if ground_truth is None:
        frame["label"] = [label_from_path(p) for p in frame["path"]]
    else:
        truth = ground_truth if isinstance(ground_truth, pd.DataFrame) else read_ground_truth(ground_truth)
        by_path = truth.drop_duplicates("path").set_index("path")
        by_normalised = truth.assign(key=truth["path"].map(_normalise_path)).drop_duplicates("key")
        by_normalised = by_normalised.set_index("key")
        rows = []
        for path in frame["path"]:
            if path in by_path.index:
                rows.append(by_path.loc[path])
            elif _normalise_path(path) in by_normalised.index:
                rows.append(by_normalised.loc[_normalise_path(path)])
            else:
                rows.append(None)
        unmatched = [p for p, row in zip(frame["path"], rows, strict=True) if row is None]
        if unmatched:
            raise ValueError(
                f"{csv_path}: {len(unmatched)} of {len(frame)} paths have no ground-truth label "
                f"(first: {', '.join(unmatched[:3])})"
            )
        frame["label"] = [int(row["label"]) for row in rows]
        if "patient_id" in truth.columns:
            truth_ids = [str(row["patient_id"]) for row in rows]

    if patient_ids in (True, "auto"):
        ids = truth_ids if truth_ids is not None else [patient_id_from_path(p) for p in frame["path"]]
        if patient_ids is True or len(set(ids)) < len(ids):
            frame["patient_id"] = ids
    elif patient_ids not in (False, None):
        raise ValueError(f"patient_ids={patient_ids!r}: expected 'auto', True or False")
    if "patient_id" in frame:
        mixed = frame.groupby("patient_id")["label"].nunique()
        if (mixed > 1).any():
            raise ValueError(
                f"{csv_path}: patients with both labels: {', '.join(mixed[mixed > 1].index[:3])}"
            )
    return frame[[c for c in ("path", "prob_gbm", "prob_pcnsl", "label", "patient_id") if c in frame]]


def patient_level(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per patient: patient_id, label, n_images and the mean prob_pcnsl of its
    images (prob_gbm = 1 - that)."""
    grouped = frame.groupby("patient_id", sort=True)
    prob_pcnsl = grouped["prob_pcnsl"].mean()
    return pd.DataFrame(
        {
            "label": grouped["label"].first(),
            "n_images": grouped.size(),
            "prob_gbm": 1.0 - prob_pcnsl,
            "prob_pcnsl": prob_pcnsl,
        }
    ).reset_index()


# ---------------------------------------------------------------------------- metrics table


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
) -> dict:
    """All numbers for one model and one positive class (GBM or PCNSL), as a flat dict.

    frame is read_predictions' output. The AUC is the AUC of the data; its CIs are the
    bootstrap percentile CI (slices resampled) and the DeLong CI; sensitivity etc. use
    predict_labels(prob_pcnsl, threshold). With patient ids, the patient-level AUC uses
    the mean probability per patient, with a bootstrap CI over patients. Images are
    ranked by class_score.
    """
    score = class_score(frame, positive_class)
    positive_label = CLASS_NAMES.index(positive_class)
    is_positive = (frame["label"].to_numpy() == positive_label).astype(int)

    row: dict = {
        "positive_class": positive_class,
        "n_images": len(frame),
        "n_positive": int(is_positive.sum()),
        "n_negative": int(len(frame) - is_positive.sum()),
    }
    row["auc"] = auc_score(is_positive, score)
    bootstrap = bootstrap_auc(is_positive, score, n_bootstraps=n_bootstraps, seed=seed)
    row["auc_ci_low"], row["auc_ci_high"] = bootstrap.ci(confidence)
    row["n_bootstraps"] = bootstrap.n_bootstraps
    row["n_skipped"] = bootstrap.n_skipped
    try:
        row["delong_ci_low"], row["delong_ci_high"] = delong_ci(is_positive, score, confidence)
    except ValueError:  # fewer than two of a class
        row["delong_ci_low"] = row["delong_ci_high"] = float("nan")
    row["threshold"] = threshold
    row.update(
        threshold_metrics(frame["label"], predict_labels(frame["prob_pcnsl"], threshold), positive_label)
    )

    row["n_patients"] = np.nan
    row["patient_auc"] = row["patient_auc_ci_low"] = row["patient_auc_ci_high"] = np.nan
    if "patient_id" in frame:
        patients = patient_level(frame)
        patient_positive = (patients["label"].to_numpy() == positive_label).astype(int)
        row["n_patients"] = len(patients)
        if 0 < patient_positive.sum() < len(patients):
            patient_score = class_score(patients, positive_class)
            row["patient_auc"] = auc_score(patient_positive, patient_score)
            patient_bootstrap = bootstrap_auc(patient_positive, patient_score, n_bootstraps, seed)
            row["patient_auc_ci_low"], row["patient_auc_ci_high"] = patient_bootstrap.ci(confidence)
    return row


def metrics_table(
    predictions: Mapping[str, pd.DataFrame],
    positive_classes: Sequence[str] = CLASS_NAMES,
    n_bootstraps: int = 10_000,
    seed: int | None = 0,
    confidence: float = 0.95,
    threshold: float = 0.5,
) -> pd.DataFrame:
    """One row per model and positive class: class_metrics for each, model name first."""
    rows = []
    for name, frame in predictions.items():
        for positive_class in positive_classes:
            try:
                row = class_metrics(frame, positive_class, n_bootstraps, seed, confidence, threshold)
            except ValueError as error:
                raise ValueError(f"{name}, {positive_class} as the positive class: {error}") from error
            rows.append({"model": name, **row})
    return pd.DataFrame(rows)


def summary_table(metrics: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """The metrics table as a paper reports it: text cells, AUROC with its 95% CIs."""

    def number(value) -> str:
        return "n/a" if pd.isna(value) else f"{value:.{digits}f}"

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


# ---------------------------------------------------------------------------- parameters


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

HISTORY_METRICS = {  # canonical name -> training column pattern (Keras names vary by version)
    "loss": r"loss",
    "accuracy": r"(?:binary_)?acc(?:uracy)?(?:_\d+)?",
    "auc": r"auc(?:_\d+)?",
}


def read_history(run: str | os.PathLike, allow_pickle: bool = False) -> pd.DataFrame:
    """A training history as a DataFrame with a 1-based `epoch` column (as in the checkpoint
    names; Keras's CSVLogger writes 0-based epochs).

    run: a run folder (its history.csv, or its history.pkl when allow_pickle) or the file
    itself. history.pkl is the original's pickled Keras History.history (a dict of lists);
    unpickling runs code from the file, so it is read only with allow_pickle=True, and
    with a warning. An epoch listed twice (a resumed run) keeps its last row.
    """
    run = Path(run)
    csv_path = run if run.suffix == ".csv" else run / "history.csv"
    pickle_path = run if run.suffix in (".pkl", ".pickle") else run / "history.pkl"
    if csv_path.is_file():
        history = pd.read_csv(csv_path)
        if "epoch" in history:
            history = history.drop_duplicates("epoch", keep="last").sort_values("epoch")
            history["epoch"] = history["epoch"].astype(int) + 1
    elif pickle_path.is_file():
        if not allow_pickle:
            raise ValueError(
                f"{pickle_path}: a pickled history; unpickling runs code from the file, so it is read "
                "only with allow_pickle = True (for files you trust)"
            )
        warnings.warn(
            f"{pickle_path}: unpickling runs any code the file holds; do this only for files you trust",
            stacklevel=2,
        )
        with open(pickle_path, "rb") as file:
            loaded = pickle.load(file)  # opt-in only, warned above
        history = pd.DataFrame(getattr(loaded, "history", loaded))
        history.insert(0, "epoch", np.arange(1, len(history) + 1))
    else:
        raise ValueError(f"{run}: no history.csv" + (" or history.pkl" if run.is_dir() else ""))
    if "loss" not in history:
        raise ValueError(f"{run}: the history has no loss column (columns: {', '.join(history.columns)})")
    return history.reset_index(drop=True)


def history_columns(history: pd.DataFrame) -> dict[str, tuple[str | None, str | None]]:
    """canonical metric (loss, accuracy, auc) -> (training column, validation column),
    None where absent; tolerant of Keras naming (binary_accuracy, acc, auc_1...)."""
    columns: dict[str, tuple[str | None, str | None]] = {}
    for metric, pattern in HISTORY_METRICS.items():
        train = next((c for c in history.columns if re.fullmatch(pattern, c)), None)
        val = f"val_{train}" if train and f"val_{train}" in history else None
        if val is None:
            val = next((c for c in history.columns if re.fullmatch(f"val_{pattern}", c)), None)
        columns[metric] = (train, val)
    return columns


def best_epoch(history: pd.DataFrame) -> int | None:
    """The 1-based epoch with the lowest val_loss (the epoch ModelCheckpoint kept), or None."""
    if "val_loss" not in history or history["val_loss"].isna().all():
        return None
    return int(history.loc[history["val_loss"].idxmin(), "epoch"])


def read_run_info(run: str | os.PathLike) -> dict:
    """The run.json of a run folder ({} when there is none)."""
    path = Path(run) / "run.json"
    return json.loads(path.read_text()) if path.is_file() else {}
