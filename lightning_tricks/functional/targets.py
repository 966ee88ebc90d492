r"""Label smoothing and mixing in the loss: a cross-entropy from class indices, and its soft-target reference.

:func:`cross_entropy` is what training uses: label smoothing and mixing applied to class-index targets of any
shape torch's cross-entropy takes, from one log-softmax, without building an ``(N, K)`` target. :func:`smooth_targets`,
:func:`to_soft_targets` and :func:`soft_cross_entropy` build the dense soft targets it is defined by (the reference
it is tested against).

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

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_tricks.functional._checks import check_choice, check_number
from lightning_tricks.functional.mixing import Mix

__all__ = [
    "CONVENTIONS",
    "TargetPlan",
    "class_dim_of",
    "cross_entropy",
    "smooth_targets",
    "soft_cross_entropy",
    "to_soft_targets",
]

CONVENTIONS = ("uniform", "others")
#: Logits up to this many elements get the dense target in :func:`cross_entropy` (4 MB of float32).
DENSE_MAX = 2**20
NO_INDEX = -(2**63)  # an ignore_index that no class index equals


@dataclass(frozen=True)
class TargetPlan:
    """What the tricks do to one batch's targets, applied in the loss (the targets themselves are never rewritten).

    Attributes:
        smoothing: label smoothing ``eps`` (0: none).
        convention: ``"uniform"`` or ``"others"`` (see :func:`smooth_targets`).
        mix: how the batch's samples were mixed (:class:`~lightning_tricks.functional.mixing.Mix`), or ``None``.
    """

    smoothing: float = 0.0
    convention: str = "uniform"
    mix: Mix | None = None

    def smoothed(self, smoothing: float, convention: str = "uniform") -> TargetPlan:
        """This plan with label smoothing ``smoothing`` (smoothing commutes with mixing: the order is free)."""
        return replace(self, smoothing=smoothing, convention=convention)

    def mixed(self, mix: Mix) -> TargetPlan:
        """This plan with the batch's samples mixed as ``mix`` says."""
        return replace(self, mix=mix)

    @property
    def is_identity(self) -> bool:
        """Whether the plan leaves the targets as they are."""
        return self.smoothing == 0.0 and self.mix is None

    def cross_entropy(self, logits: Tensor, target: Tensor, ignore_index: int | None = -100,
                      class_dim: int = 1) -> Tensor:
        """:func:`cross_entropy` of ``logits`` against ``target`` under this plan."""
        return cross_entropy(logits, target, smoothing=self.smoothing, convention=self.convention, mix=self.mix,
                             ignore_index=ignore_index, class_dim=class_dim)


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
    bad = target[~_valid(target, num_classes, ignore_index)]
    allowed = f"[0, {num_classes})" + ("" if ignore_index is None else f" (or ignore_index={ignore_index})")
    which = f"target class {int(bad[0])}" if bad.numel() else "a target class"
    return ValueError(
        f"{which} is out of range for logits of {num_classes} classes: class indices must be in {allowed}. Does the "
        "head have fewer outputs than the data has classes?"
    )


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
        soft.scatter_(1, index.unsqueeze(1), value)
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
    keep, spread = _smoothing_coefficients(smoothing, convention, num_classes)
    # Each row keeps its mass m (1 for a sample, 0 for an ignored one): s = keep * t + spread * m.
    return torch.add(soft * keep, soft.sum(dim=-1, keepdim=True), alpha=spread)


def _smoothing_coefficients(smoothing: float, convention: str, num_classes: int) -> tuple[float, float]:
    """``(keep, spread)`` of the affine map ``s = keep * t + spread * m`` (``m`` the row's mass)."""
    if convention == "uniform":
        return 1.0 - smoothing, smoothing / num_classes
    # (1 - eps) t + eps (m - t) / (K - 1) = t (1 - eps - eps / (K - 1)) + m eps / (K - 1)
    spread = smoothing / (num_classes - 1)
    return 1.0 - smoothing - spread, spread


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
        # probability-target cross-entropy (tested), in fewer kernels.
        return torch.dot(F.log_softmax(logits, dim=-1).view(-1), target.reshape(-1)).div(-logits.shape[0])
    total = (target * F.log_softmax(logits, dim=-1)).sum()
    return -total / target.sum().clamp_min(1e-12)


def class_dim_of(logits: Tensor, target: Tensor, class_dim: int | None = None) -> int:
    """The class dimension of ``logits`` for ``target``: 1 (PyTorch's layout) or the last (class-last logits).

    * class indices: ``(N, C, d1, ...)`` logits with ``(N, d1, ...)`` targets (torch's layout, dimension 1), or
      ``(N, d1, ..., C)`` with ``(N, d1, ...)`` (class-last, as a language model's head gives them);
    * class probabilities: the target has the logits' shape; the classes are on dimension 1.

    When both layouts fit (``(N, L, L)`` logits for ``(N, L)`` targets) ``class_dim`` must say which one it is.
    """
    shape, want = tuple(logits.shape), tuple(target.shape)
    if logits.ndim < 2:
        raise ValueError(f"logits need a batch and a class dimension, (N, C, ...), got shape {shape}.")
    if class_dim is not None:
        dim = class_dim % logits.ndim
        if dim not in (1, logits.ndim - 1):
            raise ValueError(f"`class_dim` must be 1 or -1 (the last), got {class_dim} for logits of shape {shape}.")
        fits = want == shape if target.is_floating_point() else want == shape[:dim] + shape[dim + 1:]
        if not fits:
            raise ValueError(f"targets of shape {want} do not fit logits of shape {shape} with classes on dimension "
                             f"{class_dim}.")
        return dim
    if target.is_floating_point():
        if want != shape:
            raise ValueError(
                f"float targets are class probabilities of the logits' shape {shape}, got {want}: class indices must "
                "be an integer tensor."
            )
        return 1
    first = want == shape[:1] + shape[2:]
    last = logits.ndim > 2 and want == shape[:-1]
    if first and last and shape[1] != shape[-1]:
        last = False  # the shapes say which; only equal sizes are ambiguous
    if first and last:
        raise ValueError(
            f"logits of shape {shape} fit targets of shape {want} with the classes on dimension 1 or on the last: "
            "say which, `tricks_loss(logits, y, class_dim=-1)` for class-last logits (a language model's head) or "
            "`class_dim=1` for PyTorch's (N, C, d1, ...) layout."
        )
    if first:
        return 1
    if last:
        return logits.ndim - 1
    raise ValueError(
        f"logits of shape {shape} do not fit class-index targets of shape {want}: the targets must be the logits' "
        "shape without the class dimension, (N, C) with (N,), (N, C, d1, ...) with (N, d1, ...) as for "
        "F.cross_entropy, or class-last (N, L, C) with (N, L)."
    )


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    smoothing: float = 0.0,
    convention: str = "uniform",
    mix: Mix | None = None,
    ignore_index: int | None = -100,
    class_dim: int = 1,
) -> Tensor:
    r"""Cross-entropy against label-smoothed, mixed targets, computed from class indices in float32.

    The value is the cross-entropy against the dense soft target
    :math:`q = w\, s(y) + (1 - w)\, s(y_{\pi})` (``s`` the smoothing, ``π`` the mixing partner, ``w`` the sample's
    own weight: ``mix.lam``, or ``mix.region`` per position for dense targets), averaged over the positions that
    count, without building ``q``: cross-entropy is linear in the target, so with :math:`p = \log\mathrm{softmax}(z)`
    the loss of position ``i`` is

    .. math:: \ell_i = -a \bigl(w\, m_i\, p_{i, y_i} + (1 - w)\, m'_i\, p_{i, y_{\pi(i)}}\bigr)
                       - b\, (w\, m_i + (1 - w)\, m'_i) \sum_k p_{ik}

    with ``m`` (``m'``) 1 where the target (the partner's target) is not ``ignore_index``, ``a = 1 - eps`` and
    ``b = eps / K`` (``"uniform"``, PyTorch's convention) or ``a = 1 - eps - eps / (K - 1)`` and
    ``b = eps / (K - 1)`` (``"others"``, the guide's). The mean divides by the total weight of the positions that
    count, :math:`\sum_i w m_i + (1 - w) m'_i`: the number of non-ignored positions without mixing, as
    ``F.cross_entropy`` does. Without mixing and with the uniform convention this is
    ``F.cross_entropy(logits, target, label_smoothing=smoothing, ignore_index=ignore_index)`` itself.

    Args:
        logits: ``(N, C, d1, ...)`` scores (or class-last ``(N, d1, ..., C)`` with ``class_dim=-1``), any float dtype.
        target: class indices of the logits' shape without the class dimension, or class probabilities of the
            logits' shape (then ``q`` is built densely: the target is dense already).
        smoothing: ``eps`` in [0, 1).
        convention: ``"uniform"`` or ``"others"``.
        mix: the batch's :class:`~lightning_tricks.functional.mixing.Mix`, or ``None``.
        ignore_index: index targets equal to it count nowhere (``None``: every position counts).
        class_dim: the logits' class dimension (see :func:`class_dim_of`).
    """
    dim = class_dim % logits.ndim
    num_classes = logits.shape[dim]
    if target.is_floating_point():
        return _dense_cross_entropy(logits, target.float(), None, smoothing, convention, mix, dim)
    if mix is None and (smoothing == 0.0 or (convention == "uniform" and logits.numel() > DENSE_MAX)):
        # torch's own kernel: exactly F.cross_entropy's value, and no memory beyond what it allocates itself
        if dim != 1:  # class-last: the same mean over positions, on a (positions, C) view
            logits, target = logits.reshape(-1, num_classes), target.reshape(-1)
        try:
            # ignore_index=None: no value is ignored (torch's argument is an int: one no index can equal)
            return F.cross_entropy(logits.float(), target, label_smoothing=smoothing,
                                   ignore_index=NO_INDEX if ignore_index is None else ignore_index)
        except (IndexError, RuntimeError):
            raise _range_error(target, num_classes, ignore_index) from None
    try:
        if logits.numel() <= DENSE_MAX:
            # Small logits (classification): the dense target costs little memory and runs fewer kernels than
            # the gathers (benchmarks/results/cpu-2026-12-06/seam.md).
            return _one_hot_cross_entropy(logits, target, smoothing, convention, mix, ignore_index, dim)
        return _index_cross_entropy(logits, target, smoothing, convention, mix, ignore_index, dim)
    except (IndexError, RuntimeError):
        if not bool(_valid(target, num_classes, ignore_index).all()):  # read only once something failed
            raise _range_error(target, num_classes, ignore_index) from None
        raise


def _one_hot_cross_entropy(logits: Tensor, target: Tensor, smoothing: float, convention: str, mix: Mix | None,
                           ignore_index: int | None, dim: int) -> Tensor:
    """:func:`cross_entropy` through the dense target, built from the indices (a scatter, which refuses
    out-of-range indices on every device)."""
    q = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    index = target.unsqueeze(dim)
    if ignore_index is None:
        q.scatter_(dim, index, 1.0)
        return _dense_cross_entropy(logits, q, 1.0, smoothing, convention, mix, dim)
    active = index != ignore_index
    mass = active.float()  # 1 for a position that counts, 0 for an ignored one
    q.scatter_(dim, index * active, mass)  # an ignored position scatters 0 into class 0
    return _dense_cross_entropy(logits, q, mass, smoothing, convention, mix, dim)


def _index_cross_entropy(logits: Tensor, target: Tensor, smoothing: float, convention: str, mix: Mix | None,
                         ignore_index: int | None, dim: int) -> Tensor:
    """:func:`cross_entropy`'s general form: one log-softmax, one gather per target (the formula there)."""
    num_classes = logits.shape[dim]
    keep, spread = _smoothing_coefficients(smoothing, convention, num_classes) if smoothing else (1.0, 0.0)
    log_p = F.log_softmax(logits.float(), dim=dim)
    active = None if ignore_index is None else target != ignore_index
    index = target if active is None else target.masked_fill(~active, 0)

    def picked(idx: Tensor) -> Tensor:  # log p of each position's target class
        return log_p.gather(dim, idx.unsqueeze(dim)).squeeze(dim)

    weight: Tensor | None
    if mix is None:  # the "others" convention, unmixed
        weight = None if active is None else active.float()
        hit = picked(index) if weight is None else picked(index) * weight
    else:
        own = _mix_weight(mix, target)
        partner = index.index_select(0, mix.index)
        if active is None:
            hit = torch.lerp(picked(partner), picked(index), own)
            weight = None
        else:
            w_self = own * active
            w_partner = (1.0 - own) * active.index_select(0, mix.index)
            hit = picked(index) * w_self + picked(partner) * w_partner
            weight = w_self + w_partner
    total = hit.sum() * keep
    if spread:
        row = log_p.sum(dim)
        total = total + spread * (row.sum() if weight is None else (row * weight).sum())
    count = float(target.numel()) if weight is None else weight.sum().clamp_min(1e-12)
    return -total / count


def _mix_weight(mix: Mix, target: Tensor) -> Tensor | float:
    """Each target position's own weight: ``lam`` per sample, or the input region for dense targets."""
    if mix.index.shape[0] != target.shape[0]:
        raise ValueError(
            f"the batch was mixed over {mix.index.shape[0]} samples but the loss got {target.shape[0]} targets: pass "
            "the batch's own targets (mixing pairs samples within the batch)."
        )
    if target.ndim > 1 and mix.region is not None:
        region = mix.region.squeeze(1)  # (N or 1, *spatial), the inputs' channel dimension dropped
        if tuple(region.shape[1:]) != tuple(target.shape[1:]):
            raise ValueError(
                f"CutMix pasted boxes over input positions {tuple(region.shape[1:])} but the targets have positions "
                f"{tuple(target.shape[1:])}: a box carries its labels only when the targets are at the inputs' "
                "resolution. Use MixUp alone (`Mixup(cutmix_alpha=0)`) or targets of the inputs' size."
            )
        return region.to(torch.float32)
    lam = mix.lam
    if isinstance(lam, Tensor):
        return lam.to(torch.float32).reshape(-1, *([1] * (target.ndim - 1)))
    return float(lam)


def _dense_cross_entropy(logits: Tensor, q: Tensor, mass: Tensor | float | None, smoothing: float, convention: str,
                         mix: Mix | None, dim: int) -> Tensor:
    """The cross-entropy against the dense float32 target ``q``, smoothed and mixed densely.

    ``mass`` is each position's target mass: a tensor (0 where a class index is ignored) makes the mean run over
    the mass of the positions that count, as ``F.cross_entropy`` does for ignored indices; ``1.0`` (indices, none
    ignored) and ``None`` (class probabilities, whose mass is read from ``q``) divide by the number of positions.
    """
    if smoothing:
        keep, spread = _smoothing_coefficients(smoothing, convention, logits.shape[dim])
        if isinstance(mass, float):
            q = q.mul_(keep).add_(spread * mass)
        else:
            q = torch.add(q * keep, q.sum(dim=dim, keepdim=True) if mass is None else mass, alpha=spread)
    if mix is not None:
        own = _mix_weight(mix, q.select(dim, 0))  # the weight of each target position (without the classes)
        if isinstance(own, Tensor):
            own = own.unsqueeze(dim)
        q = q.index_select(0, mix.index).lerp_(q, own)
    log_p = F.log_softmax(logits.float(), dim=dim)
    if not isinstance(mass, Tensor):
        return torch.dot(log_p.reshape(-1), q.reshape(-1)).div(-(q.numel() // q.shape[dim]))
    # the total target mass: smoothing keeps each position's, mixing moves it between samples
    return torch.dot(log_p.reshape(-1), q.reshape(-1)).div(-q.sum().clamp_min(1e-12))
