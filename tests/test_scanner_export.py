"""A scanner-like export through step0 and step2 (issue 19): patient folders that hold a T1
post-contrast series, a FLAIR series, a three-plane localizer and a SEG object, with a
two-valued window and an invalid UID. Only the chosen series is read, one patient per
patient folder, non-images and non-axial files are skipped by kind, and no identifying
header value reaches stdout, stderr, the HDF5 file or the CSV."""

from __future__ import annotations

import csv
import json
import os
import warnings

import h5py
import numpy as np
import pydicom
import pytest
from helpers import write_dicom

import step0_convert_images_to_hdf5 as step0
from gbmpcnsl.series import non_image_kind, series_pattern, training_slices_warning
from gbmpcnsl.sources import find_slices
from gbmpcnsl_common import UserError

T1, FLAIR, LOCALIZER = "AX T1 POST GD", "AX T2 FLAIR", "3-PLANE LOC"
INVALID_UID = "1.2.826.0.1.3680043.8.498.0222"  # a leading-zero component: pydicom warns about it
IDENTIFYING = (
    "PatientName",
    "PatientID",
    "StudyDate",
    "InstitutionName",
    "StudyInstanceUID",
    "SeriesInstanceUID",
)
AXIAL, SAGITTAL, CORONAL = [1, 0, 0, 0, 1, 0], [0, 1, 0, 0, 0, -1], [1, 0, 0, 0, 0, -1]


def write_object(path, patient: str, series_uid: str, description: str, **tags) -> None:
    """One small (32 x 32) MR image file, or a non-image object when tags say so."""
    image = tags.pop("image", True)
    stored = (np.arange(32 * 32).reshape(32, 32) % 500 + 100 * len(description)).astype(np.uint16)
    identity = {
        "PatientName": f"Doe^{patient}",
        "PatientID": f"PID-{patient}-7731",
        "StudyDate": "20190304",
        "InstitutionName": "Hospital of Nowhere",
        "StudyInstanceUID": INVALID_UID,
        "SeriesInstanceUID": series_uid,
        "SeriesDescription": description,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_dicom(path, stored if image else None, **identity, **tags)


PATIENTS = {  # class/patient: its series
    "gbm/P017": (T1, FLAIR, LOCALIZER),
    "gbm/P018": (T1, FLAIR),
    "gbm/P019": (T1,),
    "pcnsl/P020": (T1, FLAIR, LOCALIZER),
    "pcnsl/P021": (T1, FLAIR),
    "pcnsl/P022": (T1,),
}


def write_patient(folder, patient: str, series: tuple[str, ...]) -> None:
    """A patient folder <study>/<series>/IM*.dcm as a PACS writes it; beside a localizer
    (and a SEG and an SR object) the T1 series has two windows, as Siemens writes them."""
    study, number = folder / "ST000001", int(patient[1:])
    window = {"WindowCenter": "450", "WindowWidth": "900"}
    if LOCALIZER in series:
        window = {"WindowCenter": [450, 200], "WindowWidth": [900, 400]}
    axial = {"ImageOrientationPatient": AXIAL}
    for k in (3, 1, 4, 2):  # written out of order: sorted by position
        position = {"ImagePositionPatient": [0, 0, 5.0 * k]}
        write_object(
            study / "SE000001" / f"IM{k:04d}.dcm",
            patient,
            f"1.2.3.{number}.1",
            T1,
            **axial,
            **position,
            **window,
        )
    for k in range(3) if FLAIR in series else []:
        position = {"ImagePositionPatient": [0, 0, 4.0 * k]}
        write_object(
            study / "SE000002" / f"IM{k:04d}.dcm", patient, f"1.2.3.{number}.2", FLAIR, **axial, **position
        )
    if LOCALIZER not in series:
        return
    for k, orientation in enumerate((AXIAL, SAGITTAL, CORONAL)):  # one series, three planes
        tags = {"ImageOrientationPatient": orientation, "ImagePositionPatient": [0, 0, 0]}
        write_object(study / "SE000003" / f"IM{k:04d}.dcm", patient, f"1.2.3.{number}.3", LOCALIZER, **tags)
    seg = {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.66.4", "Modality": "SEG"}
    write_object(study / "SE000004" / "SEG0001.dcm", patient, f"1.2.3.{number}.4", "tumour", **seg)
    sr = {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.22", "image": False}
    write_object(study / "SE000005" / "SR0001.dcm", patient, f"1.2.3.{number}.5", "report", **sr)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """DATA/<class>/<patient>/ST000001/SE00000<k>/*.dcm, the series of PATIENTS."""
    root = tmp_path_factory.mktemp("export") / "DATA"
    with warnings.catch_warnings():  # pydicom warns about the invalid UID (unless already quieted)
        warnings.simplefilter("ignore")
        pydicom.config.settings.writing_validation_mode = pydicom.config.WARN
        try:
            for name, series in PATIENTS.items():
                write_patient(root / name, name.split("/")[1], series)
        finally:
            pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE
    assert INVALID_UID.encode() in next(root.rglob("*.dcm")).read_bytes()
    return root


def header_values(export) -> list[str]:
    values = set()
    for path in export.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        values.update(str(ds.get(keyword)) for keyword in IDENTIFYING if ds.get(keyword))
    return sorted(values)


def read_group(path, folder: str) -> dict[str, list[str]]:
    with h5py.File(path, "r") as h5file:
        group = h5file[f"{folder}/32_32"]
        return {key: [v.decode() for v in group[key][:]] for key in ("paths", "groups", "series")}


def t1_files(patient_folder) -> list[str]:
    return [f"{patient_folder}/ST000001/SE000001/IM{k:04d}.dcm" for k in (1, 2, 3, 4)]


def test_series_picks_exactly_the_t1_slices_and_the_default_skips_naming_the_patient(export):
    for folder in ("gbm", "pcnsl"):
        chosen = find_slices([export / folder], series=series_pattern(r"t1\s+post"))
        patients = sorted(name for name in PATIENTS if name.startswith(folder))
        assert chosen.names == [p for patient in patients for p in t1_files(f"{export}/{patient}")]
        assert chosen.series == [T1] * 12 and chosen.patients == [p for p in patients for _ in range(4)]
        assert not chosen.warnings
    found = find_slices([export / "gbm"])
    assert found.names == t1_files(f"{export}/gbm/P019") and found.patients == ["gbm/P019"] * 4
    assert found.warnings == [
        f"warning: skipped patient gbm/P017: 3 series ('{T1}' (4 slices), '{FLAIR}' (3 slices), "
        f"'{LOCALIZER}' (1 slice)); choose one with --series REGEX or keep all with --all-series",
        f"warning: skipped patient gbm/P018: 2 series ('{T1}' (4 slices), '{FLAIR}' (3 slices)); "
        "choose one with --series REGEX or keep all with --all-series",
    ]
    assert len(found.skipped["several series"]) == 8 + 7
    assert found.skipped["non-axial"] == [
        f"{export}/gbm/P017/ST000001/SE000003: {plane} DICOM (1 file(s)); use --any-orientation to read it anyway"
        for plane in ("sagittal", "coronal")
    ]
    assert found.skipped["DICOM SEG"] == [f"{export}/gbm/P017/ST000001/SE000004/SEG0001.dcm"]
    assert found.skipped["DICOM SR"] == [f"{export}/gbm/P017/ST000001/SE000005/SR0001.dcm"]
    with pytest.raises(
        UserError, match=r"^patient gbm/P017: 3 series \('AX T1 .*; --strict: nothing written$"
    ):
        find_slices([export / "gbm"], strict=True)
    every = find_slices([export / "gbm"], all_series=True)
    assert len(every.names) == (4 + 3 + 1) + (4 + 3) + 4 and set(every.series) == {T1, FLAIR, LOCALIZER}
    # The axial file of the localizer is a series of its own; its other planes are not.
    localizer = [n for n, s in zip(every.names, every.series, strict=True) if s == LOCALIZER]
    assert localizer == [f"{export}/gbm/P017/ST000001/SE000003/IM0000.dcm"]
    # Files named one by one are the user's choice: never skipped for having company.
    named = [str(p) for p in sorted((export / "gbm/P018").rglob("*.dcm"))]
    assert find_slices(named).names == named


def test_step0_default_converts_the_single_series_patients(export, tmp_path, capfd):
    output = tmp_path / "default.h5"
    assert step0.main([str(export), str(output), "--size", "32", "32", "--workers", "1"]) == 0
    for name in ("gbm/P019", "pcnsl/P022"):
        written = read_group(output, name.split("/")[0])
        assert written["paths"] == t1_files(name) and written["series"] == [T1] * 4
        assert written["groups"] == [name] * 4
    with h5py.File(output, "r") as h5file:
        selection = json.loads(h5file["pcnsl/32_32"].attrs["slice_selection"])
    assert selection == {"slices": "all", "lesion_masks": None, "min_lesion_pixels": 1, "series": None}
    err = capfd.readouterr().err
    assert sum("warning: skipped patient" in line for line in err.splitlines()) == 4
    summary = err[err.index("  skipped ") :]
    for count in ("2 DICOM SEG", "2 DICOM SR", "4 non-axial", "30 several series"):
        assert count in summary, summary
    strict = [str(export), str(tmp_path / "strict.h5"), "--size", "32", "32", "--workers", "1", "--strict"]
    assert step0.main(strict) == 2
    assert capfd.readouterr().err.strip().splitlines()[-1].startswith("error: patient gbm/P017: 3 series (")
    assert not (tmp_path / "strict.h5").exists()


def test_step0_series_on_the_export_and_nothing_from_the_headers(export, tmp_path, capfd):
    output = tmp_path / "t1.h5"
    argv = [str(export), str(output), "--size", "32", "32", "--workers", "1", "--series", r"t1\s+post"]
    assert step0.main(argv) == 0
    for folder in ("gbm", "pcnsl"):
        patients = sorted(name for name in PATIENTS if name.startswith(folder))
        written = read_group(output, folder)
        assert written["paths"] == [p for patient in patients for p in t1_files(patient)]
        assert written["groups"] == [patient for patient in patients for _ in range(4)]
        assert written["series"] == [T1] * 12
    with h5py.File(output, "r") as h5file:
        selection = json.loads(h5file["gbm/32_32"].attrs["slice_selection"])
    assert selection == {
        "slices": "all",
        "lesion_masks": None,
        "min_lesion_pixels": 1,
        "series": r"t1\s+post",
    }
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "Invalid value" not in err
    written = out + err + output.read_bytes().decode("latin-1")
    for value in header_values(export):
        assert value not in written, value


@pytest.mark.slow
def test_step2_per_patient_on_a_pacs_export_with_series_and_cohort(
    export, trained_checkpoint, tmp_path, capfd
):
    import step2_predict as step2

    pacs = tmp_path / "pacs"  # no class folders: PACS order, patient/study/series
    pacs.mkdir()
    for name in ("gbm/P018", "pcnsl/P021"):  # T1 and FLAIR; a symlinked patient folder is read
        os.symlink(export / name, pacs / name.split("/")[1])
    csv_path, per_patient = tmp_path / "p.csv", tmp_path / "patients.csv"
    argv = [
        "--model-weights",
        str(trained_checkpoint),
        "--csv",
        str(csv_path),
        "--per-patient",
        str(per_patient),
    ]
    assert step2.main([*argv, str(pacs), "--series", "t1 post"]) == 0
    out, err = capfd.readouterr()
    assert "skipped 6 other series" in err  # the FLAIR slices
    assert "was trained on" not in err  # the demo run was trained on every slice
    run_json = next(p / "run.json" for p in trained_checkpoint.parents if (p / "run.json").is_file())
    assert json.loads(run_json.read_text())["hdf5_slice_selection"]["lesion_masks"] is None
    with open(csv_path, newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["path"] for row in rows] == t1_files(f"{pacs}/P018") + t1_files(f"{pacs}/P021")
    assert {row["series"] for row in rows} == {T1}
    with open(per_patient, newline="") as file:
        patients = [(row["patient_id"], row["n_slices"]) for row in csv.DictReader(file)]
    assert patients == [(f"{pacs}/P018", "4"), (f"{pacs}/P021", "4")]  # absolute stays absolute
    # --cohort names the patients: its patient_id wins, paths relative to the CSV's folder.
    table = tmp_path / "cohort.csv"
    table.write_text("path,label,patient_id\npacs/P018/ST000001/SE000001,,case-1\npacs/P021,pcnsl,\n")
    argv = ["--model-weights", str(trained_checkpoint), "--per-patient", "-", "--cohort", str(table)]
    assert step2.main([*argv, "--series", "t1 post"]) == 0
    out2, err2 = capfd.readouterr()
    # No patient_id: the patient rule on the slice's path (no class folder: the series folder).
    expected = ["case-1", f"{tmp_path}/pacs/P021/ST000001/SE000001"]
    assert [line.split()[0] for line in out2.splitlines()[-2:]] == expected
    written = out + err + out2 + err2 + csv_path.read_text() + per_patient.read_text()
    for value in header_values(export):
        assert value not in written, value


def test_cohort_table_in_step0(export, tmp_path, capfd):
    table = tmp_path / "cohort.csv"
    rows = [
        "path,label,patient_id",
        f"{export}/gbm/P018/ST000001/SE000001,gbm,A",
        f"{export}/pcnsl/P021/ST000001,1,B",  # a study folder: --series picks in it
        f"{export}/gbm/P019/ST000001/SE000001/IM0001.dcm,0,",
    ]
    table.write_text("\n".join(rows) + "\n")
    output = tmp_path / "c.h5"
    argv = ["--cohort", str(table), str(output), "--size", "32", "32", "--workers", "1", "--series", "T1"]
    assert step0.main(argv) == 0
    gbm, pcnsl = read_group(output, "gbm"), read_group(output, "pcnsl")
    assert gbm["paths"] == t1_files(f"{export}/gbm/P018") + [
        f"{export}/gbm/P019/ST000001/SE000001/IM0001.dcm"
    ]
    assert gbm["groups"] == ["gbm/A"] * 4 + ["gbm/P019"]  # no patient_id: the rule
    assert pcnsl["paths"] == t1_files(f"{export}/pcnsl/P021") and pcnsl["groups"] == ["pcnsl/B"] * 4
    for bad, message in (
        ("path,label,patient_id\nnope,gbm,\n", "line 2: "),
        (f"path,label,patient_id\n{export}/gbm,maybe,\n", "line 2: label 'maybe'"),
        (
            f"path,label,patient_id\n{export}/gbm,gbm,X\n{export}/pcnsl,pcnsl,X\n",
            "line 3: patient X has rows",
        ),
        ("path,label\nx,gbm\n", "missing: patient_id"),
    ):
        table.write_text(bad)
        assert step0.main(["--cohort", str(table), str(tmp_path / "bad.h5"), "--size", "32", "32"]) == 2
        last = capfd.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"error: --cohort {table}") and message in last, last
    assert not (tmp_path / "bad.h5").exists()
    for argv in ([str(tmp_path / "x.h5")], [str(export), str(tmp_path / "x.h5"), "--cohort", str(table)]):
        with pytest.raises(SystemExit):  # DATA or --cohort: one of them
            step0.main(argv)
        assert "give DATA or --cohort FILE.csv" in capfd.readouterr().err


def test_symlinked_folders_are_followed_once(export, tmp_path):
    data = tmp_path / "sorted" / "gbm"
    data.mkdir(parents=True)
    os.symlink(export / "gbm" / "P019", data / "P019")
    os.symlink(tmp_path / "sorted", data / "back")  # a loop: sorted/gbm/back/gbm/back/...
    found = find_slices([data])
    assert found.names == t1_files(f"{data}/P019") and found.patients == ["gbm/P019"] * 4
    pacs = tmp_path / "pacs"  # no class folder: the folder under the one named is the patient
    pacs.mkdir()
    os.symlink(export / "gbm" / "P018", pacs / "P018")
    found = find_slices([pacs], series=series_pattern("T1"))
    assert found.names == t1_files(f"{pacs}/P018") and found.patients == [f"{pacs}/P018"] * 4


def test_hdf5_files_without_a_series_dataset_still_read(export, tmp_path):
    from helpers import write_h5

    from gbmpcnsl.hdf5 import read_hdf5_index

    with h5py.File(write_h5(tmp_path / "old.h5"), "r") as h5file:  # no series dataset
        records, has_groups = read_hdf5_index(h5file, (32, 32))
    assert has_groups and len(records) == 24 and {r["series"] for r in records} == {""}


def test_non_image_kinds_by_sop_class_then_modality():
    from gbmpcnsl.dicom import DicomHeader

    def kind(sop_class: str, modality: str = "MR"):
        return non_image_kind(DicomHeader(1, None, None, None, "", "", sop_class, modality))

    storage = "1.2.840.10008.5.1.4.1.1."
    assert kind(storage + "4") is None and kind(storage + "4.1") is None  # MR, enhanced MR
    assert kind(storage + "6.1") is None and kind(storage + "1") is None  # US, CR
    assert [
        kind(storage + s) for s in ("66.4", "481.3", "481.2", "481.5", "88.11", "88.59", "11.1", "104.1")
    ] == ["SEG", "RTSTRUCT", "RTDOSE", "RT", "SR", "KO", "PR", "DOC"]
    assert (
        kind("", "SEG") == "SEG"
        and kind("1.2.3.private", "RTSTRUCT") == "RTSTRUCT"
        and kind("", "MR") is None
    )


def test_training_on_mask_selected_slices_warns_when_every_slice_is_predicted(tmp_path):
    from gbmpcnsl.sources import parse_slice_selection

    assert [parse_slice_selection(t).text() for t in ("all", "middle:3", "2:5")] == ["all", "middle:3", "2:5"]

    checkpoint = tmp_path / "run" / "checkpoints" / "best.keras"
    checkpoint.parent.mkdir(parents=True)
    trained = {"lesion_masks": "{stem}_seg.nii.gz", "min_lesion_pixels": 20, "slices": "all", "series": None}
    (tmp_path / "run" / "run.json").write_text(json.dumps({"hdf5_slice_selection": trained}))
    warning = training_slices_warning([checkpoint], {}, ["t1c.nii.gz"])
    assert warning.startswith(f"warning: {checkpoint} was trained on slices with at least 20 lesion voxel(s)")
    assert (
        training_slices_warning([checkpoint], {"lesion_masks": "{stem}_seg.nii.gz"}, ["t1c.nii.gz"]) is None
    )
    assert (
        training_slices_warning([checkpoint], {"selection": parse_slice_selection("middle:3")}, ["v"]) is None
    )
    assert training_slices_warning([checkpoint], {}, [""]) is None  # 2-D images: nothing to select
    (tmp_path / "run" / "run.json").write_text(json.dumps({"hdf5_slice_selection": None}))
    assert training_slices_warning([checkpoint], {}, ["t1c.nii.gz"]) is None
