"""Training and evaluation flows of the learned classifier (SOM + dual-input CNN).

Each function reads like a recipe and is what a CLI verb calls:

- :func:`train_som`: pool the star stamps of some nights, train the SOM, save it.
- :func:`train_classifier`: train the CNN with a Lightning Trainer (any accelerator,
  devices, nodes, strategy, precision from ``cfg.train``), checkpoints in
  ``cfg.train.checkpoint_dir`` (resumed from ``last.ckpt``), calibrate the temperature on
  the validation split, save ``.safetensors`` + JSON (rank 0 only).
- :func:`evaluate`: the CNN, the rule classifier and a feature-only gradient-boosting
  baseline side by side on nights never used in training, with a PNG.

A relative ``cfg.train.checkpoint_dir`` is taken relative to ``out_root``; the classifier
keeps its checkpoints in its own ``classifier/`` sub-folder there (CSV training logs in
``classifier_logs/``), and a new run resumes from ``classifier/last.ckpt``.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import survey_qa
from survey_qa.config import Config
from survey_qa.flows.train import RECIPE_ENV, checkpoint_dir
from survey_qa.models import evaluation
from survey_qa.models.classifier import (FEATURE_NAMES, ClassifierSystem, ExposureDataModule,
                                         Examples, class_weights, collect_logits,
                                         fit_temperature, load_classifier, load_examples,
                                         save_classifier, split_by_night_and_exposure,
                                         training_domain)
from survey_qa.models.components.classifier import DualInputClassifier
from survey_qa.models.som import SomModel
from survey_qa.models.som import train_som as fit_som
from survey_qa.pipeline.schema import CLASSES

SOM_FILE = "som.npz"
CLASSIFIER_FILE = "classifier.safetensors"


# ---------------------------------------------------------------------------- paths


def models_dir(out_root: str | Path) -> Path:
    """Where trained models go by default: ``<out_root>/models/``."""
    return Path(out_root) / "models"


def catalog_nights(out_root: str | Path) -> list[str]:
    """Every night with an exposure catalog under ``out_root``, sorted."""
    folder = Path(out_root) / "catalogs" / "exposures"
    return sorted(p.name.split("=", 1)[1] for p in folder.glob("night=*") if p.is_dir())


def _nights(out_root: str | Path, nights: list[str] | None) -> list[str]:
    nights = list(nights) if nights else catalog_nights(out_root)
    if not nights:
        raise ValueError(f"no nights to train on under {out_root}")
    return nights


# ---------------------------------------------------------------------------- SOM


def read_night_stamps(out_root: str | Path, night: str) -> np.ndarray:
    """Every stored star stamp of a night, ``(n, h, w)`` float32 (padding dropped)."""
    import xarray as xr

    ds = xr.open_zarr(Path(out_root) / "arrays" / f"{night}.zarr", consolidated=False)
    counts = ds["n_stamps"].values
    stamps = ds["stamps"].values
    return np.concatenate([stamps[i, :c] for i, c in enumerate(counts) if c > 0]
                          or [np.zeros((0, *stamps.shape[2:]), np.float32)]).astype(np.float32)


def train_som(cfg: Config, out_root: str | Path, nights: list[str] | None = None,
              output: str | Path | None = None) -> Path:
    """Train the SOM on the stamps of ``nights`` and save it.

    Parameters
    ----------
    cfg
        ``cfg.som`` gives the map settings, ``cfg.train.seed`` the seed.
    out_root
        Output root of the nightly runs (``arrays/<night>.zarr``).
    nights
        Nights to pool; None: every night in the catalog.
    output
        ``.npz`` target; None: ``<out_root>/models/som.npz``.

    Returns
    -------
    Path
        The saved map.
    """
    nights = _nights(out_root, nights)
    stamps = np.concatenate([read_night_stamps(out_root, n) for n in nights])
    s = cfg.som
    t0 = time.perf_counter()
    som = fit_som(stamps, (s.grid_nodes, s.grid_nodes), sigma=s.sigma_nodes,
                  learning_rate=s.learning_rate,
                  n_iterations=s.passes * min(len(stamps), s.max_stamps),
                  augment=s.augment, max_stamps=s.max_stamps, seed=cfg.train.seed)
    som.info.update(nights=nights, train_s=time.perf_counter() - t0)
    return som.save(output or models_dir(out_root) / SOM_FILE)


# ---------------------------------------------------------------------------- CNN


def train_classifier(cfg: Config, out_root: str | Path, nights: list[str] | None,
                     truth_root: str | Path, *, som_path: str | Path | None = None,
                     output: str | Path | None = None, callbacks: list | None = None
                     ) -> Path | None:
    """Train the dual-input classifier on labelled nights and save calibrated weights.

    Parameters
    ----------
    cfg
        ``cfg.train``: Trainer options (accelerator, devices, num_nodes, strategy,
        precision, max_epochs), batch size, learning rate, seed, validation share and
        checkpoint folder; ``cfg.classify``: the limits the features are expressed in.
    out_root
        Output root of the nightly runs of the training nights.
    nights
        Training nights; None: every night in the catalog.
    truth_root
        Raw root holding ``<night>/_truth/truth.parquet``.
    som_path
        The SOM (``.npz``); None: ``<out_root>/models/som.npz``.
    output
        Weights target (``.safetensors``; JSON next to it); None:
        ``<out_root>/models/classifier.safetensors``.
    callbacks
        Extra Lightning callbacks.

    Returns
    -------
    Path or None
        The weights file, written by global rank 0 only; None on the other ranks of a
        distributed run.
    """
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    t0 = time.perf_counter()
    nights = _nights(out_root, nights)
    output = Path(output or models_dir(out_root) / CLASSIFIER_FILE)
    tc = cfg.train
    L.seed_everything(tc.seed, workers=True, verbose=False)
    som = SomModel.load(som_path or models_dir(out_root) / SOM_FILE)
    dm = ExposureDataModule(out_root, nights, truth_root, som, cfg.classify,
                            batch_size=tc.batch_size, num_workers=tc.num_workers,
                            val_fraction=tc.val_fraction, seed=tc.seed)
    dm.setup("fit")
    net = build_network(som, dm)
    system = ClassifierSystem(net, learning_rate=tc.learning_rate,
                              class_weights=class_weights(dm.class_counts))
    ckpt_dir = checkpoint_dir(cfg, out_root, "classifier")
    has_val = len(dm.val) > 0
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="classifier-{epoch:03d}",
                                 monitor="val_loss" if has_val else None, mode="min",
                                 save_top_k=1, save_last=True)
    trainer = L.Trainer(accelerator=tc.accelerator, devices=tc.devices,
                        num_nodes=tc.num_nodes, strategy=tc.strategy,
                        precision=tc.precision, max_epochs=tc.max_epochs,
                        callbacks=[checkpoint, *(callbacks or [])],
                        logger=CSVLogger(ckpt_dir.parent, name="classifier_logs"),
                        default_root_dir=ckpt_dir,
                        limit_val_batches=1.0 if has_val else 0, enable_progress_bar=False,
                        enable_model_summary=False,
                        log_every_n_steps=max(1, min(10, len(dm.train) // (
                            tc.batch_size * tc.devices * tc.num_nodes))))
    last = ckpt_dir / "last.ckpt"
    with warnings.catch_warnings():
        if last.exists():  # resuming: the folder holds our own checkpoints
            warnings.filterwarnings("ignore", "Checkpoint directory .* not empty")
        trainer.fit(system, datamodule=dm, ckpt_path=str(last) if last.exists() else None)
    if not trainer.is_global_zero:
        return None
    if has_val and checkpoint.best_model_path:  # the epoch with the lowest val_loss
        best = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
        system.load_state_dict(best["state_dict"])
    net = system.net.cpu().float()
    calib = calibrate(net, dm) if has_val else {"temperature": 1.0}
    domain, domain_stats = training_domain(dm.train.table)
    info = {"training": {
        "nights": nights, "n_train": len(dm.train), "n_val": len(dm.val),
        "class_counts_train": dict(zip(CLASSES, dm.class_counts.tolist())),
        "epochs": trainer.current_epoch, "train_s": time.perf_counter() - t0,
        "seed": tc.seed, "val_fraction": tc.val_fraction, "accelerator": tc.accelerator,
        "devices": tc.devices, "num_nodes": tc.num_nodes, "strategy": tc.strategy,
        "precision": tc.precision,
        "best_checkpoint": Path(checkpoint.best_model_path).name or None,
        "classify_limits": {"seeing_limit_arcsec": cfg.classify.seeing_limit_arcsec,
                            "seeing_limit_px": cfg.classify.seeing_limit_px},
        **calib},
        "domain": domain, "domain_stats": domain_stats,
        "recipe": os.environ.get(RECIPE_ENV, "").strip(),
        "pipeline_version": survey_qa.__version__}
    return save_classifier(net, output, som, info=info)


def build_network(som: SomModel, dm: ExposureDataModule) -> DualInputClassifier:
    """A fresh network holding the SOM prototypes and the training-split standardisation."""
    net = DualInputClassifier(grid=som.grid, stamp_shape=som.stamp_shape,
                              n_features=len(FEATURE_NAMES), n_classes=len(CLASSES))
    net.prototype_branch.set_prototypes(som.prototypes())
    net.feature_branch.set_standardisation(dm.feature_mean, dm.feature_std)
    return net


def calibrate(net: DualInputClassifier, dm: ExposureDataModule) -> dict:
    """Fit the temperature on the validation split; return it with before/after NLL."""
    import torch

    logits, labels = collect_logits(net, dm.val_dataloader())
    nll = torch.nn.functional.cross_entropy
    before = float(nll(logits, labels))
    temperature = fit_temperature(logits, labels)
    net.temperature.fill_(temperature)
    return {"temperature": temperature, "val_nll_before": before,
            "val_nll_after": float(nll(logits / temperature, labels)),
            "val_accuracy": float((logits.argmax(1) == labels).float().mean())}


# ---------------------------------------------------------------------------- evaluation


@dataclass
class EvaluationReport:
    """The three classifiers scored on the same labelled detectors."""

    nights: list[str]
    scores: list[evaluation.ClassifierScores]
    measured_scores: list[evaluation.ClassifierScores]
    n_ambiguous_excluded: int
    figure: Path | None
    model_version: str

    def text(self) -> str:
        head = (f"evaluation on {len(self.nights)} night(s) {', '.join(self.nights)}: "
                f"{self.scores[0].n if self.scores else 0} labelled detectors "
                f"({self.n_ambiguous_excluded} ambiguous left out); model {self.model_version}")
        measured = ["\ndetectors with a PSF measurement (fwhm_px finite) only:",
                    evaluation.format_scores(self.measured_scores)]
        tail = [f"figure: {self.figure}"] if self.figure else []
        return "\n".join([head, evaluation.format_scores(self.scores), *measured, *tail])


def evaluate(cfg: Config, out_root: str | Path, truth_root: str | Path, nights: list[str],
             *, weights: str | Path | None = None, train_nights: list[str] | None = None,
             train_out_root: str | Path | None = None, train_truth_root: str | Path | None = None,
             report_dir: str | Path | None = None) -> EvaluationReport:
    """Score the CNN, the rule classifier and gradient boosting on labelled nights.

    Parameters
    ----------
    cfg
        ``cfg.classify`` for the rule classifier and the features; ``cfg.train`` gives
        the seed and validation share of the baseline's training split.
    out_root, truth_root, nights
        Nightly outputs, raw root with ``_truth/``, and the nights to score (they must
        not be training nights; a ``ValueError`` says so when they are).
    weights
        Classifier weights; None: the packaged ones.
    train_nights, train_out_root, train_truth_root
        Where the baseline is trained (the CNN's training split of these nights); default:
        the nights recorded in the weights, under ``out_root`` and ``truth_root``.
    report_dir
        Where ``evaluation.json`` and ``evaluation.png`` go; None: ``<out_root>/evaluation``.
    """
    from survey_qa.pipeline.classify import classify_rules

    clf = load_classifier(weights, cfg.classify)
    if clf is None:
        raise ValueError("no classifier weights to evaluate (train one or pass weights=)")
    train_nights = list(train_nights or clf.meta.get("training", {}).get("nights", []))
    overlap = sorted(set(train_nights) & set(nights))
    if overlap and (train_out_root is None or Path(train_out_root) == Path(out_root)):
        raise ValueError(f"nights {overlap} were used in training")
    test = load_examples(out_root, nights, truth_root, clf.som, cfg.classify)
    ambiguous = test.table["ambiguous"].to_numpy()
    test = test.subset(np.flatnonzero(~ambiguous))
    y = test.table["label"].to_numpy()
    rows = test.table.to_dict("records")
    conf = test.table["confounders"].tolist()
    probas, preds, names = [], [], []

    p_cnn = clf.probabilities(rows, test.occupancy(clf.som.grid))
    probas.append(p_cnn), preds.append(p_cnn.argmax(1)), names.append("cnn")
    rules = [classify_rules(r, cfg.classify) for r in rows]
    probas.append(np.array([[r.probabilities[c] for c in CLASSES] for r in rules]))
    preds.append(np.array([CLASSES.index(r.quality_class) for r in rules])), names.append("rules")
    if train_nights:
        train = _baseline_split(cfg, train_out_root or out_root, train_nights,
                                train_truth_root or truth_root, clf)
        gb = evaluation.train_gradient_boosting(train.features, train.table["label"],
                                                seed=cfg.train.seed)
        p_gb = gb.proba(test.features)
        probas.append(p_gb), preds.append(p_gb.argmax(1)), names.append("gboost")

    scores = [evaluation.score_predictions(n, y, p, conf, y_pred=yp)
              for n, p, yp in zip(names, probas, preds)]
    ok = np.isfinite(test.table["fwhm_px"].to_numpy(dtype=np.float64))
    measured = [evaluation.score_predictions(n, y[ok], p[ok], list(np.array(conf)[ok]),
                                             y_pred=yp[ok])
                for n, p, yp in zip(names, probas, preds)]
    report_dir = Path(report_dir or Path(out_root) / "evaluation")
    figure = evaluation.plot_evaluation(scores, y, probas, report_dir / "evaluation.png")
    report = EvaluationReport(nights=list(nights), scores=scores, measured_scores=measured,
                              n_ambiguous_excluded=int(ambiguous.sum()), figure=figure,
                              model_version=clf.version)
    (report_dir / "evaluation.json").write_text(json.dumps(
        {"nights": list(nights), "model_version": clf.version,
         "n_ambiguous_excluded": report.n_ambiguous_excluded,
         "scores": [s.to_dict() for s in scores],
         "scores_psf_measured": [s.to_dict() for s in measured]},
        indent=1, default=_nan_none))
    return report


def _nan_none(value):
    return None if isinstance(value, float) and math.isnan(value) else str(value)


def _baseline_split(cfg: Config, out_root: str | Path, nights: list[str],
                    truth_root: str | Path, clf) -> Examples:
    """The training split of the CNN's training nights (same split, share and seed)."""
    ex = load_examples(out_root, nights, truth_root, clf.som, cfg.classify)
    ex = ex.subset(np.flatnonzero(~ex.table["ambiguous"].to_numpy()))
    recorded = clf.meta.get("training", {})
    train_idx, _ = split_by_night_and_exposure(
        ex.table, recorded.get("val_fraction", cfg.train.val_fraction),
        recorded.get("seed", cfg.train.seed))
    return ex.subset(train_idx)
