"""Training and validation splits by night and exposure, for every model.

Detectors of one exposure share its sky, seeing and tracking, and exposures of one night
share its weather: a split that put them on both sides would measure memory, not
generalisation. :func:`split_by_night_and_exposure` therefore holds out whole nights or
whole exposures (all their detectors), never single detectors or sources.

Two ways of choosing what to hold out are offered, one per kind of training data:

- ``"night_count"`` (labelled detectors of the classifier): with three nights or more,
  ``val_fraction`` of the *nights* are held out; with fewer, ``val_fraction`` of the
  exposures.
- ``"exposure_share"`` (reference frames of the autoencoder): ``val_fraction`` of the
  *exposures* are held out, taken as whole nights where a night brings the share nearer
  the target, then topped up with exposures of the other nights.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

METHODS = ("night_count", "exposure_share")


def split_by_night_and_exposure(table: pd.DataFrame, val_fraction: float, seed: int = 0, *,
                                method: str) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation row positions; no exposure is ever on both sides.

    Parameters
    ----------
    table
        One row per detector, with ``night`` and ``exposure`` columns.
    val_fraction
        Target share held out, in ``[0, 1)``; 0 gives an empty validation split.
    seed
        Seed of the random choice of nights and exposures.
    method
        ``"night_count"`` or ``"exposure_share"`` (see the module's description).

    Returns
    -------
    tuple of numpy.ndarray
        ``(train, val)``: positions (for ``table.iloc``) in increasing order.

    Raises
    ------
    ValueError
        When ``val_fraction`` is outside ``[0, 1)`` or ``method`` is unknown.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError("val_fraction must be in [0, 1)")
    if method == "night_count":
        is_val = _held_out_by_count(table, val_fraction, np.random.default_rng(seed))
    elif method == "exposure_share":
        is_val = _held_out_by_share(table, val_fraction, np.random.default_rng(seed))
    else:
        raise ValueError(f"unknown split method {method!r}; expected one of {METHODS}")
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def _exposure_keys(table: pd.DataFrame) -> np.ndarray:
    """``night/exposure`` of every row: the unit an exposure split moves."""
    return (table["night"].astype(str) + "/" + table["exposure"].astype(str)).to_numpy()


def _held_out_by_count(table: pd.DataFrame, val_fraction: float,
                       rng: np.random.Generator) -> np.ndarray:
    """Rows held out when a share of the nights (3 or more) or exposures is drawn."""
    nights = sorted(table["night"].unique())
    if len(nights) >= 3:
        groups = table["night"].astype(str).to_numpy()
        units = nights
    else:
        groups = _exposure_keys(table)
        units = sorted(set(groups))
    n_val = int(round(val_fraction * len(units)))
    if val_fraction > 0:
        n_val = min(max(n_val, 1), len(units) - 1)
    held = set(rng.permutation(np.array(units, dtype=object))[:n_val].tolist())
    return np.array([g in held for g in groups], dtype=bool)


def _held_out_by_share(table: pd.DataFrame, val_fraction: float,
                       rng: np.random.Generator) -> np.ndarray:
    """Rows held out when a share of the exposures is drawn, whole nights first.

    Nights in random order go to validation when each brings the held-out share of
    exposures nearer ``val_fraction``; exposures of the remaining nights top it up. At
    least one exposure stays for training.
    """
    if table.empty or val_fraction <= 0:
        return np.zeros(len(table), dtype=bool)
    per_night = table.groupby("night")["exposure"].unique()
    n_exposures = int(sum(len(v) for v in per_night))
    target = max(1, round(val_fraction * n_exposures))
    target = min(target, n_exposures - 1)
    val: set[tuple[str, str]] = set()
    nights = list(per_night.index)
    rng.shuffle(nights)
    if len(nights) > 1:
        for night in nights:
            size = len(per_night[night])
            closer = size < 2 * (target - len(val))  # the share gets nearer the target
            if closer and len(val) + size < n_exposures:
                val |= {(night, e) for e in per_night[night]}
    rest = [(n, e) for n in nights for e in sorted(per_night[n]) if (n, e) not in val]
    rng.shuffle(rest)
    while len(val) < target and len(rest) > 1:
        val.add(rest.pop())
    return np.array([k in val for k in zip(table["night"], table["exposure"])], dtype=bool)
