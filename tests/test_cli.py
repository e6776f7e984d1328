"""The step scripts' command lines: --help and argument errors are answered without
importing TensorFlow or Keras, one fresh process per script (the test process has them
loaded), with the help text, the exit codes and the one-line errors of each."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import save_png

ROOT = Path(__file__).resolve().parent.parent

# Runs sys.argv[1]'s main on each argv of the JSON list sys.argv[2]; its last stdout line:
# how each call ended ("exit CODE" for SystemExit, "return CODE") and the modules imported.
RUNNER = """
import importlib, json, sys
script = importlib.import_module(sys.argv[1])
ends = []
for argv in json.loads(sys.argv[2]):
    try:
        ends.append(f"return {script.main(argv)}")
    except SystemExit as exit:
        ends.append(f"exit {exit.code}")
print(json.dumps({"ends": ends, "imported": [m for m in ("tensorflow", "keras") if m in sys.modules]}))
"""


def step0_case(tmp_path: Path) -> dict:
    return {
        "calls": [
            (["--help"], "exit 0"),
            (["only-one-arg"], "exit 2"),
            (["a", "b", "--size", "0", "3"], "exit 2"),
        ],
        "out": ["usage:", "DATA/gbm/patient017/slice04.png"],
    }


def step1_case(tmp_path: Path) -> dict:
    return {
        "calls": [(["--help"], "exit 0"), (["--augmentation", "flip", "a.h5", "run"], "exit 2")],
        "out": ["--augmentation {none,base,base_and_noise,strong}"],
        "err": ["invalid choice: 'flip'"],
    }


def step2_case(tmp_path: Path) -> dict:
    """Also a cross-validation run folder that is incomplete, and a plain folder."""
    image = tmp_path / "x.png"
    save_png(image, 100)
    cv_dir = tmp_path / "cv"
    for fold in (0, 1):
        (cv_dir / f"fold_{fold}").mkdir(parents=True)
    (cv_dir / "fold_0" / "ckpt_002_0.0000.keras").write_bytes(b"x")
    for fold, best in ((0, "ckpt_002_0.0000.keras"), (1, None)):
        (cv_dir / f"fold_{fold}" / "run.json").write_text(json.dumps({"best_checkpoint": best}))
    assignment = [
        {"fold": 0, "run_dir": "fold_0", "best_checkpoint": "fold_0/ckpt_002_0.0000.keras"},
        {"fold": 1, "run_dir": "fold_1", "best_checkpoint": None},
    ]
    (cv_dir / "cv.json").write_text(
        json.dumps({"folds": 2, "fold_assignment": assignment, "complete": False})
    )
    plain = tmp_path / "plain"
    plain.mkdir()
    return {
        "calls": [
            (["--help"], "exit 0"),
            (["x.png"], "exit 2"),
            (["--model-weights", str(tmp_path / "no.keras"), "x.png"], "return 2"),
            (["--model-weights", str(cv_dir), str(image)], "return 2"),
            (["--model-weights", str(plain), str(image)], "return 2"),
            (["--model-weights", str(cv_dir / "fold_1"), str(image)], "return 2"),
        ],
        "out": ["--model-weights CKPT", "--tta"],
        "err": ["the following arguments are required: --model-weights"],
        "err_tail": [  # each a line of its own, nothing between them
            f"error: --model-weights {tmp_path / 'no.keras'}: no such file",
            f"error: --model-weights {cv_dir}: cross-validation run incomplete (1 of 2 folds have a best "
            "checkpoint); train the remaining folds first",
            f"error: --model-weights {plain}: a folder, but not a run folder (no run.json or cv.json)",
            f"error: --model-weights {cv_dir / 'fold_1'}: the run has no best checkpoint yet (run.json)",
        ],
    }


def step5_case(tmp_path: Path) -> dict:
    bad_batch = ["--model-weights", "x", "--output-dir", "o", "--batch-size", "0", "a.png"]
    return {
        "calls": [
            (["--help"], "exit 0"),
            (["--model-weights", "x", "a.png"], "exit 2"),
            (bad_batch, "exit 2"),
        ],
        "out": ["--model-weights CKPT --output-dir DIR"],
        "err": ["the following arguments are required: --output-dir", "usage: step5_plot_grad_cam.py"],
        "err_tail": ["step5_plot_grad_cam.py: error: argument --batch-size: 0: expected an integer >= 1"],
    }


def step6_case(tmp_path: Path) -> dict:
    checkpoint = tmp_path / "model.keras"
    checkpoint.write_bytes(b"x")
    (tmp_path / "taken.onnx").write_bytes(b"x")
    onnx = ["--model-weights", str(checkpoint), "--format", "onnx"]
    errors = [
        f"error: {tmp_path / 'out.xml'}: --format onnx writes a .onnx file; name OUT *.onnx",
        f"error: {tmp_path / 'taken.onnx'}: exists (use --overwrite to replace it)",
        f"error: --model-weights {tmp_path / 'no.keras'}: no such file",
    ]
    return {
        "calls": [
            (["--help"], "exit 0"),
            ([*onnx, str(tmp_path / "out.xml")], "return 2"),
            ([*onnx, str(tmp_path / "taken.onnx")], "return 2"),
            (["--model-weights", str(tmp_path / "no.keras"), "--format", "openvino", "m.xml"], "return 2"),
        ],
        "out": ["--format {saved_model,onnx,openvino}", "TensorFlow Serving"],
        "err_all": errors,  # nothing else on stderr
    }


CASES = {
    "step0_convert_images_to_hdf5": step0_case,
    "step1_train_model": step1_case,
    "step2_predict": step2_case,
    "step5_plot_grad_cam": step5_case,
    "step6_export_model": step6_case,
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_help_and_argument_errors_do_not_import_tensorflow(script, tmp_path):
    """Also --version (first: its line is the first on stdout) and the exit status in --help."""
    case = CASES[script](tmp_path)
    case["calls"].insert(0, (["--version"], "exit 0"))
    argvs = [argv for argv, _ in case["calls"]]
    work = tmp_path / "cwd"  # relative paths (o, m.xml) land here, not in the repository
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, script, json.dumps(argvs)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report == {"ends": [end for _, end in case["calls"]], "imported": []}, result.stderr[-3000:]
    assert all(text in result.stdout for text in case["out"])
    versions = r"\(gbm-pcnsl \d+\.\d+\.\d+\): TensorFlow 2\.\d+\.\d+, Keras 3\.\d+\.\d+, numpy \d+\.\d+\.\d+"
    assert re.fullmatch(f"{script}.py {versions}", result.stdout.splitlines()[0])
    assert (
        "Exit status:\n  0    everything asked for was done\n  1    finished, but some inputs"
        in result.stdout
    )
    assert all(text in result.stderr for text in case.get("err", []))
    errors = result.stderr.strip().splitlines()
    tail = case.get("err_tail", [])
    assert errors[len(errors) - len(tail) :] == tail
    if "err_all" in case:
        assert result.stderr.splitlines() == case["err_all"]


# ---------------------------------------------------------------------------- progress
def test_progress_is_a_bar_on_a_terminal_and_a_line_a_minute_in_a_log(tmp_path, monkeypatch):
    """gbmpcnsl.cli.Progress: tqdm's bar only on a TTY; on a pipe no bar text at all, a
    line once the interval has passed (60 s; GBMPCNSL_PROGRESS_SECONDS overrides it)."""
    import io

    from gbmpcnsl.cli import PROGRESS_INTERVAL_S, Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal, pipe = Terminal(), io.StringIO()
    with Progress(4, "images", stream=terminal) as bar, Progress(4, "images", stream=pipe) as lines:
        for _ in range(4):
            bar.update()
            lines.update()
        lines.write("error: x.png: cannot read")
    assert "images:   0%|" in terminal.getvalue() and "\r" in terminal.getvalue()  # tqdm's bar
    assert pipe.getvalue() == "error: x.png: cannot read\n" and PROGRESS_INTERVAL_S == 60
    monkeypatch.setenv("GBMPCNSL_PROGRESS_SECONDS", "0")
    with Progress(2, "images", stream=pipe) as lines:
        lines.update(2)
    assert re.fullmatch(r"images: 2/2 \[100%, \d+\.\d img/s\]", pipe.getvalue().splitlines()[-1])


def test_no_bar_text_in_piped_stderr_and_step0_exits_1_after_skipping(tmp_path):
    """step0 with stderr to a pipe: no tqdm text (carriage returns, bars); an unreadable
    image is named and the exit status is 1 (the other images are converted)."""
    for folder in ("gbm", "pcnsl"):
        for index in range(2):
            save_png(tmp_path / "data" / folder / f"p{index}" / "s.png", 60 * index + 20)
    (tmp_path / "data" / "gbm" / "p1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    command = [sys.executable, str(ROOT / "step0_convert_images_to_hdf5.py"), "data", "out.h5"]
    result = subprocess.run(
        [*command, "--resize", "16", "16", "--workers", "1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "\r" not in result.stderr and "img/s]" not in result.stderr and "it/s" not in result.stderr
    assert "warning: skipped " in result.stderr and "broken.png" in result.stderr
    assert (tmp_path / "out.h5").is_file()
