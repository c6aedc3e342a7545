"""FITS ingest: formats, header fallbacks, and every kind of bad input."""
import gzip
import math
import shutil

import numpy as np
import pytest
from astropy.io import fits

from survey_qa.config import IOConfig
from survey_qa.pipeline import io, sources
from survey_qa.pipeline.errors import QualityError
from survey_qa.pipeline.flags import decode_flags


def _image(ny=128, nx=96, seed=1):
    rng = np.random.default_rng(seed)
    return (100 + rng.normal(0, 5, (ny, nx))).astype(">f4")  # big-endian, as FITS gives it


def _header(**extra):
    h = fits.Header()
    h.update({"EXPTIME": 30.0, "GAIN": 1.5, "RDNOISE": 4.0, "SATURATE": 60000.0,
              "DATE-OBS": "2024-03-02T01:02:03", "FILTER": "r", "PIXSCALE": 0.3})
    h.update(extra)
    return h


def test_single_frame(tmp_path):
    p = tmp_path / "exp001.fits"
    fits.PrimaryHDU(_image(), _header()).writeto(p)
    (det,) = io.read_exposure(p, IOConfig())
    assert det.exposure == "exp001" and det.detector == "0" and det.hdu == 0
    assert det.data.dtype == np.float32 and det.data.dtype.isnative
    assert det.data.flags.c_contiguous
    assert det.meta.pixscale_arcsec == 0.3 and det.meta.pixscale_source == "keyword"
    assert det.meta.gain_e_per_adu == 1.5 and det.meta.exptime_s == 30.0
    assert math.isclose(det.meta.mjd_obs, 60371.04309, abs_tol=1e-4)
    assert det.qa_flags == 0


def test_mosaic_fz_and_gz(tmp_path):
    hdus = [fits.PrimaryHDU(header=_header())]
    for k in range(3):
        hdus.append(fits.CompImageHDU(_image(seed=k).astype(np.float32),
                                      fits.Header({"EXTNAME": f"ccd{k:02d}"}),
                                      compression_type="RICE_1"))
    p = tmp_path / "mosaic.fits.fz"
    fits.HDUList(hdus).writeto(p)
    dets = io.read_exposure(p, IOConfig())
    assert [d.detector for d in dets] == ["ccd00", "ccd01", "ccd02"]
    assert all(d.n_detectors == 3 and d.exposure == "mosaic" for d in dets)
    assert dets[1].meta.exptime_s == 30.0  # primary header keywords reach every detector

    plain = tmp_path / "plain.fits"
    fits.PrimaryHDU(_image(), _header()).writeto(plain)
    gz = tmp_path / "exp002.fits.gz"
    with open(plain, "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    (det,) = io.read_exposure(gz, IOConfig())
    assert det.exposure == "exp002"
    np.testing.assert_allclose(det.data, _image().astype(np.float32))


def test_pixel_scale_sources(tmp_path):
    wcs = {"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 150.0, "CRVAL2": 2.0,
           "CRPIX1": 48.0, "CRPIX2": 64.0, "CD1_1": -0.2 / 3600, "CD1_2": 0.0,
           "CD2_1": 0.0, "CD2_2": 0.2 / 3600}
    h = _header(**wcs)
    del h["PIXSCALE"]
    assert io.pixel_scale(h, IOConfig()) == pytest.approx((0.2, "wcs"))
    h = fits.Header({"SECPIX": 1.7})
    assert io.pixel_scale(h, IOConfig()) == (1.7, "keyword")
    assert io.pixel_scale(fits.Header(), IOConfig(pixscale_arcsec=0.5)) == (0.5, "config")
    scale, source = io.pixel_scale(fits.Header(), IOConfig())
    assert math.isnan(scale) and source == "none"  # never silently 1"/px


def test_missing_keywords_use_fallbacks_and_flag(tmp_path):
    p = tmp_path / "bare.fits"
    fits.PrimaryHDU(_image()).writeto(p)
    (det,) = io.read_exposure(p, IOConfig(gain_e_per_adu=2.0))
    assert det.meta.gain_e_per_adu == 2.0
    assert "GAIN" in det.meta.fallbacks and "EXPTIME" in det.meta.fallbacks
    assert {"HEADER_FALLBACK", "NO_PIXSCALE"} <= set(decode_flags(det.qa_flags))
    assert math.isnan(det.meta.pixscale_arcsec)


@pytest.mark.parametrize("text, iso", [
    ("29/11/51", "1951-11-29"), ("26/07/102", "2002-07-26"),
    ("2013-07-13", "2013-07-13"), ("2021-01-18T11:26:32.228", "2021-01-18T11:26:32.228")])
def test_date_formats(text, iso):
    got, mjd = io.parse_date(fits.Header({"DATE-OBS": text}))
    assert got.startswith(iso) and math.isfinite(mjd)


def test_overscan_trimmed_and_bias_removed(tmp_path):
    data = np.full((64, 80), 1000.0, dtype=np.float32)
    data[:, :64] += 50 + np.random.default_rng(0).normal(0, 1, (64, 64))
    h = _header(DATASEC="[1:64,1:64]", BIASSEC="[65:80,1:64]")
    p = tmp_path / "raw.fits"
    fits.PrimaryHDU(data, h).writeto(p)
    (det,) = io.read_exposure(p, IOConfig(min_image_pixels=100))
    assert det.data.shape == (64, 64)
    assert abs(np.median(det.data) - 50) < 1
    assert "OVERSCAN_TRIMMED" in decode_flags(det.qa_flags)


def test_raw_saturation_level_follows_the_bias_subtraction(tmp_path):
    data = np.full((64, 80), 1000.0, dtype=np.float32)
    data[:, :64] += 50 + np.random.default_rng(0).normal(0, 1, (64, 64))
    data[30:33, 30:33] = 60000.0  # a saturated star core, in raw ADU
    h = _header(DATASEC="[1:64,1:64]", BIASSEC="[65:80,1:64]")
    p = tmp_path / "raw.fits"
    fits.PrimaryHDU(data, h).writeto(p)
    (det,) = io.read_exposure(p, IOConfig(min_image_pixels=100))
    assert det.meta.saturate_adu == pytest.approx(59000.0, abs=1)
    assert det.mask[30:33, 30:33].all() and det.mask.sum() == 9


def test_bayer_frames_are_binned(tmp_path):
    p = tmp_path / "dslr.fits"
    fits.PrimaryHDU(_image(), _header(BAYERPAT="RGGB")).writeto(p)
    (det,) = io.read_exposure(p, IOConfig())
    assert det.data.shape == (64, 48) and det.meta.pixscale_arcsec == 0.6
    assert "BAYER_BINNED" in decode_flags(det.qa_flags)


def test_saturation_inferred_and_masked(tmp_path):
    data = _image().astype(np.float32)
    data[10:14, 10:14] = 65535.0
    p = tmp_path / "sat.fits"
    h = _header()
    del h["SATURATE"]
    fits.PrimaryHDU(data, h).writeto(p)
    (det,) = io.read_exposure(p, IOConfig())
    assert det.meta.saturate_adu == 65535.0
    assert det.mask[10:14, 10:14].all() and det.mask.sum() == 16
    assert "SATURATION_INFERRED" in decode_flags(det.qa_flags)


# -------------------------------------------------------------------- bad input


def test_truncated_file(tmp_path):
    good = tmp_path / "good.fits"
    fits.PrimaryHDU(_image(512, 512), _header()).writeto(good)
    bad = tmp_path / "truncated.fits"
    bad.write_bytes(good.read_bytes()[: 2880 * 20])
    with pytest.raises(QualityError, match="unreadable|truncated|corrupt"):
        io.read_exposure(bad, IOConfig())


def test_not_a_fits_file(tmp_path):
    p = tmp_path / "notes.fits"
    p.write_text("this is a text file, not a FITS image\n" * 50)
    with pytest.raises(QualityError, match="not a FITS file"):
        io.read_detectors(p, IOConfig())


@pytest.mark.parametrize("fill, message", [(np.nan, "no finite pixel"),
                                           (42.0, "constant frame")])
def test_all_nan_or_constant(tmp_path, fill, message):
    p = tmp_path / "flat.fits"
    fits.PrimaryHDU(np.full((100, 100), fill, dtype=np.float32), _header()).writeto(p)
    with pytest.raises(QualityError, match=message):
        io.read_exposure(p, IOConfig())


def test_mostly_saturated(tmp_path):
    data = _image().astype(np.float32)
    data[:100] = 60000.0
    p = tmp_path / "sat.fits"
    fits.PrimaryHDU(data, _header()).writeto(p)
    with pytest.raises(QualityError, match="mostly saturated"):
        io.read_exposure(p, IOConfig())


def test_unreadable_mosaic_extension_keeps_the_others(tmp_path):
    hdus = [fits.PrimaryHDU(header=_header())]
    hdus += [fits.ImageHDU(_image(seed=k), name=f"CCD{k}") for k in range(3)]
    hdus[2] = fits.ImageHDU(np.full((128, 96), np.nan, dtype=np.float32), name="CCD1")
    p = tmp_path / "mosaic.fits"
    fits.HDUList(hdus).writeto(p)
    dets = io.read_detectors(p, IOConfig())
    assert isinstance(dets[1], QualityError) and dets[1].metadata["detector"] == "CCD1"
    assert [d.detector for d in dets if not isinstance(d, QualityError)] == ["CCD0", "CCD2"]
    with pytest.raises(QualityError):
        io.read_exposure(p, IOConfig())


def test_discovery(tmp_path):
    night = tmp_path / "2024-03-01"
    (night / "sub").mkdir(parents=True)
    (night / "_truth").mkdir()
    for name in ("a.fits", "b.fits.fz", "sub/c.fit", "d.fts", "e.fits.gz", "_truth/t.fits",
                 ".hidden.fits", "notes.txt"):
        (night / name).write_bytes(b"")
    found = [p.relative_to(night).as_posix() for p in io.discover_night(tmp_path, "2024-03-01")]
    assert found == ["a.fits", "b.fits.fz", "d.fts", "e.fits.gz", "sub/c.fit"]
    assert [io.exposure_id(p) for p in found] == ["a", "b", "d", "e", "c"]
    with pytest.raises(ValueError, match="no night folder"):
        io.discover_night(tmp_path, "2024-03-02")


def test_saturated_pixels_are_finite_and_at_the_level():
    data = np.array([[1.0, 5.0], [np.inf, np.nan]], np.float32)
    assert sources.saturated_pixels(data, 5.0).tolist() == [[False, True], [False, False]]
    assert not sources.saturated_pixels(data, math.nan).any()


def test_detector_headers_name_detectors_as_the_catalog_does(tmp_path):
    p = tmp_path / "mef.fits"
    image = np.random.default_rng(0).normal(100, 5, (64, 64)).astype(np.float32)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(image, name="SCI"),
                  fits.ImageHDU(image, name="SCI")]).writeto(p)
    cfg = IOConfig(min_image_pixels=100)
    got = io.detector_headers(p, cfg)
    assert [name for name, _ in got] == ["SCI", "SCI#2"]
    assert got[0][1]["NAXIS1"] == 64
    assert io.detector_headers(tmp_path / "missing.fits", cfg) == []


# -------------------------------------------------------------------- headers as written


@pytest.mark.parametrize("cards, scale, keyword", [
    ({"IM_SCALE": 2.1}, 2.1, "IM_SCALE"),
    ({"PIXSCALE": 0.3}, 0.3, "PIXSCALE"),
    ({"SECPIX": 1.7}, 1.7, "SECPIX"),
    ({"SECPIX1": 1.0, "SECPIX2": 1.21}, 1.1, "SECPIX1"),
    ({"PIXSCAL1": 0.4, "PIXSCAL2": 0.4}, 0.4, "PIXSCAL1"),
    ({"SCALE": 3.04}, 3.04, "SCALE"),
    ({"PLTSCALE": 67.2, "XPIXELSZ": 25.28445}, 1.6991, "PLTSCALE*XPIXELSZ"),
    ({"PLTSCALE": 20.0, "XPIXSZ": 9.0}, 0.18, "PLTSCALE*XPIXSZ"),
    ({"CDELT1": -2.777778e-4, "CDELT2": 2.777778e-4}, 1.0, "CDELT1"),  # no CTYPE
    ({"CD1_1": 0.0, "CD1_2": 1e-4, "CD2_1": 1e-4, "CD2_2": 0.0, "CTYPE1": "LINEAR"},
     0.36, "CD1_1"),
    ({"XPIXSZ": 24.0, "YPIXSZ": 24.0, "FOCALLEN": 3910.0, "XBINNING": 1}, 1.2661,
     "XPIXSZ/FOCALLEN"),
    # MaxIm DL / SBIG write XPIXSZ after binning: 2x2 binning is already in 18 um
    ({"XPIXSZ": 18.0, "FOCALLEN": 1000.0, "XBINNING": 2}, 3.7128, "XPIXSZ/FOCALLEN"),
    ({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CD1_1": -3.0737e-4, "CD1_2": 0.0,
      "CD2_1": 0.0, "CD2_2": 3.0737e-4, "CRPIX1": 1.0, "CRPIX2": 1.0, "CRVAL1": 10.0,
      "CRVAL2": 5.0, "PIXSCALE": 9.9}, 1.1065, "WCS"),
    ({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CD1_1": "-0.00030737", "CD1_2": "0.0",
      "CD2_1": "0.0", "CD2_2": "0.00030737", "CRPIX1": 1.0, "CRPIX2": 1.0, "CRVAL1": 10.0,
      "CRVAL2": 5.0}, 1.1065, "WCS"),  # numbers written as strings (Lowell)
])
def test_pixel_scale_keyword_families(cards, scale, keyword):
    got, source, key = io.pixel_scale_and_keyword(fits.Header(cards), IOConfig())
    assert got == pytest.approx(scale, rel=1e-3) and key == keyword
    assert source == ("wcs" if keyword == "WCS" else "keyword")


def test_pixel_scale_unbinned_pixel_size_and_placeholders():
    h = fits.Header()
    h["XPIXSZ"] = (9.0, "pixel size in microns, unbinned")
    h.update({"FOCALLEN": 1000.0, "XBINNING": 2})
    assert io.pixel_scale_and_keyword(h, IOConfig())[0] == pytest.approx(3.7128, rel=1e-3)
    for cards in ({"CDELT1": 1.0, "CDELT2": 1.0, "CTYPE1": ""},  # pixel units, not a scale
                  {"PLTSCALE": 67.2},  # arcsec/mm without a pixel size
                  {"XPIXSZ": 6.45},  # pixel size without a focal length
                  {"PIXSCALE": 0.0}, {"SECPIX": "unknown"}):
        scale, source, _ = io.pixel_scale_and_keyword(fits.Header(cards), IOConfig())
        assert math.isnan(scale) and source == "none", cards


@pytest.mark.parametrize("cards, gain, noise, saturate", [
    ({"GAIN": 1.5, "RDNOISE": 4.0, "SATURATE": 60000}, 1.5, 4.0, 60000),
    ({"EGAIN": 2.07, "READNOIS": 9.0, "DATAMAX": 13374}, 2.07, 9.0, 13374),
    ({"GAIN": 0, "EGAIN": 1.2, "RDNOISE": 0, "READNOIS": 6.0, "SATURATE": 0,
      "SATLEVEL": 50000}, 1.2, 6.0, 50000),  # 0 means unknown: the next keyword speaks
    ({"GAIN": 0, "SATURATE": 0}, 2.5, 5.0, None),  # then the configuration
])
def test_gain_read_noise_saturation_families(cards, gain, noise, saturate):
    meta = io.read_meta(fits.Header(cards), IOConfig(gain_e_per_adu=2.5))
    assert meta.gain_e_per_adu == gain and meta.read_noise_e == noise
    if saturate is None:
        assert math.isnan(meta.saturate_adu) and "SATURATE" in meta.fallbacks
    else:
        assert meta.saturate_adu == saturate


@pytest.mark.parametrize("cards, kind, source", [
    ({"IMAGETYP": "Bias Frame", "EXPTIME": 0.0}, "bias", "IMAGETYP = 'Bias Frame'"),
    ({"IMAGETYP": "zero"}, "bias", "IMAGETYP = 'zero'"),
    ({"IMAGETYP": "Dark Frame", "EXPTIME": 180.0}, "dark", "IMAGETYP = 'Dark Frame'"),
    ({"OBSTYPE": "DOMEFLAT"}, "flat", "OBSTYPE = 'DOMEFLAT'"),
    ({"FRAMETYP": "SkyFlat"}, "flat", "FRAMETYP = 'SkyFlat'"),
    ({"IMGTYPE": "OBJECT"}, "light", "IMGTYPE = 'OBJECT'"),
    ({"IMAGETYP": "Light Frame"}, "light", "IMAGETYP = 'Light Frame'"),
    ({"FRAME": "science"}, "light", "FRAME = 'science'"),
    ({"FRAME": 273, "EXPTIME": 53.9}, "light", "default"),  # SDSS: FRAME is a number
    ({"EXPTIME": 0}, "bias", "EXPTIME = 0"),
    ({}, "light", "default"),
])
def test_image_type_families(cards, kind, source):
    assert io.image_type(fits.Header(cards)) == (kind, source)


def test_calibration_frames_fail_with_their_kind(tmp_path):
    p = tmp_path / "dark.fits"
    fits.PrimaryHDU(_image(), _header(IMAGETYP="Dark Frame")).writeto(p)
    with pytest.raises(QualityError, match=r"calibration frame: dark \(IMAGETYP = 'Dark "
                                           r"Frame'\)") as info:
        io.read_exposure(p, IOConfig())
    assert info.value.metadata["meta"].image_type == "dark"


def test_mask_weight_and_table_extensions_are_not_detectors(tmp_path):
    hdus = [fits.PrimaryHDU()]
    hdus.append(fits.ImageHDU(_image(), _header(), name="SCI"))
    for name in ("BPM", "MASK", "ERR", "VAR", "WHT", "WEIGHT", "SCI_DQ"):
        hdus.append(fits.ImageHDU(_image(seed=2), name=name))
    hdus.append(fits.BinTableHDU.from_columns([fits.Column("x", "E", array=[1.0])],
                                              name="CAT"))
    mask = np.zeros((128, 96), np.uint8)
    mask[::7] = 4
    hdus.append(fits.ImageHDU(mask, name="PIXFLAGS"))  # integer, few values: a mask
    p = tmp_path / "reduced.fits.fz"
    fits.HDUList(hdus).writeto(p)
    dets = io.read_detectors(p, IOConfig())
    assert [d.detector for d in dets] == ["SCI"] and dets[0].n_detectors == 1


def test_bz2_frames_are_discovered_and_read(tmp_path):
    import bz2

    night = tmp_path / "2024-03-01"
    night.mkdir()
    plain = tmp_path / "plain.fits"
    fits.PrimaryHDU(_image(), _header()).writeto(plain)
    for name in ("a.fits.bz2", "b.fit.bz2", "c.fts.bz2", "d.FITS.BZ2"):
        (night / name).write_bytes(bz2.compress(plain.read_bytes()))
    files = io.night_exposures(tmp_path, "2024-03-01")
    assert list(files) == ["a", "b", "c", "d"]
    (det,) = io.read_exposure(files["d"], IOConfig())
    np.testing.assert_allclose(det.data, _image().astype(np.float32))


def test_unexposed_rows_and_columns_found_in_the_data():
    rng = np.random.default_rng(0)
    sky = rng.poisson(400, (200, 180)).astype(np.float32) + 1000  # bias 1000, sky 400
    sky[120:126] = 1000 + rng.normal(0, 3, (6, 180))  # an unread band at the bias level
    sky[:, :4] = 1000 + rng.normal(0, 3, (200, 4))  # a prescan the header does not name
    vignetted = sky.copy()  # half the light (and its photon noise) at one edge: kept
    vignetted[:, 170:] = 1000 + rng.poisson(200, (200, 10))
    mask = io.unexposed_lines(vignetted, np.zeros(sky.shape, bool))
    assert mask.all(axis=1)[120:126].all() and mask.all(axis=1).sum() == 6
    assert mask.all(axis=0)[:4].all() and mask.all(axis=0).sum() == 4


def test_frame_without_light_above_the_overscan_is_a_calibration_frame(tmp_path):
    rng = np.random.default_rng(1)
    data = (1000 + rng.normal(0, 3, (128, 144))).astype(np.float32)  # bias + read noise
    h = _header(TRIMSEC="[1:128,1:128]", BIASSEC="[131:144,1:128]", GAIN=1.0, RDNOISE=3.0,
                IMAGETYP="Light Frame")
    p = tmp_path / "closed.fits"
    fits.PrimaryHDU(data, h).writeto(p)
    with pytest.raises(QualityError, match=r"calibration frame: dark \(by content: median "
                                           r"-?0\.\d ADU above the overscan"):
        io.read_exposure(p, IOConfig())
    data[:, :128] += 40 + rng.normal(0, 6, (128, 128)).astype(np.float32)  # sky: light
    p2 = tmp_path / "sky.fits"
    fits.PrimaryHDU(data, h).writeto(p2)
    (det,) = io.read_exposure(p2, IOConfig())
    assert det.meta.image_type == "light"
