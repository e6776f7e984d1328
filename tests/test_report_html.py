"""gbmpcnsl.notebooks: step4 run headless over IPC (no TCP warning) and its report.html,
one self-contained file: every figure the notebook made, embedded as a data: URI, nothing
loaded from elsewhere, no code, the data summary and both levels of metrics, and the
Grad-CAM montage. (No headless browser installs from PyPI offline: Playwright downloads
its browsers, so the HTML is parsed instead.)"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from helpers import save_png
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


class Links(HTMLParser):
    """Every src/href of the page, and each <img>'s src."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.tags = [], [], set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.links.append(value)
                if tag == "img":
                    self.images.append(value)


@pytest.mark.slow  # a Jupyter kernel runs the notebook
def test_step4_report_is_one_self_contained_file_with_every_figure(tmp_path):
    rng = np.random.default_rng(4)
    rows = [
        {"path": f"test/{folder}/{folder}_p{patient}/s{index}.png", "prob_pcnsl": float(rng.uniform(*bounds))}
        for folder, bounds in (("gbm", (0.0, 0.7)), ("pcnsl", (0.3, 1.0)))
        for patient in range(6)
        for index in range(2)
    ]
    predictions = pd.DataFrame(rows).assign(prob_gbm=lambda frame: 1 - frame["prob_pcnsl"])
    predictions.to_csv(tmp_path / "test.csv", index=False)
    predictions.head(16).to_csv(tmp_path / "val.csv", index=False)  # chooses the threshold
    for index in range(3):
        save_png(tmp_path / "gradcam" / "gbm" / f"overlay{index}.png", 40 * index + 30, size=48)
    command = [
        sys.executable,
        "-m",
        "gbmpcnsl.notebooks",
        "step4_plot_roc.ipynb",
        str(tmp_path / "out.ipynb"),
    ]
    parameters = [
        "-p",
        "predictions",
        json.dumps({"tiny": str(tmp_path / "test.csv")}),
        "-p",
        "n_bootstraps",
        "50",
    ]
    parameters += ["-p", "threshold_from", str(tmp_path / "val.csv")]
    report = tmp_path / "report.html"
    result = subprocess.run(
        [*command, *parameters, "-p", "output_dir", str(tmp_path / "figures")]
        + ["--report", str(report), "--gradcam", str(tmp_path / "gradcam")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(report)
    assert "without encryption" not in result.stderr and "Passed unknown parameter" not in result.stderr

    executed = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    figures = [
        output["data"]["image/png"]
        for cell in executed.cells
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert len(figures) == 3  # ROC GBM, ROC PCNSL, calibration
    page = report.read_text()
    links = Links()
    links.feed(page)
    assert all(link.startswith(("data:image/png;base64,", "#")) for link in links.links), links.links
    embedded = [source.removeprefix("data:image/png;base64,") for source in links.images]
    assert embedded[: len(figures)] == [figure.replace("\n", "") for figure in figures]
    montage = Image.open(io.BytesIO(base64.b64decode(embedded[-1])))
    assert len(embedded) == len(figures) + 1 and montage.width == 4 * 192
    text = page.split("Summary for the report")[1]
    assert "Images" in text and "Patients" in text and "<td>patient</td>" in text and "Grad-CAM" in text
    assert "<td>validation: val.csv</td>" in text  # the data of every set, the validation one too
    for code in ("read_predictions(", "import ", "data_summary("):  # no code cells
        assert code not in page
