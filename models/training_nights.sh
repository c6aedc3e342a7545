# Shared by models/train_shipped.sh and models/train_shipped_classifier.sh; sourced, not run.
#
# Before sourcing, the caller sets WORK (the work folder) and TRAINING_NIGHTS (lines of
# "night seed detector-side exposures"). This file sets PYTHON, WORKERS, RAW and OUT,
# single-threaded BLAS, and defines measure_training_nights MIX: simulate each night
# once (survey-qa simulate, MIX "balanced" or "realistic") and run the nightly job on it
# with the rule classifier (the training must not depend on whatever weights are
# packaged). It leaves the nights in the array NIGHTS.
set -euo pipefail

PYTHON=${PYTHON:-python}
WORKERS=${WORKERS:-2}
RAW=$WORK/raw
OUT=$WORK/qa
START=$SECONDS
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 PYTHONWARNINGS=ignore

measure_training_nights() {
  local mix=$1 line night seed size frames
  NIGHTS=()
  mkdir -p "$RAW" "$OUT"
  for line in "${TRAINING_NIGHTS[@]}"; do
    read -r night seed size frames <<<"$line"
    NIGHTS+=("$night")
    if [[ ! -f $RAW/$night/_truth/truth.parquet ]]; then
      echo "simulate $night: $frames exposures of ${size}px, seed $seed"
      "$PYTHON" -m survey_qa.cli simulate --night "$night" --frames "$frames" --seed "$seed" \
          --size "$size" --mix "$mix" --workers "$WORKERS" --raw-root "$RAW" >/dev/null
    fi
    echo "nightly job $night ($((SECONDS - START)) s so far)"
    "$PYTHON" -m survey_qa.cli --night "$night" --raw-root "$RAW" --out-root "$OUT" \
        --workers "$WORKERS" --no-progress --classifier rules | tail -n 3
  done
}
