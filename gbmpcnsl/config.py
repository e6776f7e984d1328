"""TrainConfig: step1's settings as one frozen, typed value, and what a resume must keep.

The fields are step1's flags, in the order of its command line (run.json's "arguments"
keep that order). A field made with `setting(..., resume=True)` must match when a run is
resumed, or when a fold joins a cross-validation run; `older_runs=True` marks a setting
added after the first runs were written: a run.json without it stands for its default.
"""

from __future__ import annotations

import dataclasses
import json
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
    # Not settings (not in run.json's "arguments"): the exact command line (its "command"),
    command: tuple[str, ...] = dataclasses.field(default=(), compare=False, metadata={"setting": False})
    # --mlflow URI (gbmpcnsl.tracking): where the run is reported, not how it trains.
    mlflow: str | None = dataclasses.field(default=None, compare=False, metadata={"setting": False})

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
        return {
            f.name: jsonable(getattr(self, f.name)) for f in fields(self) if f.metadata.get("setting", True)
        }

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


# ---------------------------------------------------------------------------- --config FILE
# Not taken from a settings file: where the data and the run are, and what to do with the folder.
NOT_FROM_CONFIG = ("hdf5", "run_dir", "resume", "overwrite", "command", "mlflow")


def config_file_flags(path: Path) -> list[str]:
    """step1 flags for the settings in `path`: a run.json (its "arguments") or a JSON object
    of settings (TrainConfig's names, '-' or '_'). Put before the command line's own flags,
    they act as defaults that those override (an on/off flag set there stays on).
    Raises ValueError naming the file and the key for what is not a setting."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"--config {path}: cannot read ({error})") from None
    settings = data.get("arguments", data) if isinstance(data, dict) else None
    if not isinstance(settings, dict):
        raise ValueError(f"--config {path}: expected a JSON object of settings or a run.json")
    known = {f.name: f for f in fields(TrainConfig)}
    flags: list[str] = []
    for key, value in settings.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ValueError(f"--config {path}: {key!r} is not a step1 setting")
        if name in NOT_FROM_CONFIG or value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif isinstance(value, list):
            flags.extend([flag, *(str(item) for item in value)])
        else:
            flags.extend([flag, str(value)])
    return flags


DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.default is not dataclasses.MISSING}
# Derived from the fields: the settings a resume must keep, and the values that runs from
# before a setting existed ran with.
RESUME_MUST_MATCH = tuple(f.name for f in fields(TrainConfig) if f.metadata.get("resume"))
RESUME_DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.metadata.get("older_runs")}
