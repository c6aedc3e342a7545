"""Training the patch autoencoder: the Lightning system and the reference-patch data.

:class:`PatchDataModule` finds reference frames in the exposures catalog (good, ok,
confident), reads and normalises them exactly as scoring does
(:mod:`survey_qa.pipeline.aescore`), splits them by night and exposure, and serves
augmented random patches for training and a fixed patch grid for validation.
:class:`AutoencoderSystem` receives the network and trains it to reconstruct them.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from survey_qa import paths
from survey_qa.config import AutoencoderConfig, IOConfig, TrainConfig
from survey_qa.models.components.autoencoder import ConvAutoencoder
from survey_qa.models.splits import split_by_night_and_exposure
from survey_qa.pipeline import aescore
from survey_qa.pipeline.errors import QualityError

REFERENCE_COLUMNS = ["night", "exposure", "detector", "path", "hdu"]
SPLIT_METHOD = "exposure_share"
"""How :class:`PatchDataModule` holds out validation frames
(:func:`survey_qa.models.splits.split_by_night_and_exposure`)."""


# ---------------------------------------------------------------------------- the system


class AutoencoderSystem(L.LightningModule):
    """Trains a :class:`ConvAutoencoder` to reconstruct good-sky patches.

    The loss is the Huber loss between a patch and its reconstruction (robust to the
    few star pixels that no small network reproduces); validation also logs the mean
    patch score used for masking.

    Parameters
    ----------
    autoencoder
        The network (not saved as a hyper-parameter; its architecture is).
    learning_rate
        Adam learning rate.
    huber_delta
        Huber loss transition (normalised units: noise sigmas for faint pixels).
    cell_px
        Cell side of the patch score logged in validation (:func:`aescore.patch_errors`).
    """

    def __init__(self, autoencoder: ConvAutoencoder, learning_rate: float = 1e-3,
                 huber_delta: float = 1.0, cell_px: int = aescore.ScoreParams.cell_px):
        super().__init__()
        self.save_hyperparameters(ignore=["autoencoder"])
        self.hparams["architecture"] = autoencoder.arch.to_dict()
        self.autoencoder = autoencoder
        self.score_params = aescore.ScoreParams(cell_px=cell_px)
        self.loss_fn = torch.nn.HuberLoss(delta=huber_delta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder(x)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.loss_fn(self(batch), batch)
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True,
                 batch_size=len(batch), sync_dist=True)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        recon = self(batch)
        self.log("val_loss", self.loss_fn(recon, batch), prog_bar=True,
                 batch_size=len(batch), sync_dist=True)
        score = aescore.patch_errors(batch, recon, self.score_params).mean()
        self.log("val_score", score, batch_size=len(batch), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate)


# ---------------------------------------------------------------------------- references


def find_reference_frames(out_root: str | os.PathLike, nights: list[str] | None = None,
                          min_p_good: float = 0.8) -> pd.DataFrame:
    """Good detectors in the exposures catalog, one row each.

    Parameters
    ----------
    out_root
        The nightly output folder (holding ``catalogs/exposures/``, Hive by night).
    nights
        Nights to use; None: every night in the catalog.
    min_p_good
        Lowest ``p_good`` accepted.

    Returns
    -------
    pandas.DataFrame
        Columns ``night, exposure, detector, path, hdu``, sorted; exposure-level summary
        rows of mosaics (``detector == "ALL"``) are left out.

    Raises
    ------
    ValueError
        When there is no catalog.
    """
    import pyarrow.dataset as pads

    folder = paths.catalog_root(out_root, "exposures")
    if not folder.is_dir():
        raise ValueError(f"no exposures catalog under {folder}: run the nightly job first")
    ds = pads.dataset(str(folder), format="parquet", partitioning="hive")
    columns = REFERENCE_COLUMNS + ["quality_class", "status", "p_good"]
    df = ds.to_table(columns=columns).to_pandas()
    df["night"] = df["night"].astype(str)
    keep = ((df["quality_class"] == "good") & (df["status"] == "ok")
            & (df["p_good"] >= min_p_good) & (df["detector"] != "ALL"))
    if nights:
        keep &= df["night"].isin([str(n) for n in nights])
    out = df.loc[keep, REFERENCE_COLUMNS].sort_values(["night", "exposure", "detector"])
    return out.reset_index(drop=True)


def read_reference(path: str, hdu: int, io_cfg: IOConfig) -> tuple[np.ndarray, np.ndarray]:
    """Pixels and bad-pixel mask of one detector (``hdu``) of an exposure file."""
    from survey_qa.pipeline.io import read_detectors

    for det in read_detectors(path, io_cfg):
        if not isinstance(det, QualityError) and det.hdu == hdu:
            return det.data, det.mask
    raise QualityError(f"HDU {hdu} of {path} is not readable", hdu=hdu)


def prepare_frames(refs: pd.DataFrame, bin_factor: int, io_cfg: IOConfig,
                   params: aescore.ScoreParams | None = None) -> list[np.ndarray]:
    """Read, bin and normalise reference detectors; unreadable ones are skipped."""
    frames = []
    for row in refs.itertuples(index=False):
        try:
            data, mask = read_reference(row.path, int(row.hdu), io_cfg)
            binned, bmask = aescore.bin_frame(data, mask, bin_factor)
            frames.append(aescore.normalize_frame(binned, bmask, params)[0])
        except QualityError:
            continue
    return frames


# ---------------------------------------------------------------------------- datasets


class RandomPatchDataset(Dataset):
    """Random crops of normalised frames with random flips and 90-degree rotations.

    Item ``i`` is a crop of frame ``i // patches_per_frame``; positions and the dihedral
    transform come from torch's random generator (seeded per DataLoader worker).

    Parameters
    ----------
    frames
        Normalised binned frames, each at least ``patch_px`` on a side.
    patch_px
        Crop side.
    patches_per_frame
        Items per frame and epoch.
    """

    def __init__(self, frames: list[np.ndarray], patch_px: int, patches_per_frame: int):
        small = [f.shape for f in frames if min(f.shape) < patch_px]
        if small:
            raise ValueError(f"frames {small[:3]} are smaller than patch_px={patch_px}")
        self.frames = [torch.from_numpy(np.ascontiguousarray(f, dtype=np.float32))
                       for f in frames]
        self.patch_px = patch_px
        self.patches_per_frame = patches_per_frame

    def __len__(self) -> int:
        return len(self.frames) * self.patches_per_frame

    def __getitem__(self, i: int) -> torch.Tensor:
        frame = self.frames[i // self.patches_per_frame]
        p = self.patch_px
        y0 = int(torch.randint(0, frame.shape[0] - p + 1, ()))
        x0 = int(torch.randint(0, frame.shape[1] - p + 1, ()))
        patch = frame[y0:y0 + p, x0:x0 + p]
        k, flip = (int(v) for v in torch.randint(0, 4, (2,)))
        patch = torch.rot90(patch, k, dims=(0, 1))
        if flip % 2:
            patch = torch.flip(patch, dims=(1,))
        return patch.unsqueeze(0).contiguous()


class GridPatchDataset(Dataset):
    """Every patch of a regular grid over each frame, as scoring cuts them."""

    def __init__(self, frames: list[np.ndarray], patch_px: int):
        parts = [aescore.patchify(f, patch_px)[0] for f in frames]
        self.patches = torch.from_numpy(np.concatenate(parts) if parts else
                                        np.empty((0, 1, patch_px, patch_px), np.float32))

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.patches[i]


@dataclass
class ReferenceSplit:
    """Reference frames on each side of the split, with their normalised pixels."""

    train: pd.DataFrame
    val: pd.DataFrame
    train_frames: list[np.ndarray]
    val_frames: list[np.ndarray]


class PatchDataModule(L.LightningDataModule):
    """Reference patches from a nightly output folder, split by night and exposure.

    Parameters
    ----------
    out_root
        The nightly output folder (``catalogs/exposures/`` is read).
    nights
        Nights to draw references from; None: all.
    ae_cfg, train_cfg, io_cfg
        Configuration blocks (binning, patch size, reference selection; batch size,
        validation share, seed, workers; FITS reading).
    refs
        Reference rows to use instead of the catalog's (columns ``night, exposure,
        detector, path, hdu``).
    """

    def __init__(self, out_root: str | os.PathLike | None, nights: list[str] | None,
                 ae_cfg: AutoencoderConfig, train_cfg: TrainConfig, io_cfg: IOConfig,
                 refs: pd.DataFrame | None = None):
        super().__init__()
        if out_root is None and refs is None:
            raise ValueError("give out_root or refs")
        self.out_root, self.nights, self.refs = out_root, nights, refs
        self.ae_cfg, self.train_cfg, self.io_cfg = ae_cfg, train_cfg, io_cfg
        self.split: ReferenceSplit | None = None

    def references(self) -> pd.DataFrame:
        """The reference rows, at most ``max_reference_frames`` of them (seeded draw)."""
        refs = self.refs if self.refs is not None else find_reference_frames(
            self.out_root, self.nights, self.ae_cfg.reference_min_p_good)
        if len(refs) > self.ae_cfg.max_reference_frames:
            refs = refs.sample(self.ae_cfg.max_reference_frames,
                               random_state=self.train_cfg.seed).sort_index()
        return refs

    def setup(self, stage: str | None = None) -> None:
        if self.split is not None:
            return
        refs = self.references()
        if refs["exposure"].nunique() < 1:
            raise ValueError(
                "no reference frames: the catalog has no detector of class good with p_good "
                f">= {self.ae_cfg.reference_min_p_good} for these nights (lower "
                "autoencoder.reference_min_p_good, or measure the nights with --classifier "
                "rules, whose good frames are confident)")
        train_rows, val_rows = split_by_night_and_exposure(
            refs, self.train_cfg.val_fraction, self.train_cfg.seed, method=SPLIT_METHOD)
        train, val = refs.iloc[train_rows].copy(), refs.iloc[val_rows].copy()
        a = self.ae_cfg
        train_frames = prepare_frames(train, a.bin_factor, self.io_cfg)
        val_frames = prepare_frames(val, a.bin_factor, self.io_cfg)
        if not train_frames:
            raise ValueError("no readable training reference frame")
        self.split = ReferenceSplit(train, val, train_frames, val_frames)

    def train_dataloader(self) -> DataLoader:
        ds = RandomPatchDataset(self.split.train_frames, self.ae_cfg.patch_px,
                                self.ae_cfg.patches_per_frame)
        return DataLoader(ds, batch_size=self.train_cfg.batch_size, shuffle=True,
                          num_workers=self.train_cfg.num_workers, drop_last=False,
                          persistent_workers=self.train_cfg.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        if not self.split.val_frames:
            return []
        ds = GridPatchDataset(self.split.val_frames, self.ae_cfg.patch_px)
        return DataLoader(ds, batch_size=max(self.train_cfg.batch_size, 256),
                          num_workers=self.train_cfg.num_workers,
                          persistent_workers=self.train_cfg.num_workers > 0)


# ---------------------------------------------------------------------------- calibration

OUTLIER_MAD = 5.0
"""Reference frames whose 90th-percentile opened patch score lies more than this many
robust standard deviations above the median frame's are left out of the calibration."""


def reference_maps(model: torch.nn.Module, frames: list[np.ndarray], patch_px: int,
                   params: aescore.ScoreParams | None = None) -> list[np.ndarray]:
    """Score maps of the given normalised reference frames."""
    return [aescore.score_map(model, f, patch_px, params=params) for f in frames]


def calibrate(score_maps: list[np.ndarray], quantile: float, close_px: int,
              n_table: int = 501) -> dict:
    """Mask threshold and quantile table from the score maps of good reference frames.

    Each map is first opened (:func:`aescore.open_scores`) with the cleaning that
    :func:`aescore.make_mask` applies, so the threshold is the quantile of what survives
    cleaning: isolated bright stars do not set it. Good frames whose sky is far from
    typical (a nebula or a large galaxy fills part of them: good frames, but not clean
    sky) are left out by a robust outlier cut on each frame's 90th-percentile opened
    score (:data:`OUTLIER_MAD`). No value is tuned per dataset.

    Parameters
    ----------
    score_maps
        Patch score maps of good reference frames not used for training.
    quantile
        The quantile of the opened reference scores that becomes the mask threshold.
    close_px
        Cleaning radius (patches), as in :func:`aescore.make_mask`.
    n_table
        Entries of the stored quantile table, from 0.5 to 1.

    Returns
    -------
    dict
        ``threshold``, ``quantile``, ``close_px``, ``score_ref`` (median raw patch score
        of the kept frames), ``n_reference_frames``, ``n_outlier_frames``,
        ``n_reference_patches`` and ``reference_quantiles`` ({"quantile", "score"}).
    """
    if not score_maps:
        raise ValueError("no reference score maps to calibrate on")
    opened = [aescore.open_scores(m, close_px) for m in score_maps]
    p90 = np.array([np.quantile(o, 0.9) for o in opened])
    centre = float(np.median(p90))
    spread = 1.4826 * float(np.median(np.abs(p90 - centre)))
    keep = p90 <= centre + OUTLIER_MAD * max(spread, 1e-3 * abs(centre), 1e-12)
    scores = np.concatenate([o.ravel() for o, k in zip(opened, keep) if k])
    raw = np.concatenate([np.ravel(m) for m, k in zip(score_maps, keep) if k])
    scores, raw = scores[np.isfinite(scores)], raw[np.isfinite(raw)]
    median = float(np.median(raw))
    if not (math.isfinite(median) and median > 0):
        raise ValueError(f"median reference score {median} is not positive")
    q = np.linspace(0.5, 1.0, n_table)
    return {"threshold": float(np.quantile(scores, quantile)), "quantile": float(quantile),
            "close_px": int(close_px), "score_ref": median,
            "n_reference_frames": int(keep.sum()), "n_outlier_frames": int((~keep).sum()),
            "n_reference_patches": int(scores.size),
            "reference_quantiles": {"quantile": q.round(6).tolist(),
                                    "score": np.quantile(scores, q).tolist()}}
