"""The reference CNN of the MNIST-1D paper, as a LightningModule using :class:`TricksMixin`."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tricks.mixin import TricksMixin


class ConvBase(nn.Module):
    """MNIST-1D's ConvBase: three strided Conv1d layers of 25 channels and a linear head (5,210 parameters)."""

    def __init__(self, output_size: int = 10, channels: int = 25, length: int = 40) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        out = length
        for k in (5, 3, 3):
            out = (out + 2 - k) // 2 + 1
        self.linear = nn.Linear(channels * out, output_size)

    def forward(self, x: Tensor) -> Tensor:
        x = x.view(x.shape[0], 1, x.shape[-1])
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.linear(x.flatten(1))


class Classifier(TricksMixin, pl.LightningModule):
    """A classifier of ``num_classes`` classes trained with AdamW through the mixin's default steps."""

    def __init__(self, net: nn.Module, lr: float = 1e-2, weight_decay: float = 0.01, num_classes: int = 10) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"],
                                 weight_decay=self.hparams["weight_decay"])


class ConvBaseClassifier(Classifier):
    """:class:`Classifier` around a :class:`ConvBase` of ``channels`` channels: all its hyperparameters are plain
    values, so ``load_from_checkpoint`` rebuilds it from a checkpoint alone (e.g. as a distillation teacher)."""

    def __init__(self, channels: int = 25, lr: float = 1e-2, weight_decay: float = 0.01) -> None:
        super().__init__(ConvBase(channels=channels), lr=lr, weight_decay=weight_decay)
        self.save_hyperparameters()


class ResidualBlock1d(nn.Module):
    """Conv-BN-ReLU-Conv-BN with an identity shortcut; ``drop_path`` marks the branch for :func:`add_drop_path`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(channels)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(channels)
        self.drop_path: nn.Module = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        branch = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(x + self.drop_path(branch))

    def zero_init_last(self) -> None:
        """Start the block as the identity (``init_weights(..., zero_init_residual=True)``)."""
        nn.init.zeros_(self.bn2.weight)


class ResConv1d(nn.Module):
    """A small 1D ResNet for MNIST-1D: a strided stem, ``depth`` residual blocks, global average pooling, a linear
    head. Its layers from the bottom: ``stem``, ``blocks.0`` ... ``blocks.{depth-1}``, ``head``."""

    def __init__(self, output_size: int = 10, channels: int = 32, depth: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(1, channels, 5, stride=2, padding=2, bias=False), nn.BatchNorm1d(channels),
                                  nn.ReLU())
        self.blocks = nn.Sequential(*[ResidualBlock1d(channels) for _ in range(depth)])
        self.head = nn.Linear(channels, output_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x.view(x.shape[0], 1, x.shape[-1])))
        return self.head(x.mean(dim=-1))
