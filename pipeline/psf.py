"""PSF stars, their fitted size and shape, and the detector's PSF summary.

Star selection
--------------
A PSF star is unflagged by sep (not blended, not truncated), unsaturated, at least
``edge_px`` from the edges, at S/N >= ``min_snr`` (``fallback_min_snr`` in a field too
sparse for that), has no neighbour brighter than
``NEIGHBOUR_FLUX_FRACTION`` of its flux within ``isolation_fwhm`` FWHM, and lies on the
stellar locus: point sources share one half-light radius whatever their flux, galaxies
and blends are larger (``EXTENDED``), cosmic rays and hot pixels smaller or thin
(``COMPACT``). The locus is the densest 10% wide interval of ln(half-light radius) among
the bright, clean candidates that do not look like cosmic rays.

The fits (models in :mod:`.psf_models`)
---------------------------------------
1. A capped set of stars (``max_stars``, spread evenly over the S/N ranks of the selected
   stars, fewer when the stamps are large: ``MAX_FIT_SAMPLES``) is fitted on stamps of
   2.5 first-guess FWHM radius (binned for stars wider than ``3 MIN_BINNED_FWHM_PX``:
   defocused donuts) by a pixel-integrated elliptical Moffat with free centre, flux,
   local background, shape and ``beta``, in float32, each star by its own
   Levenberg-Marquardt steps (:func:`~.psf_models.fit_independent`: the stars' 8 x 8
   normal equations solved together). The fitted sizes are intrinsic (pre-pixel) FWHM.
   Per star: FWHM along the major and minor axes, ``e = 1 - b/a`` and the major-axis
   angle ``theta`` ([0, 180) from +x toward +y).
2. When the stars are coherently elongated (trail ratio of step 1 at least
   ``TRAILED_MODEL_MIN_RATIO``, coherence at least ``TRAILED_MODEL_MIN_COHERENCE``, the
   shared elongation at least ``ELONGATION_MIN_SIGNIFICANCE`` standard errors), the
   best ``TRAILED_MODEL_STARS`` stars are fitted again with a round Moffat convolved
   with one image-motion kernel shared by all of them (a segment with extra weight at
   its ends: linear drift, periodic error, or a jump that doubles the stars). An
   elongated Moffat fits a trail badly (a flat-topped, long star), so this second model
   gives both the seeing before image motion and the extent of the motion directly.
3. A jump of the pointing leaves two images of every star, all separated by one vector;
   when they are far enough apart to be detected separately, most PSF stars are lost to
   the isolation cut. :func:`detect_doubling` finds that vector among pairs of
   detections, and the shared-motion model, started as a jump, is fitted on the pairs
   (qa flag ``DOUBLED_STARS`` when the fitted kernel is a jump; a long periodic trail,
   whose stars sep cuts in two at the turning points, is measured the same way).

Summary quantities
------------------
- ``fwhm_image_px`` (:class:`PSFMeasurement`): the FWHM of the fitted profile (median
  size and ``beta``) convolved with the pixel, read along a cut through its peak: the
  PSF as the pixels record it, which is what PSFEx's PSF model (``FWHM_Mean``) and
  SourceExtractor's ``FWHM_IMAGE`` describe, and never under 1 px. Any elongation is in
  it (geometric mean of the axes). Compare it, not ``fwhm_px``, with those tools.
- ``fwhm_px`` (the catalog's ``fwhm_px``), the seeing FWHM before the pixel and before
  image motion. On undersampled stars whose fitted ``beta`` falls below
  ``MIN_SEEING_BETA`` (the core lies inside a pixel, so the fit trades a steep, tiny core
  for wings), the sizes are rescaled to the ``MIN_SEEING_BETA`` Moffat that gives the same
  ``fwhm_image_px``.

  * without a trail model: the median over stars of the geometric-mean FWHM
    ``sqrt(FWHM_major FWHM_minor)`` divided by ``(1 + T^2 / (12 sigma^2))^(1/4)``, the
    widening that the coherent trail ``T`` (below) gives the geometric mean.
    Field-dependent optics shear stars without changing their area, so the geometric
    mean keeps the seeing there, where the minor axis would shrink with the shear; a
    linear trail widens only the major axis, which the factor removes. For round stars
    this is the plain FWHM.
  * with the trail model: the median FWHM of the fitted round Moffats.

- ``trail_ratio`` ``r = T / FWHM``:

  * without the trail model, from second moments: a line of length ``T`` convolved with
    a PSF of variance ``s2`` has variance ``s2 + T^2 / 12`` along the line and ``s2``
    across. With Gaussian-equivalent sizes ``sigma = FWHM / (2 sqrt(2 ln 2))`` and axis
    ratio ``q = b/a``, ``T^2 = 12 sigma_minor^2 (1/q^2 - 1)``, so

        r = sqrt(12) / (2 sqrt(2 ln 2)) * sqrt(1/q^2 - 1).

    ``q = 1 - e_c`` comes from the coherent ellipticity ``e_c`` of
    :func:`coherent_elongation`: the S/N-weighted mean of the stars' ``e_i exp(2i
    theta_i)`` with the part that per-star noise and field-dependent optics leave in it
    removed. A tracking trail is the same for every star; noise on round stars and optics
    average away. A shared elongation under ``ELONGATION_MIN_SIGNIFICANCE`` standard
    errors gives ``r = 0``.
  * with the trail model (or on doubled stars): the fitted extent of the motion over the
    fitted FWHM.

- ``ellipticity``: median of ``e``; ``moffat_beta``: median of ``beta`` (step 1).
- ``coherence``: ``e_c`` over the weighted mean of the stars' ``e_i``
  (:func:`coherent_elongation`): 1 when every star is stretched the same way (tracking),
  near 0 for round stars whose ellipticities are noise and for field-dependent optics.
- ``pa_deg``: half the argument of the weighted mean of ``e_i exp(2i theta_i)``.
- Per region: median FWHM and median ellipticity of the stars in each of ``grid x grid``
  regions (row-major from pixel (0, 0)); NaN where a region has none.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from survey_qa.config import PSFConfig
from survey_qa.pipeline import psf_models as pm
from survey_qa.pipeline.flags import SOURCE_FLAGS, bits
from survey_qa.pipeline.records import BackgroundResult, PSFResult

FWHM_PER_HALF_LIGHT_RADIUS = 2.0 / 1.13
"""First-guess FWHM from the half-light radius (between a Gaussian's 2 and a beta=3
Moffat's 1.59)."""

NEIGHBOUR_FLUX_FRACTION = 0.01
"""Neighbours fainter than this fraction of a star's flux do not spoil its isolation."""

LOCUS_WINDOW = 0.10
"""Width in ln(half-light radius) of the window that finds the stellar locus."""

LOCUS_SEPARATION = 0.3
LOCUS_MODE_FRACTION = 0.3
LOCUS_MIN_COUNT = 3
LOCUS_MAX_MODES = 3
"""Competing dense windows of half-light radius, see :func:`stellar_locus`."""

THIN_B_PX = 0.8
THIN_ELONGATION = 1.3
THIN_MAX_COHERENCE = 0.7
"""Cosmic-ray tracks: one pixel wide (sep ``b`` < THIN_B_PX), elongated (a/b >
THIN_ELONGATION) and pointing every which way (direction coherence below
THIN_MAX_COHERENCE); trailed undersampled stars are as thin but all point the same way."""

LOCUS_TOL = (0.05, 0.20)
"""Bounds on the accepted distance from the locus, in ln(half-light radius)."""

MIN_STAR_HALF_LIGHT_PX = 0.55
"""Sharper detections are cosmic rays or hot pixels: a single lit pixel has a half-light
radius of 0.4 px, the sharpest pixel-integrated star (FWHM 1.2 px) about 0.7 px."""

MAX_FIT_SAMPLES = 1_000_000
"""Most model samples (stamp pixels x sub-pixel points x stars) in one elliptical fit:
frames with large stamps fit fewer than ``max_stars`` stars (best S/N first)."""

MAX_STAMP_HALF_PX = 48
MIN_STAMP_HALF_PX = 4
BETA_START = 3.0
BETA_RANGE = (1.05, 1e4)
TRAIL_FACTOR = math.sqrt(12.0) * pm.SIGMA_PER_FWHM

TRAILED_MODEL_MIN_RATIO = 0.5
TRAILED_MODEL_MIN_COHERENCE = 0.5
TRAILED_MODEL_STARS = 16
TRAILED_MODEL_MAX_NFEV = 20
"""When, on how many stars and with how many model evaluations the shared-motion model is
fitted (its four shared parameters are pinned down by the brightest few stars)."""

ELLIPTICITY_NOISE_SNR = 2.0
"""Noise of each spin-2 component of a star's ellipticity ``1 - b/a`` at aperture S/N
``nu``: ``2 / nu`` (Bernstein & Jarvis 2002, AJ 123, 583, for a well-sampled star), divided
by the resolution ``(FWHM / FWHM_pixel-convolved)^2`` that the pixel leaves: the fitted,
pixel-deconvolved shape of an undersampled star is that much noisier."""

SHAPE_SYSTEMATIC = 0.01
"""Ellipticity to which a Moffat describes a real star's shape whatever its S/N: the floor
of a star's ellipticity error, so that the brightest few stars do not take all the weight."""

ELONGATION_MIN_SIGNIFICANCE = 3.0
"""A shared elongation under this many standard errors is not told apart from noise and
optics: the trail ratio is then 0 (and no shared-motion model is fitted)."""

MIN_SEEING_BETA = 2.0
"""Moffat beta below which a profile has no finite second moment: no seeing-limited PSF.
Undersampled stars do not constrain beta (the core lies inside one pixel) and a fit can run
to beta ~1.4 with a tiny FWHM that describes the same pixels; the seeing FWHM is then the
one that, at this beta, gives the measured pixel-convolved FWHM."""

DOUBLING_MIN_SNR = 10.0
DOUBLING_MIN_SEP_FWHM = 1.5
DOUBLING_MAX_SEP_FWHM = 10.0
DOUBLING_MIN_PAIRS = 4
DOUBLING_MIN_EXCESS = 5.0
DOUBLING_LOCUS_TOL = 0.25
DOUBLING_MIN_SHARE = 0.2
"""Doubled stars (a jump): see :func:`detect_doubling`."""

@dataclass
class PSFMeasurement(PSFResult):
    """:class:`PSFResult` with the PSF as the pixels record it.

    ``fwhm_image_px`` is the FWHM of the fitted profile convolved with the pixel (the
    geometric mean of its axes, any elongation included): the quantity PSFEx's PSF model
    and SourceExtractor's ``FWHM_IMAGE`` describe, never under 1 px. ``fwhm_px`` is the
    seeing before the pixel and before image motion (the catalog's ``fwhm_px``).
    """

    fwhm_image_px: float = math.nan
    fitted: np.ndarray | None = field(default=None, repr=False)  # bool: stars fitted


REJECT_FLAGS = bits("BLENDED", "TRUNCATED", "SATURATED", "NEAR_EDGE", "NOT_ISOLATED",
                    "EXTENDED", "COMPACT", registry=SOURCE_FLAGS)
"""Source flags that keep a detection out of the PSF."""


# ---------------------------------------------------------------------------- selection


def stellar_locus(half_light_px: np.ndarray) -> tuple[float, float]:
    """Centre and half-width of the stellar locus in ln(half-light radius).

    Point sources share one half-light radius, so they pile up in a narrow window of
    ln(radius). Other families can pile up too: the blobs of an aircraft's blinking
    lights, the wide-winged brightest stars, all larger than the stars; cosmic rays, which
    are smaller, are removed from the candidates beforehand (:func:`cosmic_ray_like`).
    So the densest ``LOCUS_WINDOW``-wide windows at least ``LOCUS_SEPARATION`` apart are
    found, and of those holding at least ``LOCUS_MODE_FRACTION`` of the densest one's
    count (and ``LOCUS_MIN_COUNT``), the one at the smallest radius is the stellar locus.

    Parameters
    ----------
    half_light_px
        Half-light radii (pixels) of bright, clean candidates.

    Returns
    -------
    centre, tol
        Point sources lie within ``tol`` of ``centre`` (both in ln pixels). NaN centre
        when there are no candidates.
    """
    lr = np.sort(np.log(half_light_px[np.isfinite(half_light_px) & (half_light_px > 0)]))
    if lr.size == 0:
        return math.nan, math.nan
    counts = np.searchsorted(lr, lr + LOCUS_WINDOW, side="right") - np.arange(lr.size)
    centres = lr + 0.5 * LOCUS_WINDOW
    free = np.ones(lr.size, bool)
    modes = []  # (count, start) of dense windows at least LOCUS_SEPARATION apart
    for _ in range(LOCUS_MAX_MODES):
        if not free.any():
            break
        i = int(np.flatnonzero(free)[np.argmax(counts[free])])
        modes.append((int(counts[i]), i))
        free &= np.abs(centres - centres[i]) >= LOCUS_SEPARATION
    floor = max(LOCUS_MIN_COUNT, LOCUS_MODE_FRACTION * modes[0][0])
    count, start = min((m for m in modes if m[0] >= floor or m is modes[0]),
                       key=lambda m: lr[m[1]])
    centre = float(np.median(lr[start:start + count]))
    near = lr[np.abs(lr - centre) < 3 * LOCUS_TOL[1]]
    scatter = 1.4826 * float(np.median(np.abs(near - centre)))
    return centre, float(np.clip(3 * scatter, *LOCUS_TOL))


def cosmic_ray_like(half_light_px: np.ndarray, a_px: np.ndarray, b_px: np.ndarray,
                    theta_deg: np.ndarray) -> np.ndarray:
    """Detections that look like cosmic rays or hot pixels rather than stars.

    Sharper than any pixel-integrated star (half-light radius under
    ``MIN_STAR_HALF_LIGHT_PX``), or thin, elongated tracks whose directions are
    incoherent (``THIN_*``).
    """
    sharp = ~(half_light_px >= MIN_STAR_HALF_LIGHT_PX)
    thin = (b_px < THIN_B_PX) & (a_px > THIN_ELONGATION * b_px)
    if thin.sum() >= 3:
        spin = np.exp(2j * np.radians(theta_deg[thin]))
        if abs(spin.mean()) >= THIN_MAX_COHERENCE:
            thin = np.zeros_like(thin)
    return sharp | thin


def _isolated(x: np.ndarray, y: np.ndarray, flux: np.ndarray, radius_px: float) -> np.ndarray:
    """True where no neighbour brighter than a fraction of the source's flux is near."""
    ok = np.ones(x.size, bool)
    if x.size < 2 or not radius_px > 0:
        return ok
    pairs = cKDTree(np.column_stack([x, y])).query_pairs(radius_px, output_type="ndarray")
    if pairs.size:
        i, j = pairs[:, 0], pairs[:, 1]
        f = np.nan_to_num(np.abs(flux), nan=np.inf)
        ok[i[f[j] >= NEIGHBOUR_FLUX_FRACTION * f[i]]] = False
        ok[j[f[i] >= NEIGHBOUR_FLUX_FRACTION * f[j]]] = False
    return ok


def selection_flags(sources: pd.DataFrame, shape: tuple[int, int],
                    cfg: PSFConfig) -> tuple[np.ndarray, float]:
    """Source flags of the PSF-star cuts, and the first-guess FWHM.

    Parameters
    ----------
    sources
        Source table from :func:`~survey_qa.pipeline.sources.extract_sources`.
    shape
        Detector shape (ny, nx).
    cfg
        PSF settings.

    Returns
    -------
    flags, fwhm_guess_px
        ``sources.flags`` with ``NEAR_EDGE``, ``NOT_ISOLATED``, ``EXTENDED`` and
        ``COMPACT`` added; the first-guess FWHM (pixels) from the stellar locus (NaN when
        there is no candidate).
    """
    flags = sources["flags"].to_numpy(np.int64).copy()
    if len(sources) == 0:
        return flags, math.nan
    x, y = sources["x"].to_numpy(float), sources["y"].to_numpy(float)
    rh = sources["flux_radius_px"].to_numpy(float)
    snr = sources["snr"].to_numpy(float)
    ny, nx = shape
    e = cfg.edge_px
    near_edge = ~((x >= e) & (x <= nx - 1 - e) & (y >= e) & (y <= ny - 1 - e))
    flags |= np.where(near_edge, SOURCE_FLAGS["NEAR_EDGE"].value, 0)

    clean = (flags & REJECT_FLAGS) == 0
    cr = cosmic_ray_like(rh, sources["a_px"].to_numpy(float), sources["b_px"].to_numpy(float),
                         sources["theta_deg"].to_numpy(float))
    flags |= np.where(cr, SOURCE_FLAGS["COMPACT"].value, 0)
    candidates = clean & ~cr & (snr >= cfg.min_snr)
    if candidates.sum() < cfg.min_stars:  # sparse field: see select_psf_stars
        candidates = clean & ~cr & (snr >= min(cfg.fallback_min_snr, cfg.min_snr))
    centre, tol = stellar_locus(rh[candidates])
    if not math.isfinite(centre):
        return flags, math.nan
    lr = np.log(np.where(rh > 0, rh, np.nan))
    flags |= np.where(lr > centre + tol, SOURCE_FLAGS["EXTENDED"].value, 0)
    flags |= np.where(lr < centre - tol, SOURCE_FLAGS["COMPACT"].value, 0)
    fwhm_guess = FWHM_PER_HALF_LIGHT_RADIUS * math.exp(centre)
    iso = _isolated(x, y, sources["flux"].to_numpy(float), cfg.isolation_fwhm * fwhm_guess)
    flags |= np.where(iso, 0, SOURCE_FLAGS["NOT_ISOLATED"].value)
    return flags, fwhm_guess


def select_psf_stars(sources: pd.DataFrame, shape: tuple[int, int], cfg: PSFConfig,
                     flags: np.ndarray | None = None) -> np.ndarray:
    """Which sources are usable PSF stars.

    Parameters
    ----------
    sources, shape, cfg
        As for :func:`selection_flags`.
    flags
        The first result of :func:`selection_flags` when the caller has it already.

    Returns
    -------
    numpy.ndarray
        Boolean, aligned with ``sources``: isolated, unsaturated, unflagged, away from the
        edges, S/N >= ``cfg.min_snr`` (``cfg.fallback_min_snr`` when fewer than
        ``cfg.min_stars`` reach it), on the stellar locus.
    """
    if flags is None:
        flags, _ = selection_flags(sources, shape, cfg)
    if len(sources) == 0:
        return np.zeros(0, bool)
    snr = sources["snr"].to_numpy(float)
    clean = (flags & REJECT_FLAGS) == 0
    chosen = clean & (snr >= cfg.min_snr)
    if chosen.sum() < cfg.min_stars:  # a sparse field: fainter stars rather than none
        chosen = clean & (snr >= min(cfg.fallback_min_snr, cfg.min_snr))
    return chosen


def fit_order(sources: pd.DataFrame, psf_star: np.ndarray, cfg: PSFConfig) -> np.ndarray:
    """Indices of the stars that are fitted, best S/N first.

    At most ``cfg.max_stars``, spread evenly over the S/N ranks of the selected stars, and
    fewer when their stamps are large: the fit holds at most
    ``MAX_FIT_SAMPLES`` model samples (but never fewer than ``cfg.min_stars`` stars).
    """
    idx = np.flatnonzero(np.asarray(psf_star, bool))
    snr = sources["snr"].to_numpy(float)[idx]
    order = idx[np.argsort(-snr, kind="stable")]
    if order.size > cfg.max_stars:
        # Evenly spaced in S/N rank, not only the brightest: a detector whose saturation
        # level is unknown (or a photographic plate) flattens its brightest stars.
        order = order[np.unique(np.linspace(0, order.size - 1, cfg.max_stars).round()
                                .astype(int))]
    if order.size == 0:
        return order
    fwhm_guess, half = _stamp_size(sources, order, cfg)
    samples = (2 * half + 1) ** 2 * _sub_sampling(fwhm_guess) ** 2
    return order[:max(cfg.min_stars, MAX_FIT_SAMPLES // samples)]


def _stamp_size(sources: pd.DataFrame, order: np.ndarray, cfg: PSFConfig) -> tuple[float, int]:
    """First-guess FWHM of the stars and the half side of their fit stamps (pixels)."""
    rh = sources["flux_radius_px"].to_numpy(float)[order]
    fwhm_guess = float(np.median(FWHM_PER_HALF_LIGHT_RADIUS * rh))
    half = cfg.stamp_half_px or int(np.clip(math.ceil(2.5 * fwhm_guess), MIN_STAMP_HALF_PX,
                                            MAX_STAMP_HALF_PX))
    return fwhm_guess, half


# ---------------------------------------------------------------------------- the fits


def _sub_sampling(fwhm_px: float) -> int:
    """Sub-pixel points per axis that integrate the model over a pixel.

    With the pixel variance the midpoint rule leaves out removed afterwards, the FWHM
    bias this leaves is below 0.5% for Moffat beta 2.5-4.5 (measured on GalSim stars).
    """
    for limit, n in ((2.0, 5), (3.0, 3), (5.0, 2)):
        if fwhm_px < limit:
            return n
    return 1


def _gather(image: np.ndarray, ix: np.ndarray, iy: np.ndarray, half: int,
            fill: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(N, (2 half + 1)^2) pixels around integer centres, and which lie inside the image."""
    off = np.arange(-half, half + 1)
    yy = iy[:, None, None] + off[None, :, None]
    xx = ix[:, None, None] + off[None, None, :]
    inside = (yy >= 0) & (yy < image.shape[0]) & (xx >= 0) & (xx < image.shape[1])
    vals = image[np.clip(yy, 0, image.shape[0] - 1), np.clip(xx, 0, image.shape[1] - 1)]
    vals = np.where(inside, vals, fill)
    n = len(ix)
    return vals.reshape(n, -1), inside.reshape(n, -1)


def _first_guess(rh, a, b, theta_deg, fwhm_guess, dx, dy) -> np.ndarray:
    """(N, 8) starting parameters from sep's moments and the half-light radius."""
    n = len(dx)
    fwhm0 = np.where(np.isfinite(rh) & (rh > 0), FWHM_PER_HALF_LIGHT_RADIUS * rh, fwhm_guess)
    q = np.clip(np.where((a > 0) & (b > 0), b / a, 1.0), 0.2, 1.0)
    p0 = np.zeros((n, pm.N_PARAMS))
    p0[:, 0], p0[:, 1] = dx, dy
    p0[:, 2] = 1.0
    p0[:, 4:7] = pm.shape_params(fwhm0 / np.sqrt(q), fwhm0 * np.sqrt(q), theta_deg, BETA_START)
    p0[:, 7] = math.log(BETA_START - 1.0)
    return p0


def _good_fits(shape: dict, p: np.ndarray, half: int, fwhm_guess: float) -> np.ndarray:
    """Fits that converged to a sensible star (centre, flux, beta and size in range)."""
    finite = np.all(np.isfinite(p), axis=1) & np.isfinite(shape["fwhm_minor_px"])
    with np.errstate(invalid="ignore"):
        return (finite
                & (np.hypot(p[:, 0], p[:, 1]) < 2.0)
                & (p[:, 2] > 0.2) & (p[:, 2] < 5.0)
                & (shape["beta"] > BETA_RANGE[0]) & (shape["beta"] < BETA_RANGE[1])
                & (shape["fwhm_minor_px"] > max(0.3, 0.1 * fwhm_guess))
                & (shape["fwhm_major_px"] < 2.0 * half))


def _clipped(values: np.ndarray, nsigma: float = 3.0, floor: float = 0.02) -> np.ndarray:
    """True for values within ``nsigma`` robust deviations of the median.

    The deviation is at least ``floor`` times the median, so that a handful of nearly
    equal values does not reject good stars.
    """
    med = np.median(values)
    mad = 1.4826 * np.median(np.abs(values - med))
    return np.abs(values - med) <= nsigma * max(mad, floor * abs(med))


def _grid_medians(x, y, values, shape, grid) -> list[float]:
    ny, nx = shape
    ix = np.clip((x * grid / nx).astype(int), 0, grid - 1)
    iy = np.clip((y * grid / ny).astype(int), 0, grid - 1)
    region = iy * grid + ix
    out = []
    for r in range(grid * grid):
        v = values[region == r]
        out.append(float(np.median(v)) if v.size else math.nan)
    return out


@dataclass
class Elongation:
    """The elongation that the stars of a detector share."""

    ellipticity: float  # coherent ellipticity 1 - b/a, noise bias removed (0 when none)
    coherence: float  # ellipticity over the stars' mean elongation, in [0, 1]
    pa_deg: float  # direction of the shared elongation, [0, 180) from +x toward +y
    significance: float  # coherent ellipticity over its error


def coherent_elongation(spin2: np.ndarray, sigma_e: np.ndarray) -> Elongation:
    """The shared part of the stars' elongations, weighted by their S/N, noise removed.

    Each star's spin-2 ellipticity ``s_i = e_i exp(2i theta_i)`` has an error
    ``sigma_i`` per component (from its S/N, :data:`ELLIPTICITY_NOISE_SNR`, with the
    :data:`SHAPE_SYSTEMATIC` floor). Their inverse-variance mean
    ``C = sum w_i s_i / sum w_i``, ``w_i = 1 / sigma_i^2``, holds what every star shares
    (a tracking trail); per-star noise and field-dependent optics average away, but not
    completely: they add ``V = sum w_i^2 |s_i - C|^2 / (sum w_i)^2`` (measured from the
    scatter of the stars, so it counts the noise and the optics, whatever the noise model)
    to ``|C|^2``. The coherent ellipticity is ``sqrt(max(|C|^2 - V, 0))``, and the
    coherence is that over the weighted mean ``|s_i|``: round stars at any S/N give a
    coherence near 0 (their ``|s_i|`` is noise that the sum does not keep), trailed stars
    near 1, field-dependent optics in between.

    Parameters
    ----------
    spin2
        Per-star ``e exp(2i theta)``.
    sigma_e
        Per-star ellipticity error per component (before the floor).

    Returns
    -------
    Elongation
    """
    n = spin2.size
    if n == 0:
        return Elongation(math.nan, math.nan, math.nan, math.nan)
    w = 1.0 / (np.asarray(sigma_e, float) ** 2 + SHAPE_SYSTEMATIC ** 2)
    wsum = float(w.sum())
    c = complex(np.sum(w * spin2) / wsum)
    scatter = float(np.sum(w ** 2 * np.abs(spin2 - c) ** 2)) / wsum ** 2
    var = scatter * n / (n - 1) if n > 1 else float(1.0 / wsum)
    e_c = math.sqrt(max(abs(c) ** 2 - var, 0.0))
    mean_abs = float(np.sum(w * np.abs(spin2)) / wsum)
    coherence = min(e_c / mean_abs, 1.0) if mean_abs > 0 else math.nan
    return Elongation(ellipticity=e_c, coherence=coherence,
                      pa_deg=float(np.degrees(0.5 * np.angle(c)) % 180.0),
                      significance=e_c / math.sqrt(var) if var > 0 else math.inf)


def trail_ratio(coherent_ellipticity: float) -> float:
    """Trail length over seeing FWHM from the coherent ellipticity ``1 - b/a``.

    ``r = sqrt(12) / (2 sqrt(2 ln 2)) * sqrt(1 / (1 - e)^2 - 1)``; see the module notes.
    """
    q = 1.0 - coherent_ellipticity
    if not (0.0 < q <= 1.0):
        return math.nan
    return TRAIL_FACTOR * math.sqrt(1.0 / q ** 2 - 1.0)


def trail_widening(ratio: float) -> float:
    """Factor by which a linear trail of ratio ``r`` widens the geometric-mean FWHM."""
    if not math.isfinite(ratio):
        return 1.0
    # sigma_major^2 / sigma^2 = 1 + T^2 / (12 sigma^2) = 1 + (r / TRAIL_FACTOR)^2
    return (1.0 + (ratio / TRAIL_FACTOR) ** 2) ** 0.25


def _nan_result(n_sources: int, grid: int, flags: int, n_used: int = 0) -> PSFResult:
    nan_grid = [math.nan] * (grid * grid)
    return PSFMeasurement(fwhm_px=math.nan, moffat_beta=math.nan, ellipticity=math.nan,
                     pa_deg=math.nan, coherence=math.nan, trail_ratio=math.nan, n_used=n_used,
                     fwhm_grid_px=list(nan_grid), ellipticity_grid=list(nan_grid),
                     star_fwhm_px=np.full(n_sources, np.nan),
                     star_ellipticity=np.full(n_sources, np.nan),
                     psf_star=np.zeros(n_sources, bool), qa_flags=flags)


class _Stamps:
    """Background-subtracted stamps of the fitted stars, scaled by their flux guess.

    ``half`` is the half side in (binned) stamp pixels; with ``bin_px`` > 1 (odd) each
    stamp pixel is the sum of ``bin_px x bin_px`` detector pixels centred on the star's
    nearest pixel, and is unusable when any of them is.
    """

    def __init__(self, data, background, mask, x, y, flux, half, bin_px=1):
        self.half = half
        self.ix, self.iy = np.rint(x).astype(int), np.rint(y).astype(int)
        full = half * bin_px + (bin_px - 1) // 2
        raw, inside = _gather(data, self.ix, self.iy, full)
        back, _ = _gather(background.back, self.ix, self.iy, full)
        rms, _ = _gather(background.rms, self.ix, self.iy, full, fill=1.0)
        usable = inside & (rms > 0)
        if mask is not None:
            masked, _ = _gather(mask, self.ix, self.iy, full, fill=True)
            usable &= ~masked.astype(bool)
        signal = raw - back
        var = np.where(rms > 0, rms, 1.0) ** 2
        if bin_px > 1:
            signal, var = _bin(signal, half, bin_px), _bin(var, half, bin_px)
            usable = _bin(usable.astype(np.int32), half, bin_px) == bin_px ** 2
        flux = np.where(np.isfinite(flux) & (flux > 0), flux, np.sum(signal, axis=1))
        self.flux = np.maximum(flux, 1e-6)
        self.values = signal / self.flux[:, None]
        self.weights = np.where(usable, self.flux[:, None] / np.sqrt(var), 0.0)


def _bin(stamps: np.ndarray, half: int, bin_px: int) -> np.ndarray:
    """Sum (N, side^2) stamps over ``bin_px x bin_px`` blocks: (N, (2 half + 1)^2)."""
    m = 2 * half + 1
    return stamps.reshape(-1, m, bin_px, m, bin_px).sum(axis=(2, 4)).reshape(-1, m * m)


MIN_BINNED_FWHM_PX = 4.0
"""Stars wider than ``3 x`` this are fitted on stamps binned by the largest odd factor that
keeps their FWHM at least this many binned pixels (defocused donuts, very bad seeing): the
cost of a fit goes with the stamp's pixels, its accuracy with the pixels per FWHM."""


def _bin_factor(fwhm_px: float) -> int:
    """Odd stamp binning factor for stars of this FWHM (1: none)."""
    b = int(fwhm_px // MIN_BINNED_FWHM_PX) if math.isfinite(fwhm_px) else 1
    return max(1, b if b % 2 else b - 1)


def _fit_elliptical(data, background, mask, x, y, flux, rh, a, b, theta_deg, fwhm_guess,
                    half):
    """Step 1: elliptical Moffat per star. Returns (shape dict, params, good mask).

    Wide stars are fitted on binned stamps (:data:`MIN_BINNED_FWHM_PX`); the parameters
    are then in binned pixels, the shapes in detector pixels.
    """
    k = _bin_factor(fwhm_guess)
    half_k = int(math.ceil(half / k))
    n_sub = _sub_sampling(fwhm_guess / k)
    st = _Stamps(data, background, mask, x, y, flux, half_k, bin_px=k)
    p0 = _first_guess(rh / k, a / k, b / k, theta_deg, fwhm_guess / k, (x - st.ix) / k,
                      (y - st.iy) / k)
    gx, gy = pm.sample_grid(half_k, n_sub, np.float32)

    # The FWHM settles within a few steps; beta of a non-Moffat (real) PSF creeps on for
    # many more, so this fit stops early.
    p, _ = pm.fit_independent(lambda q: pm.moffat_model(q, gx, gy), st.values, st.weights,
                              p0, max_iter=15, ftol=1e-4)
    shape = pm.moffat_shape(p, n_sub)
    good = _good_fits(shape, p, half_k, fwhm_guess / k)
    shape["fwhm_major_px"] = shape["fwhm_major_px"] * k
    shape["fwhm_minor_px"] = shape["fwhm_minor_px"] * k
    return shape, p, good


@dataclass
class _Trail:
    """Result of the shared-motion fit."""

    fwhm_px: np.ndarray  # per star, good ones only
    beta: np.ndarray  # their Moffat beta
    length_px: float  # extent of the motion
    angle_deg: float  # direction of the motion, [0, 180)
    end_weight: float  # m: 0 a uniform drift, 1 a jump
    first_fraction: float  # f: share of the time at the start of the segment


def _seeing_sizes(fwhm_px: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Fitted Moffat sizes, rescaled when the median ``beta`` is under
    :data:`MIN_SEEING_BETA` (undersampled stars; module notes) to the
    ``MIN_SEEING_BETA`` profile of the same pixel-convolved FWHM."""
    beta_med = float(np.median(beta))
    size = float(np.median(fwhm_px))
    if not beta_med < MIN_SEEING_BETA:
        return fwhm_px
    image = pm.pixel_convolved_fwhm(size, beta_med)
    if not image > 1.0:
        return fwhm_px
    return fwhm_px * (pm.seeing_fwhm_from_pixel_convolved(image, MIN_SEEING_BETA) / size)


def _fit_trailed(data, background, mask, x, y, flux, fwhm0, length0, angle0_deg, beta0,
                 end_weight0=0.27, first_fraction0=0.5) -> _Trail | None:
    """Round Moffats with one shared motion kernel (see :mod:`.psf_models`).

    ``x``, ``y`` are the midpoints of the stars' motion segments. Returns None when the
    fit gives no sensible answer. Wide stars are fitted on binned stamps, as in step 1.
    """
    length0 = max(length0, 0.5)
    half = int(np.clip(math.ceil(2.5 * fwhm0 + 0.6 * length0), MIN_STAMP_HALF_PX,
                       MAX_STAMP_HALF_PX))
    k = _bin_factor(fwhm0)  # below, sizes are in binned pixels
    half, fwhm0, length0 = int(math.ceil(half / k)), fwhm0 / k, length0 / k
    n_sub = 2 if fwhm0 < 3.0 else 1
    # Points along the segment at most FWHM / 2 (1.2 sigma) apart, with room for the
    # segment to grow by 30%: the ripple such spacing leaves on a Gaussian is ~1e-6.
    n_line = int(np.clip(math.ceil(2.6 * length0 / fwhm0) + 1, 3, 40))
    st = _Stamps(data, background, mask, x, y, flux, half, bin_px=k)
    beta0 = float(np.clip(beta0, 1.5, 10.0))
    p0 = np.zeros((len(x), pm.N_ROUND))
    p0[:, 0], p0[:, 1] = (x - st.ix) / k, (y - st.iy) / k
    p0[:, 2] = 1.0
    p0[:, 4] = math.log(pm.fwhm_factor(beta0) / fwhm0)
    p0[:, 5] = math.log(beta0 - 1.0)
    t = math.radians(angle0_deg)
    logit = lambda v: math.log(v / (1.0 - v))  # noqa: E731
    shared0 = np.array([length0 * math.cos(t), length0 * math.sin(t),
                        logit(float(np.clip(end_weight0, 0.01, 0.99))),
                        logit(float(np.clip(first_fraction0, 0.05, 0.95)))])
    gx, gy = pm.sample_grid(half, n_sub, np.float32)

    def evaluate(p, shared):
        return pm.trailed_model(p, shared, gx, gy, n_line)

    p, shared, _ = pm.fit_joint(evaluate, st.values, st.weights, p0, shared0,
                                max_nfev=TRAILED_MODEL_MAX_NFEV, ftol=1e-4)
    with np.errstate(over="ignore", invalid="ignore"):
        beta = 1.0 + np.exp(p[:, 5])
        fwhm = pm.remove_pixel_variance(pm.fwhm_factor(beta) * np.exp(-p[:, 4]), n_sub)
        good = (np.all(np.isfinite(p), axis=1) & (np.hypot(p[:, 0], p[:, 1]) < 2.0 + length0)
                & (p[:, 2] > 0.2) & (p[:, 2] < 5.0) & (beta > BETA_RANGE[0])
                & (beta < BETA_RANGE[1]) & (fwhm > 0.3) & (fwhm < 2.0 * half))
    length = float(np.hypot(shared[0], shared[1]))
    if not good.any() or not np.all(np.isfinite(shared)) or length > 2.0 * half:
        return None
    return _Trail(fwhm_px=_seeing_sizes(fwhm[good] * k, beta[good]), beta=beta[good],
                  length_px=length * k,
                  angle_deg=float(np.degrees(np.arctan2(shared[1], shared[0])) % 180.0),
                  end_weight=pm.sigmoid(float(shared[2])),
                  first_fraction=pm.sigmoid(float(shared[3])))


# ---------------------------------------------------------------------------- doubled stars


@dataclass
class Doubling:
    """Stars seen twice: a jump of the pointing during the exposure."""

    dx_px: float  # mean separation vector, second image minus first
    dy_px: float
    first: np.ndarray  # source indices of the first images
    second: np.ndarray  # and of the matching second images

    @property
    def separation_px(self) -> float:
        return math.hypot(self.dx_px, self.dy_px)


def detect_doubling(sources: pd.DataFrame, fwhm_px: float) -> Doubling | None:
    """Find a separation vector shared by many pairs of detections (doubled stars).

    A jump of the pointing during the exposure leaves two images of every star, all
    separated by the same vector; random neighbours are separated by random vectors.
    Pairs of star-like detections (S/N >= ``DOUBLING_MIN_SNR``, not cosmic-ray-like) at
    ``DOUBLING_MIN_SEP_FWHM`` to ``DOUBLING_MAX_SEP_FWHM`` FWHM are histogrammed by their
    (sign-folded) separation vector; the densest cell (3 x 3 bins of ``FWHM / 4``) is a
    doubling when it holds at least ``DOUBLING_MIN_PAIRS`` pairs,
    ``DOUBLING_MIN_EXCESS`` times what the pairs at that separation would put there if
    their directions were random, and its pairs involve at least ``DOUBLING_MIN_SHARE``
    of the candidates.

    Parameters
    ----------
    sources
        Source table (``x``, ``y``, ``snr``, ``flux_radius_px``, ``a_px``, ``b_px``,
        ``theta_deg``).
    fwhm_px
        First-guess FWHM (pixels).

    Returns
    -------
    Doubling or None
    """
    if len(sources) < 2 * DOUBLING_MIN_PAIRS or not (fwhm_px > 0):
        return None
    snr = sources["snr"].to_numpy(float)
    cr = cosmic_ray_like(sources["flux_radius_px"].to_numpy(float),
                         sources["a_px"].to_numpy(float), sources["b_px"].to_numpy(float),
                         sources["theta_deg"].to_numpy(float))
    idx = np.flatnonzero((snr >= DOUBLING_MIN_SNR) & ~cr)
    if idx.size < 2 * DOUBLING_MIN_PAIRS:
        return None
    xy = sources[["x", "y"]].to_numpy(float)[idx]
    r_min, r_max = DOUBLING_MIN_SEP_FWHM * fwhm_px, DOUBLING_MAX_SEP_FWHM * fwhm_px
    pairs = cKDTree(xy).query_pairs(r_max, output_type="ndarray")
    if len(pairs) < DOUBLING_MIN_PAIRS:
        return None
    vec = xy[pairs[:, 1]] - xy[pairs[:, 0]]
    flip = (vec[:, 1] < 0) | ((vec[:, 1] == 0) & (vec[:, 0] < 0))
    vec[flip] *= -1
    pairs[flip] = pairs[flip][:, ::-1]
    keep = np.hypot(vec[:, 0], vec[:, 1]) >= r_min
    vec, pairs = vec[keep], pairs[keep]
    if len(vec) < DOUBLING_MIN_PAIRS:
        return None
    bin_px = max(0.5, fwhm_px / 4.0)
    nb = int(math.ceil(r_max / bin_px))
    hist, xe, ye = np.histogram2d(vec[:, 0], vec[:, 1], bins=(2 * nb, nb),
                                  range=((-nb * bin_px, nb * bin_px), (0, nb * bin_px)))
    cells = sum(np.roll(np.roll(hist, i, 0), j, 1) for i in (-1, 0, 1) for j in (-1, 0, 1))
    i, j = np.unravel_index(int(np.argmax(cells)), cells.shape)
    peak = float(cells[i, j])
    centre = np.array([0.5 * (xe[i] + xe[i + 1]), 0.5 * (ye[j] + ye[j + 1])])
    # Random pairs at that separation: those in the half-annulus around it, spread evenly.
    r_peak, dist = float(np.hypot(*centre)), np.hypot(vec[:, 0], vec[:, 1])
    lo, hi = max(r_peak - 3 * bin_px, r_min), min(r_peak + 3 * bin_px, r_max)
    in_ring = float(((dist >= lo) & (dist < hi)).sum())
    expected = in_ring * 9 * bin_px ** 2 / (0.5 * math.pi * max(hi ** 2 - lo ** 2, 1e-9))
    near = np.hypot(*(vec - centre).T) <= 1.5 * bin_px * math.sqrt(2)
    paired = np.unique(pairs[near]).size
    if (peak < max(DOUBLING_MIN_PAIRS, DOUBLING_MIN_EXCESS * expected)
            or paired < DOUBLING_MIN_SHARE * idx.size):
        return None
    d = vec[near].mean(axis=0)
    return Doubling(dx_px=float(d[0]), dy_px=float(d[1]), first=idx[pairs[near, 0]],
                    second=idx[pairs[near, 1]])


def _blended_locus_fwhm(sources: pd.DataFrame) -> float:
    """First-guess FWHM from the stellar locus of every star-like detection (S/N at
    least ``DOUBLING_MIN_SNR``), blended, saturated or not."""
    if len(sources) == 0:
        return math.nan
    rh = sources["flux_radius_px"].to_numpy(float)
    cr = cosmic_ray_like(rh, sources["a_px"].to_numpy(float), sources["b_px"].to_numpy(float),
                         sources["theta_deg"].to_numpy(float))
    ok = ~cr & (sources["snr"].to_numpy(float) >= DOUBLING_MIN_SNR)
    centre, _ = stellar_locus(rh[ok])
    return FWHM_PER_HALF_LIGHT_RADIUS * math.exp(centre) if math.isfinite(centre) else math.nan


def _fit_doubled(data, background, mask, sources, doubling: Doubling, locus_fwhm, fwhm0,
                 beta0, cfg) -> _Trail | None:
    """The shared-motion fit on pairs of images, started as a jump along their vector."""
    flags = sources["flags"].to_numpy(np.int64)
    bad = bits("SATURATED", "TRUNCATED", registry=SOURCE_FLAGS)
    i, j = doubling.first, doubling.second
    ok = ((flags[i] | flags[j]) & bad) == 0
    # Both images on the stellar locus (galaxies are doubled too), loosely: faint pairs.
    rh = sources["flux_radius_px"].to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        dev = np.abs(np.log(rh * FWHM_PER_HALF_LIGHT_RADIUS / locus_fwhm))
    ok &= (dev[i] < DOUBLING_LOCUS_TOL) & (dev[j] < DOUBLING_LOCUS_TOL)
    x = sources["x"].to_numpy(float)
    y = sources["y"].to_numpy(float)
    f = np.clip(sources["flux"].to_numpy(float), 1e-6, None)
    mx, my = 0.5 * (x[i] + x[j]), 0.5 * (y[i] + y[j])
    ny, nx = data.shape
    e = cfg.edge_px
    ok &= (mx >= e) & (mx <= nx - 1 - e) & (my >= e) & (my <= ny - 1 - e)
    if 2 * ok.sum() < max(cfg.min_stars, 6):  # two images per pair
        return None
    order = np.argsort(-(f[i] + f[j])[ok])[:TRAILED_MODEL_STARS]
    sel_i, sel_j = i[ok][order], j[ok][order]
    first = float(np.median(f[sel_i] / (f[sel_i] + f[sel_j])))
    angle = math.degrees(math.atan2(doubling.dy_px, doubling.dx_px)) % 180.0
    return _fit_trailed(data, background, mask, 0.5 * (x[sel_i] + x[sel_j]),
                        0.5 * (y[sel_i] + y[sel_j]), f[sel_i] + f[sel_j], fwhm0,
                        doubling.separation_px, angle, beta0, end_weight0=0.95,
                        first_fraction0=first)


def _motion_ellipticity(fwhm_px: float, trail: _Trail) -> float:
    """``1 - b/a`` of a Gaussian-equivalent PSF convolved with the fitted motion kernel."""
    var_psf = (fwhm_px * pm.SIGMA_PER_FWHM) ** 2
    m, f, length = trail.end_weight, trail.first_fraction, trail.length_px
    var_motion = length ** 2 * ((1 - m) / 12.0 + m * f * (1 - f))
    return 1.0 - math.sqrt(var_psf / (var_psf + var_motion))


# ---------------------------------------------------------------------------- the summary


def measure_psf(data: np.ndarray, background: BackgroundResult, sources: pd.DataFrame,
                psf_star: np.ndarray, cfg: PSFConfig,
                mask: np.ndarray | None = None) -> PSFResult:
    """Fit the PSF stars and summarise the detector's PSF size and shape.

    Parameters
    ----------
    data
        Bias-subtracted image (ADU).
    background
        Smooth sky and noise maps of ``data``.
    sources
        Source table from :func:`~survey_qa.pipeline.sources.extract_sources`.
    psf_star
        Boolean selection from :func:`select_psf_stars`.
    cfg
        PSF settings.
    mask
        Optional: True where a pixel must not enter the fits.

    Returns
    -------
    PSFResult
        See the module notes. ``fwhm_px`` is the seeing FWHM (pixels) before
        pixelisation and image motion; NaN with ``FEW_STARS`` when fewer than
        ``cfg.min_stars`` stars are selected, with ``PSF_FIT_FAILED`` when fewer than that
        fit well; ``UNDERSAMPLED`` when ``fwhm_px < 2``; ``DOUBLED_STARS`` when every
        star is seen twice (a jump), measured then on the pairs. ``psf_star`` marks the
        stars whose fits were kept; ``star_fwhm_px`` and ``star_ellipticity`` are theirs.
    """
    n_src = len(sources)
    # Doubled stars are often deblended from each other: their locus counts blends too.
    locus_fwhm = _blended_locus_fwhm(sources)
    order = fit_order(sources, psf_star, cfg)
    doubling = detect_doubling(sources, locus_fwhm)
    single = None
    if order.size >= max(cfg.min_stars, 1):
        single = _measure_single(data, background, mask, sources, order, cfg)
    measured = single is not None and "fwhm_px" in single  # enough good single fits
    if doubling is not None:
        fwhm0 = single["fwhm_px"] if measured else locus_fwhm
        beta0 = single["beta"] if measured else BETA_START
        pairs = _fit_doubled(data, background, mask, sources, doubling, locus_fwhm, fwhm0,
                             beta0, cfg)
        if pairs is not None:
            return _with_fitted(_doubled_result(n_src, cfg, pairs, doubling, single), order)
    if single is None:
        return _with_fitted(_nan_result(n_src, cfg.grid, bits("FEW_STARS")), order)
    if single["n_used"] < cfg.min_stars:
        res = _nan_result(n_src, cfg.grid, bits("PSF_FIT_FAILED"), single["n_used"])
        res.psf_star[single["index"]] = True
        return _with_fitted(res, order)
    return _with_fitted(_single_result(n_src, cfg, data.shape, single), order)


def _with_fitted(res: PSFMeasurement, order: np.ndarray) -> PSFMeasurement:
    """Record which stars were fitted, so that :func:`annotate_sources` need not redo
    :func:`fit_order`."""
    res.fitted = np.zeros(len(res.psf_star), bool)
    res.fitted[order] = True
    return res


def _measure_single(data, background, mask, sources, order, cfg) -> dict:
    """Elliptical fits of the selected stars, then the shared-motion fit if elongated."""
    fwhm_guess, half = _stamp_size(sources, order, cfg)
    col = {c: sources[c].to_numpy(float)[order]
           for c in ("x", "y", "flux", "flux_radius_px", "a_px", "b_px", "theta_deg", "snr")}
    shape, _, good = _fit_elliptical(data, background, mask, col["x"], col["y"], col["flux"],
                                     col["flux_radius_px"], col["a_px"], col["b_px"],
                                     col["theta_deg"], fwhm_guess, half)
    size = np.sqrt(shape["fwhm_major_px"] * shape["fwhm_minor_px"])
    if good.sum() >= cfg.min_stars:
        good[good] &= _clipped(size[good])
    out = {"index": order[good], "n_used": int(good.sum()), "x": col["x"][good],
           "y": col["y"][good]}
    if out["n_used"] < max(cfg.min_stars, 1):
        return out
    size, beta_star = size[good], shape["beta"][good]
    beta = float(np.median(beta_star))
    image_fwhm = pm.pixel_convolved_fwhm(float(np.median(size)), beta)
    # Undersampled stars leave beta free to run to a tiny, steep core that gives the same
    # pixels: the seeing is then the MIN_SEEING_BETA profile of that pixel-convolved FWHM.
    size = _seeing_sizes(size, beta_star)
    e = shape["ellipticity"][good]
    spin2 = e * np.exp(2j * np.radians(shape["theta_deg"][good]))
    resolution = (float(np.median(size)) / image_fwhm) ** 2
    sigma_e = ELLIPTICITY_NOISE_SNR / (np.clip(col["snr"][good], 1.0, None) * resolution)
    elong = coherent_elongation(spin2, sigma_e)
    detected = elong.significance >= ELONGATION_MIN_SIGNIFICANCE
    ratio = trail_ratio(elong.ellipticity) if detected else 0.0
    star_size = size / trail_widening(ratio)
    fwhm_px = float(np.median(star_size))
    if (ratio >= TRAILED_MODEL_MIN_RATIO and elong.coherence >= TRAILED_MODEL_MIN_COHERENCE):
        best = np.flatnonzero(good)[:TRAILED_MODEL_STARS]  # order is by S/N already
        trail = _fit_trailed(data, background, mask, col["x"][best], col["y"][best],
                             col["flux"][best], fwhm_px, ratio * fwhm_px, elong.pa_deg, beta)
        if trail is not None:
            fwhm_px = float(np.median(trail.fwhm_px))
            ratio = trail.length_px / fwhm_px
            star_size = star_size * fwhm_px / float(np.median(star_size))
    out.update(fwhm_px=fwhm_px, beta=beta, e=e, coherence=elong.coherence,
               pa_deg=elong.pa_deg, ratio=ratio, star_size=star_size, image_fwhm=image_fwhm)
    return out


def _per_star(n_src: int, single: dict | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    star_fwhm = np.full(n_src, np.nan)
    star_e = np.full(n_src, np.nan)
    used = np.zeros(n_src, bool)
    if single is not None and "star_size" in single:
        star_fwhm[single["index"]] = single["star_size"]
        star_e[single["index"]] = single["e"]
        used[single["index"]] = True
    return star_fwhm, star_e, used


def _single_result(n_src: int, cfg: PSFConfig, shape: tuple[int, int], s: dict) -> PSFResult:
    star_fwhm, star_e, used = _per_star(n_src, s)
    return PSFMeasurement(
        fwhm_image_px=s["image_fwhm"],
        fwhm_px=s["fwhm_px"], moffat_beta=s["beta"], ellipticity=float(np.median(s["e"])),
        pa_deg=s["pa_deg"], coherence=s["coherence"], trail_ratio=s["ratio"],
        n_used=s["n_used"],
        fwhm_grid_px=_grid_medians(s["x"], s["y"], s["star_size"], shape, cfg.grid),
        ellipticity_grid=_grid_medians(s["x"], s["y"], s["e"], shape, cfg.grid),
        star_fwhm_px=star_fwhm, star_ellipticity=star_e, psf_star=used,
        qa_flags=bits("UNDERSAMPLED") if s["fwhm_px"] < 2.0 else 0)


def _doubled_result(n_src: int, cfg: PSFConfig, trail: _Trail, doubling: Doubling,
                    single: dict | None) -> PSFResult:
    """Summary from the pairs: every star is seen twice (or cut in two), all pairs point
    the same way."""
    fwhm_px = float(np.median(trail.fwhm_px))
    star_fwhm, star_e, used = _per_star(n_src, single)
    vec = np.column_stack([doubling.dx_px, doubling.dy_px])
    # Most weight at the two ends: a jump. Otherwise a long periodic or linear trail whose
    # stars sep cut in two, measured on the pairs all the same.
    flags = bits("DOUBLED_STARS") if trail.end_weight >= 0.5 else 0
    flags |= bits("UNDERSAMPLED") if fwhm_px < 2.0 else 0
    nan_grid = [math.nan] * (cfg.grid * cfg.grid)
    beta = single["beta"] if single and "beta" in single else math.nan
    return PSFMeasurement(
        fwhm_px=fwhm_px, moffat_beta=beta,
        ellipticity=_motion_ellipticity(fwhm_px, trail), pa_deg=trail.angle_deg,
        coherence=1.0 if len(vec) else math.nan, trail_ratio=trail.length_px / fwhm_px,
        n_used=int(len(trail.fwhm_px)), fwhm_grid_px=list(nan_grid),
        ellipticity_grid=list(nan_grid), star_fwhm_px=star_fwhm, star_ellipticity=star_e,
        psf_star=used, qa_flags=flags)


def annotate_sources(sources: pd.DataFrame, psf_star: np.ndarray, psf: PSFResult,
                     shape: tuple[int, int], cfg: PSFConfig,
                     flags: np.ndarray | None = None) -> pd.DataFrame:
    """The source table with the PSF stage's per-star results filled in.

    Parameters
    ----------
    sources
        Source table given to the PSF stage.
    psf_star
        The selection given to :func:`measure_psf`.
    psf
        Its result.
    shape
        Detector shape (ny, nx).
    cfg
        PSF settings.
    flags
        The first result of :func:`selection_flags` when the caller has it already.

    Returns
    -------
    pandas.DataFrame
        A copy with ``fwhm_px`` and ``ellipticity`` of the kept stars, and the selection
        flags, ``PSF_STAR`` and ``FIT_FAILED`` (fitted but rejected) added to ``flags``.
    """
    out = sources.copy()
    if len(out) == 0:
        return out
    if flags is None:
        flags, _ = selection_flags(sources, shape, cfg)
    fitted = getattr(psf, "fitted", None)
    if fitted is None:  # a PSFResult from elsewhere: find which stars the fit took
        fitted = np.zeros(len(out), bool)
        fitted[fit_order(sources, psf_star, cfg)] = True
    flags |= np.where(psf.psf_star, SOURCE_FLAGS["PSF_STAR"].value, 0)
    flags |= np.where(fitted & ~psf.psf_star, SOURCE_FLAGS["FIT_FAILED"].value, 0)
    out["flags"] = flags.astype(np.int64)
    out["fwhm_px"] = psf.star_fwhm_px
    out["ellipticity"] = psf.star_ellipticity
    return out
