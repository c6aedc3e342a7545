"""Training flows: the patch autoencoder.

``train_autoencoder`` reads like a recipe: find reference frames in the catalog, train
with Lightning (any accelerator, devices, nodes and strategy that ``cfg.train`` names;
it resumes from ``last.ckpt``), score the held-out reference patches, take the mask
threshold as a quantile of those scores, and write the weights with their metadata
(rank 0 only under DDP).
"""
from __future__ import annotations

import os
import shlex
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

import survey_qa
from survey_qa.config import Config
from survey_qa.models.autoencoder import (AutoencoderSystem, PatchDataModule, calibrate,
                                          reference_maps)
from survey_qa.models.components.autoencoder import AutoencoderArch, ConvAutoencoder
from survey_qa.models.weights import packaged_weights, save_weights
from survey_qa.pipeline import aescore

RECIPE_ENV = "SURVEY_QA_TRAIN_RECIPE"
"""When set (by ``models/train_shipped.sh``), recorded in the weights' metadata as the
command sequence that produced them."""

# Lightning performance hints that do not apply to small CPU runs.
_QUIET = (r".*does not have many workers.*", r".*The number of training batches.*",
          r".*Checkpoint directory .* exists and is not empty.*",
          r".*GPU available but not used.*", r".*on_epoch=True.*sync_dist.*",
          r".*You defined a `validation_step` but have no `val_dataloader`.*",
          r".*Total length of .* across ranks is zero.*",
          r".*The `srun` command is available on your system but is not used.*",
          r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")  # lightning 2.6, torch 2.13


def _command_line() -> str:
    """The command that runs this training, as a user would type it."""
    program = Path(sys.argv[0]).name
    if program in ("cli.py", "__main__.py", "survey-qa"):
        program = "survey-qa"
    return shlex.join([program, *sys.argv[1:]])


def checkpoint_dir(cfg: Config, out_root: str | os.PathLike, model: str) -> Path:
    """``cfg.train.checkpoint_dir/<model>``, relative paths under ``out_root``."""
    base = Path(cfg.train.checkpoint_dir)
    if not base.is_absolute():
        base = Path(out_root) / base
    return base / model


def make_trainer(cfg: Config, ckpt_dir: Path, has_validation: bool) -> L.Trainer:
    """A Lightning Trainer with the options of ``cfg.train`` and a last/best checkpoint."""
    t = cfg.train
    checkpoint = ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=1,
                                 monitor="val_loss" if has_validation else None)
    return L.Trainer(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
                     strategy=t.strategy, precision=t.precision, max_epochs=t.max_epochs,
                     callbacks=[checkpoint], logger=CSVLogger(str(ckpt_dir), name="logs"),
                     enable_progress_bar=cfg.run.progress, enable_model_summary=False,
                     default_root_dir=str(ckpt_dir), log_every_n_steps=10,
                     num_sanity_val_steps=0)


def train_autoencoder(cfg: Config, out_root: str | os.PathLike,
                      nights: list[str] | None = None, *,
                      output: str | os.PathLike | None = None) -> Path | None:
    """Train the patch autoencoder on a nightly output's good frames and write weights.

    Parameters
    ----------
    cfg
        Configuration: ``cfg.autoencoder`` (binning, patches, references, threshold
        quantile), ``cfg.train`` (Trainer options, batch, seed, validation share),
        ``cfg.io`` (reading frames).
    out_root
        Nightly output folder whose ``catalogs/exposures/`` names the frames.
    nights
        Nights to train on; None: every night in the catalog.
    output
        Weights path (``.safetensors``); None: the packaged weights.

    Returns
    -------
    pathlib.Path or None
        The weights written, on global rank 0; None on the other ranks.
    """
    a, t = cfg.autoencoder, cfg.train
    L.seed_everything(t.seed, workers=True, verbose=False)
    model = ConvAutoencoder(AutoencoderArch(base_channels=a.base_channels,
                                            latent_channels=a.latent_channels))
    model.check_patch_px(a.patch_px)
    params = aescore.ScoreParams()
    if a.patch_px % params.cell_px:
        raise ValueError(f"autoencoder.patch_px={a.patch_px} must be a multiple of the "
                         f"score cell ({params.cell_px} binned pixels)")
    data = PatchDataModule(out_root, nights, a, t, cfg.io)
    data.setup("fit")
    system = AutoencoderSystem(model, learning_rate=t.learning_rate, cell_px=params.cell_px)
    ckpt_dir = checkpoint_dir(cfg, out_root, "autoencoder")
    last = ckpt_dir / "last.ckpt"
    t_start = time.perf_counter()
    with warnings.catch_warnings():
        for pattern in _QUIET:
            warnings.filterwarnings("ignore", message=pattern)
        trainer = make_trainer(cfg, ckpt_dir, bool(data.split.val_frames))
        trainer.fit(system, datamodule=data, ckpt_path=str(last) if last.is_file() else None)
    train_s = time.perf_counter() - t_start
    if not trainer.is_global_zero:
        return None

    split = data.split
    held_out = bool(split.val_frames)
    frames = split.val_frames if held_out else split.train_frames
    maps = reference_maps(model.eval(), frames, a.patch_px, params)
    metadata = calibrate(maps, a.threshold_quantile, a.close_px)
    metadata.update(
        bin_factor=a.bin_factor, patch_px=a.patch_px, score_params=params.to_dict(),
        calibrated_on="validation" if held_out else "training (no held-out exposure)",
        training_data={
            "out_root": str(Path(out_root).resolve()),
            "nights": sorted(set(split.train["night"]) | set(split.val["night"])),
            "train_nights": sorted(set(split.train["night"])),
            "val_nights": sorted(set(split.val["night"])),
            "n_train_frames": len(split.train_frames), "n_val_frames": len(split.val_frames),
            "n_train_exposures": int(split.train["exposure"].nunique()),
            "n_val_exposures": int(split.val["exposure"].nunique()),
            "reference_min_p_good": a.reference_min_p_good,
            "patches_per_frame": a.patches_per_frame},
        training={"max_epochs": t.max_epochs, "epochs_run": int(trainer.current_epoch),
                  "batch_size": t.batch_size, "learning_rate": t.learning_rate,
                  "seed": t.seed, "devices": t.devices, "num_nodes": t.num_nodes,
                  "strategy": t.strategy, "precision": t.precision,
                  "accelerator": t.accelerator, "train_s": round(train_s, 1)},
        command=_command_line(),
        recipe=os.environ.get(RECIPE_ENV, "").strip(),
        pipeline_version=survey_qa.__version__,
        trained_at=datetime.now(timezone.utc).replace(microsecond=0).isoformat())
    return save_weights(model, output or packaged_weights(), metadata)
