"""TrainConfig: step1's settings as one frozen, typed value, and what a resume must keep.

The fields are step1's flags, in the order of its command line (run.json's "arguments"
keep that order). A field made with `setting(..., resume=True)` must match when a run is
resumed, or when a fold joins a cross-validation run; `older_runs=True` marks a setting
added after the first runs were written: a run.json without it stands for its default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path

from gbmpcnsl.augment import StrongAugmentation

# What to pick the best epoch by (checkpoints, early stopping, run.json): name -> Keras mode.
MONITORS = {"val_loss": "min", "val_auc": "max"}
# Which checkpoint a run keeps (--select): the best epoch by --monitor on the validation
# patients, or the last epoch (no selection).
SELECTIONS = ("best", "final")
_STRONG = StrongAugmentation()


def setting(default, *, resume: bool = False, older_runs: bool = False):
    """A TrainConfig field with its default. resume: a resumed run, and every fold of a
    cross-validation run, must keep it. older_runs: run folders older than the setting
    lack it in run.json, and ran with `default`."""
    return dataclasses.field(default=default, metadata={"resume": resume, "older_runs": older_runs})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run is told; built from step1's parsed command line."""

    hdf5: Path
    run_dir: Path
    augmentation: str = setting("none", resume=True)
    rotation_degrees: float = setting(_STRONG.rotation_degrees, resume=True, older_runs=True)
    scale: float = setting(_STRONG.scale, resume=True, older_runs=True)
    shift: float = setting(_STRONG.shift, resume=True, older_runs=True)
    contrast: float = setting(_STRONG.contrast, resume=True, older_runs=True)
    brightness: float = setting(_STRONG.brightness, resume=True, older_runs=True)
    gamma: float = setting(_STRONG.gamma, resume=True, older_runs=True)
    noise_std: float = setting(_STRONG.noise_std, resume=True, older_runs=True)
    noise_fraction: float = setting(_STRONG.noise_fraction, resume=True, older_runs=True)
    epochs: int = 300
    weights: str = setting("imagenet", resume=True)
    normalization: str = setting("imagenet", resume=True, older_runs=True)
    head_init: str = "original"
    backbone: str = setting("efficientnetb4", resume=True)
    size: tuple[int, int] | None = None  # compared on resume once resolved from the HDF5 file
    batch_size: int = setting(8, resume=True)
    learning_rate: float = setting(1e-4, resume=True)
    val_fraction: float = setting(0.15, resume=True)
    folds: int | None = None
    fold: int | None = None
    select: str = setting("best", resume=True, older_runs=True)
    seed: int = setting(0, resume=True)
    early_stopping: int | None = None
    monitor: str = setting("val_loss", resume=True, older_runs=True)
    batchnorm_momentum: float | None = setting(None, resume=True, older_runs=True)
    tensorboard: bool = False
    mixed_precision: bool = setting(False, resume=True)
    xla: bool = False
    deterministic: bool = False
    distribute: str = "auto"
    resume: bool = False
    overwrite: bool = False
    verbose: bool = False

    @property
    def strong(self) -> StrongAugmentation:
        """The parameters of --augmentation strong."""
        return StrongAugmentation(**{f.name: getattr(self, f.name) for f in fields(StrongAugmentation)})

    @property
    def backbone_weights(self) -> str | None:
        """--weights for build_model: None for "none"."""
        return None if self.weights.lower() == "none" else self.weights

    def arguments(self) -> dict:
        """Every setting as run.json records it ("arguments")."""
        return {f.name: jsonable(getattr(self, f.name)) for f in fields(self)}

    def resume_arguments(self) -> dict:
        """The settings a resume must keep, as run.json and cv.json record them."""
        return {name: jsonable(getattr(self, name)) for name in RESUME_MUST_MATCH}

    def resume_changes(self, previous: dict, older_runs: bool = True) -> list[str]:
        """'--flag OLD (now NEW)' for each setting a resume must keep that differs from the
        `previous` arguments (run.json's or cv.json's); with `older_runs`, a setting absent
        there counts as its default."""
        changes = []
        for name, value in self.resume_arguments().items():
            before = previous.get(name, RESUME_DEFAULTS.get(name)) if older_runs else previous.get(name)
            if value != before:
                changes.append(f"--{name.replace('_', '-')} {previous.get(name)} (now {value})")
        return changes

    def for_fold(self, fold: int, run_dir: Path, resume: bool) -> TrainConfig:
        """The settings of one fold of a cross-validation run, trained into `run_dir`."""
        return dataclasses.replace(self, run_dir=run_dir, fold=fold, resume=resume)


def jsonable(value):
    """A setting's value as run.json stores it."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.default is not dataclasses.MISSING}
# Derived from the fields: the settings a resume must keep, and the values that runs from
# before a setting existed ran with.
RESUME_MUST_MATCH = tuple(f.name for f in fields(TrainConfig) if f.metadata.get("resume"))
RESUME_DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.metadata.get("older_runs")}
