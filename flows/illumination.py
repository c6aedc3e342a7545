"""Wiring of the illumination correction (:mod:`survey_qa.pipeline.illumination`).

- :func:`flat_field`: before a detector is measured, divide it by the configured master
  flat (``background.flat``, or ``background.flats[filter]``), read once per process.
- :func:`sky_arrays`: what each detector stores in the night's array store for the night
  pass (its coarse sky map and mesh size).
- :func:`correct_night`: in the night pass, learn each detector geometry's illumination
  pattern from the night's sky maps and measure every frame's sky non-uniformity again
  on ``sky / pattern``.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
from pathlib import Path

import numpy as np

from survey_qa.config import BackgroundConfig, Config, IOConfig
from survey_qa.pipeline import background, illumination, io
from survey_qa.pipeline.errors import QualityError
from survey_qa.pipeline.flags import bits
from survey_qa.pipeline.records import BackgroundResult, DetectorImage

SKY_VARIABLES = {
    "sky_map": ((illumination.SKY_GRID, illumination.SKY_GRID), ("sky_y", "sky_x"), "float32",
                np.nan),
    "sky_mesh_px": ((), (), "int32", 0),
}
"""Array-store variables of :func:`sky_arrays` (shape, dimensions, dtype, fill)."""


# ---------------------------------------------------------------------------- flat field


def flat_path(filter_name: str, cfg: BackgroundConfig) -> str | None:
    """The master flat for a frame of this filter, or None."""
    return cfg.flats.get(filter_name) or cfg.flat


def read_flat(path: str, io_cfg: IOConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Normalised flat and bad-pixel map of every image HDU of a flat-field file, read
    once per process.

    The flat is trimmed and binned like a frame (overscan, Bayer), so that it lies on the
    grid the pipeline measures. Keyed by detector name.

    Raises
    ------
    ValueError
        When the file cannot be read or holds no usable image (a configuration fault).
    """
    return _read_flat(str(path), tuple(sorted(dataclasses.asdict(io_cfg).items())))


@functools.lru_cache(maxsize=8)
def _read_flat(path: str, io_items: tuple) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    try:
        images = io.read_calibration_images(path, IOConfig(**dict(io_items)))
        out = {name: illumination.normalise_flat(data) for name, data in images.items()}
    except (QualityError, OSError) as e:
        raise ValueError(f"flat field {path}: {getattr(e, 'reason', e)}") from None
    if not out:
        raise ValueError(f"flat field {path}: no image in the file")
    return out


def flat_field(det: DetectorImage, cfg: Config) -> DetectorImage:
    """The detector divided by its master flat (qa flag ``FLAT_FIELDED``), or unchanged
    when none is configured.

    Raises
    ------
    QualityError
        When the flat's size differs from the detector's or it has no such detector.
    """
    path = flat_path(det.meta.filter, cfg.background)
    if path is None:
        return det
    flats = read_flat(str(path), cfg.io)
    entry = flats.get(det.detector) or (next(iter(flats.values())) if len(flats) == 1
                                        else None)
    if entry is None:
        raise QualityError(f"the flat field {Path(path).name} has no detector {det.detector}")
    try:
        data, mask = illumination.apply_flat(det.data, det.mask, *entry)
    except ValueError as e:
        raise QualityError(f"flat field {Path(path).name}: {e}") from None
    return dataclasses.replace(det, data=data, mask=mask,
                               qa_flags=det.qa_flags | bits("FLAT_FIELDED"))


# ---------------------------------------------------------------------------- night pass


def sky_arrays(bkg: BackgroundResult, mask: np.ndarray) -> dict[str, np.ndarray]:
    """The coarse sky map (ADU, NaN where masked) and mesh size of one detector."""
    return {"sky_map": illumination.coarse_sky_map(bkg.back, mask),
            "sky_mesh_px": np.int32(bkg.mesh_px)}


def _frames(store) -> dict[tuple[str, str], int]:
    import zarr

    root = zarr.open_group(str(store), mode="r")
    if "exposure" not in root or "sky_map" not in root:
        return {}
    keys = zip(root["exposure"][:].tolist(), root["detector"][:].tolist())
    return {k: i for i, k in enumerate(keys)}


def _usable(row: dict) -> bool:
    """A measured light frame with a sky to compare, not flat-fielded already."""
    flags = int(row.get("qa_flags") or 0)
    return (row["status"] == "ok" and row["detector"] != "ALL"
            and row.get("image_type") in ("light", "", None)
            and not flags & bits("FLAT_FIELDED", "SKY_UNMEASURED")
            and math.isfinite(row.get("sky_nonuniformity") or math.nan))


def _detector_key(row: dict) -> str:
    """A mosaic detector's name; "" for a single-detector frame, whose name is only the
    HDU that holds it (a compressed copy of the same camera's frame sits in HDU 1)."""
    return row["detector"] if int(row.get("n_detectors") or 1) > 1 else ""


def correct_night(rows: list[dict], cfg: Config, store) -> set[int]:
    """Sky non-uniformity measured on ``sky / night pattern`` (in place).

    Rows are grouped by detector (of a mosaic), size and filter; a group of at least
    ``background.illumination_min_frames`` usable frames gets a pattern
    (:func:`~survey_qa.pipeline.illumination.night_pattern`, or its radial part), and each
    of its rows gets ``sky_nonuniformity`` from its coarse sky map divided by it (noise
    floor removed as in the background stage) and the qa flag ``ILLUMINATION_NIGHT``.
    A frame that the pattern does not describe (its map is less uniform divided by the
    pattern than raw: a frame of another pointing or illumination, or a faint sky over a
    bias pedestal) keeps its raw value.

    Returns
    -------
    set of int
        Positions of the rows that changed (their class must be decided again).
    """
    mode = cfg.background.illumination
    if mode == "none" or not Path(store).exists():
        return set()
    frames = _frames(store)
    if not frames:
        return set()
    import zarr

    root = zarr.open_group(str(store), mode="r")
    groups = collections.defaultdict(list)
    for i, r in enumerate(rows):
        if _usable(r) and (r["exposure"], r["detector"]) in frames:
            groups[(_detector_key(r), r["nx"], r["ny"], r.get("filter") or "")].append(i)
    changed = set()
    for (_, nx, ny, _), members in groups.items():
        if len(members) < cfg.background.illumination_min_frames:
            continue
        maps = {i: root["sky_map"][frames[(rows[i]["exposure"], rows[i]["detector"])]]
                for i in members}
        pattern = illumination.night_pattern(list(maps.values()),
                                             cfg.background.illumination_min_frames)
        if pattern is not None and mode == "radial":
            pattern = illumination.radial_pattern(pattern, ny, nx)
        if pattern is None:
            continue
        for i, sky_map in maps.items():
            r = rows[i]
            mesh = int(root["sky_mesh_px"][frames[(r["exposure"], r["detector"])]])
            u = illumination.corrected_nonuniformity(sky_map, pattern)
            if not u < illumination.corrected_nonuniformity(sky_map, 1.0):
                continue  # the pattern does not describe this frame: its raw u stands
            if mesh > 0:
                u = background.remove_noise_floor(u, background.noise_floor(
                    r["sky_noise"], r["sky_level"], mesh))
            if not math.isfinite(u):
                continue
            r["sky_nonuniformity"] = u
            r["qa_flags"] = int(r["qa_flags"]) | bits("ILLUMINATION_NIGHT")
            changed.add(i)
    return changed
