"""The learned classifier at inference: one exposure row at a time, in the nightly run.

:func:`load_classifier` reads trained weights (:func:`survey_qa.models.weights.read_classifier`)
into a :class:`LearnedClassifier`, which gives calibrated class probabilities and decides a
row through :func:`survey_qa.pipeline.decide.classify_row` (the rules decide outside the
training domain or where no star was measured). :func:`shared_classifier` reads the
weights once per process.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from survey_qa.config import ClassifyConfig
from survey_qa.models import weights
from survey_qa.models.classifier_features import feature_vector
from survey_qa.models.components.classifier import DualInputClassifier
from survey_qa.models.som import SomModel
from survey_qa.pipeline.decide import classify_row


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
    return weights.packaged_weights(weights.CLASSIFIER_FILE)


def load_classifier(path: str | Path | None = None,
                    classify_cfg: ClassifyConfig | None = None) -> LearnedClassifier | None:
    """Load a trained classifier.

    Parameters
    ----------
    path
        A ``.safetensors`` file written by :func:`survey_qa.models.weights.save_classifier`
        (its ``.json`` sidecar next to it); None: the packaged weights.
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
    if path is None:
        path = default_weights_path()
        if not (path.exists() and weights.metadata_path(path).exists()):
            return None
    net, som, meta, version = weights.read_classifier(path)
    return LearnedClassifier(net=net, som=som, meta=meta, version=version,
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
