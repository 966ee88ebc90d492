"""Peak memory of a language-model head's loss and backward, with and without label smoothing, on the CPU.

Logits of N=8 sequences x L=512 tokens x V=32,000 classes in float32 (500 MiB). Each form runs loss + backward in
a fresh process. Two figures, each over the process's level once the logits and targets exist: the memory the loss
holds from its forward to the backward (what sits beside the model's activations at the step's peak), read from
``/proc/self/statm``; and the growth of the peak resident memory (``ru_maxrss``) through loss + backward, the logits'
gradient (500 MiB, the same for every form) included. Forms:

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
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from lightning_tricks.functional import cross_entropy, smooth_targets, soft_cross_entropy


def forms(vocab: int, y: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    return {
        "plain": lambda z: F.cross_entropy(z.reshape(-1, vocab), y.reshape(-1)),
        "torch_smoothing": lambda z: F.cross_entropy(z.reshape(-1, vocab), y.reshape(-1), label_smoothing=0.1),
        "ours": lambda z: cross_entropy(z, y, smoothing=0.1, class_dim=-1),
        "dense": lambda z: soft_cross_entropy(z.reshape(-1, vocab),
                                              smooth_targets(y.reshape(-1), vocab, 0.1, ignore_index=-100),
                                              ignore_index=-100),
    }


def resident_mib() -> float:
    """The process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(form: str, n: int, length: int, vocab: int) -> tuple[float, float]:
    """MiB held by the forward of ``form``'s loss, and MiB added to the peak by its loss + backward."""
    torch.manual_seed(0)
    logits = torch.randn(n, length, vocab).requires_grad_()
    y = torch.randint(0, vocab, (n, length))
    y[:, -16:] = -100
    before, peak_before = resident_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = forms(vocab, y)[form](logits)
    held = resident_mib() - before
    loss.backward()
    return held, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--form", default=None, help=argparse.SUPPRESS)  # one form, in a child process
    args = ap.parse_args()
    n, length, vocab = args.n, args.length, args.vocab
    if args.form:
        print(*measure(args.form, n, length, vocab))
        return
    logits_mib = n * length * vocab * 4 / 2**20
    print(f"logits {n} x {length} x {vocab} float32: {logits_mib:.0f} MiB; one process per form\n")
    print("| form | MiB held from forward to backward | peak MiB added (loss + backward) |")
    print("|---|---|---|")
    for form in forms(vocab, torch.zeros(1, dtype=torch.long)):
        out = subprocess.run([sys.executable, __file__, "--form", form, "--n", str(n), "--length", str(length),
                              "--vocab", str(vocab)], capture_output=True, text=True, check=True)
        held, peak = map(float, out.stdout.strip().splitlines()[-1].split())
        print(f"| {form} | {held:.0f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
