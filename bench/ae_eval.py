"""Evaluate the autoencoder scorer on simulated frames never used in training.

    python bench/ae_eval.py [--weights W] [--size 2048] [--iou-frames 40] [--quick]

Frames are rendered in memory with the simulator's pure functions, from seeds 4001 and
up (``models/train_shipped.sh`` trains on seeds 3001-3099). Printed, and plotted into
``bench/out/``:

1. ``ae_score`` against the seeing (0.5-2.0"; everything else of the frame fixed, no
   confounders): is it monotonic?
2. ``ae_score`` and the masked share against the strength of a background defect
   (u for gradient, scattered light and glow; k in mag for cloud), each sweep on one
   fixed frame: monotonic?
3. Mask IoU against the simulator's truth masks (``L / sky > 5 %`` or patchy extinction
   ``> 0.1 mag``) on background-issue frames drawn as the simulator draws them.
4. Aperture photometry (sep, on the pipeline's background) of the true stars inside and
   outside the mask, against their true fluxes before patchy extinction.
5. The scoring time of one 4096 x 4096 frame on one CPU core.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
NIGHT = "2023-07-15"
SEED = 4001  # evaluation seeds: 4001 and up
SEEING = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
STRENGTH = {"gradient": (0.0, 0.03, 0.06, 0.1, 0.2, 0.4, 0.8),
            "scattered": (0.0, 0.03, 0.06, 0.1, 0.2, 0.4, 0.8),
            "glow": (0.0, 0.03, 0.06, 0.1, 0.2, 0.4, 0.8),
            "cloud": (0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5)}


# ---------------------------------------------------------------------------- frames


def draw(index: int, quality_class: str, size: int, seed: int = SEED, **forced):
    """The spec and the detector generators of one evaluation exposure."""
    from survey_qa import simulate as sim

    spec_rng, det_rngs = sim.exposure_seeds(NIGHT, seed, index, 1)
    spec = sim.draw_spec(spec_rng, quality_class, exposure=f"eval{index:04d}", size_px=size,
                         date_obs=f"{NIGHT}T23:00:00.000", **forced)
    return spec, det_rngs[0]


def render(spec, rng):
    from survey_qa import simulate as sim

    return sim.render_detector(spec, 0, rng)


def with_strength(spec, strength: float):
    """The same exposure with another background-defect strength (u, or k for cloud)."""
    if spec.background_kind == "cloud":
        return dataclasses.replace(spec, background_strength=strength,
                                   cloud_extinction_mag=strength)
    return dataclasses.replace(spec, background_strength=strength)


# ---------------------------------------------------------------------------- measures


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    union = np.count_nonzero(pred | truth)
    return float(np.count_nonzero(pred & truth) / union) if union else 1.0


def monotonic(values) -> bool:
    v = np.asarray(values, dtype=float)
    return bool(np.all(np.diff(v) >= 0))


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def photometry(det, spec, mask_full: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relative flux errors of bright unsaturated true stars, and whether each is masked.

    Fluxes are sep circular apertures (radius 2 FWHM) on the frame minus the pipeline's
    background; the truth is the flux before patchy extinction (a uniform transparency
    is a zero point, not an error).
    """
    import sep

    from survey_qa.config import BackgroundConfig
    from survey_qa.pipeline.background import measure_background

    data = np.ascontiguousarray(det.image, dtype=np.float32)
    bkg = measure_background(data, np.zeros(data.shape, bool), BackgroundConfig())
    stars = det.stars
    r = max(2.0 * spec.fwhm_px, 3.0)
    ny, nx = data.shape
    ok = (~stars["saturated"].to_numpy()) & (stars["x"] > r) & (stars["x"] < nx - 1 - r) \
        & (stars["y"] > r) & (stars["y"] < ny - 1 - r)
    noise = float(bkg.noise)
    snr = stars["flux_adu"].to_numpy() / (noise * math.sqrt(math.pi) * r)
    ok &= snr > 30
    s = stars[ok]
    if s.empty:
        return np.empty(0), np.empty(0, bool)
    flux, _, _ = sep.sum_circle(data - bkg.back, s["x"].to_numpy(), s["y"].to_numpy(), r)
    patchy = s["extinction_mag"].to_numpy() - spec.transparency_mag
    true = s["flux_adu"].to_numpy() * 10 ** (0.4 * patchy)
    inside = mask_full[np.round(s["y"]).astype(int), np.round(s["x"]).astype(int)]
    return flux / true - 1.0, inside


# ---------------------------------------------------------------------------- sections


def seeing_sweep(scorer, cfg, size: int, n_fields: int) -> dict:
    from survey_qa.pipeline.aescore import score_detector

    scores = np.zeros((n_fields, len(SEEING)))
    for f in range(n_fields):
        for j, s in enumerate(SEEING):
            spec, rng = draw(100 + f, "good", size, seeing_arcsec=s, pixscale_arcsec=0.25,
                             confounders=(), trail_kind="none", trail_ratio=0.0)
            det = render(spec, rng)
            scores[f, j] = score_detector(det.image, None, scorer, cfg).ae_score
    med = np.median(scores, axis=0)
    return {"seeing_arcsec": list(SEEING), "ae_score": scores.tolist(),
            "median": med.tolist(), "monotonic_median": monotonic(med),
            "monotonic_fields": int(sum(monotonic(r) for r in scores)),
            "spearman": spearman(np.tile(SEEING, n_fields), scores.ravel())}


def strength_sweep(scorer, cfg, size: int, n_fields: int) -> dict:
    from survey_qa.pipeline.aescore import score_detector

    out = {}
    for kind, strengths in STRENGTH.items():
        scores = np.zeros((n_fields, len(strengths)))
        fractions = np.zeros_like(scores)
        for f in range(n_fields):
            base, rng0 = draw(200 + 10 * f + len(out), "background_issues", size,
                              background_kind=kind, confounders=())
            state = rng0.bit_generator.state
            for j, s in enumerate(strengths):
                rng0.bit_generator.state = state  # the same stars and noise each time
                det = render(with_strength(base, s), rng0)
                res = score_detector(det.image, None, scorer, cfg)
                scores[f, j], fractions[f, j] = res.ae_score, res.mask_fraction
        med = np.median(scores, axis=0)
        out[kind] = {"strength": list(strengths), "ae_score": scores.tolist(),
                     "mask_fraction": fractions.tolist(), "median": med.tolist(),
                     "monotonic_median": monotonic(med),
                     "monotonic_fields": int(sum(monotonic(r) for r in scores)),
                     "spearman": spearman(np.tile(strengths, n_fields), scores.ravel())}
    return out


def mask_quality(scorer, cfg, size: int, n_frames: int) -> dict:
    from survey_qa.pipeline.aescore import score_detector, upsample_mask

    rows, errors_in, errors_out = [], [], []
    for i in range(n_frames):
        spec, rng = draw(1000 + i, "background_issues", size)
        det = render(spec, rng)
        res = score_detector(det.image, None, scorer, cfg)
        full = upsample_mask(res.mask, res.block_px, det.image.shape)
        truth = det.defect_mask
        err, inside = photometry(det, spec, full)
        errors_in.append(err[inside])
        errors_out.append(err[~inside])
        rows.append({"kind": spec.background_kind, "strength": spec.background_strength,
                     "sky_e": spec.sky_e, "truth_fraction": float(truth.mean()),
                     "mask_fraction": res.mask_fraction, "iou": iou(full, truth),
                     "inter": int(np.count_nonzero(full & truth)),
                     "union": int(np.count_nonzero(full | truth))})
    ious = np.array([r["iou"] for r in rows])
    pooled = sum(r["inter"] for r in rows) / max(sum(r["union"] for r in rows), 1)
    by_kind = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r["iou"])
    e_in, e_out = np.concatenate(errors_in), np.concatenate(errors_out)

    def robust(e):
        return {"n": int(e.size), "median": float(np.median(e)) if e.size else math.nan,
                "mad_sigma": float(1.4826 * np.median(np.abs(e - np.median(e))))
                if e.size else math.nan,
                "median_abs": float(np.median(np.abs(e))) if e.size else math.nan}

    return {"size_px": size, "frames": rows, "mean_iou": float(ious.mean()),
            "median_iou": float(np.median(ious)),
            "pooled_iou": float(pooled), "share_iou_ge_0.7": float(np.mean(ious >= 0.7)),
            "iou_by_kind": {k: float(np.mean(v)) for k, v in by_kind.items()},
            "photometry_inside": robust(e_in), "photometry_outside": robust(e_out),
            "_errors": (e_in, e_out)}


def timing(scorer, cfg, repeats: int = 3) -> dict:
    """Seconds to score one 4096 x 4096 frame on one core, and the stages' shares."""
    import torch

    from survey_qa.pipeline import aescore

    torch.set_num_threads(1)
    spec, rng = draw(5000, "good", 4096)
    data = render(spec, rng).image
    total, stages = [], {"bin": [], "normalise": [], "network": [], "mask": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        aescore.score_detector(data, None, scorer, cfg)
        total.append(time.perf_counter() - t0)
        t = time.perf_counter()
        b, m = aescore.bin_frame(data, None, scorer.bin_factor)
        stages["bin"].append(time.perf_counter() - t)
        t = time.perf_counter()
        img, _, _ = aescore.normalize_frame(b, m, scorer.params)
        stages["normalise"].append(time.perf_counter() - t)
        t = time.perf_counter()
        smap = aescore.score_map(scorer.model, img, scorer.patch_px, params=scorer.params)
        stages["network"].append(time.perf_counter() - t)
        t = time.perf_counter()
        aescore.make_mask(smap, scorer.threshold, cfg.close_px)
        stages["mask"].append(time.perf_counter() - t)
    return {"seconds_per_4096_frame": float(np.median(total)),
            "stages_s": {k: float(np.median(v)) for k, v in stages.items()},
            "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------- plots


def plots(res: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    OUT.mkdir(parents=True, exist_ok=True)
    paths = []
    if "seeing" in res:
        paths.append(_plot_seeing(res["seeing"]))
    if "strength" in res:
        paths.append(_plot_strength(res["strength"]))
    if "masks" in res:
        paths += _plot_masks(res["masks"])
    return paths


def _plot_seeing(s: dict) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for row in s["ae_score"]:
        ax.plot(s["seeing_arcsec"], row, color="0.7", lw=1)
    ax.plot(s["seeing_arcsec"], s["median"], "o-", color="C0", label="median")
    ax.set(xlabel="seeing FWHM (arcsec)", ylabel="ae_score", title="AE score vs seeing")
    ax.legend()
    return _save(fig, "ae_score_vs_seeing.png")


def _plot_strength(strength: dict) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for k, (kind, d) in enumerate(strength.items()):
        x = np.array(d["strength"])
        axes[0].plot(x, d["median"], "o-", color=f"C{k}", label=kind)
        axes[1].plot(x, np.median(d["mask_fraction"], axis=0), "o-", color=f"C{k}",
                     label=kind)
    axes[0].set(xlabel="defect strength (u; k in mag for cloud)", ylabel="ae_score",
                yscale="log", title="AE score vs background defect")
    axes[1].set(xlabel="defect strength (u; k in mag for cloud)", ylabel="masked share",
                title="mask vs background defect")
    axes[0].legend()
    return _save(fig, "ae_score_vs_background.png")


def _plot_masks(m: dict) -> list[Path]:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    kinds = sorted({r["kind"] for r in m["frames"]})
    for k, kind in enumerate(kinds):
        v = [r["iou"] for r in m["frames"] if r["kind"] == kind]
        ax.scatter(np.full(len(v), k) + np.linspace(-0.2, 0.2, len(v)), v, s=14)
    ax.axhline(0.7, color="k", ls=":", lw=1)
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set(ylabel="mask IoU", ylim=(0, 1),
           title=f"mask IoU (mean {m['mean_iou']:.2f}, pooled {m['pooled_iou']:.2f})")
    paths = [_save(fig, f"ae_mask_iou_{m['size_px']}px.png")]

    e_in, e_out = m["_errors"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bins = np.linspace(-0.5, 0.5, 61)
    ax.hist(np.clip(e_out, -0.5, 0.5), bins, density=True, histtype="step",
            label=f"outside mask ({e_out.size})")
    ax.hist(np.clip(e_in, -0.5, 0.5), bins, density=True, histtype="step",
            label=f"inside mask ({e_in.size})")
    ax.set(xlabel="relative flux error", ylabel="density",
           title="aperture photometry of true stars")
    ax.legend()
    paths.append(_save(fig, f"ae_photometry_inside_outside_{m['size_px']}px.png"))
    return paths


def _save(fig, name: str) -> Path:
    path = OUT / name
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", help="weights file (default: the packaged ones)")
    p.add_argument("--size", type=int, default=2048, help="detector side of the sweeps")
    p.add_argument("--iou-frames", type=int, default=40)
    p.add_argument("--fields", type=int, default=3, help="fields per sweep")
    p.add_argument("--iou-size", type=int, help="detector side of the IoU frames "
                                                 "(default: --size)")
    p.add_argument("--sections", default="timing,seeing,strength,masks",
                   help="comma-separated subset of timing, seeing, strength, masks")
    p.add_argument("--quick", action="store_true", help="a few frames of each, to try it")
    a = p.parse_args(argv)
    sections = set(a.sections.split(","))
    if a.quick:
        a.size, a.iou_frames, a.fields = 1024, 6, 1

    import torch

    from survey_qa.config import AutoencoderConfig
    from survey_qa.models.weights import load_scorer

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="erfa")
    scorer = load_scorer(a.weights)
    if scorer is None:
        print("no autoencoder weights: run models/train_shipped.sh first", file=sys.stderr)
        return 1
    cfg = AutoencoderConfig(threshold_quantile=scorer.quantile)
    t0 = time.perf_counter()
    res = {"weights": scorer.version, "threshold": scorer.threshold,
           "quantile": scorer.quantile}
    if "timing" in sections:
        res["timing"] = timing(scorer, cfg)
    if "seeing" in sections:
        res["seeing"] = seeing_sweep(scorer, cfg, a.size, a.fields)
    if "strength" in sections:
        res["strength"] = strength_sweep(scorer, cfg, a.size, a.fields)
    if "masks" in sections:
        res["masks"] = mask_quality(scorer, cfg, a.iou_size or a.size, a.iou_frames)
    paths = plots(res)
    print(f"weights {res['weights']}: threshold {scorer.threshold:.3f} "
          f"(reference quantile {scorer.quantile})")
    report(res, a)
    print("plots: " + ", ".join(str(p) for p in paths))
    print(f"done in {time.perf_counter() - t0:.0f} s")
    if "masks" in res:
        res["masks"].pop("_errors")
    name = "ae_eval.json" if sections == {"timing", "seeing", "strength", "masks"} else \
        "ae_eval_" + "_".join(sorted(sections)) + ".json"
    (OUT / name).write_text(json.dumps(res, indent=1, default=float))
    return 0


def report(res: dict, a: argparse.Namespace) -> None:
    """Print the numbers of the sections that ran."""
    if "timing" in res:
        t = res["timing"]
        print(f"scoring time, 4096x4096 frame, 1 CPU thread: "
              f"{t['seconds_per_4096_frame']:.2f} s "
              f"({', '.join(f'{k} {v:.2f}' for k, v in t['stages_s'].items())})")
    if "seeing" in res:
        s = res["seeing"]
        print(f"ae_score vs seeing {s['seeing_arcsec']}: median "
              f"{[round(v, 2) for v in s['median']]}; monotonic (median) "
              f"{s['monotonic_median']}, fields monotonic {s['monotonic_fields']}/{a.fields}, "
              f"Spearman {s['spearman']:.2f}")
    for kind, d in res.get("strength", {}).items():
        print(f"ae_score vs {kind} strength {d['strength']}: median "
              f"{[round(v, 2) for v in d['median']]}; monotonic (median) "
              f"{d['monotonic_median']}, fields {d['monotonic_fields']}/{a.fields}, "
              f"Spearman {d['spearman']:.2f}; masked share "
              f"{[round(float(v), 2) for v in np.median(d['mask_fraction'], axis=0)]}")
    if "masks" not in res:
        return
    m = res["masks"]
    print(f"mask IoU on {len(m['frames'])} background-issue frames "
          f"({a.iou_size or a.size}px): mean "
          f"{m['mean_iou']:.3f}, median {m['median_iou']:.3f}, pooled {m['pooled_iou']:.3f}, "
          f"share >= 0.7: {m['share_iou_ge_0.7']:.2f}; by kind "
          + ", ".join(f"{k} {v:.2f}" for k, v in sorted(m["iou_by_kind"].items())))
    pi, po = m["photometry_inside"], m["photometry_outside"]
    print(f"photometry (flux / true - 1), inside mask: n {pi['n']}, median {pi['median']:+.3f},"
          f" scatter {pi['mad_sigma']:.3f}; outside: n {po['n']}, median {po['median']:+.3f}, "
          f"scatter {po['mad_sigma']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
