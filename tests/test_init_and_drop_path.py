"""init_weights against the formulas (statistically), zero-init of residual blocks, and add_drop_path."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from timm.layers import DropPath
from torch import nn
from torchvision.models import resnet18, resnet50

from lightning_tricks import add_drop_path, init_weights
from lightning_tricks.drop_path import BranchDropPath

# fan_in, fan_out of the two big layers below: Linear(2000 -> 1000) and Conv2d(64 -> 128, 3x3)
LINEAR, CONV = (2000, 1000), (64 * 9, 128 * 9)
TRUNCATED = math.sqrt(1 - 2 * 2 * math.exp(-2) / math.sqrt(2 * math.pi) / math.erf(2 / math.sqrt(2)))  # std at 2 sigma


def expected_std(scheme: str, fan_in: int, fan_out: int) -> float:
    return {
        "kaiming_normal": math.sqrt(2 / fan_out),  # the default: fan_out, relu
        "kaiming_uniform": math.sqrt(2) * math.sqrt(3 / fan_out) / math.sqrt(3),
        "xavier_normal": math.sqrt(2 / (fan_in + fan_out)),
        "xavier_uniform": math.sqrt(6 / (fan_in + fan_out)) / math.sqrt(3),
        "lecun_normal": 1 / math.sqrt(fan_in),
        "trunc_normal": 0.02 * TRUNCATED,
    }[scheme]


@pytest.mark.parametrize("scheme", ["kaiming_normal", "kaiming_uniform", "xavier_normal", "xavier_uniform",
                                    "lecun_normal", "trunc_normal"])
def test_the_std_of_large_layers_is_the_formulas(scheme: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(*LINEAR), nn.Conv2d(64, 128, 3), nn.BatchNorm2d(128), nn.LayerNorm(8))
    nn.init.normal_(model[2].weight)
    init_weights(model, scheme)
    for layer, fans in ((model[0], LINEAR), (model[1], CONV)):
        got, want = float(layer.weight.std()), expected_std(scheme, *fans)
        assert abs(got / want - 1) < 0.05, (scheme, got, want)
        assert float(layer.weight.mean()) == pytest.approx(0.0, abs=0.05 * want)
        assert torch.count_nonzero(layer.bias) == 0
    assert torch.all(model[2].weight == 1) and torch.all(model[2].bias == 0) and torch.all(model[3].weight == 1)


def test_fan_in_mode_and_gains() -> None:
    torch.manual_seed(0)
    layer = init_weights(nn.Linear(2000, 1000), mode="fan_in", nonlinearity="tanh")
    assert abs(float(layer.weight.std()) / (5 / 3 / math.sqrt(2000)) - 1) < 0.05  # tanh gain 5/3


def test_zero_init_residual_for_torchvision_and_timm_blocks() -> None:
    tv = init_weights(resnet50(), zero_init_residual=True)
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for layer in (tv.layer1, tv.layer4) for b in layer)
    assert torch.all(tv.bn1.weight == 1)
    tm = init_weights(timm.create_model("resnet18", pretrained=False), zero_init_residual=True)
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for b in tm.layer2)
    x = torch.randn(2, 64, 8, 8)
    block = tv.layer1[1].eval()
    assert torch.allclose(block(x.relu()[:, :1].repeat(1, 256, 1, 1)), x.relu()[:, :1].repeat(1, 256, 1, 1))


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(scheme="orthogonal"), r"`scheme`"),
    (dict(mode="fan_avg"), r"`mode`"),
    (dict(nonlinearity="swish"), r"`nonlinearity`"),
    (dict(std=0.0), r"`std` must be"),
    (dict(zero_init_residual=True), "no residual block found"),
])
def test_bad_init_arguments_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        init_weights(nn.Sequential(nn.Linear(4, 4)), **kwargs)


# ------------------------------------------------------------------------------------------------- DropPath
def test_torchvision_blocks_get_linear_rates_and_keep_their_state_dict_keys() -> None:
    model = resnet18()
    keys = list(model.state_dict())
    assert add_drop_path(model, 0.2) == 8
    rates = [b.drop_path.drop.drop_prob for layer in (model.layer1, model.layer2, model.layer3, model.layer4)
             for b in layer]
    assert rates == pytest.approx([0.2 * i / 7 for i in range(8)])
    assert list(model.state_dict()) == keys  # pretrained weights still load
    assert add_drop_path(model, 0.1) == 8 and len(model.layer4[1].bn2._forward_hooks) == 1  # no second hook


def test_a_dropped_branch_leaves_the_identity_per_sample_and_evaluation_keeps_it_whole() -> None:
    torch.manual_seed(0)
    model = resnet18()
    add_drop_path(model, 0.5)
    block = model.layer4[1].eval()  # the last block: rate 0.5; BatchNorm in eval mode throughout
    x = torch.randn(64, 512, 2, 2)
    with torch.no_grad():
        branch = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
        assert torch.allclose(block(x), (x + branch).relu(), atol=1e-6)  # evaluation: no drop, no scaling
        block.drop_path.train()  # training mode for the drop path only
        out = block(x)
    is_dropped = torch.isclose(out, x.relu(), atol=1e-6).flatten(1).all(1)
    is_kept = torch.isclose(out, (x + branch / 0.5).relu(), atol=1e-5).flatten(1).all(1)
    assert torch.all(is_dropped ^ is_kept) and 15 < int(is_dropped.sum()) < 49  # each sample one or the other


def test_timm_blocks_and_marked_blocks() -> None:
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8)
    n = add_drop_path(vit, 0.1)
    assert n == 12 and isinstance(vit.blocks[-1].drop_path1, DropPath)
    assert vit.blocks[-1].drop_path2.drop_prob == pytest.approx(0.1) and vit.blocks[0].drop_path1.drop_prob == 0.0

    class Marked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.branch, self.drop_path = nn.Linear(4, 4), nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.drop_path(self.branch(x))

    mine = nn.Sequential(Marked(), Marked(), Marked())
    assert add_drop_path(mine, 0.3) == 3 and mine[2].drop_path.drop_prob == pytest.approx(0.3)


def test_a_deep_copy_drops_with_its_own_modules() -> None:
    model = resnet18()
    add_drop_path(model, 0.2)
    twin = copy.deepcopy(model)
    hook = next(iter(twin.layer4[1].bn2._forward_hooks.values()))
    assert hook.__self__ is twin.layer4[1].drop_path  # not the original's: eval() on the copy reaches it
    assert isinstance(hook.__self__, BranchDropPath)


def test_bad_drop_path_input() -> None:
    with pytest.raises(ValueError, match=r"`rate` must be in \[0.0, 1.0\)"):
        add_drop_path(resnet18(), 1.0)
    with pytest.raises(ValueError, match="no residual block found"):
        add_drop_path(nn.Sequential(nn.Linear(4, 4)), 0.1)
