"""The guide's first tuning step: prove the model can overfit one batch before tuning anything else."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tricks.functional._checks import check_number
from lightning_tricks.weights import restore_weights, take_weights

__all__ = ["OverfitResult", "overfit_check"]

CAUSES = [
    "lr too small (or too large: the loss jumps): try 10x either way, or lr_find",
    "labels do not match the inputs (shuffled apart, wrong column, off by one)",
    "output size mismatch: the head must output one logit per class",
    "a bug in the forward or the loss: a detached tensor, a softmax before cross_entropy, a frozen layer",
    "the model is too small for even one batch",
]


@dataclass
class OverfitResult:
    """The verdict of :func:`overfit_check`."""

    passed: bool
    initial_loss: float
    final_loss: float
    target_fraction: float
    accuracy: float | None
    steps: int
    losses: list[float] = field(repr=False)
    likely_causes: list[str]

    def summary(self) -> str:
        acc = "" if self.accuracy is None else f", batch accuracy {100 * self.accuracy:.1f} %"
        head = (f"overfit check {'passed' if self.passed else 'FAILED'}: loss {self.initial_loss:.4g} -> "
                f"{self.final_loss:.4g} in {self.steps} steps (target below {self.target_fraction:g} x the start{acc})")
        if self.passed:
            return head
        return head + "\nlikely causes:\n" + "\n".join(f"  - {c}" for c in self.likely_causes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _first_optimizer(configured: Any) -> torch.optim.Optimizer:
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, dict):
        return _first_optimizer(configured["optimizer"])
    if isinstance(configured, (list, tuple)) and configured:
        return _first_optimizer(configured[0])
    raise TypeError(f"cannot find an optimizer in what configure_optimizers() returned ({type(configured).__name__}); "
                    "pass `optimizer=`.")


def overfit_check(
    module: nn.Module,
    dataloader: Iterable[Any],
    *,
    steps: int = 200,
    target_fraction: float = 0.1,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> OverfitResult:
    """Train on one fixed batch for ``steps`` steps, with the tricks, augmentation and regularisation off, and say
    whether it was memorised; the module's weights (and torch's random state) come back as they were.

    Passed when the loss fell below ``target_fraction`` of its start and, for class-index targets, every sample of
    the batch is classified right. Otherwise the result lists the guide's likely causes.

    Args:
        module: the model (a ``LightningModule``; ``TricksMixin``'s ``tricks_unpack`` and ``tricks_loss`` are used when
            it has them).
        dataloader: its first batch is the one to memorise (``(x, y)``).
        steps: optimizer steps on that batch.
        target_fraction: the loss must end below this fraction of its first value, in (0, 1).
        optimizer: a fresh optimizer over the module's parameters; by default the first one of
            ``module.configure_optimizers()``, with weight decay set to 0 (no regularisation).
        loss_fn: ``loss_fn(output, y)``; by default ``module.tricks_loss`` (plain cross-entropy outside a fit), else
            ``F.cross_entropy``.

    Give the result to the fit's doctor, ``TrainingDoctor(overfit=result)``, to have it in the report.
    """
    check_number("steps", steps, low=1, integer=True)
    check_number("target_fraction", target_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
    rng = torch.get_rng_state()  # (a DataLoader's iterator draws its seed from it)
    batch = next(iter(dataloader))
    unpack = getattr(module, "tricks_unpack", None)
    x, y = unpack(batch) if unpack is not None else (batch[0], batch[1])
    device = next(module.parameters()).device
    x, y = x.to(device), y.to(device)
    if loss_fn is None:
        loss_fn = getattr(module, "tricks_loss", F.cross_entropy)
    saved = take_weights(module)
    was_training = module.training
    if optimizer is None:
        optimizer = _first_optimizer(module.configure_optimizers())  # type: ignore[operator]
        for group in optimizer.param_groups:
            group["weight_decay"] = 0.0
    losses: list[float] = []
    try:
        module.train()
        for m in module.modules():  # regularisation off: dropout out of the way, the rest in training mode
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.eval()
        for _ in range(steps):
            optimizer.zero_grad()
            loss = loss_fn(module(x), y)
            loss.backward()
            optimizer.step()
            losses.append(float(loss))  # a diagnostic loop: one host read per step is fine
        with torch.no_grad():
            output = module(x)
            final = float(loss_fn(output, y))
        accuracy = None
        if not y.is_floating_point() and output.ndim == 2:
            accuracy = float((output.argmax(-1) == y).float().mean())
    finally:
        restore_weights(module, saved, owner="overfit_check")
        torch.set_rng_state(rng)
        module.train(was_training)
    initial = losses[0]
    passed = math.isfinite(final) and final < target_fraction * initial and accuracy in (None, 1.0)
    return OverfitResult(passed, initial, final, target_fraction, accuracy, steps, losses,
                         [] if passed else list(CAUSES))
