"""Night-level calibration of the autoencoder masks, and the decision taken again."""
import math
from types import SimpleNamespace

import numpy as np

from survey_qa.config import load_config
from survey_qa.flows.night_pass import finish_night
from survey_qa.pipeline import night, outputs
from survey_qa.pipeline.flags import decode_flags
from survey_qa.pipeline.schema import empty_exposure_row

REF = 1.0  # reference threshold


def maps(rng, n, level, shape=(8, 8)):
    return [rng.normal(level, 0.05 * level, shape).astype(np.float32) for _ in range(n)]


def test_night_threshold_follows_the_best_frames():
    rng = np.random.default_rng(1)
    foreign = maps(rng, 12, 3.0)  # an instrument unlike the references, everywhere
    t = night.night_threshold(foreign, REF, 0.995)
    assert t > 3.0  # the night's ordinary sky is not damage
    damaged = foreign[0].copy()
    damaged[:3] = 9.0  # a real defect on one frame stays above it
    assert (damaged[:3] > t).all() and (damaged[3:] < t).mean() > 0.95


def test_night_threshold_never_below_the_reference_and_needs_frames():
    rng = np.random.default_rng(2)
    assert night.night_threshold(maps(rng, 10, 0.5), REF, 0.995) == REF
    assert night.night_threshold(maps(rng, night.MIN_FRAMES - 1, 3.0), REF, 0.995) is None
    assert night.looks_foreign(maps(rng, 1, 3.0)[0], REF)
    assert not night.looks_foreign(maps(rng, 1, 0.5)[0], REF)


def _night(tmp_path, score_maps):
    store = tmp_path / "a.zarr"
    frames = [(f"e{i}", "0") for i in range(len(score_maps))]
    index = outputs.setup_zarr(store, frames, {
        "ae_score_map": ((8, 8), ("patch_y", "patch_x"), "float32", np.nan),
        "ae_mask": ((8, 8), ("patch_y", "patch_x"), "uint8", 0)})
    rows = []
    for (exp, det), smap in zip(frames, score_maps):
        outputs.write_frame(store, index[(exp, det)], {"ae_score_map": smap,
                                                       "ae_mask": (smap > REF).astype(np.uint8)})
        r = empty_exposure_row()
        r.update(exposure=exp, detector=det, status="ok", nx=256, ny=256, fwhm_px=3.0,
                 n_stars_used=30, pixscale_arcsec=0.5, fwhm_arcsec=1.0, ellipticity=0.05,
                 elongation_coherence=0.2, trail_ratio=0.1, sky_nonuniformity=0.01,
                 ae_score=float(smap.mean()), mask_fraction=float((smap > REF).mean()))
        rows.append(r)
    scorer = SimpleNamespace(block_px=32, threshold_at=lambda q: REF)
    models = SimpleNamespace(scorer=scorer, classifier=None)
    return rows, models, store


def test_finish_night_unmasks_a_foreign_night(tmp_path):
    rng = np.random.default_rng(3)
    score_maps = maps(rng, 8, 3.0)
    score_maps[0][:2] = 10.0  # one frame has a damaged band
    rows, models, store = _night(tmp_path, score_maps)
    assert all(r["mask_fraction"] == 1.0 for r in rows[1:])
    out = finish_night(rows, load_config(), models, store)
    assert out[0]["mask_fraction"] == 0.25
    assert all(r["mask_fraction"] == 0.0 for r in out[1:])
    assert all("AE_NIGHT_THRESHOLD" in decode_flags(r["qa_flags"]) for r in out)
    assert out[0]["reason"]  # decided again
    assert rows[1]["mask_fraction"] == 1.0  # the measured rows are left as they were
    import zarr
    assert zarr.open_group(str(store))["ae_mask"][1].sum() == 0


def test_finish_night_reports_a_lone_foreign_frame_out_of_domain(tmp_path):
    rows, models, store = _night(tmp_path, maps(np.random.default_rng(4), 1, 3.0))
    out = finish_night(rows, load_config(), models, store)
    assert math.isnan(out[0]["ae_score"]) and math.isnan(out[0]["mask_fraction"])
    assert "AE_OUT_OF_DOMAIN" in decode_flags(out[0]["qa_flags"])


def test_a_score_grid_covers_partial_edge_patches():
    from survey_qa.pipeline import aescore

    assert aescore.patch_grid((256, 300), 32) == (8, 10)
    variables = aescore.score_variables(32, (256, 300))
    assert variables["ae_mask"][0] == variables["ae_score_map"][0] == (8, 10)
