"""GradientMonitor: norms against torch's references, once per optimizer step, no host reads between
logging steps, non-finite handling, 16-mixed with a real scaler, DDP."""

from __future__ import annotations

import os
import traceback
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from lightning_tricks import GradientMonitor, NonFiniteGradientError
from lightning_tricks.functional.gradients import GradientLayout
from tests.conftest import MetricsRecorder, TinyNet, loader, quiet_trainer


def test_layout_groups_by_top_level_module() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    layout = GradientLayout.from_module(model)
    assert layout.names == ["0", "2"] and layout.group_of == [0, 0, 1, 1]
    assert layout.index_on(torch.device("cpu")).tolist() == [0, 0, 1, 1]


class Reference(pl.Callback):
    """Records torch's reference total norm of the (unscaled, accumulated) gradients at each optimizer step."""

    def __init__(self) -> None:
        self.norms: list[float] = []
        self.groups: list[list[float]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.norms.append(torch.nn.utils.get_total_norm([p.grad for p in pl_module.parameters()]).item())
        self.groups.append([torch.nn.utils.get_total_norm([p.grad for p in m.parameters()]).item()
                            for m in (pl_module.conv, pl_module.head)])


def _cpu_fp16_plugin() -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))


@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("accumulate", [1, 4])
def test_norms_equal_reference_once_per_step(precision: str, accumulate: int) -> None:
    ref, mon, rec = Reference(), GradientMonitor(log_every_n_steps=1), MetricsRecorder()
    kw: dict[str, Any] = {"plugins": [_cpu_fp16_plugin()]} if precision == "16-mixed" else {"precision": precision}
    trainer = quiet_trainer(logger=rec, max_epochs=2, accumulate_grad_batches=accumulate, callbacks=[ref, mon], **kw)
    trainer.fit(TinyNet(), loader(64, 8))
    steps = 2 * (8 // accumulate)
    assert trainer.global_step == steps == len(ref.norms) == len(rec.history())  # one record per optimizer step
    assert len(rec.history()) == steps
    for r, m, groups in zip(ref.norms, rec.history(), ref.groups):
        assert m["grad/norm"] == pytest.approx(r, rel=1e-5)  # unscaled, accumulated
        assert m["grad/norm/conv"] == pytest.approx(groups[0], rel=1e-5)
        assert m["grad/norm/head"] == pytest.approx(groups[1], rel=1e-5)
    if precision == "16-mixed":
        assert all("amp/loss_scale" in m for m in rec.history())


class SometimesUnusedHead(TinyNet):
    """A second head used on odd steps only: on even steps its parameters get no gradient at all."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        out = self.head(h)
        return out + self.extra(h) if self.trainer.global_step % 2 else out


def test_parameters_without_gradient_count_as_zero() -> None:
    class Ref(Reference):
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
            self.norms.append(torch.nn.utils.get_total_norm(
                [p.grad for p in pl_module.parameters() if p.grad is not None]).item())
            extra = [p.grad for p in pl_module.extra.parameters() if p.grad is not None]
            self.groups.append([torch.nn.utils.get_total_norm(extra).item() if extra else 0.0])

    ref, mon, rec = Ref(), GradientMonitor(log_every_n_steps=1), MetricsRecorder()
    model = SometimesUnusedHead()
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.01)  # type: ignore[method-assign]
    trainer = quiet_trainer(logger=rec, max_steps=4, callbacks=[ref, mon])
    trainer.fit(model, loader(64, 8))
    assert [g[0] == 0.0 for g in ref.groups] == [True, False, True, False]  # the case under test happened
    assert len(rec.history()) == 4
    for r, m, groups in zip(ref.norms, rec.history(), ref.groups):
        assert m["grad/norm"] == pytest.approx(r, rel=1e-5)
        assert m["grad/norm/extra"] == pytest.approx(groups[0], rel=1e-5, abs=1e-12)


def test_low_precision_parameters() -> None:
    """bf16-true: parameters and gradients in bf16, norms kept in float32 (the non-stacking path)."""
    ref, mon, rec = Reference(), GradientMonitor(log_every_n_steps=1), MetricsRecorder()
    trainer = quiet_trainer(logger=rec, max_steps=3, precision="bf16-true", callbacks=[ref, mon])
    trainer.fit(TinyNet(), loader(64, 8))
    assert len(rec.history()) == 3
    for r, m in zip(ref.norms, rec.history()):
        assert m["grad/norm"] == pytest.approx(r, rel=2e-2)  # bf16 per-parameter norms: ~3 significant digits


class FusedNet(TinyNet):
    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=0.01, fused=True)


def test_fused_optimizer_under_16_mixed_is_unscaled() -> None:
    ref, mon, rec = Reference(), GradientMonitor(log_every_n_steps=1), MetricsRecorder()
    trainer = quiet_trainer(logger=rec, max_steps=4, callbacks=[ref, mon], plugins=[_cpu_fp16_plugin()])
    trainer.fit(FusedNet(), loader())
    scale = trainer.precision_plugin.scaler.get_scale()
    assert len(rec.history()) == len(ref.norms) == 4
    for r, m in zip(ref.norms, rec.history()):  # the reference sees scaled grads here; ours divides by the scale
        assert m["grad/norm"] == pytest.approx(r / scale, rel=1e-4)


def test_clipping_reports_post_clip_norm_and_fraction() -> None:
    ref, mon, rec = Reference(), GradientMonitor(log_every_n_steps=4), MetricsRecorder()
    trainer = quiet_trainer(logger=rec, max_steps=8, gradient_clip_val=0.05, callbacks=[ref, mon])
    trainer.fit(TinyNet(), loader())
    assert len(rec.history()) == 2  # two intervals of 4 steps
    for m, step in zip(rec.history(), rec.steps()):
        pre = ref.norms[step]
        assert m["grad/norm_clipped"] == pytest.approx(min(pre, 0.05), rel=1e-3)
        window = ref.norms[step - 3: step + 1]
        assert m["grad/clip_fraction"] == pytest.approx(sum(n > 0.05 for n in window) / 4)
        assert m["grad/norm_max"] == pytest.approx(max(window), rel=1e-5)


class HostReadCounter(pl.Callback):
    """Counts Tensor.item/tolist/__bool__/cpu/numpy calls made by lightning_tricks code (directly or through
    the functions it calls) between the ends of two consecutive training batches: the data transfer and the batch
    seam, every hook and the optimizer step. Put it last in the callbacks. Windows that hold a logging step or an
    epoch boundary (where host reads are allowed) are not recorded. Calls from other code (torch's optimizers read
    their CPU step counters with .item()) are the same with or without the tricks and are not counted."""

    NAMES = ("item", "tolist", "__bool__", "cpu", "numpy")

    def __init__(self) -> None:
        self.counts: list[int] = []
        self._orig: dict[str, Any] = {}
        self.n = 0

    def _install(self) -> None:
        self.n = 0
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)
            self._orig[name] = orig

            def counted(t: torch.Tensor, *a: Any, _orig: Any = orig, **k: Any) -> Any:
                stack = traceback.extract_stack()
                if any(f"{os.sep}lightning_tricks{os.sep}" in frame.filename for frame in stack):
                    self.n += 1
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, counted)

    def _uninstall(self) -> None:
        for name, orig in self._orig.items():
            setattr(torch.Tensor, name, orig)
        self._orig = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._orig:
            self._uninstall()
            logging_step = trainer.global_step % trainer.log_every_n_steps == 0
            if not logging_step and batch_idx != 0:
                self.counts.append(self.n)
        self._install()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._uninstall()


def test_no_host_read_between_logging_steps() -> None:
    from lightning_tricks import EarlyStopping, LabelSmoothing, Mixup, TrainingDoctor, WarmupCosine

    counter = HostReadCounter()
    trainer = quiet_trainer(max_steps=30, log_every_n_steps=5, gradient_clip_val=1.0, limit_val_batches=1,
                            callbacks=[WarmupCosine(), GradientMonitor(), Mixup(), LabelSmoothing(), TrainingDoctor(),
                                       EarlyStopping("val_loss"), counter])
    trainer.fit(TinyNet(), loader(80, 8), loader(16, 8))
    assert len(counter.counts) >= 18  # 30 steps, minus 6 logging steps and 2 epoch boundaries
    assert counter.counts == [0] * len(counter.counts)


class NaNAt(TinyNet):
    """Makes the head's gradient non-finite at one optimizer step."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.bad_step = step

    def on_after_backward(self) -> None:
        if self.trainer.global_step == self.bad_step:
            self.head.weight.grad[0, 0] = float("inf")


def test_stop_on_nonfinite_leaves_a_checkpoint_and_names_the_group(tmp_path: Any) -> None:
    mon = GradientMonitor(on_nonfinite="stop")
    model = NaNAt(step=5)
    trainer = quiet_trainer(max_epochs=5, default_root_dir=tmp_path, callbacks=[mon])
    with pytest.warns(UserWarning, match=r"non-finite gradients at optimizer step 5 in group\(s\) head"):
        trainer.fit(model, loader(64, 8))
    assert mon.stopped_step == 5 and trainer.global_step == 6
    assert os.path.exists(mon.checkpoint_path)
    ckpt = torch.load(mon.checkpoint_path, weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad update was skipped
    assert "finite weights" in mon.stop_message


def test_raise_on_nonfinite() -> None:
    with pytest.raises(NonFiniteGradientError, match="step 2 in group"):
        quiet_trainer(max_steps=6, callbacks=[GradientMonitor(on_nonfinite="raise")]).fit(NaNAt(2), loader())


def test_warn_on_nonfinite_goes_on() -> None:
    trainer = quiet_trainer(max_steps=6, callbacks=[GradientMonitor(on_nonfinite="warn")])
    with pytest.warns(UserWarning, match="Training goes on"):
        trainer.fit(NaNAt(2), loader())
    assert trainer.global_step == 6


def test_16_mixed_skipped_steps_are_counted_not_flagged() -> None:
    mon, rec = GradientMonitor(log_every_n_steps=3, on_nonfinite="raise"), MetricsRecorder()
    trainer = quiet_trainer(logger=rec, max_steps=6, callbacks=[mon], plugins=[_cpu_fp16_plugin()])
    trainer.fit(NaNAt(1), loader())  # GradScaler skips that step: normal under 16-mixed
    assert rec.history()[0]["amp/skipped_steps"] == 1.0 and rec.history()[1]["amp/skipped_steps"] == 0.0
    assert rec.history()[0]["amp/loss_scale"] < 1024.0


class Vanishing(TinyNet):
    """Scales the conv layer's gradient down by 1e-5 after step 10."""

    def on_after_backward(self) -> None:
        if self.trainer.global_step >= 10:
            for p in self.conv.parameters():
                p.grad.mul_(1e-5)


def test_vanishing_group_is_flagged() -> None:
    mon, rec = GradientMonitor(log_every_n_steps=2, baseline_steps=5, patience=2), MetricsRecorder()
    trainer = quiet_trainer(logger=rec, max_steps=24, callbacks=[mon])
    with pytest.warns(UserWarning, match="gradients of 'conv' are vanishing"):
        trainer.fit(Vanishing(), loader(64, 8))
    flagged = [m.get("grad/vanishing/conv") for m in rec.history()]
    assert 1.0 in flagged and all(m.get("grad/vanishing/head") is None for m in rec.history())


class _DDPCheck(pl.Callback):
    def __init__(self) -> None:
        self.ref = Reference()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.ref.on_before_optimizer_step(trainer, pl_module, optimizer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        history = trainer.logger.history()
        assert len(history) == trainer.global_step == 4
        for r, m in zip(self.ref.norms, history):
            assert abs(m["grad/norm"] - r) <= 1e-5 * r  # all-reduced gradients, same on every rank
        norms = torch.tensor([m["grad/norm"] for m in history], dtype=torch.float64)
        gathered = trainer.strategy.all_gather(norms)
        assert torch.equal(gathered[0], gathered[1])


def test_ddp_two_cpu_processes() -> None:
    trainer = quiet_trainer(devices=2, strategy="ddp_fork", max_epochs=1, accumulate_grad_batches=2,
                            logger=MetricsRecorder(), callbacks=[GradientMonitor(log_every_n_steps=1), _DDPCheck()])
    trainer.fit(TinyNet(), loader(128, 8))
    assert trainer.state.finished


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(on_nonfinite="ignore"), r"`on_nonfinite` must be one of 'warn', 'stop', 'raise'"),
        (dict(log_every_n_steps=0), "`log_every_n_steps`"),
        (dict(group_by="layer"), "`group_by`"),
        (dict(vanish_ratio=2.0), "`vanish_ratio`"),
        (dict(explode_ratio=0.5), "`explode_ratio`"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GradientMonitor(**kwargs)


def test_groups_look_through_a_wrapper() -> None:
    from lightning_tricks.demo.model import Classifier, ConvBase

    assert GradientLayout.from_module(Classifier(ConvBase())).names == ["net.conv1", "net.conv2", "net.conv3",
                                                                       "net.linear"]
    two = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), nn.Linear(2, 1))
    assert GradientLayout.from_module(two).names == ["0", "1"]
    assert GradientLayout.from_module(two, 2).names == ["0.0", "0.1", "1"]
    assert len(GradientLayout.from_module(two, "parameter").names) == 6
    with pytest.raises(ValueError, match="`group_by`"):
        GradientLayout.from_module(two, 0)


def test_metrics_reach_the_logger_and_callback_metrics(tmp_path: Any) -> None:
    import csv

    from lightning.pytorch.loggers import CSVLogger

    trainer = quiet_trainer(max_steps=20, log_every_n_steps=5, logger=CSVLogger(tmp_path),
                            callbacks=[GradientMonitor()])
    trainer.fit(TinyNet(), loader())
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("grad/norm")]
    assert [int(r["step"]) for r in rows] == [4, 9, 14, 19]  # the steps Lightning logs train_loss_step at
    assert {"grad/norm/conv", "grad/norm/head", "grad/update_ratio/head"} <= set(rows[0])
    assert float(trainer.callback_metrics["grad/norm"]) == pytest.approx(float(rows[-1]["grad/norm"]))


def test_warn_every_step_keeps_logging() -> None:
    """Regression: a non-finite step in "warn" mode must still flush the interval's buffer."""
    mon, rec = GradientMonitor(log_every_n_steps=1, on_nonfinite="warn"), MetricsRecorder()
    trainer = quiet_trainer(logger=rec, max_steps=5, callbacks=[mon])
    with pytest.warns(UserWarning, match="Training goes on"):
        trainer.fit(NaNAt(1), loader())
    assert len(rec.history()) == 5 and rec.history()[1]["grad/nonfinite_steps"] == 1.0
