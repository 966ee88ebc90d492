"""The seam on modules written the way their authors write them: the batch stays the user's, the tricks reach the
loss for every target shape torch's cross-entropy takes, and a step of an existing module is the one that runs."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_tricks import LabelSmoothing, Mixup, TricksMixin, recipe
from lightning_tricks.functional import smooth_targets, soft_cross_entropy
from tests.conftest import loader, quiet_trainer


def _mixup_of(module: pl.LightningModule) -> Mixup | None:
    return next((cb for cb in module.trainer.callbacks if isinstance(cb, Mixup)), None)


class Recorder:
    """Keeps a clone of each batch as the loader gave it (before the seam), for the references."""

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self.__dict__["_original"] = [t.clone() for t in batch]
        return batch


# ------------------------------------------------------------------------------- own metrics on the user's y
class OwnMetrics(Recorder, TricksMixin, pl.LightningModule):
    """ImageNet-example style: its own training_step, torchmetrics top-1 and top-5 on the target it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8))
        self.top1 = MulticlassAccuracy(num_classes=8, top_k=1, average="micro")
        self.top5 = MulticlassAccuracy(num_classes=8, top_k=5, average="micro")
        self.records: list[dict[str, Any]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, target = batch
        output = self(images)
        loss = self.tricks_loss(output, target)
        acc1, acc5 = self.top1(output, target), self.top5(output, target)
        self.log("train_acc1", acc1, on_step=True, on_epoch=True)
        self.log("train_acc5", acc5, on_step=True, on_epoch=True)
        mix = _mixup_of(self)
        self.records.append(dict(y0=self._original[1], target=target, logits=output.detach(), loss=loss.detach(),
                                 acc1=acc1, acc5=acc5, draw=mix.last_draw if mix else None))
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_own_metrics_see_the_loaders_labels_under_smoothing_and_mixup() -> None:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 16, generator=g), torch.randint(0, 8, (64,), generator=g))
    model = OwnMetrics()
    trainer = quiet_trainer(max_epochs=1, callbacks=[LabelSmoothing(0.1), Mixup(alpha=0.4)])
    trainer.fit(model, DataLoader(data, batch_size=16, shuffle=True))
    assert len(model.records) == 4
    for r in model.records:
        y0, target, logits = r["y0"], r["target"], r["logits"]
        assert torch.equal(target, y0) and target.dtype == y0.dtype  # the loader's labels, untouched
        top1 = (logits.argmax(-1) == y0).float().mean()
        top5 = (logits.topk(5, dim=-1).indices == y0.unsqueeze(1)).any(-1).float().mean()
        assert r["acc1"].item() == pytest.approx(top1.item(), abs=1e-7)
        assert r["acc5"].item() == pytest.approx(top5.item(), abs=1e-7)
        lam, index = r["draw"]
        soft = smooth_targets(y0, 8, 0.1)
        want = soft_cross_entropy(logits, lam * soft + (1 - lam) * soft[index])  # the mixed, smoothed target
        assert abs(r["loss"].item() - want.item()) <= 1e-6
    logits = torch.cat([r["logits"] for r in model.records])
    labels = torch.cat([r["y0"] for r in model.records])
    epoch_top1 = (logits.argmax(-1) == labels).float().mean().item()
    assert trainer.callback_metrics["train_acc1_epoch"].item() == pytest.approx(epoch_top1, abs=1e-6)


# ------------------------------------------------------------------------------- a language model
class TinyLM(TricksMixin, pl.LightningModule):
    """Token targets (N, L) with -100 padding; logits (N, V, L) (torch's layout) or class-last (N, L, V)."""

    def __init__(self, vocab: int = 40, class_last: bool = False) -> None:
        super().__init__()
        self.embed, self.head, self.class_last = nn.Embedding(vocab, 16), nn.Linear(16, vocab), class_last
        self.records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, target = batch
        logits = self.head(torch.tanh(self.embed(tokens)))  # (N, L, V)
        if not self.class_last:
            logits = logits.transpose(1, 2)  # (N, V, L)
        loss = self.tricks_loss(logits, target)
        self.records.append((logits.detach(), target, loss.detach()))
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def token_loader(n: int = 32, length: int = 12, vocab: int = 40) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (n, length + 1), generator=g)
    inputs, target = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    target[::3, -4:] = -100  # padded tails
    return DataLoader(TensorDataset(inputs, target), batch_size=8)


@pytest.mark.parametrize(("precision", "accumulate"), [("32", 1), ("bf16-mixed", 2)])
@pytest.mark.parametrize("class_last", [False, True])
def test_language_model_loss_is_torchs_label_smoothing(precision: str, accumulate: int, class_last: bool) -> None:
    model = TinyLM(class_last=class_last)
    quiet_trainer(max_epochs=1, precision=precision, accumulate_grad_batches=accumulate,
                  callbacks=[LabelSmoothing(0.1)]).fit(model, token_loader())
    assert len(model.records) == 4
    for logits, target, loss in model.records:
        assert (target == -100).any()
        if class_last:  # what a user writes for a class-last head: the flattened (positions, V) view
            ref = F.cross_entropy(logits.float().reshape(-1, 40), target.reshape(-1), label_smoothing=0.1,
                                  ignore_index=-100)
        else:
            ref = F.cross_entropy(logits.float(), target, label_smoothing=0.1, ignore_index=-100)
        # 1e-6 relative: inside bf16 autocast the same float32 sum can round in another order (1-5 ulps)
        assert abs(loss.item() - ref.item()) <= 1e-6 * abs(ref.item())
        assert loss.dtype == torch.float32


def test_mixing_token_ids_is_refused_with_the_alternative() -> None:
    with pytest.raises(TypeError, match=r"got torch\.int64 \(token ids\?\).*LabelSmoothing alone"):
        quiet_trainer(max_steps=1, callbacks=[Mixup(alpha=0.2)]).fit(TinyLM(), token_loader())


def test_ambiguous_class_dimension_asks_for_class_dim() -> None:
    """(N, L, L) logits: the classes could be on dimension 1 or on the last; the error says how to choose."""
    model = TinyLM(vocab=12, class_last=True)
    with pytest.raises(ValueError, match=r"say which, `tricks_loss\(logits, y, class_dim=-1\)`"):
        quiet_trainer(max_steps=1, callbacks=[LabelSmoothing(0.1)]).fit(model, token_loader(vocab=12))


# ------------------------------------------------------------------------------- segmentation
VOID = 255


class TinySegmenter(Recorder, TricksMixin, pl.LightningModule):
    """Per-pixel targets (N, H, W) with a void label, logits (N, C, H, W), the mixin's default steps."""

    ignore_index = VOID

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Conv2d(2, 3, 3, padding=1)
        self.records: list[dict[str, Any]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.tricks_loss(logits, y)
        x0, y0 = self._original
        self.records.append(dict(x0=x0, y0=y0, x=x.detach().clone(), y=y, logits=logits.detach(),
                                 loss=loss.detach(), draw=_mixup_of(self).last_draw))
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def pixel_reference(logits: torch.Tensor, labels: torch.Tensor, partner: torch.Tensor, own: Any,
                    eps: float) -> torch.Tensor:
    """Hand-built dense target: smoothed one-hot maps of the labels and the partner's, blended by ``own``."""
    def smooth_map(lab: torch.Tensor) -> torch.Tensor:  # (N, C, H, W), void pixels all-zero
        flat = smooth_targets(lab.reshape(-1), 3, eps, ignore_index=VOID)
        return flat.reshape(*lab.shape, 3).permute(0, 3, 1, 2)

    q = own * smooth_map(labels) + (1 - own) * smooth_map(partner)
    return -(q * torch.log_softmax(logits.float(), dim=1)).sum() / q.sum()


@pytest.mark.parametrize("cut", [False, True])
def test_segmentation_under_smoothing_mixup_and_cutmix(cut: bool) -> None:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(24, 2, 8, 8, generator=g), torch.randint(0, 3, (24, 8, 8), generator=g)
    y[:, :2, :2] = VOID
    mix = Mixup(alpha=0.0, cutmix_alpha=1.0) if cut else Mixup(alpha=0.4)
    model = TinySegmenter()
    quiet_trainer(max_steps=3, callbacks=[LabelSmoothing(0.1), mix]).fit(model, DataLoader(TensorDataset(x, y), 8))
    assert len(model.records) == 3
    for r in model.records:
        lam, index = r["draw"]
        assert torch.equal(r["y"], r["y0"])
        if cut:  # the pixels that came from the partner carry the partner's labels
            from_partner = ((r["x"] == r["x0"][index]) & (r["x"] != r["x0"])).all(dim=1, keepdim=True)
            assert 0 < from_partner.float().mean() < 1
            own: Any = (~from_partner).float()
            ref = pixel_reference(r["logits"], r["y0"], r["y0"][index], own, 0.1)
            pasted = torch.where(from_partner.squeeze(1), r["y0"][index], r["y0"])
            torch_ref = F.cross_entropy(r["logits"], pasted, label_smoothing=0.1, ignore_index=VOID)
            assert abs(r["loss"].item() - torch_ref.item()) <= 1e-5
        else:
            ref = pixel_reference(r["logits"], r["y0"], r["y0"][index], lam, 0.1)
        assert abs(r["loss"].item() - ref.item()) <= 1e-5


def test_cutmix_needs_targets_at_the_inputs_resolution() -> None:
    class Downsampling(TinySegmenter):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.avg_pool2d(self.net(x), 2)  # (N, C, 4, 4) for 8 x 8 inputs

    x, y = torch.randn(8, 2, 8, 8), torch.randint(0, 3, (8, 4, 4))
    with pytest.raises(ValueError, match=r"pasted boxes over input positions \(8, 8\) but the targets have positions "
                                         r"\(4, 4\)"):
        quiet_trainer(max_steps=1, callbacks=[Mixup(alpha=0.0, cutmix_alpha=1.0)]).fit(
            Downsampling(), DataLoader(TensorDataset(x, y), 8))


# ------------------------------------------------------------------------------- no class count, existing modules
class NoClassCount(TricksMixin, pl.LightningModule):
    """No `num_classes` anywhere: the class count comes from the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_a_module_without_num_classes_trains_under_the_recipe() -> None:
    trainer = quiet_trainer(max_epochs=2, callbacks=recipe(early_stopping="train_loss_epoch"))
    trainer.fit(NoClassCount(), loader(64, 8))
    assert trainer.global_step == 16 and torch.isfinite(trainer.callback_metrics["train_loss_epoch"])


class TheirModule(pl.LightningModule):
    """An existing module with its own steps (one takes no batch_idx, as Lightning's GAN example) and an extra term."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def penalty(self) -> torch.Tensor:
        return 0.5 * self.net[1].weight.square().sum()

    def training_step(self, batch: Any) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y) + self.penalty()
        self.seen.append(loss.detach())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("their_val", 1.0)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class Wrapped(TricksMixin, TheirModule):
    pass


def test_an_existing_modules_steps_run_with_their_terms() -> None:
    model = Wrapped()
    assert Wrapped.training_step is TheirModule.training_step  # not the mixin's default
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=1)
    trainer.fit(model, loader(32, 8), loader(16, 8))
    x, y = next(iter(loader(32, 8)))
    want = F.cross_entropy(model(x), y) + model.penalty()  # lr 0: the weights never moved
    assert len(model.seen) == 4 and abs(model.seen[0].item() - want.item()) <= 1e-6
    assert "their_val" in trainer.callback_metrics and "val_loss" not in trainer.callback_metrics


def test_an_existing_step_without_tricks_loss_is_an_error_under_tricks() -> None:
    with pytest.raises(RuntimeError, match=r"LabelSmoothing: the training loss must go through `self.tricks_loss"):
        quiet_trainer(max_steps=1, callbacks=[LabelSmoothing(0.1)]).fit(Wrapped(), loader())


class WrappedWithTricks(TricksMixin, TheirModule):
    """The user's own step through tricks_loss, their extra term kept."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.tricks_loss(self(x), y) + self.penalty()
        self.seen.append(loss.detach())
        return loss


def test_own_step_keeps_its_terms_with_the_tricks() -> None:
    model = WrappedWithTricks()
    quiet_trainer(max_steps=2, callbacks=[LabelSmoothing(0.2)]).fit(model, loader(32, 8))
    x, y = next(iter(loader(32, 8)))
    want = F.cross_entropy(model(x), y, label_smoothing=0.2) + model.penalty()
    assert abs(model.seen[0].item() - want.item()) <= 1e-6


def test_the_mixin_must_come_first() -> None:
    with pytest.raises(TypeError, match=r"TricksMixin must come before LightningModule.*class Late\(TricksMixin"):
        class Late(pl.LightningModule, TricksMixin):
            pass


def test_a_seam_override_without_super_is_an_error() -> None:
    class Skips(NoClassCount):
        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            return batch  # no super(): the tricks would act on a stale record

    with pytest.raises(RuntimeError, match=r"did not pass through it: Skips.on_after_batch_transfer must call"):
        quiet_trainer(max_steps=1, callbacks=[Mixup(alpha=0.2)]).fit(Skips(), loader())


def test_segmentation_under_per_sample_mixup_and_cutmix() -> None:
    """`mode="elem"`: each sample is kept, blended (MixUp) or pasted (CutMix) on its own; the per-pixel targets follow
    each sample's own rule (checked pixel by pixel against the inputs)."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 2, 8, 8, generator=g), torch.randint(0, 3, (16, 8, 8), generator=g)
    model = TinySegmenter()
    mix = Mixup(alpha=0.4, cutmix_alpha=1.0, mode="elem", prob=0.8)
    quiet_trainer(max_steps=2, callbacks=[LabelSmoothing(0.1), mix]).fit(model, DataLoader(TensorDataset(x, y), 8))
    kinds = set()
    assert len(model.records) == 2
    for r in model.records:
        lam, index = r["draw"]
        x0, xm, partner = r["x0"], r["x"], r["x0"][index]
        own = torch.empty(x0.shape[0], 1, 8, 8)
        for i in range(x0.shape[0]):
            is_self, is_partner = (xm[i] == x0[i]).all(0), (xm[i] == partner[i]).all(0)
            if (is_self | is_partner).all() and not is_self.all():  # pasted: partner's pixels inside a box
                own[i, 0] = is_self.float()
                kinds.add("cut")
            else:  # blended by lam (1 for a kept sample)
                torch.testing.assert_close(xm[i], lam[i] * x0[i] + (1 - lam[i]) * partner[i])
                own[i, 0] = lam[i]
                kinds.add("kept" if lam[i] == 1 else "mixup")
        ref = pixel_reference(r["logits"], r["y0"], r["y0"][index], own, 0.1)
        assert abs(r["loss"].item() - ref.item()) <= 1e-5
    assert {"cut", "mixup"} <= kinds
