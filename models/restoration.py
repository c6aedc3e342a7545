"""Multi-frame restoration: K registered frames of a field in, one clean image out.

Data
----
A training or evaluation sample (:class:`Window`) is K consecutive frames of a simulated
sequence (:mod:`survey_qa.simulate.sequence`), prepared as ``survey-qa stack`` prepares
frames (:mod:`survey_qa.pipeline.stack`): each frame's sky is measured
(:func:`~survey_qa.pipeline.background.measure_background`) and subtracted, the reference
is the sharpest of the clearest frames (:func:`~survey_qa.pipeline.stack.choose_reference`),
and every frame is resampled onto the reference's pixels
(:func:`~survey_qa.pipeline.stack.resample`) and scaled to its photometry. The
registration is exact: its transform comes from the simulator's pointings and its
throughput from the true fluxes of the stars the frames share (:func:`register_window`),
so that every combination compared starts from the same frames; the weights
(:func:`~survey_qa.pipeline.stack.quality_weights`) use the measured sky noise and the true
FWHM. The window keeps the quality-weighted
stack and the equal-weight stack of its frames (:func:`~survey_qa.pipeline.stack.combine`,
3-sigma clipping) and the target: the noiseless, sky-free image of the scene in the
reference's pixels with the reference's PSF and grey extinction
(:func:`survey_qa.simulate.noiseless.noiseless_frame`).

Network scale
-------------
Images enter the network as ``asinh(adu / noise_ref)``, ``noise_ref`` the reference
frame's sky noise (scaled, ADU): linear in the noise, logarithmic in the bright cores.
Channel 0 is the quality-weighted stack, then the K frames by decreasing weight; a
masked pixel of a frame takes the stack's value. The network predicts a correction to
channel 0 (:class:`~survey_qa.models.components.restoration.RestorationUNet`); the loss is
the mean squared difference from the target in the same scale, over random crops (an L1
loss, whose optimum is the median, dims the faint stars).

Split
-----
Samples of one sequence (one night of one field) stay on one side:
:func:`~survey_qa.models.splits.split_by_night_and_exposure` holds out whole nights.
Seeds :data:`TRAIN_SEEDS` train; :data:`HELD_OUT_SEEDS` are for ``bench/restoration.py`` only.

Command line::

    python -m survey_qa.models.restoration data  --work DIR
    python -m survey_qa.models.restoration train --work DIR --output WEIGHTS

(``models/train_restoration.sh`` runs both with the shipped settings.)
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset

from survey_qa.config import Config
from survey_qa.models.components.restoration import (RestorationArch, RestorationUNet,
                                                     n_parameters)
from survey_qa.models.splits import split_by_night_and_exposure
from survey_qa.pipeline import stack
from survey_qa.pipeline.background import measure_background

K_FRAMES = 5
"""Frames combined by the shipped network."""
TRAIN_SEEDS = tuple(range(6001, 6017))
"""Sequence seeds the shipped network trains and validates on."""
HELD_OUT_SEEDS = tuple(range(7001, 7007))
"""Sequence seeds never used in training: ``bench/restoration.py`` evaluates on them."""
SIZE_PX = 384
"""Side of the simulated frames."""
FRAMES_PER_SEQUENCE = 17
"""Frames of each simulated night."""
WINDOW_STEP = 3
"""Start of one window to the next (frames)."""
EDGE_PX = 8
"""Border left out of crops and evaluation regions."""
SPLIT_METHOD = "night_count"


# ---------------------------------------------------------------------------- data


@dataclass
class Window:
    """K frames of one field on the reference's pixels, their stacks and the truth (ADU).

    Attributes
    ----------
    frames, masks
        ``(K, ny, nx)``: sky-subtracted frames scaled to the reference photometry, and
        True where a frame has no value (outside it, saturated, masked).
    weights, noise_adu
        ``(K,)`` quality weights and sky noise of the scaled frames.
    stack, mean
        Quality-weighted and equal-weight clipped stacks (NaN where no frame).
    truth
        Noiseless image of the scene in the reference's pixels (reference PSF).
    noise_ref
        Sky noise of the reference frame (ADU): the network's unit.
    night, seed, exposures, reference
        Where the window comes from; ``reference`` indexes ``exposures``.
    """

    frames: np.ndarray
    masks: np.ndarray
    weights: np.ndarray
    noise_adu: np.ndarray
    stack: np.ndarray
    mean: np.ndarray
    truth: np.ndarray
    noise_ref: float
    night: str
    seed: int
    exposures: list[str]
    reference: int

    @property
    def valid(self) -> np.ndarray:
        """Pixels every frame covers, away from the border by :data:`EDGE_PX`."""
        ok = ~self.masks.any(axis=0) & np.isfinite(self.stack) & np.isfinite(self.mean)
        ok = ndimage.binary_erosion(ok, iterations=EDGE_PX, border_value=0)
        return ok

    def save(self, path: str | Path) -> None:
        """Write the window to a ``.npz`` file (arrays only, no pickle)."""
        np.savez_compressed(
            path, frames=self.frames, masks=self.masks, weights=self.weights,
            noise_adu=self.noise_adu, stack=self.stack, mean=self.mean, truth=self.truth,
            noise_ref=np.float64(self.noise_ref), night=np.str_(self.night),
            seed=np.int64(self.seed), exposures=np.array(self.exposures, dtype=np.str_),
            reference=np.int64(self.reference))

    @classmethod
    def load(cls, path: str | Path) -> Window:
        """Read a window written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as d:
            return cls(frames=d["frames"], masks=d["masks"], weights=d["weights"],
                       noise_adu=d["noise_adu"], stack=d["stack"], mean=d["mean"],
                       truth=d["truth"], noise_ref=float(d["noise_ref"]),
                       night=str(d["night"]), seed=int(d["seed"]),
                       exposures=[str(e) for e in d["exposures"]],
                       reference=int(d["reference"]))


@dataclass
class _Frame:
    """One rendered frame, sky subtracted, with its true stars and pointing."""

    data: np.ndarray
    mask: np.ndarray
    noise_adu: float
    gain: float
    fwhm_px: float
    stars: pd.DataFrame  # star_id, flux_adu (as observed)
    pointing_matrix: np.ndarray  # 3 x 3: scene reference pixels -> frame pixels


def pointing_matrix(pointing, nx: int, ny: int) -> np.ndarray:
    """The 3 x 3 affine matrix of :meth:`Pointing.apply` (reference -> frame pixels)."""
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    c = math.cos(math.radians(pointing.rotation_deg))
    s = math.sin(math.radians(pointing.rotation_deg))
    rot = np.array([[c, -s], [s, c]])
    out = np.eye(3)
    out[:2, :2] = rot
    out[:2, 2] = np.array([cx, cy]) - rot @ np.array([cx, cy]) + [pointing.shift_x_px,
                                                                    pointing.shift_y_px]
    return out


def _prepare_frame(seq, index: int, cfg: Config) -> _Frame:
    from survey_qa.simulate.sequence import render_frame

    spec, det = render_frame(seq, index)
    data = det.image
    mask = ~np.isfinite(data) | (data >= 0.999 * spec.saturate_adu)
    mask = ndimage.binary_dilation(mask, iterations=2)
    sky = measure_background(data, mask, cfg.background)
    sub = (data - sky.back).astype(np.float32)
    return _Frame(sub, mask, float(sky.noise), float(spec.gain_e_per_adu),
                  float(det.truth["fwhm_px_true"]), det.stars[["star_id", "flux_adu"]].copy(),
                  pointing_matrix(seq.frames[index].pointing, spec.nx, spec.ny))


def combine_window(frames: np.ndarray, masks: np.ndarray, weights: np.ndarray,
                   noise_adu: np.ndarray, poisson_adu: np.ndarray) -> np.ndarray:
    """The clipped weighted stack of registered frames (as ``survey-qa stack`` makes it)."""
    return stack.combine(frames, masks, weights, noise_adu, poisson_adu).image


def _throughput(frame: _Frame, ref: _Frame) -> float:
    """Median flux ratio frame / reference of the stars both hold (NaN: none)."""
    both = frame.stars.merge(ref.stars, on="star_id", suffixes=("", "_ref"))
    ratio = (both["flux_adu"] / both["flux_adu_ref"]).to_numpy()
    ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
    return float(np.median(ratio)) if ratio.size else math.nan


def register_window(prepared: list[_Frame]) -> tuple[int, list[stack.Registration]]:
    """Reference index and every frame's registration onto it.

    The transforms come from the simulator's pointings and the throughputs from the true
    fluxes of the stars two frames share, so that every method compared sees the same,
    exact registration (star matching on these small, sparse frames fails in most
    windows). The reference is chosen as ``survey-qa stack`` chooses it
    (:func:`~survey_qa.pipeline.stack.choose_reference`).
    """
    t = np.array([_throughput(f, prepared[0]) for f in prepared])
    if not np.all(np.isfinite(t) & (t > 0)):
        raise ValueError("a frame shares no star with the first frame")
    ref = stack.choose_reference(t, np.array([f.fwhm_px for f in prepared]))
    out = []
    for f, ti in zip(prepared, t):
        matrix = prepared[ref].pointing_matrix @ np.linalg.inv(f.pointing_matrix)
        out.append(stack.Registration(matrix=matrix, n_matched=len(f.stars),
                                      throughput=float(ti / t[ref])))
    return ref, out


def make_window(seq, start: int, k: int = K_FRAMES, cfg: Config | None = None,
                prepared: dict[int, _Frame] | None = None) -> Window:
    """The window of frames ``start .. start + k - 1`` of a planned sequence.

    Parameters
    ----------
    seq
        :class:`survey_qa.simulate.sequence.Sequence`.
    start, k
        First frame and number of frames.
    cfg
        Configuration (its background block); default :class:`Config`.
    prepared
        Cache of rendered frames by index, shared between overlapping windows.

    Raises ``ValueError`` when a frame cannot be registered.
    """
    from survey_qa.simulate.noiseless import noiseless_frame

    cfg = cfg or Config()
    prepared = {} if prepared is None else prepared
    idx = list(range(start, start + k))
    for i in idx:
        if i not in prepared:
            prepared[i] = _prepare_frame(seq, i, cfg)
    fr = [prepared[i] for i in idx]
    ref, regs = register_window(fr)
    shape = fr[ref].data.shape
    data = np.zeros((k, *shape), np.float32)
    masks = np.ones((k, *shape), bool)
    for j, (f, r) in enumerate(zip(fr, regs)):
        d, m = stack.resample(f.data, f.mask, r.matrix, shape)
        data[j], masks[j] = d / r.throughput, m
    thr = np.array([r.throughput for r in regs])
    noise = np.array([f.noise_adu for f in fr])
    gain = np.array([f.gain for f in fr])
    weights = stack.quality_weights(thr, noise, np.array([f.fwhm_px for f in fr]))
    if not (weights > 0).all():
        raise ValueError("a frame has no quality weight")
    scaled_noise = noise / thr
    poisson = 1.0 / (thr * gain)
    quality = combine_window(data, masks, weights, scaled_noise, poisson)
    mean = combine_window(data, masks, np.ones(k), scaled_noise, poisson)
    truth = noiseless_frame(seq, start + ref)
    return Window(frames=data, masks=masks, weights=weights, noise_adu=scaled_noise,
                  stack=quality, mean=mean, truth=truth, noise_ref=float(scaled_noise[ref]),
                  night=seq.night, seed=int(seq.seed), exposures=[seq.exposure(i) for i in idx],
                  reference=int(ref))


def night_of(seed: int) -> str:
    """The simulated night of a sequence seed (the 2025 date of the seed modulo 1000).

    The date only labels the sequence: its field and conditions come from the seed, so
    the held-out seeds 7001-7006 share dates with the training seeds 6001-6006 but no
    field and no conditions; the split is by seed.
    """
    day = pd.Timestamp("2025-01-01") + pd.Timedelta(days=int(seed) % 1000)
    return day.strftime("%Y-%m-%d")


def sequence_windows(seed: int, *, n_frames: int = FRAMES_PER_SEQUENCE,
                     size_px: int = SIZE_PX, k: int = K_FRAMES, step: int = WINDOW_STEP
                     ) -> list[Window]:
    """Every window (``k`` frames, starts ``step`` apart) of one simulated night; windows
    whose frames do not register are left out."""
    from survey_qa.simulate.sequence import plan_sequence

    seq = plan_sequence(night_of(seed), n_frames, seed=seed, size_px=size_px)
    cache: dict[int, _Frame] = {}
    out = []
    for start in range(0, n_frames - k + 1, step):
        try:
            out.append(make_window(seq, start, k, prepared=cache))
        except ValueError as e:
            print(f"seed {seed} frames {start}-{start + k - 1} left out: {e}", file=sys.stderr)
    return out


def write_windows(work: str | Path, seeds: tuple[int, ...] | list[int], **kwargs) -> list[Path]:
    """Simulate the nights of ``seeds`` and write their windows to ``<work>/windows/``."""
    folder = Path(work) / "windows"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        for j, w in enumerate(sequence_windows(seed, **kwargs)):
            path = folder / f"seed{seed}_w{j:02d}.npz"
            w.save(path)
            paths.append(path)
    return paths


def read_windows(work: str | Path) -> list[Window]:
    """Every window written under ``<work>/windows/`` (sorted by file name)."""
    return [Window.load(p) for p in sorted((Path(work) / "windows").glob("*.npz"))]


# ---------------------------------------------------------------------------- scale


def to_network(adu: np.ndarray, noise_ref: float) -> np.ndarray:
    """ADU -> the network's scale, ``asinh(adu / noise_ref)``."""
    return np.arcsinh(np.asarray(adu, np.float64) / noise_ref).astype(np.float32)


def from_network(value: np.ndarray, noise_ref: float) -> np.ndarray:
    """The network's scale -> ADU."""
    return (np.sinh(np.asarray(value, np.float64)) * noise_ref).astype(np.float32)


def network_input(frames: np.ndarray, masks: np.ndarray, weights: np.ndarray,
                  stack_adu: np.ndarray, noise_ref: float) -> np.ndarray:
    """``(K + 1, ny, nx)`` input: the stack, then the frames by decreasing weight, masked
    pixels filled from the stack (and the stack's own holes with 0)."""
    fill = np.nan_to_num(stack_adu, nan=0.0)
    order = np.argsort(-np.asarray(weights), kind="stable")
    chans = [fill] + [np.where(masks[i], fill, frames[i]) for i in order]
    return to_network(np.stack(chans), noise_ref)


def window_input(w: Window) -> np.ndarray:
    """:func:`network_input` of a window."""
    return network_input(w.frames, w.masks, w.weights, w.stack, w.noise_ref)


# ---------------------------------------------------------------------------- datasets


def _crop_corners(valid: np.ndarray, crop_px: int) -> np.ndarray:
    """``(n, 2)`` top-left corners (y, x) of the crops that lie wholly in ``valid``."""
    ok = ndimage.minimum_filter(valid.astype(np.uint8), size=crop_px, mode="constant",
                                origin=(-(crop_px // 2), -(crop_px // 2))) > 0
    ny, nx = valid.shape
    ok[ny - crop_px + 1:, :] = False
    ok[:, nx - crop_px + 1:] = False
    return np.argwhere(ok)


class CropDataset(Dataset):
    """Random crops of windows (input, target), flipped and turned at random.

    Parameters
    ----------
    windows
        The windows.
    crop_px
        Crop side (a multiple of the network's stride).
    n_crops
        Crops per epoch.
    seed
        None: a fresh draw each time from torch's generator (training: reproducible after
        ``seed_everything``); an integer: fixed crops (validation).
    """

    def __init__(self, windows: list[Window], crop_px: int, n_crops: int,
                 seed: int | None = None) -> None:
        self.inputs = [window_input(w) for w in windows]
        self.targets = [to_network(w.truth, w.noise_ref)[None] for w in windows]
        self.corners = [_crop_corners(w.valid, crop_px) for w in windows]
        usable = [i for i, c in enumerate(self.corners) if len(c)]
        if not usable:
            raise ValueError(f"no window has a valid {crop_px} px crop")
        self.usable, self.crop_px, self.n_crops, self.seed = usable, crop_px, n_crops, seed

    def __len__(self) -> int:
        return self.n_crops

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        draw = int(torch.randint(2 ** 31 - 1, ())) if self.seed is None else self.seed
        rng = np.random.default_rng([draw, item])
        i = self.usable[int(rng.integers(len(self.usable)))]
        y, x = self.corners[i][int(rng.integers(len(self.corners[i])))]
        c = self.crop_px
        a = self.inputs[i][:, y:y + c, x:x + c]
        b = self.targets[i][:, y:y + c, x:x + c]
        turns, flip = int(rng.integers(4)), bool(rng.integers(2))
        a, b = np.rot90(a, turns, axes=(1, 2)), np.rot90(b, turns, axes=(1, 2))
        if flip:
            a, b = a[:, :, ::-1], b[:, :, ::-1]
        return torch.from_numpy(a.copy()), torch.from_numpy(b.copy())


def split_windows(windows: list[Window], val_fraction: float, seed: int
                  ) -> tuple[list[Window], list[Window]]:
    """Training and validation windows; every night (sequence) on one side only."""
    table = pd.DataFrame({"night": [w.night for w in windows],
                          "exposure": [w.exposures[w.reference] for w in windows]})
    train, val = split_by_night_and_exposure(table, val_fraction, seed, method=SPLIT_METHOD)
    return [windows[i] for i in train], [windows[i] for i in val]


class WindowDataModule(L.LightningDataModule):
    """Crops of training and validation windows, split by night."""

    def __init__(self, windows: list[Window], *, crop_px: int, crops_per_epoch: int,
                 batch_size: int, val_fraction: float, seed: int) -> None:
        super().__init__()
        self.train_windows, self.val_windows = split_windows(windows, val_fraction, seed)
        self.crop_px, self.crops_per_epoch = crop_px, crops_per_epoch
        self.batch_size, self.seed = batch_size, seed

    def train_dataloader(self) -> DataLoader:
        ds = CropDataset(self.train_windows, self.crop_px, self.crops_per_epoch)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        ds = CropDataset(self.val_windows, self.crop_px, max(self.crops_per_epoch // 8, 32),
                         seed=self.seed)
        return DataLoader(ds, batch_size=self.batch_size)


# ---------------------------------------------------------------------------- system


class RestorationSystem(L.LightningModule):
    """The U-Net trained with the squared error in the network scale (Adam, cosine
    schedule)."""

    def __init__(self, arch: RestorationArch = RestorationArch(),
                 learning_rate: float = 1e-3) -> None:
        super().__init__()
        self.net = RestorationUNet(arch)
        self.learning_rate = learning_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _loss(self, batch) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", self._loss(batch), prog_bar=True)
        self.log("val_loss_stack", torch.nn.functional.mse_loss(x[:, :1], y))

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.learning_rate)
        steps = max(int(self.trainer.estimated_stepping_batches), 1)
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(
                    opt, steps), "interval": "step"}}


# ---------------------------------------------------------------------------- inference


@torch.no_grad()
def restore(net: RestorationUNet, frames: np.ndarray, masks: np.ndarray,
            weights: np.ndarray, stack_adu: np.ndarray, noise_ref: float) -> np.ndarray:
    """The network's image (ADU) of K registered, scaled frames and their weighted stack.

    The image is padded by reflection to a multiple of the network's stride and cropped
    back; pixels where the stack has no value stay NaN.
    """
    x = network_input(frames, masks, weights, stack_adu, noise_ref)
    ny, nx = x.shape[1:]
    s = net.stride
    py, px = (-ny) % s, (-nx) % s
    x = np.pad(x, ((0, 0), (0, py), (0, px)), mode="reflect")
    net.eval()
    y = net(torch.from_numpy(x)[None])[0, 0, :ny, :nx].numpy()
    out = from_network(y, noise_ref)
    return np.where(np.isfinite(stack_adu), out, np.nan).astype(np.float32)


def restore_window(net: RestorationUNet, w: Window) -> np.ndarray:
    """:func:`restore` of a window."""
    return restore(net, w.frames, w.masks, w.weights, w.stack, w.noise_ref)


# ---------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainSettings:
    """What the shipped training uses (``models/train_restoration.sh``)."""

    max_epochs: int = 30
    crops_per_epoch: int = 1024
    crop_px: int = 64
    batch_size: int = 16
    learning_rate: float = 2e-3
    val_fraction: float = 0.2
    seed: int = 0
    widths: tuple[int, ...] = (16, 32, 64)


def train(work: str | Path, output: str | Path, settings: TrainSettings = TrainSettings()
          ) -> Path:
    """Train on the windows under ``work`` and write the weights (safetensors + JSON)."""
    from survey_qa.models import trainer as tr
    from survey_qa.models.weights import load_checkpoint_state, save_restoration

    t0 = time.monotonic()
    L.seed_everything(settings.seed, workers=True, verbose=False)
    torch.set_num_threads(1)
    windows = read_windows(work)
    if not windows:
        raise ValueError(f"no windows under {work}/windows (run the data step first)")
    k = windows[0].frames.shape[0]
    cfg = Config()
    cfg.train = dataclasses.replace(cfg.train, accelerator="cpu", devices=1,
                                    max_epochs=settings.max_epochs,
                                    checkpoint_dir="checkpoints-restoration")
    cfg.run = dataclasses.replace(cfg.run, progress=False)
    dm = WindowDataModule(windows, crop_px=settings.crop_px,
                          crops_per_epoch=settings.crops_per_epoch,
                          batch_size=settings.batch_size, val_fraction=settings.val_fraction,
                          seed=settings.seed)
    system = RestorationSystem(RestorationArch(n_frames=k, widths=settings.widths),
                               settings.learning_rate)
    ckpt = tr.checkpoint_dir(cfg, work, "restoration")
    if (ckpt / "last.ckpt").exists():
        (ckpt / "last.ckpt").unlink()  # a fresh training every time
    trainer = tr.make_trainer(cfg, ckpt, has_validation=True,
                              train_batches=settings.crops_per_epoch // settings.batch_size)
    tr.fit_resuming(trainer, system, dm, ckpt)
    best = tr.best_checkpoint(trainer)
    if best is not None:
        system.load_state_dict(load_checkpoint_state(best))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    info = {"train_nights": sorted({w.night for w in dm.train_windows}),
            "val_nights": sorted({w.night for w in dm.val_windows}),
            "train_seeds": sorted({w.seed for w in dm.train_windows}),
            "val_seeds": sorted({w.seed for w in dm.val_windows}),
            "n_train_windows": len(dm.train_windows), "n_val_windows": len(dm.val_windows),
            "settings": dataclasses.asdict(settings), "final_metrics": metrics,
            "best_checkpoint": best.name if best else "", "n_parameters":
            n_parameters(system.net), "train_seconds": round(time.monotonic() - t0, 1),
            "command": tr.command_line(), "recipe": tr.recipe()}
    return save_restoration(system.net, output, info)


# ---------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """``data`` (simulate the windows) or ``train`` (fit and write the weights)."""
    p = argparse.ArgumentParser(prog="python -m survey_qa.models.restoration",
                                description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    d = sub.add_parser("data", help="simulate the training nights and write their windows")
    d.add_argument("--work", required=True)
    d.add_argument("--seeds", default=f"{TRAIN_SEEDS[0]}-{TRAIN_SEEDS[-1]}",
                   help="first-last sequence seeds (default the shipped training seeds)")
    t = sub.add_parser("train", help="train on the windows and write the weights")
    t.add_argument("--work", required=True)
    t.add_argument("--output", required=True)
    t.add_argument("--max-epochs", type=int, default=TrainSettings.max_epochs)
    args = p.parse_args(argv)
    if args.step == "data":
        lo, hi = (int(s) for s in args.seeds.split("-"))
        seeds = list(range(lo, hi + 1))
        clash = set(seeds) & set(HELD_OUT_SEEDS)
        if clash:
            raise SystemExit(f"seeds {sorted(clash)} are held out for the benchmark")
        paths = write_windows(args.work, seeds)
        print(f"{len(paths)} windows from {len(seeds)} nights under {args.work}/windows")
    else:
        out = train(args.work, args.output, TrainSettings(max_epochs=args.max_epochs))
        print(f"weights: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
