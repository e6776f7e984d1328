"""The step 3 and step 4 notebooks, run headless as the README runs them (papermill with
parameters, on the python3 kernel), and the figures and tables they write.

The inputs are small synthetic fixtures (a run folder with history.csv and run.json,
predictions CSVs in step2's format with gbm/pcnsl and patient folders in the paths). To run
the notebooks on the real tiny run instead, change `step3_run_dirs` / `step4_predictions`
to build their inputs from conftest's `trained_run` (and step2's CSV); the checks below
read everything they compare against from those inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
N_BOOTSTRAPS = 200
STEP3 = "step3_plot_training_metrics.ipynb"
STEP4 = "step4_plot_roc.ipynb"
CELL_TIMEOUT = 120  # seconds for one cell (papermill's execution_timeout): a hung cell fails


def run_notebook(name: str, executed_path: Path, parameters: dict) -> nbformat.NotebookNode:
    """Execute a notebook from the repository root with papermill (gbmpcnsl.notebooks: the
    kernel over IPC, as the demo runs it); return the executed copy."""
    from gbmpcnsl.notebooks import run_notebook as run

    return run(ROOT / name, executed_path, parameters, cwd=ROOT, timeout=CELL_TIMEOUT)


def check_figure(stem: Path) -> None:
    """stem.png opens as a non-blank image, stem.pdf is a non-trivial PDF."""
    png, pdf = stem.with_suffix(".png"), stem.with_suffix(".pdf")
    assert png.is_file() and pdf.is_file(), f"missing {png.name} or {pdf.name}"
    with Image.open(png) as image:
        assert image.format == "PNG"
        assert image.width > 300 and image.height > 300
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 5, f"{png.name} looks blank"
    assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 2000


# ---------------------------------------------------------------------------- fixtures


def write_run(run_dir: Path, val_loss: list[float], names: dict[str, str]) -> Path:
    """A run folder as step1 writes it: history.csv (CSVLogger: 0-based epochs) + run.json."""
    run_dir.mkdir(parents=True)
    epochs = len(val_loss)
    rng = np.random.default_rng(len(val_loss))
    history = pd.DataFrame(
        {
            "epoch": np.arange(epochs),
            names["accuracy"]: np.linspace(0.55, 0.95, epochs),
            names["auc"]: np.linspace(0.6, 0.99, epochs),
            "learning_rate": np.full(epochs, 1e-4),
            "loss": np.linspace(0.7, 0.1, epochs),
            f"val_{names['accuracy']}": np.clip(
                np.linspace(0.5, 0.9, epochs) + rng.normal(0, 0.02, epochs), 0, 1
            ),
            f"val_{names['auc']}": np.clip(
                np.linspace(0.55, 0.95, epochs) + rng.normal(0, 0.02, epochs), 0, 1
            ),
            "val_loss": val_loss,
        }
    )
    history.to_csv(run_dir / "history.csv", index=False)
    best = int(np.argmin(val_loss))
    run_info = {"backbone": "efficientnetb0", "input_shape": [64, 64, 3], "best_epoch": best + 1}
    (run_dir / "run.json").write_text(json.dumps({**run_info, "best_val_loss": float(val_loss[best])}))
    return run_dir


@pytest.fixture(scope="module")
def step3_run_dirs(tmp_path_factory) -> list[Path]:
    """Two runs, with Keras's two spellings of the metric names."""
    base = tmp_path_factory.mktemp("step3")
    return [
        write_run(base / "run_a", [0.69, 0.6, 0.52, 0.45, 0.47, 0.5], {"accuracy": "accuracy", "auc": "auc"}),
        write_run(
            base / "run_b",
            [0.7, 0.62, 0.58, 0.55, 0.54, 0.56, 0.6],
            {"accuracy": "binary_accuracy", "auc": "auc_1"},
        ),
    ]


def write_predictions(csv_path: Path, seed: int, separation: float) -> Path:
    """step2's CSV for 10 GBM and 10 PCNSL patients, 3 slices each, under test/<class>/<patient>/."""
    rng = np.random.default_rng(seed)
    rows = []
    for folder, label in (("gbm", 0), ("pcnsl", 1)):
        for patient in range(10):
            patient_shift = rng.normal(0, 0.7)  # slices of one patient are correlated
            for slice_number in range(3):
                logit = separation * (2 * label - 1) + patient_shift + rng.normal(0, 1)
                prob_pcnsl = 1 / (1 + np.exp(-logit))
                path = f"test/{folder}/{folder}_p{patient:03d}/slice{slice_number:02d}.png"
                rows.append({"path": path, "prob_gbm": 1 - prob_pcnsl, "prob_pcnsl": prob_pcnsl})
    pd.DataFrame(rows).to_csv(csv_path, index=False)
    return csv_path


@pytest.fixture(scope="module")
def step4_predictions(tmp_path_factory) -> dict[str, Path]:
    """Two models' predictions on the same images, one better than the other."""
    base = tmp_path_factory.mktemp("step4")
    return {
        "model A": write_predictions(base / "a.csv", seed=1, separation=1.2),
        "model B": write_predictions(base / "b.csv", seed=2, separation=0.5),
    }


# ---------------------------------------------------------------------------- step 3


@pytest.mark.slow  # a Jupyter kernel runs the notebook
def test_step3_notebook_writes_training_figures(step3_run_dirs, tmp_path):
    output_dir = tmp_path / "figures"
    run_notebook(
        STEP3,
        tmp_path / STEP3,
        # as papermill -p passes it from a shell: a JSON string
        {"run_dirs": json.dumps([str(p) for p in step3_run_dirs]), "output_dir": str(output_dir)},
    )
    for run_dir in step3_run_dirs:
        check_figure(output_dir / f"training_{run_dir.name}")
    check_figure(output_dir / "training_overlay")

    summary = pd.read_csv(output_dir / "training_summary.csv").set_index("run")
    for run_dir in step3_run_dirs:
        history = pd.read_csv(run_dir / "history.csv")
        best_row = history.loc[history["val_loss"].idxmin()]
        row = summary.loc[run_dir.name]
        assert row["epochs"] == len(history)
        assert (
            row["best_epoch"]
            == best_row["epoch"] + 1
            == json.loads((run_dir / "run.json").read_text())["best_epoch"]
        )
        assert row["best_val_loss"] == pytest.approx(best_row["val_loss"])
        val_auc = "val_auc" if "val_auc" in history else "val_auc_1"
        assert row["best_val_auc"] == pytest.approx(best_row[val_auc])


@pytest.mark.slow  # a Jupyter kernel runs the notebook
def test_step3_notebook_refuses_a_pickle_without_the_flag(tmp_path):
    import pickle

    from papermill.exceptions import PapermillExecutionError

    run_dir = tmp_path / "original_run"
    run_dir.mkdir()
    with open(run_dir / "history.pkl", "wb") as file:
        pickle.dump({"loss": [0.7, 0.5], "val_loss": [0.72, 0.6]}, file)
    with pytest.raises(PapermillExecutionError, match="allow_pickle"):
        run_notebook(
            STEP3, tmp_path / STEP3, {"run_dirs": [str(run_dir)], "output_dir": str(tmp_path / "out")}
        )


# ---------------------------------------------------------------------------- step 4


@pytest.mark.slow  # a Jupyter kernel runs the notebook
def test_step4_notebook_writes_roc_figures_and_metrics(step4_predictions, tmp_path):
    output_dir = tmp_path / "figures"
    notebook = run_notebook(
        STEP4,
        tmp_path / STEP4,
        {
            "predictions": json.dumps({name: str(path) for name, path in step4_predictions.items()}),
            "output_dir": str(output_dir),
            "n_bootstraps": N_BOOTSTRAPS,
            "seed": 3,
        },
    )
    check_figure(output_dir / "roc_gbm")
    check_figure(output_dir / "roc_pcnsl")

    metrics = pd.read_csv(output_dir / "roc_metrics.csv")
    assert len(metrics) == 4 * len(step4_predictions)  # two levels, two classes
    assert metrics["level"].tolist()[:4] == ["patient", "patient", "slice", "slice"]  # patients first
    for name, csv_path in step4_predictions.items():
        predictions = pd.read_csv(csv_path)
        is_pcnsl = predictions["path"].str.contains("/pcnsl/").to_numpy()
        patients = (
            predictions.assign(patient=predictions["path"].str.rsplit("/", n=1).str[0], is_pcnsl=is_pcnsl)
            .groupby("patient")[["prob_pcnsl", "is_pcnsl"]]
            .mean()
        )
        called_pcnsl = predictions["prob_pcnsl"].to_numpy() > 0.5
        for positive_class, is_positive, score, patient_positive, patient_score, called in (
            (
                "GBM",
                ~is_pcnsl,
                predictions["prob_gbm"],
                patients["is_pcnsl"] == 0,
                1 - patients["prob_pcnsl"],
                ~called_pcnsl,
            ),
            (
                "PCNSL",
                is_pcnsl,
                predictions["prob_pcnsl"],
                patients["is_pcnsl"] == 1,
                patients["prob_pcnsl"],
                called_pcnsl,
            ),
        ):
            rows = metrics[(metrics["model"] == name) & (metrics["positive_class"] == positive_class)]
            row, patient_row = (
                rows[rows["level"] == "slice"].iloc[0],
                rows[rows["level"] == "patient"].iloc[0],
            )
            assert row["auc"] == pytest.approx(roc_auc_score(is_positive, score), abs=1e-12)
            assert row["auc_ci_low"] < row["auc"] < row["auc_ci_high"]
            assert row["delong_ci_low"] < row["auc"] < row["delong_ci_high"]
            assert row["n_bootstraps"] == N_BOOTSTRAPS and row["n_skipped"] == 0
            assert row["sensitivity"] == pytest.approx((called & is_positive).sum() / is_positive.sum())
            assert row["specificity"] == pytest.approx((~called & ~is_positive).sum() / (~is_positive).sum())
            assert row["n_patients"] == 20 and patient_row["n_patients"] == 20
            assert patient_row["auc"] == pytest.approx(
                roc_auc_score(patient_positive, patient_score), abs=1e-12
            )
            assert patient_row["auc_ci_low"] <= patient_row["auc"] <= patient_row["auc_ci_high"]
            patient_called = (patients["prob_pcnsl"] > 0.5) == (positive_class == "PCNSL")
            assert patient_row["sensitivity"] == pytest.approx(
                (patient_called & patient_positive).sum() / patient_positive.sum()
            )
            assert patient_row["specificity"] == pytest.approx(
                (~patient_called & ~patient_positive).sum() / (~patient_positive).sum()
            )
            assert (row["bootstrap_unit"], row["delong_unit"], row["wilson_unit"]) == (
                "patient",
                "patient",
                "slice",
            )

    markdown = (output_dir / "roc_metrics.md").read_text().splitlines()
    assert markdown[0].startswith("| Model | Level | Positive class |") and "AUROC" in markdown[0]
    assert len(markdown) == 2 + len(metrics)
    first = metrics.iloc[0]
    assert f"| {first['auc']:.3f} | {first['auc_ci_low']:.3f}-{first['auc_ci_high']:.3f} |" in markdown[2]

    reports = (output_dir / "classification_reports.txt").read_text()
    assert reports.count("precision") == 2 * len(step4_predictions) and "true PCNSL" in reports  # two levels
    # The executed notebook shows the AUCs it saved (its outputs are kept in the executed copy).
    shown = "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))
    assert "model B" in shown


def test_committed_notebooks_are_stripped_and_parameterised():
    for name in (STEP3, STEP4):
        notebook = nbformat.read(ROOT / name, as_version=4)
        code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert "parameters" in code_cells[0].metadata.get("tags", []), name
        for cell in code_cells:
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: outputs not stripped"


@pytest.mark.slow  # a Jupyter kernel runs the notebook
def test_step4_notebook_threshold_from_validation_calibration_folds_and_comparison(
    step4_predictions, tmp_path
):
    """threshold_from (Youden on validation), calibration, out-of-fold folds and the paired
    model comparison, each checked against sklearn or a direct count."""
    from sklearn.metrics import brier_score_loss

    base = tmp_path / "inputs"
    base.mkdir()
    # Validation predictions whose probabilities run low: Youden's threshold sits well below 0.5.
    validation = pd.read_csv(write_predictions(base / "val.csv", seed=5, separation=1.2))
    validation["prob_pcnsl"] = 1 / (
        1 + np.exp(-(np.log(validation["prob_pcnsl"] / validation["prob_gbm"]) - 1.5))
    )
    validation["prob_gbm"] = 1 - validation["prob_pcnsl"]
    validation.to_csv(base / "val.csv", index=False)
    # Out-of-fold predictions as step1 --folds writes them: label, patient_id and fold columns.
    oof = pd.read_csv(step4_predictions["model A"])
    oof["label"] = oof["path"].str.contains("/pcnsl/").astype(int)
    oof["patient_id"] = oof["path"].str.split("/").str[1:3].str.join("/")
    oof["fold"] = oof["path"].str.extract(r"_p(\d+)/")[0].astype(int) % 3
    oof.to_csv(base / "oof_predictions.csv", index=False)
    predictions = {
        **{name: str(path) for name, path in step4_predictions.items()},
        "cv": str(base / "oof_predictions.csv"),
    }

    output_dir = tmp_path / "figures"
    run_notebook(
        STEP4,
        tmp_path / STEP4,
        {
            "predictions": json.dumps(predictions),
            "output_dir": str(output_dir),
            "n_bootstraps": N_BOOTSTRAPS,
            "threshold_from": json.dumps(dict.fromkeys(predictions, str(base / "val.csv"))),
            "bootstrap_unit": "patient",
            "stratified_bootstrap": True,
            "calibration_bins": 5,
        },
    )
    check_figure(output_dir / "calibration")
    metrics = pd.read_csv(output_dir / "roc_metrics.csv")

    # The threshold maximises Youden's J on validation (brute force over every split), not on test.
    val_pcnsl = validation["path"].str.contains("/pcnsl/").to_numpy()
    val_prob = validation["prob_pcnsl"].to_numpy()

    def youden_j(is_pcnsl, prob, threshold):
        called = prob > threshold
        return (
            (called & is_pcnsl).sum() / is_pcnsl.sum() + (~called & ~is_pcnsl).sum() / (~is_pcnsl).sum() - 1
        )

    best_j = max(youden_j(val_pcnsl, val_prob, t) for t in np.concatenate([[-1.0], val_prob]))
    patient_metrics = metrics[metrics["level"] == "patient"]
    metrics = metrics[metrics["level"] == "slice"]
    thresholds = metrics["threshold"].unique()
    assert len(thresholds) == 1 and thresholds[0] < 0.4
    assert youden_j(val_pcnsl, val_prob, thresholds[0]) == pytest.approx(best_j)
    assert metrics["threshold_from"].str.startswith("Youden on ").all()
    assert (metrics["bootstrap_unit"] == "patient").all()
    assert metrics["bootstrap_stratified"].all() and (metrics["n_skipped"] == 0).all()
    # The patient level's threshold maximises J on the validation patients' mean probabilities.
    val_patients = (
        validation.assign(is_pcnsl=val_pcnsl, patient=validation["path"].str.rsplit("/", n=1).str[0])
        .groupby("patient")[["prob_pcnsl", "is_pcnsl"]]
        .mean()
    )
    patient_pcnsl, patient_prob = (
        val_patients["is_pcnsl"].to_numpy() == 1,
        val_patients["prob_pcnsl"].to_numpy(),
    )
    best_patient_j = max(
        youden_j(patient_pcnsl, patient_prob, t) for t in np.concatenate([[-1.0], patient_prob])
    )
    patient_thresholds = patient_metrics["threshold"].unique()
    assert len(patient_thresholds) == 1
    assert youden_j(patient_pcnsl, patient_prob, patient_thresholds[0]) == pytest.approx(best_patient_j)

    for name, csv_path in predictions.items():
        frame = pd.read_csv(csv_path)
        is_pcnsl = frame["path"].str.contains("/pcnsl/").to_numpy()
        row = metrics[(metrics["model"] == name) & (metrics["positive_class"] == "PCNSL")].iloc[0]
        called = frame["prob_pcnsl"].to_numpy() > thresholds[0]
        assert row["tp"] == (called & is_pcnsl).sum() and row["fp"] == (called & ~is_pcnsl).sum()
        assert row["sensitivity_ci_low"] < row["sensitivity"] <= row["sensitivity_ci_high"]
        assert row["brier"] == pytest.approx(brier_score_loss(is_pcnsl, frame["prob_pcnsl"]), abs=1e-12)

    cv_row = metrics[(metrics["model"] == "cv") & (metrics["positive_class"] == "PCNSL")].iloc[0]
    fold_aucs = [
        roc_auc_score(oof.loc[oof["fold"] == k, "label"], oof.loc[oof["fold"] == k, "prob_pcnsl"])
        for k in range(3)
    ]
    assert cv_row["n_folds"] == 3
    assert [cv_row[f"auc_fold_{k}"] for k in range(3)] == pytest.approx(fold_aucs, abs=1e-12)
    assert cv_row["fold_auc_mean"] == pytest.approx(np.mean(fold_aucs)) and cv_row[
        "fold_auc_sd"
    ] == pytest.approx(np.std(fold_aucs, ddof=1))
    assert (output_dir / "roc_details.md").read_text().count("\n") == 2 + len(metrics) + len(patient_metrics)

    comparison = pd.read_csv(output_dir / "roc_comparison.csv")
    assert comparison[["model_a", "model_b", "level"]].values.tolist() == [
        [a, b, level]
        for a, b in (["model A", "model B"], ["model A", "cv"], ["model B", "cv"])
        for level in ("patient", "slice")
    ]
    patient_comparison, comparison = (
        comparison[comparison["level"] == level] for level in ("patient", "slice")
    )
    assert (patient_comparison["n_cases"] == 20).all() and (comparison["n_cases"] == 60).all()
    a, b = (pd.read_csv(step4_predictions[name]) for name in ("model A", "model B"))
    first = comparison.iloc[0]
    labels = a["path"].str.contains("/pcnsl/")
    difference = roc_auc_score(labels, a["prob_pcnsl"]) - roc_auc_score(labels, b["prob_pcnsl"])
    assert first["auc_difference"] == pytest.approx(difference, abs=1e-12)
    assert first["delong_ci_low"] < difference < first["delong_ci_high"] and 0 < first["delong_p"] < 1
    assert first["bootstrap_unit"] == "patient" and first["n_patients"] == 20
    assert (
        comparison.iloc[1]["auc_difference"] == 0 and comparison.iloc[1]["delong_p"] == 1
    )  # the same scores
    markdown = (output_dir / "roc_comparison.md").read_text().splitlines()
    assert markdown[0].startswith("| Model A | Model B |") and len(markdown) == 2 + 6
