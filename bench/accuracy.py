"""Accuracy of the measurement stages and the rule classifier on a simulated night.

Simulates (or reuses) a night with known truth, measures every detector with the
measurement stages and the rule classifier (called directly, in the nightly flow's
order), and prints plain tables:

- seeing FWHM: median relative bias and robust scatter (1.4826 MAD) against
  ``fwhm_px_true``, in bins of true FWHM, for all frames and for untrailed ones;
- ellipticity error against ``ellipticity_true``; trail ratio against the true ratio;
- sky non-uniformity against ``u_true``;
- the rule classifier's accuracy and 5 x 5 confusion matrix on non-ambiguous detectors
  (and on exposures, where a mosaic is classed by the quarter rule).

Usage::

    python bench/accuracy.py --raw-root /tmp/acc --night 2024-06-01 --n-frames 100 \\
        --seed 4242 --size-px 2048 [--workers 2] [--csv rows.csv]

The night is simulated only when ``<raw-root>/<night>/_truth/truth.parquet`` is missing.
Use a seed that was not used to tune the stages.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd

from survey_qa import paths
from survey_qa.config import load_config
from survey_qa.pipeline.schema import PRIORITY

FWHM_BINS = (0.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 20.0)


def measure_detector(det, cfg) -> dict:
    """The nightly run's stages and the rule classifier on one detector, timed."""
    from survey_qa.pipeline.measure import Models, measure_detector as measure

    row = measure(det, cfg, Models(scorer=None, classifier=None)).row
    row["t_total_s"] = sum(row[k] for k in ("t_background_s", "t_sources_s", "t_psf_s",
                                            "t_stamps_s"))
    return row


def _measure_file(args) -> list[dict]:
    """Measure every detector of one file; failed detectors give a row with the error."""
    path, overrides = args
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from survey_qa.pipeline import io
    from survey_qa.pipeline.errors import QualityError

    cfg = load_config(overrides=overrides)
    rows = []
    for det in io.read_detectors(path, cfg.io):
        if isinstance(det, QualityError):
            rows.append({"exposure": io.exposure_id(path),
                         "detector": det.metadata.get("detector", "?"),
                         "status": "failed", "error": det.reason})
            continue
        try:
            row = measure_detector(det, cfg)
        except QualityError as e:
            row = {"exposure": det.exposure, "detector": det.detector, "status": "failed",
                   "error": e.reason}
        rows.append({k: v for k, v in row.items() if not isinstance(v, list)})
    return rows


def measure_night(raw_root: str, night: str, workers: int = 1,
                  overrides: dict | None = None) -> pd.DataFrame:
    """One row per detector of every frame of the night (the stages' exposure rows)."""
    from survey_qa.pipeline import io

    paths = [str(p) for p in io.discover_night(raw_root, night)]
    jobs = [(p, overrides or {}) for p in paths]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_measure_file, jobs))
    else:
        parts = [_measure_file(j) for j in jobs]
    return pd.DataFrame([r for part in parts for r in part])


def ensure_night(raw_root: str, night: str, n_frames: int, seed: int, size_px: int) -> None:
    """Simulate the night unless its truth table is already there."""
    truth = paths.truth_table(raw_root, night)
    if truth.exists():
        return
    from survey_qa.flows.simulate import simulate_night

    t0 = time.perf_counter()
    simulate_night(raw_root, night, n_frames, seed=seed, size_px=size_px)
    print(f"simulated {n_frames} frames ({size_px} px) in {time.perf_counter() - t0:.0f} s")


def robust(values: np.ndarray) -> tuple[float, float]:
    """Median and 1.4826 x median absolute deviation (NaN for no value)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan
    med = float(np.median(v))
    return med, float(1.4826 * np.median(np.abs(v - med)))


def table(rows: list[list], header: list[str]) -> str:
    """A plain fixed-width text table."""
    cells = [[str(h) for h in header]] + [[c if isinstance(c, str) else
                                           (f"{c:.4f}" if isinstance(c, float) else str(c))
                                           for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fwhm_table(df: pd.DataFrame) -> str:
    """Relative FWHM bias and scatter in bins of true FWHM."""
    rows = []
    rel = df["fwhm_px"] / df["fwhm_px_true"] - 1.0
    for lo, hi in zip(FWHM_BINS[:-1], FWHM_BINS[1:]):
        sel = (df["fwhm_px_true"] >= lo) & (df["fwhm_px_true"] < hi)
        if not sel.any():
            continue
        med, sig = robust(rel[sel])
        n_nan = int((sel & ~np.isfinite(df["fwhm_px"])).sum())
        rows.append([f"{lo:g}-{hi:g}", int(sel.sum()), n_nan, med, sig])
    sel = (df["fwhm_px_true"] >= 2) & (df["fwhm_px_true"] <= 10)
    med, sig = robust(rel[sel])
    rows.append(["2-10 all", int(sel.sum()), int((sel & ~np.isfinite(df["fwhm_px"])).sum()),
                 med, sig])
    return table(rows, ["true FWHM px", "n", "n NaN", "median bias", "scatter"])


def grouped_error(df: pd.DataFrame, measured: str, true: str, by: str, relative: bool) -> str:
    """Error of one quantity, grouped by a truth column."""
    err = df[measured] / df[true] - 1.0 if relative else df[measured] - df[true]
    rows = []
    for key, idx in df.groupby(by).groups.items():
        med, sig = robust(err[idx])
        rows.append([str(key), len(idx), int((~np.isfinite(df.loc[idx, measured])).sum()),
                     med, sig])
    med, sig = robust(err)
    rows.append(["all", len(df), int((~np.isfinite(df[measured])).sum()), med, sig])
    return table(rows, [by, "n", "n NaN", "median " + ("rel. " if relative else "") + "error",
                        "scatter"])


def confusion(true: pd.Series, pred: pd.Series) -> tuple[str, float]:
    """5 x 5 confusion matrix (rows: truth) and accuracy."""
    order = list(PRIORITY[::-1])
    m = pd.crosstab(pd.Categorical(true, order), pd.Categorical(pred, order), dropna=False)
    rows = [[c] + [int(m.loc[c, p]) for p in order] for c in order]
    acc = float((true.to_numpy() == pred.to_numpy()).mean()) if len(true) else math.nan
    short = {"good": "good", "bad_seeing": "seeing", "background_issues": "backgr",
             "bad_tracking": "track", "very_bad_tracking": "v.bad"}
    return table(rows, ["truth \\ rules"] + [short[c] for c in order]), acc


def exposure_level(df: pd.DataFrame) -> pd.DataFrame:
    """One row per exposure: truth exposure class and the quarter rule over detectors."""
    from survey_qa.pipeline.classify import mosaic_class

    out = []
    for exp, g in df.groupby("exposure"):
        ok = g[g["status"] == "ok"]
        if ok.empty:
            continue
        out.append({"exposure": exp, "truth": g["exposure_class"].iloc[0],
                    "ambiguous": bool(g["ambiguous"].any()),
                    "rules": mosaic_class(ok["quality_class"].tolist())})
    return pd.DataFrame(out)


def report(df: pd.DataFrame) -> str:
    """All the tables."""
    ok = df[df["status"] == "ok"].copy()
    parts = [f"detectors: {len(df)} ({len(ok)} measured, {len(df) - len(ok)} failed)"]
    parts += ["", "Seeing FWHM (fwhm_px / fwhm_px_true - 1), all measured detectors",
              fwhm_table(ok)]
    still = ok[ok["trail_ratio_true"] < 0.5]
    parts += ["", "Seeing FWHM, detectors with true trail ratio < 0.5", fwhm_table(still)]
    parts += ["", "Seeing FWHM by trail kind (true FWHM 2-10 px)",
              grouped_error(ok[(ok.fwhm_px_true >= 2) & (ok.fwhm_px_true <= 10)], "fwhm_px",
                            "fwhm_px_true", "trail_kind", relative=True)]
    parts += ["", "Seeing FWHM by PSF profile (true FWHM 2-10 px, trail ratio < 0.5)",
              grouped_error(still[(still.fwhm_px_true >= 2) & (still.fwhm_px_true <= 10)],
                            "fwhm_px", "fwhm_px_true", "psf_profile", relative=True)]
    ok["e_bin"] = pd.cut(ok["ellipticity_true"], [-0.01, 0.05, 0.15, 0.3, 0.5, 1.0])
    parts += ["", "Ellipticity (measured - ellipticity_true)",
              grouped_error(ok, "ellipticity", "ellipticity_true", "e_bin", relative=False)]
    trailed = ok[ok["trail_ratio_true"] > 0]
    trailed = trailed.assign(r_bin=pd.cut(trailed["trail_ratio_true"],
                                          [0, 0.5, 1.0, 2.0, 3.0, 6.0, 20.0]))
    parts += ["", "Trail ratio (measured / true - 1), trailed detectors, by true ratio",
              grouped_error(trailed, "trail_ratio", "trail_ratio_true", "r_bin",
                            relative=True)]
    parts += ["", "Trail ratio by trail kind (true ratio >= 0.5)",
              grouped_error(trailed[trailed.trail_ratio_true >= 0.5], "trail_ratio",
                            "trail_ratio_true", "trail_kind", relative=True)]
    ok["u_bin"] = pd.cut(ok["u_true"], [-0.01, 0.03, 0.1, 0.3, 10.0])
    parts += ["", "Sky non-uniformity (measured - u_true)",
              grouped_error(ok, "sky_nonuniformity", "u_true", "u_bin", relative=False)]
    clean = ok[~ok["ambiguous"].astype(bool)]
    text, acc = confusion(clean["quality_class_true"], clean["quality_class"])
    parts += ["", f"Rule classifier, non-ambiguous detectors: accuracy {acc:.3f} "
                  f"(n={len(clean)})", text]
    exp = exposure_level(df)
    exp = exp[~exp["ambiguous"]]
    text, acc = confusion(exp["truth"], exp["rules"])
    parts += ["", f"Rule classifier, non-ambiguous exposures: accuracy {acc:.3f} "
                  f"(n={len(exp)})", text]
    parts += ["", "Time per detector (s): " + ", ".join(
        f"{c[2:-2]} {np.nanmedian(ok[c]):.2f}" for c in
        ("t_background_s", "t_sources_s", "t_psf_s", "t_stamps_s", "t_total_s") if c in ok)]
    return "\n".join(parts)


def join_truth(rows: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """Measured rows with the truth columns (suffix ``_true`` where names clash)."""
    t = truth.rename(columns={"quality_class": "quality_class_true",
                              "trail_ratio": "trail_ratio_true",
                              "flag_tracking": "flag_tracking_true",
                              "flag_bad_seeing": "flag_bad_seeing_true",
                              "flag_background": "flag_background_true",
                              "moffat_beta": "moffat_beta_true",
                              "pixscale_arcsec": "pixscale_arcsec_true"})
    keep = [c for c in t.columns if c not in rows.columns or c in ("exposure", "detector")]
    return rows.merge(t[keep], on=["exposure", "detector"], how="left")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--raw-root", default="/tmp/survey-qa-accuracy")
    ap.add_argument("--night", default="2024-06-01")
    ap.add_argument("--n-frames", type=int, default=100)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--size-px", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--csv", help="also write the joined rows here")
    a = ap.parse_args(argv)
    ensure_night(a.raw_root, a.night, a.n_frames, a.seed, a.size_px)
    from survey_qa.flows.simulate import load_truth

    truth, _ = load_truth(a.raw_root, a.night)
    t0 = time.perf_counter()
    rows = measure_night(a.raw_root, a.night, a.workers)
    print(f"measured {rows['exposure'].nunique()} exposures in {time.perf_counter() - t0:.0f} s")
    df = join_truth(rows, truth)
    if a.csv:
        df.to_csv(a.csv, index=False)
    print(report(df))
    return 0


if __name__ == "__main__":
    sys.exit(main())
