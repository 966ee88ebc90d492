"""The demo's command-line arguments and their checks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=_positive_int, default=None, help="epochs per run (default 100)")
    parser.add_argument("--seeds", type=_non_negative_int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default ./demo_out)")
    parser.add_argument("--fast", action="store_true",
                        help="a seconds-long smoke run: 2 epochs of 5 batches, the first seed only")
    parser.add_argument("--lr", type=_positive_float, default=1e-2, help="AdamW peak lr (default 1e-2)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    parser.add_argument("--batch-size", type=_positive_int, default=100, help="batch size (default 100, as the paper)")
    parser.add_argument("--distill", action="store_true",
                        help="also train a wide teacher (ConvBase, 128 channels) and distil it into the student")
    parser.add_argument("--temperature", type=_positive_float, default=3.0, help="distillation temperature (default 3)")
    parser.add_argument("--alpha", type=_fraction, default=0.7, help="weight of the distillation term (default 0.7)")
    parser.add_argument("--ema", type=float, default=None, metavar="DECAY",
                        help="add EMA with this decay to the recipe (evaluated and kept; e.g. 0.999)")
    parser.add_argument("--jobs", type=_positive_int, default=2,
                        help="runs trained at once, one process each (default 2: one per core of a 2-core machine)")
    parser.add_argument("--threads", type=_positive_int, default=1,
                        help="torch threads per run (default 1: a 5k-parameter model gains nothing from more)")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Resolve ``--fast`` and ``--epochs`` (they conflict) and the defaults that depend on them."""
    if args.fast and args.epochs is not None:
        parser.error("--fast runs 2 epochs of 5 batches: drop --epochs, or drop --fast")
    if args.weight_decay < 0:
        parser.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.ema is not None and not 0.0 <= args.ema < 1.0:
        parser.error(f"--ema must be a decay in [0, 1), got {args.ema}")
    if args.fast:
        args.epochs, args.seeds, args.jobs = 2, args.seeds[:1], 1
    elif args.epochs is None:
        args.epochs = 100
    args.progress = sys.stdout.isatty()  # a log file gets one line per run, not progress bars
