"""MixUp/CutMix functional core: properties, and parity with timm.data.Mixup given the same lambda and pairing."""

from __future__ import annotations

import numpy as np
import pytest
import timm.data.mixup as timm_mixup
import torch

from lightning_tricks.functional import box_lambda, cutmix, mixup, sample_box, sample_lambda, smooth_targets


def _flip(n: int) -> torch.Tensor:
    return torch.arange(n - 1, -1, -1)


def test_mixup_properties() -> None:
    torch.manual_seed(0)
    x, t = torch.randn(5, 2, 6), smooth_targets(torch.randint(0, 3, (5,)), 3, 0.0)
    idx = torch.randperm(5)
    x0 = x.clone()
    mx, mt = mixup(x, t, 0.3, idx)
    torch.testing.assert_close(mx, 0.3 * x + 0.7 * x[idx])
    torch.testing.assert_close(mt, 0.3 * t + 0.7 * t[idx])
    assert torch.equal(x, x0)  # the caller's tensor is not modified
    lam = torch.rand(5)
    mx, mt = mixup(x, t, lam, idx)
    for i in range(5):
        torch.testing.assert_close(mx[i], lam[i] * x[i] + (1 - lam[i]) * x[idx[i]])
        torch.testing.assert_close(mt[i], lam[i] * t[i] + (1 - lam[i]) * t[idx[i]])


@pytest.mark.parametrize("shape", [(4, 3, 10), (4, 3, 6, 8)])
def test_cutmix_properties(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape)
    t = smooth_targets(torch.tensor([0, 1, 2, 0]), 3, 0.0)
    idx = torch.tensor([2, 0, 3, 1])
    box = ((2, 7),) if len(shape) == 3 else ((1, 4), (2, 6))
    mx, mt = cutmix(x, t, box, idx)
    inside = torch.zeros(shape[2:], dtype=torch.bool)
    inside[tuple(slice(a, b) for a, b in box)] = True
    assert torch.equal(mx[..., inside], x[idx][..., inside])  # pixels in the box come from the partner
    assert torch.equal(mx[..., ~inside], x[..., ~inside])  # all others untouched
    lam = 1 - inside.sum().item() / inside.numel()
    torch.testing.assert_close(mt, lam * t + (1 - lam) * t[idx])  # labels follow the same pairing, area weighted


def test_per_sample_boxes() -> None:
    x = torch.arange(2 * 1 * 8, dtype=torch.float32).reshape(2, 1, 8)
    t = torch.eye(2)
    box = ((torch.tensor([0, 4]), torch.tensor([2, 8])),)
    mx, mt = cutmix(x, t, box, torch.tensor([1, 0]))
    assert torch.equal(mx[0, 0, :2], x[1, 0, :2]) and torch.equal(mx[0, 0, 2:], x[0, 0, 2:])
    assert torch.equal(mx[1, 0, 4:], x[0, 0, 4:]) and torch.equal(mx[1, 0, :4], x[1, 0, :4])
    torch.testing.assert_close(mt, torch.tensor([[0.75, 0.25], [0.5, 0.5]]))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixup_parity_with_timm(monkeypatch: pytest.MonkeyPatch, smoothing: float) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    lam = 0.37
    mixer = timm_mixup.Mixup(mixup_alpha=0.2, label_smoothing=smoothing, num_classes=5)
    monkeypatch.setattr(mixer, "_params_per_batch", lambda: (lam, False))
    tx, tt = mixer(x.clone(), y)
    ox, ot = mixup(x, smooth_targets(y, 5, smoothing), lam, _flip(6))
    assert (ox - tx).abs().max().item() <= 1e-6
    assert (ot - tt).abs().max().item() <= 1e-6


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cutmix_parity_with_timm(monkeypatch: pytest.MonkeyPatch, smoothing: float) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    box = ((1, 5), (2, 8))  # (yl, yh), (xl, xh)
    monkeypatch.setattr(timm_mixup, "rand_bbox", lambda *a, **k: (1, 5, 2, 8))
    mixer = timm_mixup.Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=smoothing, num_classes=5)
    monkeypatch.setattr(mixer, "_params_per_batch", lambda: (0.5, True))
    tx, tt = mixer(x.clone(), y)
    ox, ot = cutmix(x, smooth_targets(y, 5, smoothing), box, _flip(4))
    assert (ox - tx).abs().max().item() <= 1e-6
    assert (ot - tt).abs().max().item() <= 1e-6


def test_elementwise_mixup_parity_with_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(6, 2, 5, 5), torch.randint(0, 4, (6,))
    lam = np.array([0.1, 0.9, 1.0, 0.5, 0.3, 0.7], dtype=np.float32)
    mixer = timm_mixup.Mixup(mixup_alpha=0.2, mode="elem", label_smoothing=0.1, num_classes=4)
    monkeypatch.setattr(mixer, "_params_per_elem", lambda n: (lam, np.zeros(n, dtype=bool)))
    tx, tt = mixer(x.clone(), y)
    ox, ot = mixup(x, smooth_targets(y, 4, 0.1), torch.from_numpy(lam), _flip(6))
    assert (ox - tx).abs().max().item() <= 1e-6
    assert (ot - tt).abs().max().item() <= 1e-6


def test_box_lambda_is_area_corrected() -> None:
    x = torch.zeros(1, 1, 10, 10)
    assert box_lambda(x, ((0, 5), (0, 4))) == pytest.approx(0.8)


def test_samplers_are_reproducible_and_in_range() -> None:
    a = sample_lambda(np.random.default_rng(3), 0.2)
    b = sample_lambda(np.random.default_rng(3), 0.2)
    assert a == b and 0.0 <= a <= 1.0
    rng = np.random.default_rng(0)
    for _ in range(50):
        lam = sample_lambda(rng, 1.0)
        ((y0, y1), (x0, x1)) = sample_box(rng, (16, 12), lam)
        assert 0 <= y0 <= y1 <= 16 and 0 <= x0 <= x1 <= 12
        ((l0, l1),) = sample_box(rng, (20,), lam, minmax=(0.2, 0.5))
        assert l0 >= 0 and l1 <= 20 and 4 <= l1 - l0 < 10
    boxes = sample_box(rng, (8, 8), sample_lambda(rng, 1.0, size=5), size=5)
    assert boxes[0][0].shape == (5,)
