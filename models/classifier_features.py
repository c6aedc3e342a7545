"""The learned classifier's features: one exposure row as physical, scale-free numbers.

:func:`feature_vector` turns an exposure row into the model's features (seeing relative
to the survey's limit, trail ratio, elongation coherence, sky non-uniformity...). Pixel
scale, sky level, star counts and other confounders are deliberately left out.
:func:`standardisation` gives the constants the network scales them with, and
:func:`training_domain` the range of measured quantities a trained model has seen.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from survey_qa.config import ClassifyConfig

FEATURE_NAMES = (
    "log_seeing_ratio",       # ln(FWHM / configured seeing limit), arcsec (or px) both
    "ellipticity",            # 1 - b/a of the PSF
    "elongation_coherence",   # 0: directions random over the field, 1: all the same
    "coherent_ellipticity",   # ellipticity x coherence: tracking-like elongation
    "log1p_trail_ratio",      # ln(1 + T/s)
    "log10_sky_nonuniformity",  # log10 of (P99 - P1) / median of the smooth sky
    "fwhm_grid_spread",       # (max - min) / median of the per-region FWHM
    "ellipticity_grid_mean",  # mean per-region ellipticity
    "ellipticity_grid_std",   # its spread over the field (optics vary, tracking does not)
    "log_moffat_beta",        # PSF wing shape, ln(beta)
    "mask_fraction",          # share of the detector the autoencoder masks
    "log_ae_score",           # ln of the autoencoder score (1: like the reference frames)
    "log_src_seeing_ratio",   # as log_seeing_ratio, from the detections' half-light radii
    "src_ellipticity",        # median 1 - b/a of the bright detections (moments)
    "src_coherent_ellipticity",  # src_ellipticity x their direction coherence
)
OPTIONAL_FEATURES = ("fwhm_grid_spread", "ellipticity_grid_mean", "ellipticity_grid_std",
                     "log_moffat_beta", "mask_fraction", "log_ae_score")
"""Features that some instruments or runs cannot give (no autoencoder weights, too few
stars per region): training reports them missing at random so the model copes."""


def _num(row: dict, key: str) -> float:
    value = row.get(key)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def _grid(row: dict, key: str) -> np.ndarray:
    values = row.get(key)
    if values is None:
        return np.zeros(0)
    arr = np.asarray(list(values), dtype=np.float64)
    return arr[np.isfinite(arr)]


def _log_seeing_ratio(fwhm_px: float, pixscale_arcsec: float, cfg: ClassifyConfig) -> float:
    """ln(FWHM / seeing limit), in arcsec, or in pixels when the scale is unknown."""
    if fwhm_px > 0 and pixscale_arcsec > 0:
        return math.log(fwhm_px * pixscale_arcsec / cfg.seeing_limit_arcsec)
    if fwhm_px > 0 and cfg.seeing_limit_px:
        return math.log(fwhm_px / cfg.seeing_limit_px)
    return math.nan


def feature_vector(row: dict, cfg: ClassifyConfig) -> np.ndarray:
    """The classifier's features of one exposure row, NaN where not measured.

    Parameters
    ----------
    row
        An exposure catalog row (``pipeline.schema.EXPOSURE_SCHEMA`` columns).
    cfg
        The survey's limits: the seeing is expressed relative to
        ``seeing_limit_arcsec`` (or ``seeing_limit_px`` when the pixel scale is unknown),
        so a survey that sets its own seeing limit moves the learned boundary with it.

    Returns
    -------
    numpy.ndarray
        ``(len(FEATURE_NAMES),)`` float32.
    """
    scale = _num(row, "pixscale_arcsec")
    src_ell = _num(row, "src_ellipticity")
    ell, coh = _num(row, "ellipticity"), _num(row, "elongation_coherence")
    trail = _num(row, "trail_ratio")
    sky_u = _num(row, "sky_nonuniformity")
    beta = _num(row, "moffat_beta")
    ae_score = _num(row, "ae_score")
    fwhm_grid, ell_grid = _grid(row, "fwhm_grid_px"), _grid(row, "ellipticity_grid")
    spread = math.nan
    if len(fwhm_grid) >= 2 and np.median(fwhm_grid) > 0:
        spread = float((fwhm_grid.max() - fwhm_grid.min()) / np.median(fwhm_grid))
    values = {
        "log_seeing_ratio": _log_seeing_ratio(_num(row, "fwhm_px"), scale, cfg),
        "ellipticity": ell,
        "elongation_coherence": coh,
        "coherent_ellipticity": ell * coh,
        "log1p_trail_ratio": math.log1p(max(trail, 0.0)) if trail == trail else math.nan,
        "log10_sky_nonuniformity": (math.log10(max(sky_u, 1e-4)) if sky_u == sky_u
                                    else math.nan),
        "fwhm_grid_spread": spread,
        "ellipticity_grid_mean": float(ell_grid.mean()) if len(ell_grid) else math.nan,
        "ellipticity_grid_std": float(ell_grid.std()) if len(ell_grid) >= 2 else math.nan,
        "log_moffat_beta": math.log(beta) if beta > 0 else math.nan,
        "mask_fraction": _num(row, "mask_fraction"),
        "log_ae_score": math.log(ae_score) if ae_score > 0 else math.nan,
        "log_src_seeing_ratio": _log_seeing_ratio(_num(row, "src_fwhm_px"), scale, cfg),
        "src_ellipticity": src_ell,
        "src_coherent_ellipticity": src_ell * _num(row, "src_elongation_coherence"),
    }
    return np.array([values[n] for n in FEATURE_NAMES], dtype=np.float32)


def feature_matrix(rows: pd.DataFrame, cfg: ClassifyConfig) -> np.ndarray:
    """:func:`feature_vector` of every row: ``(n, len(FEATURE_NAMES))`` float32."""
    out = np.full((len(rows), len(FEATURE_NAMES)), np.nan, dtype=np.float32)
    for i, row in enumerate(rows.to_dict("records")):
        out[i] = feature_vector(row, cfg)
    return out


def standardisation(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation, ignoring NaN (0 and 1 when all NaN)."""
    features = np.asarray(features, dtype=np.float64)
    finite = np.isfinite(features)
    n = finite.sum(axis=0)
    filled = np.where(finite, features, 0.0)
    mean = np.divide(filled.sum(0), n, out=np.zeros(features.shape[1]), where=n > 0)
    var = np.divide((np.where(finite, features - mean, 0.0) ** 2).sum(0), n,
                    out=np.ones(features.shape[1]), where=n > 0)
    std = np.sqrt(var)
    std[~(std > 1e-6)] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


# ---------------------------------------------------------------------------- domain

DOMAIN_COLUMNS = ("pixscale_arcsec", "fwhm_px", "fwhm_arcsec")
"""Measured quantities whose training range is saved with the weights. The features are
scale-free, so frame size and source counts are left out: a 4k frame of a familiar
instrument is not out of the domain."""


def training_domain(table: pd.DataFrame, columns: tuple[str, ...] = DOMAIN_COLUMNS
                    ) -> tuple[dict, dict]:
    """The training domain of a classifier: the range of each quantity over its detectors.

    Returns ``(domain, stats)``: ``domain`` maps a column to ``[min, max]`` of its finite
    values (the form :func:`survey_qa.pipeline.decide.outside_domain` reads: outside it,
    the rules decide); ``stats`` adds percentiles 1 and 99 and the counts.
    """
    domain, stats = {}, {}
    for col in columns:
        if col not in table:
            continue
        v = pd.to_numeric(table[col], errors="coerce").to_numpy(dtype=np.float64)
        finite = v[np.isfinite(v)]
        stats[col] = {"n_finite": int(finite.size), "n": int(v.size)}
        if finite.size:
            domain[col] = [float(finite.min()), float(finite.max())]
            p01, p99 = np.percentile(finite, [1.0, 99.0])
            stats[col].update(p01=float(p01), p99=float(p99))
    return domain, stats
