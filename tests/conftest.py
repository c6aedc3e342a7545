"""Shared fixtures: small seeded star fields with known truth, rendered with GalSim."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import galsim
import numpy as np
import pytest


@dataclass
class Scene:
    """A rendered image and what went into it."""

    image: np.ndarray  # float32, ADU (gain 1), sky included
    sky: np.ndarray  # the true smooth sky (ADU)
    x: np.ndarray  # true star centres, 0-based pixels
    y: np.ndarray
    flux: np.ndarray  # ADU
    fwhm_px: float  # Moffat FWHM before pixelisation, before any trail or shear
    extra: dict = field(default_factory=dict)


def _positions(rng, n, shape, margin, min_sep):
    """Up to ``n`` random positions at least ``min_sep`` apart and ``margin`` from edges."""
    xs, ys = [], []
    for _ in range(200 * n):
        if len(xs) == n:
            break
        x = rng.uniform(margin, shape[1] - 1 - margin)
        y = rng.uniform(margin, shape[0] - 1 - margin)
        if all((x - a) ** 2 + (y - b) ** 2 >= min_sep ** 2 for a, b in zip(xs, ys)):
            xs.append(x)
            ys.append(y)
    return np.array(xs), np.array(ys)


def render_scene(shape=(256, 256), n_stars=25, fwhm_px=4.0, beta=3.0, flux=(2e4, 2e5),
                 sky=100.0, read_noise=5.0, seed=0, shear: Callable | None = None,
                 trail_px=0.0, trail_angle_deg=0.0, gradient=0.0, saturate=None,
                 positions=None, fluxes=None, min_sep=None, margin=20) -> Scene:
    """Moffat stars (GalSim, pixel-integrated) on a sky with Poisson and read noise.

    Parameters
    ----------
    shear
        ``f(x, y) -> (g, angle_deg)``: reduced shear of the star at (x, y), major axis at
        ``angle_deg`` from +x toward +y.
    trail_px, trail_angle_deg
        A linear trail: every star is the average of its copies along a segment of
        ``trail_px`` pixels at this angle.
    gradient
        The sky rises linearly along x by this fraction of ``sky`` across the image.
    saturate
        Pixel values are clipped at this level.
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape
    if positions is None:
        sep_px = min_sep if min_sep is not None else 6 * fwhm_px + trail_px
        x, y = _positions(rng, n_stars, shape, margin, sep_px)
    else:
        x, y = (np.asarray(v, float) for v in positions)
    if fluxes is None:
        f = 10 ** rng.uniform(math.log10(flux[0]), math.log10(flux[1]), len(x))
    else:
        f = np.asarray(fluxes, float)
    img = galsim.ImageF(nx, ny, scale=1.0, init_value=0.0)
    half = int(4 * fwhm_px + trail_px / 2 + 8)
    for xi, yi, fi in zip(x, y, f):
        obj = galsim.Moffat(beta=beta, fwhm=fwhm_px)
        if shear is not None:
            g, ang = shear(xi, yi)
            if g > 0:
                obj = obj.shear(g=g, beta=ang * galsim.degrees)
        if trail_px > 0:
            k = max(2, int(2 * trail_px) + 1)
            c, s = math.cos(math.radians(trail_angle_deg)), math.sin(math.radians(trail_angle_deg))
            mid = ((np.arange(k) + 0.5) / k - 0.5) * trail_px  # midpoints of k sub-segments
            obj = galsim.Add([obj.shift(t * c, t * s) for t in mid])
        obj = obj.withFlux(fi)
        ix, iy = int(round(xi)), int(round(yi))
        b = galsim.BoundsI(ix - half + 1, ix + half + 1, iy - half + 1, iy + half + 1) & img.bounds
        obj.drawImage(image=img[b], add_to_image=True, center=galsim.PositionD(xi + 1, yi + 1))
    stars = img.array.astype(np.float64)
    xx = np.arange(nx)
    sky_map = np.broadcast_to(sky * (1 + gradient * (xx / (nx - 1) - 0.5)), shape).copy()
    data = rng.poisson(np.clip(stars + sky_map, 0, None)) + rng.normal(0, read_noise, shape)
    if saturate is not None:
        data = np.minimum(data, saturate)
    return Scene(image=data.astype(np.float32), sky=sky_map, x=x, y=y, flux=f, fwhm_px=fwhm_px)


@pytest.fixture
def scene():
    """The :func:`render_scene` function."""
    return render_scene
