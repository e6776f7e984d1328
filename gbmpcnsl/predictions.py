"""Reading what step 4 evaluates: step2's predictions CSV joined with its ground truth (a CSV,
the CSV's own label column, or the gbm/pcnsl folder in each path), with patient ids by the
rule every step uses; each model's threshold chosen on its validation predictions."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath

import numpy as np
import pandas as pd

from gbmpcnsl.patients import aggregate_by_patient
from gbmpcnsl.thresholds import youden_threshold
from gbmpcnsl_common import CLASS_FOLDERS, CLASS_LABELS, CLASS_NAMES, patient_id


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
    return patient_id(normalise_path(path))


def normalise_path(path: str | os.PathLike) -> str:
    """A path as written in a CSV, normalised (os.path.normpath) with forward slashes."""
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
    (as written, then normalised); None takes the CSV's own label and patient_id columns
    when it has them (step1's val_predictions.csv, oof_predictions.csv), else each label
    from the gbm/pcnsl folder in the path. patient_ids: "auto" uses the ground truth's patient_id column if there is one,
    else the folder layout, and drops the ids when every patient has one image only;
    True always uses them (folder layout unless the ground truth has them); False or None
    never. Returns path, prob_gbm, prob_pcnsl, label and (when known) patient_id, and the
    CSV's fold column when it has one.
    """
    predictions = pd.read_csv(csv_path, dtype={"path": str})
    frame = _probabilities(csv_path, predictions)
    if "fold" in predictions:  # oof_predictions.csv: the fold whose model predicted the image
        frame["fold"] = predictions["fold"].to_numpy()
    if ground_truth is None and "label" in predictions:  # val/oof_predictions.csv carry their truth
        ground_truth = read_ground_truth(csv_path)

    truth_ids = None
    if ground_truth is None:
        frame["label"] = [label_from_path(p) for p in frame["path"]]
    else:
        truth = ground_truth if isinstance(ground_truth, pd.DataFrame) else read_ground_truth(ground_truth)
        rows = _truth_rows(csv_path, frame["path"], truth)
        frame["label"] = [int(row["label"]) for row in rows]
        if "patient_id" in truth.columns:
            truth_ids = [str(row["patient_id"]) for row in rows]
    _add_patient_ids(csv_path, frame, patient_ids, truth_ids)
    columns = ("path", "prob_gbm", "prob_pcnsl", "label", "patient_id", "fold")
    return frame[[c for c in columns if c in frame]]


def _probabilities(csv_path: str | os.PathLike, predictions: pd.DataFrame) -> pd.DataFrame:
    """path, prob_gbm, prob_pcnsl of step2's CSV, checked: probabilities in [0, 1] that sum to 1."""
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
    return frame


def _truth_rows(csv_path: str | os.PathLike, paths: pd.Series, truth: pd.DataFrame) -> list[pd.Series]:
    """The ground-truth row of each path, matched as written, then normalised; ValueError
    naming the first paths that have none."""
    by_path = truth.drop_duplicates("path").set_index("path")
    by_normalised = truth.assign(key=truth["path"].map(normalise_path)).drop_duplicates("key")
    by_normalised = by_normalised.set_index("key")
    rows = []
    for path in paths:
        if path in by_path.index:
            rows.append(by_path.loc[path])
        elif normalise_path(path) in by_normalised.index:
            rows.append(by_normalised.loc[normalise_path(path)])
        else:
            rows.append(None)
    unmatched = [p for p, row in zip(paths, rows, strict=True) if row is None]
    if unmatched:
        raise ValueError(
            f"{csv_path}: {len(unmatched)} of {len(paths)} paths have no ground-truth label "
            f"(first: {', '.join(unmatched[:3])})"
        )
    return rows


def _add_patient_ids(
    csv_path: str | os.PathLike,
    frame: pd.DataFrame,
    patient_ids: bool | str | None,
    truth_ids: list[str] | None,
) -> None:
    """Add the patient_id column as read_predictions' patient_ids says (in place); ValueError
    when a patient has images of both labels."""
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


# ---------------------------------------------------------------------------- validation threshold


def thresholds_from_validation(
    threshold_from, model_names: Sequence[str], level: str = "slice"
) -> dict[str, tuple[float, str]]:
    """Model name -> (Youden threshold, validation CSV) from validation predictions.

    threshold_from: model name -> CSV (a dict or a JSON object string), each model's own
    validation predictions; one CSV (a path) serves one model only, and several models
    with one CSV raise ValueError (a threshold chosen on one model's predictions does not
    carry over to another). Each CSV is read as read_predictions reads it (its own label
    column when it has one, as step1's val_predictions.csv, else the gbm/pcnsl folders).
    level "patient": Youden's threshold on the validation patients' mean probabilities
    (gbmpcnsl.patients, the patient rule), for calls on patients.
    """
    if level not in ("slice", "patient"):
        raise ValueError(f"level {level!r}: expected 'slice' or 'patient'")
    if isinstance(threshold_from, str) and threshold_from.strip().startswith("{"):
        threshold_from = json.loads(threshold_from)
    if isinstance(threshold_from, Mapping):
        missing = [name for name in model_names if name not in threshold_from]
        if missing:
            raise ValueError(f"threshold_from has no validation predictions for {', '.join(missing)}")
        sources = {name: str(threshold_from[name]) for name in model_names}
    elif len(model_names) > 1:
        raise ValueError(
            f"threshold_from: one validation CSV ({threshold_from}) for {len(model_names)} models; "
            "give each model its own: model name -> validation CSV"
        )
    else:
        sources = dict.fromkeys(model_names, str(threshold_from))
    thresholds = {}
    for name, csv_path in sources.items():
        validation = read_predictions(csv_path, patient_ids=level == "patient")
        labels, prob_pcnsl = validation["label"], validation["prob_pcnsl"]
        if level == "patient":
            rows = aggregate_by_patient(validation["patient_id"], prob_pcnsl, "mean")
            labels = validation.groupby("patient_id")["label"].first()[[row[0] for row in rows]]
            prob_pcnsl = [row[2] for row in rows]
        thresholds[name] = (youden_threshold(labels, prob_pcnsl), csv_path)
    return thresholds


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
