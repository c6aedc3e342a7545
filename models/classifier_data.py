"""The learned classifier's data: labelled detectors of measured nights, split and served.

:func:`load_examples` reads a set of nights (Parquet exposure catalog, Zarr star stamps,
simulator truth) into :class:`Examples`: one row per labelled detector with its features
and the SOM node of each star stamp under the 8 rotations/flips. :class:`ExposureDataModule`
splits them by night and exposure (never by source), computes the feature
standardisation on the training split only and serves :class:`ExposureDataset` items,
augmented for training (rotations and flips of the stamps, random subsets of the stars,
features randomly reported missing).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from survey_qa import paths
from survey_qa.config import ClassifyConfig
from survey_qa.models.classifier_features import (FEATURE_NAMES, OPTIONAL_FEATURES,
                                                  feature_matrix, standardisation)
from survey_qa.models.som import SomModel, dihedral
from survey_qa.models.splits import split_by_night_and_exposure
from survey_qa.pipeline.schema import CLASSES

SPLIT_METHOD = "night_count"
"""How :class:`ExposureDataModule` holds out validation data
(:func:`survey_qa.models.splits.split_by_night_and_exposure`)."""


@dataclass
class Examples:
    """Labelled detectors of a set of nights, ready for training or evaluation.

    Attributes
    ----------
    table
        One row per detector: the exposure catalog columns plus ``night``, ``label``
        (index into ``CLASSES``), ``ambiguous`` and ``has_confounder`` from the truth.
    features
        ``(n, F)`` raw features (NaN where not measured).
    nodes
        ``(n, stars, 8)`` int16: SOM node of each star stamp under each of the 8
        rotations/flips of the square (column 0: as observed); -1 where no star.
    """

    table: pd.DataFrame
    features: np.ndarray
    nodes: np.ndarray

    def __len__(self) -> int:
        return len(self.table)

    def subset(self, index: np.ndarray) -> "Examples":
        index = np.asarray(index, dtype=np.int64)
        return Examples(self.table.iloc[index].reset_index(drop=True),
                        self.features[index], self.nodes[index])

    def occupancy(self, grid: tuple[int, int]) -> np.ndarray:
        """``(n, gx, gy)`` occupancy maps of the stamps as observed (no augmentation)."""
        return np.stack([occupancy_from_nodes(n[:, 0], grid) for n in self.nodes]) \
            if len(self) else np.zeros((0, *grid), dtype=np.float32)


def occupancy_from_nodes(nodes: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Share of stars per SOM node from their node indices (-1: no star).

    Returns ``(gx, gy)`` float32 summing to 1, or all zeros when there is no star.
    """
    nodes = np.asarray(nodes)
    nodes = nodes[nodes >= 0]
    counts = np.bincount(nodes, minlength=grid[0] * grid[1]).astype(np.float32)
    if len(nodes):
        counts /= len(nodes)
    return counts.reshape(grid)


def dihedral_nodes(som: SomModel, stamps: np.ndarray) -> np.ndarray:
    """SOM node of every stamp under the 8 rotations/flips: ``(n, 8)`` int16, -1: none."""
    stamps = np.asarray(stamps, dtype=np.float32)
    out = np.empty((len(stamps), 8), dtype=np.int16)
    for k in range(8):
        out[:, k] = som.assign(dihedral(stamps, np.full(len(stamps), k)))
    return out


def read_truth(truth_root: str | Path, night: str) -> pd.DataFrame:
    """The simulator's truth table of a night (:func:`survey_qa.paths.truth_table`).

    Returns exposure, detector, quality_class, ambiguous and has_confounder columns.
    """
    path = paths.truth_table(truth_root, night)
    if not path.exists():
        raise ValueError(f"no truth table {path}")
    truth = pd.read_parquet(path)
    for col in ("exposure", "quality_class"):
        if col not in truth:
            raise ValueError(f"{path}: no column {col!r}")
    if "detector" not in truth:
        truth["detector"] = ""
    truth["detector"] = truth["detector"].astype(str)
    truth["ambiguous"] = (truth["ambiguous"].fillna(False).astype(bool)
                          if "ambiguous" in truth else False)
    conf = truth["confounders"] if "confounders" in truth else pd.Series([None] * len(truth))
    truth["confounders"] = [",".join(_items(c)) for c in conf]
    truth["has_confounder"] = truth["confounders"] != ""
    return truth[["exposure", "detector", "quality_class", "ambiguous", "confounders",
                  "has_confounder"]]


def _items(value) -> list[str]:
    """Confounder names from a comma-separated string or a sequence."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, str):
        value = value.split(",")
    return [str(v).strip() for v in value if str(v).strip() not in ("", "none")]


def read_exposure_catalog(out_root: str | Path, night: str) -> pd.DataFrame:
    """Measured detector rows (status ok, no mosaic summary) of one night's catalog."""
    import pyarrow.parquet as pq

    folder = paths.catalog_partition(out_root, "exposures", night)
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise ValueError(f"no exposure catalog for night {night} under {out_root}")
    rows = pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)
    rows = rows[(rows["status"] == "ok") & (rows["detector"] != "ALL")]
    return rows.reset_index(drop=True).assign(night=night)


def read_stamps(out_root: str | Path, night: str) -> tuple[dict[tuple[str, str], int], object]:
    """The night's stamp array (lazy) and its (exposure, detector) -> frame index."""
    import xarray as xr

    ds = xr.open_zarr(paths.zarr_store(out_root, night), consolidated=False)
    keys = zip(ds["exposure"].values.tolist(), ds["detector"].values.tolist())
    return {(str(e), str(d)): i for i, (e, d) in enumerate(keys)}, ds["stamps"]


def read_night_stamps(out_root: str | Path, night: str) -> np.ndarray:
    """Every stored star stamp of a night, ``(n, h, w)`` float32 (padding dropped)."""
    import xarray as xr

    ds = xr.open_zarr(paths.zarr_store(out_root, night), consolidated=False)
    counts = ds["n_stamps"].values
    stamps = ds["stamps"].values
    return np.concatenate([stamps[i, :c] for i, c in enumerate(counts) if c > 0]
                          or [np.zeros((0, *stamps.shape[2:]), np.float32)]).astype(np.float32)


def _join_truth(rows: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """Truth per detector; single-detector truth rows match on the exposure alone."""
    by_det = rows.merge(truth, on=["exposure", "detector"], how="left",
                        suffixes=("", "_truth"), indicator=True)
    if (by_det["_merge"] == "both").all():
        return by_det.drop(columns="_merge")
    one = truth.drop_duplicates("exposure", keep=False).drop(columns="detector")
    by_exp = rows.merge(one, on="exposure", how="left", suffixes=("", "_truth"))
    matched = by_det["_merge"] == "both"
    out = by_det.drop(columns="_merge")
    for col in ("quality_class_truth", "ambiguous", "confounders", "has_confounder"):
        out.loc[~matched, col] = by_exp.loc[~matched, col].to_numpy()
    return out


def load_examples(out_root: str | Path, nights: list[str], truth_root: str | Path,
                  som: SomModel, cfg: ClassifyConfig) -> Examples:
    """Read the measured detectors of ``nights`` with their truth and SOM nodes.

    Detectors without a truth class or with a failed measurement are left out.
    """
    tables, features, nodes = [], [], []
    for night in nights:
        rows = _join_truth(read_exposure_catalog(out_root, night), read_truth(truth_root, night))
        rows = rows[rows["quality_class_truth"].isin(CLASSES)].reset_index(drop=True)
        index, stamps = read_stamps(out_root, night)
        frames = [index.get((e, d), -1) for e, d in zip(rows["exposure"], rows["detector"])]
        n_star = stamps.shape[1]
        night_nodes = np.full((len(rows), n_star, 8), -1, dtype=np.int16)
        have = [i for i, f in enumerate(frames) if f >= 0]
        if have:
            block = np.asarray(stamps.isel(frame=[frames[i] for i in have]).values,
                               dtype=np.float32)
            flat = dihedral_nodes(som, block.reshape(-1, *block.shape[2:]))
            night_nodes[have] = flat.reshape(len(have), n_star, 8)
        rows["label"] = [CLASSES.index(c) for c in rows["quality_class_truth"]]
        rows["ambiguous"] = rows["ambiguous"].fillna(False).astype(bool)
        rows["has_confounder"] = rows["has_confounder"].fillna(False).astype(bool)
        rows["confounders"] = rows["confounders"].fillna("").astype(str)
        tables.append(rows)
        features.append(feature_matrix(rows, cfg))
        nodes.append(night_nodes)
    n_star = max((n.shape[1] for n in nodes), default=0)
    nodes = [np.pad(n, ((0, 0), (0, n_star - n.shape[1]), (0, 0)), constant_values=-1)
             for n in nodes]
    if not tables:
        raise ValueError("no nights given")
    return Examples(pd.concat(tables, ignore_index=True),
                    np.concatenate(features).astype(np.float32),
                    np.concatenate(nodes).astype(np.int16))


class ExposureDataset(Dataset):
    """(occupancy map, raw features, label) per detector, optionally augmented.

    Augmentation draws, per item: one of the 8 rotations/flips of the stamps, a random
    subset of 50-100 % of the stars (at least 3), and reports each optional feature
    missing with probability ``p_missing``. Randomness comes from torch's generator, so
    ``lightning.seed_everything`` makes it reproducible.
    """

    def __init__(self, examples: Examples, grid: tuple[int, int], augment: bool = False,
                 p_missing: float = 0.1):
        self.nodes = torch.tensor(examples.nodes, dtype=torch.int64)
        self.features = torch.tensor(examples.features, dtype=torch.float32)
        self.labels = torch.tensor(examples.table["label"].to_numpy(dtype=np.int64, copy=True))
        self.grid = tuple(grid)
        self.augment = augment
        self.p_missing = p_missing
        self.optional = torch.tensor([FEATURE_NAMES.index(n) for n in OPTIONAL_FEATURES])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        k = int(torch.randint(8, ())) if self.augment else 0
        nodes = self.nodes[i, :, k]
        nodes = nodes[nodes >= 0]
        if self.augment and len(nodes) > 3:
            keep = int(torch.randint(max(3, len(nodes) // 2), len(nodes) + 1, ()))
            nodes = nodes[torch.randperm(len(nodes))[:keep]]
        n_nodes = self.grid[0] * self.grid[1]
        occ = torch.bincount(nodes, minlength=n_nodes).float()
        occ = (occ / max(len(nodes), 1)).reshape(self.grid)
        feats = self.features[i].clone()
        if self.augment and self.p_missing > 0:
            drop = torch.rand(len(self.optional)) < self.p_missing
            feats[self.optional[drop]] = float("nan")
        return occ, feats, self.labels[i]


class ExposureDataModule(L.LightningDataModule):
    """Nights of measured, labelled detectors split by night and exposure.

    Parameters
    ----------
    out_root
        Where the nightly job wrote ``catalogs/`` and ``arrays/``.
    nights
        Nights to use.
    truth_root
        Raw root holding ``<night>/_truth/truth.parquet``.
    som
        The trained SOM that maps stamps to nodes.
    classify_cfg
        Limits used to express the features (see :func:`feature_vector`).
    batch_size, num_workers
        DataLoader settings.
    val_fraction, seed
        See :func:`survey_qa.models.splits.split_by_night_and_exposure`.
    augment
        Augment the training split (never the validation split).
    include_ambiguous
        Train on frames in the spec's ambiguous zones too (default: no).

    Notes
    -----
    After :meth:`setup`, ``feature_mean`` and ``feature_std`` hold the standardisation
    constants of the training split and ``class_counts`` its class counts.
    """

    def __init__(self, out_root: str | Path, nights: list[str], truth_root: str | Path,
                 som: SomModel, classify_cfg: ClassifyConfig, batch_size: int = 64,
                 num_workers: int = 0, val_fraction: float = 0.2, seed: int = 0,
                 augment: bool = True, include_ambiguous: bool = False):
        super().__init__()
        self.out_root, self.nights, self.truth_root = out_root, list(nights), truth_root
        self.som, self.classify_cfg = som, classify_cfg
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_fraction, self.seed = val_fraction, seed
        self.augment, self.include_ambiguous = augment, include_ambiguous
        self.examples: Examples | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.examples is not None:
            return
        ex = load_examples(self.out_root, self.nights, self.truth_root, self.som,
                           self.classify_cfg)
        if not self.include_ambiguous:
            ex = ex.subset(np.flatnonzero(~ex.table["ambiguous"].to_numpy()))
        if len(ex) < 2:
            raise ValueError(f"only {len(ex)} labelled detectors in nights {self.nights}")
        train_idx, val_idx = split_by_night_and_exposure(ex.table, self.val_fraction,
                                                         self.seed, method=SPLIT_METHOD)
        self.examples, self.train, self.val = ex, ex.subset(train_idx), ex.subset(val_idx)
        self.feature_mean, self.feature_std = standardisation(self.train.features)
        self.class_counts = np.bincount(self.train.table["label"], minlength=len(CLASSES))

    def loader(self, examples: Examples, augment: bool, shuffle: bool) -> DataLoader:
        """A DataLoader of ``examples`` with this module's batch size and workers."""
        return DataLoader(ExposureDataset(examples, self.som.grid, augment=augment),
                          batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.train, self.augment, True)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val, False, False)
