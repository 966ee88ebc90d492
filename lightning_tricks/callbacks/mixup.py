"""MixUp / CutMix as a callback over :mod:`lightning_tricks.functional.mixing`."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from lightning_tricks.callbacks._base import TrickCallback
from lightning_tricks.callbacks._dispatch import skip_unused_batch_hooks
from lightning_tricks.functional._checks import check_choice, check_number
from lightning_tricks.functional.mixing import box_lambda, box_mask, mix_pair, sample_box, sample_lambda

if TYPE_CHECKING:
    from lightning_tricks.mixin import TricksMixin

MODES = ("batch", "elem")
_BLOCK = 64  # batches whose draws are made together in "batch" mode


class Mixup(TrickCallback):
    r"""MixUp and CutMix on the training batches, with soft targets and a float32 loss.

    Each training batch is, with probability ``prob``, mixed with a random permutation of itself:
    MixUp blends whole samples with :math:`\lambda \sim \mathrm{Beta}(\alpha, \alpha)`; CutMix pastes a box
    of the partner (side :math:`\propto \sqrt[d]{1-\lambda}`, :math:`\lambda \sim \mathrm{Beta}(\alpha_c, \alpha_c)`)
    and re-weights the targets by the pasted area. :math:`\lambda` is the weight of sample ``i`` itself.

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

    Randomness is drawn on the host from a generator keyed by ``(seed, global rank, batch counter)``:
    the same under ``seed_everything``, different on each DDP rank, exactly resumed from a checkpoint
    (the batch counter is restored by Lightning's loops), and never a host-device sync.
    Pairing is a random permutation, so odd batch sizes work (timm needs even batches).

    Training accuracy under mixed targets is measured against the argmax of the soft target.

    Example::

        trainer = L.Trainer(callbacks=[LabelSmoothing(0.1), Mixup(alpha=0.2)])
    """

    order = 20
    transforms_batch = True
    transforms_target = True
    targets_before_forward = True

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
        self.alpha = float(alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.prob = float(prob)
        self.switch_prob = float(switch_prob)
        self.mode = mode
        self.cutmix_minmax = None if cutmix_minmax is None else (float(cutmix_minmax[0]), float(cutmix_minmax[1]))
        self.stop_epoch = stop_epoch
        self.seed = seed
        self._pending: tuple[float | Tensor, Tensor] | None = None
        self._last_block: tuple[Any, ...] | None = None  # (block, input shape, seed, the block's per-batch draws)
        skip_unused_batch_hooks(self)

    # ------------------------------------------------------------------ state
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.seed is None:
            self.seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed())) % 2**63
        self._last_block = None  # per fit: the device and the rank are fixed within one

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict["seed"]
        self._last_block = None

    # ------------------------------------------------------------------ sampling (host only)
    def _stream_key(self, trainer: pl.Trainer) -> int:
        return (int(self.seed or 0) % 2**64) ^ (trainer.global_rank * 0x9E3779B97F4A7C15 % 2**64)

    def _rng(self, trainer: pl.Trainer, block: bool = False) -> np.random.Generator:
        """The generator positioned at this batch's stream (``block=True``: at the stream of its block of batches)."""
        # Philox is counter-based: keyed by (seed, rank), positioned by the batch counter. The batch counter goes in the
        # counter's second 64-bit word: the generator advances the first word as it draws (one step per 4 outputs),
        # so each batch owns a disjoint stream of 2**64 blocks. (In the first word, batch c + 1's stream would be
        # batch c's shifted by 4 values: correlated draws.) Block streams are marked in the third word. The generator
        # is built once per key; moving it to a batch is a 1 us state write (building one costs about 13 us).
        key = self._stream_key(trainer)
        if getattr(self, "_key", None) != key:
            self._key, self._bitgen = key, np.random.Philox(key=key)
            self._gen = np.random.Generator(self._bitgen)
            self._state = self._bitgen.state
        counter = trainer.fit_loop.epoch_loop.batch_progress.total.ready
        state = self._state
        state["state"]["counter"][:] = (0, counter // _BLOCK, 1, 0) if block else (0, counter, 0, 0)
        state["buffer_pos"], state["has_uint32"], state["uinteger"] = 4, 0, 0  # nothing buffered from before
        self._bitgen.state = state
        return self._gen

    def _batch_draw(self, trainer: pl.Trainer,
                    x: Tensor) -> tuple[bool, bool, float, list[tuple[int, int]] | None, Tensor]:
        """``(keep, use_cut, lam, box, index)`` of this batch in ``"batch"`` mode.

        Drawn for ``_BLOCK`` batches at once (vectorised NumPy, one host-to-device copy of the block's permutations)
        and kept as one ready tuple per batch: per batch, a list index instead of a handful of NumPy calls and a
        transfer. The block depends only on (seed, rank, batch counter // _BLOCK, batch size, input shape): exact
        on resume.
        """
        counter = trainer.fit_loop.epoch_loop.batch_progress.total.ready
        block = counter // _BLOCK
        shape = x.shape
        last = self._last_block
        if last is not None and last[0] == block and last[1] == shape and last[2] == self.seed:
            return last[3][counter % _BLOCK]  # the usual case: the same block (and input shape) as the previous batch
        n, spatial, device = shape[0], tuple(shape[2:]), x.device
        key = (self.seed, trainer.global_rank, block, n, spatial, device)
        blocks = self.__dict__.setdefault("_blocks", {})
        rows = blocks.get(key)
        if rows is None:
            rows = self._draw_block(self._rng(trainer, block=True), n, spatial, device)
            if len(blocks) >= 2:  # the last batch of an epoch may be smaller: keep both sizes' blocks
                blocks.pop(next(iter(blocks)))
            blocks[key] = rows
        self._last_block = (block, shape, self.seed, rows)
        return rows[counter % _BLOCK]

    def _draw_block(self, rng: np.random.Generator, n: int, spatial: tuple[int, ...],
                    device: torch.device) -> list[tuple[bool, bool, float, list[tuple[int, int]] | None, Tensor]]:
        b = _BLOCK
        use_cut = (rng.random(b) < self.switch_prob) if self.cutmix_alpha > 0 and self.alpha > 0 \
            else np.full(b, self.cutmix_alpha > 0)
        lam_mix = rng.beta(self.alpha, self.alpha, size=b) if self.alpha > 0 else np.ones(b)
        lam_cut = rng.beta(self.cutmix_alpha, self.cutmix_alpha, size=b) if self.cutmix_alpha > 0 else np.ones(b)
        if use_cut.any() and not spatial:
            raise ValueError("CutMix needs inputs with spatial dimensions, (N, C, L) or (N, C, H, W).")
        box = sample_box(rng, spatial, lam_cut, self.cutmix_minmax, b) if use_cut.any() else None
        keep = rng.random(b) >= self.prob  # not mixed: lam = 1
        perms = np.argsort(rng.random((b, n)), axis=1)  # one uniform random permutation per row
        index = _to_device(torch.from_numpy(perms), device).unbind(0)  # one view per batch, made once
        cut_l = use_cut.tolist()
        boxes = [[(int(a[i]), int(z[i])) for a, z in box] if box is not None and cut_l[i] else None for i in range(b)]
        return list(zip(keep.tolist(), cut_l, lam_mix.tolist(), boxes, index))

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
    def tricks_transform_batch(self, pl_module: TricksMixin, x: Tensor, y: Tensor) -> Tensor:
        trainer = pl_module._trainer  # type: ignore[attr-defined]  # (the property re-checks what the seam did)
        self._pending = None
        if self.stop_epoch is not None and trainer.current_epoch >= self.stop_epoch:
            return x
        if self.alpha > 0 and not x.is_floating_point():
            raise TypeError(f"MixUp blends inputs and needs floating-point ones, got {x.dtype}.")
        if self.mode == "batch":
            keep, use_cut, lam_mix, box, index = self._batch_draw(trainer, x)
            if keep:
                return x
            if use_cut:
                assert box is not None
                mixed = torch.where(box_mask(x, box), x.index_select(0, index), x)
                lam: float | Tensor = box_lambda(x, box)
            else:
                lam = lam_mix
                mixed = mix_pair(x, lam, index)
        else:
            device = x.device
            d = self._draw_per_sample(self._rng(trainer), x.shape[0], tuple(x.shape[2:]))
            index = _to_device(torch.from_numpy(d["index"]), device)
            lam_np = np.where(d["keep"], 1.0, np.where(d["use_cut"], 0.0, d["lam"])).astype(np.float32)
            weight = _to_device(torch.from_numpy(lam_np), device)
            shape = (-1,) + (1,) * (x.ndim - 1)
            if d["box"] is not None:
                cut = _to_device(torch.from_numpy(d["use_cut"] & ~d["keep"]), device)
                bounds = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in d["box"]]
                bounds = [(_to_device(a, device), _to_device(b, device)) for a, b in bounds]
                # One formula for every sample: x_i * w + x_j * (1 - w), with w = lam for MixUp samples
                # and w = 1 outside / 0 inside the box for CutMix samples.
                outside = (~box_mask(x, bounds)).to(x.dtype)
                weight_x = torch.where(cut.reshape(shape), outside, weight.to(x.dtype).reshape(shape))
                area_lam = box_lambda(x, bounds)
                lam = torch.where(cut, area_lam, weight)
            else:
                weight_x = weight.to(x.dtype).reshape(shape)
                lam = weight
            mixed = torch.lerp(x.index_select(0, index), x, weight_x)
        self._pending = (lam, index)
        return mixed

    def tricks_dominant_class(self, pl_module: TricksMixin, hard: Tensor, num_classes: int) -> Tensor | None:
        if self._pending is None:
            return hard
        lam, index = self._pending
        if isinstance(lam, Tensor):
            return None  # "elem" mode: one weight per sample, the argmax is as cheap
        # lam * t_i + (1 - lam) * t_index[i] with the same smoothing on both: the partner's class wins below 1/2
        # (at exactly 1/2 the argmax would pick the lower class index; lam is continuous)
        return hard if lam >= 0.5 else hard.index_select(0, index)

    def tricks_transform_target(self, pl_module: TricksMixin, soft_target: Tensor) -> Tensor:
        if self._pending is None:
            return soft_target
        lam, index = self._pending
        return mix_pair(soft_target, lam, index)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host-to-device copy that does not make the host wait (pinned memory on CUDA)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
