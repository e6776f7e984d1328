"""Write a synthetic GBM / PCNSL cohort of MRI-like slices (no download, no real patients).

    python demo/make_demo_data.py OUT_DIR [--patients-per-class 20] [--slices-per-patient 5]
                                          [--size 256] [--format png|jpg|dicom|nifti] [--seed 0] [--overwrite]

Writes 8-bit grayscale axial "contrast-enhanced T1" slices in step0's input layout, and a
lesion mask (0/255 PNG) for every slice in a parallel tree that step0 never reads:

    OUT_DIR/gbm/gbm_s0_p000/slice00.png       OUT_DIR/masks/gbm/gbm_s0_p000/slice00.png
    OUT_DIR/pcnsl/pcnsl_s0_p000/slice00.png   OUT_DIR/masks/pcnsl/pcnsl_s0_p000/slice00.png

Every slice shows a head (scalp, skull, brain with grey/white texture, ventricles, noise,
a smooth bias field) and one kind of lesion. Patients differ as real scans do: head size
and shape, in-plane rotation (+-25 degrees), position in the field of view, left-right
orientation, global intensity and contrast, bias field; lesions sit at varied positions
and have varied sizes. The kinds of lesion:
- GBM-like: a thick, irregular ring of enhancement around a dark necrotic core, with
  hypointense oedema around it; anywhere in the hemispheres.
- PCNSL-like: solid, homogeneous enhancement with a smoother outline, often next to the
  ventricles, sometimes several lesions.
Lesion size and brightness ranges overlap between the classes, some GBMs have thin rings
and small cores and some PCNSLs are faintly heterogeneous, so the task is learnable but
not trivial. A patient's lesion stays in place across its slices; its size changes a
little from slice to slice. --format dicom writes each patient as one 16-bit DICOM series
(OUT_DIR/gbm/<patient>/IM0001.dcm..., with geometry, rescale and window tags), --format
nifti as one volume plus its lesion mask (OUT_DIR/gbm/<patient>/t1c.nii.gz and
t1c_seg.nii.gz); their tags map them back to exactly the 8-bit slices. The same --seed gives byte-identical files; patient ids carry
the seed, so cohorts made with different seeds (e.g. train and test) never share a patient.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as demo/...: find gbmpcnsl
from gbmpcnsl.outputs import DEMO_MARKER, check_replaceable, mark_demo_folder, replacing  # noqa: E402
from gbmpcnsl_common import UserError  # noqa: E402

CLASS_FOLDERS = ("gbm", "pcnsl")


# ---------------------------------------------------------------------------- patients
def make_patient(rng: np.random.Generator, kind: str) -> dict:
    """Draw one synthetic patient: head size, shape, pose and position in the field of view,
    left-right orientation, scanner intensity, contrast and bias field, tissue contrast and
    its lesion(s).

    Coordinates are normalised: the image spans -1..1. Anatomy (ventricles, lesions) is
    placed in head coordinates, in which a mid-sized head has semi-axes ~0.8/0.9; the head
    is then scaled by `head_size`, rotated by `head_angle` and moved by `head_shift`.
    """
    head_size = rng.uniform(0.7, 1.0)  # heads and fields of view differ between patients
    axes = (rng.uniform(0.72, 0.84), rng.uniform(0.84, 0.95))  # head shape: width / length
    room = max(0.0, 0.97 - head_size * axes[1])  # keep the head inside the image
    patient = {
        "head_size": head_size,
        "head_axes": axes,
        "head_shift": tuple(rng.uniform(-min(room, 0.15), min(room, 0.15), size=2)),
        "head_angle": np.deg2rad(rng.uniform(-25.0, 25.0)),  # in-plane tilt of the head
        "mirrored": bool(rng.random() < 0.5),  # radiological or neurological left-right
        "grey": rng.uniform(85, 100),
        "white": rng.uniform(108, 125),
        "ventricle_size": rng.uniform(0.8, 1.3),
        "noise_sigma": rng.uniform(3.0, 7.0),
        "bias": tuple(rng.uniform(-0.2, 0.2, size=2)) + tuple(rng.uniform(-0.15, 0.15, size=3)),
        "gain": rng.uniform(0.7, 1.25),  # scanner / protocol: global intensity ...
        "gamma": rng.uniform(0.75, 1.35),  # ... and contrast
        "lesions": [],
    }
    if kind == "gbm":
        # One large irregular ring-enhancing lesion, somewhere in a hemisphere.
        angle = rng.uniform(0, 2 * np.pi)
        distance = rng.uniform(0.18, 0.55)
        thin_ring = rng.random() < 0.2  # a minority with thin rings: overlaps with PCNSL
        patient["lesions"].append(
            {
                "center": (distance * np.cos(angle), distance * np.sin(angle)),
                "radius": rng.uniform(0.11, 0.26),
                "harmonics": rng.uniform(0.0, 0.13, size=4),
                "phases": rng.uniform(0, 2 * np.pi, size=4),
                "core": rng.uniform(0.3, 0.5) if thin_ring else rng.uniform(0.45, 0.72),
                "core_level": rng.uniform(35, 75),
                "enhancement": rng.uniform(165, 235),
                "oedema": rng.uniform(0.3, 0.8),
            }
        )
    else:
        # 1-3 solid homogeneous lesions, mostly periventricular.
        count = rng.choice([1, 1, 1, 2, 2, 3])
        for index in range(count):
            if rng.random() < 0.7:  # periventricular: just lateral to a ventricle
                side = rng.choice([-1.0, 1.0])
                center = (side * rng.uniform(0.18, 0.32), rng.uniform(-0.35, 0.3))
            else:
                angle = rng.uniform(0, 2 * np.pi)
                distance = rng.uniform(0.2, 0.55)
                center = (distance * np.cos(angle), distance * np.sin(angle))
            heterogeneous = rng.random() < 0.15  # faint central dip: overlaps with GBM
            patient["lesions"].append(
                {
                    "center": center,
                    "radius": rng.uniform(0.09, 0.22) * (1.0 if index == 0 else 0.7),
                    "harmonics": rng.uniform(0.0, 0.06, size=4),
                    "phases": rng.uniform(0, 2 * np.pi, size=4),
                    "core": rng.uniform(0.3, 0.5) if heterogeneous else 0.0,
                    "core_level_fraction": rng.uniform(0.8, 0.9),
                    "enhancement": rng.uniform(155, 225),
                    "oedema": rng.uniform(0.2, 0.7),
                }
            )
    return patient


# ---------------------------------------------------------------------------- drawing
def smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-smoothed noise; `scale` is a fraction of the image."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=max(scale * size, 0.5))
    return field / (field.std() + 1e-12)


def draw_slice(
    rng: np.random.Generator, patient: dict, kind: str, z: float, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One axial slice at height z (-1..1 across the patient's slices): uint8 image and
    boolean lesion mask (enhancing rim plus necrotic core, not oedema), both (size, size)."""
    axis = (np.arange(size) + 0.5) / size * 2 - 1
    v, u = np.meshgrid(axis, axis, indexing="ij")  # v: rows (down), u: columns (right)

    # Head: rotated ellipse, a little smaller away from the middle slice. (ur, vr) are head
    # coordinates: the anatomy is drawn there, whatever the head's size, pose and position.
    cos, sin = np.cos(patient["head_angle"]), np.sin(patient["head_angle"])
    uc, vc = u - patient["head_shift"][0], v - patient["head_shift"][1]
    ur, vr = cos * uc + sin * vc, -sin * uc + cos * vc
    ur, vr = ur / patient["head_size"], vr / patient["head_size"]
    head_scale = 1.0 - 0.04 * abs(z)
    rho = np.hypot(ur / (patient["head_axes"][0] * head_scale), vr / (patient["head_axes"][1] * head_scale))

    image = np.zeros((size, size))
    image[rho < 1.0] = 145.0  # scalp fat, bright on T1
    image[(rho >= 0.88) & (rho < 0.95)] = 35.0  # cortical bone, dark
    image[(rho >= 0.905) & (rho < 0.925)] = 115.0  # diploe (marrow) stripe inside the skull
    image[(rho >= 0.86) & (rho < 0.88)] = 45.0  # CSF rim around the brain
    brain = rho < 0.86

    # Brain: white matter core with a wobbly border, grey matter around it, fine texture.
    wobble = 0.06 * smooth_noise(rng, size, 0.04)
    white = rho + wobble < 0.68
    tissue = np.where(white, patient["white"], patient["grey"]) + 4.0 * smooth_noise(rng, size, 0.01)
    image[brain] = tissue[brain]

    # Ventricles: two dark crescents either side of the midline.
    ventricle_scale = patient["ventricle_size"] * (1.0 - 0.3 * abs(z))
    for side in (-1.0, 1.0):
        a = 0.11 * side * 0.5  # slight outward tilt
        du, dv = ur - side * 0.09, vr + 0.02
        du, dv = np.cos(a) * du + np.sin(a) * dv, -np.sin(a) * du + np.cos(a) * dv
        inside = (du / (0.055 * ventricle_scale)) ** 2 + (dv / (0.22 * ventricle_scale)) ** 2 < 1.0
        image[inside & brain] = 32.0

    # Lesions: distance to the centre relative to an irregular radius r(theta).
    mask = np.zeros((size, size), dtype=bool)
    lesion_layer = np.zeros((size, size))
    lesion_weight = np.zeros((size, size))
    oedema_factor = np.ones((size, size))
    lesion_scale = np.sqrt(1.0 - 0.4 * z * z)  # largest on the middle slice
    for lesion in patient["lesions"]:
        du, dv = ur - lesion["center"][0], vr - lesion["center"][1]
        theta = np.arctan2(dv, du)
        radius = (
            lesion["radius"]
            * lesion_scale
            * (
                1.0
                + sum(
                    amplitude * np.cos((k + 2) * theta + phase)
                    for k, (amplitude, phase) in enumerate(
                        zip(lesion["harmonics"], lesion["phases"], strict=True)
                    )
                )
            )
        )
        d = np.hypot(du, dv) / radius
        inside = (d < 1.0) & brain
        mask |= inside
        level = lesion["enhancement"] * (1.0 + 0.05 * smooth_noise(rng, size, 0.015))
        if kind == "gbm":
            # Thick irregular rim, dark necrotic core.
            core_edge = lesion["core"] * (1.0 + 0.15 * smooth_noise(rng, size, 0.03))
            level = np.where(d < core_edge, lesion["core_level"], level)
        elif lesion["core"] > 0:
            level = np.where(d < lesion["core"], level * lesion["core_level_fraction"], level)
        lesion_layer = np.where(inside, level, lesion_layer)
        lesion_weight = np.maximum(lesion_weight, inside)
        ring = (d >= 1.0) & (d < 1.0 + lesion["oedema"]) & brain
        oedema_factor = np.where(
            ring, np.minimum(oedema_factor, 0.7 + 0.3 * (d - 1.0) / lesion["oedema"]), oedema_factor
        )

    image = image * oedema_factor
    lesion_weight = ndimage.gaussian_filter(lesion_weight.astype(float), sigma=0.4 * size / 256)
    image = image * (1 - lesion_weight) + lesion_layer * lesion_weight

    # Scanner: global intensity and contrast, smooth (quadratic) bias field, thermal noise
    # (Rician-like in the background).
    image = patient["gain"] * 255.0 * (np.clip(image, 0, None) / 255.0) ** patient["gamma"]
    b = patient["bias"]
    bias = 1.0 + b[0] * u + b[1] * v + b[2] * u * u + b[3] * v * v + b[4] * u * v
    image = ndimage.gaussian_filter(image, sigma=0.5 * size / 256) * np.clip(bias, 0.5, 1.5)
    noise = patient["noise_sigma"] * rng.standard_normal((size, size, 2))
    image = np.hypot(image + noise[..., 0], noise[..., 1])
    if patient["mirrored"]:  # left-right orientation of the display
        image, mask = image[:, ::-1], mask[:, ::-1]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), np.ascontiguousarray(mask)


# ---------------------------------------------------------------------------- cohort
def make_cohort(
    out_dir: Path, patients_per_class: int, slices_per_patient: int, size: int, fmt: str, seed: int
) -> int:
    """Write every class, patient and slice; returns the number of images written."""
    written = 0
    for class_index, kind in enumerate(CLASS_FOLDERS):
        for patient_index in range(patients_per_class):
            # One generator per patient: its slices do not depend on how many others exist.
            rng = np.random.default_rng([seed, class_index, patient_index])
            patient = make_patient(rng, kind)
            patient_id = f"{kind}_s{seed}_p{patient_index:03d}"
            image_dir = out_dir / kind / patient_id
            mask_dir = out_dir / "masks" / kind / patient_id
            image_dir.mkdir(parents=True, exist_ok=True)
            mask_dir.mkdir(parents=True, exist_ok=True)
            heights = np.linspace(-1.0, 1.0, slices_per_patient) if slices_per_patient > 1 else [0.0]
            volume_slices, volume_masks = [], []  # --format dicom / nifti: written per patient
            for slice_index, z in enumerate(heights):
                pixels, mask = draw_slice(rng, patient, kind, float(z), size)
                name = f"slice{slice_index:02d}"
                if fmt in VOLUME_FORMATS:
                    volume_slices.append(pixels)
                    volume_masks.append(mask)
                elif fmt == "png":
                    Image.fromarray(pixels, mode="L").save(image_dir / f"{name}.png")
                else:
                    Image.fromarray(pixels, mode="L").save(image_dir / f"{name}.jpg", quality=92)
                Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(mask_dir / f"{name}.png")
                written += 1
            if fmt == "dicom":
                write_dicom_series(image_dir, patient_id, volume_slices)
            elif fmt == "nifti":
                write_nifti_volume(image_dir, volume_slices, volume_masks)
    return written


# ---------------------------------------------------------------------------- scanner formats
VOLUME_FORMATS = ("dicom", "nifti")
FIELD_OF_VIEW_MM = 220.0  # a typical head field of view
SLICE_SPACING_MM = 5.0
# 16-bit DICOM: stored = 16 * pixel + 100; RescaleSlope/Intercept give 8 * pixel; the
# window [0, 2040] maps that back onto the 8-bit pixel exactly.
DICOM_STORED_SCALE, DICOM_STORED_OFFSET = 16, 100
DICOM_RESCALE = ("0.5", "-50")
DICOM_WINDOW = ("1020.5", "2041")  # PS3.3 C.11.2.1.2: edges at c - 0.5 -+ (w - 1) / 2 = 0, 2040


def write_dicom_series(folder: Path, patient_id: str, slices: list[np.ndarray]) -> None:
    """One axial 16-bit MR series (pydicom), a file per slice, inferior to superior, with
    geometry (ImagePositionPatient, ImageOrientationPatient, PixelSpacing), rescale and
    window tags. Header values are synthetic, derived from the patient folder name."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    rows, columns = slices[0].shape
    spacing = FIELD_OF_VIEW_MM / columns
    scanner_id = f"{zlib.crc32(patient_id.encode()):010d}"  # a PACS-style id, unlike the folder name
    study, series, frame = (
        generate_uid(entropy_srcs=[patient_id, part]) for part in ("study", "series", "frame")
    )
    for index, pixels in enumerate(slices):
        sop = generate_uid(entropy_srcs=[patient_id, "slice", str(index)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.SeriesDescription = "MR", "AX T1 POST (synthetic)"
        ds.PatientName, ds.PatientID, ds.StudyDate = f"DEMO^{scanner_id}", scanner_id, "20240101"
        ds.InstanceNumber = index + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        z = (index - (len(slices) - 1) / 2) * SLICE_SPACING_MM
        ds.ImagePositionPatient = [-FIELD_OF_VIEW_MM / 2, -FIELD_OF_VIEW_MM / 2, z]
        ds.SliceLocation, ds.SliceThickness = z, SLICE_SPACING_MM
        ds.PixelSpacing = [spacing, spacing]
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = DICOM_RESCALE[1], DICOM_RESCALE[0]
        ds.WindowCenter, ds.WindowWidth = DICOM_WINDOW
        stored = pixels.astype(np.uint16) * DICOM_STORED_SCALE + DICOM_STORED_OFFSET
        ds.PixelData = stored.astype("<u2").tobytes()
        ds.save_as(folder / f"IM{index + 1:04d}.dcm", enforce_file_format=True)


def write_nifti_volume(folder: Path, slices: list[np.ndarray], masks: list[np.ndarray]) -> None:
    """One RAS+ volume t1c.nii.gz (int16 scaled by scl_slope/scl_inter, display range
    cal_min/cal_max 0-255, giving back the 8-bit pixels) and its lesion mask t1c_seg.nii.gz (uint8 labels), with nibabel.

    Slice k is the k-th (inferior to superior) slice; each is stored so that a radiology
    view (anterior up, patient's right on the left) shows the drawn image as it is."""
    import nibabel as nib

    spacing = FIELD_OF_VIEW_MM / slices[0].shape[1]
    affine = np.diag([spacing, spacing, SLICE_SPACING_MM, 1.0])
    affine[:3, 3] = [-FIELD_OF_VIEW_MM / 2, -FIELD_OF_VIEW_MM / 2, -SLICE_SPACING_MM * (len(slices) - 1) / 2]

    def to_volume(images):  # drawn (rows: anterior -> posterior, columns: right -> left) -> RAS (i, j, k)
        return np.stack([image[::-1, ::-1].T for image in images], axis=-1)

    image = nib.Nifti1Image(to_volume(slices).astype(np.float32), affine)
    image.header.set_data_dtype(np.int16)  # nibabel picks scl_slope/scl_inter to fill int16
    image.header["cal_min"], image.header["cal_max"] = 0.0, 255.0  # display range: the 8-bit scale
    image.header.set_xyzt_units("mm")
    nib.save(image, folder / "t1c.nii.gz")
    mask = nib.Nifti1Image(to_volume(masks).astype(np.uint8), affine)
    mask.header.set_xyzt_units("mm")
    nib.save(mask, folder / "t1c_seg.nii.gz")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Masks are always PNG, at OUT_DIR/masks/<class>/<patient>/<slice>.png.",
    )
    parser.add_argument("out_dir", type=Path, help="folder to write (must be empty or absent)")
    parser.add_argument("--patients-per-class", type=int, default=20)
    parser.add_argument("--slices-per-patient", type=int, default=5)
    parser.add_argument("--size", type=int, default=256, help="image height and width in pixels")
    parser.add_argument(
        "--format",
        choices=("png", "jpg", *VOLUME_FORMATS),
        default="png",
        help="png or jpg slices, a DICOM series or a NIfTI volume (+ mask) per patient",
    )
    parser.add_argument("--seed", type=int, default=0, help="cohort seed (also part of the patient ids)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace gbm/, pcnsl/ and masks/ in a non-empty OUT_DIR"
    )
    args = parser.parse_args(argv)
    if args.patients_per_class < 1 or args.slices_per_patient < 1:
        parser.error("--patients-per-class and --slices-per-patient must be at least 1")
    if args.size < 16:
        parser.error("--size must be at least 16")
    if args.seed < 0:
        parser.error("--seed must be >= 0")

    out_dir: Path = args.out_dir
    if out_dir.exists() and not out_dir.is_dir():
        print(f"error: {out_dir}: exists and is not a folder", file=sys.stderr)
        return 2
    start = time.perf_counter()
    with contextlib.ExitStack() as old_cohort:  # the old demo data goes once the new is written
        if out_dir.is_dir() and any(out_dir.iterdir()):
            try:
                if not args.overwrite:
                    raise UserError(
                        f"{out_dir}: folder is not empty (use --overwrite to replace its demo data)"
                    )
                check_replaceable(out_dir, [DEMO_MARKER])  # only a folder this script wrote
            except UserError as error:
                print(f"error: {error}", file=sys.stderr)
                return 2
            for sub in ("gbm", "pcnsl", "masks"):  # only what this script writes, nothing else
                old_cohort.enter_context(replacing(out_dir / sub))
        mark_demo_folder(out_dir)
        count = make_cohort(
            out_dir, args.patients_per_class, args.slices_per_patient, args.size, args.format, args.seed
        )
    print(
        f"wrote {count} {args.size}x{args.size} {args.format} slices to {out_dir}: "
        f"{args.patients_per_class} gbm + {args.patients_per_class} pcnsl patients x "
        f"{args.slices_per_patient} slices, seed {args.seed}, masks in {out_dir / 'masks'} "
        f"({time.perf_counter() - start:.1f} s)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
