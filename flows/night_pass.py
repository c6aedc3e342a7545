"""The night pass: night-level calibrations applied to the measured rows, then the decision
taken again where they changed its inputs.

It runs when the night's catalogs are gathered, on the per-exposure rows under
``_work/`` (which it never changes), so a re-run gives the same catalog.
"""
from __future__ import annotations

import collections

import numpy as np

from survey_qa.config import Config
from survey_qa.flows import illumination
from survey_qa.pipeline import aescore, classify, decide, io, night
from survey_qa.pipeline.flags import bits


def _frames(store) -> dict[tuple[str, str], int]:
    import zarr

    root = zarr.open_group(str(store), mode="r")
    if "exposure" not in root:
        return {}
    keys = zip(root["exposure"][:].tolist(), root["detector"][:].tolist())
    return {k: i for i, k in enumerate(keys)}


def _read(store, name: str, index: int) -> np.ndarray | None:
    import zarr

    root = zarr.open_group(str(store), mode="r")
    return root[name][index] if name in root else None


def calibrate_autoencoder(rows: list[dict], cfg: Config, scorer, store) -> set[int]:
    """Masks and mask fractions from the night-calibrated threshold (:mod:`pipeline.night`).

    Changes ``rows`` in place (and the masks in the array store); returns the positions
    of the rows that changed.
    """
    frames = _frames(store)
    reference = scorer.threshold_at(cfg.autoencoder.threshold_quantile)
    groups = collections.defaultdict(list)
    for i, r in enumerate(rows):
        key = (r["exposure"], r["detector"])
        if r["status"] == "ok" and r["detector"] != "ALL" and np.isfinite(r["ae_score"]) \
                and key in frames:
            groups[(r["nx"], r["ny"])].append(i)
    changed = set()
    for (nx, ny), members in groups.items():
        block = scorer.block_px
        grid = (-(-ny // block), -(-nx // block))
        maps = {i: _read(store, "ae_score_map", frames[(rows[i]["exposure"],
                                                         rows[i]["detector"])])
                [:grid[0], :grid[1]] for i in members}
        threshold = night.night_threshold(list(maps.values()), reference,
                                          cfg.autoencoder.threshold_quantile)
        for i, smap in maps.items():
            r, index = rows[i], frames[(rows[i]["exposure"], rows[i]["detector"])]
            if threshold is None:
                if not night.looks_foreign(smap, reference):
                    continue
                r.update(ae_score=np.nan, mask_fraction=np.nan)
                r["qa_flags"] |= bits("AE_OUT_OF_DOMAIN")
                patch_mask = np.zeros(smap.shape, bool)
            elif threshold > reference:
                patch_mask = aescore.make_mask(smap, threshold, cfg.autoencoder.close_px)
                r["mask_fraction"] = aescore.masked_fraction(patch_mask, block, (ny, nx))
                r["qa_flags"] |= bits("AE_NIGHT_THRESHOLD")
            else:
                continue
            io.write_frame(store, index, {"ae_mask": patch_mask.astype(np.uint8)})
            changed.add(i)
    return changed


def decide_again(rows: list[dict], positions: set[int], cfg: Config, classifier, store) -> None:
    """The decision of the rows at ``positions`` taken again (in place), and the summary
    row of every mosaic with such a detector rebuilt."""
    frames = _frames(store) if classifier is not None else {}
    exposures = set()
    for i in positions:
        r = rows[i]
        occupancy = None
        if classifier is not None:
            occupancy = _read(store, "som_occupancy", frames[(r["exposure"], r["detector"])])
        keep = {k: r[k] for k in ("pipeline_version", "model_version", "processed_at")}
        rows[i] = {**decide.classify_row(r, cfg.classify, classifier, occupancy), **keep}
        exposures.add(r["exposure"])
    for j, r in enumerate(rows):
        if r["detector"] == "ALL" and r["exposure"] in exposures:
            dets = [d for d in rows if d["exposure"] == r["exposure"]
                    and d["detector"] != "ALL" and d["status"] == "ok"]
            keep = {k: r[k] for k in ("pipeline_version", "model_version", "processed_at",
                                      "n_detectors", "t_total_s")}
            rows[j] = {**classify.combine_detectors(dets), **keep}


def finish_night(rows: list[dict], cfg: Config, models, store) -> list[dict]:
    """The night's rows after the night-level calibrations (a new list)."""
    rows = [dict(r) for r in rows]
    changed = set()
    if models.scorer is not None and store.exists():
        changed |= calibrate_autoencoder(rows, cfg, models.scorer, store)
    changed |= illumination.correct_night(rows, cfg, store)
    decide_again(rows, changed, cfg, models.classifier, store)
    return rows
