"""step1 trainings that need a process of their own: --resume after a SIGKILL,
reproducibility with --deterministic, and the distribution strategies (two logical CPUs for
MirroredStrategy; MultiWorkerMirroredStrategy is tested in test_multiworker.py)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import TINY, write_h5

import step1_train_model as step1
from gbmpcnsl.runs import backup_epoch

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def history_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "history.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def run_python(code: str, tmp_path: Path, env: dict | None = None, timeout: int = 300):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_resume_after_sigkill_lists_each_epoch_once(tmp_path):
    h5_path = write_h5(tmp_path / "d.h5", patients=(4, 4), slices=3)
    run_dir = tmp_path / "run"
    argv = ["--augmentation", "base", "--epochs", "8", *TINY, "--seed", "1", str(h5_path), str(run_dir)]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "step1_train_model.py", *argv],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        deadline = time.monotonic() + 240
        while not history_rows(run_dir) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert process.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
        process.send_signal(signal.SIGKILL)  # mid-training: at least one epoch recorded
        process.wait()
    finished = backup_epoch(run_dir / "backup")
    rows = history_rows(run_dir)
    assert 1 <= len(rows) < 8 and json.loads((run_dir / "run.json").read_text())["status"] == "running"
    assert len(rows) in (finished, finished + 1)
    if len(rows) == finished:  # simulate a kill between CSVLogger's row and the backup
        with open(run_dir / "history.csv", "a", newline="") as handle:
            csv.writer(handle).writerow([finished] + ["999"] * (len(rows[0]) - 1))

    # Changed settings are refused before anything is touched.
    changed = ["--augmentation", "none", *argv[2:], "--resume"]
    assert step1.main(changed) == 2
    assert len(history_rows(run_dir)) == finished + 1

    assert step1.main([*argv, "--resume"]) == 0
    rows = history_rows(run_dir)
    assert [int(row["epoch"]) for row in rows] == list(range(8))
    assert "999" not in {row["loss"] for row in rows}
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "finished" and run["resumed"][0]["after_epoch"] == finished
    assert not (run_dir / "backup").exists()
    # Best-only holds across the restart: each checkpoint improves on every earlier epoch.
    val_losses = [float(row["val_loss"]) for row in rows]
    for checkpoint in run_dir.glob("ckpt_*.keras"):
        epoch = int(checkpoint.name[5:8])
        assert val_losses[epoch - 1] < min(val_losses[: epoch - 1], default=float("inf"))
    assert step1.main([*argv, "--resume"]) == 2  # finished: nothing to resume


def test_same_seed_and_deterministic_give_identical_history(tmp_path):
    h5_path = write_h5(tmp_path / "d.h5", patients=(4, 4), slices=3)
    argv = ["--augmentation", "base_and_noise", "--epochs", "2", *TINY, "--seed", "3", "--deterministic"]
    run_python(
        f"""
        import sys
        import step1_train_model as step1
        for name in ("a", "b"):
            assert step1.main({argv!r} + [{str(h5_path)!r}, {str(tmp_path)!r} + "/" + name]) == 0
        """,
        tmp_path,
    )
    first, second = (tmp_path / "a" / "history.csv").read_text(), (tmp_path / "b" / "history.csv").read_text()
    assert len(first.splitlines()) == 3 and first == second
    assert (tmp_path / "a" / "split.csv").read_text() == (tmp_path / "b" / "split.csv").read_text()
    names = [sorted(p.name for p in (tmp_path / run).glob("ckpt_*")) for run in ("a", "b")]
    assert names[0] == names[1]


def test_mirrored_strategy_on_two_logical_cpus(tmp_path):
    h5_path = write_h5(tmp_path / "d.h5", patients=(4, 4), slices=3)
    run_dir = tmp_path / "run"
    argv = ["--augmentation", "base", "--epochs", "1", *TINY, "--batch-size", "4", "--distribute", "mirrored"]
    result = run_python(
        f"""
        import sys
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import step1_train_model as step1
        sys.exit(step1.main({argv!r} + [{str(h5_path)!r}, {str(run_dir)!r}]))
        """,
        tmp_path,
    )
    assert "batch size 4 per replica x 2 replica(s) = global batch 8 (MirroredStrategy)" in result.stderr
    run = json.loads((run_dir / "run.json").read_text())
    assert run["replicas"] == 2 and run["global_batch_size"] == 8 and run["strategy"] == "MirroredStrategy"
    assert len(history_rows(run_dir)) == 1 and list(run_dir.glob("ckpt_001_*.keras"))
