"""Peak memory of a language-model head's loss and backward, with and without label smoothing, on the CPU.

The issue's case: logits of N=8 sequences x L=512 tokens x V=32,000 classes in float32 (524 MB). Each form runs
loss + backward under ``torch.profiler`` with ``profile_memory=True``; the peak is the largest running sum of the
allocations it records (the logits themselves, made before, are not counted). Forms:

* ``plain``: ``F.cross_entropy(logits, y)``;
* ``torch_smoothing``: ``F.cross_entropy(logits, y, label_smoothing=0.1)``;
* ``ours``: ``lightning_tricks.functional.cross_entropy(logits, y, smoothing=0.1, class_dim=-1)`` (what
  ``tricks_loss`` computes under ``LabelSmoothing(0.1)`` for class-last logits);
* ``dense``: the dense soft target of the old seam (one-hot, smoothed, ``(N·L, V)`` floats) with a soft
  cross-entropy, for comparison.

Usage: ``python benchmarks/loss_memory.py [--n 8 --length 512 --vocab 32000]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from lightning_tricks.functional import cross_entropy, smooth_targets, soft_cross_entropy


def peak_bytes(fn, logits: torch.Tensor) -> int:
    """The largest running sum of the CPU allocations recorded while ``fn(logits)`` and its backward run."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(logits).backward()
    running = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        if event.name == "[memory]":
            running += event.cpu_memory_usage
            peak = max(peak, running)
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()
    n, length, vocab = args.n, args.length, args.vocab
    torch.manual_seed(0)
    base = torch.randn(n, length, vocab)
    y = torch.randint(0, vocab, (n, length))
    y[:, -16:] = -100
    forms = {
        "plain": lambda z: F.cross_entropy(z.reshape(-1, vocab), y.reshape(-1)),
        "torch_smoothing": lambda z: F.cross_entropy(z.reshape(-1, vocab), y.reshape(-1), label_smoothing=0.1),
        "ours": lambda z: cross_entropy(z, y, smoothing=0.1, class_dim=-1),
        "dense": lambda z: soft_cross_entropy(z.reshape(-1, vocab),
                                              smooth_targets(y.reshape(-1), vocab, 0.1, ignore_index=-100),
                                              ignore_index=-100),
    }
    logits_mb = base.numel() * 4 / 2**20
    print(f"logits {n} x {length} x {vocab} float32: {logits_mb:.0f} MiB (not counted below)\n")
    print("| form | peak MiB (loss + backward) | x logits |")
    print("|---|---|---|")
    for name, fn in forms.items():
        logits = base.clone().requires_grad_()
        mb = peak_bytes(fn, logits) / 2**20
        print(f"| {name} | {mb:.0f} | {mb / logits_mb:.2f} |")


if __name__ == "__main__":
    main()
