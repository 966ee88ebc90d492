r"""Weight averaging: the decay of an exponential moving average, and fused in-place updates of averaged tensors.

EMA after update :math:`n` (:math:`n = 1` is the first):

.. math:: \bar w_1 = w_1, \qquad \bar w_n = d_n\,\bar w_{n-1} + (1 - d_n)\,w_n

with a constant :math:`d_n = d`, or with timm's warmup (``ModelEmaV3(use_warmup=True)``, power :math:`p = 2/3`):

.. math:: d_n = \min\bigl(d,\; 1 - n^{-p}\bigr) \quad (n \ge 2), \qquad d_1 = 0

which averages the first updates almost equally and reaches :math:`d` after :math:`(1 - d)^{-1/p}` updates (31.6k
for 0.999). A half-life of :math:`h` updates is :math:`d = 0.5^{1/h}`.

SWA (equal weights from a starting point): :math:`\bar w_n = \bar w_{n-1} + (w_n - \bar w_{n-1}) / n`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_tricks.functional._checks import check_number

__all__ = ["decay_from_half_life", "ema_decay", "ema_update_", "swa_update_"]


def decay_from_half_life(half_life: float) -> float:
    """The per-update decay whose weight halves every ``half_life`` updates: ``0.5 ** (1 / half_life)``."""
    check_number("half_life", half_life, low=0.0, low_open=True)
    return 0.5 ** (1.0 / half_life)


def ema_decay(update: int, decay: float, warmup: bool = True, power: float = 2 / 3) -> float:
    """The decay of EMA update number ``update`` (1 for the first, which copies the weights: decay 0).

    With ``warmup`` it is ``min(decay, 1 - update ** -power)`` from the second update on, as timm's ``ModelEmaV3``
    with ``use_warmup=True`` (``warmup_gamma=1``) called with ``step=update``; else ``decay``.
    """
    if update <= 1:
        return 0.0
    if not warmup:
        return decay
    return min(decay, 1.0 - (1.0 + (update - 1)) ** -power)


def _lerp_(averages: Sequence[Tensor], values: Sequence[Tensor], weight: float) -> None:
    """``avg += weight * (value - avg)`` in place, fused (one ``_foreach_lerp_``); values are cast to the averages'
    dtype and moved to their device (float32 averages of low-precision weights keep every update; averages in host
    memory take device weights)."""
    if not averages:
        return
    if any(v.dtype != a.dtype or v.device != a.device for a, v in zip(averages, values)):
        values = [v.to(a.device, a.dtype) for a, v in zip(averages, values)]
    with torch.no_grad():
        torch._foreach_lerp_(list(averages), list(values), weight)


def ema_update_(averages: Sequence[Tensor], values: Sequence[Tensor], decay: float) -> None:
    """``avg = decay * avg + (1 - decay) * value`` in place, fused."""
    _lerp_(averages, values, 1.0 - decay)


def swa_update_(averages: Sequence[Tensor], values: Sequence[Tensor], count: int) -> None:
    """The equal-weight running mean after ``count`` values (``count`` >= 1 includes this one), in place, fused."""
    _lerp_(averages, values, 1.0 / count)
