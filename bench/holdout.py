"""Agreement of a nightly catalog with the simulator's truth, side by side for several runs.

    python bench/holdout.py --raw-root R --night N OUT_ROOT [OUT_ROOT ...]

For each output folder (the same simulated night measured by different versions of
survey-qa, or with different classifiers) prints the share of detectors and of exposures
whose ``quality_class`` equals the truth, over the non-ambiguous ones, per true class, and
the confusion matrix of the first run. Failed rows count as disagreements.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from survey_qa import paths
from survey_qa.pipeline.schema import PRIORITY


def load(out_root: Path, raw_root: Path, night: str) -> pd.DataFrame:
    rows = pd.read_parquet(paths.catalog_partition(out_root, "exposures", night))
    truth = pd.read_parquet(paths.truth_table(raw_root, night))
    truth = truth[~truth.ambiguous]
    rows["detector"] = rows.detector.astype(str)
    truth["detector"] = truth.detector.astype(str)
    det = truth.merge(rows, on=["exposure", "detector"], how="left",
                      suffixes=("_true", ""))
    return det


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--raw-root", type=Path, required=True)
    p.add_argument("--night", required=True)
    p.add_argument("out_roots", type=Path, nargs="+")
    a = p.parse_args(argv)
    print(f"{'run':<40} {'detectors':>10} {'agree':>7}  " +
          " ".join(f"{c[:12]:>12}" for c in PRIORITY))
    first = None
    for out in a.out_roots:
        det = load(out, a.raw_root, a.night)
        agree = det.quality_class == det.quality_class_true
        per = [agree[det.quality_class_true == c].mean() for c in PRIORITY]
        print(f"{str(out):<40} {len(det):>10} {agree.mean():>7.3f}  " +
              " ".join(f"{v:>12.3f}" for v in per))
        first = det if first is None else first
    print("\nconfusion of the first run (rows: truth, columns: catalog)")
    print(pd.crosstab(first.quality_class_true, first.quality_class.fillna("failed")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
