#!/usr/bin/env bash
# Reproduce the packaged autoencoder: survey_qa/weights/autoencoder.safetensors (+ .json).
#
#   models/train_shipped.sh [WORK_DIR]        (default: data/autoencoder-training)
#
# 1. simulate the training nights below (seeds 3001-3099 are reserved for training the
#    autoencoder; bench/ae_eval.py evaluates on seeds 4001 and up, never used here), with
#    the "realistic" mix (mostly good frames), every confounder, file format, pixel scale,
#    sky level and star density the simulator draws;
# 2. run the nightly job on each night: its exposures catalog names the good frames;
# 3. train the autoencoder on patches of the good, confident detectors (Lightning, CPU),
#    calibrate the mask threshold on the held-out night and write the weights into the
#    package. The JSON records this command line (the "recipe" key).
#
# About 15 minutes on 2 CPU cores, of which about 6 are training. Environment: PYTHON
# (default: python), WORKERS (default 2), WEIGHTS (default: the packaged path),
# TRAINING_NIGHTS_LIST (replaces the list below, for a trial; see models/training_nights.sh).
set -euo pipefail

WORK=${1:-data/autoencoder-training}

# night        seed  detector side (px)  exposures
TRAINING_NIGHTS=(
  "2023-01-10  3001  2048                 20"
  "2023-01-11  3002  2048                 20"
  "2023-01-12  3003  2048                 20"
)

source "$(dirname "${BASH_SOURCE[0]}")/training_nights.sh"
WEIGHTS=${WEIGHTS:-$HERE/survey_qa/weights/autoencoder.safetensors}
mkdir -p "$WORK"
cat >"$WORK/train.yaml" <<'EOF'
autoencoder:
  bin_factor: 4
  patch_px: 32
  patches_per_frame: 64
  threshold_quantile: 0.995
  max_reference_frames: 200
train:
  accelerator: cpu
  devices: 1
  max_epochs: 40
  batch_size: 64
  learning_rate: 0.001
  seed: 0
  val_fraction: 0.3
  checkpoint_dir: checkpoints-shipped
run:
  progress: false
EOF

measure_training_nights realistic

echo "train the autoencoder ($((SECONDS - START)) s so far)"
rm -rf "$OUT/checkpoints-shipped"  # a fresh training, never a resumed one
OMP_NUM_THREADS=$WORKERS "$PYTHON" -m survey_qa.cli train autoencoder --config "$WORK/train.yaml" \
    --out-root "$OUT" "${NIGHTS[@]/#/--night=}" --output "$WEIGHTS"
echo "done in $((SECONDS - START)) s: $WEIGHTS"
