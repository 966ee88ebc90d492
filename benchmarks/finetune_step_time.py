"""Step time of Finetune's frozen phase against full training, for both ways of freezing.

A ``ResConv1d`` (stem, 4 residual blocks, head; 25.6k parameters) on MNIST-1D batches of 100, CPU, one thread:
the median time of an optimizer step over ``--steps`` steps (after 20 warm-up steps) for plain training, the backbone
(stem and blocks) frozen with ``requires_grad=False`` and frozen by dropping its gradients. The three are timed in
turn, ``--repeats`` times, and the median of the repeats is reported with its range.

Usage::

    python benchmarks/finetune_step_time.py          # about 1 minute
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_tricks import Finetune
from lightning_tricks.demo.data import mnist1d_splits
from lightning_tricks.demo.model import Classifier, ResConv1d


class StepTimer(pl.Callback):
    def __init__(self, warmup: int = 20) -> None:
        self.warmup, self.times, self._t = warmup, [], 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._t)


def step_ms(method: str | None, steps: int) -> float:
    torch.manual_seed(0)
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    if method is not None:
        callbacks.append(Finetune(["net.stem", "net.blocks"], unfreeze_at=None, method=method))
    train, _, _ = mnist1d_splits()
    trainer = pl.Trainer(max_steps=steps + 20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", callbacks=callbacks)
    trainer.fit(Classifier(ResConv1d()), DataLoader(train, batch_size=100, shuffle=True))
    return 1000 * statistics.median(timer.times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    runs: dict[str, list[float]] = {"full training": [], "frozen (requires_grad)": [], "frozen (drop_grads)": []}
    for _ in range(args.repeats):
        for name, method in zip(runs, (None, "requires_grad", "drop_grads")):
            runs[name].append(step_ms(method, args.steps))
    base = statistics.median(runs["full training"])
    print(f"| phase | ms per step (median of {args.repeats}; range) | x full training |")
    print("|---|---|---|")
    for name, values in runs.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.2f} ({min(values):.2f}-{max(values):.2f}) | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
