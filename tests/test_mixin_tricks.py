"""TricksMixin, LabelSmoothing and Mixup through a real Trainer."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_tricks import LabelSmoothing, Mixup, TricksMixin
from lightning_tricks.functional import mix_pair, smooth_targets, soft_cross_entropy, to_soft_targets
from tests.conftest import TinyNet, loader, make_data, quiet_trainer


class PlainNet(pl.LightningModule):
    """TinyNet without the mixin: the reference for 'no trick means no change'."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3, padding=1)
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=0.05)


def test_without_tricks_training_is_identical_to_a_plain_module() -> None:
    weights = []
    for cls in (PlainNet, TinyNet):
        pl.seed_everything(3, verbose=False)
        model = cls()
        quiet_trainer(max_epochs=2).fit(model, loader(64, 8, shuffle=True))
        weights.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*weights):
        assert torch.equal(a, b)


class Probe(TinyNet):
    """Records, per training batch, the original batch, the mixed inputs, the effective targets and the loss."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.records: list[dict[str, Any]] = []
        self.val_inputs: list[torch.Tensor] = []
        self._original: Any = None

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self._original = [t.clone() for t in batch]
        return batch

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.tricks_loss(logits, y)
        mix = next((cb for cb in self.trainer.callbacks if isinstance(cb, Mixup)), None)
        self.records.append(dict(x0=self._original[0], y0=self._original[1], x=x.detach().clone(), target=y,
                                 logits=logits.detach().float(), loss=loss.detach(),
                                 pending=None if mix is None else mix.last_draw, epoch=self.current_epoch))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.val_inputs.append(batch[0].clone())
        assert torch.equal(batch[0], self._original[0])  # validation batches are never mixed
        return super().validation_step(batch, batch_idx)


@pytest.mark.parametrize("convention", ["uniform", "others"])
def test_label_smoothing_loss(convention: str) -> None:
    model = Probe()
    quiet_trainer(max_steps=4, callbacks=[LabelSmoothing(0.2, convention)]).fit(model, loader())
    assert len(model.records) == 4
    for r in model.records:
        ref = soft_cross_entropy(r["logits"], smooth_targets(r["y0"], 4, 0.2, convention))
        assert abs(r["loss"].item() - ref.item()) <= 1e-6
        if convention == "uniform":
            assert abs(r["loss"].item() - F.cross_entropy(r["logits"], r["y0"], label_smoothing=0.2).item()) <= 1e-6


def test_label_smoothing_alone_with_ignore_index() -> None:
    """Ignored samples are left out of the smoothed loss and of its mean (torch's rule for label smoothing)."""

    class Padded(Probe):
        ignore_index = -100

    data = make_data(64)
    data.tensors[1][::5] = -100
    model = Padded()
    quiet_trainer(max_steps=4, callbacks=[LabelSmoothing(0.1)]).fit(model, DataLoader(data, batch_size=16))
    assert len(model.records) == 4
    for r in model.records:
        soft = smooth_targets(r["y0"], 4, 0.1, ignore_index=-100)
        ref = F.cross_entropy(r["logits"], r["y0"], label_smoothing=0.1, ignore_index=-100)
        assert abs(r["loss"].item() - ref.item()) <= 1e-6
        assert abs(r["loss"].item() - soft_cross_entropy(r["logits"], soft, ignore_index=-100).item()) <= 1e-6
        assert (r["y0"] == -100).any()


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
@pytest.mark.parametrize("accumulate", [1, 3])
def test_mixup_with_smoothing(precision: str, accumulate: int) -> None:
    model = Probe()
    trainer = quiet_trainer(max_epochs=2, precision=precision, accumulate_grad_batches=accumulate,
                            num_sanity_val_steps=2, limit_val_batches=2,
                            callbacks=[Mixup(alpha=0.4), LabelSmoothing(0.1)])
    trainer.fit(model, loader(64, 8, shuffle=True), loader(32, 8))
    assert len(model.records) == 16 and len(model.val_inputs) == 2 + 2 * 2
    lams = set()
    for r in model.records:
        lam, idx = r["pending"]
        lams.add(lam)
        # each mixed sample is lam * x_i + (1 - lam) * x_j; labels follow the same pairing; smoothed once
        torch.testing.assert_close(r["x"], lam * r["x0"] + (1 - lam) * r["x0"][idx])
        soft = smooth_targets(r["y0"], 4, 0.1)
        want = lam * soft + (1 - lam) * soft[idx]
        assert torch.equal(r["target"], r["y0"]) and r["target"].dtype == torch.int64  # the user's targets, untouched
        assert r["loss"].dtype == torch.float32
        assert abs(r["loss"].item() - soft_cross_entropy(r["logits"], want).item()) <= 1e-5
    assert len(lams) == 16  # a fresh draw for every micro-batch


def test_cutmix_elementwise_and_odd_batch() -> None:
    model = Probe()
    cb = Mixup(alpha=0.5, cutmix_alpha=1.0, mode="elem", prob=0.8)
    quiet_trainer(max_steps=6, callbacks=[cb]).fit(model, DataLoader(make_data(35), batch_size=7))
    assert len(model.records) == 6
    for r in model.records:
        lam, idx = r["pending"]
        x0, x = r["x0"], r["x"]
        assert x.shape[0] == 7
        for i in range(7):
            blend = lam[i] * x0[i] + (1 - lam[i]) * x0[idx[i]]
            from_partner = torch.isclose(x[i], x0[idx[i]])
            from_self = torch.isclose(x[i], x0[i])
            is_cut = bool((from_partner | from_self).all()) and not torch.allclose(x[i], blend)
            if is_cut:  # pixels come from the partner inside one box, self elsewhere; lam is the area left
                frac_self = (from_self & ~from_partner).float().mean().item()
                assert frac_self == pytest.approx(lam[i].item(), abs=1 / 16 + 1e-6)
            else:
                torch.testing.assert_close(x[i], blend)
        want = mix_pair(to_soft_targets(r["y0"], 4), lam, idx)
        assert torch.equal(r["target"], r["y0"])
        assert abs(r["loss"].item() - soft_cross_entropy(r["logits"], want).item()) <= 1e-5


def test_stop_epoch_ends_mixing() -> None:
    model = Probe()
    quiet_trainer(max_epochs=3, callbacks=[Mixup(alpha=1.0, stop_epoch=2)]).fit(model, loader(32, 8))
    assert [r["epoch"] for r in model.records] == [0] * 4 + [1] * 4 + [2] * 4
    for r in model.records:
        assert (r["pending"] is None) == (r["epoch"] >= 2)
        if r["epoch"] >= 2:
            assert torch.equal(r["x"], r["x0"])


def _draws(seed: int, **kw: Any) -> list[Any]:
    pl.seed_everything(seed, verbose=False)
    model = Probe()
    quiet_trainer(max_epochs=2, callbacks=[Mixup(alpha=1.0)], **kw).fit(model, loader(32, 8))
    return [(r["pending"][0], r["pending"][1].tolist()) for r in model.records]


def test_reproducible_under_seed_everything() -> None:
    assert _draws(5) == _draws(5)
    assert _draws(5) != _draws(6)


def test_resume_repeats_the_uninterrupted_draws(tmp_path: Any) -> None:
    full = _draws(7, enable_checkpointing=True,
                  default_root_dir=tmp_path)  # writes an end-of-epoch checkpoint per epoch (last one kept)
    pl.seed_everything(7, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "c", every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    quiet_trainer(max_epochs=1, enable_checkpointing=True, callbacks=[Mixup(alpha=1.0), ckpt]).fit(
        Probe(), loader(32, 8))
    pl.seed_everything(123, verbose=False)  # a different global seed: the checkpointed one must win
    model = Probe()
    quiet_trainer(max_epochs=2, callbacks=[Mixup(alpha=1.0)]).fit(model, loader(32, 8),
                                                                 ckpt_path=str(tmp_path / "c" / "epoch=0.ckpt"))
    resumed = [(r["pending"][0], r["pending"][1].tolist()) for r in model.records]
    assert resumed == full[4:]


class _RankDraws(pl.Callback):
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        lams = torch.tensor([r["pending"][0] for r in pl_module.records], dtype=torch.float64)
        gathered = trainer.strategy.all_gather(lams)
        assert gathered.shape == (2, 4)
        assert not torch.allclose(gathered[0], gathered[1])  # each rank mixes differently


def test_ddp_ranks_draw_differently() -> None:
    trainer = quiet_trainer(devices=2, strategy="ddp_fork", max_epochs=1,
                            callbacks=[Mixup(alpha=1.0), LabelSmoothing(0.1), _RankDraws()])
    trainer.fit(Probe(), loader(64, 8))
    assert trainer.state.finished


# ------------------------------------------------------------------------------- seam errors
class NotMixin(PlainNet):
    pass


def test_callback_requires_the_mixin() -> None:
    with pytest.raises(TypeError, match="does not use it: declare `class NotMixin\\(TricksMixin"):
        quiet_trainer(max_steps=1, callbacks=[Mixup()]).fit(NotMixin(), loader())


class HidingDataModule(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return loader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return batch


def test_datamodule_hiding_the_seam_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="HidingDataModule overrides on_after_batch_transfer"):
        quiet_trainer(max_steps=1, callbacks=[Mixup()]).fit(TinyNet(), datamodule=HidingDataModule())


def test_unpackable_batch_says_what_was_expected() -> None:
    triple = DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 1, 16), torch.zeros(8).long(),
                                                       torch.zeros(8)), batch_size=4)
    with pytest.raises(ValueError, match=r"expects a batch `\(x, y\)`.*list of length 3"):
        quiet_trainer(max_steps=1).fit(TinyNet(), triple)


def test_float_targets_where_indices_are_expected() -> None:
    data = DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 1, 16), torch.zeros(8)), batch_size=4)
    with pytest.raises(ValueError, match=r"float targets are class probabilities of the logits' shape \(4, 4\), got "
                                         r"\(4,\)"):
        quiet_trainer(max_steps=1, callbacks=[LabelSmoothing()]).fit(TinyNet(), data)


def test_out_of_range_target() -> None:
    data = DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 1, 16), torch.full((8,), 4)), batch_size=4)
    with pytest.raises(ValueError, match=r"target class 4 is out of range"):
        quiet_trainer(max_steps=1, callbacks=[LabelSmoothing()]).fit(TinyNet(), data)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(alpha=-0.1), r"`alpha` must be in \[0.0, inf\], got -0.1"),
        (dict(cutmix_alpha=-1.0), "`cutmix_alpha`"),
        (dict(prob=1.5), "`prob`"),
        (dict(switch_prob=-0.5), "`switch_prob`"),
        (dict(mode="pair"), r"`mode` must be one of 'batch', 'elem', got 'pair'"),
        (dict(alpha=0.0), "nothing to mix"),
        (dict(cutmix_minmax=(0.8, 0.2)), "`cutmix_minmax`"),
        (dict(stop_epoch=-1), "`stop_epoch`"),
    ],
)
def test_mixup_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Mixup(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(smoothing=1.0), r"`smoothing` must be in \[0.0, 1.0\), got 1.0"), (dict(convention="tf"), "`convention`")],
)
def test_label_smoothing_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LabelSmoothing(**kwargs)


def test_mixin_steps_log_metrics() -> None:
    trainer = quiet_trainer(max_epochs=1, callbacks=[Mixup(), LabelSmoothing()])
    trainer.fit(TinyNet(), loader(), loader(32))
    m = trainer.callback_metrics
    assert {"train_loss_epoch", "train_acc", "val_loss", "val_acc"} <= set(m)
    assert 0.0 <= float(m["val_acc"]) <= 1.0
    result = trainer.test(TinyNet(), loader(32), verbose=False)[0]
    assert {"test_loss", "test_acc"} <= set(result)


class _CustomStep(TricksMixin, pl.LightningModule):
    num_classes = 4

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 4)
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.tricks_loss(self.lin(x.flatten(1)), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_user_training_step_still_gets_the_tricks() -> None:
    model = _CustomStep()
    quiet_trainer(max_steps=2, callbacks=[LabelSmoothing(0.5)]).fit(model, loader())
    x, y = next(iter(loader()))
    ref = F.cross_entropy(model.lin(x.flatten(1)), y, label_smoothing=0.5).item()
    assert model.losses[0] == pytest.approx(ref, abs=1e-6)


def test_the_tricks_follow_changes_of_the_callback_list_mid_fit() -> None:
    """Regression: replacing LabelSmoothing(0.1) by LabelSmoothing(0.5) in `trainer.callbacks` during a fit used to
    keep smoothing 0.1 (a plan cached on the Trainer); removing and adding back must take effect at the next batch."""
    first, stronger = LabelSmoothing(0.1), LabelSmoothing(0.5)

    class Edit(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            if trainer.global_step == 1:
                trainer.callbacks[trainer.callbacks.index(first)] = stronger  # in place, same length
            elif trainer.global_step == 2:
                trainer.callbacks.remove(stronger)
            elif trainer.global_step == 3:
                trainer.callbacks = [first, *trainer.callbacks]  # a new list

    model = _CustomStep()
    quiet_trainer(max_steps=4, callbacks=[first, Edit()]).fit(model, loader(32, 8))
    # lr 0 and no shuffling: every step sees the same weights, batch by batch
    logits = [model.lin(xb.flatten(1)) for xb, _ in loader(32, 8)]
    ys = [yb for _, yb in loader(32, 8)]
    expected = [F.cross_entropy(logits[0], ys[0], label_smoothing=0.1).item(),
                F.cross_entropy(logits[1], ys[1], label_smoothing=0.5).item(),
                F.cross_entropy(logits[2], ys[2]).item(),
                F.cross_entropy(logits[3], ys[3], label_smoothing=0.1).item()]
    assert model.losses == pytest.approx(expected, abs=1e-6)


def test_mixup_refuses_integer_inputs() -> None:
    data = DataLoader(torch.utils.data.TensorDataset(torch.randint(0, 255, (8, 1, 16)), torch.zeros(8).long()),
                      batch_size=4)
    with pytest.raises(TypeError, match=r"Mixup blends inputs and needs floating-point ones, got "
                                        r"torch\.int64 \(token ids\?\).*LabelSmoothing alone"):
        quiet_trainer(max_steps=1, callbacks=[Mixup(alpha=1.0)]).fit(TinyNet(), data)


def test_module_deep_copies_mid_fit_without_the_callbacks() -> None:
    """EMA/SWA-style code deep-copies the module during fit: the copy must work and carry no callback."""
    import copy
    import io
    import pickle

    from lightning_tricks import GradientMonitor, TrainingDoctor, WarmupCosine

    copies: list[Any] = []
    carried: list[str] = []

    class FlagCallbacks(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            if isinstance(obj, pl.Callback):
                carried.append(type(obj).__name__)
            return None

    class CopyAtStep2(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            if trainer.global_step == 2:
                copies.append(copy.deepcopy(pl_module))
                FlagCallbacks(io.BytesIO()).dump(pl_module)

    tricks = [WarmupCosine(), LabelSmoothing(0.1), Mixup(0.2), GradientMonitor(), TrainingDoctor()]
    model = TinyNet()
    quiet_trainer(max_steps=4, callbacks=[*tricks, CopyAtStep2()]).fit(model, loader(64, 8))
    assert len(copies) == 1 and set(copies[0].state_dict()) == set(model.state_dict())
    assert carried == []  # the module's pickle (what deepcopy walks too) reaches no callback


def test_consecutive_batches_draw_from_disjoint_streams() -> None:
    """Each batch's random stream is its own: batch c + 1 must not replay batch c's numbers shifted."""
    mix = Mixup(0.2, seed=7)
    first, second, other_rank = (mix._rng(0, 10).random(1000), mix._rng(0, 11).random(1000),
                                 mix._rng(1, 10).random(1000))
    assert len(set(first) & set(second)) == 0
    assert len(set(first) & set(other_rank)) == 0
    assert list(mix._rng(0, 10).random(1000)) == list(first)  # positioned by the batch number alone


def test_batch_mode_draws() -> None:
    """Every batch gets its own lambda, pairing, CutMix choice and keep decision, at the documented rates, and the
    same on a recomputation (what a resumed run does)."""
    mix = Mixup(0.4, cutmix_alpha=1.0, prob=0.8, seed=3)

    def draw(batch: int, n: int = 8) -> tuple[bool, bool, float, Any, list[int]]:
        keep, cut, lam, box, perm = mix._draw_per_batch(mix._rng(0, batch), n, (16,))
        return keep, cut, lam, box, perm.tolist()

    steps = 200
    draws = [draw(c) for c in range(steps)]
    assert all(sorted(d[4]) == list(range(8)) for d in draws)
    assert len({tuple(d[4]) for d in draws}) > steps * 0.95  # distinct pairings (8! = 40320 possible)
    assert len({d[2] for d in draws}) == steps  # a fresh lambda every batch
    cut_rate = sum(d[1] for d in draws) / steps
    keep_rate = sum(d[0] for d in draws) / steps
    assert 0.35 < cut_rate < 0.65 and 0.1 < keep_rate < 0.3  # switch_prob 0.5, prob 0.8 (3-4 sd bands)
    assert all((d[3] is not None) == d[1] for d in draws)
    assert [draw(c) for c in (steps - 1, 0)] == [draws[steps - 1], draws[0]]


def test_mixup_alone_mixes_one_hot_rows_and_checks_the_range() -> None:
    model = Probe()
    quiet_trainer(max_steps=4, callbacks=[Mixup(alpha=0.4)]).fit(model, loader(32, 8))
    assert len(model.records) == 4
    for r in model.records:
        lam, idx = r["pending"]
        want = mix_pair(F.one_hot(r["y0"], 4).float(), lam, idx)
        assert torch.equal(r["target"], r["y0"])
        assert abs(r["loss"].item() - soft_cross_entropy(r["logits"], want).item()) <= 1e-5
    data = DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 1, 16), torch.full((8,), 4)), batch_size=4)
    with pytest.raises(ValueError, match=r"target class 4 is out of range"):
        quiet_trainer(max_steps=1, callbacks=[Mixup(alpha=0.4)]).fit(TinyNet(), data)


class ImageLabelNet(TinyNet):
    """A custom batch layout the default unpack does not know: the user says how to unpack and pack it."""

    def tricks_unpack(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["image"], batch["label"]

    def tricks_pack(self, batch: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
        return {**batch, "image": x, "label": y}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch["image"], batch["label"]
        loss = self.tricks_loss(self(x), y)
        assert torch.equal(y, batch["index"])  # the targets stay the loader's
        return loss


def test_a_custom_batch_layout_through_unpack_and_pack() -> None:
    data = [{"image": x, "label": y, "index": y} for x, y in loader(32, 8)]
    trainer = quiet_trainer(max_steps=4, callbacks=[LabelSmoothing(0.1)])
    trainer.fit(ImageLabelNet(), DataLoader(data, batch_size=None))
    assert trainer.global_step == 4
