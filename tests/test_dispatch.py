"""Lightning dispatches to our callbacks only the per-batch hooks they implement (and users can still override)."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Generator
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.profilers import Profiler

from lightning_tricks import (
    EarlyStopping,
    GradientMonitor,
    LabelSmoothing,
    Mixup,
    TrainingDoctor,
    WarmupCosine,
)
from lightning_tricks.callbacks._dispatch import PER_BATCH_HOOKS
from tests.conftest import TinyNet, loader, quiet_trainer


class CountingProfiler(Profiler):
    """Counts the actions Lightning profiles: its dispatcher names each callback call ``[Callback]<key>.<hook>``."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    @contextlib.contextmanager
    def profile(self, action_name: str) -> Generator:
        self.counts[action_name] += 1
        yield action_name

    def start(self, action_name: str) -> None:
        pass

    def stop(self, action_name: str) -> None:
        pass

    def summary(self) -> str:
        return ""


def recipe_six() -> list[pl.Callback]:
    return [WarmupCosine(warmup=0.1), LabelSmoothing(0.1), Mixup(alpha=0.2), GradientMonitor(log_every_n_steps=4),
            EarlyStopping("train_loss_epoch", strict=False), TrainingDoctor()]


def dispatched(profiler: CountingProfiler, callback: pl.Callback) -> set[str]:
    prefix = f"[Callback]{callback.state_key}."
    return {k[len(prefix):] for k in profiler.counts if k.startswith(prefix)}


def test_only_implemented_batch_hooks_are_dispatched() -> None:
    callbacks = recipe_six()
    plain = pl.Callback()
    profiler = CountingProfiler()
    trainer = quiet_trainer(max_epochs=2, callbacks=[*callbacks, plain], profiler=profiler)
    trainer.fit(TinyNet(), loader(), loader(n=16))
    expected = {
        WarmupCosine: {"on_train_batch_end"},  # sets the next step's lr as the counter moves
        LabelSmoothing: set(),  # acts through the mixin's seam
        Mixup: set(),
        GradientMonitor: {"on_before_optimizer_step"},  # on a GPU also on_train_batch_end (its flag copy)
        EarlyStopping: set(),
        TrainingDoctor: {"on_train_batch_end"},
    }
    for cb in callbacks:
        per_batch = dispatched(profiler, cb) & set(PER_BATCH_HOOKS)
        assert per_batch == expected[type(cb)], type(cb).__name__
        assert "on_train_epoch_end" in dispatched(profiler, cb)  # the other hooks still arrive
    # Other callbacks still get every hook: only our own instances change.
    train_hooks = {h for h in PER_BATCH_HOOKS if not h.startswith(("on_test", "on_predict"))}
    assert dispatched(profiler, plain) >= train_hooks
    assert profiler.counts["[Callback]Callback.on_before_zero_grad"] == trainer.global_step == 16


class NoisyMixup(Mixup):
    """A user subclass that overrides a hook Mixup itself does not implement, calling super() as it should."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.zero_grads = 0

    def on_before_zero_grad(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        super().on_before_zero_grad(trainer, pl_module, optimizer)
        self.zero_grads += 1


def test_subclass_override_is_kept_and_super_works() -> None:
    cb = NoisyMixup(alpha=0.2)
    assert "on_before_zero_grad" not in vars(cb)
    assert vars(cb)["on_after_backward"] is None
    trainer = quiet_trainer(max_steps=5, callbacks=[cb])
    trainer.fit(TinyNet(), loader())
    assert cb.zero_grads == 5
