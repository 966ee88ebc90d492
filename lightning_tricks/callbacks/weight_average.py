"""What EMA and SWA share: averaged copies of a module's weights, swapped in for evaluation, kept in checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_tricks._compat import writes_sharded_checkpoint
from lightning_tricks._sharded_state import add_shards, load_shards
from lightning_tricks._sharding import agree_on_buffers, is_sharded, local
from lightning_tricks.functional._checks import check_choice
from lightning_tricks.peers import ChoosesFinalWeights, EvaluatesOtherWeights, find_callbacks
from lightning_tricks.weights import restore_weights, take_weights

CHECKPOINT_WEIGHTS = ("trained", "average")
#: Where a checkpoint whose state_dict holds the average keeps the trained weights.
TRAINED_KEY = "trained_state_dict"


class WeightAverage(EvaluatesOtherWeights, pl.Callback):
    """Base class of :class:`EMA` and :class:`SWA`: float32 averages of every floating tensor of
    ``module.state_dict()`` (parameters and floating buffers such as BatchNorm statistics; integer buffers are copied),
    on the module's device or on ``device``, without a copy of the module (no ``deepcopy``: it works on sharded
    modules, each rank averaging its own shards).

    Subclasses say when to update with :meth:`should_update` (the extension point: override it to average other
    steps or epochs) and update with :meth:`_average_in`.

    Args:
        evaluate_with_average: validation and test run on the averaged weights (swapped in at the start of each
            evaluation and out at its end), so logged metrics, ``ModelCheckpoint`` and ``EarlyStopping`` see the
            average; the optimizer keeps training the raw weights.
        keep_average_at_end: at the end of fit, leave the averaged weights in the module (as Lightning's
            ``WeightAveraging`` does). Skipped when :class:`EarlyStopping` restored its best weights.
        device: where the average lives; ``None`` (default) on the module's device, ``"cpu"`` in host memory (as
            ``timm.utils.ModelEmaV3(device="cpu")``): no accelerator memory, but each update copies the weights to
            the host.
        checkpoint_weights: what a checkpoint's ``state_dict`` holds once an average exists: ``"trained"`` (default:
            the module's own weights; the average is in the callback's state) or ``"average"`` (the averaged weights,
            so ``Net.load_from_checkpoint(path)`` gives the averaged model, as Lightning's ``WeightAveraging``; the
            trained weights go under the checkpoint's ``"trained_state_dict"`` and a resumed fit trains on from
            them). ``"average"`` needs a checkpoint written whole (not ``ModelParallelStrategy``'s distributed
            one) and one such averager per Trainer.
    """

    def __init__(self, evaluate_with_average: bool = True, keep_average_at_end: bool = True,
                 device: torch.device | str | None = None, checkpoint_weights: str = "trained") -> None:
        check_choice("checkpoint_weights", checkpoint_weights, CHECKPOINT_WEIGHTS)
        self.evaluate_with_average = evaluate_with_average
        self.keep_average_at_end = keep_average_at_end
        self.device = torch.device(device) if device is not None else None
        self.checkpoint_weights = checkpoint_weights
        self._from_weights: dict[str, Tensor] | None = None  # an average read from a checkpoint's state_dict
        #: Updates made so far (0: no average yet).
        self.updates = 0
        self._names: list[str] | None = None
        self._targets: list[Tensor] = []  # the module's tensors (local shards), in state_dict order
        self._averages: list[Tensor | None] = []  # float32 averages of the floating ones, None for integer ones
        self._backup: dict[str, Tensor] | None = None
        self._loaded: dict[str, Tensor] | None = None
        self._sharded = False
        self._sharded_checkpoints = False
        self._checkpoint_path: str | Path | None = None

    # ------------------------------------------------------------------ the module's tensors
    def _collect(self, pl_module: pl.LightningModule) -> None:
        """Find the module's tensors (once per fit, at first use: lazy modules are shaped by then)."""
        state = pl_module.state_dict()
        self._names = list(state)
        self._targets = [local(v.detach()) for v in state.values()]
        self._sharded = is_sharded(list(state.values()))
        if self._loaded is not None:  # a checkpoint's averages, waiting for the module's tensors
            self._averages = [self._loaded[k].to(self.device or t.device, torch.float32) if t.is_floating_point()
                              else None for k, t in zip(self._names, self._targets)]
            self._loaded = None
        elif len(self._averages) != len(self._targets):
            self._averages = [torch.empty_like(t, dtype=torch.float32, device=self.device or t.device)
                              if t.is_floating_point() else None for t in self._targets]
        # The (average, module tensor) lists of the floating tensors, made once: each update is one fused call.
        pairs = [(a, t) for a, t in zip(self._averages, self._targets) if a is not None]
        self._float_averages, self._float_targets = [a for a, _ in pairs], [t for _, t in pairs]

    def _average_in(self, pl_module: pl.LightningModule, update: Callable[[list[Tensor], list[Tensor], int], None]
                    ) -> None:
        """One more update: the first copies the module's weights, the next ones call ``update(averages, values, n)``
        with ``n`` the update's number (integer buffers are read from the module whenever the average is used)."""
        if self._names is None:
            self._collect(pl_module)
        self.updates += 1
        averages, values = self._float_averages, self._float_targets
        if self.updates == 1:
            with torch.no_grad():
                if self.device is None:
                    torch._foreach_copy_(averages, values)
                else:  # an average elsewhere (host memory): tensor by tensor
                    for average, value in zip(averages, values):
                        average.copy_(value)
        else:
            update(averages, values, self.updates)

    def should_update(self, step: int | None = None, epoch: int | None = None) -> bool:
        """Whether to update the average after the optimizer step of index ``step`` (0-based: the step just taken)
        or at the end of epoch ``epoch``; :class:`EMA` asks per step, :class:`SWA` per epoch. Override to choose."""
        raise NotImplementedError

    @property
    def has_average(self) -> bool:
        """Whether an average exists (after the first update, or loaded from a checkpoint)."""
        return self.updates > 0

    def _attach(self, pl_module: pl.LightningModule) -> bool:
        """Bind a loaded or existing average to the module's tensors (once per fit); whether there is an average."""
        if self.has_average and self._names is None:
            self._collect(pl_module)
        return self.has_average

    def averaged_state_dict(self) -> dict[str, Tensor]:
        """The averaged weights with the keys of ``module.state_dict()`` (each rank's shards under sharding),
        in the module's dtypes; integer buffers as the module has them."""
        names = self._check_attached()
        return {k: (a.to(t.dtype, copy=True) if a is not None else t.clone())  # copies: the average moves on
                for k, a, t in zip(names, self._averages, self._targets)}

    def _average_views(self) -> dict[str, Tensor]:
        """The average in the module's dtypes, without a copy where the dtype is float32 already."""
        names = self._check_attached()
        return {k: (a.to(t.dtype) if a is not None else t) for k, a, t in zip(names, self._averages, self._targets)}

    def _check_attached(self) -> list[str]:
        if not self.has_average or self._names is None:
            raise RuntimeError(f"{type(self).__name__} has no average yet: it starts after the first update.")
        return self._names

    @override
    def evaluated_state_dict(self, pl_module: pl.LightningModule) -> dict[str, Tensor] | None:
        if not self.evaluate_with_average or not self._attach(pl_module):
            return None
        return self._average_views()

    # ------------------------------------------------------------------ evaluation on the average
    def _swap_in(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.evaluate_with_average or self._backup is not None or not self._attach(pl_module):
            return
        self._backup = take_weights(pl_module)
        restore_weights(pl_module, self._average_views(), owner=type(self).__name__)

    def _swap_out(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._backup is not None:
            restore_weights(pl_module, self._backup, owner=type(self).__name__)
            self._backup = None

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(trainer, pl_module)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out(trainer, pl_module)

    # ------------------------------------------------------------------ fit boundaries
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._sharded_checkpoints = writes_sharded_checkpoint(trainer)
        if self.checkpoint_weights == "average":
            self._check_average_as_weights(trainer)
        if stage == "fit":
            self.updates, self._names, self._targets, self._averages, self._backup = 0, None, [], [], None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._load_average_at_end(trainer, pl_module)

    def _load_average_at_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Leave the average in the module (``keep_average_at_end``); whether it did."""
        if not self.keep_average_at_end or not self._attach(pl_module):
            return False
        if any(cb.chooses_final_weights() for cb in find_callbacks(trainer, ChoosesFinalWeights)):
            # EarlyStopping restores the best check's weights (the averaged ones, when they were evaluated), before
            # or after this callback: the module ends on them whatever the order of the callbacks.
            return False
        restore_weights(pl_module, self._average_views(), owner=type(self).__name__)
        agree_on_buffers(pl_module)  # DDP: each rank's average holds its own last BatchNorm update
        rank_zero_info(f"{type(self).__name__}: the module now holds the averaged weights ({self.updates} updates).")
        return True

    # ------------------------------------------------------------------ checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"updates": self.updates}
        if self.has_average and self.checkpoint_weights == "average":  # see on_save_checkpoint
            state["average_in_weights"] = True
        elif self.has_average and self._names is None and self._loaded is not None:  # resumed, not used since
            state["average"] = self._loaded
        elif self.has_average and not self._sharded and self._names is not None:
            state["average"] = {k: a.detach().cpu() for k, a in zip(self._names, self._averages) if a is not None}
        elif self.has_average and self._sharded_checkpoints:  # each rank's shards: see on_save_checkpoint
            state["average_in_shards"] = True
        return state

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Sharded: every rank writes its shards of the average beside the module's (Lightning writes the rest of
        # a callback's state from rank 0 only)
        if self.has_average and self._sharded_checkpoints and self._attach(pl_module) and self._sharded:
            assert self._names is not None
            shards = {k: a for k, a in zip(self._names, self._averages) if a is not None}
            add_shards(checkpoint, self.state_key, shards, pl_module.state_dict())
        if self.checkpoint_weights == "average" and self._attach(pl_module):
            checkpoint[TRAINED_KEY] = checkpoint["state_dict"]
            checkpoint["state_dict"] = self.averaged_state_dict()  # the module's keys and dtypes; copies

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._checkpoint_path = trainer.ckpt_path
        trained = checkpoint.get(TRAINED_KEY)
        if trained is not None:  # Lightning loaded the average into the module: train on from the trained weights
            self._from_weights = {k: v.float() for k, v in checkpoint["state_dict"].items() if v.is_floating_point()}
            restore_weights(pl_module, trained, owner=type(self).__name__)

    def _check_average_as_weights(self, trainer: pl.Trainer) -> None:
        name = type(self).__name__
        if self._sharded_checkpoints:
            raise ValueError(
                f"{name}(checkpoint_weights='average') needs a checkpoint written whole, but ModelParallelStrategy "
                "writes a distributed one: keep checkpoint_weights='trained' (the average is in the checkpoint's "
                f"callback state) and load it with `{name.lower()}.averaged_state_dict()`, or pass "
                "ModelParallelStrategy(save_distributed_checkpoint=False)."
            )
        others = [cb for cb in find_callbacks(trainer, WeightAverage)
                  if cb is not self and cb.checkpoint_weights == "average"]
        if others:
            raise ValueError(f"{name}(checkpoint_weights='average') and {type(others[0]).__name__}(checkpoint_weights="
                             "'average'): a checkpoint's state_dict can hold one average; keep one of them.")

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates = state_dict.get("updates", 0)
        self._loaded = state_dict.get("average")
        if state_dict.get("average_in_weights"):
            self._loaded, self._from_weights = self._from_weights, None
        self._names = None
        self._shards_pending = bool(state_dict.get("average_in_shards"))
        if self.updates and self._loaded is None and not self._shards_pending:
            self.updates = 0
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint holds no average (written under sharded training without a "
                "distributed checkpoint, or by an older version): the average restarts at the next update."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the restore on every strategy (ModelParallelStrategy restores after setup): read the shards now,
        # every rank together
        if self.__dict__.pop("_shards_pending", False):
            like = pl_module.state_dict()
            names = [k for k, v in like.items() if v.is_floating_point()]
            assert self._checkpoint_path is not None  # set by on_load_checkpoint
            self._loaded = load_shards(self._checkpoint_path, self.state_key, names, like, torch.float32)
            self._names = None
        self._attach(pl_module)  # a resumed average goes in place now, so it is usable from the first batch
