"""gbmpcnsl.predictions: labels and patients from the paths of step2's CSV, a ground-truth
CSV, the out-of-fold CSV of a cross-validation run, and the one-line errors for bad files."""

from __future__ import annotations

import pandas as pd
import pytest
from helpers import write_predictions

from gbmpcnsl import predictions, report


def test_labels_and_patients_from_paths():
    assert predictions.label_from_path("demo_test/gbm/gbm_s1_p003/slice02.png") == 0
    assert predictions.label_from_path("/data/PCNSL/p1/s.png") == 1
    assert predictions.label_from_path(r"C:\data\pcnsl\p1\s.png") == 1
    assert predictions.label_from_path("data/pcnsl/gbm/s.png") == 0  # the nearest class folder wins
    with pytest.raises(ValueError, match="gbm/pcnsl folder"):
        predictions.label_from_path("data/other/gbm.png")  # a file name is not a folder
    assert predictions.patient_id_from_path("demo_test/gbm/gbm_s1_p003/slice02.png") == "gbm/gbm_s1_p003"
    assert predictions.patient_id_from_path("data/gbm/flat.png") == "gbm/flat"  # its own group


def test_read_predictions_from_folders_with_patients(tmp_path):
    csv_path = tmp_path / "predictions.csv"
    write_predictions(
        csv_path,
        [
            ("t/gbm/p1/a.png", 0.8, 0.2),
            ("t/gbm/p1/b.png", 0.6, 0.4),
            ("t/pcnsl/p1/a.png", 0.3, 0.7),  # same folder name, other class: another patient
            ("t/pcnsl/p2/a.png", 0.1, 0.9),
        ],
    )
    frame = predictions.read_predictions(csv_path)
    assert frame["label"].tolist() == [0, 0, 1, 1]
    assert frame["patient_id"].tolist() == ["gbm/p1", "gbm/p1", "pcnsl/p1", "pcnsl/p2"]
    patients = report.patient_level(frame).set_index("patient_id")
    assert patients.loc["gbm/p1", "prob_pcnsl"] == pytest.approx(0.3)
    assert patients.loc["gbm/p1", "n_images"] == 2 and patients.loc["pcnsl/p2", "label"] == 1
    assert "patient_id" not in predictions.read_predictions(csv_path, patient_ids=False)


def test_read_predictions_auto_drops_one_image_patients(tmp_path):
    csv_path = tmp_path / "predictions.csv"
    write_predictions(csv_path, [("t/gbm/a.png", 0.8, 0.2), ("t/pcnsl/b.png", 0.3, 0.7)])
    assert "patient_id" not in predictions.read_predictions(csv_path)
    assert predictions.read_predictions(csv_path, patient_ids=True)["patient_id"].tolist() == [
        "gbm/a",
        "pcnsl/b",
    ]


def test_read_predictions_with_ground_truth_csv(tmp_path):
    csv_path, truth_path = tmp_path / "predictions.csv", tmp_path / "truth.csv"
    write_predictions(csv_path, [("img/1.png", 0.8, 0.2), ("./img/2.png", 0.3, 0.7), ("img/3.png", 0.4, 0.6)])
    pd.DataFrame(
        {
            "path": ["img/1.png", "img/2.png", "img/3.png"],
            "label": ["GBM", "pcnsl", "1"],
            "patient_id": ["a", "b", "b"],
        }
    ).to_csv(truth_path, index=False)
    frame = predictions.read_predictions(csv_path, ground_truth=truth_path)
    assert frame["label"].tolist() == [0, 1, 1]  # "./img/2.png" matched after normalising
    assert frame["patient_id"].tolist() == ["a", "b", "b"]

    pd.DataFrame({"path": ["img/1.png"], "label": [0]}).to_csv(truth_path, index=False)
    with pytest.raises(ValueError, match="2 of 3 paths have no ground-truth label"):
        predictions.read_predictions(csv_path, ground_truth=truth_path)


def test_read_predictions_rejects_bad_files(tmp_path):
    csv_path = tmp_path / "predictions.csv"
    pd.DataFrame({"filename": ["a.png"], "prob_pcnsl": [0.5]}).to_csv(csv_path, index=False)
    with pytest.raises(ValueError, match="not a step2 predictions CSV"):
        predictions.read_predictions(csv_path)
    write_predictions(csv_path, [("t/gbm/a.png", 0.5, 0.2)])
    with pytest.raises(ValueError, match="prob_gbm \\+ prob_pcnsl != 1"):
        predictions.read_predictions(csv_path)
    write_predictions(csv_path, [("t/gbm/p/a.png", 0.8, 0.2), ("t/gbm/p/b.png", 0.8, 0.2)])
    pd.DataFrame({"path": ["t/gbm/p/a.png", "t/gbm/p/b.png"], "label": [0, 1]}).to_csv(
        tmp_path / "t.csv", index=False
    )
    with pytest.raises(ValueError, match="patients with both labels"):
        predictions.read_predictions(csv_path, ground_truth=tmp_path / "t.csv")


def test_read_predictions_takes_labels_patients_and_folds_from_oof_csv(tmp_path):
    csv_path = tmp_path / "oof_predictions.csv"
    pd.DataFrame(
        {
            "path": ["a/x1.png", "a/x2.png", "b/y1.png", "b/y2.png"],  # no class folder in the path
            "prob_gbm": [0.8, 0.6, 0.3, 0.1],
            "prob_pcnsl": [0.2, 0.4, 0.7, 0.9],
            "label": [0, 0, 1, 1],
            "patient_id": ["gbm/a", "gbm/a", "pcnsl/b", "pcnsl/b"],
            "fold": [0, 0, 1, 1],
        }
    ).to_csv(csv_path, index=False)
    frame = predictions.read_predictions(csv_path)
    assert frame["label"].tolist() == [0, 0, 1, 1]
    assert frame["patient_id"].tolist() == ["gbm/a", "gbm/a", "pcnsl/b", "pcnsl/b"]
    assert frame["fold"].tolist() == [0, 0, 1, 1]
