"""The whole chain as a user runs it: demo/run_demo.sh (the script behind `make demo`,
whose commands the README shows step by step), at tiny sizes, then every output checked."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^(?P<path>.{40,}?) +(?P<percent>\d+\.\d\d) % (?P<label>GBM|PCNSL)$")
DEMO_TIMEOUT = 900  # seconds for the whole demo at tiny sizes (a few minutes on 2 busy cores)
# Every test here waits for the demo (the module's fixture): slow, and the first one's limit
# covers the demo.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(DEMO_TIMEOUT + 60)]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, module_processes):
    """Run demo/run_demo.sh at tiny sizes; returns (output folder, completed process)."""
    out = tmp_path_factory.mktemp("e2e") / "demo_output"
    env = {
        **os.environ,
        # The venv's python and papermill first, as `make demo` arranges.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DEMO_OUTPUT": str(out),
        "DEMO_TRAIN_PATIENTS": "5",
        "DEMO_TEST_PATIENTS": "3",
        "DEMO_SLICES": "2",
        "DEMO_SIZE": "32",
        "DEMO_EPOCHS": "2",
        "DEMO_BOOTSTRAPS": "200",
    }
    command = ["bash", str(ROOT / "demo" / "run_demo.sh")]
    process = module_processes.popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    stdout, stderr = process.communicate(timeout=DEMO_TIMEOUT)  # on timeout, the finaliser kills its tree
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_hdf5_layout(demo_run):
    out, _ = demo_run
    with h5py.File(out / "train.h5", "r") as h5file:
        for folder, label in (("gbm", 0), ("pcnsl", 1)):
            group = h5file[f"{folder}/32_32"]
            count = 5 * 2
            assert group["features"].shape == (count, 32, 32, 3)
            assert group["features"].dtype == np.uint8
            assert (group["labels"][:] == label).all()
            paths = [p.decode() for p in group["paths"][:]]
            groups = {g.decode() for g in group["groups"][:]}
            assert all(p.startswith(f"{folder}/") for p in paths)
            assert len(groups) == 5


def test_run_folder(demo_run):
    out, _ = demo_run
    run = out / "run"
    assert sorted(run.glob("ckpt_*.keras")), "no checkpoint"
    for name in ("history.csv", "run.json", "split.csv"):
        assert (run / name).is_file(), name
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == [0, 1]
    split = pd.read_csv(run / "split.csv")
    assert set(split["subset"]) == {"train", "val"}
    # No patient on both sides of the split.
    assert not set(split.loc[split.subset == "train", "group"]) & set(
        split.loc[split.subset == "val", "group"]
    )


def test_predictions_stdout_and_csv(demo_run):
    out, _ = demo_run
    lines = (out / "predictions_test.txt").read_text().splitlines()
    table = pd.read_csv(out / "predictions_test.csv")
    assert list(table.columns) == ["path", "prob_gbm", "prob_pcnsl"]
    assert len(lines) == len(table) == 2 * 3 * 2
    np.testing.assert_allclose(table.prob_gbm + table.prob_pcnsl, 1.0, atol=1e-6)
    for line, row in zip(lines, table.itertuples(), strict=True):
        match = LINE.match(line)
        assert match, line
        assert match["path"].strip() == row.path
        prob = max(row.prob_gbm, row.prob_pcnsl)
        assert match["percent"] == f"{100 * prob:.2f}"
        assert match["label"] == ("PCNSL" if row.prob_pcnsl > row.prob_gbm else "GBM")


def test_notebook_outputs(demo_run):
    out, _ = demo_run
    figures = out / "figures"
    for name in ("training_run.png", "training_run.pdf", "roc_gbm.png", "roc_pcnsl.png", "roc_pcnsl.pdf"):
        assert (figures / name).stat().st_size > 1000, name
    with Image.open(figures / "roc_pcnsl.png") as image:
        assert min(image.size) > 300
    predictions = pd.read_csv(out / "predictions_test.csv")
    truth = predictions.path.str.contains("/pcnsl/").astype(int)
    metrics = pd.read_csv(figures / "roc_metrics.csv")
    row = metrics[(metrics.positive_class == "PCNSL") & (metrics.level == "slice")].iloc[0]
    assert row.auc == pytest.approx(roc_auc_score(truth, predictions.prob_pcnsl), abs=1e-12)
    assert row.auc_ci_low <= row.auc <= row.auc_ci_high
    assert (figures / "roc_metrics.md").read_text().count("|") > 10


def test_gradcam_overlays(demo_run):
    out, _ = demo_run
    overlays = sorted((out / "gradcam").rglob("*.png"))
    assert len(overlays) == 4
    assert {p.relative_to(out / "gradcam").parts[0] for p in overlays} == {"gbm", "pcnsl"}
    for overlay in overlays:
        with Image.open(overlay) as image:
            assert image.size == (256, 256)  # the input slice's own size


def test_summary_names_outputs_and_auroc(demo_run):
    out, result = demo_run
    predictions = pd.read_csv(out / "predictions_test.csv")
    auc = roc_auc_score(predictions.path.str.contains("/pcnsl/"), predictions.prob_pcnsl)
    assert f"AUROC {auc:.3f}" in result.stdout
    assert "95% patient bootstrap CI" in result.stdout  # the demo's slices come in patient folders
    assert "(chosen on validation)" in result.stdout
    for name in ("train.h5", "predictions_test.csv", "patients_test.csv", "gradcam", "figures"):
        assert name in result.stdout


def test_tensorflow_start_up_chatter_is_silenced(demo_run):
    _, result = demo_run
    assert "+ python step1_train_model.py" in result.stderr  # the commands are echoed
    assert "absl::InitializeLog" not in result.stderr
    assert "oneDNN custom operations" not in result.stderr


def test_report_html_is_written_and_printed_and_logs_are_clean(demo_run):
    """The demo's report.html: its path printed, every figure of the executed step4
    notebook embedded, the Grad-CAM montage after them, nothing loaded from elsewhere; no
    papermill TCP warning and no progress-bar text in the piped log."""
    import nbformat

    out, result = demo_run
    report = out / "report.html"
    assert f"Report (tables and figures, one file): {report}" in result.stdout
    page = report.read_text()
    sources = re.findall(r'<img[^>]* src="([^"]*)"', page)
    executed = nbformat.read(out / "step4_plot_roc.ipynb", as_version=4)
    figures = [
        o for cell in executed.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    assert len(sources) == len(figures) + 1 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "without encryption" not in result.stderr
    assert "\r" not in result.stderr and "it/s]" not in result.stderr
