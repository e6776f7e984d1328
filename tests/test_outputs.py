"""gbmpcnsl.outputs: only this tool's own output folders are ever replaced (their marker),
never `.`, the home folder or a folder holding an input; the demo scripts' guarded rm -rf."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import folder_snapshot, save_png

from gbmpcnsl.outputs import DEMO_MARKER, check_replaceable, refuse_unsafe_folder, replacing
from gbmpcnsl_common import UserError

ROOT = Path(__file__).resolve().parent.parent


def patient_folder(folder: Path) -> dict[str, bytes]:
    """A folder as a user's data looks: notes and a patient's scan."""
    (folder / "patients" / "p017").mkdir(parents=True)
    (folder / "notes.txt").write_text("keep me")
    (folder / "patients" / "p017" / "scan.dcm").write_bytes(b"DICM" * 10)
    return folder_snapshot(folder)


def test_a_foreign_folder_is_never_replaced(tmp_path):
    before = patient_folder(tmp_path / "data")
    with pytest.raises(UserError, match=r"not written by this tool \(no run.json\)"):
        check_replaceable(tmp_path / "data", ["run.json"])
    assert folder_snapshot(tmp_path / "data") == before


@pytest.mark.parametrize("where", [".", "..", "~", "/"])
def test_current_home_and_root_folders_are_refused_even_with_a_marker(tmp_path, monkeypatch, where):
    home = tmp_path / "home"
    (home / "work").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home / "work")
    (home / "work" / "run.json").write_text("{}")
    with pytest.raises(UserError, match="refuses to replace the (current|home) folder or a folder above it"):
        refuse_unsafe_folder(Path(where))


def test_a_folder_holding_an_input_is_refused(tmp_path):
    (tmp_path / "runs" / "run.json").parent.mkdir()
    (tmp_path / "runs" / "run.json").write_text("{}")
    with pytest.raises(UserError, match=r"holds the input .*train.h5; --overwrite refuses to replace it"):
        check_replaceable(tmp_path / "runs", ["run.json"], inputs=[tmp_path / "runs" / "train.h5"])


def test_replacing_keeps_the_old_folder_until_the_new_one_is_in_place(tmp_path):
    folder = tmp_path / "out"
    save_png(folder / "old.png", 1)
    with pytest.raises(RuntimeError), replacing(folder):
        save_png(folder / "half.png", 2)
        raise RuntimeError("disk full")
    assert sorted(p.name for p in folder.iterdir()) == ["old.png"]  # back, the half-written one gone
    with replacing(folder):
        save_png(folder / "new.png", 3)
    assert sorted(p.name for p in folder.iterdir()) == ["new.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing left aside


def run_guard(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gbmpcnsl.outputs", str(folder)], cwd=ROOT, capture_output=True, text=True
    )


def test_demo_guard_refuses_a_folder_without_the_demo_marker(tmp_path):
    before = patient_folder(tmp_path / "data")
    result = run_guard(tmp_path / "data")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: {tmp_path / 'data'}: not written by this tool (no {DEMO_MARKER}); "
        "the demo only replaces this tool's own outputs"
    ]
    assert folder_snapshot(tmp_path / "data") == before
    (tmp_path / "data" / DEMO_MARKER).write_text("")
    assert run_guard(tmp_path / "data").returncode == 0
    assert [p.name for p in (tmp_path / "data").iterdir()] == [DEMO_MARKER]


@pytest.mark.parametrize(
    "script, variable", [("run_demo.sh", "DEMO_OUTPUT"), ("compare_augmentations.sh", "COMPARE_OUTPUT")]
)
def test_demo_scripts_do_not_delete_a_foreign_output_folder(tmp_path, script, variable):
    before = patient_folder(tmp_path / "data")
    # 0 patients: make_demo_data refuses at once, so that even an unguarded script stops there
    env = {
        **os.environ,
        variable: str(tmp_path / "data"),
        "DEMO_TRAIN_PATIENTS": "0",
        "PYTHON": sys.executable,
    }
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    result = subprocess.run(["bash", f"demo/{script}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "not written by this tool (no .gbmpcnsl-demo)" in result.stderr
    assert folder_snapshot(tmp_path / "data") == before
