"""The night as a sequence: the frames of one field measured against each other.

Pure computing (arrays and tables in, records out); reading the night's source catalogs is
:mod:`survey_qa.flows.sequence`.

Star matching
-------------
:func:`match_stars` finds the similarity transform between a frame's star list and a
reference star list with astroalign's asterism matching (triangle invariants and RANSAC)
on the brightest stars of each, then pairs every star of the two lists that the transform
brings within ``tolerance_px`` of each other (mutual nearest neighbours) and refits the
transform by least squares on all those pairs.

Fields
------
Frames of one detector geometry and filter are of one field when their centres on the sky
(WCS or pointing keywords) lie within ``field_radius`` fields of view of the field's first
frame; without a position, frames of one ``OBJECT`` are; without either, frames whose star
patterns match (:func:`field_groups`). The field's reference frame is the one with the
most well-measured stars; every other frame is matched to it (:func:`match_field`).

Transparency and extinction spread
----------------------------------
With ``m[f, s]`` the magnitude of the flux per second of reference star ``s`` in frame
``f`` (:func:`magnitude_offsets`):

- each frame's offset is the median over its matched stars of ``m[f, s] - r[s]``, with
  ``r[s]`` the star's median magnitude over the most transparent frames
  (``sequence.best_share`` of them, offsets taken out); the offsets are shifted so that
  those frames read 0. That is ``transparency_mag``: clear frames ~0, cloud positive.
- the residuals ``m[f, s] - offset[f] - r[s]`` at the stars' reference positions are
  smoothed with a Gaussian kernel (``sequence.map_scale`` of the detector's longer side,
  weights from the photometric errors) and ``k_raw`` is P99 - P1 of that map
  (:func:`extinction_spread`). Maps of pure noise (each star drawn from its error, the
  errors scaled so that they explain the scatter on the most transparent frames,
  :func:`noise_scale`) give the part of ``k_raw`` that noise makes, removed in quadrature.
  That is ``extinction_spread_mag``, the spec's ``k``.
- a star brighter than on the most transparent frames beyond its noise is left out of
  both (:func:`brightened`): cloud only dims, so that is light added to it (a cosmic
  ray, a satellite trail, a blend).

What it does not see: stars that a thick patch removes from the frame carry no offset,
so ``k`` and the transparency of a patchy frame are measured on the stars that survive
(an underestimate where a patch is opaque; counting the reference stars a frame lost as
lower limits was tried on simulated sequences: it did not move ``k`` on patchy frames and
raised it past the limit on clear ones, where stars are lost to blends and seeing); airmass
is not corrected (it is part of the transparency); the Kron fluxes of a frame whose PSF
changes a lot over the field (optics, a much larger seeing) add a spread of their own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree
from skimage.transform import SimilarityTransform

from survey_qa.config import SequenceConfig
from survey_qa.pipeline.flags import SOURCE_FLAGS, bits

CONTROL_STARS = 30
"""Brightest stars of each list that astroalign matches (a few dozen)."""

MATCH_TOLERANCE_PX = 2.0
"""A frame's star and a reference star are the same when the transform puts them this
close (pixels)."""

MIN_MATCHED = 5
"""Fewest matched stars for a transform to be accepted."""

MATCH_TRIES = 8
WHOLE_MATCH = 0.8
"""astroalign's RANSAC draws at random, and on a frame with doubled stars (a pointing
jump) a pattern can match a star's other image: a match that pairs fewer than
``WHOLE_MATCH`` of the shorter list is tried again, up to ``MATCH_TRIES`` times in all, and
the transform that pairs the most stars is kept (a failed first try is not repeated). A
frame whose stars already lie on the reference's (within the pairing tolerance) pairs
``WHOLE_MATCH`` of them without a pattern, and is matched so, without chance."""

MAX_SCALE_CHANGE = 0.02
"""A match whose transform changes the scale by more than this (2%) is refused: frames of
one detector geometry see the sky at one scale."""


class MatchError(ValueError):
    """No transform between two star lists (too few stars, or no common asterism)."""


def similarity_fit(xy: np.ndarray, ref_xy: np.ndarray) -> SimilarityTransform:
    """The least-squares similarity transform that maps ``xy`` onto ``ref_xy``.

    Parameters
    ----------
    xy, ref_xy
        (N, 2) positions (x, y) of the same N >= 2 stars in the two frames (pixels).

    Returns
    -------
    skimage.transform.SimilarityTransform
        ``x' = a x - b y + t_x``, ``y' = b x + a y + t_y`` with the smallest squared residual.
    """
    xy, ref_xy = np.asarray(xy, float), np.asarray(ref_xy, float)
    n = len(xy)
    design = np.zeros((2 * n, 4))
    design[0::2] = np.column_stack([xy[:, 0], -xy[:, 1], np.ones(n), np.zeros(n)])
    design[1::2] = np.column_stack([xy[:, 1], xy[:, 0], np.zeros(n), np.ones(n)])
    (a, b, tx, ty), *_ = np.linalg.lstsq(design, ref_xy.reshape(-1), rcond=None)
    return SimilarityTransform(matrix=np.array([[a, -b, tx], [b, a, ty], [0.0, 0.0, 1.0]]))


def pair_stars(ref_xy: np.ndarray, xy: np.ndarray, transform: SimilarityTransform,
               tolerance_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the stars that ``transform`` (``xy`` -> ``ref_xy``) brings together.

    A pair is mutual: each is the other's nearest neighbour, within ``tolerance_px``.
    Returns ``(ref_index, index)``, sorted by ``ref_index``.
    """
    if len(ref_xy) == 0 or len(xy) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    moved = transform(np.asarray(xy, float))
    dist, nearest_ref = cKDTree(ref_xy).query(moved, distance_upper_bound=tolerance_px)
    _, nearest = cKDTree(moved).query(ref_xy)
    index = np.flatnonzero(np.isfinite(dist))
    index = index[nearest[nearest_ref[index]] == index]
    ref_index = nearest_ref[index]
    order = np.argsort(ref_index, kind="stable")
    return ref_index[order], index[order]


def match_stars(ref_xy: np.ndarray, xy: np.ndarray, *,
                control_stars: int = CONTROL_STARS,
                tolerance_px: float = MATCH_TOLERANCE_PX,
                min_matched: int = MIN_MATCHED
                ) -> tuple[SimilarityTransform, np.ndarray, np.ndarray]:
    """The transform from a frame's stars to a reference frame's, and the matched stars.

    Parameters
    ----------
    ref_xy
        (M, 2) star positions (x, y, pixels) in the reference frame, brightest first.
    xy
        (N, 2) star positions in the frame, brightest first.
    control_stars
        The first ``control_stars`` of each list are matched by their asterisms
        (``astroalign.find_transform``); all stars are then paired through the transform.
        A frame whose stars already lie on the reference's is paired without it (see
        :data:`WHOLE_MATCH`).
    tolerance_px
        Largest distance (pixels) between a reference star and a frame star carried onto
        the reference by the transform for the two to be paired.
    min_matched
        Fewest pairs for the transform to be accepted.

    Returns
    -------
    transform, ref_index, index
        ``transform`` (a :class:`skimage.transform.SimilarityTransform`) maps frame
        positions onto reference positions: ``transform(xy[index]) ~ ref_xy[ref_index]``;
        it is the least-squares fit over all pairs (``astroalign.apply_transform``
        accepts it to resample the frame onto the reference). ``ref_index`` and
        ``index`` are integer arrays of the paired stars, sorted by ``ref_index``.

    Raises
    ------
    MatchError
        When either list has fewer than 3 stars, astroalign finds no common asterism, or
        fewer than ``min_matched`` stars pair up.
    """
    import astroalign

    ref_xy = np.asarray(ref_xy, float).reshape(-1, 2)
    xy = np.asarray(xy, float).reshape(-1, 2)
    if min(len(ref_xy), len(xy)) < 3:
        raise MatchError(f"too few stars to match ({len(xy)} in the frame, {len(ref_xy)} in "
                         "the reference)")
    whole = WHOLE_MATCH * min(len(xy), len(ref_xy))
    try:  # a guided frame already lies on the reference: no pattern matching needed
        aligned = refine_match(ref_xy, xy, SimilarityTransform(), tolerance_px, min_matched)
        if len(aligned[2]) >= whole:
            return aligned
    except MatchError:
        pass
    best, why = None, ""
    for _ in range(MATCH_TRIES):
        try:
            first, _ = astroalign.find_transform(xy[:control_stars], ref_xy[:control_stars],
                                                 max_control_points=control_stars)
            found = refine_match(ref_xy, xy,
                                 SimilarityTransform(matrix=np.asarray(first.params, float)),
                                 tolerance_px, min_matched)
        except (MatchError, astroalign.MaxIterError, ValueError, TypeError) as e:
            why = str(e) if isinstance(e, MatchError) else f"no common star pattern ({e})"
            if best is None:  # a failed first match costs seconds: not tried again
                break
            continue
        if best is None or len(found[2]) > len(best[2]):
            best = found
        if len(best[2]) >= whole:
            break
    if best is None:
        raise MatchError(why)
    return best


def refine_match(ref_xy: np.ndarray, xy: np.ndarray, transform: SimilarityTransform,
                 tolerance_px: float = MATCH_TOLERANCE_PX, min_matched: int = MIN_MATCHED
                 ) -> tuple[SimilarityTransform, np.ndarray, np.ndarray]:
    """Every star pair that an approximate ``transform`` (``xy`` -> ``ref_xy``) brings
    within ``tolerance_px``, and the transform refitted on them (twice).

    Returns ``(transform, ref_index, index)`` as :func:`match_stars`; raises
    :class:`MatchError` with fewer than ``min_matched`` pairs.
    """
    ref_xy = np.asarray(ref_xy, float).reshape(-1, 2)
    xy = np.asarray(xy, float).reshape(-1, 2)
    for _ in range(2):
        ref_index, index = pair_stars(ref_xy, xy, transform, tolerance_px)
        if len(index) < max(min_matched, 2):
            raise MatchError(f"only {len(index)} stars pair up (at least {min_matched} "
                             "needed)")
        transform = similarity_fit(xy[index], ref_xy[ref_index])
    ref_index, index = pair_stars(ref_xy, xy, transform, tolerance_px)
    if len(index) < max(min_matched, 2):
        raise MatchError(f"only {len(index)} stars pair up (at least {min_matched} needed)")
    return transform, ref_index, index


def chained(first: SimilarityTransform, then: SimilarityTransform) -> SimilarityTransform:
    """The transform that applies ``first``, then ``then``."""
    return SimilarityTransform(matrix=np.asarray(then.params) @ np.asarray(first.params))


# ---------------------------------------------------------------------------- stars


SKIPPED_SOURCE_FLAGS = ("SATURATED", "TRUNCATED", "NEAR_EDGE", "BLENDED", "COMPACT")
"""Source flags of detections that are not compared between frames (``COMPACT``: cosmic
rays and hot pixels, often brighter than the stars)."""


def select_stars(sources: pd.DataFrame, min_snr: float) -> pd.DataFrame:
    """A detector's well-measured point sources, brightest first.

    Finite positive flux, ``snr >= min_snr``, none of :data:`SKIPPED_SOURCE_FLAGS`.
    Returns the rows of ``sources`` (columns ``x, y, flux, flux_err``...) with a fresh
    index.
    """
    skipped = bits(*SKIPPED_SOURCE_FLAGS, registry=SOURCE_FLAGS)
    flux = sources["flux"].to_numpy(float)
    keep = (np.isfinite(flux) & (flux > 0) & np.isfinite(sources["x"].to_numpy(float))
            & np.isfinite(sources["y"].to_numpy(float))
            & (sources["snr"].to_numpy(float) >= min_snr)
            & ((sources["flags"].to_numpy(np.int64) & skipped) == 0))
    chosen = sources[keep].sort_values("flux", ascending=False, kind="stable")
    return chosen.reset_index(drop=True)


@dataclass(frozen=True)
class FrameStars:
    """One frame's well-measured stars (:func:`select_stars`), brightest first."""

    xy: np.ndarray
    """(N, 2) positions x, y (pixels)."""
    mag: np.ndarray
    """Instrumental magnitudes of the flux per second, ``-2.5 log10(flux / exptime)``."""
    mag_err: np.ndarray
    """Their errors, ``1.0857 flux_err / flux`` (mag)."""
    n_stars: int
    """Well-measured stars of the frame (before keeping the brightest)."""

    @classmethod
    def from_sources(cls, stars: pd.DataFrame, exptime_s: float, max_stars: int
                     ) -> "FrameStars":
        """From :func:`select_stars` (all of them): the brightest ``max_stars``, fluxes per
        second when ``exptime_s`` is positive."""
        scale = exptime_s if math.isfinite(exptime_s) and exptime_s > 0 else 1.0
        n_stars = len(stars)
        stars = stars.head(max_stars)
        flux = stars["flux"].to_numpy(float)
        err = stars["flux_err"].to_numpy(float)
        return cls(n_stars=n_stars, xy=stars[["x", "y"]].to_numpy(float),
                   mag=-2.5 * np.log10(flux / scale),
                   mag_err=np.where(np.isfinite(err) & (err > 0), MAG_PER_LN * err / flux,
                                    np.nan))


MAG_PER_LN = 2.5 / math.log(10.0)
"""Magnitudes per unit of relative flux (1.0857)."""


# ---------------------------------------------------------------------------- fields


def separation_deg(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    """Angle between two positions on the sky (degrees; haversine)."""
    p1, p2 = math.radians(dec1), math.radians(dec2)
    dp, dl = p2 - p1, math.radians(ra2 - ra1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return math.degrees(2 * math.asin(min(1.0, math.sqrt(h))))


def field_of_view_deg(row: dict) -> float:
    """The detector's longer side on the sky (degrees); NaN without a pixel scale."""
    scale = row.get("pixscale_arcsec")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        return math.nan
    return max(int(row["nx"]), int(row["ny"])) * scale / 3600.0


def _has_pointing(row: dict) -> bool:
    return all(isinstance(row.get(k), (int, float)) and math.isfinite(row[k])
               for k in ("ra_deg", "dec_deg")) and math.isfinite(field_of_view_deg(row))


def group_by_pointing(rows: dict[int, dict], radius: float) -> list[list[int]]:
    """Frames whose centres lie within ``radius`` fields of view of a field's first frame.

    Parameters
    ----------
    rows
        Position -> exposure row (with ``ra_deg``, ``dec_deg``, ``pixscale_arcsec``,
        ``nx``, ``ny``) of frames of one detector geometry and filter, in time order.
    radius
        ``sequence.field_radius``: a fraction of the detector's longer side on the sky.

    Returns
    -------
    list
        Groups of positions (singletons included), in the order of their first frame.
    """
    groups: list[list[int]] = []
    for i, r in rows.items():
        for g in groups:
            seed = rows[g[0]]
            limit = radius * field_of_view_deg(seed)
            if separation_deg(seed["ra_deg"], seed["dec_deg"], r["ra_deg"],
                              r["dec_deg"]) <= limit:
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def group_by_pattern(stars: dict[int, FrameStars], tries: int, control_stars: int,
                     tolerance_px: float, min_matched: int) -> list[list[int]]:
    """Frames whose star patterns match a field's first frame (:func:`match_stars`).

    Each frame (in the order given) is matched against the first frame of the fields
    found so far, the most recent first, at most ``tries`` of them; without a match it
    starts a field of its own. Returns groups of positions (singletons included).
    """
    groups: list[list[int]] = []
    for i, s in stars.items():
        for g in groups[::-1][:tries]:
            try:
                match_stars(stars[g[0]].xy, s.xy, control_stars=control_stars,
                            tolerance_px=tolerance_px, min_matched=min_matched)
            except MatchError:
                continue
            g.append(i)
            break
        else:
            groups.append([i])
    return groups


def field_groups(rows: dict[int, dict], stars: dict[int, FrameStars], radius: float,
                 tries: int, control_stars: int, tolerance_px: float,
                 min_matched: int = MIN_MATCHED) -> list[list[int]]:
    """The frames of each field, among frames of one detector geometry and filter.

    Frames with a position on the sky and a pixel scale are grouped by their centres
    (:func:`group_by_pointing`); the others by their ``OBJECT`` where they have one, else
    by their star patterns (:func:`group_by_pattern`). Returns groups of at least two
    positions, each in time order (the order of ``rows``).
    """
    pointed = {i: r for i, r in rows.items() if _has_pointing(r)}
    groups = group_by_pointing(pointed, radius)
    by_object: dict[str, list[int]] = {}
    rest = {}
    for i, r in rows.items():
        if i in pointed:
            continue
        name = str(r.get("object") or "").strip()
        if name:
            by_object.setdefault(name, []).append(i)
        elif i in stars:
            rest[i] = stars[i]
    groups += list(by_object.values())
    groups += group_by_pattern(rest, tries, control_stars, tolerance_px, min_matched)
    order = {i: n for n, i in enumerate(rows)}
    return [sorted(g, key=order.get) for g in groups if len(g) >= 2]


def reference_frame(stars: dict[int, FrameStars]) -> int:
    """The field's reference: the frame with the most well-measured stars (the earliest
    of equals)."""
    return max(stars, key=lambda i: (len(stars[i].mag), -list(stars).index(i)))


# ---------------------------------------------------------------------------- photometry


def _median_rows(values: np.ndarray) -> np.ndarray:
    """Per-row median over the finite values (NaN for a row without one)."""
    out = np.full(values.shape[0], np.nan)
    ok = np.isfinite(values).any(axis=1)
    out[ok] = np.nanmedian(values[ok], axis=1)
    return out


def _median_columns(values: np.ndarray) -> np.ndarray:
    return _median_rows(values.T)


def magnitude_offsets(mags: np.ndarray, best_share: float, iterations: int = 3
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame magnitude offsets from the most transparent frames, and per-star
    reference magnitudes.

    Parameters
    ----------
    mags
        (frames, stars) instrumental magnitudes of the matched stars (NaN: not matched).
    best_share
        Share of the frames (the smallest offsets, at least one) whose stars define the
        reference magnitudes and zero offset.

    Returns
    -------
    offsets, reference
        ``offsets[f]``: median over the stars of ``mags[f] - reference`` (0 on the most
        transparent frames, positive on dimmer ones); ``reference[s]``: the median over
        the most transparent frames of ``mags[:, s] - offsets``.
    """
    n_frames = mags.shape[0]
    n_best = max(1, math.ceil(best_share * n_frames))
    offsets = np.zeros(n_frames)
    best = np.arange(n_frames)
    for _ in range(iterations):
        reference = _median_columns(mags[best] - offsets[best, None])
        offsets = _median_rows(mags - reference[None, :])
        finite = np.flatnonzero(np.isfinite(offsets))
        if finite.size == 0:
            break
        best = finite[np.argsort(offsets[finite], kind="stable")[:n_best]]
        offsets = offsets - np.median(offsets[best])
    return offsets, reference


def smooth_map(xy: np.ndarray, values: np.ndarray, weights: np.ndarray, shape: tuple[int, int],
               sigma_px: float, grid: int = 16, min_support: float = 1.0,
               with_error: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """A Gaussian-kernel weighted mean of per-star ``values`` on a ``grid`` x ``grid``
    map of the detector.

    Parameters
    ----------
    xy
        (N, 2) star positions (pixels).
    values, weights
        Per-star values and weights (inverse variances).
    shape
        (ny, nx) of the detector.
    sigma_px
        Kernel sigma (pixels).
    min_support
        A cell needs this many stars' worth of kernel weight (the kernel-weighted count:
        one star at its centre, or several around it) to get a value; NaN elsewhere.
    with_error
        Also return the map's standard error, ``sqrt(sum k^2 w) / sum k w`` for kernel
        weights ``k`` and inverse variances ``w``.

    Returns
    -------
    numpy.ndarray, or (map, error)
        (grid, grid) map, cell centres evenly spaced over the detector.
    """
    ny, nx = shape
    gy = (np.arange(grid) + 0.5) * ny / grid
    gx = (np.arange(grid) + 0.5) * nx / grid
    cy, cx = np.meshgrid(gy, gx, indexing="ij")
    d2 = ((cx.reshape(-1, 1) - xy[None, :, 0]) ** 2 + (cy.reshape(-1, 1) - xy[None, :, 1]) ** 2)
    kernel = np.exp(-0.5 * d2 / sigma_px ** 2)
    support = kernel.sum(axis=1)
    total = kernel @ weights
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (kernel @ (weights * values)) / total
        error = np.sqrt((kernel ** 2) @ weights) / total
    out[~(support >= min_support) | ~(total > 0)] = np.nan
    if with_error:
        error = np.where(np.isfinite(out), error, np.nan)
        return out.reshape(grid, grid), error.reshape(grid, grid)
    return out.reshape(grid, grid)


def map_spread(smooth: np.ndarray) -> float:
    """P99 - P1 of a map's finite cells (NaN with fewer than 4)."""
    cells = smooth[np.isfinite(smooth)]
    if cells.size < 4:
        return math.nan
    p1, p99 = np.percentile(cells, [1.0, 99.0])
    return float(p99 - p1)


def extinction_spread(xy: np.ndarray, offsets: np.ndarray, sigma: np.ndarray,
                      shape: tuple[int, int], sigma_px: float, draws: int = 16,
                      seed: int = 0) -> tuple[float, float]:
    """The spread ``k`` of a frame's extinction over the detector, and its noise part.

    The per-star offsets are smoothed (:func:`smooth_map`, weights ``1 / sigma^2``) and
    ``k_raw`` is P99 - P1 of that map; ``draws`` maps of pure photometric noise (each star
    drawn from ``N(0, sigma)``, same stars, same smoothing) give the spread noise alone
    makes, ``k_noise`` (their median). ``k = sqrt(k_raw^2 - k_noise^2)`` (0 when noise
    explains it all), spreads of independent parts adding roughly in quadrature.

    Returns
    -------
    k, k_noise
        Magnitudes; NaN when the map has too few cells.
    """
    ok = np.isfinite(offsets) & np.isfinite(sigma) & (sigma > 0)
    xy, offsets, sigma = xy[ok], offsets[ok], sigma[ok]
    weights = 1.0 / sigma ** 2
    raw = map_spread(smooth_map(xy, offsets, weights, shape, sigma_px))
    if not math.isfinite(raw):
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    noise = float(np.median([map_spread(smooth_map(xy, rng.normal(0.0, sigma), weights,
                                                   shape, sigma_px))
                             for _ in range(draws)]))
    return math.sqrt(max(raw ** 2 - noise ** 2, 0.0)), noise


def noise_scale(residuals: np.ndarray, errors: np.ndarray) -> float:
    """How much the scatter of residuals exceeds their quoted errors: the robust standard
    deviation of ``residuals / errors`` (1.4826 MAD), never below 1."""
    z = residuals / errors
    z = z[np.isfinite(z)]
    if z.size < 10:
        return 1.0
    return max(1.0, float(1.4826 * np.median(np.abs(z - np.median(z)))))


BRIGHTER_SIGMA = 5.0
BRIGHTER_MAG = 0.1
"""A star is contaminated (a cosmic ray or a satellite in its aperture, a blend) when it
is brighter than on the most transparent frames by more than ``BRIGHTER_SIGMA`` of its
error plus ``BRIGHTER_MAG``: extinction only dims."""


def brightened(extinction: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Where a star's extinction against the most transparent frames (mag) is negative
    beyond its noise (:data:`BRIGHTER_SIGMA`, :data:`BRIGHTER_MAG`): not extinction but
    light added to it. False where either is NaN."""
    with np.errstate(invalid="ignore"):
        return extinction < -(BRIGHTER_SIGMA * np.where(np.isfinite(sigma), sigma, 0.0)
                              + BRIGHTER_MAG)


class ExtinctionStars(NamedTuple):
    """A matched frame's stars as :mod:`survey_qa.pipeline.skymask` maps them."""

    xy: np.ndarray
    """(N, 2) positions in the frame (pixels)."""
    extinction_mag: np.ndarray
    """Magnitude against the reference magnitudes (NaN where not measured)."""
    sigma_mag: np.ndarray
    """Their errors (mag)."""


def frame_motion(transform: SimilarityTransform, shape: tuple[int, int]
                 ) -> tuple[float, float, float]:
    """Shift (x, y pixels) and rotation (degrees) of a frame against its reference.

    ``transform`` maps the frame onto the reference (:func:`match_stars`); the shift is
    where the reference's detector centre lies in the frame, minus the centre, and the
    rotation that of the sky on the detector from +x towards +y, in (-180, 180].
    """
    ny, nx = shape
    centre = np.array([[(nx - 1) / 2, (ny - 1) / 2]])
    there = transform.inverse(centre)[0] - centre[0]
    rotation = -math.degrees(transform.rotation)
    rotation = (rotation + 180.0) % 360.0 - 180.0
    return float(there[0]), float(there[1]), (180.0 if rotation == -180.0 else rotation)


CHAIN_TRIES = 2
"""A frame that does not match the reference directly is matched to at most this many
frames already matched (the nearest in time) and carried onto the reference through
them."""


def _accept(match: tuple) -> tuple:
    """``match`` (:func:`match_stars`), or :class:`MatchError` when its transform changes
    the scale by more than :data:`MAX_SCALE_CHANGE`."""
    if abs(match[0].scale - 1.0) > MAX_SCALE_CHANGE:
        raise MatchError(f"the scale changes by {abs(match[0].scale - 1.0):.1%}")
    return match


def match_field(stars: dict[int, FrameStars], ref: int, cfg: SequenceConfig
                ) -> dict[int, tuple[SimilarityTransform, np.ndarray, np.ndarray]]:
    """Every frame of a field that can be matched to the reference frame.

    A frame is matched to the reference with :func:`match_stars`: first on the
    ``control_stars`` brightest of both, then, when that fails, with the reference's
    list cut to one and a half times the frame's (asterisms of a sparse frame look like
    those of the reference's brightest stars only). A frame that still fails is matched to
    the frames already matched, the nearest in time first (:data:`CHAIN_TRIES`), and the
    transform carried through them is refined on the reference's stars
    (:func:`refine_match`). A transform that changes the scale by more than
    :data:`MAX_SCALE_CHANGE` is refused.

    Returns
    -------
    dict
        Position -> ``(transform, ref_index, index)`` as :func:`match_stars` (the
        reference itself included, with the identity).
    """
    ref_stars = stars[ref]
    n_ref = len(ref_stars.mag)
    kw = {"control_stars": cfg.control_stars, "tolerance_px": cfg.match_tolerance_px}
    matches = {ref: (SimilarityTransform(), np.arange(n_ref), np.arange(n_ref))}
    failed = []
    for i, s in stars.items():
        if i == ref:
            continue
        cut = max(3, math.ceil(1.5 * len(s.mag)))
        for ref_xy in (ref_stars.xy, *([ref_stars.xy[:cut]] if cut < cfg.control_stars
                                       and cut < n_ref else [])):
            try:
                transform, _, _ = _accept(match_stars(ref_xy, s.xy, **kw))
                matches[i] = _accept(refine_match(ref_stars.xy, s.xy, transform,
                                                  cfg.match_tolerance_px))
                break
            except MatchError:
                continue
        else:
            failed.append(i)
    order = list(stars)
    for i in failed:
        near = sorted((j for j in matches if j != ref),
                      key=lambda j: abs(order.index(j) - order.index(i)))[:CHAIN_TRIES]
        for j in near:
            try:
                to_j, _, _ = _accept(match_stars(stars[j].xy, stars[i].xy, **kw))
                matches[i] = _accept(refine_match(ref_stars.xy, stars[i].xy,
                                                  chained(to_j, matches[j][0]),
                                                  cfg.match_tolerance_px))
                break
            except MatchError:
                continue
    return matches


def field_records(stars: dict[int, FrameStars], shape: tuple[int, int], cfg: SequenceConfig
                  ) -> dict[int, dict]:
    """The cross-frame columns of every frame of one field.

    Parameters
    ----------
    stars
        Position -> the frame's well-measured stars (:class:`FrameStars`), in time order.
    shape
        (ny, nx) of the detector.
    cfg
        The ``sequence`` block.

    Returns
    -------
    dict
        Position -> ``field_reference`` position (``"reference"``), ``n_matched_stars``,
        ``transparency_mag``, ``extinction_spread_mag``, ``star_count_ratio``,
        ``shift_x_px``, ``shift_y_px``, ``rotation_deg``, and ``matched`` (False: the frame
        could not be matched, its values are NaN); a matched frame also has
        ``extinction_stars`` (:class:`ExtinctionStars`), which
        :mod:`survey_qa.pipeline.skymask` maps.
    """
    ref = reference_frame(stars)
    ref_stars = stars[ref]
    n_ref = len(ref_stars.mag)
    positions = list(stars)
    mags = np.full((len(positions), n_ref), np.nan)
    errs = np.full((len(positions), n_ref), np.nan)
    matches = match_field(stars, ref, cfg)
    records = {}
    for row, i in enumerate(positions):
        s = stars[i]
        record = {"reference": ref, "matched": False, "n_matched_stars": 0,
                  "star_count_ratio": s.n_stars / ref_stars.n_stars,
                  "shift_x_px": math.nan, "shift_y_px": math.nan, "rotation_deg": math.nan}
        records[i] = record
        if i not in matches:
            continue
        transform, ref_index, index = matches[i]
        dx, dy, rot = frame_motion(transform, shape)
        record.update(shift_x_px=dx, shift_y_px=dy, rotation_deg=rot)
        mags[row, ref_index] = s.mag[index]
        errs[row, ref_index] = s.mag_err[index]
        record.update(matched=True, n_matched_stars=int(len(index)))
    offsets, reference = magnitude_offsets(mags, cfg.best_share)
    residual = mags - offsets[:, None] - reference[None, :]
    best = np.argsort(np.where(np.isfinite(offsets), offsets, np.inf))[
        :max(1, math.ceil(cfg.best_share * len(positions)))]
    scale = noise_scale(residual[best], errs[best])
    brighter = brightened(mags - reference[None, :], scale * errs)
    if brighter.any():
        mags[brighter] = np.nan
        offsets, reference = magnitude_offsets(mags, cfg.best_share)
        residual = mags - offsets[:, None] - reference[None, :]
    sigma_px = cfg.map_scale * max(shape)
    for row, i in enumerate(positions):
        record = records[i]
        if not record["matched"]:
            record.update(transparency_mag=math.nan, extinction_spread_mag=math.nan)
            continue
        sigma = scale * errs[row]
        k, _ = extinction_spread(ref_stars.xy, residual[row], sigma, shape, sigma_px, seed=row)
        record.update(transparency_mag=float(offsets[row]), extinction_spread_mag=k,
                      extinction_stars=ExtinctionStars(matches[i][0].inverse(ref_stars.xy),
                                                       mags[row] - reference, sigma))
    return records
