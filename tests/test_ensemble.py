"""Prediction ensembles: the combinations against hand computations, and Ensemble through trainer.test/predict."""

from __future__ import annotations

import itertools
import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_tricks import Ensemble
from lightning_tricks.functional import combine, expected_calibration_error, fit_convex_weights, majority_vote
from tests.conftest import TinyNet, loader, quiet_trainer


def test_majority_vote_breaks_ties_by_the_mean_probability() -> None:
    probs = torch.tensor([
        [[0.6, 0.3, 0.1], [0.5, 0.4, 0.1]],
        [[0.2, 0.7, 0.1], [0.1, 0.6, 0.3]],
        [[0.5, 0.1, 0.4], [0.2, 0.5, 0.3]],
    ])  # sample 0: votes 0, 1, 0 -> class 0; sample 1: votes 0, 1, 1 -> class 1
    assert majority_vote(probs).tolist() == [0, 1]
    tie = torch.tensor([[[0.6, 0.4]], [[0.1, 0.9]]])  # one vote each; mean (0.35, 0.65) -> class 1
    assert majority_vote(tie).tolist() == [1]


def test_weights_go_to_the_better_member_and_beat_the_mean() -> None:
    torch.manual_seed(0)
    y = torch.randint(0, 5, (400,))
    good = F.softmax(F.one_hot(y, 5).float() * 3 + torch.randn(400, 5), dim=-1)
    noise = F.softmax(torch.randn(400, 5), dim=-1)
    probs = torch.stack([good, noise])
    w = fit_convex_weights(probs, y)
    assert w.shape == (2,) and abs(float(w.sum()) - 1) < 1e-6 and bool((w >= 0).all()) and w[0] > 0.9

    def nll(p: torch.Tensor) -> float:
        return float(F.nll_loss(p.log(), y))

    assert nll(combine(probs, "weighted", w)) <= nll(combine(probs, "mean")) + 1e-9
    torch.testing.assert_close(combine(probs, "mean"), (good + noise) / 2)


def test_expected_calibration_error_against_its_definition() -> None:
    torch.manual_seed(1)
    probs = F.softmax(torch.randn(300, 4) * 2, dim=-1)
    y = torch.randint(0, 4, (300,))
    conf, pred = probs.max(-1)
    edges = torch.linspace(0, 1, 16)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += float(inside.float().mean()) * abs(float((pred[inside] == y[inside]).float().mean())
                                                      - float(conf[inside].mean()))
    assert float(expected_calibration_error(probs, y)) == pytest.approx(ece, abs=1e-5)


def _members(n: int = 3) -> list[TinyNet]:
    members = []
    for seed in range(n):
        torch.manual_seed(seed)
        model = TinyNet()
        quiet_trainer(max_steps=6).fit(model, loader(64, 8, seed=seed))
        members.append(model)
    return members


@pytest.mark.parametrize("method", ["mean", "vote", "weighted"])
def test_test_metrics_equal_a_hand_computation(method: str) -> None:
    members = _members()
    ensemble = Ensemble(members, method=method)
    if method == "weighted":
        weights = ensemble.fit_weights(loader(64, 16, seed=7))  # validation data, not the test set
        assert abs(float(weights.sum()) - 1) < 1e-5
    result = quiet_trainer().test(ensemble, loader(64, 16, seed=9), verbose=False)[0]
    x, y = loader(64, 64, seed=9).dataset.tensors
    with torch.no_grad():
        probs = torch.stack([F.softmax(m.eval()(x), -1) for m in members])
    combined = combine(probs, method, ensemble.weights)
    decision = majority_vote(probs) if method == "vote" else combined.argmax(-1)
    assert result["test_acc"] == pytest.approx(float((decision == y).float().mean()), abs=1e-6)
    assert result["test_nll"] == pytest.approx(float(F.nll_loss(combined.log(), y)), abs=1e-5)
    assert result["test_ece"] == pytest.approx(float(expected_calibration_error(combined, y)), abs=1e-5)
    predicted = torch.cat(quiet_trainer().predict(ensemble, loader(64, 16, seed=9)))
    torch.testing.assert_close(predicted, combined, atol=1e-6, rtol=0)


def test_members_from_checkpoints(tmp_path: Any) -> None:
    members = _members(2)
    paths = []
    for i, m in enumerate(members):
        trainer = quiet_trainer(max_steps=1)
        trainer.fit(m, loader())
        paths.append(os.path.join(tmp_path, f"m{i}.ckpt"))
        trainer.save_checkpoint(paths[-1])
    ensemble = Ensemble(paths, member_class="tests.conftest.TinyNet")
    x = torch.randn(5, 1, 16)
    with torch.no_grad():
        want = (F.softmax(members[0].eval()(x), -1) + F.softmax(members[1].eval()(x), -1)) / 2
        torch.testing.assert_close(ensemble(x), want)


class Wide(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 7)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match=r"`method` must be one of 'mean', 'weighted', 'vote', got 'max'"):
        Ensemble([TinyNet()], method="max")
    with pytest.raises(ValueError, match="`members` is empty"):
        Ensemble([])
    with pytest.raises(ValueError, match=r"a checkpoint path: also give `member_class`"):
        Ensemble(["model.ckpt"])
    with pytest.raises(ValueError, match=r"the members' outputs differ in shape: \{0: \(8, 4\), 1: \(8, 7\)\}"):
        quiet_trainer().test(Ensemble([TinyNet(), Wide()]), loader(16, 8), verbose=False)
    with pytest.raises(RuntimeError, match=r"method='weighted'\) has no weights yet: call `fit_weights\(val_loader\)`"):
        quiet_trainer().test(Ensemble([TinyNet(), TinyNet()], method="weighted"), loader(16, 8), verbose=False)


def test_a_snapshot_ensemble_from_one_run(tmp_path: Any) -> None:
    """docs/ensembles.md's recipe: checkpoints written during one run plus the module holding an EMA average."""
    import copy

    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_tricks import EMA

    ema = EMA(decay=0.9, keep_ema_at_end=False)
    snapshots = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    model = TinyNet()
    quiet_trainer(max_epochs=3, enable_checkpointing=True, callbacks=[ema, snapshots]).fit(model, loader(64, 8))
    averaged = copy.deepcopy(model)
    averaged.load_state_dict(ema.averaged_state_dict())
    paths = [str(tmp_path / f"epoch={e}.ckpt") for e in (1, 2)]
    ensemble = Ensemble([averaged, *paths], member_class=TinyNet)
    result = quiet_trainer().test(ensemble, loader(64, 16, seed=9), verbose=False)[0]
    x, y = loader(64, 64, seed=9).dataset.tensors
    members = [averaged.eval()] + [TinyNet.load_from_checkpoint(p).eval() for p in paths]
    with torch.no_grad():
        probs = torch.stack([F.softmax(m(x), -1) for m in members]).mean(0)
    assert result["test_acc"] == pytest.approx(float((probs.argmax(-1) == y).float().mean()), abs=1e-6)
