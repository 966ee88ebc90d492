"""WarmupCosine through a real Trainer: precision, accumulation, resume, DDP, lr groups, bad input."""

from __future__ import annotations

import math
import os
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, IterableDataset

from lightning_tricks import TrainingDoctor, WarmupCosine
from lightning_tricks.functional import warmup_cosine
from tests.conftest import LrRecorder, TinyNet, loader, quiet_trainer


def expected(step: int, total: int, warmup: int, base: float, **kw: Any) -> float:
    return base * warmup_cosine(step, total_steps=total, warmup_steps=warmup, **kw)


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
@pytest.mark.parametrize("accumulate", [1, 3])
def test_lr_follows_optimizer_steps(precision: str, accumulate: int) -> None:
    rec = LrRecorder()
    # 8 batches per epoch, 3 epochs: ceil(8 / k) steps per epoch (Lightning steps on the last batch).
    trainer = quiet_trainer(max_epochs=3, precision=precision, accumulate_grad_batches=accumulate,
                            callbacks=[WarmupCosine(warmup=0.25, min_lr_ratio=0.1), rec])
    trainer.fit(TinyNet(lr=0.05), loader(64, 8))
    total = 3 * math.ceil(8 / accumulate)
    assert trainer.global_step == total == len(rec.steps)
    assert rec.steps == list(range(total))
    warmup = round(0.25 * total)
    for step, (lr,) in zip(rec.steps, rec.lrs):
        assert lr == pytest.approx(expected(step, total, warmup, 0.05, min_lr_ratio=0.1), abs=1e-12)


def test_same_curve_for_any_accumulation_and_batch_limit() -> None:
    curves = []
    for accumulate, limit in [(1, 4), (2, 8), (4, 16)]:  # 4 optimizer steps per epoch in each case
        rec = LrRecorder()
        trainer = quiet_trainer(max_epochs=3, accumulate_grad_batches=accumulate, limit_train_batches=limit,
                                callbacks=[WarmupCosine(warmup=3), rec])
        trainer.fit(TinyNet(), loader(128, 8))
        curves.append([lr for (lr,) in rec.lrs])
    assert len(curves[0]) == 12
    assert curves[0] == pytest.approx(curves[1], abs=0) and curves[0] == pytest.approx(curves[2], abs=0)


def test_max_steps_sets_the_total() -> None:
    rec = LrRecorder()
    trainer = quiet_trainer(max_steps=10, callbacks=[WarmupCosine(warmup=2), rec])
    trainer.fit(TinyNet(lr=0.1), loader(64, 8))
    assert [lr for (lr,) in rec.lrs] == pytest.approx([expected(s, 10, 2, 0.1) for s in range(10)], abs=1e-12)
    assert rec.lrs[0][0] == pytest.approx(0.1 / 3)  # default start factor 1/(W+1): the first step is not wasted


def test_each_group_keeps_its_own_base_lr() -> None:
    rec = LrRecorder()
    trainer = quiet_trainer(max_steps=12, callbacks=[WarmupCosine(warmup=0.25), rec])
    trainer.fit(TinyNet(group_lrs=(0.01, 0.1)), loader(64, 8))
    assert len(rec.steps) == len(rec.lrs) == 12
    for step, (a, b) in zip(rec.steps, rec.lrs):
        assert a == pytest.approx(expected(step, 12, 3, 0.01), abs=1e-12)
        assert b == pytest.approx(expected(step, 12, 3, 0.1), abs=1e-12)
        assert b / a == pytest.approx(10.0)


def test_learning_rate_monitor_logs_the_lr_used(tmp_path: Any) -> None:
    rec = LrRecorder()
    # The monitor comes first, so its batch-start hook runs before ours: the value must already be set.
    monitor = LearningRateMonitor(logging_interval="step")
    trainer = quiet_trainer(max_steps=8, log_every_n_steps=1, logger=CSVLogger(tmp_path),
                            callbacks=[monitor, WarmupCosine(warmup=3), rec])
    trainer.fit(TinyNet(lr=0.1), loader(64, 8))
    import csv

    with open(os.path.join(trainer.logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    logged = [float(r["lr-AdamW"]) for r in rows if r.get("lr-AdamW")]
    assert logged == pytest.approx([lr for (lr,) in rec.lrs], abs=1e-12)


def _run_with_checkpoints(tmp_path: Any, ckpt_path: str | None = None, **kw: Any) -> tuple[pl.Trainer, LrRecorder]:
    rec = LrRecorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1, filename="{step}")
    trainer = quiet_trainer(max_epochs=4, accumulate_grad_batches=2, enable_checkpointing=True,
                            callbacks=[WarmupCosine(warmup=0.2, min_lr_ratio=0.05), rec, ckpt], **kw)
    pl.seed_everything(1, verbose=False)
    trainer.fit(TinyNet(lr=0.02), loader(64, 8), ckpt_path=ckpt_path)
    return trainer, rec


def test_resume_mid_run_continues_the_exact_lrs(tmp_path: Any) -> None:
    _, full = _run_with_checkpoints(tmp_path / "a")
    assert len(full.lrs) == 16
    _, resumed = _run_with_checkpoints(tmp_path / "b", ckpt_path=str(tmp_path / "a" / "step=5.ckpt"))
    assert resumed.steps == full.steps[5:]
    for got, want in zip(resumed.lrs, full.lrs[5:]):
        assert abs(got[0] - want[0]) <= 1e-12


def test_resume_with_other_max_epochs_keeps_the_plan_and_warns(tmp_path: Any) -> None:
    _, full = _run_with_checkpoints(tmp_path / "a")
    with pytest.warns(UserWarning, match="keeping 16"):
        resumed = _resume_longer(tmp_path / "a" / "step=10.ckpt")
    assert resumed.steps == list(range(10, 24))
    assert resumed.lrs[0][0] == pytest.approx(full.lrs[10][0], abs=1e-12)
    assert resumed.lrs[-1][0] == pytest.approx(0.02 * 0.05, abs=1e-12)  # past the planned end: min lr


def _resume_longer(ckpt_path: Any) -> LrRecorder:
    """Resume the 16-step run with max_epochs=6 (24 steps) and no explicit total."""
    rec = LrRecorder()
    trainer = quiet_trainer(max_epochs=6, accumulate_grad_batches=2,
                            callbacks=[WarmupCosine(warmup=0.2, min_lr_ratio=0.05), rec])
    trainer.fit(TinyNet(lr=0.02), loader(64, 8), ckpt_path=str(ckpt_path))
    return rec


# ------------------------------------------------------------------------------------------- DDP
class _AssertLrs(pl.Callback):
    """Runs inside each DDP worker: the lr of every step equals the formula on every rank."""

    def __init__(self) -> None:
        self.rec = LrRecorder()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.rec.on_before_optimizer_step(trainer, pl_module, optimizer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # 64 samples, 2 ranks, batch 8 -> 4 batches per rank per epoch, k=2 -> 2 steps per epoch, 3 epochs.
        assert trainer.world_size == 2
        assert trainer.global_step == 6 == len(self.rec.lrs)
        for step, (lr,) in zip(self.rec.steps, self.rec.lrs):
            assert abs(lr - expected(step, 6, 2, 0.05)) <= 1e-12
        gathered = trainer.strategy.all_gather(torch.tensor([lr for (lr,) in self.rec.lrs], dtype=torch.float64))
        assert torch.equal(gathered[0], gathered[1])


class _AssertDoctorRecords(pl.Callback):
    """Runs inside each DDP worker: the doctor saw every batch of every epoch."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        doctor = trainer.callbacks[2]
        assert [r.step for r in doctor.history] == [2, 4, 6]
        # The mean of the step losses it kept is the epoch's logged train loss (this rank's): it saw every batch.
        assert all(r.nonfinite_loss_steps == 0 and r.train_loss is not None for r in doctor.history)
        assert all(abs(r.step_loss_mean - r.train_loss) < 1e-6 for r in doctor.history)


def test_ddp_two_cpu_processes() -> None:
    trainer = quiet_trainer(devices=2, strategy="ddp_fork", max_epochs=3, accumulate_grad_batches=2,
                            callbacks=[WarmupCosine(warmup=2), _AssertLrs(), TrainingDoctor(min_epochs=3),
                                       _AssertDoctorRecords()])
    trainer.fit(TinyNet(lr=0.05), loader(64, 8))
    assert trainer.state.finished


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(warmup=-1), ValueError, r"`warmup` must be in \[0, inf\], got -1"),
        (dict(warmup=1.0), ValueError, r"fraction of the run in \[0.0, 1.0\).*int: warmup=500 is 500 steps\), got 1.0"),
        (dict(warmup=-0.1), ValueError, "`warmup`"),
        (dict(warmup="10"), TypeError, "`warmup`"),
        (dict(min_lr_ratio=1.5), ValueError, r"`min_lr_ratio` must be in \[0.0, 1.0\], got 1.5"),
        (dict(min_lr_ratio=-0.1), ValueError, "`min_lr_ratio`"),
        (dict(start_factor=2.0), ValueError, "`start_factor`"),
        (dict(total_steps=0), ValueError, "`total_steps`"),
        (dict(warmup=10, total_steps=10), ValueError, "shorter than `total_steps`"),
    ],
)
def test_bad_construction(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        WarmupCosine(**kwargs)


def test_warmup_longer_than_the_run() -> None:
    trainer = quiet_trainer(max_steps=5, callbacks=[WarmupCosine(warmup=5)])
    with pytest.raises(ValueError, match=r"shorter than the run \(5 optimizer steps\)"):
        trainer.fit(TinyNet(), loader())


class _Endless(IterableDataset):
    def __iter__(self):  # type: ignore[no-untyped-def]
        while True:
            yield torch.randn(1, 16), torch.tensor(0)


def test_infinite_run_is_refused() -> None:
    trainer = quiet_trainer(max_epochs=-1, callbacks=[WarmupCosine()])
    with pytest.raises(ValueError, match="finite run length"):
        trainer.fit(TinyNet(), DataLoader(_Endless(), batch_size=4))


class _WithScheduler(TinyNet):
    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1)]


def test_existing_scheduler_is_refused() -> None:
    trainer = quiet_trainer(max_epochs=1, callbacks=[WarmupCosine()])
    with pytest.raises(ValueError, match="already has an lr scheduler"):
        trainer.fit(_WithScheduler(), loader())


def test_gradient_accumulation_scheduler_is_refused() -> None:
    trainer = quiet_trainer(max_epochs=2, callbacks=[WarmupCosine(), GradientAccumulationScheduler({1: 2})])
    with pytest.raises(ValueError, match="GradientAccumulationScheduler"):
        trainer.fit(TinyNet(), loader())


class _ManualNet(TinyNet):
    def __init__(self) -> None:
        super().__init__(lr=0.05)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


@pytest.mark.parametrize("manual", [False, True])
def test_manual_optimization_gets_the_same_curve(manual: bool) -> None:
    lrs: list[float] = []

    class Before(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    model = _ManualNet() if manual else TinyNet(lr=0.05)
    quiet_trainer(max_steps=12, callbacks=[WarmupCosine(warmup=3, min_lr_ratio=0.1), Before()]).fit(model, loader())
    assert lrs == pytest.approx([expected(s, 12, 3, 0.05, min_lr_ratio=0.1) for s in range(12)], abs=1e-12)


def test_a_schedule_taken_off_the_trainer_stops() -> None:
    lrs: list[float] = []
    schedule = WarmupCosine(warmup=0, min_lr_ratio=0.0)

    class Remove(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
            if trainer.global_step == 3:
                trainer.callbacks.remove(schedule)

    doctor = TrainingDoctor(min_epochs=1)
    quiet_trainer(max_epochs=2, callbacks=[schedule, doctor, Remove()]).fit(TinyNet(lr=0.05), loader(24, 8))
    curve = [expected(s, 6, 0, 0.05) for s in range(6)]
    assert lrs[:4] == pytest.approx(curve[:4], abs=1e-12)
    assert lrs[4:] == pytest.approx([curve[3]] * 2, abs=1e-12)  # frozen at the last lr it set
    # Regression: the doctor's per-batch records used to stop once the schedule (which ran its hook) was removed.
    assert [r.step for r in doctor.history] == [3, 6]
    assert all(abs(r.step_loss_mean - r.train_loss) < 1e-6 for r in doctor.history)

