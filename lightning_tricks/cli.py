"""Command line: ``lightning-tricks demo [--epochs N] [--seeds S ...] [--out DIR] [--fast]``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightning-tricks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a plain baseline and the guide's recipe on MNIST-1D and compare them")
    from lightning_tricks.demo import run

    run.add_arguments(demo)
    args = parser.parse_args(argv)
    if args.command == "demo":
        run.main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
