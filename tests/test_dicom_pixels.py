"""gbmpcnsl.dicom's pixels on files that real tools wrote (pydicom's and pydicom-data's test
files), each checked against an independent numpy computation of PS3.3's grey pipeline:

    stored values -> Modality LUT (rescale, or a Modality LUT) -> the first VOI window
    (PS3.3 C.11.2.1.2.1, output 0..255) or the VOI LUT (its entries scaled from 0..2^n-1 to
    0..255) -> rounded to the nearest level -> MONOCHROME1 inverted (255 - y).

Without a window or LUT: the 0.5-99.5 percentile window of the series (the single-frame
files of one folder sharing a SeriesInstanceUID) or of the multi-frame file, over its
Modality LUT values with PixelPaddingValue pixels left out, mapped linearly onto 0..255.
Enhanced multi-frame files take these attributes per frame from their functional groups.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from struct import unpack

import numpy as np
import pydicom
import pytest
from helpers import write_dicom
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset

from gbmpcnsl.dicom import _frame_order, read_multiframe, read_single_frame
from gbmpcnsl.pixels import load_slice
from gbmpcnsl_common import UserError

MODALITY = ("RescaleSlope", "RescaleIntercept", "ModalityLUTSequence")
VOI = ("WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence")


# ---------------------------------------------------------------------------- the reference
def frame_attributes(ds, frame: int) -> dict:
    """PS3.3 C.7.6.16: a frame's Pixel Value Transformation and Frame VOI LUT macros (its
    own, else the shared groups'), else the top level's attributes."""
    found = {keyword: ds.get(keyword) for keyword in (*MODALITY, *VOI) if keyword in ds}
    groups = [ds.SharedFunctionalGroupsSequence[0]] if ds.get("SharedFunctionalGroupsSequence") else []
    if ds.get("PerFrameFunctionalGroupsSequence"):
        groups.append(ds.PerFrameFunctionalGroupsSequence[frame])
    for group in groups:
        for sequence, keywords in (
            ("PixelValueTransformationSequence", MODALITY),
            ("FrameVOILUTSequence", VOI),
        ):
            if group.get(sequence):
                item = group.get(sequence)[0]
                for keyword in keywords:
                    found.pop(keyword, None)
                found.update({keyword: item.get(keyword) for keyword in keywords if keyword in item})
    return found


def lut_table(ds, item) -> tuple[np.ndarray, int, int]:
    """(entries, first input value, bits per entry) of a LUT item."""
    count, first, bits = (int(v) for v in item.LUTDescriptor)
    count = count or 65536
    data = item.LUTData
    if isinstance(data, bytes):
        data = unpack(("<" if ds.is_little_endian else ">") + f"{count}H", data[: 2 * count])
    return np.asarray(data, dtype=np.float64)[:count], first, bits


def modality(ds, attributes: dict, stored: np.ndarray) -> np.ndarray:
    values = stored.astype(np.float64)
    if attributes.get("ModalityLUTSequence"):
        table, first, _ = lut_table(ds, attributes["ModalityLUTSequence"][0])
        return table[np.clip(values - first, 0, len(table) - 1).astype(np.int64)]
    if attributes.get("RescaleSlope") is not None and attributes.get("RescaleIntercept") is not None:
        return values * float(attributes["RescaleSlope"]) + float(attributes["RescaleIntercept"])
    return values


def voi(ds, attributes: dict, values: np.ndarray) -> np.ndarray | None:
    """0..255 floats, or None without a usable VOI."""
    if attributes.get("VOILUTSequence"):
        table, first, bits = lut_table(ds, attributes["VOILUTSequence"][0])
        index = np.clip(np.rint(values) - first, 0, len(table) - 1).astype(np.int64)
        return table[index] / (2**bits - 1) * 255
    if attributes.get("WindowCenter") is None or attributes.get("WindowWidth") is None:
        return None
    center, width = attributes["WindowCenter"], attributes["WindowWidth"]
    center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
    width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
    assert str(attributes.get("VOILUTFunction", "LINEAR")).upper() == "LINEAR"  # the only one in the data
    if width < 1:
        return None
    below, above = values <= center - 0.5 - (width - 1) / 2, values > center - 0.5 + (width - 1) / 2
    y = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255
    return np.where(below, 0.0, np.where(above, 255.0, y))


def padding(ds, stored: np.ndarray) -> np.ndarray:
    if ds.get("PixelPaddingValue") is None:
        return np.zeros(stored.shape, bool)
    low = high = int(ds.PixelPaddingValue)
    if ds.get("PixelPaddingRangeLimit") is not None:
        low, high = sorted((low, int(ds.PixelPaddingRangeLimit)))
    return (stored >= low) & (stored <= high)


def frames_of(ds) -> np.ndarray:
    stored = ds.pixel_array
    return stored if int(ds.get("NumberOfFrames", 1) or 1) > 1 else stored[np.newaxis]


def expected_gray(ds, series_values) -> np.ndarray:
    """The reference display frames (F, H, W) of a grey dataset; `series_values()` gives
    the values its percentile window is taken from."""
    stack, out = frames_of(ds), []
    for frame in range(len(stack)):
        attributes = frame_attributes(ds, frame)
        values = modality(ds, attributes, stack[frame])
        y = voi(ds, attributes, values)
        if y is None:
            low, high = np.percentile(series_values(), [0.5, 99.5])
            y = (values - low) / (high - low) * 255
        y = np.clip(np.rint(y), 0, 255).astype(np.uint8)
        out.append(255 - y if ds.PhotometricInterpretation == "MONOCHROME1" else y)
    return np.stack(out)


def unpadded(ds) -> np.ndarray:
    stack = frames_of(ds)
    return np.concatenate(
        [modality(ds, frame_attributes(ds, k), stack[k])[~padding(ds, stack[k])] for k in range(len(stack))]
    )


def decodable(path: str):
    try:
        ds = pydicom.dcmread(path)
        ds.pixel_array  # noqa: B018 - decodes
        return ds
    except Exception:
        return None


def decodable_files() -> dict[str, Dataset]:
    """Every test file pydicom decodes (pydicom's own and pydicom-data's), by path."""
    found = {}
    for path in sorted(get_testdata_files()):
        if Path(path).is_file() and not Path(path).name.startswith("."):
            ds = decodable(path)
            if ds is not None:
                found[path] = ds
    return found


@pytest.fixture(scope="module")
def testdata():
    return decodable_files()


def is_grey(ds) -> bool:
    return ds.get("PhotometricInterpretation") in ("MONOCHROME1", "MONOCHROME2")


def our_frames(path: str, ds) -> np.ndarray:
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return read_multiframe(Path(path))[0]
    return read_single_frame(Path(path))[0][np.newaxis]


# ---------------------------------------------------------------------------- real files
@pytest.mark.slow
def test_every_decodable_grey_test_file_equals_the_ps33_computation(testdata):
    series = defaultdict(list)  # (folder, SeriesInstanceUID) -> its single-frame grey files
    for path, ds in testdata.items():
        if is_grey(ds) and int(ds.get("NumberOfFrames", 1) or 1) == 1:
            series[(str(Path(path).parent), str(ds.get("SeriesInstanceUID", "") or ""))].append(ds)
    checked = defaultdict(int)
    for path, ds in testdata.items():
        if not is_grey(ds):
            continue
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            expected = expected_gray(ds, lambda ds=ds: unpadded(ds))[_frame_order(ds)]
        else:
            members = series[(str(Path(path).parent), str(ds.get("SeriesInstanceUID", "") or ""))]
            expected = expected_gray(
                ds, lambda members=members: np.concatenate([unpadded(m) for m in members])
            )
        got = our_frames(path, ds)
        difference = np.abs(got.astype(int) - expected).max()
        assert difference == 0, f"{Path(path).name}: {difference} grey levels off"
        checked["window" if ds.get("WindowCenter") is not None else "other"] += 1
        checked["multi-valued"] += "WindowCenter" in ds and ds["WindowCenter"].VM > 1
        checked["MONOCHROME1"] += ds.PhotometricInterpretation == "MONOCHROME1"
        checked["VOI LUT"] += bool(ds.get("VOILUTSequence"))
        checked["functional groups"] += bool(ds.get("PerFrameFunctionalGroupsSequence"))
        checked["padding"] += ds.get("PixelPaddingValue") is not None
    assert sum(checked[k] for k in ("window", "other")) >= 80, checked
    assert (
        min(checked[k] for k in ("multi-valued", "MONOCHROME1", "VOI LUT", "functional groups", "padding"))
        >= 1
    )


@pytest.mark.slow
def test_colour_test_files_equal_pydicoms_rgb(testdata):
    from pydicom.pixels.processing import apply_color_lut

    checked = 0
    for path, ds in testdata.items():
        if is_grey(ds):
            continue
        rgb, bits = frames_of(ds), int(ds.BitsStored)
        if ds.PhotometricInterpretation == "PALETTE COLOR":
            rgb = apply_color_lut(rgb, ds)[..., :3]
            bits = rgb.dtype.itemsize * 8
        expected = np.clip(np.rint(rgb.astype(np.float64) * 255 / (2**bits - 1)), 0, 255).astype(np.uint8)
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            expected = expected[_frame_order(ds)]
        np.testing.assert_array_equal(our_frames(path, ds), expected, err_msg=Path(path).name)
        checked += 1
    assert checked >= 40


def test_siemens_two_valued_window_converts_with_its_first_window():
    path = next(p for p in get_testdata_files("MR-SIEMENS-DICOM-WithOverlays.dcm"))
    ds = pydicom.dcmread(path)
    assert ds["WindowCenter"].VM == 2
    center, width = float(ds.WindowCenter[0]), float(ds.WindowWidth[0])
    values = ds.pixel_array.astype(float)
    y = np.clip(((values - (center - 0.5)) / (width - 1) + 0.5) * 255, 0, 255)
    np.testing.assert_array_equal(read_single_frame(Path(path))[0], np.rint(y).astype(np.uint8))


# ---------------------------------------------------------------------------- synthetic files
def with_frames(path: Path, frames: np.ndarray, **tags) -> Dataset:
    """write_dicom's file turned into a multi-frame one holding `frames` (F, H, W)."""
    write_dicom(path, frames[0], **tags)
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = len(frames)
    ds.PixelData = frames.astype(frames.dtype.newbyteorder("<")).tobytes()
    return ds


def group_item(**sequences) -> Dataset:
    item = Dataset()
    for sequence, attributes in sequences.items():
        inner = Dataset()
        for keyword, value in attributes.items():
            setattr(inner, keyword, value)
        setattr(item, sequence, [inner])
    return item


def test_enhanced_multiframe_applies_per_frame_groups_with_shared_fallback(tmp_path):
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 400, size=(4, 6, 5)).astype(np.uint16)
    path = tmp_path / "enhanced.dcm"
    ds = with_frames(path, frames)
    ds.SharedFunctionalGroupsSequence = [
        group_item(
            FrameVOILUTSequence={"WindowCenter": "700", "WindowWidth": "1400"},
            PixelValueTransformationSequence={"RescaleSlope": "1", "RescaleIntercept": "0"},
            PlaneOrientationSequence={"ImageOrientationPatient": [1, 0, 0, 0, 1, 0]},
        )
    ]
    per_frame = []
    for k, slope in enumerate((1, 2.5, 4, 5.5)):
        own = {"PixelValueTransformationSequence": {"RescaleSlope": str(slope), "RescaleIntercept": "-10"}}
        if k == 2:  # its own window; the others fall back on the shared one
            own["FrameVOILUTSequence"] = {"WindowCenter": "300", "WindowWidth": "200"}
        per_frame.append(group_item(PlanePositionSequence={"ImagePositionPatient": [0, 0, 2.0 * k]}, **own))
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.save_as(path)
    ds = pydicom.dcmread(path)
    expected = expected_gray(ds, lambda: pytest.fail("every frame has a window"))
    np.testing.assert_array_equal(read_multiframe(path)[0], expected)
    ignoring_groups = np.stack([np.clip(np.rint(f / 1400.0 * 255), 0, 255) for f in frames])
    assert np.abs(expected.astype(int) - ignoring_groups).max() > 100  # the groups matter here


def test_one_window_per_series_whatever_the_storage(tmp_path):
    """Ten frames without a window: as ten single-frame files of one series, as one
    multi-frame file and as a NIfTI volume, the same grey levels; PixelPaddingValue pixels
    do not set the window."""
    import nibabel as nib

    rng = np.random.default_rng(6)
    frames = rng.integers(0, 3000, size=(10, 8, 6)).astype(np.int16)
    frames[:, 0, 0] = rng.integers(20000, 30000, size=10)  # per-slice outliers
    series = tmp_path / "series"
    series.mkdir()
    for k, frame in enumerate(frames):
        write_dicom(
            series / f"IM{k:02d}.dcm",
            frame,
            SeriesInstanceUID="1.2.3.4",
            ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
            ImagePositionPatient=[0, 0, float(k)],
        )
    ds = with_frames(tmp_path / "multi.dcm", frames)
    ds.save_as(tmp_path / "multi.dcm")
    volume = np.stack([f[::-1, ::-1].T for f in frames], axis=2)  # RAS+ voxels of the same slices
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "volume.nii.gz")
    single = np.stack([read_single_frame(series / f"IM{k:02d}.dcm")[0] for k in range(10)])
    low, high = np.percentile(frames.astype(float), [0.5, 99.5])  # independent: over all ten
    expected = np.clip(np.rint((frames - low) / (high - low) * 255), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(single, expected)
    np.testing.assert_array_equal(read_multiframe(tmp_path / "multi.dcm")[0], expected)
    nifti = np.stack([load_slice(f"{tmp_path / 'volume.nii.gz'}#{k:03d}", None)[..., 0] for k in range(10)])
    np.testing.assert_array_equal(nifti, expected)
    # Padding: a value far outside the anatomy, left out of the window.
    padded = frames.copy()
    padded[:, :, 0] = -2000
    write_dicom(tmp_path / "padded.dcm", padded[3], PixelPaddingValue=-2000)
    kept = padded[3][padded[3] != -2000].astype(float)
    low, high = np.percentile(kept, [0.5, 99.5])
    expected = np.clip(np.rint((padded[3] - low) / (high - low) * 255), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(read_single_frame(tmp_path / "padded.dcm")[0], expected)


def test_descending_voi_lut_inverts(tmp_path):
    stored = np.arange(256, dtype=np.uint16).reshape(16, 16)
    item = Dataset()
    item.add_new(0x00283002, "US", [256, 0, 8])  # LUTDescriptor: entries, first input, bits
    item.add_new(0x00283006, "US", list(range(255, -1, -1)))  # LUTData, descending
    write_dicom(tmp_path / "lut.dcm", stored, VOILUTSequence=[item])
    np.testing.assert_array_equal(read_single_frame(tmp_path / "lut.dcm")[0], 255 - stored)


def test_colour_is_scaled_by_bits_stored_and_palette_without_lut_is_one_line(tmp_path):
    rgb = np.array([[[4095, 0, 2048], [1, 4094, 100]]], dtype=np.uint16)
    path = tmp_path / "rgb12.dcm"
    write_dicom(path, rgb[..., 0])
    ds = pydicom.dcmread(path)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
    ds.PixelData = rgb.astype("<u2").tobytes()
    ds.save_as(path)
    np.testing.assert_array_equal(
        read_single_frame(path)[0], np.rint(rgb.astype(float) * 255 / 4095).astype(np.uint8)
    )  # 4095 -> 255, 2048 -> 128
    write_dicom(
        tmp_path / "palette.dcm", np.zeros((4, 4), np.uint16), PhotometricInterpretation="PALETTE COLOR"
    )
    with pytest.raises(UserError, match=r"palette\.dcm: PALETTE COLOR without a usable colour lookup table$"):
        load_slice(tmp_path / "palette.dcm", None)


def test_any_failure_reading_a_file_is_one_line_naming_it(tmp_path, monkeypatch):
    import gbmpcnsl.pixels

    path = tmp_path / "odd.dcm"
    write_dicom(path, np.zeros((4, 4), np.uint16), WindowCenter="1", WindowWidth="1")

    def broken(path):
        raise ValueError("(0010,0010) 'DOE^JANE' is odd")

    monkeypatch.setattr(gbmpcnsl.pixels, "read_single_frame", broken)
    with pytest.raises(UserError) as raised:
        load_slice(path, None)
    assert str(raised.value) == f"{path}: unreadable (ValueError: (0010,0010) ... is odd)"


# ---------------------------------------------------------------------------- step0 on every test file
def header_values(paths) -> set[str]:
    """Identifying header texts of these DICOM and NIfTI files (names, IDs, UIDs, dates,
    descriptions) long enough not to occur in a message by chance."""
    import nibabel as nib

    values = set()
    for path in paths:
        try:
            if str(path).endswith((".nii", ".nii.gz")):
                values.add(str(nib.load(path).header["descrip"].item().decode(errors="ignore")).strip())
                continue
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            continue
        for keyword in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "StudyDate",
            "InstitutionName",
            "SeriesDescription",
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPInstanceUID",
        ):
            values.add(str(ds.get(keyword, "") or "").strip())
    return {value for value in values if len(value) >= 8}


@pytest.mark.slow
def test_step0_over_every_test_file_prints_no_traceback_and_no_header_value(tmp_path):
    """pydicom's, pydicom-data's and nibabel's test files, and a file with an invalid UID,
    through step0 in a subprocess (two worker processes): one-line messages only."""
    import subprocess
    import sys

    import nibabel

    data = tmp_path / "data"
    sources = {Path(p) for p in get_testdata_files() if Path(p).is_file()}
    roots = {p.parents[len(p.relative_to(Path(pydicom.__file__).parents[1]).parts) - 2] for p in sources}
    for source in sources:
        root = next(r for r in roots if r in source.parents)
        link = data / "gbm" / root.name / source.relative_to(root)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source)
    nibabel_data = Path(nibabel.__file__).parent / "tests" / "data"
    for source in sorted(nibabel_data.iterdir()):
        if source.is_file():
            (data / "pcnsl" / "nibabel").mkdir(parents=True, exist_ok=True)
            (data / "pcnsl" / "nibabel" / source.name).symlink_to(source)
    secret = data / "pcnsl" / "synthetic" / "IM1.dcm"
    secret.parent.mkdir(parents=True)
    write_dicom(
        secret,
        np.arange(64, dtype=np.uint16).reshape(8, 8),
        SeriesInstanceUID="1.2.826.0.1.3680043.8.498.0222",  # a leading-zero component: invalid
        PatientName="Secretname^Jane",
        WindowCenter=["30", "200"],
        WindowWidth=["60", "400"],
    )
    command = [sys.executable, "step0_convert_images_to_hdf5.py"]
    usage = subprocess.run([*command, "--help"], capture_output=True, text=True).stdout
    every_series = ["--all-series"] if "--all-series" in usage else []  # a folder holds many series
    result = subprocess.run(
        [*command, str(data), str(tmp_path / "out.h5"), *every_series]
        + ["--size", "16", "16", "--workers", "2", "--any-orientation"],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]  # finished; unreadable files skipped
    assert "Traceback" not in output and "Error:" not in output.replace("UserError", "")
    leaked = sorted(
        value
        for value in header_values([*sources, *nibabel_data.iterdir(), secret])
        if value in output and value not in str(data)
    )
    assert leaked == [], leaked
    assert "1.2.826.0.1.3680043.8.498.0222" not in output and "Secretname" not in output
    assert "skipped" in output  # the undecodable files were met, and named in one line each
