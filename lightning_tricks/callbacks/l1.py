"""L1 / elastic-net regularisation: a penalty in the loss, or a proximal step after each optimizer step."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_tricks._io import log_to_loggers
from lightning_tricks._sharding import local
from lightning_tricks.functional._checks import check_choice, check_number
from lightning_tricks.functional.regularization import elastic_net_penalty, elastic_net_prox_
from lightning_tricks.groups import decayed_parameters
from lightning_tricks.trick import TrickCallback

__all__ = ["L1"]


class L1(TrickCallback):
    r"""L1 (``l2=0``) or elastic-net regularisation of the weights,
    :math:`\lambda_1\sum|\theta| + \lambda_2\sum\theta^2` (see :mod:`lightning_tricks.functional.regularization`).

    * ``mode="proximal"`` (default): after each optimizer step, the proximal step of the penalty with each param
      group's lr: weights shrink toward zero and small ones become **exact zeros**. It works with any loss and any
      module (no mixin needed), and is decoupled from the gradient, like AdamW's weight decay.
    * ``mode="loss"``: the penalty is added to the training loss through :meth:`TricksMixin.tricks_loss` and logged
      as ``l1/penalty``; the optimizer sees its (sub)gradient. Weights hover around zero rather than reaching it.
      The step's loss must go through ``tricks_loss`` (an error says so otherwise).

    Biases and every parameter of a normalisation layer are left out, as :func:`lightning_tricks.param_groups` does
    for weight decay. ``l1/sparsity`` (the fraction of exact zeros among the penalised weights) is logged at
    Lightning's logging steps.

    Under DDP every rank applies the same step to the same weights. Under FSDP2 each rank works on its local shards
    only, with no collective: in ``loss`` mode each rank's penalty covers its own shards (their gradients reach only
    those shards, so the sum over ranks is the whole penalty's gradient), and ``l1/sparsity`` is rank 0's shards'.

    Args:
        l1: :math:`\lambda_1 \ge 0`.
        l2: :math:`\lambda_2 \ge 0` (elastic net).
        mode: ``"proximal"`` or ``"loss"``.
    """

    order = 40

    def __init__(self, l1: float = 1e-5, l2: float = 0.0, mode: str = "proximal") -> None:
        check_number("l1", l1, low=0.0)
        check_number("l2", l2, low=0.0)
        check_choice("mode", mode, ("proximal", "loss"))
        if l1 == 0 and l2 == 0:
            raise ValueError("`l1` and `l2` are both 0: nothing to regularise.")
        self.l1, self.l2, self.mode = l1, l2, mode
        self._params: list[Tensor] = []
        self._groups: list[list[list[Tensor]]] = []  # [optimizer][param group] -> its penalised parameters
        self._lrs: list[tuple[int, list[float]]] = []  # (optimizer, the lr of each group) of this batch's steps
        self._step = -1
        self._added = True
        self.sparsity: float | None = None  # at the last logging step

    @property
    @override
    def has_loss_transform(self) -> bool:
        return self.mode == "loss"

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.mode == "loss":
            super().setup(trainer, pl_module, stage)  # the loss seam needs the mixin

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # frozen ones too: Finetune may have frozen a backbone already, to unfreeze it later
        penalised = {id(p) for p in decayed_parameters(pl_module, trainable_only=False)}
        self._params = [p for p in pl_module.parameters() if id(p) in penalised]
        if not self._params:
            raise ValueError(f"L1: {type(pl_module).__name__} has no weights to penalise (biases and normalisation "
                             "parameters are left out).")
        # the penalised parameters of each param group, to step each with its group's lr
        self._groups = [[[p for p in g["params"] if id(p) in penalised] for g in opt.param_groups]
                        for opt in trainer.optimizers]
        self._step = trainer.global_step

    # ------------------------------------------------------------------------------------------- loss mode
    @override
    def transform_loss(self, pl_module: Any, logits: Tensor, target: Tensor, loss: Tensor) -> Tensor:
        if self.mode != "loss":
            return loss
        penalty = elastic_net_penalty([local(p) for p in self._params], self.l1, self.l2)
        pl_module.log("l1/penalty", penalty.detach())
        self._added = True
        return loss + penalty.to(loss.dtype)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._added = self.mode != "loss"

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if not self._added:
            raise RuntimeError(
                "L1(mode='loss') adds its penalty inside `self.tricks_loss(logits, y)`, but this step's loss did not "
                "go through it, so it would train unregularised. Compute the loss with tricks_loss, or use "
                "L1(mode='proximal'), which works with any loss."
            )
        super().on_before_backward(trainer, pl_module, loss)

    # -------------------------------------------------------------------------------------- proximal mode
    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.mode == "proximal":  # the lrs this step uses (a schedule may change them after it)
            index = next(i for i, opt in enumerate(trainer.optimizers) if opt is optimizer)
            self._lrs.append((index, [g["lr"] for g in optimizer.param_groups]))

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.mode == "proximal" and trainer.global_step != self._step:
            for index, lrs in self._lrs:
                for params, lr in zip(self._groups[index], lrs):
                    # a parameter without a gradient did not step (frozen by Finetune, unused): leave it
                    stepped = [local(p) for p in params if p.grad is not None]
                    elastic_net_prox_(stepped, lr, self.l1, self.l2)
        moved = trainer.global_step != self._step
        self._lrs.clear()
        self._step = trainer.global_step
        if moved and trainer.global_step % trainer.log_every_n_steps == 0:  # type: ignore[attr-defined]
            self._log_sparsity(trainer)

    def _log_sparsity(self, trainer: pl.Trainer) -> None:
        """The fraction of exact zeros among the penalised weights, read to the host at logging steps only."""
        with torch.no_grad():
            shards = [local(p) for p in self._params]
            zeros = torch.stack([(s == 0).sum() for s in shards]).sum()
            self.sparsity = float(zeros) / sum(s.numel() for s in shards)
        log_to_loggers(trainer, {"l1/sparsity": self.sparsity})
        trainer.callback_metrics["l1/sparsity"] = torch.tensor(self.sparsity)
