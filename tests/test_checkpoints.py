"""gbmpcnsl.checkpoints' legacy loader: paper-era tf.keras 2.x .hdf5/.h5 files of the
original architecture, read through step2.

tf-keras (requirements-dev.txt) builds the original model (EfficientNetB4 -> average
pooling -> Dropout -> Dense(1, sigmoid)) with weights=None, perturbs all its weights and
saves it as the original's ModelCheckpoint did; conftest's legacy_checkpoints writes every
such file in one subprocess (original_tf_keras.py), because tf-keras and Keras 3 do not
share a process well. step2 must reproduce tf-keras's own one-image-at-a-time predictions
within 1e-5.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

import step2_predict as step2


def step2_prob_pcnsl(checkpoint: Path, images: list[str], csv_path: Path, capsys) -> np.ndarray:
    assert step2.main(["--model-weights", str(checkpoint), "--csv", str(csv_path), *images]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.rsplit(" ", 3)[0].rstrip() for line in lines] == images
    with open(csv_path, newline="") as file:
        return np.array([float(row["prob_pcnsl"]) for row in csv.DictReader(file)])


@pytest.mark.slow
@pytest.mark.timeout(660)  # the legacy_checkpoints fixture's tf-keras subprocess
def test_paper_era_hdf5_model_and_weights_reproduce_tf_keras(legacy_checkpoints, tmp_path, capsys):
    """EfficientNetB4 at 380x380, saved with model.save("x.hdf5") and save_weights("w.h5")."""
    out_dir, images, expected = legacy_checkpoints["b4_380"]
    assert expected.max() - expected.min() > 0.1  # the images get clearly different numbers
    for name in ["model.hdf5", "weights.h5"]:
        prob_pcnsl = step2_prob_pcnsl(out_dir / name, images, tmp_path / f"{name}.csv", capsys)
        np.testing.assert_allclose(prob_pcnsl, expected, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(660)  # the legacy_checkpoints fixture's tf-keras subprocess
def test_tf29_imagenet_graph_scaling_is_folded(tf_keras_b0_checkpoint, tmp_path, capsys):
    """A model built by tf.keras >= 2.9 with weights="imagenet" has an extra scaling op after
    Normalization (tensorflow issue 49930); the loader finds it in the saved config, and the
    input size (64x64 here) too. (The op is the same in every EfficientNet; B4 itself is
    test_paper_era_hdf5_model_and_weights_reproduce_tf_keras's.)"""
    import keras

    from gbmpcnsl.model import build_model
    from gbmpcnsl_common import load_image

    out_dir, images, expected = tf_keras_b0_checkpoint
    checkpoint = out_dir / "model.hdf5"
    prob_pcnsl = step2_prob_pcnsl(checkpoint, images, tmp_path / "tf26.csv", capsys)
    np.testing.assert_allclose(prob_pcnsl, expected, rtol=0, atol=1e-5)

    # Without the fold the same weights give other numbers: the test can tell.
    plain = build_model("efficientnetb0", (64, 64, 3), weights=None)
    plain.load_weights(checkpoint)
    batch = np.stack([load_image(path, (64, 64)) for path in images]).astype(np.float32)
    assert np.abs(plain.predict(batch, verbose=0)[:, 0] - expected).max() > 1e-3
    keras.backend.clear_session()


def test_keras3_h5_full_model_of_another_backbone(demo_data, tmp_path, capsys):
    """A Keras 3 model.save("x.h5") (legacy HDF5 layout): backbone and size come from the file."""
    from gbmpcnsl.checkpoints import load_model_for_inference, model_input_size
    from gbmpcnsl.model import build_model

    model = build_model("efficientnetb0", (48, 48, 3), weights=None)
    model.get_layer("logit").set_weights([np.full((1280, 1), 0.01, np.float32), np.array([0.2], np.float32)])
    model.save(tmp_path / "b0.h5")
    loaded = load_model_for_inference(tmp_path / "b0.h5")
    assert model_input_size(loaded) == (48, 48)
    assert loaded.get_layer("top_conv").kernel.shape[-1] == 1280
    batch = np.random.default_rng(0).uniform(0, 255, (2, 48, 48, 3)).astype(np.float32)
    np.testing.assert_allclose(
        loaded.predict(batch, verbose=0), model.predict(batch, verbose=0), rtol=0, atol=1e-6
    )


@pytest.mark.slow
@pytest.mark.timeout(660)  # the legacy_checkpoints fixture's tf-keras subprocess
def test_tf29_imagenet_graph_weights_only_file_is_folded_too(tf_keras_b0_checkpoint):
    """A weights-only .h5 of tf-keras's weights="imagenet" graph lists the extra scaling op
    in its layer_names: the loader folds it in (as for full-model files) and gives
    tf-keras's own numbers (the full model.hdf5: the test above)."""
    import keras

    from gbmpcnsl.checkpoints import _legacy_model_info, load_model_for_inference
    from gbmpcnsl.model import IMAGENET_STDDEV_RGB, build_model
    from gbmpcnsl_common import load_image

    out_dir, images, expected = tf_keras_b0_checkpoint
    assert expected.max() - expected.min() > 0.1
    info = _legacy_model_info(out_dir / "weights.h5")
    assert info["backbone"] == "efficientnetb0" and info["input_shape"] == (380, 380, 3)
    np.testing.assert_allclose(info["extra_scale"], 1 / np.sqrt(IMAGENET_STDDEV_RGB), rtol=1e-6)
    loaded = load_model_for_inference(out_dir / "weights.h5")  # a weights-only file: 380x380
    batch = np.stack([load_image(path, (64, 64)) for path in images]).astype(np.float32)
    at_64 = build_model("efficientnetb0", (64, 64, 3), weights=None)  # same weights, the file's size
    at_64.set_weights(loaded.get_weights())
    at_64.get_layer(next(n.name for n in at_64.layers if n.name.startswith("normalization"))).finalize_state()
    np.testing.assert_allclose(at_64.predict(batch, verbose=0)[:, 0], expected, rtol=0, atol=1e-5)
    # Without the fold the same weights give other numbers: the test can tell.
    plain = build_model("efficientnetb0", (64, 64, 3), weights=None)
    plain.load_weights(out_dir / "weights.h5")
    assert np.abs(plain.predict(batch, verbose=0)[:, 0] - expected).max() > 1e-3
    keras.backend.clear_session()


@pytest.mark.slow
@pytest.mark.timeout(660)  # the legacy_checkpoints fixture's tf-keras subprocess
def test_find_scale_parses_the_saved_op(tf_keras_b0_checkpoint):
    """_find_scale reads the constant of the op tf-keras really saved (tf.math.multiply by
    1/sqrt(stddev)), not its fallback; a truediv by y is a scale of 1/y; Rescaling: its scale."""
    import json

    import h5py

    from gbmpcnsl.checkpoints import _find_scale
    from gbmpcnsl.model import IMAGENET_STDDEV_RGB

    with h5py.File(tf_keras_b0_checkpoint[0] / "model.hdf5", "r") as h5file:
        layers = json.loads(h5file.attrs["model_config"])["config"]["layers"]
    names = [layer["name"] for layer in layers]
    scaling = layers[names.index("stem_conv_pad") - 1]
    assert scaling["class_name"] == "TFOpLambda" and scaling["config"]["function"] == "math.multiply"
    np.testing.assert_allclose(np.ravel(_find_scale(scaling)), 1 / np.sqrt(IMAGENET_STDDEV_RGB), rtol=1e-6)

    truediv = json.loads(json.dumps(scaling))
    truediv["config"]["function"] = "math.truediv"
    truediv["inbound_nodes"][0][3]["y"] = [[[[2.0, 4.0, 5.0]]]]
    np.testing.assert_allclose(np.ravel(_find_scale(truediv)), [0.5, 0.25, 0.2])
    rescaling = {"class_name": "Rescaling", "config": {"scale": [0.5, 0.25, 2.0], "offset": 0.0}}
    np.testing.assert_allclose(np.ravel(_find_scale(rescaling)), [0.5, 0.25, 2.0])
    assert (
        _find_scale({"class_name": "TFOpLambda", "config": {"function": "math.add"}, "inbound_nodes": []})
        is None
    )
