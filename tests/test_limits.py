"""gbmpcnsl.limits: a few bytes of header declaring 10^12 frames, 10^10 slices or 10^12
rows end in one line under a memory cap, before anything is allocated (header bombs)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parent.parent
MEMORY_CAP = 1536 * 2**20  # RLIMIT_AS of the step's process: well under what a bomb asks for


def dicom_bomb(path: Path, frames: str = "999999999999") -> None:
    """A small DICOM file whose header declares `frames` frames of 8x8 (10^12 - 1: IS has 12 characters)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID = "MR", generate_uid()
    ds.Rows = ds.Columns = 8
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(64)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def nifti2_bomb(path: Path) -> None:
    """A NIfTI-2 header declaring 8 x 8 x 10^10 voxels, followed by a few bytes."""
    header = nib.Nifti2Header()
    header.set_data_shape((8, 8, 10**10))
    header.set_data_dtype(np.uint8)
    header.set_zooms((1.0, 1.0, 1.0))
    header["vox_offset"] = 544
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.binaryblock + bytes(64))


def hdf5_bomb(path: Path) -> None:
    """step0's layout, every dataset declaring 10^12 rows (chunked, nothing written)."""
    strings = h5py.string_dtype()
    with h5py.File(path, "w") as h5file:
        for folder in ("gbm", "pcnsl"):
            group = h5file.create_group(f"{folder}/32_32")
            group.create_dataset("features", shape=(10**12, 32, 32, 3), dtype="u1", chunks=(1, 32, 32, 3))
            group.create_dataset("labels", shape=(10**12,), dtype="i8", chunks=(1024,))
            for name in ("paths", "groups"):
                group.create_dataset(name, shape=(10**12,), dtype=strings, chunks=(1024,))


def run_capped(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """A step's main under MEMORY_CAP of address space, in a subprocess."""
    code = textwrap.dedent(f"""
        import resource, runpy, sys
        resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_CAP}, {MEMORY_CAP}))
        sys.argv = {argv!r}
        runpy.run_path({argv[0]!r}, run_name="__main__")
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def assert_one_line(result: subprocess.CompletedProcess, expected_start: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "MemoryError" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(expected_start), result.stderr[-2000:]


@pytest.mark.parametrize("kind", ["dicom", "nifti"])
def test_step0_header_bombs_end_in_one_line(tmp_path, kind):
    data = tmp_path / "data"
    if kind == "dicom":
        bomb = data / "gbm" / "p1" / "volume.dcm"
        dicom_bomb(bomb)
        expected = f"error: {bomb}: declares 999,999,999,999 frames, more than the limit of 10,000"
    else:
        bomb = data / "gbm" / "p1" / "t1c.nii"
        nifti2_bomb(bomb)
        expected = f"error: {bomb}: declares 10,000,000,000 slices, more than the limit of 10,000"
    (data / "pcnsl" / "p2").mkdir(parents=True)
    result = run_capped(
        ["step0_convert_images_to_hdf5.py", str(data), str(tmp_path / "d.h5"), "--workers", "1"], tmp_path
    )
    assert_one_line(result, expected)
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_step1_hdf5_declaring_10_12_rows_ends_in_one_line(tmp_path):
    hdf5_bomb(tmp_path / "bomb.h5")
    assert (tmp_path / "bomb.h5").stat().st_size < 100_000
    argv = ["step1_train_model.py", "--backbone", "efficientnetb0", "--weights", "none"]
    result = run_capped([*argv, str(tmp_path / "bomb.h5"), str(tmp_path / "run")], tmp_path)
    assert_one_line(
        result, f"error: {tmp_path / 'bomb.h5'}: /gbm/32_32/features: declares 1,000,000,000,000 rows"
    )
    assert not (tmp_path / "run").exists()


def test_a_limit_is_raised_by_its_environment_variable(tmp_path, monkeypatch):
    from gbmpcnsl.limits import check_count
    from gbmpcnsl_common import UserError

    with pytest.raises(UserError, match="set GBMPCNSL_MAX_SLICES to allow more"):
        check_count("slices", 20_000, "GBMPCNSL_MAX_SLICES", "v.nii")
    monkeypatch.setenv("GBMPCNSL_MAX_SLICES", "30000")
    check_count("slices", 20_000, "GBMPCNSL_MAX_SLICES", "v.nii")
