r"""MixUp and CutMix: deterministic mixing, plus the samplers that draw its randomness.

Convention (everywhere in this package): ``lam`` is the weight of sample ``i`` itself and
``1 - lam`` that of its partner ``index[i]``:

.. math:: \tilde x_i = \lambda x_i + (1 - \lambda)\, x_{\mathrm{index}[i]}, \qquad
          \tilde t_i = \lambda t_i + (1 - \lambda)\, t_{\mathrm{index}[i]}

CutMix pastes the partner's pixels inside a box and sets ``lam`` to the area left to sample ``i``:
``lam = 1 - |box| / |image|``. A box is one half-open ``(start, stop)`` range per spatial dimension:
``((l0, l1),)`` for ``(N, C, L)`` inputs, ``((y0, y1), (x0, x1))`` for ``(N, C, H, W)``. Bounds are
ints (one box for the batch) or ``(N,)`` integer tensors (one box per sample).

The mixing functions are pure and never modify their inputs. The samplers take a NumPy
``Generator`` so that a caller can draw on the host without touching the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Box",
    "Mix",
    "box_lambda",
    "box_mask",
    "cutmix",
    "mix_pair",
    "mixup",
    "sample_box",
    "sample_lambda",
]

Bound = int | Tensor
Box = Sequence[tuple[Bound, Bound]]


@dataclass(frozen=True)
class Mix:
    """What mixing did to a batch, for the loss: which partner each sample was mixed with, and with what weight.

    Attributes:
        index: ``(N,)`` partner of each sample (an integer tensor on the batch's device).
        lam: weight of each sample's own target, a float or ``(N,)``: the MixUp weight, or for CutMix the area
            left to the sample (what a per-sample target such as a class gets).
        region: weight of each sample's own values per input position (1 where it kept its own, 0 where its
            partner's were pasted, ``lam`` for MixUp samples), broadcastable to the inputs ``(N or 1, 1, *spatial)``;
            ``None`` when it is ``lam`` at every position. Dense targets (one per position: segmentation, sequences)
            take their weights from it, as a pasted box carries its pixels' labels.
    """

    index: Tensor
    lam: float | Tensor
    region: Tensor | None = None


def _per_sample(lam: float | Tensor, like: Tensor) -> float | Tensor:
    """Broadcast an ``(N,)`` weight over the trailing dimensions of ``like``; floats pass through."""
    if isinstance(lam, Tensor):
        return lam.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))
    return float(lam)


def mix_pair(t: Tensor, lam: float | Tensor, index: Tensor) -> Tensor:
    """``lam * t + (1 - lam) * t[index]`` with ``lam`` a float or one weight per sample ``(N,)``.

    One gather and one fused ``lerp`` kernel, in place on the gathered copy:
    ``t.index_select(0, index).lerp_(t, lam)`` (``index_select``: the gather of ``t[index]`` without Python's
    indexing machinery).
    """
    return t.index_select(0, index).lerp_(t, _per_sample(lam, t))


def mixup(x: Tensor, soft_target: Tensor, lam: float | Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """MixUp (Zhang et al., 2018): blend every sample with its partner ``index[i]``.

    Args:
        x: floating inputs ``(N, ...)``.
        soft_target: ``(N, K)`` probabilities (see ``smooth_targets``/``to_soft_targets``).
        lam: weight of sample ``i`` itself, a float or an ``(N,)`` tensor.
        index: ``(N,)`` partner of each sample, e.g. a permutation.

    Returns:
        ``(mixed_x, mixed_soft_target)``, new tensors.
    """
    return mix_pair(x, lam, index), mix_pair(soft_target, lam, index)


def _bound(b: Bound, device: torch.device) -> Tensor:
    return b.to(device).reshape(-1, 1) if isinstance(b, Tensor) else torch.full((1, 1), int(b), device=device)


def box_mask(x: Tensor, box: Box) -> Tensor:
    """Boolean mask, broadcastable to ``x``, that is True inside the box (one box or one per sample)."""
    spatial = x.shape[2:]
    if len(box) != len(spatial):
        raise ValueError(
            f"`box` needs one (start, stop) range per spatial dimension: {len(spatial)} for an input of shape "
            f"{tuple(x.shape)}, got {len(box)}."
        )
    mask: Tensor | None = None
    for dim, ((start, stop), size) in enumerate(zip(box, spatial)):
        pos = torch.arange(size, device=x.device).reshape(1, size)
        inside = (pos >= _bound(start, x.device)) & (pos < _bound(stop, x.device))
        shape = [inside.shape[0], 1] + [size if d == dim else 1 for d in range(len(spatial))]
        inside = inside.reshape(shape)
        mask = inside if mask is None else mask & inside
    assert mask is not None
    return mask


def box_lambda(x: Tensor, box: Box) -> float | Tensor:
    """Fraction of each sample left outside the box: ``1 - area(box) / area(x)`` (float or ``(N,)``)."""
    spatial = x.shape[2:]
    area: float | Tensor = 1.0
    for (start, stop), size in zip(box, spatial):
        side = stop - start
        area = area * (side.to(torch.float32) if isinstance(side, Tensor) else float(side)) / size
    return 1.0 - area


def cutmix(x: Tensor, soft_target: Tensor, box: Box, index: Tensor) -> tuple[Tensor, Tensor]:
    """CutMix (Yun et al., 2019): paste the partner's pixels inside ``box``; mix targets by area.

    Returns ``(mixed_x, mixed_soft_target)``; the targets use ``lam = 1 - area(box) / area(x)``, the
    area-corrected weight of sample ``i`` itself.
    """
    mixed = torch.where(box_mask(x, box), x[index], x)
    lam = box_lambda(x, box)
    if isinstance(lam, Tensor):
        lam = lam.to(soft_target.device)
    return mixed, mix_pair(soft_target, lam, index)


def sample_lambda(rng: np.random.Generator, alpha: float, size: int | None = None) -> float | np.ndarray:
    """Draw ``lam ~ Beta(alpha, alpha)`` on the host (one float, or ``size`` of them)."""
    lam = rng.beta(alpha, alpha, size=size)
    return float(lam) if size is None else lam.astype(np.float32)


def sample_box(
    rng: np.random.Generator,
    spatial: Sequence[int],
    lam: float | np.ndarray,
    minmax: tuple[float, float] | None = None,
    size: int | None = None,
) -> list[tuple[int, int]] | list[tuple[np.ndarray, np.ndarray]]:
    """Draw a CutMix box on the host, as timm's ``rand_bbox``/``rand_bbox_minmax`` do, in any dimension.

    Without ``minmax``: each side is ``int(L * (1 - lam) ** (1 / d))`` for ``d`` spatial dimensions,
    centred uniformly and clipped to the input (clipping shrinks the box: use :func:`box_lambda` for the
    true area). With ``minmax=(lo, hi)``: each side is uniform in ``[int(L * lo), int(L * hi))`` and the
    box lies fully inside. ``size`` draws one box per sample (``lam`` then has ``size`` entries).
    """
    d = len(spatial)
    box: list[Any] = []
    for length in spatial:
        if minmax is not None:
            low = int(length * minmax[0])
            side = rng.integers(low, max(int(length * minmax[1]), low + 1), size=size)
            start = rng.integers(0, length - side + 1, size=size)
            stop = start + side
        else:
            ratio = np.power(1.0 - np.asarray(lam, dtype=np.float64), 1.0 / d)
            side = (length * ratio).astype(np.int64)
            centre = rng.integers(0, length, size=size)
            start = np.clip(centre - side // 2, 0, length)
            stop = np.clip(centre + side // 2, 0, length)
        if size is None:
            box.append((int(start), int(stop)))
        else:
            box.append((np.asarray(start, dtype=np.int64), np.asarray(stop, dtype=np.int64)))
    return box
