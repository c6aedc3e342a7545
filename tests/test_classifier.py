"""SOM, dual-input classifier, training flows: fast tests on small synthetic nights.

The synthetic nights are written in the nightly job's layout (exposure catalog, Zarr
stamps) with a simulator-style truth table, so the data module and the flows read the
same files they read in production. Each class has its own measured quantities and its
own star shapes (round and sharp, fat, elongated one way, trailed, sharp on a patchy sky).
"""
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from survey_qa import paths
from survey_qa.config import ClassifyConfig, load_config
from survey_qa.models.classifier_data import (ExposureDataModule, ExposureDataset,
                                              load_examples, read_night_stamps)
from survey_qa.models.classifier_features import FEATURE_NAMES, feature_vector
from survey_qa.models.classifier_inference import (LearnedClassifier, load_classifier,
                                                   shared_classifier)
from survey_qa.models.classifier_system import (ClassifierSystem, class_weights,
                                                collect_logits, fit_temperature)
from survey_qa.models.components.classifier import DualInputClassifier
from survey_qa.models.som import dihedral, prepare_stamps, train_som
from survey_qa.models.splits import split_by_night_and_exposure
from survey_qa.models.weights import load_som, save_classifier, save_som
from survey_qa.pipeline import outputs
from survey_qa.pipeline.classify import classify_rules
from survey_qa.pipeline.flags import decode_flags
from survey_qa.pipeline.schema import CLASSES, empty_exposure_row, rows_to_table

STAMP = 16
PER_DET = 12
PIXSCALE = 0.3
NO_SRUN_HINT = pytest.mark.filterwarnings(
    "ignore:The `srun` command is available")  # a hint when SLURM is installed here
pytestmark = pytest.mark.filterwarnings(  # lightning 2.6 calls a torch 2.13-deprecated API
    r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning")


# ---------------------------------------------------------------------------- synthetic data


def star_stamps(rng, n, fwhm_arcsec, trail_ratio, angle_rad):
    """Unit-sum Gaussian stars smeared along a line (``trail_ratio`` x FWHM), with noise."""
    yy, xx = np.mgrid[0:STAMP, 0:STAMP] - (STAMP // 2)
    sigma = fwhm_arcsec / PIXSCALE / 2.3548
    length = trail_ratio * fwhm_arcsec / PIXSCALE
    out = np.zeros((n, STAMP, STAMP), np.float32)
    for k in range(n):
        img = np.zeros((STAMP, STAMP))
        for t in np.linspace(-0.5, 0.5, 9):
            dx, dy = t * length * np.cos(angle_rad), t * length * np.sin(angle_rad)
            img += np.exp(-0.5 * ((xx - dx) ** 2 + (yy - dy) ** 2) / sigma ** 2)
        img /= img.sum()
        out[k] = img + rng.normal(0, 0.002, img.shape)
    return out


def synthetic_detector(rng, cls):
    """(exposure row quantities, stamps) of a detector of class ``cls``."""
    fwhm = rng.uniform(0.6, 1.1)
    trail = rng.uniform(0.0, 0.3)
    u = rng.uniform(0.005, 0.02)
    coherence = rng.uniform(0.1, 0.5)
    if cls == "bad_seeing":
        fwhm = rng.uniform(1.7, 2.6)
    elif cls == "bad_tracking":
        trail, coherence = rng.uniform(1.2, 2.5), rng.uniform(0.8, 1.0)
    elif cls == "very_bad_tracking":
        trail, coherence = rng.uniform(3.5, 5.0), rng.uniform(0.85, 1.0)
    elif cls == "background_issues":
        u = rng.uniform(0.15, 0.5)
    ell = 1 - 1 / (1 + 0.8 * trail) + rng.uniform(0.0, 0.05)
    n = int(rng.integers(6, PER_DET + 1))
    stamps = star_stamps(rng, n, fwhm, trail, rng.uniform(0, np.pi))
    row = empty_exposure_row()
    row.update(fwhm_arcsec=fwhm, fwhm_px=fwhm / PIXSCALE, pixscale_arcsec=PIXSCALE,
               ellipticity=ell, elongation_coherence=coherence, trail_ratio=trail,
               sky_nonuniformity=u, moffat_beta=rng.uniform(2.5, 4.0),
               fwhm_grid_px=list(fwhm / PIXSCALE * rng.uniform(0.95, 1.05, 9)),
               ellipticity_grid=list(ell + rng.uniform(-0.02, 0.02, 9)),
               n_sources=200, n_stars_used=n, status="ok")
    return row, stamps


def write_night(out_root, raw_root, night, n_exposures, seed, mosaic_every=0):
    """A labelled night in the nightly layout; every ``mosaic_every``-th exposure has 2
    detectors. Returns the truth table."""
    rng = np.random.default_rng(seed)
    stem = night.replace("-", "")
    frames, rows, truth, stamps = [], [], [], {}
    for i in range(n_exposures):
        cls = CLASSES[i % len(CLASSES)]
        exp = f"{stem}_{i:04d}"
        dets = ["CCD0", "CCD1"] if mosaic_every and i % mosaic_every == 0 else ["0"]
        for det in dets:
            row, st = synthetic_detector(rng, cls)
            row.update(exposure=exp, detector=det, path=f"{exp}.fits")
            rows.append(row)
            frames.append((exp, det))
            stamps[(exp, det)] = st
            truth.append({"exposure": exp, "detector": det, "quality_class": cls,
                          "ambiguous": bool(i == 1),
                          "confounders": "optics" if i % 3 == 0 else ""})
    variables = {"stamps": ((PER_DET, STAMP, STAMP), ("star", "y", "x"), "float32", np.nan),
                 "n_stamps": ((), (), "int32", 0)}
    store = paths.zarr_store(out_root, night)
    index = outputs.setup_zarr(store, frames, variables)
    for key, st in stamps.items():
        outputs.write_frame(store, index[key], {"stamps": st, "n_stamps": np.int32(len(st))})
    outputs.consolidate(rows_to_table(rows), out_root, "exposures", night)
    table = paths.truth_table(raw_root, night)
    table.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(truth).to_parquet(table)
    return pd.DataFrame(truth)


TRAIN_NIGHTS = ["2023-05-01", "2023-05-02", "2023-05-03"]
TEST_NIGHT = "2023-06-01"


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    """Three training nights and one test night (out_root, raw_root)."""
    base = tmp_path_factory.mktemp("clsdata")
    out, raw = base / "out", base / "raw"
    for k, night in enumerate(TRAIN_NIGHTS):
        write_night(out, raw, night, 30, seed=k, mosaic_every=7)
    write_night(out, raw, TEST_NIGHT, 30, seed=99, mosaic_every=7)
    return out, raw


@pytest.fixture(scope="module")
def som(nights):
    out, _ = nights
    stamps = np.concatenate([read_night_stamps(out, n) for n in TRAIN_NIGHTS])
    return train_som(stamps, (5, 5), n_iterations=3000, seed=0)


def small_cfg(tmp_path, **train):
    return load_config(overrides={
        "train": {"max_epochs": 25, "batch_size": 16, "learning_rate": 3e-3,
                  "checkpoint_dir": str(tmp_path / "ckpt"), "val_fraction": 0.34, **train},
        "som": {"grid_nodes": 5, "passes": 3}})


# ---------------------------------------------------------------------------- SOM


def test_som_occupancy_representatives_and_files(som, tmp_path):
    rng = np.random.default_rng(1)
    stamps = star_stamps(rng, 10, 0.9, 0.0, 0.0)
    padded = np.concatenate([stamps, np.full((4, STAMP, STAMP), np.nan, np.float32)])
    occ = som.occupancy_map(padded)
    assert occ.shape == (5, 5) and occ.dtype == np.float32
    assert occ.sum() == pytest.approx(1.0, abs=1e-6)
    assert np.all(occ >= 0)
    assert len(som.winners(padded)) == 10  # the NaN padding has no winner
    assert som.occupancy_map(np.full((3, STAMP, STAMP), np.nan)).sum() == 0.0
    reps = som.representatives(padded, 3)
    assert reps.shape == (3, STAMP, STAMP)
    busiest = np.argmax(occ.ravel())
    members = np.flatnonzero(som.winners(padded) == busiest)
    assert any(np.allclose(reps[0].ravel(), prepare_stamps(stamps)[m]) for m in members)
    assert 0 < som.quantization_error < 5 and 0 <= som.topographic_error <= 1
    path = save_som(som, tmp_path / "som.npz")
    back = load_som(path)
    assert np.array_equal(back.weights, som.weights)
    assert np.array_equal(back.occupancy_map(padded), occ)
    assert back.quantization_error == som.quantization_error


def test_som_separates_round_from_trailed(som):
    rng = np.random.default_rng(2)
    round_ = som.occupancy_map(star_stamps(rng, 12, 0.8, 0.0, 0.3))
    trailed = som.occupancy_map(star_stamps(rng, 12, 0.8, 4.0, 0.3))
    assert 0.5 * np.abs(round_ - trailed).sum() > 0.8  # mostly on different nodes


def test_dihedral_is_a_group_action():
    x = np.arange(2 * 16, dtype=np.float32).reshape(2, 4, 4)
    assert np.array_equal(dihedral(x, np.zeros(2, int)), x)
    outs = {dihedral(x[:1], np.array([k]))[0].tobytes() for k in range(8)}
    assert len(outs) == 8


# ---------------------------------------------------------------------------- components


def test_component_shapes():
    net = DualInputClassifier(grid=(5, 5), stamp_shape=(STAMP, STAMP),
                              n_features=len(FEATURE_NAMES))
    occ = torch.rand(3, 5, 5)
    occ = occ / occ.sum(dim=(1, 2), keepdim=True)
    feats = torch.randn(3, len(FEATURE_NAMES))
    feats[0, 2] = float("nan")
    assert net(occ, feats).shape == (3, len(CLASSES))
    assert net.prototype_branch.representative_image(occ).shape == (3, 2, STAMP, STAMP)
    assert net.feature_branch.standardise(feats).shape == (3, 2 * len(FEATURE_NAMES))
    p = net.probabilities(occ, feats)
    assert torch.isfinite(p).all() and torch.allclose(p.sum(1), torch.ones(3))


def test_features_are_relative_to_the_survey_limit():
    row = {"pixscale_arcsec": 0.2, "fwhm_px": 7.0, "src_fwhm_px": 14.0, "trail_ratio": 0.0}
    i = FEATURE_NAMES.index("log_seeing_ratio")
    j = FEATURE_NAMES.index("log_src_seeing_ratio")
    assert feature_vector(row, ClassifyConfig())[i] == pytest.approx(0.0, abs=1e-6)
    assert feature_vector(row, ClassifyConfig())[j] == pytest.approx(math.log(2.0), rel=1e-5)
    assert feature_vector(row, ClassifyConfig(seeing_limit_arcsec=0.7))[i] == \
        pytest.approx(math.log(2.0), rel=1e-5)
    nopix = {"pixscale_arcsec": float("nan"), "fwhm_px": 7.0}
    assert np.isnan(feature_vector(nopix, ClassifyConfig())[i])
    assert feature_vector(nopix, ClassifyConfig(seeing_limit_px=3.5))[i] == \
        pytest.approx(math.log(2.0), rel=1e-5)


# ---------------------------------------------------------------------------- data


def test_split_keeps_every_exposure_on_one_side():
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"night": rng.choice(["a", "b"], 200),
                          "exposure": rng.integers(0, 40, 200).astype(str)})
    train, val = split_by_night_and_exposure(table, 0.25, seed=3, method="night_count")
    assert len(train) + len(val) == 200 and len(val) > 0
    key = table["night"] + "/" + table["exposure"]
    assert not set(key.iloc[train]) & set(key.iloc[val])
    table["night"] = rng.choice(["a", "b", "c", "d"], 200)  # enough nights: whole nights
    train, val = split_by_night_and_exposure(table, 0.25, seed=3, method="night_count")
    assert not set(table["night"].iloc[train]) & set(table["night"].iloc[val])


def test_datamodule_splits_by_exposure_and_standardises_on_train(nights, som):
    out, raw = nights
    dm = ExposureDataModule(out, TRAIN_NIGHTS[:2], raw, som, ClassifyConfig(), batch_size=8,
                            val_fraction=0.3, seed=1)
    dm.setup("fit")
    tr = set(zip(dm.train.table["night"], dm.train.table["exposure"]))
    va = set(zip(dm.val.table["night"], dm.val.table["exposure"]))
    assert tr and va and not tr & va
    both = dm.train.table.groupby(["night", "exposure"]).size()
    assert (both == 2).any()  # a mosaic keeps its two detectors together
    assert not dm.examples.table["ambiguous"].any()
    measured = np.isfinite(dm.train.features).any(axis=0)
    for name in ("mask_fraction", "log_ae_score"):  # no autoencoder columns here
        assert not measured[FEATURE_NAMES.index(name)]
    assert dm.feature_mean[~measured].tolist() == [0.0] * int((~measured).sum())
    expect = np.nanmean(dm.train.features[:, measured], axis=0)
    assert np.allclose(dm.feature_mean[measured], expect, atol=1e-5)
    everyone = np.nanmean(dm.examples.features[:, measured], axis=0)
    assert not np.allclose(dm.feature_mean[measured], everyone, atol=1e-6)
    occ, feats, label = next(iter(dm.train_dataloader()))
    assert occ.shape == (8, 5, 5) and feats.shape == (8, len(FEATURE_NAMES))
    assert torch.allclose(occ.sum(dim=(1, 2)), torch.ones(8))


def test_augmentation_rotates_and_subsamples(nights, som):
    out, raw = nights
    ex = load_examples(out, TRAIN_NIGHTS[:1], raw, som, ClassifyConfig())
    plain = ExposureDataset(ex, som.grid, augment=False)
    aug = ExposureDataset(ex, som.grid, augment=True, p_missing=0.5)
    torch.manual_seed(0)
    i = int(np.flatnonzero(ex.table["quality_class_truth"] == "very_bad_tracking")[0])
    views = [aug[i][0] for _ in range(20)]
    assert all(torch.equal(plain[i][0], plain[i][0]) for _ in range(2))
    assert any(not torch.equal(v, plain[i][0]) for v in views)
    assert all(v.sum() == pytest.approx(1.0, abs=1e-5) for v in views)
    measured = ~torch.isnan(plain[i][1])
    absent = {"mask_fraction", "log_ae_score", "log_src_seeing_ratio", "src_ellipticity",
              "src_coherent_ellipticity"}  # columns these synthetic catalogs lack
    assert measured.tolist() == [n not in absent for n in FEATURE_NAMES]
    feats = torch.stack([aug[i][1] for _ in range(20)])[:, measured]
    assert torch.isnan(feats).any()


# ---------------------------------------------------------------------------- training


@NO_SRUN_HINT
def test_short_training_lowers_loss(nights, som):
    import lightning as L

    out, raw = nights
    L.seed_everything(0, verbose=False)
    dm = ExposureDataModule(out, TRAIN_NIGHTS, raw, som, ClassifyConfig(), batch_size=16,
                            val_fraction=0.34, seed=0)
    dm.setup("fit")
    net = DualInputClassifier(grid=som.grid, stamp_shape=som.stamp_shape,
                              n_features=len(FEATURE_NAMES))
    net.prototype_branch.set_prototypes(som.prototypes())
    net.feature_branch.set_standardisation(dm.feature_mean, dm.feature_std)
    loader = dm.loader(dm.train, augment=False, shuffle=False)
    logits, labels = collect_logits(net, loader)
    before = float(torch.nn.functional.cross_entropy(logits, labels))
    system = ClassifierSystem(net, learning_rate=3e-3,
                              class_weights=class_weights(dm.class_counts))
    trainer = L.Trainer(accelerator="cpu", max_epochs=15, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(system, datamodule=dm)
    logits, labels = collect_logits(net, loader)
    after = float(torch.nn.functional.cross_entropy(logits, labels))
    assert after < 0.5 * before
    val_logits, val_labels = collect_logits(net, dm.val_dataloader())
    assert (val_logits.argmax(1) == val_labels).float().mean() > 0.8


def test_temperature_scaling_lowers_nll():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (400,), generator=gen)
    true_logits = torch.randn(400, 5, generator=gen)
    true_logits[torch.arange(400), labels] += 1.5
    labels = torch.distributions.Categorical(logits=true_logits).sample()
    overconfident = 4.0 * true_logits
    t = fit_temperature(overconfident, labels)
    nll = torch.nn.functional.cross_entropy
    assert 2.5 < t < 6.0
    assert float(nll(overconfident / t, labels)) < float(nll(overconfident, labels)) - 0.1


def _trained_net(som, seed=0):
    torch.manual_seed(seed)
    net = DualInputClassifier(grid=som.grid, stamp_shape=som.stamp_shape,
                              n_features=len(FEATURE_NAMES))
    net.prototype_branch.set_prototypes(som.prototypes())
    net.feature_branch.set_standardisation(np.linspace(0, 1, len(FEATURE_NAMES)),
                                           np.linspace(1, 2, len(FEATURE_NAMES)))
    net.temperature.fill_(1.7)
    return net.eval()


def test_weights_round_trip_gives_identical_outputs(som, tmp_path):
    net = _trained_net(som)
    path = save_classifier(net, tmp_path / "w" / "classifier.safetensors", som,
                           info={"training": {"nights": TRAIN_NIGHTS}})
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["temperature"] == pytest.approx(1.7)
    assert meta["feature_names"] == list(FEATURE_NAMES)
    clf = load_classifier(path)
    assert isinstance(clf, LearnedClassifier) and clf.version.startswith("cnn-")
    occ = torch.rand(4, *som.grid)
    occ = occ / occ.sum(dim=(1, 2), keepdim=True)
    feats = torch.randn(4, len(FEATURE_NAMES))
    with torch.no_grad():
        assert torch.equal(net.probabilities(occ, feats), clf.net.probabilities(occ, feats))
    assert np.array_equal(clf.som.weights, som.weights)
    a, b = shared_classifier(path), shared_classifier(path, ClassifyConfig(seeing_limit_arcsec=1))
    assert a.net is b.net and b.classify_cfg.seeing_limit_arcsec == 1
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        load_classifier(path)


def test_load_classifier_without_weights(tmp_path, monkeypatch):
    import survey_qa.models.weights as mw

    monkeypatch.setattr(mw, "WEIGHTS_DIR", tmp_path / "nothing")
    assert load_classifier() is None
    with pytest.raises(ValueError):
        load_classifier(tmp_path / "missing.safetensors")


def test_predict_returns_calibrated_result(som, tmp_path):
    path = save_classifier(_trained_net(som, seed=3), tmp_path / "c.safetensors", som)
    clf = load_classifier(path)
    rng = np.random.default_rng(5)
    for cls in CLASSES:
        row, stamps = synthetic_detector(rng, cls)
        out = clf.predict(row, clf.occupancy(stamps))
        p = np.array([out[f"p_{c}"] for c in CLASSES])
        assert out["classifier"] == "cnn"
        assert p.sum() == pytest.approx(1.0, abs=1e-9) and np.all(p >= 0)
        assert out["quality_class"] == CLASSES[int(np.argmax(p))]
        assert out["reason"]
        rules = classify_rules(row, clf.classify_cfg)  # flags follow the limits, always
        assert (out["flag_bad_seeing"], out["flag_tracking"], out["flag_background"]) == (
            rules.flag_bad_seeing, rules.flag_tracking, rules.flag_background)


def test_predict_defers_to_rules_outside_the_training_domain(som, tmp_path):
    path = save_classifier(_trained_net(som, seed=3), tmp_path / "c.safetensors", som,
                           info={"domain": {"pixscale_arcsec": [0.1, 0.6]}})
    clf = load_classifier(path)
    row, stamps = synthetic_detector(np.random.default_rng(6), "bad_seeing")
    row["pixscale_arcsec"] = 3.0
    out = clf.predict(row, clf.occupancy(stamps))
    assert out["classifier"] == "rules"
    assert "CNN_OUT_OF_DOMAIN" in decode_flags(out["qa_flags"])
    assert "pixscale_arcsec 3 outside" in out["reason"]


def test_training_domain_is_the_range_that_decide_reads():
    from survey_qa.models.classifier_features import training_domain
    from survey_qa.pipeline.decide import outside_domain

    table = pd.DataFrame({"pixscale_arcsec": [0.2, 0.5, np.nan], "fwhm_px": [2.0, 9.0, 4.0],
                          "fwhm_arcsec": [np.nan] * 3, "nx": [500, 4096, 1024]})
    domain, stats = training_domain(table)
    assert domain == {"pixscale_arcsec": [0.2, 0.5], "fwhm_px": [2.0, 9.0]}  # not nx
    assert stats["pixscale_arcsec"]["n_finite"] == 2 and stats["fwhm_arcsec"]["n_finite"] == 0
    assert json.loads(json.dumps(domain)) == domain
    assert outside_domain({"pixscale_arcsec": 0.3, "fwhm_px": 3.0}, domain) == ""
    assert outside_domain({"pixscale_arcsec": 0.3, "fwhm_px": 15.0}, domain).startswith("fwhm_px")


# ---------------------------------------------------------------------------- flows


@NO_SRUN_HINT
def test_flows_train_and_evaluate(nights, tmp_path):
    from survey_qa.flows.train_classifier import evaluate, train_classifier
    from survey_qa.flows.train_classifier import train_som as train_som_flow

    out, raw = nights
    cfg = small_cfg(tmp_path)
    som_path = train_som_flow(cfg, out, TRAIN_NIGHTS, output=tmp_path / "som.npz")
    assert load_som(som_path).grid == (5, 5)
    weights = train_classifier(cfg, out, TRAIN_NIGHTS, raw, som_path=som_path,
                               output=tmp_path / "clf.safetensors")
    meta = json.loads(weights.with_suffix(".json").read_text())
    t = meta["training"]
    assert t["nights"] == TRAIN_NIGHTS and t["n_val"] > 0 and t["epochs"] == 25
    lo, hi = meta["domain"]["fwhm_px"]
    assert 0 < lo <= hi and meta["domain_stats"]["fwhm_px"]["n_finite"] > 0
    assert 0.05 <= t["temperature"] <= 20 and t["val_nll_after"] <= t["val_nll_before"] + 1e-9
    assert (tmp_path / "ckpt" / "classifier" / "last.ckpt").exists()
    longer = small_cfg(tmp_path, max_epochs=27)  # resumes from last.ckpt: 2 more epochs
    resumed = train_classifier(longer, out, TRAIN_NIGHTS, raw, som_path=som_path,
                               output=tmp_path / "clf2.safetensors")
    assert json.loads(resumed.with_suffix(".json").read_text())["training"]["epochs"] == 27
    with pytest.raises(ValueError, match="used in training"):
        evaluate(cfg, out, raw, TRAIN_NIGHTS[:1], weights=weights)
    report = evaluate(cfg, out, raw, [TEST_NIGHT], weights=weights,
                      report_dir=tmp_path / "eval")
    names = [s.name for s in report.scores]
    assert names == ["cnn", "rules", "gboost"]
    cnn = report.scores[0]
    assert cnn.n == sum(sum(r) for r in cnn.confusion) > 20
    assert cnn.accuracy >= 0.9 and cnn.roc_auc_usable > 0.9
    assert report.scores[2].accuracy >= 0.8
    assert cnn.n_any_confounder > 0 and "optics" in cnn.accuracy_by_confounder
    assert (tmp_path / "eval" / "evaluation.png").stat().st_size > 10_000
    assert "macro F1" in report.text()
    assert [s.n for s in report.measured_scores] == [cnn.n] * 3  # every PSF measured here
    print(report.text())


# ---------------------------------------------------------------------------- DDP


DDP_SCRIPT = """
import sys
from pathlib import Path
import lightning as L
from survey_qa.config import load_config
from survey_qa.flows.train_classifier import train_classifier

out, raw, som, work = sys.argv[1:5]

class Mark(L.Callback):
    def on_train_end(self, trainer, module):
        Path(work, f"rank{trainer.global_rank}-of-{trainer.world_size}").write_text("ok")

cfg = load_config(overrides={"train": {
    "accelerator": "cpu", "devices": 2, "strategy": "ddp", "max_epochs": 2,
    "batch_size": 8, "checkpoint_dir": str(Path(work, "ckpt"))}})
nights = NIGHTS
train_classifier(cfg, out, nights, raw, som_path=som, output=Path(work, "w.safetensors"),
                 callbacks=[Mark()])
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes(nights, som, tmp_path):
    out, raw = nights
    som_path = save_som(som, tmp_path / "som.npz")
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT).replace("NIGHTS", repr(TRAIN_NIGHTS)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(["timeout", "300", sys.executable, str(script), str(out), str(raw),
                           str(som_path), str(tmp_path)], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "rank0-of-2").exists() and (tmp_path / "rank1-of-2").exists()
    assert (tmp_path / "ckpt" / "classifier" / "last.ckpt").exists()
    clf = load_classifier(tmp_path / "w.safetensors")
    assert clf.meta["training"]["devices"] == 2
