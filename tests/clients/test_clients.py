"""The corpus: modules shaped like Lightning's own examples and demos, wired as the README says, a few steps on random
data each, checked against an independent computation (a hand computation, torch's own function, a reference
callback). Each test also guards one of the defects such modules exposed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos import LightningTransformer, Transformer
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_tricks import (
    EMA,
    Finetune,
    GradientMonitor,
    LabelSmoothing,
    TricksMixin,
    WarmupCosine,
    recipe,
)
from tests.clients.modules import (
    GAN,
    DQNLightning,
    ImageNetLightningModel,
    MetricsLogger,
    TransferLearningModel,
    gan_data,
    images,
    transitions,
)
from tests.conftest import quiet_trainer


# ------------------------------------------------------------------------------- image fine-tuning
class BackboneMoves(pl.Callback):
    """Whether the backbone's weights moved during each epoch."""

    def __init__(self) -> None:
        self.moved: list[bool] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._before = [p.detach().clone() for p in pl_module.feature_extractor.parameters()]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        after = list(pl_module.feature_extractor.parameters())
        self.moved.append(any(not torch.equal(a, b) for a, b in zip(self._before, after)))


@pytest.mark.parametrize("monitor_first", [True, False])
def test_resnet_fine_tuning_unfreezes_and_is_monitored(monitor_first: bool) -> None:
    """Finetune + GradientMonitor in either order: the backbone is frozen in epoch 0, trains from epoch 1, and its
    gradient norm is logged once it trains (it was never monitored when frozen at fit start)."""
    logger, moves = MetricsLogger(), BackboneMoves()
    monitor = GradientMonitor(log_every_n_steps=1)
    finetune = Finetune(backbone="feature_extractor", unfreeze_at=1, train_bn=False)
    ordered = [monitor, finetune] if monitor_first else [finetune, monitor]
    model = TransferLearningModel()
    quiet_trainer(max_epochs=2, logger=logger, log_every_n_steps=1,
                  callbacks=[*ordered, LabelSmoothing(0.1), moves]).fit(model, images(8))
    assert moves.moved == [False, True]
    backbone = logger.values("grad/norm/feature_extractor")
    assert len(backbone) == 4 and backbone[:2] == [0.0, 0.0] and all(v > 0 for v in backbone[2:])
    for logits, y, loss in model.records:  # the user's own step, through tricks_loss
        assert abs(loss.item() - F.cross_entropy(logits, y, label_smoothing=0.1).item()) <= 1e-6


# ------------------------------------------------------------------------------- ImageNet-style, resumed mid-epoch
def test_imagenet_style_own_metrics_bf16_accumulation_and_ema_resumed_mid_epoch(tmp_path: Path) -> None:
    """Own top-1/top-5 on the loader's labels under bf16-mixed and accumulation 2; EMA resumed from a mid-epoch
    checkpoint keeps its average, also through a checkpoint written before its next update (that used to raise)."""
    every = ModelCheckpoint(dirpath=tmp_path / "a", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    model = ImageNetLightningModel()
    ema = EMA(0.9, update_every=2)
    trainer = quiet_trainer(max_epochs=1, precision="bf16-mixed", accumulate_grad_batches=2, enable_checkpointing=True,
                            callbacks=[LabelSmoothing(0.1), ema, every])
    trainer.fit(model, images(24, classes=10))
    assert trainer.global_step == 3 and len(model.records) == 6
    for r in model.records:
        top1 = (r["output"].argmax(-1) == r["target"]).float().mean().item()
        top5 = (r["output"].topk(5, -1).indices == r["target"][:, None]).any(-1).float().mean().item()
        assert r["acc1"].item() == pytest.approx(top1) and r["acc5"].item() == pytest.approx(top5)
    saved = torch.load(tmp_path / "a" / "step=1.ckpt", weights_only=False)["callbacks"]["EMA"]
    assert saved["updates"] == 1
    # resume at step 1 (mid-epoch: batch 2 of 6); the checkpoint at step 2 comes before EMA's next update (step 3)
    again = ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    resumed = EMA(0.9, update_every=2)
    quiet_trainer(max_epochs=1, precision="bf16-mixed", accumulate_grad_batches=2, enable_checkpointing=True,
                  callbacks=[LabelSmoothing(0.1), resumed, again]).fit(
        ImageNetLightningModel(), images(24, classes=10), ckpt_path=str(tmp_path / "a" / "step=1.ckpt"))
    written = torch.load(tmp_path / "b" / "step=2.ckpt", weights_only=False)["callbacks"]["EMA"]
    assert written["updates"] == 1
    for key, value in saved["average"].items():
        assert torch.equal(written["average"][key], value)  # the loaded average, untouched by the resume
    assert resumed.updates == 2  # and the next update continued it


# ------------------------------------------------------------------------------- a GAN
class OptimizerGradNorms(pl.Callback):
    """The reference: each optimizer's own gradient norm, read at its own step."""

    def __init__(self) -> None:
        self.norms: dict[str, list[float]] = {"generator": [], "discriminator": []}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        name = "generator" if optimizer is trainer.optimizers[0] else "discriminator"
        grads = [p.grad for p in getattr(pl_module, name).parameters() if p.grad is not None]
        self.norms[name].append(float(torch.nn.utils.get_total_norm(grads)))


def test_gan_two_optimizers_each_read_at_its_own_step() -> None:
    logger, ref = MetricsLogger(), OptimizerGradNorms()
    trainer = quiet_trainer(max_epochs=1, logger=logger, log_every_n_steps=1,
                            callbacks=[ref, GradientMonitor(log_every_n_steps=1)])
    trainer.fit(GAN(), gan_data())
    generator, discriminator = logger.values("grad/norm/generator"), logger.values("grad/norm/discriminator")
    assert len(generator) == len(discriminator) == 4
    assert generator == pytest.approx(ref.norms["generator"], rel=1e-5)
    assert discriminator == pytest.approx(ref.norms["discriminator"], rel=1e-5)
    total = [math.hypot(g, d) for g, d in zip(ref.norms["generator"], ref.norms["discriminator"])]
    assert logger.values("grad/norm") == pytest.approx(total, rel=1e-5)


def test_gan_nan_in_the_second_optimizer_is_skipped_and_stops(tmp_path: Path) -> None:
    """A NaN in the discriminator's gradient: that update is skipped, the stop comes at that batch, and its
    checkpoint holds finite weights (it came one batch late, with non-finite weights)."""
    model = GAN(poison_discriminator_at=2)
    monitor = GradientMonitor(on_nonfinite="stop", checkpoint_dir=str(tmp_path))
    trainer = quiet_trainer(max_epochs=1, callbacks=[monitor])
    trainer.fit(model, gan_data())
    assert monitor.stopped_step is not None and trainer.fit_loop.epoch_loop.batch_idx == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = torch.load(monitor.checkpoint_path, weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())


# ------------------------------------------------------------------------------- a language model
class LanguageModel(TricksMixin, pl.LightningModule):
    """Lightning's demo ``Transformer`` with LightningTransformer's step, `tricks_loss` where nll_loss was."""

    def __init__(self, vocab_size: int = 50) -> None:
        super().__init__()
        self.model = Transformer(vocab_size=vocab_size, ninp=16, nhead=2, nhid=16, nlayers=1, dropout=0.0)
        self.records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, target = batch
        output = self.model(inputs, target)  # (N * L, V) log-probabilities
        loss = self.tricks_loss(output, target.view(-1))
        self.records.append((output.detach(), target.view(-1), loss.detach()))
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.model.parameters(), lr=0.1)


def tokens(n: int = 16, length: int = 10, vocab: int = 50) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(5)
    data = torch.randint(0, vocab, (n, length + 1), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data[:, :-1], data[:, 1:]), batch_size=4)


def test_language_model_with_label_smoothing() -> None:
    model = LanguageModel()
    quiet_trainer(max_steps=3, callbacks=recipe(mixup=None, early_stopping=None, warmup=1)).fit(model, tokens())
    assert len(model.records) == 3
    for output, target, loss in model.records:
        assert abs(loss.item() - F.cross_entropy(output, target, label_smoothing=0.1).item()) <= 1e-6


class TheirTransformer(TricksMixin, LightningTransformer):
    """Lightning's LightningTransformer itself behind the mixin: its own step (nll_loss) runs."""

    def prepare_data(self) -> None:
        pass  # the demo downloads WikiText-2; random tokens instead

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return tokens(vocab=50)


def test_lightning_transformer_runs_its_own_step() -> None:
    model = TheirTransformer(vocab_size=50)
    trainer = quiet_trainer(max_steps=2, callbacks=[GradientMonitor(), WarmupCosine(warmup=1)])
    trainer.fit(model)
    assert trainer.global_step == 2
    with pytest.raises(RuntimeError, match=r"LabelSmoothing: the training loss must go through"):
        quiet_trainer(max_steps=1, callbacks=[LabelSmoothing(0.1)]).fit(TheirTransformer(vocab_size=50))


# ------------------------------------------------------------------------------- an RL-shaped batch
class LrSeen(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])


def test_rl_batch_with_the_callbacks_that_need_no_targets() -> None:
    seen = LrSeen()
    callbacks = recipe(label_smoothing=0, mixup=None, early_stopping="train_loss", warmup=2)
    trainer = quiet_trainer(max_epochs=2, callbacks=[*callbacks, seen])
    trainer.fit(DQNLightning(), transitions())
    assert trainer.estimated_stepping_batches == 8 and len(seen.lrs) == 8

    def by_hand(s: int, warmup: int = 2, total: int = 8) -> float:  # linear from 1/(W+1), then cosine to 0
        a = 1 / (warmup + 1)
        if s < warmup:
            return a + (1 - a) * s / warmup
        return 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))

    assert seen.lrs == pytest.approx([1e-2 * by_hand(s) for s in range(8)], rel=1e-6)


# ------------------------------------------------------------------------------- BoringModel
class WeightsSeen(pl.Callback):
    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.weights.append(pl_module.layer.weight.detach().clone())


def test_boring_model_with_ema_equals_the_hand_computed_average() -> None:
    seen = WeightsSeen()
    ema = EMA(0.5, warmup=False, keep_ema_at_end=False)
    trainer = quiet_trainer(max_steps=5, limit_val_batches=0, callbacks=[GradientMonitor(), ema, seen])
    trainer.fit(BoringModel())
    average = seen.weights[0]
    for w in seen.weights[1:]:
        average = 0.5 * average + 0.5 * w
    assert torch.allclose(ema.averaged_state_dict()["layer.weight"], average, atol=1e-6)
