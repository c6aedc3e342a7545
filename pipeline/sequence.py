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
"""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree
from skimage.transform import SimilarityTransform

CONTROL_STARS = 40
"""Brightest stars of each list that astroalign matches (a few dozen)."""

MATCH_TOLERANCE_PX = 2.0
"""A frame's star and a reference star are the same when the transform puts them this
close (pixels)."""

MIN_MATCHED = 5
"""Fewest matched stars for a transform to be accepted."""


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
    try:
        first, _ = astroalign.find_transform(xy[:control_stars], ref_xy[:control_stars],
                                             max_control_points=control_stars)
    except (astroalign.MaxIterError, ValueError, TypeError) as e:
        raise MatchError(f"no common star pattern ({e})") from None
    transform = SimilarityTransform(matrix=np.asarray(first.params, float))
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
