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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import survey_qa
from survey_qa import paths
from survey_qa.atomic import write_text
from survey_qa.config import Config
from survey_qa.models import evaluation
from survey_qa.models.classifier_data import (SPLIT_METHOD, Examples, ExposureDataModule,
                                              load_examples, read_night_stamps)
from survey_qa.models.classifier_features import training_domain
from survey_qa.models.classifier_inference import load_classifier
from survey_qa.models.classifier_system import (ClassifierSystem, build_network,
                                                calibrate_temperature, class_weights)
from survey_qa.models.som import train_som as fit_som
from survey_qa.models.splits import split_by_night_and_exposure
from survey_qa.models.trainer import (best_checkpoint, checkpoint_dir, fit_resuming,
                                      make_trainer, recipe)
from survey_qa.models.weights import (CLASSIFIER_FILE, load_checkpoint_state, load_som,
                                      save_classifier, save_som)
from survey_qa.pipeline.schema import CLASSES

SOM_FILE = "som.npz"
"""The SOM's file name in the models folder (:func:`survey_qa.paths.models_dir`)."""


def _nights(out_root: str | Path, nights: list[str] | None) -> list[str]:
    nights = list(nights) if nights else paths.catalog_nights(out_root)
    if not nights:
        raise ValueError(f"no nights to train on under {out_root}")
    return nights


# ---------------------------------------------------------------------------- SOM


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
    return save_som(som, output or paths.models_dir(out_root) / SOM_FILE)


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

    t0 = time.perf_counter()
    nights = _nights(out_root, nights)
    output = Path(output or paths.models_dir(out_root) / CLASSIFIER_FILE)
    tc = cfg.train
    L.seed_everything(tc.seed, workers=True, verbose=False)
    som = load_som(som_path or paths.models_dir(out_root) / SOM_FILE)
    dm = ExposureDataModule(out_root, nights, truth_root, som, cfg.classify,
                            batch_size=tc.batch_size, num_workers=tc.num_workers,
                            val_fraction=tc.val_fraction, seed=tc.seed)
    dm.setup("fit")
    net = build_network(som, dm.feature_mean, dm.feature_std)
    system = ClassifierSystem(net, learning_rate=tc.learning_rate,
                              class_weights=class_weights(dm.class_counts))
    ckpt_dir = checkpoint_dir(cfg, out_root, "classifier")
    has_val = len(dm.val) > 0
    trainer = make_trainer(cfg, ckpt_dir, has_validation=has_val, callbacks=callbacks,
                           train_batches=len(dm.train) // (tc.batch_size * tc.devices
                                                           * tc.num_nodes),
                           sanity_val_steps=2, progress_bar=False)
    fit_resuming(trainer, system, dm, ckpt_dir)
    if not trainer.is_global_zero:
        return None
    best = best_checkpoint(trainer)
    if has_val and best is not None:  # the epoch with the lowest val_loss
        system.load_state_dict(load_checkpoint_state(best))
    net = system.net.cpu().float()
    calib = calibrate_temperature(net, dm.val_dataloader()) if has_val else {"temperature": 1.0}
    domain, domain_stats = training_domain(dm.train.table)
    info = {"training": {
        "nights": nights, "n_train": len(dm.train), "n_val": len(dm.val),
        "class_counts_train": dict(zip(CLASSES, dm.class_counts.tolist())),
        "epochs": trainer.current_epoch, "train_s": time.perf_counter() - t0,
        "seed": tc.seed, "val_fraction": tc.val_fraction, "accelerator": tc.accelerator,
        "devices": tc.devices, "num_nodes": tc.num_nodes, "strategy": tc.strategy,
        "precision": tc.precision,
        "best_checkpoint": best.name if best is not None else None,
        "classify_limits": {"seeing_limit_arcsec": cfg.classify.seeing_limit_arcsec,
                            "seeing_limit_px": cfg.classify.seeing_limit_px},
        **calib},
        "domain": domain, "domain_stats": domain_stats,
        "recipe": recipe(),
        "pipeline_version": survey_qa.__version__}
    return save_classifier(net, output, som, info=info)


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
    rows = test.table.to_dict("records")
    p_cnn = clf.probabilities(rows, test.occupancy(clf.som.grid))
    predictions = {"cnn": (p_cnn, p_cnn.argmax(1)),
                   "rules": evaluation.rule_predictions(rows, cfg.classify)}
    if train_nights:
        train = _baseline_split(cfg, train_out_root or out_root, train_nights,
                                train_truth_root or truth_root, clf)
        gb = evaluation.train_gradient_boosting(train.features, train.table["label"],
                                                seed=cfg.train.seed)
        p_gb = gb.proba(test.features)
        predictions["gboost"] = (p_gb, p_gb.argmax(1))
    scores, measured = evaluation.score_classifiers(test.table, predictions)
    report_dir = Path(report_dir or paths.evaluation_dir(out_root))
    figure = evaluation.plot_evaluation(scores, test.table["label"].to_numpy(),
                                        [p for p, _ in predictions.values()],
                                        report_dir / "evaluation.png")
    report = EvaluationReport(nights=list(nights), scores=scores, measured_scores=measured,
                              n_ambiguous_excluded=int(ambiguous.sum()), figure=figure,
                              model_version=clf.version)
    write_text(report_dir / "evaluation.json", json.dumps(
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
        recorded.get("seed", cfg.train.seed), method=SPLIT_METHOD)
    return ex.subset(train_idx)
