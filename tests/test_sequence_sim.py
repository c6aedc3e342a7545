"""Sequences of the simulator: one scene through a night of changing conditions."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from survey_qa import simulate as sim
from survey_qa.flows import simulate as flow
from survey_qa.simulate import sequence as sq

NIGHT = "2025-01-10"
SIZE = 256
N_FRAMES = 6
SEED = 3


@pytest.fixture(scope="module")
def night(tmp_path_factory) -> tuple:
    root = tmp_path_factory.mktemp("seq")
    truth = flow.simulate_sequence(root, NIGHT, N_FRAMES, seed=SEED, size_px=SIZE)
    _, stars = flow.load_truth(root, NIGHT)
    return root, truth, stars


def test_truth_has_one_row_per_frame_with_the_sequence_columns(night):
    _, truth, stars = night
    assert len(truth) == N_FRAMES
    for col in ("field", "transparency_mag", "k_true", "shift_x_px", "shift_y_px",
                "rotation_deg", "quality_class", "grey_extinction_mag", "patchy_mean_mag",
                "sequence_index", "repointed", "sky_factor", "focus_factor"):
        assert col in truth.columns, col
    assert truth["field"].nunique() == 1
    assert truth["sequence_index"].tolist() == list(range(N_FRAMES))
    assert truth.loc[0, ["shift_x_px", "shift_y_px", "rotation_deg"]].abs().max() == 0.0
    assert truth["repointed"].any() and not truth["repointed"].all()
    # mostly thin-cloud free, at least one frame dimmed by cloud
    assert (truth["transparency_mag"] > 0.05).any()
    for col in ("star_id", "x_ref", "y_ref", "flux_clear_adu", "flux_adu", "extinction_mag"):
        assert col in stars.columns, col


def test_stars_keep_their_identity_and_follow_the_pointing(night):
    _, truth, stars = night
    counts = stars.groupby("star_id")["exposure"].nunique()
    assert (counts >= 3).sum() >= 10, "the same stars are seen on several frames"
    for _, row in truth.iterrows():
        st = stars[stars["exposure"] == row["exposure"]]
        p = sq.Pointing(row["shift_x_px"], row["shift_y_px"], row["rotation_deg"])
        x, y = p.apply(st["x_ref"].to_numpy(), st["y_ref"].to_numpy(), SIZE, SIZE)
        np.testing.assert_allclose(x, st["x"], atol=1e-6)
        np.testing.assert_allclose(y, st["y"], atol=1e-6)
        assert st["star_id"].is_unique
    # the re-pointing moves the field by tens of px or more
    first_after = truth[truth["repointed"]].iloc[0]
    before = truth.loc[first_after.name - 1]
    jump = np.hypot(first_after.shift_x_px - before.shift_x_px,
                    first_after.shift_y_px - before.shift_y_px)
    assert jump >= 25.0


def test_star_fluxes_follow_the_transparency(night):
    _, truth, stars = night
    clear = truth.loc[truth["transparency_mag"].idxmin()]
    st_clear = stars[stars["exposure"] == clear["exposure"]].set_index("star_id")
    for _, row in truth.iterrows():
        st = stars[stars["exposure"] == row["exposure"]].set_index("star_id")
        both = st.index.intersection(st_clear.index)
        ratio = st.loc[both, "flux_adu"] / st_clear.loc[both, "flux_adu"]
        dmag = -2.5 * np.log10(ratio)
        offset = row["transparency_mag"] - clear["transparency_mag"]
        # each star is dimmed by the extinction at its place in both frames
        np.testing.assert_allclose(dmag, st.loc[both, "extinction_mag"]
                                   - st_clear.loc[both, "extinction_mag"], atol=1e-9)
        # the frame's transparency is the stars' typical extinction, within what the
        # patchy part (spread k_true) explains
        k_both = row["k_true"] + clear["k_true"]
        assert abs(float(np.median(dmag)) - offset) <= 0.5 * k_both + 1e-6
        assert abs(float(st["extinction_mag"].median()) - row["transparency_mag"]) \
            <= 0.5 * row["k_true"] + 1e-6
        if row["k_true"] == 0 and clear["k_true"] == 0:
            np.testing.assert_allclose(ratio, 10 ** (-0.4 * offset), rtol=1e-9)
        # the clear-frame flux of the stars table agrees
        np.testing.assert_allclose(st["flux_adu"] / st["flux_clear_adu"],
                                   10 ** (-0.4 * st["extinction_mag"]), rtol=1e-9)


def test_k_is_positive_only_on_patchy_cloud_frames(night):
    _, truth, _ = night
    patchy = truth["cloud_extinction_mag"] > 0
    assert patchy.any()
    assert (truth.loc[patchy, "k_true"] > 0).all()
    assert (truth.loc[~patchy, "k_true"] == 0).all()
    assert (truth.loc[~patchy, "patchy_mean_mag"] == 0).all()
    np.testing.assert_allclose(truth["transparency_mag"],
                               truth["grey_extinction_mag"] + truth["patchy_mean_mag"])
    # the spread reached is the one asked for
    np.testing.assert_allclose(truth.loc[patchy, "k_true"],
                               truth.loc[patchy, "cloud_extinction_mag"], rtol=0.25)


def test_wcs_and_object_follow_the_field(night):
    root, truth, stars = night
    worlds = []
    for _, row in truth.iterrows():
        with fits.open(root / NIGHT / row["path"]) as hdul:
            hdr = hdul[0].header
        assert hdr["OBJECT"] == row["field"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            w = WCS(hdr)
        st = stars[stars["exposure"] == row["exposure"]].set_index("star_id")
        worlds.append(pd.DataFrame(np.column_stack(w.pixel_to_world_values(st["x"], st["y"])),
                                   index=st.index, columns=["ra", "dec"]))
    first = worlds[0]
    for other in worlds[1:]:
        both = first.index.intersection(other.index)
        assert len(both) >= 3
        sep = np.hypot((other.loc[both, "ra"] - first.loc[both, "ra"])
                       * np.cos(np.radians(first.loc[both, "dec"])),
                       other.loc[both, "dec"] - first.loc[both, "dec"]) * 3600.0
        assert float(sep.max()) < 0.05  # arcsec: the same star at the same sky position


def test_conditions_change_along_a_long_night():
    seq = sq.plan_sequence(NIGHT, 30, seed=SEED, size_px=1024)
    f = seq.frames
    seeing = np.array([c.seeing_arcsec for c in f])
    assert seeing.max() >= 1.6 and seeing.min() <= 1.2  # a bad-seeing spell
    assert max(c.focus_factor for c in f) > 1.2
    sky = np.array([c.sky_factor for c in f])
    assert sky[0] > 2.0 and sky[-1] > 2.0  # twilight at both ends
    grey = np.array([c.grey_extinction_mag for c in f])
    assert np.mean(grey < 0.05) >= 0.5 and 0.2 <= grey.max() <= 2.0
    assert any(c.cloud_k_mag > 0 for c in f)
    steps = np.hypot(np.diff([c.pointing.shift_x_px for c in f]),
                     np.diff([c.pointing.shift_y_px for c in f]))
    assert np.sum(steps >= 25.0) == 1  # one re-pointing, drift otherwise
    assert np.median(steps) <= 6.0
    assert np.mean([c.trail_ratio <= 0.5 for c in f]) >= 0.9


def test_deterministic_for_a_seed(night):
    root, truth, stars = night
    seq = sq.plan_sequence(NIGHT, N_FRAMES, seed=SEED, size_px=SIZE)
    cols = ["transparency_mag", "k_true", "shift_x_px", "rotation_deg", "seeing_arcsec",
            "sky_level_adu", "ra_deg", "quality_class"]
    for i in (0, N_FRAMES - 1):
        spec, det = sq.render_frame(seq, i)
        row = sq.frame_truth(seq, spec, [det])[0]
        assert {c: row[c] for c in cols} == truth.loc[i, cols].to_dict()
        with fits.open(root / NIGHT / truth.loc[i, "path"]) as hdul:
            np.testing.assert_array_equal(hdul[0].data, det.image)
    # the scene seed alone fixes the field; the seed changes the night's conditions
    other = sq.plan_sequence(NIGHT, N_FRAMES, seed=SEED + 1, size_px=SIZE, scene_seed=SEED)
    pd.testing.assert_frame_equal(other.scene.stars.iloc[:50], seq.scene.stars.iloc[:50])
    assert [c.seeing_arcsec for c in other.frames] != [c.seeing_arcsec for c in seq.frames]


def test_plan_rejects_an_empty_sequence():
    with pytest.raises(ValueError):
        sim.plan_sequence(NIGHT, 0)
