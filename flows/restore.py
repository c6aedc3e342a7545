"""The restoration network on a field's registered frames: an opt-in product beside the stack.

``survey-qa stack`` registers, scales and combines the chosen frames of a field
(:mod:`survey_qa.flows.stack`). :func:`restore_frames` takes the same registered, scaled
frames and their quality weights, keeps the reference and the best-weighted others up to
the network's K, combines those K as the stack does and returns the network's image of
them (:func:`survey_qa.models.restoration.restore`) with the stack of the same K frames.

The network is trained on simulated sequences only (``models/train_restoration.sh``); on
held-out simulated nights it beats the quality-weighted stack on PSNR, SSIM, star flux
error and false sources (``bench/restoration.py``), but it smooths away the faintest
sources and has not been checked on real nights: the stack stays the default product.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from survey_qa.models import restoration as R
from survey_qa.models.weights import load_restoration


@dataclass
class Restored:
    """The network's image and what it was made from.

    Attributes
    ----------
    image
        The restored image (float32, ADU of the reference, sky subtracted; NaN where no
        frame covers a pixel).
    stack
        The quality-weighted, clipped stack of the same frames.
    frames
        Indices (into the frames given) of the K frames used, best weight first.
    weights_sha256
        Checksum of the network's weights.
    """

    image: np.ndarray
    stack: np.ndarray
    frames: np.ndarray
    weights_sha256: str


def choose_k(weights: np.ndarray, reference: int, k: int) -> np.ndarray:
    """The reference and the ``k - 1`` best-weighted other frames with a positive weight.

    Raises ``ValueError`` when fewer than ``k`` frames have a positive weight.
    """
    w = np.asarray(weights, float)
    others = [i for i in np.argsort(-w, kind="stable") if i != reference and w[i] > 0]
    if w[reference] <= 0 or len(others) < k - 1:
        raise ValueError(f"the network combines {k} frames; only {int((w > 0).sum())} "
                         "have a weight")
    return np.array([reference, *others[:k - 1]], dtype=int)


def restore_frames(frames: np.ndarray, masks: np.ndarray, weights: np.ndarray,
                   noise_adu: np.ndarray, poisson_adu: np.ndarray, reference: int,
                   weights_path: str | os.PathLike | None = None) -> Restored:
    """The network's image of a field's registered frames.

    Parameters
    ----------
    frames, masks
        ``(n, ny, nx)`` sky-subtracted frames registered on the reference and scaled to its
        photometry, and True where a frame has no value (as ``survey-qa stack`` holds them).
    weights
        ``(n,)`` quality weights (:func:`survey_qa.pipeline.stack.quality_weights`).
    noise_adu, poisson_adu
        ``(n,)`` sky noise of the scaled frames and photon-noise variance per unit signal
        (:func:`survey_qa.pipeline.stack.combine`).
    reference
        Index of the reference frame.
    weights_path
        Restoration weights; None: the packaged ones (loaded from safetensors with their
        checksum checked).
    """
    net, meta = load_restoration(weights_path)
    chosen = choose_k(weights, reference, net.arch.n_frames)
    w = np.asarray(weights, float)[chosen]
    noise = np.asarray(noise_adu, float)[chosen]
    stack = R.combine_window(frames[chosen], masks[chosen], w, noise,
                             np.asarray(poisson_adu, float)[chosen])
    image = R.restore(net, frames[chosen], masks[chosen], w, stack, float(noise[0]))
    return Restored(image=image, stack=stack, frames=chosen,
                    weights_sha256=str(meta["weights_sha256"]))
