"""gbmpcnsl.model_card: the card step6 writes (metadata and MODEL_CARD.md) from the run
files beside a checkpoint: cohort counts per subset and class, settings, validation
metrics, the input pipeline of the sources the model was trained on (not load_image's
advice for a DICOM or NIfTI cohort), the intended-use notice; and an honest card for a
checkpoint without run files. (The export itself: test_export.py.)"""

from __future__ import annotations

import csv
import json

from gbmpcnsl.model_card import INTENDED_USE, SOURCE_RULES, card_markdown, card_metadata, card_path


def write_run(folder, rows):
    folder.mkdir()
    arguments = {"hdf5": "/data/x.h5", "run_dir": str(folder), "epochs": 3, "seed": 1, "verbose": False}
    run = {
        "command": ["step1_train_model.py", "--epochs", "3", "x.h5", "run"],
        "arguments": arguments,
        "backbone": "efficientnetb0",
        "monitor": "val_loss",
        "best_epoch": 2,
        "best_val_loss": 0.41,
        "best_val_auc": 0.87,
    }
    (folder / "run.json").write_text(json.dumps(run))
    with open(folder / "split.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "group", "label", "subset"])
        writer.writerows(rows)
    return folder / "ckpt_002_0.4100.keras"


def test_card_of_a_dicom_and_nifti_run(tmp_path):
    rows = [
        ["gbm/p1/series3#0", "gbm/p1", 0, "train"],
        ["gbm/p1/series3#1", "gbm/p1", 0, "train"],
        ["gbm/p2/IM0001.dcm", "gbm/p2", 0, "val"],
        ["pcnsl/p7/t1c.nii.gz#12", "pcnsl/p7", 1, "train"],
        ["pcnsl/p8/t1c.nii.gz#3", "pcnsl/p8", 1, "train"],
        ["pcnsl/p9/t1c.nii#4", "pcnsl/p9", 1, "val"],
    ]
    checkpoint = write_run(tmp_path / "run", rows)
    card = card_metadata(checkpoint, (64, 48))
    training, pipeline = card["training"], card["input_pipeline"]
    assert training["cohort"] == {
        "train": {"GBM": {"slices": 2, "patients": 1}, "PCNSL": {"slices": 2, "patients": 2}},
        "val": {"GBM": {"slices": 1, "patients": 1}, "PCNSL": {"slices": 1, "patients": 1}},
    }
    assert training["settings"] == {"epochs": 3, "seed": 1}  # no paths, no verbosity
    assert training["validation"] == {
        "monitor": "val_loss",
        "best_epoch": 2,
        "best_val_loss": 0.41,
        "best_val_auc": 0.87,
    }
    assert pipeline["trained_on"] == ["DICOM", "NIfTI"] and pipeline["input_size"] == [64, 48]
    assert pipeline["rules"] == [SOURCE_RULES["DICOM"], SOURCE_RULES["NIfTI"]]  # no load_image advice
    assert "load_slice" in pipeline["loader"] and card["intended_use"] == INTENDED_USE

    metadata = {
        "model_name": "efficientnet",
        "format": "onnx",
        "output": {"name": "prob_pcnsl"},
        "classes": {"GBM": 0, "PCNSL": 1},
        "source_checkpoint": {"name": checkpoint.name, "sha256": "ab" * 32},
        "tool": "step6_export_model.py (gbm-pcnsl 1.0.0)",
        **card,
    }
    text = card_markdown(metadata)
    assert text.startswith("# Model card: efficientnet (onnx)\n\n## Intended use\n\n" + INTENDED_USE)
    assert "| train | PCNSL | 2 | 2 |" in text and "| val | GBM | 1 | 1 |" in text
    assert "Trained on: DICOM, NIfTI." in text and SOURCE_RULES["NIfTI"] in text
    assert "best_val_auc 0.87" in text and "Command: `step1_train_model.py --epochs 3 x.h5 run`" in text
    assert "load_image, bit for bit" not in text
    assert card_path(tmp_path / "m.onnx", "onnx") == tmp_path / "m.onnx.MODEL_CARD.md"
    assert card_path(tmp_path / "sm", "saved_model") == tmp_path / "sm" / "MODEL_CARD.md"


def test_card_of_a_checkpoint_without_run_files(tmp_path):
    card = card_metadata(tmp_path / "paper_era.h5", (380, 380))
    assert card["training"]["cohort"] == {} and card["training"]["settings"] == {}
    assert card["input_pipeline"]["trained_on"].startswith("not recorded")
    assert card["input_pipeline"]["rules"] == list(SOURCE_RULES.values())  # every rule, as it is unknown
