"""The night as a sequence: star matching, field grouping, transparency and extinction
spread, and the decision they feed."""
import math

import numpy as np
import pytest

from survey_qa.pipeline import sequence


def star_list(rng, n=300, side=1024.0):
    """Positions (x, y) and fluxes of a random star field, brightest first."""
    xy = rng.uniform(20, side - 20, (n, 2))
    flux = np.sort(rng.pareto(1.5, n) * 2000 + 500)[::-1]
    return xy, flux


def moved(xy, shift, rotation_deg, centre=512.0):
    """Where stars at ``xy`` land in a frame shifted by ``shift`` and rotated about the
    detector centre by ``rotation_deg``."""
    a = math.radians(rotation_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return (xy - centre) @ rot.T + centre + np.asarray(shift)


def test_match_stars_recovers_a_known_shift_and_rotation():
    rng = np.random.default_rng(11)
    ref_xy, _ = star_list(rng)
    xy = moved(ref_xy, (37.5, -21.25), 1.5) + rng.normal(0, 0.15, ref_xy.shape)
    keep = rng.random(len(xy)) > 0.15  # some stars lost, some new detections
    xy = np.vstack([xy[keep], rng.uniform(0, 1024, (20, 2))])
    truth = np.flatnonzero(keep)
    transform, ref_index, index = sequence.match_stars(ref_xy, xy)
    # the transform carries the frame back onto the reference
    back = transform(xy[index])
    assert np.median(np.hypot(*(back - ref_xy[ref_index]).T)) < 0.3
    assert math.degrees(transform.rotation) == pytest.approx(-1.5, abs=0.02)
    assert abs(transform.scale - 1.0) < 1e-3
    # pairs are right and nearly all true pairs are found
    assert np.array_equal(truth[index], ref_index)
    assert len(index) >= 0.95 * keep.sum()
    centre = transform.inverse(np.array([[512.0, 512.0]]))[0] - 512.0
    assert centre == pytest.approx([37.5, -21.25], abs=0.1)


def test_match_stars_refuses_an_unrelated_field():
    rng = np.random.default_rng(12)
    ref_xy, _ = star_list(rng, 80)
    other, _ = star_list(rng, 80)
    with pytest.raises(sequence.MatchError):
        sequence.match_stars(ref_xy, other)
    with pytest.raises(sequence.MatchError):
        sequence.match_stars(ref_xy, ref_xy[:2])
