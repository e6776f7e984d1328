"""The run folder: every file name step1 writes, run.json, history.csv, split.csv, the
backup a resume starts from, the checks before a run starts or resumes, and cv.json's lock.

A run folder holds one trained model; a cross-validation run folder holds `fold_<i>/`
run folders beside cv.json and the pooled out-of-fold predictions.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import errno
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import gbmpcnsl_common as common
from gbmpcnsl.config import TrainConfig
from gbmpcnsl.files import atomic_write, file_sha256, write_csv, write_json
from gbmpcnsl.hdf5 import hdf5_slice_selection
from gbmpcnsl.outputs import move_aside, refuse_unsafe_folder

if TYPE_CHECKING:
    from gbmpcnsl.data import Cohort
    from gbmpcnsl.distributed import Distribution

RUN_JSON = "run.json"  # settings, status, best checkpoint; the marker of a run folder
HISTORY_CSV = "history.csv"  # one row per finished epoch (Keras CSVLogger)
SPLIT_CSV = "split.csv"  # every slice's subset: train, val (selection) or test (held out)
BACKUP_DIR = "backup"  # Keras BackupAndRestore, for --resume
BACKUP_FILES = ("latest.weights.h5", "training_metadata.json")  # what BackupAndRestore writes
VAL_PREDICTIONS_CSV = "val_predictions.csv"
TEST_PREDICTIONS_CSV = "test_predictions.csv"  # a cross-validation fold's held-out patients
PREDICTION_COLUMNS = ("path", "prob_gbm", "prob_pcnsl", "label", "patient_id")
CV_JSON = "cv.json"  # a cross-validation run's folds and status
CV_LOCK = ".cv.lock"
OOF_PREDICTIONS_CSV = "oof_predictions.csv"
TENSORBOARD_DIR = "tensorboard"
SPLIT_COLUMNS = ("path", "group", "label", "subset")


@dataclass
class RunFolder:
    """A run folder and what a previous (interrupted) run left in it."""

    path: Path
    previous: dict | None = None  # run.json of the run being resumed
    replaced: Path | None = None  # the old run folder --overwrite moved aside (outputs.move_aside)

    @property
    def run_json(self) -> Path:
        return self.path / RUN_JSON

    @property
    def history_csv(self) -> Path:
        return self.path / HISTORY_CSV

    @property
    def backup_dir(self) -> Path:
        return self.path / BACKUP_DIR

    @property
    def split_csv(self) -> Path:
        return self.path / SPLIT_CSV


def now() -> str:
    """The local time, to the second, as run.json and cv.json record it."""
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")


def read_json(path: Path) -> dict:
    """A run.json or cv.json."""
    return json.loads(path.read_text())


def library_versions() -> dict:
    """The versions run.json records."""
    import h5py
    import keras
    import tensorflow as tf

    return {
        "python": sys.version.split()[0],
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "gbmpcnsl": common.__version__,
    }


# ---------------------------------------------------------------------------- history.csv
def read_history(path: Path) -> tuple[list[str], list[dict]]:
    """history.csv -> (header, rows); ([], []) if absent or empty."""
    if not path.is_file() or path.stat().st_size == 0:
        return [], []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = [row for row in reader if row.get("epoch", "").strip().isdigit()]
        return list(reader.fieldnames or []), rows


def truncate_history(path: Path, finished_epochs: int) -> None:
    """Keep the rows of the first `finished_epochs` epochs, once each: a process killed
    between CSVLogger's row and the backup leaves a row that the resumed run writes again."""
    header, rows = read_history(path)
    if not header:
        return
    kept = {}
    for row in rows:
        if int(row["epoch"]) < finished_epochs:
            kept[int(row["epoch"])] = row  # a repeated epoch keeps its last row
    with atomic_write(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(kept[epoch] for epoch in sorted(kept))


# ---------------------------------------------------------------------------- the backup
def backup_epoch(backup_dir: Path) -> int:
    """Epochs finished according to a usable Keras BackupAndRestore backup (0 if none).

    A process killed while the backup was being written leaves a broken newest generation:
    fall back to the previous one (BackupAndRestore(double_checkpoint=True) keeps it), or,
    with none, start over from the first epoch.
    """
    weights, metadata = (backup_dir / name for name in BACKUP_FILES)
    previous_weights, previous_metadata = (Path(f"{p}.bkp") for p in (weights, metadata))
    for candidate_weights, candidate_metadata in ((weights, metadata), (previous_weights, previous_metadata)):
        epoch = _backup_metadata_epoch(candidate_metadata)
        if epoch is not None and _readable_hdf5(candidate_weights):
            if candidate_weights != weights:
                common.log.warning(
                    "warning: the newest backup in %s is incomplete; using the one before it", backup_dir
                )
                shutil.copyfile(candidate_weights, weights)
                shutil.copyfile(candidate_metadata, metadata)
            return epoch
    if backup_dir.exists():
        common.log.warning(
            "warning: no complete backup in %s; training starts again from the first epoch", backup_dir
        )
        shutil.rmtree(backup_dir)
    return 0


def _backup_metadata_epoch(path: Path) -> int | None:
    try:
        return int(json.loads(path.read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _readable_hdf5(path: Path) -> bool:
    """True if every dataset of the HDF5 file reads back (a truncated write does not)."""
    import h5py

    try:
        with h5py.File(path, "r") as h5file:
            h5file.visititems(lambda name, item: item[()] if isinstance(item, h5py.Dataset) else None)
        return True
    except Exception:  # h5py raises OSError, KeyError, RuntimeError... for damaged files
        return False


# ---------------------------------------------------------------------------- split.csv
def split_rows(records: list[dict], subset: np.ndarray) -> list[tuple[str, str, int, str]]:
    """split.csv's rows: path, group, label, subset (train, val or test: data.split_subsets),
    in the HDF5 file's order."""
    return [
        (record["path"], record["group"], record["label"], str(role))
        for record, role in zip(records, subset, strict=True)
    ]


def write_split_csv(path: Path, records: list[dict], subset: np.ndarray) -> None:
    """split.csv: path, group, label, subset (train, val or test), in the HDF5 file's order."""
    write_csv(path, list(SPLIT_COLUMNS), split_rows(records, subset))


def read_split_csv(path: Path) -> list[tuple[str, str, int, str]]:
    """split.csv's rows, as split_rows gives them."""
    with open(path, newline="") as handle:
        return [(r["path"], r["group"], int(r["label"]), r["subset"]) for r in csv.DictReader(handle)]


# ---------------------------------------------------------------------------- checks
def check_run_folder(config: TrainConfig, run_dir: Path, writes_run: bool = True) -> RunFolder:
    """Is `run_dir` free (or resumable, or replaceable with --overwrite)? Checks only;
    nothing is created or deleted until the data and the model are known to be good.
    `writes_run` False: a worker that is not the chief, which leaves the checks (and the
    writing) to the chief."""
    run = RunFolder(run_dir)
    if config.resume:
        if not run.run_json.is_file():
            raise common.UserError(f"{run_dir}: no run.json, nothing to resume")
        previous = read_json(run.run_json)
        if previous.get("status") == "finished":
            raise common.UserError(
                f"{run_dir}: this run finished at {previous.get('end_time')}; nothing to resume"
            )
        changed = config.resume_changes(previous["arguments"])
        if changed:
            raise common.UserError(f"{run_dir}: --resume needs the run's own settings: {', '.join(changed)}")
        run.previous = previous
    elif not writes_run:
        pass
    elif run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        if not config.overwrite:
            raise common.UserError(f"{run_dir}: exists; pick a new run folder, --resume it or --overwrite it")
        if not run.run_json.is_file():
            raise common.UserError(f"{run_dir}: --overwrite only replaces a run folder (one with run.json)")
        refuse_unsafe_folder(run_dir, [config.hdf5])
    return run


def check_resume(config: TrainConfig, run: RunFolder, cohort: Cohort, subset: np.ndarray) -> None:
    """A resumed run must see the image size and the split it started with."""
    if run.previous is None:
        return
    if list(cohort.size) != run.previous["input_shape"][:2]:
        raise common.UserError(
            f"{run.path}: --resume needs the run's own image size {run.previous['input_shape'][0]} "
            f"{run.previous['input_shape'][1]} (now {cohort.size[0]} {cohort.size[1]})"
        )
    if run.split_csv.is_file() and read_split_csv(run.split_csv) != split_rows(cohort.records, subset):
        raise common.UserError(
            f"{run.split_csv}: differs from the split of {config.hdf5} with --seed {config.seed}"
        )


# ---------------------------------------------------------------------------- run.json
def new_run_info(config: TrainConfig, cohort: Cohort, subset: np.ndarray, hdf5_sha256: str) -> dict:
    """run.json of a run that starts now (before its status and strategy); "split" counts
    the slices and groups of each subset (test only for a cross-validation fold)."""
    split = {}
    for name in ("train", "val", "test"):
        members = np.flatnonzero(subset == name)
        if name != "test" or len(members):
            split[f"{name}_slices"] = len(members)
            split[f"{name}_groups"] = len({cohort.records[i]["group"] for i in members})
    return {
        "command": list(config.command),
        "arguments": config.arguments(),
        "backbone": config.backbone,
        "input_shape": [*cohort.size, 3],
        "hdf5": str(cohort.hdf5.resolve()),
        "hdf5_size_key": common.size_key(cohort.size),
        "hdf5_sha256": hdf5_sha256,
        "hdf5_has_groups": cohort.has_groups,
        "hdf5_slice_selection": hdf5_slice_selection(cohort.hdf5, cohort.size),  # step0's --lesion-masks ...
        "class_labels": dict(common.CLASS_LABELS),
        "split_seed": config.seed,
        "split": split,
        "versions": library_versions(),
        "start_time": now(),
    }


def open_run_folder(
    config: TrainConfig, run: RunFolder, cohort: Cohort, subset: np.ndarray, distribution: Distribution
) -> tuple[dict, int]:
    """Create (or replace, or reopen) the run folder; write split.csv and run.json; cut
    history.csv back to the backed-up epochs. Returns run.json's content and the first
    epoch to train. Only the chief writes (the other workers get ({}, 0))."""
    hdf5_sha256 = file_sha256(cohort.hdf5)
    if run.previous is not None and hdf5_sha256 != run.previous["hdf5_sha256"]:
        raise common.UserError(f"{cohort.hdf5}: its content changed since the run started (SHA-256 differs)")
    if run.previous is None and config.overwrite and run.run_json.is_file() and distribution.is_chief:
        run.replaced = move_aside(run.path)  # removed once the new run has finished
        common.log.info("the previous run is kept aside in %s until this one finishes", run.replaced)
    if not distribution.is_chief:  # the chief writes the run folder, the other workers nothing
        return {}, 0
    run.path.mkdir(parents=True, exist_ok=True)
    first_epoch = backup_epoch(run.backup_dir) if run.previous is not None else 0
    if run.previous is not None:
        truncate_history(run.history_csv, first_epoch)
        common.log.info("resuming %s after epoch %d of %d", run.path, first_epoch, config.epochs)
    if not run.split_csv.is_file():
        write_split_csv(run.split_csv, cohort.records, subset)
    info = run.previous or new_run_info(config, cohort, subset, hdf5_sha256)
    if run.previous is not None:
        resumed = {
            "time": now(),
            "after_epoch": first_epoch,
            "command": list(config.command),
            "arguments": config.arguments(),
        }
        info.setdefault("resumed", []).append(resumed)
        info["arguments"]["epochs"] = config.epochs
    info.update(
        status="running",
        strategy=distribution.name,
        replicas=distribution.replicas,
        global_batch_size=config.batch_size * distribution.replicas,
    )
    write_json(run.run_json, info)
    return info, first_epoch


# ---------------------------------------------------------------------------- cv.json's lock
@contextlib.contextmanager
def cv_lock(run_dir: Path):
    """An exclusive lock on RUN/.cv.lock (flock) while cv.json is read and written; where
    the file system has no flock (Lustre without it: ENOSYS, EOPNOTSUPP), a lock file
    created exclusively instead, with one warning line."""
    try:
        import fcntl
    except ImportError:  # not POSIX: one process per CV run folder at a time
        yield
        return
    with open(run_dir / CV_LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:
            if error.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL):
                raise
            with _lock_file(run_dir / f"{CV_LOCK}.held", error):
                yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _lock_file(path: Path, why: OSError, timeout_s: float = 600.0):
    """Hold `path`, created exclusively (O_EXCL works without flock), waiting for it while
    another process holds it; UserError after `timeout_s` (a crashed holder leaves it)."""
    common.log.warning(
        "warning: %s: no flock on this file system (%s); using a lock file", path.parent, why.strerror
    )
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            break
        except FileExistsError:
            if time.monotonic() > deadline:
                raise common.UserError(
                    f"{path}: held for {timeout_s:.0f} s; remove it if no other job runs"
                ) from None
            time.sleep(0.2)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
