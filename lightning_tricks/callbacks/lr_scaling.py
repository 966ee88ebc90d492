"""Scale every lr with the effective batch size (guide section 6: the linear scaling rule, with warmup)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_tricks._compat import fit_train_dataloader
from lightning_tricks._io import log_to_loggers
from lightning_tricks.callbacks.lr_finder import LRFinder
from lightning_tricks.functional._checks import check_choice, check_number
from lightning_tricks.groups import RULES, scaled_lr
from lightning_tricks.lrs import scale_lrs
from lightning_tricks.peers import find_callback

__all__ = ["LRScaling", "data_parallel_size"]


def data_parallel_size(trainer: pl.Trainer) -> int:
    """How many processes see different batches: the world size, or the size of the ``data_parallel`` dimension of
    the strategy's device mesh (``ModelParallelStrategy``; tensor-parallel ranks share a batch)."""
    mesh = getattr(trainer.strategy, "device_mesh", None)
    if mesh is not None and "data_parallel" in (mesh.mesh_dim_names or ()):
        return int(mesh["data_parallel"].size())
    return trainer.world_size


class LRScaling(pl.Callback):
    r"""Scale the lrs of every param group once, at the start of the fit, from the batch size they were tuned at.

    The effective batch is :math:`b = b_{device} \times` ``accumulate_grad_batches`` :math:`\times` the data-parallel
    size; every group's lr is multiplied by :math:`k = b / b_0` (``rule="linear"``, Goyal et al. 2017, for SGD) or
    :math:`\sqrt{k}` (``rule="sqrt"``, for Adam-type optimizers). It runs before ``WarmupCosine`` plans its schedule,
    which then warms up to the scaled lrs (the rule needs the warmup at large batches); torch schedulers get their
    ``base_lrs`` scaled. The effective batch and the factor are logged (``lr_scaling/*`` at step 0) and kept in the
    checkpoint; a resumed fit does not scale again.

    Args:
        base_batch_size: the batch size the lrs in ``configure_optimizers`` were chosen for.
        rule: ``"linear"`` or ``"sqrt"``.
        batch_size: the per-device batch size; default: the training ``DataLoader``'s ``batch_size``.

    Example::

        # lr 0.1 tuned at batch 256; this run: 64 per device x 2 accumulated x 4 GPUs = 512 -> lr 0.2
        trainer = pl.Trainer(devices=4, accumulate_grad_batches=2, callbacks=[LRScaling(256), WarmupCosine(0.05)])
    """

    def __init__(self, base_batch_size: int, rule: str = "linear", batch_size: int | None = None) -> None:
        check_number("base_batch_size", base_batch_size, low=1, integer=True)
        check_choice("rule", rule, RULES)
        if batch_size is not None:
            check_number("batch_size", batch_size, low=1, integer=True)
        self.base_batch_size, self.rule, self.batch_size = base_batch_size, rule, batch_size
        self.effective_batch_size: int | None = None
        self.factor: float | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.effective_batch_size = self.factor = None  # a checkpoint's state, restored after setup, may set them
        if find_callback(trainer, LRFinder) is not None:
            raise ValueError("LRScaling with LRFinder: the finder picks the lr at this run's batch size already; "
                             "scaling it again would be wrong. Use one of them.")

    def _device_batch(self, trainer: pl.Trainer) -> int:
        if self.batch_size is not None:
            return self.batch_size
        loader = fit_train_dataloader(trainer)
        size = getattr(loader, "batch_size", None)
        if not isinstance(size, int):
            raise ValueError(f"LRScaling cannot read the batch size of the training data ({type(loader).__name__}, "
                             f"batch_size={size!r}): pass `LRScaling(..., batch_size=<per-device batch>)`.")
        return size

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.factor is not None:
            return  # resumed: the optimizer's state carries the scaled lrs
        batch = self._device_batch(trainer) * trainer.accumulate_grad_batches * data_parallel_size(trainer)
        self.effective_batch_size = batch
        self.factor = scaled_lr(1.0, batch, self.base_batch_size, self.rule)
        scale_lrs(trainer.optimizers, [c.scheduler for c in trainer.lr_scheduler_configs], self.factor)
        log_to_loggers(trainer, {"lr_scaling/effective_batch_size": float(batch), "lr_scaling/factor": self.factor})
        rank_zero_info(f"LRScaling: effective batch {batch} (base {self.base_batch_size}, {self.rule} rule): every lr "
                       f"x {self.factor:.4g}.")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"effective_batch_size": self.effective_batch_size, "factor": self.factor}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.effective_batch_size, self.factor = state_dict["effective_batch_size"], state_dict["factor"]
