"""Background stage: level, noise and non-uniformity on scenes with a known sky."""
import math

import numpy as np
import pytest

from survey_qa.config import BackgroundConfig
from survey_qa.pipeline.background import grow_mask, measure_background, noise_limited_box
from survey_qa.pipeline.errors import QualityError


def true_u(sky: np.ndarray) -> float:
    p1, p50, p99 = np.percentile(sky, [1, 50, 99])
    return (p99 - p1) / p50


def test_flat_sky_with_stars(scene):
    s = scene(shape=(512, 512), n_stars=40, sky=200.0, read_noise=5.0, seed=1)
    res = measure_background(s.image, None, BackgroundConfig(box_px=64))
    assert res.level == pytest.approx(200.0, rel=0.005)
    assert res.noise == pytest.approx(np.sqrt(200.0 + 25.0), rel=0.05)
    assert res.nonuniformity < 0.015
    assert res.back.shape == s.image.shape and res.back.dtype == np.float32
    assert res.rms.shape == s.image.shape


@pytest.mark.parametrize("gradient", [0.05, 0.2, 0.5])
def test_gradient_sky_nonuniformity(scene, gradient):
    s = scene(shape=(512, 512), n_stars=30, sky=200.0, gradient=gradient, seed=2)
    res = measure_background(s.image, None, BackgroundConfig(box_px=64))
    assert res.nonuniformity == pytest.approx(true_u(s.sky), abs=0.01)


def test_source_masking_keeps_bright_stars_out_of_the_sky(scene):
    s = scene(shape=(512, 512), n_stars=60, sky=50.0, flux=(2e5, 2e6), fwhm_px=6.0, seed=3,
              min_sep=30)
    masked = measure_background(s.image, None, BackgroundConfig(box_px=64))
    plain = measure_background(s.image, None, BackgroundConfig(box_px=64, mask_sources=False))
    assert abs(masked.level - 50.0) < abs(plain.level - 50.0)
    assert masked.level == pytest.approx(50.0, rel=0.01)
    assert masked.nonuniformity < plain.nonuniformity


def test_masked_pixels_are_ignored(scene):
    s = scene(shape=(256, 256), n_stars=10, sky=100.0, seed=4)
    img = s.image.copy()
    img[100:140, 60:200] = 5e4  # a bad block, masked
    mask = np.zeros(img.shape, bool)
    mask[100:140, 60:200] = True
    res = measure_background(img, mask, BackgroundConfig(box_px=64))
    assert res.level == pytest.approx(100.0, rel=0.01)
    assert res.nonuniformity < 0.05


def test_noise_limited_frames_get_a_coarser_mesh():
    rng = np.random.default_rng(5)
    img = rng.normal(20.0, 12.0, (1024, 1024)).astype(np.float32)  # faint sky, big read noise
    res = measure_background(img, None, BackgroundConfig(box_px=64, mask_sources=False))
    assert noise_limited_box(64, res.noise, res.level, img.shape) == 342  # 1024 / 3 meshes
    assert noise_limited_box(64, 10.0, 1000.0, img.shape) == 64  # bright sky: as configured
    assert res.nonuniformity < 0.03  # pure noise, measured on the coarse mesh


def test_sky_fainter_than_its_noise_has_no_nonuniformity():
    img = np.random.default_rng(6).normal(0.5, 10.0, (512, 512)).astype(np.float32)
    res = measure_background(img, None, BackgroundConfig(box_px=64))
    assert math.isnan(res.nonuniformity) and abs(res.level) < 1.0


def test_big_endian_input_and_all_masked():
    img = np.full((128, 128), 10.0, dtype=">f4") + np.random.default_rng(6).normal(
        0, 1, (128, 128)).astype(">f4")
    res = measure_background(img, None, BackgroundConfig(box_px=32))
    assert res.level == pytest.approx(10.0, abs=0.1)
    with pytest.raises(QualityError, match="masked"):
        measure_background(img, np.ones(img.shape, bool), BackgroundConfig(box_px=32))


def test_grow_mask_matches_a_square_dilation():
    from scipy import ndimage

    hot = np.random.default_rng(7).random((64, 80)) > 0.995
    expected = ndimage.binary_dilation(hot, structure=np.ones((5, 5), bool))
    assert np.array_equal(grow_mask(hot, 2), expected)


def test_noise_floor_is_removed_in_quadrature():
    from survey_qa.pipeline.background import noise_floor, remove_noise_floor

    assert noise_floor(10.0, 100.0, 128) == pytest.approx(7.0 * 10 / (128 * 100))
    assert remove_noise_floor(0.05, 0.03) == pytest.approx(0.04)
    assert remove_noise_floor(0.02, 0.03) == 0.0
    assert math.isnan(remove_noise_floor(math.nan, 0.01))


def _masked_sky(fraction_masked_rows: int, period: int, sky=358.7, noise=1.34, gradient=0.05):
    """A 650x500 sky (linear gradient along x) with every mesh mostly masked by stripes."""
    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[0:500, 0:650]
    sky_map = sky * (1.0 + gradient * xx / 649.0)
    img = (sky_map + rng.normal(0.0, noise, sky_map.shape)).astype(np.float32)
    mask = (yy % period) < fraction_masked_rows
    return img, mask, sky_map


def test_meshes_mostly_masked_still_give_the_right_sky():
    from survey_qa.pipeline.flags import decode_flags

    img, mask, sky_map = _masked_sky(3, 4)  # 75% of every mesh masked: sep alone gives 0, 1
    res = measure_background(img, mask, BackgroundConfig())
    assert res.level == pytest.approx(np.median(sky_map), rel=0.002)
    assert res.noise == pytest.approx(1.34, rel=0.1)
    assert res.nonuniformity == pytest.approx(true_u(sky_map), abs=0.005)
    assert decode_flags(res.qa_flags) == ["SKY_FALLBACK"]


def test_mesh_shrinks_when_the_source_mask_covers_its_meshes():
    rng = np.random.default_rng(12)
    yy, xx = np.mgrid[0:500, 0:650]
    mask = np.zeros((500, 650), bool)
    for x, y in rng.uniform((0, 0), (650, 500), (400, 2)):  # about half of the frame
        mask |= (xx - x) ** 2 + (yy - y) ** 2 < 14 ** 2
    img = rng.normal(358.7, 1.34, mask.shape).astype(np.float32)
    img[mask] = 1e4  # what sep must not see
    res = measure_background(img, mask, BackgroundConfig(box_px=128, mask_sources=False))
    assert res.mesh_px < 128 and res.qa_flags == 0
    assert res.level == pytest.approx(358.7, abs=0.3)


def test_check_rejects_seps_silent_failure():
    from survey_qa.pipeline.background import check_sky

    img, mask, sky_map = _masked_sky(0, 4)
    assert not check_sky(img, np.zeros_like(img), 1.0, ~mask)  # sep's 0 and 1
    assert not check_sky(img, sky_map.astype(np.float32) + 5.0, 1.34, ~mask)  # 4 sigma off
    assert not check_sky(img, sky_map.astype(np.float32), 3.0, ~mask)  # noise 2x too high
    assert check_sky(img, sky_map.astype(np.float32), 1.34, ~mask)


def test_too_little_sky_is_flagged_unmeasured():
    from survey_qa.pipeline.flags import decode_flags

    img, _, _ = _masked_sky(0, 4, gradient=0.0)
    mask = np.ones(img.shape, bool)
    mask[::40, ::40] = False  # 169 pixels
    res = measure_background(img, mask, BackgroundConfig())
    assert math.isnan(res.nonuniformity)
    assert decode_flags(res.qa_flags) == ["SKY_FALLBACK", "SKY_UNMEASURED"]
    assert res.level == pytest.approx(358.7, abs=0.5) and res.noise == pytest.approx(1.34, rel=0.2)
