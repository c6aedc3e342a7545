"""The truth of a simulated detector and exposure: classes, limits and the defect mask.

- **Truth quantities** (per detector, computed from what is in the image):
  ``u_true = (P99 - P1) / median`` of the full-resolution smooth sky ``S`` (every second
  pixel in each direction; ``S`` varies on scales of tens of pixels);
  ``k_true = P99 - P1`` of the patchy extinction map ``K`` (a uniform grey extinction,
  ``transparency_mag``, dims sources but changes no class).
- **Defect mask**: ``True`` where the defect light exceeds ``MASK_LIGHT_FRACTION`` (5 %) of
  the undisturbed sky level (``L / sky > 0.05``) or where the patchy extinction exceeds
  ``MASK_EXTINCTION_MAG`` (0.10 mag). A frame without a background defect has an empty
  mask (its natural gradient and thin cirrus stay below both limits).
- **Classes**: :func:`truth_class` applies the limits of the spec (``LIMITS``) with the
  pipeline's priority rule (:func:`survey_qa.pipeline.classify.primary_class`). Values
  inside a gap of the spec (e.g. 1.2" < s < 1.6") are decided at the middle of the gap
  and the detector is marked ``ambiguous`` when the value in the gap could change its
  primary class. A mosaic exposure takes the pipeline's mosaic rule
  (:func:`survey_qa.pipeline.classify.mosaic_class`, through :func:`exposure_class`).
"""
from __future__ import annotations

from dataclasses import dataclass

from survey_qa.pipeline.classify import mosaic_class, primary_class
from survey_qa.simulate.spec import ExposureSpec, SimDetector


MASK_LIGHT_FRACTION = 0.05
MASK_EXTINCTION_MAG = 0.10


@dataclass(frozen=True)
class Limits:
    """Class limits of quality-classes.md (the spec's defaults)."""

    good_seeing_arcsec: float = 1.2
    bad_seeing_arcsec: float = 1.6
    good_trail_ratio: float = 0.5
    bad_trail_ratio: float = 1.0
    very_bad_trail_ratio: float = 3.0
    jump_trail_ratio: float = 2.0  # a jump of >= 2 s doubles the stars: very bad tracking
    good_u: float = 0.03
    good_k_mag: float = 0.05
    bad_u: float = 0.10
    bad_k_mag: float = 0.25


LIMITS = Limits()


def truth_class(seeing_arcsec: float, trail_ratio: float, u: float, k_mag: float,
                trail_kind: str, limits: Limits = LIMITS) -> dict:
    """Primary class, defect flags and ambiguity from the physical quantities.

    Parameters
    ----------
    seeing_arcsec, trail_ratio, u, k_mag
        Seeing FWHM ``s``, trail ratio ``r = T/s``, sky non-uniformity ``u`` and patchy
        extinction spread ``k`` (mag).
    trail_kind
        One of :data:`~survey_qa.simulate.spec.TRAIL_KINDS`; a ``jump`` of
        ``r >= limits.jump_trail_ratio`` is very bad.

    Returns
    -------
    dict
        ``quality_class``, ``flag_bad_seeing``, ``flag_tracking`` (none | bad | very_bad),
        ``flag_background``, ``ambiguous`` and ``ambiguous_seeing/_tracking/_background``.
        A value in a gap of the spec is decided at the gap's middle; ``ambiguous`` is True
        when moving it to either end of the gap would change the primary class.
    """
    L = limits
    amb_s = L.good_seeing_arcsec < seeing_arcsec < L.bad_seeing_arcsec
    very_bad_at = L.jump_trail_ratio if trail_kind == "jump" else L.very_bad_trail_ratio
    amb_t = L.good_trail_ratio < trail_ratio < L.bad_trail_ratio
    good_bg = u <= L.good_u and k_mag <= L.good_k_mag
    bad_bg = u >= L.bad_u or k_mag >= L.bad_k_mag
    amb_b = not good_bg and not bad_bg

    def decide(s_bad: bool, t_flag: str, b_bad: bool) -> str:
        return primary_class(t_flag, b_bad, s_bad)  # the pipeline's priority rule

    s_bad = seeing_arcsec >= 0.5 * (L.good_seeing_arcsec + L.bad_seeing_arcsec)
    if trail_ratio >= very_bad_at:
        t_flag = "very_bad"
    elif trail_ratio >= 0.5 * (L.good_trail_ratio + L.bad_trail_ratio):
        t_flag = "bad"
    else:
        t_flag = "none"
    b_bad = bad_bg or (amb_b and (u >= 0.5 * (L.good_u + L.bad_u)
                                  or k_mag >= 0.5 * (L.good_k_mag + L.bad_k_mag)))
    cls = decide(s_bad, t_flag, b_bad)
    outcomes = set()
    for s_alt in ((False, True) if amb_s else (s_bad,)):
        for t_alt in (("none", "bad") if amb_t else (t_flag,)):
            for b_alt in ((False, True) if amb_b else (b_bad,)):
                outcomes.add(decide(s_alt, t_alt, b_alt))
    return {
        "quality_class": cls, "flag_bad_seeing": bool(s_bad), "flag_tracking": t_flag,
        "flag_background": bool(b_bad), "ambiguous": len(outcomes) > 1,
        "ambiguous_seeing": bool(amb_s), "ambiguous_tracking": bool(amb_t),
        "ambiguous_background": bool(amb_b),
    }


def exposure_class(detector_classes: list[str]) -> str:
    """Class of a mosaic exposure: the pipeline's rule,
    :func:`survey_qa.pipeline.classify.mosaic_class` (the worst class held by at least a
    quarter of the detectors; ``good`` when no class reaches a quarter)."""
    if not detector_classes:
        raise ValueError("no detector classes")
    return mosaic_class(list(detector_classes))


def truth_records(spec: ExposureSpec, detectors: list[SimDetector]) -> list[dict]:
    """One truth row per detector: the detector truth, the exposure class and the spec."""
    classes = [d.truth["quality_class"] for d in detectors]
    exp_cls = exposure_class(classes)
    spec_row = spec.to_row()
    rows = []
    for d in detectors:
        row = dict(d.truth)
        row["exposure_class"] = exp_cls
        row["n_detectors"] = spec.n_detectors
        for key, value in spec_row.items():
            row.setdefault(key if key not in ("ambiguous",) else "ambiguous_requested", value)
        rows.append(row)
    return rows
