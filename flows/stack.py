"""``survey-qa stack``: the chosen frames of one field, registered, scaled and combined.

Reads the night's catalogs, chooses the frames as ``survey-qa select`` does (classes,
``--where``), keeps one field, registers every frame to the field's reference frame from
the catalogued stars, divides it by the master flat the nightly job uses (if any),
subtracts its sky, scales it to the reference photometry, combines the frames with
quality weights and sigma clipping (:mod:`survey_qa.pipeline.stack`) and writes
``<out-root>/stacks/<night>/<field>.fits`` atomically:

- primary HDU: the stack (float32, ADU of the reference frame, sky subtracted), with the
  reference frame's celestial WCS when it had one, and the combination settings as
  keywords;
- ``WEIGHT``: the sum of the weights kept at each pixel (float32);
- ``NFRAMES``: the number of frames kept at each pixel (int16);
- ``PROVENANCE``: one row per chosen frame (exposure, path, weight, scale, drift, rotation,
  FWHM, rejected pixels, ``damaged_sky_share``: the share of its pixels under its mask of
  damaged sky, left out; 0 without a mask or with ``--keep-damaged-sky``; frames that could
  not be used have ``used = False`` and a note).

The damaged sky of a frame is left out: where the night's array store holds the frame's
``defect_mask`` (cells of a grid over the detector where added light or cloud damage the
sky, :mod:`survey_qa.pipeline.skymask`) and its catalog row a finite
``defect_mask_fraction``, every pixel takes its nearest cell
(:func:`survey_qa.pipeline.stack.cells_to_pixels`) and the damaged ones join the frame's
bad-pixel mask before its sky is measured and it is resampled, so that the combination
never uses them. A frame whose whole detector is damaged gives nothing and is no
reference. The frame's scale still comes from all its matched stars.
``mask_damaged_sky=False`` (``--keep-damaged-sky``) keeps every pixel.

Frames whose stars match the reference's are resampled by that similarity transform; the
others through the two frames' WCS with ``reproject`` (:mod:`survey_qa.pipeline.stack`).
Each frame is resampled onto the reference grid in turn and written to disk
(:class:`DiskFrames`: one ``numpy.memmap`` file per frame in a temporary folder next to
the output, removed afterwards, also on error); the combination reads them back a block of
rows at a time. The memory needed is that of a few frames and one block, whatever the
number of frames; the disk needs 5 bytes per pixel and frame.
"""
from __future__ import annotations

import math
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.table import Table

from survey_qa import __version__, paths
from survey_qa.atomic import atomic_target
from survey_qa.config import Config
from survey_qa.flows import illumination
from survey_qa.flows.select import read_night
from survey_qa.pipeline import outputs, selection, skymask, stack
from survey_qa.pipeline.background import measure_background
from survey_qa.pipeline.errors import QualityError, exception_text
from survey_qa.pipeline.flags import CUT_SHORT, SOURCE_FLAGS, bits
from survey_qa.pipeline.io import read_detectors
from survey_qa.pipeline.outputs import fits_text

INTERPOLATIONS = {"bilinear": 1, "cubic": 3}
"""``--interpolation``: the spline order that resamples a frame onto the reference grid."""

WEIGHTINGS = ("quality", "equal")
"""``--weighting``: inverse variance for faint point sources, or every frame alike."""

STAR_BOX_FWHM = 2.0
"""A frame's noise on the scale of a star is measured in boxes this many FWHM wide."""

DEFAULT_FWHM_PX = 3.0
"""The box scale of a frame without a measured FWHM (its quality weight is 0 anyway)."""

UNNAMED_FIELD = "field"
"""The stack's file name when the frames have no field name."""

SOURCE_COLUMNS = ("exposure", "detector", "x", "y", "flux", "flags")

NOT_STARS = bits(*CUT_SHORT, "EXTENDED", "COMPACT", registry=SOURCE_FLAGS)
"""Source flags of detections whose flux does not scale a frame."""

NOT_ON_SKY = bits("COMPACT", registry=SOURCE_FLAGS)
"""Source flags of detections that do not register a frame (cosmic rays, hot pixels)."""


@dataclass
class StackRun:
    """What ``stack`` combined and wrote."""

    night: str
    field: str
    path: Path
    provenance: pd.DataFrame  # one row per chosen frame (PROVENANCE)
    noise_adu: float  # expected sky noise per pixel of the stack
    notes: list[str] = field(default_factory=list)

    def report(self) -> str:
        used = self.provenance[self.provenance["used"]]
        ref = self.provenance.loc[self.provenance["is_reference"], "exposure"]
        lines = [f"night {self.night}, field {self.field}: {len(used)} of "
                 f"{len(self.provenance)} chosen frames stacked (reference "
                 f"{ref.iloc[0] if len(ref) else '-'}), "
                 f"{int(used['rejected_px'].sum())} pixels rejected",
                 f"  stack       {self.path}"]
        damaged = self.provenance["damaged_sky_share"]
        if (damaged > 0).any():
            lines.append(f"  damaged sky {int((damaged > 0).sum())} frames, "
                         f"{100 * damaged[damaged > 0].mean():.1f}% of their pixels on "
                         "average, left out")
        for _, r in self.provenance[~self.provenance["used"]].iterrows():
            lines.append(f"  left out    {r['exposure']}: {r['note']}")
        lines.extend(f"  note        {n}" for n in self.notes)
        return "\n".join(lines)


# ---------------------------------------------------------------------------- choosing


def read_catalogs(out_root: str | Path, night: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The night's exposure catalog and the source columns registration needs
    (:func:`~survey_qa.flows.select.read_night`); a night without its source catalog
    cannot be stacked."""
    if not paths.catalog_file(out_root, "sources", night).is_file():
        raise ValueError(f"no source catalog for night {night} under {Path(out_root)} "
                         f"(run: survey-qa --night {night})")
    return read_night(out_root, night, SOURCE_COLUMNS)


def detector_rows(exposures: pd.DataFrame, chosen: pd.DataFrame,
                  detector: str | None) -> pd.DataFrame:
    """The measured detector row of each chosen exposure (one detector of a mosaic).

    Raises ``ValueError`` when the frames are mosaics and ``detector`` is not given, or
    when no chosen frame has that detector.
    """
    rows = exposures[(exposures["detector"] != "ALL") & (exposures["status"] == "ok")
                     & exposures["exposure"].isin(chosen["exposure"])]
    if detector is not None:
        rows = rows[rows["detector"] == detector]
        if rows.empty:
            raise ValueError(f"--detector: no chosen frame has a detector {detector!r}")
    elif rows.groupby("exposure").size().max() > 1:
        names = ", ".join(sorted(rows["detector"].unique()))
        raise ValueError(f"the frames are mosaics: choose one --detector ({names})")
    extra = chosen[["exposure", "weight", "star_flux_adu"]].rename(
        columns={"weight": "select_weight"})
    rows = rows.merge(extra, on="exposure", how="left").reset_index(drop=True)
    every = exposures[exposures["detector"] != "ALL"].drop_duplicates("exposure")
    named = pd.Series(field_names(every).to_numpy(), index=every["exposure"].to_numpy())
    rows["field_name"] = rows["exposure"].map(named).fillna("")
    return rows


def _text(rows: pd.DataFrame, column: str) -> pd.Series:
    if column not in rows:
        return pd.Series("", index=rows.index)
    return rows[column].fillna("").astype(str).str.strip()


def field_names(rows: pd.DataFrame) -> pd.Series:
    """Each row's field name, aligned with ``rows``.

    Frames are grouped by the nightly job's field group (``field``) where they have one,
    else by ``OBJECT``. A group is named by its ``OBJECT`` when its frames share one that
    no other group uses, else by the group's own name (its first exposure); '' when
    nothing names it.
    """
    obj, group = _text(rows, "object"), _text(rows, "field")
    names = obj.copy()
    grouped = group != ""
    for g, index in group[grouped].groupby(group[grouped]).groups.items():
        objects = set(obj[index]) - {""}
        elsewhere = set(obj[grouped & (group != g)])
        names[index] = objects.pop() if len(objects) == 1 and not objects & elsewhere else g
    return names


def one_field(rows: pd.DataFrame, wanted: str | None) -> tuple[pd.DataFrame, str, list[str]]:
    """The rows of one field, its name, and notes on frames left out.

    ``wanted`` picks the field by its name (``field_name`` when the rows carry it, else
    :func:`field_names`), its ``OBJECT`` or its field group; without it the rows must hold
    one field. Of frames of several detector shapes, those of the most common shape are
    kept.
    """
    names = rows["field_name"] if "field_name" in rows else field_names(rows)
    if wanted is not None:
        hit = (names == wanted) | (_text(rows, "object") == wanted) | \
            (_text(rows, "field") == wanted)
        if not hit.any():
            known = ", ".join(sorted(set(names) - {""})) or "none named"
            raise ValueError(f"--field: no chosen frame of field {wanted!r} (fields: {known})")
        rows, names = rows[hit], names[hit]
    counts = names.value_counts()
    if len(counts) > 1:
        listed = ", ".join(f"{k or '(unnamed)'} ({v})" for k, v in counts.items())
        raise ValueError(f"the chosen frames hold several fields: {listed}; "
                         "choose one with --field")
    name = counts.index[0] if len(counts) else ""
    notes = []
    shapes = rows[["nx", "ny"]].astype(int).apply(tuple, axis=1)
    if shapes.nunique() > 1:
        common = shapes.value_counts().index[0]
        notes.append(f"{int((shapes != common).sum())} frames of another detector shape "
                     f"than {common[0]}x{common[1]} left out")
        rows = rows[shapes == common]
    return rows.reset_index(drop=True), name, notes


def file_name(field_name: str) -> str:
    """A file-name-safe version of a field name."""
    safe = re.sub(r"[^A-Za-z0-9._+-]+", "_", field_name).strip("._")
    return safe or UNNAMED_FIELD


def transparency(rows: pd.DataFrame) -> np.ndarray:
    """A relative throughput per frame, to choose the reference.

    ``10^(-0.4 transparency_mag)`` where the catalog has it, else the summed star flux
    per second of exposure.
    """
    if "transparency_mag" in rows and np.isfinite(rows["transparency_mag"]).any():
        return 10 ** (-0.4 * rows["transparency_mag"].to_numpy(float))
    exptime = rows["exptime_s"].to_numpy(float)
    exptime = np.where(np.isfinite(exptime) & (exptime > 0), exptime, 1.0)
    return rows["star_flux_adu"].to_numpy(float) / exptime


def frame_fwhm(rows: pd.DataFrame) -> np.ndarray:
    """The PSF FWHM of each frame (px): the fit, else the detection moments'."""
    return rows["fwhm_px"].where(np.isfinite(rows["fwhm_px"]), rows["src_fwhm_px"]).to_numpy(
        float)


def frame_stars(sources: pd.DataFrame, exposure: str, detector: str
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A frame's sources for registration, brightest first.

    Returns positions ``(n, 2)``, fluxes, and True for the sources whose flux may scale
    the frame (not saturated, truncated, at the edge, extended). Compact detections
    (cosmic rays, hot pixels) are left out: they are not on the sky.
    """
    s = sources[(sources["exposure"] == exposure) & (sources["detector"] == detector)]
    flags = s["flags"].astype(np.int64)
    s = s[((flags & NOT_ON_SKY) == 0) & np.isfinite(s["flux"]) & (s["flux"] > 0)]
    s = s.sort_values("flux", ascending=False)
    photometric = (s["flags"].astype(np.int64) & NOT_STARS) == 0
    return s[["x", "y"]].to_numpy(float), s["flux"].to_numpy(float), photometric.to_numpy()


# ---------------------------------------------------------------------------- damaged sky


def damaged_cells(out_root: str | Path, night: str, rows: pd.DataFrame
                  ) -> list[np.ndarray | None]:
    """Each row's mask of damaged sky from the night's array store: a bool array of
    :func:`survey_qa.pipeline.skymask.mask_grid` cells (True: damaged), or None where the
    store holds none for the frame or its ``defect_mask_fraction`` is not finite."""
    out: list[np.ndarray | None] = [None] * len(rows)
    store = paths.zarr_store(out_root, night)
    if not store.exists() or "defect_mask_fraction" not in rows:
        return out
    index = outputs.store_frames(store, "defect_mask")
    made = np.isfinite(rows["defect_mask_fraction"].to_numpy(float))
    keys = zip(rows["exposure"].astype(str), rows["detector"].astype(str))
    wanted = {i: index[key] for i, key in enumerate(keys) if made[i] and key in index}
    for i, cells in outputs.read_frames(store, "defect_mask", wanted).items():
        out[i] = skymask.detector_cells(cells, (int(rows.at[i, "ny"]), int(rows.at[i, "nx"])))
    return out


def whole_detector_damaged(damaged: list[np.ndarray | None]) -> np.ndarray:
    """True for the frames whose every cell is damaged sky."""
    return np.array([c is not None and bool(c.all()) for c in damaged], bool)


def reference_frame(rows: pd.DataFrame, damaged: list[np.ndarray | None]) -> int:
    """The reference frame (:func:`survey_qa.pipeline.stack.choose_reference`) among the
    frames with some undamaged sky; raises ``ValueError`` when every frame's whole
    detector is damaged."""
    candidates = np.flatnonzero(~whole_detector_damaged(damaged))
    if candidates.size == 0:
        raise ValueError("the whole detector of every chosen frame is damaged sky "
                         "(--keep-damaged-sky stacks them anyway)")
    choice = stack.choose_reference(transparency(rows)[candidates],
                                    frame_fwhm(rows)[candidates])
    return int(candidates[choice])


# ---------------------------------------------------------------------------- frames on disk


class DiskFrames:
    """Equal-shape 2-d arrays on disk, one ``numpy.memmap`` file per frame.

    ``frames[i] = array`` writes frame ``i``; ``frames[:, rows]`` reads those rows of every
    frame (a frame never written reads as ``fill``). Each access maps a file only while
    it reads or writes it, so that what passed through does not stay in memory.

    Parameters
    ----------
    folder
        Where the files go (one per written frame).
    name
        Prefix of the file names.
    n
        Number of frames.
    shape
        ``(ny, nx)`` of every frame.
    dtype, fill
        Element type, and the value of frames never written.
    """

    def __init__(self, folder: str | Path, name: str, n: int, shape: tuple[int, int],
                 dtype: np.dtype | type, fill: float | bool):
        self.folder, self.name = Path(folder), name
        self.shape = (int(n), int(shape[0]), int(shape[1]))
        self.dtype, self.fill = np.dtype(dtype), fill

    def _file(self, i: int) -> Path:
        return self.folder / f"{self.name}-{i:05d}.dat"

    def __setitem__(self, i: int, array: np.ndarray) -> None:
        out = np.memmap(self._file(i), self.dtype, "w+", shape=self.shape[1:])
        out[:] = array
        out.flush()
        del out

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        if not (isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None)
                and isinstance(key[1], slice)):
            raise IndexError("DiskFrames reads [:, rows]")
        r0, r1, step = key[1].indices(self.shape[1])
        block = np.full((self.shape[0], len(range(r0, r1, step)), self.shape[2]), self.fill,
                        self.dtype)
        for i in range(self.shape[0]):
            if self._file(i).is_file():
                frame = np.memmap(self._file(i), self.dtype, "r", shape=self.shape[1:])
                block[i] = frame[r0:r1:step]
                del frame
        return block


# ---------------------------------------------------------------------------- the flow


def stack_field(cfg: Config, night: str, *, field_name: str | None = None,
                classes: list[str] | None = None, where: str | None = None,
                weighting: str = "quality", sigma: float = 3.0, iterations: int = 3,
                detector: str | None = None, output: str | Path | None = None,
                interpolation: str = "bilinear", mask_damaged_sky: bool = True) -> StackRun:
    """Choose, register, scale and combine one field's frames of a night; write the FITS.

    Parameters
    ----------
    field_name
        The field (its name, ``OBJECT`` or the catalog's ``field`` group,
        :func:`field_names`); None: the chosen frames must hold one.
    classes
        Quality classes to stack (default: ``good``); an empty list: every class.
    where
        A ``survey-qa select`` expression over exposure columns.
    weighting
        ``quality`` (:func:`survey_qa.pipeline.stack.quality_weights`) or ``equal``.
    sigma, iterations
        Clipping threshold (0: none) and its passes.
    detector
        The detector of mosaic frames to stack.
    output
        The FITS file (default :func:`survey_qa.paths.stack_file`).
    interpolation
        ``bilinear`` or ``cubic`` (:data:`INTERPOLATIONS`).
    mask_damaged_sky
        Leave out each frame's damaged sky where the array store has its mask (module
        notes); False: every pixel counts.

    Raises ``ValueError`` on a wrong argument, a missing catalog or no usable frame.
    """
    from survey_qa.pipeline.schema import CLASSES

    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"--interpolation: {interpolation!r} is not one of "
                         f"{', '.join(INTERPOLATIONS)}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"--weighting: {weighting!r} is not one of {', '.join(WEIGHTINGS)}")
    classes = ["good"] if classes is None else list(classes)
    for c in classes:
        if c not in CLASSES:
            raise ValueError(f"--class: {c!r} is not one of {', '.join(CLASSES)}")
    exposures, sources = read_catalogs(cfg.run.out_root, night)
    _, chosen = selection.choose_frames(selection.weighted_rows(exposures, sources), where,
                                        classes or None)
    if chosen.empty:
        raise ValueError(f"no frame of night {night} passes the selection "
                         f"(classes {', '.join(classes) or 'all'}{', ' + where if where else ''})")
    rows, name, notes = one_field(detector_rows(exposures, chosen, detector), field_name)
    damaged = (damaged_cells(cfg.run.out_root, night, rows) if mask_damaged_sky
               else [None] * len(rows))
    ref = reference_frame(rows, damaged)
    path = Path(output) if output else paths.stack_file(cfg.run.out_root, night,
                                                        file_name(name))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.stem}-frames-", dir=path.parent) as tmp:
        frames = _register_and_read(cfg, rows, sources, ref, Path(tmp),
                                    INTERPOLATIONS[interpolation], damaged)
        weights = _weights(rows, frames, weighting)
        scale = 1.0 / frames.throughput
        result = stack.combine(frames.data, frames.mask, weights, frames.noise_adu * scale,
                               scale / frames.gain, sigma=sigma, iterations=iterations)
    provenance = _provenance(rows, frames, weights, result, ref)
    settings = {"night": night, "field": name, "weighting": weighting, "sigma": sigma,
                "iterations": iterations, "classes": classes, "where": where or "",
                "interpolation": interpolation, "mask_damaged_sky": mask_damaged_sky,
                "n_sky_masks": sum(c is not None for c in damaged)}
    write_stack(path, result, provenance, settings, _reference_wcs(rows.iloc[ref]))
    return StackRun(night=night, field=name or UNNAMED_FIELD, path=path,
                    provenance=provenance, noise_adu=result.noise_adu, notes=notes)


def _weights(rows: pd.DataFrame, frames: _Frames, weighting: str) -> np.ndarray:
    """Each frame's weight in the stack (0 for frames not used); raises ``ValueError``
    when no frame has a positive one."""
    weights = (stack.quality_weights(frames.throughput, frames.star_noise_adu, frame_fwhm(rows))
               if weighting == "quality" else np.where(frames.used, 1.0, 0.0))
    weights = np.where(frames.used, weights, 0.0)
    if not (weights > 0).any():
        raise ValueError("no chosen frame could be registered and weighted")
    return weights


@dataclass
class _Frames:
    """The chosen frames on the reference grid and what was measured on each."""

    data: DiskFrames  # (n, ny, nx) float32, sky subtracted, scaled to the reference
    mask: DiskFrames  # (n, ny, nx) bool
    used: np.ndarray  # (n,) bool
    throughput: np.ndarray  # (n,) frame / reference star flux
    noise_adu: np.ndarray  # (n,) sky noise per pixel of the frame itself
    star_noise_adu: np.ndarray  # (n,) its noise per pixel on the scale of a star
    sky_adu: np.ndarray  # (n,) median sky subtracted
    gain: np.ndarray  # (n,) e-/ADU (inf when unknown: no photon-noise term)
    registrations: list[stack.Registration | None]
    registered_by: list[str]  # reference | stars | wcs+stars | wcs | ''
    scaled_by: list[str]  # reference | stars | transparency_mag | ''
    notes: list[str]
    damaged_share: np.ndarray  # (n,) share of the frame's pixels under its damaged-sky mask


def _read_frame(cfg: Config, row: pd.Series):
    """The DetectorImage of a catalog row (raises QualityError when unreadable)."""
    for d in read_detectors(row["path"], cfg.io, row["exposure"]):
        if isinstance(d, QualityError):
            if d.metadata.get("detector") == row["detector"]:
                raise d
        elif d.detector == row["detector"]:
            return d
    raise QualityError(f"no detector {row['detector']!r} in {row['path']}")


def _shape(row: pd.Series) -> tuple[int, int]:
    return int(row["ny"]), int(row["nx"])


def _register_and_read(cfg: Config, rows: pd.DataFrame, sources: pd.DataFrame,
                       ref: int, folder: Path, order: int = 1,
                       damaged: list[np.ndarray | None] | None = None) -> _Frames:
    """Register every frame to ``rows[ref]``, read it, leave out its damaged sky
    (``damaged``: each frame's cells of :func:`damaged_cells`, None: none), subtract its
    sky, resample it and write it to ``folder`` (:class:`DiskFrames`)."""
    n = len(rows)
    damaged = [None] * n if damaged is None else damaged
    whole = whole_detector_damaged(damaged)
    shares = [stack.cells_pixel_share(c, _shape(rows.iloc[i])) if c is not None else 0.0
              for i, c in enumerate(damaged)]
    reference_first = [ref, *[i for i in range(n) if i != ref]]
    fwhm = np.nan_to_num(frame_fwhm(rows), nan=DEFAULT_FWHM_PX)
    ref_stars = frame_stars(sources, rows.at[ref, "exposure"], rows.at[ref, "detector"])
    ref_wcs = frame_wcs(rows.iloc[ref])
    frames: _Frames | None = None
    for i in reference_first:
        row = rows.iloc[i]
        if whole[i]:
            frames.notes[i] = "its whole detector is damaged sky"
            continue
        try:
            if i == ref:
                reg, how = stack.identity(), ("reference", "reference")
            else:
                stars = frame_stars(sources, row["exposure"], row["detector"])
                reg, how = _register(rows, i, ref, ref_stars, stars, ref_wcs)
            image = _read_frame(cfg, row)
            flat = illumination.detector_flat(image, cfg)
            if flat is not None:  # the master flat the nightly job divides by
                image = illumination.flat_fielded(image, flat)
            if frames is None:
                frames = _empty_frames(n, image.data.shape, folder)
                frames.damaged_share[:] = shares
            bad = _with_damaged_sky(image.mask, damaged[i])
            sky = measure_background(image.data, bad, cfg.background)
            residual = image.data - sky.back
            star_noise = stack.star_scale_noise(residual, bad,
                                                round(STAR_BOX_FWHM * fwhm[i]))
            data, mask = stack.resample_registered(residual, bad, reg,
                                                   frames.data.shape[1:], order=order)
        except (ValueError, QualityError, OSError) as e:
            if i == ref:
                raise ValueError(f"the reference frame {row['exposure']} cannot be used: "
                                 f"{exception_text(e)}") from None
            frames.notes[i] = exception_text(e)
            continue
        frames.data[i] = data / reg.throughput
        frames.mask[i] = mask
        frames.used[i] = True
        frames.throughput[i] = reg.throughput
        frames.noise_adu[i] = sky.noise
        frames.star_noise_adu[i] = star_noise if math.isfinite(star_noise) else sky.noise
        frames.sky_adu[i] = sky.level
        gain = image.meta.gain_e_per_adu
        frames.gain[i] = gain if math.isfinite(gain) and gain > 0 else math.inf
        frames.registrations[i] = reg
        frames.registered_by[i], frames.scaled_by[i] = how
    return frames


def _with_damaged_sky(mask: np.ndarray, cells: np.ndarray | None) -> np.ndarray:
    """A frame's bad-pixel mask with the pixels of its damaged sky cells added
    (:func:`survey_qa.pipeline.stack.cells_to_pixels`; None: no cells)."""
    if cells is None:
        return mask
    return mask | stack.cells_to_pixels(cells, mask.shape)


def _register(rows: pd.DataFrame, i: int, ref: int, ref_stars: tuple, stars: tuple,
              ref_wcs) -> tuple[stack.Registration, tuple[str, str]]:
    """Frame ``i``'s registration to ``ref`` and how it was made and scaled.

    From the star patterns; where they do not match, through the two frames' WCS corrected
    on the sources it pairs (:func:`survey_qa.pipeline.stack.register_by_wcs`). The
    throughput is the matched stars' flux ratio, else the catalog's ``transparency_mag``
    and exposure times. Raises ``ValueError`` when neither way registers or scales the
    frame.
    """
    try:
        reg, registered_by = stack.register(*ref_stars[:2], *stars[:2], ref_stars[2],
                                            stars[2]), "stars"
    except ValueError as e:
        wcs = frame_wcs(rows.iloc[i]) if ref_wcs is not None else None
        if wcs is None:
            raise
        reg = stack.register_by_wcs(stack.WcsMapping(ref_wcs, wcs),
                                    (int(rows.at[i, "ny"]), int(rows.at[i, "nx"])),
                                    *ref_stars[:2], *stars[:2], ref_stars[2], stars[2])
        registered_by = "wcs+stars" if reg.n_matched >= stack.MIN_WCS_PAIRS else "wcs"
        if registered_by == "wcs":
            reason = exception_text(e)
    scaled_by = "stars"
    if not (math.isfinite(reg.throughput) and reg.throughput > 0):
        reg.throughput, scaled_by = _catalog_throughput(rows, i, ref), "transparency_mag"
    if not (math.isfinite(reg.throughput) and reg.throughput > 0):
        why = (f"{reason}; through the WCS {reg.n_matched} sources pair up"
               if registered_by == "wcs" else "no flux ratio from the matched stars")
        raise ValueError(f"{why}; no transparency_mag to scale it")
    return reg, (registered_by, scaled_by)


def _catalog_throughput(rows: pd.DataFrame, i: int, ref: int) -> float:
    """Frame ``i``'s throughput against ``ref`` from the catalog: ``transparency_mag``
    (per second of exposure) and the exposure times; NaN when either is unknown."""
    if "transparency_mag" not in rows:
        return math.nan
    dm = rows.at[i, "transparency_mag"] - rows.at[ref, "transparency_mag"]
    ratio = rows.at[i, "exptime_s"] / rows.at[ref, "exptime_s"]
    value = 10 ** (-0.4 * dm) * ratio
    return float(value) if np.isfinite(value) and value > 0 else math.nan


def _empty_frames(n: int, shape: tuple[int, int], folder: Path) -> _Frames:
    return _Frames(data=DiskFrames(folder, "data", n, shape, np.float32, 0.0),
                   mask=DiskFrames(folder, "mask", n, shape, bool, True),
                   used=np.zeros(n, bool), throughput=np.full(n, math.nan),
                   noise_adu=np.full(n, math.nan), star_noise_adu=np.full(n, math.nan),
                   sky_adu=np.full(n, math.nan),
                   gain=np.full(n, math.inf), registrations=[None] * n,
                   registered_by=[""] * n, scaled_by=[""] * n, notes=[""] * n,
                   damaged_share=np.zeros(n))


def _provenance(rows: pd.DataFrame, frames: _Frames, weights: np.ndarray,
                result: stack.StackResult, ref: int) -> pd.DataFrame:
    """One row per chosen frame: what it is and what it gave the stack."""
    ny, nx = frames.data.shape[1:]
    centre = ((nx - 1) / 2, (ny - 1) / 2)
    drift = [r.drift_px(*centre) if r is not None else (math.nan, math.nan)
             for r in frames.registrations]
    regs = frames.registrations
    return pd.DataFrame({
        "exposure": rows["exposure"].astype(str),
        "detector": rows["detector"].astype(str),
        "path": rows["path"].astype(str),
        "quality_class": rows["quality_class"].astype(str),
        "used": frames.used,
        "is_reference": np.arange(len(rows)) == ref,
        "weight": weights,
        "throughput": frames.throughput,
        "scale": 1.0 / frames.throughput,
        "shift_x_px": [d[0] for d in drift],
        "shift_y_px": [d[1] for d in drift],
        "rotation_deg": [r.rotation_deg if r is not None else math.nan for r in regs],
        "n_matched": [r.n_matched if r is not None else 0 for r in regs],
        "registered_by": frames.registered_by,
        "scaled_by": frames.scaled_by,
        "fwhm_px": frame_fwhm(rows),
        "sky_adu": frames.sky_adu,
        "sky_noise_adu": frames.noise_adu,
        "star_noise_adu": frames.star_noise_adu,
        "rejected_px": result.rejected_px,
        "damaged_sky_share": frames.damaged_share,
        "note": frames.notes,
    })


# ---------------------------------------------------------------------------- writing


def frame_wcs(row: pd.Series):
    """A catalog row's celestial WCS (astropy), or None when its header has none or when
    it does not describe the pixels measured (an overscan-trimmed or binned frame)."""
    from astropy.wcs import WCS

    shape = (int(row["ny"]), int(row["nx"]))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FITSFixedWarning on non-standard headers
            header = fits.getheader(row["path"], int(row["hdu"]))
            if (header.get("NAXIS2"), header.get("NAXIS1")) != shape and \
                    (header.get("ZNAXIS2"), header.get("ZNAXIS1")) != shape:
                return None
            wcs = WCS(header).celestial
            return wcs if wcs.has_celestial else None
    except Exception:  # an unreadable or odd header: no WCS
        return None


def _reference_wcs(row: pd.Series) -> fits.Header | None:
    """The reference frame's celestial WCS as header cards, its SIP distortion included
    (None without one)."""
    wcs = frame_wcs(row)
    return wcs.to_header(relax=True) if wcs is not None else None


def write_stack(path: str | Path, result: stack.StackResult, provenance: pd.DataFrame,
                settings: dict, wcs: fits.Header | None = None) -> Path:
    """Write the stack, its weight and count maps and the provenance table, atomically."""
    primary = fits.PrimaryHDU(result.image.astype(np.float32))
    h = primary.header
    if wcs is not None:
        h.update(wcs)
    ref = provenance.loc[provenance["is_reference"], "exposure"]
    used = provenance["used"]
    cards = {
        "BUNIT": ("ADU", "reference frame's ADU, sky subtracted"),
        "ORIGIN": ("survey-qa", "survey-qa stack"),
        "QAVERS": (__version__, "survey-qa version"),
        "DATE": (datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"), "written (UTC)"),
        "NIGHT": (settings["night"], "night of the frames"),
        "FIELD": (fits_text(settings["field"]), "field (OBJECT or field group)"),
        "REFEXP": (fits_text(ref.iloc[0] if len(ref) else ""), "reference exposure"),
        "NCOMBINE": (int(used.sum()), "frames combined"),
        "NCHOSEN": (len(provenance), "frames chosen"),
        "WEIGHTNG": (settings["weighting"], "quality: t^2/(sigma^2 FWHM^2); equal"),
        "CLIPSIG": (float(settings["sigma"]), "clipping threshold (0: none)"),
        "CLIPITER": (int(settings["iterations"]), "clipping passes at most"),
        "INTERP": (settings.get("interpolation", "bilinear"), "resampling onto the "
                   "reference grid"),
        "REGISTER": ("stars", "matched stars, else the WCS: registered_by"),
        "SKYSUB": (True, "each frame's mesh sky subtracted"),
        "NREJECT": (int(provenance["rejected_px"].sum()), "pixels rejected by clipping"),
        "SKYMASK": (bool(settings.get("mask_damaged_sky", False)), "damaged sky left out "
                    "(defect_mask)"),
        "NSKYMASK": (int(settings.get("n_sky_masks", 0)), "frames with a damaged-sky mask "
                     "applied"),
        "SKYNOISE": (float(result.noise_adu), "expected sky noise per pixel (ADU)"),
        "CLASSES": (fits_text(",".join(settings["classes"]) or "all"), "classes stacked"),
        "WHERE": (fits_text(settings["where"]), "selection expression"),
    }
    for key, (value, comment) in cards.items():
        if isinstance(value, float) and not math.isfinite(value):
            value = "NaN"  # FITS headers hold no NaN
        h[key] = (value, comment)
    table = fits.BinTableHDU(Table.from_pandas(provenance), name="PROVENANCE")
    hdus = fits.HDUList([primary,
                         fits.ImageHDU(result.weight.astype(np.float32), name="WEIGHT"),
                         fits.ImageHDU(result.n_frames.astype(np.int16), name="NFRAMES"),
                         table])
    with atomic_target(path) as tmp:
        hdus.writeto(tmp)
    return Path(path)
