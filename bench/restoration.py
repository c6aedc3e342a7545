"""The restoration network against the stacks, on held-out simulated nights.

For every window of K frames of the held-out sequence seeds (never used in training,
:data:`survey_qa.models.restoration.HELD_OUT_SEEDS`), compares with the noiseless truth
(the scene in the reference's pixels with the reference's PSF):

- the reference frame alone (sky subtracted),
- the equal-weight stack (every frame weight 1, 3-sigma clipping),
- the quality-weighted stack (``t^2 / (sigma^2 FWHM^2)``, 3-sigma clipping: ``survey-qa stack``),
- the network (:func:`survey_qa.models.restoration.restore_window`).

Measured over the pixels every frame covers (``Window.valid``):

- **PSNR** (dB) of the image in ADU, the peak being the truth's range in the window;
- **SSIM** of the images in the network's scale ``asinh(adu / noise_ref)`` (in ADU the
  bright cores would make every image look alike), data range the truth's;
- **flux error**: aperture sums (sep, radius = the reference FWHM, at least 2 px) at the
  true star positions against the same aperture on the truth, for the stars the
  reference frame alone measures at S/N >= 5: median absolute and median signed relative
  error (%). A stack's PSF is broader than the reference's, which this aperture counts
  as lost flux; the same error in an aperture of 3 FWHM shows the total flux;
- **false sources**: sep detections (threshold ``DETECT_SIGMA`` times the reference
  frame's noise per pixel, 5 px at least, the same on every image) with no true star or
  galaxy within 2 px, per window, and the share of the S/N >= 5 and of the S/N 3-5 stars
  (in the reference frame) that are detected.

Usage (cwd /tmp)::

    python /work/main/bench/restoration.py [--weights W] [--seeds 7001-7006]

Prints a Markdown table, writes it to ``bench/results/restoration.md`` and one picture
(truth, weighted stack, network; one stretch) to ``bench/results/restoration.png``.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import sep
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from survey_qa.models import restoration as R
from survey_qa.models.weights import load_restoration
from survey_qa.simulate.sequence import plan_sequence

RESULTS = Path(__file__).resolve().parent / "results"
DETECT_SIGMA = 1.5
"""Detection threshold for the false-source count, in the reference frame's noise."""
MATCH_PX = 2.0
MIN_SNR = 5.0
"""Stars whose aperture S/N in the reference frame alone reaches this enter the flux error."""
FAINT_SNR = 3.0
"""Stars of S/N from this up to ``MIN_SNR`` make the faint completeness."""
WIDE_APERTURE = 3.0
"""The wide aperture, in reference FWHM: nearly the whole flux, whatever the PSF."""
METHODS = ("reference frame", "equal-weight stack", "quality-weighted stack", "network")


def truth_sources(seed: int, w: R.Window) -> tuple[pd.DataFrame, np.ndarray]:
    """True stars (``x``, ``y``) and galaxy positions ``(n, 2)`` in the window's reference."""
    seq = plan_sequence(R.night_of(seed), R.FRAMES_PER_SEQUENCE, seed=seed, size_px=R.SIZE_PX)
    ref = int(w.exposures[w.reference].split("_")[-1]) - 1
    ny, nx = w.truth.shape
    p = seq.frames[ref].pointing
    st = seq.scene.stars
    x, y = p.apply(st["x_ref"].to_numpy(), st["y_ref"].to_numpy(), nx, ny)
    gx, gy = p.apply(seq.scene.galaxies["x_ref"].to_numpy(),
                     seq.scene.galaxies["y_ref"].to_numpy(), nx, ny)
    fwhm = float(seq.frames[ref].seeing_arcsec / seq.base.pixscale_arcsec)
    stars = pd.DataFrame({"x": x, "y": y})
    stars.attrs["fwhm_px"] = fwhm
    return stars, np.column_stack([gx, gy])


def aperture(image: np.ndarray, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Aperture sums (ADU) at the positions (NaN pixels count as 0)."""
    img = np.ascontiguousarray(np.nan_to_num(image), dtype=np.float64)
    flux, _, _ = sep.sum_circle(img, x, y, r)
    return np.asarray(flux)


def measure(images: dict[str, np.ndarray], w: R.Window, stars: pd.DataFrame,
            galaxies: np.ndarray) -> list[dict]:
    """One row per method for one window."""
    valid = w.valid
    truth = w.truth
    rng = float(truth[valid].max() - truth[valid].min())
    t_s = R.to_network(truth, w.noise_ref)
    s_rng = float(t_s[valid].max() - t_s[valid].min())
    r = max(2.0, stars.attrs["fwhm_px"])
    inner = ndimage.binary_erosion(valid, iterations=int(math.ceil(r)) + 1)
    ny, nx = truth.shape
    ix, iy = np.round(stars["x"]).astype(int), np.round(stars["y"]).astype(int)
    inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    sx, sy = stars["x"].to_numpy()[inside], stars["y"].to_numpy()[inside]
    keep = inner[iy[inside], ix[inside]]
    sx, sy = sx[keep], sy[keep]
    f_true = aperture(truth, sx, sy, r)
    snr = f_true / (w.noise_ref * math.sqrt(math.pi) * r)
    faint = (snr >= FAINT_SNR) & (snr < MIN_SNR)
    fx, fy = sx[faint], sy[faint]
    bright = snr >= MIN_SNR
    sx, sy, f_true = sx[bright], sy[bright], f_true[bright]
    f_wide = aperture(truth, sx, sy, WIDE_APERTURE * r)
    all_true = np.vstack([np.column_stack([stars["x"], stars["y"]]), galaxies])
    tree = cKDTree(all_true)
    rows = []
    for name, img in images.items():
        a = np.where(valid, img, 0.0)
        rel = (aperture(img, sx, sy, r) - f_true) / f_true
        rel_wide = (aperture(img, sx, sy, WIDE_APERTURE * r) - f_wide) / f_wide
        objs = sep.extract(np.ascontiguousarray(a, dtype=np.float32), DETECT_SIGMA,
                           err=float(w.noise_ref), mask=~valid, minarea=5)
        det = np.column_stack([objs["x"], objs["y"]])
        false = int((tree.query(det)[0] > MATCH_PX).sum()) if len(det) else 0
        found = (cKDTree(det).query(np.column_stack([sx, sy]))[0] <= MATCH_PX
                 if len(det) and len(sx) else np.zeros(len(sx), bool))
        found_faint = (cKDTree(det).query(np.column_stack([fx, fy]))[0] <= MATCH_PX
                       if len(det) and len(fx) else np.zeros(len(fx), bool))
        rows.append({
            "method": name, "seed": w.seed, "window": w.exposures[0],
            "psnr_db": peak_signal_noise_ratio(truth[valid], img[valid], data_range=rng),
            "ssim": structural_similarity(np.where(valid, t_s, 0.0),
                                          np.where(valid, R.to_network(img, w.noise_ref),
                                                   0.0), data_range=s_rng),
            "flux_abs_err": float(np.median(np.abs(rel))) if len(rel) else math.nan,
            "flux_bias": float(np.median(rel)) if len(rel) else math.nan,
            "flux_abs_err_wide": float(np.median(np.abs(rel_wide))) if len(rel) else math.nan,
            "n_stars": int(len(rel)), "false_sources": false,
            "stars_found": int(found.sum()), "n_faint": int(len(fx)),
            "faint_found": int(found_faint.sum())})
    return rows


def summary(table: pd.DataFrame) -> str:
    """The Markdown table of the per-method means over windows."""
    lines = ["| method | PSNR (dB) | SSIM (asinh) | abs. flux error, r = FWHM | flux bias, "
             "r = FWHM | abs. flux error, r = 3 FWHM | false sources / window "
             "| S/N>=5 stars found | S/N 3-5 stars found |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in METHODS:
        t = table[table["method"] == name]
        lines.append(
            f"| {name} | {t['psnr_db'].mean():.2f} | {t['ssim'].mean():.3f} | "
            f"{100 * t['flux_abs_err'].mean():.1f} % | {100 * t['flux_bias'].mean():+.1f} % | "
            f"{100 * t['flux_abs_err_wide'].mean():.1f} % | {t['false_sources'].mean():.1f} | "
            f"{100 * t['stars_found'].sum() / max(t['n_stars'].sum(), 1):.0f} % | "
            f"{100 * t['faint_found'].sum() / max(t['n_faint'].sum(), 1):.0f} % |")
    return "\n".join(lines)


def picture(path: Path, w: R.Window, images: dict[str, np.ndarray]) -> None:
    """Truth, quality-weighted stack and network side by side, one asinh stretch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = np.nonzero(w.valid)
    y0, x0 = int(rows.min()), int(cols.min())
    side = int(min(160, rows.max() - y0, cols.max() - x0))
    cut = np.s_[y0:y0 + side, x0:x0 + side]
    panels = {"truth": w.truth, "quality-weighted stack": images["quality-weighted stack"],
              "network": images["network"]}
    stretched = {k: R.to_network(v[cut], w.noise_ref) for k, v in panels.items()}
    lo, hi = -1.0, float(np.percentile(stretched["truth"], 99.8))
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, (k, v) in zip(axes, stretched.items()):
        ax.imshow(v, origin="lower", cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(k)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"held-out night seed {w.seed}, frames {w.exposures[0]}..{w.exposures[-1]}"
                 f" (asinh of ADU / reference noise)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=None, help="restoration weights (default: packaged)")
    p.add_argument("--seeds", default=f"{R.HELD_OUT_SEEDS[0]}-{R.HELD_OUT_SEEDS[-1]}")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    lo, hi = (int(s) for s in args.seeds.split("-"))
    net, meta = load_restoration(args.weights)
    trained = set(meta.get("train_seeds", [])) | set(meta.get("val_seeds", []))
    if trained & set(range(lo, hi + 1)):
        raise SystemExit(f"seeds {sorted(trained & set(range(lo, hi + 1)))} were used in "
                         "training")
    t0 = time.monotonic()
    rows, shown = [], None
    for seed in range(lo, hi + 1):
        for w in R.sequence_windows(seed):
            images = {"reference frame": w.frames[w.reference], "equal-weight stack": w.mean,
                      "quality-weighted stack": w.stack,
                      "network": R.restore_window(net, w)}
            stars, galaxies = truth_sources(seed, w)
            rows.extend(measure(images, w, stars, galaxies))
            if shown is None:
                shown = (w, images)
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = (f"{table['window'].nunique()} windows of {R.K_FRAMES} frames from "
            f"{hi - lo + 1} held-out nights (seeds {lo}-{hi}), {R.SIZE_PX} px frames; "
            f"weights {meta.get('weights_sha256', '')[:12]}\n\n{summary(table)}\n")
    print(text)
    (out / "restoration.md").write_text(text)
    table.to_csv(out / "restoration.csv", index=False)
    picture(out / "restoration.png", *shown)
    print(f"({time.monotonic() - t0:.0f} s; {out / 'restoration.png'})")


if __name__ == "__main__":
    main()
