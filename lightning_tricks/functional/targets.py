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

__all__ = [
    "CONVENTIONS",
    "check_index_targets",
    "smooth_soft",
    "smooth_targets",
    "soft_cross_entropy",
    "to_soft_targets",
]

CONVENTIONS = ("uniform", "others")


def check_index_targets(target: Tensor, num_classes: int, ignore_index: int | None = None) -> None:
    """Refuse float targets and, without a host-device sync, indices outside ``[0, num_classes)``.

    The range check is ``torch._assert_async``: on the CPU it raises at once (and the error then names the
    offending value); on an accelerator it is a device-side assertion that never stalls the step.
    """
    _check_integer(target, num_classes)
    try:
        torch._assert_async(_valid(target, num_classes, ignore_index).all(),
                            "lightning_tricks: a target index is outside [0, num_classes)")
    except RuntimeError:
        raise _range_error(target, num_classes, ignore_index) from None


def _check_integer(target: Tensor, num_classes: int) -> None:
    if target.is_floating_point() or target.is_complex():
        raise TypeError(
            f"expected class indices (an integer tensor) as targets, got a {target.dtype} tensor of shape "
            f"{tuple(target.shape)}; pass soft targets as a float tensor of shape (N, {num_classes})."
        )


def _valid(target: Tensor, num_classes: int, ignore_index: int | None) -> Tensor:
    valid = (target >= 0) & (target < num_classes)
    return valid | (target == ignore_index) if ignore_index is not None else valid


def _range_error(target: Tensor, num_classes: int, ignore_index: int | None) -> ValueError:
    """The error for out-of-range indices, built only once something failed (it reads the target)."""
    valid = _valid(target, num_classes, ignore_index)
    bad = target[~valid][0].item() if not bool(valid.all()) else "?"
    allowed = f"[0, {num_classes})" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
    hint = "" if ignore_index is not None else " (set `ignore_index` for padding/ignored samples)"
    return ValueError(f"target index {bad} is out of range: class indices must be in {allowed}{hint}.")


def to_soft_targets(target: Tensor, num_classes: int, ignore_index: int | None = None) -> Tensor:
    """Class indices ``(N,)`` to float32 one-hot rows ``(N, K)``; rows of ``ignore_index`` are all zero.

    Float targets of shape ``(N, K)`` are returned as float32 (the same tensor if already float32).
    Out-of-range indices are caught by the scatter itself: on the CPU a ``ValueError`` names the value; on an
    accelerator it is the scatter's device-side assertion (checking first would cost extra kernels or a sync).
    """
    if target.is_floating_point():
        if target.ndim == 1:
            _check_integer(target, num_classes)  # float where indices are expected: TypeError
        if target.ndim != 2 or target.shape[-1] != num_classes:
            raise ValueError(
                f"soft targets must have shape (N, {num_classes}), got {tuple(target.shape)}; "
                "class indices must be an integer tensor."
            )
        return target.float()
    _check_integer(target, num_classes)
    if target.ndim != 1:
        raise ValueError(f"class-index targets must have shape (N,), got {tuple(target.shape)}.")
    soft = torch.zeros(target.shape[0], num_classes, dtype=torch.float32, device=target.device)
    index: Tensor = target
    value: Tensor | float = 1.0
    if ignore_index is not None:
        active = target != ignore_index
        index = torch.where(active, target, 0)
        value = active.unsqueeze(1).float()
    try:
        soft.scatter_(1, index.unsqueeze(1), value)  # type: ignore[arg-type]
    except RuntimeError:
        raise _range_error(target, num_classes, ignore_index) from None
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

    Rows with zero mass (ignored samples) stay zero: the added term is scaled by each row's mass.

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
    # A row's mass is 1 for a sample and 0 for an ignored one; index targets without ignore_index are all 1.
    exact_rows = not target.is_floating_point() and ignore_index is None
    return smooth_soft(soft, smoothing, convention, rows_sum_to_one=exact_rows)


def smooth_soft(soft: Tensor, smoothing: float, convention: str = "uniform", rows_sum_to_one: bool = False) -> Tensor:
    """:func:`smooth_targets` for float32 ``(N, K)`` targets, without argument checks (for per-step callers that
    checked them once). Rows keep their mass: an all-zero (ignored) row stays zero unless ``rows_sum_to_one``."""
    num_classes = soft.shape[-1]
    mass: Tensor | float = 1.0 if rows_sum_to_one else soft.sum(dim=-1, keepdim=True)
    if convention == "uniform":
        keep, spread = 1.0 - smoothing, smoothing / num_classes
    else:  # (1 - eps) t + eps (m - t) / (K - 1) = t (1 - eps - eps / (K - 1)) + m eps / (K - 1)
        keep, spread = 1.0 - smoothing - smoothing / (num_classes - 1), smoothing / (num_classes - 1)
    if isinstance(mass, Tensor):
        return torch.add(soft * keep, mass, alpha=spread)
    return soft.mul(keep).add_(spread)


def soft_cross_entropy(logits: Tensor, target: Tensor, ignore_index: int | None = None) -> Tensor:
    r"""Cross-entropy against class indices or class probabilities, computed in float32.

    .. math:: \ell = \frac{-\sum_i \sum_k t_{ik} \log \mathrm{softmax}(z_i)_k}{\sum_i \sum_k t_{ik}}

    For soft targets the denominator is the total target mass: ``N`` when every row sums to 1 (then this is
    ``F.cross_entropy(logits.float(), target)``), and the number of active samples when ``ignore_index`` is given and
    ignored samples have all-zero rows (what :func:`smooth_targets` makes of them), so ignored samples contribute
    nothing and do not count in the mean. Index targets take ``F.cross_entropy`` (with ``ignore_index``). No host read.

    Args:
        logits: ``(N, K)`` scores of any float dtype (upcast to float32: no bf16 rounding of the loss).
        target: ``(N,)`` class indices or ``(N, K)`` probabilities.
        ignore_index: index of ignored samples, or ``None``.
    """
    logits = logits.float()
    if not target.is_floating_point():
        try:
            return F.cross_entropy(logits, target, ignore_index=-100 if ignore_index is None else ignore_index)
        except (IndexError, RuntimeError):
            raise _range_error(target, logits.shape[-1], ignore_index) from None
    if target.shape != logits.shape:
        raise ValueError(f"soft targets must have the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}.")
    if ignore_index is None:
        if logits.ndim != 2 or target.dtype != torch.float32 or logits.numel() == 0:
            return F.cross_entropy(logits, target.float())
        # -<log_softmax(z), t> / N as one dot product: the same value and, bit for bit, the same gradient as torch's
        # probability-target cross-entropy (tested), with four fewer kinds of kernels forward and backward.
        return torch.dot(F.log_softmax(logits, dim=-1).view(-1), target.reshape(-1)).div(-logits.shape[0])
    total = (target * F.log_softmax(logits, dim=-1)).sum()
    return -total / target.sum().clamp_min(1e-12)
