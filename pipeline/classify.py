"""The transparent rule classifier (quality-classes.md) and the mosaic summary row.

Rules
-----
- tracking: ``very_bad`` when ``trail_ratio >= trail_ratio_very_bad`` (or, when the
  stars are doubled by a pointing jump, qa flag ``DOUBLED_STARS``, when the separation
  ratio ``>= jump_ratio_very_bad``), ``bad`` when ``>= trail_ratio_bad``, counted only
  when ``elongation_coherence >= min_coherence`` (elongation that changes direction over
  the field is optics, not tracking);
- seeing: ``fwhm_arcsec > seeing_limit_arcsec``, or, without a pixel scale,
  ``fwhm_px > seeing_limit_px`` when that limit is set;
- background: ``sky_nonuniformity >= nonuniformity_limit``;
- a NaN measurement raises no flag; the primary class is the first flagged class in
  :data:`~survey_qa.pipeline.schema.PRIORITY`, else ``good``.

Probabilities
-------------
Each threshold gets a soft margin: ``p = 1 / (1 + exp(-(value - limit) / (softness *
limit)))`` (0.5 at the limit). With ``p_T`` (tracking at least bad, times the coherence
margin), ``p_V`` (very bad, times the coherence margin), ``p_B`` (background) and ``p_S``
(seeing), following the priority order::

    very_bad_tracking = p_V
    bad_tracking      = p_T - p_V
    background_issues = (1 - p_T) p_B
    bad_seeing        = (1 - p_T) (1 - p_B) p_S
    good              = (1 - p_T) (1 - p_B) (1 - p_S)

which sum to one. Where this makes another class more probable than the primary class
(several margins just below their limits), the vector is blended with the primary
class's indicator, ``(1 - lam) p + lam e_primary``, with the smallest ``lam`` that makes
the primary class the most probable: the decision and its probabilities never disagree.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np

from survey_qa.config import ClassifyConfig
from survey_qa.pipeline.flags import bits
from survey_qa.pipeline.records import ClassResult
from survey_qa.pipeline.schema import CLASSES, PRIORITY, TRACKING_FLAGS, empty_exposure_row

CLASSIFIER = "rules"
ARGMAX_MARGIN = 1e-6
"""The primary class exceeds every other probability by at least this much."""

IDENTITY_COLUMNS = ("exposure", "path", "date_obs", "mjd_obs", "exptime_s", "filter", "airmass",
                    "object", "expnum", "gain_e_per_adu", "read_noise_e", "saturate_adu",
                    "pixscale_arcsec", "pixscale_source", "nx", "ny", "classifier",
                    "pipeline_version", "model_version")
"""Columns of the mosaic row taken from its first detector."""

MEDIAN_COLUMNS = ("fwhm_arcsec", "fwhm_px", "moffat_beta", "ellipticity", "ellipticity_pa_deg",
                  "elongation_coherence", "trail_ratio", "sky_level", "sky_noise",
                  "sky_nonuniformity", "saturated_fraction", "ae_score", "mask_fraction")
"""Columns of the mosaic row that are the median over its detectors."""

COUNT_COLUMNS = ("n_sources", "n_stars_used")
TIME_COLUMNS = ("t_read_s", "t_background_s", "t_sources_s", "t_psf_s", "t_stamps_s",
                "t_ae_s", "t_classify_s", "t_total_s")


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def soft_margin(value: float, limit: float, softness: float) -> float:
    """Logistic probability that ``value`` is above ``limit`` (0 for NaN).

    The width is ``softness * limit``: relative to the limit, so that the same softness
    suits quantities of any unit.
    """
    if not _finite(value) or not _finite(limit):
        return 0.0
    z = (value - limit) / (softness * abs(limit))
    return 1.0 / (1.0 + math.exp(-min(max(z, -60.0), 60.0)))


def _seeing(row: dict, cfg: ClassifyConfig) -> tuple[bool, float]:
    """Seeing flag and its soft probability (arcsec, or pixels without a scale)."""
    if _finite(row.get("fwhm_arcsec")):
        value, limit = row["fwhm_arcsec"], cfg.seeing_limit_arcsec
    elif cfg.seeing_limit_px is not None and _finite(row.get("fwhm_px")):
        value, limit = row["fwhm_px"], cfg.seeing_limit_px
    else:
        return False, 0.0
    return bool(value > limit), soft_margin(value, limit, cfg.softness)


def _tracking(row: dict, cfg: ClassifyConfig) -> tuple[str, float, float]:
    """Tracking flag and the soft probabilities of (at least bad, very bad)."""
    ratio, coherence = row.get("trail_ratio"), row.get("elongation_coherence")
    if not _finite(ratio) or not _finite(coherence):
        return "none", 0.0, 0.0
    coherent = coherence >= cfg.min_coherence
    doubled = bool(int(row.get("qa_flags") or 0) & bits("DOUBLED_STARS"))
    very_bad_limit = cfg.jump_ratio_very_bad if doubled else cfg.trail_ratio_very_bad
    flag = "none"
    if coherent and ratio >= very_bad_limit:
        flag = "very_bad"
    elif coherent and ratio >= cfg.trail_ratio_bad:
        flag = "bad"
    p_coh = soft_margin(coherence, cfg.min_coherence, cfg.softness)
    p_bad = soft_margin(ratio, cfg.trail_ratio_bad, cfg.softness) * p_coh
    p_very = soft_margin(ratio, very_bad_limit, cfg.softness) * p_coh
    return flag, p_bad, min(p_very, p_bad)


def primary_class(flag_tracking: str, flag_background: bool, flag_bad_seeing: bool) -> str:
    """The first class of :data:`PRIORITY` that the flags raise."""
    raised = {"very_bad_tracking": flag_tracking == "very_bad",
              "bad_tracking": flag_tracking == "bad",
              "background_issues": flag_background, "bad_seeing": flag_bad_seeing,
              "good": True}
    return next(c for c in PRIORITY if raised[c])


def make_primary_most_probable(probs: dict[str, float], primary: str) -> dict[str, float]:
    """Blend ``probs`` with the primary class's indicator just enough to make it the argmax.

    The result still sums to one; it is ``probs`` unchanged when the primary class is
    already the most probable.
    """
    others = max(v for c, v in probs.items() if c != primary)
    p = probs[primary]
    if p >= others + ARGMAX_MARGIN:
        return dict(probs)
    target = others + ARGMAX_MARGIN
    lam = min((target - p) / (1.0 - p + target), 1.0)  # (1-lam) p + lam = (1-lam) target
    return {c: (1.0 - lam) * v + (lam if c == primary else 0.0) for c, v in probs.items()}


def classify_rules(row: dict, cfg: ClassifyConfig) -> ClassResult:
    """Classify one detector (or exposure) row by the rules of the module notes.

    Parameters
    ----------
    row
        An exposure row with ``trail_ratio``, ``elongation_coherence``, ``fwhm_arcsec``
        (or ``fwhm_px``) and ``sky_nonuniformity``.
    cfg
        Thresholds and softness.

    Returns
    -------
    ClassResult
        Class, probabilities of :data:`CLASSES` (summing to one, the class the most
        probable) and defect flags.
    """
    flag_tracking, p_t, p_v = _tracking(row, cfg)
    flag_seeing, p_s = _seeing(row, cfg)
    u = row.get("sky_nonuniformity")
    flag_background = bool(_finite(u) and u >= cfg.nonuniformity_limit)
    p_b = soft_margin(u, cfg.nonuniformity_limit, cfg.softness)
    probs = {
        "very_bad_tracking": p_v,
        "bad_tracking": p_t - p_v,
        "background_issues": (1 - p_t) * p_b,
        "bad_seeing": (1 - p_t) * (1 - p_b) * p_s,
        "good": (1 - p_t) * (1 - p_b) * (1 - p_s),
    }
    primary = primary_class(flag_tracking, flag_background, flag_seeing)
    probs = make_primary_most_probable(probs, primary)
    return ClassResult(quality_class=primary, probabilities={c: float(probs[c]) for c in CLASSES},
                       flag_bad_seeing=flag_seeing, flag_tracking=flag_tracking,
                       flag_background=flag_background, classifier=CLASSIFIER)


def apply_classification(row: dict, result: ClassResult) -> dict:
    """A copy of ``row`` with the class, probability, flag and classifier columns set."""
    out = dict(row)
    out["quality_class"] = result.quality_class
    for c in CLASSES:
        out[f"p_{c}"] = float(result.probabilities[c])
    out.update(flag_bad_seeing=bool(result.flag_bad_seeing),
               flag_tracking=result.flag_tracking,
               flag_background=bool(result.flag_background), classifier=result.classifier)
    return out


def mosaic_class(classes: list[str]) -> str:
    """The worst class (by PRIORITY) held by at least a quarter of the detectors."""
    counts = Counter(classes)
    n = len(classes)
    for c in PRIORITY:
        if counts[c] and 4 * counts[c] >= n:
            return c
    return "good"


def mosaic_reason(rows: list[dict], cls: str) -> str:
    """Why a mosaic exposure got ``cls``: how many of its detectors hold which class."""
    counts = {c: sum(r["quality_class"] == c for r in rows) for c in PRIORITY}
    held = ", ".join(f"{n} {c}" for c, n in counts.items() if n)
    return (f"{held} of {len(rows)} detectors; the exposure takes the worst class held by "
            f"at least a quarter of them ({cls})")


def _worst_tracking(flags: list[str]) -> str:
    """The worst tracking flag held by at least a quarter of the detectors."""
    n = len(flags)
    for f in reversed(TRACKING_FLAGS):
        if 4 * sum(1 for g in flags if g == f) >= n:
            return f
    return "none"


def _median(values: list) -> float:
    v = np.array([x for x in values if _finite(x)], dtype=float)
    return float(np.median(v)) if v.size else math.nan


def combine_detectors(rows: list[dict]) -> dict:
    """The exposure-level row (``detector = "ALL"``) of a mosaic.

    Parameters
    ----------
    rows
        The classified ``ok`` rows of the exposure's detectors.

    Returns
    -------
    dict
        Identity and header facts of the first detector (``IDENTITY_COLUMNS``); the class
        is the worst class held by at least a quarter of the detectors (each defect flag
        likewise); probabilities are the mean over detectors; ``MEDIAN_COLUMNS`` are
        medians, counts and times sums, ``qa_flags`` OR-ed. Per-region grids are per
        detector and stay empty here. The mean probabilities need not peak at the class:
        the quarter rule of the spec decides it.
    """
    if not rows:
        raise ValueError("combine_detectors needs at least one detector row")
    out = empty_exposure_row()
    first = rows[0]
    for key in IDENTITY_COLUMNS:
        if key in first:
            out[key] = first[key]
    out.update(detector="ALL", hdu=-1, status="ok", error="", fwhm_grid_px=[],
               ellipticity_grid=[],
               n_detectors=max(int(first.get("n_detectors") or 0), len(rows)))
    for key in MEDIAN_COLUMNS:
        out[key] = _median([r.get(key) for r in rows])
    for key in COUNT_COLUMNS:
        out[key] = int(sum(int(r.get(key) or 0) for r in rows))
    for key in TIME_COLUMNS:
        out[key] = float(sum(r[key] for r in rows if _finite(r.get(key))))
    out["qa_flags"] = int(np.bitwise_or.reduce([int(r.get("qa_flags") or 0) for r in rows]))
    for c in CLASSES:
        out[f"p_{c}"] = float(np.mean([r[f"p_{c}"] for r in rows]))
    out["quality_class"] = mosaic_class([r["quality_class"] for r in rows])
    out["reason"] = mosaic_reason(rows, out["quality_class"])
    out["flag_tracking"] = _worst_tracking([r["flag_tracking"] for r in rows])
    for key in ("flag_bad_seeing", "flag_background"):
        out[key] = 4 * sum(bool(r[key]) for r in rows) >= len(rows)
    return out
