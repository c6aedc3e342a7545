"""The learned exposure classifier: data, Lightning system, calibration and inference.

- :func:`feature_vector` turns an exposure row into the model's features: physical,
  scale-free quantities (seeing relative to the survey's limit, trail ratio, elongation
  coherence, sky non-uniformity...). Pixel scale, sky level, star counts and other
  confounders are deliberately left out.
- :class:`ExposureDataModule` reads a set of nights (Zarr stamps, Parquet exposure
  catalog, simulator truth), splits them by night and exposure (never by source),
  computes the feature standardisation on the training split only and augments the
  training examples (rotations and flips of the stamps, random subsets of the stars,
  features randomly reported missing).
- :class:`ClassifierSystem` trains :class:`DualInputClassifier` with cross-entropy;
  :func:`fit_temperature` calibrates it afterwards on the validation split.
- :func:`save_classifier` / :func:`load_classifier` write and read ``.safetensors``
  weights with a JSON sidecar; :class:`LearnedClassifier` decides one row through
  :func:`survey_qa.pipeline.decide.classify_row`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import survey_qa
from survey_qa.config import ClassifyConfig
from survey_qa.models.components.classifier import DualInputClassifier
from survey_qa.models.som import SomModel, dihedral
from survey_qa.pipeline.decide import classify_row
from survey_qa.pipeline.schema import CLASSES

CLASSIFIER_FORMAT = "survey-qa-classifier-1"
WEIGHTS_DIR = Path(survey_qa.__file__).resolve().parent / "weights"
"""Where packaged weights live (``survey_qa/weights/``, package data)."""
DEFAULT_WEIGHTS = "classifier.safetensors"

FEATURE_NAMES = (
    "log_seeing_ratio",       # ln(FWHM / configured seeing limit), arcsec (or px) both
    "ellipticity",            # 1 - b/a of the PSF
    "elongation_coherence",   # 0: directions random over the field, 1: all the same
    "coherent_ellipticity",   # ellipticity x coherence: tracking-like elongation
    "log1p_trail_ratio",      # ln(1 + T/s)
    "log10_sky_nonuniformity",  # log10 of (P99 - P1) / median of the smooth sky
    "fwhm_grid_spread",       # (max - min) / median of the per-region FWHM
    "ellipticity_grid_mean",  # mean per-region ellipticity
    "ellipticity_grid_std",   # its spread over the field (optics vary, tracking does not)
    "log_moffat_beta",        # PSF wing shape, ln(beta)
    "mask_fraction",          # share of the detector the autoencoder masks
    "log_ae_score",           # ln of the autoencoder score (1: like the reference frames)
    "log_src_seeing_ratio",   # as log_seeing_ratio, from the detections' half-light radii
    "src_ellipticity",        # median 1 - b/a of the bright detections (moments)
    "src_coherent_ellipticity",  # src_ellipticity x their direction coherence
)
OPTIONAL_FEATURES = ("fwhm_grid_spread", "ellipticity_grid_mean", "ellipticity_grid_std",
                     "log_moffat_beta", "mask_fraction", "log_ae_score")
"""Features that some instruments or runs cannot give (no autoencoder weights, too few
stars per region): training reports them missing at random so the model copes."""


# ---------------------------------------------------------------------------- features


def _num(row: dict, key: str) -> float:
    value = row.get(key)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def _grid(row: dict, key: str) -> np.ndarray:
    values = row.get(key)
    if values is None:
        return np.zeros(0)
    arr = np.asarray(list(values), dtype=np.float64)
    return arr[np.isfinite(arr)]


def _log_seeing_ratio(fwhm_px: float, pixscale_arcsec: float, cfg: ClassifyConfig) -> float:
    """ln(FWHM / seeing limit), in arcsec, or in pixels when the scale is unknown."""
    if fwhm_px > 0 and pixscale_arcsec > 0:
        return math.log(fwhm_px * pixscale_arcsec / cfg.seeing_limit_arcsec)
    if fwhm_px > 0 and cfg.seeing_limit_px:
        return math.log(fwhm_px / cfg.seeing_limit_px)
    return math.nan


def feature_vector(row: dict, cfg: ClassifyConfig) -> np.ndarray:
    """The classifier's features of one exposure row, NaN where not measured.

    Parameters
    ----------
    row
        An exposure catalog row (``pipeline.schema.EXPOSURE_SCHEMA`` columns).
    cfg
        The survey's limits: the seeing is expressed relative to
        ``seeing_limit_arcsec`` (or ``seeing_limit_px`` when the pixel scale is unknown),
        so a survey that sets its own seeing limit moves the learned boundary with it.

    Returns
    -------
    numpy.ndarray
        ``(len(FEATURE_NAMES),)`` float32.
    """
    scale = _num(row, "pixscale_arcsec")
    src_ell = _num(row, "src_ellipticity")
    ell, coh = _num(row, "ellipticity"), _num(row, "elongation_coherence")
    trail = _num(row, "trail_ratio")
    sky_u = _num(row, "sky_nonuniformity")
    beta = _num(row, "moffat_beta")
    ae_score = _num(row, "ae_score")
    fwhm_grid, ell_grid = _grid(row, "fwhm_grid_px"), _grid(row, "ellipticity_grid")
    spread = math.nan
    if len(fwhm_grid) >= 2 and np.median(fwhm_grid) > 0:
        spread = float((fwhm_grid.max() - fwhm_grid.min()) / np.median(fwhm_grid))
    values = {
        "log_seeing_ratio": _log_seeing_ratio(_num(row, "fwhm_px"), scale, cfg),
        "ellipticity": ell,
        "elongation_coherence": coh,
        "coherent_ellipticity": ell * coh,
        "log1p_trail_ratio": math.log1p(max(trail, 0.0)) if trail == trail else math.nan,
        "log10_sky_nonuniformity": (math.log10(max(sky_u, 1e-4)) if sky_u == sky_u
                                    else math.nan),
        "fwhm_grid_spread": spread,
        "ellipticity_grid_mean": float(ell_grid.mean()) if len(ell_grid) else math.nan,
        "ellipticity_grid_std": float(ell_grid.std()) if len(ell_grid) >= 2 else math.nan,
        "log_moffat_beta": math.log(beta) if beta > 0 else math.nan,
        "mask_fraction": _num(row, "mask_fraction"),
        "log_ae_score": math.log(ae_score) if ae_score > 0 else math.nan,
        "log_src_seeing_ratio": _log_seeing_ratio(_num(row, "src_fwhm_px"), scale, cfg),
        "src_ellipticity": src_ell,
        "src_coherent_ellipticity": src_ell * _num(row, "src_elongation_coherence"),
    }
    return np.array([values[n] for n in FEATURE_NAMES], dtype=np.float32)


def feature_matrix(rows: pd.DataFrame, cfg: ClassifyConfig) -> np.ndarray:
    """:func:`feature_vector` of every row: ``(n, len(FEATURE_NAMES))`` float32."""
    out = np.full((len(rows), len(FEATURE_NAMES)), np.nan, dtype=np.float32)
    for i, row in enumerate(rows.to_dict("records")):
        out[i] = feature_vector(row, cfg)
    return out


# ---------------------------------------------------------------------------- data


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
    """The simulator's truth table of a night (``<truth_root>/<night>/_truth/truth.parquet``).

    Returns exposure, detector, quality_class, ambiguous and has_confounder columns.
    """
    path = Path(truth_root) / night / "_truth" / "truth.parquet"
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

    folder = Path(out_root) / "catalogs" / "exposures" / f"night={night}"
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise ValueError(f"no exposure catalog for night {night} under {out_root}")
    rows = pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)
    rows = rows[(rows["status"] == "ok") & (rows["detector"] != "ALL")]
    return rows.reset_index(drop=True).assign(night=night)


def read_stamps(out_root: str | Path, night: str) -> tuple[dict[tuple[str, str], int], object]:
    """The night's stamp array (lazy) and its (exposure, detector) -> frame index."""
    import xarray as xr

    ds = xr.open_zarr(Path(out_root) / "arrays" / f"{night}.zarr", consolidated=False)
    keys = zip(ds["exposure"].values.tolist(), ds["detector"].values.tolist())
    return {(str(e), str(d)): i for i, (e, d) in enumerate(keys)}, ds["stamps"]


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


def split_by_night_and_exposure(table: pd.DataFrame, val_fraction: float,
                                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation row indices; no exposure is ever on both sides.

    With three nights or more, whole nights are held out (at least one); otherwise whole
    exposures (all their detectors) are, chosen at random with ``seed``.

    Parameters
    ----------
    table
        Needs ``night`` and ``exposure`` columns.
    val_fraction
        Share of nights (or exposures) for validation; 0 gives an empty validation split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError("val_fraction must be in [0, 1)")
    rng = np.random.default_rng(seed)
    nights = sorted(table["night"].unique())
    if len(nights) >= 3:
        groups = table["night"].astype(str).to_numpy()
        units = nights
    else:
        groups = (table["night"].astype(str) + "/" + table["exposure"].astype(str)).to_numpy()
        units = sorted(set(groups))
    n_val = int(round(val_fraction * len(units)))
    if val_fraction > 0:
        n_val = min(max(n_val, 1), len(units) - 1)
    held = set(rng.permutation(np.array(units, dtype=object))[:n_val].tolist())
    is_val = np.array([g in held for g in groups], dtype=bool)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


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
        See :func:`split_by_night_and_exposure`.
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
                                                         self.seed)
        self.examples, self.train, self.val = ex, ex.subset(train_idx), ex.subset(val_idx)
        self.feature_mean, self.feature_std = standardisation(self.train.features)
        self.class_counts = np.bincount(self.train.table["label"], minlength=len(CLASSES))

    def _loader(self, examples: Examples, augment: bool, shuffle: bool) -> DataLoader:
        return DataLoader(ExposureDataset(examples, self.som.grid, augment=augment),
                          batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, self.augment, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val, False, False)


def standardisation(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation, ignoring NaN (0 and 1 when all NaN)."""
    features = np.asarray(features, dtype=np.float64)
    finite = np.isfinite(features)
    n = finite.sum(axis=0)
    filled = np.where(finite, features, 0.0)
    mean = np.divide(filled.sum(0), n, out=np.zeros(features.shape[1]), where=n > 0)
    var = np.divide((np.where(finite, features - mean, 0.0) ** 2).sum(0), n,
                    out=np.ones(features.shape[1]), where=n > 0)
    std = np.sqrt(var)
    std[~(std > 1e-6)] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def class_weights(counts: np.ndarray) -> list[float]:
    """Inverse square-root frequency weights, mean 1 over the classes present."""
    counts = np.asarray(counts, dtype=np.float64)
    w = np.where(counts > 0, 1.0 / np.sqrt(np.maximum(counts, 1.0)), 0.0)
    return (w / w[counts > 0].mean()).tolist() if (counts > 0).any() else [1.0] * len(counts)


# ---------------------------------------------------------------------------- domain

DOMAIN_COLUMNS = ("pixscale_arcsec", "fwhm_px", "fwhm_arcsec")
"""Measured quantities whose training range is saved with the weights. The features are
scale-free, so frame size and source counts are left out: a 4k frame of a familiar
instrument is not out of the domain."""


def training_domain(table: pd.DataFrame, columns: tuple[str, ...] = DOMAIN_COLUMNS
                    ) -> tuple[dict, dict]:
    """The training domain of a classifier: the range of each quantity over its detectors.

    Returns ``(domain, stats)``: ``domain`` maps a column to ``[min, max]`` of its finite
    values (the form :func:`survey_qa.pipeline.decide.outside_domain` reads: outside it,
    the rules decide); ``stats`` adds percentiles 1 and 99 and the counts.
    """
    domain, stats = {}, {}
    for col in columns:
        if col not in table:
            continue
        v = pd.to_numeric(table[col], errors="coerce").to_numpy(dtype=np.float64)
        finite = v[np.isfinite(v)]
        stats[col] = {"n_finite": int(finite.size), "n": int(v.size)}
        if finite.size:
            domain[col] = [float(finite.min()), float(finite.max())]
            p01, p99 = np.percentile(finite, [1.0, 99.0])
            stats[col].update(p01=float(p01), p99=float(p99))
    return domain, stats


# ---------------------------------------------------------------------------- training


class ClassifierSystem(L.LightningModule):
    """Trains a :class:`DualInputClassifier` with (weighted) cross-entropy.

    Parameters
    ----------
    net
        The classifier (not saved as a hyperparameter: its weights are the state).
    learning_rate, weight_decay
        AdamW settings; the learning rate follows a cosine decay over the epochs.
    class_weights
        Per-class loss weights (None: equal).
    label_smoothing
        Cross-entropy label smoothing.
    """

    def __init__(self, net: DualInputClassifier, learning_rate: float = 1e-3,
                 weight_decay: float = 1e-4, class_weights: list[float] | None = None,
                 label_smoothing: float = 0.02):
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)

    def forward(self, occupancy: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.net(occupancy, features)

    def _step(self, batch, stage: str) -> torch.Tensor:
        occ, feats, labels = batch
        logits = self(occ, feats)
        loss = self.loss_fn(logits, labels)
        acc = (logits.argmax(1) == labels).float().mean()
        on_epoch = stage != "train"
        self.log(f"{stage}_loss", loss, prog_bar=True, on_epoch=True, on_step=not on_epoch,
                 sync_dist=on_epoch, batch_size=len(labels))
        self.log(f"{stage}_acc", acc, prog_bar=True, on_epoch=True, on_step=False,
                 sync_dist=on_epoch, batch_size=len(labels))
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.learning_rate,
                                weight_decay=self.hparams.weight_decay)
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        return {"optimizer": opt, "lr_scheduler": sched}


@torch.no_grad()
def collect_logits(net: nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw logits and labels of every batch of ``loader`` (eval mode, CPU)."""
    was_training = net.training
    net.eval()
    logits, labels = [], []
    for occ, feats, y in loader:
        logits.append(net(occ, feats).float().cpu())
        labels.append(y)
    net.train(was_training)
    if not logits:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(labels)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """The temperature ``T`` minimising the NLL of ``softmax(logits / T)`` (Guo et al. 2017).

    Returns 1 when there are no examples. ``T`` is searched in ``[0.05, 20]``.
    """
    if len(labels) == 0:
        return 1.0
    logits = logits.detach().double()
    labels = labels.detach().long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(np.clip(math.exp(float(log_t.detach())), 0.05, 20.0))


# ---------------------------------------------------------------------------- files


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save_classifier(net: DualInputClassifier, path: str | Path, som: SomModel,
                    info: dict | None = None) -> Path:
    """Write ``path`` (``.safetensors``: every weight and buffer, the SOM prototypes,
    standardisation and temperature included) and its JSON sidecar.

    Parameters
    ----------
    net
        The trained classifier.
    path
        Target ``.safetensors`` file; the metadata go to the same name with ``.json``.
    som
        The SOM the occupancy maps come from (its grid and errors are recorded).
    info
        Extra facts to record (training nights, metrics, timings...).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": CLASSIFIER_FORMAT})
    os.chmod(tmp, 0o644)  # package data: readable by every user
    tmp.replace(path)
    meta = {"format": CLASSIFIER_FORMAT, "classes": list(CLASSES),
            "feature_names": list(FEATURE_NAMES), "arch": net.arch,
            "temperature": float(net.temperature.item()),
            "feature_mean": net.feature_branch.feature_mean.tolist(),
            "feature_std": net.feature_branch.feature_std.tolist(),
            "som": {"grid": list(som.grid), "stamp_shape": list(som.stamp_shape),
                    "quantization_error": som.quantization_error,
                    "topographic_error": som.topographic_error, "info": som.info},
            "weights_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            **(info or {})}
    side = _sidecar(path)
    tmp = side.with_name(f".{side.name}.tmp")
    tmp.write_text(json.dumps(meta, indent=1, default=_jsonable))
    tmp.replace(side)
    return path


def _jsonable(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@dataclass
class LearnedClassifier:
    """A trained classifier ready for inference on one exposure row at a time.

    Attributes
    ----------
    net
        The network (eval mode, CPU).
    som
        The SOM that gives the occupancy map of an exposure's stamps.
    meta
        The JSON metadata saved with the weights.
    version
        ``cnn-<first 12 hex digits of the weights' SHA-256>``: the ``model_version``.
    classify_cfg
        The survey's limits (feature scaling and the secondary defect flags).
    """

    net: DualInputClassifier
    som: SomModel
    meta: dict
    version: str
    classify_cfg: ClassifyConfig = field(default_factory=ClassifyConfig)

    def occupancy(self, stamps: np.ndarray) -> np.ndarray:
        """Occupancy map ``(gx, gy)`` of one detector's star stamps."""
        return self.som.occupancy_map(stamps)

    @torch.no_grad()
    def probabilities(self, rows: list[dict], occupancies: np.ndarray) -> np.ndarray:
        """Calibrated probabilities ``(n, 5)`` (order of ``CLASSES``) for many rows."""
        feats = np.stack([feature_vector(r, self.classify_cfg) for r in rows])
        occ = np.asarray(occupancies, dtype=np.float32).reshape(len(rows), *self.som.grid)
        probs = self.net.probabilities(torch.as_tensor(occ), torch.as_tensor(feats))
        return probs.double().numpy()

    def predict(self, row: dict, occupancy: np.ndarray) -> dict:
        """Classify one detector: its row with the decision of
        :func:`~survey_qa.pipeline.decide.classify_row` written in (the rules decide
        outside the training domain or where no star was measured)."""
        return classify_row(row, self.classify_cfg, self, occupancy)


def default_weights_path() -> Path:
    """The packaged weights file (may not exist)."""
    return WEIGHTS_DIR / DEFAULT_WEIGHTS


def load_classifier(path: str | Path | None = None,
                    classify_cfg: ClassifyConfig | None = None) -> LearnedClassifier | None:
    """Load a trained classifier.

    Parameters
    ----------
    path
        A ``.safetensors`` file written by :func:`save_classifier` (its ``.json`` sidecar
        next to it); None: the packaged weights.
    classify_cfg
        The survey's limits; None: the defaults.

    Returns
    -------
    LearnedClassifier or None
        None when ``path`` is None and no weights are packaged.

    Raises
    ------
    ValueError
        When an explicit ``path`` does not exist or the files do not match.
    """
    from safetensors.torch import load_file

    explicit = path is not None
    path = Path(path) if explicit else default_weights_path()
    if not path.exists() or not _sidecar(path).exists():
        if explicit:
            raise ValueError(f"no classifier weights at {path} (with {_sidecar(path).name})")
        return None
    meta = json.loads(_sidecar(path).read_text())
    if meta.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"{path}: not a survey-qa classifier")
    if tuple(meta["classes"]) != CLASSES or tuple(meta["feature_names"]) != FEATURE_NAMES:
        raise ValueError(f"{path}: classes or features differ from this survey-qa version")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if meta.get("weights_sha256") not in (None, digest):
        raise ValueError(f"{path}: weights do not match their metadata (checksum)")
    arch = meta["arch"]
    net = DualInputClassifier(grid=tuple(arch["grid"]), stamp_shape=tuple(arch["stamp_shape"]),
                              n_features=arch["n_features"], n_classes=arch["n_classes"],
                              embed=arch["embed"], hidden=arch["hidden"],
                              dropout=arch["dropout"])
    net.load_state_dict(load_file(str(path)), strict=True)
    net.eval()
    gx, gy = arch["grid"]
    protos = net.prototype_branch.prototypes.numpy()
    som_meta = meta.get("som", {})
    som = SomModel(weights=protos.reshape(gx, gy, -1), stamp_shape=tuple(arch["stamp_shape"]),
                   quantization_error=som_meta.get("quantization_error", math.nan),
                   topographic_error=som_meta.get("topographic_error", math.nan),
                   info=som_meta.get("info", {}))
    return LearnedClassifier(net=net, som=som, meta=meta, version=f"cnn-{digest[:12]}",
                             classify_cfg=classify_cfg or ClassifyConfig())


@functools.lru_cache(maxsize=4)
def _cached_classifier(path: str | None) -> LearnedClassifier | None:
    return load_classifier(path)


def shared_classifier(path: str | Path | None = None,
                      classify_cfg: ClassifyConfig | None = None) -> LearnedClassifier | None:
    """:func:`load_classifier`, read once per process (for Dask workers of a night).

    The network and SOM are shared between calls; each call gets its own
    ``classify_cfg``.
    """
    clf = _cached_classifier(None if path is None else str(Path(path).resolve()))
    if clf is None:
        return None
    return dataclasses.replace(clf, classify_cfg=classify_cfg or ClassifyConfig())
