"""Self-organizing map of star stamps (Teimoorinia et al. 2020).

A SOM trained on normalised star stamps from many exposures arranges the stamp shapes
met in a survey (round and sharp, round and fat, elongated this or that way, trailed,
doubled...) on a small grid of nodes. One exposure's stars then fall on a few nodes: the
share of its stars per node (the *occupancy map*) is a small, fixed-size image of what the
exposure's stars look like, whatever their number.

The map is a minisom wrapper for training; inference (winners, occupancy, errors) is plain
numpy on the stored prototypes. :func:`survey_qa.models.weights.save_som` and
:func:`~survey_qa.models.weights.load_som` write and read a map.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PEAK_FLOOR = -0.5
"""Stamps are scaled to a peak of 1; pixels below this (noise, over-subtracted sky) are
clipped so one bad pixel cannot dominate a distance."""


def usable_stamps(stamps: np.ndarray) -> np.ndarray:
    """``(n,)`` bool: stamps with a finite pixel and a positive maximum."""
    stamps = np.asarray(stamps, dtype=np.float32)
    if stamps.ndim != 3:
        raise ValueError(f"stamps must be (n, h, w), got shape {stamps.shape}")
    shape = (len(stamps), int(np.prod(stamps.shape[1:])))
    finite = np.isfinite(stamps).reshape(shape)
    flat = np.where(finite, stamps.reshape(shape), 0.0)
    return finite.any(axis=1) & (flat.max(axis=1, initial=0.0) > 0)


def prepare_stamps(stamps: np.ndarray) -> np.ndarray:
    """Clean, peak-normalised stamps as vectors, the form the SOM compares.

    Parameters
    ----------
    stamps
        ``(n, h, w)`` star stamps. Stamps that are all NaN (padding for missing stars) or
        have no positive pixel are dropped; NaN pixels inside a stamp become 0.

    Returns
    -------
    numpy.ndarray
        ``(m, h * w)`` float32, each row scaled so its maximum is 1, with ``m <= n``.
    """
    stamps = np.asarray(stamps, dtype=np.float32)
    keep = usable_stamps(stamps)
    flat = stamps[keep].reshape(int(keep.sum()), int(np.prod(stamps.shape[1:])))
    flat = np.where(np.isfinite(flat), flat, 0.0)
    out = flat / flat.max(axis=1, keepdims=True) if len(flat) else flat
    return np.clip(out, PEAK_FLOOR, 1.0).astype(np.float32)


def dihedral(stamps: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Apply one of the 8 rotations/reflections of the square to each stamp.

    Parameters
    ----------
    stamps
        ``(n, h, w)`` with ``h == w``.
    k
        ``(n,)`` integers in ``[0, 8)``: ``k % 4`` quarter turns, then a left-right flip
        when ``k >= 4``.
    """
    out = np.empty_like(stamps)
    for i, (s, kk) in enumerate(zip(stamps, np.asarray(k))):
        r = np.rot90(s, int(kk) % 4)
        out[i] = r[:, ::-1] if kk >= 4 else r
    return out


@dataclass
class SomModel:
    """A trained map: node prototypes and how well they describe the training stamps.

    Attributes
    ----------
    weights
        ``(gx, gy, h * w)`` float32 node prototypes (peak-normalised stamp vectors).
    stamp_shape
        ``(h, w)`` of the stamps, in pixels.
    quantization_error
        Mean distance of a training stamp to its best-matching prototype.
    topographic_error
        Share of training stamps whose best and second-best nodes are not neighbours
        on the grid (0: the map preserves topology).
    info
        Training settings and counts, saved with the map.
    """

    weights: np.ndarray
    stamp_shape: tuple[int, int]
    quantization_error: float = float("nan")
    topographic_error: float = float("nan")
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.weights = np.asarray(self.weights, dtype=np.float32)
        self.stamp_shape = tuple(int(v) for v in self.stamp_shape)
        if self.weights.ndim != 3 or self.weights.shape[2] != np.prod(self.stamp_shape):
            raise ValueError(f"weights {self.weights.shape} do not match stamps "
                             f"{self.stamp_shape}")

    # ------------------------------------------------------------------ geometry

    @property
    def grid(self) -> tuple[int, int]:
        """``(gx, gy)``: nodes along each side of the map."""
        return int(self.weights.shape[0]), int(self.weights.shape[1])

    @property
    def n_nodes(self) -> int:
        return self.grid[0] * self.grid[1]

    def prototypes(self) -> np.ndarray:
        """Node prototypes as images, ``(gx * gy, h, w)`` float32, row-major node order."""
        return self.weights.reshape(self.n_nodes, *self.stamp_shape)

    # ------------------------------------------------------------------ inference

    def _distances(self, vectors: np.ndarray) -> np.ndarray:
        w = self.weights.reshape(self.n_nodes, -1).astype(np.float64)
        v = vectors.astype(np.float64)
        d2 = (v ** 2).sum(1)[:, None] - 2.0 * v @ w.T + (w ** 2).sum(1)[None, :]
        return np.sqrt(np.maximum(d2, 0.0))

    def assign(self, stamps: np.ndarray) -> np.ndarray:
        """Best-matching node (flat, row-major index) of each stamp, aligned with the input.

        Returns
        -------
        numpy.ndarray
            ``(n,)`` int64; -1 for stamps :func:`prepare_stamps` drops (NaN padding, empty).
        """
        stamps = np.asarray(stamps, dtype=np.float32)
        out = np.full(len(stamps), -1, dtype=np.int64)
        usable = usable_stamps(stamps)
        if usable.any():
            out[usable] = self._distances(prepare_stamps(stamps[usable])).argmin(axis=1)
        return out

    def winners(self, stamps: np.ndarray) -> np.ndarray:
        """Best-matching node (flat, row-major index) of every usable stamp.

        Stamps dropped by :func:`prepare_stamps` (NaN padding, empty) get no winner, so
        the result may be shorter than ``stamps``.
        """
        win = self.assign(stamps)
        return win[win >= 0]

    def occupancy_map(self, stamps: np.ndarray) -> np.ndarray:
        """Share of an exposure's stars on each node.

        Parameters
        ----------
        stamps
            ``(n, h, w)`` stamps of one exposure (NaN-padded rows allowed).

        Returns
        -------
        numpy.ndarray
            ``(gx, gy)`` float32 summing to 1; all zeros when no stamp is usable.
        """
        win = self.winners(stamps)
        counts = np.bincount(win, minlength=self.n_nodes).astype(np.float32)
        if len(win):
            counts /= len(win)
        return counts.reshape(self.grid)

    def representatives(self, stamps: np.ndarray, k: int) -> np.ndarray:
        """Representative sources: one real stamp for each of the ``k`` busiest nodes.

        For the nodes holding most of the exposure's stars (ties: lower node index
        first), the member stamp closest to the node prototype, peak-normalised.

        Returns
        -------
        numpy.ndarray
            ``(k, h, w)`` float32; rows beyond the number of occupied nodes are NaN.
        """
        if k < 1:
            raise ValueError("k must be at least 1")
        out = np.full((k, *self.stamp_shape), np.nan, dtype=np.float32)
        vectors = prepare_stamps(stamps)
        if len(vectors) == 0:
            return out
        dist = self._distances(vectors)
        win = dist.argmin(axis=1)
        counts = np.bincount(win, minlength=self.n_nodes)
        busiest = np.lexsort((np.arange(self.n_nodes), -counts))[:k]
        for slot, node in enumerate(b for b in busiest if counts[b] > 0):
            members = np.flatnonzero(win == node)
            best = members[dist[members, node].argmin()]
            out[slot] = vectors[best].reshape(self.stamp_shape)
        return out

    def errors(self, stamps: np.ndarray) -> dict[str, float]:
        """Quantisation and topographic error of the map on ``stamps``.

        Returns
        -------
        dict
            ``quantization_error`` (mean distance to the best prototype, in units of a
            peak-normalised stamp) and ``topographic_error`` (share of stamps whose two
            best nodes are not adjacent, diagonals included); NaN when no stamp is usable.
        """
        vectors = prepare_stamps(stamps)
        if len(vectors) == 0:
            return {"quantization_error": float("nan"), "topographic_error": float("nan")}
        dist = self._distances(vectors)
        order = np.argsort(dist, axis=1)[:, :2]
        q = float(dist[np.arange(len(dist)), order[:, 0]].mean())
        gy = self.grid[1]
        (x1, y1), (x2, y2) = divmod(order[:, 0], gy), divmod(order[:, 1], gy)
        far = np.maximum(np.abs(x1 - x2), np.abs(y1 - y2)) > 1
        return {"quantization_error": q, "topographic_error": float(far.mean())}


def train_som(stamps: np.ndarray, grid: tuple[int, int] = (10, 10), *,
              sigma: float | None = None, learning_rate: float = 0.5,
              n_iterations: int | None = None, augment: bool = True,
              max_stamps: int = 50_000, seed: int = 0) -> SomModel:
    """Train a map on star stamps pooled from many exposures.

    Parameters
    ----------
    stamps
        ``(n, h, w)`` normalised star stamps (NaN padding allowed).
    grid
        ``(gx, gy)`` nodes.
    sigma
        Initial neighbourhood radius in nodes; None: a third of the longer side.
    learning_rate
        Initial learning rate (minisom's asymptotic decay).
    n_iterations
        Single-stamp updates; None: five passes over the (sub-sampled) stamps.
    augment
        Give each stamp a random rotation by quarter turns and flip, so that every
        direction of elongation is represented whatever the training nights held.
    max_stamps
        At most this many stamps (a random subset) are used.
    seed
        Seed of the subset, the augmentation and minisom's update order.

    Returns
    -------
    SomModel
        With quantisation and topographic error measured on the training stamps.
    """
    from minisom import MiniSom

    stamps = np.asarray(stamps, dtype=np.float32)
    if stamps.ndim != 3 or stamps.shape[1] != stamps.shape[2]:
        raise ValueError(f"stamps must be (n, s, s), got {stamps.shape}")
    gx, gy = (int(g) for g in grid)
    if gx < 2 or gy < 2:
        raise ValueError("grid must be at least 2 x 2")
    rng = np.random.default_rng(seed)
    usable = np.isfinite(stamps).any(axis=(1, 2))
    stamps = stamps[usable]
    if len(stamps) > max_stamps:
        stamps = stamps[np.sort(rng.choice(len(stamps), max_stamps, replace=False))]
    if augment:
        stamps = dihedral(stamps, rng.integers(0, 8, len(stamps)))
    data = prepare_stamps(stamps)
    if len(data) < gx * gy:
        raise ValueError(f"{len(data)} usable stamps cannot train a {gx}x{gy} map")
    sigma = max(gx, gy) / 3.0 if sigma is None else float(sigma)
    n_iterations = 5 * len(data) if n_iterations is None else int(n_iterations)
    som = MiniSom(gx, gy, data.shape[1], sigma=sigma, learning_rate=learning_rate,
                  random_seed=seed)
    som.pca_weights_init(data)
    som.train(data, n_iterations, random_order=True)
    model = SomModel(weights=som.get_weights().astype(np.float32),
                     stamp_shape=stamps.shape[1:],
                     info={"n_stamps": int(len(data)), "grid": [gx, gy], "sigma": sigma,
                           "learning_rate": learning_rate, "n_iterations": n_iterations,
                           "augment": augment, "seed": seed})
    err = model.errors(stamps)
    model.quantization_error = err["quantization_error"]
    model.topographic_error = err["topographic_error"]
    return model
