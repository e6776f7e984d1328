"""Helpers shared by the test modules: small HDF5 files in step0's layout, images, small
DICOM files, fake ImageNet weight files, predictions CSVs and scores with correlated slices
per patient, and the readers of a step's stderr and of a folder's bytes, and the killing of
process trees and a read from a child's pipe with a deadline. Test files import these from
here, never from one another."""

from __future__ import annotations

import csv
import os
import select
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from PIL import Image

TINY = ["--backbone", "efficientnetb0", "--weights", "none"]


def write_h5(
    path: Path,
    size: int = 32,
    patients: tuple[int, int] = (4, 4),
    slices: int = 3,
    groups: bool = True,
    seed: int = 0,
) -> Path:
    """A small HDF5 file in step0's layout. Image of record i (GBM rows first) is gray with
    value i in its top-left pixel, so a pipeline test can tell which record it holds."""
    rng = np.random.default_rng(seed)
    record = 0
    with h5py.File(path, "w") as h5file:
        for label, folder in enumerate(("gbm", "pcnsl")):
            count = patients[label] * slices
            gray = rng.integers(40 + 60 * label, 120 + 60 * label, (count, size, size, 1), dtype=np.uint8)
            features = np.repeat(gray, 3, axis=-1)
            features[:, 0, 0, :] = (np.arange(count) + record)[:, None]
            record += count
            group = h5file.create_group(f"{folder}/{size}_{size}")
            group.create_dataset("features", data=features, chunks=(1, size, size, 3), compression="gzip")
            group.create_dataset("labels", data=np.full(count, label, np.uint8))
            if groups:
                names = [f"{folder}_p{p}" for p in range(patients[label]) for _ in range(slices)]
                paths = [
                    f"{folder}/{folder}_p{p}/s{s}.png" for p in range(patients[label]) for s in range(slices)
                ]
                group.create_dataset("paths", data=paths, dtype=h5py.string_dtype())
                group.create_dataset("groups", data=names, dtype=h5py.string_dtype())
    return path


def gray_batch(count: int, size: int = 16, low: int = 20, high: int = 235, seed: int = 0):
    rng = np.random.default_rng(seed)
    gray = rng.integers(low, high, (count, size, size, 1)).astype(np.float32)
    return np.repeat(gray, 3, axis=-1)


def fake_notop_weights(path: Path, input_shape=(32, 32, 3)) -> Path:
    """An efficientnetb0_notop.h5 in the legacy layout Keras downloads (random values)."""
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    keras.utils.set_random_seed(123)
    backbone = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=input_shape)
    with h5py.File(path, "w") as h5file:
        legacy_h5_format.save_weights_to_hdf5_group(h5file, backbone)
    return path


def add_fit_callbacks(monkeypatch, first: tuple = (), last: tuple = ()) -> None:
    """Make step1's training run these Keras callbacks before (`first`) and after (`last`)
    its own, for the rest of the test (through step1.main too)."""
    from gbmpcnsl import training

    real_training_callbacks = training.training_callbacks

    def with_the_tests_callbacks(*args, **kwargs):
        callbacks, early_stopping = real_training_callbacks(*args, **kwargs)
        return [*first, *callbacks, *last], early_stopping

    monkeypatch.setattr(training, "training_callbacks", with_the_tests_callbacks)


def last_line(err: str) -> str:
    """The last message on stderr, after the progress bar's carriage returns."""
    return err.strip().replace("\r", "\n").splitlines()[-1]


def save_png(path: Path, value: int, size: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size, size), value, np.uint8)
    pixels[: size // 2] = 255 - value
    Image.fromarray(pixels).save(path)


def write_dicom(path, stored: np.ndarray | None, **tags) -> None:
    """A small MR file with pydicom, `stored` as its pixel data (int16 or uint16); with
    stored None, an object without pixels (tags give its SOPClassUID and Modality)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    sop_class = tags.pop("SOPClassUID", MRImageStorage)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    if stored is not None:
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
        ds.PixelData = stored.astype(stored.dtype.newbyteorder("<")).tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)


def folder_snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def write_predictions(path, rows) -> None:
    pd.DataFrame(rows, columns=["path", "prob_gbm", "prob_pcnsl"]).to_csv(path, index=False)


def correlated_slices(n_patients: int = 30, n_slices: int = 8, seed: int = 0, noise: float = 0.05):
    """Patients of both classes whose slices share the patient's score (plus a little noise)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_patients) % 2
    patient_score = rng.normal(0, 1, n_patients) + 0.8 * labels
    y_true = np.repeat(labels, n_slices)
    y_score = np.repeat(patient_score, n_slices) + rng.normal(0, noise, n_patients * n_slices)
    groups = np.repeat([f"p{i}" for i in range(n_patients)], n_slices)
    return y_true, y_score, groups


def kill_trees(roots) -> None:
    """SIGKILL each psutil.Process in `roots` and all its descendants (parents first, so none
    starts another child), then wait up to 10 s for those that are not our own children
    (the owner of each root reaps it: Popen.wait, Process.join)."""
    import psutil

    trees = []
    for root in roots:
        try:
            trees.append([root, *root.children(recursive=True)])
        except psutil.NoSuchProcess:
            continue
    for tree in trees:
        for process in tree:
            try:
                process.kill()  # psutil checks the creation time: never a reused pid
            except psutil.NoSuchProcess:
                pass
    psutil.wait_procs([process for tree in trees for process in tree[1:]], timeout=10)


def send_ctrl_c(process) -> None:
    """SIGINT to a running child, after checking (from /proc, where there is one) that it
    neither blocks nor ignores the signal: a child that never sees it would run to the end,
    which reads as a missed interrupt, not as what it is."""
    assert process.poll() is None, f"the process ended (exit {process.returncode}) before the Ctrl-C"
    proc_status = Path(f"/proc/{process.pid}/status")
    if proc_status.exists():
        status = dict(line.split(":\t", 1) for line in proc_status.read_text().splitlines())
        bit = 1 << (signal.SIGINT - 1)
        for field in ("SigBlk", "SigIgn"):
            assert not int(status[field], 16) & bit, (
                f"the child's SIGINT is in its {field} ({status[field].strip()})"
            )
    process.send_signal(signal.SIGINT)


def read_until(stream, condition, timeout: float) -> bytes:
    """Read a child's pipe (`stream`, binary or text; its raw file descriptor, so nothing is
    left in Python's buffer for a later communicate()) until condition(bytes read so far)
    holds. Fails at end of file or after `timeout` seconds."""
    fd, data = stream.fileno(), b""
    deadline = time.monotonic() + timeout
    while not condition(data):
        left = deadline - time.monotonic()
        assert left > 0, f"nothing expected on the pipe after {timeout} s: {data.decode()[-2000:]}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            assert chunk, f"the pipe closed first: {data.decode()[-2000:]}"
            data += chunk
    return data


def tied_scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores with many ties (scores rounded to one decimal)."""
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 2, n)
    y_score = np.round(1 / (1 + np.exp(-(y_true - 0.5 + rng.normal(0, 1, n)))), 1)
    return y_true, y_score


def read_csv(path: Path) -> list[dict]:
    """A CSV file's rows as dicts (csv.DictReader)."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))
