"""Plain ``nn.Module`` parts of the dual-input exposure classifier.

Two views of an exposure meet in one head:

- the **SOM view**: the occupancy map (share of the exposure's stars on each node of the
  self-organizing map), read by a small CNN on the map grid, and the occupancy-weighted
  mean and spread of the node prototypes (a 2-channel "representative star" image), read
  by a small CNN on the stamp grid. Tracking errors make the mean star elongated; optical
  aberrations, which point different ways over the field, show as spread instead.
- the **feature view**: measured quantities in physical, scale-free units
  (``models.classifier_features.FEATURE_NAMES``), standardised with constants from the
  training split, with missing values replaced by the training mean and flagged.

The modules hold no training logic; ``models.classifier_system.ClassifierSystem`` trains
them.
"""
from __future__ import annotations

import torch
from torch import nn


class OccupancyBranch(nn.Module):
    """A small CNN on the ``(gx, gy)`` occupancy map; node position matters, so no pooling.

    Parameters
    ----------
    grid
        ``(gx, gy)`` of the SOM.
    channels
        Convolution channels.
    out_features
        Size of the output embedding.
    """

    def __init__(self, grid: tuple[int, int], channels: int = 16, out_features: int = 32):
        super().__init__()
        gx, gy = grid
        self.net = nn.Sequential(
            nn.Conv2d(1, channels // 2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels // 2, channels, 3, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(channels * gx * gy, out_features), nn.ReLU())

    def forward(self, occupancy: torch.Tensor) -> torch.Tensor:
        """``(B, gx, gy)`` -> ``(B, out_features)``."""
        return self.net(occupancy.unsqueeze(1))


class PrototypeImageBranch(nn.Module):
    """A small CNN on the occupancy-weighted mean and spread of the SOM prototypes.

    Parameters
    ----------
    n_nodes, stamp_shape
        Number of SOM nodes and ``(h, w)`` of a prototype; the prototypes themselves
        are a buffer (set with :meth:`set_prototypes`, saved with the weights).
    channels
        Channels of the two convolution stages.
    out_features
        Size of the output embedding.
    """

    def __init__(self, n_nodes: int, stamp_shape: tuple[int, int],
                 channels: tuple[int, int] = (16, 32), out_features: int = 32):
        super().__init__()
        self.register_buffer("prototypes", torch.zeros(n_nodes, *stamp_shape))
        c1, c2 = channels
        self.net = nn.Sequential(
            nn.Conv2d(2, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(), nn.Linear(4 * c2, out_features), nn.ReLU())

    def set_prototypes(self, prototypes: torch.Tensor) -> None:
        """Copy ``(n_nodes, h, w)`` SOM prototypes into the buffer."""
        self.prototypes.copy_(torch.as_tensor(prototypes, dtype=self.prototypes.dtype))

    def representative_image(self, occupancy: torch.Tensor) -> torch.Tensor:
        """``(B, gx, gy)`` occupancy -> ``(B, 2, h, w)``: weighted mean and spread."""
        w = occupancy.flatten(1)
        mean = torch.einsum("bn,nhw->bhw", w, self.prototypes)
        second = torch.einsum("bn,nhw->bhw", w, self.prototypes ** 2)
        spread = torch.sqrt(torch.clamp(second - mean ** 2, min=0.0) + 1e-6)
        return torch.stack([mean, spread], dim=1)

    def forward(self, occupancy: torch.Tensor) -> torch.Tensor:
        """``(B, gx, gy)`` -> ``(B, out_features)``."""
        return self.net(self.representative_image(occupancy))


class FeatureBranch(nn.Module):
    """An MLP on standardised features, with a missing-value indicator per feature.

    Parameters
    ----------
    n_features
        Length of the raw feature vector (NaN where not measured).
    hidden, out_features
        Layer sizes.
    """

    def __init__(self, n_features: int, hidden: int = 32, out_features: int = 32):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))
        self.net = nn.Sequential(
            nn.Linear(2 * n_features, hidden), nn.ReLU(),
            nn.Linear(hidden, out_features), nn.ReLU())

    def set_standardisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Set the constants (from the training split); a zero spread counts as one."""
        mean = torch.as_tensor(mean, dtype=self.feature_mean.dtype)
        std = torch.as_tensor(std, dtype=self.feature_std.dtype)
        self.feature_mean.copy_(torch.nan_to_num(mean, nan=0.0))
        std = torch.nan_to_num(std, nan=1.0)
        self.feature_std.copy_(torch.where(std > 0, std, torch.ones_like(std)))

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, F)`` raw -> ``(B, 2F)``: standardised values (0 where missing), then
        the missing indicators."""
        missing = ~torch.isfinite(features)
        z = (features - self.feature_mean) / self.feature_std
        z = torch.where(missing, torch.zeros_like(z), z).clamp(-10.0, 10.0)
        return torch.cat([z, missing.to(z.dtype)], dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, F)`` -> ``(B, out_features)``."""
        return self.net(self.standardise(features))


class DualInputClassifier(nn.Module):
    """SOM occupancy map + measured features -> logits of the quality classes.

    Parameters
    ----------
    grid
        ``(gx, gy)`` of the SOM.
    stamp_shape
        ``(h, w)`` of a SOM prototype, in pixels.
    n_features
        Length of the raw feature vector.
    n_classes
        Number of classes (5).
    embed
        Size of each branch's embedding.
    hidden
        Width of the fused head.
    dropout
        Dropout before the last layer.

    Notes
    -----
    ``temperature`` (a buffer, 1 until calibration) divides the logits in
    :meth:`probabilities`; :meth:`forward` returns the raw logits used in training.
    """

    def __init__(self, grid: tuple[int, int], stamp_shape: tuple[int, int], n_features: int,
                 n_classes: int = 5, embed: int = 32, hidden: int = 64, dropout: float = 0.2):
        super().__init__()
        self.arch = {"grid": [int(g) for g in grid],
                        "stamp_shape": [int(s) for s in stamp_shape],
                        "n_features": int(n_features), "n_classes": int(n_classes),
                        "embed": int(embed), "hidden": int(hidden), "dropout": float(dropout)}
        self.occupancy_branch = OccupancyBranch(tuple(grid), out_features=embed)
        self.prototype_branch = PrototypeImageBranch(int(grid[0]) * int(grid[1]),
                                                     tuple(stamp_shape), out_features=embed)
        self.feature_branch = FeatureBranch(n_features, out_features=embed)
        self.head = nn.Sequential(nn.Linear(3 * embed, hidden), nn.ReLU(),
                                  nn.Dropout(dropout), nn.Linear(hidden, n_classes))
        self.register_buffer("temperature", torch.ones(1))

    def forward(self, occupancy: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``(B, gx, gy)``, ``(B, F)`` -> ``(B, n_classes)`` raw logits."""
        parts = [self.occupancy_branch(occupancy), self.prototype_branch(occupancy),
                 self.feature_branch(features)]
        return self.head(torch.cat(parts, dim=1))

    def probabilities(self, occupancy: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities: softmax of the logits over ``temperature``."""
        return torch.softmax(self(occupancy, features) / self.temperature, dim=1)
