"""Evaluate the learned classifier on simulated nights never used in training.

    python bench/classifier_eval.py [--work data/classifier-training] [--weights W]
                                    [--frames 60] [--workers 2]

Simulates the evaluation nights below (their names and seeds are disjoint from the
training nights of ``models/train_shipped_classifier.sh``), runs the nightly job on them,
and prints, for the CNN, the rule classifier and the gradient-boosting baseline (trained
on the CNN's training split): accuracy, macro-F1, per-class F1, ROC AUC of "usable" (good
vs not) and accuracy on frames with confounders; then the CNN's training time on CPU and
the size of its weights. Frames in the spec's ambiguous zones are simulated (10 %) but
left out of the scores.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from survey_qa import paths

os.environ.setdefault("OMP_NUM_THREADS", "1")

EVAL_NIGHTS = (  # night, seed, detector side (px); seeds 9001-9099 are reserved for tests
    ("2024-08-06", 9001, 1024),
    ("2024-08-13", 9002, 1536),
    ("2024-08-20", 9003, 1024),
)


def simulate(raw: Path, night: str, frames: int, seed: int, size: int, workers: int) -> None:
    """Write one evaluation night (skipped when its truth table exists)."""
    from distributed import Client, LocalCluster

    from survey_qa.flows.simulate import simulate_night

    if paths.truth_table(raw, night).exists():
        return
    with LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None) as c, \
            Client(c) as client:
        simulate_night(raw, night, frames, seed=seed, size_px=size, mix="balanced",
                       ambiguous_fraction=0.1, client=client)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="data/classifier-training",
                   help="the folder of models/train_shipped_classifier.sh")
    p.add_argument("--weights", help="classifier weights (default: the packaged ones)")
    p.add_argument("--frames", type=int, default=60, help="exposures per evaluation night")
    p.add_argument("--nights", type=int, default=len(EVAL_NIGHTS))
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)

    from survey_qa.config import load_config
    from survey_qa.flows.train_classifier import evaluate
    from survey_qa.models.classifier_inference import default_weights_path, load_classifier

    work = Path(a.work)
    raw, out = work / "eval-raw", work / "eval-qa"
    nights = []
    for night, seed, size in EVAL_NIGHTS[:a.nights]:
        t0 = time.perf_counter()
        simulate(raw, night, a.frames, seed, size, a.workers)
        subprocess.run([sys.executable, "-m", "survey_qa.cli", "--night", night,
                        "--raw-root", str(raw), "--out-root", str(out),
                        "--workers", str(a.workers), "--no-progress"], check=True,
                       stdout=subprocess.DEVNULL)
        print(f"{night}: simulated and measured in {time.perf_counter() - t0:.0f} s")
        nights.append(night)

    cfg = load_config()
    weights = Path(a.weights) if a.weights else default_weights_path()
    clf = load_classifier(weights)
    report = evaluate(cfg, out, raw, nights, weights=weights, train_out_root=work / "qa",
                      train_truth_root=work / "raw",
                      report_dir=work / "evaluation")
    print(report.text())
    t = clf.meta.get("training", {})
    size_kib = (weights.stat().st_size + weights.with_suffix(".json").stat().st_size) / 1024
    print(f"\nCNN trained on {len(t.get('nights', []))} nights, {t.get('n_train')} detectors "
          f"(+{t.get('n_val')} validation) in {t.get('train_s', float('nan')):.0f} s on "
          f"{t.get('accelerator')} x{t.get('devices')}; temperature "
          f"{t.get('temperature', float('nan')):.2f} (val NLL {t.get('val_nll_before', 0):.3f}"
          f" -> {t.get('val_nll_after', 0):.3f}); SOM quantisation error "
          f"{clf.som.quantization_error:.3f}, topographic error "
          f"{clf.som.topographic_error:.3f}")
    print(f"weights: {weights} ({size_kib:.0f} KiB with metadata), "
          f"{sum(v.numel() for v in clf.net.parameters())} parameters")
    summary = {s.name: {"accuracy": s.accuracy, "macro_f1": s.macro_f1} for s in report.scores}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
