r"""Soft targets: label smoothing and a cross-entropy that takes class probabilities.

Two smoothing conventions exist and both are offered, by name:

* ``"uniform"`` (PyTorch's ``label_smoothing``, timm, the default): every class gets ``eps / K``, so the
  right class gets ``1 - eps + eps / K``. ``soft_cross_entropy(logits, smooth_targets(y, K, eps))``
  equals ``F.cross_entropy(logits, y, label_smoothing=eps)``.
* ``"others"`` (the guide's code): the ``K - 1`` wrong classes share ``eps``, each ``eps / (K - 1)``,
  and the right class gets exactly ``1 - eps``.

Both are affine maps of the target, ``s(t) = (1 - c) t + b``, so they commute with mixing (a convex
combination of targets): smoothing before or after mixup gives the same soft target, and a target
is smoothed exactly once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_tricks.functional._checks import check_choice, check_number

__all__ = ["CONVENTIONS", "check_index_targets", "smooth_targets", "soft_cross_entropy", "to_soft_targets"]

CONVENTIONS = ("uniform", "others")


def check_index_targets(target: Tensor, num_classes: int, ignore_index: int | None = None) -> None:
    """Refuse float targets and, without a host-device sync, indices outside ``[0, num_classes)``.

    The range check is ``torch._assert_async``: on the CPU it raises at once (and the error then names the
    offending value); on an accelerator it is a device-side assertion that never stalls the step.
    """
    if target.is_floating_point() or target.is_complex():
        raise TypeError(
            f"expected class indices (an integer tensor) as targets, got a {target.dtype} tensor of shape "
            f"{tuple(target.shape)}; pass soft targets as a float tensor of shape (N, {num_classes})."
        )
    valid = (target >= 0) & (target < num_classes)
    if ignore_index is not None:
        valid |= target == ignore_index
    try:
        # Raises at once on the CPU; on an accelerator it is queued on the device and never stalls the step.
        torch._assert_async(valid.all(), "lightning_tricks: a target index is outside [0, num_classes)")
    except RuntimeError:  # the CPU path: now that it failed, find the value to name (no cost when valid)
        bad = target[~valid][0].item()
        allowed = f"[0, {num_classes})" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
        raise ValueError(f"target index {bad} is out of range: class indices must be in {allowed}.") from None


def to_soft_targets(target: Tensor, num_classes: int, ignore_index: int | None = None) -> Tensor:
    """Class indices ``(N,)`` to float32 one-hot rows ``(N, K)``; rows of ``ignore_index`` are all zero.

    Float targets of shape ``(N, K)`` are returned as float32 unchanged (they are already soft).
    """
    if target.is_floating_point():
        if target.ndim == 1:
            check_index_targets(target, num_classes, ignore_index)  # float where indices are expected: TypeError
        if target.ndim != 2 or target.shape[-1] != num_classes:
            raise ValueError(
                f"soft targets must have shape (N, {num_classes}), got {tuple(target.shape)}; "
                "class indices must be an integer tensor."
            )
        return target.float()
    check_index_targets(target, num_classes, ignore_index)
    if target.ndim != 1:
        raise ValueError(f"class-index targets must have shape (N,), got {tuple(target.shape)}.")
    active = target != ignore_index if ignore_index is not None else None
    index = target.clamp(0, num_classes - 1) if active is not None else target
    soft = torch.zeros(target.shape[0], num_classes, dtype=torch.float32, device=target.device)
    soft.scatter_(1, index.unsqueeze(1), 1.0)
    if active is not None:
        soft.mul_(active.unsqueeze(1))
    return soft


def smooth_targets(
    target: Tensor,
    num_classes: int,
    smoothing: float,
    convention: str = "uniform",
    ignore_index: int | None = None,
) -> Tensor:
    r"""Label-smoothed float32 targets of shape ``(N, K)``.

    ``"uniform"``: :math:`s = (1 - \varepsilon)\,t + \varepsilon / K`.
    ``"others"``: :math:`s = (1 - \varepsilon)\,t + \varepsilon (1 - t) / (K - 1)`.

    Args:
        target: class indices ``(N,)`` or one-hot/soft targets ``(N, K)``.
        num_classes: ``K``.
        smoothing: ``eps`` in [0, 1).
        convention: ``"uniform"`` (PyTorch's) or ``"others"`` (the guide's code).
        ignore_index: index targets equal to it give an all-zero row (ignored by :func:`soft_cross_entropy`).
    """
    check_number("smoothing", smoothing, low=0.0, high=1.0, high_open=True)
    check_choice("convention", convention, CONVENTIONS)
    check_number("num_classes", num_classes, low=2 if convention == "others" else 1, integer=True)
    soft = to_soft_targets(target, num_classes, ignore_index)
    mass = soft.sum(dim=-1, keepdim=True)  # 1 for a real row, 0 for an ignored one: keep ignored rows at 0
    if convention == "uniform":
        return soft * (1.0 - smoothing) + mass * (smoothing / num_classes)
    return soft * (1.0 - smoothing) + (mass - soft) * (smoothing / (num_classes - 1))


def soft_cross_entropy(logits: Tensor, target: Tensor, ignore_index: int | None = None) -> Tensor:
    r"""Cross-entropy against class indices or class probabilities, computed in float32.

    .. math:: \ell = \frac{1}{|A|} \sum_{i \in A} -\sum_k t_{ik} \log \mathrm{softmax}(z_i)_k

    ``A`` is the set of active samples: all of them, except index targets equal to ``ignore_index`` or,
    when ``ignore_index`` is given, soft rows that are all zero (what :func:`smooth_targets` makes of an
    ignored index). Ignored samples contribute nothing and do not count in the mean. No host read.

    Args:
        logits: ``(N, K)`` scores of any float dtype (upcast to float32: no bf16 rounding of the loss).
        target: ``(N,)`` class indices or ``(N, K)`` probabilities.
        ignore_index: index of ignored samples, or ``None``.
    """
    logits = logits.float()
    if not target.is_floating_point():
        check_index_targets(target, logits.shape[-1], ignore_index)
        return F.cross_entropy(logits, target, ignore_index=-100 if ignore_index is None else ignore_index)
    if target.shape != logits.shape:
        raise ValueError(f"soft targets must have the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}.")
    per_sample = -(target.float() * F.log_softmax(logits, dim=-1)).sum(dim=-1)
    if ignore_index is None:
        return per_sample.mean()
    active = target.sum(dim=-1) > 0
    return (per_sample * active).sum() / active.sum().clamp_min(1)
