"""Step 0's machinery: checking the paths, scanning (gbmpcnsl.scan), and converting every
slice to an HDF5 row with a pool of worker processes.

    convert(settings)   DATA/gbm + DATA/pcnsl (or --cohort FILE.csv) -> OUT.h5 (one size
                        group), summary on stderr

Images are decoded and resized by the workers and streamed to disk, so memory stays flat
however many images there are; OUT.h5 is written beside itself and renamed at the end.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import h5py

from gbmpcnsl.cli import Progress
from gbmpcnsl.files import atomic_write
from gbmpcnsl.hdf5 import (
    GZIP_LEVEL,
    SizeGroupWriter,
    copy_other_content,
    existing_sizes,
    hdf5_root_attributes,
    slice_selection_attribute,
)
from gbmpcnsl.pixels import load_slice
from gbmpcnsl.scan import Candidate, report_skipped, scan_class_folder, scan_cohort, warn_about_patients
from gbmpcnsl.sources import source_slice_names
from gbmpcnsl_common import (
    CLASS_FOLDERS,
    CLASS_LABELS,
    UserError,
    log,
    size_key,
)


@dataclass(frozen=True)
class ConvertSettings:
    """What step0 was asked to do (its parsed command line)."""

    data_dir: Path
    output: Path
    size: tuple[int, int]
    workers: int = 1
    compression: str = "gzip"  # "gzip", "lzf" or "none"
    strict: bool = False
    overwrite: bool = False
    slice_options: dict = field(default_factory=dict)  # find_slices keywords (--slices ...)
    cohort: Path | None = None  # --cohort FILE.csv: the sources instead of DATA's class folders


def convert(settings: ConvertSettings) -> int:
    """Step 0 from its settings: check cheaply, scan, warn, write OUT.h5, log the summary.
    Returns the number of unreadable sources skipped (step0 then exits 1). Raises
    UserError for an expected failure (nothing is then written)."""
    start = time.perf_counter()
    check_paths(settings)
    if settings.cohort is not None:
        candidates, skipped = scan_cohort(settings.cohort, settings.slice_options)
    else:
        scanned = {
            folder: scan_class_folder(settings.data_dir, folder, settings.slice_options)
            for folder in CLASS_FOLDERS
        }
        candidates = {folder: class_candidates for folder, (class_candidates, _) in scanned.items()}
        skipped = {}
        for _, class_skipped in scanned.values():
            for reason, files in class_skipped.items():
                skipped.setdefault(reason, []).extend(files)
    report_skipped(settings.data_dir, settings.strict, skipped)
    warn_about_patients(settings.data_dir, candidates)
    counts, skipped["unreadable"] = write_output(settings, candidates)
    log_summary(settings, counts, skipped, time.perf_counter() - start)
    return len(skipped["unreadable"])


# ---------------------------------------------------------------------------- scan
def check_paths(settings: ConvertSettings) -> None:
    """Everything that can fail cheaply, before a single image is decoded."""
    data_dir, output, key = settings.data_dir, settings.output, size_key(settings.size)
    if settings.cohort is not None and not settings.cohort.is_file():
        raise UserError(f"--cohort {settings.cohort}: no such file")
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: no such folder")
    if not output.parent.is_dir():
        raise UserError(f"{output.parent}: no such folder for the output file")
    if output.exists() and key in existing_sizes(output) and not settings.overwrite:
        raise UserError(f"{output}: already holds size {key} (use --overwrite to replace it)")


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
    (gbmpcnsl.pixels keeps it while its slices are read)."""
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
        context.set_forkserver_preload(["gbmpcnsl_common", "gbmpcnsl.convert", "h5py"])
    else:
        context = multiprocessing.get_context("spawn")
    executor = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_ignore_sigint)
    try:
        executor.submit(os.getpid).result()  # start the workers now
        log.info("%d worker processes (%s)", workers, context.get_start_method())
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


# ---------------------------------------------------------------------------- writing
def write_output(
    settings: ConvertSettings, candidates: dict[str, list[Candidate]]
) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """Write OUT.h5: the new size group, and every other size already in the file, to a
    temporary file beside it, renamed over it at the end (an interrupted or failed run
    leaves the previous OUT.h5 untouched). Returns convert_images' counts and unreadable files."""
    output, key = settings.output, size_key(settings.size)
    # Patient images: a new file private (files.private_mode), an old one keeps its mode.
    with atomic_write(output, private=True) as temporary:
        with worker_pool(settings.workers) as executor, h5py.File(temporary, "w") as h5file:
            if output.exists():  # keep the other sizes (and anything else) already in the file
                with h5py.File(output, "r") as previous:
                    copy_other_content(previous, h5file, key)
            h5file.attrs.update(hdf5_root_attributes())
            counts, unreadable = convert_images(
                h5file,
                candidates,
                settings.data_dir,
                settings.size,
                settings.compression,
                settings.strict,
                executor,
                max_in_flight=4 * settings.workers,
            )
            for folder in CLASS_FOLDERS:
                group = h5file[f"{folder}/{size_key(settings.size)}"]
                group.attrs["slice_selection"] = slice_selection_attribute(settings.slice_options)
    return counts, unreadable


def convert_images(
    h5file: h5py.File,
    candidates: dict[str, list[Candidate]],
    data_dir: Path,
    size: tuple[int, int],
    compression: str,
    strict: bool,
    executor=None,
    max_in_flight: int = 1,
) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """Write /<class>/<H>_<W>/{features,labels,paths,groups,series} for every class, loading the
    images with `executor` (a process pool, or None: in this process). Returns
    {class: (images, patients)} and the unreadable files as "path: reason". Candidates are
    (slice name relative to DATA, group id, series)."""
    writer = SizeGroupWriter(
        h5file, size, {folder: len(candidates[folder]) for folder in CLASS_FOLDERS}, compression
    )
    jobs = [(folder, *candidate) for folder in CLASS_FOLDERS for candidate in candidates[folder]]
    unreadable: list[str] = []
    sources = source_slice_names([job[1] for job in jobs])  # a volume's slices: one job
    results = encoded_images(
        [[str(data_dir / jobs[position][1]) for position in source] for source in sources],
        size,
        compression,
        executor,
        max_in_flight,
    )
    slice_results = (result for source_results in results for result in source_results)
    try:
        with Progress(len(jobs), "images") as progress:  # warnings print above a bar
            for (folder, name, group_id, series), (payload, error) in zip(jobs, slice_results, strict=True):
                progress.update()
                if error is not None:
                    if strict:
                        raise UserError(f"{error}; --strict: nothing written")
                    if error not in unreadable:  # a volume's slices share one message
                        log.warning("warning: skipped %s", error)
                    unreadable.append(error)
                    continue
                writer.add(folder, name, group_id, payload, series)
    finally:
        results.close()
    for folder in CLASS_FOLDERS:
        if writer.rows(folder) == 0:
            raise UserError(
                f"{data_dir / folder}: none of its {len(candidates[folder])} images could be read"
            )
    return writer.finish(), unreadable


def log_summary(
    settings: ConvertSettings,
    counts: dict[str, tuple[int, int]],
    skipped: dict[str, list[str]],
    elapsed: float,
) -> None:
    """The summary on stderr: images and patients per class, skipped files by reason."""
    total = sum(written for written, _ in counts.values())
    log.info(
        f"wrote {settings.output} [{size_key(settings.size)}, {settings.compression}]: {total} images in {elapsed:.1f} s "
        f"({total / elapsed:.1f} images/s, {settings.workers} workers)"
    )
    for folder, (written, patients) in counts.items():
        log.info(f"  {folder:<5} (label {CLASS_LABELS[folder]}): {written:5d} images, {patients:4d} patients")
    reasons = ", ".join(f"{len(files)} {reason}" for reason, files in skipped.items() if files)
    log.info(
        f"  skipped {sum(len(files) for files in skipped.values())} files"
        + (f" ({reasons})" if reasons else "")
    )
