"""The Lightning Trainer every model trains with, its checkpoints and its provenance.

:func:`make_trainer` builds the Trainer from ``cfg.train`` (accelerator, devices, nodes,
strategy, precision, epochs) with a last/best :class:`ModelCheckpoint` and a CSV log;
:func:`fit_resuming` runs it, resuming from ``last.ckpt`` when a previous run left one.
Each model keeps its checkpoints in its own folder (:func:`checkpoint_dir`) and its CSV
logs beside it in ``<model>_logs/``.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from survey_qa import paths
from survey_qa.config import Config

RECIPE_ENV = "SURVEY_QA_TRAIN_RECIPE"
"""When set (by the ``models/train_*.sh`` scripts), recorded in the weights' metadata as
the command sequence that produced them."""

QUIET_WARNINGS = (
    r".*does not have many workers.*", r".*The number of training batches.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*GPU available but not used.*", r".*on_epoch=True.*sync_dist.*",
    r".*You defined a `validation_step` but have no `val_dataloader`.*",
    r".*Total length of .* across ranks is zero.*",
    r".*The `srun` command is available on your system but is not used.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")  # lightning 2.6, torch 2.13
"""Lightning performance hints that do not apply to small CPU runs, and the note that a
resumed run's checkpoint folder holds the previous run's files."""


def checkpoint_dir(cfg: Config, out_root: str | os.PathLike, model: str) -> Path:
    """``cfg.train.checkpoint_dir/<model>``, a relative ``checkpoint_dir`` under ``out_root``
    (:func:`survey_qa.paths.checkpoint_dir`)."""
    return paths.checkpoint_dir(out_root, cfg.train.checkpoint_dir, model)


def make_trainer(cfg: Config, ckpt_dir: Path, *, has_validation: bool,
                 callbacks: list[Callback] | None = None, train_batches: int | None = None,
                 sanity_val_steps: int = 0, progress_bar: bool | None = None) -> L.Trainer:
    """A Lightning Trainer with the options of ``cfg.train`` and a last/best checkpoint.

    Parameters
    ----------
    cfg
        ``cfg.train`` gives the Trainer options; ``cfg.run.progress`` the progress bar.
    ckpt_dir
        The model's checkpoint folder (:func:`checkpoint_dir`): checkpoints
        ``<model>-epoch=NNN.ckpt`` and ``last.ckpt``; the CSV log goes to
        ``<model>_logs/`` beside it.
    has_validation
        Whether there is a validation split: the best checkpoint is then the one with the
        lowest ``val_loss``; without one, validation is off.
    callbacks
        Extra callbacks, after the checkpoint callback.
    train_batches
        Training batches per epoch and process, when known: the logging interval is
        kept at or below it (at most 10 steps).
    sanity_val_steps
        Validation batches run before training (Lightning's ``num_sanity_val_steps``).
    progress_bar
        Show a progress bar; None: ``cfg.run.progress``.
    """
    t = cfg.train
    model = Path(ckpt_dir).name
    checkpoint = ModelCheckpoint(dirpath=str(ckpt_dir), filename=f"{model}-{{epoch:03d}}",
                                 monitor="val_loss" if has_validation else None, mode="min",
                                 save_top_k=1, save_last=True)
    log_every = 10 if train_batches is None else max(1, min(10, train_batches))
    with quiet_lightning():
        return L.Trainer(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
                         strategy=t.strategy, precision=t.precision, max_epochs=t.max_epochs,
                         callbacks=[checkpoint, *(callbacks or [])],
                         logger=CSVLogger(str(Path(ckpt_dir).parent), name=f"{model}_logs"),
                         default_root_dir=str(ckpt_dir),
                         limit_val_batches=1.0 if has_validation else 0,
                         num_sanity_val_steps=sanity_val_steps,
                         enable_progress_bar=cfg.run.progress if progress_bar is None
                         else progress_bar,
                         enable_model_summary=False, log_every_n_steps=log_every)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Ignore the :data:`QUIET_WARNINGS` inside the block."""
    with warnings.catch_warnings():
        for pattern in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        yield


def fit_resuming(trainer: L.Trainer, system: L.LightningModule,
                 datamodule: L.LightningDataModule, ckpt_dir: Path) -> None:
    """``trainer.fit``, resumed from ``<ckpt_dir>/last.ckpt`` when it exists."""
    last = Path(ckpt_dir) / "last.ckpt"
    with quiet_lightning():
        trainer.fit(system, datamodule=datamodule,
                    ckpt_path=str(last) if last.is_file() else None)


def best_checkpoint(trainer: L.Trainer) -> Path | None:
    """The checkpoint with the lowest ``val_loss`` of a finished fit, or None."""
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    return Path(best) if best else None


def command_line() -> str:
    """The command that runs this training, as a user would type it."""
    program = Path(sys.argv[0]).name
    if program in ("cli.py", "__main__.py", "survey-qa"):
        program = "survey-qa"
    return shlex.join([program, *sys.argv[1:]])


def recipe() -> str:
    """The command sequence named by :data:`RECIPE_ENV`, or ''."""
    return os.environ.get(RECIPE_ENV, "").strip()
