"""The night as a sequence: star matching, field grouping, transparency and extinction
spread, and the decision they feed."""
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from survey_qa import paths
from survey_qa.config import SequenceConfig, load_config
from survey_qa.flows import workdir
from survey_qa.flows.night_pass import finish_night
from survey_qa.pipeline import decide, sequence
from survey_qa.pipeline.flags import decode_flags
from survey_qa.pipeline.schema import CLASSES, empty_exposure_row


def star_list(rng, n=300, side=1024.0):
    """Positions (x, y) and fluxes of a random star field, brightest first."""
    xy = rng.uniform(20, side - 20, (n, 2))
    flux = np.sort(rng.pareto(1.5, n) * 2000 + 100)[::-1]
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


def field_frames(rng, transparency, patch_mag=None, n=400, side=1024, exptime_s=60.0,
                 shifts=None):
    """Star lists of one field seen through ``transparency[f]`` magnitudes of uniform
    extinction and, on the frames of ``patch_mag`` (frame -> peak mag), a cloud patch
    (a Gaussian of sigma side/5 centred at (0.3, 0.6) of the detector)."""
    xy0, flux0 = star_list(rng, n, side)
    out = {}
    for f, t in enumerate(transparency):
        ext = np.full(n, float(t))
        if patch_mag and f in patch_mag:
            d2 = (xy0[:, 0] - 0.3 * side) ** 2 + (xy0[:, 1] - 0.6 * side) ** 2
            ext += patch_mag[f] * np.exp(-0.5 * d2 / (side / 5) ** 2)
        flux = flux0 * exptime_s * 10 ** (-0.4 * ext)
        err = np.sqrt(flux + 400.0 ** 2)
        measured = flux + rng.normal(0, err)
        shift, rot = (shifts or {}).get(f, ((0.0, 0.0), 0.0))
        xy = moved(xy0, shift, rot, side / 2) + rng.normal(0, 0.1, xy0.shape)
        out[f] = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "flux": measured,
                               "flux_err": err, "snr": measured / err,
                               "flags": np.zeros(n, np.int64)})
    return out


def records_of(frames, cfg=None):
    cfg = cfg or SequenceConfig()
    stars = {f: sequence.FrameStars.from_sources(sequence.select_stars(s, cfg.min_snr), 60.0,
                                                 cfg.max_stars)
             for f, s in frames.items()}
    return sequence.field_records(stars, (1024, 1024), cfg)


def test_transparency_and_k_of_a_field_with_uniform_and_patchy_cloud():
    rng = np.random.default_rng(21)
    truth = [0.0, 0.02, 0.0, 0.5, 0.01, 0.0, 1.0, 0.0, 0.03, 0.2]
    frames = field_frames(rng, truth, patch_mag={7: 0.6},
                          shifts={3: ((12.0, -7.0), 0.3), 5: ((-40.0, 25.0), 0.0)})
    rec = records_of(frames)
    t = np.array([rec[f]["transparency_mag"] for f in range(10)])
    k = np.array([rec[f]["extinction_spread_mag"] for f in range(10)])
    assert all(r["matched"] for r in rec.values())
    clear = [0, 1, 2, 4, 5, 8]
    # uniform cloud: the offsets, clear frames ~0 (the best frames are the zero)
    assert np.abs(t[clear] - np.array(truth)[clear]).max() < 0.03
    assert t[3] == pytest.approx(0.5, abs=0.03)
    assert t[6] == pytest.approx(1.0, abs=0.05)
    assert t[9] == pytest.approx(0.2, abs=0.03)
    # k: ~0 wherever the extinction is uniform, large on the patch
    assert np.nanmax(np.delete(k, 7)) < 0.06
    assert 0.3 < k[7] < 0.75
    # the patch dims the median star a little, much less than its peak
    assert 0.0 < t[7] < 0.3
    assert rec[3]["shift_x_px"] == pytest.approx(12.0, abs=0.1)
    assert rec[3]["shift_y_px"] == pytest.approx(-7.0, abs=0.1)
    assert rec[3]["rotation_deg"] == pytest.approx(0.3, abs=0.01)
    assert rec[6]["star_count_ratio"] < 0.97 < rec[2]["star_count_ratio"]


def test_a_frame_that_cannot_be_matched_is_nan():
    rng = np.random.default_rng(22)
    frames = field_frames(rng, [0.0] * 6)
    other, _ = star_list(rng, 400)
    frames[4] = frames[4].assign(x=other[:, 0], y=other[:, 1])
    rec = records_of(frames)
    assert not rec[4]["matched"] and math.isnan(rec[4]["transparency_mag"])
    assert all(rec[f]["matched"] for f in (0, 1, 2, 3, 5))


def row(exposure, ra, dec, **kw):
    r = empty_exposure_row()
    r.update(exposure=exposure, detector="0", path=f"/raw/{exposure}.fits", status="ok",
             n_detectors=1, nx=1024, ny=1024, filter="r", exptime_s=60.0, ra_deg=ra,
             dec_deg=dec, pixscale_arcsec=0.5, image_type="light", n_sources=400,
             fwhm_px=2.0, fwhm_arcsec=1.0, n_stars_used=30, ellipticity=0.05,
             elongation_coherence=0.2, trail_ratio=0.1, sky_nonuniformity=0.01,
             sky_level=500.0, sky_noise=20.0, quality_class="good", p_good=1.0)
    r.update(kw)
    return r


def test_grouping_by_pointing_object_and_star_pattern():
    # pointing: 1024 px at 0.5"/px is 0.142 deg; half of it is the field radius
    rows = {0: row("a", 10.0, 20.0), 1: row("b", 10.05, 20.02), 2: row("c", 10.3, 20.0),
            3: row("d", 10.01, 19.99), 4: row("e", 359.99, 0.0), 5: row("f", 0.01, 0.0)}
    groups = sequence.field_groups(rows, {}, 0.5, 8, 40, 2.0)
    assert groups == [[0, 1, 3], [4, 5]]
    # no pointing: by OBJECT, else by star pattern
    rng = np.random.default_rng(23)
    field = field_frames(rng, [0.0] * 3, shifts={1: ((30.0, 10.0), 0.5)})
    lone, _ = star_list(rng, 300)
    cfg = SequenceConfig()
    stars = {i: sequence.FrameStars.from_sources(sequence.select_stars(s, 10.0), 60.0, 1000)
             for i, s in field.items()}
    stars[3] = sequence.FrameStars(xy=lone, mag=np.zeros(300), mag_err=np.ones(300),
                                   n_stars=300)
    blind = {i: row(str(i), math.nan, math.nan) for i in range(4)}
    named = {i: row(str(i), math.nan, math.nan, object="M13") for i in (4, 5)}
    groups = sequence.field_groups({**blind, **named}, stars, cfg.field_radius,
                                   cfg.pattern_tries, cfg.control_stars, 2.0)
    assert sorted(groups) == [[0, 1, 2], [4, 5]]


def test_cloud_makes_background_issues_with_its_reason():
    cfg = load_config().classify
    clear = decide.classify_row(row("a", 10.0, 20.0, transparency_mag=0.02,
                                    extinction_spread_mag=0.03), cfg)
    assert clear["quality_class"] == "good" and not clear["flag_background"]
    thin = decide.classify_row(row("b", 10.0, 20.0, transparency_mag=0.45,
                                   extinction_spread_mag=0.04), cfg)
    assert thin["quality_class"] == "background_issues" and thin["flag_background"]
    assert "thin cloud: stars 0.45 mag fainter" in thin["reason"]
    assert "limit 0.3 mag" in thin["reason"]
    assert "CLOUD" in decode_flags(thin["qa_flags"])
    assert thin["p_background_issues"] == max(thin[f"p_{c}"] for c in CLASSES)
    patchy = decide.classify_row(row("c", 10.0, 20.0, transparency_mag=0.1,
                                     extinction_spread_mag=0.31), cfg)
    assert patchy["quality_class"] == "background_issues"
    assert "extinction spread k 0.31 mag >= 0.25 mag" in patchy["reason"]
    # the spec's priority: background issues before bad seeing, after tracking
    seeing = decide.classify_row(row("d", 10.0, 20.0, fwhm_arcsec=2.0, fwhm_px=4.0,
                                     extinction_spread_mag=0.4), cfg)
    assert seeing["quality_class"] == "background_issues" and seeing["flag_bad_seeing"]
    trail = decide.classify_row(row("e", 10.0, 20.0, trail_ratio=1.5, ellipticity=0.4,
                                    elongation_coherence=0.95, transparency_mag=0.6), cfg)
    assert trail["quality_class"] == "bad_tracking" and trail["flag_background"]
    assert "also thin cloud" in trail["reason"]


def write_night(out_root, night, rows, sources):
    for r in rows:
        workdir.write_results(out_root, night, r["exposure"], [r],
                              [sources[r["exposure"]].assign(
                                  exposure=r["exposure"], detector=r["detector"],
                                  id=np.arange(len(sources[r["exposure"]]), dtype=np.int32),
                                  peak=np.nan, a_px=np.nan, b_px=np.nan, theta_deg=np.nan,
                                  flux_radius_px=np.nan, fwhm_px=np.nan, ellipticity=np.nan)])
    return paths.zarr_store(out_root, night)


NO_MODELS = SimpleNamespace(scorer=None, classifier=None)


def test_night_pass_finds_the_cloud_frames_of_a_field(tmp_path):
    rng = np.random.default_rng(24)
    truth = [0.0, 0.0, 0.5, 0.0, 0.02, 0.0, 0.0, 0.01]
    frames = field_frames(rng, truth, patch_mag={5: 0.8}, shifts={3: ((5.0, 3.0), 0.0)})
    rows = [row(f"e{f}", 10.0 + 0.001 * f, 20.0, mjd_obs=60000.0 + f / 100)
            for f in range(len(truth))]
    store = write_night(tmp_path, "2025-01-10", rows,
                        {f"e{f}": s for f, s in frames.items()})
    out = finish_night(rows, load_config(), NO_MODELS, store)
    classes = [r["quality_class"] for r in out]
    assert classes == ["good", "good", "background_issues", "good", "good",
                       "background_issues", "good", "good"]
    assert {r["field"] for r in out} == {"e0"}
    assert out[3]["shift_x_px"] == pytest.approx(5.0, abs=0.1)
    assert out[2]["transparency_mag"] == pytest.approx(0.5, abs=0.03)
    assert "patchy cloud" in out[5]["reason"]
    assert all(r["fwhm_rel"] == 1.0 for r in out)
    # the rows the sequence does not touch keep their decision and reason
    assert out[0]["reason"] == rows[0]["reason"]


def test_night_pass_leaves_a_night_without_fields_unchanged(tmp_path):
    rng = np.random.default_rng(25)
    frames = field_frames(rng, [0.0] * 4)
    rows = [row(f"e{f}", 10.0 + f, 20.0, mjd_obs=60000.0 + f / 100) for f in range(4)]
    rows.append(row("few-1", 50.0, 20.0))  # a field of two: named and flagged only
    rows.append(row("few-2", 50.0, 20.0))
    frames.update({"few-1": frames[0], "few-2": frames[1]})
    store = write_night(tmp_path, "2025-01-11", rows,
                        {r["exposure"]: frames.get(r["exposure"], frames.get(i))
                         for i, r in enumerate(rows)})
    out = finish_night(rows, load_config(), NO_MODELS, store)
    pd.testing.assert_frame_equal(pd.DataFrame(out[:4]), pd.DataFrame(rows[:4]))
    assert [r["field"] for r in out[4:]] == ["few-1", "few-1"]
    assert all("FEW_FIELD_FRAMES" in decode_flags(r["qa_flags"]) for r in out[4:])
    assert all(math.isnan(r["transparency_mag"]) for r in out[4:])


def test_stars_brightened_by_contamination_do_not_make_k():
    rng = np.random.default_rng(26)
    frames = field_frames(rng, [0.0] * 6)
    f = frames[2]
    hit = f.index[(f["x"] > 600) & (f["y"] > 600)][:4]  # cosmic rays or a trail on 4 stars
    frames[2] = f.assign(flux=f["flux"].where(~f.index.isin(hit), f["flux"] * 4))
    rec = records_of(frames)
    assert rec[2]["extinction_spread_mag"] < 0.06
    assert abs(rec[2]["transparency_mag"]) < 0.02


def test_the_frame_centre_from_the_wcs_else_the_pointing_keywords():
    from astropy.io import fits

    from survey_qa.pipeline import io

    h = fits.Header({"NAXIS": 2, "NAXIS1": 1001, "NAXIS2": 801, "CTYPE1": "RA---TAN",
                     "CTYPE2": "DEC--TAN", "CRPIX1": 1.0, "CRPIX2": 1.0, "CRVAL1": 150.0,
                     "CRVAL2": 2.0, "CD1_1": -1e-4, "CD1_2": 0.0, "CD2_1": 0.0,
                     "CD2_2": 1e-4, "RA": "00:00:00", "DEC": "+00:00:00"})
    ra, dec = io.pointing(h)  # the WCS at the image centre wins over the keywords
    assert ra == pytest.approx(150.0 - 0.05 / math.cos(math.radians(2.0)), abs=1e-4)
    assert dec == pytest.approx(2.04, abs=1e-4)
    assert io.pointing(fits.Header({"OBJCTRA": "04 12 12.4", "OBJCTDEC": "+22 53 01"})) \
        == pytest.approx((63.0517, 22.8836), abs=1e-3)
    assert io.pointing(fits.Header({"RA": 180.5, "DEC": -30.0})) == (180.5, -30.0)
    assert all(math.isnan(v) for v in io.pointing(fits.Header({"RA": "n/a", "DEC": 5})))
