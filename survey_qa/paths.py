"""Every path under the raw and output roots, in one place.

The input side (``raw_root``) holds one folder of frames per night; a simulated night also
holds its truth in ``<night>/_truth/``. The output side (``out_root``) is laid out as the
I/O contract says::

    <out_root>/catalogs/<catalog>/night=<night>/part-0.parquet   catalogs (Hive partitions)
    <out_root>/arrays/<night>.zarr                                stamps, patches, maps
    <out_root>/masks/night=<night>/<exposure>.fits                full-resolution masks
    <out_root>/reports/<night>.html                               the night report
    <out_root>/selections/night=<night>/                          frame lists for stacking
    <out_root>/stacks/<night>/<field>.fits                        a field's stacked frames
    <out_root>/models/                                            trained SOM and weights
    <out_root>/checkpoints/<model>/                               training checkpoints
    <out_root>/evaluation/                                        classifier evaluation
    <out_root>/_work/night=<night>/<catalog>/<exposure>.parquet   per-exposure results
    <out_root>/_work/night=<night>.lock                           a running job's lock

Code elsewhere asks this module for a path; it never joins these names itself.
"""
from __future__ import annotations

import os
from pathlib import Path

TRUTH_DIR = "_truth"
CATALOGS = ("exposures", "sources")

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------- raw side


def night_dir(raw_root: PathLike, night: str) -> Path:
    """The folder of one night's frames."""
    return Path(raw_root) / night


def truth_dir(raw_root: PathLike, night: str) -> Path:
    """A simulated night's truth folder (the pipeline never reads frames from it)."""
    return night_dir(raw_root, night) / TRUTH_DIR


def truth_table(raw_root: PathLike, night: str) -> Path:
    """A simulated night's per-detector truth table."""
    return truth_dir(raw_root, night) / "truth.parquet"


def truth_stars(raw_root: PathLike, night: str) -> Path:
    """A simulated night's true stars (positions in px, fluxes in ADU)."""
    return truth_dir(raw_root, night) / "stars.parquet"


def truth_mask(raw_root: PathLike, night: str, exposure: str) -> Path:
    """A simulated exposure's true damage masks (one HDU per detector)."""
    return truth_dir(raw_root, night) / "masks" / f"{exposure}.fits"


# ---------------------------------------------------------------------------- output side


def catalog_root(out_root: PathLike, catalog: str) -> Path:
    """The partitioned dataset of one catalog (``exposures`` or ``sources``), all nights."""
    if catalog not in CATALOGS:
        raise ValueError(f"unknown catalog {catalog!r}; expected one of {CATALOGS}")
    return Path(out_root) / "catalogs" / catalog


def catalog_partition(out_root: PathLike, catalog: str, night: str) -> Path:
    """One night's partition folder of a catalog."""
    return catalog_root(out_root, catalog) / f"night={night}"


def catalog_file(out_root: PathLike, catalog: str, night: str) -> Path:
    """The single file of one night's partition of a catalog."""
    return catalog_partition(out_root, catalog, night) / "part-0.parquet"


def catalog_nights(out_root: PathLike, catalog: str = "exposures") -> list[str]:
    """Every night with a partition of ``catalog`` under ``out_root``, sorted."""
    folder = catalog_root(out_root, catalog)
    return sorted(p.name.split("=", 1)[1] for p in folder.glob("night=*") if p.is_dir())


def zarr_store(out_root: PathLike, night: str) -> Path:
    """The night's array store."""
    return Path(out_root) / "arrays" / f"{night}.zarr"


def mask_file(out_root: PathLike, night: str, exposure: str) -> Path:
    """An exposure's full-resolution masks."""
    return Path(out_root) / "masks" / f"night={night}" / f"{exposure}.fits"


def report_file(out_root: PathLike, night: str) -> Path:
    """The night report."""
    return Path(out_root) / "reports" / f"{night}.html"


def selection_dir(out_root: PathLike, night: str) -> Path:
    """Where ``survey-qa select`` writes a night's frame lists by default."""
    return Path(out_root) / "selections" / f"night={night}"


def stack_file(out_root: PathLike, night: str, field: str) -> Path:
    """The stack ``survey-qa stack`` writes for one field of a night (``field``: a
    file-name-safe name)."""
    return Path(out_root) / "stacks" / night / f"{field}.fits"


def models_dir(out_root: PathLike) -> Path:
    """Where trained models go by default."""
    return Path(out_root) / "models"


def checkpoint_dir(out_root: PathLike, configured: PathLike, model: str) -> Path:
    """A model's training checkpoints: ``<configured>/<model>``, where ``configured``
    (``train.checkpoint_dir``) is taken under ``out_root`` when it is relative."""
    base = Path(configured)
    if not base.is_absolute():
        base = Path(out_root) / base
    return base / model


def evaluation_dir(out_root: PathLike) -> Path:
    """Where the classifier evaluation writes its scores and figure by default."""
    return Path(out_root) / "evaluation"


def work_dir(out_root: PathLike, night: str) -> Path:
    """A night's per-exposure results while (or after) it runs."""
    return Path(out_root) / "_work" / f"night={night}"


def result_file(out_root: PathLike, night: str, catalog: str, exposure: str) -> Path:
    """One exposure's rows of one catalog while its night runs (merged when it ends)."""
    if catalog not in CATALOGS:
        raise ValueError(f"unknown catalog {catalog!r}; expected one of {CATALOGS}")
    return work_dir(out_root, night) / catalog / f"{exposure}.parquet"


def lock_file(out_root: PathLike, night: str) -> Path:
    """The lock a running job holds on its night."""
    return Path(out_root) / "_work" / f"night={night}.lock"


def report_cache(out_root: PathLike, night: str) -> Path:
    """Pictures the night report reuses between runs."""
    return work_dir(out_root, night) / "report"
