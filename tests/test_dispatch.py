"""Lightning dispatches to our callbacks only the per-batch hooks they implement (and users can still override)."""

from __future__ import annotations

import contextlib
import pickle
from collections import Counter
from collections.abc import Generator
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.profilers import Profiler

from lightning_tricks import (
    EarlyStopping,
    GradientMonitor,
    LabelSmoothing,
    Mixup,
    TrainingDoctor,
    WarmupCosine,
)
from lightning_tricks.callbacks._dispatch import PER_BATCH_HOOKS, SharedBatchEnd, global_step_progress
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


class StepRecord(pl.Callback):
    """Checks, at every batch end, that the kept progress record reads what trainer.global_step reads."""

    def __init__(self) -> None:
        self.record: Any = None
        self.checked = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record = global_step_progress(trainer, pl_module)
        assert self.record is not None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        assert self.record.completed == trainer.global_step
        self.checked += 1


class ManualNet(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        opt = self.optimizers()
        x, y = batch
        loss = self.tricks_loss(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


def test_global_step_record_follows_the_counter(tmp_path: Any) -> None:
    """Through epochs, gradient accumulation, a resume into a longer run and manual optimization."""
    rec = StepRecord()
    trainer = quiet_trainer(max_epochs=2, accumulate_grad_batches=3, callbacks=[rec], enable_checkpointing=True,
                            default_root_dir=str(tmp_path))
    trainer.fit(TinyNet(), loader())
    assert rec.checked == 16 and trainer.global_step == 6
    ckpt = str(tmp_path / "mid.ckpt")
    trainer.save_checkpoint(ckpt)
    resumed = StepRecord()
    again = quiet_trainer(max_epochs=3, accumulate_grad_batches=3, callbacks=[resumed])
    again.fit(TinyNet(), loader(), ckpt_path=ckpt)
    assert resumed.checked == 8 and again.global_step == 9
    manual = StepRecord()
    quiet_trainer(max_steps=5, callbacks=[manual]).fit(ManualNet(), loader())
    assert manual.checked == 5


class BatchEndLog(pl.Callback):
    """Another library's batch-end hook: records the lr it sees and how many doctor records exist by then."""

    def __init__(self, doctor: TrainingDoctor) -> None:
        self.doctor = doctor
        self.seen: list[tuple[float, int]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.seen.append((trainer.optimizers[0].param_groups[0]["lr"], len(self.doctor._steps)))


def test_neighbouring_batch_end_hooks_share_one_dispatch_in_order() -> None:
    callbacks = recipe_six()
    schedule, doctor = callbacks[0], callbacks[-1]
    after = BatchEndLog(doctor)
    trainer = quiet_trainer(max_epochs=1, callbacks=[*callbacks, after])
    trainer.fit(TinyNet(), loader())
    # Grouped: the schedule's hook runs the doctor's too; the callbacks in between have none (the monitor on a CPU).
    shared = vars(schedule)["on_train_batch_end"]
    assert isinstance(shared, SharedBatchEnd) and [cb for _, cb in shared.hooks] == [schedule, doctor]
    assert vars(doctor)["on_train_batch_end"] is None
    # Both ran at every batch before the later callback: it sees the next step's lr and the doctor's new record.
    base = schedule.base_lrs[0][0]
    assert after.seen == [(pytest.approx(base * schedule.lr_factor(i + 1)), i + 1) for i in range(8)]


def test_a_foreign_batch_end_hook_between_keeps_lightnings_order() -> None:
    callbacks = recipe_six()
    schedule, doctor = callbacks[0], callbacks[-1]
    between = BatchEndLog(doctor)
    trainer = quiet_trainer(max_epochs=1, callbacks=[*callbacks[:-1], between, doctor])
    trainer.fit(TinyNet(), loader())
    assert "on_train_batch_end" not in vars(schedule) and "on_train_batch_end" not in vars(doctor)
    base = schedule.base_lrs[0][0]
    # After the schedule's hook (the new lr), before the doctor's (its record of this batch not yet there).
    assert between.seen == [(pytest.approx(base * schedule.lr_factor(i + 1)), i) for i in range(8)]


def test_grouped_callbacks_pickle_and_regroup_per_fit() -> None:
    callbacks = recipe_six()
    trainer = quiet_trainer(max_epochs=1, callbacks=callbacks)  # GradientMonitor's per-fit caches included
    trainer.fit(TinyNet(), loader())
    copies = pickle.loads(pickle.dumps(callbacks))
    shared = vars(copies[0])["on_train_batch_end"]
    assert [cb for _, cb in shared.hooks] == [copies[0], copies[-1]]
    # A later fit with a profiler: every callback back to its own hook (its time under its own name).
    profiler = CountingProfiler()
    quiet_trainer(max_epochs=1, callbacks=copies, profiler=profiler).fit(TinyNet(), loader())
    assert "on_train_batch_end" not in vars(copies[0]) and "on_train_batch_end" not in vars(copies[-1])
    assert profiler.counts["[Callback]TrainingDoctor.on_train_batch_end"] == 8
    assert len(copies[-1].history) == 1 and copies[-1].history[0].nonfinite_loss_steps == 0


class FlagHookMonitor(GradientMonitor):
    """GradientMonitor as on a single GPU, where it keeps its batch-end hook (the flag check; a no-op on a CPU)."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self.wants_train_batch_end = True


def test_three_batch_end_hooks_share_one_dispatch_as_on_a_gpu() -> None:
    callbacks = recipe_six()
    callbacks[3] = monitor = FlagHookMonitor(log_every_n_steps=4)
    trainer = quiet_trainer(max_epochs=1, callbacks=callbacks)
    trainer.fit(TinyNet(), loader())
    shared = vars(callbacks[0])["on_train_batch_end"]
    assert [cb for _, cb in shared.hooks] == [callbacks[0], monitor, callbacks[-1]]
    assert vars(monitor)["on_train_batch_end"] is None and vars(callbacks[-1])["on_train_batch_end"] is None
    # A CPU fit of the plain monitor afterwards: hidden again (it wants no batch-end hook there).
    plain = GradientMonitor()
    quiet_trainer(max_epochs=1, callbacks=[callbacks[0], plain, callbacks[-1]]).fit(TinyNet(), loader())
    assert vars(plain)["on_train_batch_end"] is None
    assert [cb for _, cb in vars(callbacks[0])["on_train_batch_end"].hooks] == [callbacks[0], callbacks[-1]]
