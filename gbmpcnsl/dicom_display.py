"""DICOM display values: from decoded pixels to the 0-255 grey levels or RGB a viewer shows.

    frame_views(ds, frames)        per frame: the attributes of its pixel transforms
    voi_to_display(values, view)   VOI window or VOI LUT -> 0-255 (None: no usable VOI)
    series_members(path)           the single-frame files of a file's series
    unpadded_values(stack, ds, ..) Modality LUT values without PixelPaddingValue pixels
    color_to_uint8(pixels, ds)     RGB / YBR / PALETTE COLOR -> uint8 RGB

The grey pipeline is PS3.3's: Modality LUT (RescaleSlope/RescaleIntercept or a Modality
LUT), then the first VOI window (C.11.2.1.2, pydicom's apply_windowing with index 0, so
multi-valued windows take their first value as viewers do) or VOI LUT, whose output range
(0 to 2^n - 1, n the LUT's bits per entry) is the display's 0-255; MONOCHROME1 is inverted
afterwards (gbmpcnsl.dicom). Enhanced multi-frame files carry these per frame in their
functional groups (PixelValueTransformationSequence, FrameVOILUTSequence), the shared
groups being the fallback for frames without their own.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

MODALITY_KEYWORDS = ("RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence")
VOI_KEYWORDS = ("WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence")
GROUP_KEYWORDS = (*MODALITY_KEYWORDS, *VOI_KEYWORDS)
GROUPS = (("PixelValueTransformationSequence", MODALITY_KEYWORDS), ("FrameVOILUTSequence", VOI_KEYWORDS))


# ---------------------------------------------------------------------------- functional groups
def _first_item(ds, keyword: str):
    try:
        sequence = ds.get(keyword)
        return sequence[0] if sequence else None
    except (IndexError, TypeError, AttributeError):
        return None


def _overlay(view, item, keywords: tuple[str, ...]) -> None:
    """A functional group's macro replaces the whole of what it describes (a frame window
    without VOILUTFunction is LINEAR, whatever the top level says)."""
    for keyword in keywords:
        if keyword in view:
            del view[keyword]
    for keyword in keywords:
        if keyword in item:
            view.add(item[keyword])


def frame_views(ds, frames: int) -> list:
    """One dataset per frame holding what its grey pipeline reads: the top level's
    attributes, overridden by the shared functional groups, then by the frame's own.
    Files without functional groups give `ds` itself for every frame."""
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if shared is None and not per_frame:
        return [ds] * frames
    from pydicom.dataset import Dataset

    inherited = [
        ds[keyword]
        for keyword in ("PhotometricInterpretation", "BitsStored", "PixelRepresentation", *GROUP_KEYWORDS)
        if keyword in ds
    ]
    views = []
    for frame in range(frames):
        view = Dataset()
        for element in inherited:
            view.add(element)
        if hasattr(ds, "file_meta"):  # the byte order of OW LUT data
            view.file_meta = ds.file_meta
        view.set_original_encoding(*ds.original_encoding)
        for group in (shared, per_frame[frame] if frame < len(per_frame) else None):
            for sequence, keywords in GROUPS:
                item = _first_item(group, sequence) if group is not None else None
                if item is not None:
                    _overlay(view, item, keywords)
        views.append(view)
    return views


def view_key(view) -> tuple:
    """Frames whose views give the same key share one grey pipeline."""
    return tuple(repr(view.get(keyword)) for keyword in GROUP_KEYWORDS)


# ---------------------------------------------------------------------------- VOI
def _lut_item(view):
    item = _first_item(view, "VOILUTSequence")
    if item is None or item.get("LUTDescriptor") is None or item.get("LUTData") is None:
        return None
    return item


def voi_to_display(values: np.ndarray, view) -> np.ndarray | None:
    """The first VOI transform of `view` on Modality LUT output `values`, as float 0-255:
    a VOI LUT (its entries scaled from 0..2^n-1, so a descending LUT inverts), else the
    first window (pydicom's apply_windowing onto an 8-bit output range). None when the
    view has neither, or a broken one (e.g. a LINEAR window narrower than 1)."""
    from pydicom.pixels.processing import apply_voi, apply_windowing

    item = _lut_item(view)
    try:
        if item is not None:
            entries, first, bits = (int(v) for v in item.LUTDescriptor[:3])
            entries = entries or 2**16
            # LUTs index integer values; outside its inputs, a LUT's end entries apply (clipped
            # here: pydicom's uint8 index array wraps for 8-bit LUTs).
            indices = np.clip(np.rint(values), first, first + entries - 1).astype(np.int64)
            return apply_voi(indices, view, index=0).astype(np.float64) * (255.0 / (2**bits - 1))
        if view.get("WindowCenter") is None or view.get("WindowWidth") is None:
            return None
        from pydicom.dataset import Dataset

        window = Dataset()
        window.PhotometricInterpretation, window.BitsStored, window.PixelRepresentation = "MONOCHROME2", 8, 0
        for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
            if keyword in view:
                window.add(view[keyword])
        return apply_windowing(np.asarray(values, dtype=np.float64), window, index=0)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, NotImplementedError):
        return None


# ---------------------------------------------------------------------------- padding
def padding_mask(stored: np.ndarray, ds) -> np.ndarray | None:
    """The pixels that hold PixelPaddingValue (or lie between it and PixelPaddingRangeLimit),
    compared with the stored values (PS3.3 C.7.5.1.1.2); None when the file has none."""
    try:
        value = ds.get("PixelPaddingValue")
        if value is None:
            return None
        limit = ds.get("PixelPaddingRangeLimit")
        low, high = (int(value), int(value)) if limit is None else sorted((int(value), int(limit)))
    except (TypeError, ValueError):
        return None
    return (stored >= low) & (stored <= high)


# ---------------------------------------------------------------------------- series
def series_members(path: Path) -> list[Path]:
    """The single-frame DICOM files of `path`'s series: those in its folder with its
    SeriesInstanceUID (hidden files aside), sorted by name."""
    return _folder_series(str(path.parent), path.parent.stat().st_mtime_ns).get(_series_uid(path), [path])


def _series_uid(path: Path) -> str:
    import pydicom

    from gbmpcnsl.dicom import DICOM_EXTENSIONS

    try:
        header = pydicom.dcmread(
            path,
            stop_before_pixels=True,
            specific_tags=["SeriesInstanceUID", "NumberOfFrames"],
            force=path.suffix.lower() in DICOM_EXTENSIONS,
        )
        if int(header.get("NumberOfFrames", 1) or 1) > 1:
            return ""
        return "uid:" + str(header.get("SeriesInstanceUID", "") or "")
    except Exception:
        return ""


@functools.lru_cache(maxsize=4)
def _folder_series(folder: str, modified_ns: int) -> dict[str, list[Path]]:
    """{series key: its single-frame files} of one folder (unreadable and multi-frame
    files belong to none)."""
    from gbmpcnsl.dicom import is_dicom

    series: dict[str, list[Path]] = {}
    for path in sorted(Path(folder).iterdir()):
        if path.name.startswith(".") or not path.is_file() or not is_dicom(path):
            continue
        key = _series_uid(path)
        if key:
            series.setdefault(key, []).append(path)
    return series


# ---------------------------------------------------------------------------- values
def unpadded_values(stack: np.ndarray, ds, views: list) -> np.ndarray:
    """The Modality LUT values of all frames of a stack, PixelPaddingValue pixels left out."""
    from pydicom.pixels.processing import apply_modality_lut

    padding = padding_mask(stack, ds)
    values = []
    for key_frames in frames_by_view(views).values():
        frames = stack[key_frames]
        kept = frames if padding is None else frames[~padding[key_frames]]
        values.append(np.asarray(apply_modality_lut(kept, views[key_frames[0]]), dtype=np.float64).ravel())
    return np.concatenate(values)


def frames_by_view(views: list) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for frame, view in enumerate(views):
        groups.setdefault(view_key(view), []).append(frame)
    return groups


# ---------------------------------------------------------------------------- colour
def color_to_uint8(pixels: np.ndarray, ds) -> np.ndarray:
    """RGB (pydicom already converted YBR_* to RGB) or PALETTE COLOR -> uint8 RGB: samples
    scaled from 0..2^BitsStored-1 (palette entries from their own bits) onto 0-255."""
    from pydicom.pixels.processing import apply_color_lut

    bits = int(ds.get("BitsStored", 8) or 8)
    if str(ds.PhotometricInterpretation).upper() == "PALETTE COLOR":
        try:
            pixels = apply_color_lut(pixels, ds)[..., :3]  # an alpha channel is not shown
        except (ValueError, AttributeError, KeyError, TypeError) as error:
            raise ValueError("PALETTE COLOR without a usable colour lookup table") from error
        bits = pixels.dtype.itemsize * 8
    if pixels.dtype == np.uint8 and bits == 8:
        return pixels
    scaled = np.rint(pixels.astype(np.float64) * (255.0 / (2**bits - 1)))
    return np.clip(scaled, 0, 255).astype(np.uint8)
