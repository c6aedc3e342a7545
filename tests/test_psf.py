"""PSF stage: star selection and a real FWHM, shape and trail measurement."""
import math

import numpy as np
import pytest

from survey_qa.config import BackgroundConfig, PSFConfig, SourcesConfig
from survey_qa.pipeline import psf_models as pm
from survey_qa.pipeline.background import measure_background
from survey_qa.pipeline.flags import SOURCE_FLAGS, decode_flags
from survey_qa.pipeline.psf import (ELLIPTICITY_NOISE_SNR, annotate_sources,
                                    coherent_elongation, measure_psf, select_psf_stars,
                                    trail_ratio)
from survey_qa.pipeline.sources import extract_sources


def run(image, cfg=None, saturate=math.nan, mask=None):
    cfg = cfg or PSFConfig()
    bkg = measure_background(image, mask, BackgroundConfig(box_px=64))
    src = extract_sources(image, bkg, mask, SourcesConfig(), saturate)
    star = select_psf_stars(src, image.shape, cfg)
    return src, star, measure_psf(image, bkg, src, star, cfg)


@pytest.mark.parametrize("fwhm, beta", [(2.0, 3.0), (4.0, 3.0), (8.0, 3.0), (4.0, 4.5)])
def test_round_stars_give_their_true_fwhm(scene, fwhm, beta):
    s = scene(shape=(384, 384), n_stars=25, fwhm_px=fwhm, beta=beta, seed=int(fwhm * 10))
    _, star, res = run(s.image)
    assert res.n_used >= 8
    assert res.fwhm_px == pytest.approx(fwhm, rel=0.03)
    assert res.moffat_beta == pytest.approx(beta, rel=0.1)
    assert res.ellipticity < 0.03 and res.trail_ratio < 0.3
    assert res.qa_flags == 0
    used = res.star_fwhm_px[res.psf_star]
    assert np.isfinite(used).all() and np.isnan(res.star_fwhm_px[~res.psf_star]).all()


@pytest.mark.parametrize("trail_px, angle", [(4.0, 30.0), (12.0, 30.0), (20.0, 135.0)])
def test_linear_trail(scene, trail_px, angle):
    s = scene(shape=(384, 384), n_stars=25, fwhm_px=4.0, trail_px=trail_px,
              trail_angle_deg=angle, seed=7)
    _, _, res = run(s.image)
    assert res.coherence > 0.9
    assert abs((res.pa_deg - angle + 90) % 180 - 90) < 2.0
    assert res.trail_ratio == pytest.approx(trail_px / 4.0, rel=0.1)
    assert res.fwhm_px == pytest.approx(4.0, rel=0.03)  # the seeing, before the motion
    assert res.ellipticity > 0.15


def test_trail_ratio_estimator_from_second_moments():
    # A Gaussian of sigma s convolved with a line of length T: variance s^2 + T^2 / 12
    # along the line, s^2 across; the estimator must give back T / FWHM.
    sigma = 1.7
    for ratio in (0.3, 0.75, 1.0, 2.0):
        t = ratio * sigma / pm.SIGMA_PER_FWHM
        q = sigma / math.sqrt(sigma ** 2 + t ** 2 / 12.0)
        assert trail_ratio(1.0 - q) == pytest.approx(ratio, rel=1e-9)
    assert trail_ratio(0.0) == 0.0


def test_a_single_trailed_star(scene):
    s = scene(shape=(128, 128), positions=([64.0], [64.0]), fluxes=[3e5], fwhm_px=3.0,
              trail_px=4.5, trail_angle_deg=60.0, seed=8)
    _, _, res = run(s.image, PSFConfig(min_stars=1))
    assert res.n_used == 1
    assert res.trail_ratio == pytest.approx(1.5, rel=0.1)
    assert res.fwhm_px == pytest.approx(3.0, rel=0.05)


def test_field_dependent_optics_are_not_coherent(scene):
    def radial(x, y, c=191.5):
        r = math.hypot(x - c, y - c) / c
        return 0.15 * min(r, 1.2) ** 2, math.degrees(math.atan2(y - c, x - c))

    s = scene(shape=(384, 384), n_stars=40, fwhm_px=4.0, shear=radial, seed=9, margin=24)
    _, _, res = run(s.image)
    assert res.ellipticity > 0.05  # the stars are elongated ...
    assert res.coherence < 0.35  # ... but not the same way
    assert res.trail_ratio < 0.5
    assert res.fwhm_px == pytest.approx(4.0, rel=0.03)  # shear keeps the area


def test_saturated_star_is_not_a_psf_star(scene):
    s = scene(shape=(256, 256), n_stars=12, fwhm_px=3.0, seed=10, flux=(2e4, 6e4))
    img = s.image.copy()
    bright = scene(shape=(256, 256), positions=([128.0], [128.0]), fluxes=[5e6], fwhm_px=3.0,
                   sky=0.0, read_noise=0.0, seed=11).image
    img = np.minimum(img + bright, 30000.0)
    mask = img >= 30000.0
    src, star, res = run(img, saturate=30000.0, mask=mask)
    i = int(np.argmin(np.hypot(src.x - 128, src.y - 128)))
    assert src["flags"].iloc[i] & SOURCE_FLAGS["SATURATED"].value
    assert not star[i] and not res.psf_star[i]


def test_cosmic_rays_and_galaxies_are_rejected(scene):
    s = scene(shape=(384, 384), n_stars=20, fwhm_px=4.0, seed=12, flux=(5e4, 2e5))
    gal = scene(shape=(384, 384), n_stars=8, fwhm_px=14.0, seed=13, flux=(2e5, 5e5),
                sky=0.0, read_noise=0.0).image
    img = s.image + gal
    rng = np.random.default_rng(14)
    hot = rng.integers(20, 364, (15, 2))
    img[hot[:, 1], hot[:, 0]] += 5000.0  # hot pixels / cosmic-ray hits
    src, star, res = run(img)
    flags = annotate_sources(src, star, res, img.shape, PSFConfig())["flags"].to_numpy()
    compact = (flags & SOURCE_FLAGS["COMPACT"].value) > 0
    extended = (flags & SOURCE_FLAGS["EXTENDED"].value) > 0
    assert compact.sum() >= 10 and extended.sum() >= 5
    assert not (star & (compact | extended)).any()
    assert res.fwhm_px == pytest.approx(4.0, rel=0.03)


def test_too_few_stars(scene):
    s = scene(shape=(256, 256), n_stars=3, fwhm_px=3.0, seed=15)
    src, star, res = run(s.image)
    assert 0 < len(src) < 5
    assert math.isnan(res.fwhm_px) and math.isnan(res.trail_ratio)
    assert decode_flags(res.qa_flags) == ["FEW_STARS"] and res.n_used == 0
    assert all(math.isnan(v) for v in res.fwhm_grid_px)


@pytest.mark.parametrize("fwhm, beta", [(1.2, 3.0), (1.5, 2.5), (1.8, 4.5)])
def test_undersampled(scene, fwhm, beta):
    s = scene(shape=(256, 256), n_stars=25, fwhm_px=fwhm, beta=beta, seed=int(16 * fwhm))
    _, _, res = run(s.image)
    assert res.fwhm_px == pytest.approx(fwhm, rel=0.05)
    # What the pixels record, as PSFEx describes it: never under one pixel.
    assert res.fwhm_image_px == pytest.approx(pm.pixel_convolved_fwhm(fwhm, beta), rel=0.03)
    assert res.fwhm_image_px > 1.0
    assert "UNDERSAMPLED" in decode_flags(res.qa_flags)
    assert res.trail_ratio < 0.3


def _galsim_cut_fwhm(profile, scale: float = 0.02) -> float:
    """Full width at half maximum along x through the centre of a GalSim profile drawn
    with the pixel on a fine grid (outermost half-maximum crossings)."""
    import galsim

    img = profile.drawImage(nx=1601, ny=1601, scale=scale, method="no_pixel").array
    cut = img[800] / img[800].max()
    above = np.flatnonzero(cut >= 0.5)
    lo, hi = above[0], above[-1]
    x_lo = lo - (cut[lo] - 0.5) / (cut[lo] - cut[lo - 1])
    x_hi = hi + (cut[hi] - 0.5) / (cut[hi] - cut[hi + 1])
    return float((x_hi - x_lo) * scale)


@pytest.mark.parametrize("fwhm, beta", [(0.5, 3.0), (1.2, 2.5), (2.0, 4.5), (6.0, 3.0)])
def test_pixel_convolved_fwhm_matches_galsim(fwhm, beta):
    import galsim

    truth = _galsim_cut_fwhm(galsim.Convolve(galsim.Moffat(beta=beta, fwhm=fwhm),
                                             galsim.Pixel(1.0)), scale=min(0.02, fwhm / 30))
    assert pm.pixel_convolved_fwhm(fwhm, beta) == pytest.approx(truth, rel=0.01)
    back = pm.seeing_fwhm_from_pixel_convolved(pm.pixel_convolved_fwhm(fwhm, beta), beta)
    assert back == pytest.approx(fwhm, rel=0.005)


def test_pixel_convolved_fwhm_limits():
    assert pm.pixel_convolved_fwhm(0.05, 3.0) == pytest.approx(1.0, abs=0.01)  # the pixel
    assert pm.pixel_convolved_fwhm(20.0, 3.0) == pytest.approx(20.0, rel=0.002)


def _moffat_fit_fwhm(image: np.ndarray) -> float:
    """FWHM of the round Moffat that best fits a noise-free, pixel-convolved image: how
    PSFEx sizes its PSF model (a Moffat fit to the model image)."""
    from scipy.optimize import least_squares

    ny, nx = image.shape
    yy, xx = np.mgrid[:ny, :nx]

    def resid(p):
        x0, y0, amp, alpha, beta = p
        return (amp * (1 + ((xx - x0) ** 2 + (yy - y0) ** 2) / alpha ** 2) ** -beta
                - image).ravel()

    p0 = [nx / 2, ny / 2, image.max(), nx / 6, 3.0]
    fit = least_squares(resid, p0, bounds=([0, 0, 0, 0.1, 1.01], [nx, ny, np.inf, nx, 1e3]))
    return float(fit.x[3] * pm.fwhm_factor(fit.x[4]))


def _donut_scene(n=9, size=320, outer_px=7.0, inner_px=3.5, seeing_px=3.0, seed=30):
    """Defocused stars: a uniform annulus convolved with a Gaussian seeing, on noise.
    Returns the image and the Moffat-fit FWHM of the noise-free donut."""
    import galsim

    rng = np.random.default_rng(seed)
    ring = galsim.Add([galsim.TopHat(radius=outer_px, flux=outer_px ** 2),
                       galsim.TopHat(radius=inner_px, flux=-inner_px ** 2)])
    donut = galsim.Convolve(ring, galsim.Gaussian(fwhm=seeing_px))
    img = galsim.ImageF(size, size, scale=1.0)
    grid = np.linspace(50, size - 50, int(math.ceil(math.sqrt(n))))
    for x, y in [(a, b) for a in grid for b in grid][:n]:
        x, y = x + rng.uniform(-0.5, 0.5), y + rng.uniform(-0.5, 0.5)
        donut.withFlux(float(10 ** rng.uniform(5.3, 5.8))).drawImage(
            image=img, add_to_image=True, center=galsim.PositionD(x + 1, y + 1))
    data = rng.poisson(img.array + 200.0) + rng.normal(0, 5, img.array.shape)
    model = donut.drawImage(nx=81, ny=81, scale=1.0).array
    return data.astype(np.float32), _moffat_fit_fwhm(model)


def test_defocused_donuts_give_their_width():
    img, truth = _donut_scene()
    _, _, res = run(img)
    assert res.n_used >= 5
    # Like with like: the Moffat width of the donut as the pixels record it.
    assert res.fwhm_image_px == pytest.approx(truth, rel=0.05)
    assert res.trail_ratio < 0.3 and res.fwhm_px > 10


def test_round_noisy_stars_are_not_coherent(scene):
    # Faint round stars: their measured ellipticities are noise, in random directions.
    s = scene(shape=(384, 384), n_stars=40, fwhm_px=3.0, flux=(2500.0, 6000.0), seed=31)
    _, _, res = run(s.image)
    assert res.n_used >= 15
    assert res.ellipticity > 0.02  # each star looks a little elongated ...
    assert res.coherence < 0.5  # ... but the field shares no elongation
    assert res.trail_ratio < 0.3


def test_small_trail_on_faint_stars_is_coherent(scene):
    # A trail of one FWHM (bad tracking) on stars of the same faintness.
    s = scene(shape=(384, 384), n_stars=40, fwhm_px=3.0, flux=(5000.0, 12000.0),
              trail_px=3.0, trail_angle_deg=70.0, seed=32)
    _, _, res = run(s.image)
    assert res.coherence > 0.8
    assert res.trail_ratio == pytest.approx(1.0, rel=0.2)
    assert abs((res.pa_deg - 70.0 + 90) % 180 - 90) < 5.0


def test_coherent_elongation_weights_and_noise():
    rng = np.random.default_rng(33)
    n = 60
    snr = 10 ** rng.uniform(1.3, 2.5, n)
    sigma = ELLIPTICITY_NOISE_SNR / snr
    noise = (rng.normal(0, sigma) + 1j * rng.normal(0, sigma))
    # Round stars: only noise; the estimate is consistent with zero.
    round_ = coherent_elongation(noise, sigma)
    assert round_.ellipticity < 0.02 and round_.coherence < 0.3
    # A shared elongation of 0.1 at 40 degrees, with the same noise: found.
    trail = coherent_elongation(0.1 * np.exp(2j * np.radians(40.0)) + noise, sigma)
    assert trail.ellipticity == pytest.approx(0.1, abs=0.015)
    assert trail.coherence > 0.8 and trail.significance > 5
    assert abs(trail.pa_deg - 40.0) < 3.0
    # Field-dependent optics: elongated stars, directions all around.
    angles = rng.uniform(0, np.pi, n)
    optics = coherent_elongation(0.1 * np.exp(2j * angles) + noise, sigma)
    assert optics.coherence < 0.4 and optics.ellipticity < 0.04


def test_grid_regions_without_stars_are_nan(scene):
    rng = np.random.default_rng(17)
    x, y = rng.uniform(20, 110, 20), rng.uniform(20, 364, 20)  # left third only
    s = scene(shape=(384, 384), positions=(x, y), fwhm_px=3.0, seed=17, min_sep=0)
    _, _, res = run(s.image, PSFConfig(grid=3, isolation_fwhm=2.0))
    grid = np.array(res.fwhm_grid_px).reshape(3, 3)  # row-major from pixel (0, 0)
    assert np.isfinite(grid[:, 0]).all() and np.isnan(grid[:, 1:]).all()
    assert np.allclose(grid[:, 0], 3.0, rtol=0.05)


def test_doubled_stars(scene):
    rng = np.random.default_rng(18)
    x, y = rng.uniform(30, 450, 30), rng.uniform(30, 450, 30)
    d = (11.0, 6.0)  # a jump of 12.5 px: 3.1 x the 4 px FWHM
    f = 10 ** rng.uniform(4.5, 5.3, 30)
    s = scene(shape=(512, 512), positions=(np.r_[x, x + d[0]], np.r_[y, y + d[1]]),
              fluxes=np.r_[0.6 * f, 0.4 * f], fwhm_px=4.0, seed=18)
    _, _, res = run(s.image)
    assert "DOUBLED_STARS" in decode_flags(res.qa_flags)
    assert res.trail_ratio == pytest.approx(math.hypot(*d) / 4.0, rel=0.05)
    assert res.fwhm_px == pytest.approx(4.0, rel=0.05)
    assert abs(res.pa_deg - math.degrees(math.atan2(d[1], d[0]))) < 2.0


def test_annotate_sources(scene):
    s = scene(shape=(256, 256), n_stars=15, fwhm_px=3.0, seed=19)
    src, star, res = run(s.image)
    out = annotate_sources(src, star, res, s.image.shape, PSFConfig())
    is_psf = (out["flags"].to_numpy() & SOURCE_FLAGS["PSF_STAR"].value) > 0
    assert np.array_equal(is_psf, res.psf_star)
    assert np.allclose(out.fwhm_px[is_psf], 3.0, rtol=0.1)
    assert out.fwhm_px[~is_psf].isna().all()
    assert src.fwhm_px.isna().all()  # the input is left alone


def test_model_jacobians_match_finite_differences():
    gx, gy = pm.sample_grid(6, 3)
    p = np.array([[0.3, -0.2, 1.1, 0.01, -0.5, -0.7, 0.1, 0.6],
                  [-0.1, 0.2, 0.9, -0.02, -1.0, -0.9, -0.05, 1.2]])
    _, jac = pm.moffat_model(p, gx, gy)
    for k in range(pm.N_PARAMS):
        dp = np.zeros_like(p)
        dp[:, k] = 1e-6
        num = (pm.moffat_model(p + dp, gx, gy, False)[0]
               - pm.moffat_model(p - dp, gx, gy, False)[0]) / 2e-6
        assert np.allclose(num, jac[..., k], rtol=1e-5, atol=1e-9)
    q = np.array([[0.3, -0.2, 1.1, 0.01, -0.6, 0.5], [-0.1, 0.2, 0.9, -0.02, -0.9, 1.0]])
    shared = np.array([3.0, 1.5, 0.3, -0.4])
    _, jl, js = pm.trailed_model(q, shared, gx, gy, 7)
    for k in range(pm.N_ROUND):
        dq = np.zeros_like(q)
        dq[:, k] = 1e-6
        num = (pm.trailed_model(q + dq, shared, gx, gy, 7)[0]
               - pm.trailed_model(q - dq, shared, gx, gy, 7)[0]) / 2e-6
        assert np.allclose(num, jl[..., k], rtol=1e-5, atol=1e-9)
    for k in range(pm.N_SHARED):
        ds = np.zeros(pm.N_SHARED)
        ds[k] = 1e-6
        num = (pm.trailed_model(q, shared + ds, gx, gy, 7)[0]
               - pm.trailed_model(q, shared - ds, gx, gy, 7)[0]) / 2e-6
        assert np.allclose(num, js[..., k], rtol=1e-5, atol=1e-9)


def test_moffat_model_integrates_to_its_flux():
    gx, gy = pm.sample_grid(60, 1)
    p = np.zeros((1, pm.N_PARAMS))
    p[0, 2] = 2.5
    p[0, 4:7] = pm.shape_params(np.array([4.0]), np.array([3.0]), np.array([20.0]), 3.0)[0]
    p[0, 7] = math.log(2.0)
    model, _ = pm.moffat_model(p, gx, gy, False)
    assert model.sum() == pytest.approx(2.5, rel=2e-3)  # beta 3 wings beyond 60 px: ~1e-3
    shape = pm.moffat_shape(p, n_sub=10 ** 6)
    assert shape["fwhm_major_px"][0] == pytest.approx(4.0) and shape["theta_deg"][0] == \
        pytest.approx(20.0)


def test_sparse_field_falls_back_to_fainter_stars(scene):
    s = scene(shape=(320, 320), n_stars=12, fwhm_px=3.0, flux=(2500.0, 3500.0), seed=24)
    src, star, res = run(s.image)
    assert ((src.snr > 15) & (src.snr < 30)).sum() >= 8  # most below min_snr = 30
    assert star.sum() >= 5 and (src.snr[star] >= 15).all()
    assert res.fwhm_px == pytest.approx(3.0, rel=0.05)  # faint stars: a few % noise
    strict = select_psf_stars(src, s.image.shape, PSFConfig(fallback_min_snr=30.0))
    assert strict.sum() < 5  # without the fallback: too few for a PSF


def test_independent_fits_recover_the_stars_in_float32():
    rng = np.random.default_rng(34)
    n, half, n_sub = 12, 8, 3
    gx64, gy64 = pm.sample_grid(half, n_sub)
    gx, gy = pm.sample_grid(half, n_sub, np.float32)
    p = np.zeros((n, pm.N_PARAMS))
    p[:, 0], p[:, 1], p[:, 2] = rng.uniform(-0.5, 0.5, n), rng.uniform(-0.5, 0.5, n), 1.0
    fwhm = rng.uniform(2.0, 4.0, n)
    p[:, 4:7] = pm.shape_params(fwhm * 1.1, fwhm, rng.uniform(0, 180, n), 3.0)
    p[:, 7] = math.log(2.0)
    truth, _ = pm.moffat_model(p, gx64, gy64, False)
    model32, _ = pm.moffat_model(p, gx, gy, False)
    assert model32.dtype == np.float32 and np.allclose(model32, truth, rtol=1e-5, atol=1e-8)
    start = p.copy()
    start[:, 4:6] += 0.25  # sizes 22% off
    start[:, 7] += 0.4
    fitted, chi2 = pm.fit_independent(lambda q: pm.moffat_model(q, gx, gy), truth,
                                      np.full(truth.shape, 1e4), start, max_iter=30,
                                      ftol=1e-10)
    got = pm.moffat_shape(fitted)["fwhm_minor_px"]
    assert np.allclose(got, pm.moffat_shape(p)["fwhm_minor_px"], rtol=1e-3)
    assert np.all(chi2 < 1e-3)
