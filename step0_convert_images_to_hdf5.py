"""Step 0: convert a folder of GBM / PCNSL slices into one HDF5 file for training.

    python step0_convert_images_to_hdf5.py DATA OUT.h5 [--size 380 380] [--workers N]
        [--compression gzip|lzf|none] [--strict] [--overwrite] [--verbose]

DATA holds gbm/ and pcnsl/. Images (.jpg .jpeg .png .tif .tiff .bmp, any case) sit either
in a folder per patient (DATA/gbm/patient017/slice04.png; the folder name is the patient
id, deeper sub-folders belong to that patient) or directly in the class folder
(DATA/gbm/img001.png; each such file is its own group, named "gbm/img001").

Every image is read with gbmpcnsl_common.load_image (the loader step2 and step5 use too:
convert("RGB") and a LANCZOS resize to H x W, 16-bit and float images windowed to 0-255
first) and written to

    /gbm/{H}_{W}/features    uint8 (N, H, W, 3), one image per chunk, compressed
    /gbm/{H}_{W}/labels      uint8 (N,), all 0
    /gbm/{H}_{W}/paths       UTF-8 source paths relative to DATA (posix)
    /gbm/{H}_{W}/groups      UTF-8 patient / group ids
    /pcnsl/{H}_{W}/...       the same, labels all 1

Images are decoded and resized by a pool of worker processes and streamed to disk, so
memory stays flat however many images there are. Hidden files are skipped; other files
and unreadable images are skipped with a warning (an error with --strict); every skip is
counted in the summary on stderr. OUT.h5 is written to a temporary file beside it and
renamed at the end: an interrupted or failed run leaves the previous OUT.h5 untouched.
Sizes already in OUT.h5 are kept; converting a size that is already there is an error
unless --overwrite.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gbmpcnsl_common import (
    CLASS_FOLDERS,
    CLASS_LABELS,
    DEFAULT_SIZE,
    IMAGE_EXTENSIONS,
    UserError,
    hdf5_root_attributes,
    load_image,
    log,
    patient_id,
    run_main,
    setup_logging,
    single_slice_groups_warning,
    size_key,
)

GZIP_LEVEL = 4  # h5py's default gzip level


# ---------------------------------------------------------------------------- scan
def scan_class_folder(data_dir: Path, folder: str) -> tuple[list[tuple[Path, str]], dict[str, list[str]]]:
    """Candidate images of one class as (path, group id), sorted by path, and the files
    skipped while scanning: {"hidden": [...], "not an image": [...]} (paths relative to DATA).
    """
    class_dir = data_dir / folder
    if not class_dir.is_dir():
        raise UserError(f"{class_dir}: no such folder (DATA must hold gbm/ and pcnsl/)")
    candidates: list[tuple[Path, str]] = []
    skipped: dict[str, list[str]] = {"hidden": [], "not an image": []}
    for path in sorted(class_dir.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(class_dir)
        if any(part.startswith(".") for part in relative.parts):  # .DS_Store, ._x.png, .git/...
            skipped["hidden"].append(path.relative_to(data_dir).as_posix())
        elif path.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped["not an image"].append(path.relative_to(data_dir).as_posix())
        else:  # the one patient rule: gbm/<patient folder>, or gbm/<stem> for a flat file
            candidates.append((path, patient_id(path.relative_to(data_dir).as_posix())))
    if not candidates:
        raise UserError(
            f"{class_dir}: no images ({' '.join(IMAGE_EXTENSIONS)}) directly inside or in patient folders"
        )
    return candidates, skipped


# ---------------------------------------------------------------------------- workers
def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the main process, which cleans up and stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def encode_image(path: Path, size: tuple[int, int], compression: str) -> tuple[object, str | None]:
    """Load one image and encode it as the HDF5 chunk it will become.

    Returns (payload, None) or (None, error message). The payload is the gzip-compressed
    (zlib) or raw chunk bytes, written as is with write_direct_chunk, so compression runs
    in the workers; for lzf (no Python encoder) it is the uint8 array itself.
    """
    try:
        pixels = load_image(path, size)
    except UserError as error:
        return None, str(error)
    if compression == "gzip":
        return zlib.compress(pixels.tobytes(), GZIP_LEVEL), None
    if compression == "none":
        return pixels.tobytes(), None
    return pixels, None


@contextlib.contextmanager
def worker_pool(workers: int):
    """A started process pool of `workers` processes, or None for 1 (work in this process).

    Started before the output file is opened and before the progress bar's thread exists,
    so that on Linux the workers can simply be forked; a caller that already runs threads
    (TensorFlow in a notebook or test session) gets forkserver workers, which start clean.
    """
    if workers == 1:
        yield None
        return
    if sys.platform == "linux" and threading.active_count() == 1:
        context = multiprocessing.get_context("fork")
    elif "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["gbmpcnsl_common", "h5py"])
    else:
        context = multiprocessing.get_context("spawn")
    executor = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_ignore_sigint)
    try:
        executor.submit(os.getpid).result()  # start the workers now
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def encoded_images(paths: list[Path], size: tuple[int, int], compression: str, executor, max_in_flight: int):
    """Yield encode_image results in input order, with at most `max_in_flight` submitted
    and not yet consumed, so that a slow disk never lets results pile up in memory.
    executor None: load in this process."""
    if executor is None:
        for path in paths:
            yield encode_image(path, size, compression)
        return
    in_flight: collections.deque = collections.deque()
    pending = iter(paths)
    try:
        for path in pending:
            in_flight.append(executor.submit(encode_image, path, size, compression))
            if len(in_flight) >= max_in_flight:
                break
        while in_flight:
            result = in_flight.popleft().result()
            next_path = next(pending, None)
            if next_path is not None:
                in_flight.append(executor.submit(encode_image, next_path, size, compression))
            yield result
    finally:
        for future in in_flight:  # on an error or Ctrl-C: drop the queued work
            future.cancel()


# ---------------------------------------------------------------------------- HDF5
def write_image(features: h5py.Dataset, row: int, payload: object) -> None:
    """Store one encoded image as row `row` of the features dataset."""
    if isinstance(payload, bytes):
        features.id.write_direct_chunk((row, 0, 0, 0), payload)
    else:
        features[row] = payload


def existing_sizes(output: Path) -> set[str]:
    """Size groups ("380_380") present in an existing output file, for any class."""
    if not h5py.is_hdf5(output):
        raise UserError(f"{output}: exists and is not an HDF5 file (choose another output name)")
    try:
        with h5py.File(output, "r") as h5file:
            return {key for folder in CLASS_FOLDERS if folder in h5file for key in h5file[folder]}
    except OSError as error:  # e.g. locked by a running writer
        raise UserError(f"{output}: cannot open ({error})") from error


def copy_other_content(source: h5py.File, target: h5py.File, replaced_key: str) -> None:
    """Copy everything of an existing output except the size group being (re)written."""
    for name, value in source.attrs.items():
        target.attrs[name] = value
    for name in source:
        if name in CLASS_FOLDERS and isinstance(source[name], h5py.Group):
            group = target.require_group(name)
            for attr, value in source[name].attrs.items():
                group.attrs[attr] = value
            for child in source[name]:
                if child != replaced_key:
                    source.copy(source[name][child], group, name=child)
        else:
            source.copy(source[name], target, name=name)


def convert_images(
    h5file: h5py.File,
    candidates: dict[str, list[tuple[Path, str]]],
    data_dir: Path,
    size: tuple[int, int],
    compression: str,
    strict: bool,
    executor=None,
    max_in_flight: int = 1,
) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """Write /<class>/<H>_<W>/{features,labels,paths,groups} for every class, loading the
    images with `executor` (a process pool, or None: in this process). Returns
    {class: (images, patients)} and the unreadable files as "path: reason"."""
    height, width = size
    key = size_key(size)
    options = {"gzip": {"compression": "gzip", "compression_opts": GZIP_LEVEL}, "lzf": {"compression": "lzf"}}
    features = {}
    for folder in CLASS_FOLDERS:
        # Created with the final length; rows of skipped images are trimmed at the end
        # (unwritten chunks take no space), so the dataset never has gaps.
        features[folder] = h5file.create_group(f"{folder}/{key}").create_dataset(
            "features",
            shape=(len(candidates[folder]), height, width, 3),
            maxshape=(None, height, width, 3),
            dtype=np.uint8,
            chunks=(1, height, width, 3),
            **options.get(compression, {}),
        )
    jobs = [(folder, path, group_id) for folder in CLASS_FOLDERS for path, group_id in candidates[folder]]
    paths: dict[str, list[str]] = {folder: [] for folder in CLASS_FOLDERS}
    groups: dict[str, list[str]] = {folder: [] for folder in CLASS_FOLDERS}
    unreadable: list[str] = []
    results = encoded_images([path for _, path, _ in jobs], size, compression, executor, max_in_flight)
    progress = tqdm(total=len(jobs), desc="images", unit="img", file=sys.stderr, leave=False)
    with logging_redirect_tqdm():  # warnings print above the progress bar, not through it
        try:
            for (folder, path, group_id), (payload, error) in zip(jobs, results, strict=True):
                progress.update()
                if error is not None:
                    if strict:
                        raise UserError(f"{error}; --strict: nothing written")
                    log.warning("warning: skipped %s", error)
                    unreadable.append(error)
                    continue
                write_image(features[folder], len(paths[folder]), payload)
                paths[folder].append(path.relative_to(data_dir).as_posix())
                groups[folder].append(group_id)
        finally:
            progress.close()
            results.close()

    counts = {}
    for folder in CLASS_FOLDERS:
        count = len(paths[folder])
        if count == 0:
            raise UserError(
                f"{data_dir / folder}: none of its {len(candidates[folder])} images could be read"
            )
        features[folder].resize(count, axis=0)
        group = h5file[f"{folder}/{key}"]
        group.create_dataset("labels", data=np.full(count, CLASS_LABELS[folder], dtype=np.uint8))
        group.create_dataset("paths", data=paths[folder], dtype=h5py.string_dtype("utf-8"))
        group.create_dataset("groups", data=groups[folder], dtype=h5py.string_dtype("utf-8"))
        counts[folder] = (count, len(set(groups[folder])))
    return counts, unreadable


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data_dir", type=Path, metavar="DATA", help="folder holding gbm/ and pcnsl/")
    parser.add_argument("output", type=Path, metavar="OUT.h5", help="HDF5 file to write or add a size to")
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=DEFAULT_SIZE,
        metavar=("H", "W"),
        help="image size (default: 380 380)",
    )
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument(
        "--compression", choices=("gzip", "lzf", "none"), default="gzip", help="default: gzip"
    )
    parser.add_argument(
        "--strict", action="store_true", help="stop at the first unreadable or non-image file"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace this size if OUT.h5 already has it")
    parser.add_argument("--verbose", action="store_true", help="also list hidden files that were skipped")
    args = parser.parse_args(argv)
    if min(args.size) < 1:
        parser.error("--size: H and W must be positive")
    if args.workers is None:
        args.workers = (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        )
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    args.size = tuple(args.size)
    return args


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    data_dir: Path = args.data_dir
    output: Path = args.output
    key = size_key(args.size)
    start = time.perf_counter()

    # Check everything that can fail cheaply before decoding a single image.
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: no such folder")
    if not output.parent.is_dir():
        raise UserError(f"{output.parent}: no such folder for the output file")
    if output.exists() and key in existing_sizes(output) and not args.overwrite:
        raise UserError(f"{output}: already holds size {key} (use --overwrite to replace it)")
    scanned = {folder: scan_class_folder(data_dir, folder) for folder in CLASS_FOLDERS}
    skipped: dict[str, list[str]] = {"hidden": [], "not an image": [], "unreadable": []}
    for _, class_skipped in scanned.values():
        for reason, files in class_skipped.items():
            skipped[reason].extend(files)
    for name in skipped["not an image"]:
        if args.strict:
            raise UserError(
                f"{data_dir / name}: not a supported image ({' '.join(IMAGE_EXTENSIONS)}); --strict: nothing written"
            )
        log.warning("warning: skipped %s: not a supported image file", data_dir / name)
    for name in skipped["hidden"]:
        log.debug("skipped hidden file %s", data_dir / name)
    # Patients are numbered per class in most exports: gbm/001 and pcnsl/001 stay two patients.
    folder_names = [
        {group.split("/", 1)[1] for path, group in candidates if len(path.relative_to(data_dir).parts) > 2}
        for candidates, _ in scanned.values()
    ]
    for name in sorted(set.intersection(*folder_names)):
        log.warning(
            "warning: patient folder %s is under both gbm/ and pcnsl/; kept as two patients "
            "(gbm/%s, pcnsl/%s): rename one if they are the same person",
            name,
            name,
            name,
        )
    single_slice = single_slice_groups_warning(
        [g for candidates, _ in scanned.values() for _, g in candidates]
    )
    if single_slice:
        log.warning(single_slice)

    # Write a temporary file beside the output; rename it over the output only at the end.
    handle, temp_name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    os.close(handle)
    temp_path = Path(temp_name)
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(
        temp_path, output.stat().st_mode & 0o777 if output.exists() else 0o666 & ~umask
    )  # not mkstemp's 0600
    try:
        with worker_pool(args.workers) as executor, h5py.File(temp_path, "w") as h5file:
            if output.exists():  # keep the other sizes (and anything else) already in the file
                with h5py.File(output, "r") as previous:
                    copy_other_content(previous, h5file, key)
            h5file.attrs.update(hdf5_root_attributes())
            counts, skipped["unreadable"] = convert_images(
                h5file,
                {folder: candidates for folder, (candidates, _) in scanned.items()},
                data_dir,
                args.size,
                args.compression,
                args.strict,
                executor,
                max_in_flight=4 * args.workers,
            )
        os.replace(temp_path, output)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise

    # Summary (stderr): images and patients per class, skipped files by reason.
    elapsed = time.perf_counter() - start
    total = sum(written for written, _ in counts.values())
    log.info(
        f"wrote {output} [{key}, {args.compression}]: {total} images in {elapsed:.1f} s "
        f"({total / elapsed:.1f} images/s, {args.workers} workers)"
    )
    for folder, (written, patients) in counts.items():
        log.info(f"  {folder:<5} (label {CLASS_LABELS[folder]}): {written:5d} images, {patients:4d} patients")
    reasons = ", ".join(f"{len(files)} {reason}" for reason, files in skipped.items() if files)
    log.info(
        f"  skipped {sum(len(files) for files in skipped.values())} files"
        + (f" ({reasons})" if reasons else "")
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
