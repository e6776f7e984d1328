"""A run's training history and settings as the step 3 notebook reads them: history.csv
(through gbmpcnsl.runs.read_history, the one reader of that file) or the original's pickled
history, with canonical metric names and 1-based epochs, and run.json."""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from gbmpcnsl import runs
from gbmpcnsl.runs import HISTORY_CSV, RUN_JSON

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
    csv_path = run if run.suffix == ".csv" else run / HISTORY_CSV
    pickle_path = run if run.suffix in (".pkl", ".pickle") else run / "history.pkl"
    if csv_path.is_file():
        header, rows = runs.read_history(csv_path)  # the one reader of history.csv
        # every column is a number; CSVLogger writes "NA" where a value is missing
        history = pd.DataFrame(rows, columns=header).apply(pd.to_numeric, errors="coerce")
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
    path = Path(run) / RUN_JSON
    return json.loads(path.read_text()) if path.is_file() else {}
