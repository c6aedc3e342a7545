#!/usr/bin/env bash
# Reproduce the packaged multi-frame restoration network:
# survey_qa/weights/restoration.safetensors (+ .json).
#
#   models/train_restoration.sh [WORK_DIR]        (default: data/restoration-training)
#
# 1. simulate the training nights (sequence seeds 6001-6016, one night of 17 frames of
#    384 x 384 px each; seeds 7001-7006 are held out for bench/restoration.py and refused
#    here) and write their windows of 5 registered frames, stacks and noiseless truth;
# 2. train the U-Net (Lightning, CPU, one thread) on random 64 px crops, whole nights held
#    out for validation, and write the weights into the package. The JSON records this
#    command line (the "recipe" key).
#
# About 5 minutes of simulation and 8 of training (30 epochs) on a shared 2-core machine,
# several times longer when other jobs hold the cores. Seeds are fixed (simulation, crops,
# initial weights; one thread). Environment: PYTHON (default: python), WEIGHTS (default:
# the packaged path).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${1:-$HERE/data/restoration-training}
PYTHON=${PYTHON:-python}
WEIGHTS=${WEIGHTS:-$HERE/survey_qa/weights/restoration.safetensors}
export SURVEY_QA_TRAIN_RECIPE="models/train_restoration.sh $*"
export OMP_NUM_THREADS=1
START=$SECONDS

rm -rf "$WORK/windows" "$WORK/checkpoints-restoration"  # a fresh data set and training
mkdir -p "$WORK"
(cd /tmp && "$PYTHON" -m survey_qa.models.restoration data --work "$WORK" --seeds 6001-6016)
echo "data in $((SECONDS - START)) s"
(cd /tmp && "$PYTHON" -m survey_qa.models.restoration train --work "$WORK" --output "$WEIGHTS")
echo "done in $((SECONDS - START)) s: $WEIGHTS"
