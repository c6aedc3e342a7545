"""Star stamps: centred, unit sum, brightest first."""
import math

import numpy as np
import pytest

from survey_qa.config import BackgroundConfig, PSFConfig, SourcesConfig, StampsConfig
from survey_qa.pipeline.background import measure_background
from survey_qa.pipeline.flags import SOURCE_FLAGS
from survey_qa.pipeline.psf import select_psf_stars
from survey_qa.pipeline.sources import extract_sources
from survey_qa.pipeline.stamps import cut_stamps, stamp_order, stamp_variables, star_stamps


@pytest.fixture
def measured(scene):
    s = scene(shape=(256, 256), n_stars=20, fwhm_px=3.0, seed=21)
    bkg = measure_background(s.image, None, BackgroundConfig(box_px=64))
    src = extract_sources(s.image, bkg, None, SourcesConfig(), math.nan)
    star = select_psf_stars(src, s.image.shape, PSFConfig())
    return s, bkg, src, star


def test_stamps_are_centred_and_normalised(measured):
    s, bkg, src, star = measured
    cut = cut_stamps(s.image, bkg, src, star, StampsConfig(size_px=24, per_detector=10))
    assert cut.shape == (10, 24, 24) and cut.dtype == np.float32
    assert np.allclose(cut.sum(axis=(1, 2)), 1.0, atol=1e-5)
    yy, xx = np.mgrid[:24, :24]
    core = np.clip(cut, 0, None) * ((yy - 12) ** 2 + (xx - 12) ** 2 <= 36)  # within 2 FWHM
    cx = (core * xx).sum(axis=(1, 2)) / core.sum(axis=(1, 2))
    cy = (core * yy).sum(axis=(1, 2)) / core.sum(axis=(1, 2))
    assert np.abs(cx - 12).max() < 0.1 and np.abs(cy - 12).max() < 0.1
    assert (cut.reshape(10, -1).argmax(axis=1) == 12 * 24 + 12).mean() > 0.5


def test_brightest_first_and_only_psf_stars(measured):
    s, bkg, src, star = measured
    order = stamp_order(src, star, 5)
    assert star[order].all()
    assert (np.diff(src.flux.to_numpy()[order]) <= 0).all()
    few = cut_stamps(s.image, bkg, src, star, StampsConfig(size_px=16, per_detector=5))
    assert few.shape == (5, 16, 16)


def test_without_psf_stars_the_brightest_clean_detections_are_stamped(measured):
    s, bkg, src, _ = measured
    none = np.zeros(len(src), bool)
    order = stamp_order(src, none, 8)
    assert len(order) == 8 and (np.diff(src.flux.to_numpy()[order]) <= 0).all()
    src = src.assign(flags=src["flags"] | SOURCE_FLAGS["SATURATED"].value)  # nothing clean
    cut = cut_stamps(s.image, bkg, src, none, StampsConfig(size_px=32))
    assert cut.shape == (0, 32, 32) and cut.dtype == np.float32


def test_star_near_the_edge_is_zero_padded(scene):
    s = scene(shape=(128, 128), positions=([5.0, 64.0], [64.0, 64.0]), fluxes=[1e5, 1e5],
              fwhm_px=3.0, seed=22, margin=0)
    bkg = measure_background(s.image, None, BackgroundConfig(box_px=32))
    src = extract_sources(s.image, bkg, None, SourcesConfig(), math.nan)
    star = np.ones(len(src), bool)
    cut = cut_stamps(s.image, bkg, src, star, StampsConfig(size_px=32, per_detector=4))
    edge = int(np.argmin(src.x.to_numpy()))
    assert np.isfinite(cut).all()
    assert np.allclose(cut[edge, :, :4], 0.0)  # columns left of the detector


def test_star_stamps_carry_their_stars_positions_in_stamp_order(measured):
    s, bkg, src, star = measured
    cfg = StampsConfig(size_px=16, per_detector=6)
    got = star_stamps(s.image, bkg, src, star, cfg)
    order = stamp_order(src, star, 6)
    assert np.array_equal(got.stamps, cut_stamps(s.image, bkg, src, star, cfg))
    assert np.array_equal(got.x_px, src["x"].to_numpy(np.float32)[order])
    assert np.array_equal(got.y_px, src["y"].to_numpy(np.float32)[order])
    arrays = got.arrays()
    variables = stamp_variables(cfg)
    assert set(arrays) == set(variables) and int(arrays["n_stamps"]) == 6
    for name, (shape, dims, dtype, _) in variables.items():
        assert arrays[name].shape == shape and len(dims) == len(shape)
