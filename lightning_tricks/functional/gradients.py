r"""How :class:`~lightning_tricks.GradientMonitor` groups parameters for its per-group gradient norms.

The norm of a group :math:`G` is the 2-norm over all gradient entries of its parameters, and the total norm the same
over every group (``torch.nn.utils.get_total_norm``):

.. math:: \|g\|_G = \sqrt{\textstyle\sum_{p \in G} \|g_p\|_2^2}, \qquad \|g\| = \sqrt{\textstyle\sum_G \|g\|_G^2}

The update-to-weight ratio of a group (the size of a plain SGD step relative to the weights) is
``lr * ||g||_G / ||w||_G``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["GradientLayout"]


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
