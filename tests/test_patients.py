"""The one patient rule (gbmpcnsl_common.patient_id) that step0, step1, step2 and
the statistics share: class-qualified ids, series and volumes as one patient; and the
warnings of step0 and step1 about a cohort without patient folders or with one patient
folder under both classes."""

from __future__ import annotations

import h5py
import pytest
from helpers import save_png

import step0_convert_images_to_hdf5 as step0
from gbmpcnsl.data import read_cohort
from gbmpcnsl.hdf5 import single_slice_groups_warning
from gbmpcnsl_common import patient_id, setup_logging, split_slice_name


@pytest.mark.parametrize(
    ("slice_name", "expected"),
    [
        ("gbm/001/slice01.png", "gbm/001"),
        ("pcnsl/001/slice01.png", "pcnsl/001"),  # numbered per class: another person
        ("gbm/p01/series2/IM0001.dcm", "gbm/p01"),  # two series of one patient
        ("gbm/p01/series3/IM0001.dcm", "gbm/p01"),
        ("gbm/img001.png", "gbm/img001"),  # a flat file is its own patient
        ("gbm/t1c.nii.gz#045", "gbm/t1c"),  # every slice of a flat volume: one patient
        ("gbm/p017/t1c.nii.gz#045", "gbm/p017"),
        ("/data/study/PCNSL/p3/s.png", "pcnsl/p3"),  # class folder found anywhere in the path
        ("data/pcnsl/gbm/s.png", "gbm/s"),  # the nearest class folder wins, as for labels
        ("scans/p9/slice.png", "scans/p9"),  # no class folder: the image's folder
        ("scans/vol.nii.gz#003", "scans/vol.nii.gz"),  # no class folder: the volume
    ],
)
def test_patient_id(slice_name, expected):
    assert patient_id(slice_name) == expected


@pytest.mark.parametrize(
    ("slice_name", "root", "expected"),
    [
        ("pacs/P017/ST1/SE2/IM1.dcm", "pacs", "pacs/P017"),  # one patient, not one per series
        ("pacs/P017/ST1/SE3/IM1.dcm", "pacs/", "pacs/P017"),
        ("./pacs/P017/t1.nii.gz#004", "pacs", "pacs/P017"),
        ("/data/pacs/P017/ST1/SE2/IM1.dcm", "/data/pacs", "/data/pacs/P017"),  # absolute stays absolute
        ("pacs/IM1.dcm", "pacs", "pacs"),  # directly in the named folder: its folder, as before
        ("pacs/v.nii.gz#002", "pacs", "pacs/v.nii.gz"),
        ("pacs/gbm/p01/s/IM1.dcm", "pacs", "gbm/p01"),  # a class folder still wins
        ("/scans/p9/slice.png", None, "/scans/p9"),
        ("/scans/vol.nii.gz#003", None, "/scans/vol.nii.gz"),
    ],
)
def test_patient_id_under_the_folder_named_on_the_command_line(slice_name, root, expected):
    assert patient_id(slice_name, root) == expected


def test_split_slice_name():
    assert split_slice_name("gbm/p1/t1c.nii.gz#045") == ("gbm/p1/t1c.nii.gz", 45)
    assert split_slice_name("gbm/p1/a#b.png") == ("gbm/p1/a#b.png", None)
    assert split_slice_name("gbm/p1/x.png") == ("gbm/p1/x.png", None)


def test_single_slice_group_warning_rule():
    assert single_slice_groups_warning(["gbm/a", "gbm/a", "gbm/b", "gbm/b", "pcnsl/c"]) is None
    assert single_slice_groups_warning(["gbm/a", "gbm/b", "gbm/c", "pcnsl/d", "pcnsl/d"]) is not None
    assert single_slice_groups_warning([]) is None


def test_flat_class_folders_warn_in_step0_and_step1(tmp_path, capsys):
    flat = tmp_path / "flat"
    for label, folder in enumerate(("gbm", "pcnsl")):
        for index in range(4):
            save_png(flat / folder / f"img{index}.png", 40 * index + 20 * label)
    assert step0.main([str(flat), str(tmp_path / "flat.h5"), "--size", "16", "16", "--workers", "1"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "single slice" in line]
    assert len(warnings) == 1
    assert warnings[0].startswith("warning: 8 of 8 patient groups hold a single slice")
    assert "DATA/gbm/<patient>/<slice>.png" in warnings[0]
    setup_logging()  # step1's logging, to the captured stderr
    read_cohort(tmp_path / "flat.h5")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "single slice" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: 8 of 8 patient groups hold a single slice")

    # Patient folders (two slices each): no warning, in either step.
    nested = tmp_path / "nested"
    for label, folder in enumerate(("gbm", "pcnsl")):
        for index in range(4):
            save_png(nested / folder / f"p{index}" / "s1.png", 40 * index + 20 * label)
            save_png(nested / folder / f"p{index}" / "s2.png", 40 * index + 20 * label + 5)
    assert step0.main([str(nested), str(tmp_path / "nested.h5"), "--size", "16", "16", "--workers", "1"]) == 0
    assert "single slice" not in capsys.readouterr().err
    setup_logging()
    read_cohort(tmp_path / "nested.h5")
    assert "single slice" not in capsys.readouterr().err


def test_step0_warns_about_a_patient_folder_under_both_classes(tmp_path, capsys):
    data = tmp_path / "data"
    for folder in ("gbm", "pcnsl"):
        for patient in ("001", f"{folder}_only"):
            save_png(data / folder / patient / "s1.png", 50)
            save_png(data / folder / patient / "s2.png", 90)
    assert step0.main([str(data), str(tmp_path / "out.h5"), "--size", "16", "16", "--workers", "1"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "under both" in line]
    assert warnings == [
        "warning: patient folder 001 is under both gbm/ and pcnsl/; kept as two patients "
        "(gbm/001, pcnsl/001): rename one if they are the same person"
    ]
    with h5py.File(tmp_path / "out.h5", "r") as h5file:
        assert set(h5file["gbm/16_16/groups"].asstr()[:]) == {"gbm/001", "gbm/gbm_only"}
        assert set(h5file["pcnsl/16_16/groups"].asstr()[:]) == {"pcnsl/001", "pcnsl/pcnsl_only"}
