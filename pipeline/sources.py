"""Source extraction with sep, translated to the source schema.

Detection is at ``thresh_sigma`` times the global sky RMS (a noise map doubles sep's
time for little gain on survey frames). Per detection: sep's isophotal shape (``a_px``,
``b_px``, ``theta_deg``), a Kron ("AUTO") aperture flux with its error from the local sky
noise map, the half-light radius, the S/N, and a windowed centroid (``sep.winpos``,
SExtractor's XWIN/YWIN; aperture boundaries sampled 3 x 3 per pixel, once per pixel for
apertures of at least ``FINE_APERTURE_MAX_PX``). Saturated pixels
are masked for sep (sep has no saturation flag of its own); a detection touching a
saturated pixel gets the ``SATURATED`` source flag. Connected regions above the
threshold of :data:`LARGE_REGION_PX` pixels or more are masked before detection.

sep keeps its pixel stack and sub-object limit in process-global state:
:func:`configure_sep` sets them once per process. sep allocates the whole pixel stack on
every extraction (a 5-million-pixel stack costs ~0.3 s per call, more than detecting a
small frame), so the stack starts at sep's own default (``START_PIXSTACK``) and grows
fourfold, up to ``cfg.pixstack``, when a frame overflows it; the grown size is kept for
the next frames of the process. Beyond ``cfg.pixstack``, the detection threshold is
raised and the extraction retried.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import sep

from survey_qa.config import SourcesConfig
from scipy import ndimage

from survey_qa.pipeline.background import block_sum, grow_mask
from survey_qa.pipeline.errors import QualityError
from survey_qa.pipeline.flags import SOURCE_FLAGS, from_sep
from survey_qa.pipeline.records import BackgroundResult
from survey_qa.pipeline.schema import SOURCE_SCHEMA

START_PIXSTACK = 300_000
"""First size of sep's pixel stack (sep's default); see the module notes."""

PIXSTACK_GROWTH = 4

SUB_OBJECT_LIMIT = 4096
"""sep's limit on sub-objects when deblending one detection (its default is 1024)."""

OVERFLOW_MESSAGES = ("internal pixel buffer full", "deblending overflow")
"""sep errors that a higher detection threshold resolves."""

MAX_RETRIES = 4
THRESH_FACTOR_PER_RETRY = 2.0
FINE_APERTURE_MAX_PX = 10.0
"""Apertures (flux radius, 4-sigma winpos windows) at least this wide are sampled once per
pixel instead of 3 x 3: the sub-pixel boundary is a negligible part of them."""

FLUX_RADIUS_MAX_PX = 60.0
"""Largest aperture searched for the half-light radius: a detection whose half light lies
farther out (a halo, a ghost, a big galaxy) is far off the stellar locus either way."""

LARGE_REGION_PX = 50_000
LARGE_REGION_BLOCK_PX = 4
"""A connected region above the detection threshold of at least ``LARGE_REGION_PX``
pixels (a disk of 126 px radius) is not a source but sky structure (glow, the Milky Way,
a fisheye's horizon), a nebula, a large galaxy or the halo of a very bright star: no star
in it is fit for the PSF, and sep's deblending of one such region costs seconds. Such
regions are found on the frame averaged over ``LARGE_REGION_BLOCK_PX`` blocks and masked
before detection (:func:`large_regions`)."""

WINPOS_MAX_SIGMA_PX = 10.0
"""Widest window of the windowed centroid (sigma, pixels): stars up to ~25 px FWHM (donuts)
get their matched window; halos, ghosts and galaxies with half-light radii of 100 px and
more would otherwise cost more than all the stars."""

KRON_FACTOR = 2.5
MIN_KRON_RADIUS_PX = 1.75
"""Detections whose Kron radius (kron x sqrt(a b), pixels) is under this get a circular
aperture of KRON_FACTOR times it instead (as sep's documentation does for FLUX_AUTO)."""

COLUMNS = [n for n in SOURCE_SCHEMA.names if n not in ("exposure", "detector")]


def configure_sep(cfg: SourcesConfig) -> None:
    """Set sep's process-global pixel stack and sub-object limit (once per process).

    The pixel stack starts at ``min(START_PIXSTACK, cfg.pixstack)``; a stack already grown
    by :func:`extract_sources` (up to ``cfg.pixstack``) is kept. Calling it again with the
    same configuration changes nothing, so a worker may call it before every frame.
    """
    current = sep.get_extract_pixstack()
    if not (min(START_PIXSTACK, cfg.pixstack) <= current <= cfg.pixstack):
        sep.set_extract_pixstack(min(START_PIXSTACK, cfg.pixstack))
    if sep.get_sub_object_limit() < SUB_OBJECT_LIMIT:
        sep.set_sub_object_limit(SUB_OBJECT_LIMIT)


def empty_sources() -> pd.DataFrame:
    """A source table with every column and no row."""
    table = SOURCE_SCHEMA.empty_table().to_pandas()
    return table[COLUMNS]


def _extract(sub: np.ndarray, noise: float, mask: np.ndarray, cfg: SourcesConfig):
    """sep.extract; on overflow, a larger pixel stack (up to ``cfg.pixstack``), then a
    higher threshold."""
    thresh = cfg.thresh_sigma
    attempt = 0
    while True:
        try:
            objects, segmap = sep.extract(sub, thresh, err=noise, mask=mask,
                                          minarea=cfg.min_area_px,
                                          deblend_cont=cfg.deblend_cont,
                                          segmentation_map=True)
            return objects, segmap, thresh
        except Exception as e:  # sep raises a bare Exception with its C message
            overflow = any(m in str(e) for m in OVERFLOW_MESSAGES)
            stack = sep.get_extract_pixstack()
            if overflow and "pixel buffer" in str(e) and stack < cfg.pixstack:
                sep.set_extract_pixstack(min(PIXSTACK_GROWTH * stack, cfg.pixstack))
                continue
            if not overflow or attempt == MAX_RETRIES:
                raise QualityError(f"source extraction failed at {thresh:g} sigma: {e}",
                                   thresh_sigma=thresh) from None
            attempt += 1
            thresh *= THRESH_FACTOR_PER_RETRY


def large_regions(sub: np.ndarray, noise: float, mask: np.ndarray, thresh_sigma: float
                  ) -> np.ndarray | None:
    """Pixels of the connected regions above the detection threshold that cover at least
    :data:`LARGE_REGION_PX` pixels, or None when there is none.

    Found on block means (``LARGE_REGION_BLOCK_PX`` square, masked pixels counted as sky)
    above ``thresh_sigma`` times the per-pixel noise: the mean light of the region, not
    single pixels, must pass the detection threshold, so that the overlapping wings of a
    crowded star field do not make one region. Grown by one block so that the region's
    edge is covered at full resolution.
    """
    b = LARGE_REGION_BLOCK_PX
    means = block_sum(np.where(mask, np.float32(0), sub), b) / np.float32(b * b)
    labels, n = ndimage.label(means > thresh_sigma * noise)
    if n == 0:
        return None
    area_px = np.bincount(labels.ravel(), minlength=n + 1) * b * b
    area_px[0] = 0
    large = area_px >= LARGE_REGION_PX
    if not large.any():
        return None
    blocks = grow_mask(large[labels], 1)
    out = np.zeros(sub.shape, bool)
    ny, nx = blocks.shape[0] * b, blocks.shape[1] * b
    out[:ny, :nx] = blocks.repeat(b, axis=0).repeat(b, axis=1)
    return out


def saturated_pixels(data: np.ndarray, saturate_adu: float) -> np.ndarray:
    """Finite pixels at or above the saturation level (ADU); none when it is unknown (NaN).

    Returns
    -------
    numpy.ndarray
        bool, the shape of ``data``.
    """
    if not math.isfinite(saturate_adu):
        return np.zeros(data.shape, dtype=bool)
    return np.isfinite(data) & (data >= saturate_adu)


def _saturated_ids(segmap: np.ndarray, saturated: np.ndarray) -> np.ndarray:
    """Segmentation ids of detections that touch (within 2 px) a saturated pixel."""
    if not saturated.any():
        return np.empty(0, np.int64)
    near = grow_mask(saturated, 2)
    ids = np.unique(segmap[near])
    return ids[ids > 0].astype(np.int64)


def _photometry(sub, rms, mask, segmap, objects, seg_ids):
    """Kron (AUTO) flux and error, and half-light radius, as SExtractor does."""
    x, y = objects["x"], objects["y"]
    # sep rejects degenerate ellipses: give those a unit circle (they get the fixed
    # minimum aperture below anyway).
    ok = (np.isfinite(objects["a"]) & np.isfinite(objects["b"]) & np.isfinite(objects["theta"])
          & (objects["a"] > 0) & (objects["b"] > 0))
    a, b = np.where(ok, objects["a"], 1.0), np.where(ok, objects["b"], 1.0)
    # float32 theta can round just past pi/2, which sep's aperture functions reject.
    theta = np.clip(np.where(ok, objects["theta"], 0.0), -np.pi / 2, np.pi / 2)
    kron, _ = sep.kron_radius(sub, x, y, a, b, theta, 6.0, mask=mask, segmap=segmap,
                              seg_id=seg_ids)
    kron = np.where(ok & np.isfinite(kron) & (kron > 0), kron, 0.0)
    flux, flux_err, flag = sep.sum_ellipse(sub, x, y, a, b, theta,
                                           np.maximum(KRON_FACTOR * kron, 1e-3), err=rms,
                                           mask=mask, segmap=segmap, seg_id=seg_ids, subpix=1)
    small = kron * np.sqrt(a * b) < MIN_KRON_RADIUS_PX
    if small.any():
        cf, ce, cflag = sep.sum_circle(sub, x[small], y[small], MIN_KRON_RADIUS_PX * KRON_FACTOR,
                                       err=rms, mask=mask, segmap=segmap,
                                       seg_id=seg_ids[small], subpix=1)
        flux[small], flux_err[small], flag[small] = cf, ce, cflag
    rmax = np.clip(6.0 * a, 3.0, FLUX_RADIUS_MAX_PX)  # a is finite and positive here
    positive = flux > 0
    rhalf = np.full(len(objects), np.nan)
    # Sub-pixel sampling matters for small apertures only; on wide ones (bright stars,
    # galaxies, donuts) it would cost 9 times the pixels for nothing.
    for sel, subpix in ((positive & (rmax < FINE_APERTURE_MAX_PX), 3),
                        (positive & (rmax >= FINE_APERTURE_MAX_PX), 1)):
        if sel.any():
            rhalf[sel], _ = sep.flux_radius(sub, x[sel], y[sel], rmax[sel], 0.5,
                                            normflux=flux[sel], mask=mask, segmap=segmap,
                                            seg_id=seg_ids[sel], subpix=subpix)
    return flux, flux_err, rhalf


def _windowed_centroids(sub, mask, x, y, rhalf):
    """sep.winpos centroids; the isophotal barycentre where winpos fails or wanders."""
    sig = np.where(np.isfinite(rhalf), 2.0 * rhalf / 2.3548, 1.0)
    sig = np.minimum(sig, WINPOS_MAX_SIGMA_PX)
    xw, yw = np.full(len(x), np.nan), np.full(len(x), np.nan)
    flag = np.zeros(len(x), np.int64)
    small = sig < FINE_APERTURE_MAX_PX / 4.0  # winpos reaches 4 sigma
    for sel, subpix in ((small, 3), (~small, 1)):
        if sel.any():
            xw[sel], yw[sel], flag[sel] = sep.winpos(sub, x[sel], y[sel], sig[sel],
                                                     mask=mask, subpix=subpix)
    moved = np.hypot(xw - x, yw - y)
    ok = (flag == 0) & np.isfinite(xw) & np.isfinite(yw) & (moved < np.maximum(1.0, sig))
    return np.where(ok, xw, x), np.where(ok, yw, y)


def extract_sources(data: np.ndarray, background: BackgroundResult, mask: np.ndarray | None,
                    cfg: SourcesConfig, saturate_adu: float) -> pd.DataFrame:
    """Detect and measure the sources of one detector.

    Parameters
    ----------
    data
        Bias-subtracted image (ADU).
    background
        Its smooth sky and noise maps (:func:`~survey_qa.pipeline.background.measure_background`).
    mask
        True where a pixel must not be used; None: none.
    cfg
        Detection settings.
    saturate_adu
        Saturation level (ADU); NaN when unknown (then only ``mask`` is used).

    Returns
    -------
    pandas.DataFrame
        The :data:`~survey_qa.pipeline.schema.SOURCE_SCHEMA` columns except ``exposure``
        and ``detector``, brightest first, at most ``cfg.max_sources`` rows. ``x``, ``y``
        are 0-based windowed centroids (pixel centres at integers); ``flux`` is the
        Kron aperture flux (ADU) and ``flux_err`` its error from the sky noise alone;
        ``snr = flux / flux_err``; ``fwhm_px`` and ``ellipticity`` are NaN (the PSF stage
        measures them). ``df.attrs["thresh_sigma"]`` is the threshold finally used,
        ``df.attrs["large_region_px"]`` the pixels of large regions masked before
        detection (:func:`large_regions`).

    Raises
    ------
    QualityError
        When sep fails even at a raised threshold.
    """
    configure_sep(cfg)
    data = np.ascontiguousarray(data, dtype=np.float32)
    mask = (np.zeros(data.shape, bool) if mask is None
            else np.ascontiguousarray(mask, dtype=bool))
    saturated = saturated_pixels(data, saturate_adu)
    full_mask = mask | saturated
    sub = np.subtract(data, background.back, dtype=np.float32)
    rms = np.ascontiguousarray(background.rms, dtype=np.float32)
    large = large_regions(sub, float(background.noise), full_mask, cfg.thresh_sigma)
    large_px = 0
    if large is not None:
        large_px = int(np.count_nonzero(large & ~full_mask))
        full_mask |= large
    objects, segmap, thresh = _extract(sub, float(background.noise), full_mask, cfg)
    if len(objects) == 0:
        out = empty_sources()
        out.attrs.update(thresh_sigma=thresh, large_region_px=large_px)
        return out

    order = np.argsort(-objects["flux"], kind="stable")[:cfg.max_sources]
    objects = objects[order]
    seg_ids = (order + 1).astype(np.int32)
    flux, flux_err, rhalf = _photometry(sub, rms, full_mask, segmap, objects, seg_ids)
    x, y = _windowed_centroids(sub, full_mask, objects["x"], objects["y"], rhalf)

    flags = from_sep(objects["flag"])
    sat = np.isin(seg_ids, _saturated_ids(segmap, saturated))
    flags |= np.where(sat, SOURCE_FLAGS["SATURATED"].value, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(flux_err > 0, flux / flux_err, np.nan)

    out = pd.DataFrame({
        "id": np.zeros(len(objects), np.int32), "x": x, "y": y,
        "flux": flux, "flux_err": flux_err, "peak": objects["peak"].astype(float),
        "snr": snr, "a_px": objects["a"].astype(float), "b_px": objects["b"].astype(float),
        "theta_deg": np.degrees(objects["theta"].astype(float)),
        "flux_radius_px": rhalf, "fwhm_px": np.nan, "ellipticity": np.nan,
        "flags": flags.astype(np.int64),
    })
    out = out.sort_values("flux", ascending=False, kind="stable", ignore_index=True)
    out["id"] = np.arange(len(out), dtype=np.int32)
    out = out.astype({c: "float64" for c in COLUMNS if c not in ("id", "flags")})
    out = out[COLUMNS]
    out.attrs.update(thresh_sigma=thresh, large_region_px=large_px)
    return out
