"""End to end: a tiny night with good and bad files, on a real Dask LocalCluster."""
import math
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from astropy.io import fits

from survey_qa.cli import main
from survey_qa.config import load_config
from survey_qa.flows import workdir
from survey_qa.flows.nightly import run_night
from survey_qa.pipeline.flags import decode_flags

from contract import assert_contract_holds
from synthetic import star_field

NIGHT = "2024-03-01"


def header(**extra):
    h = fits.Header({"EXPTIME": 60.0, "GAIN": 1.0, "RDNOISE": 3.0, "SATURATE": 60000.0,
                     "DATE-OBS": "2024-03-02T02:00:00", "FILTER": "r", "PIXSCALE": 0.3})
    h.update(extra)
    return h


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """A night folder with every kind of file the flow must survive."""
    raw = tmp_path_factory.mktemp("raw")
    d = raw / NIGHT
    d.mkdir()
    for i in range(3):
        fits.PrimaryHDU(star_field(seed=i), header()).writeto(d / f"good{i}.fits")
    fits.PrimaryHDU(star_field(seed=5, elongate=3.0), header()).writeto(d / "trailed.fits")
    mosaic = [fits.PrimaryHDU(header=header())]
    mosaic += [fits.ImageHDU(star_field(seed=10 + k), name=f"CCD{k}") for k in range(2)]
    mosaic.append(fits.ImageHDU(np.full((256, 256), np.nan, np.float32), name="CCD2"))
    fits.HDUList(mosaic).writeto(d / "mosaic.fits")
    fits.PrimaryHDU(star_field(seed=20), header()).writeto(d / "whole.fits")
    (d / "truncated.fits").write_bytes((d / "whole.fits").read_bytes()[:2880 * 30])
    (d / "whole.fits").unlink()
    (d / "notfits.fits").write_text("SIMPLE? no: a text file\n" * 200)
    fits.PrimaryHDU(np.full((256, 256), np.nan, np.float32), header()).writeto(d / "nan.fits")
    fits.PrimaryHDU(np.full((256, 256), 7.0, np.float32), header()).writeto(d / "const.fits")
    noise = np.random.default_rng(3).normal(200, 3, (256, 256)).astype(np.float32)
    fits.PrimaryHDU(noise, header()).writeto(d / "nostars.fits")
    fits.PrimaryHDU(star_field(seed=30)).writeto(d / "bareheader.fits")
    sat = star_field(seed=40)
    sat[:200] = 60000.0
    fits.PrimaryHDU(sat, header()).writeto(d / "saturated.fits")
    return raw


def config(raw, out, **run):
    return load_config(overrides={
        "run": {"raw_root": str(raw), "out_root": str(out), "progress": False,
                "classifier": "rules", **run},
        "cluster": {"workers": 2, "dashboard_address": None},
        "autoencoder": {"write_fits_masks": True},
        "psf": {"min_stars": 3}})


def read_rows(out):
    table = pads.dataset(Path(out) / "catalogs" / "exposures", format="parquet",
                         partitioning="hive").to_table()
    return {(r["exposure"], r["detector"]): r for r in table.to_pylist()}


@pytest.fixture(scope="module")
def first_run(night, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    summary = run_night(config(night, out), NIGHT, echo=lambda *a: None)
    return out, summary


def test_every_file_gets_rows_and_the_night_completes(first_run):
    out, summary = first_run
    rows = read_rows(out)
    assert summary.n_files == 12 and summary.n_processed == 12
    assert {e for e, _ in rows} == {"good0", "good1", "good2", "trailed", "mosaic",
                                    "truncated", "notfits", "nan", "const", "nostars",
                                    "bareheader", "saturated"}
    assert all(r["night"] == NIGHT for r in rows.values())


@pytest.mark.parametrize("exposure, reason", [
    ("truncated", "truncated: file holds"), ("notfits", "not a FITS file"),
    ("nan", "no finite pixel"), ("const", "constant frame"), ("saturated", "mostly saturated")])
def test_bad_files_become_failed_rows(first_run, exposure, reason):
    import re

    rows = read_rows(first_run[0])
    (row,) = [r for (e, _), r in rows.items() if e == exposure]
    assert row["status"] == "failed" and re.search(reason, row["error"])


def test_unreadable_mosaic_extension(first_run):
    rows = read_rows(first_run[0])
    assert rows[("mosaic", "CCD2")]["status"] == "failed"
    assert "no finite pixel" in rows[("mosaic", "CCD2")]["error"]
    assert rows[("mosaic", "CCD0")]["status"] == "ok" and rows[("mosaic", "CCD1")]["status"] == "ok"
    summary = rows[("mosaic", "ALL")]
    assert summary["status"] == "ok" and summary["n_detectors"] == 3


def test_frame_without_stars_is_measured_as_nan_with_a_flag(first_run):
    row = read_rows(first_run[0])[("nostars", "0")]
    assert row["status"] == "ok"
    assert math.isnan(row["fwhm_px"]) and row["n_stars_used"] == 0
    assert {"FEW_STARS"} <= set(decode_flags(row["qa_flags"]))


def test_missing_header_keywords(first_run):
    row = read_rows(first_run[0])[("bareheader", "0")]
    assert row["status"] == "ok" and math.isnan(row["fwhm_arcsec"]) and row["fwhm_px"] > 0
    assert {"NO_PIXSCALE", "HEADER_FALLBACK"} <= set(decode_flags(row["qa_flags"]))


def test_measurements_and_classes(first_run):
    rows = read_rows(first_run[0])
    for name in ("good0", "good1", "good2"):
        r = rows[(name, "0")]
        assert r["fwhm_px"] == pytest.approx(3.0, rel=0.1)
        assert r["fwhm_arcsec"] == pytest.approx(0.9, rel=0.1)
        assert r["quality_class"] == "good"
        assert sum(r[f"p_{c}"] for c in ("good", "bad_tracking", "very_bad_tracking",
                                         "bad_seeing", "background_issues")) == pytest.approx(1)
    assert rows[("trailed", "0")]["quality_class"] in ("bad_tracking", "very_bad_tracking")
    assert rows[("trailed", "0")]["ellipticity"] > 0.4


def test_sources_and_arrays(first_run):
    import xarray as xr

    out, summary = first_run
    src = pads.dataset(Path(out) / "catalogs" / "sources", format="parquet",
                       partitioning="hive").to_table().to_pandas()
    assert (src.groupby("exposure").size()["good0"]) >= 20
    ds = xr.open_zarr(summary.arrays, consolidated=False).set_index(
        frame=["exposure", "detector"])
    n = int(ds.n_stamps.sel(exposure="good0", detector="0"))
    stamps = ds.stamps.sel(exposure="good0", detector="0").values[:n]
    assert n >= 10 and np.allclose(stamps.sum(axis=(1, 2)), 1, atol=1e-3)


def test_autoencoder_scores_and_fits_masks(first_run):
    import xarray as xr

    out, summary = first_run
    rows = read_rows(out)
    assert all(rows[(n, "0")]["ae_score"] > 0 for n in ("good0", "good1", "good2"))
    assert "AE_UNAVAILABLE" not in decode_flags(rows[("good0", "0")]["qa_flags"])
    with fits.open(Path(out) / "masks" / f"night={NIGHT}" / "mosaic.fits") as hdul:
        assert [h.name for h in hdul[1:]] == ["CCD0", "CCD1"]  # CCD2 is a failed row
        mask = hdul["CCD1"].data
        block = hdul["CCD1"].header["AEBLOCK"]
    assert mask.shape == (256, 256) and mask.dtype == np.uint8
    ds = xr.open_zarr(summary.arrays, consolidated=False).set_index(
        frame=["exposure", "detector"])
    patches = ds.ae_mask.sel(exposure="mosaic", detector="CCD1").values
    cells = mask[::block, ::block]  # one value per mask cell
    assert np.array_equal(cells, patches[:cells.shape[0], :cells.shape[1]])
    assert rows[("mosaic", "CCD1")]["mask_fraction"] == pytest.approx(mask.mean())
    assert not (Path(out) / "masks" / f"night={NIGHT}" / "truncated.fits").exists()


def test_by_default_the_shipped_models_classify(night, tmp_path):
    import xarray as xr

    summary = run_night(config(night, tmp_path, classifier="auto"), NIGHT,
                        echo=lambda *a: None)
    rows = read_rows(tmp_path)
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert ok and all(r["model_version"].startswith("cnn-") and "+ae1-" in r["model_version"]
                      for r in ok)
    for r in ok:
        assert sum(r[f"p_{c}"] for c in ("good", "bad_tracking", "very_bad_tracking",
                                         "bad_seeing", "background_issues")) == pytest.approx(1)
    assert all(rows[(n, "0")]["quality_class"] == "good" for n in ("good0", "good1", "good2"))
    assert rows[("trailed", "0")]["quality_class"] in ("bad_tracking", "very_bad_tracking")
    ds = xr.open_zarr(summary.arrays, consolidated=False).set_index(
        frame=["exposure", "detector"])
    occupancy = ds.som_occupancy.sel(exposure="good0", detector="0").values
    assert occupancy.sum() == pytest.approx(1.0, abs=1e-5)
    representatives = ds.som_representatives.sel(exposure="good0", detector="0").values
    assert representatives.shape[0] == 4 and np.isfinite(representatives[0]).all()


def test_contract_checker(first_run):
    assert_contract_holds(first_run[0])


def test_duckdb_reads_the_catalog(first_run):
    duckdb = pytest.importorskip("duckdb")
    glob = str(Path(first_run[0]) / "catalogs" / "exposures" / "*" / "*.parquet")
    n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}', hive_partitioning=true) "
                   f"WHERE night = '{NIGHT}' AND status = 'failed'").fetchall()[0][0]
    assert n == 6  # five bad files and one bad mosaic extension


def test_rerun_finishes_only_what_is_missing(night, first_run):
    out, _ = first_run
    before = read_rows(out)
    workdir.result_file(out, NIGHT, "exposures", "good1").unlink()  # as if it crashed there
    summary = run_night(config(night, out), NIGHT, echo=lambda *a: None)
    assert summary.n_processed == 1 and summary.n_skipped == 11
    after = read_rows(out)
    assert after.keys() == before.keys()
    assert after[("good1", "0")]["fwhm_px"] == pytest.approx(before[("good1", "0")]["fwhm_px"])


def test_cli_runs_a_night_and_reports(night, tmp_path, capsys, monkeypatch):
    settings = tmp_path / "qa.yaml"
    settings.write_text("cluster:\n  dashboard_address: null\n")
    monkeypatch.setenv("SURVEY_QA_CONFIG", str(settings))
    code = main(["--night", NIGHT, "--raw-root", str(night), "--out-root", str(tmp_path),
                 "--workers", "1", "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "failed" in text and "exposures catalog" in text
    assert main(["--night", "2031-01-01", "--raw-root", str(night)]) == 2


# -------------------------------------------------------------------- pure pieces of a task


def _detector_row(exposure, detector, cls="good", flags=0):
    from survey_qa.pipeline.schema import empty_exposure_row

    row = empty_exposure_row()
    row.update(exposure=exposure, detector=detector, status="ok", quality_class=cls,
               qa_flags=flags, p_good=1.0, t_background_s=1.0)
    return row


def test_exposure_rows_add_the_mosaic_row_and_the_run_facts():
    from datetime import datetime, timezone

    from survey_qa.pipeline.measure import exposure_level, exposure_rows, failed_row
    from survey_qa.pipeline.errors import QualityError

    when = datetime(2024, 3, 2, tzinfo=timezone.utc)
    dets = [_detector_row("e1", "A", flags=1), _detector_row("e1", "B", flags=2),
            failed_row("x.fits", "e1", "C", QualityError("unreadable HDU 3"))]
    rows = exposure_rows(dets, 3, t_read_s=3.0, t_total_s=9.0, pipeline_version="v",
                         model_version="m", processed_at=when)
    assert [r["detector"] for r in rows] == ["A", "B", "C", "ALL"]
    assert rows[0]["t_read_s"] == 1.0 and math.isnan(rows[2]["t_read_s"])
    assert rows[3]["qa_flags"] == 3 and rows[3]["t_background_s"] == 2.0
    assert all(r["n_detectors"] == 3 and r["processed_at"] == when for r in rows)
    assert [r["t_total_s"] for r in rows if r["status"] == "ok"] == [9.0, 9.0, 9.0]
    assert math.isnan(dets[0]["t_total_s"])  # the detector rows given are left as they were
    assert exposure_level(rows) == [rows[3]]
    single = exposure_rows([_detector_row("e2", "0")], 1, t_read_s=1.0, t_total_s=2.0,
                           pipeline_version="v", model_version="m", processed_at=when)
    assert [r["detector"] for r in single] == ["0"] and exposure_level(single) == single


def test_the_store_is_sized_for_the_largest_detector_and_never_shrinks():
    from survey_qa.pipeline.measure import max_shape

    assert max_shape([(100, 300), (200, 50)], None, 64) == (200, 300)
    assert max_shape([(100, 300)], (4, 2), 64) == (256, 300)
    assert max_shape([], None, 1) == (1, 1)


def test_a_result_whose_arrays_were_not_written_says_so():
    import pandas as pd

    from survey_qa.pipeline.measure import DetectorResult

    result = DetectorResult(row=_detector_row("e1", "0", flags=1), sources=pd.DataFrame(),
                            arrays={}, mask=None)
    skipped = result.arrays_skipped()
    assert "ARRAYS_SKIPPED" in decode_flags(skipped.row["qa_flags"])
    assert result.row["qa_flags"] == 1


def test_a_night_is_tallied_by_exposure():
    from survey_qa.pipeline.errors import QualityError
    from survey_qa.pipeline.measure import failed_row, tally

    mosaic = [_detector_row("m", "A", "bad_seeing"), _detector_row("m", "B", "good"),
              {**_detector_row("m", "ALL", "bad_seeing")}]
    rows = [*mosaic, _detector_row("s", "0"),
            failed_row("f.fits", "f", "ALL", QualityError("not a FITS file"))]
    counts, n_failed, failures = tally(rows)
    assert counts == {"bad_seeing": 1, "good": 1} and n_failed == 1
    assert failures == [("f", "ALL", "not a FITS file")]
