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

The night pass applies these (:func:`ae_groups`, :func:`calibrate_group`) and takes the
decision again where they changed its inputs (:func:`decide_again`).
"""
from __future__ import annotations

import collections
import math

import numpy as np

from survey_qa.config import ClassifyConfig
from survey_qa.pipeline import aescore, classify, decide
from survey_qa.pipeline.flags import bits

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


# ---------------------------------------------------------------------------- night pass


def ae_groups(rows: list[dict], stored: set[tuple[str, str]]) -> list[list[int]]:
    """Positions of the scored detector rows, one list per detector shape (nx, ny).

    Only measured detectors (not a mosaic's ``ALL`` row) with a finite ``ae_score`` whose
    (exposure, detector) has a score map in ``stored`` count.
    """
    groups = collections.defaultdict(list)
    for i, r in enumerate(rows):
        if (r["status"] == "ok" and r["detector"] != "ALL" and np.isfinite(r["ae_score"])
                and (r["exposure"], r["detector"]) in stored):
            groups[(r["nx"], r["ny"])].append(i)
    return list(groups.values())


def calibrate_group(rows: list[dict], score_maps: dict[int, np.ndarray], reference: float,
                    quantile: float, close_px: int, block_px: int
                    ) -> tuple[dict[int, dict], dict[int, np.ndarray]]:
    """Autoencoder masks of one detector shape from the night-calibrated threshold.

    With a threshold above the reference (:func:`night_threshold`), each detector's mask
    is made again from it (qa flag ``AE_NIGHT_THRESHOLD``); without one (too few frames),
    a detector that :func:`looks_foreign` loses its score and mask (``AE_OUT_OF_DOMAIN``).

    Parameters
    ----------
    rows
        The night's exposure rows (not changed).
    score_maps
        Row position -> the detector's stored patch score map (any padding beyond its own
        grid is cut here).
    reference, quantile
        The weights' threshold and the quantile that gave it.
    close_px, block_px
        ``autoencoder.close_px`` and the side of a patch in detector pixels.

    Returns
    -------
    changed, masks
        Row position -> the changed row, and -> its new patch mask (bool).
    """
    first = rows[next(iter(score_maps))]
    nx, ny = first["nx"], first["ny"]
    grid = aescore.patch_grid((ny, nx), block_px)
    maps = {i: m[:grid[0], :grid[1]] for i, m in score_maps.items()}
    threshold = night_threshold(list(maps.values()), reference, quantile)
    changed, masks = {}, {}
    for i, smap in maps.items():
        r = dict(rows[i])
        if threshold is None:
            if not looks_foreign(smap, reference):
                continue
            r.update(ae_score=np.nan, mask_fraction=np.nan)
            r["qa_flags"] |= bits("AE_OUT_OF_DOMAIN")
            patch_mask = np.zeros(smap.shape, bool)
        elif threshold > reference:
            patch_mask = aescore.make_mask(smap, threshold, close_px)
            r["mask_fraction"] = aescore.masked_fraction(patch_mask, block_px, (ny, nx))
            r["qa_flags"] |= bits("AE_NIGHT_THRESHOLD")
        else:
            continue
        changed[i], masks[i] = r, patch_mask
    return changed, masks


KEPT_ON_DECIDING_AGAIN = ("pipeline_version", "model_version", "processed_at")
"""Columns a row keeps when its decision is taken again."""

KEPT_ON_COMBINING_AGAIN = (*KEPT_ON_DECIDING_AGAIN, "n_detectors", "t_total_s")
"""Columns a mosaic's summary row keeps when it is rebuilt."""


def decide_again(rows: list[dict], positions: set[int], cfg: ClassifyConfig, classifier,
                 occupancies: dict[int, np.ndarray]) -> list[dict]:
    """The rows with the decision at ``positions`` taken again, and the summary row of
    every mosaic with such a detector rebuilt (a new list).

    Parameters
    ----------
    classifier
        The learned classifier, or None (rules).
    occupancies
        Row position -> the detector's SOM occupancy (with a classifier).
    """
    rows = list(rows)
    exposures = set()
    for i in positions:
        r = rows[i]
        keep = {k: r[k] for k in KEPT_ON_DECIDING_AGAIN}
        rows[i] = {**decide.classify_row(r, cfg, classifier, occupancies.get(i)), **keep}
        exposures.add(r["exposure"])
    for j, r in enumerate(rows):
        if r["detector"] == "ALL" and r["exposure"] in exposures:
            dets = [d for d in rows if d["exposure"] == r["exposure"]
                    and d["detector"] != "ALL" and d["status"] == "ok"]
            keep = {k: r[k] for k in KEPT_ON_COMBINING_AGAIN}
            rows[j] = {**classify.combine_detectors(dets), **keep}
    return rows
