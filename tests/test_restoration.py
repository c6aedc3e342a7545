"""The multi-frame restoration network: shapes, weights, split and behaviour."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from survey_qa.models import restoration as R
from survey_qa.models.components.restoration import (RestorationArch, RestorationUNet,
                                                     n_parameters)
from survey_qa.models.weights import (RESTORATION_FILE, load_restoration, metadata_path,
                                      packaged_weights, save_restoration)
from survey_qa.simulate.noiseless import noiseless_frame
from survey_qa.simulate.sequence import plan_sequence


@pytest.mark.parametrize("shape", [(16, 16), (32, 48), (64, 20)])
def test_network_keeps_any_multiple_of_its_stride(shape):
    net = RestorationUNet(RestorationArch(n_frames=5))
    assert shape[0] % net.stride == 0 and shape[1] % net.stride == 0
    x = torch.randn(2, 6, *shape)
    y = net(x)
    assert y.shape == (2, 1, *shape)
    # an untrained network returns the stack channel
    assert torch.allclose(y, x[:, :1])
    assert n_parameters(net) < 300_000


def test_network_refuses_wrong_inputs():
    net = RestorationUNet(RestorationArch(n_frames=3))
    with pytest.raises(ValueError, match="channels"):
        net(torch.zeros(1, 6, 16, 16))
    with pytest.raises(ValueError, match="multiples"):
        net(torch.zeros(1, 4, 18, 16))


def test_restore_pads_odd_sizes_and_keeps_holes():
    net = RestorationUNet(RestorationArch(n_frames=2))
    rng = np.random.default_rng(0)
    frames = rng.normal(0, 1, (2, 21, 19)).astype(np.float32)
    masks = np.zeros(frames.shape, bool)
    stack = frames.mean(axis=0)
    stack[0, 0] = np.nan
    out = R.restore(net, frames, masks, np.array([1.0, 0.5]), stack, 1.0)
    assert out.shape == (21, 19) and np.isnan(out[0, 0])
    np.testing.assert_allclose(out[1:], stack[1:], rtol=1e-4, atol=1e-4)


def test_packaged_weights_load_with_their_checksum(tmp_path):
    path = packaged_weights(RESTORATION_FILE)
    net, meta = load_restoration()
    assert meta["architecture"]["n_frames"] == R.K_FRAMES
    assert not set(meta["train_seeds"] + meta["val_seeds"]) & set(R.HELD_OUT_SEEDS)
    assert path.stat().st_size < 5_000_000
    # a changed byte fails the checksum
    bad = tmp_path / "restoration.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    bad.write_bytes(bytes(raw))
    metadata_path(bad).write_text(metadata_path(path).read_text())
    with pytest.raises(ValueError, match="checksum"):
        load_restoration(bad)
    other = tmp_path / "other.safetensors"
    save_restoration(net, other, {"note": 1})
    meta2 = json.loads(metadata_path(other).read_text())
    assert meta2["format"] == meta["format"]
    load_restoration(other)


def test_split_keeps_nights_apart():
    windows = []
    for night in ("2025-01-01", "2025-01-02", "2025-01-03", "2025-01-04", "2025-01-05"):
        for j in range(3):
            windows.append(R.Window(
                frames=np.zeros((1, 4, 4), np.float32), masks=np.zeros((1, 4, 4), bool),
                weights=np.ones(1), noise_adu=np.ones(1), stack=np.zeros((4, 4)),
                mean=np.zeros((4, 4)), truth=np.zeros((4, 4)), noise_ref=1.0, night=night,
                seed=0, exposures=[f"{night}_{j}"], reference=0))
    train, val = R.split_windows(windows, 0.4, seed=0)
    assert train and val
    assert not {w.night for w in train} & {w.night for w in val}
    assert len(train) + len(val) == len(windows)


def test_noiseless_frame_follows_the_reference_pointing():
    seq = plan_sequence("2025-03-01", 3, seed=11, size_px=128)
    img = noiseless_frame(seq, 2, seeing_from=2)
    assert img.shape == (128, 128) and img.dtype == np.float32
    assert np.all(img >= 0) and img.max() > 0
    # the brightest true star in the frame sits on a local maximum of the image
    st = seq.scene.stars
    x, y = seq.frames[2].pointing.apply(st["x_ref"].to_numpy(), st["y_ref"].to_numpy(),
                                        128, 128)
    inside = (x > 8) & (x < 119) & (y > 8) & (y < 119)
    k = np.argmax(np.where(inside, st["flux_e"].to_numpy(), -1))
    iy, ix = int(round(y[k])), int(round(x[k]))
    patch = img[iy - 3:iy + 4, ix - 3:ix + 4]
    assert patch.max() > 0.5 * img[iy - 8:iy + 9, ix - 8:ix + 9].max()


def test_network_beats_the_noisiest_frame_on_a_held_out_window():
    """On a held-out night, the shipped network is closer to the truth than the noisiest
    of its input frames (and not farther than the weighted stack)."""
    seq = plan_sequence(R.night_of(R.HELD_OUT_SEEDS[0]), R.K_FRAMES, seed=R.HELD_OUT_SEEDS[0],
                        size_px=128)
    w = R.make_window(seq, 0)
    net, _ = load_restoration()
    out = R.restore_window(net, w)
    v = w.valid
    assert v.sum() > 1000

    def rms(img):
        return float(np.sqrt(np.mean((img[v] - w.truth[v]) ** 2)))

    noisiest = int(np.argmax(w.noise_adu))
    assert rms(out) < rms(w.frames[noisiest])
    assert rms(out) < 1.05 * rms(w.stack)


def test_restore_frames_keeps_the_reference_and_the_best_weights():
    from survey_qa.flows.restore import choose_k, restore_frames

    assert list(choose_k(np.array([0.2, 1.0, 0.0, 0.5, 0.7, 0.1, 0.3]), 1, 5)) == [1, 4, 3, 6, 0]
    with pytest.raises(ValueError, match="combines 5 frames"):
        choose_k(np.array([1.0, 0.5, 0.0, 0.0, 0.2]), 0, 5)
    rng = np.random.default_rng(3)
    frames = rng.normal(0.0, 5.0, (6, 32, 40)).astype(np.float32)
    yy, xx = np.mgrid[:32, :40]
    star = 5000.0 / (2 * np.pi * 1.5 ** 2) * np.exp(-((xx - 20) ** 2 + (yy - 16) ** 2)
                                                    / (2 * 1.5 ** 2))
    frames += star.astype(np.float32)
    masks = np.zeros(frames.shape, bool)
    out = restore_frames(frames, masks, np.array([1.0, 0.9, 0.1, 0.8, 0.7, 0.6]),
                         np.full(6, 5.0), np.zeros(6), reference=0)
    assert list(out.frames) == [0, 1, 3, 4, 5]
    assert out.image.shape == (32, 40) and np.isfinite(out.image).all()
    # the star stays, with the stack's flux within a fifth
    assert out.image[16, 20] > 100.0
    box = np.s_[10:23, 14:27]
    assert np.sum(out.image[box]) == pytest.approx(np.sum(out.stack[box]), rel=0.2)
