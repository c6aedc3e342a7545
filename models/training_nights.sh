# Shared by the training recipes in models/; sourced, not run. Defines
# measure_training_nights and train_classifier_on_nights (below).
#
# Before sourcing, the caller sets WORK (the work folder) and TRAINING_NIGHTS (lines of
# "night seed detector-side exposures [domain]"; domain "default" or "wide", see
# `survey-qa simulate --help`; in the wide domain the side is the largest detector side).
# TRAINING_NIGHTS_LIST (lines of the same form) replaces the caller's list: a small trial
# of a recipe, e.g. TRAINING_NIGHTS_LIST="2024-06-01 1 1024 10 wide".
# This file sets HERE (the repository), PYTHON, WORKERS, RAW and OUT, single-threaded BLAS,
# exports SURVEY_QA_TRAIN_RECIPE (the calling recipe and its arguments, which the training
# records with the weights), and defines
# measure_training_nights MIX: simulate each night once (survey-qa simulate, MIX
# "balanced" or "realistic") and run the nightly job on it with the rule classifier (the
# training must not depend on whatever weights are packaged). It leaves the nights in the
# array NIGHTS and prints the time each step took.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export SURVEY_QA_TRAIN_RECIPE="models/$(basename "${BASH_SOURCE[1]}") $*"
PYTHON=${PYTHON:-python}
WORKERS=${WORKERS:-2}
RAW=$WORK/raw
OUT=$WORK/qa
START=$SECONDS
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 PYTHONWARNINGS=ignore
if [[ -n ${TRAINING_NIGHTS_LIST:-} ]]; then
  mapfile -t TRAINING_NIGHTS <<<"$TRAINING_NIGHTS_LIST"
fi

measure_training_nights() {
  local mix=$1 line night seed size frames domain t0
  NIGHTS=()
  mkdir -p "$RAW" "$OUT"
  for line in "${TRAINING_NIGHTS[@]}"; do
    [[ -n ${line// /} ]] || continue
    domain=""
    read -r night seed size frames domain <<<"$line"
    domain=${domain:-default}
    NIGHTS+=("$night")
    if [[ ! -f $RAW/$night/_truth/truth.parquet ]]; then
      t0=$SECONDS
      echo "simulate $night: $frames exposures of up to ${size}px, seed $seed, $domain domain"
      "$PYTHON" -m survey_qa.cli simulate --night "$night" --frames "$frames" --seed "$seed" \
          --size "$size" --mix "$mix" --domain "$domain" --workers "$WORKERS" \
          --raw-root "$RAW" >/dev/null
      echo "  simulated in $((SECONDS - t0)) s"
    fi
    t0=$SECONDS
    echo "nightly job $night ($((SECONDS - START)) s so far)"
    "$PYTHON" -m survey_qa.cli --night "$night" --raw-root "$RAW" --out-root "$OUT" \
        --workers "$WORKERS" --no-progress --classifier rules | tail -n 3
    echo "  measured in $((SECONDS - t0)) s"
  done
}

# train_classifier_on_nights WEIGHTS: the SOM and the classifier on the nights in NIGHTS
# (after measure_training_nights), a fresh training, never a resumed one.
train_classifier_on_nights() {
  local weights=$1
  echo "train SOM and classifier on ${NIGHTS[*]} ($((SECONDS - START)) s so far)"
  rm -rf "$OUT/checkpoints-shipped"
  "$PYTHON" - "$OUT" "$RAW" "$weights" "${NIGHTS[@]}" <<'PY'
import sys
import time
from survey_qa.config import load_config
from survey_qa.flows.train_classifier import train_classifier, train_som

out, raw, weights, *nights = sys.argv[1:]
cfg = load_config(overrides={"train": {"max_epochs": 60, "batch_size": 64,
                                       "learning_rate": 2e-3, "seed": 0,
                                       "val_fraction": 0.17,
                                       "checkpoint_dir": "checkpoints-shipped"}})
t0 = time.perf_counter()
som = train_som(cfg, out, nights)
print(f"SOM: {som} ({time.perf_counter() - t0:.0f} s)")
t1 = time.perf_counter()
path = train_classifier(cfg, out, nights, raw, som_path=som, output=weights)
print(f"classifier: {path} ({time.perf_counter() - t1:.0f} s)")
PY
  echo "done in $((SECONDS - START)) s: $weights"
}
