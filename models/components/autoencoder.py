"""A small convolutional autoencoder for sky patches (after Jia et al. 2024).

Plain ``nn.Module`` building blocks, no training logic. The encoder brings a patch of
``patch_px`` x ``patch_px`` normalised sky down ``n_down`` times by 2 to a narrow latent
map; the decoder brings it back. Instance normalisation removes each patch's own mean
level from the features, and reflect padding keeps patch borders from leaking it back,
so the network cannot copy a constant sky offset through: a patch that sits above or
below the frame's sky level (clouds, scattered light, a gradient) is reconstructed at
the level of good sky, and its reconstruction error shows the defect.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class AutoencoderArch:
    """Architecture hyper-parameters: everything needed to rebuild the network.

    Attributes
    ----------
    space_to_depth
        The patch is first folded into ``space_to_depth ** 2`` channels of a grid that
        many times coarser (pixel unshuffle), so that no convolution runs at full
        resolution: this keeps CPU scoring fast.
    base_channels
        Feature channels after the fold; doubled at every down-sampling.
    latent_channels
        Channels of the latent map at the bottleneck.
    n_down
        Down-sampling steps by 2 after the fold.
    n_res
        Residual blocks at every resolution of the encoder and of the decoder.
    """

    space_to_depth: int = 4
    base_channels: int = 32
    latent_channels: int = 8
    n_down: int = 1
    n_res: int = 1

    def __post_init__(self):
        for name in ("space_to_depth", "base_channels", "latent_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.n_down < 0 or self.n_res < 0:
            raise ValueError("n_down and n_res must not be negative")

    @property
    def reduction(self) -> int:
        """Side of the patch area that one latent cell stands for (pixels)."""
        return self.space_to_depth * 2 ** self.n_down

    def to_dict(self) -> dict:
        """Plain mapping for JSON metadata and Lightning hyper-parameters."""
        return asdict(self)


def _conv(in_ch: int, out_ch: int, kernel: int = 3) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, padding_mode="reflect")


def _norm(channels: int) -> nn.InstanceNorm2d:
    return nn.InstanceNorm2d(channels, affine=True)


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with instance normalisation and an identity skip.

    Parameters
    ----------
    channels
        Input and output channels.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            _conv(channels, channels), _norm(channels), nn.LeakyReLU(0.1),
            _conv(channels, channels), _norm(channels))
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class Encoder(nn.Module):
    """Patch (N, 1, H, W) to latent map (N, latent_channels, H / r, W / r).

    ``r`` is :attr:`AutoencoderArch.reduction`.

    Parameters
    ----------
    arch
        Architecture hyper-parameters.
    """

    def __init__(self, arch: AutoencoderArch):
        super().__init__()
        c = arch.base_channels
        layers: list[nn.Module] = [nn.PixelUnshuffle(arch.space_to_depth),
                                   _conv(arch.space_to_depth ** 2, c), _norm(c),
                                   nn.LeakyReLU(0.1)]
        layers += [ResidualBlock(c) for _ in range(arch.n_res)]
        for _ in range(arch.n_down):
            layers += [nn.Conv2d(c, 2 * c, 2, stride=2), _norm(2 * c), nn.LeakyReLU(0.1)]
            c *= 2
            layers += [ResidualBlock(c) for _ in range(arch.n_res)]
        layers += [nn.Conv2d(c, arch.latent_channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """Latent map back to a patch (N, 1, H, W): the mirror image of :class:`Encoder`.

    Parameters
    ----------
    arch
        Architecture hyper-parameters.
    """

    def __init__(self, arch: AutoencoderArch):
        super().__init__()
        c = arch.base_channels * 2 ** arch.n_down
        layers: list[nn.Module] = [nn.Conv2d(arch.latent_channels, c, 1), _norm(c),
                                   nn.LeakyReLU(0.1)]
        for _ in range(arch.n_down):
            layers += [ResidualBlock(c) for _ in range(arch.n_res)]
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(c, c // 2),
                       _norm(c // 2), nn.LeakyReLU(0.1)]
            c //= 2
        layers += [ResidualBlock(c) for _ in range(arch.n_res)]
        layers += [_conv(c, arch.space_to_depth ** 2), nn.PixelShuffle(arch.space_to_depth)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class ConvAutoencoder(nn.Module):
    """Encoder and decoder together: ``forward(x)`` is the reconstruction of ``x``.

    Parameters
    ----------
    arch
        Architecture hyper-parameters (defaults: about 0.2 M parameters).
    """

    def __init__(self, arch: AutoencoderArch | None = None):
        super().__init__()
        self.arch = arch or AutoencoderArch()
        self.encoder = Encoder(self.arch)
        self.decoder = Decoder(self.arch)

    def check_patch_px(self, patch_px: int) -> None:
        """Raise ``ValueError`` unless patches of this side fit the architecture.

        The side must be a multiple of :attr:`AutoencoderArch.reduction` and leave a
        latent map of at least 2 x 2 cells (instance normalisation needs more than one).
        """
        r = self.arch.reduction
        if patch_px % r or patch_px // r < 2:
            raise ValueError(f"patch_px={patch_px} must be a multiple of {r} and at "
                             f"least {2 * r} for this architecture")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))
