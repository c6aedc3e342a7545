"""FITS headers and HDUs of a simulated exposure and of its truth masks (in memory)."""
from __future__ import annotations

import math

import numpy as np
from astropy.io import fits

from survey_qa.simulate.spec import (ExposureSpec, SimDetector, detector_offset,
                                     focal_plane_size)
from survey_qa.simulate.truth import MASK_EXTINCTION_MAG, MASK_LIGHT_FRACTION


ARCSEC_PER_DEG = 3600.0


def _sexagesimal(deg: float, hours: bool) -> str:
    value = deg / 15.0 if hours else deg
    sign = "-" if value < 0 else ("" if hours else "+")
    value = abs(value)
    d = int(value)
    m = int((value - d) * 60)
    s = (value - d - m / 60.0) * 3600.0
    return f"{sign}{d:02d}:{m:02d}:{s:05.2f}" if hours else f"{sign}{d:02d}:{m:02d}:{s:04.1f}"


def exposure_header(spec: ExposureSpec) -> dict:
    """Exposure-level keywords, ``{key: (value, comment)}`` (missing keys left out)."""
    h = {
        "OBJECT": (spec.object_name, "target field"),
        "EXPNUM": (spec.expnum, "exposure number"),
        "DATE-OBS": (spec.date_obs, "UTC start of the exposure"),
        "MJD-OBS": (round(spec.mjd_obs, 8), "MJD (UTC) start of the exposure"),
        "EXPTIME": (spec.exptime_s, "[s] exposure time"),
        "FILTER": (spec.filter, "filter"),
        "AIRMASS": (round(spec.airmass, 4), "airmass at start"),
        "RA": (_sexagesimal(spec.ra_deg, True), "pointing right ascension"),
        "DEC": (_sexagesimal(spec.dec_deg, False), "pointing declination"),
        "EQUINOX": (2000.0, "equinox of the pointing"),
        "IMAGETYP": ("object", "image type"),
        "BUNIT": ("adu", "raw: bias level and overscan kept" if spec.raw
                  else "calibrated: bias removed, sky kept"),
        "ORIGIN": ("survey-qa simulate", "simulated frame"),
    }
    return {k: v for k, v in h.items() if k not in spec.missing_keys}


def detector_header(spec: ExposureSpec, index: int) -> dict:
    """Detector-level keywords: gain, noise, saturation and the pixel scale.

    Header style ``wcs``/``sparse``: a TAN WCS (CRPIX/CRVAL/CD) placing the detector in
    the focal plane; ``pixscale``: only ``PIXSCALE``; ``secpix``: only ``SECPIX``.
    """
    h = {
        "GAIN": (spec.gain_e_per_adu, "[e-/adu] gain"),
        "RDNOISE": (spec.read_noise_e, "[e-] read noise"),
        "SATURATE": (spec.saturate_adu, "[adu] saturation level"),
        "CCDNAME": (f"ccd{index + 1:02d}", "detector name"),
    }
    if spec.header_style in ("wcs", "sparse"):
        x0, y0 = detector_offset(spec, index)
        fx, fy = focal_plane_size(spec)
        scale = spec.pixscale_arcsec / ARCSEC_PER_DEG
        th = math.radians(spec.rotation_deg)
        h.update({
            "CTYPE1": ("RA---TAN", ""), "CTYPE2": ("DEC--TAN", ""),
            "CRVAL1": (spec.ra_deg, "[deg]"), "CRVAL2": (spec.dec_deg, "[deg]"),
            "CRPIX1": ((fx - 1) / 2.0 - x0 + 1.0 + spec.prescan_px,
                       "tangent point, 1-based pixel"),
            "CRPIX2": ((fy - 1) / 2.0 - y0 + 1.0, "tangent point, 1-based pixel"),
            "CD1_1": (-scale * math.cos(th), ""), "CD1_2": (scale * math.sin(th), ""),
            "CD2_1": (scale * math.sin(th), ""), "CD2_2": (scale * math.cos(th), ""),
            "RADESYS": ("ICRS", ""),
        })
    elif spec.header_style == "pixscale":
        h["PIXSCALE"] = (round(spec.pixscale_arcsec, 5), "[arcsec/px] pixel scale")
    elif spec.header_style == "secpix":
        h["SECPIX"] = (round(spec.pixscale_arcsec, 5), "[arcsec/px] pixel scale")
    if spec.raw:
        pre, nx, ny = spec.prescan_px, spec.nx, spec.ny
        data = f"[{pre + 1}:{pre + nx},1:{ny}]"
        h.update({
            "SATURATE": (float(math.floor(spec.saturate_adu + spec.bias_adu)),
                         "[adu] saturation level (raw, bias included)"),
            "BIASSEC": (f"[{pre + nx + 1}:{pre + nx + spec.overscan_px},1:{ny}]",
                        "overscan columns"),
            "DATASEC": (data, "exposed pixels"), "TRIMSEC": (data, "exposed pixels"),
        })
    if spec.bayer_pattern:
        h["BAYERPAT"] = (spec.bayer_pattern, "colour-filter array, first row first")
    return {k: v for k, v in h.items() if k not in spec.missing_keys}


def _to_header(cards: dict) -> fits.Header:
    hdr = fits.Header()
    for key, (value, comment) in cards.items():
        hdr[key] = (value, comment)
    return hdr


def _dither_seed(spec: ExposureSpec) -> int:
    return 1 + spec.field_seed % 10000


def build_hdulist(spec: ExposureSpec, detectors: list[SimDetector]) -> fits.HDUList:
    """The exposure as it is written to disk (in memory, not written).

    ``fits``/``fits.gz``: one primary HDU with the image; ``fits.fz``: an empty primary and
    a RICE_1 ``CompImageHDU``; ``mosaic``/``mosaic.fz``: an empty primary with the exposure
    keywords and one ``ImageHDU`` (``CompImageHDU``) per detector, EXTNAME ``ccdNN``.
    """
    if len(detectors) != spec.n_detectors:
        raise ValueError(f"expected {spec.n_detectors} detectors, got {len(detectors)}")
    fmt = spec.file_format
    if fmt in ("fits", "fits.gz"):
        d = detectors[0]
        return fits.HDUList([fits.PrimaryHDU(d.pixels, header=_to_header(d.header))])
    if fmt == "fits.fz":
        d = detectors[0]
        comp = fits.CompImageHDU(d.pixels, header=_to_header(d.header),
                                 compression_type="RICE_1", dither_seed=_dither_seed(spec))
        return fits.HDUList([fits.PrimaryHDU(), comp])
    hdus: list = [fits.PrimaryHDU(header=_to_header(exposure_header(spec)))]
    for d in detectors:
        hdr = _to_header(detector_header(spec, d.index))
        hdr.insert(0, ("EXTNAME", d.name, "detector"))  # set in the header: keeps its case
        if fmt == "mosaic":
            hdus.append(fits.ImageHDU(d.pixels, header=hdr))
        else:
            hdus.append(fits.CompImageHDU(d.pixels, header=hdr, compression_type="RICE_1",
                                          dither_seed=_dither_seed(spec) + d.index))
    return fits.HDUList(hdus)


def mask_hdulist(spec: ExposureSpec, detectors: list[SimDetector]) -> fits.HDUList:
    """Truth defect masks: an empty primary and one lossless tile-compressed uint8 HDU per
    detector, EXTNAME = the detector id."""
    hdus: list = [fits.PrimaryHDU()]
    for d in detectors:
        hdr = fits.Header()
        hdr["EXTNAME"] = (d.name, "detector")
        hdr["MASKDEF"] = (f"L/sky>{MASK_LIGHT_FRACTION} or K>{MASK_EXTINCTION_MAG}mag",
                          "defect mask definition")
        hdus.append(fits.CompImageHDU(d.defect_mask.astype(np.uint8), header=hdr,
                                      compression_type="RICE_1"))
    return fits.HDUList(hdus)
