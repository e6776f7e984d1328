"""Step 0: convert a folder of GBM / PCNSL slices into one HDF5 file for training.

    python step0_convert_images_to_hdf5.py DATA OUT.h5 [--size 380 380] [--workers N]
        [--compression gzip|lzf|none] [--strict] [--overwrite] [--verbose]
        [--slices all|middle:N|A:B] [--lesion-masks PATTERN] [--min-lesion-pixels N]
        [--any-orientation]

DATA holds gbm/ and pcnsl/. Sources are 2-D images (.jpg .jpeg .png .tif .tiff .bmp, any
case), DICOM files (.dcm .dicom .ima or any file with the DICM preamble; a folder's
single-frame files form a series, ordered along the slice normal; a multi-frame file is a
volume) and NIfTI volumes (.nii, .nii.gz). They sit either in a folder per patient
(DATA/gbm/patient017/slice04.png; the folder name is the patient id, deeper sub-folders
belong to that patient) or directly in the class folder (DATA/gbm/img001.png; each such
source is its own group, named "gbm/img001"). Every slice of a volume is one HDF5 row,
its path "gbm/patient017/t1c.nii.gz#045" (k: 0-based, inferior to superior).

Every slice is read with gbmpcnsl_io.load_slice (the loader step2 and step5 use too:
2-D images through gbmpcnsl_common.load_image, i.e. convert("RGB") and a LANCZOS resize to
H x W, 16-bit and float images windowed to 0-255 first; DICOM and NIfTI through their
intensity rules, see the README) and written to

    /gbm/{H}_{W}/features    uint8 (N, H, W, 3), one image per chunk, compressed
    /gbm/{H}_{W}/labels      uint8 (N,), all 0
    /gbm/{H}_{W}/paths       UTF-8 source paths relative to DATA (posix)
    /gbm/{H}_{W}/groups      UTF-8 patient / group ids
    /pcnsl/{H}_{W}/...       the same, labels all 1

Images are decoded and resized by a pool of worker processes and streamed to disk, so
memory stays flat however many images there are. Hidden files are skipped; other files
and unreadable images are skipped with a warning (an error with --strict); every skip is
counted in the summary on stderr. Non-axial DICOM series and volumes are skipped the same
way unless --any-orientation. --slices picks slices of each volume and series;
--lesion-masks '{stem}_seg.nii.gz' keeps the slices of each NIfTI volume whose mask (beside
it) has at least --min-lesion-pixels labelled voxels. No DICOM header value is written
anywhere; two patient folders with DICOM files of one PatientID or StudyInstanceUID get a
warning (without the value). OUT.h5 is written to a temporary file beside it and
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
    log,
    patient_id,
    run_main,
    setup_logging,
    single_slice_groups_warning,
    size_key,
    split_slice_name,
)
from gbmpcnsl_io import (
    ALL_SLICES,
    add_slice_arguments,
    dicom_identities,
    find_slices,
    is_dicom,
    load_slice,
    slice_options,
    source_slice_names,
)

GZIP_LEVEL = 4  # h5py's default gzip level


# ---------------------------------------------------------------------------- scan
def scan_class_folder(
    data_dir: Path, folder: str, options: dict | None = None
) -> tuple[list[tuple[str, str]], dict[str, list[str]]]:
    """Slices of one class as (name relative to DATA, group id), in path order (a series
    in position order, a volume's slices "#k" in order), and the files skipped while
    scanning: {"hidden": [...], "not an image": [...], "non-axial": ["path: why", ...]}.
    `options`: find_slices keywords (--slices, --lesion-masks ...)."""
    class_dir = data_dir / folder
    if not class_dir.is_dir():
        raise UserError(f"{class_dir}: no such folder (DATA must hold gbm/ and pcnsl/)")
    options = options or {}
    found = find_slices([class_dir], **options)
    filtered = bool(found.skipped["non-axial"] or options.get("lesion_masks")) or (
        options.get("selection", ALL_SLICES) != ALL_SLICES
    )
    candidates = []
    for name in found.names:  # the one patient rule: gbm/<patient folder>, or gbm/<stem> for a flat source
        source, index = split_slice_name(name)
        relative = Path(source).relative_to(data_dir).as_posix() + (
            f"#{index:03d}" if index is not None else ""
        )
        candidates.append((relative, patient_id(relative)))
    skipped = {
        "hidden": [Path(p).relative_to(data_dir).as_posix() for p in found.skipped["hidden"]],
        "not an image": [Path(p).relative_to(data_dir).as_posix() for p in found.skipped["not an image"]],
        "non-axial": found.skipped["non-axial"],
    }
    if not candidates:
        raise UserError(
            f"{class_dir}: no images ({' '.join(IMAGE_EXTENSIONS)}), DICOM files or NIfTI volumes "
            "directly inside or in patient folders"
            + (" left by --slices, --lesion-masks and orientation" if filtered else "")
        )
    return candidates, skipped


def shared_dicom_identities(data_dir: Path, candidates: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(keyword, patient a, patient b) for patient folders whose DICOM files share a
    PatientID or StudyInstanceUID (one file per folder is read; values stay in memory)."""
    first_file: dict[tuple[str, str], Path] = {}
    for name, group_id in candidates:
        source = Path(split_slice_name(name)[0])
        if is_dicom(data_dir / source):
            first_file.setdefault((group_id, source.parent.as_posix()), data_dir / source)
    owners: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    for (group_id, _), path in first_file.items():
        for keyword, values in dicom_identities([path]).items():
            for value in values:
                owners[(keyword, value)].add(group_id)
    shared = set()
    for (keyword, _), groups in owners.items():
        ordered = sorted(groups)
        shared.update((keyword, a, b) for i, a in enumerate(ordered) for b in ordered[i + 1 :])
    return sorted(shared)


# ---------------------------------------------------------------------------- workers
def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the main process, which cleans up and stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def encode_image(path: str | Path, size: tuple[int, int], compression: str) -> tuple[object, str | None]:
    """Load one slice and encode it as the HDF5 chunk it will become.

    Returns (payload, None) or (None, error message). The payload is the gzip-compressed
    (zlib) or raw chunk bytes, written as is with write_direct_chunk, so compression runs
    in the workers; for lzf (no Python encoder) it is the uint8 array itself.
    """
    try:
        pixels = load_slice(path, size)
    except UserError as error:
        return None, str(error)
    if compression == "gzip":
        return zlib.compress(pixels.tobytes(), GZIP_LEVEL), None
    if compression == "none":
        return pixels.tobytes(), None
    return pixels, None


def encode_source(
    names: list[str], size: tuple[int, int], compression: str
) -> list[tuple[object, str | None]]:
    """encode_image for every slice of one source, in one worker: a volume is decoded once
    (gbmpcnsl_io keeps it while its slices are read)."""
    return [encode_image(name, size, compression) for name in names]


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
        context.set_forkserver_preload(["gbmpcnsl_common", "gbmpcnsl_io", "h5py"])
    else:
        context = multiprocessing.get_context("spawn")
    executor = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_ignore_sigint)
    try:
        executor.submit(os.getpid).result()  # start the workers now
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def encoded_images(
    sources: list[list[str]], size: tuple[int, int], compression: str, executor, max_in_flight: int
):
    """Yield encode_source results (a list per source: its slices) in input order, with at
    most `max_in_flight` sources submitted and not yet consumed, so that a slow disk never
    lets results pile up in memory. executor None: load in this process."""
    if executor is None:
        for names in sources:
            yield encode_source(names, size, compression)
        return
    in_flight: collections.deque = collections.deque()
    pending = iter(sources)
    try:
        for names in pending:
            in_flight.append(executor.submit(encode_source, names, size, compression))
            if len(in_flight) >= max_in_flight:
                break
        while in_flight:
            result = in_flight.popleft().result()
            next_names = next(pending, None)
            if next_names is not None:
                in_flight.append(executor.submit(encode_source, next_names, size, compression))
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
    candidates: dict[str, list[tuple[str, str]]],
    data_dir: Path,
    size: tuple[int, int],
    compression: str,
    strict: bool,
    executor=None,
    max_in_flight: int = 1,
) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """Write /<class>/<H>_<W>/{features,labels,paths,groups} for every class, loading the
    images with `executor` (a process pool, or None: in this process). Returns
    {class: (images, patients)} and the unreadable files as "path: reason". Candidates are
    (slice name relative to DATA, group id)."""
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
    jobs = [(folder, name, group_id) for folder in CLASS_FOLDERS for name, group_id in candidates[folder]]
    paths: dict[str, list[str]] = {folder: [] for folder in CLASS_FOLDERS}
    groups: dict[str, list[str]] = {folder: [] for folder in CLASS_FOLDERS}
    unreadable: list[str] = []
    sources = source_slice_names([name for _, name, _ in jobs])  # a volume's slices: one job
    results = encoded_images(
        [[str(data_dir / jobs[position][1]) for position in source] for source in sources],
        size,
        compression,
        executor,
        max_in_flight,
    )
    slice_results = (result for source_results in results for result in source_results)
    progress = tqdm(total=len(jobs), desc="images", unit="img", file=sys.stderr, leave=False)
    with logging_redirect_tqdm():  # warnings print above the progress bar, not through it
        try:
            for (folder, name, group_id), (payload, error) in zip(jobs, slice_results, strict=True):
                progress.update()
                if error is not None:
                    if strict:
                        raise UserError(f"{error}; --strict: nothing written")
                    log.warning("warning: skipped %s", error)
                    unreadable.append(error)
                    continue
                write_image(features[folder], len(paths[folder]), payload)
                paths[folder].append(name)
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
    add_slice_arguments(parser)
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
    options = slice_options(args)
    scanned = {folder: scan_class_folder(data_dir, folder, options) for folder in CLASS_FOLDERS}
    skipped: dict[str, list[str]] = {"hidden": [], "not an image": [], "non-axial": [], "unreadable": []}
    for _, class_skipped in scanned.values():
        for reason, files in class_skipped.items():
            skipped[reason].extend(files)
    for name in skipped["not an image"]:
        if args.strict:
            raise UserError(
                f"{data_dir / name}: not a supported image ({' '.join(IMAGE_EXTENSIONS)}); --strict: nothing written"
            )
        log.warning("warning: skipped %s: not a supported image file", data_dir / name)
    for line in skipped["non-axial"]:
        if args.strict:
            raise UserError(f"{line}; --strict: nothing written")
        log.warning("warning: skipped %s", line)
    for name in skipped["hidden"]:
        log.debug("skipped hidden file %s", data_dir / name)
    # Patients are numbered per class in most exports: gbm/001 and pcnsl/001 stay two patients.
    folder_names = [
        {
            group.split("/", 1)[1]
            for name, group in candidates
            if len(Path(split_slice_name(name)[0]).parts) > 2
        }
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
    # One person under two patient folders leaks across the split: say so, never the value.
    all_candidates = [candidate for candidates, _ in scanned.values() for candidate in candidates]
    for keyword, first, second in shared_dicom_identities(data_dir, all_candidates):
        log.warning(
            "warning: patient folders %s and %s hold DICOM files with the same %s: "
            "if they are one patient, put them in one folder",
            first,
            second,
            keyword,
        )

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
