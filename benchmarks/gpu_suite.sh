#!/usr/bin/env bash
# Every GPU measurement in one go, into one results file (Markdown):
#   1. training images/s, EfficientNetB4 at 380x380, batch 32: float32 and mixed float16
#      (bench_train.py --variants ours ours-mixed), then mixed float16 with XLA
#      (--xla --variants ours-mixed);
#   2. step2 with the Keras checkpoint against the original's whole command, 256 slices
#      at 380 (bench_predict.py --engines tensorflow --skip-tuning);
#   3. Grad-CAM, step5's batched heatmaps against the original per-image ones
#      (bench_gradcam.py, 32 slices at 380).
# Meant to take under 8 minutes on one GPU (most of it start-up, tracing and XLA
# compilation; the timed epochs are short). Each section's wall time is in the file.
#
#   benchmarks/gpu_suite.sh [--dry-run] [--out FILE]
#
# --dry-run runs the very same commands on the CPU (CUDA_VISIBLE_DEVICES=""), with tiny
# sizes (EfficientNetB0 at 32 for training, B4 at 32 for step2 and Grad-CAM, a handful of
# images), to check the suite before a GPU is at hand; its XLA row is float32 (XLA's
# float16 on a CPU compiles for over 10 minutes). Even so it takes minutes on 2 cores. FILE defaults to
# benchmarks/gpu_results_<UTC time>.md (gpu_dryrun_... for a dry run). The Python is
# $PYTHON, else .venv/bin/python, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --out) out="${2:?--out needs a file name}"; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "error: $1: unknown option (see --help)" >&2; exit 2 ;;
    esac
    shift
done

python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
if [ "$dry_run" = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""
    out="${out:-benchmarks/gpu_dryrun_$stamp.md}"
    train_args=(--backbone efficientnetb0 --size 32 --images 32 --batch-size 4 --steps 2 --epochs 2 --scales 1)
    predict_args=(--counts 4 --size 32 --model-only-images 32)
    gradcam_args=(--images 2 --size 32 --batch-size 2)
    xla_variant=ours  # XLA's float16 kernels compile for many minutes on a CPU
else
    out="${out:-benchmarks/gpu_results_$stamp.md}"
    train_args=(--backbone efficientnetb4 --size 380 --images 800 --batch-size 32 --steps 15 --epochs 3 --scales 1)
    predict_args=(--counts 256 --size 380 --model-only-images 256)
    gradcam_args=(--images 32 --size 380 --batch-size 16)
    xla_variant=ours-mixed
fi
if [ -e "$out" ]; then
    echo "error: $out: exists (give another --out)" >&2
    exit 2
fi
export TF_CPP_MIN_LOG_LEVEL=3
started=$SECONDS
partial="$out.partial"
trap 'rm -f "$partial"' EXIT

{
    echo "# GPU suite$([ "$dry_run" = 1 ] && echo ' (dry run on the CPU, tiny sizes)')"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- host: $(hostname), $(nproc) CPUs; load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- GPU: $( (command -v nvidia-smi >/dev/null && [ "$dry_run" = 0 ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader) || echo none)"
    echo "- $("$python" -c 'import tensorflow as tf, keras; gpus = len(tf.config.list_physical_devices("GPU")); print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, GPUs seen: {gpus}")' 2>/dev/null)"
} >"$partial"

section() {  # section TITLE COMMAND...: its output into the file, with its wall time and load
    local title="$1" begin=$SECONDS
    shift
    echo "== $title" >&2
    {
        echo
        echo "## $title"
        echo
        echo '```'
        echo "\$ $*"
    } >>"$partial"
    if ! "$@" >>"$partial" 2>"$partial.err"; then
        tail -20 "$partial.err" >>"$partial"
        echo '```' >>"$partial"
        echo "error: $title failed (its last lines are in $out)" >&2
        mv "$partial" "$out"
        rm -f "$partial.err"
        exit 1
    fi
    rm -f "$partial.err"
    echo '```' >>"$partial"
    echo "($title: $((SECONDS - begin)) s, load average after: $(cut -d' ' -f1-3 /proc/loadavg))" >>"$partial"
}

section "Training: float32 and mixed float16" \
    "$python" benchmarks/bench_train.py "${train_args[@]}" --mixed-precision --variants ours ours-mixed
section "Training: $([ "$xla_variant" = ours ] && echo float32 || echo mixed float16) with XLA" \
    "$python" benchmarks/bench_train.py "${train_args[@]}" --mixed-precision --xla --variants "$xla_variant"
section "step2 (Keras checkpoint) against the original's whole command" \
    "$python" benchmarks/bench_predict.py "${predict_args[@]}" --engines tensorflow --skip-tuning
section "Grad-CAM" \
    "$python" benchmarks/bench_gradcam.py "${gradcam_args[@]}" --skip-eager

{
    echo
    echo "## Summary"
    echo
    grep -h "images/s  \|throughput =" "$partial" | sed 's/^/- /' || true
    echo "- whole suite: $((SECONDS - started)) s"
} >>"$partial"
mv "$partial" "$out"
echo "wrote $out ($((SECONDS - started)) s)" >&2
