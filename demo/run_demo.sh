#!/usr/bin/env bash
# The whole gbm-pcnsl pipeline on synthetic demo data, on CPU (about 10 minutes on 2 cores):
# demo cohort (separate train and test patients) -> step0 -> step1 -> step2 -> step5 -> step3/step4
# notebooks and report.html. Everything is written under demo_output/ (DEMO_OUTPUT), which this
# script replaces on every run (only when it holds the .gbmpcnsl-demo marker the demo writes).
# The model trains from scratch (--weights none) so that the
# demo runs offline; it is a demonstration, not the paper's ImageNet-initialised model.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${DEMO_OUTPUT:-demo_output}"
TRAIN_PATIENTS="${DEMO_TRAIN_PATIENTS:-40}"    # per class
TEST_PATIENTS="${DEMO_TEST_PATIENTS:-15}"      # per class
SLICES="${DEMO_SLICES:-4}"                     # per patient
SIZE="${DEMO_SIZE:-96}"                        # model input, pixels
BACKBONE="${DEMO_BACKBONE:-efficientnetb0}"
EPOCHS="${DEMO_EPOCHS:-40}"
BOOTSTRAPS="${DEMO_BOOTSTRAPS:-10000}"

run() { echo "+ $*" >&2; "$@"; }

# rm -rf "$OUT" && mkdir "$OUT", refused unless $OUT holds the demo's .gbmpcnsl-demo marker
python -m gbmpcnsl.outputs "$OUT"

run python demo/make_demo_data.py "$OUT/data_train" --patients-per-class "$TRAIN_PATIENTS" \
    --slices-per-patient "$SLICES" --size 256 --seed 1
run python demo/make_demo_data.py "$OUT/data_test" --patients-per-class "$TEST_PATIENTS" \
    --slices-per-patient "$SLICES" --size 256 --seed 2

run python step0_convert_images_to_hdf5.py "$OUT/data_train" "$OUT/train.h5" --resize "$SIZE" "$SIZE"

# strong augmentation: the demo's patients differ in pose, size and intensity, as real scans
# do (demo/compare_augmentations.sh shows what base does instead); BatchNorm momentum 0.9:
# from scratch, the default 0.99 leaves the validation output flat for the first epochs;
# --head-init glorot: from scratch, the original's logit initializer (+-1 per weight) starts
# with a training loss near 6 and the model had not learnt after 40 epochs (AUROC 0.52).
run python step1_train_model.py --augmentation strong --epochs "$EPOCHS" --weights none \
    --backbone "$BACKBONE" --learning-rate 1e-3 --batchnorm-momentum 0.9 --head-init glorot --seed 0 \
    "$OUT/train.h5" "$OUT/run"

# One line per slice, then (--per-patient) one mean probability per test patient; the run
# folder as --model-weights: its best checkpoint (run.json).
run python step2_predict.py --model-weights "$OUT/run" --csv "$OUT/predictions_test.csv" \
    --per-patient "$OUT/patients_test.csv" "$OUT/data_test/gbm" "$OUT/data_test/pcnsl" \
    > "$OUT/predictions_test.txt"

# Grad-CAM for the first slice of two test patients per class.
mapfile -t GRADCAM_SLICES < <(ls "$OUT"/data_test/gbm/*/slice00.png | head -n 2
                              ls "$OUT"/data_test/pcnsl/*/slice00.png | head -n 2)
run python step5_plot_grad_cam.py --model-weights "$OUT/run" --output-dir "$OUT/gradcam" --annotate \
    "${GRADCAM_SLICES[@]}"

# The notebooks through gbmpcnsl.notebooks (papermill, the kernel over IPC: no TCP port);
# --execution-timeout: a cell still running after 30 minutes is hung, and the run fails.
# step4 also writes report.html: every table and figure, no code, the Grad-CAM montage.
run python -m gbmpcnsl.notebooks --execution-timeout 1800 \
    step3_plot_training_metrics.ipynb "$OUT/step3_plot_training_metrics.ipynb" \
    -p run_dirs "[\"$OUT/run\"]" -p output_dir "$OUT/figures"
run python -m gbmpcnsl.notebooks --execution-timeout 1800 step4_plot_roc.ipynb "$OUT/step4_plot_roc.ipynb" \
    -p predictions "{\"demo model\": \"$OUT/predictions_test.csv\"}" -p output_dir "$OUT/figures" \
    -p threshold_from "$OUT/run/val_predictions.csv" -p n_bootstraps "$BOOTSTRAPS" \
    --report "$OUT/report.html" --gradcam "$OUT/gradcam" > /dev/null

python demo/summarize_demo.py "$OUT"
