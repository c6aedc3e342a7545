"""Round PSF profiles of atmosphere and optics (GalSim), defocused donuts included.

The round PSF is a Moffat or Kolmogorov profile. A defocused frame convolves it with the
pupil's image (an annulus with the central obstruction). The spec's seeing ``s`` is the
FWHM of the round PSF that atmosphere and optics give, so a defocused frame's truth ``s``
is the effective FWHM of its donut PSF (:func:`effective_fwhm`: twice the outermost
half-maximum radius); the frame is ``bad_seeing`` only when that FWHM is past the seeing
limit.
"""
from __future__ import annotations

import functools
import math

import galsim
import numpy as np
from scipy import optimize


def round_psf(profile: str, beta: float, fwhm: float, defocus_ratio: float,
               obscuration: float) -> galsim.GSObject:
    atm_fwhm = fwhm
    if defocus_ratio > 0:
        atm_fwhm = fwhm * atm_ratio(profile, beta if profile == "moffat" else 0.0,
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
def atm_ratio(profile: str, beta: float, defocus_ratio: float, obscuration: float) -> float:
    """Atmospheric FWHM / effective FWHM of a defocused PSF (effective FWHM 1)."""
    def excess(ratio: float) -> float:
        psf = galsim.Convolve(round_psf(profile, beta, ratio, 0.0, 0.0),
                              _donut(defocus_ratio, obscuration))
        return effective_fwhm(psf, 1.0 / 60.0, 2.5) - 1.0

    return float(optimize.brentq(excess, 1e-3, 1.0, xtol=1e-5))
