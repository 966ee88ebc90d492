"""An exponential moving average of the weights, updated after each optimizer step, evaluated in place of them."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_tricks.callbacks.weight_average import WeightAverage
from lightning_tricks.functional._checks import check_number
from lightning_tricks.functional.averaging import decay_from_half_life, ema_decay, ema_update_


class EMA(WeightAverage):
    r"""Keep an exponential moving average (EMA) of the weights and evaluate it instead of them.

    After each optimizer step (once per step whatever ``accumulate_grad_batches`` is), one fused update on the
    device in float32, with no host-device sync:

    .. math:: \bar w \leftarrow d_n\,\bar w + (1 - d_n)\,w

    The first update copies the weights (:math:`d_1 = 0`); then :math:`d_n = d` (``warmup=False``, as Lightning's
    ``EMAWeightAveraging``) or timm's warmup :math:`d_n = \min(d, 1 - n^{-2/3})` (``warmup=True``, as
    ``timm.utils.ModelEmaV3(use_warmup=True)``), which averages the first updates almost equally instead of letting
    the random initial weights linger. Floating buffers (BatchNorm statistics) are averaged like the parameters, as
    timm and Lightning do; integer buffers are copied.

    Args:
        decay: :math:`d \in [0, 1)`, the default 0.999: a cap, reached after about 31,600 updates with ``warmup``
            (before that the average covers about n^(2/3) updates; 1,000 without warmup). Give ``decay`` or
            ``half_life``.
        half_life: the alternative: the number of optimizer steps after which an update's weight halves,
            :math:`d = 0.5^{1/h}` (Composer's form).
        warmup: ramp the decay up as timm does (above).
        start_step: no update until this many optimizer steps are done; the first update after it copies the weights.
        update_every: update every this many optimizer steps.
        evaluate_with_ema: validation and test run on the average (swapped in once per evaluation), so logged
            metrics, ``ModelCheckpoint`` and :class:`EarlyStopping` see the average's; training continues on the
            raw weights.
        keep_ema_at_end: at the end of fit the module holds the average (as Lightning does).
        device: where the average lives (default: with the weights; ``"cpu"``: in host memory).
        checkpoint_weights: ``"average"`` puts the averaged weights in checkpoints' ``state_dict`` (see
            :class:`WeightAverage`); ``"trained"`` (default) the trained ones.

    The average is in the callback's checkpoint state (the module's own ``state_dict`` keys stay those of a plain
    module), so a resumed run continues the same average. Under DDP every rank averages the same weights; under FSDP2
    each rank averages its own shards (no gather) and writes them into the distributed checkpoint beside the module's
    (Lightning writes callback state from rank 0 only); a resumed run reads them back, resharded if the number of
    processes changed. :meth:`averaged_state_dict` gives (a copy of) the average with the module's keys.

    Example::

        trainer = L.Trainer(callbacks=[EMA(decay=0.999)])
    """

    def __init__(
        self,
        decay: float | None = None,
        *,
        half_life: float | None = None,
        warmup: bool = True,
        start_step: int = 0,
        update_every: int = 1,
        evaluate_with_ema: bool = True,
        keep_ema_at_end: bool = True,
        device: torch.device | str | None = None,
        checkpoint_weights: str = "trained",
    ) -> None:
        if decay is not None and half_life is not None:
            raise ValueError(f"give `decay` ({decay!r}) or `half_life` ({half_life!r}), not both.")
        if half_life is not None:
            decay = decay_from_half_life(half_life)  # checks half_life > 0
        elif decay is None:
            decay = 0.999
        check_number("decay", decay, low=0.0, high=1.0, high_open=True)
        check_number("start_step", start_step, low=0, integer=True)
        check_number("update_every", update_every, low=1, integer=True)
        super().__init__(evaluate_with_average=evaluate_with_ema, keep_average_at_end=keep_ema_at_end, device=device,
                         checkpoint_weights=checkpoint_weights)
        self.decay = float(decay)
        self.half_life = half_life
        self.warmup = warmup
        self.start_step = start_step
        self.update_every = update_every
        self._last_step = 0

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        total = trainer.estimated_stepping_batches
        if total != float("inf") and self.start_step >= total:
            raise ValueError(
                f"EMA(start_step={self.start_step}) starts after the end of the run ({int(total)} optimizer steps): "
                "no update would be made; lower `start_step`."
            )
        self._last_step = trainer.global_step

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return  # a batch that accumulated gradients: no optimizer step
        self._last_step = step
        if self.should_update(step=step - 1):  # the index of the optimizer step just taken
            self.update(pl_module)

    @override
    def should_update(self, step: int | None = None, epoch: int | None = None) -> bool:
        """After every ``update_every``-th optimizer step from ``start_step`` on."""
        return step is not None and step >= self.start_step and (step - self.start_step) % self.update_every == 0

    def update(self, pl_module: pl.LightningModule) -> None:
        """One EMA update from the module's current weights."""
        self._average_in(pl_module, lambda averages, values, n: ema_update_(averages, values,
                                                                              ema_decay(n, self.decay, self.warmup)))
