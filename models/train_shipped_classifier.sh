#!/usr/bin/env bash
# Reproduce the packaged learned classifier: survey_qa/weights/classifier.safetensors (+ .json).
#
#   models/train_shipped_classifier.sh [WORK_DIR]        (default: data/classifier-training)
#
# 1. simulate the training nights below (seeds 1001-1099 are reserved for training; nights
#    and seeds used for evaluation, bench/classifier_eval.py, are disjoint from these);
#    every class in equal shares, every confounder, file format (single, .fz, .gz, mosaics),
#    pixel scale (mostly 0.15-0.5"/px), sky level and star density the simulator draws;
# 2. run the nightly job on each night (with the rule classifier: the labels come from the
#    truth table, and the training must not depend on whatever weights are packaged);
# 3. train the SOM on their star stamps;
# 4. train the classifier (Lightning, CPU), calibrate it on the held-out night and write
#    the weights into the package.
#
# About an hour on 2 CPU cores. Deterministic for a given survey-qa version (seeds
# fixed; single-threaded BLAS). Environment: PYTHON (default: python), WORKERS (default 2).
set -euo pipefail

WORK=${1:-data/classifier-training}

# night        seed  detector side (px)  exposures
TRAINING_NIGHTS=(
  "2024-01-04  1001  1024                100"
  "2024-01-11  1002  1024                100"
  "2024-01-18  1003  1024                100"
  "2024-01-25  1004  1536                 60"
  "2024-02-01  1005  1024                100"
  "2024-02-08  1006  2048                 30"
  "2024-02-15  1007  1024                100"
  "2024-02-22  1008  1024                100"
  "2024-02-29  1009  1536                 60"
  "2024-03-07  1010  1024                100"
  "2024-03-14  1011  1024                100"
  "2024-03-21  1012  1024                100"
  "2024-03-28  1013  1536                 60"
  "2024-04-04  1014  1024                100"
  "2024-04-11  1015  1024                100"
  "2024-04-18  1016  1024                100"
)

source "$(dirname "${BASH_SOURCE[0]}")/training_nights.sh"
WEIGHTS=${WEIGHTS:-$HERE/survey_qa/weights/classifier.safetensors}
measure_training_nights balanced
train_classifier_on_nights "$WEIGHTS"
