"""survey-qa stack: registration, scaling, weights, clipping and the FITS it writes."""
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from survey_qa import paths
from survey_qa.cli import main
from survey_qa.config import load_config
from survey_qa.flows import stack as stack_flow
from survey_qa.pipeline import outputs, stack
from survey_qa.pipeline.schema import SOURCE_SCHEMA, empty_exposure_row, rows_to_table

from conftest import _positions, render_scene

NIGHT = "2025-01-10"
SHAPE = (128, 128)
CENTRE = ((SHAPE[1] - 1) / 2, (SHAPE[0] - 1) / 2)


def moved(x, y, dx, dy, rot_deg):
    """Positions rotated by ``rot_deg`` about the centre, then shifted by (dx, dy)."""
    a = math.radians(rot_deg)
    u, v = x - CENTRE[0], y - CENTRE[1]
    return (CENTRE[0] + math.cos(a) * u - math.sin(a) * v + dx,
            CENTRE[1] + math.sin(a) * u + math.cos(a) * v + dy)


def star_list(n=30, seed=0, min_sep=0.0):
    """Random positions at least 22 px from the edges and ``min_sep`` apart, and fluxes."""
    rng = np.random.default_rng(seed)
    x, y = _positions(rng, n, SHAPE, 22, min_sep)
    return x, y, 10 ** rng.uniform(3.5, 5, len(x))


def test_registration_recovers_shift_rotation_and_throughput():
    x, y, f = star_list(40)
    fx, fy = moved(x, y, 3.4, -2.1, 1.5)
    reg = stack.register(np.c_[x, y], f, np.c_[fx, fy][::-1], 0.6 * f[::-1])
    assert reg.drift_px(*CENTRE) == pytest.approx((3.4, -2.1), abs=1e-6)
    assert reg.rotation_deg == pytest.approx(1.5, abs=1e-6)
    assert reg.throughput == pytest.approx(0.6)
    assert reg.n_matched == 40
    with pytest.raises(ValueError):
        stack.register(np.c_[x, y], f, np.c_[x[:2], y[:2]], f[:2])


def test_resampling_puts_a_frame_on_the_reference_grid():
    x, y, f = star_list(25, seed=1)
    ref = render_scene(SHAPE, positions=(x, y), fluxes=f, fwhm_px=3.0, sky=0.0,
                       read_noise=0.1, seed=1)
    fx, fy = moved(x, y, 5.3, 2.6, -2.0)
    frame = render_scene(SHAPE, positions=(fx, fy), fluxes=f, fwhm_px=3.0, sky=0.0,
                         read_noise=0.1, seed=2)
    mask = np.zeros(SHAPE, bool)
    mask[60:63, 10:13] = True
    reg = stack.register(np.c_[x, y], f, np.c_[fx, fy], f)
    data, out_mask = stack.resample(frame.image, mask, reg.matrix, SHAPE)
    # the reference's top row and right columns lie outside the frame: masked
    assert out_mask[-1, :].all() and out_mask[:, -3:].all() and not out_mask[10:100, :3].any()
    inv = np.linalg.inv(reg.matrix)  # inside, masked pixels map back onto the bad ones
    ys, xs = np.nonzero(out_mask[5:-8, 5:-8])
    back = inv @ np.vstack([xs + 5, ys + 5, np.ones(xs.size)])
    assert np.all(np.hypot(back[0] - 11, back[1] - 61) < 3.5)
    diff = np.where(out_mask, 0, data - ref.image)
    peak = ref.image.max()
    assert np.abs(diff).max() < 0.15 * peak  # bilinear interpolation smooths the cores
    ratios = []
    for xi, yi in zip(x, y):
        ix, iy = int(round(xi)), int(round(yi))
        box = (slice(iy - 8, iy + 9), slice(ix - 8, ix + 9))
        if not out_mask[box].any():
            ratios.append(data[box].sum() / ref.image[box].sum())
    assert len(ratios) > 15 and np.median(ratios) == pytest.approx(1.0, abs=0.01)
    assert np.all(np.abs(np.array(ratios) - 1) < 0.06)  # photon noise of the neighbours
    cubic, cubic_mask = stack.resample(frame.image, mask, reg.matrix, SHAPE, order=3)
    assert (cubic_mask >= out_mask).all() and cubic_mask.sum() > out_mask.sum()
    inside = ~cubic_mask
    assert np.abs(cubic - ref.image)[inside].max() < np.abs(data - ref.image)[inside].max()


def test_quality_weights_and_reference():
    w = stack.quality_weights([1.0, 0.5, 1.0, 1.0, np.nan], [10, 10, 20, 10, 10],
                              [3, 3, 3, 6, 3])
    assert w.tolist() == pytest.approx([1.0, 0.25, 0.25, 0.25, 0.0])
    # the sharpest of the frames within 0.1 mag of the clearest
    assert stack.choose_reference([1.0, 0.95, 0.5, 0.99], [4.0, 3.0, 2.0, np.nan]) == 1
    assert stack.choose_reference([np.nan, np.nan], [4.0, 3.0]) == 1
    # a clear frame out of focus is no reference
    assert stack.choose_reference([1.0, 0.6, 0.62, 0.6], [15.0, 3.0, 2.5, 3.2]) == 2
    assert stack.choose_reference([0.9, 1.0], [np.nan, np.nan]) == 1


def flat_frames(n=6, noise=5.0, seed=0, fwhm=(3.0,)):
    """``n`` sky-subtracted frames of the same stars, FWHM cycling through ``fwhm``."""
    x, y, f = star_list(12, seed=seed)
    frames = [render_scene(SHAPE, positions=(x, y), fluxes=f, fwhm_px=fwhm[i % len(fwhm)],
                           sky=0.0, read_noise=noise, seed=seed + 10 + i).image
              for i in range(n)]
    return np.stack(frames), (x, y, f)


def test_a_cosmic_ray_is_rejected_and_star_cores_are_kept():
    clean, (x, y, f) = flat_frames(fwhm=(2.5, 3.5, 4.5))
    frames = clean.copy()
    frames[2, 40, 50] += 5000.0
    frames[4, 90:92, 30] += 3000.0
    masks = np.zeros(frames.shape, bool)
    res = stack.combine(frames, masks, np.ones(6), np.full(6, 5.0), sigma=3.0)
    without = np.delete(clean, [2, 4], axis=0).mean(axis=0)  # the frames without a hit
    assert abs(res.image[40, 50] - clean[[0, 1, 3, 4, 5], 40, 50].mean()) < 1e-3
    assert abs(res.image[90, 30] - clean[[0, 1, 2, 3, 5], 90, 30].mean()) < 1e-3
    assert abs(res.image[40, 50] - without[40, 50]) < 15
    assert res.n_frames[40, 50] == 5
    assert res.rejected_px[2] >= 1 and res.rejected_px[4] >= 2
    plain = frames.mean(axis=0)
    for xi, yi, fi in zip(x, y, f):  # seeing differences are not clipped away
        box = (slice(int(yi) - 10, int(yi) + 11), slice(int(xi) - 10, int(xi) + 11))
        assert res.image[box].sum() == pytest.approx(plain[box].sum(), rel=0.02)
    assert res.rejected_px.sum() < 0.01 * frames[0].size * 6
    assert res.noise_adu == pytest.approx(5.0 / math.sqrt(6))


def test_a_bad_frame_with_a_low_weight_barely_counts():
    frames, _ = flat_frames(n=5)
    bad = frames.copy()
    bad[4] = bad[4] * 0.3 + np.random.default_rng(9).normal(0, 40.0, SHAPE)  # cloud, noise
    masks = np.zeros(frames.shape, bool)
    w = stack.quality_weights([1, 1, 1, 1, 0.3], [5, 5, 5, 5, 40.0], [3] * 5)
    assert w[4] == pytest.approx(0.3 ** 2 * 5 ** 2 / 40 ** 2)
    good = stack.combine(frames[:4], masks[:4], w[:4], np.full(4, 5.0), sigma=0)
    scaled = bad.copy()
    scaled[4] /= 0.3
    res = stack.combine(scaled, masks, w, np.array([5, 5, 5, 5, 40 / 0.3]), sigma=0)
    assert np.abs(res.image - good.image).max() < 0.5  # a tenth of one frame's sky noise
    assert res.noise_adu == pytest.approx(good.noise_adu, rel=0.01)
    plain = stack.combine(scaled, masks, np.ones(5), np.array([5, 5, 5, 5, 40 / 0.3]),
                          sigma=0)
    assert np.std(plain.image - good.image) > 10 * np.std(res.image - good.image)


def test_masked_pixels_do_not_count():
    frames, _ = flat_frames(n=3)
    masks = np.zeros(frames.shape, bool)
    masks[1, 10:20, 10:20] = True
    frames[1, 10:20, 10:20] = np.nan
    masks[:, 0, 0] = True
    res = stack.combine(frames, masks, np.ones(3), np.full(3, 5.0))
    assert np.isfinite(res.image[10:20, 10:20]).all()
    assert (res.n_frames[10:20, 10:20] == 2).all() and res.n_frames[0, 0] == 0
    assert math.isnan(res.image[0, 0]) and res.weight[0, 0] == 0


# ---------------------------------------------------------------- the command on a tiny night


FRAMES = [  # exposure, class, dx, dy, rotation, transparency, FWHM, sky noise, field
    ("f0", "good", 0.0, 0.0, 0.0, 1.0, 3.0, 5.0, "M42"),
    ("f1", "good", 4.2, -3.1, 0.8, 0.8, 3.5, 5.0, "M42"),
    ("f2", "good", -2.7, 1.9, -0.5, 1.0, 2.6, 5.0, "M42"),
    ("f3", "bad_seeing", 1.0, 1.0, 0.0, 1.0, 7.0, 5.0, "M42"),
    ("f4", "good", 1.5, 2.5, 0.3, 0.9, 3.0, 5.0, "M42"),
]


def frame_header(dx=0.0, dy=0.0, rot_deg=0.0):
    """A TAN WCS of a frame whose stars sit at ``moved(reference positions)``, for a
    reference frame with its reference pixel at the centre."""
    a = math.radians(rot_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [83.82, -5.39]
    w.wcs.crpix = np.array(moved(CENTRE[0], CENTRE[1], dx, dy, rot_deg)) + 1
    w.wcs.cd = np.diag([-0.3 / 3600, 0.3 / 3600]) @ rot.T
    return w.to_header()


def reference_header():
    return frame_header()


@pytest.fixture
def night(tmp_path):
    """Frames of one field with known drifts, and catalogs that list their true stars."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    (raw / NIGHT).mkdir(parents=True)
    x, y, f = star_list(20, seed=3, min_sep=14)
    rows, srcs = [], []
    for i, (e, cls, dx, dy, rot, t, fwhm, noise, field) in enumerate(FRAMES):
        fx, fy = moved(x, y, dx, dy, rot)
        scene = render_scene(SHAPE, positions=(fx, fy), fluxes=t * f, fwhm_px=fwhm,
                             sky=100.0, read_noise=noise, seed=20 + i)
        image = scene.image
        if e == "f4":
            image[70, 40] += 8000.0  # a cosmic ray
        header = reference_header() if e == "f2" else fits.Header()
        header.update({"EXPTIME": 60.0, "GAIN": 1.0, "OBJECT": field})
        path = raw / NIGHT / f"{e}.fits"
        fits.PrimaryHDU(image, header).writeto(path)
        r = empty_exposure_row()
        r.update(exposure=e, detector="0", hdu=0, path=str(path), status="ok",
                 quality_class=cls, fwhm_px=fwhm, sky_noise=noise, sky_level=100.0,
                 date_obs=f"2025-01-11T0{i}:00:00", image_type="light", object=field,
                 exptime_s=60.0, nx=SHAPE[1], ny=SHAPE[0])
        rows.append(r)
        for k, (xi, yi, fi) in enumerate(zip(fx, fy, t * f)):
            srcs.append({"exposure": e, "detector": "0", "id": k, "x": xi, "y": yi,
                         "flux": fi, "flags": 0})
    outputs.consolidate(rows_to_table(rows), out, "exposures", NIGHT)
    src = pd.DataFrame(srcs)
    for c in SOURCE_SCHEMA:
        if c.name not in src:
            src[c.name] = 0.0
    outputs.consolidate(rows_to_table(src.to_dict("records"), SOURCE_SCHEMA), out, "sources",
                        NIGHT)
    return raw, out, (x, y, f)


def test_stack_command_writes_the_fits_with_its_provenance(night, capsys):
    raw, out, (x, y, f) = night
    assert main(["stack", "--night", NIGHT, "--out-root", str(out)]) == 0
    assert "4 of 4 chosen frames stacked (reference f2)" in capsys.readouterr().out
    path = paths.stack_file(out, NIGHT, "M42")
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    with fits.open(path) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "WEIGHT", "NFRAMES", "PROVENANCE"]
        h = hdul[0].header
        image = hdul[0].data
        assert h["BITPIX"] == -32 and image.shape == SHAPE
        assert h["REFEXP"] == "f2" and h["NCOMBINE"] == 4 and h["WEIGHTNG"] == "quality"
        assert h["CLIPSIG"] == 3.0 and h["NREJECT"] >= 1
        assert WCS(h).has_celestial and h["CRVAL1"] == pytest.approx(83.82)
        prov = pd.DataFrame(hdul["PROVENANCE"].data.tolist(),
                            columns=hdul["PROVENANCE"].columns.names)
        nframes = hdul["NFRAMES"].data
    prov = prov.set_index("exposure")
    assert list(prov.index) == ["f0", "f1", "f2", "f4"]  # bad seeing is not chosen
    ref = FRAMES[2]
    for e, _, dx, dy, rot, t, fwhm, noise, _ in FRAMES:
        if e not in prov.index:
            continue
        p = prov.loc[e]
        # drift and rotation against the reference frame f2 (small angles)
        assert p["shift_x_px"] == pytest.approx(dx - ref[2], abs=0.3)
        assert p["shift_y_px"] == pytest.approx(dy - ref[3], abs=0.3)
        assert p["rotation_deg"] == pytest.approx(rot - ref[4], abs=0.02)
        assert p["throughput"] == pytest.approx(t, rel=1e-6)
        assert p["weight"] == pytest.approx(t ** 2 * ref[6] ** 2 / fwhm ** 2, rel=0.2)
    assert prov.loc["f4", "rejected_px"] >= 1  # the cosmic ray
    assert nframes[70, 40] <= 4
    # photometry on the reference grid: stars keep the reference frame's flux
    rx, ry = moved(x, y, *ref[2:5])
    ratios = []
    for xi, yi, fi in zip(rx, ry, f):
        ix, iy = int(round(xi)), int(round(yi))
        alone = np.sort(np.hypot(rx - xi, ry - yi))[1] > 14
        if alone and 10 <= ix < SHAPE[1] - 10 and 10 <= iy < SHAPE[0] - 10 and fi > 1e4:
            ratios.append(np.nansum(image[iy - 7:iy + 8, ix - 7:ix + 8]) / fi)
    assert len(ratios) >= 5 and np.median(ratios) == pytest.approx(1.0, abs=0.03)


def test_stack_is_written_atomically(night, monkeypatch):
    raw, out, _ = night
    assert main(["stack", "--night", NIGHT, "--out-root", str(out)]) == 0
    path = paths.stack_file(out, NIGHT, "M42")
    before = path.read_bytes()

    def broken(self, target, *args, **kwargs):
        Path(target).write_bytes(b"SIMPLE  =                    T / cut short")
        raise OSError("disk full")

    monkeypatch.setattr(fits.HDUList, "writeto", broken)
    cfg = load_config(overrides={"run": {"raw_root": str(raw), "out_root": str(out)}})
    with pytest.raises(OSError, match="disk full"):
        stack_flow.stack_field(cfg, NIGHT)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["M42.fits"]


def test_equal_weights_every_class_and_wrong_arguments(night, capsys, tmp_path):
    raw, out, _ = night
    target = tmp_path / "all.fits"
    assert main(["stack", "--night", NIGHT, "--out-root", str(out), "--any-class",
                 "--weighting", "equal", "--sigma", "0", "--output", str(target)]) == 0
    with fits.open(target) as hdul:
        prov = hdul["PROVENANCE"].data
        assert len(prov) == 5 and set(prov["weight"]) == {1.0}
        assert hdul[0].header["NREJECT"] == 0 and hdul[0].header["CLASSES"] == "all"
    base = ["stack", "--night", NIGHT, "--out-root", str(out)]
    assert main([*base, "--field", "M31"]) == 2
    assert "no chosen frame of field 'M31'" in capsys.readouterr().err
    assert main([*base, "--class", "great"]) == 2
    assert main([*base, "--where", "fwhm < 2"]) == 2
    assert main([*base, "--where", "fwhm_px > 100"]) == 2
    assert main(["stack", "--night", "1999-01-01", "--out-root", str(out)]) == 2


def test_frames_of_several_fields_need_a_field(night):
    raw, out, _ = night
    table = pd.read_parquet(paths.catalog_file(out, "exposures", NIGHT))
    table.loc[table["exposure"] == "f1", "object"] = "M31"
    rows, name, _ = stack_flow.one_field(table, "M42")
    assert name == "M42" and "f1" not in set(rows["exposure"])
    with pytest.raises(ValueError, match="several fields: M42 \\(4\\), M31 \\(1\\)"):
        stack_flow.one_field(table, None)
    assert stack_flow.file_name("NGC 224 / M31") == "NGC_224_M31"
    assert stack_flow.file_name("") == "field"
    # the nightly job's field groups split one OBJECT pointed twice
    table["object"] = "M42"
    table["field"] = ["f0", "f0", "f0", "f3", "f3"]
    assert stack_flow.field_names(table).tolist() == ["f0", "f0", "f0", "f3", "f3"]
    with pytest.raises(ValueError, match="several fields: f0 \\(3\\), f3 \\(2\\)"):
        stack_flow.one_field(table, "M42")
    assert stack_flow.one_field(table, "f3")[0]["exposure"].tolist() == ["f3", "f4"]
    table.loc[table["field"] == "f3", "object"] = "M43"
    assert stack_flow.field_names(table).tolist() == ["M42"] * 3 + ["M43"] * 2


def test_mosaics_need_a_detector_and_the_clearest_sharpest_frame_is_the_reference():
    rows = pd.DataFrame({
        "exposure": ["a", "a", "a", "b", "b", "b"],
        "detector": ["ALL", "CCD1", "CCD2", "ALL", "CCD1", "CCD2"],
        "status": "ok", "fwhm_px": [3.0, 3.0, 3.1, 2.5, 2.5, 2.6]})
    chosen = pd.DataFrame({"exposure": ["a", "b"], "weight": [1.0, 0.5],
                           "star_flux_adu": [1e5, 5e4]})
    with pytest.raises(ValueError, match="mosaics: choose one --detector \\(CCD1, CCD2\\)"):
        stack_flow.detector_rows(rows, chosen, None)
    picked = stack_flow.detector_rows(rows, chosen, "CCD2")
    assert picked["detector"].tolist() == ["CCD2", "CCD2"]
    with pytest.raises(ValueError, match="no chosen frame has a detector 'CCD9'"):
        stack_flow.detector_rows(rows, chosen, "CCD9")
    # transparency_mag (0 clear, positive dimmer) wins over the star flux
    picked["transparency_mag"] = [0.0, 0.5]
    picked["exptime_s"] = 60.0
    t = stack_flow.transparency(picked)
    fwhm = stack_flow.frame_fwhm(picked.assign(src_fwhm_px=np.nan))
    assert stack.choose_reference(t, fwhm) == 0
    assert stack.choose_reference(t, [3.1, 2.6]) == 0  # b is sharper but half a magnitude dimmer


def test_noise_on_the_scale_of_a_star_sees_sky_structure():
    rng = np.random.default_rng(4)
    white = rng.normal(0, 10.0, (256, 256)).astype(np.float32)
    mask = np.zeros(white.shape, bool)
    mask[:, :40] = True
    white[:, :40] = np.nan
    assert stack.star_scale_noise(white, mask, 6) == pytest.approx(10.0, rel=0.1)
    yy, xx = np.mgrid[0:256, 0:256]
    cloudy = white + 8.0 * np.sin(xx / 9.0) * np.cos(yy / 13.0)  # 4 ADU rms, coherent
    assert stack.star_scale_noise(cloudy, mask, 6) > 2 * 10.0
    assert math.isnan(stack.star_scale_noise(white, np.ones(white.shape, bool), 6))


def test_a_frame_that_does_not_register_is_left_out_with_its_reason(night, capsys):
    raw, out, _ = night
    path = paths.catalog_file(out, "sources", NIGHT)
    src = pd.read_parquet(path)
    lost = src["exposure"] == "f3"
    rng = np.random.default_rng(7)
    src.loc[lost, "x"] = rng.uniform(0, 128, lost.sum())
    src.loc[lost, "y"] = rng.uniform(0, 128, lost.sum())
    outputs.consolidate(rows_to_table(src.to_dict("records"), SOURCE_SCHEMA), out, "sources",
                        NIGHT)
    assert main(["stack", "--night", NIGHT, "--out-root", str(out), "--any-class"]) == 0
    assert "left out    f3: " in capsys.readouterr().out
    with fits.open(paths.stack_file(out, NIGHT, "M42")) as hdul:
        prov = hdul["PROVENANCE"].data
        row = prov[prov["exposure"] == "f3"][0]
        assert not row["used"] and row["weight"] == 0 and row["note"]
        assert hdul[0].header["NCOMBINE"] == 4 and hdul[0].header["NCHOSEN"] == 5


def test_frames_whose_stars_do_not_match_are_registered_through_the_wcs(night, capsys):
    raw, out, _ = night
    for e, _, dx, dy, rot, *_ in FRAMES:  # every frame gets its WCS
        path = raw / NIGHT / f"{e}.fits"
        with fits.open(path, mode="update") as hdul:
            hdul[0].header.update(frame_header(dx, dy, rot))
    path = paths.catalog_file(out, "sources", NIGHT)
    src = pd.read_parquet(path)
    few = (src["exposure"] != "f1") | (src["id"] < 4)  # f1: 4 stars, no pattern to match
    outputs.consolidate(rows_to_table(src[few].to_dict("records"), SOURCE_SCHEMA), out,
                        "sources", NIGHT)
    assert main(["stack", "--night", NIGHT, "--out-root", str(out)]) == 0
    with fits.open(paths.stack_file(out, NIGHT, "M42")) as hdul:
        prov = pd.DataFrame(hdul["PROVENANCE"].data.tolist(),
                            columns=hdul["PROVENANCE"].columns.names).set_index("exposure")
    f1, ref = FRAMES[1], FRAMES[2]
    assert prov.loc["f1", "registered_by"] == "wcs+stars" and prov.loc["f1", "used"]
    assert prov.loc["f1", "n_matched"] == 4 and prov.loc["f1", "scaled_by"] == "stars"
    assert prov.loc["f1", "shift_x_px"] == pytest.approx(f1[2] - ref[2], abs=0.3)
    assert prov.loc["f1", "rotation_deg"] == pytest.approx(f1[4] - ref[4], abs=0.05)
    assert prov.loc["f1", "throughput"] == pytest.approx(f1[5], rel=1e-6)
    assert prov.loc["f0", "registered_by"] == "stars"
    assert prov.loc["f2", "registered_by"] == "reference"


# ---------------------------------------------------------------- registration through the WCS


def tan_sip_wcs(crpix, rot_deg=0.0, k=0.0, crval=(83.82, -5.39)):
    """A TAN WCS of 0.3"/px rotated by ``rot_deg``, with a SIP distortion of ``k u^2``
    along x and ``k v^2`` along y (``u, v``: pixels from ``crpix``) when ``k`` is not 0."""
    from astropy.wcs import Sip

    a = math.radians(rot_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if k else ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(crval)
    w.wcs.crpix = list(crpix)
    w.wcs.cd = np.diag([-0.3 / 3600, 0.3 / 3600]) @ rot.T
    if k:
        coef_a, coef_b = np.zeros((3, 3)), np.zeros((3, 3))
        coef_a[2, 0], coef_b[0, 2], coef_a[1, 1] = k, k, 0.5 * k
        w.sip = Sip(coef_a, coef_b, None, None, w.wcs.crpix)
    return w


def centroid(image, x, y, r=4):
    """First moments of the positive pixels within ``r`` of ``(x, y)``, re-centred twice."""
    for _ in range(3):
        ix, iy = int(round(x)), int(round(y))
        yy, xx = np.mgrid[iy - r:iy + r + 1, ix - r:ix + r + 1]
        w = np.clip(image[iy - r:iy + r + 1, ix - r:ix + r + 1], 0, None)
        x, y = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
    return x, y


def wcs_scene(frame_wcs, ref_wcs, seed=5):
    """Stars at known reference positions, drawn where ``frame_wcs`` puts them.

    Returns the frame, the reference positions with their centroids in the reference
    rendering and the fluxes, and the frame positions."""
    x, y, f = star_list(25, seed=seed, min_sep=12)
    fx, fy = frame_wcs.world_to_pixel(ref_wcs.pixel_to_world(x, y))
    frame = render_scene(SHAPE, positions=(fx, fy), fluxes=f, fwhm_px=3.0, sky=0.0,
                         read_noise=0.1, seed=seed)
    ref = render_scene(SHAPE, positions=(x, y), fluxes=f, fwhm_px=3.0, sky=0.0,
                       read_noise=0.1, seed=seed + 100)
    cx, cy = np.array([centroid(ref.image, xi, yi) for xi, yi in zip(x, y)]).T
    return frame.image, (x, y, cx, cy, f), (np.asarray(fx), np.asarray(fy))


def position_errors(image, mask, x, y, cx, cy):
    """Distances (px) of the centroids in ``image`` of the stars at ``(x, y)`` from their
    centroids ``(cx, cy)`` in the reference, for the stars clear of the mask."""
    d = []
    for xi, yi, cxi, cyi in zip(x, y, cx, cy):
        ix, iy = int(round(xi)), int(round(yi))
        if not mask[iy - 5:iy + 6, ix - 5:ix + 6].any():
            mx, my = centroid(image, xi, yi)
            d.append(math.hypot(mx - cxi, my - cyi))
    return np.array(d)


def test_a_frame_registered_through_a_distorted_wcs_puts_stars_on_the_reference_s():
    ref_wcs = tan_sip_wcs([64.5, 64.5])
    frame_wcs = tan_sip_wcs([70.0, 60.5], rot_deg=2.0, k=6e-4)  # ~1 px of curvature
    image, (x, y, cx, cy, _), _ = wcs_scene(frame_wcs, ref_wcs)
    mask = np.zeros(SHAPE, bool)
    mapping = stack.WcsMapping(ref_wcs, frame_wcs)
    reg = stack.register_by_wcs(mapping, SHAPE, np.zeros((0, 2)), [], np.zeros((0, 2)), [])
    assert reg.n_matched == 0 and math.isnan(reg.throughput) and reg.wcs is not None
    data, out_mask = stack.resample_registered(image, mask, reg, SHAPE)
    # masked where the frame does not reach, not where it covers a pixel's neighbours
    yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    fx, fy = frame_wcs.world_to_pixel(ref_wcs.pixel_to_world(xx, yy))
    outside = (fx < -0.01) | (fx > SHAPE[1] - 0.99) | (fy < -0.01) | (fy > SHAPE[0] - 0.99)
    inside = (fx > 1) & (fx < SHAPE[1] - 2) & (fy > 1) & (fy < SHAPE[0] - 2)
    assert outside.sum() > 500 and out_mask[outside].all() and not out_mask[inside].any()
    errors = position_errors(data, out_mask, x, y, cx, cy)
    assert len(errors) >= 15 and np.median(errors) < 0.05 and errors.max() < 0.1
    # the affine approximation of the same WCS misses the distortion
    affine, affine_mask = stack.resample(image, mask, reg.matrix, SHAPE)
    assert position_errors(affine, affine_mask, x, y, cx, cy).max() > 0.4


def test_stars_paired_through_the_wcs_correct_its_pointing():
    ref_wcs = tan_sip_wcs([64.5, 64.5])
    true_wcs = tan_sip_wcs([66.0, 62.5], rot_deg=-1.0, k=6e-4)
    image, (x, y, cx, cy, f), (fx, fy) = wcs_scene(true_wcs, ref_wcs, seed=6)
    header_wcs = tan_sip_wcs([66.0, 62.5], rot_deg=-1.0, k=6e-4,  # 1.2 px off
                             crval=(83.82 + 0.3 / 3600, -5.39 + 0.24 / 3600))
    mask = np.zeros(SHAPE, bool)
    mapping = stack.WcsMapping(ref_wcs, header_wcs)
    alone = stack.resample_registered(image, mask, stack.register_by_wcs(
        mapping, SHAPE, np.zeros((0, 2)), [], np.zeros((0, 2)), []), SHAPE)
    assert np.median(position_errors(*alone, x, y, cx, cy)) > 0.8
    few = slice(0, 4)  # too few stars for a pattern, enough to correct the WCS
    reg = stack.register_by_wcs(mapping, SHAPE, np.c_[x, y][few], f[few],
                                np.c_[fx, fy][few], 0.7 * f[few])
    assert reg.n_matched == 4 and reg.throughput == pytest.approx(0.7)
    data, out_mask = stack.resample_registered(image, mask, reg, SHAPE)
    errors = position_errors(data, out_mask, x, y, cx, cy)
    assert len(errors) >= 15 and np.median(errors) < 0.05 and errors.max() < 0.1


def test_a_cubic_resampling_through_the_wcs_grows_the_mask():
    ref_wcs = tan_sip_wcs([64.5, 64.5])
    frame_wcs = tan_sip_wcs([68.0, 61.0], rot_deg=1.0, k=6e-4)
    image, (x, y, cx, cy, _), _ = wcs_scene(frame_wcs, ref_wcs, seed=7)
    mask = np.zeros(SHAPE, bool)
    mask[60:63, 10:13] = True
    mapping = stack.WcsMapping(ref_wcs, frame_wcs)
    linear, linear_mask = stack.reproject_frame(image, mask, mapping, SHAPE)
    cubic, cubic_mask = stack.reproject_frame(image, mask, mapping, SHAPE, order=3)
    assert (cubic_mask >= linear_mask).all() and cubic_mask.sum() > linear_mask.sum()
    assert linear_mask[55:70, 10:22].any() and not linear_mask[30:50, 30:50].any()
    assert np.median(position_errors(cubic, cubic_mask, x, y, cx, cy)) < 0.05


def test_the_stack_keeps_the_reference_s_distortion(tmp_path):
    path = tmp_path / "ref.fits"
    header = tan_sip_wcs([64.5, 64.5], k=6e-4).to_header(relax=True)
    fits.PrimaryHDU(np.zeros(SHAPE, np.float32), header).writeto(path)
    row = pd.Series({"path": str(path), "hdu": 0, "ny": SHAPE[0], "nx": SHAPE[1]})
    cards = stack_flow._reference_wcs(row)
    assert cards["CTYPE1"] == "RA---TAN-SIP" and cards["A_2_0"] == pytest.approx(6e-4)
    stacked = WCS(fits.Header(cards))
    sky = np.array(stacked.pixel_to_world_values(3.0, 5.0))
    true = np.array(tan_sip_wcs([64.5, 64.5], k=6e-4).pixel_to_world_values(3.0, 5.0))
    assert np.abs(sky - true).max() < 1e-9


# ---------------------------------------------------------------- frames on disk


def test_frames_on_disk_read_back_by_rows(tmp_path):
    rng = np.random.default_rng(3)
    frames = rng.normal(0, 1, (4, 30, 20)).astype(np.float32)
    disk = stack_flow.DiskFrames(tmp_path, "data", 4, (30, 20), np.float32, 0.0)
    masks = stack_flow.DiskFrames(tmp_path, "mask", 4, (30, 20), bool, True)
    for i in (0, 1, 3):  # frame 2 is never written
        disk[i] = frames[i]
        masks[i] = frames[i] > 1
    assert disk.shape == (4, 30, 20)
    block = disk[:, 7:19]
    assert block.dtype == np.float32 and block.shape == (4, 12, 20)
    assert np.array_equal(block[[0, 1, 3]], frames[[0, 1, 3], 7:19])
    assert (block[2] == 0).all() and masks[:, 25:40][2].all()
    assert np.array_equal(masks[:, :][3], frames[3] > 1)
    with pytest.raises(IndexError):
        disk[1]


def test_the_stack_from_disk_equals_the_stack_in_memory(night, monkeypatch):
    raw, out, _ = night
    combine, seen = stack.combine, []

    def both(frames, masks, *args, **kwargs):
        on_disk = combine(frames, masks, *args, **kwargs)  # blocks of a few rows
        in_memory = combine(frames[:, :], masks[:, :], *args, rows_per_block=SHAPE[0],
                            **kwargs)
        seen.append((type(frames), sorted(p.name for p in frames.folder.iterdir()),
                     frames.folder.parent, on_disk, in_memory))
        return on_disk

    monkeypatch.setattr(stack, "BLOCK_VALUES", 5 * 3 * SHAPE[1])  # 3 rows a block
    monkeypatch.setattr(stack, "combine", both)
    cfg = load_config(overrides={"run": {"raw_root": str(raw), "out_root": str(out)}})
    run = stack_flow.stack_field(cfg, NIGHT, classes=[])
    (kind, files, parent, on_disk, in_memory), = seen
    assert kind is stack_flow.DiskFrames and parent == run.path.parent
    assert files == [f"{a}-{i:05d}.dat" for a in ("data", "mask") for i in range(5)]
    assert on_disk.rejected_px.sum() >= 1  # the cosmic ray: clipping took part
    np.testing.assert_allclose(on_disk.image, in_memory.image, rtol=1e-6, atol=1e-4)
    assert np.array_equal(np.isnan(on_disk.image), np.isnan(in_memory.image))
    np.testing.assert_allclose(on_disk.weight, in_memory.weight, rtol=1e-6)
    assert np.array_equal(on_disk.n_frames, in_memory.n_frames)
    assert np.array_equal(on_disk.rejected_px, in_memory.rejected_px)
    with fits.open(run.path) as hdul:
        assert np.array_equal(hdul[0].data, on_disk.image, equal_nan=True)
    assert sorted(p.name for p in run.path.parent.iterdir()) == ["M42.fits"]


def test_the_frames_on_disk_are_removed_when_the_stack_fails(night, monkeypatch):
    raw, out, _ = night

    def broken(*args, **kwargs):
        raise RuntimeError("out of disk")

    monkeypatch.setattr(stack, "combine", broken)
    cfg = load_config(overrides={"run": {"raw_root": str(raw), "out_root": str(out)}})
    with pytest.raises(RuntimeError, match="out of disk"):
        stack_flow.stack_field(cfg, NIGHT)
    assert list(paths.stack_file(out, NIGHT, "M42").parent.iterdir()) == []


# ---------------------------------------------------------------- damaged sky


def test_cells_spread_onto_the_pixels_by_the_nearest_cell():
    cells = np.zeros((4, 4), bool)
    cells[0, 3] = True
    pixels = stack.cells_to_pixels(cells, (8, 12))
    assert pixels.shape == (8, 12) and pixels[:2, 9:].all() and pixels.sum() == 6
    small = np.eye(3, dtype=np.uint8)  # a detector of fewer pixels than cells: one each
    assert np.array_equal(stack.cells_to_pixels(small, (3, 3)), small.astype(bool))
    uneven = np.random.default_rng(1).random((128, 128)) < 0.3  # cells of unequal size
    for shape in [(130, 1000), (128, 128), (1000, 257)]:
        assert stack.cells_pixel_share(uneven, shape) == pytest.approx(
            stack.cells_to_pixels(uneven, shape).mean(), abs=1e-12)


DAMAGED = "f1"
"""The frame of :func:`damaged_night` with added light over its upper right quadrant."""


def added_light(shape=SHAPE):
    """Bright stripes (finer than the sky mesh) over the upper right quadrant."""
    light = np.zeros(shape)
    x = np.arange(shape[1] // 2, shape[1])
    light[shape[0] // 2:, shape[1] // 2:] = 150.0 * (1 + np.sin(2 * np.pi * x / 6.0))
    return light


def set_masks(out, cells: dict, fractions: dict):
    """Write ``defect_mask`` cells into the night's array store and the catalog's
    ``defect_mask_fraction`` (frames not named: no mask, NaN)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from survey_qa.pipeline import skymask

    store = paths.zarr_store(out, NIGHT)
    index = outputs.setup_zarr(store, [(e, "0") for e, *_ in FRAMES],
                               dict(skymask.MASK_VARIABLES))
    for e, c in cells.items():
        assert outputs.write_frame(store, index[(e, "0")], {"defect_mask": c})
    path = paths.catalog_file(out, "exposures", NIGHT)
    table = pq.read_table(path)
    values = [fractions.get(e, math.nan) for e in table["exposure"].to_pylist()]
    column = table.schema.get_field_index("defect_mask_fraction")
    table = table.set_column(column, table.schema.field(column),
                             pa.array(values, table.schema.field(column).type))
    outputs.write_parquet_atomic(table, path)


@pytest.fixture
def damaged_night(night):
    """The tiny night with added light over a quadrant of f1, its cells set there; f0 has
    cells set everywhere but no ``defect_mask_fraction`` (its mask was not made)."""
    raw, out, stars = night
    path = raw / NIGHT / f"{DAMAGED}.fits"
    with fits.open(path) as hdul:
        image, header = hdul[0].data + added_light(), hdul[0].header
    fits.PrimaryHDU(image, header).writeto(path, overwrite=True)
    quadrant = np.zeros(SHAPE, np.uint8)
    quadrant[SHAPE[0] // 2:, SHAPE[1] // 2:] = 1
    clean = np.zeros(SHAPE, np.uint8)
    set_masks(out, {DAMAGED: quadrant, "f0": np.ones(SHAPE, np.uint8), "f2": clean,
                    "f4": clean}, {DAMAGED: 0.25, "f2": 0.0, "f4": 0.0})
    return raw, out, stars


def read_stack(path):
    """The stack, its header, its provenance by exposure and its frame counts."""
    with fits.open(path) as hdul:
        prov = pd.DataFrame(hdul["PROVENANCE"].data.tolist(),
                            columns=hdul["PROVENANCE"].columns.names).set_index("exposure")
        return (hdul[0].data.astype(float), hdul[0].header, prov,
                hdul["NFRAMES"].data.astype(int))


QUADRANT_BOX = (slice(80, 115), slice(72, 115))
"""On the reference grid (f2), well inside the damaged quadrant of f1 (drift 6.9, -5.0 px)."""


def test_the_damaged_sky_of_a_frame_is_left_out(damaged_night, tmp_path):
    raw, out, _ = damaged_night
    base = ["stack", "--night", NIGHT, "--out-root", str(out), "--sigma", "0"]
    files = {k: tmp_path / f"{k}.fits" for k in ("masked", "kept", "clean")}
    assert main([*base, "--output", str(files["masked"])]) == 0
    assert main([*base, "--keep-damaged-sky", "--output", str(files["kept"])]) == 0
    assert main([*base, "--where", f"exposure != '{DAMAGED}'",
                 "--output", str(files["clean"])]) == 0
    masked, header, prov, n_masked = read_stack(files["masked"])
    kept, kept_header, kept_prov, _ = read_stack(files["kept"])
    clean, *_ = read_stack(files["clean"])
    assert header["SKYMASK"] and header["NSKYMASK"] == 3 and header["NCOMBINE"] == 4
    assert not kept_header["SKYMASK"] and kept_header["NSKYMASK"] == 0
    assert prov.loc[DAMAGED, "damaged_sky_share"] == pytest.approx(0.25)
    assert prov.loc[["f0", "f2", "f4"], "damaged_sky_share"].tolist() == [0.0, 0.0, 0.0]
    assert (kept_prov["damaged_sky_share"] == 0).all()
    box = QUADRANT_BOX
    # the damaged quadrant: the clean frames alone; with the damage kept: the light shows
    np.testing.assert_allclose(masked[box], clean[box], rtol=1e-5, atol=1e-3)
    assert np.abs(kept[box] - clean[box]).max() > 30.0
    assert (n_masked[box] == 3).all()
    # elsewhere f1 counts
    lower = (slice(15, 50), slice(15, 110))
    assert (n_masked[lower] == 4).all()
    assert np.abs(masked[lower] - clean[lower]).max() > 1.0


def test_a_frame_whose_whole_sky_is_damaged_gives_nothing(night, tmp_path):
    raw, out, _ = night
    everywhere = np.ones(SHAPE, np.uint8)
    set_masks(out, {"f4": everywhere, "f2": everywhere},
              {"f4": 1.0, "f2": 1.0, "f0": 0.0, "f1": 0.0})
    target = tmp_path / "stack.fits"
    assert main(["stack", "--night", NIGHT, "--out-root", str(out),
                 "--output", str(target)]) == 0
    _, header, prov, _ = read_stack(target)
    assert header["NCOMBINE"] == 2 and header["REFEXP"] != "f2"  # f2: no reference
    for e in ("f2", "f4"):
        assert not prov.loc[e, "used"] and prov.loc[e, "weight"] == 0
        assert prov.loc[e, "damaged_sky_share"] == 1.0
        assert prov.loc[e, "note"] == "its whole detector is damaged sky"
    set_masks(out, {e: everywhere for e, *_ in FRAMES}, {e: 1.0 for e, *_ in FRAMES})
    cfg = load_config(overrides={"run": {"raw_root": str(raw), "out_root": str(out)}})
    with pytest.raises(ValueError, match="every chosen frame is damaged sky"):
        stack_flow.stack_field(cfg, NIGHT, output=target)
