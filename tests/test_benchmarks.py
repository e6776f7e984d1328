"""benchmarks/gpu_suite.sh: its --dry-run runs every GPU measurement's code path on the CPU
with tiny sizes and writes one results file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
SECTIONS = [
    "## Training: float32 and mixed float16",
    "## Training: float32 with XLA",
    "## step2 (Keras checkpoint) against the original's whole command",
    "## Grad-CAM",
    "## Summary",
]


def run_suite(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SUITE), *args], cwd=ROOT, env=env, capture_output=True, text=True)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 3 training runs (one with XLA) and B4 start-ups: minutes on 2 cores
@pytest.mark.skipif(
    os.environ.get("GBMPCNSL_TEST_GPU_SUITE") != "1",
    reason="about 30 min on 2 cores, over the suite's budget: GBMPCNSL_TEST_GPU_SUITE=1 runs it",
)
def test_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "results.md"
    result = run_suite("--dry-run", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# GPU suite (dry run on the CPU, tiny sizes)\n")
    assert "- GPU: none" in text and "GPUs seen: 0" in text
    positions = [text.index(section) for section in SECTIONS]
    assert positions == sorted(positions)
    # Each measurement produced its numbers: training rows (float32, mixed, mixed + XLA),
    # the step2 and original rows, the Grad-CAM table.
    assert text.count("images/s  ") >= 3 and "mixed_float16 / float32 throughput = " in text
    assert "| 4 | original |" in text and "| 4 | step2 TensorFlow |" in text
    assert "| ours (batch 2, gradient model once, tf.function) |" in text
    assert "- whole suite: " in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md"]  # no partial file left


def test_refuses_an_existing_results_file_and_unknown_options(tmp_path):
    out = tmp_path / "results.md"
    out.write_text("kept\n")
    result = run_suite("--dry-run", "--out", str(out))
    assert (result.returncode, result.stderr) == (2, f"error: {out}: exists (give another --out)\n")
    assert out.read_text() == "kept\n"
    result = run_suite("--fast")
    assert (result.returncode, result.stderr) == (2, "error: --fast: unknown option (see --help)\n")
