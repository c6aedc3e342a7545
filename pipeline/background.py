"""The smooth sky of one detector and its statistics.

What is computed
----------------
1. ``sep.Background`` on a mesh of ``box_px`` x ``box_px`` pixels, median-filtered over
   ``filter_size`` x ``filter_size`` meshes; masked pixels (non-finite, saturated, bad) do
   not enter it.
2. With ``mask_sources``, sources found above that first sky are masked and the mesh is
   estimated again, so that stars, their wings and galaxies do not lift the sky. Masked:
   pixels above ``SOURCE_MASK_SIGMA`` times the global noise that have such a neighbour,
   and the faint wings and halos found on the residual averaged over
   ``WING_BOX_PX`` x ``WING_BOX_PX`` blocks (``WING_SIGMA`` times the noise of such an
   average, i.e. about a third of the per-pixel noise), and disks over the far halos of
   bright detections, sized from their extent (``HALO_*``); the union is grown by
   ``SOURCE_MASK_GROW_PX``.
3. Noise-limited frames (a faint sky under a large read noise) get a coarser mesh. The
   non-uniformity that pure noise gives a mesh of side ``box`` is about
   ``NOISE_U_COEF * noise / (box * level)`` (measured on flat noise frames); when that
   exceeds ``NOISE_U_MAX`` the second estimate uses the smallest mesh that brings it
   down, a whole fraction of the shorter side with at least ``MIN_MESHES`` meshes.
4. From the smooth sky map ``B`` over the unmasked pixels (sampled on a regular sub-grid of
   at most ``MAX_SAMPLES`` points; ``B`` is smooth on the mesh scale, so the sub-grid loses
   nothing):

   - ``level = median(B)`` (ADU),
   - ``noise`` = sep's global RMS of the sky noise (ADU),
   - ``nonuniformity``: the spec's ``u = (P99(B) - P1(B)) / median(B)``, with the part
     that the noise of the mesh explains (:func:`noise_floor`) removed in quadrature; NaN
     when the median sky is below ``FAINT_SKY_NOISE`` times the per-pixel noise (a
     sky-subtracted frame), where the ratio means nothing.

5. The mesh adapts to the mask: sep uses a mesh only when at least half of its pixels are
   unmasked and silently returns a sky of 0 and a noise of 1 when no mesh is usable. The
   mesh is halved (down to ``MIN_BOX_PX``) while less than ``MIN_USABLE_SKY_FRACTION`` of
   the unmasked pixels lie in usable meshes (:func:`adapt_box`).
6. The result is checked against robust statistics of the source-free pixels
   (:func:`check_sky`): the median of ``data - B`` must be within ``SKY_CHECK_NOISE`` of
   their noise (1.4826 MAD), and sep's RMS within a factor ``NOISE_CHECK_RATIO`` of it.
   When it fails, the sky map is made again from sigma-clipped medians of the unmasked
   pixels of each mesh (:func:`clipped_mesh_sky`, qa flag ``SKY_FALLBACK``); when that
   fails too, or too few source-free pixels are left, level and noise are the
   sigma-clipped statistics of the unmasked pixels, the map is flat and the
   non-uniformity NaN (qa flag ``SKY_UNMEASURED``).

The input is bias-subtracted: the simulator writes calibrated frames and the reader
subtracts the overscan where the header names one, so ``median(B)`` is the sky itself.
Real extended emission (a nebula, a large galaxy) is part of ``B`` where it is smooth on
the mesh scale: the rule measurement cannot tell it from scattered light.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import sep
from scipy import ndimage

from astropy.stats import sigma_clipped_stats
from astropy.utils.exceptions import AstropyUserWarning

from survey_qa.config import BackgroundConfig
from survey_qa.pipeline.errors import QualityError
from survey_qa.pipeline.flags import bits
from survey_qa.pipeline.records import BackgroundResult

SOURCE_MASK_SIGMA = 2.0
"""Per-pixel threshold (in local sky RMS) of the source mask."""

WING_BOX_PX = 9
WING_SIGMA = 3.0
"""Block size and threshold (in the block mean's noise) that find faint wings and halos."""

SOURCE_MASK_GROW_PX = 2
"""The source mask is grown by this many pixels."""

HALO_SKY_FRACTION = 0.005
HALO_EXPONENT = 1.0 / 3.67
HALO_MAX_FACTOR = 4.0
HALO_MAX_PX = 256
HALO_MIN_AREA_PX = 64
HALO_MIN_SKY_FRACTION = 0.5
"""Halos of bright sources: a detection covering ``A >= HALO_MIN_AREA_PX`` pixels above
the per-pixel threshold (radius ``r``: half its largest extent, where its profile crosses
``SOURCE_MASK_SIGMA * noise``) is masked out to the radius where a profile falling as
``radius^(-1 / HALO_EXPONENT)`` (a Kolmogorov PSF's far wing, slower than any Moffat of
beta > 1.8) drops to ``HALO_SKY_FRACTION`` of the sky: ``r (threshold / (fraction *
level))^HALO_EXPONENT``, at most ``HALO_MAX_FACTOR r`` and ``r + HALO_MAX_PX``. The
disks shrink (down to the detections themselves) while they would leave less than
``HALO_MIN_SKY_FRACTION`` of the detector (a crowded field or a large-PSF frame)."""

MIN_SKY_FRACTION = 0.2
"""When the source mask leaves less sky than this, the first estimate is kept."""

NOISE_U_COEF = 7.0
NOISE_U_MAX = 0.01
"""Noise-limited mesh: pure noise gives u ~ NOISE_U_COEF * noise / (box * level)."""

FAINT_SKY_NOISE = 0.25
"""Below this many times the per-pixel noise, the sky level is taken for subtracted (or
lost in read noise): the relative non-uniformity is NaN then."""

MIN_MESHES = 3
"""A noise-limited mesh keeps at least this many meshes along the shorter side."""

MAX_SAMPLES = 1_000_000
"""At most this many pixels of the smooth sky enter its percentiles."""

GOOD_MESH_FRACTION = 0.5
"""sep uses a mesh only when at least this share of its pixels is unmasked."""

MIN_USABLE_SKY_FRACTION = 0.5
MIN_BOX_PX = 16
"""The mesh is halved, down to ``MIN_BOX_PX``, while less than ``MIN_USABLE_SKY_FRACTION``
of the unmasked pixels lie in meshes that sep can use."""

SKY_CHECK_NOISE = 1.0
NOISE_CHECK_RATIO = 1.5
"""A sky map is accepted when the median of ``data - sky`` over source-free pixels is within
``SKY_CHECK_NOISE`` times their noise (1.4826 MAD, 3-sigma clipped), and its RMS within a
factor ``NOISE_CHECK_RATIO`` of that noise. A right mesh sky is off by a few hundredths of
the noise; a failed one (sep's 0 and 1) by the whole sky."""

MIN_SKY_PIXELS = 400
MIN_MESH_SKY_PIXELS = 16
"""Fewer source-free pixels than ``MIN_SKY_PIXELS`` leave the sky unmeasured; a mesh of the
fallback map needs ``MIN_MESH_SKY_PIXELS`` of them."""

CHECK_SAMPLES = 50_000
"""At most this many source-free pixels enter the check's statistics."""


def _sep_background(data: np.ndarray, mask: np.ndarray, box_px: int,
                    cfg: BackgroundConfig) -> sep.Background:
    box = int(min(box_px, max(data.shape)))
    return sep.Background(data, mask=mask, bw=box, bh=box, fw=cfg.filter_size,
                          fh=cfg.filter_size)


def grow_mask(hot: np.ndarray, grow_px: int) -> np.ndarray:
    """Dilate a boolean map by a square of side ``2 grow_px + 1`` pixels.

    Same result as ``scipy.ndimage.binary_dilation`` with a square structuring element,
    done as separable shifted ORs (several times faster on a 4096 x 4096 map).

    Parameters
    ----------
    hot
        Boolean map.
    grow_px
        Half side of the square (pixels); 0 returns ``hot``.

    Returns
    -------
    numpy.ndarray
        The dilated map (a new array unless ``grow_px == 0``).
    """
    for axis in (0, 1):
        out = hot.copy()
        for k in range(1, grow_px + 1):
            lo = [slice(None)] * 2
            hi = [slice(None)] * 2
            lo[axis], hi[axis] = slice(k, None), slice(None, -k)
            out[tuple(lo)] |= hot[tuple(hi)]
            out[tuple(hi)] |= hot[tuple(lo)]
        hot = out
    return hot


def block_sum(image: np.ndarray, b: int, dtype=np.float32) -> np.ndarray:
    """Sums over b x b blocks (a partial last row or column of blocks is dropped).

    Strided sums: several times faster than a reshaped ``mean(axis=(1, 3))``.
    """
    ny, nx = (image.shape[0] // b) * b, (image.shape[1] // b) * b
    out = np.zeros((ny // b, nx // b), dtype=dtype)
    for i in range(b):
        for j in range(b):
            out += image[i:ny:b, j:nx:b]
    return out


def _wing_mask(resid: np.ndarray, noise: float) -> np.ndarray:
    """Pixels of blocks whose smoothed mean residual is significantly positive."""
    b = WING_BOX_PX // 3
    ny, nx = (resid.shape[0] // b) * b, (resid.shape[1] // b) * b
    binned = block_sum(resid, b) / (b * b)
    smooth = ndimage.uniform_filter(binned, size=3, mode="nearest")
    hot_blocks = smooth > WING_SIGMA * noise / WING_BOX_PX
    out = np.zeros(resid.shape, bool)
    out[:ny, :nx] = np.repeat(np.repeat(hot_blocks, b, axis=0), b, axis=1)
    return out


def source_mask(data: np.ndarray, back: np.ndarray, noise: float, level: float,
                mask: np.ndarray, thresh_sigma: float = SOURCE_MASK_SIGMA,
                grow_px: int = SOURCE_MASK_GROW_PX) -> np.ndarray:
    """Pixels covered by sources (and their faint wings) above a first sky estimate.

    Parameters
    ----------
    data
        Image (ADU), native float32.
    back
        First smooth sky of ``data`` (ADU).
    noise
        Global sky RMS (ADU).
    level
        Median sky (ADU): halos are masked down to a fraction of it.
    mask
        Pixels already excluded (True).
    thresh_sigma
        Per-pixel threshold in units of ``noise``.
    grow_px
        Dilation of the source pixels (pixels).

    Returns
    -------
    numpy.ndarray
        Boolean map, True on source pixels.
    """
    resid = np.subtract(data, back, dtype=np.float32)
    np.copyto(resid, 0.0, where=mask)
    hot = resid > thresh_sigma * noise
    # A single pixel above 2 sigma is noise: keep those with a hot 4-neighbour.
    neighbour = np.zeros_like(hot)
    neighbour[1:] |= hot[:-1]
    neighbour[:-1] |= hot[1:]
    neighbour[:, 1:] |= hot[:, :-1]
    neighbour[:, :-1] |= hot[:, 1:]
    hot &= neighbour
    found = _large_detections(hot)
    hot |= _wing_mask(resid, noise)
    hot = grow_mask(hot, grow_px)
    if found is None or not level > 0:
        return hot
    factor = min((thresh_sigma * noise / (HALO_SKY_FRACTION * level)) ** HALO_EXPONENT,
                 HALO_MAX_FACTOR)
    while factor > 1.0:  # shrink the halos until they leave enough sky
        with_halos = hot | _halo_disks(hot.shape, found, factor)
        if _sky_fraction(with_halos | mask) >= HALO_MIN_SKY_FRACTION:
            return with_halos
        factor = max(1.0, 0.75 * factor)
    return hot


def _sky_fraction(masked: np.ndarray) -> float:
    return 1.0 - np.count_nonzero(masked) / masked.size


def _large_detections(hot: np.ndarray) -> list[tuple[float, float, float]] | None:
    """(x, y, radius) of detections covering at least ``HALO_MIN_AREA_PX`` pixels.

    The radius is half the largest extent, not from the area: a saturated core is
    masked, so the detection of a bright star is a ring. None when there is none.
    """
    b = 4  # find them on 4 x 4 blocks: cheap, and enough for their size
    blocks = block_sum(hot, b, np.uint8) > b * b // 2
    labels, n = ndimage.label(blocks)
    if n == 0:
        return None
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:] * b * b
    boxes = ndimage.find_objects(labels)
    out = []
    for k in np.flatnonzero(area >= HALO_MIN_AREA_PX):
        sy, sx = boxes[k]
        out.append((0.5 * b * (sx.start + sx.stop) - 0.5, 0.5 * b * (sy.start + sy.stop) - 0.5,
                    0.5 * b * max(sy.stop - sy.start, sx.stop - sx.start)))
    return out or None


def _halo_disks(shape: tuple[int, int], found: list, factor: float) -> np.ndarray:
    """Disks of ``factor`` times each detection's radius (at most ``HALO_MAX_PX`` more)."""
    out = np.zeros(shape, bool)
    for x, y, r_core in found:
        _disk(out, x, y, min(factor * r_core, r_core + HALO_MAX_PX))
    return out


def _disk(out: np.ndarray, x: float, y: float, radius: float) -> None:
    """Set a disk of ``out`` to True (clipped to the array)."""
    y0, y1 = max(int(y - radius), 0), min(int(y + radius) + 2, out.shape[0])
    x0, x1 = max(int(x - radius), 0), min(int(x + radius) + 2, out.shape[1])
    if y1 <= y0 or x1 <= x0:
        return
    yy, xx = np.ogrid[y0:y1, x0:x1]
    out[y0:y1, x0:x1] |= (yy - y) ** 2 + (xx - x) ** 2 <= radius * radius


def noise_limited_box(box_px: int, noise: float, level: float, shape: tuple[int, int]) -> int:
    """The mesh size that keeps the non-uniformity from pure noise under ``NOISE_U_MAX``.

    Never smaller than ``box_px``. A larger mesh is a whole fraction of the shorter
    detector side (sep's last, partial mesh would otherwise be a noisy sliver), with at
    least ``MIN_MESHES`` meshes along it.
    """
    if not (level > 0 and noise > 0):
        return box_px
    needed = math.ceil(NOISE_U_COEF * noise / (NOISE_U_MAX * level))
    if needed <= box_px:
        return box_px
    side = min(shape)
    n_mesh = max(MIN_MESHES, side // needed)
    return int(max(box_px, math.ceil(side / n_mesh)))


def noise_floor(noise: float, level: float, box_px: int) -> float:
    """The non-uniformity pure noise gives a mesh of ``box_px``: NOISE_U_COEF noise / (box
    level)."""
    return NOISE_U_COEF * noise / (box_px * level) if level > 0 else math.nan


def remove_noise_floor(u_measured: float, u_noise: float) -> float:
    """``sqrt(u^2 - u_noise^2)`` (0 when the noise explains it all): spreads of independent
    parts add roughly in quadrature."""
    if not (math.isfinite(u_measured) and math.isfinite(u_noise)):
        return u_measured
    return math.sqrt(max(u_measured ** 2 - u_noise ** 2, 0.0))


def _sample_step(shape: tuple[int, int]) -> int:
    return max(1, math.ceil(math.sqrt(shape[0] * shape[1] / MAX_SAMPLES)))


def sky_statistics(back: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Median and ``(P99 - P1) / median`` of a smooth sky map over unmasked pixels.

    Parameters
    ----------
    back
        Smooth sky map (ADU).
    mask
        True where a pixel is not part of the detector's usable area.

    Returns
    -------
    level, nonuniformity
        ``level`` in ADU; ``nonuniformity`` dimensionless, NaN when ``level <= 0``.
    """
    step = _sample_step(back.shape)
    values = back[::step, ::step][~mask[::step, ::step]]
    if values.size == 0:
        raise QualityError("every pixel is masked: no sky to measure")
    p1, p50, p99 = np.percentile(values, [1.0, 50.0, 99.0])
    u = float((p99 - p1) / p50) if p50 > 0 else math.nan
    return float(p50), u


def _mesh_edges(n: int, box: int) -> np.ndarray:
    return np.arange(0, n, box)


def usable_sky_fraction(mask: np.ndarray, box_px: int) -> float:
    """Share of the unmasked pixels that lie in meshes sep can use.

    A mesh (the last one of a row or column may be partial) is usable when at least
    ``GOOD_MESH_FRACTION`` of its pixels are unmasked. 0 when every pixel is masked.
    """
    if not mask.any():
        return 1.0
    stride = next(k for k in (8, 4, 2, 1) if box_px % k == 0 and box_px // k >= 8
                  or k == 1)  # counts in stride x stride blocks: exact, and many times faster
    good = block_sum(~mask, stride, np.uint8) if stride > 1 else (~mask).astype(np.int32)
    good = good.astype(np.int32)
    box = box_px // stride
    ys, xs = _mesh_edges(good.shape[0], box), _mesh_edges(good.shape[1], box)
    counts = np.add.reduceat(np.add.reduceat(good, ys, axis=0), xs, axis=1)
    height = np.diff(np.append(ys, good.shape[0]))
    width = np.diff(np.append(xs, good.shape[1]))
    usable = counts >= GOOD_MESH_FRACTION * np.outer(height, width) * stride * stride
    total = counts.sum()
    return float(counts[usable].sum() / total) if total else 0.0


def adapt_box(mask: np.ndarray, box_px: int) -> int:
    """The mesh size, halved from ``box_px`` while sep could use too little of the sky.

    Parameters
    ----------
    mask
        True on pixels sep must not use (bad pixels and, for the second pass, sources).
    box_px
        The mesh size asked for (pixels).

    Returns
    -------
    int
        ``box_px``, or the largest halving of it (not below ``MIN_BOX_PX``) that puts at
        least ``MIN_USABLE_SKY_FRACTION`` of the unmasked pixels in usable meshes; the
        smallest size tried when none does.
    """
    box = int(box_px)
    while box > MIN_BOX_PX and usable_sky_fraction(mask, box) < MIN_USABLE_SKY_FRACTION:
        box = max(MIN_BOX_PX, box // 2)
    return box


def residual_statistics(data: np.ndarray, back: np.ndarray,
                        sky: np.ndarray) -> tuple[float, float, int]:
    """Median and noise of ``data - back`` over sky pixels, 3-sigma clipped.

    Parameters
    ----------
    data, back
        Image and smooth sky (ADU).
    sky
        True on source-free, unmasked pixels.

    Returns
    -------
    median, noise, n
        ADU; the noise is 1.4826 MAD of the clipped residuals; ``n`` the number of sky
        pixels. NaN when there are none.
    """
    step = _prime_step(sky.size / CHECK_SAMPLES, sky.shape[1])
    sub = sky.ravel()[::step]
    n = int(np.count_nonzero(sub)) * step
    if n == 0:
        return math.nan, math.nan, 0
    resid = np.ravel(data)[::step][sub] - np.ravel(back)[::step][sub]
    median, noise = clipped_median_noise(resid)
    return median, noise, n


def clipped_median_noise(values: np.ndarray, sigma: float = 3.0, iterations: int = 3
                         ) -> tuple[float, float]:
    """Median and 1.4826 MAD of ``values``, clipped ``iterations`` times at ``sigma``.

    The same statistics as astropy's ``sigma_clipped_stats(..., stdfunc="mad_std")``
    around the median, several times faster on the sizes used here.
    """
    values = np.asarray(values, np.float64)
    median, noise = math.nan, math.nan
    for _ in range(iterations):
        if values.size == 0:
            break
        median = float(np.median(values))
        noise = 1.4826 * float(np.median(np.abs(values - median)))
        if not noise > 0:
            break
        values = values[np.abs(values - median) <= sigma * noise]
    return median, noise


def _prime_step(at_least: float, row_px: int) -> int:
    """A prime stride over the raveled image, at least ``at_least``, that does not divide
    the row length: the sample walks across columns and rows and does not alias with a
    periodic mask (every other row, every tenth column)."""
    step = max(1, math.ceil(at_least))
    if step == 1:
        return 1
    while any(step % k == 0 for k in range(2, int(math.isqrt(step)) + 1)) or row_px % step == 0:
        step += 1
    return step


def check_sky(data: np.ndarray, back: np.ndarray, rms: float, sky: np.ndarray) -> bool:
    """Whether a smooth sky agrees with the robust statistics of the source-free pixels.

    See ``SKY_CHECK_NOISE`` and ``NOISE_CHECK_RATIO``; sep's signature of failure (a flat
    sky of 0 with an RMS of exactly 1) never passes.
    """
    median, noise, n = residual_statistics(data, back, sky)
    if n < MIN_SKY_PIXELS or not (math.isfinite(median) and noise > 0 and rms > 0):
        return False
    if rms == 1.0 and not np.any(back):
        return False
    return (abs(median) <= SKY_CHECK_NOISE * noise
            and 1.0 / NOISE_CHECK_RATIO <= rms / noise <= NOISE_CHECK_RATIO)


def clipped_mesh_sky(data: np.ndarray, sky: np.ndarray, box_px: int,
                     filter_size: int) -> np.ndarray | None:
    """A smooth sky from the sigma-clipped median of the sky pixels of each mesh.

    Meshes with fewer than ``MIN_MESH_SKY_PIXELS`` sky pixels take the value of the
    nearest mesh that has them; the mesh values are median-filtered over ``filter_size``
    meshes and interpolated bilinearly to full size.

    Parameters
    ----------
    data
        Image (ADU).
    sky
        True on source-free, unmasked pixels.
    box_px, filter_size
        Mesh size (pixels) and median filter (meshes).

    Returns
    -------
    numpy.ndarray or None
        Full-size float32 sky map; None when no mesh has enough sky pixels.
    """
    ny, nx = data.shape
    my, mx = math.ceil(ny / box_px), math.ceil(nx / box_px)
    padded = np.full((my * box_px, mx * box_px), np.nan, np.float32)
    padded[:ny, :nx] = np.where(sky, data, np.nan)
    blocks = padded.reshape(my, box_px, mx, box_px).transpose(0, 2, 1, 3).reshape(my, mx, -1)
    n_sky = np.count_nonzero(np.isfinite(blocks), axis=2)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyUserWarning)  # NaN marks masked pixels
        warnings.simplefilter("ignore", RuntimeWarning)  # meshes without a sky pixel
        _, medians, _ = sigma_clipped_stats(blocks, sigma=3.0, maxiters=5, axis=2)
    medians = np.asarray(medians, dtype=np.float64)
    ok = (n_sky >= MIN_MESH_SKY_PIXELS) & np.isfinite(medians)
    if not ok.any():
        return None
    nearest = ndimage.distance_transform_edt(~ok, return_distances=False, return_indices=True)
    meshes = medians[tuple(nearest)]
    if filter_size > 1:
        meshes = ndimage.median_filter(meshes, size=filter_size, mode="nearest")
    # mesh centres sit at (i + 0.5) box - 0.5 px; interpolate linearly between them
    rows = _linear(meshes, nx, box_px, axis=1)
    return _linear(rows, ny, box_px, axis=0)


def _linear(meshes: np.ndarray, n: int, box_px: int, axis: int) -> np.ndarray:
    """Linear interpolation of mesh values (centres at ``(i + 0.5) box - 0.5``) to ``n``
    pixels along ``axis``, constant beyond the outer centres."""
    m = meshes.shape[axis]
    c = np.clip((np.arange(n) + 0.5) / box_px - 0.5, 0.0, m - 1)
    i0 = np.floor(c).astype(int)
    i1 = np.minimum(i0 + 1, m - 1)
    w = (c - i0).astype(np.float32)
    a, b = np.take(meshes, i0, axis=axis), np.take(meshes, i1, axis=axis)
    w = w[None, :] if axis == 1 else w[:, None]
    return (a * (1 - w) + b * w).astype(np.float32)


def measure_background(data: np.ndarray, mask: np.ndarray | None,
                       cfg: BackgroundConfig) -> BackgroundResult:
    """Measure the smooth sky, its noise and its non-uniformity (see the module notes).

    Parameters
    ----------
    data
        Bias-subtracted image (ADU), 2-D. Converted to native float32 if needed.
    mask
        True where a pixel must not be used (non-finite, saturated, bad); None: none.
    cfg
        Background mesh settings.

    Returns
    -------
    BackgroundResult
        ``level`` (median smooth sky, ADU), ``noise`` (global sky RMS, ADU),
        ``nonuniformity`` ((P99 - P1) / median of the smooth sky over unmasked pixels),
        the full-size ``back`` and ``rms`` maps (float32), the mesh size used and the
        qa flags ``SKY_FALLBACK`` / ``SKY_UNMEASURED`` when the mesh sky failed its check.

    Raises
    ------
    QualityError
        When every pixel is masked.
    """
    data = np.ascontiguousarray(data, dtype=np.float32)
    mask = (np.zeros(data.shape, bool) if mask is None
            else np.ascontiguousarray(mask, dtype=bool))
    if mask.all():
        raise QualityError("every pixel is masked: no sky to measure")
    first_box = adapt_box(mask, cfg.box_px)
    bkg = _sep_background(data, mask, first_box, cfg)
    back = bkg.back()
    level, _ = sky_statistics(back, mask)
    box = noise_limited_box(first_box, float(bkg.globalrms), level, data.shape)
    second = mask
    if cfg.mask_sources:
        full = mask | source_mask(data, back, float(bkg.globalrms), level, mask)
        if _sky_fraction(full) > MIN_SKY_FRACTION:
            second = full
    box = adapt_box(second, box)
    if second is not mask or box != first_box:
        bkg = _sep_background(data, second, box, cfg)
    back = bkg.back().astype(np.float32, copy=False)
    noise = float(bkg.globalrms)
    rms = bkg.rms().astype(np.float32, copy=False)
    flags = 0
    if not check_sky(data, back, noise, ~second):
        flags = bits("SKY_FALLBACK")
        back, noise = _fallback_sky(data, second, box, cfg)
        rms = np.full(data.shape, noise, np.float32)
        if back is None:
            return _unmeasured(data, mask)
    level, u_measured = sky_statistics(back, mask)
    nonuniformity = remove_noise_floor(u_measured, noise_floor(noise, level, box))
    if not level >= FAINT_SKY_NOISE * noise:
        nonuniformity = math.nan  # a ratio to a sky lost in its noise means nothing
    return BackgroundResult(level=level, noise=noise, nonuniformity=nonuniformity,
                            back=back, rms=rms, mesh_px=box, qa_flags=flags)


def _fallback_sky(data: np.ndarray, masked: np.ndarray, box_px: int,
                  cfg: BackgroundConfig) -> tuple[np.ndarray | None, float]:
    """The clipped-median mesh sky and its noise, or (None, NaN) when it fails its check."""
    sky = ~masked
    if np.count_nonzero(sky) < MIN_SKY_PIXELS:
        return None, math.nan
    back = clipped_mesh_sky(data, sky, box_px, cfg.filter_size)
    if back is None:
        return None, math.nan
    _, noise, _ = residual_statistics(data, back, sky)
    if not check_sky(data, back, noise, sky):
        return None, math.nan
    return back, noise


def _unmeasured(data: np.ndarray, mask: np.ndarray) -> BackgroundResult:
    """A flat sky at the sigma-clipped statistics of the unmasked pixels (``SKY_UNMEASURED``):
    what source extraction needs, with a NaN non-uniformity."""
    values = data[~mask]
    values = values[:: max(1, values.size // CHECK_SAMPLES)]
    level, noise = clipped_median_noise(values, iterations=10)
    if not noise > 0:
        noise = float(np.std(values)) or 1.0
    return BackgroundResult(level=level, noise=noise, nonuniformity=math.nan,
                            back=np.full(data.shape, level, np.float32),
                            rms=np.full(data.shape, noise, np.float32), mesh_px=0,
                            qa_flags=bits("SKY_FALLBACK", "SKY_UNMEASURED"))
