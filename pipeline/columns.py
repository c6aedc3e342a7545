"""Every catalog column, declared once.

A :class:`Column` gives a column's name, Arrow type, unit, how the exposure row of a
mosaic (``detector = "ALL"``) combines it over the detectors, and a one-line doc.
:mod:`.schema` makes the Parquet schemas, the empty row and ``docs/columns.md`` from
these declarations; :func:`~survey_qa.pipeline.classify.combine_detectors` makes the
mosaic row from them. A new column is one line here (then regenerate
``docs/columns.md`` with ``python -m survey_qa.pipeline.schema --markdown``).

The quality classes and the tracking flag values are the levels of the ``quality_class``
and ``flag_tracking`` columns and live here too.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pyarrow as pa

CLASSES = ("good", "bad_tracking", "very_bad_tracking", "bad_seeing", "background_issues")
"""Quality classes in the order of the contract's probability columns."""

PRIORITY = ("very_bad_tracking", "bad_tracking", "background_issues", "bad_seeing", "good")
"""The primary class is the first of these that applies (quality-classes.md)."""

TRACKING_FLAGS = ("none", "bad", "very_bad")
"""Values of ``flag_tracking``, from the best to the worst."""

MOSAIC_RULES = {
    "first": "the first detector's value",
    "median": "median of the detectors' finite values (NaN when there is none)",
    "sum": "sum over the detectors (of the finite values, for floats)",
    "mean": "mean over the detectors",
    "or": "bitwise OR over the detectors",
    "worst": "the worst level held by at least a quarter of the detectors "
             "(levels listed worst first), else the last level",
    "decided": "set by the mosaic itself (classify.combine_detectors)",
    "none": "per detector only: the not-measured value (NaN, '', an empty list)",
}
"""How the exposure row of a mosaic combines a column over its detectors."""


@dataclass(frozen=True)
class Column:
    """One catalog column.

    Attributes
    ----------
    name
        Column name.
    type
        Arrow type in the Parquet file.
    unit
        Physical unit ('' for none).
    doc
        One line: what the column holds.
    mosaic
        Key of :data:`MOSAIC_RULES` (exposure catalog only; '' in the source catalog).
    group
        The heading it is listed under in the documentation.
    levels
        The values it may take, worst first, for the ``worst`` mosaic rule.
    empty
        Its not-measured value when that is not the type's (NaN, 0, '', False, None).
    """

    name: str
    type: pa.DataType
    unit: str
    doc: str
    mosaic: str = ""
    group: str = ""
    levels: tuple = ()
    empty: object = None


def grouped(group: str, *columns: Column) -> tuple[Column, ...]:
    """``columns`` with their ``group`` set."""
    return tuple(dataclasses.replace(c, group=group) for c in columns)


FLOAT, INT32, INT64, STRING, BOOL = pa.float64(), pa.int32(), pa.int64(), pa.string(), pa.bool_()
FLOAT_LIST = pa.list_(pa.float64())

EXPOSURE_COLUMNS: tuple[Column, ...] = (
    *grouped(
        "identity",
        Column("exposure", STRING, "", "exposure id: the file name without its FITS suffixes",
               "first"),
        Column("detector", STRING, "", "detector (extension name); ALL for a mosaic's "
               "exposure row", "decided"),
        Column("path", STRING, "", "the file read", "first"),
        Column("hdu", INT32, "", "HDU index of the detector; -1 for a mosaic's exposure row",
               "decided"),
        Column("n_detectors", INT32, "", "detectors in the file", "decided"),
    ),
    *grouped(
        "header (after configuration fallbacks)",
        Column("date_obs", STRING, "", "DATE-OBS, ISO 8601", "first"),
        Column("mjd_obs", FLOAT, "d", "modified Julian date of the exposure start", "first"),
        Column("exptime_s", FLOAT, "s", "exposure time", "first"),
        Column("filter", STRING, "", "filter name", "first"),
        Column("airmass", FLOAT, "", "airmass", "first"),
        Column("object", STRING, "", "OBJECT keyword", "first"),
        Column("ra_deg", FLOAT, "deg", "right ascension of the detector centre (celestial "
               "WCS), else of the pointing keywords (RA, OBJCTRA, TELRA); NaN when unknown",
               "first"),
        Column("dec_deg", FLOAT, "deg", "declination, as ra_deg", "first"),
        Column("expnum", STRING, "", "exposure number", "first"),
        Column("gain_e_per_adu", FLOAT, "e-/ADU", "gain", "first"),
        Column("read_noise_e", FLOAT, "e-", "read noise", "first"),
        Column("saturate_adu", FLOAT, "ADU", "saturation level (header, or inferred from "
               "the data: SATURATION_INFERRED)", "first"),
        Column("pixscale_arcsec", FLOAT, "arcsec/px", "pixel scale; NaN when unknown "
               "(NO_PIXSCALE)", "first"),
        Column("pixscale_source", STRING, "", "where the pixel scale came from: wcs | "
               "keyword | config | none", "first"),
        Column("nx", INT32, "px", "image width", "first"),
        Column("ny", INT32, "px", "image height", "first"),
        Column("image_type", STRING, "", "light | bias | dark | flat | ... (header or "
               "content)", "first"),
    ),
    *grouped(
        "decision",
        Column("quality_class", STRING, "", "the primary quality class", "worst",
               levels=PRIORITY),
        *(Column(f"p_{c}", FLOAT, "", f"probability of {c}", "mean") for c in CLASSES),
        Column("flag_bad_seeing", BOOL, "", "FWHM past the seeing limit", "worst",
               levels=(True, False)),
        Column("flag_tracking", STRING, "", "tracking defect: none | bad | very_bad",
               "worst", levels=TRACKING_FLAGS[::-1], empty="none"),
        Column("flag_background", BOOL, "", "sky non-uniformity, or cloud seen against the "
               "field's other frames (qa flag CLOUD), at or past its limit", "worst",
               levels=(True, False)),
        Column("classifier", STRING, "", "what decided the class: rules | cnn", "first"),
        Column("reason", STRING, "", "one line in words: the quantities and limits behind "
               "the class", "decided"),
    ),
    *grouped(
        "PSF size and shape",
        Column("fwhm_arcsec", FLOAT, "arcsec", "PSF FWHM (seeing); NaN without a pixel "
               "scale", "median"),
        Column("fwhm_px", FLOAT, "px", "PSF FWHM", "median"),
        Column("moffat_beta", FLOAT, "", "Moffat beta of the PSF fit", "median"),
        Column("ellipticity", FLOAT, "", "PSF ellipticity 1 - b/a", "median"),
        Column("ellipticity_pa_deg", FLOAT, "deg", "position angle of the major axis, from "
               "+x towards +y, in [0, 180)", "median"),
        Column("elongation_coherence", FLOAT, "", "0: elongation directions random over the "
               "field, 1: all the same", "median"),
        Column("trail_ratio", FLOAT, "", "trail length over seeing FWHM, T/s", "median"),
        Column("fwhm_grid_px", FLOAT_LIST, "px", "FWHM per region, grid x grid, row-major "
               "from the (0, 0) corner", "none"),
        Column("ellipticity_grid", FLOAT_LIST, "", "ellipticity per region, as "
               "fwhm_grid_px", "none"),
    ),
    *grouped(
        "background",
        Column("sky_level", FLOAT, "ADU", "median sky", "median"),
        Column("sky_noise", FLOAT, "ADU", "RMS of the sky noise", "median"),
        Column("sky_nonuniformity", FLOAT, "", "(P99 - P1) / median of the smooth sky",
               "median"),
    ),
    *grouped(
        "what the measurement rests on",
        Column("n_sources", INT32, "", "detections above the threshold", "sum"),
        Column("n_stars_used", INT32, "", "stars used for the PSF", "sum"),
        Column("saturated_fraction", FLOAT, "", "share of pixels at or above saturate_adu",
               "median"),
    ),
    *grouped(
        "moments of the bright detections (there when the PSF fit is not)",
        Column("src_fwhm_px", FLOAT, "px", "FWHM from the half-light radii", "median"),
        Column("src_ellipticity", FLOAT, "", "median ellipticity 1 - b/a", "median"),
        Column("src_elongation_coherence", FLOAT, "", "direction coherence of their "
               "elongation", "median"),
    ),
    *grouped(
        "sequence: the frame against the night's other frames of its field",
        Column("field", STRING, "", "the field group: frames of one detector geometry and "
               "filter pointed at the same sky (WCS, pointing keywords, OBJECT or matched "
               "star patterns); '' when the frame's field has no other frame", "first"),
        Column("field_reference", STRING, "", "the field's reference exposure (most "
               "well-measured stars), against which stars are matched", "first"),
        Column("n_matched_stars", INT32, "", "stars matched to the reference frame", "sum"),
        Column("transparency_mag", FLOAT, "mag", "median magnitude offset of the matched "
               "stars (flux per second) from the field's most transparent frames: ~0 clear, "
               "positive dimmer (cloud, haze, airmass)", "median"),
        Column("extinction_spread_mag", FLOAT, "mag", "k: P99 - P1 of the smooth map of "
               "the per-star offsets over the detector, with the part photometric noise "
               "explains removed (patchy cloud)", "median"),
        Column("star_count_ratio", FLOAT, "", "well-measured stars over the reference "
               "frame's", "median"),
        Column("shift_x_px", FLOAT, "px", "where the reference frame's detector centre lies "
               "in this frame, minus the centre: x (guiding drift, re-pointing)", "median"),
        Column("shift_y_px", FLOAT, "px", "as shift_x_px, y", "median"),
        Column("rotation_deg", FLOAT, "deg", "rotation of the sky on the detector against "
               "the reference frame, from +x towards +y", "median"),
        Column("fwhm_rel", FLOAT, "", "fwhm_px over the median fwhm_px of the field's "
               "frames (the seeing and focus trend)", "median"),
        Column("defect_mask_fraction", FLOAT, "", "share of the detector where the sky is "
               "damaged: added light over 5% of its clean level or extinction 0.1 mag over "
               "its clearest part, against the field's other frames, with the autoencoder's "
               "mask (arrays: defect_mask)", "median"),
    ),
    *grouped(
        "autoencoder",
        Column("ae_score", FLOAT, "", "mean patch reconstruction error over the reference "
               "frames' median", "median"),
        Column("mask_fraction", FLOAT, "", "share of the detector masked as damaged",
               "median"),
    ),
    *grouped(
        "outcome and provenance",
        Column("status", STRING, "", "ok | failed", "decided"),
        Column("error", STRING, "", "why a failed row failed", "decided"),
        Column("qa_flags", INT64, "", "exposure flag bits (see below)", "or"),
        Column("pipeline_version", STRING, "", "survey-qa version", "first"),
        Column("model_version", STRING, "", "versions of the learned models used", "first"),
        Column("processed_at", pa.timestamp("s", tz="UTC"), "", "when the row was written",
               "none"),
    ),
    *grouped(
        "stage times",
        Column("t_read_s", FLOAT, "s", "reading (the file's time shared by its detectors)",
               "sum"),
        Column("t_background_s", FLOAT, "s", "background stage", "sum"),
        Column("t_sources_s", FLOAT, "s", "source stage", "sum"),
        Column("t_psf_s", FLOAT, "s", "PSF stage", "sum"),
        Column("t_stamps_s", FLOAT, "s", "stamp cutting", "sum"),
        Column("t_ae_s", FLOAT, "s", "autoencoder scoring", "sum"),
        Column("t_classify_s", FLOAT, "s", "classification", "sum"),
        Column("t_total_s", FLOAT, "s", "the whole file, reading included", "sum"),
    ),
)
"""Columns of the exposure catalog, in file order."""

SOURCE_COLUMNS: tuple[Column, ...] = grouped(
    "sources",
    Column("exposure", STRING, "", "exposure id"),
    Column("detector", STRING, "", "detector"),
    Column("id", INT32, "", "detection number within the detector"),
    Column("x", FLOAT, "px", "windowed centroid, 0-based column (numpy convention)"),
    Column("y", FLOAT, "px", "windowed centroid, 0-based row (numpy convention)"),
    Column("flux", FLOAT, "ADU", "Kron (AUTO) aperture flux"),
    Column("flux_err", FLOAT, "ADU", "error of flux"),
    Column("peak", FLOAT, "ADU", "peak of the sky-subtracted pixels"),
    Column("snr", FLOAT, "", "flux / flux_err"),
    Column("a_px", FLOAT, "px", "semi-major axis of the isophotal shape (sep)"),
    Column("b_px", FLOAT, "px", "semi-minor axis of the isophotal shape (sep)"),
    Column("theta_deg", FLOAT, "deg", "position angle of the major axis (sep), from +x towards +y"),
    Column("flux_radius_px", FLOAT, "px", "half-light radius"),
    Column("fwhm_px", FLOAT, "px", "PSF-fit FWHM (NaN when not fitted)"),
    Column("ellipticity", FLOAT, "", "PSF-fit ellipticity (NaN when not fitted)"),
    Column("flags", INT64, "", "source flag bits (see below)"),
)
"""Columns of the source catalog, in file order."""
