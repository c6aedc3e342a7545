"""Write simulated nights to disk: FITS frames, truth table, true stars and defect masks.

Layout of a night (the nightly reader skips names starting with ``_`` or ``.``)::

    <raw_root>/<night>/<exposure>.fits[.fz|.gz]     one file per exposure
    <raw_root>/<night>/_truth/truth.parquet          one row per exposure and detector
    <raw_root>/<night>/_truth/stars.parquet          true stars (x, y in px, flux in ADU)
    <raw_root>/<night>/_truth/masks/<exposure>.fits  defect masks, one uint8 HDU per detector

Truth columns (per exposure and detector): identity (``night``, ``exposure``,
``detector`` as a FITS reader names it, ``hdu``, ``path``), the truth of
:func:`survey_qa.simulate.render_detector` (``quality_class`` of the detector,
``exposure_class`` of the exposure, ``target_class``, ``ambiguous``, ``seeing_arcsec``,
``fwhm_px_true``, ``trail_arcsec``, ``trail_ratio``, ``trail_pa_deg``, ``trail_kind``,
``ellipticity_true``, ``u_true``, ``k_true``, flags, counts, ``confounders``...) and every
field of the exposure's :class:`~survey_qa.simulate.ExposureSpec`.

Raw frames (``raw`` true) are written as ``uint16`` with their bias level, prescan and
overscan (``BIASSEC``, ``DATASEC``, ``TRIMSEC``); their true star positions and defect
masks refer to the exposed pixels (``DATASEC``), the grid the reader measures. Bayer
frames (``bayer_pattern``) are written at full resolution and their truth (``fwhm_px_true``,
star positions, masks) is on that grid; the reader bins them 2x2 (``read_binning``).

A sequence night (:func:`simulate_sequence`) is N exposures of one field under changing
conditions; its truth table adds the sequence columns (transparency, pointing...) and its
true stars a stable ``star_id`` (:mod:`survey_qa.simulate.sequence`).

Every file is written under a hidden temporary name and renamed into place.
"""
from __future__ import annotations

import gzip
import io
import os

import numpy as np
import pandas as pd

from survey_qa import paths
from survey_qa import simulate as sim
from survey_qa.atomic import write_bytes
from survey_qa.simulate import sequence


def _fits_bytes(hdul, gzipped: bool) -> bytes:
    buf = io.BytesIO()
    hdul.writeto(buf)
    raw = buf.getvalue()
    return gzip.compress(raw, compresslevel=6, mtime=0) if gzipped else raw


def write_exposure(raw_root: str | os.PathLike, night: str, seed: int, plan: sim.FramePlan
                   ) -> tuple[list[dict], pd.DataFrame]:
    """Simulate one planned exposure and write its frame and truth mask.

    Returns the truth rows (one per detector) and the true stars, for the night's tables.
    """
    spec, detectors = sim.simulate_exposure(plan, night, seed)
    frame = sim.build_hdulist(spec, detectors)
    write_bytes(paths.night_dir(raw_root, night) / plan.filename,
                _fits_bytes(frame, plan.file_format == "fits.gz"))
    write_bytes(paths.truth_mask(raw_root, night, plan.exposure),
                _fits_bytes(sim.mask_hdulist(spec, detectors), False))
    rows = sim.truth_records(spec, detectors)
    for row in rows:
        row.update(night=night, path=plan.filename)
    stars = pd.concat([d.stars.assign(exposure=plan.exposure, detector=d.name)
                       for d in detectors], ignore_index=True)
    return rows, stars


def write_night(raw_root: str | os.PathLike, night: str, plans: list[sim.FramePlan], *,
                seed: int = 0, client=None) -> pd.DataFrame:
    """Simulate and write the planned exposures of a night; return the truth table.

    Parameters
    ----------
    raw_root, night
        Frames go to ``<raw_root>/<night>/``, truth to its ``_truth/`` folder.
    plans
        What to simulate (:func:`survey_qa.simulate.plan_night`).
    seed
        Night seed; each exposure's generators derive from it, the night and its index.
    client
        Optional ``dask.distributed.Client``: exposures are rendered in parallel, each
        task writing its own files; else sequentially.
    """
    args = [(str(raw_root), night, seed, plan) for plan in plans]
    if client is None:
        results = [write_exposure(*a) for a in args]
    else:
        futures = client.map(write_exposure, *zip(*args), pure=False)
        results = client.gather(futures)
    return _write_tables(raw_root, night, results)


def _write_tables(raw_root: str | os.PathLike, night: str,
                  results: list[tuple[list[dict], pd.DataFrame]]) -> pd.DataFrame:
    """Write the night's truth table and true stars from per-exposure results; return the
    truth table."""
    truth = pd.DataFrame([row for rows, _ in results for row in rows])
    stars = pd.concat([s for _, s in results], ignore_index=True)
    stars.insert(0, "night", night)
    for table, path in ((truth, paths.truth_table(raw_root, night)),
                        (stars, paths.truth_stars(raw_root, night))):
        buf = io.BytesIO()
        table.to_parquet(buf, index=False)
        write_bytes(path, buf.getvalue())
    return truth


def simulate_night(raw_root: str | os.PathLike, night: str, n_frames: int, *, seed: int = 0,
                   size_px: int = 4096, mix: str = "balanced", client=None,
                   ambiguous_fraction: float = 0.0, domain: str = "default") -> pd.DataFrame:
    """Write a simulated night of ``n_frames`` exposures and return its truth table.

    ``mix="balanced"``: the five classes in equal shares; ``"realistic"``: mostly good.
    A share ``ambiguous_fraction`` of the frames comes from the spec's ambiguous zones.
    File formats are mixed (mostly single ``.fits``, some ``.fits.fz``, ``.fits.gz`` and
    mosaics of ``size_px // 2`` detectors). Deterministic for a given seed and night;
    ``client`` (a ``dask.distributed.Client``) renders exposures in parallel.

    ``domain="wide"`` (:data:`survey_qa.simulate.DOMAINS`) gives frames as wide
    as real instruments: pixel scales 0.1-15"/px, FWHM 1.2-20 px, detectors of 500 px to
    ``size_px`` (not square), raw frames with overscan, vignetting, dust donuts, Bayer
    frames, sparse fields and defocused (donut) PSFs; ``"default"`` is unchanged.
    """
    plans = sim.plan_night(night, n_frames, seed=seed, mix=mix,
                           ambiguous_fraction=ambiguous_fraction, size_px=size_px,
                           domain=domain)
    return write_night(raw_root, night, plans, seed=seed, client=client)


def write_sequence_frame(raw_root: str | os.PathLike, seq: sequence.Sequence, index: int
                         ) -> tuple[list[dict], pd.DataFrame]:
    """Render one frame of a sequence and write its frame and truth mask.

    Returns the truth rows and the true stars (with ``star_id``), for the night's tables.
    """
    spec, det = sequence.render_frame(seq, index)
    name = spec.exposure + ".fits"
    write_bytes(paths.night_dir(raw_root, seq.night) / name,
                _fits_bytes(sim.build_hdulist(spec, [det]), False))
    write_bytes(paths.truth_mask(raw_root, seq.night, spec.exposure),
                _fits_bytes(sim.mask_hdulist(spec, [det]), False))
    rows = sequence.frame_truth(seq, spec, [det])
    for row in rows:
        row.update(night=seq.night, path=name)
    stars = sequence.frame_stars(seq, spec, det).assign(exposure=spec.exposure,
                                                        detector=det.name)
    return rows, stars


def simulate_sequence(raw_root: str | os.PathLike, night: str, n_frames: int, *,
                      seed: int = 0, size_px: int = 1024, scene_seed: int | None = None,
                      field: str | None = None, header_style: str = "wcs",
                      client=None) -> pd.DataFrame:
    """Write a night of ``n_frames`` exposures of one field and return its truth table.

    The frames render one scene (:func:`survey_qa.simulate.sequence.plan_sequence`)
    through a drifting pointing with one re-pointing, under seeing, focus, transparency,
    patchy cloud, twilight, moon and tracking that change along the night. Besides the
    usual columns, the truth table has ``field``, ``sequence_index``,
    ``transparency_mag``, ``grey_extinction_mag``, ``patchy_mean_mag``, ``k_true``,
    ``shift_x_px``, ``shift_y_px``, ``rotation_deg``, ``wcs_rotation_deg``,
    ``repointed``, ``seeing_atm_arcsec``, ``focus_factor``, ``sky_factor``,
    ``twilight_factor``, ``moon_factor``, ``moon_phase`` and ``scene_seed``
    (:mod:`survey_qa.simulate.sequence`); the true stars have a stable ``star_id``,
    their reference position ``x_ref``, ``y_ref`` and ``flux_clear_adu``.

    Parameters
    ----------
    raw_root, night
        Frames go to ``<raw_root>/<night>/`` (single-detector ``.fits``), truth to its
        ``_truth/`` folder.
    n_frames
        Number of exposures.
    seed
        Seed of the night's conditions; deterministic for a seed and night.
    size_px
        Detector side in pixels.
    scene_seed
        Seed of the field (default ``seed``): the same scene seed gives the same field
        on other nights.
    field
        Field name written as ``OBJECT`` (default the drawn ``FIELD_NNNN``).
    header_style
        ``wcs`` (default): a WCS that follows the pointing; see
        :data:`survey_qa.simulate.HEADER_STYLES`.
    client
        Optional ``dask.distributed.Client``: frames rendered in parallel.
    """
    seq = sequence.plan_sequence(night, n_frames, seed=seed, size_px=size_px,
                                 scene_seed=scene_seed, field=field,
                                 header_style=header_style)
    if client is None:
        results = [write_sequence_frame(raw_root, seq, i) for i in range(n_frames)]
    else:
        futures = client.map(write_sequence_frame, [str(raw_root)] * n_frames,
                             [seq] * n_frames, list(range(n_frames)), pure=False)
        results = client.gather(futures)
    return _write_tables(raw_root, night, results)


DEMO_SEED = 20240301


def demo_plans(night: str = "2024-03-01", size_px: int = 4096) -> list[sim.FramePlan]:
    """The fixed composition of the demo night: 12 exposures, all five classes, every
    file format (one mosaic of four ``size_px // 2`` detectors)."""
    half = size_px // 2
    layout = [  # class, format, overrides of draw_spec
        ("good", "fits", {"confounders": ("cosmic_rays", "galaxies", "hot_pixels")}),
        ("good", "fits.fz", {"confounders": ("crowded", "optics", "saturated_stars")}),
        ("good", "fits", {"confounders": ("bright_galaxy", "galaxies", "satellite")}),
        ("bad_seeing", "fits", {}),
        ("bad_seeing", "fits.gz", {"confounders": ("bright_sky", "cosmic_rays")}),
        ("bad_tracking", "fits", {"trail_kind": "linear"}),
        ("bad_tracking", "fits", {"trail_kind": "periodic", "confounders": ("optics",)}),
        ("very_bad_tracking", "fits", {"trail_kind": "linear"}),
        ("very_bad_tracking", "fits.fz", {"trail_kind": "jump"}),
        ("background_issues", "fits", {"background_kind": "gradient"}),
        ("background_issues", "mosaic", {"background_kind": "cloud"}),
        ("background_issues", "fits", {"background_kind": "scattered",
                                       "confounders": ("nebula",)}),
    ]
    times = sim.night_times(night, len(layout), np.random.default_rng(DEMO_SEED))
    stem = night.replace("-", "")
    plans = []
    for i, (cls, fmt, over) in enumerate(layout):
        mosaic = fmt.startswith("mosaic")
        plans.append(sim.FramePlan(i, f"{stem}_{i + 1:04d}", cls, False, fmt, times[i], i + 1,
                                   half if mosaic else size_px, 4 if mosaic else None,
                                   dict(over)))
    return plans


def demo_night(raw_root: str | os.PathLike, night: str = "2024-03-01", *, size_px: int = 4096,
               client=None) -> pd.DataFrame:
    """Write the embedded demo night (fixed seed and composition); return its truth."""
    return write_night(raw_root, night, demo_plans(night, size_px), seed=DEMO_SEED,
                       client=client)


def load_truth(raw_root: str | os.PathLike, night: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The truth table and the true stars of a simulated night."""
    return (pd.read_parquet(paths.truth_table(raw_root, night)),
            pd.read_parquet(paths.truth_stars(raw_root, night)))
