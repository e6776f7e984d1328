"""gbmpcnsl.sources and gbmpcnsl.pixels: DICOM and NIfTI sources through the one loader, checked on files that
pydicom and nibabel wrote, against independent numpy computations of each pixel rule."""

from __future__ import annotations

import make_demo_data
import nibabel as nib
import numpy as np
import pydicom
import pytest
from helpers import write_dicom
from PIL import Image
from pydicom.data import get_testdata_file

from gbmpcnsl.pixels import load_slice
from gbmpcnsl.sources import find_slices, parse_slice_selection
from gbmpcnsl_common import UserError, load_image

# Every MR test file in pydicom's wheel that holds MR_small's pixels in another encoding.
MR_SMALL_VARIANTS = [
    "MR_small.dcm",  # explicit VR little endian
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "MR_small_padded.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_jp2klossless.dcm",
]


def independent_window(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip(np.rint((values - low) / (high - low) * 255), 0, 255).astype(np.uint8)


def as_rgb(gray: np.ndarray, size=None) -> np.ndarray:
    image = Image.fromarray(gray).convert("RGB")
    if size is not None:
        image = image.resize((size[1], size[0]), Image.LANCZOS)
    return np.asarray(image)


# ---------------------------------------------------------------------------- DICOM
def test_mr_small_transfer_syntaxes_give_the_same_pixels():
    reference = load_slice(get_testdata_file("MR_small.dcm"), None)
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    # Independent: the file's window (centre 600, width 1600, LINEAR) on its raw values.
    low = float(ds.WindowCenter) - 0.5 - (float(ds.WindowWidth) - 1) / 2
    high = float(ds.WindowCenter) - 0.5 + (float(ds.WindowWidth) - 1) / 2
    expected = as_rgb(independent_window(ds.pixel_array.astype(float), low, high))
    assert np.abs(reference.astype(int) - expected).max() <= 1
    assert reference.std() > 20  # a real picture, not a flat window
    checked = 0
    for name in MR_SMALL_VARIANTS:
        path = get_testdata_file(name)
        if path is None:
            continue
        checked += 1
        np.testing.assert_array_equal(load_slice(path, None), reference, err_msg=name)
        np.testing.assert_array_equal(
            load_slice(path, (24, 24)), as_rgb(reference[..., 0], (24, 24)), err_msg=name
        )
    assert checked >= 6  # at least explicit/implicit/big-endian, RLE, JPEG-LS, JPEG 2000


def test_truncated_file_is_named_with_its_transfer_syntax():
    path = get_testdata_file("MR_truncated.dcm")
    with pytest.raises(
        UserError, match=r"MR_truncated\.dcm: cannot decode DICOM pixels \(transfer syntax Explicit"
    ):
        load_slice(path, (16, 16))


def test_rescale_then_window_tags(tmp_path):
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 4000, size=(12, 10)).astype(np.uint16)
    write_dicom(
        tmp_path / "a.dcm",
        stored,
        RescaleSlope="2",
        RescaleIntercept="-1000",
        WindowCenter="3000",
        WindowWidth="4001",
    )
    values = stored * 2.0 - 1000  # Modality LUT by hand
    expected = independent_window(values, 3000 - 0.5 - 2000, 3000 - 0.5 + 2000)
    np.testing.assert_array_equal(load_slice(tmp_path / "a.dcm", None), as_rgb(expected))


def test_fractional_window_on_integer_pixels_and_voi_lut(tmp_path):
    from pydicom.dataset import Dataset

    stored = np.arange(-20, 280, dtype=np.int16).reshape(15, 20)
    write_dicom(tmp_path / "w.dcm", stored, WindowCenter="100.7", WindowWidth="150.3")
    low, high = 100.7 - 0.5 - 149.3 / 2, 100.7 - 0.5 + 149.3 / 2
    expected = independent_window(stored.astype(float), low, high)
    np.testing.assert_array_equal(load_slice(tmp_path / "w.dcm", None), as_rgb(expected))
    # A VOI LUT (8-bit entries for inputs 0..255, a gamma curve): its output range is 0-255.
    lut = (np.arange(256) ** 2 // 255).astype(np.uint16)
    item = Dataset()
    item.add_new(0x00283002, "US", [256, 0, 8])  # LUTDescriptor: entries, first input, bits
    item.add_new(0x00283006, "US", [int(v) for v in lut])  # LUTData
    write_dicom(tmp_path / "lut.dcm", stored, VOILUTSequence=[item])
    expected = lut[np.clip(stored, 0, 255)].astype(np.uint8)
    np.testing.assert_array_equal(load_slice(tmp_path / "lut.dcm", None), as_rgb(expected))


def test_no_window_gives_the_percentile_window_of_16_bit_images(tmp_path):
    rng = np.random.default_rng(1)
    stored = rng.integers(0, 60000, size=(16, 16)).astype(np.uint16)
    write_dicom(tmp_path / "b.dcm", stored, RescaleSlope="1", RescaleIntercept="0")
    Image.fromarray(stored.astype(np.uint16)).save(tmp_path / "b.png")  # a 16-bit PNG of the same values
    low, high = np.percentile(stored.astype(float), [0.5, 99.5])
    expected = as_rgb(independent_window(stored.astype(float), low, high))
    pixels = load_slice(tmp_path / "b.dcm", None)
    np.testing.assert_array_equal(pixels, expected)
    np.testing.assert_array_equal(
        load_slice(tmp_path / "b.dcm", (16, 16)), load_image(tmp_path / "b.png", (16, 16))
    )


def test_monochrome1_is_inverted(tmp_path):
    source = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    source.PhotometricInterpretation = "MONOCHROME1"
    source.save_as(tmp_path / "inverted.dcm")
    normal = load_slice(get_testdata_file("MR_small.dcm"), None)
    np.testing.assert_array_equal(load_slice(tmp_path / "inverted.dcm", None), 255 - normal)


def test_non_square_pixels_are_resampled_to_square(tmp_path):
    stored = np.tile(np.arange(8, dtype=np.uint16) * 100, (8, 1))
    write_dicom(tmp_path / "wide.dcm", stored, PixelSpacing=[1.0, 2.0])  # columns twice as wide
    write_dicom(tmp_path / "tall.dcm", stored, PixelSpacing=[3.0, 1.0])
    assert load_slice(tmp_path / "wide.dcm", None).shape == (8, 16, 3)
    assert load_slice(tmp_path / "tall.dcm", None).shape == (24, 8, 3)
    assert load_slice(tmp_path / "tall.dcm", (5, 7)).shape == (5, 7, 3)


def demo_cohort(tmp_path, fmt: str, patients: int = 1, slices: int = 4, size: int = 32):
    out = tmp_path / fmt
    argv = [str(out), "--patients-per-class", str(patients), "--slices-per-patient", str(slices)]
    assert make_demo_data.main([*argv, "--size", str(size), "--format", fmt]) == 0
    return out


def test_shuffled_series_folder_is_ordered_by_position(tmp_path):
    data = demo_cohort(tmp_path, "dicom", slices=6)
    png = demo_cohort(tmp_path, "png", slices=6)
    series = data / "gbm" / "gbm_s0_p000"
    files = sorted(series.iterdir())
    order = np.random.default_rng(3).permutation(len(files))
    for file in files:  # names that sort in another order than the slices
        file.rename(series / f"tmp_{file.name}")
    for new, index in zip(order, range(len(files)), strict=True):
        (series / f"tmp_{files[index].name}").rename(series / f"x{new:02d}.dcm")
    names = find_slices([series]).names
    positions = [float(pydicom.dcmread(name).ImagePositionPatient[2]) for name in names]
    assert positions == sorted(positions) and len(names) == 6
    for k, name in enumerate(names):  # and each is the k-th drawn slice, inferior first
        expected = load_image(png / "gbm" / "gbm_s0_p000" / f"slice{k:02d}.png", (32, 32))
        np.testing.assert_array_equal(load_slice(name, (32, 32)), expected)


def test_non_axial_series_is_skipped_unless_any_orientation(tmp_path):
    stored = np.arange(64, dtype=np.uint16).reshape(8, 8)
    folder = tmp_path / "sag"
    folder.mkdir()
    for k in range(3):
        write_dicom(
            folder / f"{k}.dcm",
            stored,
            ImageOrientationPatient=[0, 1, 0, 0, 0, -1],
            ImagePositionPatient=[k * 4.0, 0, 0],
            SeriesInstanceUID="1.2.3",
        )
    found = find_slices([folder])
    assert found.names == []
    assert found.skipped["non-axial"] == [
        f"{folder}: sagittal DICOM (3 file(s)); use --any-orientation to read it anyway"
    ]
    assert len(find_slices([folder], any_orientation=True).names) == 3


def test_multiframe_dicom_is_a_volume_in_inferior_to_superior_order(tmp_path):
    png = demo_cohort(tmp_path, "png", slices=4)
    slices = [np.asarray(Image.open(png / "gbm/gbm_s0_p000" / f"slice{k:02d}.png")) for k in range(4)]
    from pydicom.dataset import Dataset

    stored = np.stack(slices[::-1]).astype(np.uint16) * 10  # stored superior first
    path = tmp_path / "multi.dcm"
    write_dicom(path, stored[0], WindowCenter="1275.5", WindowWidth="2551")
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 4
    ds.PixelData = stored.astype("<u2").tobytes()
    frames = []
    for z in (15.0, 10.0, 5.0, 0.0):
        position, item = Dataset(), Dataset()
        position.ImagePositionPatient = [0, 0, z]
        item.PlanePositionSequence = [position]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.save_as(path)
    names = find_slices([path]).names
    assert names == [f"{path}#{k:03d}" for k in range(4)]
    for k, name in enumerate(names):
        np.testing.assert_array_equal(load_slice(name, None), as_rgb(slices[k]))
    with pytest.raises(UserError, match="no such slice"):
        load_slice(f"{path}#004", None)


# ---------------------------------------------------------------------------- NIfTI
def test_nifti_las_and_ras_give_identical_slices_in_radiological_view(tmp_path):
    rng = np.random.default_rng(2)
    ras = rng.normal(100, 20, size=(10, 12, 5)).astype(np.float32)
    ras[9, 11, 2] = 1000  # patient's far right (i high), front (j high), middle slice
    nib.save(nib.Nifti1Image(ras, np.diag([1.0, 1.0, 3.0, 1.0])), tmp_path / "ras.nii.gz")
    las_affine = np.diag([-1.0, 1.0, 3.0, 1.0])
    las_affine[0, 3] = 9.0  # voxel i -> x = 9 - i: the same positions, stored left to right
    nib.save(nib.Nifti1Image(ras[::-1].copy(), las_affine), tmp_path / "las.nii")
    names_ras = find_slices([tmp_path / "ras.nii.gz"]).names
    names_las = find_slices([tmp_path / "las.nii"]).names
    assert names_ras == [f"{tmp_path / 'ras.nii.gz'}#{k:03d}" for k in range(5)] and len(names_las) == 5
    for a, b in zip(names_ras, names_las, strict=True):
        np.testing.assert_array_equal(load_slice(a, None), load_slice(b, None))
    middle = load_slice(names_ras[2], None)[..., 0]
    assert middle.shape == (12, 10)  # rows: anterior -> posterior, columns: right -> left
    assert np.unravel_index(np.argmax(middle), middle.shape) == (0, 0)  # top left: right front


def test_nifti_window_scaling_and_one_percentile_window(tmp_path):
    rng = np.random.default_rng(4)
    volume = np.zeros((16, 16, 4), dtype=np.float32)
    volume[3:13, 3:13] = rng.normal(500, 80, size=(10, 10, 4))
    image = nib.Nifti1Image(volume, np.eye(4))
    image.header.set_data_dtype(np.int16)  # nibabel stores it scaled by scl_slope/scl_inter
    nib.save(image, tmp_path / "v.nii.gz")
    assert nib.load(tmp_path / "v.nii.gz").dataobj.slope != 1.0
    values = nib.load(tmp_path / "v.nii.gz").get_fdata()
    low, high = np.percentile(values, [0.5, 99.5])  # independent: one window per volume
    for k in range(4):
        expected = independent_window(values[:, :, k].T[::-1, ::-1], low, high)
        np.testing.assert_array_equal(load_slice(f"{tmp_path / 'v.nii.gz'}#{k:03d}", None), as_rgb(expected))


def test_slices_and_lesion_masks_selection(tmp_path):
    data = demo_cohort(tmp_path, "nifti", slices=7)
    volume = data / "gbm" / "gbm_s0_p000" / "t1c.nii.gz"
    all_names = [f"{volume}#{k:03d}" for k in range(7)]
    assert find_slices([volume]).names == all_names
    assert find_slices([volume], parse_slice_selection("middle:3")).names == all_names[2:5]
    assert find_slices([volume], parse_slice_selection("1:3")).names == all_names[1:3]
    assert find_slices([volume], parse_slice_selection("5:99")).names == all_names[5:]
    # Independent: the generator's PNG masks, one per slice.
    lesion = [
        int((np.asarray(Image.open(data / "masks/gbm/gbm_s0_p000" / f"slice{k:02d}.png")) > 0).sum())
        for k in range(7)
    ]
    threshold = sorted(lesion)[3]
    expected = [all_names[k] for k in range(7) if lesion[k] >= threshold]
    assert 0 < len(expected) < 7 or threshold == 0
    selected = find_slices([volume], lesion_masks="{stem}_seg.nii.gz", min_lesion_pixels=threshold).names
    assert selected == expected
    # A folder scan does not take the masks for volumes.
    assert (
        find_slices([volume.parent], lesion_masks="{stem}_seg.nii.gz", min_lesion_pixels=0).names == all_names
    )
    for bad in ("nope", "a:b", "3:1", "middle:0", "-1:2"):
        with pytest.raises(Exception, match="expected all, middle:N"):
            parse_slice_selection(bad)


def test_lesion_mask_on_another_grid_is_an_error_naming_both(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((8, 8, 3), np.float32), np.eye(4)), tmp_path / "t1.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4), np.uint8), np.eye(4)), tmp_path / "t1_seg.nii.gz")
    with pytest.raises(
        UserError, match=r"t1_seg\.nii\.gz: lesion mask is on another voxel grid than .*t1\.nii\.gz"
    ):
        find_slices([tmp_path / "t1.nii.gz"], lesion_masks="{stem}_seg.nii.gz")
    with pytest.raises(UserError, match=r"no mask .*t1_mask\.nii for .*t1\.nii\.gz"):
        find_slices([tmp_path / "t1.nii.gz"], lesion_masks="{stem}_mask.nii")


def test_png_stays_bit_identical_through_load_slice(tmp_path):
    png = demo_cohort(tmp_path, "png", slices=1)
    path = next((png / "gbm").rglob("*.png"))
    np.testing.assert_array_equal(load_slice(path, (20, 30)), load_image(path, (20, 30)))
    with Image.open(path) as image:
        original = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(load_slice(str(path), None), original)


def test_demo_formats_agree(tmp_path):
    folders = {fmt: demo_cohort(tmp_path, fmt, slices=3) for fmt in ("png", "dicom", "nifti")}
    names = {
        fmt: find_slices(
            [folder / "gbm", folder / "pcnsl"], lesion_masks="{stem}_seg.nii.gz", min_lesion_pixels=0
        ).names
        for fmt, folder in folders.items()
    }
    assert [n.rsplit("/", 1)[-1] for n in names["dicom"][:3]] == ["IM0001.dcm", "IM0002.dcm", "IM0003.dcm"]
    assert names["nifti"][:3] == [
        f"{folders['nifti'] / 'gbm/gbm_s0_p000/t1c.nii.gz'}#{k:03d}" for k in range(3)
    ]
    for png_name, dicom_name, nifti_name in zip(names["png"], names["dicom"], names["nifti"], strict=True):
        expected = load_slice(png_name, (24, 24))
        np.testing.assert_array_equal(load_slice(dicom_name, (24, 24)), expected)
        np.testing.assert_array_equal(load_slice(nifti_name, (24, 24)), expected)


def test_demo_dicom_and_nifti_are_repeatable_and_tagged(tmp_path):
    first = demo_cohort(tmp_path / "a", "dicom", slices=2, size=16)
    second = demo_cohort(tmp_path / "b", "dicom", slices=2, size=16)
    volumes = [demo_cohort(tmp_path / name, "nifti", slices=2, size=16) for name in "cd"]
    for a, b in ((first, second), tuple(volumes)):
        files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
        assert files and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    ds = pydicom.dcmread(first / "gbm/gbm_s0_p000/IM0002.dcm")
    assert (ds.BitsStored, ds.Rows, ds.Modality) == (16, 16, "MR")
    assert ds.pixel_array.max() > 255  # really 16-bit stored values, mapped back by the tags
    assert float(ds.RescaleSlope) != 1 and ds.WindowWidth and len(ds.ImagePositionPatient) == 3
    assert sorted(p.name for p in (volumes[0] / "pcnsl/pcnsl_s0_p000").iterdir()) == [
        "t1c.nii.gz",
        "t1c_seg.nii.gz",
    ]


def test_unsupported_transfer_syntax_and_missing_pixel_data_are_named(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML  # encapsulated, but no decoder for it
    ds.save_as(tmp_path / "mpeg.dcm")
    with pytest.raises(UserError, match=r"mpeg\.dcm: cannot decode DICOM pixels \(transfer syntax MPEG2"):
        load_slice(tmp_path / "mpeg.dcm", (8, 8))
    del ds.PixelData
    ds.save_as(tmp_path / "empty.dcm")
    with pytest.raises(UserError, match=r"empty\.dcm: DICOM file without pixel data"):
        load_slice(tmp_path / "empty.dcm", (8, 8))
