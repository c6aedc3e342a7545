"""Light from the sky's sources: stars, field galaxies, nebulae, bright galaxies, streaks.

Stars and galaxies are drawn with the detector's effective PSF (:mod:`.psf`) and dimmed by
the patchy extinction of the sky (:mod:`.sky`); satellite and aircraft trails cross the
whole focal plane. Everything is in electrons, before the camera's effects.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import galsim
import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.signal import fftconvolve

from survey_qa.simulate.draw import loguniform
from survey_qa.simulate.psf import PSFModel
from survey_qa.simulate.sky import (SkyNodes, grid_step, nodes, random_field, sample_field,
                                    upsample)
from survey_qa.simulate.spec import ExposureSpec, detector_offset, focal_plane_size


@dataclass
class SceneView:
    """Sources of a fixed scene as one detector sees them (positions in its pixels).

    Stars: ``star_id``, ``x``, ``y`` (px) and ``flux_e`` above the clouds (electrons);
    galaxies: position, flux, half-light radius (arcsec), Sersic index, axis ratio and
    position angle of the major axis (radians, in the detector's pixels).
    """

    star_id: np.ndarray
    x: np.ndarray
    y: np.ndarray
    flux_e: np.ndarray
    gal_x: np.ndarray
    gal_y: np.ndarray
    gal_flux_e: np.ndarray
    gal_hlr_arcsec: np.ndarray
    gal_sersic_n: np.ndarray
    gal_q: np.ndarray
    gal_beta_rad: np.ndarray


def add_scene(image: np.ndarray, spec: ExposureSpec, psf: PSFModel, sky: SkyNodes,
              noise_e: float, scene: SceneView) -> tuple[pd.DataFrame, int]:
    """Render a scene's stars and galaxies, each dimmed by the grey transparency and the
    patchy extinction at its position; returns the stars inside the detector (with
    ``star_id``) and the number of galaxies drawn."""
    stars = render_stars(image, spec, psf, sky, noise_e, scene.x, scene.y, scene.flux_e,
                         {"star_id": scene.star_id})
    ext = spec.transparency_mag + ndimage.map_coordinates(
        sky.patchy_mag, [scene.gal_y / sky.step, scene.gal_x / sky.step], order=1,
        mode="nearest")
    region = psf.region(scene.gal_x, scene.gal_y, spec.nx, spec.ny)
    trail_px = spec.trail_arcsec / spec.pixscale_arcsec
    for k in range(len(scene.gal_x)):
        draw_galaxy(image, spec, psf, float(scene.gal_x[k]), float(scene.gal_y[k]),
                    float(scene.gal_flux_e[k] * 10 ** (-0.4 * ext[k])),
                    float(scene.gal_hlr_arcsec[k]), float(scene.gal_sersic_n[k]),
                    float(scene.gal_q[k]), float(scene.gal_beta_rad[k]), int(region[k]),
                    trail_px)
    return stars, len(scene.gal_x)


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


def add_stars(image: np.ndarray, rng: np.random.Generator, spec: ExposureSpec,
               psf: PSFModel, sky: SkyNodes, noise_e: float) -> pd.DataFrame:
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
    return render_stars(image, spec, psf, sky, noise_e, x, y, fluxes)


def render_stars(image: np.ndarray, spec: ExposureSpec, psf: PSFModel, sky: SkyNodes,
                 noise_e: float, x: np.ndarray, y: np.ndarray, fluxes: np.ndarray,
                 columns: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Render stars of given positions (px) and fluxes above the clouds (electrons).

    Each star is dimmed by the grey ``spec.transparency_mag`` plus the patchy extinction
    at its position. Returns the stars inside the detector: ``x``, ``y``, ``flux_e`` (as
    observed), ``extinction_mag`` and the per-star arrays of ``columns`` (e.g. an id).
    """
    fwhm = spec.fwhm_px
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
    extra = {name: np.asarray(v)[inside] for name, v in (columns or {}).items()}
    return pd.DataFrame({"x": x[inside], "y": y[inside],
                         "flux_e": flux_obs[inside], "extinction_mag": ext[inside], **extra})


def add_galaxies(image: np.ndarray, rng: np.random.Generator, spec: ExposureSpec,
                  psf: PSFModel, sky: SkyNodes, noise_e: float) -> int:
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
    for k in range(n):
        sersic_n = float(rng.choice([1.0, 1.5, 2.5, 4.0]))
        q = float(rng.uniform(0.2, 1.0))
        beta = float(rng.uniform(0, np.pi))
        draw_galaxy(image, spec, psf, float(x[k]), float(y[k]),
                    float(fluxes[k] * 10 ** (-0.4 * ext[k])), float(hlr_arcsec[k]),
                    sersic_n, q, beta, int(region[k]), trail_px)
    return n


_GALAXY_GSPARAMS = galsim.GSParams(folding_threshold=1e-2, maxk_threshold=3e-3)


def draw_galaxy(image: np.ndarray, spec: ExposureSpec, psf: PSFModel, x: float, y: float,
                flux_e: float, hlr_arcsec: float, sersic_n: float, q: float, beta_rad: float,
                region: int, trail_px: float) -> None:
    """Add one Sersic galaxy (observed flux ``flux_e``, half-light radius ``hlr_arcsec``
    capped at 15", axis ratio ``q``, major axis at ``beta_rad``) convolved with the PSF of
    ``region`` and the image motion, centred on (x, y) px."""
    gsp = _GALAXY_GSPARAMS
    fwhm = spec.fwhm_px
    hlr = float(min(hlr_arcsec, 15.0)) / spec.pixscale_arcsec
    gal = galsim.Sersic(n=sersic_n, half_light_radius=hlr, trunc=8 * hlr, flux=flux_e,
                        gsparams=gsp)
    gal = gal.shear(q=q, beta=beta_rad * galsim.radians)
    half = int(min(math.ceil(4 * hlr + 3 * fwhm + trail_px / 2), 127))
    ix, iy = int(np.floor(x)), int(np.floor(y))
    stamp = galsim.Convolve(gal, psf.profiles[region], gsparams=gsp).drawImage(
        nx=2 * half + 1, ny=2 * half + 1, scale=1.0, offset=(x - ix, y - iy)).array
    if psf.kernel_px is not None:
        stamp = fftconvolve(stamp, psf.kernel_px, mode="same")
    _place(image, stamp.astype(np.float32), ix, iy, 1.0)


def extended_light(spec: ExposureSpec, index: int, rng: np.random.Generator) -> np.ndarray | None:
    """A nebula and/or a large bright galaxy (real sky; electrons), or None."""
    if "nebula" not in spec.confounders and "bright_galaxy" not in spec.confounders:
        return None
    sky = spec.sky_e
    out = np.zeros((spec.ny, spec.nx), dtype=np.float32)
    if "nebula" in spec.confounders:
        fx, fy = focal_plane_size(spec)
        step = float(max(2, grid_step(max(spec.nx, spec.ny)) // 4))
        rn = np.random.default_rng([spec.field_seed, 401])
        f = random_field(rn, len(nodes(fy, step)), len(nodes(fx, step)), rn.uniform(2.5, 3.5))
        f = np.exp(rn.uniform(0.6, 1.2) * f)
        yy, xx = np.meshgrid(nodes(fy, step), nodes(fx, step), indexing="ij")
        c = (rn.uniform(0.2, 0.8) * fx, rn.uniform(0.2, 0.8) * fy)
        w = rn.uniform(0.2, 0.5) * math.hypot(fx, fy)
        f *= np.exp(-((xx - c[0]) ** 2 + (yy - c[1]) ** 2) / (2 * w * w))
        f *= rn.uniform(0.2, 3.0) * sky / f.max()
        x0, y0 = detector_offset(spec, index)
        gy, gx = np.meshgrid(nodes(spec.ny, step) + y0, nodes(spec.nx, step) + x0,
                             indexing="ij")
        out += np.clip(upsample(sample_field(f, step, gx, gy), step, spec.ny, spec.nx), 0, None)
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


def add_streaks(image: np.ndarray, spec: ExposureSpec, index: int, noise_e: float) -> None:
    """Satellite trails and aircraft (lines across the focal plane; electrons)."""
    if spec.n_satellites == 0:
        return
    fx, fy = focal_plane_size(spec)
    x0, y0 = detector_offset(spec, index)
    rs = np.random.default_rng([spec.field_seed, 501])
    sigma = spec.fwhm_px / 2.355
    n_air = 1 if "aircraft" in spec.confounders else 0
    for k in range(spec.n_satellites):
        px, py = rs.uniform(0, fx) - x0, rs.uniform(0, fy) - y0
        ang = rs.uniform(0, np.pi)
        peak = loguniform(rs, 0.5, 60.0) * noise_e
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
