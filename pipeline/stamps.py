"""Normalised cutouts of the brightest PSF stars (the input of the SOM).

Each stamp is background-subtracted, shifted by a cubic-spline sub-pixel shift
(``scipy.ndimage.shift``) so that the star's windowed centroid falls on pixel
``(size // 2, size // 2)`` of the stamp, and divided by its sum. Pixels outside the
detector count as zero. Stamps are ordered like the stars: brightest (``flux``) first.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage

from survey_qa.config import StampsConfig
from survey_qa.pipeline.flags import CUT_SHORT, SOURCE_FLAGS, bits
from survey_qa.pipeline.records import BackgroundResult

PAD_PX = 3
"""Extra pixels cut around a stamp so that the spline shift has data at its edges."""


@dataclass(frozen=True)
class StarStamps:
    """One detector's star stamps and where their stars lie, in :func:`stamp_order`."""

    stamps: np.ndarray
    """(n, size, size) float32, each centred and of unit sum."""
    x_px: np.ndarray
    """(n,) float32: the stars' windowed centroids on the detector, x."""
    y_px: np.ndarray
    """(n,) float32: the same, y."""

    def arrays(self) -> dict[str, np.ndarray]:
        """The array-store variables of the stamps (see :func:`stamp_variables`)."""
        return {"stamps": self.stamps, "stamp_x": self.x_px, "stamp_y": self.y_px,
                "n_stamps": np.int32(len(self.stamps))}


def stamp_variables(cfg: StampsConfig) -> dict[str, tuple]:
    """Array-store variables of :meth:`StarStamps.arrays`: name -> (per-detector shape,
    dimension names, dtype, fill value)."""
    n, s = cfg.per_detector, cfg.size_px
    return {
        "stamps": ((n, s, s), ("star", "y", "x"), "float32", np.nan),
        "stamp_x": ((n,), ("star",), "float32", np.nan),
        "stamp_y": ((n,), ("star",), "float32", np.nan),
        "n_stamps": ((), (), "int32", 0),
    }


def stamp_order(sources: pd.DataFrame, psf_star: np.ndarray, n: int) -> np.ndarray:
    """Indices of the sources that get a stamp: the ``n`` brightest PSF stars by flux.

    A detector without any PSF star (long trails, doubled or saturated stars) gets stamps
    of its brightest clean detections instead, so that the SOM still sees what its stars
    look like.
    """
    chosen = np.asarray(psf_star, bool)
    if not chosen.any() and len(sources):
        cut_short = bits(*CUT_SHORT, registry=SOURCE_FLAGS)
        chosen = (sources["flags"].to_numpy(np.int64) & cut_short) == 0
    idx = np.flatnonzero(chosen)
    flux = sources["flux"].to_numpy(float)[idx]
    return idx[np.argsort(-np.nan_to_num(flux, nan=-np.inf), kind="stable")][:n]


def _cut(image: np.ndarray, ix: int, iy: int, half: int) -> np.ndarray:
    """A (2 half) x (2 half) box whose pixel (half, half) is (iy, ix); zero outside."""
    out = np.zeros((2 * half, 2 * half), dtype=np.float64)
    y0, x0 = iy - half, ix - half
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(y0 + 2 * half, image.shape[0]), min(x0 + 2 * half, image.shape[1])
    if ye > ys and xe > xs:
        out[ys - y0:ye - y0, xs - x0:xe - x0] = image[ys:ye, xs:xe]
    return out


def star_stamps(data: np.ndarray, background: BackgroundResult, sources: pd.DataFrame,
                psf_star: np.ndarray, cfg: StampsConfig) -> StarStamps:
    """Centred, unit-sum stamps of the brightest PSF stars, and their stars' positions.

    Parameters
    ----------
    data
        Bias-subtracted image (ADU).
    background
        Its smooth sky (``background.back`` is subtracted).
    sources
        Source table (``x``, ``y`` windowed centroids, ``flux``).
    psf_star
        Boolean, aligned with ``sources``: the stars usable for the PSF.
    cfg
        Stamp size and count.

    Returns
    -------
    StarStamps
        At most ``cfg.per_detector`` stamps of ``cfg.size_px`` pixels, in
        :func:`stamp_order`; none when there is no source to stamp. A stamp whose sum is
        not positive is left unnormalised (it cannot be made to sum to one).
    """
    size = cfg.size_px
    chosen = stamp_order(sources, psf_star, cfg.per_detector)
    out = np.zeros((len(chosen), size, size), dtype=np.float32)
    half = size // 2 + PAD_PX
    x = sources["x"].to_numpy(float)
    y = sources["y"].to_numpy(float)
    for k, i in enumerate(chosen):
        ix, iy = int(np.rint(x[i])), int(np.rint(y[i]))
        box = _cut(data, ix, iy, half) - _cut(background.back, ix, iy, half)
        shifted = ndimage.shift(box, (iy - y[i], ix - x[i]), order=3, mode="constant")
        stamp = shifted[PAD_PX:PAD_PX + size, PAD_PX:PAD_PX + size]
        total = stamp.sum()
        out[k] = stamp / total if total > 0 else stamp
    xy = sources[["x", "y"]].to_numpy(np.float32)[chosen]
    return StarStamps(stamps=out, x_px=xy[:, 0], y_px=xy[:, 1])


def cut_stamps(data: np.ndarray, background: BackgroundResult, sources: pd.DataFrame,
               psf_star: np.ndarray, cfg: StampsConfig) -> np.ndarray:
    """The stamps of :func:`star_stamps` alone: (n, size, size) float32."""
    return star_stamps(data, background, sources, psf_star, cfg).stamps
