"""All file I/O of the pipeline: FITS in, Parquet and Zarr out.

Reading turns a FITS file (single image, mosaic, tile-compressed ``.fz`` or ``.gz``) into
:class:`~survey_qa.pipeline.records.DetectorImage` records: native float32 pixels, a bad-pixel
mask and the header facts after configuration fallbacks. Anything wrong with the data raises
:class:`~survey_qa.pipeline.errors.QualityError` with a one-line reason.

Writing is atomic: a file is written under a hidden temporary name in its final folder and
renamed into place, so a reader never sees a half-written catalog.
"""
from __future__ import annotations

import math
import os
import re
import uuid
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from astropy.io import fits
from astropy.time import Time

from survey_qa.config import IOConfig
from survey_qa.pipeline.errors import QualityError
from survey_qa.pipeline.flags import bits
from survey_qa.pipeline.records import DetectorImage, FrameMeta

FITS_SUFFIXES = (".fits.fz", ".fits.gz", ".fit.gz", ".fts.gz", ".fits", ".fit", ".fts")

# Header keywords tried in order for each quantity.
KEYS = {
    "exptime_s": ("EXPTIME", "EXPOSURE", "EXP_TIME"),
    "filter": ("FILTER", "FILTER1", "FILTNAME", "BAND"),
    "airmass": ("AIRMASS", "SECZ"),
    "gain_e_per_adu": ("GAIN", "EGAIN", "CCDGAIN"),
    "read_noise_e": ("RDNOISE", "READNOIS", "RON", "READNOISE"),
    "saturate_adu": ("SATURATE", "SATLEVEL", "SATURATION"),
    "object": ("OBJECT",),
    "expnum": ("EXPNUM", "FRAMENUM", "EXPID"),
    "pixscale_arcsec": ("PIXSCALE", "SECPIX", "PIXSCAL1", "SCALE"),
}
# Keywords whose absence is recorded as a fallback (the others are optional).
EXPECTED = ("exptime_s", "gain_e_per_adu", "read_noise_e", "saturate_adu")
MOSTLY_SATURATED = 0.5
LARGELY_SATURATED = 0.05


# ---------------------------------------------------------------------------- discovery


def exposure_id(path: str | os.PathLike) -> str:
    """The exposure id: the file name without its FITS suffixes."""
    name = Path(path).name
    for suffix in FITS_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def discover_night(raw_root: str | os.PathLike, night: str) -> list[Path]:
    """FITS files of one night, sorted, sub-folders included.

    Files and folders whose names start with ``.`` or ``_`` are skipped (hidden files,
    simulator truth). Raises ``ValueError`` when the night folder does not exist.
    """
    folder = Path(raw_root) / night
    if not folder.is_dir():
        raise ValueError(f"no night folder {folder}")
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")))
        for name in filenames:
            if not name.startswith((".", "_")) and name.lower().endswith(FITS_SUFFIXES):
                found.append(Path(dirpath) / name)
    found.sort()
    ids = [exposure_id(p) for p in found]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"two files give the same exposure id: {dupes[:5]}")
    return found


# ---------------------------------------------------------------------------- reading


def _open(path: Path) -> fits.HDUList:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hdul = fits.open(path, memmap=False, lazy_load_hdus=False)
    except Exception as e:  # astropy raises OSError, ValueError, TypeError, EOFError...
        raise QualityError(f"unreadable FITS file: {type(e).__name__}: {e}") from None
    return hdul


def _is_image(hdu, cfg: IOConfig) -> bool:
    if not isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)):
        return False
    shape = tuple(hdu.shape or ())  # from the header: the data are not read
    return len(shape) >= 2 and math.prod(shape[-2:]) >= cfg.min_image_pixels


def _detector_name(hdu, index: int) -> str:
    name = hdu.header.get("EXTNAME")
    if isinstance(hdu, fits.CompImageHDU) and name == "COMPRESSED_IMAGE":
        name = None
    return str(name).strip() if name else str(index)


def read_detectors(path: str | os.PathLike, cfg: IOConfig) -> list[DetectorImage | QualityError]:
    """Read every detector (image HDU) of one exposure file.

    Returns one entry per detector: a :class:`DetectorImage`, or the :class:`QualityError`
    that made that detector unreadable (the others are still returned).

    Raises
    ------
    QualityError
        When the file itself cannot be read or holds no image.
    """
    path = Path(path)
    with _open(path) as hdul:
        try:
            indices = [i for i, h in enumerate(hdul) if _is_image(h, cfg)]
        except Exception as e:
            raise QualityError(f"corrupt FITS structure: {type(e).__name__}: {e}") from None
        if not indices:
            raise QualityError("no image HDU in the file")
        primary = hdul[0].header
        out: list[DetectorImage | QualityError] = []
        for i in indices:
            det = _detector_name(hdul[i], i)
            try:
                out.append(_read_hdu(hdul[i], primary if i else None, path, i, det,
                                     len(indices), cfg))
            except QualityError as e:
                e.metadata.update(detector=det, hdu=i)
                out.append(e)
            except Exception as e:  # truncated or corrupt data of this HDU
                out.append(QualityError(f"unreadable HDU {i}: {type(e).__name__}: {e}",
                                        detector=det, hdu=i))
        return out


def read_exposure(path: str | os.PathLike, cfg: IOConfig) -> list[DetectorImage]:
    """Every detector of an exposure; raises the first :class:`QualityError` met."""
    dets = read_detectors(path, cfg)
    for d in dets:
        if isinstance(d, QualityError):
            raise d
    return dets


def _read_hdu(hdu, primary: fits.Header | None, path: Path, index: int, det: str,
              n_detectors: int, cfg: IOConfig) -> DetectorImage:
    header = fits.Header(primary) if primary is not None else fits.Header()
    header.update(hdu.header)  # extension keywords win over the primary header's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = hdu.data
    if raw is None:
        raise QualityError("image HDU without data")
    data = np.asarray(raw)
    while data.ndim > 2 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 2:
        raise QualityError(f"image of shape {data.shape} is not 2-D")
    data = np.ascontiguousarray(data, dtype=np.float32)  # native order, as sep needs
    flags = 0

    meta = read_meta(header, cfg)
    if meta.fallbacks:
        flags |= bits("HEADER_FALLBACK")
    if meta.pixscale_source == "none":
        flags |= bits("NO_PIXSCALE")

    data, trimmed = _trim_overscan(data, header, cfg)
    if trimmed:
        flags |= bits("OVERSCAN_TRIMMED")

    finite = np.isfinite(data)
    if not finite.any():
        raise QualityError("no finite pixel (all NaN or infinite)")
    if not finite.all():
        flags |= bits("NONFINITE_PIXELS")
    lo, hi = np.min(data, where=finite, initial=np.inf), np.max(data, where=finite,
                                                                initial=-np.inf)
    if lo == hi:
        raise QualityError(f"constant frame: every finite pixel is {lo:g}")

    if not math.isfinite(meta.saturate_adu):
        n_at_max = int(np.count_nonzero(data == hi))
        if n_at_max >= cfg.saturate_min_pixels:
            meta.saturate_adu = float(hi)
            flags |= bits("SATURATION_INFERRED")
    mask = ~finite
    if math.isfinite(meta.saturate_adu):
        saturated = finite & (data >= meta.saturate_adu)
        frac = float(saturated.mean())
        if frac > MOSTLY_SATURATED:
            raise QualityError(f"mostly saturated: {100 * frac:.0f}% of pixels at or above "
                               f"{meta.saturate_adu:g} ADU")
        if frac > LARGELY_SATURATED:
            flags |= bits("SATURATED_LARGE")
        mask |= saturated
    data[~finite] = 0.0

    if _is_bayer(header, cfg):
        data, mask = bin2x2(data), bin2x2(mask.astype(np.float32)) > 0
        if math.isfinite(meta.pixscale_arcsec):
            meta.pixscale_arcsec *= 2
        if math.isfinite(meta.saturate_adu):
            meta.saturate_adu *= 4
        flags |= bits("BAYER_BINNED")

    return DetectorImage(exposure=exposure_id(path), detector=det, hdu=index, path=str(path),
                         data=np.ascontiguousarray(data), mask=np.ascontiguousarray(mask),
                         meta=meta, n_detectors=n_detectors, qa_flags=flags)


def bin2x2(a: np.ndarray) -> np.ndarray:
    """Sum 2x2 blocks (an odd last row or column is dropped)."""
    ny, nx = (a.shape[0] // 2) * 2, (a.shape[1] // 2) * 2
    a = a[:ny, :nx]
    return (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]).astype(np.float32)


def _is_bayer(header: fits.Header, cfg: IOConfig) -> bool:
    if cfg.bayer == "none":
        return False
    if cfg.bayer == "bin2x2":
        return True
    for key in ("BAYERPAT", "COLORTYP", "CFA-PAT", "FILTER"):
        if re.fullmatch(r"[RGB]{4}", str(header.get(key, "")).strip().upper()):
            return True
    return False


_SECTION = re.compile(r"\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]")


def _section(text) -> tuple[slice, slice] | None:
    """A FITS section '[x1:x2,y1:y2]' (1-based, inclusive) as numpy slices (y, x)."""
    m = _SECTION.fullmatch(str(text).strip()) if text else None
    if not m:
        return None
    x1, x2, y1, y2 = (int(v) for v in m.groups())
    return slice(min(y1, y2) - 1, max(y1, y2)), slice(min(x1, x2) - 1, max(x1, x2))


def _trim_overscan(data: np.ndarray, header: fits.Header, cfg: IOConfig):
    if cfg.overscan == "none":
        return data, False
    datasec = _section(header.get("TRIMSEC") or header.get("DATASEC"))
    if datasec is None:
        return data, False
    ys, xs = datasec
    if ys.stop > data.shape[0] or xs.stop > data.shape[1]:
        return data, False
    if (ys.stop - ys.start, xs.stop - xs.start) == data.shape:
        return data, False
    biassec = _section(header.get("BIASSEC"))
    bias = 0.0
    if biassec is not None:
        region = data[biassec]
        if region.size and np.isfinite(region).any():
            bias = float(np.nanmedian(region))
    return np.ascontiguousarray(data[ys, xs] - np.float32(bias)), True


def _first(header: fits.Header, keys: tuple[str, ...]):
    for k in keys:
        v = header.get(k)
        if v is not None and str(v).strip() != "":
            return v
    return None


def _as_float(value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def read_meta(header: fits.Header, cfg: IOConfig) -> FrameMeta:
    """Header facts with configuration fallbacks; see io-contract.md for the keywords."""
    meta = FrameMeta()
    fallbacks = []
    config_value = {"gain_e_per_adu": cfg.gain_e_per_adu, "read_noise_e": cfg.read_noise_e,
                    "saturate_adu": cfg.saturate_adu}
    for name in ("exptime_s", "airmass", "gain_e_per_adu", "read_noise_e", "saturate_adu"):
        value = _as_float(_first(header, KEYS[name]))
        if math.isnan(value) and name in config_value and config_value[name] is not None:
            value = float(config_value[name])
        if math.isnan(_as_float(_first(header, KEYS[name]))) and name in EXPECTED:
            fallbacks.append(KEYS[name][0])
        setattr(meta, name, value)
    for name in ("filter", "object", "expnum"):
        value = _first(header, KEYS[name])
        setattr(meta, name, "" if value is None else str(value).strip())
    meta.date_obs, meta.mjd_obs = parse_date(header)
    if not meta.date_obs and math.isnan(meta.mjd_obs):
        fallbacks.append("DATE-OBS")
    meta.pixscale_arcsec, meta.pixscale_source = pixel_scale(header, cfg)
    meta.fallbacks = tuple(fallbacks)
    return meta


def parse_date(header: fits.Header) -> tuple[str, float]:
    """(ISO date-time, MJD) from DATE-OBS / MJD-OBS; ('', NaN) when neither is usable.

    Old-style dates ``dd/mm/yy`` (years since 1900, as some plate scans and older
    cameras write them, e.g. ``29/11/51`` or ``26/07/102``) are understood too.
    """
    mjd = _as_float(header.get("MJD-OBS"))
    text = str(header.get("DATE-OBS", "") or "").strip()
    time_text = str(header.get("TIME-OBS", header.get("UT", "")) or "").strip()
    iso = ""
    m = re.fullmatch(r"(\d{1,2})/(\d{1,2})/(\d{2,3})", text)
    if m:
        day, month, year = (int(v) for v in m.groups())
        text = f"{1900 + year:04d}-{month:02d}-{day:02d}"
    if text:
        if "T" not in text and re.fullmatch(r"\d{1,2}:\d{2}:\d{2}(\.\d*)?", time_text):
            text = f"{text}T{time_text}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t = Time(text, format="isot" if "T" in text else "iso", scale="utc")
                iso = t.isot
                if math.isnan(mjd):
                    mjd = float(t.mjd)
        except ValueError:
            iso = ""
    if not iso and not math.isnan(mjd):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            iso = Time(mjd, format="mjd", scale="utc").isot
    return iso, mjd


def pixel_scale(header: fits.Header, cfg: IOConfig) -> tuple[float, str]:
    """Pixel scale (arcsec/px) and where it came from: wcs, keyword, config or none."""
    if any(k in header for k in ("CD1_1", "CDELT1", "PC1_1")) and "CTYPE1" in header:
        from astropy.wcs import WCS
        from astropy.wcs.utils import proj_plane_pixel_scales

        linear = header.copy(strip=True)
        for key in [k for k in linear if re.match(r"(A|B|AP|BP)_(\d+_\d+|ORDER|DMAX)$", k)]:
            del linear[key]  # SIP distortion does not change the scale at the reference pixel
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wcs = WCS(linear, naxis=2).celestial
            if wcs.naxis == 2:
                scales = proj_plane_pixel_scales(wcs) * 3600.0
                scale = float(np.sqrt(scales[0] * scales[1]))
                if math.isfinite(scale) and 1e-3 < scale < 3600:
                    return scale, "wcs"
        except Exception:  # a broken WCS falls back to keywords
            pass
    value = _as_float(_first(header, KEYS["pixscale_arcsec"]))
    if not (math.isfinite(value) and value > 0):  # photographic plates: arcsec/mm x mm/px
        value = _as_float(header.get("PLTSCALE")) * _as_float(header.get("XPIXELSZ")) / 1000
    if not (math.isfinite(value) and value > 0):  # camera pixel (um) and focal length (mm)
        value = 206.265 * _as_float(header.get("XPIXSZ")) / _as_float(header.get("FOCALLEN"))
    if math.isfinite(value) and value > 0:
        return value, "keyword"
    if cfg.pixscale_arcsec is not None:
        return float(cfg.pixscale_arcsec), "config"
    return math.nan, "none"


# ---------------------------------------------------------------------------- Parquet


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write ``table`` to ``path`` via a hidden temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_parquet_folder(folder: str | os.PathLike, schema: pa.Schema) -> pa.Table:
    """All Parquet files directly in ``folder`` as one table (empty when none)."""
    files = sorted(str(p) for p in Path(folder).glob("*.parquet"))
    if not files:
        return schema.empty_table()
    return pads.dataset(files, schema=schema, format="parquet").to_table()


def consolidate(parts: pa.Table, out_root: str | os.PathLike, catalog: str, night: str) -> Path:
    """Write one night's partition of a catalog as a single file, atomically.

    The result is ``<out_root>/catalogs/<catalog>/night=<night>/part-0.parquet``; the
    ``night`` column is carried by the folder name (Hive partitioning).
    """
    target = Path(out_root) / "catalogs" / catalog / f"night={night}" / "part-0.parquet"
    return write_parquet_atomic(parts, target)


# ---------------------------------------------------------------------------- FITS masks


def mask_fits_path(out_root: str | os.PathLike, night: str, exposure: str) -> Path:
    return Path(out_root) / "masks" / f"night={night}" / f"{exposure}.fits"


def write_mask_fits(path: str | os.PathLike, masks: dict[str, np.ndarray],
                    cards: dict[str, tuple]) -> Path:
    """Write full-resolution masks, one PLIO-compressed uint8 HDU per detector, atomically.

    Parameters
    ----------
    masks
        ``{detector: (ny, nx) bool}``; each HDU is named after its detector.
    cards
        Header keywords of every HDU, ``{KEY: (value, comment)}``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hdus = [fits.PrimaryHDU()]
    for detector, mask in masks.items():
        hdu = fits.CompImageHDU(np.asarray(mask, dtype=np.uint8), name=detector,
                                compression_type="PLIO_1")
        for key, (value, comment) in cards.items():
            hdu.header[key] = (value, comment)
        hdus.append(hdu)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        fits.HDUList(hdus).writeto(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------- Zarr


def zarr_path(out_root: str | os.PathLike, night: str) -> Path:
    return Path(out_root) / "arrays" / f"{night}.zarr"


def setup_zarr(path: str | os.PathLike, frames: list[tuple[str, str]], variables: dict) -> dict:
    """Create (or extend) the night's array store and return each frame's index.

    Parameters
    ----------
    frames
        (exposure, detector) of every detector of the night. A frame already in the store
        keeps its index; new ones are appended, so a re-run writes to the same place.
    variables
        name -> (per-frame shape, dimension names after "frame", dtype, fill value).

    Returns
    -------
    dict
        (exposure, detector) -> frame index.
    """
    import zarr

    path = Path(path)
    root = zarr.open_group(str(path), mode="a", zarr_format=3)
    known: list[tuple[str, str]] = []
    if "exposure" in root:
        known = list(zip(root["exposure"][:].tolist(), root["detector"][:].tolist()))
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
            if root[name].shape != full:
                root[name].resize(full)
            continue
        root.create_array(name, shape=full, dtype=dtype, chunks=(1, *shape),
                          fill_value=fill, dimension_names=("frame", *dims),
                          attributes={"coordinates": "exposure detector"})
    return index


def write_frame(path: str | os.PathLike, index: int, values: dict[str, np.ndarray]) -> None:
    """Write one frame's arrays into its own chunk-aligned region of the store."""
    import zarr

    root = zarr.open_group(str(path), mode="r+")
    for name, value in values.items():
        arr = root[name]
        block = np.full(arr.shape[1:], arr.fill_value, dtype=arr.dtype)
        value = np.asarray(value, dtype=arr.dtype)
        block[tuple(slice(0, s) for s in value.shape)] = value
        arr[index] = block
