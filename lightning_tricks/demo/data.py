"""Datasets generated or shipped locally: MNIST-1D (``mnist1d``) and scikit-learn's digits. No download."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset


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
