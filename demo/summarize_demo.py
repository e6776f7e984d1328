"""Print where the demo's outputs are and the demo model's test AUROC with its CIs, the
patient level (mean probability per patient) first, then the slice level.

    python demo/summarize_demo.py demo_output

Reads demo_output/figures/roc_metrics.csv written by step4_plot_roc.ipynb. Exits 1 when
an expected output is missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

OUTPUTS = [
    ("demo cohort (train / test patients)", "data_train", "data_test"),
    ("step0 HDF5 file", "train.h5"),
    ("step1 run folder (checkpoints, history.csv, run.json, split.csv, val_predictions.csv)", "run"),
    ("step2 predictions on the test patients", "predictions_test.csv", "predictions_test.txt"),
    ("step2 per-patient predictions (mean of the slices)", "patients_test.csv"),
    ("step3/step4 figures and metrics table", "figures"),
    ("step3/step4 executed notebooks", "step3_plot_training_metrics.ipynb", "step4_plot_roc.ipynb"),
    ("step5 Grad-CAM overlays", "gradcam"),
]
REPORT = "report.html"  # step4's report: the one file to send a co-author


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output_dir", type=Path, help="the demo's output folder")
    args = parser.parse_args(argv)

    missing = []
    print(f"\nDemo outputs under {args.output_dir}/:")
    for description, *names in OUTPUTS:
        for name in names:
            if not (args.output_dir / name).exists():
                missing.append(str(args.output_dir / name))
        print(f"  {description:<66} {', '.join(names)}")
    metrics_csv = args.output_dir / "figures" / "roc_metrics.csv"
    if missing or not metrics_csv.is_file():
        print(f"error: missing outputs: {', '.join(missing) or metrics_csv}", file=sys.stderr)
        return 1

    if not (args.output_dir / REPORT).is_file():
        print(f"error: missing outputs: {args.output_dir / REPORT}", file=sys.stderr)
        return 1
    print(f"\nReport (tables and figures, one file): {args.output_dir / REPORT}")
    metrics = pd.read_csv(metrics_csv)
    if "level" not in metrics:
        metrics["level"] = "slice"  # a table written before the patient level existed
    metrics = metrics.sort_values("level", key=lambda level: level != "patient", kind="stable")
    print("\nTest set (patients never seen in training), patients first:")
    for row in metrics.itertuples():
        ci = f"{100 * getattr(row, 'confidence', 0.95):.10g}%"
        cases = f"{row.n_patients:.0f} patients" if row.level == "patient" else f"{row.n_images} slices"
        wilson = " (Wilson CIs count slices as if independent)" if row.level == "slice" else ""
        chosen = "fixed" if getattr(row, "threshold_from", "") == "fixed" else "chosen on validation"
        print(
            f"  {row.model}, {row.level} level, {row.positive_class} positive: AUROC {row.auc:.3f} "
            f"({ci} {row.bootstrap_unit} bootstrap CI {row.auc_ci_low:.3f}-{row.auc_ci_high:.3f}; "
            f"DeLong {row.delong_ci_low:.3f}-{row.delong_ci_high:.3f}), {cases}, "
            f"sensitivity {row.sensitivity:.3f}, specificity {row.specificity:.3f} "
            f"at threshold {row.threshold:.3f} ({chosen}){wilson}, Brier {row.brier:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
