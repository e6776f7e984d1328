"""Train an EfficientNet to tell glioblastoma (GBM) from primary CNS lymphoma (PCNSL).

Reads the HDF5 file written by step0 and writes a run folder:

    ckpt_{epoch:03d}_{val_loss:.4f}.keras   best-only checkpoints on val_loss (full Keras models;
                                           ckpt_{epoch:03d}_{val_auc:.4f}.keras with --monitor val_auc)
    history.csv                            one row per epoch (Keras CSVLogger; epoch counts from 0)
    split.csv                              path, group, label, subset (train/val; a fold: test) of every slice
    run.json                               arguments, data digest, split, versions, times, best epoch
    val_predictions.csv                    path,prob_gbm,prob_pcnsl,label,patient_id of every validation
                                           slice, predicted by the best checkpoint (a fold: and
                                           test_predictions.csv, its held-out patients)
    backup/                                training state for --resume (removed when training ends)
    tensorboard/                           with --tensorboard: TensorBoard logs (tensorboard --logdir RUN_DIR)

After McAvoy et al., Sci Rep 11:15219 (2021): EfficientNetB4 with ImageNet weights at the
HDF5's image size, Adam 1e-4 for 50 epochs then 1e-4 * exp(0.015 * (50 - epoch)), binary
cross-entropy, batch 8. Unlike the original script, images stream from the HDF5 file (memory
stays flat as the cohort grows), the validation set holds out whole patients (groups), and
--augmentation base_and_noise really adds the noise.

Augmentations (inside tf.data, on 0-255 float images, a new draw per image and epoch):
  none            nothing
  base            random left-right and up-down flips, brightness +-2 grey levels, hue
                  +-0.25 (a no-op on grayscale slices), values clipped to 0-255
  base_and_noise  base, then Gaussian noise (std 12.75 grey levels = 0.05 of the range)
                  on a random 10% of the images, clipped to 0-255
  strong          for a cohort whose scans differ in pose, size and intensity: flips; one
                  affine transform (rotation +-15 degrees, zoom 1 +- 0.15, shift +- 0.06 of
                  the size; black fill); gamma 1 +- 0.2, contrast 1 +- 0.2, brightness +-10
                  grey levels; noise (std 12.75) on 10% of the images; clipped to 0-255.
                  Each setting has its flag (--rotation-degrees ... --noise-fraction).

A run whose best epoch is the first, or whose best validation AUC stays below 0.6, ends
with a warning: the network most likely memorised its training patients.

Cross-validation (--folds K): the patients are split into K stratified, patient-disjoint
folds (scikit-learn's StratifiedGroupKFold, shuffled with --seed). Fold i holds its own
patients out as its test set; validation patients are drawn from the others (--val-fraction,
by patient and class), the rest train, into the ordinary run folder RUN/fold_<i>/. The
checkpoint and early stopping are chosen on the validation patients only (--select final:
the last epoch, no choice); the test patients are predicted once, by that checkpoint.
RUN/cv.json records every fold's patients, the selection rule, each fold's status and, once
every fold is done, their chosen checkpoints; RUN/oof_predictions.csv then pools the folds'
test_predictions.csv (plus a fold column): every slice predicted by the one model that
neither trained on its patient nor chose anything on it. --fold i trains fold i only (one job per fold on a
cluster; the jobs may run at once). --resume skips finished folds, resumes interrupted
ones and starts the others; --overwrite replaces the whole RUN, or with --fold i that
fold only. Docs: docs/cross-validation.md

Example:
  python step1_train_model.py --augmentation base --epochs 300 data.h5 checkpoints/run/
  python step1_train_model.py --augmentation base --epochs 300 --resume data.h5 checkpoints/run/
  python step1_train_model.py --augmentation base --epochs 300 --folds 5 data.h5 checkpoints/cv/
  python step1_train_model.py --augmentation base --epochs 300 --folds 5 --fold 3 data.h5 checkpoints/cv/

Docs: docs/training.md (several GPUs or machines: docs/several-machines.md)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gbmpcnsl.model
import gbmpcnsl_common as common
from gbmpcnsl import cross_validation, tracking, training
from gbmpcnsl.augment import AUGMENTATIONS, StrongAugmentation
from gbmpcnsl.cli import (
    below_one,
    fraction,
    make_parser,
    non_negative_float,
    positive_float,
    positive_int,
    probability,
)
from gbmpcnsl.config import DEFAULTS, MONITORS, SELECTIONS, TrainConfig, config_file_flags

STRONG_FLAGS = (
    ("--rotation-degrees", "DEG", non_negative_float, "strong: rotation by up to +-DEG degrees"),
    ("--scale", "S", below_one, "strong: isotropic zoom by a factor in 1 +- S"),
    ("--shift", "F", below_one, "strong: translation by up to +-F of the image size per axis"),
    ("--contrast", "C", below_one, "strong: contrast factor in 1 +- C about the image mean"),
    ("--brightness", "B", non_negative_float, "strong: brightness +- B grey levels"),
    ("--gamma", "G", below_one, "strong: gamma in 1 +- G"),
    ("--noise-std", "STD", non_negative_float, "strong: std of the Gaussian noise, grey levels"),
    ("--noise-fraction", "P", probability, "strong: fraction of images that get the noise"),
)


def build_parser() -> argparse.ArgumentParser:
    """step1's command line (defaults: TrainConfig's)."""
    parser = make_parser("step1_train_model.py", __doc__)
    parser.add_argument("hdf5", type=Path, help="HDF5 file written by step0")
    parser.add_argument("run_dir", type=Path, help="run folder to create (must not exist, unless --resume)")
    _add_augmentation_arguments(parser.add_argument_group("augmentation"))
    _add_model_arguments(parser.add_argument_group("model"))
    _add_training_arguments(parser.add_argument_group("training"))
    folds = parser.add_argument_group("cross-validation (docs/cross-validation.md)")
    folds.add_argument(
        "--folds",
        type=positive_int,
        metavar="K",
        help="K-fold cross-validation by patient into RUN_DIR/fold_<i>/ (K >= 2; default: one split)",
    )
    folds.add_argument(
        "--fold",
        type=int,
        metavar="I",
        help="with --folds: train fold I only (0 ... K-1), e.g. one job per fold",
    )
    folds.add_argument(
        "--select",
        choices=SELECTIONS,
        help="the checkpoint each run keeps: best, the best epoch by --monitor on the validation "
        "patients (default); final, the last epoch (no selection, as nnU-Net reports; no "
        "--early-stopping)",
    )
    _add_device_arguments(parser.add_argument_group("speed and devices"))
    _add_run_folder_arguments(parser.add_argument_group("the run folder"))
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="settings from a run's run.json (replay it) or a JSON object of settings, "
        'e.g. {"epochs": 50}; flags given as well override them',
    )
    parser.set_defaults(**DEFAULTS)
    return parser


def _add_augmentation_arguments(augment) -> None:
    augment.add_argument(
        "--augmentation",
        choices=AUGMENTATIONS,
        help="augmentation, see above (default none, as the original)",
    )
    strong = StrongAugmentation()
    for flag, metavar, check, meaning in STRONG_FLAGS:
        default = getattr(strong, flag[2:].replace("-", "_"))
        augment.add_argument(flag, type=check, metavar=metavar, help=f"{meaning} (default {default:g})")


def _add_model_arguments(model) -> None:
    model.add_argument(
        "--weights",
        help="imagenet (Keras downloads and caches it), none (random init), or the path to a "
        "<backbone>_notop.h5 file (default imagenet)",
    )
    model.add_argument(
        "--normalization",
        choices=gbmpcnsl.model.NORMALIZATIONS,
        help="input scaling with ImageNet weights: imagenet, (x/255 - mean) / std as current Keras "
        "(default); paper, (x/255 - mean) / sqrt(std) as TF 2.5 gave the paper's models",
    )
    model.add_argument(
        "--head-init",
        choices=gbmpcnsl.model.HEAD_INITIALIZERS,
        help="kernel initializer of the logit layer: original, the paper's (default); glorot, "
        "Keras's default, for training from scratch (the original's large initial logits stall it)",
    )
    model.add_argument(
        "--backbone",
        choices=gbmpcnsl.model.BACKBONES,
        metavar="NAME",
        help="efficientnetb0 ... efficientnetb7 (default efficientnetb4)",
    )
    model.add_argument(
        "--size",
        nargs=2,
        type=positive_int,
        metavar=("H", "W"),
        help="image size to train on, when the HDF5 file holds several (default: the only one)",
    )
    model.add_argument(
        "--batchnorm-momentum",
        type=probability,
        metavar="M",
        help="momentum of every BatchNormalization layer's moving statistics, for training from "
        "scratch (e.g. 0.9); default: Keras's 0.99, as in ImageNet fine-tuning",
    )


def _add_training_arguments(train) -> None:
    train.add_argument("--epochs", type=positive_int, help="number of epochs (default 300)")
    train.add_argument("--batch-size", type=positive_int, help="batch size per replica (default 8)")
    train.add_argument(
        "--learning-rate",
        type=positive_float,
        help=f"initial learning rate, decayed by exp(-{training.LR_DECAY}) per epoch after epoch "
        f"{training.LR_CONSTANT_EPOCHS} (default 1e-4)",
    )
    train.add_argument(
        "--val-fraction",
        type=fraction,
        help="fraction of each class's slices held out for validation, whole patients at a time "
        "(default 0.15)",
    )
    train.add_argument(
        "--seed", type=int, help="seed of the split, shuffling, augmentation and init (default 0)"
    )
    train.add_argument(
        "--early-stopping",
        type=positive_int,
        metavar="PATIENCE",
        help="stop when the monitored metric has not improved for PATIENCE epochs (default: off)",
    )
    train.add_argument(
        "--monitor",
        choices=tuple(MONITORS),
        help="the metric that picks the best epoch: best-only checkpoints, early stopping, "
        "run.json (default val_loss, as the original)",
    )


def _add_device_arguments(speed) -> None:
    speed.add_argument(
        "--mixed-precision", action="store_true", help="mixed_float16 (GPU); the output stays float32"
    )
    speed.add_argument("--xla", action="store_true", help="compile the training step with XLA")
    speed.add_argument(
        "--deterministic",
        action="store_true",
        help="enable TensorFlow op determinism: same seed, same history.csv (slower)",
    )
    speed.add_argument(
        "--distribute",
        choices=("auto", "none", "mirrored", "multiworker"),
        help="auto: MirroredStrategy when more than one GPU is visible; mirrored: all local GPUs "
        "(or all logical CPUs); multiworker: MultiWorkerMirroredStrategy over several machines, "
        "cluster from TF_CONFIG or Slurm (see docs/several-machines.md) (default auto)",
    )


def _add_run_folder_arguments(run) -> None:
    run.add_argument(
        "--tensorboard",
        action="store_true",
        help="write TensorBoard logs (epoch scalars, learning rate) to RUN_DIR/tensorboard/",
    )
    run.add_argument("--resume", action="store_true", help="continue the interrupted run in RUN_DIR")
    run.add_argument(
        "--overwrite", action="store_true", help="delete an existing run folder (with run.json) first"
    )
    run.add_argument("--verbose", action="store_true", help="show TensorFlow's own log messages")
    run.add_argument(
        "--mlflow", metavar="URI", help="also log to this MLflow store, e.g. file:mlruns (optional)"
    )


def parse_args(argv: list[str] | None) -> TrainConfig:
    """The command line as a TrainConfig; argument errors exit 2 with argparse's message."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(item) for item in argv]
    config_file = argparse.ArgumentParser(add_help=False)
    config_file.add_argument("--config", type=Path)
    known, _ = config_file.parse_known_args(argv)
    try:
        from_file = [] if known.config is None else config_file_flags(known.config)
    except ValueError as error:
        parser.error(str(error))
    args = parser.parse_args(from_file + argv)
    args.command = (parser.prog, *argv)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    if args.folds is not None and args.folds < 2:
        parser.error(f"--folds {args.folds}: cross-validation needs at least 2 folds")
    if args.select == "final" and args.early_stopping:
        parser.error("--early-stopping chooses the stopping epoch on validation; --select final chooses none")
    if args.fold is not None and args.folds is None:
        parser.error("--fold needs --folds K")
    if args.fold is not None and not 0 <= args.fold < args.folds:
        parser.error(f"--fold {args.fold}: expected 0 ... {args.folds - 1} (--folds {args.folds})")
    if args.size is not None:
        args.size = tuple(args.size)
    del args.config
    return TrainConfig(**vars(args))


def main(argv: list[str] | None = None) -> int:
    """Parse, then train one split or the folds; returns the exit code (2: a UserError)."""
    config = parse_args(argv)
    common.setup_logging(config.verbose)
    return common.run_main(_train, config)


def _train(config: TrainConfig) -> int:
    with tracking.mlflow_run(config) as callbacks:
        extra = {"callbacks": callbacks} if callbacks else {}  # as before without --mlflow
        if config.folds is None:
            training.train(config, **extra)
        else:
            cross_validation.train_cross_validation(config, **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
