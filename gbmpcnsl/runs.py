"""The run folder: every file name step1 writes, in one place.

A run folder holds one trained model; a cross-validation run folder holds `fold_<i>/`
run folders beside cv.json and the pooled out-of-fold predictions.
"""

from __future__ import annotations

RUN_JSON = "run.json"  # settings, status, best checkpoint; the marker of a run folder
HISTORY_CSV = "history.csv"  # one row per finished epoch (Keras CSVLogger)
SPLIT_CSV = "split.csv"  # every patient's role
BACKUP_DIR = "backup"  # Keras BackupAndRestore, for --resume
VAL_PREDICTIONS_CSV = "val_predictions.csv"
PREDICTION_COLUMNS = ("path", "prob_gbm", "prob_pcnsl", "label", "patient_id")
CV_JSON = "cv.json"  # a cross-validation run's folds and status
CV_LOCK = ".cv.lock"
OOF_PREDICTIONS_CSV = "oof_predictions.csv"
