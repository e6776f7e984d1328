"""gbmpcnsl.model: the logit initialiser, the ImageNet input scaling against
keras.applications' own graph, and --normalization (tiny EfficientNetB0s, 32x32)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

import step1_train_model as step1
from gbmpcnsl.config import RESUME_MUST_MATCH
from gbmpcnsl.model import IMAGENET_STDDEV_RGB, build_model


def imagenet_like_notop_weights(path: Path, input_shape=(32, 32, 3)) -> Path:
    """An efficientnetb0_notop.h5 in the layout Keras downloads: random weights, with the
    ImageNet mean and stddev in Normalization (the stddev stored as the variance, as in
    Keras's own file: the cause of its extra Rescaling)."""
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    keras.utils.set_random_seed(7)
    backbone = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=input_shape)
    normalization = next(la for la in backbone.layers if isinstance(la, keras.layers.Normalization))
    count = normalization.get_weights()[2]
    normalization.set_weights([np.array([0.485, 0.456, 0.406]), np.array(IMAGENET_STDDEV_RGB), count])
    with h5py.File(path, "w") as h5file:
        legacy_h5_format.save_weights_to_hdf5_group(h5file, backbone)
    return path


def test_logit_kernel_initializer_is_the_originals(step1_config):
    import keras

    model = build_model("efficientnetb0", (32, 32, 3), weights=None)
    initializer = model.get_layer("logit").kernel_initializer
    assert isinstance(initializer, keras.initializers.VarianceScaling)
    config = initializer.get_config()
    assert config["scale"] == pytest.approx(1 / 3)
    assert config["mode"] == "fan_out" and config["distribution"] == "uniform"
    # fan_out of Dense(1) is 1: uniform in +-sqrt(3 * (1/3) / 1) = +-1.
    kernel = model.get_layer("logit").get_weights()[0]
    assert np.abs(kernel).max() <= 1.0 and np.abs(kernel).max() > 0.5
    # --head-init glorot (for training from scratch): Keras's default, +-sqrt(6 / (1280 + 1)).
    glorot = build_model("efficientnetb0", (32, 32, 3), weights=None, head_init="glorot")
    assert isinstance(glorot.get_layer("logit").kernel_initializer, keras.initializers.GlorotUniform)
    limit = np.sqrt(6 / (1280 + 1))
    assert limit / 2 < np.abs(glorot.get_layer("logit").get_weights()[0]).max() <= limit
    assert step1_config(["d.h5", "run"]).head_init == "original"
    assert step1_config(["d.h5", "run", "--head-init", "glorot"]).head_init == "glorot"


def test_imagenet_weights_match_keras_applications_own_graph(tmp_path, monkeypatch):
    """build_model(weights=<notop file>) folds Keras's extra ImageNet Rescaling into the
    Normalization variance: its avg_pool features equal those of keras.applications' own
    weights="imagenet" graph (its download redirected to the same file) within 1e-5 of
    their scale; without the fold (normalization="paper", the TF 2.5 scaling) they do not."""
    import keras
    from keras.src.applications import efficientnet

    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    notop = imagenet_like_notop_weights(tmp_path / "efficientnetb0_notop.h5")
    fetched = []
    monkeypatch.setattr(
        efficientnet.file_utils, "get_file", lambda *args, **kwargs: fetched.append(args) or str(notop)
    )
    reference = keras.applications.EfficientNetB0(
        include_top=False, weights="imagenet", input_shape=(32, 32, 3), pooling="avg"
    )
    assert fetched, "keras.applications did not ask for the ImageNet file"
    rescalings = [layer for layer in reference.layers if isinstance(layer, keras.layers.Rescaling)]
    assert len(rescalings) == 2  # 1/255, then the extra 1/sqrt(stddev)
    expected = reference.predict(images, verbose=0)
    scale = np.abs(expected).max()  # a random backbone's features are small (~1e-6)
    assert scale > 0

    def features(normalization: str) -> np.ndarray:
        model = build_model("efficientnetb0", (32, 32, 3), weights=str(notop), normalization=normalization)
        return keras.Model(model.inputs[0], model.get_layer("avg_pool").output).predict(images, verbose=0)

    assert np.abs(features("imagenet") - expected).max() <= 1e-5 * scale
    assert np.abs(features("paper") - expected).max() > 1e-3 * scale


def test_normalization_paper_is_the_tf25_scaling(tmp_path, step1_config):
    """paper: (x/255 - mean) / sqrt(std) -- the Normalization variance is the file's
    variance; imagenet: variance * stddev, i.e. (x/255 - mean) / std."""
    import keras

    notop = imagenet_like_notop_weights(tmp_path / "efficientnetb0_notop.h5")

    def normalization_variance(model) -> np.ndarray:
        layer = next(la for la in model.layers if isinstance(la, keras.layers.Normalization))
        return layer.get_weights()[1]

    paper = normalization_variance(build_model("efficientnetb0", (32, 32, 3), str(notop), "paper"))
    imagenet = normalization_variance(build_model("efficientnetb0", (32, 32, 3), str(notop), "imagenet"))
    np.testing.assert_allclose(imagenet, paper * np.asarray(IMAGENET_STDDEV_RGB), rtol=1e-6)
    assert not np.allclose(imagenet, paper)
    # Without ImageNet weights there is nothing to scale.
    none = normalization_variance(build_model("efficientnetb0", (32, 32, 3), None, "paper"))
    np.testing.assert_array_equal(
        none, normalization_variance(build_model("efficientnetb0", (32, 32, 3), None))
    )
    assert "normalization" in RESUME_MUST_MATCH
    assert step1_config(["--normalization", "paper", "a.h5", "run"]).normalization == "paper"
    with pytest.raises(SystemExit):
        step1.main(["--normalization", "tf25", "a.h5", "run"])
