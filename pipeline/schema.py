"""Fixed schemas of the catalogs.

Every column is always present; a quantity that cannot be measured is NaN (plus a bit
in ``qa_flags``), never a missing column. ``night`` is the Hive partition key: it lives
in the folder name ``night=YYYY-MM-DD`` and a dataset reader adds it back.
"""
from __future__ import annotations

import math

import pyarrow as pa

CLASSES = ("good", "bad_tracking", "very_bad_tracking", "bad_seeing", "background_issues")
"""Quality classes in the order of the contract's probability columns."""

PRIORITY = ("very_bad_tracking", "bad_tracking", "background_issues", "bad_seeing", "good")
"""The primary class is the first of these that applies (quality-classes.md)."""

TRACKING_FLAGS = ("none", "bad", "very_bad")

NAN = math.nan

EXPOSURE_SCHEMA = pa.schema([
    # identity
    ("exposure", pa.string()), ("detector", pa.string()), ("path", pa.string()),
    ("hdu", pa.int32()), ("n_detectors", pa.int32()),
    # header metadata (after configuration fallbacks)
    ("date_obs", pa.string()), ("mjd_obs", pa.float64()), ("exptime_s", pa.float64()),
    ("filter", pa.string()), ("airmass", pa.float64()), ("object", pa.string()),
    ("expnum", pa.string()), ("gain_e_per_adu", pa.float64()), ("read_noise_e", pa.float64()),
    ("saturate_adu", pa.float64()), ("pixscale_arcsec", pa.float64()),
    ("pixscale_source", pa.string()), ("nx", pa.int32()), ("ny", pa.int32()),
    ("image_type", pa.string()),  # light | bias | dark | flat | ... (header or content)
    # the decision
    ("quality_class", pa.string()),
    *[(f"p_{c}", pa.float64()) for c in CLASSES],
    ("flag_bad_seeing", pa.bool_()), ("flag_tracking", pa.string()),
    ("flag_background", pa.bool_()), ("classifier", pa.string()),
    ("reason", pa.string()),  # one line in words: the quantities and limits behind the class
    # PSF size and shape
    ("fwhm_arcsec", pa.float64()), ("fwhm_px", pa.float64()), ("moffat_beta", pa.float64()),
    ("ellipticity", pa.float64()), ("ellipticity_pa_deg", pa.float64()),
    ("elongation_coherence", pa.float64()), ("trail_ratio", pa.float64()),
    ("fwhm_grid_px", pa.list_(pa.float64())), ("ellipticity_grid", pa.list_(pa.float64())),
    # background
    ("sky_level", pa.float64()), ("sky_noise", pa.float64()), ("sky_nonuniformity", pa.float64()),
    # what the measurement rests on
    ("n_sources", pa.int32()), ("n_stars_used", pa.int32()),
    ("saturated_fraction", pa.float64()),
    # moments of the bright detections, PSF stars or not (there when the PSF fit is not)
    ("src_fwhm_px", pa.float64()), ("src_ellipticity", pa.float64()),
    ("src_elongation_coherence", pa.float64()),
    # autoencoder
    ("ae_score", pa.float64()), ("mask_fraction", pa.float64()),
    # outcome and provenance
    ("status", pa.string()), ("error", pa.string()), ("qa_flags", pa.int64()),
    ("pipeline_version", pa.string()), ("model_version", pa.string()),
    ("processed_at", pa.timestamp("s", tz="UTC")),
    ("t_read_s", pa.float64()), ("t_background_s", pa.float64()),
    ("t_sources_s", pa.float64()), ("t_psf_s", pa.float64()), ("t_stamps_s", pa.float64()),
    ("t_ae_s", pa.float64()),
    ("t_classify_s", pa.float64()), ("t_total_s", pa.float64()),
])

SOURCE_SCHEMA = pa.schema([
    ("exposure", pa.string()), ("detector", pa.string()), ("id", pa.int32()),
    ("x", pa.float64()), ("y", pa.float64()),  # 0-based pixel coordinates, numpy convention
    ("flux", pa.float64()), ("flux_err", pa.float64()), ("peak", pa.float64()),
    ("snr", pa.float64()), ("a_px", pa.float64()), ("b_px", pa.float64()),
    ("theta_deg", pa.float64()), ("flux_radius_px", pa.float64()),
    ("fwhm_px", pa.float64()), ("ellipticity", pa.float64()), ("flags", pa.int64()),
])


def empty_exposure_row() -> dict:
    """A row with every column set to its 'not measured' value (NaN, '', 0 or None)."""
    row = {}
    for f in EXPOSURE_SCHEMA:
        if pa.types.is_floating(f.type):
            row[f.name] = NAN
        elif pa.types.is_integer(f.type):
            row[f.name] = 0
        elif pa.types.is_string(f.type):
            row[f.name] = ""
        elif pa.types.is_boolean(f.type):
            row[f.name] = False
        else:
            row[f.name] = None
    row["flag_tracking"] = "none"
    return row


def rows_to_table(rows: list[dict], schema: pa.Schema = EXPOSURE_SCHEMA) -> pa.Table:
    """Rows (dicts) to a table with exactly ``schema``; unknown keys are an error."""
    names = set(schema.names)
    for r in rows:
        extra = set(r) - names
        if extra:
            raise ValueError(f"columns not in the schema: {sorted(extra)}")
    return pa.Table.from_pylist(rows, schema=schema)
