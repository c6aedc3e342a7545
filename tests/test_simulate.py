"""The GalSim simulator: truth that matches the pixels, classes, files of a night."""
from __future__ import annotations

import dataclasses
import gzip
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from scipy.optimize import least_squares

from survey_qa import simulate as sim
from survey_qa.flows import simulate as flow
from survey_qa.pipeline.schema import CLASSES
from survey_qa.simulate.camera import bleed
from survey_qa.simulate.psf import path_extent

NIGHT = "2024-03-05"


def clean_spec(cls: str = "good", seed: int = 0, size: int = 256, stars_per_frame: float = 30,
               fwhm_px: float | None = None, **kw) -> sim.ExposureSpec:
    """A frame without confounders, with about ``stars_per_frame`` stars."""
    spec = sim.draw_spec(np.random.default_rng(seed), cls, exposure=f"t{seed}", size_px=size,
                         confounders=(), **kw)
    if fwhm_px is not None:
        spec = dataclasses.replace(spec, pixscale_arcsec=spec.seeing_arcsec / fwhm_px)
    area = size * size * spec.pixscale_arcsec**2 / 3600.0
    return dataclasses.replace(spec, star_density_per_arcmin2=stars_per_frame / area)


def isolated_bright_stars(det: sim.SimDetector, spec: sim.ExposureSpec, radius_px: float,
                          n: int = 3) -> pd.DataFrame:
    """The brightest unsaturated stars with no neighbour above 2% of their flux nearby."""
    st = det.stars
    keep = []
    for i, s in st.sort_values("flux_adu", ascending=False).iterrows():
        if s.saturated or not (radius_px < s.x < spec.nx - radius_px
                               and radius_px < s.y < spec.ny - radius_px):
            continue
        d = np.hypot(st.x - s.x, st.y - s.y)
        if ((d > 0) & (d < 1.5 * radius_px) & (st.flux_adu > 0.02 * s.flux_adu)).any():
            continue
        keep.append(i)
        if len(keep) == n:
            break
    return st.loc[keep]


def stamp(det: sim.SimDetector, x: float, y: float, half: int) -> tuple[np.ndarray, np.ndarray,
                                                                          np.ndarray]:
    ix, iy = int(round(x)), int(round(y))
    yy, xx = np.mgrid[iy - half: iy + half + 1, ix - half: ix + half + 1]
    return det.image[iy - half: iy + half + 1, ix - half: ix + half + 1].astype(float), xx, yy


def moffat_fwhm(img: np.ndarray, xx: np.ndarray, yy: np.ndarray, x0: float, y0: float) -> float:
    """FWHM (px) of a round Moffat fitted to a star stamp (free beta and background)."""
    def resid(p):
        amp, xc, yc, fwhm, beta, bg = p
        alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
        return bg + amp * (1 + ((xx - xc) ** 2 + (yy - yc) ** 2) / alpha**2) ** (-beta) - img
    p0 = [img.max(), x0, y0, 3.0, 3.0, float(np.median(img))]
    fit = least_squares(lambda p: resid(p).ravel(), p0,
                        bounds=([0, x0 - 2, y0 - 2, 0.5, 1.2, -np.inf],
                                [np.inf, x0 + 2, y0 + 2, 50, 20, np.inf]))
    return float(fit.x[3])


def moments_pa_deg(img: np.ndarray, xx: np.ndarray, yy: np.ndarray, sky: float,
                   x0: float, y0: float, sigma_px: float) -> float:
    """Position angle of the major axis from second moments with a round Gaussian weight
    of ``sigma_px`` about the true position, degrees in [0, 180)."""
    w = (img - sky) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma_px**2))
    mx, my = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
    qxx = (w * (xx - mx) ** 2).sum()
    qyy = (w * (yy - my) ** 2).sum()
    qxy = (w * (xx - mx) * (yy - my)).sum()
    return math.degrees(0.5 * math.atan2(2 * qxy, qxx - qyy)) % 180.0


def angle_diff_deg(a: float, b: float) -> float:
    d = abs(a - b) % 180.0
    return min(d, 180.0 - d)


# ----------------------------------------------------------------------------- specs


@pytest.mark.parametrize("cls", CLASSES)
def test_draw_spec_uses_clean_ranges(cls):
    rng = np.random.default_rng(1)
    for _ in range(40):
        spec = sim.draw_spec(rng, cls, exposure="e", size_px=256)
        s, r = spec.seeing_arcsec, spec.trail_ratio
        assert spec.target_class == cls
        assert 0.15 <= spec.pixscale_arcsec and spec.nx == spec.ny == 256
        if cls == "good":
            assert s <= 1.2 and r <= 0.5 and spec.background_kind == "none"
        elif cls == "bad_seeing":
            assert s >= 1.6 and r <= 0.5 and spec.background_kind == "none"
        elif cls == "bad_tracking":
            assert 1.0 <= r < (2.0 if spec.trail_kind == "jump" else 3.0)
        elif cls == "very_bad_tracking":
            assert r >= (2.0 if spec.trail_kind == "jump" else 3.0)
        else:
            assert spec.background_kind != "none"
            limit = 0.25 if spec.background_kind == "cloud" else 0.10
            assert spec.background_strength >= limit
        if "undersampled" in spec.confounders:
            assert spec.fwhm_px < 2.0
        else:
            assert spec.fwhm_px >= 2.0


def test_draw_spec_ambiguous_zones_and_variety():
    rng = np.random.default_rng(2)
    seeing = [sim.draw_spec(rng, "bad_seeing", exposure="e", ambiguous=True).seeing_arcsec
              for _ in range(20)]
    assert all(1.2 < s < 1.6 for s in seeing)
    ratios = [sim.draw_spec(rng, "bad_tracking", exposure="e", ambiguous=True).trail_ratio
              for _ in range(20)]
    assert all(0.5 < r < 1.0 for r in ratios)
    specs = [sim.draw_spec(rng, "good", exposure="e") for _ in range(60)]
    assert len({c for s in specs for c in s.confounders}) >= 10
    assert len({s.header_style for s in specs}) >= 3
    assert np.ptp([s.pixscale_arcsec for s in specs]) > 0.2
    assert np.ptp(np.log10([s.sky_level_adu for s in specs])) > 1.5
    with pytest.raises(ValueError):
        sim.draw_spec(rng, "cloudy", exposure="e")


def test_truth_class_priority_and_ambiguity():
    tc = sim.truth_class
    assert tc(0.8, 0.2, 0.01, 0.0, "linear")["quality_class"] == "good"
    assert tc(2.0, 0.2, 0.01, 0.0, "linear")["quality_class"] == "bad_seeing"
    assert tc(2.0, 0.2, 0.2, 0.0, "linear")["quality_class"] == "background_issues"
    assert tc(2.0, 1.5, 0.2, 0.0, "linear")["quality_class"] == "bad_tracking"
    assert tc(2.0, 3.5, 0.2, 0.0, "linear")["quality_class"] == "very_bad_tracking"
    assert tc(0.8, 2.2, 0.01, 0.0, "jump")["quality_class"] == "very_bad_tracking"
    assert tc(0.8, 2.2, 0.01, 0.0, "linear")["quality_class"] == "bad_tracking"
    assert tc(0.8, 0.1, 0.01, 0.3, "none")["flag_background"]
    amb = tc(1.3, 0.2, 0.01, 0.0, "none")
    assert amb["ambiguous"] and amb["ambiguous_seeing"] and amb["quality_class"] == "good"
    hidden = tc(1.3, 4.0, 0.01, 0.0, "linear")  # seeing gap cannot change very bad tracking
    assert hidden["ambiguous_seeing"] and not hidden["ambiguous"]
    assert sim.exposure_class(["good", "good", "good", "bad_seeing"]) == "bad_seeing"
    assert sim.exposure_class(["good"] * 7 + ["bad_tracking"]) == "good"
    assert sim.exposure_class(["good"] * 6 + ["bad_tracking"] * 2) == "bad_tracking"


# ----------------------------------------------------------------------------- pixels vs truth


def test_render_is_deterministic():
    spec = sim.draw_spec(np.random.default_rng(5), "very_bad_tracking", exposure="e",
                         size_px=192)
    a = sim.render_detector(spec, 0, np.random.default_rng(9))
    b = sim.render_detector(spec, 0, np.random.default_rng(9))
    c = sim.render_detector(spec, 0, np.random.default_rng(10))
    assert a.image.dtype == np.float32 and a.image.shape == (192, 192)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.truth == b.truth
    pd.testing.assert_frame_equal(a.stars, b.stars)
    assert not np.array_equal(a.image, c.image)
    assert a.image.max() <= spec.saturate_adu


@pytest.mark.parametrize("profile", ["moffat", "kolmogorov"])
def test_isolated_star_has_the_true_fwhm(profile):
    spec = clean_spec(seed=3, trail_kind="none", trail_ratio=0.0, fwhm_px=4.5)
    spec = dataclasses.replace(spec, psf_profile=profile,
                               moffat_beta=3.0 if profile == "moffat" else math.nan)
    det = sim.render_detector(spec, 0, np.random.default_rng(1))
    assert det.truth["fwhm_px_true"] == pytest.approx(4.5)
    stars = isolated_bright_stars(det, spec, radius_px=15, n=3)
    assert len(stars) == 3
    fwhm = [moffat_fwhm(*stamp(det, s.x, s.y, 12), s.x, s.y) for _, s in stars.iterrows()]
    # the pixel widens a 4.5 px PSF by 1-2%; allow a few % for noise and the model
    assert np.median(fwhm) == pytest.approx(4.5, rel=0.05)


def test_trail_elongates_along_trail_pa():
    spec = clean_spec("bad_tracking", seed=4, trail_kind="linear", trail_ratio=2.5, fwhm_px=3.0,
                      stars_per_frame=800, size=512)
    det = sim.render_detector(spec, 0, np.random.default_rng(2))
    trail_px = spec.trail_arcsec / spec.pixscale_arcsec
    half = int(trail_px / 2 + 3 * spec.fwhm_px)
    stars = isolated_bright_stars(det, spec, radius_px=half, n=12)
    assert len(stars) == 12
    sky = float(np.median(det.image))
    stack = sum(stamp(det, s.x, s.y, half)[0] - sky for _, s in stars.iterrows())
    yy, xx = np.mgrid[-half: half + 1, -half: half + 1]
    pa = moments_pa_deg(stack, xx, yy, 0.0, 0.0, 0.0, half / 2)
    assert angle_diff_deg(pa, spec.trail_pa_deg) < 2.0
    assert det.truth["ellipticity_true"] > 0.4  # r = 2.5: clearly elongated
    assert det.truth["trail_ratio"] == pytest.approx(2.5)


def test_drift_path_extent_and_kinds():
    spec = clean_spec("very_bad_tracking", seed=6, trail_kind="linear")
    for kind in ("linear", "periodic", "wind", "jump"):
        s = dataclasses.replace(spec, trail_kind=kind)
        xy = sim.drift_path(s)
        extent, angle = path_extent(xy)
        assert extent == pytest.approx(s.trail_arcsec, rel=1e-3)
        assert angle_diff_deg(math.degrees(angle), s.trail_pa_deg) < 0.5
        np.testing.assert_allclose(xy.mean(axis=0), 0.0, atol=1e-9)
    jump = dataclasses.replace(spec, trail_kind="jump")
    assert len(np.unique(np.round(sim.drift_path(jump), 9), axis=0)) == 2
    assert sim.psf_ellipticity(jump) > 0.3
    assert sim.psf_ellipticity(dataclasses.replace(spec, trail_kind="none")) < 0.01


def test_background_truth_good_vs_gradient():
    good = sim.render_detector(clean_spec(seed=7), 0, np.random.default_rng(3))
    assert good.truth["u_true"] <= 0.03 and good.truth["k_true"] <= 0.05
    assert not good.defect_mask.any()
    assert good.truth["quality_class"] == "good"

    spec = clean_spec("background_issues", seed=8, background_kind="gradient")
    bad = sim.render_detector(spec, 0, np.random.default_rng(3))
    assert bad.truth["u_true"] >= 0.10
    assert bad.truth["quality_class"] in ("background_issues", "bad_tracking",
                                          "very_bad_tracking")
    assert bad.truth["flag_background"] and 0.0 < bad.defect_mask.mean() < 1.0
    # the sky in the pixels varies as the truth says: (P99 - P1) / median of block medians
    blocks = bad.image.reshape(8, 32, 8, 32).transpose(0, 2, 1, 3).reshape(64, -1)
    med = np.median(blocks, axis=1)
    measured = (np.percentile(med, 99) - np.percentile(med, 1)) / np.median(med)
    assert measured == pytest.approx(bad.truth["u_true"], rel=0.3)


def test_cloud_dims_stars_patchily():
    spec = clean_spec("background_issues", seed=9, background_kind="cloud",
                      stars_per_frame=200)
    det = sim.render_detector(spec, 0, np.random.default_rng(4))
    assert det.truth["k_true"] >= 0.25
    ext = det.stars.extinction_mag
    assert ext.max() - ext.min() > 0.15
    assert det.defect_mask.any()


def test_bleed_conserves_charge():
    img = np.full((50, 3), 100.0, dtype=np.float32)
    img[24:27, 1] = [5e4, 2e5, 5e4]
    total = img.sum()
    bleed(img, 4e4)
    assert img.max() <= 4e4 + 1e-3
    assert img.sum() == pytest.approx(total, rel=1e-6)
    assert (img[:, 1] >= 4e4 - 1e-3).sum() > 3  # the trail runs along the column


def test_confounders_render():
    names = ("satellite", "cosmic_rays", "hot_pixels", "bad_columns", "saturated_stars",
             "galaxies", "nebula", "optics")
    spec = sim.draw_spec(np.random.default_rng(11), "good", exposure="e", size_px=256,
                         confounders=names)
    det = sim.render_detector(spec, 0, np.random.default_rng(5))
    t = det.truth
    assert set(t["confounders"].split(",")) == set(names)
    assert t["n_saturated_stars"] >= 1 and (det.image >= spec.saturate_adu).any()
    assert t["n_galaxies"] > 0 and t["n_hot_pixels"] > 0
    assert t["quality_class"] == "good" and not det.defect_mask.any()


# ----------------------------------------------------------------------------- nights on disk


def all_format_plans(size: int = 128) -> list[sim.FramePlan]:
    plans = sim.plan_night(NIGHT, 5, seed=3, size_px=size)
    fmts = ["fits", "fits.fz", "fits.gz", "mosaic", "mosaic.fz"]
    out = []
    for p, fmt, cls in zip(plans, fmts, CLASSES):
        mosaic = fmt.startswith("mosaic")
        out.append(dataclasses.replace(p, file_format=fmt, quality_class=cls,
                                       size_px=size // 2 if mosaic else size,
                                       n_detectors=4 if mosaic else None))
    return out


def test_night_folder_layout_and_formats(tmp_path):
    truth = flow.write_night(tmp_path, NIGHT, all_format_plans(), seed=3)
    folder = tmp_path / NIGHT
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(["_truth", "20240305_0001.fits", "20240305_0002.fits.fz",
                            "20240305_0003.fits.gz", "20240305_0004.fits",
                            "20240305_0005.fits.fz"])
    assert (folder / "_truth" / "truth.parquet").is_file()
    assert len(truth) == 1 + 1 + 1 + 4 + 4

    with fits.open(folder / "20240305_0002.fits.fz") as h:
        assert isinstance(h[1], fits.CompImageHDU) and h[1].data.shape == (128, 128)
    with gzip.open(folder / "20240305_0003.fits.gz") as f, fits.open(f) as h:
        assert h[0].data.shape == (128, 128)
    for name, hdu_type in (("20240305_0004.fits", fits.ImageHDU),
                           ("20240305_0005.fits.fz", fits.CompImageHDU)):
        with fits.open(folder / name) as h:
            assert h[0].data is None and "DATE-OBS" in h[0].header
            assert [x.header["EXTNAME"] for x in h[1:]] == ["ccd01", "ccd02", "ccd03", "ccd04"]
            assert all(isinstance(x, hdu_type) and x.data.shape == (64, 64) for x in h[1:])

    for _, row in truth.iterrows():
        with fits.open(folder / row.path) as h:
            hdr = fits.Header(h[0].header)
            hdr.update(h[row.hdu].header)
            data = h[row.hdu].data
        assert data.dtype.kind == "f"
        assert hdr["DATE-OBS"][:10] in ("2024-03-05", "2024-03-06")
        if row.header_style in ("wcs", "sparse"):
            with warnings.catch_warnings():  # 'sparse' headers may lack MJD-OBS: astropy fixes it
                warnings.simplefilter("ignore", FITSFixedWarning)
                wcs = WCS(hdr)
            scale = np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600
            assert scale == pytest.approx(row.pixscale_arcsec, rel=1e-6)
        else:
            key = "PIXSCALE" if row.header_style == "pixscale" else "SECPIX"
            assert hdr[key] == pytest.approx(row.pixscale_arcsec, rel=1e-3)
        for key in row.missing_keys.split(","):
            assert not key or key not in hdr
        with fits.open(folder / "_truth" / "masks" / f"{row.exposure}.fits") as m:
            mask = m[row.detector].data
            assert mask.dtype == np.uint8 and mask.shape == data.shape

    # classes follow the spec's priority, and mosaics the quarter rule
    for _, row in truth.iterrows():
        expect = sim.truth_class(row.seeing_arcsec, row.trail_ratio, row.u_true, row.k_true,
                                 row.trail_kind)
        assert row.quality_class == expect["quality_class"]
    for exp, rows in truth.groupby("exposure"):
        assert set(rows.exposure_class) == {sim.exposure_class(list(rows.quality_class))}
    clean = truth[~truth.ambiguous & (truth.n_detectors == 1)]
    assert (clean.quality_class == clean.target_class).all()

    stars = pd.read_parquet(folder / "_truth" / "stars.parquet")
    assert {"night", "exposure", "detector", "x", "y", "flux_adu", "saturated"} <= set(stars)
    assert set(stars.exposure) <= set(truth.exposure)


def test_simulate_night_is_deterministic(tmp_path):
    a = flow.simulate_night(tmp_path / "a", NIGHT, 3, seed=7, size_px=96)
    b = flow.simulate_night(tmp_path / "b", NIGHT, 3, seed=7, size_px=96)
    pd.testing.assert_frame_equal(a, b)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*")
                     if p.is_file())
    assert files_a == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*")
                             if p.is_file())
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    c = flow.simulate_night(tmp_path / "c", NIGHT, 3, seed=8, size_px=96)
    assert not c[["seeing_arcsec"]].equals(a[["seeing_arcsec"]])


def test_simulate_night_with_a_dask_client(tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2,
                            dashboard_address=":0") as client:
        par = flow.simulate_night(tmp_path / "par", NIGHT, 3, seed=4, size_px=96, client=client)
    seq = flow.simulate_night(tmp_path / "seq", NIGHT, 3, seed=4, size_px=96)
    pd.testing.assert_frame_equal(par, seq)
    for p in (tmp_path / "seq" / NIGHT).glob("*.fits*"):
        assert p.read_bytes() == (tmp_path / "par" / NIGHT / p.name).read_bytes()


def test_simulate_command_with_workers_and_mix(tmp_path, capsys):
    from survey_qa.cli import main

    assert main(["simulate", "--night", NIGHT, "--frames", "3", "--seed", "4", "--size", "96",
                 "--mix", "realistic", "--workers", "2", "--raw-root",
                 str(tmp_path / "cli")]) == 0
    assert "wrote 3 exposures" in capsys.readouterr().out
    seq = flow.simulate_night(tmp_path / "seq", NIGHT, 3, seed=4, size_px=96, mix="realistic")
    cli = pd.read_parquet(tmp_path / "cli" / NIGHT / "_truth" / "truth.parquet")
    assert cli["exposure_class"].tolist() == seq["exposure_class"].tolist()
    for p in (tmp_path / "seq" / NIGHT).glob("*.fits*"):
        assert p.read_bytes() == (tmp_path / "cli" / NIGHT / p.name).read_bytes()


def test_plan_night_is_balanced():
    plans = sim.plan_night(NIGHT, 50, seed=1, ambiguous_fraction=0.1)
    counts = pd.Series([p.quality_class for p in plans]).value_counts()
    assert set(counts.index) == set(CLASSES) and (counts == 10).all()
    assert 1 <= sum(p.ambiguous for p in plans) <= 12
    assert len({p.file_format for p in plans}) >= 3
    times = [p.date_obs for p in plans]
    assert times == sorted(times) and times[0].startswith("2024-03-05T2")
    assert times[-1] < "2024-03-06T06"
    with pytest.raises(ValueError):
        sim.plan_night(NIGHT, 5, mix="weird")


# ----------------------------------------------------------------------------- wide domain


def test_truth_uses_the_pipelines_mosaic_and_priority_rules():
    from survey_qa.pipeline.classify import mosaic_class, primary_class

    spread = list(CLASSES)  # five detectors, five classes: no class reaches a quarter
    assert sim.exposure_class(spread) == mosaic_class(spread) == "good"
    assert sim.exposure_class(["good"] * 6 + ["bad_tracking"] * 2) == "bad_tracking"
    t = sim.truth_class(2.0, 1.5, 0.2, 0.0, "linear")
    assert t["quality_class"] == primary_class(t["flag_tracking"], t["flag_background"],
                                               t["flag_bad_seeing"]) == "bad_tracking"


def test_simulator_modules_share_only_public_names_and_the_pipelines_rules():
    import ast
    from pathlib import Path

    from survey_qa.pipeline import classify
    from survey_qa.simulate import truth

    assert truth.mosaic_class is classify.mosaic_class  # imported, not a copy
    assert truth.primary_class is classify.primary_class
    for path in Path(sim.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("survey_qa"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"
            if isinstance(node, ast.FunctionDef):  # no second copy of a class rule
                assert node.name not in ("mosaic_class", "primary_class"), path.name


def test_wide_confounders_leave_the_main_draws_alone():
    base = sim.draw_spec(np.random.default_rng(5), "good", exposure="e", size_px=256,
                         confounders=("cosmic_rays",))
    more = sim.draw_spec(np.random.default_rng(5), "good", exposure="e", size_px=256,
                         confounders=("cosmic_rays", "vignetting", "raw", "dust"))
    for key in ("seeing_arcsec", "pixscale_arcsec", "sky_level_adu", "field_seed", "nx"):
        assert getattr(base, key) == getattr(more, key)
    assert not base.raw and base.vignetting_corner == 0 and base.domain == "default"
    assert more.raw and more.bias_adu > 0 and more.vignetting_corner > 0
    assert more.dust_per_detector > 0 and more.overscan_px > 0
    assert more.hot_pixel_fraction > 0 and "hot_pixels" in more.confounders  # raw: no dark
    with pytest.raises(ValueError):
        sim.draw_spec(np.random.default_rng(5), "good", exposure="e", domain="huge")


def test_wide_domain_spans_real_instruments():
    rng = np.random.default_rng(12)
    specs = [sim.draw_spec(rng, CLASSES[i % 5], exposure="e", size_px=4096, domain="wide")
             for i in range(300)]
    scale = np.array([s.pixscale_arcsec for s in specs])
    fwhm = np.array([s.fwhm_px for s in specs])
    sides = np.array([(s.nx, s.ny) for s in specs])
    assert scale.min() >= 0.1 and scale.max() <= 15.0
    assert scale.min() < 0.15 and scale.max() > 8.0
    assert fwhm.min() >= 1.2 - 1e-9 and fwhm.max() <= 20.0 + 1e-9
    assert fwhm.min() < 1.5 and fwhm.max() > 15.0
    assert sides.max() <= 4096 and sides.max(axis=1).min() >= 500
    assert (sides[:, 0] != sides[:, 1]).any() and (sides % 2 == 0).all()
    conf = [set(s.confounders) for s in specs]
    for name in sim.WIDE_CONFOUNDERS:
        assert sum(name in c for c in conf) >= 10, name
    for s in specs:  # the class-defining quantities keep the spec's clean ranges
        if s.target_class == "good":
            assert s.seeing_arcsec <= 1.2 and s.trail_ratio <= 0.5
        if s.target_class == "bad_seeing":
            assert s.seeing_arcsec >= 1.6
    assert max(s.seeing_arcsec for s in specs) > 15.0  # coarse cameras: tens of arcsec


def test_vignetting_is_multiplicative_and_leaves_truth_u_unchanged():
    spec = clean_spec(seed=21, trail_kind="none", trail_ratio=0.0, fwhm_px=3.0,
                      stars_per_frame=150)
    vig = dataclasses.replace(spec, vignetting_corner=0.3, vignetting_dx=0.05,
                              confounders=("vignetting",))
    flat, n_dust = sim.illumination(vig, 0)
    assert n_dust == 0 and flat.max() <= 1.0 and flat.min() < 0.8
    assert sim.illumination(spec, 0)[0] is None
    a = sim.render_detector(spec, 0, np.random.default_rng(2))
    b = sim.render_detector(vig, 0, np.random.default_rng(2))
    # the truth of the sky is the light the sky adds: the same, and so is the class
    assert b.truth["u_true"] == a.truth["u_true"] <= 0.03
    assert b.truth["quality_class"] == a.truth["quality_class"] == "good"
    assert b.truth["flat_nonuniformity"] > 0.2 and not b.defect_mask.any()
    # sky: block medians scale with the flat
    blocks = (slice(0, 32), slice(0, 32)), (slice(112, 144), slice(112, 144))
    for ys, xs in blocks:
        ratio = np.median(b.image[ys, xs]) / np.median(a.image[ys, xs])
        assert ratio == pytest.approx(float(flat[ys, xs].mean()), rel=0.03)
    # stars: bright pixels scale with the flat too (multiplicative, not added light)
    bright = a.image > 50 * a.truth["sky_level_adu"] ** 0.5 + np.median(a.image)
    bright &= a.image < 0.5 * spec.saturate_adu
    assert bright.sum() > 20
    np.testing.assert_allclose((b.image / a.image)[bright], flat[bright], rtol=0.05)
    iy = b.stars.y.round().astype(int).clip(0, spec.ny - 1)
    ix = b.stars.x.round().astype(int).clip(0, spec.nx - 1)
    np.testing.assert_allclose(b.stars.illumination, flat[iy, ix], rtol=1e-6)


def test_dust_donuts_are_shallow_multiplicative_rings():
    spec = dataclasses.replace(clean_spec(seed=22, size=512), dust_per_detector=5.0,
                               confounders=("dust",))
    flat, n_dust = sim.illumination(spec, 0)
    assert n_dust >= 1
    assert flat.max() <= 1.0 and 0.85 < flat.min() < 0.99
    det = sim.render_detector(spec, 0, np.random.default_rng(1))
    assert det.truth["n_dust_donuts"] == n_dust and det.truth["quality_class"] == "good"
    assert (flat < 0.999).mean() < 0.2  # local rings, not a sky pattern
    assert det.truth["u_true"] <= 0.03 and det.truth["flat_nonuniformity"] < 0.1


def test_raw_frame_parses_with_the_pipeline_reader_and_is_trimmed(tmp_path):
    from survey_qa.config import IOConfig
    from survey_qa.pipeline import io as pio
    from survey_qa.pipeline.flags import decode_flags

    spec = sim.draw_spec(np.random.default_rng(4), "good", exposure="r", size_px=200,
                         confounders=("raw", "hot_pixels"))
    spec = dataclasses.replace(spec, ny=160, prescan_px=8, overscan_px=32, overscan_rows=6)
    det = sim.render_detector(spec, 0, np.random.default_rng(3))
    assert det.raw.dtype == np.uint16 and det.raw.shape == (166, 240)
    assert det.image.shape == (160, 200)
    path = tmp_path / "raw.fits"
    sim.build_hdulist(spec, [det]).writeto(path)
    with fits.open(path, do_not_scale_image_data=True) as h:
        hdr = h[0].header
        assert hdr["BITPIX"] == 16 and hdr["BZERO"] == 32768
        assert hdr["DATASEC"] == hdr["TRIMSEC"] == "[9:208,1:160]"
        assert hdr["BIASSEC"] == "[209:240,1:160]"
        assert hdr["SATURATE"] == math.floor(spec.saturate_adu + spec.bias_adu)
    overscan = det.raw[:160, 208:].astype(float)
    assert np.median(overscan) == pytest.approx(spec.bias_adu, abs=1.0)
    [read] = pio.read_detectors(path, IOConfig())
    assert read.data.shape == (160, 200)
    assert "OVERSCAN_TRIMMED" in decode_flags(read.qa_flags)
    np.testing.assert_allclose(read.data, det.image, atol=1.01)  # overscan median vs bias
    assert abs(np.median(read.data) - spec.sky_level_adu) < 0.1 * spec.sky_level_adu + 5


def test_bayer_frame_is_binned_by_the_reader(tmp_path):
    from survey_qa.config import IOConfig
    from survey_qa.pipeline import io as pio
    from survey_qa.pipeline.flags import decode_flags

    spec = clean_spec(seed=23, fwhm_px=5.0, header_style="pixscale")
    spec = dataclasses.replace(spec, confounders=("bayer",), bayer_pattern="RGGB",
                               bayer_red=0.5, bayer_blue=0.4)
    det = sim.render_detector(spec, 0, np.random.default_rng(1))
    img = det.image  # RGGB: red pixels at (0, 0) of each cell, blue at (1, 1)
    red, green, blue = (np.median(img[0::2, 0::2]), np.median(img[0::2, 1::2]),
                        np.median(img[1::2, 1::2]))
    assert red / green == pytest.approx(0.5, rel=0.05)
    assert blue / green == pytest.approx(0.4, rel=0.05)
    assert det.header["BAYERPAT"][0] == "RGGB" and det.truth["u_true"] <= 0.03
    assert det.truth["read_binning"] == 2
    path = tmp_path / "bayer.fits"
    sim.build_hdulist(spec, [det]).writeto(path)
    [read] = pio.read_detectors(path, IOConfig())
    assert "BAYER_BINNED" in decode_flags(read.qa_flags)
    assert read.data.shape == (128, 128)
    assert read.meta.pixscale_arcsec == pytest.approx(2 * spec.pixscale_arcsec, rel=1e-3)


def test_donut_truth_fwhm_is_the_effective_fwhm():
    spec = clean_spec("bad_seeing", seed=24, trail_kind="none", trail_ratio=0.0,
                      fwhm_px=12.0, stars_per_frame=150, size=512)
    spec = dataclasses.replace(spec, confounders=("defocus",), defocus_ratio=0.9,
                               obscuration=0.45, psf_profile="moffat", moffat_beta=3.5)
    assert spec.atm_fwhm_arcsec < 0.6 * spec.seeing_arcsec
    det = sim.render_detector(spec, 0, np.random.default_rng(3))
    t = det.truth
    assert t["fwhm_px_true"] == pytest.approx(12.0)
    assert t["quality_class"] == "bad_seeing" and t["seeing_arcsec"] >= 1.6
    assert t["ellipticity_true"] < 0.02
    stars = isolated_bright_stars(det, spec, radius_px=20, n=3)
    assert len(stars) >= 2
    sky = float(np.median(det.image))
    widths, holes = [], []
    for _, s in stars.iterrows():
        img, xx, yy = stamp(det, s.x, s.y, 20)
        r = np.hypot(xx - s.x, yy - s.y).ravel()
        v = (img - sky).ravel()
        idx = np.floor(r).astype(int)  # 1-px rings; every one holds pixels
        prof = np.array([v[idx == k].mean() for k in range(20)])
        rc = np.array([r[idx == k].mean() for k in range(20)])
        half = 0.5 * prof.max()
        k = np.flatnonzero(prof >= half)[-1]
        f = (prof[k] - half) / (prof[k] - prof[k + 1])
        widths.append(2 * (rc[k] + f * (rc[k + 1] - rc[k])))
        holes.append(prof[0] / prof.max())
    # pixels and the radial binning widen the measured width a little
    assert np.median(widths) == pytest.approx(12.0, rel=0.07)
    assert np.median(holes) < 0.9  # a donut: the centre is dimmer than the ring


def test_defocus_truth_follows_the_seeing_limit():
    for cls, expect in (("good", "good"), ("bad_seeing", "bad_seeing")):
        spec = sim.draw_spec(np.random.default_rng(25), cls, exposure="d", size_px=128,
                             confounders=("defocus",), extra_defects=False,
                             pixscale_arcsec=0.1)
        assert spec.defocus_ratio > 0 and spec.fwhm_px >= 4
        t = sim.truth_class(spec.seeing_arcsec, spec.trail_ratio, 0.0, 0.0, spec.trail_kind)
        assert t["quality_class"] == expect


def test_sparse_field_has_few_stars():
    spec = sim.draw_spec(np.random.default_rng(26), "good", exposure="s", size_px=600,
                         confounders=("sparse",))
    det = sim.render_detector(spec, 0, np.random.default_rng(2))
    assert 5 <= det.truth["n_stars"] <= 45 and det.truth["quality_class"] == "good"
    # few stars, but every one of them measurable: S/N over an FWHM-wide aperture >= 10
    noise_e = math.sqrt(spec.sky_e + spec.read_noise_e**2)
    snr = det.stars.flux_adu * spec.gain_e_per_adu / (math.sqrt(math.pi) * spec.fwhm_px * noise_e)
    assert snr.min() >= 10


def test_wide_night_is_deterministic_and_the_command_takes_domain(tmp_path, capsys):
    from survey_qa.cli import main

    assert main(["simulate", "--night", NIGHT, "--frames", "4", "--seed", "5", "--size", "160",
                 "--domain", "wide", "--raw-root", str(tmp_path / "cli")]) == 0
    assert "wrote 4 exposures" in capsys.readouterr().out
    seq = flow.simulate_night(tmp_path / "seq", NIGHT, 4, seed=5, size_px=160, domain="wide")
    assert (seq.domain == "wide").all()
    cli = pd.read_parquet(tmp_path / "cli" / NIGHT / "_truth" / "truth.parquet")
    pd.testing.assert_frame_equal(cli.drop(columns="night"), seq.drop(columns="night"))
    for p in (tmp_path / "seq" / NIGHT).glob("*.fits*"):
        assert p.read_bytes() == (tmp_path / "cli" / NIGHT / p.name).read_bytes()


def test_frames_of_one_wide_camera_share_shape_filters_and_illumination():
    plans = sim.plan_night(NIGHT, 40, seed=9, size_px=800, domain="wide")
    cams = {}
    for p in plans:
        if p.file_format.startswith("mosaic"):
            continue
        rng, _ = sim.exposure_seeds(NIGHT, 9, p.index, 8)
        spec = sim.draw_spec(rng, p.quality_class, exposure=p.exposure, size_px=p.size_px,
                             file_format=p.file_format, **p.overrides)
        assert spec.camera_seed == p.overrides["camera_seed"] >= 0
        cams.setdefault(spec.camera_seed, []).append(spec)
    assert 1 <= len(cams) <= 3
    for seed, specs in cams.items():
        camera = sim.camera_of(seed, 800)
        assert {(s.nx, s.ny) for s in specs} == {camera["shape"]}
        assert {s.filter for s in specs} <= set(camera["filters"])
        assert len({s.vignetting_corner for s in specs}) == 1
        assert len({s.raw for s in specs}) == 1
        flats = [sim.illumination(s, 0)[0] for s in specs[:2]]
        if flats[0] is not None and not specs[0].bayer_pattern and not specs[1].bayer_pattern:
            np.testing.assert_array_equal(flats[0], flats[1])  # the night's own flat
        assert len({s.pixscale_arcsec for s in specs}) == len(specs)  # per frame
