"""Masks of the damaged sky, from the field's other frames and the autoencoder.

The spec counts two kinds of damage to the sky of a detector: light that the sky or the
instrument adds (a gradient, scattered light, a glow) and patchy extinction (cloud). A
region is damaged where the added light exceeds :data:`EXCESS_LIMIT` (5 %) of the frame's
clean sky, or the extinction exceeds the frame's clearest part by
:data:`EXTINCTION_LIMIT_MAG` (0.1 mag). A frame of a field observed many times measures
both against the field's other frames:

- **Extinction** (:func:`extinction_map`). The matched stars' magnitudes against the
  field's reference magnitudes give the extinction at each star. A cloud also changes the
  sky it covers (it hides the sky behind it and adds the light it reflects), so where the
  stars' extinction follows the frame's sky contrast (its ``sky / template`` over its
  median; :func:`sky_slope`, significant on the frame itself or pooled over the field's
  cloudy frames: :func:`field_slopes`), the sky traces the extinction on the sky map's
  cells, far finer than the stars of a sparse field. Otherwise, with at least
  :data:`MIN_MAP_STARS` stars, the stars' extinctions are smoothed by a Gaussian kernel.
  The frame's clear level is subtracted.
- **Added light** (:func:`excess_map`), on frames measured without patchy cloud
  (extinction spread ``k`` under :data:`POOLED_SPREAD_MAG`: under cloud the sky changes
  for another reason; a frame whose ``k`` is unknown gets no added-light map).
  Each frame's coarse sky map (the background stage's) is divided by the field's *sky
  template*, the per-cell median of its frames' maps normalised to their medians
  (:func:`field_template`): what the optics and a sky that stays do to every frame. What
  is left is the frame's clean level times one plus the light it adds. The clean level
  (:func:`sky_levels`) is the frame's own low level, or, where light covers the whole
  detector, the level of the field's flat-skied frames before and after it, interpolated
  in time.

The frame's mask (:func:`frame_mask`, :data:`MASK_GRID` x :data:`MASK_GRID` cells) is
where either map passes its limit, and every region of the autoencoder's mask that the
maps do not see at all: light that stays on every frame of the field (an amplifier glow,
light pollution from one side all night) is part of the template, and a cloud that the
sky does not trace on a field of few stars leaves no map; the autoencoder sees those. A
region that the maps see is theirs: they tell where its damage stops, which the
autoencoder's coarse cells do not.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from survey_qa.pipeline import sequence

EXCESS_LIMIT = 0.05
"""Added light that damages the sky, as a share of the frame's clean sky level."""

EXTINCTION_LIMIT_MAG = 0.1
"""Extinction beyond the frame's clearest part that damages the sky (mag)."""

MASK_GRID = 128
"""Cells along each side of a mask (fewer on a detector of fewer pixels)."""

MIN_MAP_STARS = 100
"""Fewest matched stars that map a frame's extinction without its sky."""

MAP_GRID = 64
"""Cells along each side of the smoothed extinction map (then interpolated)."""

MIN_CLEAR_CELLS = 16
"""Fewest clear cells of a frame's sky map that give its own level."""

LEVEL_QUANTILE = 10.0
"""Percentile of a frame's ``sky / template`` cells that is its own clean level."""

CLEAR_QUANTILE = 5.0
"""Percentile of a frame's extinction map that is its clear level."""

SIGNIFICANCE = 3.0
"""Extinction counts where it exceeds this many times the error of the smoothed map."""

MIN_TRACE_STARS = 8
"""Fewest matched stars that calibrate the extinction traced by the sky."""

TRACE_SIGNIFICANCE = 5.0
"""The sky traces the extinction when the slope of the stars' extinction on the sky is
this many times its error."""

EXTINCTION_FLOOR_MAG = 0.02
"""Added in quadrature to a star's photometric error in that fit (PSF and aperture
differences between frames), and the least residual scatter it assumes."""

CLIP_SIGMA = 3.0
"""Stars this many residual scatters off the fitted line are left out of it."""

POOLED_SPREAD_MAG = 0.1
"""Frames of a field whose extinction spread ``k`` reaches this share the field's slope of
extinction on sky; frames under it are measured for added light."""

CLEAR_SHARE = 0.5
"""A cell is clear sky (it gives the frame's clean sky level) where its extinction is
below this share of the limit."""


def mask_grid(shape: tuple[int, int]) -> tuple[int, int]:
    """(rows, columns) of the mask of a detector of ``shape`` (ny, nx)."""
    return min(MASK_GRID, shape[0]), min(MASK_GRID, shape[1])


def fill_missing(values: np.ndarray) -> np.ndarray:
    """A map with every NaN cell given the value of its nearest finite cell (all NaN
    stays NaN)."""
    values = np.asarray(values, np.float64)
    bad = ~np.isfinite(values)
    if not bad.any() or bad.all():
        return values.copy()
    index = ndimage.distance_transform_edt(bad, return_distances=False, return_indices=True)
    return values[tuple(index)]


def resample(values: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """A map of cell values over a detector, bilinearly interpolated onto ``grid`` cells
    over the same detector (cell centres to cell centres, edges held)."""
    gy, gx = values.shape
    y = (np.arange(grid[0]) + 0.5) * gy / grid[0] - 0.5
    x = (np.arange(grid[1]) + 0.5) * gx / grid[1] - 0.5
    yy, xx = np.meshgrid(y, x, indexing="ij")
    return ndimage.map_coordinates(values, [yy, xx], order=1, mode="nearest")


# ---------------------------------------------------------------------------- added light


def field_template(sky_maps: list[np.ndarray]) -> np.ndarray | None:
    """The per-cell median of the maps normalised to their medians, normalised to median 1
    and filled (:func:`fill_missing`); None without a map of positive median."""
    usable = []
    for m in sky_maps:
        m = np.asarray(m, np.float64)
        finite = m[np.isfinite(m)]
        if finite.size and np.median(finite) > 0:
            usable.append(m / np.median(finite))
    if not usable:
        return None
    stack = np.stack(usable)
    with np.errstate(all="ignore"):
        template = np.full(stack.shape[1:], np.nan)
        seen = np.isfinite(stack).any(axis=0)
        template[seen] = np.nanmedian(stack[:, seen], axis=0)
    finite = template[np.isfinite(template)]
    if not finite.size or not np.median(finite) > 0:
        return None
    return fill_missing(template / np.median(finite))


def _own_level(ratio: np.ndarray, clear: np.ndarray | None) -> tuple[float, bool]:
    """A frame's own clean level (:data:`LEVEL_QUANTILE` of its clear cells, all cells
    when ``clear`` is None or marks too few) and whether its sky is flat (the other end
    within :data:`EXCESS_LIMIT` of it)."""
    use = np.isfinite(ratio)
    if clear is not None and np.count_nonzero(use & clear) >= MIN_CLEAR_CELLS:
        use &= clear
    if not use.any():
        return math.nan, False
    low, high = np.percentile(ratio[use], [LEVEL_QUANTILE, 100.0 - LEVEL_QUANTILE])
    return float(low), bool(low > 0 and high < low * (1.0 + EXCESS_LIMIT))


def _between(levels: list[float], t: np.ndarray, i: int, flat: list[int]) -> float | None:
    """The level at frame ``i`` interpolated (log-linear in time) between the nearest
    frames of ``flat`` before and after it, or None without both."""
    before = [j for j in flat if j < i]
    after = [j for j in flat if j > i]
    if not before or not after:
        return None
    a, b = before[-1], after[0]
    w = (t[i] - t[a]) / (t[b] - t[a]) if t[b] > t[a] else 0.5
    return math.exp((1 - w) * math.log(levels[a]) + w * math.log(levels[b]))


def sky_levels(ratios: list[np.ndarray], times: list[float],
               clear: list[np.ndarray | None] | None = None) -> list[float]:
    """The clean sky level of each frame of a field (module notes).

    Parameters
    ----------
    ratios
        Each frame's ``sky map / template``, in time order.
    times
        Their times (any unit, increasing; NaN where unknown: the frame order is used).
    clear
        Each frame's cells of clear sky (extinction below half its limit, on the
        ratios' grid), or None.

    Returns
    -------
    list of float
        A flat-skied frame's own level. A frame with more light on one part than another
        (light added over all of it, or cloud that dims the sky where it lies) gets the
        level interpolated between the flat-skied frames before and after it where that
        differs from its own by more than the interpolation misses the level of those two
        frames themselves (a sky that brightens or fades unevenly, as in twilight); else
        its own level.
    """
    clear = clear or [None] * len(ratios)
    own = [_own_level(r, c) for r, c in zip(ratios, clear)]
    levels = [level for level, _ in own]
    t = np.asarray(times, float)
    if not np.isfinite(t).all():
        t = np.arange(len(ratios), dtype=float)
    flat = [i for i, (level, is_flat) in enumerate(own) if is_flat]
    out = []
    for i, (level, is_flat) in enumerate(own):
        guess = None if is_flat or not math.isfinite(level) else _between(levels, t, i, flat)
        if guess is not None:
            near = [j for j in flat if j < i][-1:] + [j for j in flat if j > i][:1]
            misses = [abs(levels[j] / g - 1.0) for j in near
                      if (g := _between(levels, t, j, [k for k in flat if k != j]))]
            if len(misses) == len(near) and abs(level / guess - 1.0) > max(misses):
                level = guess
        out.append(level)
    return out


def excess_map(sky_map: np.ndarray, template: np.ndarray, level: float) -> np.ndarray:
    """Light added to a frame's sky as a share of its clean level: ``sky / (template *
    level) - 1`` (NaN cells filled from their neighbours)."""
    with np.errstate(all="ignore"):
        return fill_missing(np.asarray(sky_map, np.float64) / (template * level) - 1.0)


# ---------------------------------------------------------------------------- extinction


def at_stars(values: np.ndarray, xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A map's values (cells evenly over a detector of ``shape``) at pixel positions
    ``xy`` (N, 2), bilinearly interpolated."""
    gy, gx = values.shape
    rows = xy[:, 1] * gy / shape[0] - 0.5
    cols = xy[:, 0] * gx / shape[1] - 0.5
    return ndimage.map_coordinates(values, [rows, cols], order=1, mode="nearest")


def sky_contrast(ratio: np.ndarray) -> np.ndarray | None:
    """A frame's ``sky / template`` over its median, minus one (NaN cells filled); None
    without a positive median."""
    finite = ratio[np.isfinite(ratio)]
    if not finite.size or not np.median(finite) > 0:
        return None
    return fill_missing(ratio / np.median(finite) - 1.0)


def _group_means(values: np.ndarray, w: np.ndarray, group: np.ndarray) -> np.ndarray:
    total = np.bincount(group, w)
    with np.errstate(all="ignore"):
        return np.bincount(group, w * values) / total


def sky_slope(contrasts: list[np.ndarray], stars: list[sequence.ExtinctionStars],
              shape: tuple[int, int]) -> tuple[float, float]:
    """The slope of the stars' extinction on the sky's contrast over frames of a field.

    Weighted least squares ``extinction = a_f + b x`` over the matched stars of the given
    frames, an intercept ``a_f`` per frame, ``x`` the frame's :func:`sky_contrast` at the
    star (weights ``1 / (sigma^2 + floor^2)``; stars :data:`CLIP_SIGMA` residual scatters
    off left out, three times).

    Returns
    -------
    b, significance
        The slope (mag per unit of sky contrast) and ``|b|`` over its error from the
        residual scatter; (0, 0) with fewer than :data:`MIN_TRACE_STARS` stars.
    """
    xs, ys, ws, groups = [], [], [], []
    for f, (contrast, st) in enumerate(zip(contrasts, stars)):
        use = np.isfinite(st.extinction_mag) & np.isfinite(st.sigma_mag)
        xs.append(at_stars(contrast, st.xy[use], shape))
        ys.append(st.extinction_mag[use])
        ws.append(1.0 / (st.sigma_mag[use] ** 2 + EXTINCTION_FLOOR_MAG ** 2))
        groups.append(np.full(int(use.sum()), f))
    x, y, w, g = (np.concatenate(v) if v else np.zeros(0) for v in (xs, ys, ws, groups))
    g = g.astype(int)
    keep = np.ones(len(x), bool)
    for _ in range(3):
        if keep.sum() < MIN_TRACE_STARS:
            return 0.0, 0.0
        xt = x - _group_means(x, w * keep, g)[g]
        yt = y - _group_means(y, w * keep, g)[g]
        sxx = float(np.sum((w * xt ** 2)[keep]))
        if not sxx > 0:
            return 0.0, 0.0
        b = float(np.sum((w * xt * yt)[keep])) / sxx
        resid = yt - b * xt
        scatter = max(1.4826 * float(np.median(np.abs(resid[keep]))), EXTINCTION_FLOOR_MAG)
        keep = np.abs(resid) < CLIP_SIGMA * scatter
    dof = int(keep.sum()) - len(np.unique(g[keep])) - 1
    if dof < 1 or keep.sum() < MIN_TRACE_STARS:
        return 0.0, 0.0
    chi2 = float(np.sum((w * resid ** 2)[keep])) / dof
    error = math.sqrt(chi2 / sxx)
    return b, abs(b) / error if error > 0 else 0.0


def sky_traced_extinction(contrast: np.ndarray, stars: sequence.ExtinctionStars,
                          slope: float, shape: tuple[int, int]) -> np.ndarray:
    """The extinction over a frame traced by its sky: ``a + slope x`` on the sky map's
    cells, ``x`` the frame's :func:`sky_contrast` and ``a`` the median of its matched
    stars' ``extinction - slope x``."""
    use = np.isfinite(stars.extinction_mag) & np.isfinite(stars.sigma_mag)
    offset = stars.extinction_mag[use] - slope * at_stars(contrast, stars.xy[use], shape)
    return float(np.median(offset)) + slope * contrast


def extinction_map(stars: sequence.ExtinctionStars, shape: tuple[int, int], sigma_px: float,
                   contrast: np.ndarray | None = None, slope: float | None = None
                   ) -> np.ndarray | None:
    """A frame's extinction beyond its clearest part (mag).

    Traced by the sky (:func:`sky_traced_extinction`, on the sky map's cells) when a
    ``slope`` and the frame's ``contrast`` are given; else the matched stars' extinctions
    smoothed with weights ``1 / (sigma^2 + floor^2)``
    (:func:`survey_qa.pipeline.sequence.smooth_map`, :data:`MAP_GRID` cells), a cell whose
    value is less than :data:`SIGNIFICANCE` times its error reading 0 (no evidence of
    extinction: a sparse field's map is noisy). The clear
    level, the map's :data:`CLEAR_QUANTILE`-th percentile, is subtracted. None without a
    star, or with fewer than :data:`MIN_MAP_STARS` and no slope.
    """
    ok = np.isfinite(stars.extinction_mag) & np.isfinite(stars.sigma_mag) & (stars.sigma_mag > 0)
    if not ok.any():
        return None
    if slope is not None and contrast is not None:
        traced = sky_traced_extinction(contrast, stars, slope, shape)
        return traced - np.percentile(traced, CLEAR_QUANTILE)
    if ok.sum() < MIN_MAP_STARS:
        return None
    xy, values = stars.xy[ok], stars.extinction_mag[ok]
    weights = 1.0 / (stars.sigma_mag[ok] ** 2 + EXTINCTION_FLOOR_MAG ** 2)
    smooth, error = sequence.smooth_map(xy, values, weights, shape, sigma_px, grid=MAP_GRID,
                                        with_error=True)
    if not np.isfinite(smooth).any():
        return None
    smooth = smooth - np.nanpercentile(smooth, CLEAR_QUANTILE)
    smooth[smooth < SIGNIFICANCE * error] = 0.0
    return fill_missing(smooth)


def field_slopes(contrasts: list[np.ndarray | None],
                 stars: list[sequence.ExtinctionStars | None], spreads: list[float],
                 shape: tuple[int, int]) -> list[float | None]:
    """The slope that traces each frame's extinction by its sky, or None (module notes).

    A frame's own slope (:func:`sky_slope`) where it is :data:`TRACE_SIGNIFICANCE` times its
    error; else, for a frame whose extinction spread ``k`` is at least
    :data:`POOLED_SPREAD_MAG`, the slope pooled over all such frames of the field, where
    that is significant (one night's clouds change the sky alike; a frame's own stars are
    often too few to tell).
    """
    usable = [c is not None and st is not None for c, st in zip(contrasts, stars)]
    cloudy = {f for f, ok in enumerate(usable) if ok and spreads[f] >= POOLED_SPREAD_MAG}
    pooled, pooled_significance = sky_slope([contrasts[f] for f in sorted(cloudy)],
                                            [stars[f] for f in sorted(cloudy)], shape)
    out = []
    for f, ok in enumerate(usable):
        slope = None
        if ok:
            own, significance = sky_slope([contrasts[f]], [stars[f]], shape)
            if significance >= TRACE_SIGNIFICANCE:
                slope = own
            elif f in cloudy and pooled_significance >= TRACE_SIGNIFICANCE:
                slope = pooled
        out.append(slope)
    return out


# ---------------------------------------------------------------------------- the mask


def ae_cells(patch_mask: np.ndarray, block_px: int, shape: tuple[int, int]) -> np.ndarray:
    """The autoencoder's patch mask (cells of ``block_px`` pixels from the detector's
    origin) sampled at the centres of the cells of :func:`mask_grid`."""
    grid = mask_grid(shape)
    rows = ((np.arange(grid[0]) + 0.5) * shape[0] / grid[0]).astype(int) // block_px
    cols = ((np.arange(grid[1]) + 0.5) * shape[1] / grid[1]).astype(int) // block_px
    patch_mask = np.asarray(patch_mask, bool)
    rows, cols = rows.clip(0, patch_mask.shape[0] - 1), cols.clip(0, patch_mask.shape[1] - 1)
    return patch_mask[np.ix_(rows, cols)]


def frame_mask(shape: tuple[int, int], excess: np.ndarray | None,
               extinction: np.ndarray | None, ae: np.ndarray | None) -> np.ndarray:
    """The damaged cells of one detector (module notes), a bool array of
    :func:`mask_grid`.

    Parameters
    ----------
    shape
        (ny, nx) of the detector.
    excess, extinction
        :func:`excess_map` and :func:`extinction_map` (any grids), or None where not
        measured.
    ae
        The autoencoder's mask on the mask's cells (:func:`ae_cells`), or None.
    """
    grid = mask_grid(shape)
    damaged = np.zeros(grid, bool)
    for values, limit in ((excess, EXCESS_LIMIT), (extinction, EXTINCTION_LIMIT_MAG)):
        if values is not None:
            damaged |= resample(values, grid) > limit
    if ae is None or not ae.any():
        return damaged
    labels, _ = ndimage.label(ae)
    seen = np.unique(labels[damaged & (labels > 0)])
    return damaged | ((labels > 0) & ~np.isin(labels, seen))


def field_masks(shape: tuple[int, int], sky_maps: list[np.ndarray | None], times: list[float],
                stars: list[sequence.ExtinctionStars | None], spreads: list[float],
                ae: list[np.ndarray | None], sigma_px: float) -> list[np.ndarray]:
    """The masks of the frames of one field, in time order (module notes).

    Parameters
    ----------
    shape
        (ny, nx) of the detectors.
    sky_maps
        Each frame's coarse sky map (ADU), or None.
    times
        Their times (:func:`sky_levels`).
    stars
        Each frame's matched stars (``extinction_stars`` of
        :func:`survey_qa.pipeline.sequence.field_records`), or None where it was not
        matched.
    spreads
        Each frame's extinction spread ``k`` (mag, NaN where not measured).
    ae
        Each frame's autoencoder cells (:func:`ae_cells`), or None.
    sigma_px
        Smoothing of the extinction maps (Gaussian sigma, pixels).
    """
    template = field_template([m for m in sky_maps if m is not None])
    ratios = [np.full((1, 1), np.nan) if m is None or template is None
              else np.asarray(m, np.float64) / template for m in sky_maps]
    contrasts = [sky_contrast(r) for r in ratios]
    slopes = field_slopes(contrasts, stars, spreads, shape)
    extinctions, clear = [], []
    for ratio, contrast, slope, frame_stars in zip(ratios, contrasts, slopes, stars):
        extinction = (None if frame_stars is None else
                      extinction_map(frame_stars, shape, sigma_px, contrast, slope))
        extinctions.append(extinction)
        clear.append(None if extinction is None or contrast is None else
                     resample(extinction, ratio.shape) < CLEAR_SHARE * EXTINCTION_LIMIT_MAG)
    levels = sky_levels(ratios, times, clear)
    masks = []
    for f, (sky_map, level, extinction, cells) in enumerate(zip(sky_maps, levels, extinctions,
                                                                 ae)):
        clear_sky = spreads[f] < POOLED_SPREAD_MAG
        excess = (excess_map(sky_map, template, level) if clear_sky and sky_map is not None
                  and template is not None and level > 0 else None)
        masks.append(frame_mask(shape, excess, extinction, cells))
    return masks


MASK_VARIABLES = {
    "defect_mask": ((MASK_GRID, MASK_GRID), ("mask_y", "mask_x"), "uint8", 0),
}
"""Array-store variable of a detector's mask (:func:`frame_mask`; a detector of fewer than
:data:`MASK_GRID` pixels on a side fills the first cells)."""


def detector_cells(stored: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A detector's mask (bool, :func:`mask_grid`) from its stored ``defect_mask`` (a
    detector of fewer than :data:`MASK_GRID` pixels on a side fills the first cells)."""
    gy, gx = mask_grid(shape)
    return np.asarray(stored)[:gy, :gx] > 0


def mask_fraction(mask: np.ndarray) -> float:
    """Share of the detector under a mask of :func:`mask_grid` (cells of equal area to
    within a pixel)."""
    return float(np.count_nonzero(mask) / mask.size)
