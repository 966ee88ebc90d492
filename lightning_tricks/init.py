r"""Weight initialisation (guide section 5), applied to a whole model in one call.

For a weight of fan-in :math:`n_{in}` and fan-out :math:`n_{out}` (times the kernel size for convolutions):

==================== ======================================================================
scheme               distribution
==================== ======================================================================
``kaiming_normal``   :math:`\mathcal N(0, g^2/n)`, :math:`n = n_{in}` or :math:`n_{out}` (``mode``), relu gain √2
``kaiming_uniform``  :math:`\mathcal U(-b, b)`, :math:`b = g\sqrt{3/n}`
``xavier_normal``    :math:`\mathcal N(0, 2/(n_{in} + n_{out}))` (Glorot; ``gain`` scales it)
``xavier_uniform``   :math:`\mathcal U(-b, b)`, :math:`b = \sqrt{6/(n_{in} + n_{out})}`
``lecun_normal``     :math:`\mathcal N(0, 1/n_{in})` (for SELU)
``trunc_normal``     :math:`\mathcal N(0, \sigma^2)` cut at :math:`\pm 2\sigma` (ViT: :math:`\sigma = 0.02`)
==================== ======================================================================

The guide's example is the default: Kaiming normal, fan-out, relu, for linear and convolution layers; biases 0;
normalisation layers weight 1, bias 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_tricks.functional._checks import check_choice, check_number
from lightning_tricks.groups import NORM_LAYERS

__all__ = ["SCHEMES", "init_weights", "zero_init_residual_"]

SCHEMES = ("kaiming_normal", "kaiming_uniform", "xavier_normal", "xavier_uniform", "lecun_normal", "trunc_normal")
_WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)


def _fans(weight: torch.Tensor) -> tuple[int, int]:
    receptive = math.prod(weight.shape[2:]) if weight.ndim > 2 else 1
    return weight.shape[1] * receptive, weight.shape[0] * receptive


@torch.no_grad()
def init_weights(
    module: nn.Module,
    scheme: str = "kaiming_normal",
    *,
    mode: str = "fan_out",
    nonlinearity: str = "relu",
    gain: float = 1.0,
    std: float = 0.02,
    zero_init_residual: bool = False,
) -> nn.Module:
    """Initialise every linear and convolution layer of ``module`` with ``scheme``, their biases to 0, and every
    normalisation layer to weight 1, bias 0; returns ``module``.

    Args:
        scheme: one of :data:`SCHEMES` (see the module).
        mode: ``"fan_in"`` or ``"fan_out"``, for the Kaiming schemes.
        nonlinearity: for the Kaiming schemes' gain (``torch.nn.init.calculate_gain``): ``"relu"``,
            ``"leaky_relu"``, ``"tanh"``, ``"linear"``, ...
        gain: for the Xavier schemes.
        std: for ``trunc_normal``.
        zero_init_residual: then set the last normalisation weight of each residual block to 0, so every block
            starts as the identity (Goyal et al. 2017): see :func:`zero_init_residual_`.

    Under FSDP2 call it in ``configure_model`` before ``fully_shard`` (on the whole tensors; the sharding then
    splits them), or build the model on the meta device and call it after ``to_empty``.
    """
    check_choice("scheme", scheme, SCHEMES)
    check_choice("mode", mode, ("fan_in", "fan_out"))
    check_number("gain", gain, low=0.0, low_open=True)
    check_number("std", std, low=0.0, low_open=True)
    try:
        relu_gain = nn.init.calculate_gain(nonlinearity)  # type: ignore[arg-type]
    except ValueError as err:
        raise ValueError(f"`nonlinearity`: {err}") from None
    for sub in module.modules():
        if isinstance(sub, _WEIGHTED):
            w = sub.weight
            fan_in, fan_out = _fans(w)
            if scheme == "kaiming_normal":
                w.normal_(0.0, relu_gain / math.sqrt(fan_in if mode == "fan_in" else fan_out))
            elif scheme == "kaiming_uniform":
                bound = relu_gain * math.sqrt(3.0 / (fan_in if mode == "fan_in" else fan_out))
                w.uniform_(-bound, bound)
            elif scheme == "xavier_normal":
                nn.init.xavier_normal_(w, gain=gain)
            elif scheme == "xavier_uniform":
                nn.init.xavier_uniform_(w, gain=gain)
            elif scheme == "lecun_normal":
                w.normal_(0.0, 1.0 / math.sqrt(fan_in))
            else:
                nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)
            if isinstance(sub.bias, Tensor):
                sub.bias.zero_()
        elif isinstance(sub, NORM_LAYERS):
            weight, bias = getattr(sub, "weight", None), getattr(sub, "bias", None)
            if isinstance(weight, Tensor):
                weight.fill_(1.0)
            if isinstance(bias, Tensor):
                bias.zero_()
    if zero_init_residual:
        zero_init_residual_(module)
    return module


@torch.no_grad()
def zero_init_residual_(module: nn.Module) -> int:
    """Zero the last normalisation weight of every residual block, so each block starts as the identity; returns how
    many blocks were found.

    Known blocks: torchvision's ``BasicBlock`` (``bn2``) and ``Bottleneck`` (``bn3``), and any module with a
    ``zero_init_last()`` method (timm's ResNet blocks; give your own blocks one to mark them).
    """
    found = 0
    for sub in module.modules():
        last = _torchvision_last_norm(sub)
        zero_init_last = getattr(sub, "zero_init_last", None)
        if last is not None and isinstance(last.weight, Tensor):
            last.weight.zero_()
            found += 1
        elif callable(zero_init_last):
            zero_init_last()
            found += 1
    if not found:
        raise ValueError(f"zero_init_residual: no residual block found in {type(module).__name__} (torchvision "
                         "BasicBlock/Bottleneck, or a module with a `zero_init_last()` method, as timm's blocks have).")
    return found


def _torchvision_last_norm(module: nn.Module) -> nn.Module | None:
    """The norm that closes the residual branch of a torchvision ResNet block, else None."""
    if not type(module).__module__.startswith("torchvision.models"):
        return None
    name = {"BasicBlock": "bn2", "Bottleneck": "bn3"}.get(type(module).__name__)
    return getattr(module, name, None) if name else None
