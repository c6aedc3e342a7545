"""What one frame cannot tell alone: calibrations taken from the whole night.

Autoencoder threshold
---------------------
The autoencoder learned what good sky looks like on its reference frames. A frame of
another instrument (another pixel scale, a raw frame with vignetting, a photographic
plate) looks unlike them everywhere, and the reference threshold would mask all of it.
The night's own frames tell the two apart: damage is what is worse than the night's best
frames, not what differs from the reference instrument.

- With at least :data:`MIN_FRAMES` scored detectors of one shape, the threshold is the
  same quantile of the patch scores of the night's best frames (the :data:`BEST_SHARE`
  with the lowest mean score) as the reference threshold is of the reference frames, and
  never below the reference threshold.
- With fewer, a detector whose median patch score is above the reference threshold
  (most of it unlike any reference frame) is out of the autoencoder's domain: its score
  and mask are not reported (NaN, flag ``AE_OUT_OF_DOMAIN``).
"""
from __future__ import annotations

import math

import numpy as np

MIN_FRAMES = 5
"""Scored detectors of one shape needed to calibrate the threshold on the night."""

BEST_SHARE = 0.25
"""Share of the night's frames (lowest mean patch score) taken as its best."""


def night_threshold(score_maps: list[np.ndarray], reference: float, quantile: float
                    ) -> float | None:
    """The autoencoder mask threshold calibrated on the night's best frames.

    Parameters
    ----------
    score_maps
        Patch score maps of the night's scored detectors of one shape (NaN: no patch).
    reference
        The threshold from the reference frames (the weights' quantile).
    quantile
        The quantile that gave ``reference``.

    Returns
    -------
    float or None
        ``max(reference, quantile of the best frames' patch scores)``, or None with fewer
        than :data:`MIN_FRAMES` maps.
    """
    maps = [m[np.isfinite(m)] for m in score_maps]
    maps = [m for m in maps if m.size]
    if len(maps) < MIN_FRAMES:
        return None
    means = np.array([m.mean() for m in maps])
    n_best = max(2, math.ceil(BEST_SHARE * len(maps)))
    best = np.concatenate([maps[i] for i in np.argsort(means)[:n_best]])
    return max(float(reference), float(np.quantile(best, quantile)))


def looks_foreign(score_map: np.ndarray, reference: float) -> bool:
    """Most of the detector is unlike any reference frame (median patch score above the
    reference threshold)."""
    values = score_map[np.isfinite(score_map)]
    return bool(values.size and np.median(values) > reference)
