"""The demo-data generator: layout, determinism per seed, masks that sit on the lesions."""

from __future__ import annotations

from pathlib import Path

import make_demo_data
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage


def make(out_dir: Path, *extra: str) -> int:
    return make_demo_data.main(
        [str(out_dir), "--patients-per-class", "3", "--slices-per-patient", "2", "--size", "64", *extra]
    )


def files_under(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".gbmpcnsl-demo"  # the marker: not part of the cohort
    }


def test_layout_patient_ids_and_masks(tmp_path):
    out = tmp_path / "data"
    assert make(out, "--seed", "7") == 0
    files = files_under(out)
    images = sorted(k for k in files if not k.startswith("masks/"))
    masks = sorted(k for k in files if k.startswith("masks/"))
    assert len(images) == 2 * 3 * 2
    assert images[0] == "gbm/gbm_s7_p000/slice00.png"
    assert images[-1] == "pcnsl/pcnsl_s7_p002/slice01.png"
    assert masks == [f"masks/{k}" for k in images]  # same relative path, parallel tree
    assert sorted(p.name for p in out.iterdir()) == [".gbmpcnsl-demo", "gbm", "masks", "pcnsl"]
    with Image.open(out / images[0]) as image:
        assert image.mode == "L" and image.size == (64, 64)
    with Image.open(out / masks[0]) as mask:
        assert mask.mode == "L" and set(np.unique(np.asarray(mask))) <= {0, 255}


def test_same_seed_same_bytes_other_seed_other_patients(tmp_path):
    assert make(tmp_path / "a", "--seed", "0") == 0
    assert make(tmp_path / "b", "--seed", "0") == 0
    assert make(tmp_path / "c", "--seed", "1") == 0
    a, b, c = (files_under(tmp_path / name) for name in "abc")
    assert a == b
    patients = {
        name: {Path(k).parent.name for k in files if not k.startswith("masks/")}
        for name, files in zip("ac", (a, c), strict=True)
    }
    assert patients["a"].isdisjoint(patients["c"])
    assert all("_s0_" in p for p in patients["a"]) and all("_s1_" in p for p in patients["c"])


def test_jpg_format_keeps_png_masks(tmp_path):
    assert make(tmp_path / "d", "--format", "jpg") == 0
    files = files_under(tmp_path / "d")
    assert all(k.endswith(".jpg") for k in files if not k.startswith("masks/"))
    assert all(k.endswith(".png") for k in files if k.startswith("masks/"))


def test_refuses_non_empty_folder_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "data"
    assert make(out) == 0
    (out / "notes.txt").write_text("keep me")
    assert make(out, "--seed", "5") == 2
    assert "not empty" in capsys.readouterr().err
    assert not list(out.glob("gbm/*_s5_*"))
    assert make(out, "--seed", "5", "--overwrite") == 0
    assert {p.name for p in (out / "gbm").iterdir()} == {f"gbm_s5_p{i:03d}" for i in range(3)}
    assert (out / "notes.txt").read_text() == "keep me"  # only its own folders are replaced


def test_masks_sit_on_the_lesions_and_classes_differ(tmp_path):
    out = tmp_path / "data"
    assert (
        make_demo_data.main(
            [str(out), "--patients-per-class", "6", "--slices-per-patient", "3", "--size", "96"]
        )
        == 0
    )
    dark_core_fraction = {}
    for kind in ("gbm", "pcnsl"):
        fractions = []
        for path in sorted((out / kind).rglob("*.png")):
            image = np.asarray(Image.open(path), dtype=float)
            mask = np.asarray(Image.open(out / "masks" / path.relative_to(out))) > 0
            assert 0.003 < mask.mean() < 0.15, path  # a lesion, not the whole head
            around = ndimage.binary_dilation(mask, iterations=6) & ~ndimage.binary_dilation(
                mask, iterations=2
            )
            # Enhancement: the bright part of the mask is clearly brighter than the tissue around it.
            assert np.percentile(image[mask], 90) > np.percentile(image[around], 90) + 25, path
            fractions.append(np.mean(image[mask] < np.median(image[around])))
        dark_core_fraction[kind] = np.mean(fractions)
    # GBM: ring around a dark necrotic core; PCNSL: solid enhancement.
    assert dark_core_fraction["gbm"] > 0.15
    assert dark_core_fraction["pcnsl"] < 0.05
    assert dark_core_fraction["gbm"] > 3 * dark_core_fraction["pcnsl"]


def test_lesion_stays_in_place_across_a_patients_slices(tmp_path):
    out = tmp_path / "data"
    assert (
        make_demo_data.main(
            [str(out), "--patients-per-class", "2", "--slices-per-patient", "4", "--size", "96"]
        )
        == 0
    )
    for patient in sorted((out / "masks" / "gbm").iterdir()):
        masks = [np.asarray(Image.open(p)) > 0 for p in sorted(patient.glob("*.png"))]
        centers = np.array([ndimage.center_of_mass(m) for m in masks])
        assert np.abs(centers - centers.mean(0)).max() < 4, patient  # pixels at 96 px
        areas = [m.sum() for m in masks]
        assert max(areas) > min(areas)  # slices vary the lesion size a little


@pytest.mark.parametrize("bad", [["--size", "8"], ["--patients-per-class", "0"], ["--format", "gif"]])
def test_bad_arguments(tmp_path, bad):
    with pytest.raises(SystemExit) as exit_info:
        make_demo_data.main([str(tmp_path / "x"), *bad])
    assert exit_info.value.code == 2


def test_patients_vary_as_real_scans_do(tmp_path):
    patients = [make_demo_data.make_patient(np.random.default_rng([0, 0, i]), "gbm") for i in range(200)]
    angles = np.degrees([p["head_angle"] for p in patients])
    assert angles.min() < -15 and angles.max() > 15  # in-plane rotation of at least +-15 degrees
    assert 0.3 < np.mean([p["mirrored"] for p in patients]) < 0.7  # both left-right orientations
    assert np.ptp([p["head_size"] for p in patients]) > 0.2
    assert np.ptp([p["gain"] for p in patients]) > 0.4 and np.ptp([p["gamma"] for p in patients]) > 0.4
    # On the images: head position, size and brightness differ from patient to patient.
    out = tmp_path / "data"
    argv = [str(out), "--patients-per-class", "8", "--slices-per-patient", "1", "--size", "64"]
    assert make_demo_data.main(argv) == 0
    heads = [np.asarray(Image.open(p), dtype=float) for p in sorted(out.glob("*/*/slice00.png"))]
    masks = [ndimage.binary_fill_holes(image > 25) for image in heads]
    centres = np.array([ndimage.center_of_mass(mask) for mask in masks])
    areas = np.array([mask.sum() for mask in masks])
    assert centres.std(axis=0).min() > 1.0  # pixels at 64 px
    assert areas.max() > 1.3 * areas.min()
    brightness = [np.median(image[mask]) for image, mask in zip(heads, masks, strict=True)]
    assert np.ptp(brightness) > 25
    for mask in masks:  # the head stays inside the image
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def test_overwrite_refuses_a_folder_without_the_demo_marker(tmp_path, capsys):
    """Real data has the demo's layout (gbm/, pcnsl/): only a folder this script marked as
    its own (.gbmpcnsl-demo) is replaced."""
    out = tmp_path / "data"
    (out / "gbm" / "p017").mkdir(parents=True)
    (out / "gbm" / "p017" / "scan.dcm").write_bytes(b"DICM")
    assert make(out, "--overwrite") == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {out}: not written by this tool (no .gbmpcnsl-demo); --overwrite only replaces "
        "this tool's own outputs"
    ]
    assert [p.name for p in out.rglob("*")] == ["gbm", "p017", "scan.dcm"]
    assert make(tmp_path / "demo") == 0
    assert (tmp_path / "demo" / ".gbmpcnsl-demo").is_file()
