"""Are two output folders' catalogs and arrays the same, timings and run times aside?

    python bench/same_catalogs.py OUT_A OUT_B [--night N ...]

Compares, night by night, the exposure and source catalogs of two runs of the nightly job
on the same frames (e.g. two versions of survey-qa), and the variables of their array
stores. Columns that describe the run rather than the frames (``processed_at``, the stage
timings ``t_*_s``, ``pipeline_version``) are left out. Floats must agree exactly (NaN
equal to NaN) unless ``--rtol`` is given. Prints one line per night and catalog, and the
first differing columns; exits 1 when anything differs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from survey_qa import paths

RUN_COLUMNS = ("processed_at", "pipeline_version")
KEYS = {"exposures": ["exposure", "detector"], "sources": ["exposure", "detector", "id"]}


def _table(out: Path, catalog: str, night: str) -> pd.DataFrame:
    df = pd.read_parquet(paths.catalog_file(out, catalog, night))
    drop = [c for c in df.columns if c in RUN_COLUMNS or (c.startswith("t_") and c.endswith("_s"))]
    return df.drop(columns=drop).sort_values(KEYS[catalog]).reset_index(drop=True)


def _same_cell(x, y) -> bool:
    if isinstance(x, (list, np.ndarray)) and isinstance(y, (list, np.ndarray)):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        return x.shape == y.shape and np.array_equal(x, y, equal_nan=True)
    return x == y or (x != x and y != y)


def _same(a: pd.Series, b: pd.Series, rtol: float) -> bool:
    if a.dtype.kind == "f" and b.dtype.kind == "f":
        return bool(np.allclose(a.to_numpy(), b.to_numpy(), rtol=rtol, atol=0, equal_nan=True))
    if a.dtype == object:  # lists (grids of floats) and strings
        return all(_same_cell(x, y) for x, y in zip(a, b))
    return a.equals(b)


def compare_tables(a: pd.DataFrame, b: pd.DataFrame, rtol: float = 0.0) -> list[str]:
    """Names of the differing columns (or a line about rows and columns)."""
    if len(a) != len(b):
        return [f"{len(a)} rows against {len(b)}"]
    if list(a.columns) != list(b.columns):
        return [f"columns differ: {sorted(set(a.columns) ^ set(b.columns))}"]
    return [c for c in a.columns if not _same(a[c], b[c], rtol)]


def compare_arrays(a: Path, b: Path, rtol: float = 0.0) -> list[str]:
    """Names of the array-store variables that differ."""
    da = xr.open_zarr(a, consolidated=False)
    db = xr.open_zarr(b, consolidated=False)
    if set(da.data_vars) != set(db.data_vars):
        return [f"variables differ: {sorted(set(da.data_vars) ^ set(db.data_vars))}"]
    out = []
    for name in sorted(da.data_vars):
        x, y = da[name].values, db[name].values
        same = (np.allclose(x, y, rtol=rtol, atol=0, equal_nan=True)
                if x.dtype.kind == "f" else np.array_equal(x, y))
        if x.shape != y.shape or not same:
            out.append(name)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_a", type=Path)
    p.add_argument("out_b", type=Path)
    p.add_argument("--night", action="append", help="default: every night of OUT_A")
    p.add_argument("--rtol", type=float, default=0.0, help="relative tolerance on floats")
    a = p.parse_args(argv)
    nights = a.night or paths.catalog_nights(a.out_a)
    differs = False
    for night in nights:
        for catalog in paths.CATALOGS:
            ta, tb = _table(a.out_a, catalog, night), _table(a.out_b, catalog, night)
            diff = compare_tables(ta, tb, a.rtol)
            differs |= bool(diff)
            print(f"{night} {catalog:<9} {len(ta):>6} rows  "
                  + ("identical" if not diff else "DIFFER: " + ", ".join(diff[:12])))
        diff = compare_arrays(paths.zarr_store(a.out_a, night), paths.zarr_store(a.out_b, night),
                              a.rtol)
        differs |= bool(diff)
        print(f"{night} arrays    " + ("identical" if not diff else "DIFFER: " + ", ".join(diff)))
    return int(differs)


if __name__ == "__main__":
    sys.exit(main())
