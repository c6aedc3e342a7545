"""What the camera adds: an uncorrected flat, cosmetics, cosmic rays, bleeding, raw layout.

- **Illumination** (:func:`illumination`): vignetting and dust donuts multiply sky and
  sources alike, as an uncorrected flat field does; so does the colour-filter response
  of a Bayer frame. They are not light the sky adds: ``u_true`` is computed before them
  and they change no class (``flat_nonuniformity`` records what they would add).
- **Raw frames** (:func:`raw_frame`): ``uint16`` with the bias level, prescan and overscan
  (``BIASSEC``/``DATASEC``/``TRIMSEC``); ``SimDetector.image`` is then its exposed pixels
  less the bias, the grid the reader measures.
"""
from __future__ import annotations

import math

import numpy as np

from survey_qa.simulate.draw import loguniform
from survey_qa.simulate.spec import (ExposureSpec, detector_offset, focal_plane_size,
                                     instrument_seed)


def bleed(image_e: np.ndarray, full_well_e: float) -> None:
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


def add_cosmetics(image_e: np.ndarray, spec: ExposureSpec, rng: np.random.Generator) -> dict:
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
            image_e[start:, c] += np.float32(loguniform(rng, 50.0, 5000.0))
    return {"n_hot_pixels": n_hot}


def add_cosmic_rays(image_e: np.ndarray, spec: ExposureSpec, rng: np.random.Generator) -> int:
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
        x0, y0 = detector_offset(spec, index)
        fx, fy = focal_plane_size(spec)
        cx = (fx - 1) / 2.0 + spec.vignetting_dx * fx
        cy = (fy - 1) / 2.0 + spec.vignetting_dy * fy
        norm = (fx / 2.0) ** 2 + (fy / 2.0) ** 2
        c = 1.0 / math.sqrt(1.0 - spec.vignetting_corner) - 1.0
        dx2 = ((np.arange(nx, dtype=np.float32) + x0 - cx) ** 2 / norm)[None, :]
        dy2 = ((np.arange(ny, dtype=np.float32) + y0 - cy) ** 2 / norm)[:, None]
        flat = (1.0 / (1.0 + np.float32(c) * (dx2 + dy2)) ** 2).astype(np.float32)
    n_dust = 0
    if spec.dust_per_detector > 0:
        rd = np.random.default_rng([instrument_seed(spec), 602, index])
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
    r_out = loguniform(rng, 8.0, 60.0)
    r_in = r_out * float(rng.uniform(0.3, 0.55))
    depth = loguniform(rng, 0.015, 0.12)
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


def data_slices(spec: ExposureSpec) -> tuple[slice, slice]:
    return slice(0, spec.ny), slice(spec.prescan_px, spec.prescan_px + spec.nx)


def raw_frame(image_adu: np.ndarray, spec: ExposureSpec, rng: np.random.Generator
              ) -> np.ndarray:
    """The detector as the camera writes it: ``uint16`` ADU with the bias level, prescan
    and overscan (bias plus read noise), rounded and clipped to the ADC range."""
    rows, cols = raw_shape(spec)
    full = rng.standard_normal((rows, cols), dtype=np.float32)
    full *= np.float32(spec.read_noise_e / spec.gain_e_per_adu)
    full[data_slices(spec)] = image_adu
    full += np.float32(spec.bias_adu)
    return np.clip(np.round(full), 0, 65535).astype(np.uint16)
