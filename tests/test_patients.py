"""The one patient rule (gbmpcnsl_common.patient_id) that step0, step1, step2 and
the statistics share: class-qualified ids, series and volumes as one patient."""

from __future__ import annotations

import pytest

from gbmpcnsl_common import patient_id, split_slice_name


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


def test_split_slice_name():
    assert split_slice_name("gbm/p1/t1c.nii.gz#045") == ("gbm/p1/t1c.nii.gz", 45)
    assert split_slice_name("gbm/p1/a#b.png") == ("gbm/p1/a#b.png", None)
    assert split_slice_name("gbm/p1/x.png") == ("gbm/p1/x.png", None)
