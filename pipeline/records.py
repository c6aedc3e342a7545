"""Typed records passed between stages."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class FrameMeta:
    """Header facts of one detector after configuration fallbacks.

    ``pixscale_arcsec`` is NaN when no source gave it (``pixscale_source == "none"``).
    """

    date_obs: str = ""
    mjd_obs: float = math.nan
    exptime_s: float = math.nan
    filter: str = ""
    airmass: float = math.nan
    object: str = ""
    ra_deg: float = math.nan  # frame centre (WCS) or pointing keywords
    dec_deg: float = math.nan
    expnum: str = ""
    gain_e_per_adu: float = math.nan
    read_noise_e: float = math.nan
    saturate_adu: float = math.nan
    pixscale_arcsec: float = math.nan
    pixscale_source: str = "none"  # wcs | keyword | config | none
    pixscale_keyword: str = ""  # the keyword(s) it came from, e.g. "IM_SCALE", "XPIXSZ/FOCALLEN"
    image_type: str = "light"  # light | bias | dark | flat | arc
    image_type_source: str = "default"  # e.g. "IMAGETYP = 'Bias Frame'", "EXPTIME = 0"
    fallbacks: tuple[str, ...] = ()  # header keywords replaced by configuration values


@dataclass
class DetectorImage:
    """One detector's pixels, ready to measure.

    ``data`` is native-endian, C-contiguous float32 (what sep needs). ``mask`` is True
    where a pixel must not be used (non-finite, saturated, bad).
    """

    exposure: str
    detector: str
    hdu: int
    path: str
    data: np.ndarray
    mask: np.ndarray
    meta: FrameMeta
    n_detectors: int = 1
    qa_flags: int = 0


@dataclass
class BackgroundResult:
    """Smooth sky and its statistics (ADU)."""

    level: float  # median sky
    noise: float  # global RMS of the sky noise
    nonuniformity: float  # (P99 - P1) / median of the smooth sky
    back: np.ndarray = field(repr=False)  # smooth sky, full size, float32
    rms: np.ndarray = field(repr=False)  # noise map, full size, float32
    mesh_px: int = 0  # mesh size of the sky map (pixels); 0: no map (flat sky)
    qa_flags: int = 0  # SKY_FALLBACK, SKY_UNMEASURED


@dataclass
class PSFResult:
    """PSF size and shape over one detector.

    Per-star arrays are aligned with the source table given to the PSF stage; stars not
    fitted are NaN there.
    """

    fwhm_px: float
    moffat_beta: float
    ellipticity: float
    pa_deg: float  # position angle of the major axis, degrees from +x towards +y, in [0, 180)
    coherence: float  # 0: directions random over the field, 1: all the same
    trail_ratio: float  # trail length over seeing FWHM, inferred from the PSF shape
    n_used: int
    fwhm_grid_px: list[float]  # grid x grid regions, row-major from the (0, 0) corner
    ellipticity_grid: list[float]
    star_fwhm_px: np.ndarray = field(repr=False)
    star_ellipticity: np.ndarray = field(repr=False)
    psf_star: np.ndarray = field(repr=False)  # bool, used for the PSF
    qa_flags: int = 0


@dataclass
class ClassResult:
    """A quality decision with its probabilities and defect flags."""

    quality_class: str
    probabilities: dict[str, float]
    flag_bad_seeing: bool
    flag_tracking: str  # none | bad | very_bad
    flag_background: bool
    classifier: str
