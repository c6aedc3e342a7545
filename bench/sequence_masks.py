"""Masks of the damaged sky against the simulator's truth masks, on simulated sequences.

    python bench/sequence_masks.py --raw-root R --out-root O [--nights N] [--seed S]
                                   [--first-night YYYY-MM-DD]
                                   [--frames F] [--size PX] [--workers W] [--again]

Simulates ``--nights`` sequences (one field each, ``survey-qa simulate --sequence``, seeds
``--seed`` and up, nights ``--first-night`` and on) where they are not there yet, runs
the nightly job on each where its catalog is not there yet (or again with ``--again``),
then compares, frame by frame, at full resolution:

- the autoencoder's mask (``ae_mask``, night-calibrated), and
- the mask of the damaged sky (``defect_mask``: the field's other frames with the
  autoencoder, :mod:`survey_qa.pipeline.skymask`)

with the truth mask (added light over 5% of the sky, or patchy extinction over 0.1 mag).
Printed: the mean IoU over the frames whose truth has damage (the frames whose true
class is ``background_issues`` and all of them), by kind of damage, and on the frames
without damage the masked share (what a mask costs a good frame). Then, for the output
folder and each ``--compare`` folder (the same nights measured by another version):
transparency and ``k`` against the truth (median and 1.48 MAD), ``k`` on clear frames,
how many cloud, clear and bad-seeing frames are called ``background_issues``, and the
agreement with the truth class.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from astropy.io import fits

from survey_qa import paths
from survey_qa.pipeline import aescore, outputs, skymask, stack



def run(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "survey_qa.cli", *args], check=True,
                   stdout=subprocess.DEVNULL)


def make_night(night: str, seed: int, a) -> None:
    """Simulate and measure one sequence night where its outputs are missing."""
    if not paths.truth_table(a.raw_root, night).exists():
        run("simulate", "--sequence", "--night", night, "--frames", str(a.frames),
            "--size", str(a.size), "--seed", str(seed), "--raw-root", str(a.raw_root))
    if a.again or not paths.catalog_partition(a.out_root, "exposures", night).exists():
        run("--night", night, "--raw-root", str(a.raw_root), "--out-root", str(a.out_root),
            "--workers", str(a.workers), "--no-progress")


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    union = np.count_nonzero(pred | truth)
    return float(np.count_nonzero(pred & truth) / union) if union else 1.0


def night_rows(night: str, a, block_px: int) -> list[dict]:
    """One row per detector: kind of damage, true class, IoU and masked shares."""
    rows = pd.read_parquet(paths.catalog_partition(a.out_root, "exposures", night))
    truth = pd.read_parquet(paths.truth_table(a.raw_root, night))
    store = paths.zarr_store(a.out_root, night)
    frames = outputs.store_frames(store)
    out = []
    for t in truth.itertuples():
        key = (t.exposure, str(t.detector))
        row = rows[(rows.exposure == t.exposure) & (rows.detector.astype(str) == key[1])]
        if key not in frames or row.empty or row.iloc[0].status != "ok":
            continue
        with fits.open(paths.truth_mask(a.raw_root, night, t.exposure)) as hdul:
            truth_mask = np.asarray(hdul[1 + t.detector_index].data, bool)
        shape = truth_mask.shape
        got = outputs.read_frames(store, "ae_mask", {0: frames[key]})
        ae = (aescore.upsample_mask(got[0][: -(-shape[0] // block_px), : -(-shape[1] // block_px)],
                                    block_px, shape) if got else np.zeros(shape, bool))
        cells = outputs.read_frames(store, "defect_mask", {0: frames[key]}).get(0)
        seq = stack.cells_to_pixels(skymask.detector_cells(cells, shape), shape)
        kind = t.background_kind if truth_mask.any() else "none"
        out.append({"night": night, "exposure": t.exposure, "kind": kind,
                    "true_class": t.quality_class,
                    "has_mask": bool(np.isfinite(row.iloc[0].get("defect_mask_fraction",
                                                                 np.nan))),
                    "truth_share": truth_mask.mean(),
                    "iou_ae": iou(ae, truth_mask), "iou_seq": iou(seq, truth_mask),
                    "share_ae": ae.mean(), "share_seq": seq.mean()})
    return out


def measured_rows(night: str, out_root: Path, raw_root: Path) -> pd.DataFrame:
    """The catalog's cross-frame columns and class next to the truth, one row per frame."""
    rows = pd.read_parquet(paths.catalog_partition(out_root, "exposures", night))
    truth = pd.read_parquet(paths.truth_table(raw_root, night))
    rows = rows[rows.detector.astype(str) != "ALL"]
    return truth.merge(rows[["exposure", "quality_class", "transparency_mag",
                             "extinction_spread_mag", "qa_flags"]],
                       on="exposure", suffixes=("_true", ""))


def robust(values: pd.Series) -> str:
    v = values.dropna()
    if v.empty:
        return "n/a"
    return f"{v.median():+.3f} / {1.4826 * (v - v.median()).abs().median():.3f} (n={len(v)})"


def measurement_report(name: str, m: pd.DataFrame) -> None:
    """Transparency and k against the truth, and the classes of cloud and clear frames."""
    patchy = m.k_true > 0
    cloud = m.k_true >= 0.25
    thin = ~patchy & (m.grey_extinction_mag >= 0.3)
    clear = ~patchy & (m.grey_extinction_mag < 0.05) & (m.background_kind == "none")
    bg = m.quality_class == "background_issues"
    print(f"\n{name}")
    print(f"  transparency - truth, frames without patchy cloud: "
          f"{robust(m.transparency_mag[~patchy] - m.transparency_mag_true[~patchy])}")
    print(f"  transparency - truth, patchy frames: "
          f"{robust(m.transparency_mag[patchy] - m.transparency_mag_true[patchy])}")
    print(f"  k - truth, patchy frames: "
          f"{robust(m.extinction_spread_mag[patchy] - m.k_true[patchy])}")
    kc = m.extinction_spread_mag[clear].dropna()
    print(f"  k on clear frames: median {kc.median():.3f}, max {kc.max():.3f}, "
          f">= 0.25: {(kc >= 0.25).sum()} of {len(kc)}")
    print(f"  background_issues: true k >= 0.25 {bg[cloud].sum()}/{cloud.sum()}, thin uniform "
          f"cloud >= 0.3 mag {bg[thin].sum()}/{thin.sum()}, clear frames {bg[clear].sum()}/"
          f"{clear.sum()}, true bad_seeing {bg[m.quality_class_true == 'bad_seeing'].sum()}/"
          f"{(m.quality_class_true == 'bad_seeing').sum()}")
    agree = (m.quality_class == m.quality_class_true).mean()
    print(f"  agreement with the truth class: {agree:.3f} of {len(m)}")


def report(df: pd.DataFrame) -> None:
    damaged = df[df.kind != "none"]
    issues = damaged[damaged.true_class == "background_issues"]
    print(f"{'frames':<46} {'n':>4} {'IoU autoencoder':>16} {'IoU sequence':>13}")
    for name, part in (("background_issues frames (true class)", issues),
                       ("all frames with damage in the truth", damaged),
                       *((f"  kind: {k}", damaged[damaged.kind == k])
                         for k in sorted(damaged.kind.unique()))):
        print(f"{name:<46} {len(part):>4} {part.iou_ae.mean():>16.3f} "
              f"{part.iou_seq.mean():>13.3f}")
    clean = df[df.kind == "none"]
    print(f"\nframes without damage: {len(clean)}; masked share, mean (frames masked "
          f"at all): autoencoder {clean.share_ae.mean():.4f} "
          f"({(clean.share_ae > 0).sum()}), sequence {clean.share_seq.mean():.4f} "
          f"({(clean.share_seq > 0).sum()})")
    print(f"frames without a sequence mask: {(~df.has_mask).sum()} of {len(df)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--raw-root", type=Path, required=True)
    p.add_argument("--out-root", type=Path, required=True)
    p.add_argument("--nights", type=int, default=4)
    p.add_argument("--seed", type=int, default=101)
    p.add_argument("--first-night", default="2025-03-01")
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--csv", type=Path, help="write the per-frame table here")
    p.add_argument("--compare", type=Path, nargs="*", default=[],
                   help="other output folders of the same nights (another version of "
                        "survey-qa): their transparency, k and classes are printed too")
    p.add_argument("--again", action="store_true",
                   help="run the nightly job on nights already measured (it redoes the "
                        "night pass, and so the masks, with the code as it is now)")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from survey_qa import config as config_mod
    from survey_qa.flows import nightly

    cfg = config_mod.load_config(None)
    scorer = nightly.load_models(cfg).scorer
    rows, nights = [], []
    for n in range(a.nights):
        night = (pd.Timestamp(a.first_night) + pd.Timedelta(days=n)).strftime("%Y-%m-%d")
        make_night(night, a.seed + n, a)
        rows += night_rows(night, a, scorer.block_px)
        nights.append(night)
    df = pd.DataFrame(rows)
    if a.csv:
        df.to_csv(a.csv, index=False)
    report(df)
    for out in (a.out_root, *a.compare):
        measurement_report(str(out), pd.concat([measured_rows(n, out, a.raw_root)
                                                for n in nights]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
