"""Where one multi-worker worker's time goes, against Keras fit on the same data: step1's
training (gbmpcnsl.training.train) in one fresh process per variant, with parts of
WorkerLoop's step switched off in turn.

    python benchmarks/profile_multiworker.py [--images 192] [--size 64] [--epochs 3]
                                             [--batch-size 8] [--variants fit,worker,...]

Variants: `fit` (--distribute none, Keras fit); `worker` (--distribute multiworker, one
worker, WorkerLoop as it is); `no-metrics` (the step without its strategy.gather and metric
updates); `no-callbacks` (no per-batch callback calls); `data-only` (the step only takes
its batch: the input pipeline's own speed). Each row: images/s of the training steps
(steps' time in the epochs after the first, validation excluded) and ms per step.
This is a diagnosis tool: the variants other than fit and worker are not correct training.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from bench_multiworker import add_training_arguments, free_ports  # noqa: E402

VARIANTS = ("fit", "worker", "no-metrics", "no-callbacks", "data-only")


def patch(variant: str) -> None:
    """Switch off one part of WorkerLoop's step (diagnosis only)."""
    from gbmpcnsl import distributed

    loop = distributed.WorkerLoop
    if variant == "no-metrics":
        loop._update = lambda self, tracked, labels, outputs: None
    elif variant == "data-only":
        loop._train_step = lambda self, iterator: next(iterator) and None
    elif variant == "no-callbacks":
        original = loop._train_epoch

        class Silent:  # the callbacks without their per-batch calls
            def __init__(self, callbacks):
                self.callbacks = callbacks

            def __getattr__(self, name):
                if "batch" in name:
                    return lambda *args, **kwargs: None
                return getattr(self.callbacks, name)

        def train_epoch(self, iterator, callback_list):
            return original(self, iterator, Silent(callback_list))

        loop._train_epoch = train_epoch


def child(args: argparse.Namespace) -> None:
    """One variant's training; prints a JSON line of its per-epoch training-step seconds."""
    import keras

    from gbmpcnsl.config import TrainConfig
    from gbmpcnsl.training import train
    from gbmpcnsl_common import setup_logging

    setup_logging()
    patch(args.variant)
    times: dict[str, list] = {"train": [], "epoch": [], "steps": []}

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start, self.count, self.last = time.perf_counter(), 0, None

        def on_train_batch_end(self, batch, logs=None):
            self.last, self.count = time.perf_counter(), self.count + 1

        def on_epoch_end(self, epoch, logs=None):
            times["epoch"].append(time.perf_counter() - self.start)
            times["train"].append(self.last - self.start if self.last else None)
            times["steps"].append(self.count)

    config = TrainConfig(
        hdf5=Path(args.h5),
        run_dir=Path(args.run_dir),
        augmentation="base",
        epochs=args.epochs,
        weights="none",
        backbone=args.backbone,
        batch_size=args.batch_size,
        distribute="none" if args.variant == "fit" else "multiworker",
    )
    train(config, callbacks=[Timer()])
    print("RESULT " + json.dumps(times), flush=True)


def run_variant(variant: str, h5: Path, work: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    if variant != "fit":
        cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(1)]}
        env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}})
    argv = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--h5",
        str(h5),
        "--run-dir",
        str(Path(tempfile.mkdtemp(dir=work)) / variant),
    ]
    argv += ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--backbone", args.backbone]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{variant}: {done.stderr[-3000:]}")
    result = json.loads(done.stdout.split("RESULT ")[-1])
    result["train_slices"] = int(re.search(r"^training: (\d+) slices", done.stderr, re.M).group(1))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_training_arguments(parser)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", choices=VARIANTS, dest="variant", help=argparse.SUPPRESS)
    parser.add_argument("--h5", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child(args)
        return 0
    from bench_train import write_synthetic_h5

    with tempfile.TemporaryDirectory() as work:
        h5 = Path(work) / "bench.h5"
        write_synthetic_h5(h5, args.images, args.size)
        print(
            f"{args.images} images at {args.size}x{args.size}, {args.backbone}, batch {args.batch_size}; load {os.getloadavg()[0]:.1f}"
        )
        print("| variant | images/s, training steps | ms/step | images/s, whole epoch | epoch s | load |")
        print("|---|---:|---:|---:|---|---:|")
        for variant in args.variants.split(","):
            result = run_variant(variant, h5, Path(work), args)
            slices, epoch = result["train_slices"], statistics.median(result["epoch"][1:])
            train = [s for s in result["train"][1:] if s is not None]
            steps = statistics.median(train) if train else None
            per_step = f"{1000 * steps / result['steps'][1]:.0f}" if steps else "-"
            epochs = " ".join(f"{s:.1f}" for s in result["epoch"][1:])
            print(
                f"| {variant} | {f'{slices / steps:.1f}' if steps else '-'} | {per_step} | "
                f"{slices / epoch:.1f} | {epochs} | {os.getloadavg()[0]:.1f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
