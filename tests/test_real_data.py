"""The nightly job on real frames and real nights (``../shared/``; skipped when absent).

There are no labels: these tests check what a person can check by looking. Every light
frame where stars are visible gets finite sky, noise, FWHM and ellipticity; the sky agrees
with a clipped median of the frame's pixels; FWHM varies smoothly between consecutive frames
of one sequence; calibration frames get an outcome of their own; no row is ``ok`` with
placeholder values; every row says why.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.stats import sigma_clipped_stats
from scipy import ndimage

from survey_qa.config import load_config
from survey_qa.pipeline import io
from survey_qa.pipeline.flags import decode_flags
from survey_qa.pipeline.schema import CLASSES

SHARED = Path(os.environ.get("SURVEY_QA_SHARED",
                             Path(__file__).resolve().parents[2] / "shared"))
NIGHTS = {  # a night folder name for each real sequence
    "2018-10-12": "real-nights/cminsky__asteroid2713",
    "2019-03-26": "real-nights/LowellObservatory__DeadParrots",
    "2018-07-29": "real-nights/mommermi__cloudynight",
    "2020-01-01": "real-frames",
}

pytestmark = [pytest.mark.realdata, pytest.mark.slow,
              pytest.mark.skipif(not all((SHARED / p).is_dir() for p in NIGHTS.values()),
                                 reason="../shared/real-nights and real-frames are absent")]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """Every real night through the default nightly job (shipped models), one catalog."""
    from survey_qa.flows.nightly import run_night

    raw = tmp_path_factory.mktemp("raw")
    out = tmp_path_factory.mktemp("out")
    for night, folder in NIGHTS.items():
        (raw / night).symlink_to(SHARED / folder, target_is_directory=True)
    cfg = load_config(overrides={"run": {"raw_root": str(raw), "out_root": str(out),
                                         "progress": False},
                                 "cluster": {"workers": 2}})
    for night in NIGHTS:
        run_night(cfg, night, echo=lambda *a, **k: None)
    table = pd.read_parquet(out / "catalogs" / "exposures")
    table["night"] = table["night"].astype(str)
    return table


def _detectors(table: pd.DataFrame) -> pd.DataFrame:
    return table[table.detector != "ALL"]


def _stars_visible(path: str) -> bool:
    """An independent look: at least 10 compact peaks 10 sigma above a clipped sky."""
    det = io.read_detectors(path, load_config().io)[0]
    if not hasattr(det, "data"):
        return False
    _, median, std = sigma_clipped_stats(det.data, mask=det.mask, sigma=3.0, maxiters=5)
    hot = ~det.mask & (det.data - median > 10 * std)
    labels, n = ndimage.label(hot)
    if n == 0:
        return False
    sizes = ndimage.sum(hot, labels, index=np.arange(1, n + 1))
    return int(((sizes >= 3) & (sizes <= 400)).sum()) >= 10


def test_every_file_has_a_row(catalog):
    for night, folder in NIGHTS.items():
        files = io.discover_night(SHARED, folder)
        rows = catalog[catalog.night == night]
        assert set(rows.exposure) == {io.exposure_id(p) for p in files}


def test_calibration_frames_get_their_own_outcome(catalog):
    calib = catalog[catalog.path.str.contains(r"\.(?:Bias|Dark)\.")]
    assert len(calib) == 2
    assert (calib.status == "failed").all()
    assert calib.error.str.startswith("calibration frame").all()
    assert set(calib.image_type) == {"bias", "dark"}


def test_no_ok_row_with_placeholders(catalog):
    ok = _detectors(catalog[catalog.status == "ok"])
    assert len(ok) > 60
    assert (ok.sky_noise > 0).all()
    assert not ((ok.sky_level == 0) & (ok.sky_noise == 1)).any()  # sep's silent failure
    assert ok.quality_class.isin(CLASSES).all()
    probs = ok[[f"p_{c}" for c in CLASSES]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert (ok.reason.str.len() > 10).all()
    no_psf = ~np.isfinite(ok.fwhm_px)
    flags = ok.qa_flags.map(decode_flags)
    # no PSF fit: the row says so and its class is not confident
    assert flags[no_psf].map(lambda f: "NO_STARS" in f or "NO_PSF_FIT" in f).all()
    assert (probs[no_psf.to_numpy()].max(axis=1) < 0.8).all()


def test_frames_with_visible_stars_are_measured(catalog):
    ok = _detectors(catalog[(catalog.status == "ok")])
    checked = 0
    for row in ok.itertuples():
        if not _stars_visible(row.path):
            continue
        checked += 1
        for column in ("sky_level", "sky_noise"):
            assert math.isfinite(getattr(row, column)), (row.exposure, column)
        flags = decode_flags(row.qa_flags)
        if "NO_PSF_FIT" in flags:  # then the bright detections' moments, said so
            assert math.isfinite(row.src_fwhm_px) and math.isfinite(row.src_ellipticity)
            continue
        assert math.isfinite(row.fwhm_px) and math.isfinite(row.ellipticity), row.exposure
        assert row.fwhm_px >= 1.0 or "UNDERSAMPLED" in flags
    assert checked >= 40


def test_sky_agrees_with_a_clipped_median(catalog):
    ok = _detectors(catalog[catalog.status == "ok"])
    cfg = load_config().io
    for row in ok.itertuples():
        det = io.read_detectors(row.path, cfg)[0]
        _, median, std = sigma_clipped_stats(det.data, mask=det.mask, sigma=3.0, maxiters=10)
        # the clipped median keeps faint wings and vignetting: a few per cent, a few sigma
        assert abs(row.sky_level - median) <= max(0.05 * abs(median), 3 * std), row.exposure


def test_pixel_scales_from_the_headers(catalog):
    def scale(night):
        rows = _detectors(catalog[(catalog.night == night) & (catalog.status == "ok")])
        return rows.pixscale_arcsec

    assert scale("2018-10-12").between(1.25, 1.28).all()  # XPIXSZ / FOCALLEN
    assert scale("2019-03-26").between(1.10, 1.12).all()  # CD matrix
    assert scale("2018-07-29").isna().all()  # all-sky camera: no scale in its headers


def test_fwhm_varies_smoothly_through_a_sequence(catalog):
    """Consecutive science frames of one sequence (not the focus runs): the seeing
    changes, but not by a factor from one frame to the next."""
    for night in ("2018-10-12", "2019-03-26"):
        rows = _detectors(catalog[(catalog.night == night) & (catalog.status == "ok")])
        rows = rows[~rows.path.str.contains("Focus")].sort_values("mjd_obs")
        rows = rows[np.isfinite(rows.fwhm_px)]
        assert len(rows) >= 8
        ratio = np.abs(np.diff(np.log(rows.fwhm_px.to_numpy())))
        assert np.median(ratio) < math.log(1.2), night
        assert ratio.max() < math.log(2.0), night


def test_tracking_is_never_read_as_seeing(catalog):
    ok = _detectors(catalog[catalog.status == "ok"])
    coherent = ok[(ok.elongation_coherence >= 0.9) & (ok.ellipticity >= 0.25)]
    assert not coherent.quality_class.isin(["good", "bad_seeing"]).any()
