"""Training across worker processes: step1 with 1 and 2 MultiWorkerMirroredStrategy workers
on this machine (127.0.0.1), and the single-process Keras fit for reference.

    python benchmarks/bench_multiworker.py [--images 192] [--size 64] [--epochs 3]
                                           [--batch-size 8] [--backbone efficientnetb0]

Each row trains step1 (weights=None, `base` augmentation) from a synthetic HDF5 file
(benchmarks/bench_train.py's) in fresh processes: `fit` is --distribute none (Keras fit),
`1 worker` and `2 workers` are --distribute multiworker with a TF_CONFIG of 1 or 2 workers
(step1's custom distributed step). images/s = training slices per epoch / the median
epoch time after the first epoch (which traces the model), as the chief logs it: an epoch
includes its validation pass and checkpoint writes. On a machine with few cores the
workers share them, so two workers are a correctness run, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_train import write_synthetic_h5  # noqa: E402


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def train(h5_path: Path, run_dir: Path, workers: int, args: argparse.Namespace) -> dict:
    """Run step1 with `workers` worker processes (0: plain fit); the chief's epoch times."""
    argv = [
        sys.executable,
        "step1_train_model.py",
        "--augmentation",
        "base",
        "--epochs",
        str(args.epochs),
        "--backbone",
        args.backbone,
        "--weights",
        "none",
        "--batch-size",
        str(args.batch_size),
        "--distribute",
        "multiworker" if workers else "none",
        str(h5_path),
        str(run_dir),
    ]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(max(workers, 1))]}
    processes = []
    start = time.perf_counter()
    for index in range(max(workers, 1)):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        if workers:
            env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        processes.append(
            subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
        )
    logs = [process.communicate()[1] for process in processes]
    wall = time.perf_counter() - start
    if any(process.returncode for process in processes):
        raise SystemExit("\n".join(log[-2000:] for log in logs))
    seconds = [float(s) for s in re.findall(r"^epoch \d+/\d+: .* \(([\d.]+) s\)$", logs[0], re.M)]
    train_slices = int(re.search(r"^training: (\d+) slices", logs[0], re.M).group(1))
    return {"train_slices": train_slices, "epoch_seconds": seconds, "wall_seconds": wall}


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The cohort and training settings of this script and profile_multiworker.py."""
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backbone", default="efficientnetb0")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_training_arguments(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        h5_path = Path(work) / "bench.h5"
        write_synthetic_h5(h5_path, args.images, args.size)
        print(
            f"{args.images} images at {args.size}x{args.size}, {args.backbone}, batch {args.batch_size} per replica"
        )
        print("| variant | global batch | images/s | epoch s (after the first) | wall s |")
        print("|---|---|---|---|---|")
        for label, workers in (("fit (--distribute none)", 0), ("1 worker", 1), ("2 workers", 2)):
            result = train(h5_path, Path(work) / f"run{workers}", workers, args)
            timed = result["epoch_seconds"][1:]
            median = statistics.median(timed)
            print(
                f"| {label} | {args.batch_size * max(workers, 1)} | {result['train_slices'] / median:.1f} "
                f"| {' '.join(f'{s:.1f}' for s in timed)} | {result['wall_seconds']:.0f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
