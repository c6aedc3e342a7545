"""Save and load trained autoencoder weights: ``.safetensors`` plus a JSON sidecar.

The tensors go to ``<name>.safetensors`` (no pickle: loading runs no code) and the
metadata to ``<name>.json``: architecture hyper-parameters, threshold and quantile,
bin factor, patch size, normalisation constants, reference score quantiles, a
description of the training data, the command that produced the weights and a version
string. The packaged weights live in ``survey_qa/weights/autoencoder.safetensors``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import load_file, save_file

from survey_qa.models.components.autoencoder import AutoencoderArch, ConvAutoencoder
from survey_qa.pipeline.aescore import ScoreParams, Scorer

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "architecture", "threshold", "quantile", "bin_factor",
                 "patch_px", "score_params", "score_ref", "version")


def packaged_weights() -> Path:
    """Path of the packaged weights file inside the installed ``survey_qa`` package."""
    import survey_qa

    return Path(survey_qa.__file__).resolve().parent / "weights" / "autoencoder.safetensors"


def metadata_path(weights_path: str | os.PathLike) -> Path:
    """The JSON sidecar of a weights file: same name, ``.json`` suffix."""
    return Path(weights_path).with_suffix(".json")


def save_weights(model: ConvAutoencoder, path: str | os.PathLike, metadata: dict[str, Any]
                 ) -> Path:
    """Write the model's tensors and its metadata; returns the weights path.

    ``metadata`` gets the architecture, ``format_version`` and a ``version`` string
    (``ae<format>-<first 10 hex of the tensors' sha256>``) added. Both files are written
    under temporary names and renamed into place.

    Parameters
    ----------
    model
        The trained network.
    path
        Target ``.safetensors`` path; the JSON goes next to it.
    metadata
        At least ``threshold``, ``quantile``, ``bin_factor``, ``patch_px``,
        ``score_params`` (:meth:`ScoreParams.to_dict`) and ``score_ref``.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: weights files end in .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o644)  # package data: readable by every user
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()[:10]
    meta = dict(metadata)
    meta.update(format_version=FORMAT_VERSION, architecture=model.arch.to_dict(),
                version=f"ae{FORMAT_VERSION}-{digest}")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"weights metadata lacks {missing}")
    jpath = metadata_path(path)
    jtmp = jpath.with_name(f".{jpath.name}.tmp")
    jtmp.write_text(json.dumps(_plain(meta), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    os.replace(jtmp, jpath)
    return path


def _plain(value: Any) -> Any:
    """numpy scalars and arrays to JSON-ready Python values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a weights file."""
    meta = json.loads(metadata_path(path).read_text())
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{metadata_path(path)}: metadata lacks {missing}")
    if meta["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{path}: weights format {meta['format_version']} is newer than "
                         f"this survey-qa reads ({FORMAT_VERSION})")
    return meta


def load_model(path: str | os.PathLike) -> tuple[ConvAutoencoder, dict[str, Any]]:
    """Rebuild the network from a weights file and its metadata (eval mode)."""
    meta = read_metadata(path)
    model = ConvAutoencoder(AutoencoderArch(**meta["architecture"]))
    model.load_state_dict(load_file(str(path)), strict=True)
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


def load_scorer(path: str | os.PathLike | None = None) -> Scorer | None:
    """Load a scorer, or None when there are no weights.

    Parameters
    ----------
    path
        A ``.safetensors`` file; None: the packaged weights. A path that is given but
        missing is an error (``ValueError``); missing packaged weights just give None,
        and the nightly run then writes NaN with the ``AE_UNAVAILABLE`` flag.
    """
    if path is None:
        path = packaged_weights()
        if not (path.is_file() and metadata_path(path).is_file()):
            return None
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no autoencoder weights at {path}")
    if not metadata_path(path).is_file():
        raise ValueError(f"weights {path} lack their metadata {metadata_path(path)}")
    model, meta = load_model(path)
    return scorer_from(model, meta)
