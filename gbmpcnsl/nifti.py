"""NIfTI volumes: names, lesion masks, and decoding a volume to display slices.

nibabel does the reading; the volume is made canonical (RAS+) once, right after reading.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from gbmpcnsl.limits import check_shape
from gbmpcnsl_common import UserError, first_line, percentile_window, window_to_uint8

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# nibabel's notes about odd header fields (e.g. qfac) are not ours to print.
logging.getLogger("nibabel").setLevel(logging.ERROR)


def is_nifti(path: str | Path) -> bool:
    """True for a .nii or .nii.gz file name (any case)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | Path) -> str:
    """A volume's file name without .nii / .nii.gz ("t1c.nii.gz" -> "t1c")."""
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[: -len(".nii")]


# ---------------------------------------------------------------------------- lesion masks
def lesion_mask_path(volume: Path, pattern: str) -> Path:
    """The mask of a volume: `pattern` with {stem} replaced, resolved beside the volume."""
    return volume.parent / pattern.replace("{stem}", nifti_stem(volume))


def lesion_slices(volume: Path, pattern: str, min_lesion_pixels: int) -> list[int]:
    """Axial slice indices (RAS+, inferior to superior) where the volume's lesion mask has
    at least `min_lesion_pixels` labelled (non-zero) voxels. Raises UserError for a
    missing mask or one on another voxel grid."""
    import nibabel as nib

    mask_path = lesion_mask_path(volume, pattern)
    if not mask_path.is_file():
        raise UserError(f"--lesion-masks {pattern}: no mask {mask_path} for {volume}")
    try:
        image, mask = nib.load(volume), nib.load(mask_path)
    except Exception as error:
        raise UserError(f"{mask_path}: cannot read lesion mask ({error})") from error
    if image.shape[:3] != mask.shape[:3] or not np.allclose(image.affine, mask.affine, atol=1e-3):
        raise UserError(
            f"{mask_path}: lesion mask is on another voxel grid than {volume} "
            f"(shape {mask.shape[:3]} vs {image.shape[:3]}, or a different affine)"
        )
    labelled = np.asanyarray(nib.as_closest_canonical(mask).dataobj)
    labelled = labelled.reshape(labelled.shape[:3] + (-1,))[..., 0] != 0
    per_slice = labelled.sum(axis=(0, 1))
    return [int(k) for k in np.flatnonzero(per_slice >= min_lesion_pixels)]


# ---------------------------------------------------------------------------- pixels
def _unreadable(path, error: BaseException | str) -> UserError:
    reason = error if isinstance(error, str) else first_line(error)
    return UserError(f"{path}: unreadable NIfTI volume ({reason})")


def _load_header(path: Path):
    import nibabel as nib

    try:
        return nib.load(path)
    except Exception as error:
        raise _unreadable(path, error) from error


def check_nifti_readable(path: Path):
    """The file's image (header only), or UserError ("unreadable NIfTI volume") when
    nibabel cannot read its header or it is not one 3-D volume."""
    image = _load_header(path)
    shape = tuple(int(n) for n in image.shape)
    if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
        raise _unreadable(
            path, f"{len(shape)}-D, shape {'x'.join(map(str, shape))}; a 3-D volume is expected"
        )
    return image


def read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, float]]:
    """A NIfTI volume -> uint8 axial slices (K, H, W), inferior to superior, shown as a
    radiology viewer shows them, and the in-plane spacing (rows, columns) in mm.

    Reoriented to the closest canonical orientation (RAS+) first, so every file reads the
    same way whatever its affine; scl_slope/scl_inter applied (get_fdata); windowed by the
    header's display range (cal_min/cal_max) when it has one, else by one 0.5-99.5
    percentile window over the whole volume (the window a DICOM series without one gets),
    so all slices of a patient share one scale. A 4-D file (several volumes) is refused.
    """
    image = check_nifti_readable(path)
    check_shape(image.shape, "GBMPCNSL_MAX_VOXELS", path)  # before anything is decoded
    try:
        return _nifti_display_slices(image)
    except MemoryError as error:
        raise UserError(
            f"{path}: out of memory decoding a {'x'.join(map(str, image.shape))} volume"
        ) from error


def _nifti_display_slices(image) -> tuple[np.ndarray, tuple[float, float]]:
    """read_nifti's work on a loaded (header only) 3-D image."""
    import nibabel as nib

    path = image.get_filename()
    try:
        image = nib.as_closest_canonical(image)
        volume = image.get_fdata(dtype=np.float32)
    except MemoryError:
        raise
    except Exception as error:
        raise _unreadable(path, error) from error
    volume = volume.reshape(volume.shape[:3])
    cal_min, cal_max = float(image.header["cal_min"]), float(image.header["cal_max"])
    low, high = (cal_min, cal_max) if cal_max > cal_min else percentile_window(volume)
    display = window_to_uint8(volume, low, high)
    # RAS+ array (i: to the right, j: to the front, k: up) -> (k, rows, columns) with
    # anterior at the top and the patient's right on the image's left (radiological view).
    slices = np.ascontiguousarray(np.transpose(display, (2, 1, 0))[:, ::-1, ::-1])
    zooms = image.header.get_zooms()
    return slices, (float(zooms[1]), float(zooms[0]))
