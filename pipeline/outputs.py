"""Everything the pipeline writes: catalogs, mask files and the night's array store.

Catalogs are zstd-compressed Parquet, one file per night partition; masks are FITS files
with one PLIO-compressed HDU per detector; the night's arrays (maps, stamps, masks) live in
one Zarr store with one chunk-aligned region per frame, which is also read back here.

Writing is atomic (:mod:`survey_qa.atomic`), so a reader never sees a half-written catalog
or mask file; every output path comes from :mod:`survey_qa.paths`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits

from survey_qa import paths
from survey_qa.atomic import atomic_target
from survey_qa.pipeline.errors import exception_text


# ---------------------------------------------------------------------------- Parquet


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write ``table`` to ``path`` (zstd-compressed Parquet), atomically."""
    with atomic_target(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return Path(path)


def consolidate(parts: pa.Table, out_root: str | os.PathLike, catalog: str, night: str) -> Path:
    """Write one night's partition of a catalog as a single file, atomically.

    The result is :func:`survey_qa.paths.catalog_file`; the ``night`` column is carried by
    the folder name (Hive partitioning).
    """
    return write_parquet_atomic(parts, paths.catalog_file(out_root, catalog, night))


# ---------------------------------------------------------------------------- FITS masks


def fits_text(value: str, limit: int = 68) -> str:
    """A header-safe version of any text: printable ASCII, non-ASCII letters escaped."""
    text = str(value).encode("ascii", "backslashreplace").decode("ascii")
    text = "".join(c if 32 <= ord(c) < 127 else "?" for c in text)
    return text[:limit]


def write_mask_fits(path: str | os.PathLike, masks: dict[str, np.ndarray],
                    cards: dict[str, tuple]) -> Path:
    """Write full-resolution masks, one PLIO-compressed uint8 HDU per detector, atomically.

    Parameters
    ----------
    masks
        ``{detector: (ny, nx) bool}``; each HDU is named after its detector (made
        printable ASCII, as FITS headers require; ``DETECTOR`` keeps the escaped id).
    cards
        Header keywords of every HDU, ``{KEY: (value, comment)}``; text values are made
        printable ASCII (a file name with spaces or accents is escaped, never refused).
    """
    hdus = [fits.PrimaryHDU()]
    for detector, mask in masks.items():
        hdu = fits.CompImageHDU(np.asarray(mask, dtype=np.uint8), name=fits_text(detector),
                                compression_type="PLIO_1")
        hdu.header["DETECTOR"] = (fits_text(detector), "detector id in the catalog")
        for key, (value, comment) in cards.items():
            if isinstance(value, str):
                value = fits_text(value)
            hdu.header[key] = (value, fits_text(comment, 40))
        hdus.append(hdu)
    with atomic_target(path) as tmp:
        fits.HDUList(hdus).writeto(tmp)
    return Path(path)


# ---------------------------------------------------------------------------- Zarr


def setup_zarr(path: str | os.PathLike, frames: list[tuple[str, str]], variables: dict) -> dict:
    """Create (or extend) the night's array store and return each frame's index.

    Parameters
    ----------
    frames
        (exposure, detector) of every detector of the night. A frame already in the store
        keeps its index; new ones are appended, so a re-run writes to the same place.
    variables
        name -> (per-frame shape, dimension names after "frame", dtype, fill value). An
        existing variable keeps its per-frame shape (a frame larger than it gets its
        arrays skipped, see :func:`write_frame`).

    Returns
    -------
    dict
        (exposure, detector) -> frame index.

    Raises
    ------
    StoreDamaged
        When an existing store cannot be read (a damaged ``zarr.json`` or coordinate
        chunk); the caller rebuilds it.
    """
    import zarr

    path = Path(path)
    known: list[tuple[str, str]] = []
    try:
        root = zarr.open_group(str(path), mode="a", zarr_format=3)
        if "exposure" in root:
            known = list(zip(root["exposure"][:].tolist(), root["detector"][:].tolist()))
        for name in variables:
            if name in root:
                root[name].shape  # noqa: B018 -- reads the array's metadata
    except Exception as e:
        raise StoreDamaged(f"damaged array store {path}: {type(e).__name__}: {exception_text(e)}"
                           ) from None
    index = {key: i for i, key in enumerate(known)}
    for key in frames:
        if key not in index:
            index[key] = len(index)
    order = sorted(index, key=index.get)
    n = len(order)
    coords = {"exposure": np.array([k[0] for k in order], dtype=object),
              "detector": np.array([k[1] for k in order], dtype=object)}
    for name, values in coords.items():  # small: rewritten whole
        if name in root:
            del root[name]
        arr = root.create_array(name, shape=(n,), dtype=str, chunks=(max(n, 1),),
                                dimension_names=("frame",))
        arr[:] = values
    for name, (shape, dims, dtype, fill) in variables.items():
        full = (n, *shape)
        if name in root:
            if root[name].shape[0] != n:
                root[name].resize((n, *root[name].shape[1:]))
            continue
        root.create_array(name, shape=full, dtype=dtype, chunks=(1, *shape),
                          fill_value=fill, dimension_names=("frame", *dims),
                          attributes={"coordinates": "exposure detector"})
    return index


class StoreDamaged(Exception):
    """The night's array store exists but cannot be read."""


def store_damage(path: str | os.PathLike) -> str | None:
    """Why an existing array store cannot be used, or None (also when there is none).

    Reads the group and array metadata, the coordinates and the per-frame stamp counts:
    a damaged ``zarr.json`` or chunk there is found before any work starts.
    """
    import zarr

    path = Path(path)
    if not path.exists():
        return None
    try:
        root = zarr.open_group(str(path), mode="r")
        for name in ("exposure", "detector", "n_stamps"):
            if name in root:
                root[name][:]
        for _, arr in root.arrays():
            arr.shape  # noqa: B018 -- reads the array's metadata
    except Exception as e:
        return f"damaged array store {path}: {type(e).__name__}: {exception_text(e)}"
    return None


def remove_store(path: str | os.PathLike) -> None:
    """Remove a night's array store (to rebuild it)."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def store_frames(path: str | os.PathLike, variable: str | None = None
                 ) -> dict[tuple[str, str], int]:
    """(exposure, detector) -> frame index of the night's array store.

    Empty when the store has no frames yet, or lacks ``variable`` when one is named.
    """
    import zarr

    root = zarr.open_group(str(path), mode="r")
    if "exposure" not in root or (variable is not None and variable not in root):
        return {}
    keys = zip(root["exposure"][:].tolist(), root["detector"][:].tolist())
    return {k: i for i, k in enumerate(keys)}


def variable_shape(path: str | os.PathLike, name: str) -> tuple[int, ...] | None:
    """The per-frame shape of the store's array ``name``; None when there is no store or
    no such array."""
    import zarr

    if not Path(path).exists():
        return None
    root = zarr.open_group(str(path), mode="r")
    return tuple(root[name].shape[1:]) if name in root else None


def read_frames(path: str | os.PathLike, name: str, index: dict) -> dict:
    """Frames' array ``name`` from the store: ``{key: array}`` for ``{key: frame index}``.

    Empty when the store has no such array.
    """
    import zarr

    root = zarr.open_group(str(path), mode="r")
    if name not in root:
        return {}
    arr = root[name]
    return {key: arr[i] for key, i in index.items()}


def write_frame(path: str | os.PathLike, index: int, values: dict[str, np.ndarray]) -> bool:
    """Write one frame's arrays into its own chunk-aligned region of the store.

    Returns False (and writes nothing) when a value is larger than the store's per-frame
    shape, e.g. a detector larger than every frame planned for the night.
    """
    import zarr

    root = zarr.open_group(str(path), mode="r+")
    blocks = {}
    for name, value in values.items():
        arr = root[name]
        value = np.asarray(value, dtype=arr.dtype)
        if value.ndim != arr.ndim - 1 or any(v > s for v, s in zip(value.shape, arr.shape[1:])):
            return False
        block = np.full(arr.shape[1:], arr.fill_value, dtype=arr.dtype)
        block[tuple(slice(0, s) for s in value.shape)] = value
        blocks[name] = block
    for name, block in blocks.items():
        root[name][index] = block
    return True
