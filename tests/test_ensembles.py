"""Ensembles and patients in step2 and step5: several checkpoints or a cross-validation run
folder (--model-weights), per-model columns, per-patient output.

The two ensemble members are the session's step1 model (conftest's trained_checkpoint) and
a copy of it whose logit layer is changed, so that the two disagree image by image. The
CV run folder is built here by the contract of step1 --folds (fold_<i>/ run folders, a
cv.json with best_checkpoints once every fold is done). Every check compares against
step2 or Grad-CAM run on one model at a time.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import step2_predict as step2
import step5_plot_grad_cam as step5
from gbmpcnsl.checkpoints import split_model_arguments
from gbmpcnsl.gradcam import HEATMAPS_FILE
from gbmpcnsl.patients import aggregate_patients
from gbmpcnsl_common import patient_id

REPO = Path(__file__).resolve().parents[1]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def expected_line(path: str, prob_pcnsl: float) -> str:
    if prob_pcnsl > 0.5:
        return f"{str(path):<40} {100 * prob_pcnsl:.2f} % PCNSL"
    return f"{str(path):<40} {100 * (1 - prob_pcnsl):.2f} % GBM"


@pytest.fixture(scope="module")
def members(trained_checkpoint, tmp_path_factory) -> list[Path]:
    """Two .keras checkpoints of the same architecture that predict differently."""
    import keras

    folder = tmp_path_factory.mktemp("members")
    first = folder / "first.keras"
    shutil.copy(trained_checkpoint, first)
    model = keras.saving.load_model(trained_checkpoint, compile=False)
    kernel, bias = model.get_layer("logit").get_weights()
    rng = np.random.default_rng(0)
    kernel = (-1.5 * kernel + rng.normal(0, 3 * kernel.std() + 1e-3, kernel.shape)).astype(np.float32)
    model.get_layer("logit").set_weights([kernel, bias + np.float32(0.3)])
    second = folder / "second.keras"
    model.save(second)
    return [first, second]


def write_cv_run(cv_dir: Path, members: list[Path], complete: bool = True) -> Path:
    """A CV run folder by step1's contract: fold_<i>/ run folders and cv.json."""
    assignment, best = [], []
    for fold, member in enumerate(members):
        fold_dir = cv_dir / f"fold_{fold}"
        fold_dir.mkdir(parents=True)
        done = complete or fold == 0
        name = f"ckpt_002_0.{fold}000.keras"
        if done:
            shutil.copy(member, fold_dir / name)
        (fold_dir / "run.json").write_text(json.dumps({"best_checkpoint": name if done else None}))
        assignment.append(
            {
                "fold": fold,
                "run_dir": f"fold_{fold}",
                "best_checkpoint": f"fold_{fold}/{name}" if done else None,
            }
        )
        best.append(f"fold_{fold}/{name}")
    cv = {"folds": len(members), "fold_assignment": assignment, "complete": complete}
    if complete:
        cv["best_checkpoints"] = best
    (cv_dir / "cv.json").write_text(json.dumps(cv))
    return cv_dir


@pytest.fixture(scope="module")
def slices(demo_data) -> list[str]:
    """Two patients per class, three slices each."""
    patients = sorted(demo_data.glob("gbm/*"))[:2] + sorted(demo_data.glob("pcnsl/*"))[:2]
    return [str(path) for patient in patients for path in sorted(patient.glob("*.png"))]


@pytest.fixture(scope="module")
def single_predictions(members, slices, tmp_path_factory) -> list[np.ndarray]:
    """prob_pcnsl of each member alone, by step2 (one model: today's output)."""
    folder = tmp_path_factory.mktemp("single")
    probs = []
    for index, member in enumerate(members):
        csv_path = folder / f"{index}.csv"
        assert step2.main(["--model-weights", str(member), "--csv", str(csv_path), *slices]) == 0
        assert csv_path.read_text().splitlines()[0] == "path,prob_gbm,prob_pcnsl"
        probs.append(np.array([float(row["prob_pcnsl"]) for row in read_csv(csv_path)]))
    assert np.abs(probs[0] - probs[1]).max() > 1e-3, "the two members must disagree"
    return probs


# ---------------------------------------------------------------------------- step2
def test_ensemble_mean_equals_mean_of_single_model_runs(
    members, slices, single_predictions, tmp_path, capsys
):
    csv_path = tmp_path / "ensemble.csv"
    argv = ["--model-weights", *map(str, members), "--csv", str(csv_path), "--per-model", *slices]
    assert step2.main(argv) == 0
    captured = capsys.readouterr()

    mean = np.mean(single_predictions, axis=0)
    rows = read_csv(csv_path)
    assert list(rows[0]) == [
        "path",
        "prob_gbm",
        "prob_pcnsl",
        "prob_pcnsl_std",
        "prob_pcnsl_model0",
        "prob_pcnsl_model1",
    ]
    assert [row["path"] for row in rows] == slices
    column = {name: np.array([float(row[name]) for row in rows]) for name in rows[0] if name != "path"}
    np.testing.assert_allclose(column["prob_pcnsl"], mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(column["prob_gbm"], 1 - column["prob_pcnsl"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        column["prob_pcnsl_std"], np.std(single_predictions, axis=0), rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(column["prob_pcnsl_model0"], single_predictions[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(column["prob_pcnsl_model1"], single_predictions[1], rtol=0, atol=1e-6)
    # The stdout lines keep their format, with the ensemble's probability.
    assert captured.out == "".join(
        expected_line(p, prob) + "\n" for p, prob in zip(slices, column["prob_pcnsl"], strict=True)
    )
    assert "model0 = " in captured.err and "model1 = " in captured.err


def test_cv_run_folder_is_its_folds_best_checkpoints(members, slices, single_predictions, tmp_path):
    cv_dir = write_cv_run(tmp_path / "cv", members)
    csv_path = tmp_path / "cv.csv"
    # The original argument order: the images follow --model-weights directly.
    assert step2.main(["--csv", str(csv_path), "--per-model", "--model-weights", str(cv_dir), *slices]) == 0
    rows = read_csv(csv_path)
    assert list(rows[0])[3:] == ["prob_pcnsl_std", "prob_pcnsl_fold0", "prob_pcnsl_fold1"]
    for fold in (0, 1):
        got = np.array([float(row[f"prob_pcnsl_fold{fold}"]) for row in rows])
        np.testing.assert_allclose(got, single_predictions[fold], rtol=0, atol=1e-6)
    got = np.array([float(row["prob_pcnsl"]) for row in rows])
    np.testing.assert_allclose(got, np.mean(single_predictions, axis=0), rtol=0, atol=1e-6)


def test_split_model_arguments(tmp_path):
    cv_dir = tmp_path / "cv"
    cv_dir.mkdir()
    (cv_dir / "cv.json").write_text("{}")
    assert split_model_arguments(["a.keras", "b.h5", "x.png"], ["y.png"]) == (
        ["a.keras", "b.h5"],
        ["x.png", "y.png"],
    )
    assert split_model_arguments(["m.bin", "x.png"], []) == (["m.bin"], ["x.png"])  # the first is a model
    assert split_model_arguments([str(cv_dir), "scans/"], []) == ([str(cv_dir)], ["scans/"])
    assert split_model_arguments(["a.keras", str(cv_dir), "s"], []) == (["a.keras", str(cv_dir)], ["s"])
    run_dir = tmp_path / "run"  # a single run folder (run.json) is a model too
    run_dir.mkdir()
    (run_dir / "run.json").write_text("{}")
    assert split_model_arguments(["a.keras", str(run_dir), "s"], []) == (["a.keras", str(run_dir)], ["s"])


def test_aggregate_patients_by_hand():
    rows = [
        ("d/gbm/p1/s1.png", 0.2),
        ("d/pcnsl/p2/s1.png", 0.6),
        ("d/gbm/p1/s2.png", 0.45),
        ("d/gbm/p1/s3.png", 0.9),
        ("d/pcnsl/p2/s2.png", 0.1),
        ("d/pcnsl/vol.nii.gz#003", 0.7),
        ("d/pcnsl/vol.nii.gz#004", 0.8),
        ("d/gbm/flat.png", 0.3),
    ]
    assert aggregate_patients(rows, "mean") == [
        ("gbm/p1", 3, pytest.approx((0.2 + 0.45 + 0.9) / 3, abs=1e-15)),
        ("pcnsl/p2", 2, pytest.approx(0.35, abs=1e-15)),
        ("pcnsl/vol", 2, pytest.approx(0.75, abs=1e-15)),
        ("gbm/flat", 1, 0.3),
    ]
    assert [p[2] for p in aggregate_patients(rows, "median")] == [0.45, pytest.approx(0.35), 0.75, 0.3]
    # max: the slice farthest from 0.5, whichever side (0.9 beats 0.2; 0.1 beats 0.6)
    assert [p[2] for p in aggregate_patients(rows, "max")] == [0.9, 0.1, 0.8, 0.3]
    assert [p[0] for p in aggregate_patients(rows)] == [
        patient_id(path) for path in ("d/gbm/p1/a", "d/pcnsl/p2/a", "d/pcnsl/vol.nii.gz#1", "d/gbm/flat.png")
    ]


@pytest.mark.parametrize("aggregate", ["mean", "median", "max"])
def test_per_patient_file_and_lines(members, slices, single_predictions, aggregate, tmp_path, capsys):
    patients_csv = tmp_path / "patients.csv"
    argv = ["--model-weights", str(members[0]), "--aggregate", aggregate, "--per-patient", str(patients_csv)]
    assert step2.main([*argv, *slices]) == 0
    slice_lines = capsys.readouterr().out

    by_patient: dict[str, list[float]] = {}
    for path, prob in zip(slices, single_predictions[0], strict=True):
        parent = Path(path).parent
        by_patient.setdefault(f"{parent.parent.name}/{parent.name}", []).append(prob)
    reduce = {
        "mean": np.mean,
        "median": np.median,
        "max": lambda p: np.asarray(p)[np.argmax(np.abs(np.asarray(p) - 0.5))],
    }[aggregate]
    rows = read_csv(patients_csv)
    assert patients_csv.read_text().splitlines()[0] == "patient_id,n_slices,prob_gbm,prob_pcnsl"
    assert [row["patient_id"] for row in rows] == list(by_patient)
    assert [int(row["n_slices"]) for row in rows] == [3, 3, 3, 3]
    expected = np.array([reduce(probs) for probs in by_patient.values()])
    np.testing.assert_allclose([float(row["prob_pcnsl"]) for row in rows], expected, rtol=0, atol=1e-7)
    np.testing.assert_allclose([float(row["prob_gbm"]) for row in rows], 1 - expected, rtol=0, atol=1e-12)

    # '-': the patient lines follow the slice lines, in the same format.
    assert (
        step2.main(
            ["--model-weights", str(members[0]), "--aggregate", aggregate, "--per-patient", "-", *slices]
        )
        == 0
    )
    lines = capsys.readouterr().out
    patient_lines = "".join(
        expected_line(p, prob) + "\n" for p, prob in zip(by_patient, expected, strict=True)
    )
    assert lines == slice_lines + patient_lines


def test_per_patient_file_needs_overwrite(members, slices, tmp_path, capsys):
    existing = tmp_path / "patients.csv"
    existing.write_text("keep")
    assert step2.main(["--model-weights", str(members[0]), "--per-patient", str(existing), *slices]) == 2
    assert f"--per-patient {existing}: exists" in capsys.readouterr().err
    assert existing.read_text() == "keep"


# ---------------------------------------------------------------------------- step5
@pytest.mark.slow  # the session's step1 model (conftest's trained_run)
def test_step5_ensemble_heatmap_is_the_mean_of_the_members(members, slices, tmp_path):
    """The ensemble's --class pcnsl heatmap is the normalised mean of the members' own
    (gbmpcnsl.gradcam.grad_cam on each member alone, in this process)."""
    from gbmpcnsl.checkpoints import load_model_for_inference
    from gbmpcnsl.gradcam import grad_cam, make_grad_model
    from gbmpcnsl_common import load_image

    images = slices[:2] + slices[-2:]
    models = [load_model_for_inference(member) for member in members]
    size = tuple(models[0].input_shape[1:3])
    pixels = np.stack([load_image(image, size) for image in images]).astype(np.float32)
    first, second = (grad_cam(make_grad_model(model), pixels, "pcnsl")[0].numpy() for model in models)
    output_dir = tmp_path / "both"
    argv = ["--model-weights", *map(str, members), "--output-dir", str(output_dir), "--class", "pcnsl"]
    assert step5.main([*argv, "--save-heatmaps", *images]) == 0
    with np.load(output_dir / HEATMAPS_FILE) as saved:
        both = [saved[Path(image).relative_to(Path(images[0]).parents[2]).as_posix()] for image in images]
        assert len(saved.files) == len(images)
    assert len(list(output_dir.rglob("*.png"))) == len(images)
    differ = 0
    for index, image in enumerate(images):
        mean = (first[index] + second[index]) / 2
        expected = mean / mean.max() if mean.max() > 0 else mean
        np.testing.assert_allclose(both[index], expected, rtol=0, atol=1e-5, err_msg=image)
        differ += not np.allclose(first[index], second[index], atol=1e-3)
    assert differ > 0, "the members' heatmaps should differ somewhere"
