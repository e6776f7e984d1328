"""gbmpcnsl.history: history.csv / history.pkl read for the step3 notebook, with Keras's
metric-name variants and 1-based epochs."""

from __future__ import annotations

import pickle

import pandas as pd
import pytest

from gbmpcnsl import history as history_module


def test_read_history_csv_with_keras_name_variants(tmp_path):
    pd.DataFrame(
        {
            "epoch": [0, 1, 2, 1, 2, 3],  # a resumed run that logged epochs 1 and 2 again
            "binary_accuracy": [0.5, 0.6, 0.7, 0.61, 0.71, 0.8],
            "auc_1": [0.5, 0.6, 0.7, 0.62, 0.72, 0.8],
            "loss": [0.7, 0.6, 0.5, 0.59, 0.49, 0.4],
            "val_binary_accuracy": [0.5, 0.55, 0.6, 0.56, 0.61, 0.6],
            "val_auc_1": [0.5, 0.6, 0.65, 0.61, 0.66, 0.64],
            "val_loss": [0.7, 0.65, 0.6, 0.64, 0.58, 0.62],
        }
    ).to_csv(tmp_path / "history.csv", index=False)
    history = history_module.read_history(tmp_path)
    assert history["epoch"].tolist() == [1, 2, 3, 4]  # 1-based, as the checkpoint names
    assert history["loss"].tolist() == [0.7, 0.59, 0.49, 0.4]
    assert history_module.history_columns(history) == {
        "loss": ("loss", "val_loss"),
        "accuracy": ("binary_accuracy", "val_binary_accuracy"),
        "auc": ("auc_1", "val_auc_1"),
    }
    assert history_module.best_epoch(history) == 3


def test_read_history_pickle_only_behind_the_flag(tmp_path):
    with open(tmp_path / "history.pkl", "wb") as file:
        pickle.dump(
            {"loss": [0.7, 0.5], "acc": [0.5, 0.7], "val_loss": [0.72, 0.6], "val_acc": [0.5, 0.6]}, file
        )
    with pytest.raises(ValueError, match="allow_pickle = True"):
        history_module.read_history(tmp_path)
    with pytest.warns(UserWarning, match="unpickling runs any code"):
        history = history_module.read_history(tmp_path / "history.pkl", allow_pickle=True)
    assert history["epoch"].tolist() == [1, 2]
    assert history_module.history_columns(history)["accuracy"] == ("acc", "val_acc")
    assert history_module.history_columns(history)["auc"] == (None, None)
    assert history_module.best_epoch(history) == 2
    with pytest.raises(ValueError, match="no history.csv"):
        history_module.read_history(tmp_path / "missing")
