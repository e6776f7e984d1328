"""int8 export: NNCF post-training quantization of an OpenVINO IR on HDF5 slices, checked
on the patients the calibration did not see (step6 --format openvino --int8).

The calibration file's patients are split in two (gbmpcnsl.data.split_by_group, stratified
by class): up to CALIBRATION_SLICES slices of one half calibrate the int8 model, drawn round
robin across its patients of each class; the other half (the held-out part) is predicted by
the float and the int8 model, and the int8 model is kept only when its AUROC there is at most
`max_auroc_drop` below the float model's.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gbmpcnsl.data import HDF5Images, read_cohort, split_by_group
from gbmpcnsl.files import file_sha256
from gbmpcnsl.stats import auc_score
from gbmpcnsl_common import UserError, log

CALIBRATION_SLICES = 300  # NNCF's default subset size
HELD_OUT_SLICES = 1000  # at most, drawn as the calibration slices are
MAX_AUROC_DROP = 0.01
SPLIT_SEED = 0


@dataclass(frozen=True)
class CalibrationData:
    """uint8 images (N, H, W, 3) and labels of the calibration and the held-out part."""

    path: Path
    calibration: np.ndarray
    held_out: np.ndarray
    held_out_labels: np.ndarray
    patients: tuple[int, int]  # calibration patients, held-out patients


def spread_across_patients(records: list[dict], indices: np.ndarray, limit: int) -> np.ndarray:
    """At most `limit` of `indices`, taken in turn from each class and, within a class,
    from each patient (one slice of every patient, then a second, ...), in file order."""
    queues: dict[int, dict[str, list[int]]] = {}
    for index in indices:
        record = records[index]
        queues.setdefault(record["label"], {}).setdefault(record["group"], []).append(int(index))
    per_class = [[patients[group] for group in sorted(patients)] for _, patients in sorted(queues.items())]
    taken: list[int] = []
    for depth in range(max((len(s) for c in per_class for s in c), default=0)):
        layers = [[slices[depth] for slices in patients if depth < len(slices)] for patients in per_class]
        for position in range(max(len(layer) for layer in layers)):  # classes in turn
            taken += [layer[position] for layer in layers if position < len(layer)]
    taken = taken[:limit]
    return np.array(sorted(taken), dtype=np.int64)


def read_calibration(path: Path, size: tuple[int, int]) -> CalibrationData:
    """The calibration and held-out images of `path` at the model's input `size`.
    UserError (naming --calibration) for a file without that size or with too few patients."""
    try:
        cohort = read_cohort(path, size)
    except UserError as error:
        raise UserError(f"--calibration {error}") from error
    try:
        is_held_out = split_by_group(cohort.records, 0.5, SPLIT_SEED)
    except UserError as error:
        raise UserError(f"--calibration {path}: {error}") from error
    records = cohort.records
    calibration = spread_across_patients(records, np.flatnonzero(~is_held_out), CALIBRATION_SLICES)
    held_out = spread_across_patients(records, np.flatnonzero(is_held_out), HELD_OUT_SLICES)
    reader = HDF5Images(path, size)
    labels = cohort.labels[held_out]
    if len(set(labels.tolist())) < 2:
        raise UserError(f"--calibration {path}: the held-out patients hold one class only; no AUROC")
    patients = [len({records[i]["group"] for i in part}) for part in (calibration, held_out)]
    return CalibrationData(
        path,
        np.stack([reader.read(i) for i in calibration]),
        np.stack([reader.read(i) for i in held_out]),
        labels,
        (patients[0], patients[1]),
    )


def quantize_openvino(float_xml: Path, int8_xml: Path, images: np.ndarray) -> None:
    """NNCF post-training quantization of the IR `float_xml` on `images` (one per
    calibration step), saved at `int8_xml` (int8 weights, float32 for the rest)."""
    import nncf
    import openvino

    if not log.isEnabledFor(logging.DEBUG):  # NNCF logs its statistics collection at INFO
        logging.getLogger("nncf").setLevel(logging.WARNING)
    model = openvino.Core().read_model(str(float_xml))
    dataset = nncf.Dataset(list(images.astype(np.float32)[:, None]))
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stdout is for results
        quantized = nncf.quantize(
            model, dataset, subset_size=len(images), preset=nncf.QuantizationPreset.MIXED
        )
    openvino.save_model(quantized, str(int8_xml), compress_to_fp16=False)


def held_out_check(float_predict, int8_predict, data: CalibrationData, max_auroc_drop: float) -> dict:
    """AUROC of both models on the held-out slices and the largest |P(PCNSL)| change; the
    metadata's "int8" entry. UserError when the AUROC drops by more than `max_auroc_drop`."""
    images = data.held_out.astype(np.float32)
    float_prob = np.concatenate([float_predict(images[i : i + 32]) for i in range(0, len(images), 32)])
    int8_prob = np.concatenate([int8_predict(images[i : i + 32]) for i in range(0, len(images), 32)])
    auroc_float = auc_score(data.held_out_labels, float_prob)
    auroc_int8 = auc_score(data.held_out_labels, int8_prob)
    drop = auroc_float - auroc_int8
    report = {
        "calibration_file": {"name": data.path.name, "sha256": file_sha256(data.path)},
        "calibration": {"slices": len(data.calibration), "patients": data.patients[0]},
        "held_out": {"slices": len(images), "patients": data.patients[1]},
        "auroc_float": auroc_float,
        "auroc_int8": auroc_int8,
        "auroc_drop": drop,
        "max_auroc_drop": max_auroc_drop,
        "max_abs_probability_change": float(np.max(np.abs(int8_prob - float_prob))),
    }
    if not drop <= max_auroc_drop:
        raise UserError(
            f"int8 export refused: AUROC on {len(images)} held-out slices of {data.path.name} drops "
            f"from {auroc_float:.4f} to {auroc_int8:.4f} (by {drop:.4f}, more than --max-auroc-drop "
            f"{max_auroc_drop:g}); nothing written"
        )
    return report
