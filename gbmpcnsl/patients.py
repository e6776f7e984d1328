"""Patients: slice probabilities combined into one probability per patient (pure functions).

The one patient aggregation: step2's --per-patient uses it, and so can any table that
already holds a patient_id per slice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from gbmpcnsl_common import patient_id

AGGREGATES = ("mean", "median", "max")
PATIENT_COLUMNS = ["patient_id", "n_slices", "prob_gbm", "prob_pcnsl"]


def aggregate_probabilities(prob_pcnsl: Sequence[float], aggregate: str = "mean") -> float:
    """One patient's P(PCNSL) from its slices' (float64): their mean, their median, or
    "max", the most extreme call: the slice probability farthest from 0.5 (the first such
    slice on a tie)."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate {aggregate!r}: expected one of {', '.join(AGGREGATES)}")
    probs = np.asarray(prob_pcnsl, dtype=np.float64)
    if aggregate == "mean":
        return float(probs.mean())
    if aggregate == "median":
        return float(np.median(probs))
    return float(probs[np.argmax(np.abs(probs - 0.5))])


def aggregate_by_patient(
    patient_ids: Iterable[str], prob_pcnsl: Iterable[float], aggregate: str = "mean"
) -> list[tuple[str, int, float]]:
    """(patient_id, n_slices, prob_pcnsl) per patient, in order of first appearance.

    patient_ids and prob_pcnsl: one per slice, in the same order. aggregate: see
    aggregate_probabilities.
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate {aggregate!r}: expected one of {', '.join(AGGREGATES)}")
    by_patient: dict[str, list[float]] = {}
    for patient, prob in zip(patient_ids, prob_pcnsl, strict=True):
        by_patient.setdefault(patient, []).append(prob)
    return [
        (patient, len(probs), aggregate_probabilities(probs, aggregate))
        for patient, probs in by_patient.items()
    ]


def aggregate_patients(
    rows: list[tuple[str, float]], aggregate: str = "mean", patient_of: dict[str, str] | None = None
) -> list[tuple[str, int, float]]:
    """aggregate_by_patient for (slice name, prob_pcnsl) rows, each slice's patient taken
    from `patient_of` ({slice name: patient}, as find_slices gives them: the rule with
    the command line's folders, or --cohort's patient_id), else by the patient rule
    (gbmpcnsl_common.patient_id)."""
    patient_of = patient_of or {}
    patients = [patient_of.get(path) or patient_id(path) for path, _ in rows]
    return aggregate_by_patient(patients, [prob for _, prob in rows], aggregate)
