"""Image motion and the effective PSF of a detector.

A round Moffat (beta 2.5-5) or Kolmogorov profile of FWHM ``s`` (the seeing), optionally
sheared and dilated by field-dependent optics, convolved with the image-motion kernel (the
time density of the drift path, the same for every star) and with the pixel. The effective
PSF is drawn once per region of the field on a grid oversampled ``O`` times (``O`` = 2-8,
so that a fine pixel is at most FWHM/16); a star at a sub-pixel position is the bilinear
blend of the four nearest phase-shifted samplings. Bright stars get the far wings from a
wide, once-per-detector PSF (with diffraction spikes when the telescope has a spider).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import galsim
import numpy as np
from scipy.signal import fftconvolve

from survey_qa.simulate.profiles import round_psf
from survey_qa.simulate.spec import ExposureSpec, detector_offset, focal_plane_size


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
    extent, angle = path_extent(xy)
    if extent <= 0:
        return np.zeros((1, 2))
    rot = math.radians(spec.trail_pa_deg) - angle
    c, s = math.cos(rot), math.sin(rot)
    xy = xy @ np.array([[c, s], [-s, c]]) * (T / extent)
    return xy - xy.mean(axis=0)


def path_extent(xy: np.ndarray) -> tuple[float, float]:
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
    donut PSF keeps the effective FWHM ``fwhm``
    (:func:`~survey_qa.simulate.profiles.effective_fwhm`).
    """
    return round_psf(spec.psf_profile, spec.moffat_beta, fwhm, spec.defocus_ratio,
                      spec.obscuration)


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


@dataclass
class EPSF:
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
          oversample: int, extra: np.ndarray | None = None) -> EPSF:
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
    return EPSF(phases, o, half)


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


def _region_grid(spec: ExposureSpec) -> int:
    if spec.optics_shear <= 0 and spec.optics_fwhm_growth <= 0:
        return 1
    return int(np.clip(round(max(spec.nx, spec.ny) / 700), 3, 6))


def _optics(spec: ExposureSpec, fp_x: float, fp_y: float) -> tuple[float, float, float]:
    """(g1, g2, dilation) of the optical aberration at a focal-plane position."""
    fx, fy = focal_plane_size(spec)
    dx, dy = fp_x - (fx - 1) / 2.0, fp_y - (fy - 1) / 2.0
    rho2 = (dx * dx + dy * dy) / ((fx / 2.0) ** 2 + (fy / 2.0) ** 2)
    phi = math.atan2(dy, dx)
    g = spec.optics_shear * rho2
    sign = 1.0 if spec.optics_pattern == "radial" else -1.0
    return sign * g * math.cos(2 * phi), sign * g * math.sin(2 * phi), \
        1.0 + spec.optics_fwhm_growth * rho2


@dataclass
class PSFModel:
    regions: int
    cores: list[EPSF]
    profiles: list[galsim.GSObject]   # atmosphere x optics per region, pixel units
    wide: EPSF                       # wings, core box zeroed, centre of the detector
    kernel_px: np.ndarray | None      # motion kernel on the pixel grid
    peak: float                       # highest pixel fraction of a centred star

    def region(self, x: np.ndarray, y: np.ndarray, nx: int, ny: int) -> np.ndarray:
        rx = np.clip((x * self.regions / nx).astype(int), 0, self.regions - 1)
        ry = np.clip((y * self.regions / ny).astype(int), 0, self.regions - 1)
        return ry * self.regions + rx


def psf_model(spec: ExposureSpec, index: int) -> PSFModel:
    fwhm = spec.fwhm_px
    trail_px = spec.trail_arcsec / spec.pixscale_arcsec
    o = int(np.clip(math.ceil(16.0 / fwhm), 2, 8))
    kernel_fine = motion_kernel(spec, spec.pixscale_arcsec / o)
    kernel_px = motion_kernel(spec, spec.pixscale_arcsec)
    n_reg = _region_grid(spec)
    x0, y0 = detector_offset(spec, index)
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
    return PSFModel(n_reg, cores, profiles, wide, kernel_px, float(centre.phases[0, 0].max()))
