"""Ablation on MNIST-1D (the paper's ConvBase) or scikit-learn's digits (a small 2-D CNN): the baseline, each trick
alone, and the full recipe, over seeds, with paired deltas against the baseline.

Every configuration trains on the same training split, validates on a split held out of the training data, and
reads the test set once, at the end (the final weights: no model selection).

Writes its table (with the command and the machine) into docs/results.md between markers, and a PNG into docs/img.

Usage::

    python benchmarks/mnist1d_ablation.py                              # MNIST-1D, 100 epochs, seeds 0 1 2
    python benchmarks/mnist1d_ablation.py --dataset digits --epochs 60
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._results import write_block
from lightning_tricks import LabelSmoothing, Mixup, WarmupCosine
from lightning_tricks.demo.data import digits, mnist1d_splits
from lightning_tricks.demo.model import Classifier, ConvBase

DOCS = Path(__file__).resolve().parent.parent / "docs"


def small_cnn() -> nn.Module:
    """A small 2-D CNN for the 8x8 digits (about 11k parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


def configs(dataset: str) -> dict[str, list]:
    out = {
        "baseline": [],
        "warmup_cosine": [WarmupCosine(0.1)],
        "label_smoothing": [LabelSmoothing(0.1)],
        "mixup": [Mixup(alpha=0.2)],
    }
    if dataset == "digits":
        out["cutmix"] = [Mixup(alpha=0.0, cutmix_alpha=1.0)]
        out["recipe"] = [WarmupCosine(0.1), LabelSmoothing(0.1), Mixup(alpha=0.2, cutmix_alpha=1.0)]
    else:
        out["recipe"] = [WarmupCosine(0.1), LabelSmoothing(0.1), Mixup(alpha=0.2)]
        # tuned within the guide: the cosine's floor eta_min (its formula's), and a stronger mixup
        out["recipe, min_lr 0.1"] = [WarmupCosine(0.1, min_lr_ratio=0.1), LabelSmoothing(0.1), Mixup(alpha=0.2)]
        out["recipe, mixup 0.4"] = [WarmupCosine(0.1), LabelSmoothing(0.1), Mixup(alpha=0.4)]
    return out


def load(dataset: str) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """``(train, val, test)``: MNIST-1D with 500 validation sequences held out; digits with 200 validation images."""
    if dataset == "mnist1d":
        return mnist1d_splits()
    train, test = digits()
    x, y = train.tensors
    return TensorDataset(x[200:], y[200:]), TensorDataset(x[:200], y[:200]), test


def run(dataset: str, name: str, seed: int, epochs: int, data: tuple) -> float:
    """The test accuracy of one configuration and seed, after training on the training split."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    pl.seed_everything(seed, verbose=False)
    train, val, test = data
    net = ConvBase() if dataset == "mnist1d" else small_cnn()
    model = Classifier(net, lr=1e-2 if dataset == "mnist1d" else 3e-3, weight_decay=0.01)
    trainer = pl.Trainer(default_root_dir=tempfile.mkdtemp(prefix="lt-bench-"),  # stop checkpoints, doctor reports
                         max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=configs(dataset)[name], deterministic=True)
    batch = 100 if dataset == "mnist1d" else 64
    trainer.fit(model, DataLoader(train, batch_size=batch, shuffle=True), DataLoader(val, batch_size=1000))
    return float(trainer.test(model, DataLoader(test, batch_size=1000), verbose=False)[0]["test_acc"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=("mnist1d", "digits"), default="mnist1d")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time, one process each (default 2)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not touch docs/")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    data = load(args.dataset)
    names = list(configs(args.dataset))
    start = time.perf_counter()
    jobs = [(n, seed) for seed in args.seeds for n in names]
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run, args.dataset, n, seed, args.epochs, data) for n, seed in jobs]
        acc: dict[str, list[float]] = {n: [] for n in names}
        for (n, seed), future in zip(jobs, futures):
            acc[n].append(future.result())
            print(f"seed {seed} {n:<16} {100 * acc[n][-1]:.1f} %", flush=True)
    wall = time.perf_counter() - start

    def ms(v: list[float]) -> str:
        return f"{100 * statistics.fmean(v):.1f} ± {100 * (statistics.stdev(v) if len(v) > 1 else 0.0):.1f}"

    base = acc["baseline"]
    lines = [
        f"Command: `python benchmarks/mnist1d_ablation.py --dataset {args.dataset} --epochs {args.epochs} --seeds "
        f"{' '.join(map(str, args.seeds))}`. Machine: {platform.machine()} CPU, {args.jobs} runs at a time, 1 thread "
        f"each, torch {torch.__version__}, Lightning {pl.__version__}; {wall:.0f} s. Test accuracy (%) of the final "
        f"weights, read once; {len(data[0])} training and {len(data[1])} validation samples.",
        "",
        "| config | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean ± sd | paired delta vs baseline |",
        "|---|" + "---|" * len(args.seeds) + "---|---|",
    ]
    for n in names:
        deltas = [a - b for a, b in zip(acc[n], base)]
        d = "-" if n == "baseline" else (
            f"{100 * statistics.fmean(deltas):+.1f} (" + ", ".join(f"{100 * x:+.1f}" for x in deltas) + ")")
        lines.append(f"| {n} | " + " | ".join(f"{100 * a:.1f}" for a in acc[n]) + f" | {ms(acc[n])} | {d} |")
    table = "\n".join(lines)
    print("\n" + table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, n in enumerate(names):
        ax.bar(i, 100 * statistics.fmean(acc[n]), color="tab:orange" if n.startswith("recipe") else "tab:blue",
               alpha=0.6)
        ax.scatter([i] * len(acc[n]), [100 * a for a in acc[n]], color="k", s=12, zorder=3)
    ax.set_xticks(range(len(names)), names, rotation=20)
    low = min(min(v) for v in acc.values())
    ax.set_ylim(100 * low - 2, 100)
    ax.set(ylabel="test accuracy %", title=f"Ablation, {args.dataset}, {args.epochs} epochs (dots: seeds)")
    fig.tight_layout()
    if not args.no_write:
        png = DOCS / "img" / f"ablation_{args.dataset}.png"
        fig.savefig(png, dpi=110)
        results = write_block(f"ablation:{args.dataset}",
                              f"{table}\n\n![ablation {args.dataset}](img/ablation_{args.dataset}.png)",
                              f"Ablation: {args.dataset}")
        print(f"wrote {results} and {png}")


if __name__ == "__main__":
    main()
