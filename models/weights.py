"""Trained model files, for every model: writing, checking and reading them back.

Networks are stored as ``<name>.safetensors`` (tensors only, no pickle: loading runs no
code) with a JSON sidecar ``<name>.json`` holding everything else (architecture,
calibration, training facts, the command that made them). Both are written atomically
(:mod:`survey_qa.atomic`); the sidecar records the SHA-256 of the tensors, and reading
checks it. The self-organizing map is a ``.npz`` of numeric arrays and a JSON string,
read with ``allow_pickle=False``; Lightning checkpoints are read with
``weights_only=True``.

- the patch autoencoder: :func:`save_autoencoder`, :func:`load_autoencoder`,
  :func:`load_scorer`; its ``version`` is ``ae<format>-<first 10 hex of the SHA-256>``;
- the exposure classifier: :func:`save_classifier`, :func:`read_classifier`; its
  version is ``cnn-<first 12 hex of the SHA-256>``;
- the SOM: :func:`save_som`, :func:`load_som`;
- the multi-frame restoration network: :func:`save_restoration`,
  :func:`load_restoration` (the sidecar holds the tensors' SHA-256).

Packaged weights live in ``survey_qa/weights/`` (:func:`packaged_weights`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load, save_file

import survey_qa
from survey_qa.atomic import atomic_target, write_text
from survey_qa.models.classifier_features import FEATURE_NAMES
from survey_qa.models.components.autoencoder import AutoencoderArch, ConvAutoencoder
from survey_qa.models.components.classifier import DualInputClassifier
from survey_qa.models.som import SomModel
from survey_qa.pipeline.aescore import ScoreParams, Scorer
from survey_qa.pipeline.schema import CLASSES

WEIGHTS_DIR = Path(survey_qa.__file__).resolve().parent / "weights"
"""Where packaged weights live (``survey_qa/weights/``, package data)."""
AUTOENCODER_FILE = "autoencoder.safetensors"
CLASSIFIER_FILE = "classifier.safetensors"
FILE_MODE = 0o644
"""Permissions of written model files: package data that every user reads."""

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------- any network


def packaged_weights(name: str) -> Path:
    """A packaged weights file (``AUTOENCODER_FILE`` or ``CLASSIFIER_FILE``); may not exist."""
    return WEIGHTS_DIR / name


def metadata_path(weights_path: PathLike) -> Path:
    """The JSON sidecar of a weights file: same name, ``.json`` suffix."""
    return Path(weights_path).with_suffix(".json")


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def plain(value: Any) -> Any:
    """numpy scalars and arrays, tuples and paths as JSON-ready Python values."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def write_weights(path: PathLike, tensors: dict, header: dict[str, str],
                  metadata: Callable[[str], dict[str, Any]]) -> Path:
    """Write tensors and their JSON sidecar atomically; returns the weights path.

    Parameters
    ----------
    path
        Target ``.safetensors`` file; the sidecar goes to :func:`metadata_path`.
    tensors
        Name -> tensor (moved to the CPU and made contiguous here).
    header
        String metadata stored inside the safetensors header.
    metadata
        Builds the sidecar's content from the hex SHA-256 of the written tensors file.
        It may raise (``ValueError``): nothing is written then.

    Raises
    ------
    ValueError
        When ``path`` does not end in ``.safetensors``.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: weights files end in .safetensors")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_target(path, mode=FILE_MODE) as tmp:
        save_file(tensors, str(tmp), metadata=header)
        meta = metadata(file_sha256(tmp))
        text = json.dumps(plain(meta), indent=2, sort_keys=True) + "\n"
    write_text(metadata_path(path), text, mode=FILE_MODE)
    return path


def read_sidecar(path: PathLike) -> dict[str, Any]:
    """The JSON metadata next to a weights file."""
    return json.loads(metadata_path(path).read_text())


def read_tensors(path: PathLike, sha256_prefix: str | None = None) -> tuple[dict, str]:
    """The tensors of a ``.safetensors`` file and the file's hex SHA-256.

    Parameters
    ----------
    path
        The weights file.
    sha256_prefix
        What the metadata recorded of the file's SHA-256 (the whole digest or its first
        hex digits); None: not checked.

    Raises
    ------
    ValueError
        When the file's digest does not start with ``sha256_prefix``.
    """
    raw = Path(path).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if sha256_prefix is not None and not (sha256_prefix and digest.startswith(sha256_prefix)):
        raise ValueError(f"{path}: weights do not match their metadata (checksum)")
    return load(raw), digest


def load_checkpoint_state(path: PathLike) -> dict:
    """The ``state_dict`` of a Lightning checkpoint, read with ``weights_only=True``."""
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


# ---------------------------------------------------------------------------- autoencoder

AUTOENCODER_FORMAT_VERSION = 1
AUTOENCODER_KEYS = ("format_version", "architecture", "threshold", "quantile", "bin_factor",
                    "patch_px", "score_params", "score_ref", "version")
"""Keys every autoencoder sidecar holds."""
_AE_VERSION = re.compile(r"ae\d+-([0-9a-f]+)")


def save_autoencoder(model: ConvAutoencoder, path: PathLike, metadata: dict[str, Any]) -> Path:
    """Write an autoencoder's tensors and metadata; returns the weights path.

    ``metadata`` gets the architecture, ``format_version`` and a ``version`` string
    (``ae<format>-<first 10 hex of the tensors' sha256>``) added.

    Parameters
    ----------
    model
        The trained network.
    path
        Target ``.safetensors`` path; the JSON goes next to it.
    metadata
        At least ``threshold``, ``quantile``, ``bin_factor``, ``patch_px``,
        ``score_params`` (:meth:`ScoreParams.to_dict`) and ``score_ref``.

    Raises
    ------
    ValueError
        When ``metadata`` lacks a key (nothing is written).
    """
    def sidecar(digest: str) -> dict[str, Any]:
        meta = dict(metadata)
        meta.update(format_version=AUTOENCODER_FORMAT_VERSION,
                    architecture=model.arch.to_dict(),
                    version=f"ae{AUTOENCODER_FORMAT_VERSION}-{digest[:10]}")
        missing = [k for k in AUTOENCODER_KEYS if k not in meta]
        if missing:
            raise ValueError(f"weights metadata lacks {missing}")
        return meta

    return write_weights(path, model.state_dict(), {"format": "pt"}, sidecar)


def read_autoencoder_metadata(path: PathLike) -> dict[str, Any]:
    """The JSON metadata of autoencoder weights, checked for its keys and format."""
    meta = read_sidecar(path)
    missing = [k for k in AUTOENCODER_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{metadata_path(path)}: metadata lacks {missing}")
    if meta["format_version"] > AUTOENCODER_FORMAT_VERSION:
        raise ValueError(f"{path}: weights format {meta['format_version']} is newer than "
                         f"this survey-qa reads ({AUTOENCODER_FORMAT_VERSION})")
    return meta


def load_autoencoder(path: PathLike) -> tuple[ConvAutoencoder, dict[str, Any]]:
    """Rebuild the autoencoder from a weights file and its metadata (eval mode).

    Raises
    ------
    ValueError
        When the metadata are incomplete or the tensors do not match the ``version``.
    """
    meta = read_autoencoder_metadata(path)
    recorded = _AE_VERSION.fullmatch(str(meta["version"]))
    tensors, _ = read_tensors(path, recorded.group(1) if recorded else None)
    model = ConvAutoencoder(AutoencoderArch(**meta["architecture"]))
    model.load_state_dict(tensors, strict=True)
    model.eval()
    return model, meta


def scorer_from(model: ConvAutoencoder, meta: dict[str, Any]) -> Scorer:
    """A :class:`~survey_qa.pipeline.aescore.Scorer` from a model and its metadata."""
    table = meta.get("reference_quantiles") or {}
    return Scorer(model=model.eval(), threshold=float(meta["threshold"]),
                  quantile=float(meta["quantile"]), bin_factor=int(meta["bin_factor"]),
                  patch_px=int(meta["patch_px"]), params=ScoreParams(**meta["score_params"]),
                  score_ref=float(meta["score_ref"]),
                  ref_quantiles=np.asarray(table.get("quantile", []), dtype=np.float64),
                  ref_scores=np.asarray(table.get("score", []), dtype=np.float64),
                  version=str(meta["version"]))


def load_scorer(path: PathLike | None = None) -> Scorer | None:
    """Load an autoencoder :class:`~survey_qa.pipeline.aescore.Scorer`, or None.

    Parameters
    ----------
    path
        A ``.safetensors`` file; None: the packaged weights. A path that is given but
        missing is an error (``ValueError``); missing packaged weights just give None,
        and the nightly run then writes NaN with the ``AE_UNAVAILABLE`` flag.
    """
    if path is None:
        path = packaged_weights(AUTOENCODER_FILE)
        if not (path.is_file() and metadata_path(path).is_file()):
            return None
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no autoencoder weights at {path}")
    if not metadata_path(path).is_file():
        raise ValueError(f"weights {path} lack their metadata {metadata_path(path)}")
    return scorer_from(*load_autoencoder(path))


# ---------------------------------------------------------------------------- classifier

CLASSIFIER_FORMAT = "survey-qa-classifier-1"


def save_classifier(net: DualInputClassifier, path: PathLike, som: SomModel,
                    info: dict | None = None) -> Path:
    """Write a classifier: every weight and buffer (the SOM prototypes, standardisation
    and temperature included) to ``path`` and its metadata to the JSON sidecar.

    Parameters
    ----------
    net
        The trained network.
    path
        Target ``.safetensors`` file; the metadata go to the same name with ``.json``.
    som
        The SOM the occupancy maps come from (its grid and errors are recorded).
    info
        Extra facts to record (training nights, metrics, timings...).
    """
    tensors = {k: v.clone() for k, v in net.state_dict().items()}

    def sidecar(digest: str) -> dict[str, Any]:
        return {"format": CLASSIFIER_FORMAT, "classes": list(CLASSES),
                "feature_names": list(FEATURE_NAMES), "arch": net.arch,
                "temperature": float(net.temperature.item()),
                "feature_mean": net.feature_branch.feature_mean.tolist(),
                "feature_std": net.feature_branch.feature_std.tolist(),
                "som": {"grid": list(som.grid), "stamp_shape": list(som.stamp_shape),
                        "quantization_error": som.quantization_error,
                        "topographic_error": som.topographic_error, "info": som.info},
                "weights_sha256": digest, **(info or {})}

    return write_weights(path, tensors, {"format": CLASSIFIER_FORMAT}, sidecar)


def read_classifier(path: PathLike
                    ) -> tuple[DualInputClassifier, SomModel, dict[str, Any], str]:
    """The network, SOM, metadata and version of classifier weights written by
    :func:`save_classifier` (network in eval mode, CPU).

    Returns
    -------
    tuple
        ``(network, SOM, metadata, version)``; the version is ``cnn-<12 hex>``.

    Raises
    ------
    ValueError
        When the files are missing, are not a classifier of this survey-qa version
        (classes, features), or the tensors do not match their metadata (checksum).
    """
    path = Path(path)
    if not path.exists() or not metadata_path(path).exists():
        raise ValueError(f"no classifier weights at {path} (with {metadata_path(path).name})")
    meta = read_sidecar(path)
    if meta.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"{path}: not a survey-qa classifier")
    if tuple(meta["classes"]) != CLASSES or tuple(meta["feature_names"]) != FEATURE_NAMES:
        raise ValueError(f"{path}: classes or features differ from this survey-qa version")
    tensors, digest = read_tensors(path, meta.get("weights_sha256"))
    arch = meta["arch"]
    net = DualInputClassifier(grid=tuple(arch["grid"]), stamp_shape=tuple(arch["stamp_shape"]),
                              n_features=arch["n_features"], n_classes=arch["n_classes"],
                              embed=arch["embed"], hidden=arch["hidden"],
                              dropout=arch["dropout"])
    net.load_state_dict(tensors, strict=True)
    net.eval()
    gx, gy = arch["grid"]
    protos = net.prototype_branch.prototypes.numpy()
    som_meta = meta.get("som", {})
    som = SomModel(weights=protos.reshape(gx, gy, -1), stamp_shape=tuple(arch["stamp_shape"]),
                   quantization_error=som_meta.get("quantization_error", math.nan),
                   topographic_error=som_meta.get("topographic_error", math.nan),
                   info=som_meta.get("info", {}))
    return net, som, meta, f"cnn-{digest[:12]}"


# ---------------------------------------------------------------------------- SOM

SOM_FORMAT = "survey-qa-som-1"


def save_som(som: SomModel, path: PathLike) -> Path:
    """Write a SOM to ``path`` (``.npz``: arrays and a
    JSON string, no pickle); returns the path."""
    meta = {"format": SOM_FORMAT, "stamp_shape": list(som.stamp_shape),
            "quantization_error": som.quantization_error,
            "topographic_error": som.topographic_error, "info": som.info}
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, weights=som.weights, meta=np.array(json.dumps(meta)))
    return Path(path)


def load_som(path: PathLike) -> SomModel:
    """Read a SOM written by :func:`save_som`."""
    with np.load(Path(path), allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        weights = data["weights"]
    if meta.get("format") != SOM_FORMAT:
        raise ValueError(f"{path}: not a survey-qa SOM file")
    return SomModel(weights=weights, stamp_shape=tuple(meta["stamp_shape"]),
                    quantization_error=meta["quantization_error"],
                    topographic_error=meta["topographic_error"], info=meta["info"])


# ---------------------------------------------------------------------------- restoration

RESTORATION_FILE = "restoration.safetensors"
RESTORATION_FORMAT = "survey-qa-restoration-1"


def save_restoration(net, path: PathLike, info: dict | None = None) -> Path:
    """Write a multi-frame restoration network
    (:class:`~survey_qa.models.components.restoration.RestorationUNet`) and its metadata
    (architecture, SHA-256, ``info``)."""
    def sidecar(digest: str) -> dict[str, Any]:
        return {"format": RESTORATION_FORMAT, "architecture": net.arch.to_dict(),
                "weights_sha256": digest, **(info or {})}

    return write_weights(path, net.state_dict(), {"format": RESTORATION_FORMAT}, sidecar)


def load_restoration(path: PathLike | None = None) -> tuple[Any, dict[str, Any]]:
    """The restoration network (eval mode, CPU) and its metadata; None: the packaged one.

    Raises ``ValueError`` when the files are missing, of another format, or the tensors do
    not match their checksum.
    """
    from survey_qa.models.components.restoration import RestorationArch, RestorationUNet

    path = Path(path) if path is not None else packaged_weights(RESTORATION_FILE)
    if not path.is_file() or not metadata_path(path).is_file():
        raise ValueError(f"no restoration weights at {path} (with {metadata_path(path).name})")
    meta = read_sidecar(path)
    if meta.get("format") != RESTORATION_FORMAT:
        raise ValueError(f"{path}: not survey-qa restoration weights")
    tensors, _ = read_tensors(path, meta.get("weights_sha256"))
    net = RestorationUNet(RestorationArch.from_dict(meta["architecture"]))
    net.load_state_dict(tensors, strict=True)
    net.eval()
    return net, meta
