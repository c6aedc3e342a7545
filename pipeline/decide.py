"""The decision for one detector: evidence, rules, learned model, flags and a reason in words.

Every row's class rests on what was measured, and says so:

1. **Evidence.** ``psf`` when the PSF was fitted on stars; ``detections`` when it was not
   but the bright detections have moments (``src_*`` columns: a sparse field, long trails,
   doubled stars); ``none`` when no star was measured at all.
2. **Rules** (:func:`~survey_qa.pipeline.classify.classify_rules`) on the PSF quantities,
   or on the detections' moments when there is no PSF fit. They give the three defect
   flags, which therefore always follow the configured limits.
3. **Learned model**, when one is loaded and the row lies inside the domain it was trained
   on (:func:`outside_domain`); otherwise the rules decide and the row says why
   (``classifier`` column and the ``CNN_OUT_OF_DOMAIN`` flag). Elongation that is strong
   and coherent over the field (coherence >= :data:`COHERENT_MIN` and ellipticity >=
   :data:`ELONGATED_MIN`) is a tracking error by the spec's priority: a learned class
   that ignores it is overruled.
4. **Doubt.** Without a PSF fit the probabilities are drawn towards uniform
   (:data:`DOUBT`); with no star at all the class is ``background_issues`` (a light frame
   without stars: cloud, a closed dome, a failed exposure) at low confidence, flag
   ``NO_STARS``.
5. **Cloud from the field's other frames.** A frame whose stars are fainter than on its
   field's clearest frames by ``transparency_loss_limit_mag`` or more (thin cloud), or
   whose extinction spreads over the detector by ``extinction_spread_limit_mag`` or more
   (``k``, patchy cloud), has a background defect (:func:`cloud_words`): ``flag_background``
   and the qa flag ``CLOUD`` are set whatever decided the class, and the class becomes
   ``background_issues`` where it was ``good`` or ``bad_seeing`` (the spec's priority puts
   background issues after the tracking classes only). The night pass measures these
   columns (:mod:`survey_qa.pipeline.sequence`); before it, and on frames without a field
   of several frames, they are NaN and nothing changes.
6. **Reason**: one line naming the quantities and limits behind the class.
"""
from __future__ import annotations

import math

import numpy as np

from survey_qa.config import ClassifyConfig
from survey_qa.pipeline.classify import (TRACKING_CLASS, apply_classification, background_flag,
                                          classify_rules, make_primary_most_probable,
                                          seeing_flag)
from survey_qa.pipeline.flags import bits
from survey_qa.pipeline.psf import trail_ratio
from survey_qa.pipeline.records import ClassResult
from survey_qa.pipeline.schema import CLASSES

COHERENT_MIN = 0.9
ELONGATED_MIN = 0.25
"""Coherent elongation that no learned class may call anything but tracking."""

DOUBT = {"psf": 0.0, "detections": 0.35, "none": 0.75}
"""Share of a uniform distribution blended into the probabilities, by evidence."""

NO_STARS_CLASS = "background_issues"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def evidence(row: dict) -> str:
    """What the class can rest on: ``psf``, ``detections`` or ``none``."""
    if _finite(row.get("fwhm_px")) and int(row.get("n_stars_used") or 0) > 0:
        return "psf"
    if _finite(row.get("src_fwhm_px")):
        return "detections"
    return "none"


def detection_row(row: dict) -> dict:
    """``row`` with the PSF quantities taken from the bright detections' moments."""
    out = dict(row)
    ell, coh = row.get("src_ellipticity"), row.get("src_elongation_coherence")
    fwhm_px = row["src_fwhm_px"]
    scale = row.get("pixscale_arcsec")
    out.update(fwhm_px=fwhm_px, ellipticity=ell, elongation_coherence=coh,
               fwhm_arcsec=fwhm_px * scale if _finite(scale) else math.nan,
               trail_ratio=(trail_ratio(ell * coh) if _finite(ell) and _finite(coh)
                            else math.nan))
    return out


def with_doubt(probs: dict[str, float], share: float) -> dict[str, float]:
    """Blend ``probs`` with the uniform distribution; the argmax does not change."""
    n = len(probs)
    return {c: (1.0 - share) * p + share / n for c, p in probs.items()}


def outside_domain(row: dict, domain: dict | None) -> str:
    """Why ``row`` lies outside a learned model's training domain ('' when inside).

    ``domain`` maps a column to its ``[low, high]`` range in the training data; a NaN value
    is not held against the row (the model was trained with missing features).
    """
    for column, (low, high) in (domain or {}).items():
        value = row.get(column)
        if _finite(value) and not (low <= value <= high):
            return f"{column} {value:.3g} outside its training range {low:.3g}-{high:.3g}"
    return ""


def coherent_elongation(row: dict) -> bool:
    """Stars stretched the same way over the field, clearly (tracking, never seeing)."""
    coh, ell = row.get("elongation_coherence"), row.get("ellipticity")
    return _finite(coh) and _finite(ell) and coh >= COHERENT_MIN and ell >= ELONGATED_MIN


def cloud_words(row: dict, cfg: ClassifyConfig) -> str:
    """The cloud that the field's other frames show on this frame, in words ('' for none).

    ``extinction_spread_mag >= extinction_spread_limit_mag`` (patchy cloud) or
    ``transparency_mag >= transparency_loss_limit_mag`` (thin cloud); NaN raises nothing.
    """
    k, loss = row.get("extinction_spread_mag"), row.get("transparency_mag")
    words = []
    if _finite(k) and k >= cfg.extinction_spread_limit_mag:
        words.append(f"patchy cloud: extinction spread k {k:.2f} mag >= "
                     f"{cfg.extinction_spread_limit_mag:g} mag over the detector")
    if _finite(loss) and loss >= cfg.transparency_loss_limit_mag:
        words.append(f"{'cloud' if words else 'thin cloud'}: stars {loss:.2f} mag fainter "
                     f"than on the field's clearest frames (limit "
                     f"{cfg.transparency_loss_limit_mag:g} mag)")
    return "; ".join(words)


CLOUD_OVERRIDES = ("good", "bad_seeing")
"""Classes that cloud evidence replaces by background_issues (those after it in the
spec's priority)."""


def decide(row: dict, cfg: ClassifyConfig, learned: np.ndarray | None = None,
           learned_name: str = "cnn", out_of_domain: str = "") -> tuple[ClassResult, str, int]:
    """Class, probabilities and flags of one detector row, with its reason.

    Parameters
    ----------
    row
        The detector's exposure row (measured quantities, ``qa_flags``).
    cfg
        The survey's limits.
    learned
        Probabilities of :data:`CLASSES` from the learned model, or None (rules only).
    learned_name
        The learned model's name in the ``classifier`` column.
    out_of_domain
        Why the learned model was not asked ('' when it was, or when there is none).

    Returns
    -------
    (ClassResult, str, int)
        The decision, its reason in words, and the ``qa_flags`` bits it adds.
    """
    ev = evidence(row)
    measured = detection_row(row) if ev == "detections" else row
    rules = classify_rules(measured, cfg)
    flags = 0
    notes = []
    if ev == "none":
        flags |= bits("NO_STARS")
        probs = {c: 0.15 for c in CLASSES}
        probs[NO_STARS_CLASS] = 0.4
        result = _result(rules, NO_STARS_CLASS, probs, "rules")
        return result, _no_star_reason(row), flags
    if out_of_domain:
        flags |= bits("CNN_OUT_OF_DOMAIN")
        notes.append(f"rules: {learned_name} not used ({out_of_domain})")
    if learned is not None and not out_of_domain:
        probs = {c: float(p) for c, p in zip(CLASSES, learned / learned.sum())}
        cls, name = max(probs, key=probs.get), learned_name
        if coherent_elongation(measured) and not cls.endswith("tracking"):
            cls = TRACKING_CLASS.get(rules.flag_tracking, "bad_tracking")
            notes.append(f"{learned_name} said {max(probs, key=probs.get)}; coherent "
                         "elongation is tracking")
            probs = make_primary_most_probable(probs, cls)
        elif cls != rules.quality_class:
            notes.append(f"{learned_name} p={probs[cls]:.2f}; rules say {rules.quality_class}")
    else:
        probs, cls, name = dict(rules.probabilities), rules.quality_class, "rules"
    if ev == "detections":
        flags |= bits("NO_PSF_FIT")
        probs = with_doubt(probs, DOUBT[ev])
        notes.append(f"from the moments of the bright detections (no PSF fit, "
                     f"{int(row.get('n_sources') or 0)} sources)")
    cloud = cloud_words(row, cfg)
    reason = measured_reason(measured, cls, cfg)
    if cloud:
        flags |= bits("CLOUD")
        if cls in CLOUD_OVERRIDES:
            reason = f"{cloud}; {measured_reason(measured, 'good', cfg)}"
            cls = "background_issues"
        elif cls == "background_issues":
            reason = f"{reason}; {cloud}"
        else:
            notes.append(f"also {cloud}")
    result = _result(rules, cls, probs, name, flag_background=bool(cloud) or None)
    return result, "; ".join([reason, *notes]), flags


def _result(rules: ClassResult, cls: str, probs: dict, name: str,
            flag_background: bool | None = None) -> ClassResult:
    probs = make_primary_most_probable(probs, cls)
    return ClassResult(quality_class=cls, probabilities={c: float(probs[c]) for c in CLASSES},
                       flag_bad_seeing=rules.flag_bad_seeing, flag_tracking=rules.flag_tracking,
                       flag_background=flag_background or rules.flag_background,
                       classifier=name)


def _fmt(value, spec: str) -> str:
    return format(value, spec) if _finite(value) else "n/a"


def _seeing_words(row: dict, cfg: ClassifyConfig) -> str:
    if _finite(row.get("fwhm_arcsec")):
        value, limit = row["fwhm_arcsec"], cfg.seeing_limit_arcsec
        sign = ">" if seeing_flag(row, cfg) else "<="
        return f'FWHM {value:.2f}" {sign} {limit:g}" seeing limit'
    if _finite(row.get("fwhm_px")):
        value, limit = row["fwhm_px"], cfg.seeing_limit_px
        words = " (no pixel scale: no seeing limit)"
        if limit:
            words = f" {'>' if seeing_flag(row, cfg) else '<='} {limit:g} px limit"
        return f"FWHM {value:.2f} px{words}"
    return "FWHM not measured"


def _tracking_words(row: dict, cfg: ClassifyConfig) -> str:
    if int(row.get("qa_flags") or 0) & bits("DOUBLED_STARS"):
        return (f"stars doubled: separation/FWHM {_fmt(row.get('trail_ratio'), '.1f')}, "
                f"direction coherence {_fmt(row.get('elongation_coherence'), '.2f')}")
    return (f"trail ratio {_fmt(row.get('trail_ratio'), '.2f')} (limits "
            f"{cfg.trail_ratio_bad:g}/{cfg.trail_ratio_very_bad:g}), direction coherence "
            f"{_fmt(row.get('elongation_coherence'), '.2f')}, ellipticity "
            f"{_fmt(row.get('ellipticity'), '.2f')}")


def _sky_words(row: dict, cfg: ClassifyConfig) -> str:
    u = row.get("sky_nonuniformity")
    words = "sky non-uniformity not measured"
    if _finite(u):
        sign = ">=" if background_flag(u, cfg) else "<"
        words = f"sky non-uniformity {u:.3f} {sign} {cfg.nonuniformity_limit:g}"
    if _finite(row.get("mask_fraction")) and row["mask_fraction"] > 0:
        words += (f", autoencoder masks {100 * row['mask_fraction']:.0f}% "
                  f"(score {row['ae_score']:.2f})")
    return words


def measured_reason(row: dict, cls: str, cfg: ClassifyConfig) -> str:
    """The quantities and limits behind ``cls``, in words."""
    if cls.endswith("tracking"):
        return _tracking_words(row, cfg)
    if cls == "background_issues":
        return _sky_words(row, cfg)
    if cls == "bad_seeing":
        return _seeing_words(row, cfg)
    seeing = _seeing_words(row, cfg)
    return (f"{seeing}, trail ratio {_fmt(row.get('trail_ratio'), '.2f')}, "
            f"{_sky_words(row, cfg)}")


def _no_star_reason(row: dict) -> str:
    return (f"no stars measured ({int(row.get('n_sources') or 0)} sources): cloud, a closed "
            f"dome or a failed exposure? sky {_fmt(row.get('sky_level'), '.1f')} ADU, noise "
            f"{_fmt(row.get('sky_noise'), '.2f')}")


def classify_row(row: dict, cfg: ClassifyConfig, learned_model=None,
                 occupancy: np.ndarray | None = None) -> dict:
    """A copy of ``row`` with the decision written in: class, probabilities, flags,
    ``classifier``, ``reason`` and the added ``qa_flags`` bits.

    ``learned_model`` is a :class:`~survey_qa.models.classifier_inference.LearnedClassifier` (or
    None: rules only) and ``occupancy`` the detector's SOM occupancy map for it.
    """
    why, probs = "", None
    if learned_model is not None:
        why = outside_domain(row, learned_model.meta.get("domain"))
        if not why and evidence(row) != "none":
            probs = learned_model.probabilities([row], occupancy[None])[0]
    result, reason, flags = decide(row, cfg, probs, "cnn", why)
    out = apply_classification(row, result)
    out["reason"] = reason
    out["qa_flags"] = int(row.get("qa_flags") or 0) | flags
    return out
