"""demo/run_recipe.sh, "From a scanner export to a result" (docs/recipe.md), at tiny sizes:
a DICOM export with three series per patient -> the T1 post-contrast series (step0
--series) -> cross-validation by patient (step1 --folds) -> out-of-fold Grad-CAM (step5
--out-of-fold) -> the out-of-fold ROC with patient-level CIs and report.html (step4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPE_TIMEOUT = 1200  # two folds of a tiny B0, one epoch each, on 2 busy cores


@pytest.mark.slow
@pytest.mark.timeout(RECIPE_TIMEOUT + 60)
def test_recipe_runs_from_a_dicom_export_to_a_report(tmp_path, processes):
    out = tmp_path / "recipe_output"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "RECIPE_OUTPUT": str(out),
        "RECIPE_PATIENTS": "4",
        "RECIPE_SLICES": "2",
        "RECIPE_SIZE": "32",
        "RECIPE_FOLDS": "2",
        "RECIPE_EPOCHS": "1",
        "RECIPE_BOOTSTRAPS": "50",
    }
    command = ["bash", str(ROOT / "demo" / "run_recipe.sh")]
    process = processes.popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.communicate(timeout=RECIPE_TIMEOUT)
    assert process.returncode == 0, stderr[-3000:]
    assert stdout.strip().splitlines()[-1] == f"report: {out / 'report.html'}"

    # Only the T1 post-contrast series was converted: 4 patients x 2 slices per class.
    import h5py

    with h5py.File(out / "data.h5", "r") as h5file:
        for folder in ("gbm", "pcnsl"):
            paths = [path.decode() for path in h5file[f"{folder}/32_32/paths"][:]]
            assert len(paths) == 8 and all("/301_AX_T1_POST/" in path for path in paths), paths
    oof = pd.read_csv(out / "cv" / "oof_predictions.csv")
    assert len(oof) == 16 and sorted(oof["fold"].unique()) == [0, 1]
    metrics = pd.read_csv(out / "figures" / "roc_metrics.csv")
    assert (metrics["n_patients"] == 8).all() and set(metrics["level"]) == {"patient", "slice"}
    assert metrics["auc_ci_low"].notna().all() and (metrics["bootstrap_unit"] == "patient").all()
    overlays = sorted((out / "gradcam").rglob("*.png"))
    assert len(overlays) == 8  # the middle slice of each patient's T1 series
    page = (out / "report.html").read_text()
    notebook = json.loads((out / "step4_plot_roc.ipynb").read_text())
    figures = sum(
        "image/png" in output.get("data", {})
        for cell in notebook["cells"]
        for output in cell.get("outputs", [])
    )
    assert (
        figures >= 3 and page.count('src="data:image/png;base64,') == figures + 1
    )  # and the Grad-CAM montage
