"""Autoencoder quality maps and masks (after Jia et al. 2024): pure stages.

An autoencoder trained only on good frames reconstructs what good sky looks like. A
detector is binned; the most common sky level (the half-sample mode of cell medians) is
subtracted and the result divided by the larger of the noise and a small share of the
sky, then compressed with asinh, so that the network sees sky structure, not absolute
levels. The frame is cut into patches and reconstructed. The network cannot copy a
patch's own level through (see :mod:`survey_qa.models.components.autoencoder`), so sky
raised or lowered by clouds, gradients or scattered light stays in the residual, while
the stars and galaxies that good frames hold are reconstructed. A patch's score is the
mean absolute cell median of its residual: the reconstruction error at the scale of sky
structure, blind to pixel noise and to the cores of stars.

Patches scoring above a threshold taken from the scores of good reference frames (a
quantile, stored with the weights: no hand tuning) form the mask, cleaned by morphology
so that isolated bright stars do not punch holes in it.

Geometry: patch ``(i, j)`` of the score map covers full-resolution rows
``[i * B, (i + 1) * B)`` and columns ``[j * B, (j + 1) * B)`` with
``B = bin_factor * patch_px``; the last row and column of patches may reach past the
detector edge (the frame is padded by reflection).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from survey_qa.config import AutoencoderConfig
from survey_qa.pipeline.background import block_sum
from survey_qa.pipeline.errors import QualityError


@dataclass(frozen=True)
class ScoreParams:
    """Normalisation and scoring constants; the weights store the ones they were trained
    with, and scoring must use the same.

    Attributes
    ----------
    cell_px
        Side (binned pixels) of the cells on which the sky level is taken and residuals
        are summarised; a patch side must be a multiple of it.
    rel_floor
        The normalisation unit is the larger of the pixel noise and this share of the sky
        level: on a bright sky a defect is judged by its size relative to the sky (as the
        classes are defined), on a faint sky by its significance.
    asinh_soft
        Softening of the asinh compression, in normalisation units: linear below,
        logarithmic above (stars).
    residual_clip
        Cap on each pixel's absolute residual (compressed units) before cells are
        summarised.
    """

    cell_px: int = 8
    rel_floor: float = 0.05
    asinh_soft: float = 3.0
    residual_clip: float = 5.0

    def __post_init__(self):
        if self.cell_px < 1 or self.rel_floor < 0 or self.asinh_soft <= 0 \
                or self.residual_clip <= 0:
            raise ValueError(f"invalid score parameters {self}")

    def to_dict(self) -> dict:
        """Plain mapping for the weights' JSON metadata."""
        return {"cell_px": self.cell_px, "rel_floor": self.rel_floor,
                "asinh_soft": self.asinh_soft, "residual_clip": self.residual_clip}


MIN_GOOD_FRACTION = 0.05
"""Fewer unmasked binned pixels than this share and the detector cannot be scored."""


@dataclass
class Scorer:
    """A trained autoencoder with everything needed to score a detector.

    Attributes
    ----------
    model
        The network (``torch.nn.Module``) in eval mode; input and output (N, 1, p, p).
    threshold
        Mask threshold on patch scores: the ``quantile`` of the reference patch scores.
    quantile
        The reference quantile that gave ``threshold``.
    bin_factor
        Binning of the detector before scoring (pixels per binned pixel, per axis).
    patch_px
        Patch side on the binned frame.
    params
        Normalisation and score constants used in training.
    score_ref
        Median reference patch score; ``ae_score`` is the mean patch score in these units.
    ref_quantiles, ref_scores
        Quantile table of the reference patch scores, so that another quantile can be
        asked for at scoring time without retraining.
    version
        Model version string for the ``model_version`` column.
    """

    model: torch.nn.Module
    threshold: float
    quantile: float
    bin_factor: int
    patch_px: int
    params: ScoreParams = field(default_factory=ScoreParams)
    score_ref: float = 1.0
    ref_quantiles: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)
    ref_scores: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)
    version: str = ""

    @property
    def block_px(self) -> int:
        """Full-resolution side of one patch (and of one score or mask cell)."""
        return self.bin_factor * self.patch_px

    def threshold_at(self, quantile: float) -> float:
        """Threshold for another reference quantile (the stored one when it is the same).

        Raises ``ValueError`` when the quantile lies outside the stored table.
        """
        if math.isclose(quantile, self.quantile):
            return self.threshold
        q = self.ref_quantiles
        if len(q) == 0:
            raise ValueError(f"these weights only know the {self.quantile} quantile")
        if not q[0] <= quantile <= q[-1]:
            raise ValueError(f"quantile {quantile} outside the stored table "
                             f"[{q[0]}, {q[-1]}]")
        return float(np.interp(quantile, q, self.ref_scores))


@dataclass
class AEResult:
    """Autoencoder outcome for one detector.

    Attributes
    ----------
    score_map
        Per-patch reconstruction error, shape (ceil(ny / B), ceil(nx / B)), float32.
    mask
        Cleaned patch mask (True: the region is damaged), same shape.
    ae_score
        Mean patch score over the detector in units of the median good-frame patch
        score: about 1 for good sky, larger for worse.
    mask_fraction
        Share of the detector's pixels under the mask.
    threshold
        The patch-score threshold that made the mask.
    block_px
        Full-resolution side of one patch, ``bin_factor * patch_px``.
    sky_adu, scale_adu
        The sky level subtracted and the normalisation unit (binned-pixel ADU).
    """

    score_map: np.ndarray
    mask: np.ndarray
    ae_score: float
    mask_fraction: float
    threshold: float
    block_px: int
    sky_adu: float = math.nan
    scale_adu: float = math.nan


# ---------------------------------------------------------------------------- preparation


def bin_frame(data: np.ndarray, mask: np.ndarray | None, factor: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Average ``factor`` x ``factor`` blocks of unmasked pixels.

    The frame is padded (with masked pixels) to a multiple of ``factor``, so the binned
    shape is ``ceil(ny / factor), ceil(nx / factor)``.

    Parameters
    ----------
    data
        2-D image (ADU).
    mask
        True where a pixel must not be used; None: every pixel is good.
    factor
        Block side (pixels).

    Returns
    -------
    binned, binned_mask
        Block means (float32, ADU; 0 where every pixel of a block is masked) and a mask
        that is True for such blocks.
    """
    if factor < 1:
        raise ValueError("factor must be at least 1")
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 2:
        raise ValueError(f"expected a 2-D frame, got shape {data.shape}")
    good = np.isfinite(data)
    if mask is not None:
        good &= ~np.asarray(mask, dtype=bool)
    ny, nx = data.shape
    py, px = -ny % factor, -nx % factor
    if not (py or px) and good.all():  # the common case, without the bookkeeping
        binned = block_sum(data, factor) / np.float32(factor * factor)
        return binned, np.zeros(binned.shape, dtype=bool)
    values = np.where(good, data, np.float32(0))
    if py or px:
        values = np.pad(values, ((0, py), (0, px)))
        good = np.pad(good, ((0, py), (0, px)))
    total = block_sum(values, factor)
    count = block_sum(good, factor, np.int32)
    binned = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    return binned, count == 0


def robust_noise(image: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pixel-to-pixel noise (same units as ``image``) that smooth structure cannot inflate.

    From the median absolute difference of horizontally adjacent unmasked pixels:
    ``sigma = 1.4826 * MAD(diff) / sqrt(2)``. Gradients and clouds barely change it; stars
    are few enough for the median to ignore.
    """
    d = np.diff(image, axis=1)
    if mask is not None:
        d = d[~(mask[:, 1:] | mask[:, :-1])]
    d = d[np.isfinite(d)]
    if d.size == 0:
        return math.nan
    mad = np.median(np.abs(d - np.median(d)))
    return float(1.4826 * mad / math.sqrt(2.0))


def half_sample_mode(values: np.ndarray) -> float:
    """The half-sample mode (Bickel & Fruehwirth 2006): a robust estimate of the mode.

    Repeatedly keeps the half of the sorted sample with the narrowest range.
    """
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan
    while v.size > 3:
        h = (v.size + 1) // 2
        widths = v[h - 1:] - v[:v.size - h + 1]
        start = int(np.argmin(widths))
        v = v[start:start + h]
    return float(np.median(v))


def cell_medians(image: np.ndarray, mask: np.ndarray, cell_px: int) -> np.ndarray:
    """Medians of the unmasked pixels of each whole ``cell_px`` x ``cell_px`` cell (1-D).

    Cells with fewer than half their pixels unmasked are left out.
    """
    ny, nx = (image.shape[0] // cell_px) * cell_px, (image.shape[1] // cell_px) * cell_px
    if ny == 0 or nx == 0:
        return image[~mask].astype(np.float64)
    shape = (ny // cell_px, cell_px, nx // cell_px, cell_px)
    if not mask[:ny, :nx].any():
        vals = image[:ny, :nx].reshape(shape).transpose(0, 2, 1, 3)
        return np.median(vals.reshape(-1, cell_px * cell_px), axis=1)
    vals = np.where(mask[:ny, :nx], np.nan, image[:ny, :nx]).reshape(shape)
    vals = vals.transpose(0, 2, 1, 3).reshape(-1, cell_px * cell_px)
    keep = np.isfinite(vals).sum(axis=1) >= cell_px * cell_px / 2
    return np.nanmedian(vals[keep], axis=1) if keep.any() else np.empty(0)


def sky_reference(binned: np.ndarray, mask: np.ndarray, cell_px: int) -> float:
    """The most common sky level of a binned frame (ADU).

    The half-sample mode of cell medians: on a frame partly covered by cloud or glow it
    is the level of the undisturbed part, where the median would fall between the two.
    """
    cells = cell_medians(binned, mask, cell_px)
    return half_sample_mode(cells) if cells.size else math.nan


def normalize_frame(binned: np.ndarray, mask: np.ndarray, params: ScoreParams | None = None
                    ) -> tuple[np.ndarray, float, float]:
    """Subtract the sky, divide by the normalisation unit, compress with asinh.

    ``out = a * asinh((x - sky) / (unit * a))`` with ``a = params.asinh_soft`` and
    ``unit = max(noise, params.rel_floor * |sky|)``: linear for sky structure, logarithmic
    for stars, so the network sees the structure of the sky and not its absolute level.
    Masked pixels read as sky (0).

    Returns
    -------
    image, sky_adu, unit_adu
        The normalised frame (float32) and the two constants used.

    Raises
    ------
    QualityError
        When too few pixels are unmasked or the noise is zero or undefined.
    """
    params = params or ScoreParams()
    good_fraction = float(1.0 - mask.mean())
    if good_fraction < MIN_GOOD_FRACTION:
        raise QualityError("autoencoder: too few unmasked pixels to score",
                           good_fraction=good_fraction)
    sky = sky_reference(binned, mask, params.cell_px)
    noise = robust_noise(binned, mask)
    if not (math.isfinite(noise) and noise > 0 and math.isfinite(sky)):
        raise QualityError("autoencoder: sky noise is zero or undefined", noise=noise)
    unit = max(noise, params.rel_floor * abs(sky))
    a = float(params.asinh_soft)
    x = (binned - np.float32(sky)) / np.float32(unit * a)
    out = np.float32(a) * np.arcsinh(x, dtype=np.float32)
    out[mask] = 0.0
    return out.astype(np.float32, copy=False), sky, unit


def patchify(image: np.ndarray, patch_px: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Cut a 2-D frame into non-overlapping patches on a regular grid.

    The frame is padded by reflection to a multiple of ``patch_px``.

    Returns
    -------
    patches, grid
        Array (N, 1, patch_px, patch_px) in row-major grid order, and the grid shape
        ``(ceil(ny / patch_px), ceil(nx / patch_px))``.
    """
    ny, nx = image.shape
    py, px = -ny % patch_px, -nx % patch_px
    if py or px:
        image = np.pad(image, ((0, py), (0, px)), mode="reflect" if min(ny, nx) > 1
                       else "edge")
    gy, gx = image.shape[0] // patch_px, image.shape[1] // patch_px
    patches = (image.reshape(gy, patch_px, gx, patch_px).transpose(0, 2, 1, 3)
               .reshape(gy * gx, 1, patch_px, patch_px))
    return np.ascontiguousarray(patches, dtype=np.float32), (gy, gx)


# ---------------------------------------------------------------------------- scoring


def patch_errors(x: torch.Tensor, recon: torch.Tensor, params: ScoreParams | None = None
                 ) -> torch.Tensor:
    """Per-patch reconstruction error: the mean absolute cell median of the residual.

    The residual ``x - recon`` is clipped at ``params.residual_clip``; its median over
    each ``cell_px`` x ``cell_px`` cell measures the sky structure left unexplained there
    (pixel noise and star cores average away); the patch score is the mean of their
    absolute values.

    Parameters
    ----------
    x, recon
        Tensors (N, 1, p, p); ``p`` must be a multiple of ``params.cell_px``.

    Returns
    -------
    torch.Tensor
        Shape (N,).
    """
    params = params or ScoreParams()
    c = params.cell_px
    n, _, h, w = x.shape
    if h % c or w % c:
        raise ValueError(f"patch side {h}x{w} is not a multiple of cell_px={c}")
    r = (x - recon).clamp(-params.residual_clip, params.residual_clip)
    cells = r.reshape(n, h // c, c, w // c, c).permute(0, 1, 3, 2, 4).reshape(n, -1, c * c)
    return cells.median(dim=2).values.abs().mean(dim=1)


SCORE_BATCH = 256
"""Patches per forward pass: a batch's activations stay in the CPU cache (a 4k frame
scores about a quarter faster than in batches of 1024)."""


def score_patches(model: torch.nn.Module, patches: np.ndarray, *,
                  params: ScoreParams | None = None,
                  batch_size: int = SCORE_BATCH) -> np.ndarray:
    """Reconstruction error of every patch (N, 1, p, p) -> (N,) float32."""
    out = np.empty(len(patches), dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(patches), batch_size):
                x = torch.from_numpy(patches[start:start + batch_size])
                out[start:start + len(x)] = patch_errors(x, model(x), params).numpy()
    finally:
        model.train(was_training)
    return out


def score_map(model: torch.nn.Module, binned: np.ndarray, patch_px: int, *,
              params: ScoreParams | None = None, batch_size: int = SCORE_BATCH) -> np.ndarray:
    """Per-patch reconstruction error of a normalised binned frame.

    Parameters
    ----------
    model
        The autoencoder.
    binned
        Normalised binned frame (:func:`normalize_frame`).
    patch_px
        Patch side (binned pixels).
    params
        Score constants (the cell size and residual cap).

    Returns
    -------
    numpy.ndarray
        float32 map of shape ``(ceil(ny / patch_px), ceil(nx / patch_px))``.
    """
    patches, grid = patchify(binned, patch_px)
    return score_patches(model, patches, params=params, batch_size=batch_size).reshape(grid)


def _structure(radius: int) -> np.ndarray:
    return ndimage.iterate_structure(ndimage.generate_binary_structure(2, 2), radius)


def open_scores(score_map: np.ndarray, close_px: int) -> np.ndarray:
    """Grey-level opening of a score map with the structuring element of :func:`make_mask`.

    Thresholding the result at ``t`` gives the opening of ``score_map > t``: it is the
    score a patch keeps once isolated high patches are removed, and what the threshold is
    calibrated on. The map is extended by edge replication, so that regions touching the
    detector edge are not eroded there. NaN (not scored) counts as the lowest score.
    """
    smap = np.nan_to_num(np.asarray(score_map, dtype=np.float64), nan=-np.inf)
    if close_px <= 0:
        return smap
    return _extended(ndimage.grey_opening, smap, int(close_px))


def _extended(operation, image: np.ndarray, radius: int) -> np.ndarray:
    """A morphological ``operation`` on ``image`` extended without end by edge
    replication (a margin of twice the radius makes the inside exact)."""
    m = 2 * radius
    out = operation(np.pad(image, m, mode="edge"), footprint=_structure(radius))
    return out[m:-m, m:-m]


def make_mask(score_map: np.ndarray, threshold: float, close_px: int) -> np.ndarray:
    """Threshold a score map and clean it by opening then closing.

    Opening removes masked regions smaller than ``2 * close_px + 1`` patches on a side
    (an isolated bright star or galaxy); closing then fills holes of up to ``2 *
    close_px`` patches inside a masked region. The structuring element is a square; the
    map is extended by edge replication, so that regions touching the detector edge are
    neither eroded nor grown there.

    Parameters
    ----------
    score_map
        Per-patch scores (NaN: not scored, never masked).
    threshold
        Patches scoring above it are candidates.
    close_px
        Radius (patches) of the structuring element; 0: no cleaning.

    Returns
    -------
    numpy.ndarray
        bool, same shape as ``score_map``.
    """
    opened = open_scores(score_map, close_px) > threshold
    if close_px <= 0 or not opened.any():
        return opened
    return _extended(ndimage.grey_closing, opened.astype(np.uint8), int(close_px)) > 0


def patch_grid(shape: tuple[int, int], block_px: int) -> tuple[int, int]:
    """Cells (gy, gx) of the score map and mask of a detector of ``shape`` (ny, nx): a
    partial patch at an edge counts as a cell."""
    return -(-int(shape[0]) // block_px), -(-int(shape[1]) // block_px)


def score_variables(block_px: int, max_shape: tuple[int, int]) -> dict[str, tuple]:
    """Array-store variables of a scored detector (``ae_score_map``, ``ae_mask``) for
    detectors up to ``max_shape`` (ny, nx): name -> (per-detector shape, dimension names,
    dtype, fill value)."""
    grid = patch_grid(max_shape, block_px)
    return {"ae_score_map": (grid, ("patch_y", "patch_x"), "float32", np.nan),
            "ae_mask": (grid, ("patch_y", "patch_x"), "uint8", 0)}


def upsample_mask(patch_mask: np.ndarray, block_px: int, shape: tuple[int, int]
                  ) -> np.ndarray:
    """A patch mask at full resolution (for FITS masks and IoU).

    Parameters
    ----------
    patch_mask
        bool (gy, gx) patch mask.
    block_px
        Full-resolution side of one patch, ``bin_factor * patch_px``.
    shape
        Detector shape (ny, nx); it must lie within the grid's coverage.
    """
    ny, nx = shape
    gy, gx = patch_mask.shape
    if gy * block_px < ny or gx * block_px < nx:
        raise ValueError(f"a {gy}x{gx} grid of {block_px}-pixel patches does not cover "
                         f"a {ny}x{nx} detector")
    rows = np.arange(ny) // block_px
    cols = np.arange(nx) // block_px
    return np.asarray(patch_mask, dtype=bool)[np.ix_(rows, cols)]


def masked_fraction(patch_mask: np.ndarray, block_px: int, shape: tuple[int, int]
                    ) -> float:
    """Share of a detector's pixels under a patch mask (partial edge patches weighted)."""
    ny, nx = shape
    gy, gx = patch_mask.shape
    h = np.minimum(block_px, ny - np.arange(gy) * block_px).clip(0)
    w = np.minimum(block_px, nx - np.arange(gx) * block_px).clip(0)
    area = np.outer(h, w)
    return float((area * patch_mask).sum() / (ny * nx))


def score_detector(data: np.ndarray, mask: np.ndarray | None, scorer: Scorer,
                   cfg: AutoencoderConfig) -> AEResult:
    """Score one detector: bin, normalise, reconstruct, threshold and clean.

    The binning, patch size and normalisation constants are the ones the weights were
    trained with (``scorer``); ``cfg`` gives the mask quantile and the cleaning radius.

    Parameters
    ----------
    data
        Full-resolution detector pixels (ADU).
    mask
        True for pixels not to use (saturated, non-finite, bad), or None.
    scorer
        Model and calibration (:func:`survey_qa.models.weights.load_scorer`).
    cfg
        The autoencoder configuration block.

    Raises
    ------
    QualityError
        When the detector cannot be normalised (almost all masked, zero noise).
    """
    threshold = scorer.threshold_at(cfg.threshold_quantile)
    binned, bmask = bin_frame(data, mask, scorer.bin_factor)
    image, sky, unit = normalize_frame(binned, bmask, scorer.params)
    smap = score_map(scorer.model, image, scorer.patch_px, params=scorer.params)
    patch_mask = make_mask(smap, threshold, cfg.close_px)
    block = scorer.block_px
    shape = np.shape(data)
    return AEResult(score_map=smap, mask=patch_mask,
                    ae_score=float(np.mean(smap) / scorer.score_ref),
                    mask_fraction=masked_fraction(patch_mask, block, shape),
                    threshold=threshold, block_px=block, sky_adu=sky, scale_adu=unit)
