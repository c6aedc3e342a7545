"""A night as a sequence: N exposures of one field under conditions that change with time.

A :class:`Scene` is one field's stars and galaxies, drawn once from a scene seed in the
pixels of a reference pointing (the first frame's). Every frame of a :class:`Sequence`
renders that same scene through its own :class:`Pointing` (a shift and a small rotation
about the detector centre), so that a star keeps its ``star_id`` from frame to frame.

The conditions of the night (:func:`draw_conditions`) follow the time of each frame:

- **seeing**: a smooth random walk of the atmospheric FWHM with one bad-seeing spell, and a
  **focus** excursion (the FWHM grows over a few frames, then the telescope is refocused);
- **transparency**: a grey extinction curve (mag), zero most of the night, with one or two
  thin-cloud passages of 0.2-1 mag; frames in a passage may also carry **patchy cloud**
  (the extinction map of :mod:`.sky`, spread ``k`` of 0.1-0.8 mag);
- **sky brightness**: twilight at the start and the end of the night and the moon (its
  phase fixed for the night, its light following its altitude); the sky level is the
  dark sky times ``sky_factor``, limited smoothly below saturation. The grey extinction
  dims the sources, not the sky (as in the other simulated frames);
- **pointing**: a slow drift of a few px per frame and one re-pointing (a jump of tens to
  hundreds of px and a rotation of a fraction of a degree);
- **tracking**: mostly good, one or two trailed frames on longer sequences;
- **added light** (:func:`draw_light`): one or two short spells (1-3 frames) of light that
  the sky or the dome adds, a gradient, scattered light or a glow from an edge or corner,
  of sky non-uniformity ``u`` 0.06-0.6 (a frame under patchy cloud keeps its cloud).

Pointing convention: a star at reference pixel ``p_ref`` is at
``p = c + R(rotation_deg) (p_ref - c) + (shift_x_px, shift_y_px)`` in the frame, with
``c`` the detector centre and ``R`` a rotation from +x towards +y. The frame's WCS follows
the pointing (its CRVAL is the sky position of its centre, its CD matrix turns with it).

Truth of a frame (:func:`frame_truth`, one row per detector, added to
:func:`~survey_qa.simulate.truth.truth_records`): ``field``, ``sequence_index``,
``transparency_mag`` (grey extinction plus the mean patchy extinction over the detector:
how much fainter the stars are than in a clear frame), ``grey_extinction_mag``,
``patchy_mean_mag``, ``k_true`` (P99 - P1 of the patchy extinction map, as before),
``shift_x_px``, ``shift_y_px``, ``rotation_deg`` (the pointing relative to the
reference), ``wcs_rotation_deg`` (the rotation of the frame's WCS), ``repointed`` (the
frame comes after the re-pointing), ``seeing_atm_arcsec``, ``focus_factor``,
``sky_factor``, ``twilight_factor``, ``moon_factor``, ``moon_phase`` and ``scene_seed``.
True stars of a frame (:func:`frame_stars`): the detector's columns (``x``, ``y``,
``flux_adu``, ``extinction_mag``, ``saturated``, ``illumination``) and ``star_id``,
``x_ref``, ``y_ref`` (reference pixels) and ``flux_clear_adu`` (the flux in a clear frame,
``flux_adu = flux_clear_adu * 10**(-0.4 * extinction_mag)``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
from astropy.time import Time
from astropy.wcs import WCS

from survey_qa.simulate.draw import draw_spec, loguniform
from survey_qa.simulate.hdus import detector_header
from survey_qa.simulate.psf import psf_model
from survey_qa.simulate.render import render_detector
from survey_qa.simulate.sky import sky_nodes, upsample
from survey_qa.simulate.sources import SceneView
from survey_qa.simulate.spec import ExposureSpec, SimDetector
from survey_qa.simulate.truth import truth_class, truth_records

SEQUENCE_CONFOUNDERS = ("cosmic_rays", "galaxies", "hot_pixels")
"""Confounders of every frame of a sequence (a satellite crosses some frames too)."""

NIGHT_START_UTC_H = 19.5   # first frame at evening twilight (UTC hours of the night's date)
NIGHT_SPAN_H = 10.5        # last frame at morning twilight


@dataclass(frozen=True)
class Pointing:
    """A frame's pointing relative to the scene's reference: the scene moves by
    (``shift_x_px``, ``shift_y_px``) and turns by ``rotation_deg`` (from +x towards +y)
    about the detector centre."""

    shift_x_px: float = 0.0
    shift_y_px: float = 0.0
    rotation_deg: float = 0.0

    def apply(self, x_ref: np.ndarray, y_ref: np.ndarray, nx: int, ny: int
              ) -> tuple[np.ndarray, np.ndarray]:
        """Frame pixels of reference pixels."""
        cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
        c, s = math.cos(math.radians(self.rotation_deg)), math.sin(math.radians(self.rotation_deg))
        dx, dy = np.asarray(x_ref) - cx, np.asarray(y_ref) - cy
        return cx + c * dx - s * dy + self.shift_x_px, cy + s * dx + c * dy + self.shift_y_px

    def invert(self, x: np.ndarray, y: np.ndarray, nx: int, ny: int
               ) -> tuple[np.ndarray, np.ndarray]:
        """Reference pixels of frame pixels."""
        cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
        c, s = math.cos(math.radians(self.rotation_deg)), math.sin(math.radians(self.rotation_deg))
        dx, dy = np.asarray(x) - cx - self.shift_x_px, np.asarray(y) - cy - self.shift_y_px
        return cx + c * dx + s * dy, cy - s * dx + c * dy


@dataclass
class Scene:
    """One field's sources in the reference pointing's pixels.

    ``stars``: ``star_id``, ``x_ref``, ``y_ref`` (px), ``flux_e`` (electrons per exposure
    above the clouds); ``galaxies``: ``x_ref``, ``y_ref``, ``flux_e``, ``hlr_arcsec``,
    ``sersic_n``, ``q``, ``beta_rad`` (major axis in the reference pixels).
    """

    field: str
    stars: pd.DataFrame
    galaxies: pd.DataFrame

    def view(self, pointing: Pointing, nx: int, ny: int, margin_px: float) -> SceneView:
        """The scene through a pointing: stars within ``margin_px`` of the detector
        (their light reaches it), galaxies centred on it."""
        st, ga = self.stars, self.galaxies
        x, y = pointing.apply(st["x_ref"].to_numpy(), st["y_ref"].to_numpy(), nx, ny)
        keep = (x > -margin_px) & (x < nx - 1 + margin_px) & (y > -margin_px) \
            & (y < ny - 1 + margin_px)
        gx, gy = pointing.apply(ga["x_ref"].to_numpy(), ga["y_ref"].to_numpy(), nx, ny)
        g = (gx >= 0) & (gx <= nx - 1) & (gy >= 0) & (gy <= ny - 1)
        return SceneView(
            star_id=st["star_id"].to_numpy()[keep], x=x[keep], y=y[keep],
            flux_e=st["flux_e"].to_numpy()[keep],
            gal_x=gx[g], gal_y=gy[g], gal_flux_e=ga["flux_e"].to_numpy()[g],
            gal_hlr_arcsec=ga["hlr_arcsec"].to_numpy()[g],
            gal_sersic_n=ga["sersic_n"].to_numpy()[g], gal_q=ga["q"].to_numpy()[g],
            gal_beta_rad=ga["beta_rad"].to_numpy()[g] + math.radians(pointing.rotation_deg))


@dataclass(frozen=True)
class FrameConditions:
    """The conditions of one frame of a sequence (see the module docstring)."""

    index: int
    time_fraction: float        # 0 at the start of the night, 1 at its end
    seeing_atm_arcsec: float
    focus_factor: float         # effective FWHM over the atmospheric one (>= 1)
    trail_kind: str
    trail_ratio: float
    trail_pa_deg: float
    grey_extinction_mag: float
    cloud_k_mag: float          # target spread of the patchy extinction (0: no patchy cloud)
    cloud_emission: float
    twilight_factor: float
    moon_factor: float
    airmass: float
    pointing: Pointing
    repointed: bool
    satellite: bool
    light_kind: str = "none"    # light added to the sky: gradient, scattered or glow
    light_u: float = 0.0        # its target sky non-uniformity u

    @property
    def seeing_arcsec(self) -> float:
        """Effective seeing FWHM: atmosphere times the focus excursion."""
        return self.seeing_atm_arcsec * self.focus_factor

    @property
    def sky_factor(self) -> float:
        """Sky level over the dark sky: twilight and moon light added."""
        return self.twilight_factor + self.moon_factor - 1.0


@dataclass
class Sequence:
    """A planned sequence: the night, the field's scene and camera, and every frame's
    conditions. ``base`` is the spec every frame derives from (camera, filter, exposure
    time, pixel scale, dark sky level, reference WCS)."""

    night: str
    seed: int
    scene_seed: int
    moon_phase: float
    base: ExposureSpec
    scene: Scene
    frames: list[FrameConditions]
    times: list[str]

    @property
    def n_frames(self) -> int:
        return len(self.frames)

    def exposure(self, index: int) -> str:
        return f"{self.night.replace('-', '')}_{index + 1:04d}"


def _night_number(night: str) -> int:
    try:
        return int(datetime.fromisoformat(night).strftime("%Y%m%d"))
    except ValueError:
        raise ValueError(f"night must be YYYY-MM-DD, got {night!r}") from None


def _smooth_walk(rng: np.random.Generator, n: int, step: float, memory: float) -> np.ndarray:
    """A stationary AR(1) walk of ``n`` steps, standard deviation ``step``."""
    w = np.empty(n)
    w[0] = rng.normal(0.0, step)
    for i in range(1, n):
        w[i] = memory * w[i - 1] + math.sqrt(1.0 - memory**2) * rng.normal(0.0, step)
    return w


def _bump(u: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((u - centre) / width) ** 2)


def draw_conditions(rng: np.random.Generator, n_frames: int, size_px: int = 1024
                    ) -> tuple[list[FrameConditions], float]:
    """The conditions of every frame of a night of ``n_frames`` and the moon phase.

    Deterministic for the generator's state; see the module docstring for what varies.
    The re-pointing jumps by 30-250 px, at most a quarter of ``size_px`` (the detector
    side) and at least a tenth of it on small detectors.
    """
    n = n_frames
    u = (np.arange(n) + 0.5) / n
    idx = np.arange(n)
    # seeing: smooth walk, one bad-seeing spell
    s0 = float(rng.uniform(0.6, 0.9))
    walk = _smooth_walk(rng, n, 0.08, 0.8)
    spell_at, spell_w = float(u[int(rng.integers(0, n))]), float(rng.uniform(0.04, 0.1))
    spell_peak = float(rng.uniform(1.7, 2.6))
    seeing = s0 * np.exp(walk) * (spell_peak / s0) ** _bump(u, spell_at, spell_w)
    # focus: the FWHM grows over 2-4 frames, then the telescope is refocused
    focus = np.ones(n)
    n_focus = int(rng.integers(2, 5))
    f_start = int(rng.integers(0, max(n - n_focus, 0) + 1))
    growth = float(rng.uniform(0.3, 0.7))
    for k in range(n_focus):
        if f_start + k < n:
            focus[f_start + k] = 1.0 + growth * (k + 1) / n_focus
    # grey transparency: one or two thin-cloud passages, centred on a frame
    grey = np.zeros(n)
    passages = []
    for _ in range(int(rng.integers(1, 3))):
        centre = u[int(rng.integers(0, n))]
        width = float(rng.uniform(0.015, 0.04))
        peak = float(rng.uniform(0.2, 1.0))
        grey += peak * _bump(u, centre, width)
        passages.append(centre)
    grey = np.where(grey < 0.02, 0.0, grey)
    # patchy cloud on some frames of the passages (always on one of them)
    patchy = (grey >= 0.1) & (rng.random(n) < 0.6)
    patchy[int(np.argmin(np.abs(u - passages[0])))] = True
    cloud_k = np.where(patchy, rng.uniform(0.1, 0.8, n), 0.0)
    emission = np.where(patchy, rng.uniform(0.0, 0.3, n), 0.0)
    # sky: twilight at both ends, the moon with its phase and altitude
    twilight = 1.0 + rng.uniform(3.0, 8.0) * np.exp(-u / 0.05) \
        + rng.uniform(3.0, 8.0) * np.exp(-(1.0 - u) / 0.05)
    moon_phase = float(rng.uniform(0.0, 1.0))
    rise = float(rng.uniform(-0.3, 0.8))
    up = (u > rise) & (u < rise + 0.6)
    altitude = np.clip(np.sin(np.pi * (u - rise) / 0.6), 0.0, None) * up
    moon = 1.0 + 4.0 * moon_phase**2 * altitude
    # airmass: the field transits during the night
    transit, z_min = float(rng.uniform(0.3, 0.7)), float(rng.uniform(5.0, 30.0))
    airmass = 1.0 / np.cos(np.radians(np.minimum(z_min + 90.0 * np.abs(u - transit), 70.0)))
    # tracking: mostly good, 1-2 trailed frames on longer sequences
    kinds = [str(rng.choice(["none", "linear", "periodic", "wind"])) for _ in idx]
    ratio = np.where(np.array(kinds) == "none", 0.0, rng.uniform(0.05, 0.4, n))
    pa = rng.uniform(0.0, 180.0, n)
    n_trailed = int(rng.integers(1, 3)) if n >= 6 else 0
    for j in rng.choice(n, size=n_trailed, replace=False):
        kinds[int(j)] = str(rng.choice(["linear", "wind"]))
        ratio[int(j)] = float(rng.uniform(1.2, 2.5))
    # pointing: slow drift, one re-pointing
    speed = float(rng.uniform(1.0, 4.0))
    heading = float(rng.uniform(0.0, 2 * np.pi)) + np.cumsum(rng.normal(0.0, 0.15, n))
    step_x, step_y = speed * np.cos(heading), speed * np.sin(heading)
    step_x[0] = step_y[0] = 0.0
    rot_step = rng.normal(0.0, 0.003, n)
    rot_step[0] = 0.0
    jump_at = int(rng.integers(max(1, n // 3), max(2, 2 * n // 3 + 1))) if n >= 2 else n
    jump_len = float(rng.uniform(min(30.0, 0.1 * size_px), min(250.0, 0.25 * size_px)))
    jump_dir = float(rng.uniform(0.0, 2 * np.pi))
    jump_rot = float(rng.uniform(0.1, 1.0) * rng.choice([-1.0, 1.0]))
    if jump_at < n:
        step_x[jump_at] += jump_len * math.cos(jump_dir)
        step_y[jump_at] += jump_len * math.sin(jump_dir)
        rot_step[jump_at] += jump_rot
    sx, sy, rot = np.cumsum(step_x), np.cumsum(step_y), np.cumsum(rot_step)
    satellite = rng.random(n) < 0.08
    frames = [FrameConditions(
        index=int(i), time_fraction=float(u[i]), seeing_atm_arcsec=float(seeing[i]),
        focus_factor=float(focus[i]), trail_kind=kinds[i] if ratio[i] > 0 else "none",
        trail_ratio=float(ratio[i]), trail_pa_deg=float(pa[i]),
        grey_extinction_mag=float(grey[i]), cloud_k_mag=float(cloud_k[i]),
        cloud_emission=float(emission[i]), twilight_factor=float(twilight[i]),
        moon_factor=float(moon[i]), airmass=float(airmass[i]),
        pointing=Pointing(float(sx[i]), float(sy[i]), float(rot[i])),
        repointed=bool(i >= jump_at), satellite=bool(satellite[i])) for i in idx]
    return frames, moon_phase


LIGHT_KINDS = ("gradient", "scattered", "glow")
"""Kinds of added light of :func:`draw_light` (the patterns of :mod:`.sky`)."""


def draw_light(rng: np.random.Generator, frames: list[FrameConditions]
               ) -> list[FrameConditions]:
    """The frames with one or two spells of added light (module docstring).

    Drawn from a generator of its own, so that the other conditions of a night do not
    depend on it. A spell lasts 1-3 frames, one kind and strength; a frame under patchy
    cloud keeps its cloud and gets no light.
    """
    n = len(frames)
    out = list(frames)
    for _ in range(int(rng.integers(1, 3)) if n >= 4 else 0):
        start, length = int(rng.integers(0, n)), int(rng.integers(1, 4))
        kind = str(rng.choice(LIGHT_KINDS))
        u = loguniform(rng, 0.06, 0.6)
        for i in range(start, min(start + length, n)):
            if out[i].cloud_k_mag == 0:
                out[i] = dataclasses.replace(out[i], light_kind=kind, light_u=u)
    return out


def _frame_times(night: str, n_frames: int) -> list[str]:
    """ISO UTC start of each frame, evenly from evening to morning twilight."""
    start = datetime.fromisoformat(night).replace(tzinfo=timezone.utc) \
        + timedelta(hours=NIGHT_START_UTC_H)
    out = []
    for i in range(n_frames):
        t = start + timedelta(hours=NIGHT_SPAN_H * i / max(n_frames, 1))
        out.append(t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}")
    return out


def _base_spec(rng: np.random.Generator, night: str, size_px: int, header_style: str,
               field: str | None) -> ExposureSpec:
    """Camera, filter, exposure time, pixel scale, dark sky and reference WCS of a field."""
    seeing_ref = float(rng.uniform(0.7, 0.9))
    pixscale = seeing_ref / float(rng.uniform(3.0, 4.5))
    spec = draw_spec(rng, "good", exposure=f"{night.replace('-', '')}_0001", size_px=size_px,
                     file_format="fits", confounders=SEQUENCE_CONFOUNDERS, trail_kind="none",
                     trail_ratio=0.0, header_style=header_style, seeing_arcsec=seeing_ref,
                     pixscale_arcsec=pixscale, extra_defects=False)
    area_arcmin2 = spec.nx * spec.ny * pixscale**2 / 3600.0
    density = max(loguniform(rng, 8.0, 40.0), 60.0 / area_arcmin2)
    return dataclasses.replace(
        spec, star_density_per_arcmin2=density, cluster_fraction=0.0, n_bright_stars=0,
        background_kind="none", background_strength=0.0, cloud_extinction_mag=0.0,
        cloud_emission=0.0, transparency_mag=0.0, missing_keys=(),
        object_name=field or spec.object_name)


def render_margin_px(fwhm_px: float, trail_px: float) -> float:
    """Distance beyond the detector edge from which a star's light still reaches it."""
    return float(min(math.ceil(30.0 * fwhm_px + trail_px / 2 + 5), 400))


SCENE_CELL_PX = 256
"""Side of the cells (reference pixels) the scene is drawn in, each from its own seed."""

_CELL_OFFSET = 32768  # cell indices are offset to be non-negative (seeds, star ids)


def _cell_sources(scene_seed: int, base: ExposureSpec, peak: float, slope: float, cx: int,
                  cy: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stars and galaxies of one scene cell (see :func:`draw_scene`); ``peak`` is the
    central-pixel fraction of a star at the reference seeing, ``slope`` the field's
    star-count slope."""
    rng = np.random.default_rng(np.random.SeedSequence(
        [scene_seed, 8, cx + _CELL_OFFSET, cy + _CELL_OFFSET]))
    c = float(SCENE_CELL_PX)
    area_arcmin2 = c * c * base.pixscale_arcsec**2 / 3600.0
    fwhm = base.fwhm_px
    noise_e = math.sqrt(base.sky_e + base.read_noise_e**2)
    sat_e = base.saturate_adu * base.gain_e_per_adu
    room_e = max(sat_e - 1.5 * base.sky_e, 0.2 * sat_e)

    def power_law(n: int, lo: float, hi: float, slope: float) -> np.ndarray:
        a, b = lo ** -slope, hi ** -slope
        return (a - rng.random(n) * (a - b)) ** (-1.0 / slope)

    n = int(rng.poisson(base.star_density_per_arcmin2 * area_arcmin2))
    f_min = 2.0 * math.sqrt(math.pi * fwhm * fwhm) * noise_e
    fluxes = power_law(n, f_min, max(0.7 * room_e / peak, 3 * f_min), slope)
    ids = ((cx + _CELL_OFFSET) * 65536 + (cy + _CELL_OFFSET)) * 65536 + np.arange(n)
    stars = pd.DataFrame({"star_id": ids.astype(np.int64),
                          "x_ref": cx * c + rng.uniform(0.0, c, n),
                          "y_ref": cy * c + rng.uniform(0.0, c, n), "flux_e": fluxes})
    n_gal = int(rng.poisson(base.galaxy_density_per_arcmin2 * area_arcmin2))
    g_min = 5.0 * math.sqrt(math.pi) * fwhm * noise_e
    g_flux = power_law(n_gal, g_min, max(2.0 * sat_e / peak, 2 * g_min), 0.7)
    galaxies = pd.DataFrame({
        "x_ref": cx * c + rng.uniform(0.0, c, n_gal),
        "y_ref": cy * c + rng.uniform(0.0, c, n_gal), "flux_e": g_flux,
        "hlr_arcsec": np.exp(rng.uniform(math.log(0.2), math.log(0.6), n_gal))
        * (g_flux / g_min) ** 0.3,
        "sersic_n": rng.choice([1.0, 1.5, 2.5, 4.0], n_gal),
        "q": rng.uniform(0.2, 1.0, n_gal), "beta_rad": rng.uniform(0.0, np.pi, n_gal)})
    return stars, galaxies


def draw_scene(scene_seed: int, base: ExposureSpec, frames: list[FrameConditions]) -> Scene:
    """Stars and galaxies of the field over every frame's footprint (reference pixels).

    The sky is cut into cells of :data:`SCENE_CELL_PX` reference pixels, each drawn from
    the scene seed and its own indices: a source depends on the scene seed only, not on
    the night's conditions or on how many frames see it. ``star_id`` encodes the cell
    and the star's rank in it. Fluxes follow the power laws of
    :func:`~survey_qa.simulate.sources.add_stars` and
    :func:`~survey_qa.simulate.sources.add_galaxies` at the field's reference seeing and
    dark sky: the faintest stars reach S/N ~ 2 there and the brightest stay below
    saturation.
    """
    nx, ny = base.nx, base.ny
    worst = max(frames, key=lambda f: f.seeing_arcsec * (1.0 + f.trail_ratio))
    margin = render_margin_px(
        worst.seeing_arcsec * (1 + worst.trail_ratio) / base.pixscale_arcsec, 0)
    corners_x = np.array([-margin, nx - 1 + margin, nx - 1 + margin, -margin])
    corners_y = np.array([-margin, -margin, ny - 1 + margin, ny - 1 + margin])
    xs, ys = zip(*(f.pointing.invert(corners_x, corners_y, nx, ny) for f in frames))
    c = SCENE_CELL_PX
    cells_x = range(int(math.floor(np.min(xs) / c)), int(math.floor(np.max(xs) / c)) + 1)
    cells_y = range(int(math.floor(np.min(ys) / c)), int(math.floor(np.max(ys) / c)) + 1)
    peak = psf_model(base, 0).peak
    slope_rng = np.random.default_rng(np.random.SeedSequence([scene_seed, 9]))
    slope = float(slope_rng.uniform(0.55, 0.85))
    parts = [_cell_sources(scene_seed, base, peak, slope, cx, cy)
             for cy in cells_y for cx in cells_x]
    stars = pd.concat([p[0] for p in parts], ignore_index=True)
    galaxies = pd.concat([p[1] for p in parts], ignore_index=True)
    return Scene(base.object_name, stars, galaxies)


def plan_sequence(night: str, n_frames: int, *, seed: int = 0, size_px: int = 1024,
                  scene_seed: int | None = None, field: str | None = None,
                  header_style: str = "wcs") -> Sequence:
    """Plan a night of ``n_frames`` exposures of one field.

    Parameters
    ----------
    night
        ``YYYY-MM-DD``; the frames run from evening to morning twilight.
    n_frames
        Number of exposures (at least 1).
    seed
        Seed of the night's conditions (with the night's date).
    size_px
        Detector side (square, single-detector ``.fits`` frames).
    scene_seed
        Seed of the field (stars, galaxies, camera, reference pointing); default ``seed``.
        The same scene seed gives the same field on any night.
    field
        Field name (``OBJECT``); default the drawn ``FIELD_NNNN``.
    header_style
        One of :data:`~survey_qa.simulate.spec.HEADER_STYLES`; ``wcs`` (default) writes a
        WCS that follows the pointing.

    Returns
    -------
    Sequence
    """
    if n_frames < 1:
        raise ValueError("n_frames must be at least 1")
    scene_seed = seed if scene_seed is None else int(scene_seed)
    scene_rng = np.random.default_rng(np.random.SeedSequence([scene_seed, 5]))
    night_rng = np.random.default_rng(np.random.SeedSequence([seed, _night_number(night), 3]))
    base = _base_spec(scene_rng, night, size_px, header_style, field)
    frames, moon_phase = draw_conditions(night_rng, n_frames, size_px)
    light_rng = np.random.default_rng(np.random.SeedSequence([seed, _night_number(night), 8]))
    frames = draw_light(light_rng, frames)
    scene = draw_scene(scene_seed, base, frames)
    return Sequence(night, int(seed), scene_seed, moon_phase, base, scene, frames,
                    _frame_times(night, n_frames))


def _reference_wcs(base: ExposureSpec) -> WCS | None:
    header = detector_header(base, 0)
    if "CRVAL1" not in header:
        return None
    w = WCS(naxis=2)
    w.wcs.ctype = [header["CTYPE1"][0], header["CTYPE2"][0]]
    w.wcs.crval = [header["CRVAL1"][0], header["CRVAL2"][0]]
    w.wcs.crpix = [header["CRPIX1"][0], header["CRPIX2"][0]]
    w.wcs.cd = [[header["CD1_1"][0], header["CD1_2"][0]], [header["CD2_1"][0], header["CD2_2"][0]]]
    return w


def _soft_limit(value: float, limit: float) -> float:
    """``value`` up to half of ``limit``, then approaching ``limit`` smoothly (a bright
    twilight sky stays below saturation)."""
    half = 0.5 * limit
    return value if value <= half else half + half * math.tanh((value - half) / half)


def frame_spec(seq: Sequence, index: int) -> ExposureSpec:
    """The spec of one frame: the base spec under the frame's conditions and pointing."""
    f, base = seq.frames[index], seq.base
    ra, dec = base.ra_deg, base.dec_deg
    wcs = _reference_wcs(base)
    if wcs is not None:  # the sky position of the frame's centre
        cx, cy = (base.nx - 1) / 2.0, (base.ny - 1) / 2.0
        xr, yr = f.pointing.invert(np.array([cx]), np.array([cy]), base.nx, base.ny)
        world = wcs.wcs_pix2world(np.column_stack([xr, yr]), 0)[0]
        ra, dec = float(world[0]) % 360.0, float(world[1])
    s = f.seeing_arcsec
    cloud = f.cloud_k_mag > 0
    kind, strength = (("cloud", f.cloud_k_mag) if cloud else (f.light_kind, f.light_u))
    sat_e = base.saturate_adu * base.gain_e_per_adu
    sky_e = _soft_limit(base.sky_e * f.sky_factor, 0.35 * sat_e)
    confounders = tuple(sorted(set(base.confounders) | ({"satellite"} if f.satellite else set())))
    u = strength if kind in LIGHT_KINDS else 0.0
    target = truth_class(s, f.trail_ratio, u, f.cloud_k_mag, f.trail_kind)["quality_class"]
    t0 = Time(seq.times[index], format="isot", scale="utc")
    field_rng = np.random.default_rng(
        np.random.SeedSequence([seq.seed, _night_number(seq.night), 6, index]))
    field_seed = int(field_rng.integers(0, 2**31 - 1))
    return dataclasses.replace(
        base, exposure=seq.exposure(index), target_class=target, ambiguous=False,
        seeing_arcsec=float(s), trail_arcsec=float(f.trail_ratio * s),
        trail_pa_deg=f.trail_pa_deg, trail_kind=f.trail_kind,
        background_kind=kind, background_strength=strength, cloud_extinction_mag=f.cloud_k_mag,
        cloud_emission=f.cloud_emission, transparency_mag=f.grey_extinction_mag,
        sky_level_adu=sky_e / base.gain_e_per_adu, airmass=f.airmass,
        date_obs=t0.isot, mjd_obs=float(t0.mjd), expnum=index + 1,
        ra_deg=ra, dec_deg=dec, rotation_deg=base.rotation_deg - f.pointing.rotation_deg,
        confounders=confounders, n_satellites=1 if f.satellite else 0, field_seed=field_seed)


def render_frame(seq: Sequence, index: int) -> tuple[ExposureSpec, SimDetector]:
    """Render one frame of a sequence (deterministic for the sequence's seeds)."""
    spec = frame_spec(seq, index)
    f = seq.frames[index]
    margin = render_margin_px(spec.fwhm_px, spec.trail_arcsec / spec.pixscale_arcsec)
    view = seq.scene.view(f.pointing, spec.nx, spec.ny, margin)
    rng = np.random.default_rng(np.random.SeedSequence([seq.seed, _night_number(seq.night), 7,
                                                        index]))
    return spec, render_detector(spec, 0, rng, scene=view)


def patchy_mean_mag(spec: ExposureSpec, index: int = 0) -> float:
    """Mean patchy extinction over a detector (mag), on the grid ``k_true`` is taken on."""
    if spec.cloud_extinction_mag <= 0:
        return 0.0
    nodes = sky_nodes(spec, index)
    patchy = upsample(nodes.patchy_mag, nodes.step, spec.ny, spec.nx)
    return float(patchy[::2, ::2].mean())


def frame_truth(seq: Sequence, spec: ExposureSpec, detectors: list[SimDetector]
                ) -> list[dict]:
    """Truth rows of a sequence frame: :func:`truth_records` and the sequence columns."""
    index = spec.expnum - 1
    f = seq.frames[index]
    rows = truth_records(spec, detectors)
    for row, det in zip(rows, detectors):
        patchy = patchy_mean_mag(spec, det.index)
        row.update(
            field=seq.scene.field, sequence_index=index, scene_seed=seq.scene_seed,
            transparency_mag=spec.transparency_mag + patchy,
            grey_extinction_mag=spec.transparency_mag, patchy_mean_mag=patchy,
            shift_x_px=f.pointing.shift_x_px, shift_y_px=f.pointing.shift_y_px,
            rotation_deg=f.pointing.rotation_deg, wcs_rotation_deg=spec.rotation_deg,
            repointed=f.repointed, seeing_atm_arcsec=f.seeing_atm_arcsec,
            focus_factor=f.focus_factor, sky_factor=f.sky_factor,
            twilight_factor=f.twilight_factor, moon_factor=f.moon_factor,
            moon_phase=seq.moon_phase)
    return rows


def frame_stars(seq: Sequence, spec: ExposureSpec, det: SimDetector) -> pd.DataFrame:
    """True stars of a rendered frame with their scene identity: the detector's stars
    table plus ``x_ref``, ``y_ref`` (reference pixels) and ``flux_clear_adu`` (the flux
    in a clear frame)."""
    scene = seq.scene.stars.set_index("star_id").loc[det.stars["star_id"].to_numpy()]
    out = det.stars.copy()
    out["x_ref"] = scene["x_ref"].to_numpy()
    out["y_ref"] = scene["y_ref"].to_numpy()
    out["flux_clear_adu"] = scene["flux_e"].to_numpy() / spec.gain_e_per_adu
    return out
