"""step2_predict.py: output lines and CSV, batching, folders, bad images, checkpoint kinds.

Predictions are checked against the model's own one-image-at-a-time `model.predict`,
computed here independently of step2's pipeline, on demo images. Most tests use a tiny
EfficientNetB0 (64x64) whose probabilities spread over (0, 1); one test reads the
session's step1 checkpoint (.keras) and its run.json; the Ctrl-C test (a real SIGINT)
uses conftest's tiny_b0. Legacy tf.keras 2.x files: test_checkpoints.py.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import last_line, read_until, send_ctrl_c
from PIL import Image

import step2_predict as step2
from gbmpcnsl.predictors import result_line

ROOT = Path(__file__).resolve().parent.parent

REPO = Path(__file__).resolve().parents[1]
SIZE = 64


def reference_prob_pcnsl(model, paths, flips=((False, False),)) -> np.ndarray:
    """P(PCNSL) per image, one predict call per image (the original's way), averaged over flips."""
    from gbmpcnsl.checkpoints import model_input_size
    from gbmpcnsl_common import load_image

    probs = []
    for path in paths:
        image = load_image(path, model_input_size(model)).astype(np.float32)
        per_flip = []
        for left_right, up_down in flips:
            flipped = image[:, ::-1] if left_right else image
            flipped = flipped[::-1] if up_down else flipped
            per_flip.append(float(model.predict(np.ascontiguousarray(flipped)[None], verbose=0)[0, 0]))
        probs.append(np.mean(per_flip))
    return np.array(probs)


def expected_line(path: str, prob_pcnsl: float) -> str:
    if prob_pcnsl > 0.5:
        return f"{str(path):<40} {100 * prob_pcnsl:.2f} % PCNSL"
    return f"{str(path):<40} {100 * (1 - prob_pcnsl):.2f} % GBM"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def tiny_run(tiny_b0_models) -> Path:
    """The session's tiny EfficientNetB0 at 64x64 (conftest): tiny.keras, tiny.weights.h5
    and run.json, its P(PCNSL) clearly different between the demo slices."""
    return tiny_b0_models(SIZE)


@pytest.fixture(scope="module")
def checkpoint(tiny_run) -> Path:
    return tiny_run / "tiny.keras"


@pytest.fixture(scope="module")
def model(checkpoint):
    import keras

    return keras.saving.load_model(checkpoint, compile=False)


@pytest.fixture(scope="module")
def slices(demo_data) -> list[str]:
    """Eight demo slices of both classes, as relative-looking strings the user might type."""
    paths = sorted(demo_data.glob("gbm/*/*.png"))[:4] + sorted(demo_data.glob("pcnsl/*/*.png"))[:4]
    return [str(path) for path in paths]


# ---------------------------------------------------------------------------- interface
def test_stdout_lines_and_csv_match_per_image_predict(checkpoint, model, slices, tmp_path, capsys):
    csv_path = tmp_path / "predictions.csv"
    assert step2.main(["--model-weights", str(checkpoint), "--csv", str(csv_path), *slices]) == 0
    captured = capsys.readouterr()

    expected = reference_prob_pcnsl(model, slices)
    assert captured.out == "".join(
        expected_line(p, prob) + "\n" for p, prob in zip(slices, expected, strict=True)
    )
    assert str(checkpoint) in captured.err  # logs go to stderr

    rows = read_csv(csv_path)
    assert csv_path.read_text().splitlines()[0] == "path,prob_gbm,prob_pcnsl"
    assert [row["path"] for row in rows] == slices
    prob_pcnsl = np.array([float(row["prob_pcnsl"]) for row in rows])
    prob_gbm = np.array([float(row["prob_gbm"]) for row in rows])
    np.testing.assert_allclose(prob_pcnsl, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(prob_gbm, 1 - prob_pcnsl, rtol=0, atol=1e-12)
    # Full precision: the text round-trips to the model's float32 output, not a rounded one.
    for row in rows:
        assert float(np.float32(row["prob_pcnsl"])) == float(row["prob_pcnsl"])
        assert row["prob_pcnsl"] == repr(float(row["prob_pcnsl"]))
    assert len(set(prob_pcnsl)) == len(slices)  # distinct images, distinct numbers


def test_result_line_format():
    assert result_line("a.png", 0.75) == "a.png" + " " * 35 + " 75.00 % PCNSL"
    assert result_line("b.png", 0.25) == "b.png" + " " * 35 + " 75.00 % GBM"
    assert result_line("tie.png", 0.5) == "tie.png" + " " * 33 + " 50.00 % GBM"  # as the original
    long_path = "x" * 45 + ".png"
    assert result_line(long_path, 0.999949) == long_path + " 99.99 % PCNSL"


@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_batches_equal_one_image_at_a_time(checkpoint, model, slices, batch_size, tmp_path, capsys):
    csv_path = tmp_path / "batched.csv"
    argv = ["--model-weights", str(checkpoint), "--batch-size", str(batch_size), "--csv", str(csv_path)]
    assert step2.main([*argv, *slices[:7]]) == 0
    prob_pcnsl = [float(row["prob_pcnsl"]) for row in read_csv(csv_path)]
    np.testing.assert_allclose(prob_pcnsl, reference_prob_pcnsl(model, slices[:7]), rtol=0, atol=1e-6)


def test_tta_averages_the_four_training_flips(checkpoint, model, slices, tmp_path):
    csv_path = tmp_path / "tta.csv"
    assert step2.main(["--model-weights", str(checkpoint), "--tta", "--csv", str(csv_path), *slices[:3]]) == 0
    prob_pcnsl = [float(row["prob_pcnsl"]) for row in read_csv(csv_path)]
    flips = ((False, False), (True, False), (False, True), (True, True))
    np.testing.assert_allclose(prob_pcnsl, reference_prob_pcnsl(model, slices[:3], flips), rtol=0, atol=1e-6)
    plain = reference_prob_pcnsl(model, slices[:3])
    assert np.abs(np.array(prob_pcnsl) - plain).max() > 1e-5  # the flips did change something


# ---------------------------------------------------------------------------- inputs
def test_folders_expand_recursively_sorted_and_files_stay_as_typed(
    checkpoint, model, demo_data, tmp_path, capsys, monkeypatch
):
    source = sorted(demo_data.glob("pcnsl/*/*.png"))
    folder = tmp_path / "scans"
    for relative, index in [
        ("b/2.PNG", 0),
        ("b/10.jpg", 1),
        ("a.png", 2),
        ("b/sub/z.tif", 3),
        (".hidden.png", 4),
    ]:
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.open(source[index]).save(folder / relative)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".cache").mkdir()
    shutil.copy(source[5], folder / ".cache" / "x.png")
    monkeypatch.chdir(tmp_path)

    assert step2.main(["--model-weights", str(checkpoint), "./scans/a.png", "scans/"]) == 0
    shown = [line[:40].rstrip() for line in capsys.readouterr().out.splitlines()]
    assert shown == ["./scans/a.png", "scans/a.png", "scans/b/10.jpg", "scans/b/2.PNG", "scans/b/sub/z.tif"]


def test_missing_image_path_and_empty_folder_fail_before_loading(checkpoint, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for argument, message in [
        (tmp_path / "nope.png", "no such file or folder"),
        (tmp_path / "empty", "folder holds no images"),
    ]:
        assert step2.main(["--model-weights", str(checkpoint), str(argument)]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {argument}: {message}")


def test_bad_images_are_reported_and_the_others_predicted(checkpoint, model, slices, tmp_path, capsys):
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(slices[0]).read_bytes()[:200])
    not_an_image = tmp_path / "text.png"
    not_an_image.write_text("hello")
    csv_path = tmp_path / "out.csv"
    inputs = [slices[0], str(truncated), slices[1], str(not_an_image), slices[2]]

    argv = ["--model-weights", str(checkpoint), "--batch-size", "2", "--csv", str(csv_path)]
    assert step2.main([*argv, *inputs]) == 1
    captured = capsys.readouterr()
    expected = reference_prob_pcnsl(model, slices[:3])
    assert captured.out == "".join(
        expected_line(p, prob) + "\n" for p, prob in zip(slices[:3], expected, strict=True)
    )
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2
    assert errors[0].startswith(f"error: {truncated}: cannot read image")
    assert errors[1].startswith(f"error: {not_an_image}: cannot read image")
    assert "Traceback" not in captured.err
    assert [row["path"] for row in read_csv(csv_path)] == slices[:3]


def test_existing_csv_needs_overwrite(checkpoint, slices, tmp_path, capsys):
    csv_path = tmp_path / "out.csv"
    csv_path.write_text("keep me\n")
    argv = ["--model-weights", str(checkpoint), "--csv", str(csv_path), slices[0]]
    assert step2.main(argv) == 2
    assert (
        capsys.readouterr().err.strip() == f"error: --csv {csv_path}: exists (use --overwrite to replace it)"
    )
    assert csv_path.read_text() == "keep me\n"
    assert step2.main([*argv, "--overwrite"]) == 0
    assert len(read_csv(csv_path)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]  # no temporary file left behind


# ---------------------------------------------------------------------------- checkpoints
def test_keras_and_weights_h5_checkpoints_give_the_same_predictions(tiny_run, model, slices, tmp_path):
    expected = reference_prob_pcnsl(model, slices[:3])
    for checkpoint in [tiny_run / "tiny.keras", tiny_run / "tiny.weights.h5"]:
        csv_path = tmp_path / f"{checkpoint.name}.csv"
        assert step2.main(["--model-weights", str(checkpoint), "--csv", str(csv_path), *slices[:3]]) == 0
        prob_pcnsl = [float(row["prob_pcnsl"]) for row in read_csv(csv_path)]
        np.testing.assert_allclose(prob_pcnsl, expected, rtol=0, atol=1e-6)


def test_step1_checkpoint_and_run_json(trained_checkpoint, trained_run, slices, tmp_path):
    """step1's own files: its .keras checkpoint, weights saved beside its run.json, and the
    run folder itself (run.json's best checkpoint)."""
    import keras

    run = json.loads((trained_run / "run.json").read_text())
    assert run["backbone"] == "efficientnetb0" and run["input_shape"] == [64, 64, 3]
    step1_model = keras.saving.load_model(trained_checkpoint, compile=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(trained_run / "run.json", run_dir / "run.json")
    step1_model.save_weights(run_dir / "best.weights.h5")
    expected = reference_prob_pcnsl(step1_model, slices[:2])
    for checkpoint in [trained_checkpoint, run_dir / "best.weights.h5", trained_run]:  # a run: its best
        csv_path = tmp_path / f"{checkpoint.name}.csv"
        assert step2.main(["--model-weights", str(checkpoint), "--csv", str(csv_path), *slices[:2]]) == 0
        prob_pcnsl = [float(row["prob_pcnsl"]) for row in read_csv(csv_path)]
        np.testing.assert_allclose(prob_pcnsl, expected, rtol=0, atol=1e-6)


def test_weights_h5_without_run_json_is_a_one_line_error(model, slices, tmp_path, capsys):
    model.save_weights(tmp_path / "lonely.weights.h5")
    assert step2.main(["--model-weights", str(tmp_path / "lonely.weights.h5"), slices[0]]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == (
        f"error: {tmp_path / 'lonely.weights.h5'}: a .weights.h5 file needs the run.json of its training run beside it"
    )


def test_unknown_files_are_one_line_errors(demo_h5, slices, tmp_path, capsys):
    import h5py

    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    fake_keras = tmp_path / "fake.keras"
    fake_keras.write_text("not a zip")
    empty_h5 = tmp_path / "other.h5"
    with h5py.File(empty_h5, "w") as h5file:
        h5file["x"] = np.zeros(3)
    cases = [
        (notes, "unknown checkpoint type; expected a .keras model from step1"),
        (fake_keras, "cannot load model ("),
        (demo_h5, "an HDF5 file without Keras layer weights (is it step0's image file?)"),
        (empty_h5, "an HDF5 file without Keras layer weights"),
        (Path(slices[0]), "unknown checkpoint type"),
    ]
    for checkpoint, message in cases:
        assert step2.main(["--model-weights", str(checkpoint), slices[0]]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1, captured.err
        assert lines[0].startswith(f"error: {checkpoint}: ") and message in lines[0]


def test_non_image_model_is_rejected(tmp_path, slices, capsys):
    import keras

    inputs = keras.Input((5,))
    keras.Model(inputs, keras.layers.Dense(2)(inputs)).save(tmp_path / "tabular.keras")
    assert step2.main(["--model-weights", str(tmp_path / "tabular.keras"), slices[0]]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: {tmp_path / 'tabular.keras'}: expected a model from (H, W, 3) images")


# ---------------------------------------------------------------------------- interruptions
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.slow  # a TensorFlow subprocess or two
def test_ctrl_c_in_step2_exits_130_without_a_csv(tiny_b0, tmp_path, processes):
    """A real SIGINT once the first result line is out; 20000 inputs cannot be done first
    (an uninterrupted run would exit 0 and fail the exit-code assertion)."""
    images = tmp_path / "images"
    images.mkdir()
    for index in range(20000):  # hard links: a big folder in a second, not a long command line
        os.link(tiny_b0 / "images" / "s0.png", images / f"s{index:05d}.png")
    csv_path = tmp_path / "out" / "predictions.csv"
    csv_path.parent.mkdir()
    command = [sys.executable, "step2_predict.py", "--model-weights", str(tiny_b0 / "tiny.keras")]
    process = processes.popen(
        [*command, "--csv", str(csv_path), str(images)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The first batch's lines (at least one whole line) on stdout.
    first_lines = read_until(process.stdout, lambda out: b"\n" in out, timeout=240).decode()
    assert first_lines.startswith(str(images)), first_lines
    send_ctrl_c(process)
    out, err = process.communicate(timeout=120)
    out = first_lines + out
    assert process.returncode == 130, f"exit {process.returncode}: {err[-2000:]}"
    assert last_line(err) == "interrupted" and "Traceback" not in err
    assert len(out.splitlines()) < 20000
    assert list(csv_path.parent.iterdir()) == []
