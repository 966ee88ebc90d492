"""Reading and writing the learning rates of optimizers' param groups: the one writer of ``group["lr"]`` (used by
:class:`WarmupCosine`, :class:`SWA`, :class:`LRScaling`, :class:`LRFinder` and the LR sweep)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.optim import Optimizer

__all__ = ["read_lrs", "scale_lrs", "write_lrs"]


def read_lrs(optimizers: Sequence[Optimizer]) -> list[list[float]]:
    """The lr of every param group, per optimizer."""
    return [[float(group["lr"]) for group in opt.param_groups] for opt in optimizers]


def write_lrs(optimizers: Sequence[Optimizer], lrs: Sequence[Sequence[float]], factor: float = 1.0) -> None:
    """Set the lr of every param group to ``lrs[optimizer][group] * factor``."""
    for opt, values in zip(optimizers, lrs, strict=True):
        for group, lr in zip(opt.param_groups, values, strict=True):
            group["lr"] = lr * factor


def scale_lrs(optimizers: Sequence[Optimizer], schedulers: Sequence[Any], factor: float) -> None:
    """Multiply the lr of every param group by ``factor`` (ratios kept), with the ``initial_lr`` torch's schedulers
    keep and their ``base_lrs``, so a schedule built earlier follows."""
    write_lrs(optimizers, read_lrs(optimizers), factor)
    for opt in optimizers:
        for group in opt.param_groups:
            if "initial_lr" in group:
                group["initial_lr"] *= factor
    for scheduler in schedulers:
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [b * factor for b in scheduler.base_lrs]
