"""The HDF5 file of step0: reading its sizes and image index, and writing one size group.

The layout's names are the contract in gbmpcnsl_common (size_key, FEATURES ...); this
module is the one place that reads and writes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from gbmpcnsl.limits import check_count
from gbmpcnsl_common import (
    CLASS_FOLDERS,
    CLASS_LABELS,
    FEATURES,
    GROUPS,
    HDF5_FORMAT_VERSION,
    LABELS,
    PATHS,
    SERIES,
    UserError,
    __version__,
    parse_size_key,
    size_key,
)

GZIP_LEVEL = 4  # h5py's default gzip level


# ---------------------------------------------------------------------------- reading
def hdf5_sizes(h5file) -> list[tuple[int, int]]:
    """The image sizes present for every class in an open h5py.File, sorted."""
    per_class = []
    for folder in CLASS_FOLDERS:
        if folder not in h5file:
            return []
        per_class.append({parse_size_key(k) for k in h5file[folder] if FEATURES in h5file[folder][k]})
    return sorted(set.intersection(*per_class))


def choose_hdf5_size(h5file, size: tuple[int, int] | None, filename: str | Path) -> tuple[int, int]:
    """The size to read: `size` if given (must exist), else the only one in the file."""
    sizes = hdf5_sizes(h5file)
    if not sizes:
        raise UserError(f"{filename}: no gbm/<H>_<W>/features and pcnsl/<H>_<W>/features groups")
    if size is not None:
        if tuple(size) not in sizes:
            listed = ", ".join(f"{h} {w}" for h, w in sizes)
            raise UserError(f"{filename}: no images of size {size[0]} {size[1]} (has: {listed})")
        return tuple(size)
    if len(sizes) > 1:
        listed = ", ".join(f"{h} {w}" for h, w in sizes)
        raise UserError(f"{filename}: holds several sizes ({listed}); pick one with --size H W")
    return sizes[0]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_hdf5_index(h5file, size: tuple[int, int]) -> tuple[list[dict], bool]:
    """One record per image {class, row, label, path, group, series}, and whether the file has groups.

    A file in the original layout (features + labels only) gets synthetic paths
    "<class>/<row>" and each slice becomes its own group (has_groups is then False).
    """
    key = size_key(size)
    records: list[dict] = []
    has_groups = True
    for folder in CLASS_FOLDERS:
        group = h5file[folder][key]
        count = group[FEATURES].shape[0]
        for name, dataset in group.items():  # declared rows, checked before any is read
            if isinstance(dataset, h5py.Dataset) and dataset.shape:
                check_count(
                    "rows", dataset.shape[0], "GBMPCNSL_MAX_ROWS", f"{h5file.filename}: {dataset.name}"
                )
                if dataset.shape[0] != count and name in (PATHS, GROUPS, LABELS, SERIES):
                    raise UserError(
                        f"{h5file.filename}: {dataset.name} has {dataset.shape[0]} rows, {FEATURES} {count}"
                    )
        if PATHS in group and GROUPS in group:
            paths = [_text(p) for p in group[PATHS][:]]
            groups = [_text(g) for g in group[GROUPS][:]]
            # Files from step0 1.0 hold unqualified folder names: qualify them by class.
            groups = [g if g.startswith(f"{folder}/") else f"{folder}/{g}" for g in groups]
        else:
            has_groups = False
            paths = [f"{folder}/{row}" for row in range(count)]
            groups = list(paths)
        # The series dataset (step0 2.x): absent in older files, read as "".
        series = [_text(s) for s in group[SERIES][:]] if SERIES in group else [""] * count
        for row in range(count):
            records.append(
                {
                    "class": folder,
                    "row": row,
                    "label": CLASS_LABELS[folder],
                    "path": paths[row],
                    "group": groups[row],
                    "series": series[row],
                }
            )
    return records, has_groups


def single_slice_groups_warning(groups: list[str]) -> str | None:
    """A one-line warning when most patient groups hold a single slice, else None.

    That is what a flat class folder (gbm/*.png, the original's layout) gives: each file is
    its own patient, so the validation split is by slice and slices of one patient land on
    both sides. The fix is one folder per patient: DATA/gbm/<patient>/<slice>.png.
    """
    sizes: dict[str, int] = {}
    for group in groups:
        sizes[group] = sizes.get(group, 0) + 1
    single = sum(1 for size in sizes.values() if size == 1)
    if not sizes or single * 2 <= len(sizes):
        return None
    return (
        f"warning: {single} of {len(sizes)} patient groups hold a single slice: is each class folder flat? "
        "The split is then by slice, not by patient; put each patient's slices in a folder of its "
        "own (DATA/gbm/<patient>/<slice>.png)"
    )


def hdf5_slice_selection(path: Path, size: tuple[int, int]) -> dict | None:
    """How step0 picked the slices of a size group ({"slices", "lesion_masks",
    "min_lesion_pixels", "series"}, its "slice_selection" attribute), None for older files."""
    try:
        with h5py.File(path, "r") as h5file:
            text = h5file[f"{CLASS_FOLDERS[0]}/{size_key(size)}"].attrs.get("slice_selection")
        return json.loads(text) if text is not None else None
    except (OSError, KeyError, ValueError):
        return None


def slice_selection_attribute(options: dict) -> str:
    """step0's find_slices options as the JSON "slice_selection" attribute of a size group."""
    selection = options.get("selection")
    pattern = options.get("series")
    return json.dumps(
        {
            "slices": selection.text() if selection is not None else "all",
            "lesion_masks": options.get("lesion_masks"),
            "min_lesion_pixels": options.get("min_lesion_pixels", 1),
            "series": pattern.pattern if pattern is not None else None,
        }
    )


# ---------------------------------------------------------------------------- writing
def hdf5_root_attributes() -> dict:
    """Root attributes written by step0: format version, class mapping, tool version."""
    return {
        "format_version": HDF5_FORMAT_VERSION,
        "class_labels": json.dumps(CLASS_LABELS),
        "tool": "gbm-pcnsl",
        "tool_version": __version__,
    }


def existing_sizes(output: Path) -> set[str]:
    """Size groups ("380_380") present in an existing output file, for any class."""
    if not h5py.is_hdf5(output):
        raise UserError(f"{output}: exists and is not an HDF5 file (choose another output name)")
    try:
        with h5py.File(output, "r") as h5file:
            return {key for folder in CLASS_FOLDERS if folder in h5file for key in h5file[folder]}
    except OSError as error:  # e.g. locked by a running writer
        raise UserError(f"{output}: cannot open ({error})") from error


def copy_other_content(source: h5py.File, target: h5py.File, replaced_key: str) -> None:
    """Copy everything of an existing output except the size group being (re)written."""
    for name, value in source.attrs.items():
        target.attrs[name] = value
    for name in source:
        if name in CLASS_FOLDERS and isinstance(source[name], h5py.Group):
            group = target.require_group(name)
            for attr, value in source[name].attrs.items():
                group.attrs[attr] = value
            for child in source[name]:
                if child != replaced_key:
                    source.copy(source[name][child], group, name=child)
        else:
            source.copy(source[name], target, name=name)


def write_image(features: h5py.Dataset, row: int, payload: object) -> None:
    """Store one encoded image as row `row` of the features dataset."""
    if isinstance(payload, bytes):
        features.id.write_direct_chunk((row, 0, 0, 0), payload)
    else:
        features[row] = payload


class SizeGroupWriter:
    """Writes /<class>/<H>_<W>/{features,labels,paths,groups,series} of one size, row by row.

    `capacity`: the most rows of each class. The features datasets are created at that
    length; rows of skipped images are trimmed by finish() (unwritten chunks take no
    space), so the dataset never has gaps.
    """

    def __init__(self, h5file: h5py.File, size: tuple[int, int], capacity: dict[str, int], compression: str):
        height, width = size
        self.h5file = h5file
        self.key = size_key(size)
        options = {
            "gzip": {"compression": "gzip", "compression_opts": GZIP_LEVEL},
            "lzf": {"compression": "lzf"},
        }
        self.features = {}
        for folder in CLASS_FOLDERS:
            self.features[folder] = h5file.create_group(f"{folder}/{self.key}").create_dataset(
                FEATURES,
                shape=(capacity[folder], height, width, 3),
                maxshape=(None, height, width, 3),
                dtype=np.uint8,
                chunks=(1, height, width, 3),
                **options.get(compression, {}),
            )
        self.paths: dict[str, list[str]] = {folder: [] for folder in CLASS_FOLDERS}
        self.groups: dict[str, list[str]] = {folder: [] for folder in CLASS_FOLDERS}
        self.series: dict[str, list[str]] = {folder: [] for folder in CLASS_FOLDERS}

    def rows(self, folder: str) -> int:
        """Rows written so far for a class."""
        return len(self.paths[folder])

    def add(self, folder: str, name: str, group_id: str, payload: object, series: str = "") -> None:
        """Write one encoded image (write_image) as the next row of its class."""
        write_image(self.features[folder], self.rows(folder), payload)
        self.paths[folder].append(name)
        self.groups[folder].append(group_id)
        self.series[folder].append(series)

    def finish(self) -> dict[str, tuple[int, int]]:
        """Trim the features, write labels, paths and groups; {class: (images, patients)}."""
        counts = {}
        for folder in CLASS_FOLDERS:
            count = self.rows(folder)
            self.features[folder].resize(count, axis=0)
            group = self.h5file[f"{folder}/{self.key}"]
            group.create_dataset(LABELS, data=np.full(count, CLASS_LABELS[folder], dtype=np.uint8))
            group.create_dataset(PATHS, data=self.paths[folder], dtype=h5py.string_dtype("utf-8"))
            group.create_dataset(GROUPS, data=self.groups[folder], dtype=h5py.string_dtype("utf-8"))
            group.create_dataset(SERIES, data=self.series[folder], dtype=h5py.string_dtype("utf-8"))
            counts[folder] = (count, len(set(self.groups[folder])))
        return counts
