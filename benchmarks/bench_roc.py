"""Bootstrap CI of the AUC: gbmpcnsl.stats.bootstrap_auc against the original step4 notebook's
loop (one sklearn roc_auc_score call per resample, RandomState.randint indices), in one
process on the same predictions.

    python benchmarks/bench_roc.py [--n-predictions 1000] [--n-bootstraps 10000] [--seed 0]

Prints both timings, their ratio, both 95% CIs, and checks that our AUCs equal sklearn's on
the first resamples (same indices fed to both).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gbmpcnsl import stats  # noqa: E402


def original_bootstrap(y_true: np.ndarray, y_pred: np.ndarray, n_bootstraps: int, seed: int) -> np.ndarray:
    """The original notebook's loop (stackoverflow.com/a/19132400): sorted bootstrap AUCs.

    Faithful except that skipped resamples are dropped; the original left them as
    uninitialised np.empty values in the array it then sorted.
    """
    aucs = []
    prng = np.random.RandomState(seed)
    for _ in range(n_bootstraps):
        indices = prng.randint(0, y_pred.shape[0], y_pred.shape[0])
        if len(np.unique(y_true[indices])) < 2:
            continue
        aucs.append(roc_auc_score(y_true[indices], y_pred[indices]))
    return np.sort(np.array(aucs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-predictions", type=int, default=1000)
    parser.add_argument("--n-bootstraps", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    y_true = rng.integers(0, 2, args.n_predictions)
    prob_pcnsl = 1 / (1 + np.exp(-(2.5 * (y_true - 0.5) + rng.normal(0, 1, args.n_predictions))))

    start = time.perf_counter()
    ours = stats.bootstrap_auc(y_true, prob_pcnsl, n_bootstraps=args.n_bootstraps, seed=args.seed)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    original = original_bootstrap(y_true, prob_pcnsl, args.n_bootstraps, args.seed)
    original_s = time.perf_counter() - start

    indices = np.random.default_rng(args.seed).integers(0, args.n_predictions, size=(100, args.n_predictions))
    max_difference = max(
        abs(roc_auc_score(y_true[row], prob_pcnsl[row]) - auc)
        for row, auc in zip(indices, ours.aucs, strict=False)
    )
    original_ci = original[int(0.025 * len(original))], original[int(0.975 * len(original))]

    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"{args.n_bootstraps} resamples of {args.n_predictions} predictions, seed {args.seed}")
    print(f"AUC of the data:       {stats.auc_score(y_true, prob_pcnsl):.4f}")
    print(
        f"ours (vectorised):     {ours_s:8.3f} s  95% CI {ours.ci()[0]:.4f}-{ours.ci()[1]:.4f}  skipped {ours.n_skipped}"
    )
    print(
        f"original (sklearn loop): {original_s:6.3f} s  95% CI {original_ci[0]:.4f}-{original_ci[1]:.4f}"
        f"  mean of resamples {original.mean():.4f}"
    )
    print(f"speed-up: {original_s / ours_s:.1f}x")
    print(f"max |ours - sklearn| on the first 100 resamples (same indices): {max_difference:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
