"""Compare the test AUROCs of demo models trained with different augmentations.

    python demo/summarize_comparison.py demo_compare none base strong

Reads OUT/predictions_<augmentation>.csv (step2's CSV on the demo's test patients) for each
augmentation named, and prints one line per model: the slice-level AUROC (PCNSL positive)
with its DeLong and bootstrap 95% CIs, and the patient-level AUROC (mean probability per
patient) with its bootstrap 95% CI. When the package offers DeLong's paired test, the
`strong` model (or the last one named) is compared with each of the others on the same
slices by DeLong's paired test, its variance clustered by patient (Obuchowski 1997: slices of
one patient are not independent). Uses gbmpcnsl's functions, as step4's notebook does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as demo/...: find gbmpcnsl
from gbmpcnsl import delong, predictions, report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output_dir", type=Path, help="compare_augmentations.sh's output folder")
    parser.add_argument("augmentations", nargs="+", help="augmentations to compare, e.g. none base strong")
    parser.add_argument("--n-bootstraps", type=int, default=10_000)
    args = parser.parse_args(argv)

    frames = {}
    order = ["none", "base", "base_and_noise", "strong"]  # step1's order, then any others
    for augmentation in sorted(args.augmentations, key=lambda a: order.index(a) if a in order else 99):
        csv_path = args.output_dir / f"predictions_{augmentation}.csv"
        if not csv_path.is_file():
            print(f"error: {csv_path}: no such file", file=sys.stderr)
            return 1
        frames[augmentation] = predictions.read_predictions(csv_path)
    print("\nTest AUROC (PCNSL positive) on the demo's unseen test patients, by training augmentation:")
    for augmentation, frame in frames.items():
        row = report.class_metrics(frame, "PCNSL", n_bootstraps=args.n_bootstraps)
        patients = report.class_metrics(frame, "PCNSL", n_bootstraps=args.n_bootstraps, level="patient")
        print(
            f"  {augmentation:<15} slices: AUROC {row['auc']:.3f} (DeLong 95% CI {row['delong_ci_low']:.3f}-"
            f"{row['delong_ci_high']:.3f}; {row['bootstrap_unit']} bootstrap {row['auc_ci_low']:.3f}-"
            f"{row['auc_ci_high']:.3f}; "
            f"{row['n_images']} slices)   patients: AUROC {patients['auc']:.3f} (bootstrap "
            f"{patients['auc_ci_low']:.3f}-{patients['auc_ci_high']:.3f}; {patients['n_patients']} patients)"
        )
    paired_test = delong.delong_paired_test
    last = "strong" if "strong" in frames else list(frames)[-1]
    others = [name for name in frames if name != last]
    for other in others:
        a, b = frames[last], frames[other]
        if list(a["path"]) != list(b["path"]):
            print(
                f"error: predictions_{last}.csv and predictions_{other}.csv list other slices",
                file=sys.stderr,
            )
            return 1
        score = report.class_score
        groups = a["patient_id"] if "patient_id" in a else None  # slices clustered in patients
        result = paired_test(a["label"].to_numpy(), score(a, "PCNSL"), score(b, "PCNSL"), groups=groups)
        print(
            f"  {last} - {other}: AUROC difference {result['difference']:+.3f} (95% CI "
            f"{result['ci_low']:+.3f} to {result['ci_high']:+.3f}), DeLong paired test (clustered by patient) p = {result['p_value']:.2g}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
