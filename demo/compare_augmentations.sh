#!/usr/bin/env bash
# Train the demo model three times on the same synthetic cohort and split, with
# --augmentation none, base and strong, and compare the test AUROCs (with 95% CIs) on the
# demo's unseen test patients. CPU heavy: three trainings (about 15-25 minutes on 2 cores).
# Everything is written under demo_compare/ (COMPARE_OUTPUT), replaced on every run; the
# cohort and training settings are the demo's (DEMO_* variables, see demo/run_demo.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${COMPARE_OUTPUT:-demo_compare}"
TRAIN_PATIENTS="${DEMO_TRAIN_PATIENTS:-40}"    # per class
TEST_PATIENTS="${DEMO_TEST_PATIENTS:-15}"      # per class
SLICES="${DEMO_SLICES:-4}"                     # per patient
SIZE="${DEMO_SIZE:-96}"                        # model input, pixels
BACKBONE="${DEMO_BACKBONE:-efficientnetb0}"
EPOCHS="${DEMO_EPOCHS:-40}"
BOOTSTRAPS="${DEMO_BOOTSTRAPS:-10000}"
AUGMENTATIONS="${COMPARE_AUGMENTATIONS:-strong base none}"  # strong (the demo's) first

run() { echo "+ $*" >&2; "$@"; }

# rm -rf "$OUT" && mkdir "$OUT", refused unless $OUT holds the demo's .gbmpcnsl-demo marker
python -m gbmpcnsl.outputs "$OUT"

run python demo/make_demo_data.py "$OUT/data_train" --patients-per-class "$TRAIN_PATIENTS" \
    --slices-per-patient "$SLICES" --size 256 --seed 1
run python demo/make_demo_data.py "$OUT/data_test" --patients-per-class "$TEST_PATIENTS" \
    --slices-per-patient "$SLICES" --size 256 --seed 2
run python step0_convert_images_to_hdf5.py "$OUT/data_train" "$OUT/train.h5" --resize "$SIZE" "$SIZE"

for AUGMENTATION in $AUGMENTATIONS; do
    # Same seed: same split, same initial weights, same order of the slices.
    run python step1_train_model.py --augmentation "$AUGMENTATION" --epochs "$EPOCHS" --weights none \
        --backbone "$BACKBONE" --learning-rate 1e-3 --batchnorm-momentum 0.9 --head-init glorot --seed 0 \
        "$OUT/train.h5" "$OUT/run_$AUGMENTATION"
    CHECKPOINT="$(ls "$OUT/run_$AUGMENTATION"/ckpt_*.keras | sort | tail -n 1)"  # the best one
    run python step2_predict.py --model-weights "$CHECKPOINT" --csv "$OUT/predictions_$AUGMENTATION.csv" \
        "$OUT/data_test/gbm" "$OUT/data_test/pcnsl" > /dev/null
done

# shellcheck disable=SC2086
run python demo/summarize_comparison.py --n-bootstraps "$BOOTSTRAPS" "$OUT" $AUGMENTATIONS
