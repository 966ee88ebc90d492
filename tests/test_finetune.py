"""Finetune: freezing, gradual unfreezing, BatchNorm, both methods, DDP, resume, bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_tricks import Finetune, TricksMixin, WarmupCosine, adamw
from tests.conftest import LrRecorder, loader, quiet_trainer


class Backboned(TricksMixin, pl.LightningModule):
    """Three conv blocks (with BatchNorm) and a linear head over (N, 1, 16) inputs, 4 classes."""

    num_classes = 4

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.lr = lr
        self.backbone = nn.Sequential(*[
            nn.Sequential(nn.Conv1d(1 if i == 0 else 4, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU())
            for i in range(3)])
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).flatten(1))

    def configure_optimizers(self) -> Any:
        return adamw(self, lr=self.lr)


BLOCKS = ["backbone.0", "backbone.1", "backbone.2"]


class Snapshots(pl.Callback):
    """The state dict at the end of each training epoch."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix) and "num_batches" not in k)


def fit(callback: Finetune, epochs: int = 4, seed: int = 0, **kw: Any) -> tuple[Backboned, Snapshots]:
    torch.manual_seed(seed)
    model, snaps = Backboned(), Snapshots()
    quiet_trainer(max_epochs=epochs, callbacks=[callback, snaps], **kw).fit(model, loader(64, 8))
    return model, snaps


def test_gradual_unfreezing_from_the_top_one_block_per_epoch() -> None:
    torch.manual_seed(0)
    start = {k: v.clone() for k, v in Backboned().state_dict().items()}
    _, snaps = fit(Finetune(BLOCKS, unfreeze_at=1, unfreeze_every=1, train_bn=False), epochs=4)
    before = [start, *snaps.states]
    trained = [[changed(before[e], before[e + 1], f"{b}.") for b in BLOCKS] for e in range(4)]
    assert trained == [[False, False, False], [False, False, True], [False, True, True], [True, True, True]]
    assert all(changed(before[e], before[e + 1], "head.") for e in range(4))
    # train_bn=False: the running statistics of frozen blocks do not move either
    assert torch.equal(before[1]["backbone.0.1.running_mean"], start["backbone.0.1.running_mean"])


def test_train_bn_keeps_batch_norm_learning_in_frozen_blocks() -> None:
    torch.manual_seed(0)
    start = {k: v.clone() for k, v in Backboned().state_dict().items()}
    _, snaps = fit(Finetune("backbone", unfreeze_at=2), epochs=1)
    end = snaps.states[0]
    assert torch.equal(end["backbone.0.0.weight"], start["backbone.0.0.weight"])  # conv frozen
    assert not torch.equal(end["backbone.0.1.weight"], start["backbone.0.1.weight"])  # BN affine trains
    assert not torch.equal(end["backbone.0.1.running_mean"], start["backbone.0.1.running_mean"])


def test_both_methods_train_the_same_weights_and_the_schedule_is_untouched() -> None:
    recorders = [LrRecorder(), LrRecorder()]
    results = []
    for method, rec in zip(("requires_grad", "drop_grads"), recorders):
        torch.manual_seed(0)
        model = Backboned()
        quiet_trainer(max_epochs=3, callbacks=[Finetune(BLOCKS, 1, unfreeze_every=1, method=method),
                                               WarmupCosine(0.2), rec]).fit(model, loader(64, 8))
        results.append(model.state_dict())
        assert all(p.requires_grad for p in model.parameters())  # the module leaves the fit as it came in
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=0, atol=1e-6)
    assert recorders[0].lrs == recorders[1].lrs and len(recorders[0].lrs) == 24  # WarmupCosine's plan, one per step


def test_a_backbone_frozen_for_the_whole_fit() -> None:
    torch.manual_seed(0)
    start = {k: v.clone() for k, v in Backboned().state_dict().items()}
    _, snaps = fit(Finetune("backbone", unfreeze_at=None, train_bn=False), epochs=2)
    assert not changed(start, snaps.states[-1], "backbone.") and changed(start, snaps.states[-1], "head.")


def test_step_unit() -> None:
    torch.manual_seed(0)
    start = {k: v.clone() for k, v in Backboned().state_dict().items()}

    class AtStep(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            if trainer.global_step == 3:
                self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}

    at = AtStep()
    torch.manual_seed(0)
    quiet_trainer(max_steps=6, callbacks=[Finetune("backbone", 3, unit="step"), at]).fit(Backboned(), loader(64, 8))
    assert not changed(start, at.state, "backbone.0.0.")  # frozen for steps 0-2


def test_resume_in_the_frozen_and_the_unfrozen_phase_gives_the_uninterrupted_run(tmp_path: Path) -> None:
    def run(epochs: int, ckpt: str | None = None, root: Path | None = None) -> Backboned:
        torch.manual_seed(0)
        model = Backboned()
        kw: dict[str, Any] = dict(enable_checkpointing=True, default_root_dir=str(root)) if root else {}
        callbacks = [Finetune(BLOCKS, 2, unfreeze_every=1), WarmupCosine(0.2, total_steps=40)]  # planned for 5 epochs
        quiet_trainer(max_epochs=epochs, callbacks=callbacks, **kw).fit(model, loader(64, 8), ckpt_path=ckpt)
        return model

    whole = run(5)
    for stop in (1, 3):  # inside the frozen phase; after the first block was unfrozen
        root = tmp_path / f"stop{stop}"
        run(stop, root=root)
        ckpt = next(root.rglob("*.ckpt"))
        resumed = run(5, ckpt=str(ckpt))
        for key, value in whole.state_dict().items():
            torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=1e-6)


class SameBackboneOnRanks(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = pl_module.backbone[0][0].weight.detach().clone()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        both = trainer.strategy.all_gather(flat)
        assert torch.equal(both[0], both[1]), f"ranks differ after epoch {trainer.current_epoch}"

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        finetune = next(cb for cb in trainer.callbacks if isinstance(cb, Finetune))
        assert finetune.mode == "drop_grads" and finetune.unfrozen == 3
        assert not torch.equal(self.start, pl_module.backbone[0][0].weight)  # the bottom block trained at the end


def test_ddp_ranks_hold_the_same_weights_after_unfreezing() -> None:
    torch.manual_seed(0)
    trainer = quiet_trainer(devices=2, strategy="ddp_fork", max_epochs=4,
                            callbacks=[Finetune(BLOCKS, 1, unfreeze_every=1), SameBackboneOnRanks()])
    trainer.fit(Backboned(), loader(64, 8, shuffle=True))
    assert trainer.state.finished


class FrozenOutside(Backboned):
    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.head.parameters(), lr=self.lr)


@pytest.mark.parametrize(("make", "match"), [
    (lambda: Finetune(["backbone.7"]), r"`backbone`: \['backbone.7'\] match no module"),
    (lambda: Finetune(lambda n, m: False), "the predicate matches no module"),
    (lambda: Finetune("backbone", unfreeze_at=0), r"`unfreeze_at=0` would unfreeze the backbone before any epoch"),
    (lambda: Finetune("backbone", unfreeze_at=-2), r"`unfreeze_at` must be"),
    (lambda: Finetune("backbone", unfreeze_every=0), r"`unfreeze_every` must be"),
    (lambda: Finetune("backbone", unit="batch"), r"`unit`"),
    (lambda: Finetune("backbone", method="zero_lr"), r"`method`"),
    (lambda: Finetune([]), r"`backbone` must be"),
])
def test_bad_arguments_are_named(make: Any, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        quiet_trainer(max_steps=1, callbacks=[make()]).fit(Backboned(), loader())


def test_a_backbone_left_out_of_the_optimizer_is_named() -> None:
    with pytest.raises(ValueError, match=r"'backbone.0.0.weight' is in no optimizer"):
        quiet_trainer(max_steps=1, callbacks=[Finetune("backbone")]).fit(FrozenOutside(), loader())
