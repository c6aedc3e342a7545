"""Rule classifier: flags, priority, probabilities, mosaic summary."""
import math

import numpy as np
import pytest

from survey_qa.config import ClassifyConfig
from survey_qa.pipeline.classify import (apply_classification, background_flag, classify_rules,
                                         combine_detectors, make_primary_most_probable,
                                         mosaic_class, seeing_flag, seeing_measure,
                                         soft_margin, tracking_flag, worst_held)
from survey_qa.pipeline.flags import bits
from survey_qa.pipeline.schema import CLASSES, EXPOSURE_SCHEMA, empty_exposure_row, rows_to_table

CFG = ClassifyConfig()


def row(fwhm_arcsec=0.9, trail=0.1, coherence=0.9, u=0.01, **extra):
    r = empty_exposure_row()
    r.update(fwhm_arcsec=fwhm_arcsec, fwhm_px=fwhm_arcsec / 0.3, trail_ratio=trail,
             elongation_coherence=coherence, sky_nonuniformity=u, status="ok", **extra)
    return r


@pytest.mark.parametrize("kw, expected", [
    ({}, "good"),
    ({"fwhm_arcsec": 2.0}, "bad_seeing"),
    ({"u": 0.2}, "background_issues"),
    ({"trail": 1.5}, "bad_tracking"),
    ({"trail": 4.0}, "very_bad_tracking"),
    ({"trail": 4.0, "u": 0.2, "fwhm_arcsec": 2.0}, "very_bad_tracking"),
    ({"trail": 1.5, "u": 0.2, "fwhm_arcsec": 2.0}, "bad_tracking"),
    ({"u": 0.2, "fwhm_arcsec": 2.0}, "background_issues"),
    ({"trail": 4.0, "coherence": 0.2}, "good"),  # optics, not tracking
    ({"trail": 4.0, "coherence": 0.2, "fwhm_arcsec": 2.0}, "bad_seeing"),
])
def test_priority(kw, expected):
    res = classify_rules(row(**kw), CFG)
    assert res.quality_class == expected
    assert sum(res.probabilities.values()) == pytest.approx(1.0)
    assert max(res.probabilities, key=res.probabilities.get) == expected


def test_all_flags_are_recorded():
    res = classify_rules(row(trail=1.5, u=0.2, fwhm_arcsec=2.0), CFG)
    assert res.flag_tracking == "bad" and res.flag_background and res.flag_bad_seeing
    assert res.classifier == "rules"


def test_nan_measurements_raise_no_flag():
    r = row(fwhm_arcsec=math.nan, trail=math.nan, coherence=math.nan, u=math.nan)
    r["fwhm_px"] = math.nan
    res = classify_rules(r, CFG)
    assert res.quality_class == "good" and res.probabilities["good"] == pytest.approx(1.0)
    assert res.flag_tracking == "none" and not res.flag_background and not res.flag_bad_seeing


def test_seeing_in_pixels_without_a_scale():
    r = row(fwhm_arcsec=math.nan)
    r["fwhm_px"] = 9.0
    assert classify_rules(r, CFG).quality_class == "good"  # no pixel limit configured
    assert classify_rules(r, ClassifyConfig(seeing_limit_px=6.0)).quality_class == "bad_seeing"


def test_doubled_stars_use_the_jump_limit():
    r = row(trail=2.4, qa_flags=bits("DOUBLED_STARS"))
    assert classify_rules(r, CFG).quality_class == "very_bad_tracking"
    assert classify_rules(row(trail=2.4), CFG).quality_class == "bad_tracking"


def test_rule_functions_at_their_limits():
    assert background_flag(CFG.nonuniformity_limit, CFG)  # at the limit: flagged
    assert not background_flag(0.999 * CFG.nonuniformity_limit, CFG)
    assert not background_flag(math.nan, CFG) and not background_flag(None, CFG)
    assert not seeing_flag(row(fwhm_arcsec=CFG.seeing_limit_arcsec), CFG)  # strictly above
    assert seeing_flag(row(fwhm_arcsec=1.001 * CFG.seeing_limit_arcsec), CFG)
    assert tracking_flag(row(trail=CFG.trail_ratio_bad), CFG) == "bad"
    assert tracking_flag(row(trail=CFG.trail_ratio_very_bad), CFG) == "very_bad"
    assert tracking_flag(row(trail=CFG.trail_ratio_very_bad,
                             coherence=0.99 * CFG.min_coherence), CFG) == "none"
    no_scale = row(fwhm_arcsec=math.nan)
    no_scale["fwhm_px"] = 6.0
    assert all(math.isnan(v) for v in seeing_measure(no_scale, CFG))
    px = ClassifyConfig(seeing_limit_px=5.0)
    assert seeing_measure(no_scale, px) == (6.0, 5.0) and seeing_flag(no_scale, px)


def test_rule_functions_make_the_class_flags():
    for kw in ({}, {"fwhm_arcsec": 2.0}, {"u": 0.2}, {"trail": 1.5}, {"trail": 4.0}):
        r = row(**kw)
        res = classify_rules(r, CFG)
        assert res.flag_bad_seeing == seeing_flag(r, CFG)
        assert res.flag_background == background_flag(r["sky_nonuniformity"], CFG)
        assert res.flag_tracking == tracking_flag(r, CFG)


def test_worst_held():
    assert worst_held(["bad", "none", "none", "none"], ("very_bad", "bad", "none")) == "bad"
    assert worst_held([True] + [False] * 4, (True, False)) is False
    assert worst_held([True] + [False] * 3, (True, False)) is True


def test_probabilities_over_random_rows():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        r = row(fwhm_arcsec=rng.uniform(0.5, 2.5), trail=rng.uniform(0, 5),
                coherence=rng.uniform(0, 1), u=rng.uniform(0, 0.15))
        res = classify_rules(r, CFG)
        p = res.probabilities
        assert set(p) == set(CLASSES)
        assert all(0.0 <= v <= 1.0 for v in p.values())
        assert sum(p.values()) == pytest.approx(1.0, abs=1e-9)
        best = max(p, key=p.get)
        assert best == res.quality_class
        assert p[best] > max(v for c, v in p.items() if c != best)


def test_probabilities_are_soft_near_a_limit():
    near = classify_rules(row(fwhm_arcsec=1.45), CFG).probabilities
    far = classify_rules(row(fwhm_arcsec=3.0), CFG).probabilities
    assert 0.5 < near["bad_seeing"] < 0.8 < far["bad_seeing"]
    assert soft_margin(1.4, 1.4, 0.15) == pytest.approx(0.5)
    assert soft_margin(math.nan, 1.4, 0.15) == 0.0


def test_make_primary_most_probable_is_minimal():
    p = {"good": 0.3, "bad_tracking": 0.4, "very_bad_tracking": 0.1, "bad_seeing": 0.1,
         "background_issues": 0.1}
    assert make_primary_most_probable(p, "bad_tracking") == p
    q = make_primary_most_probable(p, "good")
    assert sum(q.values()) == pytest.approx(1.0)
    assert q["good"] > q["bad_tracking"] and q["good"] - q["bad_tracking"] < 1e-5


def test_apply_classification_fills_the_schema_columns():
    r = row(trail=4.0)
    out = apply_classification(r, classify_rules(r, CFG))
    assert out["quality_class"] == "very_bad_tracking" and out["flag_tracking"] == "very_bad"
    assert out["classifier"] == "rules" and r["quality_class"] == ""  # input untouched
    rows_to_table([out], EXPOSURE_SCHEMA)  # every value fits its column type


def classified(**kw):
    r = row(**kw)
    r.update(exposure="e1", n_sources=100, n_stars_used=40, qa_flags=1)
    return apply_classification(r, classify_rules(r, CFG))


def test_mosaic_quarter_rule():
    assert mosaic_class(["good"] * 3 + ["very_bad_tracking"]) == "very_bad_tracking"
    assert mosaic_class(["good"] * 5 + ["very_bad_tracking"]) == "good"
    assert mosaic_class(["good"] * 4 + ["bad_seeing"] * 2 + ["background_issues"] * 2) \
        == "background_issues"
    rows = [classified(), classified(), classified(), classified(u=0.3, fwhm_arcsec=1.0)]
    out = combine_detectors(rows)
    assert out["detector"] == "ALL" and out["quality_class"] == "background_issues"
    assert out["flag_background"] and out["flag_tracking"] == "none"
    assert out["n_sources"] == 400 and out["n_stars_used"] == 160 and out["qa_flags"] == 1
    assert out["fwhm_arcsec"] == pytest.approx(0.9)
    assert out["sky_nonuniformity"] == pytest.approx(0.01)  # the median
    assert out["p_good"] == pytest.approx(np.mean([r["p_good"] for r in rows]))
    assert sum(out[f"p_{c}"] for c in CLASSES) == pytest.approx(1.0)
    rows_to_table([out], EXPOSURE_SCHEMA)
    with pytest.raises(ValueError):
        combine_detectors([])
