"""Outputs: atomic Parquet catalogs, mask FITS files, the night's array store."""
import numpy as np
import pytest
from astropy.io import fits

from survey_qa.pipeline import outputs


def test_atomic_parquet_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"a": [1, 2, 3]})
    target = tmp_path / "cat" / "part-0.parquet"
    outputs.write_parquet_atomic(table, target)
    assert pq.read_table(target).equals(table)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", crash)
    with pytest.raises(OSError):
        outputs.write_parquet_atomic(pa.table({"a": [9]}), target)
    assert pq.read_table(target).equals(table)  # the old whole file is still there
    assert sorted(p.name for p in target.parent.iterdir()) == ["part-0.parquet"]


def test_zarr_layout_is_stable_across_reruns(tmp_path):
    import xarray as xr

    store = tmp_path / "n.zarr"
    variables = {"stamps": ((4, 8, 8), ("star", "y", "x"), "float32", np.nan)}
    first = outputs.setup_zarr(store, [("e1", "0"), ("e2", "ccd1")], variables)
    outputs.write_frame(store, first[("e2", "ccd1")], {"stamps": np.ones((2, 8, 8))})
    again = outputs.setup_zarr(store, [("e3", "0"), ("e2", "ccd1")], variables)
    assert again[("e2", "ccd1")] == first[("e2", "ccd1")] and again[("e3", "0")] == 2
    ds = xr.open_zarr(store, consolidated=False).set_index(frame=["exposure", "detector"])
    one = ds.stamps.sel(exposure="e2", detector="ccd1").values
    assert np.nansum(one) == 128 and np.isnan(one[2:]).all()


def test_store_frames_and_arrays_read_back(tmp_path):
    store = tmp_path / "n.zarr"
    variables = {"sky_map": ((2, 2), ("y", "x"), "float32", np.nan)}
    assert outputs.variable_shape(store, "sky_map") is None  # no store yet
    index = outputs.setup_zarr(store, [("e1", "0"), ("e2", "0")], variables)
    outputs.write_frame(store, index[("e2", "0")], {"sky_map": np.full((2, 2), 7.0)})
    assert outputs.store_frames(store) == index == {("e1", "0"): 0, ("e2", "0"): 1}
    assert outputs.store_frames(store, "ae_mask") == {}  # no such array
    assert outputs.variable_shape(store, "sky_map") == (2, 2)
    got = outputs.read_frames(store, "sky_map", {"b": 1, "a": 0})
    assert np.all(got["b"] == 7.0) and np.isnan(got["a"]).all()
    assert outputs.read_frames(store, "ae_mask", {"a": 0}) == {}


def test_mask_fits_accepts_any_detector_and_exposure_name(tmp_path):
    path = outputs.write_mask_fits(tmp_path / "m.fits", {"CCD é 1": np.ones((8, 8), bool)},
                                   {"EXPOSURE": ("with space é", "exposure")})
    with fits.open(path) as hdul:
        assert hdul[1].header["EXPOSURE"] == "with space \\xe9"
        assert hdul[1].header["DETECTOR"] == "CCD \\xe9 1"
        assert hdul[1].data.sum() == 64
