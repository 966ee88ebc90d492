"""Knowledge distillation as a callback: a frozen teacher that costs nothing but its forward pass."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_tricks._io import load_class
from lightning_tricks.functional._checks import check_number
from lightning_tricks.functional.distillation import soft_distillation_loss
from lightning_tricks.trick import TrickCallback, TricksModule


class Distillation(TrickCallback):
    r"""Distil a frozen teacher into the student (Hinton et al., 2015) through :class:`TricksMixin`.

    The training loss becomes

    .. math:: \alpha\, T^2\, \mathrm{KL}(\mathrm{softmax}(t/T) \,\|\, \mathrm{softmax}(s/T)) + (1 - \alpha)\,\ell_{hard}

    where :math:`\ell_{hard}` is the mixin's loss on the batch's targets (label-smoothed and/or mixed when those
    tricks are attached), and the teacher sees the inputs the student saw (mixed, when mixup is on): it runs in the
    loss transform, inside the training step (so under the precision plugin's autocast) and under ``torch.no_grad()``.
    Validation and test keep the plain loss. The soft and hard parts are logged as ``distill/soft`` and
    ``distill/hard`` (epoch means).

    Args:
        teacher: an ``nn.Module``, or the path of a Lightning checkpoint (then give ``teacher_class``).
        temperature: :math:`T > 0` (the guide's example: 3).
        alpha: weight of the soft term, in [0, 1] (the guide's example: 0.7).
        teacher_class: the ``LightningModule`` class (or its dotted import path, for ``LightningCLI`` YAML) whose
            ``load_from_checkpoint`` rebuilds the teacher from ``teacher``.

    The teacher is kept outside the student on purpose: it is never a submodule, so it is not in the student's
    optimizer, not in the student's checkpoint (same keys and size as a plain one), not wrapped by DDP or FSDP and not
    counted by Lightning's "modules in eval mode" check. The callback freezes it (``requires_grad=False``), puts it
    in eval mode for the whole fit and moves it to the student's device. Under DDP and FSDP2 every rank holds a full,
    unsharded copy of the teacher and runs it on its own batch (the teacher's forward needs no collective). A resumed
    run rebuilds the teacher from the same argument (its weights are not in the checkpoint).

    Example::

        trainer = L.Trainer(callbacks=[Distillation(teacher, temperature=3.0, alpha=0.7)])
        # or, e.g. in a LightningCLI YAML:
        # - class_path: lightning_tricks.Distillation
        #   init_args: {teacher: teacher.ckpt, teacher_class: my_project.models.BigNet}
    """

    order = 30

    def __init__(
        self,
        teacher: nn.Module | str,
        temperature: float = 3.0,
        alpha: float = 0.7,
        teacher_class: type[pl.LightningModule] | str | None = None,
    ) -> None:
        check_number("temperature", temperature, low=0.0, low_open=True)
        check_number("alpha", alpha, low=0.0, high=1.0)
        if isinstance(teacher, str):
            if teacher_class is None:
                raise ValueError(
                    f"`teacher` is a checkpoint path ({teacher!r}): also give `teacher_class`, the LightningModule "
                    "class (or its dotted import path) that `load_from_checkpoint` rebuilds it with."
                )
            cls = load_class(teacher_class, "teacher_class")
            teacher = cls.load_from_checkpoint(teacher, map_location="cpu")
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"`teacher` must be an nn.Module or a checkpoint path, got {type(teacher).__name__}.")
        self.teacher = teacher
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self._freeze()

    def _freeze(self) -> None:
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if any(m is self.teacher for m in pl_module.modules()):
            raise ValueError(
                "the teacher is registered as a submodule of the student: it would be trained, checkpointed and "
                "wrapped by DDP. Keep it only in Distillation(teacher=...)."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.teacher.to(pl_module.device)
        self._freeze()

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.teacher.eval()  # cheap insurance against user code that calls .train() on everything it can reach

    @override
    def transform_loss(self, pl_module: TricksModule, logits: Tensor, target: Tensor, loss: Tensor) -> Tensor:
        if logits.ndim != 2:
            raise ValueError(
                f"Distillation matches (N, K) class distributions, got student logits of shape {tuple(logits.shape)}: "
                "for per-token or per-pixel logits distil in your own training_step (functional.soft_distillation_loss "
                "on flattened (positions, K) logits)."
            )
        x = pl_module.tricks_inputs()
        try:
            with torch.no_grad():
                teacher_logits = self.teacher(x)
        except (RuntimeError, ValueError, TypeError) as error:
            raise ValueError(
                f"Distillation's teacher ({type(self.teacher).__name__}) failed on the student's inputs of shape "
                f"{tuple(x.shape)} ({type(error).__name__}: {error}). The teacher gets the inputs the student gets "
                "(mixed, under Mixup): it must take the same input size."
            ) from error
        if teacher_logits.shape != logits.shape:
            raise ValueError(
                f"Distillation's teacher ({type(self.teacher).__name__}) returned logits of shape "
                f"{tuple(teacher_logits.shape)} for inputs of shape {tuple(x.shape)}, but the student's are "
                f"{tuple(logits.shape)}: the teacher must take the student's inputs and predict the same classes."
            )
        soft = soft_distillation_loss(logits, teacher_logits, self.temperature)
        n = logits.shape[0]
        pl_module.log("distill/soft", soft, on_step=False, on_epoch=True, batch_size=n)  # type: ignore[attr-defined]
        pl_module.log("distill/hard", loss, on_step=False, on_epoch=True, batch_size=n)  # type: ignore[attr-defined]
        return self.alpha * soft + (1.0 - self.alpha) * loss
