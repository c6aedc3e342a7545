"""Training flows: the patch autoencoder.

``train_autoencoder`` reads like a recipe: find reference frames in the catalog, train
with Lightning (any accelerator, devices, nodes and strategy that ``cfg.train`` names;
it resumes from ``last.ckpt``), score the held-out reference patches, take the mask
threshold as a quantile of those scores, and write the weights with their metadata
(rank 0 only under DDP).
"""
from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path

import lightning as L

import survey_qa
from survey_qa.config import Config
from survey_qa.models.autoencoder import (AutoencoderSystem, PatchDataModule, calibrate,
                                          reference_maps)
from survey_qa.models.components.autoencoder import AutoencoderArch, ConvAutoencoder
from survey_qa.models.trainer import (checkpoint_dir, command_line, fit_resuming,
                                      make_trainer, recipe)
from survey_qa.models.weights import AUTOENCODER_FILE, packaged_weights, save_autoencoder
from survey_qa.pipeline import aescore


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
    t_start = time.perf_counter()
    trainer = make_trainer(cfg, ckpt_dir, has_validation=bool(data.split.val_frames))
    fit_resuming(trainer, system, data, ckpt_dir)
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
        command=command_line(), recipe=recipe(),
        pipeline_version=survey_qa.__version__,
        trained_at=datetime.now(timezone.utc).replace(microsecond=0).isoformat())
    return save_autoencoder(model, output or packaged_weights(AUTOENCODER_FILE), metadata)
