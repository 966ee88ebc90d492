"""param_groups (layer-wise decay, multipliers, no-decay rules), adamw() on top of it, and LRScaling."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay
from torch import nn

from lightning_tricks import LRFinder, LRScaling, WarmupCosine, adamw, param_groups, scaled_lr
from lightning_tricks.groups import block_order, layer_of
from tests.conftest import TinyNet, loader, quiet_trainer


def tiny_vit() -> VisionTransformer:
    return VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=3, num_heads=2)


def per_param(groups: list[dict[str, Any]], lr_key: str) -> dict[int, tuple[float, float]]:
    return {id(p): (g[lr_key], g["weight_decay"]) for g in groups for p in g["params"]}


def test_layer_decay_matches_timms_param_groups_layer_decay() -> None:
    model = tiny_vit()
    theirs = param_groups_layer_decay(model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay(),
                                      layer_decay=0.75)
    # timm's layers for a ViT: the stem, each block (the final norm with the last one), then the head
    layers = [["cls_token", "pos_embed", "patch_embed"], "blocks.0", "blocks.1", ["blocks.2", "norm"], "head"]
    ours = param_groups(model, lr=1.0, weight_decay=0.05, no_decay=model.no_weight_decay(), layer_decay=0.75,
                        layers=layers)
    a, b = per_param(ours, "lr"), per_param(theirs, "lr_scale")
    assert a.keys() == b.keys() and len(a) == len(list(model.parameters()))
    for key in a:
        assert a[key][0] == pytest.approx(b[key][0], rel=1e-12) and a[key][1] == b[key][1]
    assert sorted({lr for lr, _ in a.values()}) == pytest.approx([0.75**k for k in range(4, -1, -1)])


def test_default_block_order_counts_only_layers_with_parameters() -> None:
    model = tiny_vit()
    order = block_order(model)
    assert order == ["patch_embed", "blocks.0", "blocks.1", "blocks.2", "norm", "head"]
    depth = layer_of(model)
    assert depth["cls_token"] == 0 and depth["blocks.1.attn.qkv.weight"] == 2 and depth["head.weight"] == 5
    stack = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    groups = param_groups(stack, lr=1.0, weight_decay=0.1, layer_decay=0.5)
    lrs = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lrs[id(stack[0].weight)] == 0.5 and lrs[id(stack[2].weight)] == 1.0  # bottom at decay x the top
    wrapped = nn.Module()
    wrapped.net = stack  # a LightningModule around its network is looked through
    assert block_order(wrapped) == ["net.0", "net.2"]


def test_multipliers_no_decay_and_frozen_parameters() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    model[0].weight.requires_grad_(False)
    groups = param_groups(model, lr=0.1, weight_decay=0.01, lr_mult={"2": 10.0, "2.bias": 2.0})
    got = per_param(groups, "lr")
    assert id(model[0].weight) not in got  # frozen: left out
    assert got[id(model[0].bias)] == (0.1, 0.0) and got[id(model[1].weight)] == (0.1, 0.0)  # bias, norm: no decay
    assert got[id(model[2].weight)] == (pytest.approx(1.0), 0.01)
    assert got[id(model[2].bias)] == (pytest.approx(0.2), 0.0)  # the longest matching name wins
    by_predicate = per_param(param_groups(model, 0.1, no_decay=lambda name, p: name.startswith("2.")), "lr")
    assert by_predicate[id(model[2].weight)][1] == 0.0


def test_adamw_groups_follow_warmup_cosine_with_their_ratios() -> None:
    class Decayed(TinyNet):
        def configure_optimizers(self) -> Any:
            return adamw(self, lr=0.01, layer_decay=0.5)

    schedule, seen = WarmupCosine(0.25), []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            seen.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    quiet_trainer(max_epochs=1, callbacks=[schedule, Spy()]).fit(Decayed(), loader(64, 8))
    assert [sorted(set(g)) for g in schedule.base_lrs] == [[0.005, 0.01]]  # conv at 0.5 x the head
    bases = schedule.base_lrs[0]
    for lrs in seen[1:-1]:
        assert [lr / b for lr, b in zip(lrs, bases)] == pytest.approx([lrs[0] / bases[0]] * len(lrs))


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(layer_decay=0.0), r"`layer_decay` must be in \(0.0, 1.0\], got 0.0"),
    (dict(layer_decay=1.5), r"`layer_decay` must be in \(0.0, 1.0\], got 1.5"),
    (dict(lr_mult={"backbone": 0.1}), r"`lr_mult`: \['backbone'\] match no module"),
    (dict(lr_mult={"conv": -1.0}), r"`lr_mult\['conv'\]` must be"),
    (dict(layers=["conv", "heads"]), r"`layers`: \[\['heads'\]\] match no parameter"),
    (dict(layers=["conv"]), r"`layers`: the parameter 'head.weight' is in none of the layers"),
    (dict(weight_decay=-0.1), r"`weight_decay` must be"),
])
def test_bad_group_arguments_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        param_groups(TinyNet(), lr=0.1, **kwargs)


def test_scaled_lr_rules() -> None:
    assert scaled_lr(1e-3, 256, 32) == pytest.approx(8e-3)  # the guide's example: 32 -> 256, 1e-3 -> 8e-3
    assert scaled_lr(1e-3, 128, 32, "sqrt") == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="`rule`"):
        scaled_lr(1e-3, 128, 32, "cubic")
    with pytest.raises(ValueError, match="`base_batch_size`"):
        LRScaling(0)


class LrAtStart(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.lrs = [g["lr"] for g in trainer.optimizers[0].param_groups]


def test_lr_scaling_uses_the_effective_batch_and_composes_with_warmup_cosine() -> None:
    scaling, schedule, probe = LRScaling(base_batch_size=4, rule="sqrt"), WarmupCosine(0.1), LrAtStart()
    model = TinyNet(group_lrs=(0.01, 0.03))
    trainer = quiet_trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[schedule, scaling, probe])
    trainer.fit(model, loader(64, 8))
    assert scaling.effective_batch_size == 16 and scaling.factor == pytest.approx(2.0)  # sqrt(8 x 2 / 4)
    assert schedule.base_lrs == [[pytest.approx(0.02), pytest.approx(0.06)]]
    with pytest.raises(ValueError, match="LRScaling with LRFinder"):
        quiet_trainer(max_steps=1, callbacks=[LRScaling(4), LRFinder()]).fit(TinyNet(), loader())


class ScaledOnEveryRank(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scaling = next(cb for cb in trainer.callbacks if isinstance(cb, LRScaling))
        assert scaling.effective_batch_size == 16  # 8 per process x 2 processes
        assert math.isclose(trainer.optimizers[0].param_groups[0]["lr"], 0.02)


def test_lr_scaling_under_ddp_counts_both_processes() -> None:
    trainer = quiet_trainer(devices=2, strategy="ddp_fork", max_steps=2,
                            callbacks=[LRScaling(base_batch_size=8), ScaledOnEveryRank()])
    trainer.fit(TinyNet(lr=0.01), loader(64, 8))
    assert trainer.state.finished  # the assertions ran on both ranks


def test_lr_scaling_is_not_applied_twice_on_resume(tmp_path: Any) -> None:
    scaling = LRScaling(base_batch_size=4)
    quiet_trainer(max_epochs=1, enable_checkpointing=True, default_root_dir=str(tmp_path),
                  callbacks=[scaling]).fit(TinyNet(lr=0.01), loader(32, 8))
    ckpt = next(tmp_path.rglob("*.ckpt"))
    again, probe = LRScaling(base_batch_size=4), LrAtStart()
    quiet_trainer(max_epochs=2, callbacks=[again, probe]).fit(TinyNet(lr=0.01), loader(32, 8), ckpt_path=str(ckpt))
    assert again.factor == 2.0 and probe.lrs == [pytest.approx(0.02)]  # restored, not 0.04
