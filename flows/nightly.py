"""The nightly flow: every exposure of a night through the stages, on a Dask cluster.

It reads like a recipe. The client discovers the night's frames, skips those already
done, lays out the array store, and maps :func:`process_exposure` over the rest. Each task
reads one file, calls the stages in order, and writes that exposure's results under
``<out>/_work/night=<night>/`` (sources, then arrays, then the exposure rows, which mark it
done). When every task has finished, the night's catalogs are written as one file each,
atomically. A crash leaves only whole per-exposure files; a re-run finishes what is
missing.
"""
from __future__ import annotations

import collections
import functools
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

import survey_qa
from survey_qa.config import Config
from survey_qa.flows import illumination, workdir
from survey_qa.flows.workdir import work_dir  # noqa: F401 -- part of this module's API
from survey_qa.flows.night_pass import finish_night
from survey_qa.pipeline import (aescore, background, classify, decide, features, io, psf,
                                sources, stamps)
from survey_qa.pipeline.errors import QualityError
from survey_qa.pipeline.flags import bits
from survey_qa.pipeline.records import DetectorImage
from survey_qa.pipeline.schema import (CLASSES, EXPOSURE_SCHEMA, PRIORITY, SOURCE_SCHEMA,
                                       empty_exposure_row, rows_to_table)

RULES_VERSION = "rules-1"


@dataclass
class NightSummary:
    """What a nightly run did, for the command line and the tests."""

    night: str
    n_files: int
    n_processed: int
    n_skipped: int
    class_counts: dict[str, int]
    n_failed: int
    failures: list[tuple[str, str, str]]  # (exposure, detector, reason)
    exposures_catalog: Path
    sources_catalog: Path
    arrays: Path
    wall_s: float
    stage_median_s: dict[str, float] = field(default_factory=dict)

    def report(self) -> str:
        """A short human summary: counts per class and where the outputs are."""
        lines = [f"night {self.night}: {self.n_files} exposures "
                 f"({self.n_processed} processed now, {self.n_skipped} already done) "
                 f"in {self.wall_s:.1f} s"]
        width = max(len(c) for c in (*CLASSES, "failed"))
        for c in PRIORITY[::-1]:
            lines.append(f"  {c:<{width}}  {self.class_counts.get(c, 0):5d}")
        lines.append(f"  {'failed':<{width}}  {self.n_failed:5d}")
        for exp, det, reason in self.failures[:20]:
            lines.append(f"    {exp} [{det}]: {reason}")
        if self.stage_median_s:
            lines.append("  median time per detector: " + ", ".join(
                f"{k} {v:.2f} s" for k, v in self.stage_median_s.items()))
        lines += [f"exposures catalog: {self.exposures_catalog}",
                  f"sources catalog:   {self.sources_catalog}",
                  f"arrays:            {self.arrays}"]
        return "\n".join(lines)


# ---------------------------------------------------------------------------- paths


def done_exposures(out_root: str | Path, night: str, files: dict[str, Path]) -> set[str]:
    """Exposures whose results are whole (see :func:`workdir.verified_done`)."""
    return workdir.verified_done(out_root, night, files)


# ---------------------------------------------------------------------------- models


@dataclass
class Models:
    """The trained models a night uses; None where there are no weights (or not asked)."""

    scorer: "aescore.Scorer | None"
    classifier: "object | None"  # survey_qa.models.classifier.LearnedClassifier

    @property
    def version(self) -> str:
        parts = [self.classifier.version if self.classifier else RULES_VERSION]
        if self.scorer:
            parts.append(self.scorer.version)
        return "+".join(parts)


@functools.lru_cache(maxsize=4)
def _scorer(path: str | None):
    from survey_qa.models.weights import load_scorer

    return load_scorer(path)


def load_models(cfg: Config) -> Models:
    """The autoencoder scorer and the learned classifier, read once per process.

    Raises ``ValueError`` when ``run.classifier`` is 'cnn' and there are no weights.
    """
    scorer = _scorer(cfg.autoencoder.weights) if cfg.autoencoder.enabled else None
    learned = None
    if cfg.run.classifier != "rules":
        from survey_qa.models.classifier_inference import shared_classifier

        learned = shared_classifier(cfg.run.classifier_weights, cfg.classify)
        if learned is None and cfg.run.classifier == "cnn":
            raise ValueError("run.classifier is 'cnn' but no classifier weights are packaged "
                             "or configured (run.classifier_weights)")
    return Models(scorer=scorer, classifier=learned)


# ---------------------------------------------------------------------------- per task


def array_variables(cfg: Config, models: Models, max_shape: tuple[int, int]) -> dict:
    """Arrays written per detector into ``arrays/<night>.zarr``."""
    n, s = cfg.stamps.per_detector, cfg.stamps.size_px
    out = {
        "stamps": ((n, s, s), ("star", "y", "x"), "float32", np.nan),
        "stamp_x": ((n,), ("star",), "float32", np.nan),
        "stamp_y": ((n,), ("star",), "float32", np.nan),
        "n_stamps": ((), (), "int32", 0),
        **illumination.SKY_VARIABLES,
    }
    if models.classifier is not None:
        som = models.classifier.som
        out["som_occupancy"] = (tuple(som.grid), ("som_x", "som_y"), "float32", np.nan)
        out["som_representatives"] = ((cfg.som.representatives, *som.stamp_shape),
                                      ("representative", "y", "x"), "float32", np.nan)
    if models.scorer is not None:
        block = models.scorer.block_px
        grid = (math.ceil(max_shape[0] / block), math.ceil(max_shape[1] / block))
        out["ae_score_map"] = (grid, ("patch_y", "patch_x"), "float32", np.nan)
        out["ae_mask"] = (grid, ("patch_y", "patch_x"), "uint8", 0)
    return out


def plan_frames(path: str, cfg: Config, exposure: str | None = None
                ) -> list[tuple[str, str, int, int]]:
    """(exposure, detector, ny, nx) of every detector a file really holds, from its headers."""
    exposure = io.exposure_id(path) if exposure is None else exposure
    return [(exposure, *d) for d in io.plan_detectors(path, cfg.io)]


def measure_detector(det: DetectorImage, cfg: Config, models: Models):
    """The stages for one detector.

    Returns the exposure row, the source table, the PSF result, the star stamps and the
    arrays for the Zarr store.
    """
    timings = {}
    t = time.perf_counter()
    det = illumination.flat_field(det, cfg)
    bkg = background.measure_background(det.data, det.mask, cfg.background)
    timings["t_background_s"] = time.perf_counter() - t
    t = time.perf_counter()
    src = sources.extract_sources(det.data, bkg, det.mask, cfg.sources, det.meta.saturate_adu)
    timings["t_sources_s"] = time.perf_counter() - t
    t = time.perf_counter()
    star = psf.select_psf_stars(src, det.data.shape, cfg.psf)
    psf_result = psf.measure_psf(det.data, bkg, src, star, cfg.psf)
    src = psf.annotate_sources(src, star, psf_result, det.data.shape, cfg.psf)
    timings["t_psf_s"] = time.perf_counter() - t
    t = time.perf_counter()
    cut = stamps.cut_stamps(det.data, bkg, src, psf_result.psf_star, cfg.stamps)
    timings["t_stamps_s"] = time.perf_counter() - t
    row = features.summarize(det, bkg, src, psf_result)
    row["qa_flags"] |= bkg.qa_flags
    arrays = illumination.sky_arrays(bkg, det.mask)
    t = time.perf_counter()
    if models.scorer is not None:
        ae = aescore.score_detector(det.data, det.mask, models.scorer, cfg.autoencoder)
        row.update(ae_score=ae.ae_score, mask_fraction=ae.mask_fraction)
        arrays.update(ae_score_map=ae.score_map, ae_mask=ae.mask.astype(np.uint8))
    else:
        row["qa_flags"] |= bits("AE_UNAVAILABLE")
    timings["t_ae_s"] = time.perf_counter() - t
    t = time.perf_counter()
    occupancy = None
    if models.classifier is not None:
        occupancy = models.classifier.occupancy(cut)
        arrays["som_occupancy"] = occupancy
        arrays["som_representatives"] = models.classifier.som.representatives(
            cut, cfg.som.representatives)
    row = decide.classify_row(row, cfg.classify, models.classifier, occupancy)
    timings["t_classify_s"] = time.perf_counter() - t
    row.update(timings)
    return row, src, psf_result, cut, arrays


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


def _internal_error(stage: str, e: Exception) -> QualityError:
    """A bug met on one frame: that frame fails with the error; the night goes on."""
    return QualityError(f"internal error while {stage}: {type(e).__name__}: {e}")


def process_exposure(path: str, cfg: Config, night: str, store: str,
                     frame_index: dict[tuple[str, str], int],
                     exposure: str | None = None) -> list[dict]:
    """Measure one exposure file and write its results; returns its exposure rows.

    Never raises for bad data: an unreadable file or detector becomes a ``failed`` row,
    and so does a detector on which a stage meets a bug. Only a write error (a full or
    read-only disk) raises.
    """
    t_start = time.perf_counter()
    exposure = io.exposure_id(path) if exposure is None else exposure
    sources.configure_sep(cfg.sources)
    models = load_models(cfg)
    t = time.perf_counter()
    try:
        dets = io.read_detectors(path, cfg.io, exposure)
    except QualityError as e:
        dets = [QualityError(e.reason, **{**e.metadata, "detector": "ALL"})]
    except Exception as e:  # noqa: BLE001 -- one file never stops a night
        dets = [QualityError(_internal_error("reading", e).reason, detector="ALL")]
    t_read = time.perf_counter() - t

    rows, source_tables, masks = [], [], {}
    for det in dets:
        if isinstance(det, QualityError):
            rows.append(failed_row(path, exposure, det.metadata.get("detector", "ALL"), det))
            continue
        try:
            row, src, psf_result, cut, arrays = measure_detector(det, cfg, models)
        except QualityError as e:
            e.metadata.setdefault("meta", det.meta)
            rows.append(failed_row(path, exposure, det.detector, e))
            continue
        except Exception as e:  # noqa: BLE001 -- a bug on one frame never stops a night
            error = _internal_error("measuring", e)
            error.metadata.update(meta=det.meta, hdu=det.hdu)
            rows.append(failed_row(path, exposure, det.detector, error))
            continue
        row["image_type"] = det.meta.image_type
        row["t_read_s"] = t_read / len(dets)
        rows.append(row)
        if "ae_mask" in arrays and cfg.autoencoder.write_fits_masks:
            masks[det.detector] = aescore.upsample_mask(
                arrays["ae_mask"], models.scorer.block_px, det.data.shape)
        src = src.assign(exposure=exposure, detector=det.detector)
        source_tables.append(src)
        key = (exposure, det.detector)
        if key in frame_index:
            order = stamps.stamp_order(src, psf_result.psf_star, len(cut))
            xy = src[["x", "y"]].to_numpy(np.float32)[order]
            written = io.write_frame(store, frame_index[key], {
                "stamps": cut, "stamp_x": xy[:, 0], "stamp_y": xy[:, 1],
                "n_stamps": np.int32(len(cut)), **arrays})
        else:
            written = False
        if not written:
            row["qa_flags"] |= bits("ARRAYS_SKIPPED")

    ok = [r for r in rows if r["status"] == "ok"]
    if len(dets) > 1 and ok:
        rows.append(classify.combine_detectors(ok))
    now = datetime.now(timezone.utc).replace(microsecond=0)
    for r in rows:
        r.update(pipeline_version=survey_qa.__version__, model_version=models.version,
                 processed_at=now, n_detectors=len(dets))
        if r["status"] == "ok":
            r["t_total_s"] = time.perf_counter() - t_start

    if masks:
        io.write_mask_fits(io.mask_fits_path(cfg.run.out_root, night, exposure), masks, {
            "EXPOSURE": (exposure, "exposure the mask belongs to"),
            "MASKVAL": (1, "1: damaged (autoencoder), 0: usable"),
            "AEBLOCK": (models.scorer.block_px, "mask cell side, pixels"),
            "AEMODEL": (models.scorer.version, "autoencoder weights")})
    work = work_dir(cfg.run.out_root, night)
    src_all = (pd.concat(source_tables, ignore_index=True) if source_tables
               else SOURCE_SCHEMA.empty_table().to_pandas())
    io.write_parquet_atomic(_sources_table(src_all), work / "sources" / f"{exposure}.parquet")
    io.write_parquet_atomic(rows_to_table(rows), work / "exposures" / f"{exposure}.parquet")
    return rows


def _sources_table(df: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(df[SOURCE_SCHEMA.names], schema=SOURCE_SCHEMA,
                                preserve_index=False)


# ---------------------------------------------------------------------------- the night


def run_night(cfg: Config, night: str, *, echo=print) -> NightSummary:
    """Run the nightly job for one night and write its catalogs and arrays.

    Before anything starts, the night folder is discovered, the models loaded, and the
    out-root checked (writable, ``run.min_free_mb`` free); then the night is locked for
    this run (:func:`workdir.night_lock`).

    Raises
    ------
    ValueError
        No night folder, or asked-for model weights missing (a wrong argument).
    RunEnvironmentError
        The out-root is not writable or is full, or another run holds the night
        (:class:`~survey_qa.pipeline.errors.NightLocked`).

    Parameters
    ----------
    cfg
        The validated configuration (``cfg.run`` gives the folders, ``cfg.cluster`` where
        the work runs).
    night
        ``YYYY-MM-DD``: the folder ``<raw_root>/<night>/``.
    echo
        Where live warnings and progress go.
    """
    t0 = time.perf_counter()
    files = io.night_exposures(cfg.run.raw_root, night)
    models = load_models(cfg)  # fails early when asked-for weights are missing
    workdir.check_out_root(cfg.run.out_root, cfg.run.min_free_mb)
    with workdir.night_lock(cfg.run.out_root, night):
        try:
            return _run_locked(cfg, night, files, models, echo, t0)
        except OSError as e:
            env = workdir.environment_error(e, cfg.run.out_root)
            if env is None:
                raise
            raise env from None


def _run_locked(cfg: Config, night: str, files: dict[str, Path], models: Models, echo,
                t0: float) -> NightSummary:
    """The night, with its lock held: finish what is missing, then gather the catalogs."""
    from distributed import Client, as_completed

    from survey_qa.hpc.cluster import make_cluster, scale_for_night

    out_root = Path(cfg.run.out_root)
    store = io.zarr_path(out_root, night)
    if cfg.run.force:
        workdir.forget_results(out_root, night)
    damage = io.store_damage(store)
    if damage:
        echo(f"warning: {damage}: rebuilding it and redoing the night's exposures")
        io.remove_store(store)
        workdir.forget_results(out_root, night)
    done = done_exposures(out_root, night, files)
    todo = {e: str(p) for e, p in files.items() if e not in done}

    if todo:
        with make_cluster(cfg.cluster) as cluster, Client(cluster) as client:
            scale_for_night(cluster, cfg.cluster, len(todo))
            n = len(todo)
            plans = client.gather(client.map(plan_frames, list(todo.values()), [cfg] * n,
                                             list(todo), pure=False))
            frames = [f for plan in plans for f in plan]
            max_shape = tuple(max([f[i] for f in frames], default=1) for i in (2, 3))
            index = io.setup_zarr(store, [f[:2] for f in frames],
                                  array_variables(cfg, models, max_shape))
            futures = client.map(process_exposure, list(todo.values()), [cfg] * n,
                                 [night] * n, [str(store)] * n, [index] * n, list(todo),
                                 pure=False)
            _follow(futures, as_completed, cfg, echo, night, dict(zip(futures, todo.items())))
    exposures, exp_path, src_path = gather_night(cfg, night, list(files), models)
    return _summarize(night, exposures.to_pylist(), len(files), len(todo), exp_path,
                      src_path, store, time.perf_counter() - t0)


def gather_night(cfg: Config, night: str, exposures: list[str], models: Models,
                 calibrate: bool = True) -> tuple[pa.Table, Path, Path]:
    """The night's catalogs from the whole per-exposure results of ``exposures``.

    With ``calibrate`` the night-level calibrations (:func:`finish_night`) are applied to
    the rows; without, each frame's own rows are written (the watch, during the night).
    An empty array store is laid out when no frame wrote one. Returns the exposure table
    and the paths of the two catalogs.
    """
    out_root = Path(cfg.run.out_root)
    store = io.zarr_path(out_root, night)
    if not store.exists():
        io.setup_zarr(store, [], array_variables(cfg, models, (1, 1)))
    rows = workdir.read_results(out_root, night, "exposures", exposures,
                                EXPOSURE_SCHEMA).to_pylist()
    table = rows_to_table(finish_night(rows, cfg, models, store) if calibrate else rows)
    exp_path = io.consolidate(table, out_root, "exposures", night)
    src_path = io.consolidate(workdir.read_results(out_root, night, "sources", exposures,
                                                   SOURCE_SCHEMA),
                              out_root, "sources", night)
    return table, exp_path, src_path


def _follow(futures, as_completed, cfg: Config, echo, night: str = "",
            files: dict | None = None) -> None:
    """Wait for every task, with a progress bar and a live line per bad frame.

    A file whose task kills its worker process every time it is tried (a crash in a
    compiled library, memory exhausted) gets a ``failed`` row written here; a write error
    (full or read-only disk) stops the night.
    """
    from distributed import KilledWorker
    from tqdm.auto import tqdm

    files = files or {}
    bar = tqdm(total=len(futures), unit="exp", disable=not cfg.run.progress, leave=False)
    for fut in as_completed(futures):
        try:
            rows = fut.result()
        except KilledWorker:
            exposure, path = files[fut]
            rows = _write_failed(cfg, night, exposure, path, "the worker process died on this "
                                 "file every time it was tried (a crash or memory exhausted)")
        bar.update()
        for r in _exposure_level(rows):
            if r["status"] == "failed":
                bar.write(f"FAILED {r['exposure']} [{r['detector']}]: {r['error']}")
            elif r["quality_class"] != "good":
                bar.write(f"warning: {r['exposure']} is {r['quality_class']}")
    bar.close()


def _write_failed(cfg: Config, night: str, exposure: str, path: str, reason: str) -> list[dict]:
    """Write the results of a file that could not be processed at all: one failed row."""
    row = failed_row(path, exposure, "ALL", QualityError(reason))
    row.update(pipeline_version=survey_qa.__version__, model_version="",
               processed_at=datetime.now(timezone.utc).replace(microsecond=0))
    work = work_dir(cfg.run.out_root, night)
    io.write_parquet_atomic(_sources_table(SOURCE_SCHEMA.empty_table().to_pandas()),
                            work / "sources" / f"{exposure}.parquet")
    io.write_parquet_atomic(rows_to_table([row]), work / "exposures" / f"{exposure}.parquet")
    return [row]


def _exposure_level(rows: list[dict]) -> list[dict]:
    """The row that speaks for each exposure: 'ALL' for a mosaic, else the detector row."""
    by_exp = collections.defaultdict(list)
    for r in rows:
        by_exp[r["exposure"]].append(r)
    chosen = []
    for group in by_exp.values():
        summary = [r for r in group if r["detector"] == "ALL"]
        chosen.append(summary[0] if summary else group[0])
    return chosen


def _summarize(night, rows, n_files, n_todo, exp_path, src_path, store, wall_s) -> NightSummary:
    level = _exposure_level(rows)
    counts = collections.Counter(r["quality_class"] for r in level if r["status"] == "ok")
    failures = [(r["exposure"], r["detector"], r["error"]) for r in rows
                if r["status"] == "failed"]
    stage_cols = ("t_read_s", "t_background_s", "t_sources_s", "t_psf_s", "t_stamps_s",
                  "t_ae_s", "t_classify_s")
    det_rows = [r for r in rows if r["status"] == "ok" and r["detector"] != "ALL"]
    medians = {c[2:-2]: float(np.nanmedian([r[c] for r in det_rows]))
               for c in stage_cols if det_rows}
    return NightSummary(night=night, n_files=n_files, n_processed=n_todo,
                        n_skipped=n_files - n_todo, class_counts=dict(counts),
                        n_failed=sum(1 for r in level if r["status"] == "failed"),
                        failures=failures, exposures_catalog=exp_path,
                        sources_catalog=src_path, arrays=store, wall_s=wall_s,
                        stage_median_s=medians)
