"""A corpus of bad inputs, generated here (never committed as files): every one gets a
clear outcome, a ``failed`` row with a reason a person can act on or a correct ``ok`` row
with its flags, and none of them stops the night."""
from __future__ import annotations

import bz2
import gzip
import math
import os
import re
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from astropy.io import fits

from survey_qa.config import IOConfig, load_config
from survey_qa.pipeline import io
from survey_qa.pipeline.errors import QualityError
from survey_qa.pipeline.flags import decode_flags

from contract import assert_contract_holds
from synthetic import star_field

NIGHT = "2024-03-01"
N = 160  # detector side: small and quick


def stars(n=N, seed=0, sky=300.0, n_stars=30, fwhm_px=3.0):
    """Gaussian stars on a flat sky with Poisson and read noise (ADU, gain 1)."""
    return star_field(n, n_stars, fwhm_px, sky, seed, margin_px=12, log_flux=(3.3, 4.3))


def header(**extra) -> fits.Header:
    h = fits.Header({"EXPTIME": 60.0, "GAIN": 1.0, "RDNOISE": 3.0, "SATURATE": 60000.0,
                     "DATE-OBS": "2024-03-02T02:00:00", "FILTER": "r", "PIXSCALE": 0.5})
    h.update(extra)
    return h


def write(path: Path, data, hdr=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.PrimaryHDU(data, hdr if hdr is not None else header()).writeto(path)
    return path


def _mosaic(hdus) -> fits.HDUList:
    return fits.HDUList([fits.PrimaryHDU(header=header()), *hdus])


def _flip_byte(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def make_corpus(d: Path) -> dict[str, tuple[str, str]]:
    """Write one file per kind of bad input into ``d``.

    Returns ``{exposure: (status, pattern)}``: the expected status of the exposure's
    first row ('ok' or 'failed') and a pattern its error (failed) or its qa flags (ok)
    must match ('' for none).
    """
    d.mkdir(parents=True, exist_ok=True)
    expect = {}
    good = stars()

    write(d / "good.fits", good)
    expect["good"] = ("ok", "")
    whole = write(d / "_whole.fits", stars(seed=1))
    (d / "truncated.fits").write_bytes(whole.read_bytes()[:2880 * 12])
    expect["truncated"] = ("failed", r"truncated: file holds 34560 bytes of the \d+ the "
                                     r"header announces")
    (d / "notfits.fits").write_text("SIMPLE? no, a text file\n" * 100)
    expect["notfits"] = ("failed", "not a FITS file")
    (d / "zero.fits").write_bytes(b"")
    expect["zero"] = ("failed", r"empty file \(0 bytes\)")
    write(d / "nan.fits", np.full((N, N), np.nan, np.float32))
    expect["nan"] = ("failed", "no finite pixel")
    write(d / "inf.fits", np.full((N, N), np.inf, np.float32))
    expect["inf"] = ("failed", "no finite pixel")
    part = good.copy()
    part[:10] = np.nan
    part[20, 20:40] = np.inf
    write(d / "somenan.fits", part)
    expect["somenan"] = ("ok", "NONFINITE_PIXELS")
    write(d / "const.fits", np.full((N, N), 7.0, np.float32))
    expect["const"] = ("failed", "constant frame")
    write(d / "zeros.fits", np.zeros((N, N), np.int16))
    expect["zeros"] = ("failed", "constant frame")
    write(d / "nostars.fits",
          np.random.default_rng(3).normal(300, 5, (N, N)).astype(np.float32))
    expect["nostars"] = ("ok", "@NO_STARS")  # '@': a flag of the measurement, not the reader
    sat = good.copy()
    sat[: int(N * 0.8)] = 60000.0
    write(d / "saturated.fits", sat)
    expect["saturated"] = ("failed", "mostly saturated")
    write(d / "gain0.fits", good, header(GAIN=0, SATURATE=0))
    expect["gain0"] = ("ok", "HEADER_FALLBACK")
    # odd data types
    write(d / "uint8.fits", np.clip(good / 40, 0, 255).astype(np.uint8))
    expect["uint8"] = ("ok", "")
    hdu = fits.PrimaryHDU(np.clip(good - 200, -120, 127).astype(np.int8), header())
    hdu.writeto(d / "int8.fits")  # astropy writes int8 as BITPIX 8 with BZERO -128
    expect["int8"] = ("ok", "")
    write(d / "uint16.fits", good.astype(np.uint16))  # BZERO 32768
    expect["uint16"] = ("ok", "")
    write(d / "int64.fits", good.astype(np.int64))
    expect["int64"] = ("ok", "")
    write(d / "float64.fits", good.astype(">f8"))
    expect["float64"] = ("ok", "")
    scaled = fits.PrimaryHDU(good.astype(np.float32), header())
    scaled.scale("int16", bscale=0.5, bzero=1000)
    scaled.writeto(d / "bscale.fits")
    expect["bscale"] = ("ok", "")
    # shapes
    write(d / "cube.fits", np.stack([good, good, good]))
    expect["cube"] = ("failed", r"3-D image .*3 planes of 160x160 pixels")
    write(d / "cube1.fits", good[None])
    expect["cube1"] = ("ok", "")
    write(d / "oned.fits", good[0])
    expect["oned"] = ("failed", "1-D data of 160 values")
    fits.PrimaryHDU(header=header()).writeto(d / "emptyprimary.fits")
    expect["emptyprimary"] = ("failed", "no image data: the primary HDU is empty")
    write(d / "tiny.fits", good[:10, :10])
    expect["tiny"] = ("failed", "image of 10x10 pixels is smaller than")
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(
        [fits.Column("x", "E", array=np.arange(5.0))])]).writeto(d / "tableonly.fits")
    expect["tableonly"] = ("failed", r"only tables \(BinTableHDU\)")
    # headers that lie
    h = header()
    h["NAXIS1"], h["NAXIS2"] = 65536, 65536
    big = fits.PrimaryHDU(good, header())
    raw = big.header.tostring().encode()
    raw = raw.replace(b"NAXIS1  =                  160", b"NAXIS1  =                65536")
    raw = raw.replace(b"NAXIS2  =                  160", b"NAXIS2  =                65536")
    (d / "huge.fits").write_bytes(raw + good.astype(">f4").tobytes())
    expect["huge"] = ("failed", "truncated: file holds")
    raw2 = big.header.tostring().encode()
    raw2 = raw2.replace(b"NAXIS1  =                  160", b"NAXIS1  =            100000000")
    raw2 = raw2.replace(b"NAXIS2  =                  160", b"NAXIS2  =            100000000")
    (d / "hugest.fits").write_bytes(raw2 + good.astype(">f4").tobytes())
    expect["hugest"] = ("failed", "truncated: file holds")
    write(d / "badwcs.fits", good, header(CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CD1_1=0.0,
                                          CD1_2=0.0, CD2_1=0.0, CD2_2=0.0))
    expect["badwcs"] = ("ok", "")
    write(d / "baddate.fits", good, header(**{"DATE-OBS": "yesterday", "EXPTIME": "long"}))
    expect["baddate"] = ("ok", "HEADER_FALLBACK")
    write(d / "badtrimsec.fits", good, header(TRIMSEC="[1:5000,1:5000]", BIASSEC="[x]"))
    expect["badtrimsec"] = ("ok", "")
    write(d / "bias.fits", good, header(IMAGETYP="Bias Frame", EXPTIME=0.0))
    expect["bias"] = ("failed", r"calibration frame: bias \(IMAGETYP = 'Bias Frame'\)")
    write(d / "zeroexp.fits", good, header(EXPTIME=0.0))
    expect["zeroexp"] = ("failed", r"calibration frame: bias \(EXPTIME = 0\)")
    write(d / "skyflat.fits", good, header(OBSTYPE="SKYFLAT"))
    expect["skyflat"] = ("failed", "calibration frame: flat")
    band = good.copy()
    band[80:88] = np.random.default_rng(4).normal(2, 3, (8, N))  # rows at bias level
    write(d / "unexposed.fits", band, header())
    expect["unexposed"] = ("ok", "UNEXPOSED_MASKED")
    # mosaics
    hdus = [fits.ImageHDU(stars(seed=10 + k), name=f"CCD{k}") for k in range(3)]
    _mosaic(hdus).writeto(d / "_mosaic_whole.fits")
    whole = (d / "_mosaic_whole.fits").read_bytes()
    (d / "mosaiccut.fits").write_bytes(whole[:-2880 * 10])
    expect["mosaiccut"] = ("ok", "")  # CCD0, CCD1 ok; CCD2 truncated (checked apart)
    _mosaic([fits.ImageHDU(stars(seed=20), name="SCI"),
             fits.ImageHDU(stars(seed=21), name="SCI")]).writeto(d / "dupext.fits")
    expect["dupext"] = ("ok", "")
    _mosaic([fits.ImageHDU(stars(seed=22), name="SCI"),
             fits.BinTableHDU.from_columns([fits.Column("flux", "E", array=np.ones(3))],
                                           name="CAT"),
             fits.ImageHDU((np.arange(N * N).reshape(N, N) % 3 == 0).astype(np.int16),
                           name="BPM"),
             fits.ImageHDU(np.ones((N, N), np.float32), name="WHT"),
             fits.ImageHDU((np.arange(N * N).reshape(N, N) % 5 == 0).astype(np.uint8),
                           name="QUALITY")]).writeto(d / "reduced.fits")
    expect["reduced"] = ("ok", "")
    # compressed
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(stars(seed=30), header(),
                                                       compression_type="RICE_1")]
                 ).writeto(d / "_good.fits.fz")
    fz = (d / "_good.fits.fz").read_bytes()
    (d / "damagedfz.fits.fz").write_bytes(fz[:2880 * 3] + b"\x00" * (len(fz) - 2880 * 3))
    expect["damagedfz"] = ("failed", "damaged tile-compressed image in HDU 1")
    (d / "cutfz.fits.fz").write_bytes(fz[: len(fz) // 2])
    expect["cutfz"] = ("failed", "truncated")
    plain = write(d / "_plain.fits", stars(seed=31)).read_bytes()
    (d / "goodgz.fits.gz").write_bytes(gzip.compress(plain))
    expect["goodgz"] = ("ok", "")
    gz = gzip.compress(plain)
    (d / "crcgz.fits.gz").write_bytes(gz[:-8] + _flip_byte(gz[-8:], 0))  # the CRC
    expect["crcgz"] = ("failed", "damaged gzip file")
    (d / "flipgz.fits.gz").write_bytes(_flip_byte(gz, len(gz) // 2))  # inside the stream
    expect["flipgz"] = ("failed", "damaged gzip file")
    (d / "cutgz.fits.gz").write_bytes(gz[: len(gz) // 2])
    expect["cutgz"] = ("failed", "damaged gzip file")
    (d / "goodbz2.fits.bz2").write_bytes(bz2.compress(plain))
    expect["goodbz2"] = ("ok", "")
    b2 = bz2.compress(plain)
    (d / "badbz2.fits.bz2").write_bytes(_flip_byte(b2, len(b2) // 2))
    expect["badbz2"] = ("failed", "damaged bzip2 file")
    (d / "cutbz2.fits.bz2").write_bytes(b2[: len(b2) // 2])
    expect["cutbz2"] = ("failed", "damaged bzip2 file")
    (d / "notgz.fits.gz").write_bytes(plain[:4000])
    expect["notgz"] = ("failed", "damaged gzip file")
    # names and links
    write(d / "sub" / "good.fits", stars(seed=40))
    expect["sub__good"] = ("ok", "")
    (d / "good.fits.fz").write_bytes(fz)  # same id as good.fits, beside it
    expect["good__fits_fz"] = ("ok", "")
    write(d / "with space é.fits", stars(seed=41))
    expect["with space é"] = ("ok", "")
    os.symlink("loop.fits", d / "loop.fits")
    expect["loop"] = ("failed", "unreadable file: Too many levels of symbolic links")
    os.symlink("nowhere.fits", d / "dangling.fits")
    expect["dangling"] = ("failed", "unreadable file: No such file")
    os.symlink("..", d / "sub" / "back")  # a folder link loop
    return expect


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    return raw, make_corpus(raw / NIGHT)


# -------------------------------------------------------------------- the reader alone


def _outcome(path: Path, exposure: str) -> tuple[str, str]:
    """(status, error or decoded flags) of a file's first detector, read alone."""
    try:
        dets = io.read_detectors(path, IOConfig(), exposure)
    except QualityError as e:
        return "failed", e.reason
    first = dets[0]
    if isinstance(first, QualityError):
        return "failed", first.reason
    return "ok", " ".join(decode_flags(first.qa_flags))


def test_every_kind_reads_to_its_outcome(corpus):
    raw, expect = corpus
    files = io.night_exposures(raw, NIGHT)
    assert set(files) == set(expect)  # the duplicate ids are named apart, nothing lost
    wrong = {}
    for exposure, (status, pattern) in expect.items():
        got = _outcome(files[exposure], exposure)
        pattern = "" if pattern.startswith("@") else pattern
        if got[0] != status or (pattern and not re.search(pattern, got[1])):
            wrong[exposure] = got
    assert not wrong


def test_duplicate_ids_named_apart_by_folder_and_suffix(corpus):
    raw, _ = corpus
    files = io.night_exposures(raw, NIGHT)
    assert files["good"].name == "good.fits"
    assert files["sub__good"].parts[-2:] == ("sub", "good.fits")
    assert files["good__fits_fz"].name == "good.fits.fz"
    assert io.night_exposures(raw, NIGHT) == files  # stable: a re-run uses the same ids


def test_mosaic_extensions(corpus):
    raw, _ = corpus
    d = raw / NIGHT
    cut = io.read_detectors(d / "mosaiccut.fits", IOConfig())
    assert [getattr(x, "detector", None) or x.metadata["detector"] for x in cut] == [
        "CCD0", "CCD1", "CCD2"]
    assert isinstance(cut[2], QualityError) and cut[2].reason.startswith("truncated")
    assert [x.detector for x in io.read_detectors(d / "dupext.fits", IOConfig())] == [
        "SCI", "SCI#2"]
    reduced = io.read_detectors(d / "reduced.fits", IOConfig())
    assert [x.detector for x in reduced] == ["SCI"] and reduced[0].n_detectors == 1
    assert io.plan_detectors(d / "reduced.fits", IOConfig()) == [
        ("SCI", N, N), ("QUALITY", N, N)]  # a mask named otherwise is known only by its data


def test_plan_is_capped_by_what_the_file_holds(corpus):
    raw, _ = corpus
    d = raw / NIGHT
    assert io.plan_detectors(d / "huge.fits", IOConfig()) == []
    assert io.plan_detectors(d / "hugest.fits", IOConfig()) == []
    assert io.plan_detectors(d / "mosaiccut.fits", IOConfig()) == [("CCD0", N, N),
                                                                     ("CCD1", N, N)]
    assert io.plan_detectors(d / "good.fits", IOConfig()) == [("0", N, N)]


def test_gain_and_saturation_zero_mean_unknown(corpus):
    raw, _ = corpus
    (det,) = io.read_detectors(raw / NIGHT / "gain0.fits", IOConfig(gain_e_per_adu=2.5))
    assert det.meta.gain_e_per_adu == 2.5 and "GAIN" in det.meta.fallbacks
    assert det.meta.saturate_adu != 0 and det.mask.mean() < 0.01


def test_unexposed_band_is_masked_and_the_rest_kept(corpus):
    raw, _ = corpus
    (det,) = io.read_detectors(raw / NIGHT / "unexposed.fits", IOConfig())
    rows = det.mask.all(axis=1)
    assert rows[80:88].all() and rows.sum() == 8 and not det.mask.all(axis=0).any()


def test_integer_data_types_read_as_their_physical_values(corpus):
    raw, _ = corpus
    ref = io.read_detectors(raw / NIGHT / "good.fits", IOConfig())[0].data
    for name in ("uint16", "int64", "float64", "bscale"):
        (det,) = io.read_detectors(raw / NIGHT / f"{name}.fits", IOConfig())
        assert det.data.dtype == np.float32 and det.data.dtype.isnative
        assert np.abs(det.data - ref).max() <= 1.0, name  # integer steps at most


# -------------------------------------------------------------------- the whole night


def _rows(out):
    table = pads.dataset(Path(out) / "catalogs" / "exposures", format="parquet",
                         partitioning="hive").to_table()
    return table.to_pylist()


@pytest.fixture(scope="module")
def corpus_night(corpus, tmp_path_factory):
    from survey_qa.flows.nightly import run_night

    raw, expect = corpus
    out = tmp_path_factory.mktemp("out")
    cfg = load_config(overrides={
        "run": {"raw_root": str(raw), "out_root": str(out), "progress": False,
                "classifier": "rules", "min_free_mb": 1.0},
        "cluster": {"workers": 2, "dashboard_address": None},
        "autoencoder": {"write_fits_masks": True}, "psf": {"min_stars": 3}})
    summary = run_night(cfg, NIGHT, echo=lambda *a: None)
    return out, summary, expect


def test_the_corpus_night_completes_with_a_row_for_every_file(corpus_night):
    out, summary, expect = corpus_night
    rows = _rows(out)
    assert summary.n_files == len(expect)
    by_exp = {}
    for r in rows:
        by_exp.setdefault(r["exposure"], []).append(r)
    assert set(by_exp) == set(expect)  # no row lost
    keys = [(r["exposure"], r["detector"]) for r in rows]
    assert len(keys) == len(set(keys))  # no duplicate row
    wrong = {}
    for exposure, (status, pattern) in expect.items():
        first = by_exp[exposure][0]
        text = first["error"] if status == "failed" else " ".join(
            decode_flags(first["qa_flags"]))
        if first["status"] != status or (pattern and not re.search(pattern.lstrip("@"), text)):
            wrong[exposure] = (first["status"], text)
    assert not wrong
    for r in rows:
        assert "\n" not in r["error"]
        if r["status"] == "ok":  # no ok row with placeholder values
            assert math.isfinite(r["sky_level"]) and r["sky_noise"] > 0


def test_calibration_frames_have_their_type_and_no_class(corpus_night):
    rows = {(r["exposure"], r["detector"]): r for r in _rows(corpus_night[0])}
    for name, kind in (("bias", "bias"), ("zeroexp", "bias"), ("skyflat", "flat")):
        (row,) = [r for (e, _), r in rows.items() if e == name]
        assert row["image_type"] == kind and row["status"] == "failed"
        assert row["exptime_s"] == (0.0 if kind == "bias" else 60.0)
    assert rows[("good", "0")]["image_type"] == "light"


def test_huge_headers_do_not_inflate_the_arrays(corpus_night):
    import zarr

    root = zarr.open_group(str(corpus_night[1].arrays), mode="r")
    if "ae_mask" in root:
        assert root["ae_mask"].shape[1:] == (math.ceil(N / 128), math.ceil(N / 128)) or max(
            root["ae_mask"].shape[1:]) <= 2


def test_masks_written_for_odd_names(corpus_night):
    out = corpus_night[0]
    masks = Path(out) / "masks" / f"night={NIGHT}"
    if not any(masks.glob("*.fits")):
        pytest.skip("no autoencoder weights: no masks")
    assert (masks / "with space é.fits").exists()
    with fits.open(masks / "dupext.fits") as hdul:
        assert [h.name for h in hdul[1:]] == ["SCI", "SCI#2"]


def test_contract_checker_on_the_corpus(corpus_night):
    assert_contract_holds(corpus_night[0])
