"""One detector through the measurement stages, and one exposure's rows from its detectors.

:func:`measure_detector` runs the stages in order (flat field, background, sources, PSF,
stamps, summary, autoencoder, decision) on a detector that has been read, and returns a
:class:`DetectorResult`: the exposure-catalog row, the source table and the arrays for the
night's array store. :func:`array_variables` is the specification of those arrays.
:func:`exposure_rows` adds a mosaic's summary row and the run's facts to an exposure's
detector rows. Nothing here reads or writes a file.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd

from survey_qa.config import Config
from survey_qa.pipeline import (aescore, background, classify, decide, features, illumination,
                                nightview, psf, skymask, sources, stamps)
from survey_qa.pipeline.errors import QualityError
from survey_qa.pipeline.flags import bits
from survey_qa.pipeline.records import DetectorImage
from survey_qa.pipeline.schema import STAGE_TIME_COLUMNS, empty_exposure_row

RULES_VERSION = "rules-1"
"""The model version of a night decided by the rules alone."""


@dataclass(frozen=True)
class Models:
    """The trained models a night uses; None where there are no weights (or not asked)."""

    scorer: aescore.Scorer | None
    classifier: object | None
    """A learned classifier (``survey_qa.models.classifier_inference``), or None: the rules
    decide."""

    @property
    def version(self) -> str:
        """The ``model_version`` of the rows: classifier (or rules), then autoencoder."""
        parts = [self.classifier.version if self.classifier else RULES_VERSION]
        if self.scorer:
            parts.append(self.scorer.version)
        return "+".join(parts)


@dataclass(frozen=True)
class DetectorResult:
    """What one measured detector gives the night's outputs."""

    row: dict
    """The detector's exposure-catalog row."""
    sources: pd.DataFrame
    """Its source table (catalog columns, ``exposure`` and ``detector`` set)."""
    arrays: dict[str, np.ndarray]
    """Its arrays for the night's array store (:func:`array_variables`)."""
    mask: np.ndarray | None
    """Its full-resolution autoencoder mask (bool), when one is to be written."""

    def arrays_skipped(self) -> DetectorResult:
        """The same result, its row flagged ``ARRAYS_SKIPPED`` (the store could not hold
        its arrays)."""
        row = {**self.row, "qa_flags": self.row["qa_flags"] | bits("ARRAYS_SKIPPED")}
        return dataclasses.replace(self, row=row)


def array_variables(cfg: Config, models: Models, max_shape: tuple[int, int]) -> dict:
    """Arrays written per detector into the night's array store.

    Parameters
    ----------
    max_shape
        (ny, nx) of the largest detector of the night (sizes the autoencoder maps).

    Returns
    -------
    dict
        name -> (per-detector shape, dimension names, dtype, fill value).
    """
    out = {**stamps.stamp_variables(cfg.stamps), **illumination.SKY_VARIABLES,
           **nightview.PREVIEW_VARIABLES, **skymask.MASK_VARIABLES}
    if models.classifier is not None:
        som = models.classifier.som
        out["som_occupancy"] = (tuple(som.grid), ("som_x", "som_y"), "float32", np.nan)
        out["som_representatives"] = ((cfg.som.representatives, *som.stamp_shape),
                                      ("representative", "y", "x"), "float32", np.nan)
    if models.scorer is not None:
        out.update(aescore.score_variables(models.scorer.block_px, max_shape))
    return out


def max_shape(shapes: list[tuple[int, int]], stored_grid: tuple[int, ...] | None,
              block_px: int) -> tuple[int, int]:
    """(ny, nx) the array store must hold: the largest of these detectors, and never less
    than an autoencoder grid the store holds already (``stored_grid`` cells of
    ``block_px``), so that a store is never asked to shrink."""
    ny = max([s[0] for s in shapes], default=1)
    nx = max([s[1] for s in shapes], default=1)
    if stored_grid is not None:
        ny, nx = max(ny, stored_grid[0] * block_px), max(nx, stored_grid[1] * block_px)
    return ny, nx


def measure_detector(det: DetectorImage, cfg: Config, models: Models,
                     flat: illumination.Flat | None = None) -> DetectorResult:
    """The stages for one detector.

    Parameters
    ----------
    det
        The detector as read.
    cfg
        The configuration of the stages.
    models
        The autoencoder scorer and learned classifier (either may be None).
    flat
        The detector's master flat, or None.

    Returns
    -------
    DetectorResult
        The row (with the time of each stage), the sources and the arrays.

    Raises
    ------
    QualityError
        When a stage cannot measure the detector.
    """
    timings = {}
    t = time.perf_counter()
    if flat is not None:
        det = illumination.flat_fielded(det, flat)
    bkg = background.measure_background(det.data, det.mask, cfg.background)
    timings["t_background_s"] = time.perf_counter() - t
    t = time.perf_counter()
    src = sources.extract_sources(det.data, bkg, det.mask, cfg.sources, det.meta.saturate_adu)
    timings["t_sources_s"] = time.perf_counter() - t
    t = time.perf_counter()
    selection, _ = psf.selection_flags(src, det.data.shape, cfg.psf)
    star = psf.select_psf_stars(src, det.data.shape, cfg.psf, flags=selection)
    psf_result = psf.measure_psf(det.data, bkg, src, star, cfg.psf)
    src = psf.annotate_sources(src, star, psf_result, det.data.shape, cfg.psf, flags=selection)
    timings["t_psf_s"] = time.perf_counter() - t
    t = time.perf_counter()
    cut = stamps.star_stamps(det.data, bkg, src, psf_result.psf_star, cfg.stamps)
    timings["t_stamps_s"] = time.perf_counter() - t
    row = features.summarize(det, bkg, src, psf_result)
    row["qa_flags"] |= bkg.qa_flags
    arrays = {**cut.arrays(), **illumination.sky_arrays(bkg, det.mask),
              **nightview.preview_arrays(det.data, det.mask)}
    t = time.perf_counter()
    full_mask = None
    if models.scorer is not None:
        ae = aescore.score_detector(det.data, det.mask, models.scorer, cfg.autoencoder)
        row.update(ae_score=ae.ae_score, mask_fraction=ae.mask_fraction)
        arrays.update(ae_score_map=ae.score_map, ae_mask=ae.mask.astype(np.uint8))
        if cfg.autoencoder.write_fits_masks:
            full_mask = aescore.upsample_mask(arrays["ae_mask"], models.scorer.block_px,
                                              det.data.shape)
    else:
        row["qa_flags"] |= bits("AE_UNAVAILABLE")
    timings["t_ae_s"] = time.perf_counter() - t
    t = time.perf_counter()
    occupancy = None
    if models.classifier is not None:
        occupancy = models.classifier.occupancy(cut.stamps)
        arrays["som_occupancy"] = occupancy
        arrays["som_representatives"] = models.classifier.som.representatives(
            cut.stamps, cfg.som.representatives)
    row = decide.classify_row(row, cfg.classify, models.classifier, occupancy)
    timings["t_classify_s"] = time.perf_counter() - t
    row.update(timings)
    row["image_type"] = det.meta.image_type
    return DetectorResult(row=row, sources=src.assign(exposure=det.exposure,
                                                      detector=det.detector),
                          arrays=arrays, mask=full_mask)


def internal_error(stage: str, e: Exception) -> QualityError:
    """A bug met on one frame, as the error that frame fails with (the night goes on)."""
    return QualityError(f"internal error while {stage}: {type(e).__name__}: {e}")


def failed_row(path: str, exposure: str, detector: str, error: QualityError) -> dict:
    """The row of a detector (or a whole file: detector 'ALL') that could not be measured.

    The header facts read before the failure (``meta`` in the error's metadata) and the
    image type are kept.
    """
    row = empty_exposure_row()
    meta = error.metadata.get("meta")
    if meta is not None:
        features.update_meta(row, meta)
        row["image_type"] = meta.image_type
    row.update(exposure=exposure, detector=detector, path=str(path), status="failed",
               error=error.reason, hdu=int(error.metadata.get("hdu", -1)))
    return row


def exposure_rows(rows: list[dict], n_detectors: int, *, t_read_s: float, t_total_s: float,
                  pipeline_version: str, model_version: str, processed_at: datetime
                  ) -> list[dict]:
    """An exposure's catalog rows from its detectors' rows (a new list).

    Each measured detector gets its share of the file's read time; a mosaic with a
    measured detector gets its summary row (:func:`classify.combine_detectors`); every
    row gets the versions, the time it was processed and the detector count, and each
    measured row the exposure's total time.

    Parameters
    ----------
    rows
        One row per detector read (measured or failed), in file order.
    n_detectors
        How many detectors (or read failures) the file gave; 0 when it could not be
        processed at all.
    """
    rows = [dict(r) for r in rows]
    for r in rows:
        if r["status"] == "ok":
            r["t_read_s"] = t_read_s / n_detectors
    ok = [r for r in rows if r["status"] == "ok"]
    if n_detectors > 1 and ok:
        rows.append(classify.combine_detectors(ok))
    for r in rows:
        r.update(pipeline_version=pipeline_version, model_version=model_version,
                 processed_at=processed_at, n_detectors=n_detectors)
        if r["status"] == "ok":
            r["t_total_s"] = t_total_s
    return rows


def exposure_level(rows: list[dict]) -> list[dict]:
    """The row that speaks for each exposure: 'ALL' for a mosaic, else the detector row."""
    by_exp = collections.defaultdict(list)
    for r in rows:
        by_exp[r["exposure"]].append(r)
    chosen = []
    for group in by_exp.values():
        summary = [r for r in group if r["detector"] == "ALL"]
        chosen.append(summary[0] if summary else group[0])
    return chosen


def tally(rows: list[dict]) -> tuple[dict[str, int], int, list[tuple[str, str, str]]]:
    """A night's rows counted: exposures per class (measured ones), exposures that failed,
    and (exposure, detector, error) of every failed row."""
    level = exposure_level(rows)
    counts = collections.Counter(r["quality_class"] for r in level if r["status"] == "ok")
    failures = [(r["exposure"], r["detector"], r["error"]) for r in rows
                if r["status"] == "failed"]
    return dict(counts), sum(1 for r in level if r["status"] == "failed"), failures


def stage_medians(rows: list[dict]) -> dict[str, float]:
    """Median time per measured detector of each stage, seconds, keyed by stage name."""
    det_rows = [r for r in rows if r["status"] == "ok" and r["detector"] != "ALL"]
    if not det_rows:
        return {}
    return {c[2:-2]: float(np.nanmedian([r[c] for r in det_rows])) for c in STAGE_TIME_COLUMNS}
