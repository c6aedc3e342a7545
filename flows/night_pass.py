"""The night pass: night-level calibrations applied to the measured rows, then the decision
taken again where they changed its inputs.

It runs when the night's catalogs are gathered, on the per-exposure rows of the work
folder (which it never changes), so a re-run gives the same catalog. What it reads and
writes is the night's array store (and, for the sequence, the per-exposure source
catalogs); what it computes is in :mod:`survey_qa.pipeline.night`,
:mod:`survey_qa.pipeline.illumination` and :mod:`survey_qa.pipeline.sequence`.

The order: autoencoder threshold, illumination, then the frames of each field against
each other (:func:`survey_qa.flows.sequence.measure_night`); the decision is taken again
for the rows whose inputs the first two changed and for those where the sequence shows
cloud (:func:`~survey_qa.pipeline.decide.cloud_words`). A row that only gains its
cross-frame columns keeps its decision.
"""
from __future__ import annotations

import numpy as np

from survey_qa.config import Config
from survey_qa.flows import illumination, sequence
from survey_qa.pipeline import decide, night, outputs


def _keys(rows: list[dict], positions) -> dict[int, tuple[str, str]]:
    return {i: (rows[i]["exposure"], rows[i]["detector"]) for i in positions}


def calibrate_autoencoder(rows: list[dict], cfg: Config, scorer, store) -> dict[int, dict]:
    """Masks and mask fractions from the night-calibrated threshold
    (:func:`~survey_qa.pipeline.night.calibrate_group`), one detector shape at a time.

    Reads the score maps from the array store and writes the new masks there; ``rows``
    are not changed. Returns the changed rows by position.
    """
    frames = outputs.store_frames(store)
    quantile = cfg.autoencoder.threshold_quantile
    reference = scorer.threshold_at(quantile)
    changed = {}
    for members in night.ae_groups(rows, set(frames)):
        index = {i: frames[key] for i, key in _keys(rows, members).items()}
        maps = outputs.read_frames(store, "ae_score_map", index)
        rows_now, masks = night.calibrate_group(rows, maps, reference, quantile,
                                                cfg.autoencoder.close_px, scorer.block_px)
        for i, mask in masks.items():
            outputs.write_frame(store, index[i], {"ae_mask": mask.astype(np.uint8)})
        changed.update(rows_now)
    return changed


def finish_night(rows: list[dict], cfg: Config, models, store) -> list[dict]:
    """The night's rows after the night-level calibrations (a new list)."""
    rows = [dict(r) for r in rows]
    changed = set()
    if models.scorer is not None and store.exists():
        ae = calibrate_autoencoder(rows, cfg, models.scorer, store)
        for i, r in ae.items():
            rows[i] = r
        changed |= set(ae)
    lit = illumination.correct_night(rows, cfg, store)
    for i, r in lit.items():
        rows[i] = r
    changed |= set(lit)
    block_px = models.scorer.block_px if models.scorer is not None else None
    fields = sequence.measure_night(rows, cfg, store, block_px)
    for i, r in fields.items():
        rows[i] = r
    changed |= {i for i, r in fields.items()
                if r["detector"] != "ALL" and decide.cloud_words(r, cfg.classify)}
    occupancies = {}
    if models.classifier is not None and changed:
        frames = outputs.store_frames(store)
        wanted = {i: frames[key] for i, key in _keys(rows, changed).items()}
        occupancies = outputs.read_frames(store, "som_occupancy", wanted)
    return night.decide_again(rows, changed, cfg.classify, models.classifier, occupancies)
