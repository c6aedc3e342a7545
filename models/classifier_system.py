"""The learned classifier's training: the Lightning system and temperature calibration.

:func:`build_network` makes a fresh :class:`DualInputClassifier` holding the SOM
prototypes and the training split's feature standardisation; :class:`ClassifierSystem`
trains it with (class-weighted) cross-entropy; :func:`calibrate_temperature` then fits
the softmax temperature on the validation split (:func:`fit_temperature`).
"""
from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from survey_qa.models.classifier_features import FEATURE_NAMES
from survey_qa.models.components.classifier import DualInputClassifier
from survey_qa.models.som import SomModel
from survey_qa.pipeline.schema import CLASSES


def build_network(som: SomModel, feature_mean: np.ndarray,
                  feature_std: np.ndarray) -> DualInputClassifier:
    """A fresh network holding the SOM prototypes and the given feature standardisation.

    Parameters
    ----------
    som
        The trained SOM (its grid, stamp shape and prototypes).
    feature_mean, feature_std
        Standardisation constants of the training split
        (:func:`survey_qa.models.classifier_features.standardisation`).
    """
    net = DualInputClassifier(grid=som.grid, stamp_shape=som.stamp_shape,
                              n_features=len(FEATURE_NAMES), n_classes=len(CLASSES))
    net.prototype_branch.set_prototypes(som.prototypes())
    net.feature_branch.set_standardisation(feature_mean, feature_std)
    return net


def class_weights(counts: np.ndarray) -> list[float]:
    """Inverse square-root frequency weights, mean 1 over the classes present."""
    counts = np.asarray(counts, dtype=np.float64)
    w = np.where(counts > 0, 1.0 / np.sqrt(np.maximum(counts, 1.0)), 0.0)
    return (w / w[counts > 0].mean()).tolist() if (counts > 0).any() else [1.0] * len(counts)


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


def calibrate_temperature(net: DualInputClassifier, loader: DataLoader) -> dict:
    """Fit the temperature on ``loader`` (the validation split) and set it in ``net``.

    Returns
    -------
    dict
        ``temperature``, ``val_nll_before`` and ``val_nll_after`` (cross-entropy without
        and with it) and ``val_accuracy``.
    """
    logits, labels = collect_logits(net, loader)
    nll = nn.functional.cross_entropy
    before = float(nll(logits, labels))
    temperature = fit_temperature(logits, labels)
    net.temperature.fill_(temperature)
    return {"temperature": temperature, "val_nll_before": before,
            "val_nll_after": float(nll(logits / temperature, labels)),
            "val_accuracy": float((logits.argmax(1) == labels).float().mean())}
