"""step0: images -> HDF5. Layout, pixels, groups, skipped files, --strict, errors,
atomic writes, --overwrite, other sizes kept, original-layout files, bounded memory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import make_demo_data
import numpy as np
import pytest
from helpers import last_line, read_until, save_png, send_ctrl_c
from PIL import Image

import step0_convert_images_to_hdf5 as step0
from gbmpcnsl import hdf5
from gbmpcnsl.hdf5 import hdf5_root_attributes, read_hdf5_index
from gbmpcnsl_common import load_image

ROOT = Path(__file__).resolve().parent.parent


def save_image(path: Path, seed: int, size=(40, 30), mode="L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """Patient folders and flat files, with one hidden file, one text file and one
    truncated image in each class; visible, readable images: gbm 5, pcnsl 4. step0 exits
    1 on it (finished, but the truncated images were skipped)."""
    data = tmp_path / "data"
    save_image(data / "gbm" / "patient01" / "slice01.png", 1)
    save_image(data / "gbm" / "patient01" / "slice02.jpg", 2, mode="RGB")
    save_image(data / "gbm" / "patient02" / "slice01.PNG", 3)
    save_image(data / "gbm" / "patient02" / "series2" / "slice09.tif", 4)  # deeper: still patient02
    save_image(data / "gbm" / "img001.bmp", 5, mode="RGB")  # flat file: its own group
    save_image(data / "pcnsl" / "p7" / "a.png", 6)
    save_image(data / "pcnsl" / "p7" / "b.png", 7, size=(90, 70))
    save_image(data / "pcnsl" / "img001.jpeg", 8)
    save_image(data / "pcnsl" / "img002.png", 9, mode="P")
    for folder in ("gbm", "pcnsl"):
        (data / folder / ".DS_Store").write_bytes(b"\x00\x01junk")
        save_image(data / folder / ".hidden_patient" / "x.png", 10)
        (data / folder / "notes.txt").write_text("not an image")
        broken = save_image(data / folder / "p9" / "broken.png", 11, size=(200, 200), mode="RGB")
        broken.write_bytes(broken.read_bytes()[:300])
    return data


def run(data: Path, output: Path, *extra: str) -> int:
    return step0.main([str(data), str(output), "--size", "24", "32", "--workers", "1", *extra])


def read_class(output: Path, folder: str, key: str = "24_32") -> dict:
    with h5py.File(output, "r") as h5file:
        group = h5file[f"{folder}/{key}"]
        return {
            "features": group["features"][:],
            "labels": group["labels"][:],
            "paths": list(group["paths"].asstr()[:]),
            "groups": list(group["groups"].asstr()[:]),
            "chunks": group["features"].chunks,
            "compression": group["features"].compression,
            "dtypes": (group["features"].dtype, group["labels"].dtype),
        }


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_layout_pixels_paths_groups_and_summary(data_dir, tmp_path, capsys):
    output = tmp_path / "out.h5"
    assert run(data_dir, output) == 1
    err = capsys.readouterr().err

    gbm, pcnsl = read_class(output, "gbm"), read_class(output, "pcnsl")
    assert gbm["paths"] == [
        "gbm/img001.bmp",
        "gbm/patient01/slice01.png",
        "gbm/patient01/slice02.jpg",
        "gbm/patient02/series2/slice09.tif",
        "gbm/patient02/slice01.PNG",
    ]
    assert gbm["groups"] == ["gbm/img001", "gbm/patient01", "gbm/patient01", "gbm/patient02", "gbm/patient02"]
    assert pcnsl["paths"] == ["pcnsl/img001.jpeg", "pcnsl/img002.png", "pcnsl/p7/a.png", "pcnsl/p7/b.png"]
    assert pcnsl["groups"] == ["pcnsl/img001", "pcnsl/img002", "pcnsl/p7", "pcnsl/p7"]
    for record, label in ((gbm, 0), (pcnsl, 1)):
        assert record["features"].shape == (len(record["paths"]), 24, 32, 3)
        assert record["dtypes"] == (np.uint8, np.uint8)
        assert record["labels"].tolist() == [label] * len(record["paths"])
        assert record["chunks"] == (1, 24, 32, 3)
        assert record["compression"] == "gzip"
        for row, path in enumerate(record["paths"]):
            np.testing.assert_array_equal(record["features"][row], load_image(data_dir / path, (24, 32)))
    with h5py.File(output, "r") as h5file:
        assert {
            k: (v.item() if hasattr(v, "item") else v) for k, v in h5file.attrs.items()
        } == hdf5_root_attributes()
        assert json.loads(h5file.attrs["class_labels"]) == {"gbm": 0, "pcnsl": 1}

    # Warnings name each skipped file; the summary counts images, patients and skips.
    assert str(data_dir / "gbm" / "p9" / "broken.png") in err
    assert str(data_dir / "pcnsl" / "notes.txt") in err
    assert ".DS_Store" not in err  # hidden files are only counted
    assert "9 images" in err
    assert "gbm   (label 0):     5 images,    3 patients" in err
    assert "pcnsl (label 1):     4 images,    3 patients" in err
    assert "skipped 8 files (4 hidden, 2 not an image, 2 unreadable)" in err
    assert files_in(tmp_path) == ["data", "out.h5"]  # no temporary file left


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_parallel_workers_write_the_same_pixels(data_dir, tmp_path, start_method, capsys):
    """Workers write what one process writes, forked by a process with no other thread (a
    fresh step0 process; in this one, the timeout's and tqdm's threads run), from a
    forkserver by a process with threads (TensorFlow, a notebook)."""
    assert run(data_dir, tmp_path / "one.h5") == 1
    argv = [str(data_dir), str(tmp_path / "two.h5"), "--size", "24", "32", "--workers", "2"]
    if start_method == "fork":
        result = subprocess.run(
            [sys.executable, "step0_convert_images_to_hdf5.py", *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 1, result.stderr[-2000:]
        err = result.stderr
    else:
        stop = threading.Event()
        threading.Thread(target=stop.wait, daemon=True).start()
        try:
            capsys.readouterr()
            assert step0.main(argv) == 1
        finally:
            stop.set()
        err = capsys.readouterr().err
    assert f"2 worker processes ({start_method})" in err  # the start method the pool used
    for folder in ("gbm", "pcnsl"):
        one, two = read_class(tmp_path / "one.h5", folder), read_class(tmp_path / "two.h5", folder)
        np.testing.assert_array_equal(one["features"], two["features"])
        assert one["paths"] == two["paths"] and one["groups"] == two["groups"]


@pytest.mark.parametrize("compression", ["lzf", "none"])
def test_other_compressions(data_dir, tmp_path, compression):
    assert run(data_dir, tmp_path / "gz.h5") == 1
    assert run(data_dir, tmp_path / "other.h5", "--compression", compression) == 1
    other = read_class(tmp_path / "other.h5", "gbm")
    assert other["compression"] == (None if compression == "none" else compression)
    assert other["chunks"] == (1, 24, 32, 3)
    np.testing.assert_array_equal(other["features"], read_class(tmp_path / "gz.h5", "gbm")["features"])


def test_strict_stops_at_a_corrupt_image_and_writes_nothing(data_dir, tmp_path, capsys):
    for folder in ("gbm", "pcnsl"):
        (data_dir / folder / "notes.txt").unlink()
    output = tmp_path / "out.h5"
    assert run(data_dir, output, "--strict") == 2
    captured = capsys.readouterr().err
    err = last_line(captured)
    assert err.startswith("error: ") and "Traceback" not in captured
    assert str(data_dir / "gbm" / "p9" / "broken.png") in err
    assert files_in(tmp_path) == ["data"]


def test_strict_stops_at_a_non_image_file(data_dir, tmp_path, capsys):
    assert run(data_dir, tmp_path / "out.h5", "--strict") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "notes.txt" in err and "\n" not in err
    assert files_in(tmp_path) == ["data"]


def test_strict_accepts_hidden_files(data_dir, tmp_path):
    for path in data_dir.rglob("*"):
        if path.name in ("notes.txt", "broken.png"):
            path.unlink()
    assert run(data_dir, tmp_path / "out.h5", "--strict") == 0
    assert len(read_class(tmp_path / "out.h5", "gbm")["paths"]) == 5


@pytest.mark.parametrize("problem", ["missing", "empty", "only_junk", "all_unreadable"])
def test_missing_or_empty_class_folder_is_an_error(data_dir, tmp_path, capsys, problem):
    pcnsl = data_dir / "pcnsl"
    for path in sorted(pcnsl.rglob("*"), reverse=True):
        if problem == "all_unreadable" and path.name in ("broken.png", "p9"):
            continue
        path.unlink() if path.is_file() else path.rmdir()
    if problem == "missing":
        pcnsl.rmdir()
    elif problem == "only_junk":
        (pcnsl / "notes.txt").write_text("x")
        (pcnsl / ".DS_Store").write_text("x")
    assert run(data_dir, tmp_path / "out.h5") == 2
    err = capsys.readouterr().err
    assert str(pcnsl) in err
    assert {"missing": "no such folder", "all_unreadable": "could be read"}.get(problem, "no images") in err
    assert files_in(tmp_path) == ["data"]


def test_bad_data_or_output_folder(tmp_path, capsys):
    assert step0.main([str(tmp_path / "nope"), str(tmp_path / "out.h5")]) == 2
    assert "nope: no such folder" in capsys.readouterr().err
    (tmp_path / "data").mkdir()
    assert step0.main([str(tmp_path / "data"), str(tmp_path / "missing" / "out.h5")]) == 2
    assert (
        last_line(capsys.readouterr().err)
        == f"error: {tmp_path / 'missing'}: no such folder for the output file"
    )


def test_existing_size_needs_overwrite_and_other_sizes_are_kept(data_dir, tmp_path, capsys):
    output = tmp_path / "out.h5"
    assert run(data_dir, output) == 1
    before = read_class(output, "gbm")
    capsys.readouterr()

    # Same size again: refused, file untouched.
    snapshot = output.read_bytes()
    assert run(data_dir, output) == 2
    assert "already holds size 24_32" in capsys.readouterr().err
    assert output.read_bytes() == snapshot

    # Another size: added, the first one kept as it was.
    assert step0.main([str(data_dir), str(output), "--size", "16", "16", "--workers", "1"]) == 1
    with h5py.File(output, "r") as h5file:
        assert sorted(h5file["gbm"]) == ["16_16", "24_32"] and sorted(h5file["pcnsl"]) == ["16_16", "24_32"]
        assert h5file["gbm/16_16/features"].shape == (5, 16, 16, 3)
    np.testing.assert_array_equal(read_class(output, "gbm")["features"], before["features"])

    # --overwrite replaces that size only (here: with one patient fewer).
    for path in (data_dir / "gbm" / "patient01").iterdir():
        path.unlink()
    assert run(data_dir, output, "--overwrite") == 1
    after = read_class(output, "gbm")
    assert after["groups"] == ["gbm/img001", "gbm/patient02", "gbm/patient02"]
    assert after["features"].shape == (3, 24, 32, 3)
    with h5py.File(output, "r") as h5file:
        assert h5file["gbm/16_16/features"].shape == (5, 16, 16, 3)
    assert files_in(tmp_path) == ["data", "out.h5"]


def test_output_that_is_not_hdf5_is_refused(data_dir, tmp_path, capsys):
    output = tmp_path / "out.h5"
    output.write_text("my notes")
    assert run(data_dir, output, "--overwrite") == 2
    assert "not an HDF5 file" in capsys.readouterr().err
    assert output.read_text() == "my notes"


@pytest.mark.parametrize(
    ("failure", "workers"), [(RuntimeError, "1"), (KeyboardInterrupt, "1"), (KeyboardInterrupt, "2")]
)
def test_failure_mid_way_leaves_the_old_file_untouched(data_dir, tmp_path, monkeypatch, failure, workers):
    output = tmp_path / "out.h5"
    assert step0.main([str(data_dir), str(output), "--size", "16", "16", "--workers", "1"]) == 1
    snapshot = output.read_bytes()
    real_write_image = hdf5.write_image
    written = []

    def failing_write_image(features, row, payload):
        if len(written) == 3:
            raise failure("disk full" if failure is RuntimeError else None)
        written.append(row)
        real_write_image(features, row, payload)

    monkeypatch.setattr(hdf5, "write_image", failing_write_image)
    argv = [str(data_dir), str(output), "--size", "24", "32", "--workers", workers]
    if failure is KeyboardInterrupt:
        assert step0.main(argv) == 130
    else:
        with pytest.raises(RuntimeError, match="disk full"):
            step0.main(argv)
    assert len(written) == 3
    assert output.read_bytes() == snapshot
    assert files_in(tmp_path) == ["data", "out.h5"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_in_a_real_run_leaves_the_old_file_untouched(tmp_path, processes):
    """A real SIGINT, sent once the progress bar shows a written row, to a conversion of
    3216 images at 512x512 (tens of seconds of work): it cannot finish before the signal lands."""
    data = tmp_path / "data"
    argv = [str(data), "--patients-per-class", "4", "--slices-per-patient", "2", "--size", "64"]
    assert make_demo_data.main(argv) == 0
    output = tmp_path / "out.h5"
    assert step0.main([str(data), str(output), "--size", "16", "16", "--workers", "1"]) == 0
    snapshot = output.read_bytes()
    for source in sorted(data.glob("*/*/*.png")):  # 200 more names for each slice (hard links)
        for copy in range(200):
            os.link(source, source.with_name(f"{source.stem}_copy{copy:03d}.png"))
    command = [sys.executable, str(ROOT / "step0_convert_images_to_hdf5.py"), str(data), str(output)]
    env = {**os.environ, "GBMPCNSL_PROGRESS_SECONDS": "0"}  # a progress line per image on a pipe
    process = processes.popen(
        [*command, "--size", "512", "512", "--workers", "2"], stderr=subprocess.PIPE, env=env
    )
    # the progress line "images: k/3216 [...]" on stderr, k rows written: wait for k >= 1
    err = read_until(process.stderr, lambda err: re.search(rb"[1-9]\d*/3216 \[", err), timeout=240)
    send_ctrl_c(process)
    _, rest = process.communicate(timeout=60)
    err = (err + rest).decode()
    assert process.returncode == 130, f"exit {process.returncode}: {err[-2000:]}"
    assert last_line(err) == "interrupted" and "Traceback" not in err
    assert output.read_bytes() == snapshot
    assert files_in(tmp_path) == ["data", "out.h5"]


def test_original_layout_file_is_read_and_kept(data_dir, tmp_path):
    output = tmp_path / "original.h5"
    with h5py.File(output, "w") as h5file:  # what the original step0 wrote: features + labels
        for folder, label, count in (("gbm", 0, 3), ("pcnsl", 1, 2)):
            h5file.create_dataset(
                f"/{folder}/24_32/features", data=np.full((count, 24, 32, 3), 7, np.uint8), compression="gzip"
            )
            h5file.create_dataset(
                f"/{folder}/24_32/labels", data=np.full(count, label, np.uint8), compression="gzip"
            )
    with h5py.File(output, "r") as h5file:
        records, has_groups = read_hdf5_index(h5file, (24, 32))
    assert not has_groups
    assert [(r["class"], r["label"], r["path"]) for r in records] == [
        ("gbm", 0, "gbm/0"),
        ("gbm", 0, "gbm/1"),
        ("gbm", 0, "gbm/2"),
        ("pcnsl", 1, "pcnsl/0"),
        ("pcnsl", 1, "pcnsl/1"),
    ]
    assert len({r["group"] for r in records}) == 5  # each slice its own group

    # step0 adds a size to such a file and leaves the original datasets as they were.
    assert step0.main([str(data_dir), str(output), "--size", "16", "16", "--workers", "1"]) == 1
    with h5py.File(output, "r") as h5file:
        assert sorted(h5file["gbm/24_32"]) == ["features", "labels"]
        assert (h5file["gbm/24_32/features"][:] == 7).all()
        records, has_groups = read_hdf5_index(h5file, (16, 16))
    assert has_groups and len(records) == 9


PEAK_RSS_SCRIPT = """
import resource, sys
import step0_convert_images_to_hdf5 as step0
assert step0.main(sys.argv[1:]) == 0
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss units differ by platform")
@pytest.mark.timeout(300)  # two step0 subprocesses of up to 120 s
def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """N and 4N images at 256x256 (192 KiB each): the whole-dataset approach would add
    about 3N x 192 KiB (28 MiB here); streaming must stay well below half of that."""
    peaks = {}
    for patients in (5, 20):  # x 5 slices x 2 classes = 50 and 200 images
        data = tmp_path / f"data{patients}"
        argv = [str(data), "--patients-per-class", str(patients), "--size", "64", "--seed", "3"]
        assert make_demo_data.main(argv) == 0
        command = [sys.executable, "-c", PEAK_RSS_SCRIPT, str(data), str(tmp_path / f"{patients}.h5")]
        command += ["--size", "256", "256", "--workers", "1"]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        peaks[patients] = int(result.stdout.split()[-1]) / 1024  # MiB
        with h5py.File(tmp_path / f"{patients}.h5", "r") as h5file:
            assert h5file["gbm/256_256/features"].shape[0] == patients * 5
    whole_dataset_growth = 150 * 256 * 256 * 3 / 2**20
    assert peaks[20] - peaks[5] < 0.5 * whole_dataset_growth, peaks


def test_step0_failure_and_interrupt_leave_nothing_new(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    for folder in ("gbm", "pcnsl"):
        for patient in range(2):
            save_png(data / folder / f"p{patient}" / "s.png", 60 + patient)
    (data / "pcnsl" / "p1" / "notes.txt").write_text("x")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = [str(data), str(out_dir / "x.h5"), "--size", "8", "8", "--workers", "1"]
    assert step0.main([*argv, "--strict"]) == 2  # a data check fails
    assert list(out_dir.iterdir()) == []

    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(hdf5, "write_image", ctrl_c)
    assert step0.main(argv) == 130  # Ctrl-C while writing
    assert list(out_dir.iterdir()) == []
    assert last_line(capsys.readouterr().err) == "interrupted"
