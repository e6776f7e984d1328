"""DICOM series, DICOM files and NIfTI volumes through step0, step2 and step5: the same
cohort in three formats gives the same HDF5 features, slices are named and selected as
DESIGN.md says, undecodable files are named, and no DICOM header value reaches an output."""

from __future__ import annotations

import shutil

import h5py
import make_demo_data
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

import step0_convert_images_to_hdf5 as step0

MASKS = ["--lesion-masks", "{stem}_seg.nii.gz", "--min-lesion-pixels", "0"]


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> dict:
    """The same demo cohort (3 patients per class x 3 slices, 48 px) as PNG, DICOM, NIfTI."""
    root = tmp_path_factory.mktemp("formats")
    folders = {}
    for fmt in ("png", "dicom", "nifti"):
        folders[fmt] = root / fmt
        argv = [str(folders[fmt]), "--patients-per-class", "3", "--slices-per-patient", "3", "--size", "48"]
        assert make_demo_data.main([*argv, "--format", fmt]) == 0
    return folders


def read_class(h5_path, folder: str, key: str = "32_32") -> dict:
    with h5py.File(h5_path, "r") as h5file:
        group = h5file[f"{folder}/{key}"]
        return {
            "features": group["features"][:],
            "paths": [p.decode() for p in group["paths"][:]],
            "groups": [g.decode() for g in group["groups"][:]],
        }


def test_step0_png_dicom_and_nifti_give_the_same_features(cohorts, tmp_path):
    results = {}
    for fmt, folder in cohorts.items():
        output = tmp_path / f"{fmt}.h5"
        assert (
            step0.main([str(folder), str(output), "--size", "32", "32", *(MASKS if fmt == "nifti" else [])])
            == 0
        )
        results[fmt] = {c: read_class(output, c) for c in ("gbm", "pcnsl")}
    for folder in ("gbm", "pcnsl"):
        png, dicom, nifti = (results[fmt][folder] for fmt in ("png", "dicom", "nifti"))
        assert png["groups"] == dicom["groups"] == nifti["groups"]  # one patient per series / volume
        assert dicom["paths"][:3] == [f"{folder}/{folder}_s0_p000/IM{k:04d}.dcm" for k in (1, 2, 3)]
        assert nifti["paths"][:3] == [f"{folder}/{folder}_s0_p000/t1c.nii.gz#{k:03d}" for k in range(3)]
        for other in (dicom, nifti):
            close = np.abs(other["features"].astype(int) - png["features"].astype(int)) <= 1
            assert close.mean() >= 0.99


def test_step0_slice_selection_on_series_and_volumes(cohorts, tmp_path):
    assert (
        step0.main(
            [str(cohorts["dicom"]), str(tmp_path / "d.h5"), "--size", "32", "32", "--slices", "middle:1"]
        )
        == 0
    )
    assert read_class(tmp_path / "d.h5", "gbm")["paths"] == [
        f"gbm/gbm_s0_p00{i}/IM0002.dcm" for i in range(3)
    ]
    argv = [str(cohorts["nifti"]), str(tmp_path / "n.h5"), "--size", "32", "32", "--slices", "1:3", *MASKS]
    assert step0.main(argv) == 0
    paths = read_class(tmp_path / "n.h5", "pcnsl")["paths"]
    assert paths == [f"pcnsl/pcnsl_s0_p00{i}/t1c.nii.gz#{k:03d}" for i in range(3) for k in (1, 2)]


def header_values(path) -> list[str]:
    """Identifying header values of a DICOM file (names, IDs, dates, UIDs)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    keywords = (
        "PatientName",
        "PatientID",
        "StudyDate",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
    )
    values = [str(ds.get(k)) for k in keywords if ds.get(k)]
    assert len(values) >= 5
    return values


def test_step0_dicom_headers_never_reach_outputs_and_shared_patients_warn(cohorts, tmp_path, capfd):
    data = tmp_path / "data"
    shutil.copytree(cohorts["dicom"], data)
    # One scanner patient under two folders (a GBM and a PCNSL one): same PatientID and study.
    for folder, name in (("gbm/extra_a", "MR_small.dcm"), ("pcnsl/extra_b", "MR_small_jpeg_ls_lossless.dcm")):
        (data / folder).mkdir()
        shutil.copy(get_testdata_file(name), data / folder / "im1.dcm")
    (data / "gbm/extra_c").mkdir()
    shutil.copy(get_testdata_file("MR_truncated.dcm"), data / "gbm/extra_c/broken.dcm")
    capfd.readouterr()
    assert (
        step0.main([str(data), str(tmp_path / "out.h5"), "--size", "32", "32", "--workers", "1"]) == 1
    )  # finished, 1 unreadable skipped
    err = capfd.readouterr().err
    for keyword in ("PatientID", "StudyInstanceUID"):
        assert (
            f"patient folders gbm/extra_a and pcnsl/extra_b hold DICOM files with the same {keyword}" in err
        )
    truncated = [line for line in err.splitlines() if "broken.dcm" in line]
    assert len(truncated) == 1 and "transfer syntax Explicit VR Little Endian" in truncated[0]
    assert "gbm   (label 0):    10 images,    4 patients" in err and "(1 unreadable)" in err
    assert read_class(tmp_path / "out.h5", "gbm")["paths"][0] == "gbm/extra_a/im1.dcm"
    written = (tmp_path / "out.h5").read_bytes().decode("latin-1") + err
    values = header_values(get_testdata_file("MR_small.dcm")) + header_values(
        data / "gbm/gbm_s0_p000/IM0001.dcm"
    )
    for value in values:
        assert value not in written, value
    # --strict: the undecodable file stops the run, named.
    assert step0.main([str(data), str(tmp_path / "strict.h5"), "--size", "32", "32", "--strict"]) == 2
    assert "broken.dcm: cannot decode DICOM pixels" in capfd.readouterr().err
    assert not (tmp_path / "strict.h5").exists()


@pytest.mark.slow
def test_step2_and_step5_on_series_volumes_and_files(cohorts, trained_checkpoint, tmp_path, capfd):
    from PIL import Image

    import step2_predict as step2
    import step5_plot_grad_cam as step5

    series = cohorts["dicom"] / "gbm" / "gbm_s0_p001"
    volume = cohorts["nifti"] / "pcnsl" / "pcnsl_s0_p000" / "t1c.nii.gz"
    dicom_file = get_testdata_file("MR_small.dcm")
    capfd.readouterr()
    argv = ["--model-weights", str(trained_checkpoint), "--csv", str(tmp_path / "p.csv")]
    assert step2.main([*argv, str(series), str(volume), dicom_file, "--slices", "middle:2"]) == 0
    out, err = capfd.readouterr()
    names = [line.split()[0] for line in out.splitlines()]
    assert names == [
        str(series / "IM0001.dcm"),
        str(series / "IM0002.dcm"),
        f"{volume}#000",
        f"{volume}#001",
        dicom_file,
    ]
    csv_text = (tmp_path / "p.csv").read_text()
    assert [row.split(",")[0] for row in csv_text.splitlines()[1:]] == names
    overlays = tmp_path / "cam"
    argv = ["--model-weights", str(trained_checkpoint), "--output-dir", str(overlays)]
    assert step5.main([*argv, str(volume), "--slices", "middle:1"]) == 0
    assert sorted(p.name for p in overlays.rglob("*.png")) == ["t1c_001.png"]
    with Image.open(overlays / "t1c_001.png") as overlay:
        assert overlay.size == (48, 48)
    written = out + err + csv_text + capfd.readouterr().err
    for value in header_values(dicom_file) + header_values(series / "IM0001.dcm"):
        assert value not in written, value
