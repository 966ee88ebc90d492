r"""Parameter groups in one place (guide sections 2, 6 and 9.1): no weight decay on biases and normalisation weights,
layer-wise lr decay, per-module lr multipliers, and the batch-size lr scaling rules.

Layer-wise decay (BEiT, ELECTRA): with the model's layers :math:`0 \dots L-1` from the bottom, layer :math:`i` gets
:math:`lr \cdot d^{\,L-1-i}`: the top layer (the head) trains at ``lr``, each layer below at ``d`` times the one above.
The lr of each group is written into the group itself, so ``WarmupCosine`` and torch's schedulers scale every group
and keep the ratios (timm's ``param_groups_layer_decay`` writes an ``lr_scale`` that only timm's schedulers read).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from lightning_tricks.functional._checks import check_choice, check_number

__all__ = ["NORM_LAYERS", "block_order", "decayed_parameters", "layer_of", "param_groups", "scaled_lr"]

NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)

Layers = Sequence["str | Sequence[str]"]


def _matches(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def block_order(module: nn.Module) -> list[str]:
    """The model's layers from the bottom, as module names: its direct children that hold parameters, in the order
    they were registered, where a ``ModuleList`` or ``Sequential`` child counts each of its own children (``blocks.0``,
    ``blocks.1``, ...), and a module whose parameters all sit in one child is looked through (``net.conv1``, ...).

    Registration order is the order of ``__init__``, which for most models (timm's, torchvision's, a plain stack) is
    the order of the forward pass; pass ``layers=`` to :func:`param_groups` when it is not.
    """
    holders = [(name, child) for name, child in module.named_children() if _has_parameters(child)]
    if len(holders) == 1 and next(module.parameters(recurse=False), None) is None:
        # a wrapper (a LightningModule around its `net`): look through it
        name, child = holders[0]
        return [f"{name}.{sub}" for sub in block_order(child)] or [name]
    names: list[str] = []
    for name, child in module.named_children():
        if isinstance(child, (nn.ModuleList, nn.Sequential)) and len(child) > 1:
            names.extend(f"{name}.{sub}" for sub, grandchild in child.named_children() if _has_parameters(grandchild))
        elif _has_parameters(child):
            names.append(name)
    return names


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def layer_of(module: nn.Module, layers: Layers | None = None) -> dict[str, int]:
    """The layer index (0 = bottom) of every parameter name of ``module``.

    ``layers`` lists the layers from the bottom; each entry is a module or parameter name, or a list of them (one layer
    made of several: ``[["cls_token", "pos_embed", "patch_embed"], "blocks.0", ...]``); a name covers everything
    under it. Without it, :func:`block_order`, and parameters held by ``module`` itself (a ``cls_token``) go to layer 0.
    """
    given = layers is not None
    chosen: Layers = layers if layers is not None else block_order(module)
    entries = [[e] if isinstance(e, str) else list(e) for e in chosen]
    found: dict[str, int] = {}
    used = [False] * len(entries)
    uncovered = []
    for name, _ in module.named_parameters():
        for i in range(len(entries) - 1, -1, -1):  # the last entry that matches: the most specific, top-most
            if any(_matches(name, prefix) for prefix in entries[i]):
                found[name], used[i] = i, True
                break
        else:
            found[name] = 0  # held by the module itself (default order) or, with `layers`, an error below
            uncovered.append(name)
    if given:
        unused = [entries[i] for i, u in enumerate(used) if not u]
        if unused:
            raise ValueError(f"`layers`: {unused} match no parameter of {type(module).__name__}; names are module or "
                             f"parameter names such as {list(dict(module.named_children()))[:4]}.")
        if uncovered:
            raise ValueError(f"`layers`: the parameter {uncovered[0]!r} is in none of the layers given; every "
                             "parameter must be covered (add its module's name to a layer).")
    return found


def param_groups(
    module: nn.Module,
    lr: float,
    weight_decay: float = 0.01,
    *,
    exclude_bias_and_norm: bool = True,
    no_decay: Iterable[str] | Callable[[str, nn.Parameter], bool] = (),
    layer_decay: float | None = None,
    layers: Layers | None = None,
    lr_mult: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with their own ``lr`` and ``weight_decay``, for any torch optimizer.

    Args:
        module: the model; frozen parameters (``requires_grad=False``) are left out, shared ones counted once.
        lr: the lr of the top layer (all layers when ``layer_decay`` is None), before multipliers.
        weight_decay: for every parameter but the excluded ones.
        exclude_bias_and_norm: no weight decay on biases (parameters named ``bias``) and on every parameter of a
            normalisation layer (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm), chosen by module type and
            name, so lazy modules are grouped right.
        no_decay: more parameters without weight decay: names (a name covers everything under it; e.g. timm's
            ``model.no_weight_decay()``) or a predicate ``(name, parameter) -> bool``.
        layer_decay: in (0, 1]: layer ``i`` of ``L`` gets ``lr * layer_decay ** (L - 1 - i)``.
        layers: the layers from the bottom (see :func:`layer_of`); default :func:`block_order`.
        lr_mult: ``{module name: multiplier}`` applied on top (the longest matching name wins), e.g. ``{"head": 10}``.

    Returns one group per distinct (lr, weight decay), bottom layer first; each holds ``params``, ``lr`` and
    ``weight_decay``.
    """
    check_number("lr", lr, low=0.0, low_open=True)
    check_number("weight_decay", weight_decay, low=0.0)
    if layer_decay is not None:
        check_number("layer_decay", layer_decay, low=0.0, high=1.0, low_open=True)
    mults = dict(lr_mult or {})
    for name, value in mults.items():
        check_number(f"lr_mult[{name!r}]", value, low=0.0)
    names = {n for n, _ in module.named_modules()} | {n for n, _ in module.named_parameters()}
    missing = [n for n in mults if n not in names]
    if missing:
        raise ValueError(f"`lr_mult`: {missing} match no module or parameter of {type(module).__name__}.")
    decayed = {id(p) for p in decayed_parameters(module, exclude_bias_and_norm, no_decay)}
    depth = layer_of(module, layers) if (layer_decay is not None or layers is not None) else {}
    top = max(depth.values(), default=0)
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    order: dict[tuple[float, float], int] = {}
    seen: set[int] = set()
    for mod_name, sub in module.named_modules():
        for p_name, p in sub.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            scale = layer_decay ** (top - depth[name]) if layer_decay is not None else 1.0
            matching = [n for n in mults if _matches(name, n)]
            if matching:
                scale *= mults[max(matching, key=len)]
            key = (lr * scale, weight_decay if id(p) in decayed else 0.0)
            groups.setdefault(key, []).append(p)
            order.setdefault(key, depth.get(name, 0))
    keys = sorted(groups, key=lambda k: (order[k], -k[1]))
    return [{"params": groups[k], "lr": k[0], "weight_decay": k[1]} for k in keys]


def decayed_parameters(module: nn.Module, exclude_bias_and_norm: bool = True,
                       no_decay: Iterable[str] | Callable[[str, nn.Parameter], bool] = (), *,
                       trainable_only: bool = True) -> list[nn.Parameter]:
    """The parameters that weight decay (and L1) applies to: all but biases, normalisation layers' parameters (by
    module type and name, with ``exclude_bias_and_norm``) and those named in ``no_decay``; with ``trainable_only``,
    frozen ones (``requires_grad=False``) are left out too."""
    skip = no_decay if callable(no_decay) else None
    skip_names = [] if callable(no_decay) else list(no_decay)
    kept: list[nn.Parameter] = []
    seen: set[int] = set()
    for mod_name, sub in module.named_modules():
        for p_name, p in sub.named_parameters(recurse=False):
            if (trainable_only and not p.requires_grad) or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if not ((exclude_bias_and_norm and (isinstance(sub, NORM_LAYERS) or p_name == "bias"))
                    or any(_matches(name, n) for n in skip_names) or (skip is not None and skip(name, p))):
                kept.append(p)
    return kept


RULES = ("linear", "sqrt")


def scaled_lr(lr: float, batch_size: int, base_batch_size: int, rule: str = "linear") -> float:
    r"""The lr for ``batch_size`` given the one tuned at ``base_batch_size``: ``lr * k`` (linear, Goyal et al. 2017,
    for SGD) or ``lr * sqrt(k)`` (sqrt, for Adam-type optimizers) with :math:`k = b / b_0`."""
    check_number("batch_size", batch_size, low=1, integer=True)
    check_number("base_batch_size", base_batch_size, low=1, integer=True)
    check_choice("rule", rule, RULES)
    k = batch_size / base_batch_size
    return lr * (k if rule == "linear" else math.sqrt(k))
