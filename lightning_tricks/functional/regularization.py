r"""L1 and elastic-net regularisation (guide section 4): the penalty, and its proximal step.

Penalty (Keras ``L1L2`` convention): :math:`R(\theta) = \lambda_1 \sum |\theta| + \lambda_2 \sum \theta^2`.

Proximal step with step size :math:`\eta` (the lr), applied after the optimizer's step (decoupled, like AdamW's
weight decay):

.. math:: \theta \leftarrow \operatorname{sign}(\theta)\max(|\theta| - \eta\lambda_1, 0)\,/\,(1 + 2\eta\lambda_2)

It minimises :math:`\tfrac{1}{2\eta}\lVert u - \theta\rVert^2 + R(u)`, and, unlike a gradient step on :math:`R`,
sets weights to exact zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["elastic_net_penalty", "elastic_net_prox_"]


def elastic_net_penalty(params: Sequence[Tensor], l1: float, l2: float = 0.0) -> Tensor:
    """:math:`\\lambda_1 \\sum |\\theta| + \\lambda_2 \\sum \\theta^2` over ``params`` (differentiable; fused norms)."""
    if not params:
        raise ValueError("`params` is empty: nothing to penalise.")
    total = params[0].new_zeros((), dtype=torch.float32)
    if l1:
        total = total + l1 * torch.stack(torch._foreach_norm(list(params), 1)).float().sum()
    if l2:
        total = total + l2 * torch.stack(torch._foreach_norm(list(params), 2)).float().square().sum()
    return total


@torch.no_grad()
def elastic_net_prox_(params: Sequence[Tensor], lr: float, l1: float, l2: float = 0.0) -> None:
    """The proximal step of the elastic net, in place, with step size ``lr`` (see the module)."""
    if not params or lr == 0.0 or (l1 == 0.0 and l2 == 0.0):
        return
    params = list(params)
    if l1:
        shrunk = torch._foreach_abs(params)
        torch._foreach_sub_(shrunk, lr * l1)
        torch._foreach_clamp_min_(shrunk, 0.0)
        torch._foreach_mul_(shrunk, torch._foreach_sign(params))
        torch._foreach_copy_(params, shrunk)
    if l2:
        torch._foreach_div_(params, 1.0 + 2.0 * lr * l2)
