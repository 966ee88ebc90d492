r"""Stochastic depth (guide section 4): drop the residual branch of whole blocks, per sample, while training.

Block :math:`i` of :math:`n` (in forward order) drops its branch with probability :math:`p_i = p \cdot i/(n-1)`
(timm's and the paper's linear rule: the first block never, the last with :math:`p`), and scales kept branches by
:math:`1/(1-p_i)`. timm's ``DropPath`` does the dropping; in evaluation it is the identity.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_tricks.functional._checks import check_number
from lightning_tricks.init import _torchvision_last_norm

__all__ = ["BranchDropPath", "add_drop_path"]

_SLOTS = ("drop_path", "drop_path1", "drop_path2")


def _drop_path_class() -> type[nn.Module]:
    try:
        from timm.layers import DropPath
    except ImportError:
        raise ImportError("add_drop_path uses timm's DropPath: `pip install timm`.") from None
    return DropPath


class BranchDropPath(nn.Module):
    """timm's ``DropPath`` applied, through a forward hook, to the output of the norm that closes a residual branch
    (torchvision's blocks have no drop-path slot). It holds no parameters, so the model's state-dict keys, and the
    pretrained weights that load into them, do not change."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop = _drop_path_class()(drop_prob)

    def hook(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        return self.drop(output)


def add_drop_path(model: nn.Module, rate: float) -> int:
    """Add stochastic depth to every residual block of ``model``, the rate rising linearly with depth to ``rate``;
    returns the number of blocks.

    Blocks found, in the order of ``model.modules()``:

    * modules with a ``drop_path``, ``drop_path1`` or ``drop_path2`` attribute that is ``None``, ``nn.Identity`` or a
      ``DropPath`` (timm's ResNet, ConvNeXt and ViT blocks): each gets ``DropPath(p_i)``. **To mark your own block**,
      give it ``self.drop_path = nn.Identity()`` and apply it to the branch: ``x + self.drop_path(branch(x))``;
    * torchvision's ``BasicBlock`` and ``Bottleneck``: the output of their last BatchNorm (the end of the branch)
      goes through a ``BranchDropPath`` hook.

    Raises if ``rate`` is outside [0, 1) or no block is found.
    """
    check_number("rate", rate, low=0.0, high=1.0, high_open=True)
    drop_path = _drop_path_class()
    blocks = [m for m in model.modules()
              if _torchvision_last_norm(m) is not None
              or any(hasattr(m, s) and isinstance(getattr(m, s), (type(None), nn.Identity, drop_path)) for s in _SLOTS)]
    if not blocks:
        raise ValueError(
            f"add_drop_path: no residual block found in {type(model).__name__}. Known: timm's blocks (a `drop_path` "
            "attribute) and torchvision's BasicBlock/Bottleneck. Mark yours with `self.drop_path = nn.Identity()` "
            "applied to the residual branch: `x + self.drop_path(branch(x))`."
        )
    n = len(blocks)
    for i, block in enumerate(blocks):
        p = rate * i / (n - 1) if n > 1 else rate
        last_norm = _torchvision_last_norm(block)
        existing = getattr(block, "drop_path", None)
        if isinstance(existing, BranchDropPath):  # a second call: a new rate, no new hook
            existing.drop.drop_prob = p  # type: ignore[assignment]  # timm's DropPath attribute
        elif last_norm is not None:
            branch = BranchDropPath(p)
            block.drop_path = branch  # a submodule: train/eval and deep copies follow the model
            last_norm.register_forward_hook(branch.hook)
        else:
            for slot in _SLOTS:
                if hasattr(block, slot) and isinstance(getattr(block, slot), (type(None), nn.Identity, drop_path)):
                    setattr(block, slot, drop_path(p))
    return n
