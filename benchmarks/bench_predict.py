"""Benchmark step2 (prediction) against the original approach, and look for the CPU limit.

    python benchmarks/bench_predict.py [--counts 64 256] [--size 380] [--work-dir DIR]
                                       [--repeat 1] [--skip-tuning] [--model-only-images 64]
                                       [--engines tensorflow onnx openvino int8]

Predicts demo slices (demo/make_demo_data.py, --size px PNGs) with the same paper-era
checkpoint: an EfficientNetB4 of the original architecture built by tf-keras with
weights=None (nothing is downloaded) and saved with model.save("ckpt.hdf5").
- ours: `python step2_predict.py --model-weights ckpt.hdf5 IMAGES...` (tf.data pipeline,
  parallel decoding, batches of 32);
- original: the original approach, in tf.keras 2.x (tf-keras): build the model, load the
  weights, then for each image PIL convert("RGB") + LANCZOS resize and one
  `model.predict(image[None])` call, printing one line per image.
- exported: the same checkpoint exported by step6_export_model.py to ONNX and OpenVINO
  IR, run by `step2_predict.py --model-weights original.onnx|original.xml` (ONNX Runtime
  or OpenVINO, no TensorFlow). OpenVINO runs twice: first with an empty compiled-model
  cache (its compile time inside the command), then with the cache that run filled.
- int8 (with --engines int8): the checkpoint exported by `step6 --format openvino --int8`,
  calibrated on the demo slices converted by step0 (--max-auroc-drop 1: the untrained
  model's AUROC means nothing), run like the float32 IR; the model-only table then ends
  with the int8 / float32 ratio. --engines picks the step2 rows (default: all but int8).
Each run is a whole command in its own subprocess (interpreter start, imports and model
loading included). Wall time runs from start to exit; time to first result is when the
first result line reaches stdout. Runs alternate so that other load on a shared machine
favours neither side; the fastest of --repeat counts.

Tuning (unless --skip-tuning): step2 on the smaller count with other batch sizes,
oneDNN off, and TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS; and the model-only limit,
the model's own throughput on in-memory batches (no start-up, no image decoding).
The model-only rate of each engine (TensorFlow, ONNX Runtime, OpenVINO, batch 32) and
OpenVINO's load time with an empty and a filled cache are measured in any case.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SAVE_ORIGINAL = """
import sys
import tf_keras
size = int(sys.argv[2])
base = tf_keras.applications.EfficientNetB4(include_top=False, input_shape=(size, size, 3), weights=None)
x = tf_keras.layers.GlobalAveragePooling2D(name="avg_pool")(base.output)
x = tf_keras.layers.Dropout(0.5)(x)
x = tf_keras.layers.Dense(1, activation="sigmoid", name="predictions")(x)
tf_keras.Model(inputs=base.input, outputs=x).save(sys.argv[1])
"""

# The original's predict step, on today's stack: tf.keras 2.x API (tf-keras), the model
# built per the original with weights=None, one predict call per image.
ORIGINAL = """
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np
import tf_keras
from PIL import Image

size = int(sys.argv[2])
base = tf_keras.applications.EfficientNetB4(include_top=False, input_shape=(size, size, 3), weights=None)
x = tf_keras.layers.GlobalAveragePooling2D(name="avg_pool")(base.output)
x = tf_keras.layers.Dropout(0.5)(x)
x = tf_keras.layers.Dense(1, activation="sigmoid", name="predictions")(x)
model = tf_keras.Model(inputs=base.input, outputs=x)
model.load_weights(sys.argv[1])
for path in sys.argv[3:]:
    image = Image.open(path).convert("RGB").resize((size, size), Image.LANCZOS)
    prob_pcnsl = model.predict(np.asarray(image, dtype=np.float32)[None])
    prob_pcnsl = float(prob_pcnsl[0, 0])  # float(prob[0]) raises on numpy 2
    prob_gbm = 1 - prob_pcnsl
    if prob_pcnsl > prob_gbm:
        print(f"{path:<40} {100 * prob_pcnsl:.2f} % PCNSL")
    else:
        print(f"{path:<40} {100 * prob_gbm:.2f} % GBM")
"""

# The model's own throughput: batches already in memory, after a warm-up batch.
MODEL_ONLY = """
import sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from gbmpcnsl.checkpoints import load_model_for_inference, model_input_size
from gbmpcnsl.predictors import predict_function
from gbmpcnsl_common import setup_logging
setup_logging()
model = load_model_for_inference(sys.argv[2])
count, batch_size = int(sys.argv[3]), int(sys.argv[4])
height, width = model_input_size(model)
images = np.random.default_rng(0).integers(0, 256, (batch_size, height, width, 3), dtype=np.uint8)
predict = predict_function(model)
predict(images).numpy()
started = time.perf_counter()
for _ in range(count // batch_size):
    predict(images).numpy()
print(f"{(count // batch_size) * batch_size / (time.perf_counter() - started):.3f}")
"""

# An exported model's throughput through step2's own engine: load time, then images/s.
MODEL_ONLY_EXPORTED = """
import sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from gbmpcnsl.predictors import load_exported_model
count, batch_size = int(sys.argv[3]), int(sys.argv[4])
started = time.perf_counter()
predict, (height, width), _ = load_exported_model(sys.argv[2])
load_time = time.perf_counter() - started
images = np.random.default_rng(0).integers(0, 256, (batch_size, height, width, 3), dtype=np.uint8)
predict(images)
started = time.perf_counter()
for _ in range(count // batch_size):
    predict(images)
print(f"{load_time:.3f} {(count // batch_size) * batch_size / (time.perf_counter() - started):.3f}")
"""


def timed_run(command: list[str], env: dict | None = None) -> dict:
    """Run a command; wall time, time to the first result line, and the result lines."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stderr_chunks: list[str] = []
    reader = threading.Thread(target=lambda: stderr_chunks.append(process.stderr.read()), daemon=True)
    reader.start()
    arrivals = []
    for line in process.stdout:
        if line.rstrip().endswith(("% GBM", "% PCNSL")):  # the original's predict also prints progress
            arrivals.append(time.perf_counter() - started)
    process.wait()
    reader.join()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])}... failed:\n{''.join(stderr_chunks)[-3000:]}")
    return {"wall": wall, "first": arrivals[0] if arrivals else float("nan"), "lines": len(arrivals)}


ENGINES = {
    "tensorflow": ["step2 TensorFlow"],
    "onnx": ["step2 ONNX Runtime"],
    "openvino": ["step2 OpenVINO, first run", "step2 OpenVINO, cached"],
    "int8": ["step2 OpenVINO int8, first run", "step2 OpenVINO int8, cached"],
}


def export_checkpoint(checkpoint: Path, data_dir: Path, work_dir: Path, args) -> dict[str, Path]:
    """The checkpoint exported by step6 for the engines asked for (timed once; kept in
    --work-dir). int8: --int8 calibrated on the demo slices converted by step0 (the
    untrained model's AUROC means nothing: --max-auroc-drop 1, speed only)."""
    paths = {"onnx": work_dir / "original.onnx", "openvino": work_dir / "original.xml"}
    paths["int8"] = work_dir / "original_int8.xml"
    exported = {}
    for key, path in paths.items():
        if key not in args.engines:
            continue
        exported[key] = path
        if path.is_file():
            continue
        started = time.perf_counter()
        command = [sys.executable, str(ROOT / "step6_export_model.py"), "--model-weights", str(checkpoint)]
        command += ["--format", "openvino" if key == "int8" else key, str(path)]
        if key == "int8":
            h5 = work_dir / "calibration.h5"
            if not h5.is_file():
                step0 = [
                    sys.executable,
                    str(ROOT / "step0_convert_images_to_hdf5.py"),
                    str(data_dir),
                    str(h5),
                ]
                subprocess.run([*step0, "--size", str(args.size), str(args.size)], check=True, cwd=ROOT)
            command += ["--int8", "--calibration", str(h5), "--max-auroc-drop", "1"]
        subprocess.run(command, check=True, cwd=ROOT)
        print(f"  step6 export to {key}: {time.perf_counter() - started:.1f} s", flush=True)
    return exported


def step2_command(checkpoint: Path, images: list[str], batch_size: int = 32) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "step2_predict.py"),
        "--model-weights",
        str(checkpoint),
        "--batch-size",
        str(batch_size),
        *images,
    ]


def best(runs: list[dict]) -> dict:
    return min(runs, key=lambda run: run["wall"])


def load_average() -> str:
    return "/".join(f"{value:.1f}" for value in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--counts", type=int, nargs="+", default=[64, 256], help="images per run")
    parser.add_argument("--size", type=int, default=380, help="model input and demo image size")
    parser.add_argument("--repeat", type=int, default=1, help="runs per side; the fastest counts")
    parser.add_argument("--work-dir", type=Path, help="keep the demo images and checkpoint here")
    parser.add_argument("--skip-tuning", action="store_true")
    parser.add_argument(
        "--model-only-images", type=int, default=64, help="images per engine in the model-only rows"
    )
    parser.add_argument(
        "--engines",
        nargs="+",
        choices=ENGINES,
        default=["tensorflow", "onnx", "openvino"],
        help="step2's engines to run beside the original (int8: step6 --int8, calibrated on the demo slices)",
    )
    args = parser.parse_args(argv)

    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_predict_"))
    work_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {load_average()}"
    )

    # Demo slices and a paper-era checkpoint (neither side downloads anything).
    data_dir = work_dir / "data"
    needed = max(args.counts)
    if not data_dir.is_dir():
        patients = -(-needed // 16)  # 8 slices per patient, both classes
        subprocess.run(
            [sys.executable, str(ROOT / "demo" / "make_demo_data.py"), str(data_dir)]
            + ["--patients-per-class", str(patients), "--slices-per-patient", "8", "--size", str(args.size)],
            check=True,
        )
    all_images = sorted(str(p) for p in data_dir.glob("[gp]*/*/*.png"))
    # Interleave the classes so that any prefix holds both.
    gbm = [p for p in all_images if "/gbm/" in p]
    pcnsl = [p for p in all_images if "/pcnsl/" in p]
    images = [p for pair in zip(gbm, pcnsl, strict=False) for p in pair][:needed]
    assert len(images) == needed, f"only {len(images)} demo images"
    checkpoint = work_dir / "original.hdf5"
    if not checkpoint.is_file():
        subprocess.run([sys.executable, "-c", SAVE_ORIGINAL, str(checkpoint), str(args.size)], check=True)

    exported = export_checkpoint(checkpoint, data_dir, work_dir, args)
    original_env = {"PYTHONUNBUFFERED": "1"}  # each result line is seen when printed
    variants = ["original"] + [name for engine in args.engines for name in ENGINES[engine]]
    results = {}
    for count in args.counts:
        runs = {name: [] for name in variants}
        for _ in range(args.repeat):
            cache_home = Path(tempfile.mkdtemp(prefix="ov_cache_", dir=work_dir))  # empty OpenVINO cache
            commands = {
                "original": (
                    [sys.executable, "-c", ORIGINAL, str(checkpoint), str(args.size), *images[:count]],
                    original_env,
                ),
                "step2 TensorFlow": (step2_command(checkpoint, images[:count]), {}),
                "step2 ONNX Runtime": (step2_command(exported.get("onnx", checkpoint), images[:count]), {}),
                "step2 OpenVINO, first run": (
                    step2_command(exported.get("openvino", checkpoint), images[:count]),
                    {"XDG_CACHE_HOME": str(cache_home)},
                ),
                "step2 OpenVINO, cached": (
                    step2_command(exported.get("openvino", checkpoint), images[:count]),
                    {"XDG_CACHE_HOME": str(cache_home)},
                ),
                "step2 OpenVINO int8, first run": (
                    step2_command(exported.get("int8", checkpoint), images[:count]),
                    {"XDG_CACHE_HOME": str(cache_home)},
                ),
                "step2 OpenVINO int8, cached": (
                    step2_command(exported.get("int8", checkpoint), images[:count]),
                    {"XDG_CACHE_HOME": str(cache_home)},
                ),
            }
            for name in variants:
                command, env = commands[name]  # (an engine not asked for: not run)
                runs[name].append(timed_run(command, env))
                print(
                    f"  {name:<27} {count:4d} images: {runs[name][-1]['wall']:.1f} s (load {load_average()})",
                    flush=True,
                )
            shutil.rmtree(cache_home, ignore_errors=True)
        results[count] = {name: best(runs[name]) for name in variants}
        assert all(run["lines"] == count for run in results[count].values())

    print()
    print("whole command (start-up, imports, model loading included):")
    print("| images | command | wall (s) | vs original | first result (s) | images/s |")
    print("|---:|---|---:|---:|---:|---:|")
    for count, by_variant in results.items():
        original_wall = by_variant["original"]["wall"]
        for name, run in by_variant.items():
            print(
                f"| {count} | {name} | {run['wall']:.1f} | {original_wall / run['wall']:.2f}x "
                f"| {run['first']:.1f} | {count / run['wall']:.2f} |"
            )

    # Model-only rate of each engine, and OpenVINO's load time with an empty / filled cache.
    count = max(args.model_only_images, 32)
    print()
    print(f"model-only, batch 32, {count} images in memory (after a warm-up batch; load avg before each):")
    print("| engine | images/s | vs TensorFlow | model load (s) | load |")
    print("|---|---:|---:|---:|---|")
    load = load_average()
    command = [sys.executable, "-c", MODEL_ONLY, str(ROOT), str(checkpoint), str(count), "32"]
    tf_rate = float(subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1])
    print(f"| TensorFlow | {tf_rate:.2f} | 1.00x | | {load} |", flush=True)
    cache_home = Path(tempfile.mkdtemp(prefix="ov_cache_", dir=work_dir))
    engines = [
        ("ONNX Runtime", "onnx"),
        ("OpenVINO, empty cache", "openvino"),
        ("OpenVINO, cached", "openvino"),
        ("OpenVINO int8, empty cache", "int8"),
        ("OpenVINO int8, cached", "int8"),
    ]
    rates = {}
    for name, path in [(name, exported[key]) for name, key in engines if key in exported]:
        load = load_average()
        command = [sys.executable, "-c", MODEL_ONLY_EXPORTED, str(ROOT), str(path), str(count), "32"]
        env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
        load_time, rate = map(
            float,
            subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout.split()[-2:],
        )
        print(f"| {name} | {rate:.2f} | {rate / tf_rate:.2f}x | {load_time:.2f} | {load} |", flush=True)
        rates[name] = rate
    if "OpenVINO int8, cached" in rates and "OpenVINO, cached" in rates:
        ratio = rates["OpenVINO int8, cached"] / rates["OpenVINO, cached"]
        print(f"int8 / float32 OpenVINO, model only: {ratio:.2f}x")
    shutil.rmtree(cache_home, ignore_errors=True)

    if not args.skip_tuning:
        count = min(args.counts)
        print()
        print(f"step2 on {count} images, whole command (load before each run):")
        print("| setting | wall (s) | images/s | first result (s) | load |")
        print("|---|---:|---:|---:|---|")
        settings = [
            ("batch 32 (default)", 32, {}),
            ("batch 8", 8, {}),
            ("batch 16", 16, {}),
            ("batch 64", 64, {}),
            ("oneDNN off (TF_ENABLE_ONEDNN_OPTS=0)", 32, {"TF_ENABLE_ONEDNN_OPTS": "0"}),
            (
                "intra-op 2, inter-op 1 threads",
                32,
                {"TF_NUM_INTRAOP_THREADS": "2", "TF_NUM_INTEROP_THREADS": "1"},
            ),
            (
                "intra-op 2, inter-op 2 threads",
                32,
                {"TF_NUM_INTRAOP_THREADS": "2", "TF_NUM_INTEROP_THREADS": "2"},
            ),
        ]
        for name, batch_size, env in settings:
            load = load_average()
            run = timed_run(step2_command(checkpoint, images[:count], batch_size), env)
            print(
                f"| {name} | {run['wall']:.1f} | {count / run['wall']:.2f} | {run['first']:.1f} | {load} |",
                flush=True,
            )
        print()
        print("model-only limit (in-memory uint8 batches, after warm-up):")
        print("| batch | images/s |")
        print("|---:|---:|")
        for batch_size in (8, 32):
            command = [
                sys.executable,
                "-c",
                MODEL_ONLY,
                str(ROOT),
                str(checkpoint),
                str(count),
                str(batch_size),
            ]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()
            print(f"| {batch_size} | {float(output[-1]):.2f} |", flush=True)

    print(f"\nload average at the end: {load_average()}")
    if args.work_dir is None:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
