"""Wiring of the night as a sequence (:mod:`survey_qa.pipeline.sequence`).

In the night pass, the measured light frames of one detector geometry and filter are
grouped by field, the well-measured stars of each frame are read from its per-exposure
source catalog in the work folder, and every frame of a field of at least
``sequence.min_frames`` frames gets its cross-frame columns: the field, its reference
exposure, transparency, extinction spread ``k``, star-count ratio, shift, rotation and
relative FWHM. The field's frames then get masks of their damaged sky
(:mod:`survey_qa.pipeline.skymask`), written into the array store (``defect_mask``) with
their share in the catalog (``defect_mask_fraction``). A frame alone in its field keeps
its row exactly.
"""
from __future__ import annotations

import collections
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from survey_qa import paths
from survey_qa.config import Config
from survey_qa.pipeline import outputs, sequence, skymask
from survey_qa.pipeline.classify import MOSAIC_COMBINE
from survey_qa.pipeline.columns import EXPOSURE_COLUMNS
from survey_qa.pipeline.flags import bits

SEQUENCE_COLUMNS = tuple(c.name for c in EXPOSURE_COLUMNS if c.group.startswith("sequence"))
"""The exposure columns this pass writes."""

SOURCE_READ = ("detector", "x", "y", "flux", "flux_err", "snr", "flags")
"""Source-catalog columns read for the comparison."""


def _usable(row: dict) -> bool:
    """A measured light detector (not a mosaic's summary row) with detections."""
    return (row["status"] == "ok" and row["detector"] != "ALL"
            and row.get("image_type") in ("light", "", None)
            and int(row.get("n_sources") or 0) > 0)


def _frame_key(row: dict) -> tuple:
    """Frames comparable star for star: one detector (of a mosaic), size and filter."""
    detector = row["detector"] if int(row.get("n_detectors") or 1) > 1 else ""
    return detector, row["nx"], row["ny"], row.get("filter") or ""


def _time_key(item: tuple[int, dict]) -> tuple:
    i, r = item
    mjd = r.get("mjd_obs")
    return (0 if isinstance(mjd, float) and math.isfinite(mjd) else 1,
            mjd if isinstance(mjd, float) and math.isfinite(mjd) else 0.0,
            r.get("date_obs") or "", r["exposure"], r["detector"])


def candidate_sets(rows: list[dict]) -> list[dict[int, dict]]:
    """Usable rows by :func:`_frame_key`, each set in time order, sets of two or more."""
    sets = collections.defaultdict(list)
    for i, r in enumerate(rows):
        if _usable(r):
            sets[_frame_key(r)].append((i, r))
    return [dict(sorted(members, key=_time_key)) for members in sets.values()
            if len(members) >= 2]


def read_stars(work: tuple[Path, str], rows: dict[int, dict], cfg: Config
               ) -> dict[int, sequence.FrameStars]:
    """The well-measured stars of these rows, read from their per-exposure source files.

    ``work`` is ``(out_root, night)``; a row whose file is missing or unreadable has none.
    """
    out_root, night = work
    by_exposure = collections.defaultdict(list)
    for i, r in rows.items():
        by_exposure[r["exposure"]].append(i)
    stars = {}
    for exposure, positions in by_exposure.items():
        path = paths.result_file(out_root, night, "sources", exposure)
        try:
            table = pq.read_table(path, columns=list(SOURCE_READ)).to_pandas()
        except (OSError, ValueError):  # absent or damaged: the frame has no stars here
            continue
        by_detector = dict(tuple(table.groupby("detector", sort=False)))
        for i in positions:
            r = rows[i]
            if r["detector"] not in by_detector:
                continue
            chosen = sequence.select_stars(by_detector[r["detector"]], cfg.sequence.min_snr)
            if len(chosen) >= 3:
                stars[i] = sequence.FrameStars.from_sources(
                    chosen, float(r.get("exptime_s") or math.nan), cfg.sequence.max_stars)
    return stars


def _fwhm_px(row: dict) -> float:
    """The PSF FWHM, else the bright detections' (no PSF fit), else NaN (pixels)."""
    for key in ("fwhm_px", "src_fwhm_px"):
        value = row.get(key)
        if isinstance(value, float) and math.isfinite(value):
            return value
    return math.nan


def _fwhm_rel(rows: list[dict], members: list[int]) -> dict[int, float]:
    fwhm = np.array([_fwhm_px(rows[i]) for i in members], float)
    median = np.nanmedian(fwhm) if np.isfinite(fwhm).any() else math.nan
    return {i: float(f / median) if math.isfinite(median) and median > 0 else math.nan
            for i, f in zip(members, fwhm)}


def field_rows(rows: list[dict], members: list[int], stars: dict[int, sequence.FrameStars],
               cfg: Config) -> tuple[dict[int, dict], dict[int, dict]]:
    """The rows of one field with their cross-frame columns (new dicts), and the
    field's records (:func:`~survey_qa.pipeline.sequence.field_records`; empty for a field
    too small to measure).

    A field of fewer than ``sequence.min_frames`` frames gets its name and the qa flag
    ``FEW_FIELD_FRAMES``; a frame that cannot be matched to the reference gets
    ``FIELD_UNMATCHED``; their other cross-frame columns stay NaN.
    """
    name = rows[members[0]]["exposure"]
    out = {i: {**rows[i], "field": name} for i in members}
    measured = {i: stars[i] for i in members if i in stars}
    if len(measured) < cfg.sequence.min_frames:
        for r in out.values():
            r["qa_flags"] = int(r["qa_flags"]) | bits("FEW_FIELD_FRAMES")
        return out, {}
    first = rows[members[0]]
    records = sequence.field_records(measured, (int(first["ny"]), int(first["nx"])),
                                     cfg.sequence)
    fwhm_rel = _fwhm_rel(rows, members)
    for i, r in out.items():
        rec = records.get(i)
        r["field_reference"] = rows[next(iter(records.values()))["reference"]]["exposure"]
        if rec is None or not rec["matched"]:
            r["qa_flags"] = int(r["qa_flags"]) | bits("FIELD_UNMATCHED")
            continue
        r.update({k: rec[k] for k in ("n_matched_stars", "transparency_mag",
                                      "extinction_spread_mag", "star_count_ratio",
                                      "shift_x_px", "shift_y_px", "rotation_deg")},
                 fwhm_rel=fwhm_rel[i])
    return out, records


def defect_masks(rows: dict[int, dict], records: dict[int, dict], store, block_px: int | None,
                 cfg: Config) -> dict[int, dict]:
    """The masks of the damaged sky of one field's frames
    (:func:`~survey_qa.pipeline.skymask.field_masks`), written into the array store, and
    the rows with their ``defect_mask_fraction``.

    ``rows`` are the field's rows by position (time order); ``block_px`` is the side of an
    autoencoder mask cell (None: no autoencoder). A store without ``defect_mask`` (made
    before it existed) gets no masks and the rows stay as they are.
    """
    frames = outputs.store_frames(store, "defect_mask") if Path(store).exists() else {}
    members = [i for i, r in rows.items() if (r["exposure"], r["detector"]) in frames]
    if not members:
        return {}
    index = {i: frames[(rows[i]["exposure"], rows[i]["detector"])] for i in members}
    shape = (int(rows[members[0]]["ny"]), int(rows[members[0]]["nx"]))
    sky = outputs.read_frames(store, "sky_map", index)
    ae = outputs.read_frames(store, "ae_mask", index) if block_px else {}
    masks = skymask.field_masks(
        shape, [sky.get(i) for i in members], [rows[i].get("mjd_obs") or math.nan
                                               for i in members],
        [records.get(i, {}).get("extinction_stars") for i in members],
        [records.get(i, {}).get("extinction_spread_mag", math.nan) for i in members],
        [skymask.ae_cells(ae[i], block_px, shape) if i in ae else None for i in members],
        cfg.sequence.map_scale * max(shape))
    out = {}
    for i, mask in zip(members, masks):
        outputs.write_frame(store, index[i], {"defect_mask": mask.astype(np.uint8)})
        out[i] = {**rows[i], "defect_mask_fraction": skymask.mask_fraction(mask)}
    return out


def _work(store) -> tuple[Path, str]:
    """(out_root, night) of the night whose array store is ``store``
    (:func:`survey_qa.paths.zarr_store`)."""
    store = Path(store)
    return store.parent.parent, store.name.removesuffix(".zarr")


def summary_rows(rows: list[dict], changed: dict[int, dict]) -> dict[int, dict]:
    """The mosaic summary rows (``detector = "ALL"``) of the exposures of ``changed``, with
    the cross-frame columns and ``qa_flags`` combined again over their detectors."""
    rows = [changed.get(i, r) for i, r in enumerate(rows)]
    exposures = {rows[i]["exposure"] for i in changed}
    columns = [c for c in EXPOSURE_COLUMNS if c.name in (*SEQUENCE_COLUMNS, "qa_flags")]
    out = {}
    for j, r in enumerate(rows):
        if r["detector"] != "ALL" or r["exposure"] not in exposures:
            continue
        dets = [d for d in rows if d["exposure"] == r["exposure"] and d["detector"] != "ALL"
                and d["status"] == "ok"]
        if dets:
            out[j] = {**r, **{c.name: MOSAIC_COMBINE[c.mosaic](c, dets) for c in columns}}
    return out


def measure_night(rows: list[dict], cfg: Config, store, block_px: int | None = None
                  ) -> dict[int, dict]:
    """The night's rows with cross-frame columns and masks of the damaged sky, by position
    (only those that changed).

    Rows are not changed. ``store`` is the night's array store, which names the work
    folder holding the per-exposure source catalogs and receives the masks;
    ``block_px`` is the side of an autoencoder mask cell (None: no autoencoder). Returns {}
    when ``sequence.enabled`` is off or no field has two frames.
    """
    if not cfg.sequence.enabled:
        return {}
    s = cfg.sequence
    sets = candidate_sets(rows)
    stars = read_stars(_work(store), {i: r for c in sets for i, r in c.items()}, cfg)
    changed = {}
    for candidates in sets:
        groups = sequence.field_groups(candidates, stars, s.field_radius, s.pattern_tries,
                                       s.control_stars, s.match_tolerance_px)
        for members in groups:
            field, records = field_rows(rows, members, stars, cfg)
            changed.update(field)
            if records:
                changed.update(defect_masks(field, records, store, block_px, cfg))
    changed.update(summary_rows(rows, changed))
    return changed
