"""Simulated survey frames with known truth (GalSim + numpy), following quality-classes.md.

Pure functions, no file I/O: :func:`draw_spec` samples the physical parameters of one
exposure for a quality class, :func:`render_detector` renders one detector of it, and
:func:`build_hdulist` / :func:`mask_hdulist` assemble FITS HDUs in memory. The flow
``survey_qa.flows.simulate`` writes whole nights to disk.

Conventions
-----------
- Pixel coordinates are 0-based with pixel centres at integers (numpy convention); a
  detector image is indexed ``image[y, x]``.
- Position angles are degrees from +x towards +y, in [0, 180).
- Images are calibrated frames in ADU: bias removed, sky kept, float32. Poisson noise
  (Gaussian approximation where the expected count exceeds ``POISSON_EXACT_BELOW_E``),
  read noise, then clipping at ``SATURATE``. A raw frame (``raw``) is written as the
  camera writes it: ``uint16`` with its bias level, prescan and overscan
  (``BIASSEC``/``DATASEC``/``TRIMSEC``); ``SimDetector.image`` is then its exposed
  pixels less the bias, the grid the reader measures.

Domains
-------
``default`` (survey telescopes: 0.15-0.5"/px, calibrated square detectors) draws what it
always drew for a given seed. ``wide`` widens the draws to real instruments: pixel scales
0.1-15"/px, FWHM 1.2-20 px, bad seeing up to tens of arcsec, detectors of 500 px to
``size_px`` (aspect 1-1.5), and the :data:`WIDE_CONFOUNDERS` (raw frames, vignetting and
dust donuts, Bayer frames, defocused donut PSFs, sparse fields of 12-30 stars), with at
least 60 stars per detector otherwise (about 20 above S/N 10). A wide night is taken with
one to three instruments (:func:`camera_of`): the frames of one share their detector shape,
filters, raw layout and illumination pattern (vignetting, dust), so that a pipeline can
learn that pattern from the night, as on a real night; the pixel scale follows each frame's
seeing, so that every class spans the FWHM range.

- **Illumination** (:func:`illumination`): vignetting and dust donuts multiply sky and
  sources alike, as an uncorrected flat field does; so does the colour-filter response
  of a Bayer frame. They are not light the sky adds: ``u_true`` is computed before them
  and they change no class (``flat_nonuniformity`` records what they would add).
- **Defocus**: the round PSF is the atmosphere convolved with the pupil's image (an
  annulus with the central obstruction). The spec's seeing ``s`` is the FWHM of the round
  PSF that atmosphere and optics give, so a defocused frame's truth ``s`` is the effective
  FWHM of its donut PSF (:func:`effective_fwhm`: twice the outermost half-maximum
  radius); the frame is ``bad_seeing`` only when that FWHM is past the seeing limit.

Physical model of a detector
----------------------------
- **PSF**: a round Moffat (beta 2.5-5) or Kolmogorov profile of FWHM ``s`` (the seeing),
  optionally sheared and dilated by field-dependent optics, convolved with the image-motion
  kernel (the time density of the drift path, the same for every star) and with the pixel.
  The effective PSF is drawn once per region of the field on a grid oversampled ``O`` times
  (``O`` = 2-8, so that a fine pixel is at most FWHM/16); a star at a sub-pixel position is
  the bilinear blend of the four nearest phase-shifted samplings. Bright stars get the far
  wings from a wide, once-per-detector PSF (with diffraction spikes when the telescope has a
  spider). Charge above the full well bleeds along columns, conserving charge.
- **Sky**: a smooth sky built on a coarse node grid and upsampled with Catmull-Rom
  interpolation. Smooth sky ``S = B * t + E * (1 - t) + L`` where ``B`` is the undisturbed
  sky (with a weak natural gradient), ``t = 10**(-0.4 * K)`` the transmission of patchy
  cloud with extinction map ``K`` (mag), ``E`` the light scattered by the clouds and ``L``
  the light added by a background defect (gradient, scattered light, glow).
- **Truth quantities** (per detector, computed from what is in the image):
  ``u_true = (P99 - P1) / median`` of the full-resolution smooth sky ``S`` (every second
  pixel in each direction; ``S`` varies on scales of tens of pixels);
  ``k_true = P99 - P1`` of the patchy extinction map ``K`` (a uniform grey extinction,
  ``transparency_mag``, dims sources but changes no class).
- **Defect mask**: ``True`` where the defect light exceeds ``MASK_LIGHT_FRACTION`` (5 %) of
  the undisturbed sky level (``L / sky > 0.05``) or where the patchy extinction exceeds
  ``MASK_EXTINCTION_MAG`` (0.10 mag). A frame without a background defect has an empty
  mask (its natural gradient and thin cirrus stay below both limits).

Truth classes
-------------
:func:`truth_class` applies the limits of the spec (``LIMITS``) with the pipeline's
priority rule (:func:`survey_qa.pipeline.classify.primary_class`). Values inside a gap of the
spec (e.g. 1.2" < s < 1.6") are decided at the middle of the gap and the detector is marked
``ambiguous`` when the value in the gap could change its primary class. A mosaic exposure
takes the pipeline's mosaic rule (:func:`exposure_class`: the worst class held by at least a
quarter of its detectors, ``good`` when none reaches a quarter).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import galsim
import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.time import Time
from scipy import ndimage, optimize, sparse
from scipy.signal import fftconvolve

from survey_qa.pipeline.classify import mosaic_class, primary_class
from survey_qa.pipeline.schema import CLASSES, PRIORITY

TRAIL_KINDS = ("none", "linear", "periodic", "wind", "jump")
BACKGROUND_KINDS = ("none", "gradient", "cloud", "scattered", "glow")
FILE_FORMATS = ("fits", "fits.fz", "fits.gz", "mosaic", "mosaic.fz")
PSF_PROFILES = ("moffat", "kolmogorov")
HEADER_STYLES = ("wcs", "pixscale", "secpix", "sparse")

CONFOUNDERS: dict[str, float] = {
    "optics": 0.25,           # field-dependent astigmatism/defocus, radial or tangential
    "undersampled": 0.12,     # FWHM under 2 pixels
    "satellite": 0.12,        # satellite trail(s) across the field
    "aircraft": 0.05,         # aircraft: parallel blinking lines
    "cosmic_rays": 0.6,
    "hot_pixels": 0.5,
    "bad_columns": 0.2,
    "saturated_stars": 0.4,   # with bleed trails (and diffraction spikes on some)
    "crowded": 0.12,          # dense field with a star cluster
    "galaxies": 0.6,
    "nebula": 0.08,           # extended emission: real sky, not a background issue
    "bright_galaxy": 0.08,    # a large bright galaxy in the field
    "bright_sky": 0.12,       # a uniformly bright (moonlit) but flat sky
}
"""Confounders (spec: 'What does NOT change the class') and the share of frames of every
class that carry each of them when ``confounder_rate`` is 1."""

DOMAINS = ("default", "wide")
"""``default``: calibrated frames of survey telescopes (0.15-0.5"/px, square detectors).
``wide``: frames as wide as real instruments give them (see :data:`WIDE`)."""

WIDE_CONFOUNDERS: dict[str, float] = {
    "raw": 0.5,          # as the camera writes it: bias, prescan/overscan, uint16, hot pixels
    "vignetting": 0.5,   # uncorrected flat: multiplicative radial falloff (sky and stars)
    "dust": 0.3,         # dust donuts: multiplicative rings of a few % (uncorrected flat)
    "bayer": 0.12,       # one-shot colour camera: RGGB colour-filter array (single chips)
    "defocus": 0.12,     # donut PSF (central obstruction); its FWHM is the seeing truth
    "sparse": 0.15,      # a sparse field: 12-30 stars per detector, all measurable
}
"""Confounders of the wide domain and the share of its frames that carry each of them.
A frame of the default domain gets them only when they are asked for (``confounders=``).
None of them changes the class: vignetting and dust multiply sky and sources alike (they
are not light the sky adds), raw frames and Bayer frames are calibrated by the reader,
and a defocused frame's seeing truth is the FWHM of its donut PSF."""


@dataclass(frozen=True)
class WideDomain:
    """Ranges of the wide domain: frames as wide as real instruments give them."""

    pixscale_arcsec: tuple[float, float] = (0.1, 15.0)
    fwhm_px: tuple[float, float] = (1.2, 20.0)
    min_side_px: int = 500
    bad_seeing_arcsec: tuple[float, float] = (1.6, 60.0)  # coarse cameras: tens of arcsec
    sparse_stars: tuple[int, int] = (12, 30)   # all of them bright enough to measure
    min_stars_per_detector: float = 60.0       # expected, down to S/N 2: ~20 above S/N 10
    stars_per_detector: tuple[float, float] = (300.0, 6000.0)  # most expected, per detector
    defocus_min_fwhm_px: float = 4.0   # smaller donuts are not resolved
    bayer_min_fwhm_px: float = 2.4     # binned 2x2 by the reader: at least 1.2 px after


WIDE = WideDomain()

SENSITIVE_KEYS = ("GAIN", "RDNOISE", "SATURATE", "AIRMASS", "FILTER", "OBJECT", "EXPNUM",
                  "MJD-OBS")
"""Keywords that 'sparse' header style may leave out."""

MASK_LIGHT_FRACTION = 0.05
MAX_DEFECT_LIGHT = 50.0  # most defect light, in units of the sky level
MASK_EXTINCTION_MAG = 0.10
POISSON_EXACT_BELOW_E = 50.0
ARCSEC_PER_DEG = 3600.0
_FILTERS = {  # filter -> sky rate range (electrons / s / arcsec^2) for a 1-4 m telescope
    "u": (1.0, 40.0), "g": (3.0, 120.0), "r": (5.0, 250.0), "i": (8.0, 400.0),
    "z": (10.0, 500.0), "V": (4.0, 200.0), "R": (5.0, 250.0), "B": (2.0, 80.0),
    "Ha": (0.3, 10.0), "L": (5.0, 300.0),
}


@dataclass(frozen=True)
class Limits:
    """Class limits of quality-classes.md (the spec's defaults)."""

    good_seeing_arcsec: float = 1.2
    bad_seeing_arcsec: float = 1.6
    good_trail_ratio: float = 0.5
    bad_trail_ratio: float = 1.0
    very_bad_trail_ratio: float = 3.0
    jump_trail_ratio: float = 2.0  # a jump of >= 2 s doubles the stars: very bad tracking
    good_u: float = 0.03
    good_k_mag: float = 0.05
    bad_u: float = 0.10
    bad_k_mag: float = 0.25


LIMITS = Limits()


@dataclass
class ExposureSpec:
    """Every truth parameter of one simulated exposure.

    Sizes are per detector. ``background_strength`` is the target non-uniformity ``u``
    (gradient, scattered, glow) or extinction spread ``k`` in mag (cloud) reached by the
    worst quarter of the detectors. Exposure-wide structures (drift path, sky patterns,
    clouds, satellite tracks, optics) derive from ``field_seed`` so that all detectors of
    a mosaic share them.
    """

    exposure: str
    target_class: str
    ambiguous: bool
    seeing_arcsec: float
    psf_profile: str
    moffat_beta: float
    trail_arcsec: float
    trail_pa_deg: float
    trail_kind: str
    jump_fraction: float
    periodic_period_s: float
    background_kind: str
    background_strength: float
    cloud_extinction_mag: float
    cloud_emission: float
    transparency_mag: float
    natural_gradient: float
    pixscale_arcsec: float
    nx: int
    ny: int
    n_detectors: int
    mosaic_cols: int
    mosaic_rows: int
    gap_px: int
    file_format: str
    sky_level_adu: float
    star_density_per_arcmin2: float
    cluster_fraction: float
    galaxy_density_per_arcmin2: float
    n_bright_stars: int
    gain_e_per_adu: float
    read_noise_e: float
    exptime_s: float
    filter: str
    saturate_adu: float
    full_well_e: float
    header_style: str
    missing_keys: tuple[str, ...]
    confounders: tuple[str, ...]
    optics_shear: float
    optics_pattern: str
    optics_fwhm_growth: float
    spikes: bool
    cosmic_ray_rate: float  # events / cm^2 / min
    pixel_size_um: float
    hot_pixel_fraction: float
    n_bad_columns: int
    n_satellites: int
    date_obs: str
    mjd_obs: float
    airmass: float
    object_name: str
    expnum: int
    ra_deg: float
    dec_deg: float
    rotation_deg: float
    field_seed: int
    # wide domain (defaults: a calibrated frame without them, as before)
    domain: str = "default"
    raw: bool = False            # bias level and overscan kept, uint16 with BZERO
    bias_adu: float = 0.0
    prescan_px: int = 0          # columns before the exposed area
    overscan_px: int = 0         # columns after it (BIASSEC)
    overscan_rows: int = 0       # rows above it
    vignetting_corner: float = 0.0  # fractional loss of light at the focal-plane corner
    vignetting_dx: float = 0.0   # optical axis offset from the focal-plane centre, in
    vignetting_dy: float = 0.0   # units of its width and height
    dust_per_detector: float = 0.0  # mean number of dust donuts per detector
    bayer_pattern: str = ""      # e.g. RGGB: colour of pixels (0,0), (0,1), (1,0), (1,1)
    bayer_red: float = 1.0       # response of the red and blue pixels relative to green
    bayer_blue: float = 1.0
    defocus_ratio: float = 0.0   # outer diameter of the geometric donut / seeing FWHM
    obscuration: float = 0.0     # central obstruction (inner / outer diameter)
    camera_seed: int = -1        # the night's instrument (wide domain); -1: this frame's own

    @property
    def trail_ratio(self) -> float:
        """Trail length over seeing FWHM, ``r = T / s``."""
        return self.trail_arcsec / self.seeing_arcsec

    @property
    def fwhm_px(self) -> float:
        """Seeing FWHM in pixels (round PSF, before image motion and pixelisation)."""
        return self.seeing_arcsec / self.pixscale_arcsec

    @property
    def atm_fwhm_arcsec(self) -> float:
        """FWHM of the atmospheric (Moffat or Kolmogorov) part of the PSF.

        Equal to ``seeing_arcsec`` unless the frame is defocused: then the donut of
        ``defocus_ratio`` takes part of the effective FWHM, which stays ``seeing_arcsec``.
        """
        if self.defocus_ratio <= 0:
            return self.seeing_arcsec
        beta = self.moffat_beta if self.psf_profile == "moffat" else 0.0
        return self.seeing_arcsec * _atm_ratio(self.psf_profile, beta, self.defocus_ratio,
                                               self.obscuration)

    @property
    def sky_e(self) -> float:
        """Undisturbed sky level in electrons per pixel."""
        return self.sky_level_adu * self.gain_e_per_adu

    def to_row(self) -> dict:
        """Flat dict of the fields (tuples joined with commas) for a truth table."""
        row = dataclasses.asdict(self)
        for key, value in row.items():
            if isinstance(value, tuple):
                row[key] = ",".join(value)
        row["trail_ratio"] = self.trail_ratio
        row["fwhm_px_true"] = self.fwhm_px
        return row


@dataclass
class SimDetector:
    """One rendered detector: pixels, header, truth and the true star list."""

    index: int
    name: str
    image: np.ndarray = field(repr=False)        # float32 ADU, bias removed, exposed pixels
    header: dict = field(repr=False)             # keyword -> (value, comment)
    truth: dict
    defect_mask: np.ndarray = field(repr=False)  # bool, see the module docstring
    stars: pd.DataFrame = field(repr=False)      # x, y (px), flux_adu, extinction_mag, saturated
    raw: np.ndarray | None = field(default=None, repr=False)  # uint16 as written (raw frames)

    @property
    def pixels(self) -> np.ndarray:
        """The array as it is written: ``raw`` for a raw frame, else ``image``."""
        return self.raw if self.raw is not None else self.image


# ----------------------------------------------------------------------------- truth classes


def truth_class(seeing_arcsec: float, trail_ratio: float, u: float, k_mag: float,
                trail_kind: str, limits: Limits = LIMITS) -> dict:
    """Primary class, defect flags and ambiguity from the physical quantities.

    Parameters
    ----------
    seeing_arcsec, trail_ratio, u, k_mag
        Seeing FWHM ``s``, trail ratio ``r = T/s``, sky non-uniformity ``u`` and patchy
        extinction spread ``k`` (mag).
    trail_kind
        One of :data:`TRAIL_KINDS`; a ``jump`` of ``r >= limits.jump_trail_ratio`` is very bad.

    Returns
    -------
    dict
        ``quality_class``, ``flag_bad_seeing``, ``flag_tracking`` (none | bad | very_bad),
        ``flag_background``, ``ambiguous`` and ``ambiguous_seeing/_tracking/_background``.
        A value in a gap of the spec is decided at the gap's middle; ``ambiguous`` is True
        when moving it to either end of the gap would change the primary class.
    """
    L = limits
    amb_s = L.good_seeing_arcsec < seeing_arcsec < L.bad_seeing_arcsec
    very_bad_at = L.jump_trail_ratio if trail_kind == "jump" else L.very_bad_trail_ratio
    amb_t = L.good_trail_ratio < trail_ratio < L.bad_trail_ratio
    good_bg = u <= L.good_u and k_mag <= L.good_k_mag
    bad_bg = u >= L.bad_u or k_mag >= L.bad_k_mag
    amb_b = not good_bg and not bad_bg

    def decide(s_bad: bool, t_flag: str, b_bad: bool) -> str:
        return primary_class(t_flag, b_bad, s_bad)  # the pipeline's priority rule

    s_bad = seeing_arcsec >= 0.5 * (L.good_seeing_arcsec + L.bad_seeing_arcsec)
    if trail_ratio >= very_bad_at:
        t_flag = "very_bad"
    elif trail_ratio >= 0.5 * (L.good_trail_ratio + L.bad_trail_ratio):
        t_flag = "bad"
    else:
        t_flag = "none"
    b_bad = bad_bg or (amb_b and (u >= 0.5 * (L.good_u + L.bad_u)
                                  or k_mag >= 0.5 * (L.good_k_mag + L.bad_k_mag)))
    cls = decide(s_bad, t_flag, b_bad)
    outcomes = set()
    for s_alt in ((False, True) if amb_s else (s_bad,)):
        for t_alt in (("none", "bad") if amb_t else (t_flag,)):
            for b_alt in ((False, True) if amb_b else (b_bad,)):
                outcomes.add(decide(s_alt, t_alt, b_alt))
    return {
        "quality_class": cls, "flag_bad_seeing": bool(s_bad), "flag_tracking": t_flag,
        "flag_background": bool(b_bad), "ambiguous": len(outcomes) > 1,
        "ambiguous_seeing": bool(amb_s), "ambiguous_tracking": bool(amb_t),
        "ambiguous_background": bool(amb_b),
    }


def exposure_class(detector_classes: list[str]) -> str:
    """Class of a mosaic exposure: the pipeline's rule,
    :func:`survey_qa.pipeline.classify.mosaic_class` (the worst class held by at least a
    quarter of the detectors; ``good`` when no class reaches a quarter)."""
    if not detector_classes:
        raise ValueError("no detector classes")
    return mosaic_class(list(detector_classes))


# ----------------------------------------------------------------------------- drawing specs


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _choice(rng: np.random.Generator, options: dict) -> str:
    keys = list(options)
    p = np.array([options[k] for k in keys], dtype=float)
    return str(keys[int(rng.choice(len(keys), p=p / p.sum()))])


def _draw_seeing(rng: np.random.Generator, zone: str) -> float:
    L = LIMITS
    if zone == "good":
        return float(rng.uniform(0.5, L.good_seeing_arcsec))
    if zone == "bad":
        return _loguniform(rng, L.bad_seeing_arcsec, 4.0)
    return float(rng.uniform(L.good_seeing_arcsec + 0.01, L.bad_seeing_arcsec - 0.01))


def _draw_tracking(rng: np.random.Generator, zone: str, kind: str | None) -> tuple[str, float]:
    """Trail kind and trail ratio r for a zone: good | bad | very_bad | ambiguous."""
    L = LIMITS
    if zone == "good":
        kind = kind or _choice(rng, {"none": 0.35, "linear": 0.3, "periodic": 0.2, "wind": 0.15})
        if kind == "none":
            return kind, 0.0
        return kind, float(rng.uniform(0.05, L.good_trail_ratio))
    if zone == "bad":
        kind = kind or _choice(rng, {"linear": 0.35, "periodic": 0.25, "wind": 0.25, "jump": 0.15})
        hi = L.jump_trail_ratio if kind == "jump" else L.very_bad_trail_ratio
        return kind, float(rng.uniform(L.bad_trail_ratio, hi - 0.02))
    if zone == "very_bad":
        kind = kind or _choice(rng, {"linear": 0.35, "periodic": 0.2, "wind": 0.15, "jump": 0.3})
        if kind == "jump":
            return kind, float(rng.uniform(L.jump_trail_ratio, 6.0))
        return kind, _loguniform(rng, L.very_bad_trail_ratio, 12.0)
    kind = kind or _choice(rng, {"linear": 0.4, "periodic": 0.2, "wind": 0.2, "jump": 0.2})
    return kind, float(rng.uniform(L.good_trail_ratio + 0.02, L.bad_trail_ratio - 0.02))


def _draw_background(rng: np.random.Generator, zone: str, kind: str | None) -> tuple[str, float]:
    """Background defect kind and target strength (u, or k in mag for cloud)."""
    if zone == "good":
        return "none", 0.0
    kind = kind or _choice(rng, {"gradient": 0.3, "cloud": 0.3, "scattered": 0.2, "glow": 0.2})
    if zone == "bad":
        return kind, (_loguniform(rng, 0.28, 1.5) if kind == "cloud"
                      else _loguniform(rng, 0.12, 0.8))
    return kind, (float(rng.uniform(0.07, 0.22)) if kind == "cloud"
                  else float(rng.uniform(0.04, 0.09)))


def _draw_pixscale(rng: np.random.Generator, seeing_arcsec: float, undersampled: bool) -> float:
    if undersampled:
        return seeing_arcsec / float(rng.uniform(1.25, 1.95))
    for _ in range(200):
        p = (_loguniform(rng, 0.5, 1.2) if rng.random() < 0.05
             else _loguniform(rng, 0.15, 0.5))
        if 2.0 <= seeing_arcsec / p <= 14.0:
            return p
    return seeing_arcsec / 4.0


def draw_spec(rng: np.random.Generator, quality_class: str, *, exposure: str,
              size_px: int = 4096, ambiguous: bool = False, file_format: str = "fits",
              n_detectors: int | None = None, date_obs: str = "2024-03-01T22:00:00.000",
              expnum: int = 1, confounders: tuple[str, ...] | None = None,
              confounder_rate: float = 1.0, extra_defects: bool = True,
              trail_kind: str | None = None, background_kind: str | None = None,
              header_style: str | None = None, seeing_arcsec: float | None = None,
              trail_ratio: float | None = None, pixscale_arcsec: float | None = None,
              domain: str = "default", camera_seed: int | None = None) -> ExposureSpec:
    """Sample the physical parameters of one exposure of a quality class.

    Parameters
    ----------
    rng
        Source of randomness (the spec is a pure function of its state).
    quality_class
        One of ``CLASSES``: the values of the quantities that define it come from the clean
        ranges of the spec, the others from the 'good' ranges, except that a defect frame
        may also carry defects of lower priority when ``extra_defects`` (its class stays).
    exposure
        Exposure id.
    size_px
        Detector side in pixels (square detectors); in the ``wide`` domain the longest
        side is drawn between ``min(500, size_px)`` and ``size_px``, with aspect ratios
        of 1 to 1.5.
    ambiguous
        Draw the defining quantity from the spec's gap instead: seeing 1.2-1.6" for
        ``good``/``bad_seeing``, trail ratio 0.5-1.0 for the tracking classes, u 0.03-0.10
        or k 0.05-0.25 mag for ``background_issues``.
    file_format
        One of :data:`FILE_FORMATS`.
    n_detectors
        Detectors of a mosaic (default: 2, 4 or 8 at random; 1 for single formats).
    date_obs
        ISO UTC start of the exposure.
    confounders
        Exactly these confounders (names of :data:`CONFOUNDERS` or
        :data:`WIDE_CONFOUNDERS`); None: each at random with its share times
        ``confounder_rate`` (those of the wide domain only in that domain).
    trail_kind, background_kind, header_style, seeing_arcsec, trail_ratio, pixscale_arcsec
        Force a value instead of drawing it (tests, demo nights). A forced value is used
        as given, even if it moves the frame to another class.
    domain
        One of :data:`DOMAINS`. ``default`` draws exactly what it always drew (same seed,
        same frame). ``wide`` draws pixel scales of 0.1-15"/px and FWHM of 1.2-20 px
        (:data:`WIDE`), bad seeing up to tens of arcsec, frames of 500 px to ``size_px``
        and the :data:`WIDE_CONFOUNDERS`.
    camera_seed
        Wide domain: the instrument the frame was taken with (:func:`camera_of`). Frames
        of one camera share their detector shape, filters and the instrument confounders
        (raw layout and bias, vignetting, dust donuts, Bayer pattern), as the frames of
        one night do; None: the frame draws its own.

    Returns
    -------
    ExposureSpec
    """
    if quality_class not in CLASSES:
        raise ValueError(f"unknown quality class {quality_class!r}; expected one of {CLASSES}")
    if file_format not in FILE_FORMATS:
        raise ValueError(f"unknown file format {file_format!r}; expected one of {FILE_FORMATS}")
    if trail_kind is not None and trail_kind not in TRAIL_KINDS:
        raise ValueError(f"unknown trail kind {trail_kind!r}")
    if background_kind is not None and background_kind not in BACKGROUND_KINDS:
        raise ValueError(f"unknown background kind {background_kind!r}")
    if header_style is not None and header_style not in HEADER_STYLES:
        raise ValueError(f"unknown header style {header_style!r}")
    known = set(CONFOUNDERS) | set(WIDE_CONFOUNDERS)
    if confounders is not None and set(confounders) - known:
        raise ValueError(f"unknown confounders {sorted(set(confounders) - known)}")
    if size_px < 32:
        raise ValueError("size_px must be at least 32")
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    wide = domain == "wide"

    seeing_zone, track_zone, bg_zone = _zones(rng, quality_class, ambiguous, extra_defects)
    chosen = _draw_confounders(rng, confounders, confounder_rate)
    camera = camera_of(camera_seed, size_px, confounder_rate) if wide and camera_seed is not None \
        else None
    if wide and confounders is None:
        frame_wide = set(_draw_wide_confounders(rng, confounder_rate))
        if camera is not None:  # the instrument decides its own confounders
            frame_wide = (frame_wide - set(CAMERA_CONFOUNDERS)) | set(camera["confounders"])
        chosen = tuple(sorted(set(chosen) | frame_wide))
    if seeing_arcsec is not None:
        s = seeing_arcsec
    else:
        s = _draw_seeing_wide(rng, seeing_zone) if wide else _draw_seeing(rng, seeing_zone)
    kind, r = _draw_tracking(rng, track_zone, trail_kind)
    if trail_ratio is not None:
        r = float(trail_ratio)
        kind = trail_kind or (kind if kind != "none" or r == 0 else "linear")
    bkind, strength = _draw_background(rng, bg_zone, background_kind)
    if background_kind is not None and bg_zone == "good" and background_kind != "none":
        bkind, strength = _draw_background(rng, "bad", background_kind)
    if bkind == "none":
        strength = 0.0
    draw_scale = _draw_pixscale_wide if wide else _draw_pixscale
    pixscale = pixscale_arcsec or draw_scale(rng, s, "undersampled" in chosen)
    if s / pixscale < 2.0 and "undersampled" not in chosen:
        chosen = tuple(sorted(set(chosen) | {"undersampled"}))
    elif s / pixscale >= 2.0 and "undersampled" in chosen:
        chosen = tuple(c for c in chosen if c != "undersampled")

    # detectors
    if file_format.startswith("mosaic"):
        n_det = n_detectors or int(rng.choice([2, 4, 8], p=[0.2, 0.6, 0.2]))
    else:
        n_det = 1
    if n_det not in (1, 2, 4, 8):
        raise ValueError("n_detectors must be 1, 2, 4 or 8")
    cols, rows = {1: (1, 1), 2: (2, 1), 4: (2, 2), 8: (4, 2)}[n_det]
    if camera is not None:
        nx, ny = camera["shape"]
    else:
        nx, ny = _draw_shape(rng, size_px) if wide else (int(size_px), int(size_px))

    cam = _draw_camera(rng, pixscale, chosen, camera["filters"] if camera else None)
    density = (_loguniform(rng, 100.0, 400.0) if "crowded" in chosen
               else _loguniform(rng, 1.0, 40.0))  # stars / arcmin^2, sparse to crowded
    if wide:  # small apertures on wide fields reach few stars per arcmin^2
        area_arcmin2 = nx * ny * pixscale**2 / 3600.0
        most = _loguniform(rng, *WIDE.stars_per_detector) * (4.0 if "crowded" in chosen else 1.0)
        density = max(min(density, most / area_arcmin2),  # and a field with stars to see
                      WIDE.min_stars_per_detector / area_arcmin2)
    gal_density = _loguniform(rng, 0.5, 5.0) if "galaxies" in chosen else 0.0
    # background details; thin cirrus and natural gradients keep good frames good
    if bkind == "cloud":
        cloud_k = strength
        emission = float(rng.uniform(0.0, 1.5))
    else:
        cloud_k = float(rng.uniform(0.0, 0.012)) if rng.random() < 0.3 else 0.0
        emission = float(rng.uniform(0.0, 0.4))
    transparency = float(rng.uniform(0.0, 0.3)) if rng.random() < 0.3 else 0.0

    style = header_style or _choice(rng, {"wcs": 0.7, "pixscale": 0.12, "secpix": 0.08,
                                          "sparse": 0.1})
    missing: tuple[str, ...] = ()
    if style == "sparse":
        k = int(rng.integers(1, 4))
        missing = tuple(sorted(str(m) for m in rng.choice(SENSITIVE_KEYS, size=k, replace=False)))

    t0 = Time(date_obs, format="isot", scale="utc")
    profile, beta = str(rng.choice(PSF_PROFILES)), float(rng.uniform(2.5, 5.0))
    spec = ExposureSpec(
        exposure=exposure, target_class=quality_class, ambiguous=bool(ambiguous),
        seeing_arcsec=float(s),
        psf_profile=profile, moffat_beta=beta if profile == "moffat" else math.nan,
        trail_arcsec=float(r * s), trail_pa_deg=float(rng.uniform(0.0, 180.0)),
        trail_kind=kind, jump_fraction=float(rng.uniform(0.3, 0.7)),
        periodic_period_s=float(rng.uniform(120.0, 900.0)),
        background_kind=bkind, background_strength=float(strength),
        cloud_extinction_mag=float(cloud_k), cloud_emission=emission,
        transparency_mag=transparency, natural_gradient=float(rng.uniform(0.0, 0.015)),
        pixscale_arcsec=float(pixscale), nx=nx, ny=ny,
        n_detectors=n_det, mosaic_cols=cols, mosaic_rows=rows,
        gap_px=int(rng.integers(20, 100)) if n_det > 1 else 0,
        file_format=file_format, sky_level_adu=cam["sky_e"] / cam["gain"],
        star_density_per_arcmin2=float(density),
        cluster_fraction=float(rng.uniform(0.3, 0.8)) if "crowded" in chosen else 0.0,
        galaxy_density_per_arcmin2=float(gal_density),
        n_bright_stars=int(rng.integers(3, 16)) if "saturated_stars" in chosen else 0,
        gain_e_per_adu=cam["gain"], read_noise_e=cam["read_noise"], exptime_s=cam["exptime"],
        filter=cam["filter"], saturate_adu=cam["saturate"], full_well_e=cam["full_well"],
        header_style=style,
        missing_keys=missing, confounders=chosen,
        optics_shear=float(rng.uniform(0.04, 0.15)) if "optics" in chosen else 0.0,
        optics_pattern=str(rng.choice(["radial", "tangential"])) if "optics" in chosen else "",
        optics_fwhm_growth=float(rng.uniform(0.0, 0.08)) if "optics" in chosen else 0.0,
        spikes=bool("saturated_stars" in chosen and rng.random() < 0.5),
        cosmic_ray_rate=float(rng.uniform(1.0, 5.0)) if "cosmic_rays" in chosen else 0.0,
        pixel_size_um=float(rng.choice([9.0, 10.0, 12.0, 13.5, 15.0])),
        hot_pixel_fraction=_loguniform(rng, 1e-5, 3e-4) if "hot_pixels" in chosen else 0.0,
        n_bad_columns=int(rng.integers(1, 7)) if "bad_columns" in chosen else 0,
        n_satellites=(int(rng.integers(1, 3)) if "satellite" in chosen else 0)
        + (1 if "aircraft" in chosen else 0),
        date_obs=t0.isot, mjd_obs=float(t0.mjd), airmass=float(rng.uniform(1.0, 2.2)),
        object_name=f"FIELD_{int(rng.integers(0, 10000)):04d}", expnum=int(expnum),
        ra_deg=float(rng.uniform(0.0, 360.0)),
        dec_deg=float(np.degrees(np.arcsin(rng.uniform(-0.95, 0.95)))),
        rotation_deg=float(rng.choice([0.0, 90.0, 180.0, 270.0]) + rng.normal(0.0, 0.5)),
        field_seed=int(rng.integers(0, 2**31 - 1)), domain=domain,
        camera_seed=int(camera_seed) if camera is not None else -1,
    )
    if set(chosen) & set(WIDE_CONFOUNDERS):
        spec = _with_wide_features(spec)
    return spec


CAMERA_CONFOUNDERS = ("raw", "vignetting", "dust", "bayer")
"""Wide-domain confounders that belong to the instrument, not to the frame."""


def camera_of(camera_seed: int, size_px: int, confounder_rate: float = 1.0) -> dict:
    """One instrument of a wide-domain night: detector shape (largest side up to
    ``size_px``), 1-3 filters and its :data:`CAMERA_CONFOUNDERS`. The parameters of these
    (bias and overscan, vignetting, dust donuts, Bayer pattern) follow from the seed too,
    so that every frame of the camera has the same illumination pattern, as on a real
    night."""
    rng = np.random.default_rng([camera_seed, 701])
    draws = {name: rng.random() for name in CAMERA_CONFOUNDERS}
    chosen = tuple(sorted(n for n in CAMERA_CONFOUNDERS
                          if draws[n] < WIDE_CONFOUNDERS[n] * confounder_rate))
    shape = _draw_shape(rng, size_px)
    n_filters = int(rng.integers(1, 4))
    filters = [str(f) for f in rng.choice(list(_FILTERS), size=n_filters, replace=False)]
    return {"confounders": chosen, "shape": shape, "filters": sorted(filters)}


def _instrument_seed(spec: ExposureSpec) -> int:
    """Seed of the instrument-level draws: the night's camera, else the frame's field."""
    return spec.camera_seed if spec.camera_seed >= 0 else spec.field_seed


def _draw_wide_confounders(rng: np.random.Generator, rate: float) -> tuple[str, ...]:
    draws = {name: rng.random() for name in WIDE_CONFOUNDERS}
    return tuple(sorted(n for n, p in WIDE_CONFOUNDERS.items() if draws[n] < p * rate))


def _draw_seeing_wide(rng: np.random.Generator, zone: str) -> float:
    """Seeing of the wide domain: bad seeing reaches the tens of arcsec of coarse cameras."""
    if zone != "bad":
        return _draw_seeing(rng, zone)
    lo, hi = WIDE.bad_seeing_arcsec
    mid = 4.0  # half of the frames as on survey telescopes, half optics-limited
    return _loguniform(rng, lo, mid) if rng.random() < 0.5 else _loguniform(rng, mid, hi)


def _draw_pixscale_wide(rng: np.random.Generator, seeing_arcsec: float,
                        undersampled: bool) -> float:
    """A pixel scale in ``WIDE.pixscale_arcsec`` giving an FWHM in ``WIDE.fwhm_px``
    (under 2 px when ``undersampled``), log-uniform."""
    (p_lo, p_hi), (f_lo, f_hi) = WIDE.pixscale_arcsec, WIDE.fwhm_px
    fwhm_lo, fwhm_hi = (f_lo, 2.0) if undersampled else (2.0, f_hi)
    lo, hi = max(p_lo, seeing_arcsec / fwhm_hi), min(p_hi, seeing_arcsec / fwhm_lo)
    if lo >= hi:  # this sampling is out of reach at this seeing: any allowed FWHM
        lo, hi = max(p_lo, seeing_arcsec / f_hi), min(p_hi, seeing_arcsec / f_lo)
    return _loguniform(rng, lo, max(hi, lo))


def _draw_shape(rng: np.random.Generator, size_px: int) -> tuple[int, int]:
    """(nx, ny) of a wide-domain detector: longest side 500 px (or ``size_px`` when
    smaller) to ``size_px``, aspect 1-1.5, even sides (Bayer cells)."""
    lo = min(WIDE.min_side_px, size_px)
    long_side = _loguniform(rng, lo, size_px)
    aspect = float(rng.choice([1.0, 1.0, 4.0 / 3.0, 1.3, 1.5]))
    portrait = bool(rng.random() < 0.3)
    short = max(long_side / aspect, min(lo, long_side))

    def even(v: float) -> int:
        return max(32, 2 * int(round(v / 2.0)))
    nx, ny = even(long_side), even(short)
    return (ny, nx) if portrait else (nx, ny)


def _with_wide_features(spec: ExposureSpec) -> ExposureSpec:
    """The parameters of the wide-domain confounders of ``spec`` (from its camera's seed,
    else its field seed, so that the main draws of a frame do not depend on them). A Bayer
    frame whose FWHM is under 2.4 px (1.2 px once binned) is left without its colour
    filters."""
    aux = np.random.default_rng([_instrument_seed(spec), 601])
    chosen = set(spec.confounders)
    if "defocus" in chosen and spec.fwhm_px < WIDE.defocus_min_fwhm_px:
        chosen.discard("defocus")  # a donut of a few pixels is not resolved
    if "bayer" in chosen and (spec.n_detectors > 1 or spec.fwhm_px < WIDE.bayer_min_fwhm_px):
        chosen.discard("bayer")  # colour cameras are single chips; binned 2x2 when read
    if "sparse" in chosen:
        chosen.discard("crowded")
    # every draw is made whatever is chosen: each feature's values depend on the seed only
    # (the camera's, when the frame has one: its frames share bias, layout and flat)
    bias = float(min(aux.uniform(200.0, 2000.0), 65535.0 - spec.saturate_adu))
    prescan = int(aux.choice([0, 0, 4, 8, 20, 50]))
    overscan = int(aux.choice([16, 32, 50, 64, 100]))
    over_rows = int(aux.choice([0, 0, 0, 8, 16]))
    vig = _loguniform(aux, 0.05, 0.35)
    vdx, vdy = (float(v) for v in aux.uniform(-0.1, 0.1, 2))
    dust = float(aux.uniform(1.0, 6.0))
    pattern = str(aux.choice(["RGGB", "BGGR", "GRBG", "GBRG"]))
    red, blue = float(aux.uniform(0.35, 0.75)), float(aux.uniform(0.3, 0.7))
    defocus, obsc = float(aux.uniform(0.6, 0.92)), float(aux.uniform(0.25, 0.5))
    n_sparse = int(aux.integers(WIDE.sparse_stars[0], WIDE.sparse_stars[1] + 1))
    hot = _loguniform(aux, 1e-5, 3e-4)
    out = {}
    if "raw" in chosen:  # no dark frame subtracted: hot pixels are always there
        out.update(raw=True, bias_adu=round(bias, 1), prescan_px=prescan, overscan_px=overscan,
                   overscan_rows=over_rows)
        if spec.hot_pixel_fraction <= 0:
            out["hot_pixel_fraction"] = hot
            chosen.add("hot_pixels")
    out["confounders"] = tuple(sorted(chosen))
    if "vignetting" in chosen:
        out.update(vignetting_corner=vig, vignetting_dx=vdx, vignetting_dy=vdy)
    if "dust" in chosen:
        out["dust_per_detector"] = dust
    if "bayer" in chosen:
        out.update(bayer_pattern=pattern, bayer_red=red, bayer_blue=blue)
    if "defocus" in chosen:
        out.update(defocus_ratio=defocus, obscuration=obsc)
    if "sparse" in chosen:
        area_arcmin2 = spec.nx * spec.ny * spec.pixscale_arcsec**2 / 3600.0
        out.update(star_density_per_arcmin2=n_sparse / area_arcmin2, cluster_fraction=0.0)
    return dataclasses.replace(spec, **out)


def _zones(rng: np.random.Generator, quality_class: str, ambiguous: bool,
           extra_defects: bool) -> tuple[str, str, str]:
    """Zones (good | bad | very_bad | ambiguous) of seeing, tracking and background."""
    zones = {"s": "good", "t": "good", "b": "good"}
    defining = {"bad_seeing": ("s", "bad"), "bad_tracking": ("t", "bad"),
                "very_bad_tracking": ("t", "very_bad"),
                "background_issues": ("b", "bad")}.get(quality_class)
    if defining:
        zones[defining[0]] = defining[1]
    if ambiguous:
        zones[defining[0] if defining else str(rng.choice(["s", "t", "b"]))] = "ambiguous"
    elif extra_defects:  # lower-priority defects leave the class unchanged
        rank = PRIORITY.index(quality_class)
        if rank < PRIORITY.index("bad_seeing") and rng.random() < 0.25:
            zones["s"] = "bad"
        if rank < PRIORITY.index("background_issues") and rng.random() < 0.2:
            zones["b"] = "bad"
    return zones["s"], zones["t"], zones["b"]


def _draw_camera(rng: np.random.Generator, pixscale: float, confounders: tuple[str, ...],
                 filters: list[str] | None = None) -> dict:
    """Filter (one of ``filters``, default all), exposure time, gain, read noise, full well,
    saturation and sky (e-/px)."""
    filt = str(rng.choice(filters or list(_FILTERS)))
    exptime = float(rng.choice([5, 10, 30, 60, 90, 120, 180, 300, 600],
                               p=[0.04, 0.08, 0.14, 0.2, 0.1, 0.14, 0.1, 0.14, 0.06]))
    gain = round(_loguniform(rng, 0.5, 5.0), 3)
    read_noise = round(float(rng.uniform(2.0, 15.0)), 2)
    full_well = _loguniform(rng, 3.0e4, 2.0e5)
    bias = float(rng.uniform(200.0, 2000.0))  # removed; the ADC range above it is left
    saturate = float(math.floor(min(full_well / gain, 65535.0 - bias)))
    sky_e = _loguniform(rng, *_FILTERS[filt]) * exptime * pixscale**2
    sky_e = float(np.clip(sky_e, 3.0, 0.3 * saturate * gain))
    if "bright_sky" in confounders:  # moonlit but flat
        sky_e = float(min(max(sky_e * rng.uniform(8.0, 40.0), 3000.0), 0.35 * saturate * gain))
    return {"filter": filt, "exptime": exptime, "gain": gain, "read_noise": read_noise,
            "full_well": float(full_well), "saturate": saturate, "sky_e": sky_e}


def _draw_confounders(rng: np.random.Generator, forced: tuple[str, ...] | None,
                      rate: float) -> tuple[str, ...]:
    draws = {name: rng.random() for name in CONFOUNDERS}  # always consume the same draws
    if forced is not None:
        return tuple(sorted(forced))
    return tuple(sorted(n for n, p in CONFOUNDERS.items() if draws[n] < p * rate))


# ----------------------------------------------------------------------------- image motion


def drift_path(spec: ExposureSpec, n_samples: int = 2048) -> np.ndarray:
    """Image motion during the exposure, (n, 2) offsets (dx, dy) in arcsec at equal times.

    The path is centred on its time average (the star's catalogue position is the centroid
    of its trailed image); its extent (largest distance between two positions) is
    ``trail_arcsec``, along ``trail_pa_deg``. Kinds: ``linear`` drift, ``periodic`` error
    (a sinusoid of period ``periodic_period_s`` with a slow drift across it), ``wind``
    shake (an anisotropic Ornstein-Uhlenbeck random walk), ``jump`` (two positions, a
    fraction ``jump_fraction`` of the time at the first).
    """
    T = spec.trail_arcsec
    if spec.trail_kind == "none" or T <= 0:
        return np.zeros((1, 2))
    rng = np.random.default_rng([spec.field_seed, 101])
    t = (np.arange(n_samples) + 0.5) / n_samples
    if spec.trail_kind == "linear":
        along, across = t - 0.5, np.zeros_like(t)
    elif spec.trail_kind == "periodic":
        cycles = spec.exptime_s / spec.periodic_period_s
        phase = rng.uniform(0.0, 2 * np.pi)
        along = np.sin(2 * np.pi * cycles * t + phase) + rng.uniform(-0.3, 0.3) * t
        across = rng.uniform(-0.1, 0.1) * np.sin(2 * np.pi * cycles * t + phase + 1.0)
    elif spec.trail_kind == "wind":
        tau = rng.uniform(0.01, 0.2)
        a = np.exp(-1.0 / (n_samples * tau))
        noise = rng.standard_normal((n_samples, 2)) * np.array([1.0, rng.uniform(0.2, 0.7)])
        path = np.zeros((n_samples, 2))
        for i in range(1, n_samples):
            path[i] = a * path[i - 1] + noise[i]
        along, across = path[:, 0], path[:, 1]
    elif spec.trail_kind == "jump":
        along = np.where(t < spec.jump_fraction, 0.0, 1.0)
        across = np.zeros_like(t)
    else:
        raise ValueError(f"unknown trail kind {spec.trail_kind!r}")
    xy = np.stack([along, across], axis=1)
    extent, angle = _extent(xy)
    if extent <= 0:
        return np.zeros((1, 2))
    rot = math.radians(spec.trail_pa_deg) - angle
    c, s = math.cos(rot), math.sin(rot)
    xy = xy @ np.array([[c, s], [-s, c]]) * (T / extent)
    return xy - xy.mean(axis=0)


def _extent(xy: np.ndarray) -> tuple[float, float]:
    """Largest projected extent of a point set and its direction (radians)."""
    angles = np.radians(np.arange(0.0, 180.0, 0.25))
    proj = xy @ np.stack([np.cos(angles), np.sin(angles)])
    widths = proj.max(axis=0) - proj.min(axis=0)
    i = int(np.argmax(widths))
    return float(widths[i]), float(angles[i])


def _splat(xy: np.ndarray, scale: float, weights: np.ndarray | None = None) -> np.ndarray:
    """Bilinear histogram of offsets (in units of ``scale``) on an odd, centred grid."""
    p = xy / scale
    half = int(np.ceil(np.abs(p).max())) + 1 if len(p) else 1
    size = 2 * half + 1
    k = np.zeros((size, size))
    w = np.full(len(p), 1.0 / len(p)) if weights is None else weights
    gx, gy = p[:, 0] + half, p[:, 1] + half
    x0, y0 = np.floor(gx).astype(int), np.floor(gy).astype(int)
    fx, fy = gx - x0, gy - y0
    for dx, dy, ww in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                       (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        np.add.at(k, (y0 + dy, x0 + dx), w * ww)
    return k / k.sum()


def motion_kernel(spec: ExposureSpec, scale_arcsec: float) -> np.ndarray | None:
    """Image-motion kernel (time density of the drift) on a grid of ``scale_arcsec``.

    None when there is no image motion.
    """
    xy = drift_path(spec)
    if len(xy) == 1:
        return None
    return _splat(xy, scale_arcsec)


def atmosphere_profile(spec: ExposureSpec, fwhm: float) -> galsim.GSObject:
    """The round PSF of atmosphere and optics, of FWHM ``fwhm`` (any unit).

    A Moffat or Kolmogorov profile; on a defocused frame (``defocus_ratio > 0``) it is
    convolved with the geometric donut (the pupil's image: an annulus of outer diameter
    ``defocus_ratio * fwhm`` with the central obstruction) and narrowed so that the
    donut PSF keeps the effective FWHM ``fwhm`` (:func:`effective_fwhm`).
    """
    return _round_psf(spec.psf_profile, spec.moffat_beta, fwhm, spec.defocus_ratio,
                      spec.obscuration)


def _round_psf(profile: str, beta: float, fwhm: float, defocus_ratio: float,
               obscuration: float) -> galsim.GSObject:
    atm_fwhm = fwhm
    if defocus_ratio > 0:
        atm_fwhm = fwhm * _atm_ratio(profile, beta if profile == "moffat" else 0.0,
                                     defocus_ratio, obscuration)
    atm = (galsim.Moffat(beta=beta, fwhm=atm_fwhm) if profile == "moffat"
           else galsim.Kolmogorov(fwhm=atm_fwhm))
    if defocus_ratio <= 0:
        return atm
    return galsim.Convolve(atm, _donut(defocus_ratio * fwhm, obscuration))


def _donut(diameter: float, obscuration: float) -> galsim.GSObject:
    """Uniform annulus of unit flux: outer ``diameter``, inner ``obscuration * diameter``."""
    r, eps = diameter / 2.0, obscuration
    if eps <= 0:
        return galsim.TopHat(radius=r)
    a = 1.0 / (1.0 - eps * eps)
    return galsim.Add([galsim.TopHat(radius=r, flux=a),
                       galsim.TopHat(radius=eps * r, flux=-eps * eps * a)])


def effective_fwhm(profile: galsim.GSObject, scale: float, half_size: float) -> float:
    """FWHM of a round profile, donuts included: twice the outermost radius at which its
    azimuthal profile is half its maximum (for a Gaussian or Moffat, the usual FWHM; for
    a donut, the width a person sees).

    The profile is drawn without pixel on a grid of ``scale`` out to ``half_size``.
    """
    n = int(math.ceil(half_size / scale))
    img = profile.drawImage(nx=2 * n + 1, ny=2 * n + 1, scale=scale, method="no_pixel").array
    cut = 0.5 * (img[n, n:] + img[n:, n])  # along +x and +y from the centre
    half = 0.5 * float(cut.max())
    above = np.flatnonzero(cut >= half)
    k = int(above[-1])
    if k + 1 >= cut.size:
        return math.inf
    f = (cut[k] - half) / (cut[k] - cut[k + 1])
    return float(2.0 * (k + f) * scale)


@functools.lru_cache(maxsize=256)
def _atm_ratio(profile: str, beta: float, defocus_ratio: float, obscuration: float) -> float:
    """Atmospheric FWHM / effective FWHM of a defocused PSF (effective FWHM 1)."""
    def excess(ratio: float) -> float:
        psf = galsim.Convolve(_round_psf(profile, beta, ratio, 0.0, 0.0),
                              _donut(defocus_ratio, obscuration))
        return effective_fwhm(psf, 1.0 / 60.0, 2.5) - 1.0

    return float(optimize.brentq(excess, 1e-3, 1.0, xtol=1e-5))


def psf_ellipticity(spec: ExposureSpec) -> float:
    """Ellipticity ``1 - b/a`` of the PSF with image motion at field centre, without optics.

    Adaptive moments (``galsim.hsm``) of the PSF drawn without pixel at s/10 per sample.
    Where they fail, or lock onto one image of a doubled star (their centroid more than
    s/4 from the time-averaged position), second moments with a fixed round Gaussian
    weight of FWHM ``s + T`` about that position are used instead.
    """
    s = spec.seeing_arcsec
    ds = s / 10.0
    kernel = motion_kernel(spec, ds)
    half = int(np.ceil((spec.trail_arcsec / 2 + 4 * s) / ds))
    img = atmosphere_profile(spec, s).drawImage(nx=2 * half + 1, ny=2 * half + 1, scale=ds,
                                                method="no_pixel").array
    if kernel is not None:
        img = fftconvolve(img, kernel, mode="same")
    guess = max(s, spec.trail_arcsec / 2) / 2.355 / ds
    res = galsim.hsm.FindAdaptiveMom(galsim.Image(np.ascontiguousarray(img), scale=ds),
                                     guess_sig=guess, strict=False)
    if res.moments_status == 0:
        offset = math.hypot(res.moments_centroid.x - 1 - half, res.moments_centroid.y - 1 - half)
        if offset * ds <= s / 4:
            g = min(float(res.observed_shape.g), 0.999999)
            return float(1.0 - (1.0 - g) / (1.0 + g))
    y, x = (np.mgrid[: img.shape[0], : img.shape[1]] - half).astype(float)
    sigma = (s + spec.trail_arcsec) / 2.355 / ds
    w = img * np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    w = w / w.sum()
    mx, my = (w * x).sum(), (w * y).sum()
    qxx, qyy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
    qxy = (w * (x - mx) * (y - my)).sum()
    ev = np.linalg.eigvalsh(np.array([[qxx, qxy], [qxy, qyy]]))
    return float(1.0 - math.sqrt(max(ev[0], 0.0) / ev[1]))


# ----------------------------------------------------------------------------- geometry


def detector_id(spec: ExposureSpec, index: int) -> str:
    """Detector id as a FITS reader names it: EXTNAME of a mosaic HDU, else the HDU index.

    Mosaics: ``ccd01``...; a single ``.fits``/``.fits.gz`` image: ``"0"`` (primary HDU);
    a single ``.fits.fz`` image: ``"1"`` (the compressed extension, as fpack writes it).
    """
    if spec.file_format.startswith("mosaic"):
        return f"ccd{index + 1:02d}"
    return "1" if spec.file_format == "fits.fz" else "0"


def detector_hdu(spec: ExposureSpec, index: int) -> int:
    """HDU index of a detector in the written file."""
    if spec.file_format.startswith("mosaic"):
        return index + 1
    return 1 if spec.file_format == "fits.fz" else 0


def _detector_offset(spec: ExposureSpec, index: int) -> tuple[int, int]:
    col, row = index % spec.mosaic_cols, index // spec.mosaic_cols
    return col * (spec.nx + spec.gap_px), row * (spec.ny + spec.gap_px)


def _focal_plane_size(spec: ExposureSpec) -> tuple[int, int]:
    fx = spec.mosaic_cols * spec.nx + (spec.mosaic_cols - 1) * spec.gap_px
    fy = spec.mosaic_rows * spec.ny + (spec.mosaic_rows - 1) * spec.gap_px
    return fx, fy


def _grid_step(n: int) -> int:
    return int(max(4, min(32, math.ceil(n / 128))))


def _nodes(n: int, step: int) -> np.ndarray:
    return np.arange(int(math.ceil((n - 1) / step)) + 1) * float(step)


def _interp_matrix(n: int, m: int, step: float) -> sparse.csr_matrix:
    """Catmull-Rom interpolation weights from m nodes (spacing ``step``) to n pixels."""
    t = np.arange(n) / step
    i = np.floor(t).astype(int)
    f = t - i
    weights = (-0.5 * f**3 + f**2 - 0.5 * f, 1.5 * f**3 - 2.5 * f**2 + 1.0,
               -1.5 * f**3 + 2.0 * f**2 + 0.5 * f, 0.5 * f**3 - 0.5 * f**2)
    rows = np.tile(np.arange(n), 4)
    cols = np.concatenate([np.clip(i + d, 0, m - 1) for d in (-1, 0, 1, 2)])
    data = np.concatenate(weights).astype(np.float32)
    return sparse.csr_matrix((data, (rows, cols)), shape=(n, m))


def _upsample(coarse: np.ndarray, step: float, ny: int, nx: int) -> np.ndarray:
    """Full-resolution float32 image from node values (nodes at 0, step, 2 step...)."""
    my, mx = coarse.shape
    wy = _interp_matrix(ny, my, step)
    wx = _interp_matrix(nx, mx, step)
    tmp = np.asarray(wy @ coarse.astype(np.float32))      # (ny, mx)
    return np.ascontiguousarray(np.asarray(wx @ tmp.T).T, dtype=np.float32)


def _random_field(rng: np.random.Generator, ny: int, nx: int, slope: float) -> np.ndarray:
    """Gaussian random field with power spectrum ~ k**-slope, zero mean, unit std."""
    py, px = 2 * ny, 2 * nx  # padded: no periodic wrap inside the returned part
    ky = np.fft.fftfreq(py)[:, None]
    kx = np.fft.rfftfreq(px)[None, :]
    k = np.hypot(ky, kx)
    k[0, 0] = np.inf
    amp = k ** (-slope / 2.0)
    noise = rng.standard_normal((py, px // 2 + 1)) + 1j * rng.standard_normal((py, px // 2 + 1))
    f = np.fft.irfft2(noise * amp, s=(py, px))[:ny, :nx]
    f -= f.mean()
    sd = f.std()
    return f / sd if sd > 0 else f


def _sample_field(field_fp: np.ndarray, step_fp: float, xs: np.ndarray,
                  ys: np.ndarray) -> np.ndarray:
    """Values of a focal-plane node field at focal-plane positions (cubic spline)."""
    return ndimage.map_coordinates(field_fp, [ys / step_fp, xs / step_fp], order=3,
                                   mode="nearest")


# ----------------------------------------------------------------------------- smooth sky


@dataclass
class _Sky:
    """Coarse node fields of one detector (electrons, mag), see the module docstring."""

    step: float
    base: np.ndarray       # undisturbed sky B
    light: np.ndarray      # defect light L
    patchy_mag: np.ndarray  # patchy extinction K
    emission: float        # cloud light level E (electrons)

    def smooth(self) -> np.ndarray:
        t = 10.0 ** (-0.4 * self.patchy_mag)
        return self.base * t + self.emission * (1.0 - t) + self.light


def _unit_patterns(spec: ExposureSpec, index: int, gx: np.ndarray, gy: np.ndarray,
                   cloud_fp: tuple[np.ndarray, float] | None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Natural gradient (in [-0.5, 0.5]), defect light (max ~1) and cloud (>= 0) patterns.

    ``gx``, ``gy`` are focal-plane coordinates of the detector's nodes (2-D arrays);
    ``cloud_fp`` is the focal-plane cloud field of :func:`_cloud_field`, or None.
    """
    fx, fy = _focal_plane_size(spec)
    diag = math.hypot(fx, fy)
    cx, cy = (fx - 1) / 2.0, (fy - 1) / 2.0
    r = np.random.default_rng([spec.field_seed, 201])
    a = r.uniform(0, 2 * np.pi)
    natural = ((gx - cx) * math.cos(a) + (gy - cy) * math.sin(a)) / diag

    light = np.zeros_like(gx)
    rl = np.random.default_rng([spec.field_seed, 202])
    kind = spec.background_kind
    if kind == "gradient":
        a = rl.uniform(0, 2 * np.pi)
        power = rl.uniform(1.0, 2.5)
        proj = ((gx - cx) * math.cos(a) + (gy - cy) * math.sin(a)) / diag + 0.5
        light = np.clip(proj, 0.0, 1.0) ** power
    elif kind == "scattered":
        shape = str(rl.choice(["lobe", "ring", "band"]))
        if shape == "lobe":  # off-axis bright source just outside the field
            ang = rl.uniform(0, 2 * np.pi)
            dist = rl.uniform(0.4, 0.9) * diag
            x0, y0 = cx + dist * math.cos(ang), cy + dist * math.sin(ang)
            w = rl.uniform(0.3, 0.7) * diag
            light = np.exp(-((gx - x0) ** 2 + (gy - y0) ** 2) / (2 * w * w))
        elif shape == "ring":  # out-of-focus ghost of a bright star
            x0, y0 = cx + rl.uniform(-0.3, 0.3) * fx, cy + rl.uniform(-0.3, 0.3) * fy
            rad = rl.uniform(0.15, 0.4) * min(fx, fy)
            w = rl.uniform(0.04, 0.1) * min(fx, fy)
            d = np.hypot(gx - x0, gy - y0)
            light = np.exp(-((d - rad) ** 2) / (2 * w * w)) + 0.3 * np.exp(-d**2 / (2 * rad**2))
        else:  # a band of reflected light across the field
            ang = rl.uniform(0, np.pi)
            off = rl.uniform(-0.3, 0.3) * diag
            w = rl.uniform(0.05, 0.2) * diag
            d = (gx - cx) * math.sin(ang) - (gy - cy) * math.cos(ang) - off
            light = np.exp(-d**2 / (2 * w * w))
    elif kind == "glow":  # amplifier glow, the same corner or edge on every detector
        x0, y0 = _detector_offset(spec, index)
        lx, ly = gx - x0, gy - y0
        lam = rl.uniform(0.04, 0.2) * max(spec.nx, spec.ny)
        corner = int(rl.integers(0, 6))
        if corner < 4:
            qx = 0.0 if corner % 2 == 0 else spec.nx - 1.0
            qy = 0.0 if corner < 2 else spec.ny - 1.0
            light = np.exp(-np.hypot(lx - qx, ly - qy) / lam)
        elif corner == 4:
            light = np.exp(-lx / lam)
        else:
            light = np.exp(-(spec.ny - 1.0 - ly) / lam)

    cloud = np.zeros_like(gx) if cloud_fp is None else _sample_field(*cloud_fp, gx, gy)
    return natural, light, cloud


def _cloud_field(spec: ExposureSpec) -> tuple[np.ndarray, float]:
    """Patchy cloud pattern (>= 0, clear gaps) on a focal-plane node grid."""
    fx, fy = _focal_plane_size(spec)
    step = float(_grid_step(max(spec.nx, spec.ny)))
    rc = np.random.default_rng([spec.field_seed, 203])
    f = _random_field(rc, len(_nodes(fy, step)), len(_nodes(fx, step)), rc.uniform(3.0, 4.0))
    thr = np.quantile(f, rc.uniform(0.2, 0.6))
    return np.clip(f - thr, 0.0, None), step


def _detector_nodes(spec: ExposureSpec, index: int) -> tuple[float, np.ndarray, np.ndarray]:
    step = float(_grid_step(max(spec.nx, spec.ny)))
    x0, y0 = _detector_offset(spec, index)
    gy, gx = np.meshgrid(_nodes(spec.ny, step) + y0, _nodes(spec.nx, step) + x0, indexing="ij")
    return step, gx, gy


def _spread(values: np.ndarray) -> float:
    p1, p99 = np.percentile(values, [1.0, 99.0])
    return float(p99 - p1)


def _nonuniformity(values: np.ndarray) -> float:
    med = float(np.median(values))
    return _spread(values) / med if med > 0 else math.inf


def _quarter_value(values: list[float]) -> float:
    """The value reached by the worst quarter of detectors (ceil(n/4)-th largest)."""
    return sorted(values, reverse=True)[math.ceil(len(values) / 4) - 1]


def sky_nodes(spec: ExposureSpec, index: int) -> _Sky:
    """Coarse smooth-sky fields of one detector, scaled to the spec's targets.

    The defect amplitude is chosen so that the worst quarter of the detectors reaches
    ``background_strength`` (u for light defects, k for cloud), computed over all
    detectors of the exposure.
    """
    sky = spec.sky_e
    cloud_fp = _cloud_field(spec) if spec.cloud_extinction_mag > 0 else None
    per_det = []
    for i in range(spec.n_detectors):
        step, gx, gy = _detector_nodes(spec, i)
        per_det.append((step, *_unit_patterns(spec, i, gx, gy, cloud_fp)))

    cloud_amp = 0.0
    if spec.cloud_extinction_mag > 0:
        spreads = [_spread(c) for *_, c in per_det]
        ref = _quarter_value(spreads)
        cloud_amp = spec.cloud_extinction_mag / ref if ref > 0 else 0.0
    emission = spec.cloud_emission * sky

    def build(i: int, amp: float) -> _Sky:
        step, nat, light, cloud = per_det[i]
        return _Sky(step, sky * (1.0 + spec.natural_gradient * nat), amp * sky * light,
                    cloud_amp * cloud, emission)

    amp = 0.0
    if spec.background_kind in ("gradient", "scattered", "glow") and spec.background_strength > 0:
        target = spec.background_strength
        fixed = np.stack([build(i, 0.0).smooth().ravel() for i in range(spec.n_detectors)])
        light = np.stack([sky * d[2].ravel() for d in per_det])

        def quarter_u(a: float) -> float:  # u reached by the worst quarter of detectors
            p1, p50, p99 = np.percentile(fixed + a * light, [1.0, 50.0, 99.0], axis=1)
            return _quarter_value(list((p99 - p1) / p50))
        lo, hi = 0.0, 1.0
        while quarter_u(hi) < target and hi < MAX_DEFECT_LIGHT:
            hi = min(2.0 * hi, MAX_DEFECT_LIGHT)
        if quarter_u(hi) < target:  # the pattern cannot reach the target: strongest allowed
            lo = hi
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if quarter_u(mid) < target else (lo, mid)
        amp = hi
    return build(index, amp)


# ----------------------------------------------------------------------------- PSF stamps


@dataclass
class _EPSF:
    """Effective PSF (PSF x pixel) sampled at (O+1)^2 sub-pixel phases, unit flux."""

    phases: np.ndarray  # (O+1, O+1, S, S) float32
    oversample: int
    half: int

    def stamp(self, fx: float, fy: float, half: int | None = None) -> np.ndarray:
        """The stamp of a star at sub-pixel offset (fx, fy) in [0, 1) from its pixel;
        only its central ``2 half + 1`` pixels when ``half`` is given."""
        o = self.oversample
        ux, uy = fx * o, fy * o
        px, py = min(int(ux), o - 1), min(int(uy), o - 1)
        wx, wy = ux - px, uy - py
        p = self.phases
        if half is not None and half < self.half:
            c0, c1 = self.half - half, self.half + half + 1
            p = p[:, :, c0:c1, c0:c1]
        return ((1 - wy) * ((1 - wx) * p[py, px] + wx * p[py, px + 1])
                + wy * ((1 - wx) * p[py + 1, px] + wx * p[py + 1, px + 1]))


def _epsf(profile_px: galsim.GSObject, kernel_fine: np.ndarray | None, half: int,
          oversample: int, extra: np.ndarray | None = None) -> _EPSF:
    """Draw profile x pixel on a grid oversampled ``oversample`` times, convolve with the
    motion kernel (same fine grid) and cut the phase stamps of side ``2 half + 1``."""
    o = oversample
    m = o * (2 * half + 2) + 1
    fine = galsim.Convolve(profile_px, galsim.Pixel(1.0)).drawImage(
        nx=m, ny=m, scale=1.0 / o, method="no_pixel").array * float(o * o)
    if extra is not None:
        fine = fine + extra
    if kernel_fine is not None:
        fine = fftconvolve(fine, kernel_fine, mode="same")
    size = 2 * half + 1
    phases = np.empty((o + 1, o + 1, size, size), dtype=np.float32)
    for py in range(o + 1):
        for px in range(o + 1):
            sy, sx = o - py, o - px
            phases[py, px] = fine[sy: sy + o * (size - 1) + 1: o, sx: sx + o * (size - 1) + 1: o]
    return _EPSF(phases, o, half)


def _spike_image(m: int, scale_px: float, fwhm_px: float, angle_deg: float,
                 fraction: float) -> np.ndarray:
    """Four diffraction spikes (a cross) on an m x m grid of ``scale_px`` pixels, sum
    ``fraction`` in units of the star flux per pixel area (to add to a drawn ePSF)."""
    c = (m - 1) / 2.0
    y, x = (np.mgrid[:m, :m] - c) * scale_px
    sigma = max(fwhm_px / 2.355 * 0.5, 0.3)
    img = np.zeros((m, m))
    for a in (angle_deg, angle_deg + 90.0):
        ca, sa = math.cos(math.radians(a)), math.sin(math.radians(a))
        along = x * ca + y * sa
        across = -x * sa + y * ca
        img += np.exp(-0.5 * (across / sigma) ** 2) / (1.0 + (along / (3.0 * fwhm_px)) ** 2)
    total = img.sum() * scale_px**2
    return img * (fraction / total) if total > 0 else img


# ----------------------------------------------------------------------------- sources


def _place(image: np.ndarray, stamp: np.ndarray, ix: int, iy: int, scale: float) -> None:
    """Add ``scale * stamp`` centred on pixel (ix, iy), clipped to the image."""
    h = stamp.shape[0] // 2
    ny, nx = image.shape
    y0, y1, x0, x1 = iy - h, iy + h + 1, ix - h, ix + h + 1
    sy0, sx0 = max(0, -y0), max(0, -x0)
    sy1, sx1 = stamp.shape[0] - max(0, y1 - ny), stamp.shape[1] - max(0, x1 - nx)
    if sy1 <= sy0 or sx1 <= sx0:
        return
    image[max(y0, 0): min(y1, ny), max(x0, 0): min(x1, nx)] += scale * stamp[sy0:sy1, sx0:sx1]


def _region_grid(spec: ExposureSpec) -> int:
    if spec.optics_shear <= 0 and spec.optics_fwhm_growth <= 0:
        return 1
    return int(np.clip(round(max(spec.nx, spec.ny) / 700), 3, 6))


def _optics(spec: ExposureSpec, fp_x: float, fp_y: float) -> tuple[float, float, float]:
    """(g1, g2, dilation) of the optical aberration at a focal-plane position."""
    fx, fy = _focal_plane_size(spec)
    dx, dy = fp_x - (fx - 1) / 2.0, fp_y - (fy - 1) / 2.0
    rho2 = (dx * dx + dy * dy) / ((fx / 2.0) ** 2 + (fy / 2.0) ** 2)
    phi = math.atan2(dy, dx)
    g = spec.optics_shear * rho2
    sign = 1.0 if spec.optics_pattern == "radial" else -1.0
    return sign * g * math.cos(2 * phi), sign * g * math.sin(2 * phi), \
        1.0 + spec.optics_fwhm_growth * rho2


@dataclass
class _PSFModel:
    regions: int
    cores: list[_EPSF]
    profiles: list[galsim.GSObject]   # atmosphere x optics per region, pixel units
    wide: _EPSF                       # wings, core box zeroed, centre of the detector
    kernel_px: np.ndarray | None      # motion kernel on the pixel grid
    peak: float                       # highest pixel fraction of a centred star

    def region(self, x: np.ndarray, y: np.ndarray, nx: int, ny: int) -> np.ndarray:
        rx = np.clip((x * self.regions / nx).astype(int), 0, self.regions - 1)
        ry = np.clip((y * self.regions / ny).astype(int), 0, self.regions - 1)
        return ry * self.regions + rx


def _psf_model(spec: ExposureSpec, index: int) -> _PSFModel:
    fwhm = spec.fwhm_px
    trail_px = spec.trail_arcsec / spec.pixscale_arcsec
    o = int(np.clip(math.ceil(16.0 / fwhm), 2, 8))
    kernel_fine = motion_kernel(spec, spec.pixscale_arcsec / o)
    kernel_px = motion_kernel(spec, spec.pixscale_arcsec)
    n_reg = _region_grid(spec)
    x0, y0 = _detector_offset(spec, index)
    half_core = int(math.ceil(5.0 * fwhm * (1.0 + spec.optics_fwhm_growth) + trail_px / 2 + 2))
    cores, profiles = [], []
    atm = atmosphere_profile(spec, fwhm)
    for ry in range(n_reg):
        for rx in range(n_reg):
            cx = x0 + (rx + 0.5) * spec.nx / n_reg - 0.5
            cy = y0 + (ry + 0.5) * spec.ny / n_reg - 0.5
            prof = atm
            if n_reg > 1:
                g1, g2, dil = _optics(spec, cx, cy)
                prof = atm.dilate(dil).shear(g1=g1, g2=g2)
            profiles.append(prof)
            cores.append(_epsf(prof, kernel_fine, half_core, o))
    half_wide = int(min(max(math.ceil(30.0 * fwhm + trail_px / 2 + 5), half_core + 8), 400))
    extra = None
    if spec.spikes:
        ang = np.random.default_rng([spec.field_seed, 301]).uniform(0, 90)
        extra = _spike_image(2 * half_wide + 3, 1.0, fwhm, ang, 3e-3)
    wide = _epsf(atm, kernel_px, half_wide, 1, extra)
    c0, c1 = half_wide - half_core, half_wide + half_core + 1
    wide.phases[:, :, c0:c1, c0:c1] = 0.0
    centre = cores[len(cores) // 2]
    return _PSFModel(n_reg, cores, profiles, wide, kernel_px, float(centre.phases[0, 0].max()))


def _star_fluxes(rng: np.random.Generator, n: int, f_min: float, f_max: float,
                 slope: float) -> np.ndarray:
    """Power-law fluxes, N(>F) ~ F**-slope, between f_min and f_max."""
    u = rng.random(n)
    a, b = f_min ** -slope, f_max ** -slope
    return (a - u * (a - b)) ** (-1.0 / slope)


def _star_positions(rng: np.random.Generator, n: int, spec: ExposureSpec, margin: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    x = rng.uniform(-margin, spec.nx - 1 + margin, n)
    y = rng.uniform(-margin, spec.ny - 1 + margin, n)
    if spec.cluster_fraction > 0:  # a Plummer-profile cluster somewhere on the detector
        nc = int(n * spec.cluster_fraction)
        a = rng.uniform(0.04, 0.2) * min(spec.nx, spec.ny)
        cx, cy = rng.uniform(0.2, 0.8) * spec.nx, rng.uniform(0.2, 0.8) * spec.ny
        rad = a / np.sqrt(np.clip(rng.random(nc), 1e-6, 1.0) ** (-2.0 / 3.0) - 1.0 + 1e-12)
        ang = rng.uniform(0, 2 * np.pi, nc)
        x[:nc], y[:nc] = cx + rad * np.cos(ang), cy + rad * np.sin(ang)
    return x, y


def _add_stars(image: np.ndarray, rng: np.random.Generator, spec: ExposureSpec,
               psf: _PSFModel, sky: _Sky, noise_e: float) -> pd.DataFrame:
    """Render the stars (electrons) and return their true positions and fluxes."""
    area_arcmin2 = spec.nx * spec.ny * spec.pixscale_arcsec**2 / 3600.0
    n_exp = min(spec.star_density_per_arcmin2 * area_arcmin2, 40000.0)
    n = int(rng.poisson(n_exp))
    fwhm = spec.fwhm_px
    f_min = 2.0 * math.sqrt(math.pi * fwhm * fwhm) * noise_e
    if "sparse" in spec.confounders:  # few stars, all of them measurable (S/N >= 20)
        f_min *= 10.0
    sat_e = spec.saturate_adu * spec.gain_e_per_adu
    f_sat = sat_e / psf.peak
    room_e = max(sat_e - 1.5 * spec.sky_e, 0.2 * sat_e)  # peak + sky stays below saturation
    f_max = max(0.7 * room_e / psf.peak if spec.n_bright_stars == 0 else 1.5 * f_sat,
                3 * f_min)
    fluxes = _star_fluxes(rng, n, f_min, f_max, float(rng.uniform(0.55, 0.85)))
    if spec.n_bright_stars:
        bright = np.exp(rng.uniform(math.log(f_sat), math.log(f_sat * rng.uniform(20, 300)),
                                    spec.n_bright_stars))
        fluxes = np.concatenate([fluxes, bright])
    margin = psf.cores[0].half
    x, y = _star_positions(rng, len(fluxes), spec, margin)
    # faint stars use the central part of the core stamp: what lies outside it is below
    # a tenth of the noise
    centre = psf.cores[len(psf.cores) // 2].phases[0, 0]
    h_small = min(int(math.ceil(2.0 * fwhm + spec.trail_arcsec / spec.pixscale_arcsec / 2 + 2)),
                  psf.cores[0].half)
    outer = centre.copy()
    c = psf.cores[0].half
    outer[c - h_small: c + h_small + 1, c - h_small: c + h_small + 1] = 0.0
    small_below = 0.1 * noise_e / max(float(outer.max()), 1e-30)
    ext = spec.transparency_mag + ndimage.map_coordinates(
        sky.patchy_mag, [y / sky.step, x / sky.step], order=1, mode="nearest")
    flux_obs = fluxes * 10.0 ** (-0.4 * ext)
    region = psf.region(x, y, spec.nx, spec.ny)
    wide_peak = float(psf.wide.phases[0, 0].max())
    ix, iy = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - ix, y - iy
    for k in range(len(fluxes)):
        core = psf.cores[region[k]]
        half = h_small if flux_obs[k] < small_below else None
        _place(image, core.stamp(fx[k], fy[k], half), ix[k], iy[k], flux_obs[k])
        if flux_obs[k] * wide_peak > 0.3 * noise_e:
            _place(image, psf.wide.stamp(fx[k], fy[k]), ix[k], iy[k], flux_obs[k])
    inside = (x >= -0.5) & (x < spec.nx - 0.5) & (y >= -0.5) & (y < spec.ny - 0.5)
    return pd.DataFrame({"x": x[inside], "y": y[inside],
                         "flux_e": flux_obs[inside], "extinction_mag": ext[inside]})


def _add_galaxies(image: np.ndarray, rng: np.random.Generator, spec: ExposureSpec,
                  psf: _PSFModel, sky: _Sky, noise_e: float) -> int:
    """Render field galaxies (Sersic profiles convolved with the regional PSF and motion)."""
    if spec.galaxy_density_per_arcmin2 <= 0:
        return 0
    area_arcmin2 = spec.nx * spec.ny * spec.pixscale_arcsec**2 / 3600.0
    n = int(rng.poisson(min(spec.galaxy_density_per_arcmin2 * area_arcmin2, 1000.0)))
    fwhm = spec.fwhm_px
    f_min = 5.0 * math.sqrt(math.pi) * fwhm * noise_e
    sat_e = spec.saturate_adu * spec.gain_e_per_adu
    fluxes = _star_fluxes(rng, n, f_min, max(2.0 * sat_e / psf.peak, 2 * f_min), 0.7)
    x = rng.uniform(0, spec.nx - 1, n)
    y = rng.uniform(0, spec.ny - 1, n)
    ext = spec.transparency_mag + ndimage.map_coordinates(
        sky.patchy_mag, [y / sky.step, x / sky.step], order=1, mode="nearest")
    region = psf.region(x, y, spec.nx, spec.ny)
    trail_px = spec.trail_arcsec / spec.pixscale_arcsec
    # brighter galaxies are larger: hlr ~ 0.2-0.6" at the faint end, ~ flux**0.3
    hlr_arcsec = np.exp(rng.uniform(math.log(0.2), math.log(0.6), n)) * (fluxes / f_min) ** 0.3
    gsp = galsim.GSParams(folding_threshold=1e-2, maxk_threshold=3e-3)
    for k in range(n):
        hlr = float(min(hlr_arcsec[k], 15.0)) / spec.pixscale_arcsec
        sersic_n = float(rng.choice([1.0, 1.5, 2.5, 4.0]))
        q = float(rng.uniform(0.2, 1.0))
        beta = float(rng.uniform(0, np.pi))
        gal = galsim.Sersic(n=sersic_n, half_light_radius=hlr, trunc=8 * hlr,
                            flux=float(fluxes[k] * 10 ** (-0.4 * ext[k])), gsparams=gsp)
        gal = gal.shear(q=q, beta=beta * galsim.radians)
        half = int(min(math.ceil(4 * hlr + 3 * fwhm + trail_px / 2), 127))
        ix, iy = int(np.floor(x[k])), int(np.floor(y[k]))
        stamp = galsim.Convolve(gal, psf.profiles[region[k]], gsparams=gsp).drawImage(
            nx=2 * half + 1, ny=2 * half + 1, scale=1.0,
            offset=(x[k] - ix, y[k] - iy)).array
        if psf.kernel_px is not None:
            stamp = fftconvolve(stamp, psf.kernel_px, mode="same")
        _place(image, stamp.astype(np.float32), ix, iy, 1.0)
    return n


def _extended_light(spec: ExposureSpec, index: int, rng: np.random.Generator) -> np.ndarray | None:
    """A nebula and/or a large bright galaxy (real sky; electrons), or None."""
    if "nebula" not in spec.confounders and "bright_galaxy" not in spec.confounders:
        return None
    sky = spec.sky_e
    out = np.zeros((spec.ny, spec.nx), dtype=np.float32)
    if "nebula" in spec.confounders:
        fx, fy = _focal_plane_size(spec)
        step = float(max(2, _grid_step(max(spec.nx, spec.ny)) // 4))
        rn = np.random.default_rng([spec.field_seed, 401])
        f = _random_field(rn, len(_nodes(fy, step)), len(_nodes(fx, step)), rn.uniform(2.5, 3.5))
        f = np.exp(rn.uniform(0.6, 1.2) * f)
        yy, xx = np.meshgrid(_nodes(fy, step), _nodes(fx, step), indexing="ij")
        c = (rn.uniform(0.2, 0.8) * fx, rn.uniform(0.2, 0.8) * fy)
        w = rn.uniform(0.2, 0.5) * math.hypot(fx, fy)
        f *= np.exp(-((xx - c[0]) ** 2 + (yy - c[1]) ** 2) / (2 * w * w))
        f *= rn.uniform(0.2, 3.0) * sky / f.max()
        x0, y0 = _detector_offset(spec, index)
        gy, gx = np.meshgrid(_nodes(spec.ny, step) + y0, _nodes(spec.nx, step) + x0,
                             indexing="ij")
        out += np.clip(_upsample(_sample_field(f, step, gx, gy), step, spec.ny, spec.nx), 0, None)
    if "bright_galaxy" in spec.confounders:
        rg = np.random.default_rng([spec.field_seed, 402, index])
        r_disk = rg.uniform(0.02, 0.07) * min(spec.nx, spec.ny)
        flux = 2.0 * rg.uniform(0.3, 5.0) * sky * math.pi * r_disk**2
        gal = galsim.Add(
            galsim.Exponential(half_light_radius=r_disk, flux=flux * rg.uniform(0.5, 0.9)),
            galsim.DeVaucouleurs(half_light_radius=r_disk * rg.uniform(0.1, 0.3),
                                 flux=flux * rg.uniform(0.1, 0.5), trunc=4 * r_disk))
        gal = gal.shear(q=rg.uniform(0.3, 1.0), beta=rg.uniform(0, np.pi) * galsim.radians)
        half = int(min(6 * r_disk, max(spec.nx, spec.ny)))
        cx, cy = int(rg.uniform(0.25, 0.75) * spec.nx), int(rg.uniform(0.25, 0.75) * spec.ny)
        img = gal.drawImage(nx=2 * half + 1, ny=2 * half + 1, scale=1.0, method="no_pixel").array
        img = ndimage.gaussian_filter(img, spec.fwhm_px / 2.355).astype(np.float32)
        _place(out, img, cx, cy, 1.0)
    return out


def _line_pixels(nx: int, ny: int, x0: float, y0: float, angle: float, half_width: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixels within ``half_width`` of a line: (yy, xx, distance across, position along)."""
    ca, sa = math.cos(angle), math.sin(angle)
    w = int(math.ceil(half_width / max(abs(ca), abs(sa))))
    if abs(ca) >= abs(sa):  # more horizontal: walk columns
        xs = np.arange(nx)
        yc = y0 + (xs - x0) * sa / ca
        xx = np.repeat(xs, 2 * w + 1)
        yy = (np.round(yc).astype(int)[:, None] + np.arange(-w, w + 1)[None, :]).ravel()
    else:
        ys = np.arange(ny)
        xc = x0 + (ys - y0) * ca / sa
        yy = np.repeat(ys, 2 * w + 1)
        xx = (np.round(xc).astype(int)[:, None] + np.arange(-w, w + 1)[None, :]).ravel()
    ok = (xx >= 0) & (xx < nx) & (yy >= 0) & (yy < ny)
    xx, yy = xx[ok], yy[ok]
    across = -(xx - x0) * sa + (yy - y0) * ca
    along = (xx - x0) * ca + (yy - y0) * sa
    return yy, xx, across, along


def _add_streaks(image: np.ndarray, spec: ExposureSpec, index: int, noise_e: float) -> None:
    """Satellite trails and aircraft (lines across the focal plane; electrons)."""
    if spec.n_satellites == 0:
        return
    fx, fy = _focal_plane_size(spec)
    x0, y0 = _detector_offset(spec, index)
    rs = np.random.default_rng([spec.field_seed, 501])
    sigma = spec.fwhm_px / 2.355
    n_air = 1 if "aircraft" in spec.confounders else 0
    for k in range(spec.n_satellites):
        px, py = rs.uniform(0, fx) - x0, rs.uniform(0, fy) - y0
        ang = rs.uniform(0, np.pi)
        peak = _loguniform(rs, 0.5, 60.0) * noise_e
        if k >= spec.n_satellites - n_air:  # aircraft: two blinking wing lights
            sig = sigma * rs.uniform(2.0, 5.0)
            sep = rs.uniform(6.0, 20.0) * sig
            period = rs.uniform(40.0, 300.0)
            for off in (-sep / 2, sep / 2):
                qx, qy = px - off * math.sin(ang), py + off * math.cos(ang)
                yy, xx, across, along = _line_pixels(spec.nx, spec.ny, qx, qy, ang, 5 * sig)
                phase = along + x0 * math.cos(ang) + y0 * math.sin(ang)
                on = (np.mod(phase, period) < 0.3 * period).astype(float)
                image[yy, xx] += (peak * on * np.exp(-0.5 * (across / sig) ** 2)).astype(np.float32)
        else:
            yy, xx, across, along = _line_pixels(spec.nx, spec.ny, px, py, ang, 5 * sigma + 1)
            glint = 1.0 + 0.3 * np.sin(along / rs.uniform(50.0, 500.0))
            image[yy, xx] += (peak * glint * np.exp(-0.5 * (across / sigma) ** 2)).astype(
                np.float32)


def _bleed(image_e: np.ndarray, full_well_e: float) -> None:
    """Spill charge above the full well up and down its column (charge conserving)."""
    cols = np.flatnonzero((image_e > full_well_e).any(axis=0))
    for c in cols:
        col = image_e[:, c].astype(np.float64)
        over = col > full_well_e
        excess = float((col[over] - full_well_e).sum())
        col[over] = full_well_e
        rows = np.flatnonzero(over)
        for direction, start in ((1, rows.max() + 1), (-1, rows.min() - 1)):
            todo = excess / 2.0
            idx = np.arange(start, col.size) if direction > 0 else np.arange(start, -1, -1)
            room = np.clip(full_well_e - col[idx], 0.0, None)
            filled = np.cumsum(room)
            full = filled <= todo
            col[idx[full]] = full_well_e
            nxt = int(np.count_nonzero(full))
            if nxt < idx.size:
                col[idx[nxt]] += todo - (filled[nxt - 1] if nxt else 0.0)
        image_e[:, c] = col


def _add_cosmetics(image_e: np.ndarray, spec: ExposureSpec, rng: np.random.Generator) -> dict:
    """Hot pixels and bad columns (before noise); returns counts for the truth."""
    ny, nx = image_e.shape
    n_hot = int(rng.poisson(spec.hot_pixel_fraction * nx * ny)) if spec.hot_pixel_fraction else 0
    if n_hot:
        rate = np.exp(rng.uniform(math.log(0.5), math.log(50.0), n_hot))
        image_e[rng.integers(0, ny, n_hot), rng.integers(0, nx, n_hot)] += np.maximum(
            rate * spec.exptime_s, 100.0).astype(np.float32)
    for _ in range(spec.n_bad_columns):
        c = int(rng.integers(0, nx))
        start = int(rng.integers(0, ny)) if rng.random() < 0.5 else 0
        if rng.random() < 0.5:  # dead or low-response column
            image_e[start:, c] *= np.float32(rng.uniform(0.0, 0.3))
        else:  # hot column (charge trap releasing charge)
            image_e[start:, c] += np.float32(_loguniform(rng, 50.0, 5000.0))
    return {"n_hot_pixels": n_hot}


def _add_cosmic_rays(image_e: np.ndarray, spec: ExposureSpec, rng: np.random.Generator) -> int:
    """Cosmic-ray hits: sharp single pixels and short tracks (not PSF-convolved)."""
    if spec.cosmic_ray_rate <= 0:
        return 0
    ny, nx = image_e.shape
    area_cm2 = nx * ny * (spec.pixel_size_um * 1e-4) ** 2
    n = int(rng.poisson(spec.cosmic_ray_rate * area_cm2 * spec.exptime_s / 60.0))
    if n == 0:
        return 0
    length = rng.exponential(3.0, n)
    ang = rng.uniform(0, 2 * np.pi, n)
    x0, y0 = rng.uniform(0, nx - 1, n), rng.uniform(0, ny - 1, n)
    charge = np.exp(rng.uniform(math.log(300.0), math.log(2e4), n))
    steps = np.maximum(1, np.ceil(length * 2).astype(int))
    seg = np.repeat(np.arange(n), steps)
    t = np.concatenate([np.linspace(0, 1, s) for s in steps])
    xx = np.clip(np.round(x0[seg] + t * length[seg] * np.cos(ang[seg])), 0, nx - 1).astype(int)
    yy = np.clip(np.round(y0[seg] + t * length[seg] * np.sin(ang[seg])), 0, ny - 1).astype(int)
    per_sample = np.where(steps[seg] > 1, 0.5, 1.0)  # two samples per pixel along a track
    np.add.at(image_e, (yy, xx),
              (charge[seg] * per_sample * rng.uniform(0.5, 1.5, seg.size)).astype(np.float32))
    return n


# ----------------------------------------------------------------------------- rendering


def render_detector(spec: ExposureSpec, index: int, rng: np.random.Generator) -> SimDetector:
    """Render one detector of an exposure.

    Parameters
    ----------
    spec
        The exposure.
    index
        Detector index, 0 .. ``spec.n_detectors - 1`` (row-major in the focal plane).
    rng
        Randomness of this detector (star field, noise, cosmetics); exposure-wide
        structures come from ``spec.field_seed``.

    Returns
    -------
    SimDetector
        Calibrated image (float32 ADU), header, truth, defect mask and true stars.
    """
    if not 0 <= index < spec.n_detectors:
        raise ValueError(f"detector index {index} outside 0..{spec.n_detectors - 1}")
    nx, ny = spec.nx, spec.ny
    gain = spec.gain_e_per_adu
    sky_nodes_ = sky_nodes(spec, index)
    smooth = _upsample(sky_nodes_.smooth(), sky_nodes_.step, ny, nx)
    noise_e = math.sqrt(spec.sky_e + spec.read_noise_e**2)

    psf = _psf_model(spec, index)
    light = np.zeros((ny, nx), dtype=np.float32)
    stars = _add_stars(light, rng, spec, psf, sky_nodes_, noise_e)
    n_gal = _add_galaxies(light, rng, spec, psf, sky_nodes_, noise_e)
    extended = _extended_light(spec, index, rng)
    streak = np.zeros((ny, nx), dtype=np.float32) if spec.n_satellites else None
    if streak is not None:
        _add_streaks(streak, spec, index, noise_e)
    patchy = None
    if np.any(sky_nodes_.patchy_mag > 0):
        patchy = _upsample(sky_nodes_.patchy_mag, sky_nodes_.step, ny, nx)
    if extended is not None or streak is not None:
        trans = np.float32(10.0 ** (-0.4 * spec.transparency_mag))
        diffuse = sum(a for a in (extended, streak) if a is not None) * trans
        if patchy is not None:
            diffuse *= 10.0 ** (-0.4 * patchy)
        light += diffuse

    total = smooth + light
    flat, n_dust = illumination(spec, index)
    if flat is not None:  # an uncorrected flat dims sky and sources alike
        total *= flat
    cosmetics = _add_cosmetics(total, spec, rng)
    _bleed(total, spec.full_well_e)
    np.clip(total, 0.0, None, out=total)
    if spec.sky_e < POISSON_EXACT_BELOW_E:
        image = rng.poisson(total).astype(np.float32)
        image += rng.standard_normal((ny, nx), dtype=np.float32) * np.float32(spec.read_noise_e)
    else:
        image = rng.standard_normal((ny, nx), dtype=np.float32)
        image *= np.sqrt(total + np.float32(spec.read_noise_e**2))
        image += total
    n_cr = _add_cosmic_rays(image, spec, rng)
    image /= np.float32(gain)
    np.minimum(image, np.float32(spec.saturate_adu), out=image)
    raw = None
    if spec.raw:
        raw = raw_frame(image, spec, rng)
        image = (raw[_data_slices(spec)] - np.float32(spec.bias_adu)).astype(np.float32)

    mask = np.zeros((ny, nx), dtype=bool)
    if np.any(sky_nodes_.light > 0):
        light_full = _upsample(sky_nodes_.light, sky_nodes_.step, ny, nx)
        mask |= light_full > MASK_LIGHT_FRACTION * spec.sky_e
    if patchy is not None:
        mask |= patchy > MASK_EXTINCTION_MAG

    u_true = _nonuniformity(smooth[::2, ::2])
    k_true = _spread(patchy[::2, ::2]) if patchy is not None else 0.0
    stars["flux_adu"] = stars.pop("flux_e") / gain
    ixs = np.clip(np.round(stars["x"].to_numpy()).astype(int), 0, nx - 1)
    iys = np.clip(np.round(stars["y"].to_numpy()).astype(int), 0, ny - 1)
    stars["saturated"] = image[iys, ixs] >= spec.saturate_adu
    stars["illumination"] = (flat[iys, ixs].astype(np.float64) if flat is not None
                             else np.ones(len(stars)))
    name = detector_id(spec, index)
    truth = {
        "exposure": spec.exposure, "detector": name, "detector_index": index,
        "hdu": detector_hdu(spec, index),
        "seeing_arcsec": spec.seeing_arcsec, "fwhm_px_true": spec.fwhm_px,
        "trail_arcsec": spec.trail_arcsec, "trail_ratio": spec.trail_ratio,
        "trail_pa_deg": spec.trail_pa_deg, "trail_kind": spec.trail_kind,
        "ellipticity_true": psf_ellipticity(spec), "u_true": u_true, "k_true": k_true,
        **truth_class(spec.seeing_arcsec, spec.trail_ratio, u_true, k_true, spec.trail_kind),
        "target_class": spec.target_class, "confounders": ",".join(spec.confounders),
        "n_stars": int(len(stars)), "n_saturated_stars": int(stars["saturated"].sum()),
        "n_galaxies": n_gal, "n_cosmic_rays": n_cr, **cosmetics,
        "defect_mask_fraction": float(mask.mean()),
        "sky_level_adu": spec.sky_level_adu, "pixscale_arcsec": spec.pixscale_arcsec,
        "atm_fwhm_arcsec": spec.atm_fwhm_arcsec, "n_dust_donuts": n_dust,
        "read_binning": 2 if spec.bayer_pattern else 1,  # the reader bins Bayer frames 2x2
        "flat_nonuniformity": _nonuniformity(flat[::2, ::2]) if flat is not None else 0.0,
    }
    header = {**exposure_header(spec), **detector_header(spec, index)}
    return SimDetector(index, name, image, header, truth, mask, stars, raw)


# ----------------------------------------------------------------------------- raw frames


def illumination(spec: ExposureSpec, index: int) -> tuple[np.ndarray | None, int]:
    """The detector's response to light that no flat field has corrected, and the number
    of dust donuts on it.

    The product of vignetting ``1 / (1 + c rho**2)**2`` (``rho``: distance from the optical
    axis over the focal plane's half-diagonal; ``c`` such that the corner gets
    ``1 - vignetting_corner``), dust donuts (shadows of dust on a window or filter: rings
    of outer radius 8-60 px with the central obstruction, 1.5-12 % deep) and, on a Bayer
    frame, the colour-filter response. None when the detector has none of them.
    """
    ny, nx = spec.ny, spec.nx
    flat = None
    if spec.vignetting_corner > 0:
        x0, y0 = _detector_offset(spec, index)
        fx, fy = _focal_plane_size(spec)
        cx = (fx - 1) / 2.0 + spec.vignetting_dx * fx
        cy = (fy - 1) / 2.0 + spec.vignetting_dy * fy
        norm = (fx / 2.0) ** 2 + (fy / 2.0) ** 2
        c = 1.0 / math.sqrt(1.0 - spec.vignetting_corner) - 1.0
        dx2 = ((np.arange(nx, dtype=np.float32) + x0 - cx) ** 2 / norm)[None, :]
        dy2 = ((np.arange(ny, dtype=np.float32) + y0 - cy) ** 2 / norm)[:, None]
        flat = (1.0 / (1.0 + np.float32(c) * (dx2 + dy2)) ** 2).astype(np.float32)
    n_dust = 0
    if spec.dust_per_detector > 0:
        rd = np.random.default_rng([_instrument_seed(spec), 602, index])
        n_dust = int(rd.poisson(spec.dust_per_detector))
        if flat is None:
            flat = np.ones((ny, nx), dtype=np.float32)
        for _ in range(n_dust):
            _dust_donut(flat, rd)
    if spec.bayer_pattern:
        response = {"R": spec.bayer_red, "G": 1.0, "B": spec.bayer_blue}
        cell = np.array([[response[spec.bayer_pattern[0]], response[spec.bayer_pattern[1]]],
                         [response[spec.bayer_pattern[2]], response[spec.bayer_pattern[3]]]],
                        dtype=np.float32)
        cfa = np.tile(cell, (ny // 2 + 1, nx // 2 + 1))[:ny, :nx]
        flat = cfa if flat is None else flat * cfa
    return flat, n_dust


def _dust_donut(flat: np.ndarray, rng: np.random.Generator) -> None:
    """Multiply ``flat`` by one dust donut at a random place (in place)."""
    ny, nx = flat.shape
    r_out = _loguniform(rng, 8.0, 60.0)
    r_in = r_out * float(rng.uniform(0.3, 0.55))
    depth = _loguniform(rng, 0.015, 0.12)
    soft = float(rng.uniform(0.8, 2.5))
    xc, yc = float(rng.uniform(0, nx - 1)), float(rng.uniform(0, ny - 1))
    h = int(math.ceil(r_out + 4 * soft))
    ys = slice(max(0, int(yc) - h), min(ny, int(yc) + h + 1))
    xs = slice(max(0, int(xc) - h), min(nx, int(xc) + h + 1))
    yy, xx = np.mgrid[ys, xs]
    d = np.hypot(xx - xc, yy - yc)
    ring = 1.0 / (1.0 + np.exp(-(r_out - d) / soft)) / (1.0 + np.exp(-(d - r_in) / soft))
    flat[ys, xs] *= (1.0 - depth * ring).astype(np.float32)


def raw_shape(spec: ExposureSpec) -> tuple[int, int]:
    """(rows, columns) of a detector's array as written: exposed pixels plus prescan,
    overscan columns and overscan rows."""
    return spec.ny + spec.overscan_rows, spec.prescan_px + spec.nx + spec.overscan_px


def _data_slices(spec: ExposureSpec) -> tuple[slice, slice]:
    return slice(0, spec.ny), slice(spec.prescan_px, spec.prescan_px + spec.nx)


def raw_frame(image_adu: np.ndarray, spec: ExposureSpec, rng: np.random.Generator
              ) -> np.ndarray:
    """The detector as the camera writes it: ``uint16`` ADU with the bias level, prescan
    and overscan (bias plus read noise), rounded and clipped to the ADC range."""
    rows, cols = raw_shape(spec)
    full = rng.standard_normal((rows, cols), dtype=np.float32)
    full *= np.float32(spec.read_noise_e / spec.gain_e_per_adu)
    full[_data_slices(spec)] = image_adu
    full += np.float32(spec.bias_adu)
    return np.clip(np.round(full), 0, 65535).astype(np.uint16)


# ----------------------------------------------------------------------------- headers, HDUs


def _sexagesimal(deg: float, hours: bool) -> str:
    value = deg / 15.0 if hours else deg
    sign = "-" if value < 0 else ("" if hours else "+")
    value = abs(value)
    d = int(value)
    m = int((value - d) * 60)
    s = (value - d - m / 60.0) * 3600.0
    return f"{sign}{d:02d}:{m:02d}:{s:05.2f}" if hours else f"{sign}{d:02d}:{m:02d}:{s:04.1f}"


def exposure_header(spec: ExposureSpec) -> dict:
    """Exposure-level keywords, ``{key: (value, comment)}`` (missing keys left out)."""
    h = {
        "OBJECT": (spec.object_name, "target field"),
        "EXPNUM": (spec.expnum, "exposure number"),
        "DATE-OBS": (spec.date_obs, "UTC start of the exposure"),
        "MJD-OBS": (round(spec.mjd_obs, 8), "MJD (UTC) start of the exposure"),
        "EXPTIME": (spec.exptime_s, "[s] exposure time"),
        "FILTER": (spec.filter, "filter"),
        "AIRMASS": (round(spec.airmass, 4), "airmass at start"),
        "RA": (_sexagesimal(spec.ra_deg, True), "pointing right ascension"),
        "DEC": (_sexagesimal(spec.dec_deg, False), "pointing declination"),
        "EQUINOX": (2000.0, "equinox of the pointing"),
        "IMAGETYP": ("object", "image type"),
        "BUNIT": ("adu", "raw: bias level and overscan kept" if spec.raw
                  else "calibrated: bias removed, sky kept"),
        "ORIGIN": ("survey-qa simulate", "simulated frame"),
    }
    return {k: v for k, v in h.items() if k not in spec.missing_keys}


def detector_header(spec: ExposureSpec, index: int) -> dict:
    """Detector-level keywords: gain, noise, saturation and the pixel scale.

    Header style ``wcs``/``sparse``: a TAN WCS (CRPIX/CRVAL/CD) placing the detector in
    the focal plane; ``pixscale``: only ``PIXSCALE``; ``secpix``: only ``SECPIX``.
    """
    h = {
        "GAIN": (spec.gain_e_per_adu, "[e-/adu] gain"),
        "RDNOISE": (spec.read_noise_e, "[e-] read noise"),
        "SATURATE": (spec.saturate_adu, "[adu] saturation level"),
        "CCDNAME": (f"ccd{index + 1:02d}", "detector name"),
    }
    if spec.header_style in ("wcs", "sparse"):
        x0, y0 = _detector_offset(spec, index)
        fx, fy = _focal_plane_size(spec)
        scale = spec.pixscale_arcsec / ARCSEC_PER_DEG
        th = math.radians(spec.rotation_deg)
        h.update({
            "CTYPE1": ("RA---TAN", ""), "CTYPE2": ("DEC--TAN", ""),
            "CRVAL1": (spec.ra_deg, "[deg]"), "CRVAL2": (spec.dec_deg, "[deg]"),
            "CRPIX1": ((fx - 1) / 2.0 - x0 + 1.0 + spec.prescan_px,
                       "tangent point, 1-based pixel"),
            "CRPIX2": ((fy - 1) / 2.0 - y0 + 1.0, "tangent point, 1-based pixel"),
            "CD1_1": (-scale * math.cos(th), ""), "CD1_2": (scale * math.sin(th), ""),
            "CD2_1": (scale * math.sin(th), ""), "CD2_2": (scale * math.cos(th), ""),
            "RADESYS": ("ICRS", ""),
        })
    elif spec.header_style == "pixscale":
        h["PIXSCALE"] = (round(spec.pixscale_arcsec, 5), "[arcsec/px] pixel scale")
    elif spec.header_style == "secpix":
        h["SECPIX"] = (round(spec.pixscale_arcsec, 5), "[arcsec/px] pixel scale")
    if spec.raw:
        pre, nx, ny = spec.prescan_px, spec.nx, spec.ny
        data = f"[{pre + 1}:{pre + nx},1:{ny}]"
        h.update({
            "SATURATE": (float(math.floor(spec.saturate_adu + spec.bias_adu)),
                         "[adu] saturation level (raw, bias included)"),
            "BIASSEC": (f"[{pre + nx + 1}:{pre + nx + spec.overscan_px},1:{ny}]",
                        "overscan columns"),
            "DATASEC": (data, "exposed pixels"), "TRIMSEC": (data, "exposed pixels"),
        })
    if spec.bayer_pattern:
        h["BAYERPAT"] = (spec.bayer_pattern, "colour-filter array, first row first")
    return {k: v for k, v in h.items() if k not in spec.missing_keys}


def _to_header(cards: dict) -> fits.Header:
    hdr = fits.Header()
    for key, (value, comment) in cards.items():
        hdr[key] = (value, comment)
    return hdr


def _dither_seed(spec: ExposureSpec) -> int:
    return 1 + spec.field_seed % 10000


def build_hdulist(spec: ExposureSpec, detectors: list[SimDetector]) -> fits.HDUList:
    """The exposure as it is written to disk (in memory, not written).

    ``fits``/``fits.gz``: one primary HDU with the image; ``fits.fz``: an empty primary and
    a RICE_1 ``CompImageHDU``; ``mosaic``/``mosaic.fz``: an empty primary with the exposure
    keywords and one ``ImageHDU`` (``CompImageHDU``) per detector, EXTNAME ``ccdNN``.
    """
    if len(detectors) != spec.n_detectors:
        raise ValueError(f"expected {spec.n_detectors} detectors, got {len(detectors)}")
    fmt = spec.file_format
    if fmt in ("fits", "fits.gz"):
        d = detectors[0]
        return fits.HDUList([fits.PrimaryHDU(d.pixels, header=_to_header(d.header))])
    if fmt == "fits.fz":
        d = detectors[0]
        comp = fits.CompImageHDU(d.pixels, header=_to_header(d.header),
                                 compression_type="RICE_1", dither_seed=_dither_seed(spec))
        return fits.HDUList([fits.PrimaryHDU(), comp])
    hdus: list = [fits.PrimaryHDU(header=_to_header(exposure_header(spec)))]
    for d in detectors:
        hdr = _to_header(detector_header(spec, d.index))
        hdr.insert(0, ("EXTNAME", d.name, "detector"))  # set in the header: keeps its case
        if fmt == "mosaic":
            hdus.append(fits.ImageHDU(d.pixels, header=hdr))
        else:
            hdus.append(fits.CompImageHDU(d.pixels, header=hdr, compression_type="RICE_1",
                                          dither_seed=_dither_seed(spec) + d.index))
    return fits.HDUList(hdus)


def mask_hdulist(spec: ExposureSpec, detectors: list[SimDetector]) -> fits.HDUList:
    """Truth defect masks: an empty primary and one lossless tile-compressed uint8 HDU per
    detector, EXTNAME = the detector id."""
    hdus: list = [fits.PrimaryHDU()]
    for d in detectors:
        hdr = fits.Header()
        hdr["EXTNAME"] = (d.name, "detector")
        hdr["MASKDEF"] = (f"L/sky>{MASK_LIGHT_FRACTION} or K>{MASK_EXTINCTION_MAG}mag",
                          "defect mask definition")
        hdus.append(fits.CompImageHDU(d.defect_mask.astype(np.uint8), header=hdr,
                                      compression_type="RICE_1"))
    return fits.HDUList(hdus)


def truth_records(spec: ExposureSpec, detectors: list[SimDetector]) -> list[dict]:
    """One truth row per detector: the detector truth, the exposure class and the spec."""
    classes = [d.truth["quality_class"] for d in detectors]
    exp_cls = exposure_class(classes)
    spec_row = spec.to_row()
    rows = []
    for d in detectors:
        row = dict(d.truth)
        row["exposure_class"] = exp_cls
        row["n_detectors"] = spec.n_detectors
        for key, value in spec_row.items():
            row.setdefault(key if key not in ("ambiguous",) else "ambiguous_requested", value)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- night plans


@dataclass
class FramePlan:
    """What one exposure of a simulated night should be."""

    index: int
    exposure: str
    quality_class: str
    ambiguous: bool
    file_format: str
    date_obs: str
    expnum: int
    size_px: int
    n_detectors: int | None = None
    overrides: dict = field(default_factory=dict)  # extra keyword arguments of draw_spec

    @property
    def filename(self) -> str:
        ext = {"fits": ".fits", "fits.fz": ".fits.fz", "fits.gz": ".fits.gz",
               "mosaic": ".fits", "mosaic.fz": ".fits.fz"}[self.file_format]
        return self.exposure + ext


MIXES = {
    "balanced": {c: 1.0 for c in CLASSES},
    "realistic": {"good": 0.55, "bad_seeing": 0.15, "bad_tracking": 0.1,
                  "very_bad_tracking": 0.05, "background_issues": 0.15},
}
FORMAT_SHARES = {"fits": 0.6, "fits.fz": 0.12, "fits.gz": 0.12, "mosaic": 0.1, "mosaic.fz": 0.06}


def night_times(night: str, n: int, rng: np.random.Generator) -> list[str]:
    """Increasing ISO UTC start times from 20:00 on the night's date to 05:30 next morning."""
    start = datetime.fromisoformat(night).replace(hour=20, tzinfo=timezone.utc)
    span_s = 9.5 * 3600.0
    slot = span_s / max(n, 1)
    out = []
    for i in range(n):
        t = start + timedelta(seconds=i * slot + rng.uniform(0.0, 0.5 * slot))
        out.append(t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}")
    return out


def plan_night(night: str, n_frames: int, *, seed: int = 0, mix: str = "balanced",
               ambiguous_fraction: float = 0.0, size_px: int = 4096,
               format_shares: dict | None = None, domain: str = "default"
               ) -> list[FramePlan]:
    """Composition of a simulated night: class, format and time of every exposure.

    ``balanced`` gives the five classes in equal shares (shuffled), ``realistic`` mostly
    good frames. A share ``ambiguous_fraction`` of the frames is drawn from the spec's gaps.
    Mosaics have detectors of ``size_px // 2``. ``domain`` (:data:`DOMAINS`) is passed to
    :func:`draw_spec`: in the ``wide`` domain ``size_px`` is the largest detector side and
    the night is taken with one to three instruments (:func:`camera_of`), each with its own
    detector shape, filters, raw layout and illumination pattern.
    """
    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}; expected one of {sorted(MIXES)}")
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    if n_frames < 1:
        raise ValueError("n_frames must be at least 1")
    if not 0.0 <= ambiguous_fraction <= 1.0:
        raise ValueError("ambiguous_fraction must be in [0, 1]")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _night_number(night), 0]))
    shares = MIXES[mix]
    if mix == "balanced":
        classes = [CLASSES[i % len(CLASSES)] for i in range(n_frames)]
        rng.shuffle(classes)
    else:
        p = np.array(list(shares.values()))
        classes = [list(shares)[i] for i in rng.choice(len(shares), n_frames, p=p / p.sum())]
    fs = format_shares or FORMAT_SHARES
    fmts = list(fs)
    pf = np.array([fs[f] for f in fmts], dtype=float)
    formats = [fmts[i] for i in rng.choice(len(fmts), n_frames, p=pf / pf.sum())]
    ambiguous = rng.random(n_frames) < ambiguous_fraction
    times = night_times(night, n_frames, rng)
    stem = night.replace("-", "")
    plans = []
    cameras = _night_cameras(night, seed, n_frames) if domain == "wide" else None
    for i in range(n_frames):
        mosaic = formats[i].startswith("mosaic")
        over = {} if domain == "default" else {"domain": domain}
        if cameras is not None:
            over["camera_seed"] = cameras[i] + (1 if mosaic else 0)  # a mosaic camera
        plans.append(FramePlan(i, f"{stem}_{i + 1:04d}", classes[i], bool(ambiguous[i]),
                               formats[i], times[i], i + 1,
                               size_px // 2 if mosaic else size_px, overrides=over))
    return plans


def _night_cameras(night: str, seed: int, n_frames: int) -> list[int]:
    """Camera seed of every frame of a wide-domain night: one to three instruments (even
    seeds; a mosaic frame uses the seed after its camera's, a mosaic camera)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _night_number(night), 2]))
    n_cameras = int(rng.integers(1, 4))
    seeds = 2 * rng.integers(0, 2**30, n_cameras)
    return [int(seeds[k]) for k in rng.integers(0, n_cameras, n_frames)]


def _night_number(night: str) -> int:
    try:
        return int(datetime.fromisoformat(night).strftime("%Y%m%d"))
    except ValueError:
        raise ValueError(f"night must be YYYY-MM-DD, got {night!r}") from None


def exposure_seeds(night: str, seed: int, index: int, n_detectors: int
                   ) -> tuple[np.random.Generator, list[np.random.Generator]]:
    """Generators of one exposure: one for its spec, one per detector (deterministic)."""
    ss = np.random.SeedSequence([seed, _night_number(night), 1, index])
    children = ss.spawn(1 + n_detectors)
    return np.random.default_rng(children[0]), [np.random.default_rng(c) for c in children[1:]]


def simulate_exposure(plan: FramePlan, night: str, seed: int
                      ) -> tuple[ExposureSpec, list[SimDetector]]:
    """Draw the spec of a planned exposure and render all its detectors."""
    n_det_max = 8
    spec_rng, det_rngs = exposure_seeds(night, seed, plan.index, n_det_max)
    spec = draw_spec(spec_rng, plan.quality_class, exposure=plan.exposure,
                     size_px=plan.size_px, ambiguous=plan.ambiguous,
                     file_format=plan.file_format, n_detectors=plan.n_detectors,
                     date_obs=plan.date_obs, expnum=plan.expnum, **plan.overrides)
    return spec, [render_detector(spec, i, det_rngs[i]) for i in range(spec.n_detectors)]
