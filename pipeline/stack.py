"""Registering and combining the frames of one field into a deep stack.

Pure functions: source positions, pixel arrays and per-frame numbers in; transforms,
resampled arrays, the stack and its per-frame counts out. Reading the catalogs and the
frames and writing the FITS file is the flow's business (:mod:`survey_qa.flows.stack`).

Registration
------------
A frame is registered to the reference frame of its field from its catalogued stars: the
star patterns are matched (:func:`survey_qa.pipeline.sequence.match_stars`: astroalign's
asterisms, then every star paired) and the similarity transform ``A`` that takes the frame's pixel
coordinates ``(x, y)`` to the reference's is kept as a 3 x 3 matrix. The frame is then
resampled onto the reference pixel grid (:func:`resample`, bilinear by default): every
output pixel takes the frame's value at ``A^-1 (x, y)``.

A frame whose star pattern does not match (too few stars: bad seeing, cloud) is registered
through its celestial WCS and the reference's where both have one (:class:`WcsMapping`,
:func:`register_by_wcs`): a frame pixel goes to the sky through the frame's WCS and from
the sky onto the reference grid through the reference's, with every distortion term the
two carry (SIP, TPV). The sources that this mapping brings within
:data:`survey_qa.pipeline.sequence.MATCH_TOLERANCE_PX` of a reference source are paired;
with at least :data:`MIN_WCS_PAIRS` pairs the similarity transform from their
WCS-predicted to their catalogued reference positions is fitted and applied after the WCS
mapping (a WCS fitted on another night's stars, or with a pointing error, is off by a
shift and a small rotation; the camera's distortion it describes stays right), and their
flux ratio gives the throughput. The frame is resampled through that mapping with the
``reproject`` package (:func:`reproject_frame`: ``reproject_interp``), in blocks of rows.
Either way the frame's bad-pixel mask goes along; an output pixel is masked when any
input pixel that enters its interpolation was masked or lay outside the frame. The mask
of the frame's damaged sky (cells of a coarse grid over the detector,
:mod:`survey_qa.pipeline.skymask`) joins the bad-pixel mask first, each pixel taking its
nearest cell (:func:`cells_to_pixels`).

Photometric scale and weight
----------------------------
The throughput ``t_i`` of frame *i* is the median flux ratio of its matched stars to the
same stars in the reference (``t < 1``: thinner sky, shorter exposure). Its sky-subtracted
pixels are multiplied by ``1 / t_i`` so that a star has the reference's flux in every
frame; its sky noise becomes ``sigma_i / t_i``. For a faint point source measured over
``~FWHM^2`` pixels the inverse-variance weight of the scaled frame is therefore::

    w_i = t_i^2 / (sigma_i^2 * FWHM_i^2)          (normalised to 1 for the best frame)

(:func:`quality_weights`); ``equal`` weighting gives every frame 1. ``sigma_i`` is the
noise per pixel that the frame shows on the scale of a star (:func:`star_scale_noise`:
boxes of about two FWHM): the sky noise on a clean frame, more where cloud or glow left
structure that the sky subtraction could not follow.

Combination
-----------
Per pixel, over the frames that are not masked there (:func:`combine`): the median of
the values is the first centre; a value lies off by more than ``sigma`` times its
expected scatter is rejected, the centre becomes the weighted mean of the values kept,
and this repeats up to ``iterations`` times (a rejection is final). The expected scatter
of frame *i* at a pixel is the larger of its noise and the pixel's robust scatter over the
frames (1.4826 MAD). The noise is the sky noise, the photon noise of the centre value
where the gain is known, and :data:`PROFILE_SCATTER` times the centre value: star cores
differ between frames of different seeing (and after interpolation) by far more than
their noise, and neither they nor the scatter of a few frames may clip them away. Pixels
with fewer than ``MIN_CLIP_FRAMES`` values are averaged without clipping.

The pixels are combined in blocks of rows (about :data:`BLOCK_VALUES` values of all frames
at once); the frames may live on disk (any array whose ``[:, rows]`` slice gives the rows
of every frame), so that the memory needed does not grow with their number.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from astropy.wcs.wcsapi.wrappers.base import BaseWCSWrapper
from scipy import ndimage

MIN_CLIP_FRAMES = 3
"""A pixel is clipped only where at least this many frames have a value."""

PROFILE_SCATTER = 0.25
"""Expected scatter of a pixel between frames, as a share of its value (module notes): the
core of a star sharper by a factor 1.15 in FWHM is a third brighter."""

MAD_TO_SIGMA = 1.4826
"""Standard deviation of a normal distribution over its median absolute deviation."""

MATCH_STARS = 2000
"""At most this many of the brightest catalogued stars of a frame enter the matching."""

REFERENCE_TOLERANCE_MAG = 0.1
"""The reference is the sharpest frame among those within this many magnitudes of the
most transparent frame."""

REFERENCE_MAX_FWHM_RATIO = 1.5
"""Frames with a FWHM above this many times the median of the field's are no reference."""

MIN_WCS_PAIRS = 3
"""Fewest sources paired through a WCS transform to refine it and scale the frame."""

MASK_TOLERANCE = 1e-3
"""An interpolated mask above this share of a masked input pixel masks the output pixel."""

REPROJECT_BLOCK_PX = 2 ** 18
"""Output pixels resampled through the WCS at once (bounds reproject's coordinate arrays)."""

BLOCK_VALUES = 2 ** 20
"""Values (frames x pixels) combined at once (bounds the temporary memory of combine)."""


# ---------------------------------------------------------------------------- registration


@dataclass
class Registration:
    """A frame's transform to the reference and its photometric throughput.

    Attributes
    ----------
    matrix
        3 x 3 affine matrix taking the frame's pixel coordinates ``(x, y, 1)`` to the
        reference's (0-based, numpy convention).
    n_matched
        Stars matched between the frame and the reference.
    throughput
        Median flux ratio frame / reference of the matched stars (NaN when no flux).
    wcs
        For a frame registered through the celestial WCS: the mapping it is resampled
        through (``matrix`` is then that mapping's affine approximation); None when the
        matched stars register it.
    """

    matrix: np.ndarray
    n_matched: int
    throughput: float
    wcs: WcsMapping | None = None

    def drift_px(self, x_px: float, y_px: float) -> tuple[float, float]:
        """How far the stars at reference pixel ``(x, y)`` lie from it in the frame:
        frame position minus reference position, ``(dx, dy)`` in px."""
        fx, fy, _ = np.linalg.solve(self.matrix, [x_px, y_px, 1.0])
        return float(fx - x_px), float(fy - y_px)

    @property
    def rotation_deg(self) -> float:
        """How far the frame is rotated against the reference, degrees from +x towards +y
        (the stars of a frame rotated by +a sit at ``R(a)`` of their reference positions)."""
        return float(-math.degrees(math.atan2(self.matrix[1, 0], self.matrix[0, 0])))

    @property
    def scale(self) -> float:
        """Pixel scale ratio of the transform (1 for frames of one camera)."""
        return float(math.sqrt(abs(np.linalg.det(self.matrix[:2, :2]))))


def identity() -> Registration:
    """The reference frame's own registration."""
    return Registration(matrix=np.eye(3), n_matched=0, throughput=1.0)


def brightest(xy: np.ndarray, flux: np.ndarray, n: int = MATCH_STARS
              ) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` brightest positions with positive finite flux, and their indices in ``xy``."""
    flux = np.asarray(flux, float)
    ok = np.flatnonzero(np.isfinite(flux) & (flux > 0) & np.isfinite(xy).all(axis=1))
    order = ok[np.argsort(flux[ok])[::-1][:n]]
    return np.asarray(xy, float)[order], order


def match_positions(ref_xy: np.ndarray, xy: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Match two star lists (brightest first) and fit the similarity between them.

    :func:`survey_qa.pipeline.sequence.match_stars` does the work (astroalign's asterisms
    on the brightest, then every star paired and the transform refitted).

    Returns
    -------
    matrix, ref_index, index
        The 3 x 3 matrix taking ``xy`` to ``ref_xy`` coordinates, and the indices of the
        matched stars in ``ref_xy`` and ``xy`` (pairwise).

    Raises
    ------
    ValueError
        When no transform is found (too few stars, no common pattern).
    """
    from survey_qa.pipeline.sequence import match_stars

    transform, ref_index, index = match_stars(np.asarray(ref_xy, float),
                                              np.asarray(xy, float))
    return (np.asarray(transform.params, float), np.asarray(ref_index, int),
            np.asarray(index, int))


def register(ref_xy: np.ndarray, ref_flux: np.ndarray, xy: np.ndarray, flux: np.ndarray,
             ref_photometric: np.ndarray | None = None,
             photometric: np.ndarray | None = None) -> Registration:
    """A frame's registration to the reference from both frames' catalogued sources.

    Parameters
    ----------
    ref_xy, ref_flux, xy, flux
        Positions ``(n, 2)`` and fluxes of the reference's and the frame's sources; the
        brightest :data:`MATCH_STARS` of each are matched (:func:`match_positions`).
    ref_photometric, photometric
        True for sources whose flux may enter the throughput (unsaturated point sources);
        None: all. The throughput is the median flux ratio of the matched pairs of such
        sources (of all matched pairs when no pair is photometric on both sides).

    Raises ``ValueError`` when the patterns do not match.
    """
    ref_pts, ref_order = brightest(ref_xy, ref_flux)
    pts, order = brightest(xy, flux)
    matrix, ref_i, i = match_positions(ref_pts, pts)
    ref_i, i = ref_order[ref_i], order[i]
    return Registration(matrix=matrix, n_matched=int(len(i)),
                        throughput=_throughput(ref_flux, flux, ref_i, i, ref_photometric,
                                               photometric))


def _throughput(ref_flux, flux, ref_i, i, ref_photometric, photometric) -> float:
    """Median flux ratio of the pairs ``(ref_i, i)``, of the photometric ones if any."""
    ratio = np.asarray(flux, float)[i] / np.asarray(ref_flux, float)[ref_i]
    both = np.ones(len(i), bool)
    if ref_photometric is not None:
        both &= np.asarray(ref_photometric, bool)[ref_i]
    if photometric is not None:
        both &= np.asarray(photometric, bool)[i]
    ratio = ratio[both] if both.any() else ratio
    ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
    return float(np.median(ratio)) if ratio.size else math.nan


@dataclass
class WcsMapping:
    """Frame pixels onto the reference grid through two celestial WCS.

    Attributes
    ----------
    ref_wcs, wcs
        The reference's and the frame's celestial WCS (astropy, distortion included).
    correction
        3 x 3 affine matrix applied to the reference pixel coordinates that the WCS give
        (the shift and rotation that paired stars show; the identity without them).
    """

    ref_wcs: object
    wcs: object
    correction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def to_reference(self, xy: np.ndarray) -> np.ndarray:
        """Reference pixel coordinates ``(n, 2)`` of the frame's pixels ``xy`` ``(n, 2)``."""
        xy = np.asarray(xy, float).reshape(-1, 2)
        rx, ry = self.ref_wcs.world_to_pixel(self.wcs.pixel_to_world(xy[:, 0], xy[:, 1]))
        return _apply(self.correction, np.column_stack([rx, ry]))


def _apply(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Positions ``(n, 2)`` carried by a 3 x 3 affine ``matrix``."""
    return xy @ matrix[:2, :2].T + matrix[:2, 2]


def affine_fit(mapping: WcsMapping, shape: tuple[int, int], grid: int = 5) -> np.ndarray:
    """The 3 x 3 affine matrix closest to ``mapping`` over a frame of ``shape`` ``(ny, nx)``.

    A ``grid`` x ``grid`` lattice of the frame's pixels is carried onto the reference and
    the affine transform fitted by least squares.
    """
    ny, nx = shape
    gx, gy = (g.ravel() for g in np.meshgrid(np.linspace(0, nx - 1, grid),
                                             np.linspace(0, ny - 1, grid)))
    ref = mapping.to_reference(np.column_stack([gx, gy]))
    design = np.column_stack([gx, gy, np.ones(gx.size)])
    coef, *_ = np.linalg.lstsq(design, ref, rcond=None)
    matrix = np.eye(3)
    matrix[:2] = coef.T
    return matrix


def wcs_matrix(ref_wcs, wcs, shape: tuple[int, int], grid: int = 5) -> np.ndarray:
    """The frame-to-reference affine matrix that two celestial WCS imply
    (:func:`affine_fit` of their :class:`WcsMapping`; ``shape``: the frame's ``(ny, nx)``)."""
    return affine_fit(WcsMapping(ref_wcs, wcs), shape, grid)


def register_by_wcs(mapping: WcsMapping, shape: tuple[int, int], ref_xy: np.ndarray,
                    ref_flux: np.ndarray, xy: np.ndarray, flux: np.ndarray,
                    ref_photometric: np.ndarray | None = None,
                    photometric: np.ndarray | None = None) -> Registration:
    """A registration through the celestial WCS, corrected on the stars it pairs.

    The sources that ``mapping`` brings within
    :data:`survey_qa.pipeline.sequence.MATCH_TOLERANCE_PX` of a reference source are paired
    (:func:`survey_qa.pipeline.sequence.pair_stars`); with at least
    :data:`MIN_WCS_PAIRS` pairs the similarity transform from their mapped to their
    reference positions becomes the mapping's correction and the throughput is their
    median flux ratio (as :func:`register`). With fewer, the WCS stand alone and the
    throughput is NaN. ``shape`` is the frame's ``(ny, nx)``.
    """
    from skimage.transform import AffineTransform

    from survey_qa.pipeline.sequence import MATCH_TOLERANCE_PX, pair_stars, similarity_fit

    ref_xy, xy = np.asarray(ref_xy, float).reshape(-1, 2), np.asarray(xy, float).reshape(-1, 2)
    mapped = mapping.to_reference(xy)
    ref_i, i = pair_stars(ref_xy, mapped, AffineTransform(), MATCH_TOLERANCE_PX)
    throughput = math.nan
    if len(i) >= MIN_WCS_PAIRS:
        fit = np.asarray(similarity_fit(mapped[i], ref_xy[ref_i]).params, float)
        mapping = WcsMapping(mapping.ref_wcs, mapping.wcs, fit @ mapping.correction)
        throughput = _throughput(ref_flux, flux, ref_i, i, ref_photometric, photometric)
    return Registration(matrix=affine_fit(mapping, shape), n_matched=int(len(i)),
                        throughput=throughput, wcs=mapping)


# ---------------------------------------------------------------------------- resampling


def _yx_inverse(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (row, column) matrix and offset of ``scipy.ndimage.affine_transform`` that
    take reference pixels to the frame's pixels, for a frame-to-reference ``matrix``."""
    inv = np.linalg.inv(np.asarray(matrix, float))
    swap = np.array([[0, 1], [1, 0]])
    return swap @ inv[:2, :2] @ swap, swap @ inv[:2, 2]


def resample(data: np.ndarray, mask: np.ndarray, matrix: np.ndarray,
             shape: tuple[int, int], order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A frame on the reference pixel grid, with its mask.

    Parameters
    ----------
    data
        The frame (any units); masked pixels may hold anything, NaN included.
    mask
        True where a pixel of ``data`` must not be used.
    matrix
        Frame-to-reference transform (:class:`Registration`).
    shape
        The reference's shape ``(ny, nx)``.
    order
        Spline order of the interpolation (1: bilinear, 3: bicubic spline). Beyond 1,
        the ringing that a masked pixel (set to 0) leaves in the spline is masked too:
        the mask grows by ``order`` pixels.

    Returns
    -------
    data, mask
        float32 ``shape`` arrays; masked where a masked or outside pixel entered.
    """
    lin, offset = _yx_inverse(matrix)
    clean = np.where(mask, 0.0, data).astype(np.float32)
    out = ndimage.affine_transform(clean, lin, offset, output_shape=shape, order=order,
                                   mode="constant", cval=0.0, prefilter=order > 1)
    bad = ndimage.affine_transform(mask.astype(np.float32), lin, offset, output_shape=shape,
                                   order=1, mode="constant", cval=1.0)
    return out.astype(np.float32, copy=False), _grown(bad > MASK_TOLERANCE, order)


def cells_to_pixels(cells: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A mask of ``cells`` ``(gy, gx)`` spread evenly over a detector of ``shape``
    ``(ny, nx)``: pixel ``(y, x)`` takes cell ``(y gy // ny, x gx // nx)`` (nearest cell).

    Returns a bool ``shape`` array, True under a cell that is set.
    """
    cells = np.asarray(cells)
    rows = (np.arange(shape[0]) * cells.shape[0]) // shape[0]
    cols = (np.arange(shape[1]) * cells.shape[1]) // shape[1]
    return cells[np.ix_(rows, cols)].astype(bool)


def cells_pixel_share(cells: np.ndarray, shape: tuple[int, int]) -> float:
    """The share of a detector of ``shape`` that the set ``cells`` cover once spread onto
    its pixels (:func:`cells_to_pixels`), without making the pixel mask."""
    cells = np.asarray(cells, bool)
    rows = np.bincount((np.arange(shape[0]) * cells.shape[0]) // shape[0],
                       minlength=cells.shape[0])
    cols = np.bincount((np.arange(shape[1]) * cells.shape[1]) // shape[1],
                       minlength=cells.shape[1])
    return float(rows @ cells @ cols / (shape[0] * shape[1]))


def _grown(bad: np.ndarray, order: int) -> np.ndarray:
    """A resampled mask grown by ``order`` pixels beyond bilinear (spline ringing)."""
    if order > 1 and bad.any():
        return ndimage.binary_dilation(bad, iterations=order)
    return bad


def _translation(dx_px: float, dy_px: float) -> np.ndarray:
    matrix = np.eye(3)
    matrix[:2, 2] = dx_px, dy_px
    return matrix


class PixelAffineWCS(BaseWCSWrapper):
    """A WCS on moved pixels: pixel ``(x, y)`` here is pixel ``matrix @ (x, y, 1)`` of the
    wrapped WCS (a padded frame, a block of rows, a corrected reference grid).

    Parameters
    ----------
    wcs
        The celestial WCS wrapped (astropy, any APE 14 WCS).
    matrix
        3 x 3 affine matrix from these pixel coordinates to the wrapped WCS's.
    """

    def __init__(self, wcs, matrix: np.ndarray):
        super().__init__(wcs.low_level_wcs)
        self._matrix = np.asarray(matrix, float)
        self._inverse = np.linalg.inv(self._matrix)

    def pixel_to_world_values(self, x, y):
        return self._wcs.pixel_to_world_values(*_carry(self._matrix, x, y))

    def world_to_pixel_values(self, *world):
        return _carry(self._inverse, *self._wcs.world_to_pixel_values(*world))


def _carry(matrix: np.ndarray, x, y) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates ``x, y`` (arrays of any shape) carried by a 3 x 3 affine matrix."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    return (matrix[0, 0] * x + matrix[0, 1] * y + matrix[0, 2],
            matrix[1, 0] * x + matrix[1, 1] * y + matrix[1, 2])


def reproject_frame(data: np.ndarray, mask: np.ndarray, mapping: WcsMapping,
                    shape: tuple[int, int], order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A frame on the reference pixel grid through the WCS, with its mask.

    ``reproject.reproject_interp`` resamples the frame, with its masked pixels set to 0,
    and its mask (1 masked, 0 good) from the frame's WCS onto the reference's followed by
    ``mapping.correction``, :data:`REPROJECT_BLOCK_PX` output pixels at a time. Both are
    padded by a pixel (data 0, mask 1) so that an output pixel whose interpolation
    reaches beyond the frame is masked.

    Parameters
    ----------
    data, mask
        The frame and True where its pixels must not be used.
    mapping
        How the frame's pixels land on the reference grid (:class:`WcsMapping`).
    shape
        The reference's shape ``(ny, nx)``.
    order
        1: bilinear; 3: bicubic (the mask grows by ``order`` pixels, as :func:`resample`).

    Returns
    -------
    data, mask
        float32 ``shape`` arrays; masked where a masked or outside pixel entered.
    """
    layers = np.zeros((2, data.shape[0] + 2, data.shape[1] + 2), np.float32)
    layers[0, 1:-1, 1:-1] = np.where(mask, 0.0, data)
    layers[1] = 1.0
    layers[1, 1:-1, 1:-1] = mask
    frame_wcs = PixelAffineWCS(mapping.wcs, _translation(-1.0, -1.0))
    ny, nx = shape
    rows = max(1, REPROJECT_BLOCK_PX // nx)
    out = np.zeros(shape, np.float32)
    out_bad = np.ones(shape, bool)
    to_reference = np.linalg.inv(mapping.correction)
    for r0 in range(0, ny, rows):
        block = slice(r0, min(ny, r0 + rows))
        ref_wcs = PixelAffineWCS(mapping.ref_wcs, to_reference @ _translation(0.0, r0))
        block_shape = (block.stop - block.start, nx)
        if order == 1:
            values, bad_share = _reproject(layers, frame_wcs, ref_wcs, block_shape, 1)
        else:
            values = _reproject(layers[:1], frame_wcs, ref_wcs, block_shape, order)[0]
            bad_share = _reproject(layers[1:], frame_wcs, ref_wcs, block_shape, 1)[0]
        out[block] = np.nan_to_num(values, nan=0.0)
        out_bad[block] = ~(bad_share <= MASK_TOLERANCE)  # NaN: outside the frame
    return out, _grown(out_bad, order)


def _reproject(layers: np.ndarray, frame_wcs, ref_wcs, shape: tuple[int, int],
               order: int) -> np.ndarray:
    """``reproject_interp`` of the ``(k, ny, nx)`` layers of one frame onto ``shape``.

    The coordinates are not checked by a round trip: frame and reference show one field,
    far from where a projection folds over.
    """
    from reproject import reproject_interp

    return reproject_interp((layers, frame_wcs), ref_wcs, shape_out=(len(layers), *shape),
                            order=order, return_footprint=False, roundtrip_coords=False)


def resample_registered(data: np.ndarray, mask: np.ndarray, registration: Registration,
                        shape: tuple[int, int], order: int = 1
                        ) -> tuple[np.ndarray, np.ndarray]:
    """A frame on the reference grid as its registration says: through the WCS
    (:func:`reproject_frame`) when it was registered so, else by its matrix
    (:func:`resample`)."""
    if registration.wcs is not None:
        return reproject_frame(data, mask, registration.wcs, shape, order)
    return resample(data, mask, registration.matrix, shape, order)


# ---------------------------------------------------------------------------- weights


STAR_NOISE_SAMPLES = 4000
"""Random boxes whose sums give a frame's noise on the scale of a star."""


def star_scale_noise(residual: np.ndarray, mask: np.ndarray, box_px: int,
                     seed: int = 0) -> float:
    """The per-pixel noise that sums over ``box_px`` x ``box_px`` boxes of sky show.

    ``std(box sum) / box_px`` over boxes at random unmasked places of the sky-subtracted
    ``residual``, 3-sigma clipped (stars and galaxies in a box are outliers). For white
    noise this is the pixel noise; sky structure smaller than the sky mesh (cloud, glow,
    stray light left by the sky subtraction) raises it, and with it the noise a faint
    star measured in that frame carries. NaN when fewer than 100 boxes are clean.
    """
    box_px = max(1, int(box_px))
    clean = np.where(mask, 0.0, residual).astype(np.float32)
    means = ndimage.uniform_filter(clean, box_px, mode="constant")
    dirty = ndimage.uniform_filter(mask.astype(np.float32), box_px, mode="constant") > 0
    rng = np.random.default_rng(seed)
    half = box_px // 2 + 1
    ny, nx = residual.shape
    if ny <= 2 * half or nx <= 2 * half:
        return math.nan
    y = rng.integers(half, ny - half, STAR_NOISE_SAMPLES)
    x = rng.integers(half, nx - half, STAR_NOISE_SAMPLES)
    values = means[y, x][~dirty[y, x]].astype(np.float64)
    if values.size < 100:
        return math.nan
    for _ in range(5):
        med = np.median(values)
        spread = MAD_TO_SIGMA * np.median(np.abs(values - med))
        values = values[np.abs(values - med) <= 3 * spread]
    return float(np.std(values) * box_px)



def quality_weights(throughput: np.ndarray, noise_adu: np.ndarray,
                    fwhm_px: np.ndarray) -> np.ndarray:
    """Inverse-variance weights of scaled frames for faint point sources (module notes).

    ``t^2 / (sigma^2 FWHM^2)``, relative to the largest (1.0); 0 where an input is not a
    positive finite number.
    """
    t, s, f = (np.asarray(v, float) for v in (throughput, noise_adu, fwhm_px))
    with np.errstate(divide="ignore", invalid="ignore"):
        w = t ** 2 / (s ** 2 * f ** 2)
    w = np.where(np.isfinite(w) & (w > 0), w, 0.0)
    return w / w.max() if w.max() > 0 else w


def choose_reference(transparency: np.ndarray, fwhm_px: np.ndarray,
                     tolerance_mag: float = REFERENCE_TOLERANCE_MAG) -> int:
    """Index of the reference frame: the smallest FWHM among the most transparent.

    Frames whose FWHM exceeds :data:`REFERENCE_MAX_FWHM_RATIO` times the median of the
    frames' FWHM (out of focus, trailed) are no candidates while others are: their star
    positions would blur every frame registered on them.

    Parameters
    ----------
    transparency
        A relative measure of each frame's throughput (higher: clearer sky); NaN unknown.
    fwhm_px
        Each frame's FWHM; NaN unknown.
    tolerance_mag
        Frames within this many magnitudes of the clearest candidate count as the most
        transparent.
    """
    t = np.asarray(transparency, float)
    f = np.where(np.isfinite(fwhm_px), np.asarray(fwhm_px, float), np.inf)
    candidates = np.isfinite(f)
    if candidates.any():
        candidates &= f <= REFERENCE_MAX_FWHM_RATIO * np.median(f[candidates])
    else:
        candidates[:] = True
    known = candidates & np.isfinite(t)
    if not known.any():
        return int(np.argmin(np.where(candidates, f, np.inf)))
    clear = known & (t >= t[known].max() * 10 ** (-0.4 * tolerance_mag))
    if not np.isfinite(f[clear]).any():  # no FWHM known: the clearest
        return int(np.argmax(np.where(known, t, -np.inf)))
    return int(np.argmin(np.where(clear, f, np.inf)))


# ---------------------------------------------------------------------------- combining


@dataclass
class StackResult:
    """A combined image and what went into each pixel.

    Attributes
    ----------
    image
        Weighted mean of the kept values (float32; NaN where no frame has a value).
    weight
        Sum of the weights of the values kept at each pixel (float32).
    n_frames
        Number of values kept at each pixel (int16).
    rejected_px
        Pixels of each frame rejected by the clipping, ``(n_frames,)``.
    noise_adu
        Expected sky noise per pixel of the stack where every frame counts, from the
        frames' noise and weights (ignores the correlation that resampling adds).
    """

    image: np.ndarray
    weight: np.ndarray
    n_frames: np.ndarray
    rejected_px: np.ndarray
    noise_adu: float


def _quiet_nanmedian(a: np.ndarray, axis: int = 0) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels give NaN
        return np.nanmedian(a, axis=axis)


def _clip_block(x: np.ndarray, keep: np.ndarray, w: np.ndarray, noise2: np.ndarray,
                poisson: np.ndarray, sigma: float, iterations: int) -> np.ndarray:
    """The values of one block kept after iterative clipping (module notes)."""
    values = np.where(keep, x, np.nan)
    center = _quiet_nanmedian(values)
    scatter = MAD_TO_SIGMA * _quiet_nanmedian(np.abs(values - center))
    enough = keep.sum(axis=0) >= MIN_CLIP_FRAMES
    for _ in range(iterations):
        signal = np.maximum(np.nan_to_num(center), 0.0)
        expected = np.sqrt(noise2 + poisson * signal + (PROFILE_SCATTER * signal) ** 2)
        expected = np.maximum(expected, np.nan_to_num(scatter))
        off = keep & enough & (np.abs(x - center) > sigma * expected)
        if not off.any():
            break
        keep = keep & ~off
        wk = w * keep
        total = wk.sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            center = np.where(total > 0, (wk * np.where(keep, x, 0.0)).sum(axis=0) / total,
                              np.nan)
    return keep


def combine(frames: np.ndarray, masks: np.ndarray, weights: np.ndarray,
            noise_adu: np.ndarray, poisson_adu: np.ndarray | None = None, *,
            sigma: float = 3.0, iterations: int = 3, rows_per_block: int | None = None
            ) -> StackResult:
    """Weighted mean of registered, scaled frames with iterative sigma clipping per pixel.

    Parameters
    ----------
    frames
        ``(n, ny, nx)`` sky-subtracted frames on one grid, scaled to one photometry: an
        array, or any object with ``shape`` whose ``[:, rows]`` gives those rows of every
        frame as an array (frames on disk).
    masks
        ``(n, ny, nx)`` bool, True where a frame has no usable value (array or as
        ``frames``).
    weights
        ``(n,)`` non-negative weights.
    noise_adu
        ``(n,)`` sky noise per pixel of each scaled frame.
    poisson_adu
        ``(n,)`` photon-noise variance per unit of scaled signal (``scale / gain``); zeros
        or None to leave the photon noise to the robust scatter.
    sigma
        Clipping threshold in expected scatters; 0 or less: no clipping.
    iterations
        At most this many rejection passes.
    rows_per_block
        Rows combined at once (bounds the temporary memory); None: about
        :data:`BLOCK_VALUES` values. The result does not depend on it.
    """
    n, ny, nx = frames.shape
    if rows_per_block is None:
        rows_per_block = max(1, BLOCK_VALUES // max(1, n * nx))
    w = np.asarray(weights, np.float64).reshape(n, 1, 1)
    noise2 = (np.asarray(noise_adu, np.float64) ** 2).reshape(n, 1, 1)
    poisson = (np.zeros(n) if poisson_adu is None else
               np.nan_to_num(np.asarray(poisson_adu, np.float64))).reshape(n, 1, 1)
    image = np.full((ny, nx), np.nan, np.float32)
    weight = np.zeros((ny, nx), np.float32)
    count = np.zeros((ny, nx), np.int16)
    rejected = np.zeros(n, np.int64)
    for r0 in range(0, ny, rows_per_block):
        rows = slice(r0, min(ny, r0 + rows_per_block))
        x = np.asarray(frames[:, rows], np.float64)
        valid = ~np.asarray(masks[:, rows], bool) & np.isfinite(x) & (w > 0)
        keep = (_clip_block(x, valid, w, noise2, poisson, sigma, iterations)
                if sigma > 0 else valid)
        rejected += (valid & ~keep).reshape(n, -1).sum(axis=1)
        wk = w * keep
        total = wk.sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            image[rows] = np.where(total > 0, (wk * np.where(keep, x, 0.0)).sum(axis=0)
                                   / total, np.nan)
        weight[rows] = total
        count[rows] = keep.sum(axis=0)
    wv = np.asarray(weights, float)
    use = wv > 0
    sky = (math.sqrt(float(np.sum(wv[use] ** 2 * np.asarray(noise_adu, float)[use] ** 2)))
           / wv[use].sum() if use.any() else math.nan)
    return StackResult(image=image, weight=weight, n_frames=count, rejected_px=rejected,
                       noise_adu=sky)
