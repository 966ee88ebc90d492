"""Taking a copy of a module's weights and putting it back in place: the one implementation behind the averaging's
evaluation swap, :class:`EarlyStopping`'s best weights, the LR sweep and ``overfit_check``.

Copies are of ``module.state_dict()`` (parameters and buffers), each rank's local shard under FSDP2, so they work on
sharded modules; restoring copies into the module's own tensors, so optimizers keep their references.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_tricks._sharding import local

__all__ = ["copy_weights", "restore_weights", "take_weights"]


def copy_weights(weights: Mapping[str, Tensor], device: torch.device | str | None = None) -> dict[str, Tensor]:
    """Detached copies of ``weights`` (each rank's shard of a ``DTensor``), on ``device`` (default: where each is)."""
    return {k: local(v).detach().to(device if device is not None else local(v).device, copy=True)
            for k, v in weights.items()}


def take_weights(module: nn.Module, device: torch.device | str | None = None) -> dict[str, Tensor]:
    """A copy of the module's weights (its ``state_dict``), on ``device`` (``"cpu"``: in host memory)."""
    return copy_weights(module.state_dict(), device)


def restore_weights(module: nn.Module, weights: Mapping[str, Tensor], *, owner: str = "restore_weights") -> None:
    """Copy ``weights`` into the module's tensors in place (each rank its own shards); every key of the module's
    ``state_dict`` must be there, or ``owner`` says which are missing."""
    state = module.state_dict()
    missing = sorted(set(state) - set(weights))
    if missing:
        raise RuntimeError(f"{owner}: the weights lack {missing[:3]}{' ...' if len(missing) > 3 else ''}: the module "
                           "changed since they were taken.")
    with torch.no_grad():
        for key, target in state.items():
            local(target).copy_(weights[key])
