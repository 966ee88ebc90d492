"""MixUp / CutMix as a callback over :mod:`lightning_tricks.functional.mixing`."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from lightning_tricks.functional._checks import check_choice, check_number
from lightning_tricks.functional.mixing import Mix, box_lambda, box_mask, mix_pair, sample_box, sample_lambda
from lightning_tricks.functional.targets import TargetPlan
from lightning_tricks.trick import TrickCallback, TricksModule

MODES = ("batch", "elem")


class Mixup(TrickCallback):
    r"""MixUp and CutMix on the training batches; the targets are mixed in the loss, never in the batch.

    Each training batch is, with probability ``prob``, mixed with a random permutation of itself:
    MixUp blends whole samples with :math:`\lambda \sim \mathrm{Beta}(\alpha, \alpha)`; CutMix pastes a box
    of the partner (side :math:`\propto \sqrt[d]{1-\lambda}`, :math:`\lambda \sim \mathrm{Beta}(\alpha_c, \alpha_c)`)
    and re-weights the targets by the pasted area. :math:`\lambda` is the weight of sample ``i`` itself.

    The training step receives the mixed inputs and the loader's targets, unchanged; the mixing is recorded with the
    module and :meth:`TricksMixin.tricks_loss` computes
    :math:`\lambda\,\mathrm{CE}(z, y) + (1-\lambda)\,\mathrm{CE}(z, y_{\pi})` (the cross-entropy against the mixed
    soft target, from the class indices). Dense targets work too: per token or per pixel ``(N, d1, ...)``, MixUp
    pairs the per-position losses and CutMix pastes the partner's labels with its pixels (the targets must then have
    the inputs' spatial size).
    Args:
        alpha: MixUp's Beta parameter (> 0 enables MixUp; the guide's default 0.2; 0 disables it).
        cutmix_alpha: CutMix's Beta parameter (> 0 enables CutMix; 0 disables it).
        prob: probability of mixing a batch (``"batch"``) or a sample (``"elem"``), in [0, 1].
        switch_prob: with both enabled, probability of CutMix instead of MixUp, in [0, 1].
        mode: ``"batch"``: one :math:`\lambda` (and box) per batch; ``"elem"``: one per sample.
        cutmix_minmax: ``(lo, hi)``: box sides uniform in ``[lo, hi)`` of each dimension instead of drawn
            from :math:`\lambda` (as timm's ``cutmix_minmax``).
        stop_epoch: from this epoch on (0-based) batches are no longer mixed (common practice: the last
            epochs unmixed). ``None`` mixes to the end.
        seed: base seed; ``None`` takes Lightning's ``seed_everything`` seed (or torch's initial seed).
        num_classes: optional; when given, a head whose logits have another class count is an error.

    Randomness is drawn on the host from a generator keyed by ``(seed, global rank, batch number)``:
    the same under ``seed_everything``, different on each DDP rank, exactly resumed from a checkpoint
    (the batch number is in the callback's state), and never a host-device sync.
    Pairing is a random permutation, so odd batch sizes work (timm needs even batches).

    Example::

        trainer = L.Trainer(callbacks=[LabelSmoothing(0.1), Mixup(alpha=0.2)])
    """

    order = 20

    def __init__(
        self,
        alpha: float = 0.2,
        cutmix_alpha: float = 0.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = "batch",
        cutmix_minmax: tuple[float, float] | None = None,
        stop_epoch: int | None = None,
        seed: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        check_number("alpha", alpha, low=0.0)
        check_number("cutmix_alpha", cutmix_alpha, low=0.0)
        check_number("prob", prob, low=0.0, high=1.0)
        check_number("switch_prob", switch_prob, low=0.0, high=1.0)
        check_choice("mode", mode, MODES)
        if cutmix_minmax is not None:
            if len(cutmix_minmax) != 2 or not 0.0 < cutmix_minmax[0] <= cutmix_minmax[1] <= 1.0:
                raise ValueError(f"`cutmix_minmax` must be (lo, hi) with 0 < lo <= hi <= 1, got {cutmix_minmax!r}.")
            cutmix_alpha = cutmix_alpha or 1.0  # timm: minmax boxes imply CutMix
        if alpha == 0 and cutmix_alpha == 0:
            raise ValueError("`alpha` and `cutmix_alpha` are both 0: nothing to mix; set one of them > 0.")
        if stop_epoch is not None:
            check_number("stop_epoch", stop_epoch, low=0, integer=True)
        if seed is not None:
            check_number("seed", seed, low=0, integer=True)
        if num_classes is not None:
            check_number("num_classes", num_classes, low=2, integer=True)
        self.alpha = float(alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.prob = float(prob)
        self.switch_prob = float(switch_prob)
        self.mode = mode
        self.cutmix_minmax = None if cutmix_minmax is None else (float(cutmix_minmax[0]), float(cutmix_minmax[1]))
        self.stop_epoch = stop_epoch
        self.seed = seed
        self.num_classes = num_classes
        #: Training batches seen this fit: positions each batch's random stream (saved in checkpoints).
        self.batches_seen = 0
        #: The last training batch's ``(lam, index)`` (``None`` when it was not mixed), for inspection.
        self.last_draw: tuple[float | Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ state
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.seed is None:
            self.seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed())) % 2**63
        self.batches_seen = 0  # a resumed fit gets its count back from load_state_dict, which runs after setup

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "batches_seen": self.batches_seen}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict["seed"]
        self.batches_seen = state_dict.get("batches_seen", 0)

    # ------------------------------------------------------------------ sampling (host only)
    def _rng(self, rank: int, batch: int) -> np.random.Generator:
        """The generator of training batch ``batch`` on ``rank``.

        Philox is counter-based: keyed by (seed, rank), positioned by the batch number. The batch number goes in the
        counter's second 64-bit word: the generator advances the first word as it draws, so each batch owns a
        disjoint stream (in the first word, batch c + 1's stream would be batch c's shifted by four values). One
        generator per key is kept and moved to each batch's position (building one costs more than the draws).
        """
        key = (int(self.seed or 0) % 2**64) ^ (rank * 0x9E3779B97F4A7C15 % 2**64)
        if getattr(self, "_key", None) != key:
            self._key, self._bits = key, np.random.Philox(key=key)
            self._gen = np.random.Generator(self._bits)
        state = self._bits.state
        state["state"]["counter"][:] = (0, batch, 0, 0)
        state["buffer_pos"], state["has_uint32"], state["uinteger"] = 4, 0, 0  # nothing buffered from before
        self._bits.state = state
        return self._gen

    def _draw_per_batch(self, rng: np.random.Generator, n: int,
                        spatial: tuple[int, ...]) -> tuple[bool, bool, float, list[tuple[int, int]] | None, np.ndarray]:
        """``"batch"`` mode: ``(keep, use_cut, lam, box, permutation)`` of one batch."""
        use_cut = self.cutmix_alpha > 0 and (self.alpha == 0 or rng.random() < self.switch_prob)
        lam = float(sample_lambda(rng, self.cutmix_alpha if use_cut else self.alpha))
        if use_cut and not spatial:
            raise ValueError("CutMix needs inputs with spatial dimensions, (N, C, L) or (N, C, H, W).")
        box = sample_box(rng, spatial, lam, self.cutmix_minmax) if use_cut else None
        keep = rng.random() >= self.prob  # not mixed
        return keep, use_cut, lam, box, rng.permutation(n)  # type: ignore[return-value]

    def _draw_per_sample(self, rng: np.random.Generator, n: int, spatial: tuple[int, ...]) -> dict[str, Any]:
        """``"elem"`` mode: per sample ``lam``, CutMix choice, box and keep decision, and the batch's pairing."""
        use_cut = self.cutmix_alpha > 0 and (self.alpha == 0 or rng.random(n) < self.switch_prob)
        lam_mix = sample_lambda(rng, self.alpha, n) if self.alpha > 0 else 1.0
        lam_cut = sample_lambda(rng, self.cutmix_alpha, n) if self.cutmix_alpha > 0 else 1.0
        any_cut = bool(np.any(use_cut))
        if any_cut and not spatial:
            raise ValueError("CutMix needs inputs with spatial dimensions, (N, C, L) or (N, C, H, W).")
        box = sample_box(rng, spatial, lam_cut, self.cutmix_minmax, n) if any_cut else None
        keep = rng.random(n) >= self.prob  # not mixed: lam = 1
        return {"use_cut": use_cut, "lam": lam_mix, "box": box, "keep": keep, "index": rng.permutation(n)}

    # ------------------------------------------------------------------ the seam
    @override
    def transform_batch(self, pl_module: TricksModule, x: Tensor | None,
                        plan: TargetPlan) -> tuple[Tensor | None, TargetPlan]:
        trainer = pl_module.trainer  # type: ignore[attr-defined]
        batch, self.batches_seen = self.batches_seen, self.batches_seen + 1
        self.last_draw = None
        if self.stop_epoch is not None and trainer.current_epoch >= self.stop_epoch:
            return x, plan
        if x is None:
            raise ValueError(
                "Mixup mixes the training inputs, but TricksMixin could not find them in this batch: the default "
                "`tricks_unpack` takes `(x, y)` pairs and dicts with keys 'x' and 'y'. Override `tricks_unpack` and "
                "`tricks_pack` for your layout, or leave Mixup out."
            )
        if not x.is_floating_point():
            raise TypeError(
                f"Mixup blends inputs and needs floating-point ones, got {x.dtype} (token ids?). Mixing applies to "
                "continuous inputs (images, signals, features); for a sequence model over token ids use "
                "LabelSmoothing alone (or mix embeddings inside your own forward)."
            )
        rng = self._rng(trainer.global_rank, batch)
        device, n, spatial = x.device, x.shape[0], tuple(x.shape[2:])
        if self.mode == "batch":
            keep, use_cut, lam_mix, box, perm = self._draw_per_batch(rng, n, spatial)
            if keep:
                return x, plan
            index = _to_device(torch.from_numpy(perm), device)
            if use_cut:
                assert box is not None
                inside = box_mask(x, box)
                mixed = torch.where(inside, x.index_select(0, index), x)
                mix = Mix(index, box_lambda(x, box), region=~inside)
            else:
                mixed, mix = mix_pair(x, lam_mix, index), Mix(index, lam_mix)
            self.last_draw = (mix.lam, index)
            return mixed, plan.mixed(mix)
        d = self._draw_per_sample(rng, n, spatial)
        index = _to_device(torch.from_numpy(d["index"]), device)
        lam_np = np.where(d["keep"], 1.0, np.where(d["use_cut"], 0.0, d["lam"])).astype(np.float32)
        weight = _to_device(torch.from_numpy(lam_np), device)
        shape = (-1,) + (1,) * (x.ndim - 1)
        region: Tensor | None = None
        if d["box"] is not None:
            cut = _to_device(torch.from_numpy(d["use_cut"] & ~d["keep"]), device)
            bounds = [(_to_device(torch.from_numpy(a), device), _to_device(torch.from_numpy(b), device))
                      for a, b in d["box"]]
            # One formula for every sample: x_i * w + x_j * (1 - w), with w = lam for MixUp samples
            # and w = 1 outside / 0 inside the box for CutMix samples.
            outside = (~box_mask(x, bounds)).to(x.dtype)
            weight_x = torch.where(cut.reshape(shape), outside, weight.to(x.dtype).reshape(shape))
            lam = torch.where(cut, box_lambda(x, bounds), weight)
            region = weight_x
        else:
            weight_x = weight.to(x.dtype).reshape(shape)
            lam = weight
        self.last_draw = (lam, index)
        return torch.lerp(x.index_select(0, index), x, weight_x), plan.mixed(Mix(index, lam, region))


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host-to-device copy that does not make the host wait (pinned memory on CUDA)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
