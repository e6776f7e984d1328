"""Benchmark step0 (images -> HDF5) against the original implementation's approach.

    python benchmarks/bench_convert.py [--images 150] [--repeat 3] [--size 380 380] [--work-dir DIR]
                                       [--dicom-images 300] [--dicom-size 256]

Converts the same folder of demo JPEGs (630x630, from demo/make_demo_data.py) twice,
with N and with 4N images:
- ours: step0_convert_images_to_hdf5.py, run as a user runs it (worker pool, streamed to disk, gzip per chunk);
- original: a faithful re-implementation of the original step0 (single process, every
  image read with PIL convert("RGB") + LANCZOS resize into one preallocated uint8 array
  per class, then written with h5py create_dataset(data=..., compression="gzip")).
Each run is its own subprocess; wall time includes interpreter start-up and imports, and
peak memory is the largest sum of RSS over the run's process tree (workers included),
sampled every 10 ms with psutil. Runs alternate and the fastest of --repeat counts, so
that other load on a shared machine favours neither side.

DICOM row (--dicom-images M, 0 to skip): step0 on the same demo slices written as 8-bit
PNG files and as 16-bit DICOM series (demo/make_demo_data.py --format png / dicom, one
series per patient, --dicom-size pixels square), M and 4M slices, alternating in one run:
images/s and peak RSS of each, and the DICOM / PNG rate ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent

ORIGINAL = """
import sys
from pathlib import Path
import h5py
import numpy as np
from PIL import Image

def process_one_image(filename, size):
    img = Image.open(filename)
    img = img.convert("RGB")
    img = img.resize(size=size, resample=Image.LANCZOS)
    return np.asarray(img)

def process_directory_of_images(path, size, label):
    files = sorted(p for p in Path(path).rglob("*") if p.is_file())  # the original: path.glob("*")
    x = np.zeros((len(files), *size, 3), dtype=np.uint8)
    for j, f in enumerate(files):
        x[j] = process_one_image(f, size=size)
    return x, np.zeros(len(files), dtype=np.uint8) + label

data, output, height, width = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = f"{height}_{width}"
x0, y0 = process_directory_of_images(data / "gbm", size=(width, height), label=0)
x1, y1 = process_directory_of_images(data / "pcnsl", size=(width, height), label=1)
with h5py.File(output, mode="a") as f:
    f.create_dataset(f"/gbm/{s}/features", data=x0, compression="gzip")
    f.create_dataset(f"/gbm/{s}/labels", data=y0, compression="gzip")
    f.create_dataset(f"/pcnsl/{s}/features", data=x1, compression="gzip")
    f.create_dataset(f"/pcnsl/{s}/labels", data=y1, compression="gzip")
"""


def measure(command: list[str]) -> tuple[float, float]:
    """Run a command; return (wall seconds, peak summed RSS of its process tree in MiB)."""
    start = time.perf_counter()
    process = psutil.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while process.poll() is None:
        try:
            tree = [process, *process.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass  # a worker ended between listing and reading it
        time.sleep(0.01)
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed:\n{process.stderr.read().decode()}")
    return wall, peak / 2**20


def make_folders(work_dir: Path, images: int) -> dict[int, Path]:
    """DATA folders with N and 4N distinct 630x630 demo JPEGs (hard links into one cache).

    The 4N images come from two generator runs (seeds 0 and 1, run side by side); the
    N-image folder is the first N/10 patients per class of seed 0."""
    patients = images // 5  # per class and seed: 2 seeds x 2 classes x patients x 5 slices = 4N
    cache = {seed: work_dir / f"demo630_p{patients}_s{seed}" for seed in (0, 1)}
    runs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "demo" / "make_demo_data.py"), str(folder), "--size", "630"]
            + ["--format", "jpg", "--patients-per-class", str(patients), "--seed", str(seed)]
        )
        for seed, folder in cache.items()
        if not (folder / "pcnsl").is_dir()
    ]
    if any(run.wait() != 0 for run in runs):
        raise SystemExit("demo data generation failed")
    folders = {}
    for count in (images, 4 * images):
        folder = work_dir / f"data{count}"
        shutil.rmtree(folder, ignore_errors=True)
        for kind in ("gbm", "pcnsl"):
            sources = [p for seed in (0, 1) for p in sorted((cache[seed] / kind).iterdir())]
            for patient in sources[: count // 10]:
                (folder / kind / patient.name).mkdir(parents=True)
                for image in patient.iterdir():
                    os.link(image, folder / kind / patient.name / image.name)
        folders[count] = folder
    return folders


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--images",
        type=int,
        default=150,
        help="N, a multiple of 10 (then 4N); default 150; 0: only the DICOM row",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the fastest counts (default 3)")
    parser.add_argument("--size", type=int, nargs=2, default=(380, 380), metavar=("H", "W"))
    parser.add_argument(
        "--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "gbmpcnsl-bench-convert"
    )
    parser.add_argument(
        "--dicom-images", type=int, default=300, help="M for the DICOM vs PNG row, a multiple of 10 (0: skip)"
    )
    parser.add_argument("--dicom-size", type=int, default=256, help="demo slice size for the DICOM row")
    args = parser.parse_args(argv)
    if args.dicom_images % 10:
        parser.error("--dicom-images must be a multiple of 10")
    if args.images % 10:
        parser.error("--images must be a multiple of 10")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    height, width = args.size
    commands = {
        "original": [sys.executable, "-c", ORIGINAL, "{data}", "{output}", str(height), str(width)],
        "ours": [
            sys.executable,
            str(ROOT / "step0_convert_images_to_hdf5.py"),
            "{data}",
            "{output}",
            "--size",
            str(height),
            str(width),
        ],
    }
    if args.images == 0:  # the DICOM row only
        print(
            f"machine: {os.cpu_count()} CPUs ({cpu_model()}), load average before: {os.getloadavg()[0]:.2f}"
        )
        dicom_row(args, commands["ours"])
        return 0
    folders = make_folders(args.work_dir, args.images)

    print(f"machine: {os.cpu_count()} CPUs ({cpu_model()}), load average before: {os.getloadavg()[0]:.2f}")
    rows = []
    for count, folder in folders.items():
        best: dict[str, tuple[float, float]] = {}
        for repeat in range(args.repeat):  # alternating, fastest of --repeat: the machine may be shared
            for name, template in commands.items():
                output = args.work_dir / f"{name}{count}.h5"
                output.unlink(missing_ok=True)
                command = [
                    arg.format(data=folder, output=output) if arg.startswith("{") else arg for arg in template
                ]
                wall, peak = measure(command)
                print(
                    f"{name:>8} {count:5d} images, run {repeat + 1}: {wall:6.1f} s, peak RSS {peak:5.0f} MiB"
                )
                best_wall, best_peak = best.get(name, (float("inf"), 0.0))
                best[name] = (min(wall, best_wall), max(peak, best_peak))
        rows.append((count, {name: (count / wall, peak) for name, (wall, peak) in best.items()}))

    print(f"\nload average after: {os.getloadavg()[0]:.2f}\n")
    print("| images | original images/s | ours images/s | speed-up | original peak RSS | ours peak RSS |")
    print("|---:|---:|---:|---:|---:|---:|")
    for count, results in rows:
        (orig_speed, orig_peak), (our_speed, our_peak) = results["original"], results["ours"]
        print(
            f"| {count} | {orig_speed:.1f} | {our_speed:.1f} | {our_speed / orig_speed:.2f}x "
            f"| {orig_peak:.0f} MiB | {our_peak:.0f} MiB |"
        )
    (small, small_results), (large, large_results) = rows
    for name in ("original", "ours"):
        growth = large_results[name][1] - small_results[name][1]
        print(f"{name}: peak RSS {small} -> {large} images: {growth:+.0f} MiB")
    if args.dicom_images:
        dicom_row(args, commands["ours"])
    return 0


def make_format_folders(work_dir: Path, images: int, size: int) -> dict[tuple[str, int], Path]:
    """The same demo slices as PNG files and as DICOM series, M and 4M of them: 4M are
    generated (both formats side by side), M are the first M/10 patients per class of
    those (hard links), as make_folders does."""
    large = {fmt: work_dir / f"demo{size}_{fmt}_{4 * images}" for fmt in ("png", "dicom")}
    runs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "demo" / "make_demo_data.py"), str(folder), "--size", str(size)]
            + ["--format", fmt, "--patients-per-class", str(4 * images // 10)]
        )
        for fmt, folder in large.items()
        if not (folder / "pcnsl").is_dir()
    ]
    if any(run.wait() != 0 for run in runs):
        raise SystemExit("demo data generation failed")
    folders = {}
    for fmt, source in large.items():
        folders[fmt, images] = subset = work_dir / f"{fmt}{size}_{images}"
        shutil.rmtree(subset, ignore_errors=True)
        for kind in ("gbm", "pcnsl"):
            for patient in sorted((source / kind).iterdir())[: images // 10]:
                (subset / kind / patient.name).mkdir(parents=True)
                for file in patient.iterdir():
                    os.link(file, subset / kind / patient.name / file.name)
        folders[fmt, 4 * images] = source
    return folders


def dicom_row(args, template: list[str]) -> None:
    """step0 on PNG vs 16-bit DICOM series of the same slices: images/s, peak RSS, ratio."""
    folders = make_format_folders(args.work_dir, args.dicom_images, args.dicom_size)
    height, width = args.size
    best: dict[tuple[str, int], tuple[float, float]] = {}
    for repeat in range(args.repeat):
        for (fmt, count), folder in folders.items():
            output = args.work_dir / f"{fmt}{count}.h5"
            output.unlink(missing_ok=True)
            command = [
                arg.format(data=folder, output=output) if arg.startswith("{") else arg for arg in template
            ]
            wall, peak = measure(command)
            print(f"{fmt:>8} {count:5d} slices, run {repeat + 1}: {wall:6.1f} s, peak RSS {peak:5.0f} MiB")
            best_wall, best_peak = best.get((fmt, count), (float("inf"), 0.0))
            best[fmt, count] = (min(wall, best_wall), max(peak, best_peak))
    print(f"\nload average after: {os.getloadavg()[0]:.2f}\n")
    print(
        f"| slices ({args.dicom_size}px -> {height}x{width}) | PNG images/s | DICOM images/s | DICOM / PNG | PNG peak RSS | DICOM peak RSS |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for count in (args.dicom_images, 4 * args.dicom_images):
        (png_wall, png_peak), (dicom_wall, dicom_peak) = best["png", count], best["dicom", count]
        print(
            f"| {count} | {count / png_wall:.1f} | {count / dicom_wall:.1f} | {png_wall / dicom_wall:.2f}x "
            f"| {png_peak:.0f} MiB | {dicom_peak:.0f} MiB |"
        )


if __name__ == "__main__":
    sys.exit(main())
