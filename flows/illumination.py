"""Wiring of the illumination correction (:mod:`survey_qa.pipeline.illumination`).

- :func:`detector_flat`: the configured master flat of a detector (``background.flat``,
  or ``background.flats[filter]``), read once per process; the measurement divides by it.
- :func:`correct_night`: in the night pass, the coarse sky maps of the night's frames are
  read from the array store and each group of frames of one detector geometry and filter
  gets its sky non-uniformity measured again on ``sky / pattern``.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np

from survey_qa.config import BackgroundConfig, Config, IOConfig
from survey_qa.pipeline import illumination, io, outputs
from survey_qa.pipeline.errors import QualityError
from survey_qa.pipeline.records import DetectorImage


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


def detector_flat(det: DetectorImage, cfg: Config) -> illumination.Flat | None:
    """The master flat of this detector, or None when none is configured.

    A flat file of one image serves every detector; a mosaic flat serves the detector of
    the same name.

    Raises
    ------
    QualityError
        When the flat has no such detector.
    ValueError
        When the flat file cannot be read (:func:`read_flat`).
    """
    path = flat_path(det.meta.filter, cfg.background)
    if path is None:
        return None
    flats = read_flat(str(path), cfg.io)
    entry = flats.get(det.detector) or (next(iter(flats.values())) if len(flats) == 1
                                        else None)
    if entry is None:
        raise QualityError(f"the flat field {Path(path).name} has no detector {det.detector}")
    return illumination.Flat(Path(path).name, *entry)


# ---------------------------------------------------------------------------- night pass


def correct_night(rows: list[dict], cfg: Config, store) -> dict[int, dict]:
    """Sky non-uniformity measured on ``sky / night pattern``
    (:func:`~survey_qa.pipeline.illumination.correct_group`), group by group.

    Reads each group's coarse sky maps from the array store; ``rows`` are not changed.

    Returns
    -------
    dict
        Row position -> the changed row (its class must be decided again).
    """
    mode = cfg.background.illumination
    if mode == "none" or not Path(store).exists():
        return {}
    frames = outputs.store_frames(store, "sky_map")
    min_frames = cfg.background.illumination_min_frames
    changed = {}
    for members in illumination.night_groups(rows, set(frames), min_frames):
        index = {i: frames[(rows[i]["exposure"], rows[i]["detector"])] for i in members}
        sky_maps = outputs.read_frames(store, "sky_map", index)
        mesh_px = {i: int(m) for i, m in outputs.read_frames(store, "sky_mesh_px", index).items()}
        changed.update(illumination.correct_group(rows, sky_maps, mesh_px, mode, min_frames))
    return changed
