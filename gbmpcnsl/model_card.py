"""The model card of an export (step6): what the model was trained on, with which settings
and validation results, the input pipeline it expects, and what it is for. It goes into
the export's metadata and, as Markdown, into MODEL_CARD.md beside the export.

Everything comes from the training run's files beside the checkpoint (run.json, split.csv
as step1 writes them); a checkpoint without them (a paper-era .h5, a copied .keras) gets a
card that says what is not known instead of guessing.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from gbmpcnsl_common import CLASS_NAMES, IMAGE_EXTENSIONS, split_slice_name

CARD_NAME = "MODEL_CARD.md"  # inside a SavedModel folder; OUT + ".MODEL_CARD.md" beside a file
INTENDED_USE = (
    "Research tool only: not a medical device, not validated for clinical use, and not to be "
    "used for diagnosis or treatment decisions. It tells glioblastoma (GBM) from primary CNS "
    "lymphoma (PCNSL) on axial contrast-enhanced T1-weighted MRI slices of adults with one of "
    "these two diagnoses; it knows no other class (a metastasis or a normal scan still gets a "
    "GBM or PCNSL call), and its validation numbers hold for its training cohort's scanners "
    "and protocols only."
)
LOADER = (
    "Read every slice with gbmpcnsl.pixels.load_slice(name, (H, W)), the loader of step0, step2 "
    "and step5 (a slice of a volume is named 'volume.nii.gz#k' or 'series_folder#k', k 0-based "
    "from inferior to superior), then pass the uint8 RGB values 0-255 as float32 (N, H, W, 3), "
    "unscaled: the network normalizes them itself."
)
SOURCE_RULES = {
    "image files": "2-D image files (.png .jpg .tif .bmp): gbmpcnsl_common.load_image, bit for bit: "
    'Image.convert("RGB") then resize((W, H), LANCZOS); 16-bit and float images first windowed '
    "to 0-255 at their 0.5-99.5 percentiles.",
    "DICOM": "DICOM: Modality LUT (RescaleSlope/Intercept), then the file's first VOI window "
    "(WindowCenter/WindowWidth or VOI LUT) scaled to 0-255 (no window: the 0.5-99.5 percentile "
    "window); MONOCHROME1 inverted; a folder's single-frame files form a series ordered along "
    "the slice normal; non-square pixels resampled to square; axial series only (unless "
    "--any-orientation); then RGB and the LANCZOS resize.",
    "NIfTI": "NIfTI: reoriented to RAS+ (closest canonical), axial slices shown as a radiology "
    "viewer shows them; scl_slope/scl_inter applied; one window per volume: cal_min/cal_max, "
    "else the 0.5-99.5 percentiles of the head voxels; non-square voxels resampled to square; "
    "axial volumes only (unless --any-orientation); then RGB and the LANCZOS resize.",
}


def source_kind(path: str) -> str:
    """'image files', 'DICOM' or 'NIfTI': how a training slice (split.csv's path) was read."""
    source, _ = split_slice_name(path)
    name = source.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "NIfTI"
    if name.endswith(IMAGE_EXTENSIONS):
        return "image files"
    return "DICOM"  # .dcm/.ima files, files with the DICM preamble, series folders


def read_split(path: Path) -> list[dict]:
    """split.csv's rows (path, group, label, subset), or [] when there is none."""
    if not path.is_file():
        return []
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def cohort_counts(rows: list[dict]) -> dict:
    """{subset: {class: {"slices": n, "patients": n}}} from split.csv's rows."""
    counts: dict = {}
    for subset in sorted({row["subset"] for row in rows}):
        counts[subset] = {}
        for label, name in enumerate(CLASS_NAMES):
            part = [row for row in rows if row["subset"] == subset and int(row["label"]) == label]
            counts[subset][name] = {"slices": len(part), "patients": len({row["group"] for row in part})}
    return counts


def training_summary(checkpoint: Path) -> dict:
    """The card's training part from the run files beside `checkpoint` (empty values when
    they are missing): cohort counts, settings, validation metrics, source kinds."""
    run_json = checkpoint.parent / "run.json"
    try:
        run = json.loads(run_json.read_text()) if run_json.is_file() else {}
    except (OSError, ValueError):
        run = {}
    rows = read_split(checkpoint.parent / "split.csv")
    settings = {k: v for k, v in run.get("arguments", {}).items() if k not in ("hdf5", "run_dir", "verbose")}
    validation = {
        key: run[key] for key in ("monitor", "best_epoch", "best_val_loss", "best_val_auc") if key in run
    }
    return {
        "run_json": run_json.name if run else None,
        "backbone": run.get("backbone"),
        "command": run.get("command"),
        "hdf5_sha256": run.get("hdf5_sha256"),
        "cohort": cohort_counts(rows),
        "settings": settings,
        "validation": validation,
        "sources": sorted({source_kind(row["path"]) for row in rows}),
    }


def card_metadata(checkpoint: Path, size: tuple[int, int]) -> dict:
    """The card as the export's metadata records it: training, input pipeline, intended use."""
    training = training_summary(checkpoint)
    sources = training["sources"] or list(SOURCE_RULES)  # unknown: every rule applies
    return {
        "training": training,
        "input_pipeline": {
            "input_size": list(size),
            "trained_on": training["sources"] or "not recorded (no split.csv beside the checkpoint)",
            "loader": LOADER,
            "rules": [SOURCE_RULES[kind] for kind in sources],
        },
        "intended_use": INTENDED_USE,
    }


def card_markdown(metadata: dict) -> str:
    """MODEL_CARD.md from the export's metadata (export_metadata with card_metadata)."""
    training, pipeline = metadata["training"], metadata["input_pipeline"]
    height, width = pipeline["input_size"]
    lines = [
        f"# Model card: {metadata['model_name']} ({metadata['format']})",
        "",
        "## Intended use",
        "",
        metadata["intended_use"],
        "",
        "## Output",
        "",
        f"P(PCNSL) per image ({metadata['output']['name']}); P(GBM) = 1 - P(PCNSL). "
        f"Classes: {json.dumps(metadata['classes'])}. Exported from {metadata['source_checkpoint']['name']} "
        f"(SHA-256 {metadata['source_checkpoint']['sha256']}) by {metadata['tool']}.",
        "",
        "## Input pipeline",
        "",
        f"Input {height} x {width} RGB. Trained on: {_text(pipeline['trained_on'])}.",
        "",
        pipeline["loader"],
        "",
        *[f"- {rule}" for rule in pipeline["rules"]],
        "",
        "## Training cohort",
        "",
    ]
    if training["cohort"]:
        lines += ["| subset | class | slices | patients |", "|---|---|---|---|"]
        for subset, classes in training["cohort"].items():
            lines += [
                f"| {subset} | {name} | {n['slices']} | {n['patients']} |" for name, n in classes.items()
            ]
    else:
        lines.append("Not recorded (no split.csv beside the checkpoint).")
    lines += ["", "## Settings", "", _text(training["settings"] or "not recorded (no run.json)")]
    if training["command"]:
        lines += ["", f"Command: `{' '.join(training['command'])}`"]
    lines += ["", "## Validation", "", _text(training["validation"] or "not recorded"), ""]
    return "\n".join(lines)


def _text(value) -> str:
    """A value as one line of the card."""
    if isinstance(value, dict):
        return ", ".join(f"{key} {item}" for key, item in value.items())
    if isinstance(value, list):
        return ", ".join(str(item) for item in value)
    return str(value)


def card_path(out: Path, export_format: str) -> Path:
    """Where MODEL_CARD.md goes: inside a SavedModel folder, else beside OUT as OUT.MODEL_CARD.md."""
    return out / CARD_NAME if export_format == "saved_model" else out.with_name(f"{out.name}.{CARD_NAME}")
