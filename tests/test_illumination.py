"""Illumination: vignetting (a flat field or the night's own pattern) is not a sky defect;
light that the sky adds still is."""
import math
import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from survey_qa.config import BackgroundConfig, Config
from survey_qa.flows import illumination as flow
from survey_qa.pipeline import illumination, io, outputs
from survey_qa.pipeline.background import measure_background
from survey_qa.pipeline.errors import QualityError
from survey_qa.pipeline.flags import bits
from survey_qa.pipeline.records import DetectorImage, FrameMeta

SHAPE = (256, 256)
LIMIT = Config().classify.nonuniformity_limit
SKY = 1000.0  # ADU: a sky well above the noise, as in the real frames


def vignetting(shape=SHAPE, depth=0.14, axis=(0.05, -0.08)) -> np.ndarray:
    """``1 - depth r^2`` (r = 1 in the corners), around an axis a little off the centre."""
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    half = math.hypot(nx, ny) / 2
    r2 = ((xx - nx / 2 - axis[0] * nx) ** 2 + (yy - ny / 2 - axis[1] * ny) ** 2) / half ** 2
    return 1.0 - depth * r2


def night(scene, n=7, extra=None):
    """Frames of a night through one vignetted telescope: sky levels and fields vary;
    ``extra[k]`` is light added to frame k before the optics (a gradient, a glow)."""
    v = vignetting()
    frames = []
    for k in range(n):
        s = scene(shape=SHAPE, n_stars=20, sky=SKY + 300.0 * k, seed=100 + k)
        image = s.image
        if extra and k in extra:
            image = image + extra[k]
        frames.append((image * v).astype(np.float32))
    return frames


def sky_maps(frames):
    out = []
    for image in frames:
        bkg = measure_background(image, None, BackgroundConfig(box_px=32))
        out.append((bkg, illumination.coarse_sky_map(bkg.back, None)))
    return out


def gradient(fraction=0.15, sky=SKY):
    xx = np.arange(SHAPE[1])
    return np.broadcast_to(fraction * sky * xx / (SHAPE[1] - 1), SHAPE).astype(np.float32)


def glow(fraction=0.4, sky=SKY):
    """Scattered light from beyond a corner."""
    yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    return (fraction * sky * np.exp(-((xx - 256) ** 2 + yy ** 2) / (2 * 90.0 ** 2))
            ).astype(np.float32)


def test_vignetting_alone_is_above_the_limit_raw_and_below_after_the_night_pattern(scene):
    measured = sky_maps(night(scene))
    assert all(b.nonuniformity > LIMIT for b, _ in measured)  # what raw frames gave
    pattern = illumination.night_pattern([m for _, m in measured], min_frames=5)
    for _, m in measured:
        assert illumination.corrected_nonuniformity(m, pattern) < 0.03


def test_a_gradient_or_glow_on_a_few_frames_stays(scene):
    measured = sky_maps(night(scene, extra={2: gradient(), 5: glow()}))
    pattern = illumination.night_pattern([m for _, m in measured], min_frames=5)
    u = [illumination.corrected_nonuniformity(m, pattern) for _, m in measured]
    assert u[2] > LIMIT and u[5] > LIMIT  # the added light: background issues
    sky_2 = SKY + 600.0 + gradient()  # frame 2's true sky before the optics
    assert u[2] == pytest.approx(np.ptp(np.percentile(sky_2, [1, 99])) / np.median(sky_2),
                                 abs=0.01)
    assert max(u[k] for k in (0, 1, 3, 4, 6)) < 0.03


def test_radial_mode_keeps_a_gradient_on_every_frame_that_the_median_absorbs(scene):
    # moonlight from the same side all night, scaling with the sky level
    frames = night(scene, extra={k: gradient(sky=SKY + 300.0 * k) for k in range(7)})
    measured = sky_maps(frames)
    pattern = illumination.night_pattern([m for _, m in measured], min_frames=5)
    radial = illumination.radial_pattern(pattern, *SHAPE)
    for _, m in measured:
        assert illumination.corrected_nonuniformity(m, pattern) < 0.03  # absorbed
        assert illumination.corrected_nonuniformity(m, radial) > LIMIT  # kept
    # and on vignetting alone the radial part does the job of the full pattern
    plain = sky_maps(night(scene, n=5))
    radial = illumination.radial_pattern(
        illumination.night_pattern([m for _, m in plain], 5), *SHAPE)
    assert all(illumination.corrected_nonuniformity(m, radial) < 0.03 for _, m in plain)


def test_too_few_frames_give_no_pattern(scene):
    measured = sky_maps(night(scene, n=3))
    assert illumination.night_pattern([m for _, m in measured], min_frames=5) is None


def test_coarse_map_keeps_masked_cells_out():
    back = np.full((64, 96), 10.0, np.float32)
    back[:, :48] = 20.0
    mask = np.zeros(back.shape, bool)
    mask[:32] = True
    m = illumination.coarse_sky_map(back, mask, grid=4)
    assert m.shape == (4, 4)
    assert np.isnan(m[:2]).all()
    assert np.allclose(m[2:, :2], 20.0) and np.allclose(m[2:, 2:], 10.0)


def _det(image, filter_name="V"):
    return DetectorImage(exposure="e1", detector="0", hdu=0, path="x.fits", data=image,
                         mask=np.zeros(image.shape, bool), meta=FrameMeta(filter=filter_name))


def _flat_field(det, cfg):
    flat = flow.detector_flat(det, cfg)
    return det if flat is None else illumination.flat_fielded(det, flat)


def test_flat_field_removes_vignetting_and_flags_the_frame(scene, tmp_path):
    frame = night(scene, n=1)[0]
    path = tmp_path / "flat_V.fits"
    fits.PrimaryHDU((20000.0 * vignetting()).astype(np.float32)).writeto(path)
    cfg = Config()
    cfg.background.flats = {"V": str(path)}
    det = _flat_field(_det(frame), cfg)
    assert det.qa_flags & bits("FLAT_FIELDED")
    assert measure_background(det.data, det.mask, BackgroundConfig(box_px=32)
                              ).nonuniformity < 0.02
    untouched = _flat_field(_det(frame, "R"), cfg)  # no flat for R, no master flat
    assert untouched.qa_flags == 0 and untouched.data is frame


def test_flat_field_of_another_size_is_a_clear_failure(scene, tmp_path):
    path = tmp_path / "flat.fits"
    fits.PrimaryHDU(np.ones((128, 128), np.float32)).writeto(path)
    cfg = Config()
    cfg.background.flat = str(path)
    with pytest.raises(QualityError, match="flat field"):
        _flat_field(_det(np.ones(SHAPE, np.float32)), cfg)


def test_normalised_flat_masks_dead_pixels():
    flat = np.full((32, 32), 5000.0, np.float32)
    flat[3, 4] = 0.0
    flat[5, 6] = np.nan
    norm, bad = illumination.normalise_flat(flat)
    assert np.allclose(norm[~bad], 1.0) and bad[3, 4] and bad[5, 6] and bad.sum() == 2


def test_night_pass_rewrites_u_of_the_vignetted_frames_only(scene, tmp_path):
    frames = night(scene, extra={3: gradient()})
    frames.append(scene(shape=SHAPE, n_stars=20, sky=SKY, seed=99).image)  # not vignetted
    store = tmp_path / "night.zarr"
    keys = [(f"e{k}", "0") for k in range(len(frames))]
    index = outputs.setup_zarr(store, keys, dict(illumination.SKY_VARIABLES))
    rows = []
    for k, image in enumerate(frames):
        bkg = measure_background(image, None, BackgroundConfig(box_px=32))
        outputs.write_frame(store, index[keys[k]],
                            illumination.sky_arrays(bkg, np.zeros(SHAPE, bool)))
        rows.append(dict(exposure=f"e{k}", detector="0", status="ok", image_type="light",
                         nx=SHAPE[1], ny=SHAPE[0], filter="V", qa_flags=0,
                         sky_level=bkg.level, sky_noise=bkg.noise,
                         sky_nonuniformity=bkg.nonuniformity))
    raw_flat_frame = rows[-1]["sky_nonuniformity"]
    assert all(r["sky_nonuniformity"] > LIMIT for r in rows[:-1]) and raw_flat_frame < 0.02
    changed = flow.correct_night(rows, Config(), store)
    assert set(changed) == set(range(len(frames) - 1))  # the pattern does not fit the last
    assert all(r["qa_flags"] & bits("ILLUMINATION_NIGHT") for r in changed.values())
    assert all(r["qa_flags"] == 0 for r in rows)  # the measured rows are left as they were
    assert rows[-1]["sky_nonuniformity"] == raw_flat_frame
    u = [changed[i]["sky_nonuniformity"] for i in range(len(frames) - 1)]
    assert u[3] > LIMIT and max(u[:3] + u[4:]) < 0.03
    cfg = Config()
    cfg.background.illumination = "none"
    assert flow.correct_night(rows, cfg, store) == {}


def test_a_night_without_vignetting_gets_no_pattern(scene):
    frames = [scene(shape=SHAPE, n_stars=20, sky=SKY + 300.0 * k, seed=200 + k).image
              for k in range(7)]
    frames[1] = frames[1] + gradient()
    frames[4] = frames[4] + glow()
    measured = sky_maps(frames)
    assert illumination.night_pattern([m for _, m in measured], min_frames=5) is None


SHARED = Path(os.environ.get("SURVEY_QA_SHARED",
                             Path(__file__).resolve().parents[2] / "shared"))
C14_NIGHT = (SHARED / "real-nights" / "cminsky__asteroid2713" / "Data" / "Uncalibrated"
             / "20181012p3")


@pytest.mark.skipif(not C14_NIGHT.is_dir(), reason="shared real nights not available")
def test_real_raw_night_vignetting_is_divided_out_and_the_sky_agrees():
    """Raw C14 frames (every other one of 25): vignetting alone gave u 0.08-0.11; the night
    pattern leaves the sky flat, and each frame's sky agrees with its source-free pixels."""
    from survey_qa.pipeline.background import residual_statistics, source_mask

    cfg = Config()
    maps, raw_u = [], []
    for path in sorted(C14_NIGHT.glob("*Light*.fit"))[::2]:
        det = io.read_detectors(path, cfg.io)[0]
        bkg = measure_background(det.data, det.mask, cfg.background)
        sky = ~(det.mask | source_mask(det.data, bkg.back, bkg.noise, bkg.level, det.mask))
        median, noise, _ = residual_statistics(det.data, bkg.back, sky)
        assert abs(median) < 0.3 * noise and bkg.qa_flags == 0
        maps.append(illumination.coarse_sky_map(bkg.back, det.mask))
        raw_u.append(bkg.nonuniformity)
    assert len(maps) == 13 and min(raw_u) > LIMIT
    pattern = illumination.night_pattern(maps, cfg.background.illumination_min_frames)
    u = [illumination.corrected_nonuniformity(m, pattern) for m in maps]
    assert max(u) < 0.045 and np.median(u) < 0.025


def test_a_missing_flat_field_is_a_configuration_error(tmp_path):
    from survey_qa.config import load_config

    with pytest.raises(ValueError, match="background.flat: no flat-field file"):
        load_config(overrides={"background": {"flat": str(tmp_path / "nope.fits")}})
    with pytest.raises(ValueError, match=r"background.flats\['V'\]"):
        load_config(overrides={"background": {"flats": {"V": str(tmp_path / "nope.fits")}}})
    path = tmp_path / "flat.fits"
    fits.PrimaryHDU(np.ones((64, 64), np.float32)).writeto(path)
    assert load_config(overrides={"background": {"flat": str(path)}}).background.flat == str(path)
