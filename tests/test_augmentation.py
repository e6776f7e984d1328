"""step1's --augmentation strong: the affine transform (a rotated square stays inside, black
fill), the intensity jitter ranges, the fraction of noisy images, determinism per seed, the
command line, and the existing choices unchanged bit for bit."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from helpers import gray_batch, write_h5

import step1_train_model as step1
from gbmpcnsl.augment import StrongAugmentation, affine_transform, augment_image
from gbmpcnsl.config import RESUME_MUST_MATCH
from gbmpcnsl.data import HDF5Images, make_dataset

NOTHING = StrongAugmentation(
    rotation_degrees=0, scale=0, shift=0, contrast=0, brightness=0, gamma=0, noise_std=0, noise_fraction=0
)


def only(**changes) -> StrongAugmentation:
    """Strong augmentation with every step off except flips and `changes`."""
    return dataclasses.replace(NOTHING, **changes)


def augment(images, params=None, seed=(5, 7), augmentation="strong", function=None):
    """augment_image (or `function`) on each image, image i with the seed
    fold_in(seed, i) (as the training stream does), in one tf.data pass."""
    import tensorflow as tf

    function = function or augment_image

    base_seed = tf.constant(seed, tf.int64)
    dataset = tf.data.Dataset.from_tensor_slices(np.asarray(images, np.float32)).enumerate()
    dataset = dataset.map(
        lambda i, image: function(
            image, tf.random.experimental.stateless_fold_in(base_seed, i), augmentation, params
        )
    )
    return next(iter(dataset.batch(len(images)))).numpy()


def transform(image, degrees=0.0, zoom=1.0, shift=(0.0, 0.0)):
    import tensorflow as tf

    return affine_transform(
        tf.constant(image, tf.float32),
        tf.constant(math.radians(degrees)),
        tf.constant(zoom),
        tf.constant(shift, tf.float32),
    ).numpy()


def square(size=32, side=10, value=200.0):
    image = np.zeros((size, size, 3), np.float32)
    start = (size - side) // 2
    image[start : start + side, start : start + side] = value
    return image


# ---------------------------------------------------------------------------- affine
def test_rotated_square_stays_inside_and_turns():
    image = square()
    rotated = transform(image, degrees=45)
    bright = rotated[..., 0] > 100
    rows, cols = np.nonzero(bright)
    # Same area (bilinear edges aside), centred, and a diamond: wider than the square.
    assert bright.sum() == pytest.approx(100, rel=0.15)
    assert rows.mean() == pytest.approx(15.5, abs=0.3) and cols.mean() == pytest.approx(15.5, abs=0.3)
    assert 12 <= np.ptp(rows) + 1 <= 15 and 12 <= np.ptp(cols) + 1 <= 15  # side * sqrt(2) = 14.1
    assert rotated[0].max() == 0 and rotated[:, 0].max() == 0  # nothing reaches the border
    assert np.allclose(transform(image, degrees=90), np.rot90(image), atol=1e-3)  # exact quarter turn


def test_zoom_and_shift_move_and_scale_about_the_centre():
    image = square(side=8)
    zoomed = transform(image, zoom=1.5)[..., 0] > 100
    rows, cols = np.nonzero(zoomed)
    assert np.ptp(rows) + 1 == pytest.approx(12, abs=1) and rows.mean() == pytest.approx(15.5, abs=0.3)
    moved = transform(image, shift=(0.25, -0.125))  # 8 rows down, 4 columns left
    assert np.allclose(moved[8:, :-4], image[:-8, 4:])


def test_black_fill_outside_the_image():
    white = np.full((32, 32, 3), 255.0, np.float32)
    moved = transform(white, shift=(0.0, 0.25))
    assert moved[:, :8].max() == 0 and moved[:, 9:].min() == pytest.approx(255)
    rotated = transform(white, degrees=30)
    assert rotated[0, 0].max() == 0 and rotated[-1, -1].max() == 0  # the corners come from outside
    assert rotated[12:20, 12:20].min() == pytest.approx(255)
    # Through the strong pipeline: every image keeps its black border regions black.
    out = augment(
        np.repeat(square(value=180)[None], 50, axis=0), only(rotation_degrees=30, scale=0.2, shift=0.1)
    )
    assert out[:, 0, :].max() == 0 and out[:, :, 0].max() == 0


def test_strong_pipeline_geometry_varies_within_its_ranges():
    images = np.repeat(square(size=48, side=12)[None], 200, axis=0)
    out = augment(images, only(rotation_degrees=20, scale=0.15, shift=0.1))
    areas = (out[..., 0] > 100).sum(axis=(1, 2))
    assert areas.min() >= 144 * 0.85**2 * 0.85 and areas.max() <= 144 * 1.15**2 * 1.15
    assert areas.std() > 5  # zoom varies
    centres = np.array([np.argwhere(image[..., 0] > 100).mean(axis=0) for image in out])
    assert np.abs(centres - 23.5).max() <= 0.1 * 48 + 1 and centres.std(axis=0).min() > 1.5


# ---------------------------------------------------------------------------- intensity
def test_brightness_contrast_and_gamma_stay_in_their_ranges():
    images = gray_batch(300, size=8, low=40, high=215)  # no clipping at 0 or 255
    flips = lambda image: [image, image[:, ::-1], image[::-1], image[::-1, ::-1]]  # noqa: E731

    out = augment(images, only(brightness=10))
    deltas = []
    for image, result in zip(images, out, strict=True):
        shift = [np.mean(result - c) for c in flips(image) if np.ptp(result - c) < 1e-3]
        assert len(shift) == 1
        deltas.append(shift[0])
    assert np.abs(deltas).max() <= 10 + 1e-3 and np.std(deltas) > 4  # U(-10, 10): std 5.8

    out = augment(images, only(contrast=0.2))
    ratio = out.std(axis=(1, 2, 3)) / images.std(axis=(1, 2, 3))
    assert ratio.min() >= 0.8 - 1e-3 and ratio.max() <= 1.2 + 1e-3 and ratio.std() > 0.08
    assert np.allclose(out.mean(axis=(1, 2, 3)), images.mean(axis=(1, 2, 3)), atol=0.01)

    levels = np.array([0.0, 64.0, 128.0, 255.0], np.float32)
    ramp = np.repeat(np.tile(levels, 2)[None, :, None], 3, axis=-1).reshape(1, 1, 8, 3)
    out = augment(np.repeat(ramp.reshape(1, 1, 8, 3), 300, axis=0).reshape(300, 1, 8, 3), only(gamma=0.3))
    values = np.sort(out[:, 0, :4, 0], axis=1)  # the four levels, whatever the flips
    assert np.all(values[:, 0] == 0) and np.allclose(values[:, 3], 255, atol=1e-3)  # fixed points
    low, high = 255 * (128 / 255) ** 1.3, 255 * (128 / 255) ** 0.7
    assert values[:, 2].min() >= low - 1e-3 and values[:, 2].max() <= high + 1e-3
    assert np.ptp(values[:, 2]) > 0.8 * (high - low)


def test_default_strong_keeps_gray_images_gray_and_in_range():
    images = gray_batch(64, size=16)
    out = augment(images)
    assert out.dtype == np.float32 and out.shape == images.shape
    assert out.min() >= 0 and out.max() <= 255
    assert np.allclose(out[..., 0], out[..., 1]) and np.allclose(out[..., 0], out[..., 2])
    assert not np.allclose(out, images)


def test_noise_on_the_requested_fraction_of_images():
    images = np.full((3000, 8, 8, 3), 128.0, np.float32)
    out = augment(images, only(noise_std=12.75, noise_fraction=0.3))
    per_image_std = out.std(axis=(1, 2, 3))
    noisy = per_image_std > 1.0
    assert 0.27 < noisy.mean() < 0.33, noisy.mean()  # binomial sd 0.008
    assert per_image_std[noisy].mean() == pytest.approx(12.75, rel=0.05)
    assert per_image_std[~noisy].max() < 1e-3
    assert (
        augment(np.full((300, 8, 8, 3), 250.0, np.float32), only(noise_std=30, noise_fraction=1)).max() <= 255
    )


# ---------------------------------------------------------------------------- determinism
def test_same_seed_same_images_other_seed_other_images():
    images = gray_batch(16, size=24)
    first, again = augment(images), augment(images)
    assert np.array_equal(first, again)
    other = augment(images, seed=(5, 8))
    assert not np.array_equal(first, other)
    assert all(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_training_stream_repeats_its_draws_and_a_resumed_epoch_sees_the_same(tmp_path):
    h5_path = write_h5(tmp_path / "d.h5", size=16, patients=(3, 3), slices=2)
    reader = HDF5Images(h5_path, (16, 16))
    labels = np.array([0] * 6 + [1] * 6, np.float32)
    train = np.arange(12)

    def stream(epochs, seed=1):
        dataset = make_dataset(reader, train, labels, 4, "strong", seed, epochs, StrongAugmentation())
        return np.concatenate([x.numpy() for x, _ in dataset])

    full = stream((0, 2))
    assert np.array_equal(full, stream((0, 2)))
    assert np.array_equal(full[12:], stream((1, 2)))  # epoch 1 alone, as after a resume
    assert not np.array_equal(full, stream((0, 2), seed=2))


# ---------------------------------------------------------------------------- the existing choices
def reference_augment(image, seed, augmentation, params=None):
    """The none / base / base_and_noise augmentation as step1 had it before `strong`."""
    import tensorflow as tf

    if augmentation == "none":
        return image
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=5)
    image = tf.image.stateless_random_flip_left_right(image, seeds[0])
    image = tf.image.stateless_random_flip_up_down(image, seeds[1])
    image = tf.image.stateless_random_brightness(image, 2.0, seeds[2])
    image = tf.clip_by_value(image, 0.0, 255.0)
    image = tf.image.stateless_random_hue(image / 255.0, 0.25, seeds[3]) * 255.0
    if augmentation == "base_and_noise":
        noise_seeds = tf.random.experimental.stateless_split(seeds[4], num=2)
        image = tf.cond(
            tf.random.stateless_uniform([], noise_seeds[0]) < 0.1,
            lambda: image + tf.random.stateless_normal(tf.shape(image), noise_seeds[1], stddev=12.75),
            lambda: image,
        )
    return tf.clip_by_value(image, 0.0, 255.0)


@pytest.mark.parametrize("augmentation", ["none", "base", "base_and_noise"])
def test_existing_choices_unchanged_bit_for_bit(augmentation):
    rng = np.random.default_rng(3)
    images = rng.uniform(0, 255, (200, 8, 8, 3)).astype(np.float32)  # colour: hue matters
    out = augment(images, StrongAugmentation(rotation_degrees=40), augmentation=augmentation)
    expected = augment(images, augmentation=augmentation, function=reference_augment)
    assert np.array_equal(out, expected)


# ---------------------------------------------------------------------------- command line
def test_strong_flags_parse_with_defaults_and_checks(capsys, step1_config):
    config = step1_config(
        ["--augmentation", "strong", "--rotation-degrees", "25", "--noise-fraction", "0.5", "a", "b"]
    )
    params = config.strong
    assert params == dataclasses.replace(StrongAugmentation(), rotation_degrees=25, noise_fraction=0.5)
    for name in ("rotation_degrees", "scale", "shift", "contrast", "gamma", "noise_std", "noise_fraction"):
        assert name in RESUME_MUST_MATCH
    for flag, value in (("--scale", "1"), ("--noise-fraction", "1.5"), ("--rotation-degrees", "-1")):
        with pytest.raises(SystemExit) as exit_info:
            step1.main(["--augmentation", "strong", flag, value, "a.h5", "run"])
        assert exit_info.value.code == 2
        assert f"argument {flag}: {value}: expected" in capsys.readouterr().err
