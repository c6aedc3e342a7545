"""Reading frames: FITS files in, detector images with their header facts out.

Discovery finds a night's frames (``.fits``, ``.fit``, ``.fts``; tile-compressed ``.fz``,
``.gz`` or ``.bz2``). Reading turns a single image or a mosaic into
:class:`~survey_qa.pipeline.records.DetectorImage` records: native float32 pixels with the
overscan trimmed, a bad-pixel mask and the header facts after configuration fallbacks
(exposure time, gain, read noise, saturation, date, pixel scale, image type). Anything
wrong with the data raises :class:`~survey_qa.pipeline.errors.QualityError` with a
one-line reason: a damaged compressed stream, a file shorter than its headers announce,
an image too small or too large, a calibration frame, a constant or non-finite frame.
"""
from __future__ import annotations

import bz2
import gzip
import io as _bytes_io
import lzma
import math
import os
import re
import warnings
import zlib
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.time import Time

from survey_qa import paths
from survey_qa.config import IOConfig
from survey_qa.pipeline.errors import QualityError, RunEnvironmentError, exception_text
from survey_qa.pipeline.flags import bits
from survey_qa.pipeline.records import DetectorImage, FrameMeta
from survey_qa.pipeline.sources import saturated_pixels

FITS_SUFFIXES = tuple(f".{base}{comp}" for comp in (".fz", ".gz", ".bz2", "")
                      for base in ("fits", "fit", "fts"))
"""File name endings of a night's frames (case-insensitive), compressed ones first."""

# Header keywords tried in order for each quantity.
KEYS = {
    "exptime_s": ("EXPTIME", "EXPOSURE", "EXP_TIME", "ITIME"),
    "filter": ("FILTER", "FILTER1", "FILTNAME", "BAND"),
    "airmass": ("AIRMASS", "SECZ"),
    "gain_e_per_adu": ("GAIN", "EGAIN", "CCDGAIN"),
    "read_noise_e": ("RDNOISE", "READNOIS", "RON", "READNOISE"),
    "saturate_adu": ("SATURATE", "DATAMAX", "SATLEVEL", "SATURATION", "MAXLIN"),
    "object": ("OBJECT",),
    "expnum": ("EXPNUM", "FRAMENUM", "EXPID"),
}
PIXSCALE_KEYS = ("IM_SCALE", "PIXSCALE", "SECPIX", "SECPIX1", "SECPIX2", "PIXSCAL1",
                 "PIXSCAL2", "SCALE")
"""Keywords that give the pixel scale directly in arcsec/px, tried in this order."""
IMAGE_TYPE_KEYS = ("IMAGETYP", "OBSTYPE", "FRAMETYP", "IMGTYPE", "FRAME", "EXPTYPE")
"""Keywords that name the kind of frame (only text values count: SDSS's FRAME is a number)."""
IMAGE_TYPES = (  # (kind, words that name it), tried in this order
    ("bias", ("bias", "zero")),
    ("dark", ("dark",)),
    ("flat", ("flat", "skyflat", "domeflat", "twilight")),
    ("arc", ("arc", "comp", "lamp")),
    ("light", ("light", "object", "science", "sci", "obj", "focus", "standard", "std")),
)
CALIBRATION_TYPES = ("bias", "dark", "flat", "arc")
# EXTNAME words of extensions that are not images of the sky.
AUXILIARY_WORDS = frozenset((
    "bpm", "mask", "msk", "dq", "flags", "flag", "err", "error", "errors", "sig", "sigma",
    "unc", "uncert", "var", "variance", "ivar", "invvar", "wht", "weight", "weights",
    "wgt", "wt", "cat", "catalog", "catalogue", "table", "expmap", "rms", "bkg",
    "background", "psf", "thumb", "thumbnail", "preview"))
MASK_MAX_VALUES = 16
"""An integer image with this many distinct values or fewer is a mask, not a sky image."""
# Keywords whose absence is recorded as a fallback (the others are optional).
EXPECTED = ("exptime_s", "gain_e_per_adu", "read_noise_e", "saturate_adu")
MOSTLY_SATURATED = 0.5
LARGELY_SATURATED = 0.05
UNEXPOSED_DEFICIT_SIGMA = 5.0
"""A row or column is unexposed when its median lies this many pixel noise sigmas below
the frame's sky ..."""
UNEXPOSED_NOISE_RATIO = 0.6
"""... and either it carries no photon noise (its pixel noise is below this share of the
frame's and below twice the read noise), or it sits at the bias level (under a tenth of
the sky above the subtracted overscan)."""


# ---------------------------------------------------------------------------- discovery


def exposure_id(path: str | os.PathLike) -> str:
    """The exposure id: the file name without its FITS suffixes."""
    name = Path(path).name
    for suffix in FITS_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in FITS_SUFFIXES if name.endswith(s)), path.suffix.lower())


def is_frame_name(name: str) -> bool:
    """A file name a night's frame may have: a FITS suffix, not hidden, not ``_``-prefixed."""
    return not name.startswith((".", "_")) and name.lower().endswith(FITS_SUFFIXES)


def is_frame_file(path: str | os.PathLike, night_folder: str | os.PathLike) -> bool:
    """Whether :func:`discover_night` takes this file of the night folder: a frame name
    (:func:`is_frame_name`) in no hidden or ``_``-prefixed sub-folder."""
    try:
        parts = Path(path).relative_to(night_folder).parts
    except ValueError:
        return False
    return (bool(parts) and is_frame_name(parts[-1])
            and not any(p.startswith((".", "_")) for p in parts[:-1]))


def discover_night(raw_root: str | os.PathLike, night: str) -> list[Path]:
    """FITS files of one night, sorted, sub-folders included.

    Files and folders whose names start with ``.`` or ``_`` are skipped (hidden files,
    simulator truth). Folder links are followed once (a link loop is not entered twice).
    Raises ``ValueError`` when the night folder does not exist and
    :class:`~survey_qa.pipeline.errors.RunEnvironmentError` when a folder of it cannot be
    read (its files would be missed without a row).
    """
    folder = paths.night_dir(raw_root, night)
    if not folder.is_dir():
        raise ValueError(f"no night folder {folder}")
    found, seen = [], set()

    def unreadable(e: OSError):
        if e.filename and Path(e.filename).name.startswith((".", "_")):
            return
        raise RunEnvironmentError(f"cannot read folder {e.filename}: {e.strerror or e}")

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a folder link back into the night: walked already
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")))
        for name in filenames:
            if is_frame_name(name):
                found.append(Path(dirpath) / name)
    found.sort()
    return found


def night_exposures(raw_root: str | os.PathLike, night: str) -> dict[str, Path]:
    """Every file of a night under a unique exposure id, ``{exposure: path}``.

    The id is the file name without its FITS suffixes. Files that would share an id are
    named apart: by their sub-folder (``sub__a`` for ``sub/a.fits``), and where that is
    not enough by their suffix too (``x__fits_gz`` for ``x.fits.gz`` beside ``x.fits``:
    the first name in sort order keeps the plain id). The ids depend only on the files
    that collide, so a re-run gives the same ids.
    """
    folder = paths.night_dir(raw_root, night)
    groups: dict[str, list[Path]] = {}
    for p in discover_night(raw_root, night):
        groups.setdefault(exposure_id(p), []).append(p)
    out: dict[str, Path] = {}
    for base, group in groups.items():
        if len(group) == 1:
            out[base] = group[0]
            continue
        names = {}
        for p in group:
            parts = p.relative_to(folder).parent.parts
            names[p] = "__".join((*parts, base))
        taken = set()
        for p in sorted(names, key=str):
            if names[p] in taken:
                names[p] = f"{names[p]}__{_suffix(p).strip('.').replace('.', '_')}"
            taken.add(names[p])
        for p, name in names.items():
            out[name] = p
    return dict(sorted(out.items(), key=lambda kv: str(kv[1])))


# ---------------------------------------------------------------------------- opening


def _is_compressed(path: Path) -> bool:
    return path.name.lower().endswith((".gz", ".bz2"))


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed in full for .gz and .bz2 (so checksums are checked)."""
    name = path.name.lower()
    try:
        if name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        if name.endswith(".bz2"):
            with bz2.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read(80)  # an uncompressed file is opened from disk: its start is enough
    except (gzip.BadGzipFile, zlib.error, EOFError, lzma.LZMAError) as e:
        kind = "gzip" if name.endswith(".gz") else "bzip2"
        raise QualityError(f"damaged {kind} file: {exception_text(e)}") from None
    except OSError as e:
        if name.endswith(".bz2") and "data stream" in str(e).lower():
            raise QualityError(f"damaged bzip2 file: {exception_text(e)}") from None
        raise QualityError(f"unreadable file: {e.strerror or exception_text(e)}") from None


def _open(path: Path) -> fits.HDUList:
    """Open a FITS file in memory; raises :class:`QualityError` for anything not FITS."""
    path = Path(path)
    data = _read_bytes(path)
    if not data:
        raise QualityError("empty file (0 bytes)")
    if not data.startswith(b"SIMPLE  ="):
        start = data[:16].decode("ascii", "replace")
        start = "".join(c if c.isprintable() else "?" for c in start)
        raise QualityError(f"not a FITS file: it starts with {start!r}, not with SIMPLE")
    if not _is_compressed(path):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hdul = fits.open(path, memmap=False, lazy_load_hdus=False)
            hdul.n_bytes = os.path.getsize(path)  # what the file really holds
            return hdul
        except Exception:  # e.g. a header announcing more than a seek can reach
            data = path.read_bytes()  # in memory, astropy reads what there is
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hdul = fits.open(_bytes_io.BytesIO(data), memmap=False, lazy_load_hdus=False)
    except Exception as e:  # astropy raises OSError, ValueError, TypeError, EOFError...
        raise QualityError(f"unreadable FITS file: {type(e).__name__}: {exception_text(e)}"
                           ) from None
    hdul.n_bytes = len(data)  # what the (decompressed) file really holds
    return hdul


def _announced_bytes(hdu) -> int:
    """Bytes the HDU's header announces for its data (padding excluded)."""
    h = getattr(hdu, "_bintable", None)
    h = h.header if h is not None else hdu.header
    naxis = int(h.get("NAXIS", 0))
    if naxis == 0:
        return 0
    n = math.prod(int(h.get(f"NAXIS{k}", 0)) for k in range(1, naxis + 1))
    return abs(int(h.get("BITPIX", 8))) // 8 * int(h.get("GCOUNT", 1)) * (
        int(h.get("PCOUNT", 0)) + n)


def truncation(hdu, n_bytes: int) -> str | None:
    """Why the file cannot hold this HDU's data, or None when it can."""
    try:
        start = int(hdu.fileinfo()["datLoc"])
    except Exception:
        return None
    needed = start + _announced_bytes(hdu)
    if needed > n_bytes:
        return f"truncated: file holds {n_bytes} bytes of the {needed} the header announces"
    comp = getattr(hdu, "_bintable", None)
    if comp is not None:  # a tile-compressed image: one table row per tile
        h = comp.header
        shape = [int(h.get(f"ZNAXIS{k}", 0)) for k in range(1, int(h.get("ZNAXIS", 0)) + 1)]
        tiles = [int(h.get(f"ZTILE{k}", 1 if k > 1 else s)) for k, s in enumerate(shape, 1)]
        expected = math.prod(math.ceil(s / max(t, 1)) for s, t in zip(shape, tiles))
        if expected != int(h.get("NAXIS2", 0)):
            return (f"damaged tile-compressed image: {h.get('NAXIS2')} tiles stored, "
                    f"{expected} needed for {'x'.join(map(str, shape[::-1]))} pixels")
    return None


# ---------------------------------------------------------------------------- detectors


def _shape(hdu) -> tuple[int, ...]:
    return tuple(hdu.shape or ()) if _is_image_hdu(hdu) else ()


def _is_image_hdu(hdu) -> bool:
    return isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU))


def _extname(hdu) -> str:
    name = hdu.header.get("EXTNAME")
    if isinstance(hdu, fits.CompImageHDU) and name == "COMPRESSED_IMAGE":
        name = None
    return str(name).strip() if name else ""


def _is_auxiliary(hdu) -> bool:
    """An extension named as a mask, weight, variance, error map or table."""
    words = set(re.split(r"[^a-z]+", _extname(hdu).lower())) - {""}
    return bool(words & AUXILIARY_WORDS)


def _is_image(hdu, cfg: IOConfig) -> bool:
    """Whether an HDU is a candidate detector (from its header: the data are not read)."""
    shape = _shape(hdu)
    planes = math.prod(shape[:-2]) if len(shape) > 2 else 1
    return (len(shape) >= 2 and math.prod(shape[-2:]) * planes >= cfg.min_image_pixels
            and not _is_auxiliary(hdu))


def _detector_name(hdu, index: int) -> str:
    return _extname(hdu) or str(index)


def detector_names(hdul, indices: list[int]) -> dict[int, str]:
    """Unique detector ids: EXTNAME (or the index); a repeated name gets ``#2``, ``#3``..."""
    names, used = {}, set()
    for i in indices:
        base = name = _detector_name(hdul[i], i)
        k = 1
        while name in used:
            k += 1
            name = f"{base}#{k}"
        used.add(name)
        names[i] = name
    return names


def _no_detector_reason(hdul, cfg: IOConfig) -> str:
    """Why a file holds no detector, in words."""
    images = [(i, h) for i, h in enumerate(hdul) if _is_image_hdu(h) and _shape(h)]
    if not images:
        tables = [type(h).__name__ for h in hdul if not _is_image_hdu(h)]
        if tables:
            return f"no image HDU: only tables ({', '.join(sorted(set(tables)))})"
        return "no image data: the primary HDU is empty and there is no extension"
    for i, h in images:
        shape = _shape(h)
        if len(shape) == 1:
            return f"1-D data of {shape[0]} values in HDU {i}: not an image"
    aux = [_extname(h) for _, h in images if _is_auxiliary(h)]
    if aux and len(aux) == len(images):
        return f"only mask, weight or table extensions ({', '.join(aux)}): no sky image"
    i, h = images[0]
    ny, nx = _shape(h)[-2:]
    return (f"image of {nx}x{ny} pixels is smaller than the {cfg.min_image_pixels}-pixel "
            "minimum (io.min_image_pixels)")


def plan_detectors(path: str | os.PathLike, cfg: IOConfig) -> list[tuple[str, int, int]]:
    """(detector, ny, nx) of every detector the file really holds, from its headers.

    HDUs whose data the file does not hold (truncated, damaged tile tables) or whose size
    is beyond ``io.max_image_pixels`` are left out, so a header claiming a huge image
    cannot size the night's arrays. An unreadable file gives an empty list.
    """
    try:
        with _open(Path(path)) as hdul:
            indices = [i for i, h in enumerate(hdul) if _is_image(h, cfg)]
            names = detector_names(hdul, indices)
            out = []
            for i in indices:
                ny, nx = _shape(hdul[i])[-2:]
                if (truncation(hdul[i], hdul.n_bytes) is None
                        and ny * nx <= cfg.max_image_pixels):
                    out.append((names[i], int(ny), int(nx)))
            return out
    except QualityError:
        return []


def read_detectors(path: str | os.PathLike, cfg: IOConfig,
                   exposure: str | None = None) -> list[DetectorImage | QualityError]:
    """Read every detector (image HDU) of one exposure file.

    Returns one entry per detector: a :class:`DetectorImage`, or the :class:`QualityError`
    that made that detector unreadable (the others are still returned). Extensions that
    are masks, weights, variance maps or tables are not detectors; nor is an integer image
    with few distinct values beside a sky image.

    Parameters
    ----------
    exposure
        The exposure id (default: the file name without its FITS suffixes).

    Raises
    ------
    QualityError
        When the file itself cannot be read or holds no image.
    """
    path = Path(path)
    exposure = exposure_id(path) if exposure is None else exposure
    with _open(path) as hdul:
        try:
            indices = [i for i, h in enumerate(hdul) if _is_image(h, cfg)]
        except Exception as e:
            raise QualityError(f"corrupt FITS structure: {type(e).__name__}: {exception_text(e)}"
                               ) from None
        if not indices:
            raise QualityError(_no_detector_reason(hdul, cfg))
        names = detector_names(hdul, indices)
        primary = hdul[0].header
        out: list[DetectorImage | QualityError] = []
        for i in indices:
            det = names[i]
            try:
                out.append(_read_hdu(hdul[i], primary if i else None, hdul.n_bytes, path,
                                     exposure, i, det, cfg))
            except QualityError as e:
                e.metadata.update(detector=det, hdu=i)
                out.append(e)
            except MemoryError:
                out.append(QualityError(f"HDU {i} does not fit in memory: "
                                        f"{'x'.join(map(str, _shape(hdul[i])[::-1]))} pixels",
                                        detector=det, hdu=i))
            except Exception as e:  # corrupt data of this HDU
                what = ("damaged tile-compressed image in HDU" if isinstance(
                    hdul[i], fits.CompImageHDU) else "unreadable HDU")
                out.append(QualityError(f"{what} {i}: {type(e).__name__}: {exception_text(e)}",
                                        detector=det, hdu=i))
    sky = [d for d in out if not (isinstance(d, QualityError) and d.metadata.get("mask_like"))]
    if sky and len(sky) < len(out):  # integer masks beside sky images: not detectors
        out = sky
    for d in out:
        if isinstance(d, DetectorImage):
            d.n_detectors = len(out)
    return out


def detector_headers(path: str | os.PathLike, cfg: IOConfig) -> list[tuple[str, dict]]:
    """(detector id, header as a dict) of every detector HDU of a file, from its headers.

    The ids are the catalog's (:func:`detector_names`). An unreadable file gives an empty
    list.
    """
    try:
        with _open(Path(path)) as hdul:
            indices = [i for i, h in enumerate(hdul) if _is_image(h, cfg)]
            names = detector_names(hdul, indices)
            return [(names[i], dict(hdul[i].header)) for i in indices]
    except (QualityError, OSError):
        return []


def read_calibration_images(path: str | os.PathLike, cfg: IOConfig) -> dict[str, np.ndarray]:
    """The image HDUs of a calibration file (a master flat), on the grid frames are
    measured on: overscan trimmed, Bayer frames binned 2x2. Keyed by detector name.

    Raises :class:`QualityError` when the file cannot be opened.
    """
    with _open(Path(path)) as hdul:
        indices = [i for i, h in enumerate(hdul) if _is_image(h, cfg)]
        names = detector_names(hdul, indices)
        out = {}
        for i in indices:
            header = hdul[i].header
            data, _, _ = _trim_overscan(np.asarray(hdul[i].data, dtype=np.float32), header,
                                        cfg)
            out[names[i]] = bin2x2(data) if _is_bayer(header, cfg) else data
        return out


def read_exposure(path: str | os.PathLike, cfg: IOConfig) -> list[DetectorImage]:
    """Every detector of an exposure; raises the first :class:`QualityError` met."""
    dets = read_detectors(path, cfg)
    for d in dets:
        if isinstance(d, QualityError):
            raise d
    return dets


def _read_hdu(hdu, primary: fits.Header | None, n_bytes: int, path: Path, exposure: str,
              index: int, det: str, cfg: IOConfig) -> DetectorImage:
    header = fits.Header(primary) if primary is not None else fits.Header()
    header.update(hdu.header)  # extension keywords win over the primary header's
    meta = read_meta(header, cfg)
    shape = _shape(hdu)
    why = truncation(hdu, n_bytes)
    if why:
        raise QualityError(why, meta=meta)
    ny, nx = shape[-2:]
    if ny * nx > cfg.max_image_pixels:
        raise QualityError(f"image of {nx}x{ny} pixels is larger than io.max_image_pixels "
                           f"({cfg.max_image_pixels})", meta=meta)
    planes = [s for s in shape[:-2] if s > 1]
    if planes:
        raise QualityError(f"{len(shape)}-D image ({'x'.join(map(str, shape[::-1]))}): "
                           f"{math.prod(planes)} planes of {nx}x{ny} pixels, one expected",
                           meta=meta)
    if meta.image_type in CALIBRATION_TYPES:
        raise QualityError(f"calibration frame: {meta.image_type} ({meta.image_type_source})",
                           meta=meta, image_type=meta.image_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = hdu.data
    if raw is None:
        raise QualityError("image HDU without data", meta=meta)
    data = np.asarray(raw)
    while data.ndim > 2 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 2:
        raise QualityError(f"image of shape {data.shape} is not 2-D", meta=meta)
    if data.dtype.kind in "iub":
        n_values = len(np.unique(data[:: max(1, data.shape[0] // 256),
                                      :: max(1, data.shape[1] // 256)]))
        if 1 < n_values <= MASK_MAX_VALUES and 1 < len(np.unique(data)) <= MASK_MAX_VALUES:
            raise QualityError(f"integer image with only {len(np.unique(data))} distinct "
                               "values: a mask, not a sky image", meta=meta, mask_like=True)
    data = np.ascontiguousarray(data, dtype=np.float32)  # native order, as sep needs
    flags = 0

    if meta.fallbacks:
        flags |= bits("HEADER_FALLBACK")
    if meta.pixscale_source == "none":
        flags |= bits("NO_PIXSCALE")

    data, trimmed, bias = _trim_overscan(data, header, cfg)
    bias_subtracted = bias is not None
    if trimmed:
        flags |= bits("OVERSCAN_TRIMMED")
    if bias_subtracted and math.isfinite(meta.saturate_adu):
        meta.saturate_adu -= bias  # the header's level is in raw ADU, the pixels are not
    if min(data.shape) < 8:
        raise QualityError(f"image of {data.shape[1]}x{data.shape[0]} pixels after "
                           "overscan trimming is too small to measure", meta=meta)

    finite = np.isfinite(data)
    if not finite.any():
        raise QualityError("no finite pixel (all NaN or infinite)", meta=meta)
    if not finite.all():
        flags |= bits("NONFINITE_PIXELS")
    lo, hi = np.min(data, where=finite, initial=np.inf), np.max(data, where=finite,
                                                                initial=-np.inf)
    if lo == hi:
        raise QualityError(f"constant frame: every finite pixel is {lo:g}", meta=meta)

    if not math.isfinite(meta.saturate_adu):
        n_at_max = int(np.count_nonzero(data == hi))
        if n_at_max >= cfg.saturate_min_pixels:
            meta.saturate_adu = float(hi)
            flags |= bits("SATURATION_INFERRED")
    mask = ~finite
    if math.isfinite(meta.saturate_adu):
        saturated = saturated_pixels(data, meta.saturate_adu)
        frac = float(saturated.mean())
        if frac > MOSTLY_SATURATED:
            raise QualityError(f"mostly saturated: {100 * frac:.0f}% of pixels at or above "
                               f"{meta.saturate_adu:g} ADU", meta=meta)
        if frac > LARGELY_SATURATED:
            flags |= bits("SATURATED_LARGE")
        mask |= saturated
    data[~finite] = 0.0

    if bias_subtracted:
        dark = no_light(data, mask, meta.read_noise_e / meta.gain_e_per_adu)
        if dark:
            kind = "dark" if meta.exptime_s > 0 else "bias"
            meta.image_type, meta.image_type_source = kind, f"by content: {dark}"
            raise QualityError(f"calibration frame: {kind} ({meta.image_type_source})",
                               meta=meta, image_type=kind)
    unexposed = unexposed_lines(data, mask, bias_level=0.0 if bias_subtracted else None,
                                read_noise_adu=meta.read_noise_e / meta.gain_e_per_adu)
    if unexposed.any():
        if unexposed.mean() > MOSTLY_SATURATED:
            raise QualityError(f"unexposed: {100 * unexposed.mean():.0f}% of the pixels lie "
                               "in rows or columns at the bias level", meta=meta)
        mask |= unexposed
        flags |= bits("UNEXPOSED_MASKED")

    if _is_bayer(header, cfg):
        data, mask = bin2x2(data), bin2x2(mask.astype(np.float32)) > 0
        if math.isfinite(meta.pixscale_arcsec):
            meta.pixscale_arcsec *= 2
        if math.isfinite(meta.saturate_adu):
            meta.saturate_adu *= 4
        flags |= bits("BAYER_BINNED")

    return DetectorImage(exposure=exposure, detector=det, hdu=index, path=str(path),
                         data=np.ascontiguousarray(data), mask=np.ascontiguousarray(mask),
                         meta=meta, n_detectors=1, qa_flags=flags)


NO_LIGHT_BRIGHT_FRACTION = 1e-3
"""A frame without light has fewer pixels than this share 10 sigma above its median."""

NO_LIGHT_SAMPLES = 250_000
""":func:`no_light` judges a frame on about this many pixels, evenly spaced."""


def no_light(data: np.ndarray, mask: np.ndarray, read_noise_adu: float) -> str:
    """Why an overscan-subtracted frame received no light, or '' when it did.

    No light: the median lies within one read noise of the overscan level and almost no
    pixel stands out (hot pixels and cosmic rays aside, under
    :data:`NO_LIGHT_BRIGHT_FRACTION` of the pixels 10 sigma above the median): a bias or a
    dark, whatever the header says. Judged on :data:`NO_LIGHT_SAMPLES` evenly spaced
    pixels.
    """
    if not (math.isfinite(read_noise_adu) and read_noise_adu > 0):
        return ""
    step = max(1, int(math.sqrt(data.size / NO_LIGHT_SAMPLES)))
    good = data[::step, ::step][~mask[::step, ::step]]
    if good.size == 0:
        return ""
    level = float(np.median(good))
    noise = 1.4826 * float(np.median(np.abs(good - level)))
    if level >= read_noise_adu or noise <= 0:
        return ""
    bright = float(np.mean(good > level + 10 * noise))
    if bright >= NO_LIGHT_BRIGHT_FRACTION:
        return ""
    return (f"median {level:.1f} ADU above the overscan, within the read noise "
            f"{read_noise_adu:.1f} ADU, and no source")


LINE_SAMPLES = 512
"""Pixels per row or column that :func:`unexposed_lines` summarises."""


def unexposed_lines(data: np.ndarray, mask: np.ndarray, bias_level: float | None = None,
                    read_noise_adu: float = math.nan) -> np.ndarray:
    """Pixels of rows and columns that received no light (at the bias level).

    A row (column) is unexposed when its median lies far below the frame's sky
    (:data:`UNEXPOSED_DEFICIT_SIGMA` pixel sigmas) and it carries no photon noise (its
    pixel-to-pixel noise under :data:`UNEXPOSED_NOISE_RATIO` of the frame's and, when the
    read noise is known, under twice ``read_noise_adu``) or, when the overscan level was
    subtracted (``bias_level``), it sits at that level. Such lines (a shutter shadow, an
    unread band, a prescan the header does not name) would read as a sky defect; a
    gradient or vignetting dims a line without taking its photon noise away.

    Returns
    -------
    numpy.ndarray
        bool, the shape of ``data``: True on unexposed rows and columns.
    """
    out = np.zeros(data.shape, dtype=bool)
    # Each line is summarised on at most LINE_SAMPLES of its pixels, evenly spaced (the
    # median and noise of a line need no more).
    step = [max(1, n // LINE_SAMPLES) for n in data.shape]

    def sampled(rows: slice, cols: slice) -> np.ndarray:
        return np.where(mask[rows, cols], np.float32(np.nan), data[rows, cols])

    every = slice(None)
    sample = sampled(slice(None, None, step[0]), slice(None, None, step[1]))
    if np.isnan(sample).all():
        return out
    sky = float(np.nanmedian(sample))
    for axis in (1, 0):  # rows, then columns
        # one line per row of ``along``, contiguous, for the sorting medians
        along = (sampled(every, slice(None, None, step[1])) if axis == 1 else
                 np.ascontiguousarray(sampled(slice(None, None, step[0]), every).T))
        level = line_medians(along)
        diff = np.diff(along, axis=1)
        noise = 1.4826 * line_medians(np.abs(diff - line_medians(diff)[:, None])) / math.sqrt(2)
        finite_noise = noise[np.isfinite(noise)]
        frame_noise = float(np.median(finite_noise)) if finite_noise.size else math.nan
        if not (math.isfinite(frame_noise) and frame_noise > 0):
            continue
        with np.errstate(invalid="ignore"):
            low = level < sky - UNEXPOSED_DEFICIT_SIGMA * frame_noise
            quiet = noise < UNEXPOSED_NOISE_RATIO * frame_noise
            if math.isfinite(read_noise_adu) and read_noise_adu > 0:
                quiet &= noise < 2 * read_noise_adu
            at_bias = (np.zeros_like(low) if bias_level is None
                       else level - bias_level < 0.1 * (sky - bias_level))
        lines = low & (quiet | at_bias)
        if axis == 1:
            out[lines, :] = True
        else:
            out[:, lines] = True
    return out


def line_medians(a: np.ndarray) -> np.ndarray:
    """The median of each row of a 2-D array, NaN left out (NaN for a row without a value).

    The same values as ``np.nanmedian(a, axis=1)``, from one sort of the rows (NaN sorts
    last): many times faster on the thousands of short rows of a 4k frame.
    """
    s = np.sort(a, axis=1)
    n = np.count_nonzero(~np.isnan(a), axis=1)
    lo, hi = np.maximum((n - 1) // 2, 0)[:, None], np.maximum(n // 2, 0)[:, None]
    med = 0.5 * (np.take_along_axis(s, lo, axis=1) + np.take_along_axis(s, hi, axis=1))[:, 0]
    return np.where(n > 0, med, np.nan)


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
    """(trimmed data, whether trimmed, the overscan level subtracted or None)."""
    if cfg.overscan == "none":
        return data, False, None
    datasec = _section(header.get("TRIMSEC") or header.get("DATASEC"))
    if datasec is None:
        return data, False, None
    ys, xs = datasec
    if ys.stop > data.shape[0] or xs.stop > data.shape[1]:
        return data, False, None
    if (ys.stop - ys.start, xs.stop - xs.start) == data.shape:
        return data, False, None
    biassec = _section(header.get("BIASSEC"))
    bias = None
    if biassec is not None:
        region = data[biassec]
        if region.size and np.isfinite(region).any():
            bias = float(np.nanmedian(region))
    return np.ascontiguousarray(data[ys, xs] - np.float32(bias or 0.0)), True, bias


def _first(header: fits.Header, keys: tuple[str, ...]):
    for k in keys:
        v = header.get(k)
        if v is not None and str(v).strip() != "":
            return v
    return None


def _first_key(header: fits.Header, keys: tuple[str, ...], positive: bool = False):
    """(keyword, float value) of the first keyword with a usable number, else (None, NaN).

    With ``positive``, zero and negative values count as unknown (a camera that writes
    ``GAIN = 0`` or ``SATURATE = 0`` does not know them).
    """
    for k in keys:
        v = _as_float(header.get(k))
        if math.isfinite(v) and (v > 0 or not positive):
            return k, v
    return None, math.nan


def _as_float(value) -> float:
    if isinstance(value, bool):
        return math.nan
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def read_meta(header: fits.Header, cfg: IOConfig) -> FrameMeta:
    """Header facts with configuration fallbacks; see io-contract.md for the keywords.

    Gain, read noise and saturation of zero or less mean unknown. The image type comes
    from IMAGETYP / OBSTYPE / FRAMETYP / IMGTYPE / FRAME, else from the exposure time
    (0 s: a bias), else it is taken to be a light frame.
    """
    meta = FrameMeta()
    fallbacks = []
    config_value = {"gain_e_per_adu": cfg.gain_e_per_adu, "read_noise_e": cfg.read_noise_e,
                    "saturate_adu": cfg.saturate_adu}
    for name in ("exptime_s", "airmass", "gain_e_per_adu", "read_noise_e", "saturate_adu"):
        key, value = _first_key(header, KEYS[name], positive=name in config_value)
        if key is None and name in config_value and config_value[name] is not None:
            value = float(config_value[name])
        if key is None and name in EXPECTED:
            fallbacks.append(KEYS[name][0])
        setattr(meta, name, value)
    for name in ("filter", "object", "expnum"):
        value = _first(header, KEYS[name])
        setattr(meta, name, "" if value is None else str(value).strip())
    meta.date_obs, meta.mjd_obs = parse_date(header)
    meta.ra_deg, meta.dec_deg = pointing(header)
    if not meta.date_obs and math.isnan(meta.mjd_obs):
        fallbacks.append("DATE-OBS")
    meta.pixscale_arcsec, meta.pixscale_source, meta.pixscale_keyword = \
        pixel_scale_and_keyword(header, cfg)
    meta.image_type, meta.image_type_source = image_type(header)
    meta.fallbacks = tuple(fallbacks)
    return meta


def image_type(header: fits.Header) -> tuple[str, str]:
    """The kind of frame (light, bias, dark, flat, arc) and what says so.

    Returns
    -------
    tuple
        ``(kind, source)``: e.g. ``("bias", "IMAGETYP = 'Bias Frame'")``,
        ``("bias", "EXPTIME = 0")`` or ``("light", "default")``.
    """
    for key in IMAGE_TYPE_KEYS:
        value = header.get(key)
        if not isinstance(value, str) or not value.strip():
            continue
        words = re.split(r"[^a-z]+", value.lower())
        text = "".join(words)
        for kind, names in IMAGE_TYPES:
            if any(n in words for n in names) or any(
                    text.startswith(n) for n in names if len(n) > 3):
                return kind, f"{key} = '{value.strip()}'"
    key, exptime = _first_key(header, KEYS["exptime_s"])
    if key is not None and exptime == 0:
        return "bias", f"{key} = 0"
    return "light", "default"


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
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                iso = Time(mjd, format="mjd", scale="utc").isot
        except ValueError:
            mjd = math.nan
    return iso, mjd


def _celestial(header: fits.Header) -> bool:
    ctype = str(header.get("CTYPE1", "")).strip().upper()
    return bool(re.match(r"(RA|DEC|GLON|GLAT|ELON|ELAT|[A-Z]LON|[A-Z]LAT)-", ctype))


def _plausible(scale_arcsec: float) -> bool:
    return math.isfinite(scale_arcsec) and 1e-3 < scale_arcsec < 3600


def _numeric_wcs(header: fits.Header) -> fits.Header:
    """A copy of the header (structural keywords stripped) whose WCS numbers are numbers:
    some writers quote them ('-0.00030737')."""
    linear = header.copy(strip=True)
    for key in [k for k in linear if re.match(r"(CD|PC)\d_\d$|(CDELT|CRPIX|CRVAL)\d$", k)]:
        if isinstance(linear[key], str):
            value = _as_float(linear[key].strip())
            if math.isfinite(value):
                linear[key] = value
    return linear


def _wcs_scale(header: fits.Header) -> float:
    from astropy.wcs import WCS
    from astropy.wcs.utils import proj_plane_pixel_scales

    linear = _numeric_wcs(header)
    for key in [k for k in linear if re.match(r"(A|B|AP|BP)_(\d+_\d+|ORDER|DMAX)$", k)]:
        del linear[key]  # SIP distortion does not change the scale at the reference pixel
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wcs = WCS(linear, naxis=2).celestial
        if wcs.naxis == 2:
            scales = proj_plane_pixel_scales(wcs) * 3600.0
            return float(np.sqrt(scales[0] * scales[1]))
    except Exception:  # a broken WCS falls back to keywords
        pass
    return math.nan


POINTING_KEYS = (("RA", "DEC"), ("OBJCTRA", "OBJCTDEC"), ("TELRA", "TELDEC"))
"""Pointing keywords (right ascension, declination), tried in order when there is no
celestial WCS."""


def _wcs_centre(header: fits.Header) -> tuple[float, float]:
    """(RA, Dec) in degrees of the image centre from a celestial WCS; NaN when unusable."""
    from astropy.wcs import WCS

    nx, ny = _as_float(header.get("NAXIS1")), _as_float(header.get("NAXIS2"))
    if not (math.isfinite(nx) and math.isfinite(ny)):
        return math.nan, math.nan
    linear = _numeric_wcs(header)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wcs = WCS(linear, naxis=2).celestial
            if wcs.naxis == 2:
                ra, dec = wcs.all_pix2world([[(nx - 1) / 2, (ny - 1) / 2]], 0)[0]
                return float(ra) % 360.0, float(dec)
    except Exception:  # a broken WCS falls back to the pointing keywords
        pass
    return math.nan, math.nan


def _angle_deg(value, hours: bool) -> float:
    """Degrees of a header angle: a number is degrees; a sexagesimal text ('08:18:29.9',
    '04 12 12.4', '12h30m') is hours for a right ascension, degrees for a declination."""
    from astropy.coordinates import Angle

    number = _as_float(value)
    if math.isfinite(number):
        return number
    try:
        return float(Angle(str(value).strip(), unit="hourangle" if hours else "deg").deg)
    except (ValueError, TypeError):
        return math.nan


def pointing(header: fits.Header) -> tuple[float, float]:
    """Right ascension and declination (degrees) of the frame's centre.

    From a celestial WCS (``RA---``/``DEC--`` axes) at the image centre, else from the
    pointing keywords (:data:`POINTING_KEYS`; a sexagesimal right ascension is in hours);
    ``(NaN, NaN)`` when neither gives a position on the sky.
    """
    if str(header.get("CTYPE1", "")).strip().upper().startswith("RA"):
        ra, dec = _wcs_centre(header)
        if math.isfinite(ra) and math.isfinite(dec):
            return ra, dec
    for ra_key, dec_key in POINTING_KEYS:
        if header.get(ra_key) in (None, "") or header.get(dec_key) in (None, ""):
            continue
        ra, dec = _angle_deg(header[ra_key], True), _angle_deg(header[dec_key], False)
        if math.isfinite(ra) and math.isfinite(dec) and abs(dec) <= 90.0:
            return ra % 360.0, dec
    return math.nan, math.nan


def _linear_scale(header: fits.Header) -> tuple[float, str]:
    """Scale from a CD matrix or CDELT without a celestial CTYPE, taken as degrees/px.

    ``CDELT = 1`` is the identity that many writers leave (pixel units): not a scale.
    """
    cd = [_as_float(header.get(k)) for k in ("CD1_1", "CD1_2", "CD2_1", "CD2_2")]
    if all(math.isfinite(v) for v in cd):
        det = abs(cd[0] * cd[3] - cd[1] * cd[2])
        if 0 < det and math.sqrt(det) < 1:
            return math.sqrt(det) * 3600.0, "CD1_1"
    c1, c2 = _as_float(header.get("CDELT1")), _as_float(header.get("CDELT2"))
    values = [abs(v) for v in (c1, c2) if math.isfinite(v) and 0 < abs(v) < 1]
    if values:
        return math.prod(values) ** (1 / len(values)) * 3600.0, "CDELT1"
    return math.nan, ""


def _binned_pixel_um(header: fits.Header, key: str) -> float:
    """Pixel size in microns as the image holds it.

    MaxIm DL and the SBIG FITS extensions write ``XPIXSZ`` after binning ("Pixel Width in
    microns (after binning)"); only a comment saying it is unbinned makes us multiply by
    ``XBINNING``.
    """
    size = _as_float(header.get(key))
    comment = str(header.comments[key]).lower() if key in header else ""
    if "unbinned" in comment or "before binning" in comment:
        binning = _as_float(header.get("XBINNING" if key.startswith("X") else "YBINNING"))
        size *= binning if math.isfinite(binning) and binning > 0 else 1
    return size


def pixel_scale_and_keyword(header: fits.Header, cfg: IOConfig) -> tuple[float, str, str]:
    """Pixel scale (arcsec/px), its source (wcs, keyword, config or none) and keyword(s).

    Tried in order: a celestial WCS; IM_SCALE, PIXSCALE, SECPIX(1/2), PIXSCAL1/2, SCALE;
    PLTSCALE (arcsec/mm) times the pixel size (XPIXELSZ or XPIXSZ, microns); a CD matrix or
    CDELT without a celestial CTYPE (degrees/px); XPIXSZ (microns, after binning) with
    FOCALLEN (mm); the configured value.
    """
    if any(k in header for k in ("CD1_1", "CDELT1", "PC1_1")) and _celestial(header):
        scale = _wcs_scale(header)
        if _plausible(scale):
            return scale, "wcs", "WCS"
    key, value = _first_key(header, PIXSCALE_KEYS, positive=True)
    if key and _plausible(value):
        if key in ("SECPIX1", "PIXSCAL1"):
            other = _as_float(header.get(key[:-1] + "2"))
            value = math.sqrt(value * other) if _plausible(other) else value
        return value, "keyword", key
    plate = _as_float(header.get("PLTSCALE"))
    for size_key in ("XPIXELSZ", "XPIXSZ"):
        value = plate * _binned_pixel_um(header, size_key) / 1000 if size_key in header else math.nan
        if _plausible(value):
            return value, "keyword", f"PLTSCALE*{size_key}"
    value, key = _linear_scale(header)
    if key and _plausible(value) and not _celestial(header):
        return value, "keyword", key
    focal = _as_float(header.get("FOCALLEN"))
    if "XPIXSZ" in header and math.isfinite(focal) and focal > 0:
        value = 206.265 * _binned_pixel_um(header, "XPIXSZ") / focal
        if "YPIXSZ" in header:
            value = math.sqrt(value * 206.265 * _binned_pixel_um(header, "YPIXSZ") / focal)
        if _plausible(value):
            return value, "keyword", "XPIXSZ/FOCALLEN"
    if cfg.pixscale_arcsec is not None:
        return float(cfg.pixscale_arcsec), "config", "io.pixscale_arcsec"
    return math.nan, "none", ""


def pixel_scale(header: fits.Header, cfg: IOConfig) -> tuple[float, str]:
    """Pixel scale (arcsec/px) and where it came from: wcs, keyword, config or none."""
    scale, source, _ = pixel_scale_and_keyword(header, cfg)
    return scale, source
