"""Masks of the damaged sky from the field's other frames (pipeline/skymask.py)."""
from __future__ import annotations

import numpy as np
import pytest

from survey_qa.pipeline import sequence, skymask

GRID = 32
SHAPE = (1024, 1024)


def cell_centres(n: int = GRID, size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(n) + 0.5) * size / n
    return np.meshgrid(c, c, indexing="ij")


def vignetting() -> np.ndarray:
    yy, xx = cell_centres()
    r2 = ((yy - 512) ** 2 + (xx - 512) ** 2) / 724.0 ** 2
    return 1.0 - 0.2 * r2


def test_glow_is_masked_where_its_light_passes_five_percent():
    rng = np.random.default_rng(1)
    levels = np.linspace(800.0, 1200.0, 8)
    maps = [lvl * vignetting() * (1 + rng.normal(0, 0.002, (GRID, GRID))) for lvl in levels]
    yy, xx = cell_centres()
    glow = 0.3 * np.exp(-np.hypot(yy, xx) / 200.0)          # share of the sky, corner (0, 0)
    maps[4] = maps[4] * (1 + glow)
    masks = skymask.field_masks(SHAPE, maps, list(range(8)), [None] * 8, [0.0] * 8, [None] * 8,
                                80.0)
    fine_y, fine_x = cell_centres(skymask.MASK_GRID)
    truth = 0.3 * np.exp(-np.hypot(fine_y, fine_x) / 200.0) > skymask.EXCESS_LIMIT
    got = masks[4]
    assert (got & truth).sum() / (got | truth).sum() > 0.8
    for i in (0, 3, 7):
        assert not masks[i].any()          # vignetting and a changing sky are not damage


def test_light_over_the_whole_detector_is_measured_against_the_frames_around_it():
    levels = [1000.0, 1010.0, 1020.0, 1030.0, 1040.0]
    maps = [lvl * np.ones((GRID, GRID)) for lvl in levels]
    _, xx = cell_centres()
    maps[2] = levels[2] * (1.08 + 0.1 * xx / 1024)         # lit by 8-18% everywhere
    ratios = [m / skymask.field_template(maps) for m in maps]
    got = skymask.sky_levels(ratios, [0, 1, 2, 3, 4])
    assert got[2] == pytest.approx(1020.0, rel=1e-3)         # not its own, lit, 10th percentile
    masks = skymask.field_masks(SHAPE, maps, [0, 1, 2, 3, 4], [None] * 5, [0.0] * 5, [None] * 5,
                                80.0)
    assert masks[2].mean() > 0.95
    assert not masks[1].any() and not masks[3].any()


def test_patchy_extinction_is_masked_from_the_stars():
    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 1024, (600, 2))
    inside = np.hypot(xy[:, 0] - 700, xy[:, 1] - 300) < 200
    extinction = 0.3 + np.where(inside, 0.5, 0.0) + rng.normal(0, 0.02, 600)
    stars = sequence.ExtinctionStars(xy, extinction, np.full(600, 0.02))
    ext = skymask.extinction_map(stars, SHAPE, 40.0)
    mask = skymask.frame_mask(SHAPE, None, ext, None)
    fine_y, fine_x = cell_centres(skymask.MASK_GRID)
    truth = np.hypot(fine_x - 700, fine_y - 300) < 200
    assert (mask & truth).sum() / (mask | truth).sum() > 0.7
    # the grey part (0.3 mag everywhere) is not damage: the clear part reads 0
    assert np.percentile(ext, 5) == pytest.approx(0.0, abs=0.01)


def test_the_maps_trim_the_autoencoder_cells_they_see_and_keep_those_they_do_not():
    ae = np.zeros((8, 8), bool)
    ae[0, 0] = ae[7, 7] = True                               # 128-px cells
    excess = np.zeros((GRID, GRID))
    excess[:2, :2] = 0.08                                    # damage in the first, 64 px
    cells = skymask.ae_cells(ae, 128, SHAPE)
    mask = skymask.frame_mask(SHAPE, excess, np.zeros((GRID, GRID)), cells)
    assert mask[:6, :6].all()                                # the light the map measures
    assert not mask[12:16, 12:16].any()                      # the cell's part without light
    assert mask[-16:, -16:].all()                            # a cell the maps cannot see
    quiet = skymask.frame_mask(SHAPE, None, None, None)
    assert not quiet.any()
