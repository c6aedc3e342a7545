"""The exposure row of one detector, filled stage by stage.

:func:`summarize` starts from :func:`~survey_qa.pipeline.schema.empty_exposure_row` and
applies one small ``update_*`` helper per stage, so that every column is always there and
a quantity that cannot be measured stays NaN with a flag in ``qa_flags``. The class
columns are left to :mod:`.classify`.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from survey_qa.pipeline.flags import CUT_SHORT, SOURCE_FLAGS, bits
from survey_qa.pipeline.psf import (ELLIPTICITY_NOISE_SNR, FWHM_PER_HALF_LIGHT_RADIUS,
                                    coherent_elongation)
from survey_qa.pipeline.records import BackgroundResult, DetectorImage, FrameMeta, PSFResult
from survey_qa.pipeline.schema import empty_exposure_row
from survey_qa.pipeline.sources import saturated_pixels


def update_identity(row: dict, det: DetectorImage) -> dict:
    """Exposure, detector, file, HDU and image size."""
    ny, nx = det.data.shape
    row.update(exposure=det.exposure, detector=det.detector, path=str(det.path),
               hdu=int(det.hdu), n_detectors=int(det.n_detectors), nx=int(nx), ny=int(ny),
               status="ok", error="")
    return row


def update_meta(row: dict, meta: FrameMeta) -> dict:
    """Header facts (after configuration fallbacks)."""
    row.update(date_obs=meta.date_obs, mjd_obs=float(meta.mjd_obs),
               exptime_s=float(meta.exptime_s), filter=meta.filter,
               airmass=float(meta.airmass), object=meta.object, expnum=str(meta.expnum),
               ra_deg=float(meta.ra_deg), dec_deg=float(meta.dec_deg),
               gain_e_per_adu=float(meta.gain_e_per_adu),
               read_noise_e=float(meta.read_noise_e), saturate_adu=float(meta.saturate_adu),
               pixscale_arcsec=float(meta.pixscale_arcsec),
               pixscale_source=meta.pixscale_source)
    if meta.pixscale_source == "none" or not math.isfinite(meta.pixscale_arcsec):
        row["qa_flags"] |= bits("NO_PIXSCALE")
    return row


def update_background(row: dict, background: BackgroundResult) -> dict:
    """Sky level and noise (ADU) and non-uniformity ((P99 - P1) / median); a NaN
    non-uniformity (faint or subtracted sky) sets ``FAINT_SKY``."""
    row.update(sky_level=float(background.level), sky_noise=float(background.noise),
               sky_nonuniformity=float(background.nonuniformity))
    if not math.isfinite(background.nonuniformity):
        row["qa_flags"] |= bits("FAINT_SKY")
    return row


def update_psf(row: dict, psf: PSFResult, pixscale_arcsec: float) -> dict:
    """PSF size and shape; ``fwhm_arcsec`` is NaN (with ``NO_PIXSCALE``) without a scale."""
    scale_known = math.isfinite(pixscale_arcsec) and pixscale_arcsec > 0
    row.update(
        fwhm_px=float(psf.fwhm_px),
        fwhm_arcsec=float(psf.fwhm_px * pixscale_arcsec) if scale_known else math.nan,
        moffat_beta=float(psf.moffat_beta), ellipticity=float(psf.ellipticity),
        ellipticity_pa_deg=float(psf.pa_deg), elongation_coherence=float(psf.coherence),
        trail_ratio=float(psf.trail_ratio), n_stars_used=int(psf.n_used),
        fwhm_grid_px=[float(v) for v in psf.fwhm_grid_px],
        ellipticity_grid=[float(v) for v in psf.ellipticity_grid])
    row["qa_flags"] |= int(psf.qa_flags)
    if not scale_known:
        row["qa_flags"] |= bits("NO_PIXSCALE")
    return row


def update_sources(row: dict, sources: pd.DataFrame, det: DetectorImage) -> dict:
    """Detection count and the share of saturated pixels (NaN when saturation is unknown)."""
    row["n_sources"] = int(len(sources))
    if len(sources) == 0:
        row["qa_flags"] |= bits("NO_SOURCES")
    if sources.attrs.get("large_region_px", 0) > 0:
        row["qa_flags"] |= bits("LARGE_REGIONS_MASKED")
    level = det.meta.saturate_adu
    if math.isfinite(level):
        row["saturated_fraction"] = float(saturated_pixels(det.data, level).mean())
    return row


SHAPE_MIN_SNR = 20.0
"""Detections at least this bright enter the moment summary (``src_*`` columns)."""


def update_source_shapes(row: dict, sources: pd.DataFrame) -> dict:
    """Size and elongation of the bright detections from their moments (sep ``a``, ``b``,
    ``theta``, half-light radius), whether or not they pass the PSF-star cuts.

    Coarser than the PSF fit but there when it is not: long trails and doubled stars leave
    no PSF star but still have moments. NaN with fewer than 3 such detections.
    """
    if len(sources) == 0:
        return row
    flags = sources["flags"].to_numpy(np.int64)
    clean = (flags & bits(*CUT_SHORT, registry=SOURCE_FLAGS)) == 0
    use = clean & (sources["snr"].to_numpy(float) >= SHAPE_MIN_SNR)
    a, b = sources["a_px"].to_numpy(float)[use], sources["b_px"].to_numpy(float)[use]
    ok = (a > 0) & (b > 0)
    if ok.sum() < 3:
        return row
    e = 1.0 - b[ok] / a[ok]
    theta = np.deg2rad(sources["theta_deg"].to_numpy(float)[use][ok])
    rh = sources["flux_radius_px"].to_numpy(float)[use][ok]
    snr = sources["snr"].to_numpy(float)[use][ok]
    spin2 = e * np.exp(2j * theta)
    row.update(src_fwhm_px=float(FWHM_PER_HALF_LIGHT_RADIUS * np.nanmedian(rh)),
               src_ellipticity=float(np.median(e)),
               # S/N-weighted, noise removed: noise on round stars is not coherence.
               src_elongation_coherence=coherent_elongation(
                   spin2, ELLIPTICITY_NOISE_SNR / snr).coherence)
    return row


def summarize(det: DetectorImage, background: BackgroundResult, sources: pd.DataFrame,
              psf: PSFResult) -> dict:
    """The exposure row of one detector (every schema column; class columns untouched).

    Parameters
    ----------
    det
        The detector as read (identity, header facts, reader flags).
    background, sources, psf
        The results of the measurement stages.

    Returns
    -------
    dict
        A row of :data:`~survey_qa.pipeline.schema.EXPOSURE_SCHEMA` with ``status="ok"``;
        ``qa_flags`` is the OR of the reader's and the stages' flags.
    """
    row = empty_exposure_row()
    row["qa_flags"] = int(det.qa_flags)
    update_identity(row, det)
    update_meta(row, det.meta)
    update_background(row, background)
    update_sources(row, sources, det)
    update_source_shapes(row, sources)
    update_psf(row, psf, det.meta.pixscale_arcsec)
    return row
