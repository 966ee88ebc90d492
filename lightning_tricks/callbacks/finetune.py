"""Freeze a pretrained backbone, then unfreeze it at once or block by block from the top (guide section 9.1)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
from torch import nn
from typing_extensions import override

from lightning_tricks.functional._checks import check_choice, check_number

__all__ = ["Finetune"]

Backbone = str | Sequence[str] | Callable[[str, nn.Module], bool]
_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm,)


class Finetune(pl.Callback):
    r"""Train the head on a frozen backbone first, then the whole model (ULMFiT's gradual unfreezing optional).

    The backbone is named by module names or a predicate: no ``.backbone`` attribute is needed. Every parameter stays
    in the optimizer for the whole run, in the groups ``configure_optimizers`` built (use
    :func:`lightning_tricks.param_groups` with ``layer_decay`` or ``lr_mult`` for discriminative lrs): a frozen
    parameter just gets no update. So the optimizer's groups, ``WarmupCosine``'s plan and a checkpoint's optimizer
    state stay consistent across the phases; a parameter's optimizer state (Adam's moments) starts when it is unfrozen.

    How a parameter is frozen (``method``):

    * ``"requires_grad"``: ``requires_grad=False`` while frozen, so the backward pass skips the backbone's weight
      gradients (and, for a bottom backbone, its whole backward): the frozen phase is faster. One process only:
      DDP registers the parameters that need gradients when it wraps the model, and a parameter frozen then is never
      synchronised after unfreezing (the cause of Lightning issue 20340, ranks drifting apart).
    * ``"drop_grads"``: gradients are computed and synchronised as usual, and the frozen parameters' gradients are
      set to ``None`` just before each optimizer step, after DDP's all-reduce or FSDP's reduce-scatter. Every rank
      then holds the same weights before and after unfreezing; the frozen phase costs a full step.
    * ``"auto"`` (default): ``requires_grad`` in a single process, ``drop_grads`` under several.

    Args:
        backbone: the module names that make up the backbone, listed from the bottom: each is one block for gradual
            unfreezing (``["features.0", "features.1", "features.2"]``); or one name; or a predicate
            ``(name, module) -> bool`` (the matching modules form one block).
        unfreeze_at: the epoch (or step, with ``unit="step"``) at which the top block is unfrozen; at least 1.
            ``None`` keeps the backbone frozen for the whole fit (a linear probe, or a frozen feature extractor).
        unit: ``"epoch"`` or ``"step"`` (optimizer steps, ``trainer.global_step``).
        unfreeze_every: unfreeze one more block from the top every so many units after ``unfreeze_at``
            (ULMFiT); ``None`` unfreezes every block at ``unfreeze_at``.
        train_bn: keep BatchNorm layers of frozen blocks trainable and updating their running statistics (fastai's
            and Lightning's default); ``False`` freezes their parameters and puts them in eval mode.
        method: ``"auto"``, ``"requires_grad"`` or ``"drop_grads"`` (above).

    Example::

        model = Classifier(backbone=pretrained, head=nn.Linear(64, 5))     # configure_optimizers: adamw(self, lr,
        trainer = pl.Trainer(max_epochs=10, callbacks=[                    #     lr_mult={"backbone": 0.1})
            Finetune(["backbone.0", "backbone.1", "backbone.2"], unfreeze_at=2, unfreeze_every=1), WarmupCosine()])
    """

    def __init__(self, backbone: Backbone, unfreeze_at: int | None = 1, *, unit: str = "epoch",
                 unfreeze_every: int | None = None, train_bn: bool = True, method: str = "auto") -> None:
        if not (callable(backbone) or isinstance(backbone, str) or (
                isinstance(backbone, Sequence) and backbone and all(isinstance(n, str) for n in backbone))):
            raise TypeError(f"`backbone` must be a module name, a non-empty list of names or a predicate "
                            f"(name, module) -> bool, got {backbone!r}.")
        check_choice("unit", unit, ("epoch", "step"))
        if unfreeze_at is not None:
            check_number("unfreeze_at", unfreeze_at, low=0, integer=True)
            if unfreeze_at == 0:
                raise ValueError(f"`unfreeze_at=0` would unfreeze the backbone before any {unit} was trained frozen: "
                                 "give 1 or more, or leave Finetune out to train everything from the start.")
        if unfreeze_every is not None:
            check_number("unfreeze_every", unfreeze_every, low=1, integer=True)
        check_choice("method", method, ("auto", "requires_grad", "drop_grads"))
        self.backbone = [backbone] if isinstance(backbone, str) else backbone
        self.unfreeze_at, self.unit, self.unfreeze_every = unfreeze_at, unit, unfreeze_every
        self.train_bn, self.method = train_bn, method
        self.unfrozen = 0  # blocks unfrozen so far, from the top
        #: The method of the current fit (``"auto"`` resolved at setup): ``"requires_grad"`` or ``"drop_grads"``.
        self.mode: str | None = None
        self._blocks: list[list[nn.Module]] = []
        self._frozen: list[nn.Parameter] = []

    # ------------------------------------------------------------------------------------------------ set-up
    def _find_blocks(self, module: nn.Module) -> list[list[nn.Module]]:
        named = dict(module.named_modules())
        if callable(self.backbone):
            picked = [(n, m) for n, m in named.items() if n and self.backbone(n, m)]
            # the top-most matches only: a match inside another match is already covered
            tops = [m for n, m in picked if not any(n.startswith(o + ".") for o, _ in picked)]
            if not tops:
                raise ValueError(f"`backbone`: the predicate matches no module of {type(module).__name__}.")
            return [tops]
        missing = [n for n in self.backbone if n not in named]
        if missing:
            raise ValueError(f"`backbone`: {missing} match no module of {type(module).__name__}; module names look "
                             f"like {[n for n in named if n][:5]}.")
        return [[named[n]] for n in self.backbone]

    def _block_parameters(self, block: list[nn.Module]) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for module in block:
            for sub in module.modules():
                if self.train_bn and isinstance(sub, _BATCH_NORMS):
                    continue
                params.extend(sub.parameters(recurse=False))
        return params

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.method == "requires_grad" and trainer.world_size > 1:
            raise ValueError(
                f"Finetune(method='requires_grad') under {trainer.world_size} processes: DDP would never synchronise "
                "the parameters frozen when it wraps the model, and the ranks would drift apart after unfreezing. "
                "Use method='drop_grads' (or 'auto')."
            )
        self.mode = self.method if self.method != "auto" else (
            "requires_grad" if trainer.world_size == 1 else "drop_grads")
        self.unfrozen = 0  # a checkpoint's state, restored after setup, may set it

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._blocks = self._find_blocks(pl_module)
        in_optimizer = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        for block in self._blocks:
            for p in self._block_parameters(block):
                if id(p) not in in_optimizer:
                    name = next(n for n, q in pl_module.named_parameters() if q is p)
                    raise ValueError(
                        f"Finetune: the backbone parameter {name!r} is in no optimizer. Build the optimizer over "
                        "every parameter (Finetune freezes and unfreezes them itself); a parameter frozen before "
                        "`configure_optimizers` is left out by it and would never train."
                    )
        frozen = {id(p) for block in self._blocks for p in self._block_parameters(block)}
        if self.unfrozen == 0 and all(id(p) in frozen for p in pl_module.parameters()):
            raise ValueError(
                f"Finetune: the backbone ({self._describe_backbone()}) holds every parameter of "
                f"{type(pl_module).__name__}, so nothing would train while it is frozen. Name the backbone's blocks "
                "only and leave the head out (e.g. `Finetune(backbone=['backbone'])`, not the whole model)."
            )
        self._apply(pl_module, self.unfrozen, force=True)

    def _describe_backbone(self) -> str:
        return repr(self.backbone) if not callable(self.backbone) else "a predicate"

    # ------------------------------------------------------------------------------------------------ phases
    def blocks_to_unfreeze(self, now: int) -> int:
        """How many blocks, from the top, are trainable at epoch (or step) ``now``."""
        if self.unfreeze_at is None or now < self.unfreeze_at:
            return 0
        if self.unfreeze_every is None:
            return len(self._blocks)
        return min(len(self._blocks), 1 + (now - self.unfreeze_at) // self.unfreeze_every)

    def _apply(self, pl_module: pl.LightningModule, unfrozen: int, force: bool = False) -> None:
        if unfrozen == self.unfrozen and not force:
            return
        self.unfrozen = unfrozen
        frozen_blocks = self._blocks[: len(self._blocks) - unfrozen]
        self._frozen = [p for block in frozen_blocks for p in self._block_parameters(block)]
        if self.mode == "requires_grad":
            for block in self._blocks:
                for p in self._block_parameters(block):
                    p.requires_grad_(True)
            for p in self._frozen:
                p.requires_grad_(False)
        if not self.train_bn:
            self._set_bn_modes(pl_module)

    def _set_bn_modes(self, pl_module: pl.LightningModule) -> None:
        for i, block in enumerate(self._blocks):
            frozen = i < len(self._blocks) - self.unfrozen
            for module in block:
                for sub in module.modules():
                    if isinstance(sub, _BATCH_NORMS):
                        sub.train(pl_module.training and not frozen)

    def _now(self, trainer: pl.Trainer) -> int:
        return trainer.current_epoch if self.unit == "epoch" else trainer.global_step

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(pl_module, self.blocks_to_unfreeze(self._now(trainer)))  # the loops' position is restored now

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.unit == "epoch":
            self._apply(pl_module, self.blocks_to_unfreeze(trainer.current_epoch))
        if not self.train_bn:
            self._set_bn_modes(pl_module)  # Lightning put the whole module in train mode

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.unit == "step":
            self._apply(pl_module, self.blocks_to_unfreeze(trainer.global_step))

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.mode == "drop_grads":
            for p in self._frozen:  # no fused form exists for dropping gradients; the list is empty once unfrozen
                p.grad = None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mode == "requires_grad":  # the module leaves the fit as it came in
            for block in self._blocks:
                for p in self._block_parameters(block):
                    p.requires_grad_(True)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"unfrozen": self.unfrozen}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.unfrozen = state_dict["unfrozen"]
