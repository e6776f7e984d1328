"""Augmentation of one training image inside tf.data: none, base, base_and_noise, strong.

Every function is a pure function of its seed (a shape-[2] integer tensor), so an epoch's
draws are the same whether or not the run was resumed. TensorFlow is imported lazily.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

AUGMENTATIONS = ("none", "base", "base_and_noise", "strong")
# Augmentation parameters, on the 0-255 scale (the paper ran brightness with max_delta=2 on
# 0-255 floats, so it moves a pixel by at most 2 grey levels).
BRIGHTNESS_MAX_DELTA = 2.0
HUE_MAX_DELTA = 0.25
NOISE_STD = 0.05 * 255.0  # 12.75 grey levels
NOISE_FRACTION = 0.10


@dataclass(frozen=True)
class StrongAugmentation:
    """Parameters of --augmentation strong (defaults = step1's defaults).

    rotation_degrees: rotation by U(-r, r) degrees about the image centre.
    scale: isotropic zoom by a factor U(1 - s, 1 + s).
    shift: translation by U(-t, t) of the image height / width, along each axis.
    contrast: (image - its mean) * U(1 - c, 1 + c) + mean.
    brightness: + U(-b, b) grey levels.
    gamma: 255 * (image / 255) ** U(1 - g, 1 + g).
    noise_std, noise_fraction: Gaussian noise of this std (grey levels) on this fraction of
    the images.
    """

    rotation_degrees: float = 15.0
    scale: float = 0.15
    shift: float = 0.06
    contrast: float = 0.2
    brightness: float = 10.0
    gamma: float = 0.2
    noise_std: float = NOISE_STD
    noise_fraction: float = NOISE_FRACTION


def augment_image(image, seed, augmentation: str, strong: StrongAugmentation | None = None):
    """Augment one float32 image (H, W, 3) in 0-255; a pure function of `seed` (a shape-[2]
    integer tensor), so the same seed gives the same image.

    base: left-right and up-down flips (p = 0.5 each), brightness + U(-2, 2) grey levels,
    clip, hue + U(-0.25, 0.25) of a turn of the colour wheel (tf.image.adjust_hue, on the
    image scaled to 0-1; no-op on gray pixels), clip to 0-255.
    base_and_noise: base, then with probability 0.1 Gaussian noise of std 12.75 (0.05 of
    the 0-255 range), clip to 0-255.
    strong: see strong_augment (parameters `strong`, default StrongAugmentation()).
    """
    import tensorflow as tf

    if augmentation == "none":
        return image
    if augmentation == "strong":
        return strong_augment(image, seed, strong or StrongAugmentation())
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=5)
    image = tf.image.stateless_random_flip_left_right(image, seeds[0])
    image = tf.image.stateless_random_flip_up_down(image, seeds[1])
    image = tf.image.stateless_random_brightness(image, BRIGHTNESS_MAX_DELTA, seeds[2])
    image = tf.clip_by_value(image, 0.0, 255.0)
    image = tf.image.stateless_random_hue(image / 255.0, HUE_MAX_DELTA, seeds[3]) * 255.0
    if augmentation == "base_and_noise":
        noise_seeds = tf.random.experimental.stateless_split(seeds[4], num=2)
        image = tf.cond(
            tf.random.stateless_uniform([], noise_seeds[0]) < NOISE_FRACTION,
            lambda: image + tf.random.stateless_normal(tf.shape(image), noise_seeds[1], stddev=NOISE_STD),
            lambda: image,
        )
    return tf.clip_by_value(image, 0.0, 255.0)


def strong_augment(image, seed, params: StrongAugmentation):
    """--augmentation strong on one float32 image (H, W, C) in 0-255, a pure function of
    `seed`: left-right and up-down flips (p = 0.5 each); one affine transform (rotation,
    isotropic zoom, translation; bilinear, black outside the image); gamma, contrast and
    brightness jitter; Gaussian noise (the same in every channel) on a fraction of the
    images; clipped to 0-255."""
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=10)
    uniform = tf.random.stateless_uniform
    image = tf.image.stateless_random_flip_left_right(image, seeds[0])
    image = tf.image.stateless_random_flip_up_down(image, seeds[1])
    angle = uniform([], seeds[2], -1.0, 1.0) * params.rotation_degrees * math.pi / 180.0
    zoom = 1.0 + uniform([], seeds[3], -1.0, 1.0) * params.scale
    shift = uniform([2], seeds[4], -1.0, 1.0) * params.shift
    image = affine_transform(image, angle, zoom, shift)
    # Gamma on the 0-1 scale keeps black black and white white.
    gamma = 1.0 + uniform([], seeds[5], -1.0, 1.0) * params.gamma
    image = 255.0 * tf.pow(tf.clip_by_value(image / 255.0, 0.0, 1.0), gamma)
    if params.contrast > 0:
        image = tf.image.stateless_random_contrast(image, 1 - params.contrast, 1 + params.contrast, seeds[6])
    if params.brightness > 0:
        image = tf.image.stateless_random_brightness(image, params.brightness, seeds[7])
    image = tf.clip_by_value(image, 0.0, 255.0)
    image = tf.cond(
        uniform([], seeds[8]) < params.noise_fraction,
        # One noise value per pixel, the same in every channel: a gray slice stays gray.
        lambda: (
            image
            + tf.random.stateless_normal(tf.shape(image)[:2], seeds[9], stddev=params.noise_std)[..., None]
        ),
        lambda: image,
    )
    return tf.clip_by_value(image, 0.0, 255.0)


def affine_transform(image, angle, zoom, shift):
    """Rotate one image (H, W, C) by `angle` radians about its centre, zoom it by `zoom`
    (> 1 enlarges) and move it by `shift` = (down, right) in fractions of its height and
    width, in one bilinear resampling; black where the output samples outside the image."""
    import tensorflow as tf

    height, width = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
    center_x, center_y = (width - 1) / 2, (height - 1) / 2
    # The transform maps an output pixel (x, y) to the input pixel it samples: the inverse
    # of "rotate and zoom about the centre, then shift".
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    x0 = center_x + shift[1] * width
    y0 = center_y + shift[0] * height
    transform = tf.stack(
        [
            cos,
            -sin,
            center_x - cos * x0 + sin * y0,
            sin,
            cos,
            center_y - sin * x0 - cos * y0,
            0.0,
            0.0,
        ]
    )
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=transform[None],
        output_shape=tf.shape(image)[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )[0]
