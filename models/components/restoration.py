"""A small U-Net that turns K registered frames of a field into one clean image.

The input is ``(batch, K + 1, H, W)``: the quality-weighted stack of the K frames first,
then the K frames (all registered and scaled onto the reference, in a normalised,
asinh-compressed scale, see :mod:`survey_qa.models.restoration`). The output is the
stack's channel plus a predicted correction, ``(batch, 1, H, W)``: an untrained network
starts from the stack. H and W must be multiples of :attr:`RestorationUNet.stride`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class RestorationArch:
    """Architecture of :class:`RestorationUNet`.

    Attributes
    ----------
    n_frames
        K, the registered frames the network combines.
    widths
        Channels at each resolution, finest first; ``len(widths) - 1`` halvings.
    """

    n_frames: int = 5
    widths: tuple[int, ...] = (16, 32, 64)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> RestorationArch:
        return cls(n_frames=int(d["n_frames"]), widths=tuple(int(w) for w in d["widths"]))


def _block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 convolutions with LeakyReLU (size preserved)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.LeakyReLU(0.1),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.LeakyReLU(0.1))


class RestorationUNet(nn.Module):
    """U-Net with skip connections predicting a correction to the stack channel."""

    def __init__(self, arch: RestorationArch = RestorationArch()) -> None:
        super().__init__()
        self.arch = arch
        w = arch.widths
        self.down = nn.ModuleList([_block(arch.n_frames + 1, w[0])]
                                  + [_block(w[i], w[i + 1]) for i in range(len(w) - 1)])
        self.pool = nn.AvgPool2d(2)
        self.up = nn.ModuleList([nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2)
                                 for i in range(len(w) - 1)])
        self.merge = nn.ModuleList([_block(2 * w[i], w[i]) for i in range(len(w) - 1)])
        self.head = nn.Conv2d(w[0], 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def stride(self) -> int:
        """Image sides must be multiples of this."""
        return 2 ** (len(self.arch.widths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, K + 1, H, W)`` -> ``(B, 1, H, W)``: ``x[:, :1]`` plus the correction."""
        if x.shape[1] != self.arch.n_frames + 1:
            raise ValueError(f"expected {self.arch.n_frames + 1} channels, got {x.shape[1]}")
        if x.shape[-1] % self.stride or x.shape[-2] % self.stride:
            raise ValueError(f"image sides {tuple(x.shape[-2:])} are not multiples of "
                             f"{self.stride}")
        skips = []
        h = x
        for i, block in enumerate(self.down):
            h = block(h if i == 0 else self.pool(h))
            skips.append(h)
        for i in reversed(range(len(self.up))):
            h = self.merge[i](torch.cat([self.up[i](h), skips[i]], dim=1))
        return x[:, :1] + self.head(h)


def n_parameters(model: nn.Module) -> int:
    """Trainable parameters of a network."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
