"""A figure of MRI slices (top row) above their Grad-CAM overlays (bottom row).

    python demo/make_gradcam_figure.py IMAGES... --overlays DIR --out images/gradcam_demo.png
                                       [--masks MASK_DIR] [--titles T1 T2 ...] [--overwrite]

DIR is step5's --output-dir. Each image's overlay is found by the image's path: the
longest trailing part of it that exists under DIR (`data/gbm/p1/s1.jpg` -> `DIR/gbm/p1/s1.png`,
or `s1.jpg.png` when step5 kept the extension), so pass images from the run that wrote DIR.
With --masks (the demo generator's OUT_DIR/masks), the lesion outline is drawn in white on
both rows. Titles default to the class folder in the image's path (GBM / PCNSL).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from gbmpcnsl.gradcam import overlay_names  # noqa: E402
from gbmpcnsl_common import CLASS_FOLDERS, CLASS_NAMES, UserError, load_image, run_main


def find_under(folder: Path, image: Path, names) -> Path | None:
    """The file under `folder` whose path matches the longest trailing part of `image`'s
    path, trying each name that `names(filename)` gives; None if there is none."""
    parts = Path(os.path.abspath(image)).parts[1:]
    for start in range(len(parts)):
        *parents, filename = parts[start:]
        for name in names(filename):
            candidate = folder.joinpath(*parents, name)
            if candidate.is_file():
                return candidate
    return None


def overlay_file_names(filename: str) -> list[str]:
    return list(overlay_names(filename))  # step5's naming rule


def mask_names(filename: str) -> list[str]:
    return [str(Path(filename).with_suffix(".png")), filename]


def default_title(image: Path) -> str:
    for part in reversed(Path(os.path.abspath(image)).parts[:-1]):
        if part.lower() in CLASS_FOLDERS:
            return CLASS_NAMES[CLASS_FOLDERS.index(part.lower())]
    return image.name


def _main(argv) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("images", nargs="+", type=Path, help="the slices to show, left to right")
    parser.add_argument("--overlays", required=True, type=Path, metavar="DIR", help="step5's --output-dir")
    parser.add_argument("--out", required=True, type=Path, help="figure file to write (.png)")
    parser.add_argument("--masks", type=Path, metavar="MASK_DIR", help="lesion masks (0/255) to outline")
    parser.add_argument("--titles", nargs="+", help="one title per image (default: the class)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    if args.titles and len(args.titles) != len(args.images):
        parser.error(f"--titles: {len(args.titles)} given for {len(args.images)} images")
    if args.out.exists() and not args.overwrite:
        raise UserError(f"{args.out}: exists; use --overwrite to replace")

    columns = []
    for index, image_path in enumerate(args.images):
        overlay_path = find_under(args.overlays, image_path, overlay_file_names)
        if overlay_path is None:
            raise UserError(f"{image_path}: no overlay for it under {args.overlays}")
        with Image.open(overlay_path) as overlay_file:
            overlay = np.asarray(overlay_file.convert("RGB"))
        image = load_image(image_path, overlay.shape[:2])  # the overlay has the image's size
        mask = None
        if args.masks is not None:
            mask_path = find_under(args.masks, image_path, mask_names)
            if mask_path is None:
                raise UserError(f"{image_path}: no mask for it under {args.masks}")
            mask = (
                np.asarray(Image.open(mask_path).convert("L").resize(image.shape[1::-1], Image.NEAREST)) > 127
            )
        title = args.titles[index] if args.titles else default_title(image_path)
        columns.append((image, overlay, mask, title))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(columns), figsize=(2.4 * len(columns), 5.0), squeeze=False)
    for column, (image, overlay, mask, title) in enumerate(columns):
        for row, picture in enumerate((image, overlay)):
            axis = axes[row, column]
            axis.imshow(picture)
            if mask is not None and mask.any():
                axis.contour(mask, levels=[0.5], colors="white", linewidths=0.8)
            axis.set_xticks([])
            axis.set_yticks([])
        axes[0, column].set_title(title)
    axes[0, 0].set_ylabel("slice")
    axes[1, 0].set_ylabel("Grad-CAM")
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=120)
    plt.close(figure)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
