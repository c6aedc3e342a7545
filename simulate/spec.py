"""What a simulated exposure is: its truth parameters, its detectors and their layout.

:class:`ExposureSpec` holds every truth parameter of one exposure, :class:`SimDetector` one
rendered detector. The names of the kinds an exposure can take (trail, background, file
format, PSF profile, header style), the confounders that leave its class unchanged and the
ranges of the ``wide`` domain live here, with the place of each detector in the focal
plane (row-major, detectors separated by ``gap_px``).

Domains
-------
``default`` (survey telescopes: 0.15-0.5"/px, calibrated square detectors) draws what it
always drew for a given seed. ``wide`` widens the draws to real instruments: pixel scales
0.1-15"/px, FWHM 1.2-20 px, bad seeing up to tens of arcsec, detectors of 500 px to
``size_px`` (aspect 1-1.5), and the :data:`WIDE_CONFOUNDERS` (raw frames, vignetting and
dust donuts, Bayer frames, defocused donut PSFs, sparse fields of 12-30 stars), with at
least 60 stars per detector otherwise (about 20 above S/N 10).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from survey_qa.simulate.profiles import atm_ratio


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
        return self.seeing_arcsec * atm_ratio(self.psf_profile, beta, self.defocus_ratio,
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


def instrument_seed(spec: ExposureSpec) -> int:
    """Seed of the instrument-level draws: the night's camera, else the frame's field."""
    return spec.camera_seed if spec.camera_seed >= 0 else spec.field_seed


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


def detector_offset(spec: ExposureSpec, index: int) -> tuple[int, int]:
    col, row = index % spec.mosaic_cols, index // spec.mosaic_cols
    return col * (spec.nx + spec.gap_px), row * (spec.ny + spec.gap_px)


def focal_plane_size(spec: ExposureSpec) -> tuple[int, int]:
    fx = spec.mosaic_cols * spec.nx + (spec.mosaic_cols - 1) * spec.gap_px
    fy = spec.mosaic_rows * spec.ny + (spec.mosaic_rows - 1) * spec.gap_px
    return fx, fy
