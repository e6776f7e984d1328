"""gbmpcnsl.nifti and gbmpcnsl.pixels on NIfTI files that cannot be read: one message per
volume, "unreadable", decoded (and failing) once per run."""

from __future__ import annotations

import os
import sys

import nibabel as nib
import numpy as np
import pytest

import gbmpcnsl.nifti
import gbmpcnsl.pixels
from gbmpcnsl.pixels import load_slice
from gbmpcnsl.predictors import image_batches, predict_slices
from gbmpcnsl.sources import find_slices
from gbmpcnsl_common import UserError


def test_4d_file_is_one_unreadable_volume_read_once(tmp_path, monkeypatch):
    path = tmp_path / "dwi.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((6, 5, 4, 3), np.float32), np.eye(4)), path)
    loads = []
    original = gbmpcnsl.nifti._load_header
    monkeypatch.setattr(gbmpcnsl.nifti, "_load_header", lambda p: loads.append(p) or original(p))
    names = find_slices([path]).names
    assert len(names) == 4
    messages = set()
    for name in names:
        with pytest.raises(UserError) as raised:
            load_slice(name, (8, 8))
        messages.add(str(raised.value))
    assert messages == {f"{path}: unreadable NIfTI volume (4-D, shape 6x5x4x3; a 3-D volume is expected)"}
    assert len(loads) == 1  # remembered: not decoded again for the other slices


def test_garbage_nifti_is_called_unreadable(tmp_path):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(b"not a volume at all" * 20)
    for name in find_slices([path]).names + [f"{path}#000"]:
        with pytest.raises(UserError, match=rf"^{path}: unreadable NIfTI volume \("):
            load_slice(name, (8, 8))


def test_step2_reports_an_unreadable_volume_in_one_line(tmp_path, capsys):
    path = tmp_path / "four_d.nii"
    nib.save(nib.Nifti1Image(np.ones((6, 5, 4, 2), np.float32), np.eye(4)), path)
    good = tmp_path / "good.nii"
    nib.save(nib.Nifti1Image(np.arange(120, dtype=np.float32).reshape(6, 5, 4), np.eye(4)), good)
    paths = find_slices([path, good]).names
    errors: dict[int, str] = {}
    batches = image_batches(paths, (8, 8), 3, errors)
    rows, _ = predict_slices(paths, [lambda images: np.full(len(images), 0.5)], batches, errors)
    assert len(rows) == 4 and len(errors) == 4
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert lines == [f"error: {path}: unreadable NIfTI volume (4-D, shape 6x5x4x2; a 3-D volume is expected)"]


def test_failures_are_remembered_per_file_version(tmp_path):
    path = tmp_path / "later.nii"
    path.write_bytes(b"garbage" * 60)
    with pytest.raises(UserError, match="unreadable NIfTI volume"):
        load_slice(f"{path}#000", None)
    assert any(key[0] == str(path) for key in gbmpcnsl.pixels._unreadable_volumes)
    nib.save(nib.Nifti1Image(np.ones((4, 4, 2), np.float32), np.eye(4)), path)  # rewritten: a new version
    os.utime(path, ns=(1, 10**18))
    assert load_slice(f"{path}#001", None).shape == (4, 4, 3)


def test_step0_reports_an_unreadable_volume_in_one_line(tmp_path, capsys):
    import step0_convert_images_to_hdf5 as step0

    for folder in ("gbm/p1", "gbm/p2", "pcnsl/p3"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    volume = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "data/gbm/p1/t1.nii.gz")
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "data/pcnsl/p3/t1.nii.gz")
    four_d = tmp_path / "data/gbm/p2/dwi.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((6, 5, 4, 3), np.float32), np.eye(4)), four_d)
    argv = [str(tmp_path / "data"), str(tmp_path / "out.h5"), "--size", "8", "8", "--workers", "1"]
    assert step0.main(argv) == 1  # finished, one source skipped
    assert [line for line in capsys.readouterr().err.splitlines() if "dwi.nii.gz" in line] == [
        f"warning: skipped {four_d}: unreadable NIfTI volume (4-D, shape 6x5x4x3; a 3-D volume is expected)"
    ]


def test_step5_reports_an_unreadable_volume_in_one_line(tmp_path, capsys):
    from gbmpcnsl.gradcam import GradCamRun

    path = tmp_path / "four_d.nii"
    nib.save(nib.Nifti1Image(np.ones((6, 5, 3, 2), np.float32), np.eye(4)), path)
    names = find_slices([path]).names

    class Progress:
        def write(self, text):
            print(text, file=sys.stderr)

        def update(self, count):
            pass

    run = GradCamRun(lambda images: None, (8, 8), tmp_path / "out", annotate=False)
    assert run.read_batch(names, [tmp_path / f"{k}.png" for k in range(3)], Progress()) == []
    assert run.results.failed == 3
    assert capsys.readouterr().err.splitlines() == [
        f"error: {path}: unreadable NIfTI volume (4-D, shape 6x5x3x2; a 3-D volume is expected)"
    ]
