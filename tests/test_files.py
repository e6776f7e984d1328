"""gbmpcnsl.files, the one atomic writer: a planted symlink is never followed, a full disk
is one line with the old output intact, patient outputs are private (0600); file_sha256
against digests computed without it."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gbmpcnsl.files import file_sha256, private_mode, write_csv

ROOT = Path(__file__).resolve().parent.parent


def test_a_planted_symlink_at_a_predictable_temporary_name_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("another user's file")
    target = tmp_path / "predictions.csv"
    for name in (f".{target.name}.tmp-{os.getpid()}", f"{target.name}.tmp", f".{target.name}.tmp"):
        (tmp_path / name).symlink_to(victim)
    write_csv(target, ["path", "prob_pcnsl"], [("a.png", 0.25)])
    assert victim.read_text() == "another user's file"
    assert target.read_text().splitlines() == ["path,prob_pcnsl", "a.png,0.25"]
    assert not target.is_symlink()


def test_private_outputs_are_0600_unless_the_umask_is_stricter(tmp_path):
    previous = os.umask(0o022)
    try:
        write_csv(tmp_path / "p.csv", ["a"], [(1,)], private=True)
        write_csv(tmp_path / "plain.csv", ["a"], [(1,)])
        os.umask(0o277)
        assert private_mode() == 0o400
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "p.csv").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "plain.csv").stat().st_mode) == 0o644  # not patient data
    (tmp_path / "p.csv").chmod(0o640)  # shared with the group: a rewrite keeps it
    write_csv(tmp_path / "p.csv", ["a"], [(2,)], private=True)
    assert stat.S_IMODE((tmp_path / "p.csv").stat().st_mode) == 0o640


def test_step0_hdf5_of_patient_images_is_created_0600(demo_data, tmp_path):
    import step0_convert_images_to_hdf5 as step0

    previous = os.umask(0o022)
    try:
        assert step0.main([str(demo_data), str(tmp_path / "d.h5"), "--size", "16", "16"]) == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "d.h5").stat().st_mode) == 0o600


@pytest.mark.slow  # two step0 subprocesses
def test_a_full_disk_is_one_line_and_the_old_output_survives(demo_data, tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: the write fails with EFBIG."""
    out = tmp_path / "d.h5"
    argv = [str(demo_data), str(out), "--workers", "1", "--size"]
    subprocess.run(
        [sys.executable, "step0_convert_images_to_hdf5.py", *argv, "16", "16"], cwd=ROOT, check=True
    )
    before = out.read_bytes()
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) + 50_000}, {len(before) + 50_000}))
        import step0_convert_images_to_hdf5 as step0
        sys.exit(step0.main({[*argv, "96", "96"]!r}))
    """)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {out}: not written, the disk is full or the file too large (a size limit or quota); "
        "the old file is unchanged"
    )
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["d.h5"]


def test_file_sha256_gives_the_known_digests(tmp_path):
    empty, abc, big = tmp_path / "empty", tmp_path / "abc", tmp_path / "big"
    empty.write_bytes(b"")
    abc.write_bytes(b"abc")
    # Over the 1 MiB block file_sha256 reads at a time, and not a multiple of it.
    content = np.random.default_rng(0).integers(0, 256, 3 * (1 << 20) + 17, dtype=np.uint8).tobytes()
    big.write_bytes(content)
    # FIPS 180-2's test vectors ("" and "abc"), and hashlib on the whole content at once.
    assert file_sha256(empty) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert file_sha256(abc) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert file_sha256(str(big)) == hashlib.sha256(content).hexdigest()
