"""Datasets generated or shipped locally: MNIST-1D (``mnist1d``) and scikit-learn's digits. No download."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset


def mnist1d(seed: int = 42) -> tuple[TensorDataset, TensorDataset]:
    """MNIST-1D (Greydanus, 2020) made locally by ``mnist1d.data.make_dataset(get_dataset_args())``.

    4000 training and 1000 test sequences of length 40, 10 classes. The ``mnist1d`` package's download
    path is never used: there is no internet on these machines.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    data = make_dataset(args)
    train = TensorDataset(torch.as_tensor(data["x"], dtype=torch.float32).unsqueeze(1),
                          torch.as_tensor(data["y"], dtype=torch.long))
    test = TensorDataset(torch.as_tensor(data["x_test"], dtype=torch.float32).unsqueeze(1),
                         torch.as_tensor(data["y_test"], dtype=torch.long))
    return train, test


def digits(test_fraction: float = 0.25, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled 8x8 digits as ``(N, 1, 8, 8)`` images in [0, 1], split by a fixed permutation."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    order = torch.as_tensor(np.random.default_rng(seed).permutation(len(y)))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


class MNIST1DDataModule(pl.LightningDataModule):
    """MNIST-1D as a LightningDataModule (for ``LightningCLI``): train on the 4000 training sequences, validate and
    test on the 1000 test sequences, as the paper reports."""

    def __init__(self, batch_size: int = 100, seed: int = 42) -> None:
        super().__init__()
        self.batch_size, self.seed = batch_size, seed
        self.train: TensorDataset | None = None
        self.test: TensorDataset | None = None

    def setup(self, stage: str) -> None:
        if self.train is None:
            self.train, self.test = mnist1d(self.seed)

    def train_dataloader(self) -> DataLoader:
        assert self.train is not None
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        assert self.test is not None
        return DataLoader(self.test, batch_size=1000)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
