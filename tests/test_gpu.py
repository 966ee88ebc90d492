"""Checks only a GPU can make: real CUDA GradScaler, bf16 autocast, host-device syncs. Skipped without CUDA.

Run on a GPU machine: ``python -m pytest -q tests/test_gpu.py``.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_tricks import EMA, EarlyStopping, GradientMonitor, LabelSmoothing, Mixup, TrainingDoctor, WarmupCosine
from tests.conftest import MetricsRecorder, TinyNet, loader
from tests.test_gradient_monitor import NaNAt, Reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_trainer(**kw: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    defaults.update(kw)
    return pl.Trainer(**defaults)


class SyncCounter(pl.Callback):
    """Counts host-device syncs (sync debug mode 'warn') between consecutive training-batch ends.

    A row is ``(syncs, logging step, first batch of an epoch)``: the syncs of epoch-end hooks land in the row of the
    next epoch's first batch.
    """

    def __init__(self) -> None:
        self.rows: list[tuple[int, bool, bool]] = []
        self.sites: set[str] = set()
        self._ctx: Any = None

    def _arm(self) -> None:
        self._ctx = warnings.catch_warnings(record=True)
        self._rec = self._ctx.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def _disarm(self) -> int:
        if self._ctx is None:
            return 0
        torch.cuda.set_sync_debug_mode(0)
        hits = [w for w in self._rec if "synchroniz" in str(w.message)]
        n = len(hits)
        self.sites.update(f"{w.filename}:{w.lineno}" for w in hits)
        self._ctx.__exit__(None, None, None)
        self._ctx = None
        return n

    def on_train_start(self, *args: Any) -> None:
        self._arm()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        sites_before = set(self.sites)
        n = self._disarm()
        logging = trainer.global_step % trainer.log_every_n_steps == 0
        boundary = batch_idx == 0
        if logging or boundary:  # sync sites are collected for steps inside an interval and an epoch only
            self.sites = sites_before
        self.rows.append((n, logging, boundary))
        self._arm()

    def on_train_end(self, *args: Any) -> None:
        sites_before = set(self.sites)
        self._disarm()
        self.sites = sites_before  # the last epoch's end and the end of fit: not a step inside an interval


class SyncingNet(TinyNet):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        loss.item()  # a deliberate host read: the counter must see it
        return loss


def test_sync_counter_sees_a_sync() -> None:
    counter = SyncCounter()
    gpu_trainer(max_steps=6, log_every_n_steps=50, callbacks=[counter]).fit(SyncingNet(), loader())
    assert all(n >= 1 for n, _, _ in counter.rows[1:])


def _syncs(callbacks: list[pl.Callback], clip: float | None) -> SyncCounter:
    counter = SyncCounter()
    trainer = gpu_trainer(max_steps=60, log_every_n_steps=10, precision="bf16-mixed", gradient_clip_val=clip,
                          callbacks=[*callbacks, counter])
    pl.seed_everything(0, verbose=False)
    trainer.fit(TinyNet(), loader(32 * 8, 8))  # 32 batches per epoch: two epoch ends inside the run
    return counter


@pytest.mark.parametrize("clip", [None, 1.0])
def test_tricks_add_no_sync_between_logging_steps(clip: float | None) -> None:
    """The whole loop's syncs per step inside a logging interval and an epoch, with all six callbacks of the
    recipe, equal a plain loop's: the tricks add none (the doctor and early stopping read once per epoch)."""
    plain = _syncs([], clip)
    tricks = _syncs([WarmupCosine(), LabelSmoothing(0.1), Mixup(0.2, cutmix_alpha=1.0), GradientMonitor(),
                     EarlyStopping("train_loss_epoch", patience=50), TrainingDoctor()], clip)
    p = [n for n, logging, boundary in plain.rows[2:] if not (logging or boundary)]
    t = [n for n, logging, boundary in tricks.rows[2:] if not (logging or boundary)]
    p_edges = [n for n, logging, boundary in plain.rows[2:] if boundary and not logging]
    t_edges = [n for n, logging, boundary in tricks.rows[2:] if boundary and not logging]
    print(f"clip={clip}: syncs at epoch starts (previous epoch's end), plain {p_edges}, with the tricks {t_edges}")
    print(f"clip={clip}: syncs per non-logging step, plain {sum(p)}/{len(p)} at {sorted(plain.sites)}; "
          f"with the tricks {sum(t)}/{len(t)} at {sorted(tricks.sites)}")
    assert len(t) == len(p) > 40
    assert sum(t) == sum(p) == 0
    assert not any("lightning_tricks" in site for site in tricks.sites)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_norms_match_reference_on_gpu(precision: str) -> None:
    ref, mon, rec = Reference(), GradientMonitor(log_every_n_steps=1), MetricsRecorder()
    trainer = gpu_trainer(max_steps=8, precision=precision, accumulate_grad_batches=2, callbacks=[ref, mon],
                          logger=rec)
    trainer.fit(TinyNet(), loader(128, 8))
    assert len(rec.history()) == 8
    for r, m in zip(ref.norms, rec.history()):
        if r == r and r != float("inf"):  # GradScaler-skipped steps are inf in both
            assert m["grad/norm"] == pytest.approx(r, rel=1e-4)
    if precision == "16-mixed":
        assert "amp/loss_scale" in rec.history()[-1]


def test_mixup_targets_float32_under_bf16() -> None:
    class Check(TinyNet):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = self.tricks_loss(self(x), y)
            assert y.dtype == torch.float32 and loss.dtype == torch.float32
            assert torch.allclose(y.sum(-1), torch.ones(len(y), device=y.device))
            return loss

    trainer = gpu_trainer(max_steps=4, precision="bf16-mixed", callbacks=[LabelSmoothing(0.1), Mixup(0.4)])
    trainer.fit(Check(), loader())
    assert trainer.global_step == 4


def test_stop_on_nonfinite_on_gpu(tmp_path: Any) -> None:
    mon = GradientMonitor(on_nonfinite="stop")
    trainer = gpu_trainer(max_steps=40, default_root_dir=tmp_path, callbacks=[mon])
    with pytest.warns(UserWarning, match=r"non-finite gradients at optimizer step 5 in group\(s\) head"):
        trainer.fit(NaNAt(step=5), loader(64 * 8, 8))
    print("stopped at global_step", trainer.global_step, mon.stop_message)
    assert mon.stopped_step == 5 and trainer.global_step <= 50  # judged at the first logging step (every 50)
    assert mon.checkpoint_path is not None


def test_label_smoothing_on_a_language_model_head_allocates_what_torch_does() -> None:
    """Peak memory of loss + backward on an 8 x 512 x 32,000 float32 head: the tricks' smoothed loss against
    torch's own `F.cross_entropy(label_smoothing=0.1)` (no (N*L, V) soft target on top)."""
    from lightning_tricks.functional import cross_entropy

    y = torch.randint(0, 32000, (8, 512), device="cuda")
    y[:, -16:] = -100
    peaks = {}
    for name, fn in (("torch", lambda z: torch.nn.functional.cross_entropy(z.reshape(-1, 32000), y.reshape(-1),
                                                                          label_smoothing=0.1)),
                     ("ours", lambda z: cross_entropy(z, y, smoothing=0.1, class_dim=-1))):
        logits = torch.randn(8, 512, 32000, device="cuda", requires_grad=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(logits).backward()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
        del logits
    assert peaks["ours"] <= peaks["torch"] * 1.01, peaks


def test_ema_in_host_memory_follows_the_one_on_the_gpu() -> None:
    results = []
    for device in (None, "cpu"):
        torch.manual_seed(0)
        ema = EMA(decay=0.9, device=device)
        gpu_trainer(max_steps=8, precision="bf16-mixed", callbacks=[ema]).fit(TinyNet(), loader(128, 4))
        average = ema.averaged_state_dict()
        assert all(v.device.type == ("cpu" if device else "cuda") for v in average.values() if v.is_floating_point())
        results.append({k: v.cpu() for k, v in average.items()})
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], atol=1e-6, rtol=0)
