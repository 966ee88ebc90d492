"""functional.cross_entropy: label smoothing and mixing from class indices of every shape torch takes, against a
dense soft-target reference built by hand, torch's own label smoothing, and timm's mixed targets."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import lightning_tricks.functional.targets as targets
from lightning_tricks.functional import Mix, class_dim_of, cross_entropy

IGNORE = -100


def dense_reference(logits: torch.Tensor, y: torch.Tensor, eps: float, convention: str, index: Any, own: Any,
                    class_dim: int = 1) -> torch.Tensor:
    """The definition, in float64: q = w s(y) + (1 - w) s(y[index]) as a dense tensor, loss = -sum q log p / sum q.

    ``own`` is the weight of each sample's own target per position, broadcastable to ``y`` (or None: no mixing).
    Ignored positions have an all-zero target row.
    """
    z = logits.double().movedim(class_dim, -1)  # (..., K)
    k = z.shape[-1]
    active = (y != IGNORE).double().unsqueeze(-1)
    onehot = F.one_hot(y.clamp_min(0), k).double() * active
    if convention == "uniform":
        s = (1 - eps) * onehot + eps / k * active
    else:
        s = (1 - eps) * onehot + eps / (k - 1) * (active - onehot)
    if index is not None:
        w = torch.as_tensor(own, dtype=torch.float64).unsqueeze(-1)
        s = w * s + (1 - w) * s[index]
    return -(s * torch.log_softmax(z, dim=-1)).sum() / s.sum()


def region_weights(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A CutMix-like 0/1 weight per position: 0 inside a box (the partner's pixels), 1 outside, per sample."""
    g = torch.Generator().manual_seed(seed)
    w = torch.ones(shape)
    for i in range(shape[0]):
        lo = [int(torch.randint(0, s - 1, (1,), generator=g)) for s in shape[1:]]
        w[(i, *[slice(a, a + 2) for a in lo])] = 0
    return w


@pytest.fixture(params=["dense", "indices"])
def form(request: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of computing the loss: the dense target (small logits) and the gathers (large logits)."""
    if request.param == "indices":
        monkeypatch.setattr(targets, "DENSE_MAX", 0)
    return request.param


SHAPES_AND_MIXING = [(shape, mixing) for shape in [(8,), (4, 6), (3, 5, 4)]  # classes, tokens, pixels
                     for mixing in [None, "batch", "sample", "region"]
                     if not (mixing == "region" and len(shape) == 1)]  # a region weights per-position targets only


@pytest.mark.parametrize(("target_shape", "mixing"), SHAPES_AND_MIXING)
@pytest.mark.parametrize("convention", ["uniform", "others"])
def test_equals_the_dense_soft_target_reference(form: str, target_shape: tuple[int, ...], convention: str,
                                                mixing: Any) -> None:
    torch.manual_seed(0)
    k, n = 5, target_shape[0]
    logits = torch.randn(n, k, *target_shape[1:]) * 2
    y = torch.randint(0, k, target_shape)
    y.view(-1)[::4] = IGNORE
    index = torch.randperm(n)
    mix, own = None, None
    if mixing == "batch":
        mix, own = Mix(index, 0.3), 0.3
    elif mixing == "sample":
        lam = torch.rand(n)
        mix, own = Mix(index, lam), lam.reshape(-1, *([1] * (y.ndim - 1)))
    elif mixing == "region":
        w = region_weights(target_shape, 1)
        # sample-level lam is unused by dense targets; the region is given in the inputs' layout (N, 1, *spatial)
        mix, own = Mix(index, 0.5, region=w.unsqueeze(1)), w
    ours = cross_entropy(logits, y, smoothing=0.1, convention=convention, mix=mix, ignore_index=IGNORE)
    ref = dense_reference(logits, y, 0.1, convention, None if mix is None else index, own)
    assert ours.dtype == torch.float32
    assert abs(ours.item() - ref.item()) <= 1e-6 * max(1.0, abs(ref.item()))


def test_region_equals_the_pasted_label_map(form: str) -> None:
    """Segmentation CutMix: 0/1 weights give the cross-entropy of where(box, y[perm], y) (the pasted label map)."""
    torch.manual_seed(1)
    logits, y = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4, 6, 6))
    index = torch.tensor([2, 3, 0, 1])
    w = region_weights((4, 6, 6), 2)
    pasted = torch.where(w.bool(), y, y[index])
    ours = cross_entropy(logits, y, smoothing=0.1, mix=Mix(index, 0.5, region=w.unsqueeze(1)))
    assert abs(ours.item() - F.cross_entropy(logits, pasted, label_smoothing=0.1).item()) <= 1e-6


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_unmixed_uniform_is_torchs_label_smoothing(form: str, eps: float) -> None:
    torch.manual_seed(2)
    for logits, y in [(torch.randn(16, 7), torch.randint(0, 7, (16,))),
                      (torch.randn(4, 7, 9), torch.randint(0, 7, (4, 9))),
                      (torch.randn(2, 7, 5, 5), torch.randint(0, 7, (2, 5, 5)))]:
        y.view(-1)[::3] = IGNORE
        ours = cross_entropy(logits, y, smoothing=eps, ignore_index=IGNORE)
        ref = F.cross_entropy(logits, y, label_smoothing=eps, ignore_index=IGNORE)
        assert abs(ours.item() - ref.item()) <= 1e-6


def test_class_last_logits_equal_torchs_layout(form: str) -> None:
    """A language model's (N, L, V) logits with (N, L) targets: the loss of the transposed (N, V, L) logits."""
    torch.manual_seed(3)
    logits, y = torch.randn(3, 6, 11), torch.randint(0, 11, (3, 6))
    y[0, 4:] = IGNORE
    index = torch.tensor([1, 2, 0])
    for mix in (None, Mix(index, 0.7)):
        ours = cross_entropy(logits, y, smoothing=0.1, mix=mix, class_dim=-1)
        ref = cross_entropy(logits.transpose(1, 2), y, smoothing=0.1, mix=mix, class_dim=1)
        assert abs(ours.item() - ref.item()) <= 1e-6


def test_mixed_gradient_equals_the_reference(form: str) -> None:
    torch.manual_seed(4)
    logits = torch.randn(6, 4, 5, requires_grad=True)
    y = torch.randint(0, 4, (6, 5))
    y[2, :2] = IGNORE
    index, lam = torch.randperm(6), torch.rand(6)
    cross_entropy(logits, y, smoothing=0.2, convention="others", mix=Mix(index, lam)).backward()
    ref_logits = logits.detach().clone().requires_grad_()
    dense_reference(ref_logits, y, 0.2, "others", index, lam.reshape(-1, 1)).backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad.float(), atol=1e-7, rtol=1e-5)


def test_timm_parity_of_the_mixed_loss() -> None:
    """timm's Mixup pairs sample i with N-1-i and smooths uniformly; SoftTargetCrossEntropy takes the result."""
    timm_mixup = pytest.importorskip("timm.data.mixup")
    soft_ce = pytest.importorskip("timm.loss").SoftTargetCrossEntropy()
    torch.manual_seed(5)
    logits, y = torch.randn(10, 10), torch.randint(0, 10, (10,))
    for lam in (0.2, 0.65, 1.0):
        target = timm_mixup.mixup_target(y, 10, lam=lam, smoothing=0.1)
        ours = cross_entropy(logits, y, smoothing=0.1, mix=Mix(torch.arange(9, -1, -1), lam))
        assert abs(ours.item() - soft_ce(logits, target).item()) <= 1e-6


def test_probability_targets_are_smoothed_and_mixed_densely() -> None:
    torch.manual_seed(6)
    logits, q = torch.randn(8, 5), torch.softmax(torch.randn(8, 5), dim=-1)
    index = torch.randperm(8)
    s = 0.9 * q + 0.1 / 5
    want = -(0.4 * s + 0.6 * s[index]) * torch.log_softmax(logits, -1)
    before = q.clone()
    ours = cross_entropy(logits, q, smoothing=0.1, mix=Mix(index, 0.4))
    assert abs(ours.item() - want.sum(-1).mean().item()) <= 1e-6
    assert torch.equal(q, before)  # the caller's targets are not modified


def test_out_of_range_indices_are_named(form: str) -> None:
    for mix in (None, Mix(torch.tensor([1, 0, 2]), 0.5)):
        with pytest.raises(ValueError, match=r"target class 7 is out of range for logits of 4 classes"):
            cross_entropy(torch.randn(3, 4), torch.tensor([0, 7, 1]), smoothing=0.1, mix=mix)
        with pytest.raises(ValueError, match=r"target class -1 is out of range"):
            cross_entropy(torch.randn(3, 4), torch.tensor([0, -1, 1]), smoothing=0.1, mix=mix)


def test_mixing_needs_the_batchs_targets_and_resolution() -> None:
    with pytest.raises(ValueError, match=r"mixed over 4 samples but the loss got 3 targets"):
        cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), mix=Mix(torch.arange(4), 0.5))
    region = torch.ones(1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"pasted boxes over input positions \(8, 8\) but the targets have positions "
                                         r"\(4, 4\).*cutmix_alpha=0"):
        cross_entropy(torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long),
                      mix=Mix(torch.tensor([1, 0]), 0.5, region=region))


def test_class_dimension_from_the_shapes() -> None:
    assert class_dim_of(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long)) == 1
    assert class_dim_of(torch.zeros(4, 5, 7), torch.zeros(4, 7, dtype=torch.long)) == 1  # torch's (N, C, L)
    assert class_dim_of(torch.zeros(4, 7, 5), torch.zeros(4, 7, dtype=torch.long)) == 2  # class-last (N, L, C)
    assert class_dim_of(torch.zeros(4, 5, 6, 6), torch.zeros(4, 6, 6, dtype=torch.long)) == 1
    with pytest.raises(ValueError, match=r"fit targets of shape \(4, 5\) with the classes on dimension 1 or on the "
                                         r"last: say which.*class_dim=-1"):
        class_dim_of(torch.zeros(4, 5, 5), torch.zeros(4, 5, dtype=torch.long))
    assert class_dim_of(torch.zeros(4, 5, 5), torch.zeros(4, 5, dtype=torch.long), class_dim=-1) == 2
    with pytest.raises(ValueError, match=r"logits of shape \(4, 12, 5\) do not fit class-index targets of shape "
                                         r"\(4, 11\)"):
        class_dim_of(torch.zeros(4, 12, 5), torch.zeros(4, 11, dtype=torch.long))


def test_ignore_index_none_counts_every_target(form: str) -> None:
    """With ignore_index=None no value is ignored: torch's default -100 is out of range like any other."""
    logits = torch.randn(3, 4)
    for eps in (0.0, 0.1):
        with pytest.raises(ValueError, match=r"target class -100 is out of range"):
            cross_entropy(logits, torch.tensor([0, -100, 2]), smoothing=eps, ignore_index=None)
    y = torch.tensor([0, 3, 2])
    assert abs(cross_entropy(logits, y, ignore_index=None).item() - F.cross_entropy(logits, y).item()) <= 1e-7
