"""The quality-weighted stack of the good frames against an unweighted stack of all frames.

    python bench/stack.py --raw-root R --out-root O --night N [--results bench/results]

On a simulated sequence night already processed by ``survey-qa --night N``, stacks
(``survey-qa stack``, :func:`survey_qa.flows.stack.stack_field`):

- ``good, quality``: the frames classed ``good``, quality weights, 3-sigma clipping;
- ``all, equal``: every measured frame, equal weights, the same clipping;
- ``good, equal`` and ``all, quality``: the two factors apart;
- ``good, quality, cubic``: the first, resampled with a bicubic spline;
- ``all, quality, damaged sky left out`` and ``all, equal, damaged sky left out``: every
  measured frame without the pixels of its ``defect_mask`` (the stack's default); the rows
  above keep every pixel (``--keep-damaged-sky``), so that each of these differs from its
  ``all`` row by the masks alone;
- ``reference``: the reference frame alone (the ``good, quality`` stack's reference);

and measures on each, at the true positions of the reference frame's stars (the truth's
``stars.parquet``), with the same stars in every row:

- ``noise_ap``: the sky noise of an aperture of radius ``FWHM`` (px, the stack's own
  FWHM), from the 3-sigma-clipped spread of the sums in 3000 random apertures (this
  includes the correlation that resampling adds);
- ``snr_faint``: the median S/N (aperture flux / ``noise_ap``) of the faint stars (clear-sky
  flux between the 10th and 50th percentile of the isolated stars);
- ``depth_5sig``: the flux (ADU of the reference frame) at S/N 5 in that aperture;
- ``fwhm_px``: the median FWHM of circular Moffat fits to the bright isolated stars;
- ``phot_bias`` / ``phot_rms_bright`` / ``phot_rms_faint``: the median and robust scatter
  (1.4826 MAD) of ``-2.5 log10(flux / true flux)`` (mag) in an aperture of radius
  ``2.5 FWHM`` after the bright stars' median aperture correction, against the reference
  frame's true fluxes (bias: before the correction, i.e. the aperture loss plus any scale
  error).

It also checks the registration of every frame of ``all, quality`` against the truth:
the reference's true star positions carried into the frame by the recorded drift and
rotation, against the frame's true positions of the same stars.

Prints the table, writes ``stack_sequence.json`` and ``stack_sequence.png`` (the two main
stacks side by side) under ``--results``.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import sep
from astropy.io import fits
from scipy import optimize
from scipy.spatial import cKDTree

from survey_qa import paths
from survey_qa.config import load_config
from survey_qa.flows.stack import stack_field

RUNS = {  # name: (classes, weighting, interpolation, damaged sky left out)
    "good, quality": (["good"], "quality", "bilinear", False),
    "all, equal": ([], "equal", "bilinear", False),
    "good, equal": (["good"], "equal", "bilinear", False),
    "all, quality": ([], "quality", "bilinear", False),
    "good, quality, cubic": (["good"], "quality", "cubic", False),
    "all, quality, damaged sky left out": ([], "quality", "bilinear", True),
    "all, equal, damaged sky left out": ([], "equal", "bilinear", True),
}
MARGIN_PX = 40
ISOLATION_FWHM = 4.0
N_RANDOM = 3000


# ---------------------------------------------------------------------------- measuring


def moffat(params, yy, xx):
    amp, x0, y0, fwhm, beta, back = params
    alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
    return amp * (1 + ((xx - x0) ** 2 + (yy - y0) ** 2) / alpha ** 2) ** -beta + back


def fit_fwhm(image: np.ndarray, x: float, y: float, guess: float) -> float:
    """FWHM (px) of a circular Moffat fitted to the star at (x, y); NaN when it fails."""
    half = int(3 * guess) + 3
    ix, iy = int(round(x)), int(round(y))
    stamp = image[iy - half:iy + half + 1, ix - half:ix + half + 1].astype(float)
    if stamp.shape != (2 * half + 1,) * 2 or not np.isfinite(stamp).all():
        return math.nan
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    p0 = [stamp.max(), x - ix, y - iy, guess, 3.0, 0.0]
    try:
        fit = optimize.least_squares(lambda p: (moffat(p, yy, xx) - stamp).ravel(), p0,
                                     bounds=([0, -3, -3, 0.5, 1.0, -np.inf],
                                             [np.inf, 3, 3, 5 * guess, 20.0, np.inf]))
    except ValueError:
        return math.nan
    return float(fit.x[3]) if fit.success else math.nan


def aperture_noise(image: np.ndarray, r_px: float, rng: np.random.Generator) -> float:
    """Clipped standard deviation of the sums in random apertures of radius ``r_px``."""
    ny, nx = image.shape
    x = rng.uniform(MARGIN_PX, nx - MARGIN_PX, N_RANDOM)
    y = rng.uniform(MARGIN_PX, ny - MARGIN_PX, N_RANDOM)
    data = np.ascontiguousarray(np.nan_to_num(image), dtype=np.float32)
    sums, _, flags = sep.sum_circle(data, x, y, r_px)
    sums = sums[np.isfinite(image[y.astype(int), x.astype(int)])]
    for _ in range(5):
        med, sd = np.median(sums), 1.4826 * np.median(np.abs(sums - np.median(sums)))
        sums = sums[np.abs(sums - med) < 3 * sd]
    return float(np.std(sums))


def robust(values: np.ndarray) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    med = float(np.median(values))
    return med, float(1.4826 * np.median(np.abs(values - med)))


def usable_stars(stars: pd.DataFrame, shape: tuple[int, int], fwhm_px: float) -> pd.DataFrame:
    """Unsaturated stars far from the edges with no star brighter than a twentieth of
    theirs within ``ISOLATION_FWHM`` FWHM."""
    xy = stars[["x", "y"]].to_numpy()
    tree = cKDTree(xy)
    flux = stars["flux_clear_adu"].to_numpy()
    alone = np.ones(len(stars), bool)
    for i, near in enumerate(tree.query_ball_point(xy, ISOLATION_FWHM * fwhm_px)):
        alone[i] = all(j == i or flux[j] < 0.05 * flux[i] for j in near)
    inside = ((stars["x"] > MARGIN_PX) & (stars["x"] < shape[1] - MARGIN_PX)
              & (stars["y"] > MARGIN_PX) & (stars["y"] < shape[0] - MARGIN_PX))
    return stars[alone & inside.to_numpy() & ~stars["saturated"].to_numpy()]


def measure(image: np.ndarray, stars: pd.DataFrame, faint: set, bright: set,
            fwhm_guess: float, seed: int = 0) -> dict:
    """The table's numbers for one stack (module notes)."""
    rng = np.random.default_rng(seed)
    b = stars[stars["star_id"].isin(bright)]
    fwhms = [fit_fwhm(image, x, y, fwhm_guess) for x, y in zip(b["x"], b["y"])]
    fwhm = float(np.nanmedian(fwhms))
    data = np.ascontiguousarray(np.nan_to_num(image), dtype=np.float32)
    x, y = stars["x"].to_numpy(), stars["y"].to_numpy()
    noise = aperture_noise(image, fwhm, rng)
    small, _, _ = sep.sum_circle(data, x, y, fwhm)
    large, _, _ = sep.sum_circle(data, x, y, 2.5 * fwhm)
    true = stars["flux_adu"].to_numpy()
    is_faint = stars["star_id"].isin(faint).to_numpy()
    is_bright = stars["star_id"].isin(bright).to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        dmag = -2.5 * np.log10(large / true)
    bias, _ = robust(dmag[is_bright])
    _, rms_bright = robust(dmag[is_bright] - bias)
    _, rms_faint = robust(dmag[is_faint] - bias)
    # the aperture of radius FWHM holds this share of a star's flux (bright stars)
    share = float(np.median(small[is_bright] / large[is_bright]))
    return {"fwhm_px": fwhm, "noise_ap": noise,
            "snr_faint": float(np.median(small[is_faint] / noise)),
            "depth_5sig": 5 * noise / share, "phot_bias": bias,
            "phot_rms_bright": rms_bright, "phot_rms_faint": rms_faint,
            "n_bright": int(is_bright.sum()), "n_faint": int(is_faint.sum())}


def registration_errors(path: Path, truth: pd.DataFrame) -> pd.DataFrame:
    """Per registered frame: the rms and largest distance (px) between the true positions
    of its stars and the reference's true positions carried by its registration (the
    provenance's drift at the centre and rotation; frames of one camera, scale 1)."""
    with fits.open(path) as h:
        ny, nx = h[0].data.shape
        prov = pd.DataFrame(h["PROVENANCE"].data.tolist(), columns=h["PROVENANCE"].columns.names)
    ref = prov.loc[prov["is_reference"], "exposure"].iloc[0]
    r = truth[truth["exposure"] == ref].set_index("star_id")
    cx, cy = (nx - 1) / 2, (ny - 1) / 2
    rows = []
    for p in prov[prov["used"] & ~prov["is_reference"]].itertuples():
        f = truth[truth["exposure"] == p.exposure].set_index("star_id")
        ids = r.index.intersection(f.index)
        a = math.radians(p.rotation_deg)
        u, v = r.loc[ids, "x"] - cx, r.loc[ids, "y"] - cy
        x = cx + math.cos(a) * u - math.sin(a) * v + p.shift_x_px
        y = cy + math.sin(a) * u + math.cos(a) * v + p.shift_y_px
        d = np.hypot(x - f.loc[ids, "x"], y - f.loc[ids, "y"])
        rows.append({"exposure": p.exposure, "stars": len(ids),
                     "rms_px": float(np.sqrt(np.mean(d ** 2))), "max_px": float(d.max())})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- the runs


def run_stacks(cfg, night: str, folder: Path) -> dict[str, Path]:
    """Write every stack of :data:`RUNS` and the reference frame alone into ``folder``."""
    out = {}
    for name, (classes, weighting, interpolation, masked) in RUNS.items():
        path = folder / f"{name.replace(', ', '_').replace(' ', '-')}.fits"
        run = stack_field(cfg, night, classes=classes, weighting=weighting, output=path,
                          interpolation=interpolation, mask_damaged_sky=masked)
        print(run.report().splitlines()[0], f"[{name}]", flush=True)
        out[name] = path
    with fits.open(out["good, quality"]) as h:
        ref = h[0].header["REFEXP"]
    path = folder / "reference.fits"
    stack_field(cfg, night, classes=[], where=f"exposure == '{ref}'", output=path,
                mask_damaged_sky=False)
    out["reference"] = path
    return out


def picture(stacks: dict[str, np.ndarray], names: list[str], path: Path,
            size_px: int = 400) -> Path:
    """The centre of two stacks side by side, on one asinh stretch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 5.2))
    first = stacks[names[0]]
    ny, nx = first.shape
    box = (slice(ny // 2 - size_px // 2, ny // 2 + size_px // 2),
           slice(nx // 2 - size_px // 2, nx // 2 + size_px // 2))
    noise = 1.4826 * np.nanmedian(np.abs(first[box] - np.nanmedian(first[box])))
    for ax, name in zip(axes, names):
        img = np.arcsinh(np.nan_to_num(stacks[name][box]) / (3 * noise))
        ax.imshow(img, origin="lower", cmap="gray", vmin=-1, vmax=np.percentile(img, 99.7))
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--raw-root", type=Path, required=True)
    p.add_argument("--out-root", type=Path, required=True)
    p.add_argument("--night", required=True)
    p.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    a = p.parse_args(argv)
    cfg = load_config(overrides={"run": {"raw_root": str(a.raw_root),
                                         "out_root": str(a.out_root)}})
    folder = a.out_root / "stacks" / a.night / "bench"
    files = run_stacks(cfg, a.night, folder)
    truth = pd.read_parquet(paths.truth_stars(a.raw_root, a.night))
    truth["exposure"] = truth["exposure"].astype(str)
    frames = pd.read_parquet(paths.truth_table(a.raw_root, a.night)).drop_duplicates(
        "exposure").set_index("exposure")
    images, refs, rows = {}, {}, []
    for name, path in files.items():
        with fits.open(path) as h:
            images[name] = h[0].data.astype(np.float32)
            refs[name] = h[0].header["REFEXP"]
            n = h[0].header["NCOMBINE"]
        rows.append((name, n))
    ref = refs["good, quality"]
    fwhm_ref = float(frames.loc[ref, "fwhm_px_true"])
    stars = usable_stars(truth[truth["exposure"] == ref], images["reference"].shape, fwhm_ref)
    flux = stars["flux_clear_adu"]
    faint = set(stars.loc[(flux > flux.quantile(0.1)) & (flux <= flux.quantile(0.5)),
                          "star_id"])
    bright = set(stars.loc[flux > flux.quantile(0.75), "star_id"])
    table = []
    for name, n in rows:
        if refs[name] != ref:  # another reference: its own stars' positions, the same ids
            s = truth[(truth["exposure"] == refs[name]) & truth["star_id"].isin(stars["star_id"])]
        else:
            s = stars
        m = measure(images[name], s, faint, bright, fwhm_ref)
        table.append({"stack": name, "frames": n, "reference": refs[name], **m})
    result = pd.DataFrame(table)
    pd.set_option("display.width", 200)
    print(result.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    reg = registration_errors(files["all, quality"], truth)
    print(f"registration of the {len(reg)} frames of 'all, quality' against the true star "
          f"positions: rms per frame median {reg['rms_px'].median():.3f} px, largest "
          f"{reg['rms_px'].max():.3f} px ({reg.loc[reg['rms_px'].idxmax(), 'exposure']}), "
          f"largest single star {reg['max_px'].max():.3f} px")
    a.results.mkdir(parents=True, exist_ok=True)
    (a.results / "stack_sequence.json").write_text(json.dumps(
        {"night": a.night, "raw_root": str(a.raw_root), "rows": table,
         "registration": reg.to_dict("records")}, indent=1))
    png = picture(images, ["good, quality", "all, equal"], a.results / "stack_sequence.png")
    print(f"wrote {a.results / 'stack_sequence.json'} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
