"""Session fixtures shared by the test modules: a tiny demo cohort, its HDF5 file and one
tiny model trained on it by step1 (EfficientNetB0, 64x64, weights=None, 2 epochs; step1's
default EfficientNetB4 is checked without training it, in test_step1.py).

Everything is offline and small; building these takes about a minute on 2 CPU cores and
is done once per test run, also under pytest-xdist (see built_once). `tiny_b0_models` gives the session's one tiny EfficientNetB0
(untrained, calibrated on the demo slices) at a given size; `tiny_b0` is it at 32x32 with a
few images, for the tests of how the steps read checkpoints, fail and stop.
"""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
import signal
import subprocess
import sys
import threading
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TINY_SIZE = 64


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder `name`, filled by build(folder) once per test run. Under pytest-xdist the
    workers share it: the first to need it builds it under a file lock, the others wait for
    it and reuse it, so a session fixture on disk costs one build, not one per worker."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    root = tmp_path_factory.getbasetemp().parent  # shared by the workers of this run
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed in another worker
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A demo cohort: DATA/{gbm,pcnsl}/<patient>/<slice>.png, masks under DATA/masks/."""
    import make_demo_data

    def build(folder: Path) -> None:
        cohort = ["--patients-per-class", "8", "--slices-per-patient", "3", "--size", "96"]
        assert make_demo_data.main([str(folder / "data"), *cohort, "--seed", "0"]) == 0

    return built_once(tmp_path_factory, "demo", build) / "data"


@pytest.fixture(scope="session")
def demo_h5(demo_data, tmp_path_factory) -> Path:
    """The demo cohort converted by step0 at 64x64."""
    import step0_convert_images_to_hdf5 as step0

    def build(folder: Path) -> None:
        size = ["--size", str(TINY_SIZE), str(TINY_SIZE)]
        assert step0.main([str(demo_data), str(folder / "demo.h5"), *size]) == 0

    return built_once(tmp_path_factory, "h5", build) / "demo.h5"


@pytest.fixture(scope="session")
def trained_run(demo_h5, tmp_path_factory) -> Path:
    """A run folder written by step1: checkpoints, history.csv, run.json, split.csv."""
    import step1_train_model as step1

    def build(folder: Path) -> None:
        argv = ["--augmentation", "base", "--epochs", "2", "--weights", "none", "--seed", "0"]
        assert step1.main([*argv, "--backbone", "efficientnetb0", str(demo_h5), str(folder / "tiny")]) == 0

    return built_once(tmp_path_factory, "runs", build) / "tiny"


@pytest.fixture
def step1_config(monkeypatch):
    """step1's command line -> the TrainConfig that its main() trains with. Nothing is
    trained: training.train and cross_validation.train_cross_validation only record it."""
    import step1_train_model as step1
    from gbmpcnsl import cross_validation, training

    configs = []
    monkeypatch.setattr(training, "train", lambda config, callbacks=None: configs.append(config))
    monkeypatch.setattr(
        cross_validation, "train_cross_validation", lambda config, callbacks=None: configs.append(config)
    )

    def parse(argv: list[str]):
        assert step1.main(argv) == 0
        return configs.pop()

    return parse


@pytest.fixture(scope="session")
def trained_checkpoint(trained_run) -> Path:
    """The best (last written) .keras checkpoint of the tiny run."""
    checkpoints = sorted(trained_run.glob("ckpt_*.keras"))
    assert checkpoints, f"step1 wrote no checkpoint in {trained_run}"
    return checkpoints[-1]


# The legacy checkpoints, by name: (backbone, size, tf.keras >= 2.9's weights="imagenet" graph).
LEGACY_CHECKPOINTS = {
    "b4_380": ("EfficientNetB4", (380, 380), False),  # the paper's model as its step1 saved it
    "b0_64_imagenet": ("EfficientNetB0", (64, 64), True),
}


@pytest.fixture(scope="session")
def legacy_checkpoints(demo_data, tmp_path_factory) -> dict[str, tuple[Path, list[str], object]]:
    """Real tf.keras 2.x checkpoints written by tf-keras (tests/original_tf_keras.py), all
    in one subprocess: for each name of LEGACY_CHECKPOINTS, (its folder with model.hdf5 and
    weights.h5, six demo images, tf-keras's own P(PCNSL) for them). The imagenet ones are
    built with weights="imagenet", so with tf.keras >= 2.9's extra scaling op after
    Normalization."""
    import numpy as np

    paths = sorted(demo_data.glob("gbm/*/*.png"))[:3] + sorted(demo_data.glob("pcnsl/*/*.png"))[:3]
    images = [str(path) for path in paths]
    root = built_once(
        tmp_path_factory, "tf_keras", functools.partial(_write_legacy_checkpoints, images=images)
    )
    return {name: (root / name, images, np.load(root / name / "expected.npy")) for name in LEGACY_CHECKPOINTS}


def _write_legacy_checkpoints(root: Path, images: list[str]) -> None:
    """tests/original_tf_keras.py writes every LEGACY_CHECKPOINTS entry under root, in one
    subprocess."""
    import json

    spec = [
        {
            "out_dir": str(root / name),
            "images": images,
            "size": size,
            "imagenet_graph": imagenet,
            "backbone": backbone,
        }
        for name, (backbone, size, imagenet) in LEGACY_CHECKPOINTS.items()
    ]
    (root / "spec.json").write_text(json.dumps(spec))
    env = {key: value for key, value in os.environ.items() if key != "TF_USE_LEGACY_KERAS"}
    script = Path(__file__).resolve().parent / "original_tf_keras.py"
    command = [sys.executable, str(script), str(root / "spec.json")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="session")
def tf_keras_b0_checkpoint(legacy_checkpoints) -> tuple[Path, list[str], object]:
    """The EfficientNetB0 at 64x64 of legacy_checkpoints, built with weights="imagenet"."""
    return legacy_checkpoints["b0_64_imagenet"]


def _calibrated_b0(demo_data: Path, folder: Path, size: int) -> Path:
    """An EfficientNetB0 at size x size whose P(PCNSL) differs clearly between demo slices,
    saved in `folder` as tiny.keras, tiny.weights.h5 and run.json.

    Untrained, its features hardly differ between images, so its probabilities would all
    agree to 1e-6 and prove nothing. The BatchNormalization statistics are set from the demo
    slices (one training-mode pass with momentum 0, no dropout) and the head points along
    the features' first principal axis, logits spread by about +-2.
    """
    import json

    import keras
    import numpy as np

    from gbmpcnsl.model import build_model
    from gbmpcnsl_common import load_image

    keras.utils.set_random_seed(0)
    model = build_model("efficientnetb0", (size, size, 3), weights=None)
    paths = sorted(demo_data.glob("[gp]*/*/*.png"))
    images = np.stack([load_image(path, (size, size)) for path in paths]).astype(np.float32)
    saved = {}  # each layer's momentum or rate, put back before saving
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            saved[layer.name] = ("momentum", layer.momentum)
            layer.momentum = 0.0
        elif isinstance(layer, keras.layers.Dropout):
            saved[layer.name] = ("rate", layer.rate)
            layer.rate = 0.0
    model(images, training=True)
    for name, (attribute, value) in saved.items():
        setattr(model.get_layer(name), attribute, value)
    features = keras.Model(model.inputs[0], model.get_layer("avg_pool").output).predict(images, verbose=0)
    centered = features - features.mean(0)
    direction = np.linalg.svd(centered, full_matrices=False)[2][0]
    kernel = (direction * 2.0 / (centered @ direction).std())[:, None].astype(np.float32)
    bias = np.float32(0.1) - np.median(features @ kernel, keepdims=True)[0]  # both signs, none at 0
    model.get_layer("logit").set_weights([kernel, bias])
    model.save(folder / "tiny.keras")
    model.save_weights(folder / "tiny.weights.h5")
    (folder / "run.json").write_text(
        json.dumps({"backbone": "efficientnetb0", "input_shape": [size, size, 3]})
    )
    return folder


@pytest.fixture(scope="session")
def tiny_b0_models(demo_data, tmp_path_factory):
    """size -> a folder with tiny.keras, tiny.weights.h5 and run.json: the one tiny
    EfficientNetB0 of the session (see _calibrated_b0), built once per size asked for."""
    built: dict[int, Path] = {}

    def tiny_b0_at(size: int) -> Path:
        if size not in built:
            build = functools.partial(_calibrated_b0, demo_data, size=size)
            built[size] = built_once(tmp_path_factory, f"tiny_b0_{size}", build)
        return built[size]

    return tiny_b0_at


@pytest.fixture(scope="session")
def tiny_b0(tiny_b0_models) -> Path:
    """The session's tiny EfficientNetB0 at 32x32 (tiny.keras; tiny.weights.h5 beside its
    run.json) with three images under images/, for the tests of how the steps read
    checkpoints, fail and stop; returns the folder."""
    from helpers import save_png

    root = tiny_b0_models(32)
    for index in range(3):
        save_png(root / "images" / f"s{index}.png", 30 + 60 * index, size=40)
    return root


# ---------------------------------------------------------------------------- child processes
class Processes:
    """The child processes a test starts: `popen(...)` starts one (subprocess.Popen's
    arguments), `track(process)` adopts one started otherwise (a multiprocessing.Process).
    At teardown, on failure too, each is killed with all its descendants and reaped."""

    def __init__(self):
        self.started: list[tuple[object, object]] = []  # (Popen or Process, psutil.Process)

    def popen(self, *args, **kwargs) -> subprocess.Popen:
        # A child inherits an ignored SIGINT and the calling thread's signal mask through
        # fork and exec. In full xdist runs something in the worker process (not found; SIGQUIT
        # with it, as C's system() does) left SIGINT ignored, and the Ctrl-C tests' children
        # never saw their signal. Start each child as from a shell: SIGINT caught by Python's
        # handler here (so default in the child after exec), and unblocked.
        handler = signal.signal(signal.SIGINT, signal.default_int_handler)
        mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        try:
            return self.track(subprocess.Popen(*args, **kwargs))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            signal.signal(signal.SIGINT, handler)

    def track(self, process):
        import psutil

        try:
            self.started.append((process, psutil.Process(process.pid)))
        except psutil.NoSuchProcess:  # already gone (and reaped by no one yet: reap below)
            self.started.append((process, None))
        return process

    def kill_all(self) -> None:
        from helpers import kill_trees

        kill_trees([handle for _, handle in self.started if handle is not None])
        for process, _ in self.started:
            if isinstance(process, subprocess.Popen):
                process.wait(timeout=10)
                for stream in (process.stdin, process.stdout, process.stderr):
                    if stream is not None:
                        stream.close()
            else:
                process.join(10)
        self.started.clear()


@pytest.fixture
def processes():
    """Start long-lived children through this (see Processes): none outlives the test."""
    tracker = Processes()
    yield tracker
    tracker.kill_all()


@pytest.fixture(scope="module")
def module_processes():
    """`processes` for a module's fixtures: none of these children outlives the module."""
    tracker = Processes()
    yield tracker
    tracker.kill_all()


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item, settings):
    """pytest-timeout's thread method, which ends the whole run with os._exit(1) and so runs
    no finaliser: here every descendant of this process is killed first, after the stacks
    are shown (while the test still blocks where it hung)."""
    if settings.method != "thread":
        return None
    timer = threading.Timer(settings.timeout, _timed_out, (item, settings))
    timer.name = f"pytest_timeout {item.nodeid}"

    def cancel():
        timer.cancel()
        timer.join()

    item.cancel_timeout = cancel  # what pytest-timeout's own cancel hook calls
    timer.start()
    return True


def _timed_out(item, settings) -> None:
    """pytest_timeout.timeout_timer, with the kill of every child process before the exit."""
    import psutil
    import pytest_timeout
    from helpers import kill_trees

    if not settings.disable_debugger_detection and pytest_timeout.is_debugging():
        return
    terminal = item.config.get_terminal_writer()
    try:
        capman = item.config.pluginmanager.getplugin("capturemanager")
        captured = ()
        if capman:
            capman.suspend_global_capture(item)
            captured = capman.read_global_capture()
        terminal.sep("+", title="Timeout")
        for title, text in zip(("Captured stdout", "Captured stderr"), captured, strict=False):
            if text:
                terminal.sep("~", title=title)
                terminal.write(text)
        pytest_timeout.dump_stacks(terminal)
        children = psutil.Process().children()
        kill_trees(children)
        terminal.sep(
            "+", title=f"Timeout after {settings.timeout} s: {len(children)} child process(es) killed"
        )
    except Exception:
        traceback.print_exc()
    finally:
        terminal.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


# ---------------------------------------------------------------------------- order
def pytest_configure(config):
    """Keep the collection order (below) under pytest-xdist's --dist loadfile: by default
    xdist re-sorts the modules by their number of tests, so one-test modules that take
    minutes (the no-signal cross-validation, the recipe) were handed out last and ran
    alone at the end while the other worker idled."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


# Seconds each module took (its tests and the fixtures it built first) in `make test` on the
# 2-core machine, 30 Nov 2026 04:06 UTC (--durations; the machine ran about 1.5x slower than
# at 01:31), less what the changes after it saved; modules not named here take under 30 s.
MODULE_SECONDS = {
    "test_step5": 280,
    "test_export": 258,
    "test_training": 200,
    "test_step2": 173,
    "test_multiworker": 157,
    "test_no_signal": 155,
    "test_runs": 141,
    "test_cross_validation": 123,
    "test_ensembles": 80,
    "test_recipe": 70,
    "test_end_to_end": 68,
    "test_checkpoints": 65,
    "test_model": 40,
}


def pytest_collection_modifyitems(config, items):
    """The longest modules first (MODULE_SECONDS), each module's tests in file order.
    `make test` runs two pytest-xdist workers with --dist loadfile, which hands out whole
    modules in this order (pytest_configure keeps it), each to the first worker free: the
    long ones start early instead of leaving one worker busy at the end while the other
    idles."""
    items.sort(key=lambda item: -MODULE_SECONDS.get(item.module.__name__, 0))  # stable: file order kept
