"""Cross-validation by patient (--folds K): the folds, cv.json, the pooled out-of-fold
predictions, and the training of the selected folds.

Selection is nested: fold i's patients are its test set, predicted once into
fold_<i>/test_predictions.csv by the fold's chosen checkpoint and used for no choice; the
checkpoint (and early stopping) is chosen on validation patients drawn from the fold's
own training patients (data.split_subsets, --val-fraction, --seed), or is the last epoch
with --select final. RUN/fold_<i>/ are ordinary run folders trained by
training.train_split, one per fold; RUN/cv.json is derived from them (status, best
checkpoint) each time a process writes it, under a lock, so that folds trained by separate
jobs at the same time leave one consistent file.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import gbmpcnsl_common as common
from gbmpcnsl.config import TrainConfig
from gbmpcnsl.data import VAL, Cohort, log_split, read_cohort, split_subsets
from gbmpcnsl.distributed import Distribution, start_tensorflow, writes_run_folder
from gbmpcnsl.files import write_csv, write_json
from gbmpcnsl.outputs import discard, move_aside, refuse_unsafe_folder
from gbmpcnsl.runs import (
    CV_JSON,
    CV_LOCK,
    OOF_PREDICTIONS_CSV,
    PREDICTION_COLUMNS,
    RUN_JSON,
    TEST_PREDICTIONS_CSV,
    RunFolder,
    check_resume,
    check_run_folder,
    cv_lock,
    now,
    read_json,
)
from gbmpcnsl.training import train_split, write_split_predictions
from gbmpcnsl_common import CLASS_FOLDERS, UserError, log


# ---------------------------------------------------------------------------- the folds
def make_folds(records: list[dict], folds: int, seed: int) -> np.ndarray:
    """The fold (0 ... folds-1) of every record: StratifiedGroupKFold(folds, shuffle=True,
    random_state=seed) over the patients (record["group"]), stratified by label, so every
    patient is in exactly one fold and each fold holds about 1/folds of each class.

    Raises UserError when a class has fewer patients than folds, or a fold's validation
    would miss a class.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.array([record["label"] for record in records])
    groups = np.array([record["group"] for record in records])
    for label, name in enumerate(common.CLASS_NAMES):
        count = len(set(groups[labels == label]))
        if count < folds:
            raise UserError(
                f"{name}: {count} patient group(s); --folds {folds} needs at least {folds} per class "
                "(each fold's validation holds patients of both classes)"
            )
    fold_of = np.full(len(records), -1)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (_, val_indices) in enumerate(splitter.split(np.zeros(len(records)), labels, groups)):
        fold_of[val_indices] = fold
    for fold in range(folds):
        if len(set(labels[fold_of == fold])) < len(common.CLASS_NAMES):
            raise UserError(
                f"--folds {folds}: fold {fold}'s validation holds one class only (patients of very "
                "different sizes); use fewer folds or another --seed"
            )
    return fold_of


def fold_subsets(config: TrainConfig, cohort: Cohort, fold_of: np.ndarray) -> list[np.ndarray]:
    """Each fold's split (data.split_subsets): its own patients "test", validation
    patients drawn from the other folds' patients ("val", --val-fraction, --seed), the rest
    "train". All folds at once, so that a cohort too small for one fails before training."""
    subsets = []
    for fold in range(config.folds):
        try:
            subsets.append(split_subsets(cohort.records, config.val_fraction, config.seed, fold_of == fold))
        except UserError as error:
            raise UserError(f"--folds {config.folds}: fold {fold}'s training patients: {error}") from None
    return subsets


def fold_assignment(cohort: Cohort, fold_of: np.ndarray, subsets: list[np.ndarray]) -> list[dict]:
    """cv.json's record of the folds: the test patients and slices per class (the fold's
    own), the validation patients per class (drawn from the others), the run folder."""

    def per_class(indices: np.ndarray) -> dict:
        members = [cohort.records[i] for i in indices]
        return {
            folder: sorted({r["group"] for r in members if r["class"] == folder}) for folder in CLASS_FOLDERS
        }

    assignment = []
    for fold in range(int(fold_of.max()) + 1):
        members = [cohort.records[i] for i in np.flatnonzero(fold_of == fold)]
        assignment.append(
            {
                "fold": fold,
                "patients": per_class(np.flatnonzero(fold_of == fold)),
                "slices": {folder: sum(r["class"] == folder for r in members) for folder in CLASS_FOLDERS},
                "validation_patients": per_class(np.flatnonzero(subsets[fold] == VAL)),
                "run_dir": f"fold_{fold}",
            }
        )
    return assignment


def log_folds(cohort: Cohort, fold_of: np.ndarray) -> None:
    """One log line per fold: its slices per class and its patients."""
    labels = cohort.labels
    folds = int(fold_of.max()) + 1
    for fold in range(folds):
        members = np.flatnonzero(fold_of == fold)
        per_class = [int(np.sum(labels[members] == label)) for label in (0, 1)]
        groups = len({cohort.records[i]["group"] for i in members})
        log.info(
            "fold %d (of %d): %d slices (%d GBM, %d PCNSL) from %d groups",
            fold,
            folds,
            len(members),
            *per_class,
            groups,
        )


# ---------------------------------------------------------------------------- cv.json
def selection_rule(config: TrainConfig) -> dict:
    """cv.json's "selection": how each fold's checkpoint was chosen, and on which patients
    (chosen_on: the split.csv subset; never "test")."""
    best = config.select == "best"
    return {
        "select": config.select,
        "monitor": config.monitor if best else None,
        "early_stopping": config.early_stopping,
        "chosen_on": VAL if best else None,
        "val_fraction": config.val_fraction,
    }


def cv_settings(config: TrainConfig, cohort: Cohort, fold_of: np.ndarray, subsets: list[np.ndarray]) -> dict:
    """What every fold of one cross-validation run shares (cv.json less the fold status)."""
    return {
        "folds": config.folds,
        "seed": config.seed,
        "selection": selection_rule(config),
        "hdf5": str(cohort.hdf5.resolve()),
        "hdf5_size_key": common.size_key(cohort.size),
        "input_shape": [*cohort.size, 3],
        "arguments": config.resume_arguments(),
        "fold_assignment": fold_assignment(cohort, fold_of, subsets),
    }


def check_cv_folder(config: TrainConfig) -> dict | None:
    """May RUN be created, joined (--fold), resumed or replaced? Returns the cv.json
    already there (None when RUN is new or to be replaced)."""
    run_dir, cv_json = config.run_dir, config.run_dir / CV_JSON
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: exists and is not a folder")
    previous = read_json(cv_json) if cv_json.is_file() else None
    in_use = run_dir.is_dir() and any(run_dir.iterdir())
    if previous is not None and "selection" not in previous and (config.resume or config.fold is not None):
        raise UserError(
            f"{cv_json}: made by the old scheme (each fold chose its checkpoint on its own test "
            "patients); it cannot be resumed or joined: train a new run folder or --overwrite it"
        )
    if config.resume:
        if previous is None:
            raise UserError(f"{run_dir}: no {CV_JSON}, no cross-validation run to resume")
    elif config.overwrite and config.fold is None:
        if in_use and previous is None and not (run_dir / RUN_JSON).is_file():
            raise UserError(
                f"{run_dir}: --overwrite only replaces a run folder (one with {CV_JSON} or run.json)"
            )
        if in_use:
            refuse_unsafe_folder(run_dir, [config.hdf5])
        return None
    elif in_use and previous is None and not (config.fold is not None and (run_dir / CV_LOCK).exists()):
        # (a lock file without cv.json: another --fold job is creating the run right now)
        raise UserError(
            f"{run_dir}: exists and holds no {CV_JSON}; pick a new run folder"
            + ("" if config.fold is not None else " or --overwrite it")
        )
    elif in_use and config.fold is None:
        raise UserError(f"{run_dir}: exists; pick a new run folder, --resume it or --overwrite it")
    return previous


def check_cv_settings(config: TrainConfig, previous: dict | None, settings: dict) -> None:
    """A process joining or resuming a cross-validation run must train the same folds with
    the same settings as the run's other folds."""
    if previous is None:
        return
    where = config.run_dir / CV_JSON
    if previous.get("folds") != settings["folds"]:
        raise UserError(f"{where}: the run has {previous.get('folds')} folds (now --folds {config.folds})")
    changed = config.resume_changes(previous.get("arguments", {}), older_runs=False)
    if changed:
        raise UserError(f"{where}: every fold needs the run's own settings: {', '.join(changed)}")
    if previous.get("input_shape") != settings["input_shape"]:
        raise UserError(
            f"{where}: the run's image size is {previous.get('input_shape')} (now {settings['input_shape']})"
        )
    keys = ("fold", "patients", "slices")
    stored = [{k: v for k, v in fold.items() if k in keys} for fold in previous["fold_assignment"]]
    current = [{k: v for k, v in fold.items() if k in keys} for fold in settings["fold_assignment"]]
    if stored != current:
        raise UserError(f"{where}: {config.hdf5} with --seed {config.seed} gives other folds than the run's")


def fold_status(fold_dir: Path) -> tuple[str, str | None]:
    """(pending | running | finished, best checkpoint file name) of a fold's run folder; a
    fold is finished once its test_predictions.csv is written."""
    run_json = fold_dir / RUN_JSON
    if not run_json.is_file():
        return "pending", None
    info = read_json(run_json)
    if info.get("status") == "finished" and (fold_dir / TEST_PREDICTIONS_CSV).is_file():
        return "finished", info.get("best_checkpoint")
    return "running", None


def update_cv_json(
    run_dir: Path, settings: dict, cohort: Cohort, fold_of: np.ndarray, starting: int | None = None
) -> dict:
    """Write RUN/cv.json from the fold run folders as they are now (fold `starting` counts as
    running), and RUN/oof_predictions.csv when every fold is finished. Under the lock."""
    with cv_lock(run_dir):
        cv_json = run_dir / CV_JSON
        previous = read_json(cv_json) if cv_json.is_file() else {}
        cv = {**settings, "fold_assignment": [dict(fold) for fold in settings["fold_assignment"]]}
        cv["start_time"] = previous.get("start_time") or now()
        for fold in cv["fold_assignment"]:
            status, checkpoint = fold_status(run_dir / fold["run_dir"])
            if fold["fold"] == starting and status == "pending":
                status = "running"
            fold["status"] = status
            fold["best_checkpoint"] = f"{fold['run_dir']}/{checkpoint}" if checkpoint else None
        cv["complete"] = all(fold["status"] == "finished" for fold in cv["fold_assignment"])
        if cv["complete"]:
            cv["best_checkpoints"] = [fold["best_checkpoint"] for fold in cv["fold_assignment"]]
            write_oof_predictions(run_dir, cohort, fold_of)
        cv["update_time"] = now()
        write_json(cv_json, cv)
    return cv


def write_oof_predictions(run_dir: Path, cohort: Cohort, fold_of: np.ndarray) -> Path:
    """RUN/oof_predictions.csv: the folds' test_predictions.csv rows (values as written) plus
    their fold, in HDF5 order: one row per slice, each predicted by the model that neither
    trained on its patient nor chose a checkpoint on it."""
    rows: list[list[str] | None] = [None] * len(cohort.records)
    for fold in range(int(fold_of.max()) + 1):
        path = run_dir / f"fold_{fold}" / TEST_PREDICTIONS_CSV
        with open(path, newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            fold_rows = list(reader)
        indices = np.flatnonzero(fold_of == fold)
        if header != list(PREDICTION_COLUMNS) or [row[0] for row in fold_rows] != [
            cohort.records[i]["path"] for i in indices
        ]:
            raise UserError(f"{path}: does not hold the test slices of fold {fold}")
        for index, row in zip(indices, fold_rows, strict=True):
            rows[index] = [*row, str(fold)]
    path = run_dir / OOF_PREDICTIONS_CSV
    write_csv(path, [*PREDICTION_COLUMNS, "fold"], rows, private=True)
    log.info("every fold is done: wrote %s (%d slices)", path, len(rows))
    return path


# ---------------------------------------------------------------------------- training the folds
@dataclass
class FoldPlan:
    """What to do with one fold: skip it (finished), predict (trained, killed before its
    predictions) or train (anew or resumed), with its settings and run folder."""

    fold: int
    action: str
    config: TrainConfig
    run: RunFolder | None


def plan_folds(config: TrainConfig, cohort: Cohort, subsets: list[np.ndarray]) -> list[FoldPlan]:
    """The selected folds (all, or --fold i), each checked as a run folder of its own."""
    replace_all = config.overwrite and config.fold is None
    plans = []
    for fold in [config.fold] if config.fold is not None else range(config.folds):
        fold_dir = config.run_dir / f"fold_{fold}"
        status, _ = fold_status(fold_dir)
        fold_config = config.for_fold(fold, fold_dir, resume=config.resume and status != "pending")
        if config.resume and status == "finished":
            plans.append(FoldPlan(fold, "skip", fold_config, None))
        elif fold_config.resume and read_json(fold_dir / RUN_JSON).get("status") == "finished":
            plans.append(FoldPlan(fold, "predict", fold_config, RunFolder(fold_dir)))
        else:
            if replace_all:
                run = RunFolder(fold_dir)
            else:
                run = check_run_folder(fold_config, fold_dir, writes_run_folder(fold_config))
            check_resume(fold_config, run, cohort, subsets[fold])
            plans.append(FoldPlan(fold, "train", fold_config, run))
    return plans


def train_cross_validation(config: TrainConfig, callbacks: list | None = None):
    """--folds K: train the selected folds (all, or --fold i) one after the other, each
    through train_split into RUN/fold_<i>/, keeping RUN/cv.json up to date. Returns the
    model of the last fold trained (None when nothing was left to train)."""
    previous = check_cv_folder(config)
    cohort = read_cohort(config.hdf5, config.size)
    fold_of = make_folds(cohort.records, config.folds, config.seed)
    log_folds(cohort, fold_of)
    subsets = fold_subsets(config, cohort, fold_of)
    settings = cv_settings(config, cohort, fold_of, subsets)
    check_cv_settings(config, previous, settings)
    plans = plan_folds(config, cohort, subsets)

    distribution = start_tensorflow(config)
    replaced = None  # the run --overwrite replaces: kept aside until the new one is trained
    if distribution.is_chief:
        if config.overwrite and config.fold is None and config.run_dir.exists():
            replaced = move_aside(config.run_dir)
        config.run_dir.mkdir(parents=True, exist_ok=True)
        update_cv_json(config.run_dir, settings, cohort, fold_of)
    model = None
    for plan in plans:
        trained = run_fold(
            plan, cohort, fold_of, subsets[plan.fold], settings, distribution, callbacks, model
        )
        model = trained if trained is not None else model
        if distribution.is_chief and plan.action != "skip":
            cv = update_cv_json(config.run_dir, settings, cohort, fold_of)
            done = sum(fold["status"] == "finished" for fold in cv["fold_assignment"])
            log.info(
                "fold %d (of %d) done; %d of %d folds finished", plan.fold, config.folds, done, config.folds
            )
    discard(replaced)
    return model


def run_fold(
    plan: FoldPlan,
    cohort: Cohort,
    fold_of: np.ndarray,
    subset: np.ndarray,
    settings: dict,
    distribution: Distribution,
    callbacks: list | None,
    traced=None,
):
    """Carry out one fold's plan (`subset`: its split; `traced`: the model of the fold
    trained before, whose traced steps this fold reuses); returns its model when it was
    trained (else None)."""
    config = plan.config
    if plan.action == "skip":
        log.info("fold %d (of %d): finished earlier, skipped", plan.fold, config.folds)
        return None
    if plan.action == "predict":
        if distribution.is_chief:
            info = read_json(plan.run.run_json)
            write_split_predictions(plan.run.path, cohort, subset, info.get("best_checkpoint"))
        return None
    action = "resuming" if config.resume else "training"
    log.info("fold %d (of %d): %s %s", plan.fold, config.folds, action, plan.run.path)
    log_split(cohort, subset)
    cv_dir = plan.run.path.parent
    if distribution.is_chief:
        update_cv_json(cv_dir, settings, cohort, fold_of, starting=plan.fold)
    # Python's and NumPy's generators, which Keras draws the new model's initial weights and
    # seeds from: fold i alone = fold i after other folds. Not keras.utils.set_random_seed:
    # its tf.random.set_seed (start_tensorflow's, once) clears TensorFlow's caches, so that
    # the traced steps are optimised again (B0: about 9 s a fold). step1's own random draws
    # are stateless, with explicit seeds.
    random.seed(config.seed)
    np.random.seed(config.seed)
    return train_split(config, plan.run, cohort, subset, distribution, callbacks, traced)
