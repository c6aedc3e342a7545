#!/usr/bin/env bash
# A learned classifier for instruments as wide as real ones (not the packaged weights:
# README, "Learned models", says how it compares with them on the hold-out nights).
#
#   models/train_wide_classifier.sh [WORK_DIR]        (default: data/classifier-wide)
#
# Writes WORK_DIR/classifier-wide.safetensors (+ .json); use it with
# `run.classifier_weights` in a configuration file.
#
# 1. simulate the training nights below (seeds 1001-1099 are reserved for training; nights
#    and seeds used for evaluation, bench/classifier_eval.py, are disjoint from these) in
#    the simulator's wide domain (`survey-qa simulate --domain wide`), plus one night of
#    the default domain (survey-like 1024 px detectors at 0.15-0.5"/px): every class in equal
#    shares, pixel scales 0.1-15"/px, FWHM 1.2-20 px, detectors of 500 px up to the side
#    given below (not square), raw frames with overscan and a bias level, vignetting and
#    dust donuts, Bayer frames, defocused (donut) PSFs, sparse fields, and every
#    confounder, file format (single, .fz, .gz, mosaics), sky level and star density;
# 2. run the nightly job on each night (with the rule classifier: the labels come from the
#    truth table, and the training must not depend on whatever weights are packaged);
# 3. train the SOM on their star stamps;
# 4. train the classifier (Lightning, CPU), calibrate it on the held-out night and write
#    the weights; their JSON records the recipe and the training domain
#    (range of pixel scale and FWHM) outside which the
#    nightly job lets the rules decide.
#
# Simulation plus measurement cost about 5.3 CPU-s per megapixel and 40 CPU-s per night
# (trial nights), then 2-3 minutes of training: about 20 minutes on an idle 2-core machine.
# Deterministic for a given survey-qa version (seeds fixed; single-threaded BLAS).
# Environment: PYTHON (default: python), WORKERS (default 2), WEIGHTS (default:
# WORK_DIR/classifier-wide.safetensors), TRAINING_NIGHTS_LIST (replaces the list below, for a trial; see
# models/training_nights.sh).
set -euo pipefail

WORK=${1:-data/classifier-wide}

# night        seed  largest side (px)  exposures  domain
TRAINING_NIGHTS=(
  "2024-01-04  1021  1024               100        wide"
  "2024-01-11  1022  1024               100        wide"
  "2024-01-18  1023  1024               100        wide"
  "2024-01-25  1024  1024               100        wide"
  "2024-02-15  1027  2048                30        wide"
  "2024-03-07  1029  1024               100        default"
)

source "$(dirname "${BASH_SOURCE[0]}")/training_nights.sh"
WEIGHTS=${WEIGHTS:-$WORK/classifier-wide.safetensors}
measure_training_nights balanced
train_classifier_on_nights "$WEIGHTS"
