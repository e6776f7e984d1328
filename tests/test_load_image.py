"""load_image: bit-identical to the original PIL pipeline for 8-bit images, windowed for
16-bit / float images, and a one-line UserError naming any file it cannot read."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gbmpcnsl_common import UserError, load_image

SIZE = (24, 40)  # (H, W): not square, so a swapped H/W shows


def reference(path, size=SIZE) -> np.ndarray:
    """The original implementation's preprocessing."""
    height, width = size
    return np.asarray(Image.open(path).convert("RGB").resize((width, height), Image.LANCZOS))


def rgb_test_image() -> Image.Image:
    """A 53x37 RGB image with gradients, edges and noise (JPEG and LANCZOS both show)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:37, 0:53]
    pixels = np.stack([x * 4, y * 6, (x + y) * 3], axis=-1) + rng.integers(0, 40, (37, 53, 3))
    pixels[10:20, 15:30] = 255
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


EIGHT_BIT_CASES = {
    "rgb.jpg": lambda im: (im, {}),
    "rgb.png": lambda im: (im, {}),
    "gray.png": lambda im: (im.convert("L"), {}),
    "gray.jpeg": lambda im: (im.convert("L"), {}),
    "palette.png": lambda im: (im.quantize(16), {}),
    "rgba.png": lambda im: (
        Image.merge("RGBA", (*im.split(), Image.linear_gradient("L").resize(im.size))),
        {},
    ),
    "la.png": lambda im: (im.convert("LA"), {}),
    "cmyk.jpg": lambda im: (im.convert("CMYK"), {}),
    "cmyk.tif": lambda im: (im.convert("CMYK"), {}),
    "rgb.bmp": lambda im: (im, {}),
    "rgb.tiff": lambda im: (im, {"compression": "tiff_lzw"}),
    "upper.PNG": lambda im: (im, {}),
    "upper.JPG": lambda im: (im.convert("L"), {}),
}


@pytest.mark.parametrize("name", sorted(EIGHT_BIT_CASES))
def test_eight_bit_images_match_the_original_pipeline(tmp_path, name):
    image, options = EIGHT_BIT_CASES[name](rgb_test_image())
    path = tmp_path / name
    image.save(path, **options)
    with Image.open(path) as saved:
        assert saved.mode == image.mode  # the file really holds the mode under test
    pixels = load_image(path, SIZE)
    assert pixels.dtype == np.uint8 and pixels.shape == (*SIZE, 3)
    np.testing.assert_array_equal(pixels, reference(path))


def test_accepts_str_paths_and_default_size(tmp_path):
    path = tmp_path / "rgb.png"
    rgb_test_image().save(path)
    pixels = load_image(str(path))
    assert pixels.shape == (380, 380, 3)
    np.testing.assert_array_equal(pixels, reference(path, (380, 380)))


def expected_window(values: np.ndarray) -> np.ndarray:
    """0.5-99.5 percentile window to 0-255, as the issue specifies."""
    low, high = np.percentile(values, [0.5, 99.5])
    return np.clip(np.rint((values - low) / (high - low) * 255), 0, 255)


@pytest.mark.parametrize(
    ("name", "mode", "values"),
    [
        # A 12-bit MRI export in a 16-bit PNG: the original turns most of it white.
        ("mri16.png", "I;16", np.tile(np.linspace(0, 4000, 64), (32, 1)).astype(np.uint16)),
        # Full 16-bit range with a few hot pixels that the window must ignore.
        ("hot16.png", "I;16", np.tile(np.linspace(1000, 60000, 64), (32, 1)).astype(np.uint16)),
        ("int32.tif", "I", np.tile(np.linspace(-500, 3000, 64), (32, 1)).astype(np.int32)),
        ("float.tif", "F", np.tile(np.linspace(-1.5, 2.5, 64), (32, 1)).astype(np.float32)),
    ],
)
def test_high_bit_depth_images_are_windowed_not_clipped(tmp_path, name, mode, values):
    if name == "hot16.png":
        values[0, :3] = 65535
    path = tmp_path / name
    Image.fromarray(values).save(path)
    with Image.open(path) as saved:
        assert saved.mode == mode
    if mode == "I;16":  # the bug being fixed: the original pipeline clips at 255
        assert np.mean(reference(path, values.shape) == 255) > 0.9
    pixels = load_image(path, values.shape)  # same size: LANCZOS leaves the pixels as they are
    assert pixels.shape == (*values.shape, 3)
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])
    assert np.abs(pixels[..., 0].astype(int) - expected_window(values.astype(float))).max() <= 1
    assert np.mean(pixels == 255) < 0.05 and np.mean(pixels == 0) < 0.05
    assert pixels[:, 0].mean() < 10 and pixels[:, -1].mean() > 245  # the gradient survives
    # Resized: a monotonic gradient stays monotonic and spans the range.
    resized = load_image(path, (16, 20))[8, :, 0].astype(int)
    assert np.all(np.diff(resized) >= 0) and resized[0] < 20 and resized[-1] > 235


def test_constant_high_bit_depth_image_does_not_divide_by_zero(tmp_path):
    path = tmp_path / "flat16.png"
    Image.fromarray(np.full((8, 8), 1234, dtype=np.uint16)).save(path)
    pixels = load_image(path, (8, 8))
    assert pixels.shape == (8, 8, 3) and len(np.unique(pixels)) == 1


@pytest.mark.parametrize("name", ["cut.png", "cut.jpg", "cut.tif"])
def test_truncated_file_raises_user_error_naming_it(tmp_path, name):
    path = tmp_path / name
    rgb_test_image().resize((200, 200)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cut") as error:
        load_image(path, SIZE)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("content", [b"", b"this is not an image\n", b"\x89PNG\r\n\x1a\n garbage"])
def test_not_an_image_raises_user_error(tmp_path, content):
    path = tmp_path / "fake.png"
    path.write_bytes(content)
    with pytest.raises(UserError, match="fake.png"):
        load_image(path, SIZE)


def test_missing_file_raises_user_error(tmp_path):
    with pytest.raises(UserError, match="nothere.png"):
        load_image(tmp_path / "nothere.png", SIZE)


def test_decompression_bomb_limit_stays_on(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    rgb_test_image().save(path)  # 53 x 37 = 1961 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 900)  # > 2x the limit: PIL refuses it
    with pytest.raises(UserError, match="big.png"):
        load_image(path, SIZE)
