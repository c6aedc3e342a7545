"""The exposure row of one detector, stage by stage."""
import math

import numpy as np
import pytest

from survey_qa.config import BackgroundConfig, PSFConfig, SourcesConfig
from survey_qa.pipeline import background, psf, sources
from survey_qa.pipeline.features import summarize
from survey_qa.pipeline.flags import bits, decode_flags
from survey_qa.pipeline.records import DetectorImage, FrameMeta
from survey_qa.pipeline.schema import EXPOSURE_SCHEMA, rows_to_table


def detector(image, pixscale=math.nan, saturate=math.nan, flags=0):
    meta = FrameMeta(pixscale_arcsec=pixscale, saturate_adu=saturate,
                     pixscale_source="keyword" if math.isfinite(pixscale) else "none")
    return DetectorImage(exposure="e1", detector="0", hdu=0, path="/x/e1.fits", data=image,
                         mask=np.zeros(image.shape, bool), meta=meta, qa_flags=flags)


def measure(det):
    bkg = background.measure_background(det.data, det.mask, BackgroundConfig(box_px=64))
    src = sources.extract_sources(det.data, bkg, det.mask, SourcesConfig(), det.meta.saturate_adu)
    star = psf.select_psf_stars(src, det.data.shape, PSFConfig())
    return summarize(det, bkg, src, psf.measure_psf(det.data, bkg, src, star, PSFConfig()))


def test_row_with_a_pixel_scale(scene):
    s = scene(shape=(256, 256), n_stars=20, fwhm_px=3.0, seed=31)
    img = s.image.copy()
    img[:2, :50] = 60000.0
    row = measure(detector(img, pixscale=0.25, saturate=60000.0, flags=bits("HEADER_FALLBACK")))
    assert row["fwhm_arcsec"] == pytest.approx(0.75, rel=0.03)
    assert row["fwhm_px"] == pytest.approx(3.0, rel=0.03)
    assert row["n_sources"] >= 20 and row["n_stars_used"] >= 10
    assert row["saturated_fraction"] == pytest.approx(100 / 256 ** 2)
    assert row["sky_level"] == pytest.approx(100.0, rel=0.01)
    assert row["status"] == "ok" and row["exposure"] == "e1" and row["nx"] == 256
    assert decode_flags(row["qa_flags"]) == ["HEADER_FALLBACK"]
    assert row["quality_class"] == "" and len(row["fwhm_grid_px"]) == 9
    rows_to_table([row], EXPOSURE_SCHEMA)


def test_no_scale_and_no_stars():
    img = np.random.default_rng(32).normal(100, 5, (128, 128)).astype(np.float32)
    row = measure(detector(img))
    assert math.isnan(row["fwhm_arcsec"]) and math.isnan(row["fwhm_px"])
    assert math.isnan(row["saturated_fraction"])
    assert {"NO_PIXSCALE", "NO_SOURCES", "FEW_STARS"} <= set(decode_flags(row["qa_flags"]))
    rows_to_table([row], EXPOSURE_SCHEMA)


def test_source_shapes_from_moments_even_without_psf_stars():
    import pandas as pd

    from survey_qa.pipeline.features import update_source_shapes
    from survey_qa.pipeline.flags import SOURCE_FLAGS

    n = 12
    src = pd.DataFrame({"a_px": np.full(n, 4.0), "b_px": np.full(n, 2.0),
                        "theta_deg": np.full(n, 30.0), "flux_radius_px": np.full(n, 2.26),
                        "snr": np.full(n, 50.0), "flags": np.zeros(n, np.int64)})
    row = update_source_shapes({}, src)
    assert row["src_ellipticity"] == pytest.approx(0.5)
    assert row["src_elongation_coherence"] == pytest.approx(1.0)
    assert row["src_fwhm_px"] == pytest.approx(4.0, rel=1e-3)
    random = src.assign(theta_deg=np.linspace(0, 180, n, endpoint=False))
    assert update_source_shapes({}, random)["src_elongation_coherence"] < 0.05
    saturated = src.assign(flags=SOURCE_FLAGS["SATURATED"].value)
    assert update_source_shapes({}, saturated) == {}  # too few usable: left unset (NaN)
