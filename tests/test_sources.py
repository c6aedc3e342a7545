"""Source extraction: positions, fluxes, flags, saturation, sep overflows."""
import math

import numpy as np
import pytest
import sep

from survey_qa.config import BackgroundConfig, SourcesConfig
from survey_qa.pipeline import sources as sources_mod
from survey_qa.pipeline.background import measure_background
from survey_qa.pipeline.errors import QualityError
from survey_qa.pipeline.flags import SOURCE_FLAGS
from survey_qa.pipeline.schema import SOURCE_SCHEMA
from survey_qa.pipeline.sources import configure_sep, extract_sources

NAN = math.nan


def measure(image, saturate=NAN, mask=None, **cfg):
    bkg = measure_background(image, mask, BackgroundConfig(box_px=64))
    return extract_sources(image, bkg, mask, SourcesConfig(**cfg), saturate)


def match(src, s):
    d = np.hypot(src.x.to_numpy()[:, None] - s.x[None], src.y.to_numpy()[:, None] - s.y[None])
    return d.argmin(axis=1), d.min(axis=1)


def test_every_star_is_found_where_it_is(scene):
    s = scene(shape=(256, 256), n_stars=25, fwhm_px=3.0, seed=1)
    src = measure(s.image)
    expected = [c for c in SOURCE_SCHEMA.names if c not in ("exposure", "detector")]
    assert list(src.columns) == expected
    assert len(src) == len(s.x)
    j, dist = match(src, s)
    assert len(set(j)) == len(s.x)
    assert np.median(dist) < 0.05 and dist.max() < 0.3  # windowed centroids, 0-based
    ratio = src.flux.to_numpy() / s.flux[j]
    assert np.median(ratio) == pytest.approx(0.95, abs=0.04)  # a Kron aperture misses wings
    assert (np.diff(src.flux.to_numpy()) <= 0).all()  # brightest first
    assert list(src.id) == list(range(len(src)))
    assert src.fwhm_px.isna().all() and src.ellipticity.isna().all()
    assert (src.snr > 5).all() and (src["flags"] == 0).all()
    assert src.flux_radius_px.median() == pytest.approx(0.63 * 3.0 * 1.0, rel=0.15)


def test_saturated_star_is_flagged(scene):
    s = scene(shape=(256, 256), positions=([60.0, 180.0, 120.0], [60.0, 180.0, 200.0]),
              fluxes=[3e6, 5e4, 5e4], fwhm_px=3.0, seed=2, saturate=20000.0)
    img = s.image
    mask = img >= 20000.0
    assert mask.any()
    src = measure(img, saturate=20000.0, mask=mask)
    sat = (src["flags"].to_numpy() & SOURCE_FLAGS["SATURATED"].value) > 0
    j, dist = match(src, s)
    assert sat[j == 0].all() and not sat[j != 0].any()


def test_max_sources_keeps_the_brightest(scene):
    s = scene(shape=(256, 256), n_stars=25, seed=3)
    everything = measure(s.image)
    top = measure(s.image, max_sources=10)
    assert len(top) == 10
    assert np.allclose(np.sort(top.flux)[::-1], everything.flux[:10])


def test_pure_noise_gives_an_empty_table():
    img = np.random.default_rng(4).normal(100, 5, (128, 128)).astype(np.float32)
    src = measure(img)
    assert len(src) == 0 and "flux_radius_px" in src.columns


def test_overflow_grows_the_pixel_stack_then_raises_the_threshold(scene, monkeypatch):
    s = scene(shape=(128, 128), n_stars=5, seed=5)
    real = sep.extract
    calls = []

    def flaky(data, thresh, **kw):
        calls.append((thresh, sep.get_extract_pixstack()))
        if len(calls) <= 3:
            raise Exception("internal pixel buffer full: The limit of active pixels")
        return real(data, thresh, **kw)

    monkeypatch.setattr(sources_mod.sep, "extract", flaky)
    start = sources_mod.START_PIXSTACK
    sep.set_extract_pixstack(start)  # as a fresh process has it
    src = measure(s.image, thresh_sigma=5.0, pixstack=2 * start)
    # The stack grows up to the configured ceiling at the same threshold, then the
    # threshold doubles; the grown stack stays for the next frames.
    assert calls == [(5.0, start), (5.0, 2 * start), (10.0, 2 * start), (20.0, 2 * start)]
    assert src.attrs["thresh_sigma"] == 20.0 and len(src) > 0
    configure_sep(SourcesConfig(pixstack=2 * start))
    assert sep.get_extract_pixstack() == 2 * start
    configure_sep(SourcesConfig())


def test_unresolvable_overflow_is_a_quality_error(scene, monkeypatch):
    s = scene(shape=(128, 128), n_stars=5, seed=6)

    def always(data, thresh, **kw):
        raise Exception("object deblending overflow")

    monkeypatch.setattr(sources_mod.sep, "extract", always)
    with pytest.raises(QualityError, match="source extraction failed"):
        measure(s.image)


def test_configure_sep_sets_the_process_state_once():
    cfg = SourcesConfig(pixstack=1_234_567)
    sep.set_extract_pixstack(10_000_000)  # above this configuration's ceiling
    configure_sep(cfg)
    assert sep.get_extract_pixstack() == sources_mod.START_PIXSTACK
    configure_sep(cfg)  # idempotent
    assert sep.get_extract_pixstack() == sources_mod.START_PIXSTACK
    configure_sep(SourcesConfig(pixstack=100_000))  # a ceiling below the start size
    assert sep.get_extract_pixstack() == 100_000
    assert sep.get_sub_object_limit() >= sources_mod.SUB_OBJECT_LIMIT
    configure_sep(SourcesConfig())


def test_a_large_bright_region_is_masked_and_the_stars_around_it_are_found(scene):
    """A nebula-sized region above the threshold (here a disk of 160 px radius, smooth on
    the mesh scale as a horizon glow or the Milky Way is not) is masked before detection
    and flagged; the stars outside it are detected as before."""
    s = scene(shape=(768, 768), n_stars=40, fwhm_px=3.0, seed=4)
    yy, xx = np.mgrid[0:768, 0:768]
    region = np.hypot(xx - 200.0, yy - 200.0) < 160
    image = s.image + np.where(region, 200.0, 0.0).astype(np.float32)
    src = measure(image)
    assert src.attrs["large_region_px"] >= 0.95 * region.sum()
    assert not region[src.y.round().astype(int), src.x.round().astype(int)].any()
    outside = ~region[s.y.round().astype(int), s.x.round().astype(int)]
    near_edge = np.hypot(s.x - 200.0, s.y - 200.0) < 160 + 12
    j, dist = match(src, s)
    found = set(j[dist < 1.0])
    assert all(i in found for i in np.flatnonzero(outside & ~near_edge))

    plain = measure(s.image)
    assert plain.attrs["large_region_px"] == 0
