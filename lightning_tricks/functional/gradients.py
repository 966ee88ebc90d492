r"""Gradient statistics with fused kernels, kept on the device.

Lightning's ``grad_norm`` loops over parameters in Python and reads every norm back to the host (one
host-device sync per parameter). Here the per-tensor norms come from one ``torch._foreach_norm`` call
and are reduced per group with one ``index_add_`` over a group index built once
(:class:`GradientLayout`), so a step adds a handful of kernel launches and no host read.

Group norm (2-norm over all gradient entries of the group's parameters):

.. math:: \|g\|_G = \sqrt{\textstyle\sum_{p \in G} \|g_p\|_2^2}, \qquad \|g\| = \sqrt{\textstyle\sum_G \|g\|_G^2}

Update-to-weight ratio of a group (the size of the step relative to the weights, for plain SGD):
``lr * ||g||_G / ||w||_G``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["GradientLayout", "grad_stats", "group_norms", "nonfinite_count", "total_norm"]


@dataclass
class GradientLayout:
    """Which group each trainable parameter belongs to; built once per fit.

    Attributes:
        names: group names (``"conv1"``, ``"layer1.0"``, ``"head.weight"``, ...).
        params: trainable parameters, in ``module.named_parameters()`` order.
        group_of: for each parameter, the index of its group (host list; see :meth:`index_on`).
    """

    names: list[str]
    params: list[nn.Parameter]
    group_of: list[int]

    @classmethod
    def from_module(cls, module: nn.Module, by: str | int = "module", include_frozen: bool = False) -> GradientLayout:
        """Group trainable parameters by top-level submodule (``"module"``), one group per parameter
        (``"parameter"``), or by the first ``by`` components of the owning module's name (an int depth).

        Depths count from below any wrapper that holds every parameter (``self.net = ...`` in a
        LightningModule): ``"module"`` gives ``net.conv1``, ``net.conv2``, ... rather than one group ``net``.
        ``include_frozen`` also takes the parameters that do not require a gradient now (unfrozen later).
        """
        if by == "module":
            depth = 1
        elif by == "parameter":
            depth = None
        elif isinstance(by, int) and not isinstance(by, bool) and by >= 1:
            depth = by
        else:
            raise ValueError(f"`group_by` must be 'module', 'parameter' or an int depth >= 1, got {by!r}.")
        named = [(name, p) for name, p in module.named_parameters() if include_frozen or p.requires_grad]
        owners = [name.split(".")[:-1] for name, _ in named]
        common = 0  # components shared by every owner: a wrapper around the whole model
        while owners and all(len(o) > common for o in owners) and len({o[common] for o in owners}) == 1:
            common += 1
        names: list[str] = []
        group_of: list[int] = []
        for (name, _), owner in zip(named, owners):
            group = name if depth is None else ".".join(owner[: common + depth]) or name
            if group not in names:
                names.append(group)
            group_of.append(names.index(group))
        return cls(names, [p for _, p in named], group_of)

    def index_on(self, device: torch.device) -> Tensor:
        """The group index as a long tensor on ``device`` (build once, reuse every step)."""
        return torch.tensor(self.group_of, dtype=torch.long, device=device)


def total_norm(tensors: Sequence[Tensor]) -> Tensor:
    """Global 2-norm of a list of tensors, fused, in float32 (``torch.nn.utils.get_total_norm``)."""
    norms = torch._foreach_norm(list(tensors))
    return torch.linalg.vector_norm(torch.stack(norms).float())


def group_norms(tensors: Sequence[Tensor], index: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Per-group and global 2-norms of ``tensors`` (one per parameter), as float32 device tensors.

    Returns ``(norms_per_group (G,), per_tensor_norms (P,))``.
    """
    per_tensor = torch.stack(torch._foreach_norm(list(tensors))).float()
    sq = torch.zeros(num_groups, dtype=torch.float32, device=per_tensor.device)
    sq.index_add_(0, index, per_tensor * per_tensor)
    return sq.sqrt(), per_tensor


def nonfinite_count(tensors: Sequence[Tensor]) -> Tensor:
    """Number of NaN/inf entries over all tensors (one kernel per tensor: for reports, not every step)."""
    counts = [(~torch.isfinite(t)).sum() for t in tensors]
    return torch.stack(counts).sum() if counts else torch.zeros((), dtype=torch.long)


def grad_stats(
    layout: GradientLayout,
    index: Tensor,
    lrs: Sequence[float] | None = None,
    scale: Tensor | float | None = None,
) -> dict[str, Tensor]:
    """All statistics for one step, as device tensors (no host read).

    Args:
        layout: the parameter grouping.
        index: ``layout.index_on(device)``.
        lrs: one lr per group for the update ratio (``None`` skips it).
        scale: divide gradients by this (the loss scale, for optimizers that unscale themselves).

    Returns:
        ``norm`` (global), ``group_norm`` (G,), ``max_abs``, ``nonfinite`` (count of entries),
        ``param_norm`` (G,) and, with ``lrs``, ``update_ratio`` (G,).
    """
    grads = [p.grad for p in layout.params if p.grad is not None]
    idx = index
    if len(grads) != len(layout.params):  # some parameters got no gradient this step
        keep = [i for i, p in enumerate(layout.params) if p.grad is not None]
        idx = index[torch.tensor(keep, device=index.device)]
    g_norm, _ = group_norms(grads, idx, len(layout.names))
    max_abs = torch.stack(torch._foreach_norm(grads, ord=float("inf"))).float().max()
    if scale is not None:
        g_norm, max_abs = g_norm / scale, max_abs / scale
    w_norm, _ = group_norms([p.detach() for p in layout.params], index, len(layout.names))
    out = {
        "norm": g_norm.square().sum().sqrt(),
        "group_norm": g_norm,
        "max_abs": max_abs,
        "nonfinite": nonfinite_count(grads),
        "param_norm": w_norm,
    }
    if lrs is not None:
        out["update_ratio"] = torch.tensor(lrs, dtype=torch.float32, device=g_norm.device) * g_norm / w_norm.clamp_min(
            1e-12)
    return out
