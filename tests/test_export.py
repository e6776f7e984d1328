"""step6_export_model.py and step2 on exported models (ONNX Runtime, OpenVINO).

One tiny EfficientNetB0 (32x32, weights=None) with probabilities spread over (0, 1) is
exported once per format; each export is loaded back with its own runtime here, apart from
step6's own check, and compared with the Keras model on demo slices.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import step2_predict as step2
import step6_export_model as step6
from gbmpcnsl import export, quantize

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
EXPORT_FILES = {"saved_model": "saved_model", "onnx": "tiny.onnx", "openvino": "tiny.xml"}


@pytest.fixture(scope="module")
def checkpoint(tiny_b0_models) -> Path:
    """tiny.keras: the session's tiny EfficientNetB0 at 32x32 (conftest), whose P(PCNSL)
    differs clearly between slices."""
    return tiny_b0_models(SIZE) / "tiny.keras"


@pytest.fixture(scope="module")
def model(checkpoint):
    import keras

    return keras.saving.load_model(checkpoint, compile=False)


@pytest.fixture(scope="module")
def exports(checkpoint, tmp_path_factory) -> dict[str, Path]:
    """Each format exported by step6 (in this process), keyed by format."""
    folder = tmp_path_factory.mktemp("exports")
    paths = {}
    for export_format, name in EXPORT_FILES.items():
        paths[export_format] = folder / name
        argv = ["--model-weights", str(checkpoint), "--format", export_format, str(paths[export_format])]
        assert step6.main(argv) == 0
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["saved_model", "tiny.onnx", "tiny.onnx.json", "tiny.xml", "tiny.bin", "tiny.xml.json"]
        + ["tiny.onnx.MODEL_CARD.md", "tiny.xml.MODEL_CARD.md"]
    )  # and no staging folder left behind
    return paths


@pytest.fixture(scope="module")
def slices(demo_data) -> list[str]:
    paths = sorted(demo_data.glob("gbm/*/*.png"))[:4] + sorted(demo_data.glob("pcnsl/*/*.png"))[:4]
    return [str(path) for path in paths]


@pytest.fixture(autouse=True)
def openvino_cache(tmp_path_factory, monkeypatch) -> Path:
    """OpenVINO's compiled-model cache in a temporary folder, not the user's ~/.cache."""
    cache_home = tmp_path_factory.getbasetemp() / "xdg_cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    return cache_home / "gbm-pcnsl" / "openvino"


def slice_images(slices: list[str]) -> np.ndarray:
    from gbmpcnsl_common import load_image

    return np.stack([load_image(path, (SIZE, SIZE)) for path in slices]).astype(np.float32)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def run_with_own_runtime(path: Path, images: np.ndarray) -> np.ndarray:
    """P(PCNSL) from an export, run directly by its runtime (not through step2 or step6)."""
    if path.suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(["prob_pcnsl"], {"images": images})[0]
    if path.suffix == ".xml":
        import openvino

        compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return compiled(images)["prob_pcnsl"]
    import tensorflow as tf

    signatures = tf.saved_model.load(str(path)).signatures
    from_float = signatures["serving_default"](images=tf.constant(images))["prob_pcnsl"].numpy()
    from_uint8 = signatures["serve_uint8"](images=tf.constant(images.astype(np.uint8)))["prob_pcnsl"].numpy()
    np.testing.assert_array_equal(from_float, from_uint8)  # the images hold whole numbers
    return from_float


def assert_same_lines(export_out: str, keras_out: str, keras_prob_pcnsl: list[float]) -> None:
    """The same lines, except where the Keras probability lies within export.TOLERANCE of a
    rounding boundary of the printed percentage (x.xx5 %): there a difference the tolerance
    allows may flip the last digit, and only that digit may differ."""
    export_lines, keras_lines = export_out.splitlines(), keras_out.splitlines()
    assert len(export_lines) == len(keras_lines)
    for export_line, keras_line, prob_pcnsl in zip(export_lines, keras_lines, keras_prob_pcnsl, strict=True):
        if export_line == keras_line:
            continue
        percent = 100 * max(prob_pcnsl, 1 - prob_pcnsl)
        # percent * 100 counts steps of 1e-4 in probability; x.5 is the rounding boundary.
        assert abs((percent * 100) % 1 - 0.5) < export.TOLERANCE / 1e-4, (export_line, keras_line)
        export_percent, keras_percent = float(export_line.split()[-3]), float(keras_line.split()[-3])
        assert abs(export_percent - keras_percent) == pytest.approx(0.01)
        assert export_line.split()[-1] == keras_line.split()[-1]


# ---------------------------------------------------------------------------- step6
@pytest.mark.slow
@pytest.mark.parametrize("export_format", ["saved_model", "onnx", "openvino"])
def test_export_round_trips_and_agrees_with_keras(exports, export_format, checkpoint, model, slices):
    path = exports[export_format]
    images = slice_images(slices)
    expected = model.predict(images, verbose=0)[:, 0]
    assert expected.max() - expected.min() > 0.2  # a model whose outputs differ between slices
    np.testing.assert_allclose(run_with_own_runtime(path, images), expected, rtol=0, atol=export.TOLERANCE)

    metadata_path = path / "gbmpcnsl_model.json" if path.is_dir() else Path(f"{path}.json")
    metadata = json.loads(metadata_path.read_text())
    assert metadata["format"] == export_format
    assert metadata["classes"] == {"GBM": 0, "PCNSL": 1}
    assert metadata["input_size"] == [SIZE, SIZE]
    assert metadata["input"] == {"name": "images", "shape": [None, SIZE, SIZE, 3], "dtype": "float32"}
    assert "LANCZOS" in metadata["preprocessing"] and "0-255" in metadata["preprocessing"]
    assert metadata["source_checkpoint"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert 0 <= metadata["check"]["max_abs_difference"] <= export.TOLERANCE == metadata["check"]["tolerance"]
    # The model card: in the metadata and beside the export (this checkpoint has no split.csv).
    card = (path / "MODEL_CARD.md" if path.is_dir() else Path(f"{path}.MODEL_CARD.md")).read_text()
    assert metadata["intended_use"].startswith("Research tool only: not a medical device")
    assert metadata["intended_use"] in card and "load_slice" in metadata["preprocessing"]
    assert metadata["input_pipeline"]["trained_on"].startswith("not recorded")
    assert f"Input {SIZE} x {SIZE} RGB" in card and metadata["source_checkpoint"]["sha256"] in card
    if export_format == "openvino":  # float32 weights, not openvino's default fp16
        weights = (path.parent / "tiny.bin").stat().st_size
        assert weights > 4 * model.count_params() * 0.9


@pytest.mark.slow
def test_existing_export_is_kept_unless_overwrite(exports, checkpoint, capsys):
    onnx_path = exports["onnx"]
    before = onnx_path.read_bytes()
    assert step6.main(["--model-weights", str(checkpoint), "--format", "onnx", str(onnx_path)]) == 2
    assert capsys.readouterr().err == f"error: {onnx_path}: exists (use --overwrite to replace it)\n"
    assert onnx_path.read_bytes() == before


@pytest.mark.slow
def test_failed_check_leaves_nothing_behind(exports, checkpoint, tmp_path, monkeypatch, capsys):
    """An export that disagrees with Keras is refused in one line, and no file remains."""
    monkeypatch.setattr(export, "write_onnx", lambda model, path: shutil.copy(exports["onnx"], path))
    real_run_export = export.run_export

    def off_by_a_little(path, export_format, images):
        return {
            name: prob + 2 * export.TOLERANCE
            for name, prob in real_run_export(path, export_format, images).items()
        }

    monkeypatch.setattr(export, "run_export", off_by_a_little)
    out = tmp_path / "bad.onnx"
    assert step6.main(["--model-weights", str(checkpoint), "--format", "onnx", str(out)]) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("error: export check failed: onnx differs from the Keras model by 0.0002")
    assert error.endswith("(more than 0.0001) on 4 test images; nothing written")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_deliberate_preprocessing_errors_move_far_beyond_the_tolerance(
    exports, checkpoint, model, slices, tmp_path, monkeypatch, capsys
):
    """The control of export.TOLERANCE: errors a wrong export or preprocessing would make,
    every pixel one grey level brighter or a bilinear resize instead of LANCZOS, move
    P(PCNSL) of the demo slices by at least 10x the tolerance, and step6 refuses an ONNX
    export that is fed its images one grey level off (checked on the demo slices: step6's
    synthetic check images give P(PCNSL) 1.0 on this tiny model, where nothing moves)."""
    from PIL import Image

    images = slice_images(slices)
    bilinear = np.stack(
        [np.asarray(Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)) for path in slices]
    ).astype(np.float32)
    assert not np.array_equal(bilinear, images)
    expected = model.predict(images, verbose=0)[:, 0]
    moves = {
        name: float(np.max(np.abs(model.predict(wrong, verbose=0)[:, 0] - expected)))
        for name, wrong in (("one grey level", images + 1), ("bilinear", bilinear))
    }
    print("largest move of P(PCNSL) on the demo slices:", moves)
    assert all(move >= 10 * export.TOLERANCE for move in moves.values()), moves

    real_run_export = export.run_export
    monkeypatch.setattr(export, "check_images", lambda size, count=export.CHECK_IMAGES: images[:count])
    monkeypatch.setattr(
        export, "run_export", lambda path, fmt, images: real_run_export(path, fmt, images + 1)
    )
    out = tmp_path / "shifted.onnx"
    assert step6.main(["--model-weights", str(checkpoint), "--format", "onnx", str(out)]) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("error: export check failed: onnx differs from the Keras model by ")
    assert float(error.split(" by ")[1].split()[0]) >= 10 * export.TOLERANCE, error
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- step2
@pytest.fixture(scope="module")
def keras_predictions(checkpoint, slices, tmp_path_factory) -> dict[bool, tuple[str, list[dict]]]:
    """step2's stdout and CSV rows on the Keras checkpoint, without and with --tta."""
    results = {}
    for tta in (False, True):
        csv_path = tmp_path_factory.mktemp("keras_csv") / "keras.csv"
        argv = ["--model-weights", str(checkpoint), "--batch-size", "3", "--csv", str(csv_path)]
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            assert step2.main([*argv, *(["--tta"] if tta else []), *slices]) == 0
        results[tta] = (stdout.getvalue(), read_csv(csv_path))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("export_format", ["onnx", "openvino"])
def test_step2_prints_the_keras_checkpoints_lines(
    exports, export_format, keras_predictions, slices, tmp_path, capsys, openvino_cache
):
    for tta in ([], ["--tta"]):
        keras_out, keras_rows = keras_predictions[bool(tta)]
        export_csv = tmp_path / "export.csv"
        argv = ["--batch-size", "3", *tta, "--overwrite"]
        export_argv = ["--model-weights", str(exports[export_format]), "--csv", str(export_csv)]
        assert step2.main([*export_argv, *argv, *slices]) == 0
        captured = capsys.readouterr()
        assert "run by " + {"onnx": "ONNX Runtime", "openvino": "OpenVINO"}[export_format] in captured.err
        export_rows = read_csv(export_csv)
        assert_same_lines(captured.out, keras_out, [float(row["prob_pcnsl"]) for row in keras_rows])
        assert len(keras_out.splitlines()) == len(slices)
        assert [row["path"] for row in export_rows] == slices == [row["path"] for row in keras_rows]
        for column in ("prob_gbm", "prob_pcnsl"):
            np.testing.assert_allclose(
                [float(row[column]) for row in export_rows],
                [float(row[column]) for row in keras_rows],
                rtol=0,
                atol=export.TOLERANCE,
            )
    if export_format == "openvino":  # compiled once, then loaded from the cache
        assert any(path.suffix == ".blob" for path in openvino_cache.glob("*/*"))


@pytest.mark.slow
def test_step2_on_exports_never_imports_tensorflow(exports, slices, openvino_cache):
    code = (
        "import sys, step2_predict\n"
        f"for model in ({str(exports['onnx'])!r}, {str(exports['openvino'])!r}):\n"
        f"    assert step2_predict.main(['--model-weights', model, *{slices[:3]!r}]) == 0\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules, "
        "any(name.startswith(('tensorflow', 'keras', 'tf_keras')) for name in sys.modules))\n"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(openvino_cache.parents[1])}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "False False False"
    assert lines[:3] == lines[3:6] and len(lines) == 7  # ONNX Runtime and OpenVINO agree


@pytest.mark.slow
def test_corrupt_export_gives_one_line_error(exports, slices, tmp_path, capsys):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(exports["onnx"].read_bytes()[:100_000])
    garbage = tmp_path / "garbage.xml"
    garbage.write_text("<net><layers><layer id='0'")
    shutil.copy(exports["openvino"].with_suffix(".bin"), garbage.with_suffix(".bin"))
    for path in (truncated, garbage):
        assert step2.main(["--model-weights", str(path), slices[0]]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith(f"error: {path}: cannot load exported model (")
        assert len(captured.err.splitlines()) == 1


@pytest.mark.slow
def test_mismatched_bin_gives_one_line_error_even_after_caching(exports, slices, tmp_path, capsys):
    """A .bin that does not belong to its .xml is refused, also when the .xml's compiled
    model sits in OpenVINO's cache from an earlier run."""
    xml = tmp_path / "model.xml"
    shutil.copy(exports["openvino"], xml)
    shutil.copy(exports["openvino"].with_suffix(".bin"), xml.with_suffix(".bin"))
    assert step2.main(["--model-weights", str(xml), slices[0]]) == 0  # compiled into the cache
    capsys.readouterr()
    weights = xml.with_suffix(".bin").read_bytes()
    xml.with_suffix(".bin").write_bytes(weights[: len(weights) // 2])
    assert step2.main(["--model-weights", str(xml), slices[0]]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: {xml}: cannot load exported model (")
    assert len(captured.err.splitlines()) == 1
    xml.with_suffix(".bin").unlink()
    assert step2.main(["--model-weights", str(xml), slices[0]]) == 2
    assert capsys.readouterr().err.startswith(f"error: {xml}: cannot load exported model (")


@pytest.mark.parametrize(("suffix", "module"), [(".onnx", "onnxruntime"), (".xml", "openvino")])
def test_missing_runtime_says_what_to_install(suffix, module, demo_data, tmp_path, monkeypatch, capsys):
    model_path = tmp_path / f"model{suffix}"
    model_path.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    image = next(demo_data.glob("gbm/*/*.png"))
    assert step2.main(["--model-weights", str(model_path), str(image)]) == 2
    name = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}[module]
    assert capsys.readouterr().err == (
        f"error: {model_path}: running this model needs {name}, which is not installed "
        f"(pip install -r requirements.txt, or pip install {module})\n"
    )


# ---------------------------------------------------------------------------- --overwrite
def test_overwrite_never_replaces_a_folder_step6_did_not_write(tmp_path, monkeypatch, capsys):
    """--overwrite replaces only a SavedModel with gbmpcnsl_model.json; never `.`."""
    checkpoint = tmp_path / "model.keras"
    checkpoint.write_bytes(b"x")
    out = tmp_path / "out"
    (out / "patients" / "p017").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "patients" / "p017" / "scan.dcm").write_bytes(b"DICM")
    argv = ["--model-weights", str(checkpoint), "--format", "saved_model", "--overwrite"]
    assert step6.main([*argv, str(out)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {out}: not written by this tool (no saved_model.pb and gbmpcnsl_model.json); "
        "--overwrite only replaces this tool's own outputs"
    ]
    assert (out / "patients" / "p017" / "scan.dcm").read_bytes() == b"DICM"
    monkeypatch.chdir(out)
    (out / "saved_model.pb").write_bytes(b"")
    (out / "gbmpcnsl_model.json").write_text("{}")
    assert step6.main([*argv, "."]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: .: --overwrite refuses to replace the current folder or a folder above it"
    ]
    assert (out / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------- --int8
@pytest.fixture(scope="module")
def calibration_h5(demo_data, tmp_path_factory) -> Path:
    """The demo cohort (8 patients per class) converted by step0 at the tiny model's size."""
    import step0_convert_images_to_hdf5 as step0

    h5_path = tmp_path_factory.mktemp("calibration") / "calibration.h5"
    assert step0.main([str(demo_data), str(h5_path), "--size", str(SIZE), str(SIZE)]) == 0
    return h5_path


@pytest.fixture(scope="module")
def int8_export(checkpoint, calibration_h5, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "int8.xml"
    argv = ["--model-weights", str(checkpoint), "--format", "openvino", "--int8"]
    assert step6.main([*argv, "--calibration", str(calibration_h5), "--max-auroc-drop", "1", str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "int8.bin",
        "int8.xml",
        "int8.xml.MODEL_CARD.md",
        "int8.xml.json",
    ]
    return out


@pytest.mark.slow
def test_int8_export_records_the_held_out_check(int8_export, exports, calibration_h5, slices, capsys):
    """The metadata's AUROCs and largest change equal sklearn's on the two models' own
    outputs for the held-out patients; step2 runs the int8 model like any export."""
    from sklearn.metrics import roc_auc_score

    from gbmpcnsl.quantize import read_calibration

    metadata = json.loads(Path(f"{int8_export}.json").read_text())
    report = metadata["int8"]
    assert metadata["weights"].startswith("int8") and "nncf" in metadata["versions"]
    data = read_calibration(calibration_h5, (SIZE, SIZE))
    images = data.held_out.astype(np.float32)
    float_prob = run_with_own_runtime(exports["openvino"], images)  # the same model, float32
    int8_prob = run_with_own_runtime(int8_export, images)
    assert not np.array_equal(float_prob, int8_prob)  # quantized indeed
    assert report["auroc_float"] == pytest.approx(roc_auc_score(data.held_out_labels, float_prob), abs=1e-9)
    assert report["auroc_int8"] == pytest.approx(roc_auc_score(data.held_out_labels, int8_prob), abs=1e-9)
    assert report["auroc_drop"] == pytest.approx(report["auroc_float"] - report["auroc_int8"], abs=1e-12)
    assert report["max_abs_probability_change"] == pytest.approx(
        np.abs(int8_prob - float_prob).max(), abs=1e-6
    )
    assert report["held_out"]["slices"] == len(images) > 0 and report["max_auroc_drop"] == 1
    assert report["calibration"]["patients"] + report["held_out"]["patients"] == 16
    assert report["calibration_file"]["sha256"] == hashlib.sha256(calibration_h5.read_bytes()).hexdigest()

    assert step2.main(["--model-weights", str(int8_export), *slices]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == slices
    expected = run_with_own_runtime(int8_export, slice_images(slices))
    printed = [float(line.split()[-3]) / 100 for line in lines]
    np.testing.assert_allclose(printed, np.maximum(expected, 1 - expected), atol=1e-4)


def test_calibration_slices_spread_across_patients_and_classes():
    from gbmpcnsl.quantize import spread_across_patients

    records = [
        {"label": label, "group": f"{label}/{patient}"}
        for label in (0, 1)
        for patient in "ab"
        for _ in range(5)
    ]
    taken = spread_across_patients(records, np.arange(20), 6)  # each patient's first, then seconds
    assert [records[i]["group"] for i in taken] == ["0/a", "0/a", "0/b", "1/a", "1/a", "1/b"]
    assert sorted(spread_across_patients(records, np.arange(20), 100)) == list(range(20))


@pytest.mark.slow
def test_int8_export_refuses_an_auroc_drop_over_the_bound(
    checkpoint, calibration_h5, tmp_path, capsys, monkeypatch
):
    """The held-out check refuses the export and writes nothing. The float model stands in
    for NNCF's int8 one (a drop of 0, over a bound of -1): the refusal is what is tested
    here, NNCF's quantization is int8_export's."""

    def float_as_int8(float_xml: Path, int8_xml: Path, images) -> None:
        for suffix in (".xml", ".bin"):
            shutil.copyfile(float_xml.with_suffix(suffix), int8_xml.with_suffix(suffix))

    monkeypatch.setattr(quantize, "quantize_openvino", float_as_int8)
    out = tmp_path / "refused.xml"
    argv = ["--model-weights", str(checkpoint), "--format", "openvino", "--int8", "--calibration"]
    assert step6.main([*argv, str(calibration_h5), "--max-auroc-drop", "-1", str(out)]) == 2
    error = capsys.readouterr().err.splitlines()
    assert error[-1].startswith("error: int8 export refused: AUROC on ") and "nothing written" in error[-1]
    assert "(by 0.0000, more than --max-auroc-drop -1)" in error[-1]
    assert list(tmp_path.iterdir()) == []  # no staging folder, no partial export


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--format", "onnx", "--int8", "--calibration", "{h5}"],
            "--int8: only with --format openvino (not onnx)",
        ),
        (["--format", "openvino", "--int8"], "--int8: needs --calibration DATA.h5 (a step0 HDF5 file)"),
        (["--format", "openvino", "--calibration", "{h5}"], "--calibration: only with --int8"),
        (
            ["--format", "openvino", "--int8", "--calibration", "{missing}"],
            "--calibration {missing}: no such file",
        ),
    ],
)
def test_int8_flags_are_checked_before_any_work(tiny_b0, flags, message, tmp_path, capsys):
    h5 = tmp_path / "data.h5"
    h5.write_bytes(b"")
    names = {"h5": h5, "missing": tmp_path / "missing.h5"}
    flags = [flag.format(**names) for flag in flags]
    out = tmp_path / ("model.onnx" if "onnx" in flags else "model.xml")
    assert step6.main(["--model-weights", str(tiny_b0 / "tiny.keras"), *flags, str(out)]) == 2
    assert capsys.readouterr().err == f"error: {message.format(**names)}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.h5"]
