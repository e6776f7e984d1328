#!/usr/bin/env bash
# "From a scanner export to a result" (docs/recipe.md), end to end on the demo cohort written
# as a scanner export: one folder per patient holding a T1 post-contrast series, a FLAIR
# series and a sagittal localizer, as DICOM. Steps: pick the T1 post-contrast series (step0
# --series), cross-validate by patient (step1 --folds), Grad-CAM of every slice by the fold
# model that did not see its patient (step5 --out-of-fold), then the out-of-fold ROC with
# patient-level CIs and report.html (step4). Everything goes under recipe_output/
# (RECIPE_OUTPUT), replaced on every run (only when it holds the demo's marker).
# The model trains from scratch (--weights none) so that the recipe runs offline.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${RECIPE_OUTPUT:-recipe_output}"
PATIENTS="${RECIPE_PATIENTS:-20}"      # per class
SLICES="${RECIPE_SLICES:-4}"           # per patient
SIZE="${RECIPE_SIZE:-96}"              # model input, pixels
FOLDS="${RECIPE_FOLDS:-5}"
EPOCHS="${RECIPE_EPOCHS:-30}"
BOOTSTRAPS="${RECIPE_BOOTSTRAPS:-2000}"

run() { echo "+ $*" >&2; "$@"; }

python -m gbmpcnsl.outputs "$OUT"   # rm -rf "$OUT" && mkdir "$OUT", only for the demo's own folder

# The scanner export: DATA/<gbm|pcnsl>/<patient>/<series folder>/IM*.dcm
run python demo/make_demo_data.py "$OUT/cohort" --patients-per-class "$PATIENTS" \
    --slices-per-patient "$SLICES" --size 256 --format dicom --seed 1
run python demo/make_scanner_export.py "$OUT/cohort" "$OUT/export"

# 1. The T1 post-contrast series of every patient, by its SeriesDescription.
run python step0_convert_images_to_hdf5.py "$OUT/export" "$OUT/data.h5" --series 'T1 POST' \
    --resize "$SIZE" "$SIZE"

# 2. K-fold cross-validation by patient (nested selection of the checkpoint within each fold).
run python step1_train_model.py --folds "$FOLDS" --augmentation strong --epochs "$EPOCHS" \
    --weights none --backbone efficientnetb0 --learning-rate 1e-3 --batchnorm-momentum 0.9 \
    --head-init glorot --seed 0 "$OUT/data.h5" "$OUT/cv"

# 3. Grad-CAM: each slice explained by the fold model that did not see its patient.
run python step5_plot_grad_cam.py --model-weights "$OUT/cv" --out-of-fold --series 'T1 POST' \
    --slices middle:1 --output-dir "$OUT/gradcam" --annotate "$OUT/export/gbm" "$OUT/export/pcnsl"

# 4. The out-of-fold ROC: every slice predicted by the model that did not see its patient;
#    AUROC with bootstrap CIs over patients, patient-level AUROC, report.html.
run python -m gbmpcnsl.notebooks --execution-timeout 1800 step4_plot_roc.ipynb "$OUT/step4_plot_roc.ipynb" \
    -p predictions "{\"cross-validated\": \"$OUT/cv/oof_predictions.csv\"}" \
    -p output_dir "$OUT/figures" -p n_bootstraps "$BOOTSTRAPS" \
    --report "$OUT/report.html" --gradcam "$OUT/gradcam" > /dev/null

echo "report: $OUT/report.html"
