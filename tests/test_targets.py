"""Label smoothing and soft cross-entropy against torch and the guide's formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_tricks.functional import smooth_targets, soft_cross_entropy, to_soft_targets


def test_uniform_equals_torch_label_smoothing() -> None:
    torch.manual_seed(0)
    logits, y = torch.randn(32, 7), torch.randint(0, 7, (32,))
    for eps in (0.0, 0.1, 0.3):
        ours = soft_cross_entropy(logits, smooth_targets(y, 7, eps))
        ref = F.cross_entropy(logits, y, label_smoothing=eps)
        assert abs(ours.item() - ref.item()) <= 1e-6


@pytest.mark.parametrize("shape", [(100, 10), (7, 3), (1, 1000), (5,), (3, 10), (97, 5), (128, 10), (250, 1000)])
def test_soft_cross_entropy_gradient_is_torchs_bit_for_bit(shape: tuple[int, ...]) -> None:
    # Soft targets must train exactly as torch's probability-target cross-entropy does (float32 upcast included).
    torch.manual_seed(2)
    z = torch.randn(*shape) * 4
    t = torch.softmax(torch.randn(*shape), dim=-1)
    mine = z.clone().requires_grad_()
    ref = z.clone().requires_grad_()
    ours = soft_cross_entropy(mine, t)
    theirs = F.cross_entropy(ref, t)
    ours.backward()
    theirs.backward()
    assert torch.equal(mine.grad, ref.grad)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    # and against the formula itself, in float64
    expected = -(t.double() * torch.log_softmax(z.double(), dim=-1)).sum() / (z.numel() // shape[-1])
    assert abs(ours.item() - expected.item()) <= 1e-5


def test_soft_cross_entropy_other_layouts_take_torchs_path() -> None:
    torch.manual_seed(3)
    z = torch.randn(4, 5, 6)  # (N, K, d): the class dimension is not the last one
    t = torch.softmax(torch.randn(4, 5, 6), dim=1)
    torch.testing.assert_close(soft_cross_entropy(z, t), F.cross_entropy(z, t))
    assert soft_cross_entropy(torch.zeros(0, 3), torch.zeros(0, 3)).isnan()  # empty batch: nan, as torch's mean


def test_uniform_with_ignore_index_equals_torch() -> None:
    torch.manual_seed(1)
    logits, y = torch.randn(20, 5), torch.randint(0, 5, (20,))
    y[::3] = -100
    ours = soft_cross_entropy(logits, smooth_targets(y, 5, 0.1, ignore_index=-100), ignore_index=-100)
    ref = F.cross_entropy(logits, y, label_smoothing=0.1, ignore_index=-100)
    assert abs(ours.item() - ref.item()) <= 1e-6
    # index targets take the same path as torch
    assert abs(soft_cross_entropy(logits, y, ignore_index=-100).item()
               - F.cross_entropy(logits, y, ignore_index=-100).item()) <= 1e-6


def test_others_convention_is_the_guides() -> None:
    y = torch.tensor([2, 0])
    soft = smooth_targets(y, 4, 0.3, convention="others")
    # The guide's code: fill eps / (K - 1), then put 1 - eps on the true class.
    ref = torch.full((2, 4), 0.3 / 3).scatter_(1, y.unsqueeze(1), 0.7)
    torch.testing.assert_close(soft, ref, atol=1e-7, rtol=0)
    uniform = smooth_targets(y, 4, 0.3)
    ref_u = torch.full((2, 4), 0.3 / 4).scatter_(1, y.unsqueeze(1), 1 - 0.3 + 0.3 / 4)
    torch.testing.assert_close(uniform, ref_u, atol=1e-7, rtol=0)


def test_soft_inputs_and_rows_sum_to_one() -> None:
    soft_in = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    out = smooth_targets(soft_in, 3, 0.3)
    torch.testing.assert_close(out.sum(-1), torch.ones(2))
    torch.testing.assert_close(out, soft_in * 0.7 + 0.1)


def test_smoothing_commutes_with_mixing() -> None:
    y = torch.tensor([0, 1, 2, 3])
    lam, idx = 0.3, torch.tensor([3, 2, 1, 0])
    for conv in ("uniform", "others"):
        hard = to_soft_targets(y, 4)
        a = smooth_targets(lam * hard + (1 - lam) * hard[idx], 4, 0.1, conv)
        s = smooth_targets(hard, 4, 0.1, conv)
        torch.testing.assert_close(a, lam * s + (1 - lam) * s[idx])


def test_soft_cross_entropy_is_float32_under_bf16() -> None:
    logits = torch.randn(8, 3).bfloat16()
    loss = soft_cross_entropy(logits, smooth_targets(torch.zeros(8, dtype=torch.long), 3, 0.1))
    assert loss.dtype == torch.float32


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: smooth_targets(torch.tensor([0]), 3, 1.0), ValueError, r"`smoothing` must be in \[0.0, 1.0\)"),
        (lambda: smooth_targets(torch.tensor([0]), 3, -0.1), ValueError, "`smoothing`"),
        (lambda: smooth_targets(torch.tensor([0]), 3, 0.1, "tf"), ValueError, "`convention` must be one of"),
        (lambda: smooth_targets(torch.tensor([3]), 3, 0.1), ValueError, r"target class 3 is out of range.*\[0, 3\)"),
        (lambda: smooth_targets(torch.tensor([-1]), 3, 0.1), ValueError, "target class -1"),
        (lambda: to_soft_targets(torch.tensor([0.0, 1.0]), 3), TypeError, "expected class indices"),
        (lambda: to_soft_targets(torch.ones(2, 5), 3), ValueError, r"shape \(N, 3\)"),
        (lambda: soft_cross_entropy(torch.randn(2, 3), torch.tensor([0, 5])), ValueError, "target class 5"),
    ],
)
def test_bad_input(call, error: type, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        call()
