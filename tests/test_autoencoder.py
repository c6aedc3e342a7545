"""The patch autoencoder: components, scoring stage, data split, weights, training."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from astropy.io import fits
from scipy import ndimage

from survey_qa.config import AutoencoderConfig, IOConfig, TrainConfig, load_config
from survey_qa.models.autoencoder import (AutoencoderSystem, PatchDataModule,
                                          RandomPatchDataset, calibrate,
                                          find_reference_frames, reference_maps)
from survey_qa.models.components.autoencoder import (AutoencoderArch, ConvAutoencoder,
                                                     Decoder, Encoder)
from survey_qa.models.splits import split_by_night_and_exposure
from survey_qa.models.weights import (load_scorer, read_autoencoder_metadata,
                                      save_autoencoder, scorer_from)
from survey_qa.pipeline import aescore
from survey_qa.pipeline.errors import QualityError
from survey_qa.pipeline.schema import empty_exposure_row, rows_to_table

pytestmark = pytest.mark.filterwarnings(  # lightning 2.6 calls a torch 2.13-deprecated API
    r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning")

TINY = AutoencoderArch(base_channels=8, latent_channels=4)
SKY = 200.0


def sky_frame(n=128, seed=0, n_stars=30, cloud=0.0, gradient=0.0, fwhm_px=3.0):
    """Gaussian stars on a sky (ADU, gain 1); ``cloud`` adds a bright blob (share of sky)
    centred at (0.3 n, 0.7 n) in (y, x); ``gradient`` a ramp along x."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n]
    model = SKY * (1 + gradient * (xx / (n - 1) - 0.5))
    if cloud:
        model = model + cloud * SKY * np.exp(-((yy - 0.3 * n) ** 2 + (xx - 0.7 * n) ** 2)
                                             / (0.15 * n) ** 2)
    s = fwhm_px / 2.3548
    for _ in range(n_stars):
        x0, y0 = rng.uniform(0, n, 2)
        f = 10 ** rng.uniform(3, 4.5)
        model = model + f / (2 * np.pi * s * s) * np.exp(
            -((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * s * s))
    return (rng.poisson(model) + rng.normal(0, 3, model.shape)).astype(np.float32)


def normalized(frame, factor=2):
    binned, bmask = aescore.bin_frame(frame, None, factor)
    return aescore.normalize_frame(binned, bmask)[0]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------- components


def test_component_shapes():
    torch.manual_seed(0)
    arch = AutoencoderArch(base_channels=8, latent_channels=3, n_down=1)
    x = torch.randn(5, 1, 32, 32)
    z = Encoder(arch)(x)
    assert z.shape == (5, 3, 32 // arch.reduction, 32 // arch.reduction)
    assert Decoder(arch)(z).shape == x.shape
    model = ConvAutoencoder(arch)
    assert model(x).shape == x.shape
    model.check_patch_px(32)
    with pytest.raises(ValueError, match="multiple"):
        model.check_patch_px(12)
    with pytest.raises(ValueError):
        AutoencoderArch(base_channels=0)


def test_a_constant_offset_cannot_pass_through():
    """Instance normalisation and reflect padding: a patch's own level is not copied."""
    torch.manual_seed(0)
    model = ConvAutoencoder(TINY).eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), model(x + 7.0), atol=1e-4)


def test_short_training_lowers_the_loss():
    import lightning as L
    from lightning.fabric.utilities.warnings import PossibleUserWarning

    torch.manual_seed(0)
    frames = [normalized(sky_frame(seed=i)) for i in range(4)]
    data = torch.utils.data.DataLoader(RandomPatchDataset(frames, 16, 64), batch_size=32,
                                       shuffle=True)
    system = AutoencoderSystem(ConvAutoencoder(TINY), learning_rate=3e-3, cell_px=4)
    fixed = torch.from_numpy(aescore.patchify(frames[0], 16)[0])

    def loss() -> float:
        with torch.no_grad():
            return float(system.loss_fn(system(fixed), fixed))

    before = loss()
    with warnings.catch_warnings():  # performance hints (few workers, srun on PATH)
        warnings.simplefilter("ignore", PossibleUserWarning)
        trainer = L.Trainer(max_epochs=15, accelerator="cpu", logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.fit(system, data)
    assert loss() < 0.85 * before
    assert system.hparams.architecture == TINY.to_dict()
    assert "autoencoder" not in system.hparams


def test_random_patches_are_augmented_crops():
    frame = np.arange(40 * 40, dtype=np.float32).reshape(40, 40)
    ds = RandomPatchDataset([frame], 8, 50)
    assert len(ds) == 50
    torch.manual_seed(1)
    patches = [ds[i] for i in range(50)]
    assert all(p.shape == (1, 8, 8) for p in patches)
    firsts = {tuple(p[0, 0, :2].tolist()) for p in patches}
    assert len(firsts) > 10  # positions and orientations vary
    # every patch is a rotated / flipped crop: its sorted values are a crop's sorted values
    p = patches[0][0].numpy()
    lo = p.min()
    y0, x0 = divmod(int(lo), 40)
    assert np.array_equal(np.sort(p.ravel()), np.sort(frame[y0:y0 + 8, x0:x0 + 8].ravel()))
    with pytest.raises(ValueError, match="smaller"):
        RandomPatchDataset([frame[:5]], 8, 1)


# ---------------------------------------------------------------------------- stage


def test_bin_frame_means_unmasked_pixels_and_pads():
    data = np.arange(5 * 7, dtype=np.float32).reshape(5, 7)
    mask = np.zeros_like(data, dtype=bool)
    mask[0, 0] = True
    binned, bmask = aescore.bin_frame(data, mask, 2)
    assert binned.shape == (3, 4)
    assert binned[0, 0] == pytest.approx((1 + 7 + 8) / 3)
    assert binned[2, 3] == data[4, 6]  # the lone corner pixel of the padded block
    assert not bmask.any()
    full = np.ones_like(mask)
    assert aescore.bin_frame(data, full, 2)[1].all()


def test_normalisation_uses_the_common_sky_level_and_raises_on_bad_data():
    rng = np.random.default_rng(0)
    b = rng.normal(100.0, 2.0, (64, 64)).astype(np.float32)
    b[:, 40:] += 30.0  # a third of the frame raised, as by glow
    image, sky, unit = aescore.normalize_frame(b, np.zeros(b.shape, bool))
    assert sky == pytest.approx(100.0, abs=0.5)  # the undisturbed level, not the median
    assert unit == pytest.approx(5.0, rel=0.02)  # 5% of the sky exceeds the 2 ADU noise
    assert abs(np.median(image[:, :40])) < 0.1 and np.median(image[:, 40:]) > 3
    with pytest.raises(QualityError, match="unmasked"):
        aescore.normalize_frame(b, np.ones(b.shape, bool))
    with pytest.raises(QualityError, match="noise"):
        aescore.normalize_frame(np.zeros((32, 32), np.float32), np.zeros((32, 32), bool))


class Zero(torch.nn.Module):
    """Reconstructs every patch as flat sky: the score is then the data's own structure."""

    def forward(self, x):
        return torch.zeros_like(x)


def test_score_map_geometry():
    image = np.zeros((50, 35), np.float32)  # a binned frame: 4 x 3 patches of 16
    image[20:28, 4:12] = 4.0  # inside patch (1, 0)
    params = aescore.ScoreParams(cell_px=4)
    smap = aescore.score_map(Zero(), image, 16, params=params)
    assert smap.shape == (4, 3)
    assert smap[1, 0] == pytest.approx(4.0 * 4 / 16)  # 4 of the patch's 16 cells
    assert np.count_nonzero(smap) == 1
    # the frame is padded by reflection: a block by the right edge shows in the last patch
    image[20:28, 28:35] = 4.0
    assert aescore.score_map(Zero(), image, 16, params=params)[1, 2] > 0
    # full-resolution geometry: bin 2, patch 16 -> 32-pixel blocks
    mask = np.zeros((4, 3), bool)
    mask[1, 1] = True
    full = aescore.upsample_mask(mask, 32, (100, 70))
    assert full.shape == (100, 70)
    assert full[32:64, 32:64].all() and full.sum() == 32 * 32
    assert aescore.masked_fraction(mask, 32, (100, 70)) == pytest.approx(1024 / 7000)
    with pytest.raises(ValueError, match="cover"):
        aescore.upsample_mask(mask, 16, (100, 70))


def test_mask_cleaning_removes_an_isolated_patch_and_fills_a_hole():
    smap = np.zeros((12, 12))
    smap[2:9, 2:9] = 5.0  # a damaged region ...
    smap[5, 5] = 0.0  # ... with a hole
    smap[10, 10] = 5.0  # an isolated bright star
    smap[0:3, 10] = 5.0  # a one-patch-wide line
    mask = aescore.make_mask(smap, 1.0, 1)
    assert mask[5, 5]  # hole filled
    assert not mask[10, 10]  # isolated patch removed
    assert not mask[0:3, 10].any()
    assert mask[2:9, 2:9].all() and mask.sum() == 49
    edge = np.zeros((8, 8))
    edge[:, :3] = 5.0  # a region along the edge keeps its edge and does not grow
    assert np.array_equal(aescore.make_mask(edge, 1.0, 1), edge > 1.0)
    assert np.array_equal(aescore.make_mask(smap, 1.0, 0), smap > 1.0)
    nan_hole = np.zeros((11, 11))
    nan_hole[1:10, 1:10] = 5.0
    nan_hole[5, 5] = np.nan  # not scored: filled as a hole, never masked by itself
    assert aescore.make_mask(nan_hole, 1.0, 1)[1:10, 1:10].all()
    assert not aescore.make_mask(np.full((5, 5), np.nan), 1.0, 1).any()


def test_open_scores_threshold_equals_binary_opening():
    rng = np.random.default_rng(3)
    smap = rng.gamma(2.0, 1.0, (10, 12))
    s = ndimage.generate_binary_structure(2, 2)
    for t in (1.0, 2.0, 3.0):
        padded = np.pad(smap > t, 4, mode="edge")  # far from the ends of the padding
        binary = ndimage.binary_opening(padded, s)[4:-4, 4:-4]
        assert np.array_equal(aescore.open_scores(smap, 1) > t, binary)


# ---------------------------------------------------------------------------- trained model


@pytest.fixture(scope="module")
def trained():
    """A tiny autoencoder trained on flat-sky frames, and its calibration."""
    torch.manual_seed(0)
    frames = [normalized(sky_frame(seed=i)) for i in range(6)]
    model = ConvAutoencoder(TINY)
    loader = torch.utils.data.DataLoader(RandomPatchDataset(frames, 16, 128), batch_size=32,
                                         shuffle=True)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    loss_fn = torch.nn.HuberLoss()
    for _ in range(3):
        for x in loader:
            opt.zero_grad()
            loss_fn(model(x), x).backward()
            opt.step()
    params = aescore.ScoreParams(cell_px=4)
    val = [normalized(sky_frame(seed=100 + i)) for i in range(4)]
    cal = calibrate(reference_maps(model.eval(), val, 16, params), 0.99, 1)
    meta = dict(cal, bin_factor=2, patch_px=16, score_params=params.to_dict())
    return model, meta


def test_damaged_sky_scores_higher_than_flat_sky(trained):
    model, meta = trained
    scorer = scorer_from(model, dict(meta, version="test"))
    cfg = AutoencoderConfig(threshold_quantile=0.99, close_px=1)
    flat = aescore.score_detector(sky_frame(seed=200), None, scorer, cfg)
    cloud = aescore.score_detector(sky_frame(seed=200, cloud=0.4), None, scorer, cfg)
    ramp = aescore.score_detector(sky_frame(seed=200, gradient=0.4), None, scorer, cfg)
    assert flat.score_map.shape == (4, 4) and flat.block_px == 32
    # the cloud sits at (0.3, 0.7) of the frame: patch (1, 2) of the 4 x 4 grid
    assert cloud.score_map[1, 2] > 3 * flat.score_map.max()
    assert cloud.mask[1, 2] and not cloud.mask[3, 0]
    assert flat.mask_fraction == 0.0 and 0 < cloud.mask_fraction < 0.6
    assert ramp.score_map[:, [0, 3]].min() > flat.score_map.max()  # both ends of the ramp
    assert flat.ae_score < cloud.ae_score and flat.ae_score < ramp.ae_score
    assert 0.5 < flat.ae_score < 2.0


def test_weights_round_trip(trained, tmp_path, monkeypatch):
    model, meta = trained
    path = save_autoencoder(model, tmp_path / "ae.safetensors", dict(meta, command="test"))
    stored = read_autoencoder_metadata(path)
    assert stored["architecture"] == TINY.to_dict()
    assert stored["version"].startswith("ae1-") and stored["command"] == "test"
    scorer = load_scorer(path)
    x = torch.from_numpy(aescore.patchify(normalized(sky_frame(seed=5)), 16)[0])
    with torch.no_grad():
        assert torch.equal(scorer.model(x), model.eval()(x))
    assert scorer.threshold == meta["threshold"] and scorer.bin_factor == 2
    assert scorer.params == aescore.ScoreParams(cell_px=4)
    # another quantile comes from the stored table, between its neighbours
    assert scorer.threshold_at(0.9) <= scorer.threshold_at(0.99) == scorer.threshold
    with pytest.raises(ValueError, match="outside"):
        scorer.threshold_at(0.2)
    # the file holds tensors only (no pickle)
    assert path.read_bytes()[8:9] == b"{"
    with pytest.raises(ValueError, match="no autoencoder weights"):
        load_scorer(tmp_path / "missing.safetensors")
    monkeypatch.setattr("survey_qa.models.weights.WEIGHTS_DIR", tmp_path / "none")
    assert load_scorer(None) is None
    with pytest.raises(ValueError, match="lacks"):
        save_autoencoder(model, tmp_path / "bad.safetensors", {"threshold": 1.0})
    assert not (tmp_path / "bad.safetensors").exists()  # nothing half-written
    assert not (tmp_path / "bad.json").exists()
    raw = bytearray(path.read_bytes())  # the version names the tensors' checksum
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        load_scorer(path)


# ---------------------------------------------------------------------------- references


def refs_table(layout):
    """Rows (night, exposure, detector) -> a reference frame table."""
    return pd.DataFrame([{"night": n, "exposure": e, "detector": d, "path": f"{e}.fits",
                          "hdu": 0} for n, e, d in layout])


def split_frames(refs, val_fraction, seed):
    """Training and validation reference rows, split as the autoencoder's data module does."""
    train, val = split_by_night_and_exposure(refs, val_fraction, seed, method="exposure_share")
    return refs.iloc[train], refs.iloc[val]


@pytest.mark.parametrize("seed", range(5))
def test_split_keeps_exposures_whole_and_prefers_whole_nights(seed):
    layout = [(f"2024-03-0{n}", f"n{n}e{e}", f"d{d}") for n in range(1, 6)
              for e in range(4) for d in range(2)]
    train, val = split_frames(refs_table(layout), 0.2, seed)
    assert not set(train["exposure"]) & set(val["exposure"])
    assert len(train) + len(val) == len(layout)
    assert not set(train["night"]) & set(val["night"])  # a whole night fits 20%
    assert val["exposure"].nunique() == 4
    one_night = [("2024-03-01", f"e{e}", f"d{d}") for e in range(10) for d in range(4)]
    train, val = split_frames(refs_table(one_night), 0.3, seed)
    assert not set(train["exposure"]) & set(val["exposure"])
    assert val["exposure"].nunique() == 3 and len(val) == 12
    two = [(f"2024-03-0{n}", f"n{n}e{e}", "0") for n in (1, 2) for e in range(5)]
    train, val = split_frames(refs_table(two), 0.2, seed)  # no night fits: exposures
    assert val["exposure"].nunique() == 2 and train["exposure"].nunique() == 8
    train, val = split_frames(refs_table([("2024-03-01", "e0", "0")]), 0.5, seed)
    assert len(train) == 1 and val.empty


def write_catalog(root: Path, night: str, rows: list[dict]) -> None:
    out = []
    for r in rows:
        row = empty_exposure_row()
        row.update(status="ok", quality_class="good", p_good=0.95, hdu=0)
        row.update(r)
        out.append(row)
    folder = root / "catalogs" / "exposures" / f"night={night}"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(rows_to_table(out), folder / "part-0.parquet")


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """Two nights of small single-detector frames and their exposures catalog."""
    root = tmp_path_factory.mktemp("ae_out")
    raw = root / "raw"
    for k, night in enumerate(("2024-03-01", "2024-03-02")):
        rows = []
        for e in range(4):
            path = raw / night / f"f{k}{e}.fits"
            path.parent.mkdir(parents=True, exist_ok=True)
            fits.PrimaryHDU(sky_frame(seed=10 * k + e), header=fits.Header(
                {"GAIN": 1.0, "RDNOISE": 3.0, "SATURATE": 65000.0})).writeto(path)
            rows.append({"exposure": path.stem, "detector": "0", "path": str(path)})
        rows[1]["quality_class"] = "bad_seeing"
        rows[2]["p_good"] = 0.5
        rows.append({"exposure": "f_all", "detector": "ALL", "path": "x"})
        rows.append({"exposure": "f_bad", "detector": "0", "path": "x", "status": "failed"})
        write_catalog(root, night, rows)
    return root


def test_references_come_from_the_catalog(catalog):
    refs = find_reference_frames(catalog, None, 0.8)
    assert list(refs.columns) == ["night", "exposure", "detector", "path", "hdu"]
    assert sorted(refs["exposure"]) == ["f00", "f03", "f10", "f13"]
    assert list(find_reference_frames(catalog, ["2024-03-02"], 0.8)["exposure"]) == \
        ["f10", "f13"]
    assert len(find_reference_frames(catalog, None, 0.4)) == 6
    with pytest.raises(ValueError, match="no exposures catalog"):
        find_reference_frames(catalog / "nothing")


def test_datamodule_splits_by_night_and_serves_patches(catalog):
    a = AutoencoderConfig(bin_factor=2, patch_px=16, patches_per_frame=8)
    t = TrainConfig(batch_size=4, val_fraction=0.5)
    dm = PatchDataModule(catalog, None, a, t, IOConfig())
    dm.setup("fit")
    split = dm.split
    assert set(split.train["night"]).isdisjoint(split.val["night"])
    assert len(split.train_frames) == 2 and len(split.val_frames) == 2
    assert split.train_frames[0].shape == (64, 64)
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 1, 16, 16) and batch.dtype == torch.float32
    assert len(dm.val_dataloader().dataset) == 2 * 16


def train_config(tmp_path: Path, **train) -> Path:
    cfg = {"autoencoder": {"bin_factor": 2, "patch_px": 16, "patches_per_frame": 16,
                           "base_channels": 8, "latent_channels": 4,
                           "threshold_quantile": 0.99},
           "train": {"batch_size": 16, "max_epochs": 2, "val_fraction": 0.5, **train},
           "run": {"progress": False}}
    path = tmp_path / "train.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def test_train_autoencoder_writes_weights_and_resumes(catalog, tmp_path):
    from survey_qa.flows.train import train_autoencoder

    cfg = load_config(train_config(tmp_path), {"train": {"checkpoint_dir": str(tmp_path / "ck")}})
    out = train_autoencoder(cfg, catalog, None, output=tmp_path / "w.safetensors")
    meta = read_autoencoder_metadata(out)
    assert meta["training_data"]["n_train_frames"] == 2
    assert meta["calibrated_on"] == "validation" and meta["bin_factor"] == 2
    assert meta["threshold"] > 0 and meta["quantile"] == 0.99
    assert (tmp_path / "ck" / "autoencoder" / "last.ckpt").is_file()
    scorer = load_scorer(out)
    result = aescore.score_detector(sky_frame(seed=99), None, scorer, cfg.autoencoder)
    assert result.score_map.shape == (4, 4)
    # a second call resumes from last.ckpt: with max_epochs reached nothing more is trained
    cfg3 = load_config(train_config(tmp_path, max_epochs=3),
                       {"train": {"checkpoint_dir": str(tmp_path / "ck")}})
    again = read_autoencoder_metadata(train_autoencoder(cfg3, catalog, None,
                                                        output=tmp_path / "w2.safetensors"))
    assert again["training"]["epochs_run"] == 3


@pytest.mark.slow
def test_two_process_cpu_ddp_training(catalog, tmp_path):
    """`survey-qa train autoencoder` with 2 CPU ranks (gloo), as a plain python call."""
    out = tmp_path / "ddp.safetensors"
    cmd = [sys.executable, "-m", "survey_qa.cli", "train", "autoencoder",
           "--config", str(train_config(tmp_path)), "--out-root", str(catalog),
           "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu",
           "--checkpoint-dir", str(tmp_path / "ck"), "--output", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = read_autoencoder_metadata(out)
    assert meta["training"]["devices"] == 2 and meta["training"]["strategy"] == "ddp"
    assert done.stdout.count("weights written to") == 1  # rank 0 only
