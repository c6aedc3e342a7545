"""The nightly flow: every exposure of a night through the stages, on a Dask cluster.

It reads like a recipe. The client discovers the night's frames, skips those already
done, lays out the array store, and maps :func:`process_exposure` over the rest. Each task
gets one file (reads it), runs :func:`~survey_qa.pipeline.measure.measure_detector` on
each detector, and puts the results: the arrays into the store, then the exposure's
sources and rows into the work folder (:mod:`survey_qa.flows.workdir`; the rows, written
last, mark it done). When every task has finished, the night's catalogs are written as one
file each, atomically. A crash leaves only whole per-exposure files; a re-run finishes
what is missing.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

import survey_qa
from survey_qa import paths
from survey_qa.config import Config
from survey_qa.flows import illumination, workdir
from survey_qa.flows.night_pass import finish_night
from survey_qa.pipeline import io, measure, outputs
from survey_qa.pipeline.errors import QualityError
from survey_qa.pipeline.measure import (DetectorResult, Models, exposure_level, exposure_rows,
                                        failed_row, internal_error, measure_detector,
                                        stage_medians, tally)
from survey_qa.pipeline.records import DetectorImage
from survey_qa.pipeline.schema import CLASSES, PRIORITY, rows_to_table


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


# ---------------------------------------------------------------------------- models


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


def plan_frames(path: str, cfg: Config, exposure: str | None = None
                ) -> list[tuple[str, str, int, int]]:
    """(exposure, detector, ny, nx) of every detector a file really holds, from its headers."""
    exposure = io.exposure_id(path) if exposure is None else exposure
    return [(exposure, *d) for d in io.plan_detectors(path, cfg.io)]


def read_exposure(path: str, cfg: Config, exposure: str
                  ) -> tuple[list[DetectorImage | QualityError], float]:
    """Every detector of a file (or the error that made it unreadable) and the seconds the
    reading took. A file that cannot be read at all gives one error for detector 'ALL'."""
    t = time.perf_counter()
    try:
        dets = io.read_detectors(path, cfg.io, exposure)
    except QualityError as e:
        dets = [QualityError(e.reason, **{**e.metadata, "detector": "ALL"})]
    except Exception as e:  # noqa: BLE001 -- one file never stops a night
        dets = [QualityError(internal_error("reading", e).reason, detector="ALL")]
    return dets, time.perf_counter() - t


def measure_or_fail(path: str, exposure: str, det: DetectorImage | QualityError, cfg: Config,
                    models: Models) -> DetectorResult | dict:
    """A detector measured, or its ``failed`` row when it could not be read or measured
    (bad data, or a bug met in a stage: that frame fails, the night goes on)."""
    if isinstance(det, QualityError):
        return failed_row(path, exposure, det.metadata.get("detector", "ALL"), det)
    try:
        return measure_detector(det, cfg, models, illumination.detector_flat(det, cfg))
    except QualityError as e:
        e.metadata.setdefault("meta", det.meta)
        return failed_row(path, exposure, det.detector, e)
    except Exception as e:  # noqa: BLE001 -- a bug on one frame never stops a night
        error = internal_error("measuring", e)
        error.metadata.update(meta=det.meta, hdu=det.hdu)
        return failed_row(path, exposure, det.detector, error)


def write_arrays(store: str, frame_index: dict[tuple[str, str], int],
                 result: DetectorResult) -> DetectorResult:
    """Write a detector's arrays into its place in the store; a detector without a place,
    or too large for it, gets its row flagged ``ARRAYS_SKIPPED`` instead."""
    key = (result.row["exposure"], result.row["detector"])
    if key in frame_index and outputs.write_frame(store, frame_index[key], result.arrays):
        return result
    return result.arrays_skipped()


def write_masks(cfg: Config, night: str, exposure: str, models: Models,
                results: list[DetectorResult]) -> None:
    """Write the exposure's full-resolution autoencoder masks, when there are any."""
    masks = {r.row["detector"]: r.mask for r in results if r.mask is not None}
    if not masks:
        return
    outputs.write_mask_fits(paths.mask_file(cfg.run.out_root, night, exposure), masks, {
        "EXPOSURE": (exposure, "exposure the mask belongs to"),
        "MASKVAL": (1, "1: damaged (autoencoder), 0: usable"),
        "AEBLOCK": (models.scorer.block_px, "mask cell side, pixels"),
        "AEMODEL": (models.scorer.version, "autoencoder weights")})


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
    models = load_models(cfg)
    dets, t_read = read_exposure(path, cfg, exposure)
    measured = [measure_or_fail(path, exposure, det, cfg, models) for det in dets]
    measured = [write_arrays(store, frame_index, m) if isinstance(m, DetectorResult) else m
                for m in measured]
    results = [m for m in measured if isinstance(m, DetectorResult)]
    rows = exposure_rows(
        [m.row if isinstance(m, DetectorResult) else m for m in measured], len(dets),
        t_read_s=t_read, t_total_s=time.perf_counter() - t_start,
        pipeline_version=survey_qa.__version__, model_version=models.version,
        processed_at=datetime.now(timezone.utc).replace(microsecond=0))
    write_masks(cfg, night, exposure, models, results)
    workdir.write_results(cfg.run.out_root, night, exposure, rows,
                          [r.sources for r in results])
    return rows


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
    store = paths.zarr_store(out_root, night)
    if cfg.run.force:
        workdir.forget_results(out_root, night)
    damage = outputs.store_damage(store)
    if damage:
        echo(f"warning: {damage}: rebuilding it and redoing the night's exposures")
        outputs.remove_store(store)
        workdir.forget_results(out_root, night)
    done = workdir.verified_done(out_root, night, files)
    todo = {e: str(p) for e, p in files.items() if e not in done}

    if todo:
        with make_cluster(cfg.cluster) as cluster, Client(cluster) as client:
            scale_for_night(cluster, cfg.cluster, len(todo))
            n = len(todo)
            plans = client.gather(client.map(plan_frames, list(todo.values()), [cfg] * n,
                                             list(todo), pure=False))
            frames = [f for plan in plans for f in plan]
            shape = measure.max_shape([f[2:] for f in frames], None, 1)
            index = outputs.setup_zarr(store, [f[:2] for f in frames],
                                       measure.array_variables(cfg, models, shape))
            futures = client.map(process_exposure, list(todo.values()), [cfg] * n,
                                 [night] * n, [str(store)] * n, [index] * n, list(todo),
                                 pure=False)
            follow_tasks(futures, as_completed, cfg, echo, night,
                         dict(zip(futures, todo.items())))
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
    store = paths.zarr_store(out_root, night)
    if not store.exists():
        outputs.setup_zarr(store, [], measure.array_variables(cfg, models, (1, 1)))
    rows = workdir.read_results(out_root, night, "exposures", exposures).to_pylist()
    table = rows_to_table(finish_night(rows, cfg, models, store) if calibrate else rows)
    exp_path = outputs.consolidate(table, out_root, "exposures", night)
    src_path = outputs.consolidate(workdir.read_results(out_root, night, "sources", exposures),
                                   out_root, "sources", night)
    return table, exp_path, src_path


def follow_tasks(futures, as_completed, cfg: Config, echo, night: str = "",
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
        for r in exposure_level(rows):
            if r["status"] == "failed":
                bar.write(f"FAILED {r['exposure']} [{r['detector']}]: {r['error']}")
            elif r["quality_class"] != "good":
                bar.write(f"warning: {r['exposure']} is {r['quality_class']}")
    bar.close()


def _write_failed(cfg: Config, night: str, exposure: str, path: str, reason: str) -> list[dict]:
    """Write the results of a file that could not be processed at all: one failed row."""
    rows = exposure_rows([failed_row(path, exposure, "ALL", QualityError(reason))],
                         n_detectors=0, t_read_s=0.0, t_total_s=0.0,
                         pipeline_version=survey_qa.__version__, model_version="",
                         processed_at=datetime.now(timezone.utc).replace(microsecond=0))
    workdir.write_results(cfg.run.out_root, night, exposure, rows, [])
    return rows


def _summarize(night, rows, n_files, n_todo, exp_path, src_path, store, wall_s) -> NightSummary:
    counts, n_failed, failures = tally(rows)
    return NightSummary(night=night, n_files=n_files, n_processed=n_todo,
                        n_skipped=n_files - n_todo, class_counts=counts, n_failed=n_failed,
                        failures=failures, exposures_catalog=exp_path,
                        sources_catalog=src_path, arrays=store, wall_s=wall_s,
                        stage_median_s=stage_medians(rows))
