"""Transfer learning on MNIST-1D: pretrain on digits 0-4, fine-tune on a small sample of digits 5-9.

Per seed: a ``ResConv1d`` (stem, 4 residual blocks, head) is pretrained for 30 epochs on the digits 0-4 of the 3,500
training sequences (AdamW lr 1e-2, warmup + cosine). The target task is digits 5-9 with ``--per-class`` training
sequences per class (drawn by the seed), validated on the digits 5-9 of the 500 held-out sequences and tested once on
those of the 1,000 test sequences. Every target run trains 40 epochs, batch 25, warmup + cosine, a new 5-class head:

* ``scratch``: random weights, lr 1e-2 (the pretraining's);
* ``full``: the pretrained backbone, everything trained at lr 3e-3;
* ``frozen``: the pretrained backbone frozen for the whole run (``Finetune(unfreeze_at=None)``), the head only;
* ``layer decay d``: everything trained, ``adamw(layer_decay=d)`` (the head at 3e-3, each layer below at d times the
  one above; 7 layers, so the stem's first conv at ``d**6``): d = 0.5, and BEiT's 0.75;
* ``gradual``: ``Finetune`` with the head alone for 10 epochs, then one block unfrozen from the top every 5 epochs.

No model selection (a fixed run length), so the validation split is only reported. Writes its table and a plot into
docs/results.md and docs/img/transfer.png.

Usage::

    python benchmarks/transfer_mnist1d.py                 # seeds 0 1 2, 20 per class: under a minute on 2 cores
    python benchmarks/transfer_mnist1d.py --per-class 5   # a smaller target sample
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._results import percent_spread, write_block
from lightning_tricks import Finetune, WarmupCosine, adamw
from lightning_tricks.demo.data import mnist1d_splits
from lightning_tricks.demo.model import Classifier, ResConv1d

CONFIGS = ("scratch", "full", "frozen", "layer decay 0.5", "layer decay 0.75", "gradual")
BLOCKS = ["net.stem", "net.blocks.0", "net.blocks.1", "net.blocks.2", "net.blocks.3"]


def _quiet() -> None:
    import logging

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)


def digits(data: TensorDataset, lo: int, per_class: int | None = None, seed: int = 0) -> TensorDataset:
    """The sequences of digits lo..lo+4, relabelled 0..4; ``per_class`` of each, drawn by ``seed``, if given."""
    x, y = data.tensors
    keep = torch.nonzero((y >= lo) & (y < lo + 5)).flatten()
    if per_class is not None:
        g = torch.Generator().manual_seed(seed)
        keep = torch.cat([c[torch.randperm(len(c), generator=g)[:per_class]]
                          for c in (keep[y[keep] == d] for d in range(lo, lo + 5))])
    return TensorDataset(x[keep], y[keep] - lo)


class Net(Classifier):
    def __init__(self, lr: float, layer_decay: float | None = None) -> None:
        super().__init__(ResConv1d(output_size=5), lr=lr, num_classes=5)
        self.layer_decay = layer_decay

    def configure_optimizers(self) -> Any:
        return adamw(self, lr=self.hparams.lr, weight_decay=0.01, layer_decay=self.layer_decay)


def fit(model: Net, train: TensorDataset, val: TensorDataset, epochs: int, batch: int, seed: int,
        extra: list[pl.Callback]) -> float:
    pl.seed_everything(seed, verbose=False)
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu",
                         callbacks=[WarmupCosine(0.1), *extra])
    trainer.fit(model, DataLoader(train, batch_size=batch, shuffle=True), DataLoader(val, batch_size=500))
    return float(trainer.callback_metrics["val_acc"])


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    with torch.no_grad():
        x, y = data.tensors
        return float((model(x).argmax(-1) == y).float().mean())


def run_seed(seed: int, per_class: int) -> dict[str, tuple[float, float]]:
    _quiet()
    train, val, test = mnist1d_splits()
    pl.seed_everything(seed, verbose=False)
    source = Net(lr=1e-2)
    fit(source, digits(train, 0), digits(val, 0), epochs=30, batch=100, seed=seed, extra=[])
    target_train = digits(train, 5, per_class, seed)
    target_val, target_test = digits(val, 5), digits(test, 5)
    results = {}
    for config in CONFIGS:
        pl.seed_everything(seed, verbose=False)
        decay = float(config.split()[-1]) if config.startswith("layer decay") else None
        model = Net(lr=1e-2 if config == "scratch" else 3e-3, layer_decay=decay)
        if config != "scratch":
            state = {k: v for k, v in source.state_dict().items() if not k.startswith("net.head")}
            model.load_state_dict(state, strict=False)  # the new head keeps its fresh weights
        extra: list[pl.Callback] = []
        if config == "frozen":
            extra = [Finetune(BLOCKS, unfreeze_at=None)]
        elif config == "gradual":
            extra = [Finetune(BLOCKS, unfreeze_at=10, unfreeze_every=5)]
        val_acc = fit(model, target_train, target_val, epochs=40, batch=25, seed=seed, extra=extra)
        results[config] = (val_acc, accuracy(model, target_test))
    results["source"] = (accuracy(source, digits(val, 0)), accuracy(source, digits(test, 0)))
    return results


def plot(per_seed: dict[int, dict[str, tuple[float, float]]], path: Path, per_class: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    for i, config in enumerate(CONFIGS):
        values = [100 * r[config][1] for r in per_seed.values()]
        ax.bar(i, statistics.mean(values), color="0.85", edgecolor="0.4")
        ax.scatter([i] * len(values), values, color="tab:blue", zorder=3, s=14)
    ax.set_xticks(range(len(CONFIGS)), [c.replace("layer decay ", "decay ") for c in CONFIGS])
    ax.set_ylabel("test accuracy, digits 5-9 (%)")
    ax.set_title(f"digits 5-9 from {per_class} per class, backbone pretrained on 0-4 (dots: seeds)", fontsize=10)
    low = min(100 * r[c][1] for r in per_seed.values() for c in CONFIGS)
    ax.set_ylim(max(0, low - 10), 100)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool:
        futures = {s: pool.submit(run_seed, s, args.per_class) for s in args.seeds}
        per_seed = {s: f.result() for s, f in futures.items()}
    wall = time.perf_counter() - start

    lines = [
        f"Command: `python benchmarks/transfer_mnist1d.py --seeds {' '.join(map(str, args.seeds))} --per-class "
        f"{args.per_class}`; {wall:.0f} s on 2 CPU cores. Source: digits 0-4 (test accuracy of the pretrained "
        f"model {percent_spread([r['source'][1] for r in per_seed.values()])} %); target: digits 5-9, {args.per_class} "
        f"training sequences per class. Mean ± std over {len(args.seeds)} seeds; the difference to `scratch` is "
        "paired by seed.",
        "",
        "| configuration | validation acc % | test acc % | test: difference to scratch (per seed) |",
        "|---|---|---|---|",
    ]
    for config in CONFIGS:
        vals = [r[config][0] for r in per_seed.values()]
        tests = [r[config][1] for r in per_seed.values()]
        diffs = [100 * (r[config][1] - r["scratch"][1]) for r in per_seed.values()]
        diff = "-" if config == "scratch" else ", ".join(f"{d:+.1f}" for d in diffs)
        lines.append(f"| {config} | {percent_spread(vals)} | {percent_spread(tests)} | {diff} |")
    lines += ["", f"![transfer, {args.per_class} per class](img/transfer_{args.per_class}.png)"]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        name = f"transfer_{args.per_class}"
        image = Path(__file__).resolve().parent.parent / "docs" / "img" / f"{name}.png"
        plot(per_seed, image, args.per_class)
        print(f"wrote {write_block(name, table, 'Transfer learning: MNIST-1D digits 0-4 to 5-9')} and {image}")
    else:
        print(np.array([[per_seed[s][c][1] for c in CONFIGS] for s in args.seeds]))


if __name__ == "__main__":
    main()
