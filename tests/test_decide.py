"""The decision layer: evidence, doubt, domain, overrides, flags and reasons."""
import math

import numpy as np
import pytest

from survey_qa.config import ClassifyConfig
from survey_qa.pipeline.decide import classify_row, decide, evidence, outside_domain
from survey_qa.pipeline.flags import decode_flags
from survey_qa.pipeline.schema import CLASSES, empty_exposure_row

CFG = ClassifyConfig()


def row(**kw):
    r = empty_exposure_row()
    r.update(status="ok", pixscale_arcsec=0.5, fwhm_px=2.0, fwhm_arcsec=1.0, n_stars_used=40,
             n_sources=300, ellipticity=0.05, elongation_coherence=0.3, trail_ratio=0.2,
             sky_nonuniformity=0.02, sky_level=500.0, sky_noise=10.0)
    r.update(kw)
    return r


def probs_of(result):
    return np.array([result.probabilities[c] for c in CLASSES])


def test_no_star_frame_is_not_confident():
    r = row(fwhm_px=math.nan, fwhm_arcsec=math.nan, n_stars_used=0, n_sources=0,
            ellipticity=math.nan, elongation_coherence=math.nan, trail_ratio=math.nan)
    assert evidence(r) == "none"
    result, reason, flags = decide(r, CFG)
    assert result.quality_class == "background_issues"
    assert probs_of(result).max() < 0.5
    assert "NO_STARS" in decode_flags(flags)
    assert reason.startswith("no stars measured")
    assert not result.flag_background  # u 0.02 is under the limit: the flag says so


def test_detections_give_a_doubtful_tracking_class():
    r = row(fwhm_px=math.nan, fwhm_arcsec=math.nan, n_stars_used=0, n_sources=12,
            ellipticity=math.nan, elongation_coherence=math.nan, trail_ratio=math.nan,
            src_fwhm_px=2.4, src_ellipticity=0.6, src_elongation_coherence=0.97)
    assert evidence(r) == "detections"
    result, reason, flags = decide(r, CFG)
    assert result.quality_class in ("bad_tracking", "very_bad_tracking")
    assert probs_of(result).max() < 0.8
    assert "NO_PSF_FIT" in decode_flags(flags)
    assert "trail ratio" in reason and "no PSF fit" in reason


def test_learned_seeing_on_coherent_elongation_is_overruled():
    r = row(ellipticity=0.3, elongation_coherence=0.96, trail_ratio=1.4, fwhm_arcsec=2.0)
    learned = np.array([0.02, 0.03, 0.01, 0.9, 0.04])  # CLASSES order: bad_seeing
    result, reason, _ = decide(r, CFG, learned)
    assert result.quality_class == "bad_tracking"
    assert result.classifier == "cnn"
    assert CLASSES[int(np.argmax(probs_of(result)))] == "bad_tracking"
    assert "coherent elongation is tracking" in reason


def test_flags_follow_the_limits_whatever_the_learned_class():
    r = row(sky_nonuniformity=0.043)
    learned = np.array([0.1, 0.05, 0.05, 0.1, 0.7])  # background_issues
    result, reason, _ = decide(r, CFG, learned)
    assert result.quality_class == "background_issues"
    assert result.flag_background is False
    assert "0.043 < 0.06" in reason and "rules say good" in reason


@pytest.mark.parametrize("kw, words", [
    (dict(fwhm_arcsec=2.1, fwhm_px=4.2), 'FWHM 2.10" > 1.4" seeing limit'),
    (dict(sky_nonuniformity=0.2), "sky non-uniformity 0.200 >= 0.06"),
    (dict(trail_ratio=3.4, elongation_coherence=0.98, ellipticity=0.6), "trail ratio 3.40"),
    ({}, 'FWHM 1.00" <= 1.4" seeing limit'),
])
def test_reason_names_the_quantity_and_its_limit(kw, words):
    out = classify_row(row(**kw), CFG)
    assert words in out["reason"]
    assert out["classifier"] == "rules"


def test_outside_domain():
    domain = {"pixscale_arcsec": [0.15, 0.5], "nx": [1024, 2048]}
    assert outside_domain(row(nx=2000), domain) == ""
    assert "pixscale_arcsec" in outside_domain(row(pixscale_arcsec=3.0), domain)
    assert outside_domain(row(pixscale_arcsec=math.nan, nx=2000), domain) == ""


def test_reason_never_states_a_false_comparison():
    r = row(fwhm_arcsec=1.32, fwhm_px=2.64)
    learned = np.array([0.1, 0.05, 0.05, 0.7, 0.1])  # bad_seeing below the limit
    result, reason, _ = decide(r, CFG, learned)
    assert result.quality_class == "bad_seeing"
    assert 'FWHM 1.32" <= 1.4" seeing limit' in reason and "rules say good" in reason
