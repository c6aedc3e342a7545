"""One registry of every flag bit survey-qa writes.

Exposure rows carry ``qa_flags`` (:data:`EXPOSURE_FLAGS`): the readers', the stages' and
the decision's bits alike; source rows carry ``flags`` (:data:`SOURCE_FLAGS`). Every bit
is declared here once, with its doc; code sets and tests bits by name (:func:`bits`),
never by number. sep's own object flags are translated here, at the wrapper boundary, so
that nothing downstream depends on sep's bit values. A new bit is one line here (then
regenerate ``docs/columns.md``: ``python -m survey_qa.pipeline.schema --markdown``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Flag:
    """One flag bit: its position, name and what it means."""

    bit: int
    name: str
    doc: str

    @property
    def value(self) -> int:
        """The integer with only this bit set."""
        return 1 << self.bit


def flag_registry(*flags: Flag) -> dict[str, Flag]:
    """Flags by name; a bit or a name declared twice is an error."""
    for attr in ("bit", "name"):
        seen = [getattr(f, attr) for f in flags]
        twice = sorted({v for v in seen if seen.count(v) > 1})
        if twice:
            raise ValueError(f"flag {attr}s declared twice: {twice}")
    return {f.name: f for f in flags}


EXPOSURE_FLAGS = flag_registry(
    Flag(0, "NO_PIXSCALE", "pixel scale unknown: sizes are in pixels, arcsec columns are NaN"),
    Flag(1, "HEADER_FALLBACK", "a header keyword was missing and the configuration value used"),
    Flag(2, "NO_SOURCES", "no source above the detection threshold"),
    Flag(3, "FEW_STARS", "fewer PSF stars than psf.min_stars: PSF quantities are NaN"),
    Flag(4, "PSF_FIT_FAILED", "PSF fits did not converge for enough stars"),
    Flag(5, "SATURATED_LARGE", "more than 5% of pixels saturated"),
    Flag(6, "SATURATION_INFERRED", "saturation level taken from the data, not the header"),
    Flag(7, "BAYER_BINNED", "colour-filter-array frame binned 2x2 before measuring"),
    Flag(8, "OVERSCAN_TRIMMED", "overscan trimmed with DATASEC/TRIMSEC"),
    Flag(9, "UNDERSAMPLED", "PSF FWHM under 2 pixels"),
    Flag(10, "AE_UNAVAILABLE", "no autoencoder weights: ae_score and mask_fraction are NaN"),
    Flag(11, "NONFINITE_PIXELS", "NaN or infinite pixels were masked"),
    Flag(12, "DOUBLED_STARS", "every star is seen twice (a pointing jump): the PSF was "
                              "measured on the pairs"),
    Flag(13, "FAINT_SKY", "sky level below its per-pixel noise (sky-subtracted or read-noise "
                          "dominated): sky_nonuniformity is NaN"),
    Flag(14, "NO_STARS", "no star measured (no PSF fit, no bright detection): the class "
                         "is background_issues at low confidence"),
    Flag(15, "NO_PSF_FIT", "no PSF fit: the class rests on the bright detections' moments "
                           "and its probabilities are drawn towards uniform"),
    Flag(16, "CNN_OUT_OF_DOMAIN", "the row lies outside the learned model's training "
                                  "domain: the rules decided"),
    Flag(17, "SKY_FALLBACK", "the sep mesh sky failed its check against the source-free "
                             "pixels: the sky is the sigma-clipped median of each mesh"),
    Flag(18, "SKY_UNMEASURED", "too little source-free sky for a sky map: sky level and noise "
                               "are clipped statistics of all pixels, sky_nonuniformity NaN"),
    Flag(19, "FLAT_FIELDED", "divided by the configured flat field before measuring"),
    Flag(20, "ILLUMINATION_NIGHT", "sky_nonuniformity measured after dividing the sky by the "
                                   "illumination pattern learnt from the night's frames"),
    Flag(21, "UNEXPOSED_MASKED", "rows or columns at the bias level (no light) found in the "
                                 "data and masked"),
    Flag(22, "ARRAYS_SKIPPED", "the detector is larger than the night's array store: its "
                               "arrays were not written (the row is whole)"),
    Flag(23, "AE_OUT_OF_DOMAIN", "the frame is unlike the autoencoder's reference frames "
                                 "almost everywhere and the night has too few frames to "
                                 "calibrate it: ae_score and mask_fraction are NaN"),
    Flag(24, "AE_NIGHT_THRESHOLD", "the autoencoder mask threshold was raised to the night's "
                                   "best frames (an instrument unlike the reference frames)"),
    Flag(25, "FEW_FIELD_FRAMES", "the frame's field has fewer measured frames in the night "
                                 "than sequence.min_frames: the cross-frame columns are NaN"),
    Flag(26, "FIELD_UNMATCHED", "the frame's stars could not be matched to its field's "
                                "reference frame: the cross-frame columns are NaN"),
    Flag(27, "CLOUD", "transparency loss or extinction spread against the field's other "
                      "frames at or past its limit (classify.transparency_loss_limit_mag, "
                      "classify.extinction_spread_limit_mag)"),
    Flag(28, "LARGE_REGIONS_MASKED", "regions of at least 50 000 pixels whose mean light "
                                     "passes the detection threshold (sky structure, a "
                                     "nebula, a very bright star's halo) were masked before "
                                     "source detection"),
)
"""Bits of the exposure catalog's ``qa_flags``."""

SOURCE_FLAGS = flag_registry(
    Flag(0, "BLENDED", "deblended from a larger detection (sep OBJ_MERGED)"),
    Flag(1, "TRUNCATED", "touches the image edge or a masked region (sep OBJ_TRUNC)"),
    Flag(2, "SATURATED", "contains saturated pixels"),
    Flag(3, "NEAR_EDGE", "closer to the edge than psf.edge_px"),
    Flag(4, "NOT_ISOLATED", "a neighbour within psf.isolation_fwhm"),
    Flag(5, "EXTENDED", "larger than the stellar locus (galaxy, blend, trail)"),
    Flag(6, "FIT_FAILED", "the PSF fit did not converge"),
    Flag(7, "PSF_STAR", "used for the PSF measurement"),
    Flag(8, "COMPACT", "smaller than the stellar locus (cosmic ray, hot pixel)"),
)
"""Bits of the source catalog's ``flags``."""

CUT_SHORT = ("SATURATED", "TRUNCATED", "NEAR_EDGE")
"""Source flags of detections whose pixels are cut short: never stamped or summarised."""

# sep's object flag values (sep.OBJ_MERGED, sep.OBJ_TRUNC), fixed by its C API.
_SEP_MERGED = 0x0001
_SEP_TRUNC = 0x0002


def from_sep(sep_flags: np.ndarray) -> np.ndarray:
    """Translate sep object flags to :data:`SOURCE_FLAGS` bits."""
    sep_flags = np.asarray(sep_flags, dtype=np.int64)
    out = np.zeros_like(sep_flags)
    out |= np.where(sep_flags & _SEP_MERGED, SOURCE_FLAGS["BLENDED"].value, 0)
    out |= np.where(sep_flags & _SEP_TRUNC, SOURCE_FLAGS["TRUNCATED"].value, 0)
    return out


def bits(*names: str, registry: dict = EXPOSURE_FLAGS) -> int:
    """The integer with the named bits set."""
    value = 0
    for name in names:
        value |= registry[name].value
    return value


def decode_flags(value: int, registry: dict = EXPOSURE_FLAGS) -> list[str]:
    """Names of the bits set in ``value``, in bit order."""
    return [f.name for f in sorted(registry.values(), key=lambda f: f.bit) if int(value) & f.value]


def flags_markdown(registry: dict[str, Flag]) -> list[str]:
    """A Markdown table of ``registry`` (bit, value, name, doc), one line per bit."""
    lines = ["| bit | value | name | meaning |", "|---|---|---|---|"]
    for f in sorted(registry.values(), key=lambda f: f.bit):
        doc = f.doc.replace("|", "\\|")
        lines.append(f"| {f.bit} | {f.value} | `{f.name}` | {doc} |")
    return lines
