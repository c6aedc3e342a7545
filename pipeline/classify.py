"""The transparent rule classifier (quality-classes.md) and the mosaic summary row.

Rules
-----
Each rule is written once, here, as a public function that every other module (the
decision, its reasons in words, the simulator's truth) imports:

- tracking (:func:`tracking_flag`): ``very_bad`` when ``trail_ratio >=
  trail_ratio_very_bad`` (or, when the stars are doubled by a pointing jump, qa flag
  ``DOUBLED_STARS``, when the separation ratio ``>= jump_ratio_very_bad``), ``bad`` when
  ``>= trail_ratio_bad``, counted only when ``elongation_coherence >= min_coherence``
  (elongation that changes direction over the field is optics, not tracking);
- seeing (:func:`seeing_flag`): ``fwhm_arcsec > seeing_limit_arcsec``, or, without a
  pixel scale, ``fwhm_px > seeing_limit_px`` when that limit is set;
- background (:func:`background_flag`): ``sky_nonuniformity >= nonuniformity_limit``;
- a NaN measurement raises no flag; the primary class (:func:`primary_class`) is the
  first flagged class in :data:`~survey_qa.pipeline.columns.PRIORITY`, else ``good``;
- a mosaic exposure takes the worst class held by at least a quarter of its detectors
  (:func:`mosaic_class`); its other columns follow their mosaic rule in the column
  registry (:func:`combine_detectors`).

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

import numpy as np
import pyarrow as pa

from survey_qa.config import ClassifyConfig
from survey_qa.pipeline.columns import EXPOSURE_COLUMNS, Column
from survey_qa.pipeline.flags import bits
from survey_qa.pipeline.records import ClassResult
from survey_qa.pipeline.schema import CLASSES, PRIORITY, empty_exposure_row, empty_value

CLASSIFIER = "rules"
TRACKING_CLASS = {"very_bad": "very_bad_tracking", "bad": "bad_tracking"}
"""The class each tracking flag raises."""

ARGMAX_MARGIN = 1e-6
"""The primary class exceeds every other probability by at least this much."""


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


def seeing_measure(row: dict, cfg: ClassifyConfig) -> tuple[float, float]:
    """The FWHM and the seeing limit it is held against.

    ``fwhm_arcsec`` and ``cfg.seeing_limit_arcsec``; without a pixel scale, ``fwhm_px``
    and ``cfg.seeing_limit_px`` when that limit is set; else ``(nan, nan)``.
    """
    if _finite(row.get("fwhm_arcsec")):
        return row["fwhm_arcsec"], cfg.seeing_limit_arcsec
    if cfg.seeing_limit_px is not None and _finite(row.get("fwhm_px")):
        return row["fwhm_px"], cfg.seeing_limit_px
    return math.nan, math.nan


def seeing_flag(row: dict, cfg: ClassifyConfig) -> bool:
    """The seeing rule: the FWHM of :func:`seeing_measure` is above its limit."""
    value, limit = seeing_measure(row, cfg)
    return _finite(value) and bool(value > limit)


def background_flag(u: float, cfg: ClassifyConfig) -> bool:
    """The background rule: sky non-uniformity ``u`` at or above ``nonuniformity_limit``."""
    return bool(_finite(u) and u >= cfg.nonuniformity_limit)


def very_bad_trail_limit(row: dict, cfg: ClassifyConfig) -> float:
    """The trail ratio from which tracking is very bad: ``jump_ratio_very_bad`` when the
    stars are doubled (qa flag ``DOUBLED_STARS``), else ``trail_ratio_very_bad``."""
    doubled = bool(int(row.get("qa_flags") or 0) & bits("DOUBLED_STARS"))
    return cfg.jump_ratio_very_bad if doubled else cfg.trail_ratio_very_bad


def tracking_flag(row: dict, cfg: ClassifyConfig) -> str:
    """The tracking rule: ``very_bad``, ``bad`` or ``none``.

    The trail ratio counts only when the elongation is coherent over the field
    (``elongation_coherence >= min_coherence``); NaN raises no flag.
    """
    ratio, coherence = row.get("trail_ratio"), row.get("elongation_coherence")
    if not _finite(ratio) or not _finite(coherence) or coherence < cfg.min_coherence:
        return "none"
    if ratio >= very_bad_trail_limit(row, cfg):
        return "very_bad"
    if ratio >= cfg.trail_ratio_bad:
        return "bad"
    return "none"


def _tracking_probabilities(row: dict, cfg: ClassifyConfig) -> tuple[float, float]:
    """Soft probabilities of tracking at least bad and very bad."""
    ratio, coherence = row.get("trail_ratio"), row.get("elongation_coherence")
    if not _finite(ratio) or not _finite(coherence):
        return 0.0, 0.0
    p_coh = soft_margin(coherence, cfg.min_coherence, cfg.softness)
    p_bad = soft_margin(ratio, cfg.trail_ratio_bad, cfg.softness) * p_coh
    p_very = soft_margin(ratio, very_bad_trail_limit(row, cfg), cfg.softness) * p_coh
    return p_bad, min(p_very, p_bad)


def primary_class(flag_tracking: str, flag_background: bool, flag_bad_seeing: bool) -> str:
    """The first class of :data:`PRIORITY` that the flags raise."""
    raised = {TRACKING_CLASS.get(flag_tracking): True, "background_issues": flag_background,
              "bad_seeing": flag_bad_seeing, "good": True}
    return next(c for c in PRIORITY if raised.get(c))


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
    flag_tracking = tracking_flag(row, cfg)
    p_t, p_v = _tracking_probabilities(row, cfg)
    flag_seeing = seeing_flag(row, cfg)
    p_s = soft_margin(*seeing_measure(row, cfg), cfg.softness)
    u = row.get("sky_nonuniformity")
    flag_background = background_flag(u, cfg)
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


def worst_held(values: list, levels: tuple):
    """The first of ``levels`` (worst first) held by at least a quarter of ``values``, else
    the last level: the mosaic rule of classes and defect flags."""
    n = len(values)
    for level in levels:
        count = sum(1 for v in values if v == level)
        if count and 4 * count >= n:
            return level
    return levels[-1]


def mosaic_class(classes: list[str]) -> str:
    """The worst class (by PRIORITY) held by at least a quarter of the detectors."""
    return worst_held(classes, PRIORITY)


def mosaic_reason(rows: list[dict], cls: str) -> str:
    """Why a mosaic exposure got ``cls``: how many of its detectors hold which class."""
    counts = {c: sum(r["quality_class"] == c for r in rows) for c in PRIORITY}
    held = ", ".join(f"{n} {c}" for c, n in counts.items() if n)
    return (f"{held} of {len(rows)} detectors; the exposure takes the worst class held by "
            f"at least a quarter of them ({cls})")


def _median(values: list) -> float:
    v = np.array([x for x in values if _finite(x)], dtype=float)
    return float(np.median(v)) if v.size else math.nan


def _first(column: Column, rows: list[dict]):
    return rows[0][column.name] if column.name in rows[0] else empty_value(column)


def _sum(column: Column, rows: list[dict]) -> int | float:
    if pa.types.is_integer(column.type):
        return int(sum(int(r.get(column.name) or 0) for r in rows))
    return float(sum(r[column.name] for r in rows if _finite(r.get(column.name))))


def _none(column: Column, rows: list[dict]):
    return [] if pa.types.is_list(column.type) else empty_value(column)


MOSAIC_COMBINE = {
    "first": _first,
    "median": lambda column, rows: _median([r.get(column.name) for r in rows]),
    "sum": _sum,
    "mean": lambda column, rows: float(np.mean([r[column.name] for r in rows])),
    "or": lambda column, rows: int(np.bitwise_or.reduce(
        [int(r.get(column.name) or 0) for r in rows])),
    "worst": lambda column, rows: worst_held([r[column.name] for r in rows], column.levels),
    "none": _none,
}
"""How each mosaic rule of :data:`~survey_qa.pipeline.columns.MOSAIC_RULES` (but
``decided``) combines a column over the detector rows."""


def mosaic_decided(rows: list[dict], combined: dict) -> dict:
    """The columns whose mosaic rule is ``decided``: the exposure row's identity, outcome
    and reason, given the ``combined`` values of the other columns."""
    first = rows[0]
    return {"detector": "ALL", "hdu": -1, "status": "ok", "error": "",
            "n_detectors": max(int(first.get("n_detectors") or 0), len(rows)),
            "reason": mosaic_reason(rows, combined["quality_class"])}


def combine_detectors(rows: list[dict]) -> dict:
    """The exposure-level row (``detector = "ALL"``) of a mosaic.

    Parameters
    ----------
    rows
        The classified ``ok`` rows of the exposure's detectors.

    Returns
    -------
    dict
        Every column combined over the detectors by its mosaic rule
        (:data:`~survey_qa.pipeline.columns.EXPOSURE_COLUMNS`): identity and header facts
        of the first detector; the class the worst held by at least a quarter of the
        detectors (each defect flag likewise); probabilities the mean; PSF, sky and
        autoencoder quantities and the detections' moments the median; counts and times
        sums; ``qa_flags`` OR-ed; the per-region grids left empty. The mean
        probabilities need not peak at the class: the quarter rule of the spec decides it.
    """
    if not rows:
        raise ValueError("combine_detectors needs at least one detector row")
    out = empty_exposure_row()
    for column in EXPOSURE_COLUMNS:
        if column.mosaic != "decided":
            out[column.name] = MOSAIC_COMBINE[column.mosaic](column, rows)
    out.update(mosaic_decided(rows, out))
    return out
