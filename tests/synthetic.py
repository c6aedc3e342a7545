"""Synthetic star fields for the flow tests."""
from __future__ import annotations

import numpy as np


def star_field(n: int = 256, n_stars: int = 40, fwhm_px: float = 3.0, sky: float = 200.0,
               seed: int = 0, elongate: float = 1.0, margin_px: float = 15.0,
               log_flux: tuple[float, float] = (3.5, 4.5)) -> np.ndarray:
    """Gaussian stars (elongated along x by ``elongate``) on a flat sky, with Poisson and
    3 ADU read noise (ADU, gain 1), float32.

    Star centres lie at least ``margin_px`` from the edges; total fluxes are
    ``10 ** uniform(*log_flux)`` ADU.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n]
    sigma = fwhm_px / 2.3548
    img = np.full((n, n), sky)
    for _ in range(n_stars):
        x0, y0 = rng.uniform(margin_px, n - margin_px, 2)
        flux = 10 ** rng.uniform(*log_flux)
        r2 = ((xx - x0) / (sigma * elongate)) ** 2 + ((yy - y0) / sigma) ** 2
        img += flux / (2 * np.pi * sigma ** 2 * elongate) * np.exp(-0.5 * r2)
    img = rng.poisson(img) + rng.normal(0, 3, img.shape)
    return img.astype(np.float32)
