"""Datasets generated or shipped locally: MNIST-1D (``mnist1d``) and scikit-learn's digits. No download."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset


def mnist1d(seed: int = 42) -> tuple[TensorDataset, TensorDataset]:
    """MNIST-1D (Greydanus, 2020) made locally by ``mnist1d.data.make_dataset(get_dataset_args())``.

    4000 training and 1000 test sequences of length 40, 10 classes, generated on the spot: nothing is downloaded.
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


def mnist1d_splits(seed: int = 42, val_size: int = 500) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """MNIST-1D as ``(train, val, test)``: ``val_size`` sequences held out of the 4000 training ones by a fixed
    permutation (for model selection and early stopping), and the 1000 test sequences, to be used once at the end."""
    train, test = mnist1d(seed)
    x, y = train.tensors
    order = torch.as_tensor(np.random.default_rng(0).permutation(len(y)))
    val, rest = order[:val_size], order[val_size:]
    return TensorDataset(x[rest], y[rest]), TensorDataset(x[val], y[val]), test


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
    """MNIST-1D as a LightningDataModule (for ``LightningCLI``): train on 3500 of the training sequences, validate on
    the other 500 (:func:`mnist1d_splits`), test on the 1000 test sequences."""

    def __init__(self, batch_size: int = 100, seed: int = 42, val_size: int = 500) -> None:
        super().__init__()
        self.batch_size, self.seed, self.val_size = batch_size, seed, val_size
        self.train: TensorDataset | None = None
        self.val: TensorDataset | None = None
        self.test: TensorDataset | None = None

    def setup(self, stage: str) -> None:
        if self.train is None:
            self.train, self.val, self.test = mnist1d_splits(self.seed, self.val_size)

    def train_dataloader(self) -> DataLoader:
        assert self.train is not None
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        assert self.val is not None
        return DataLoader(self.val, batch_size=1000)

    def test_dataloader(self) -> DataLoader:
        assert self.test is not None
        return DataLoader(self.test, batch_size=1000)
