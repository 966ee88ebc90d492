"""The lightning-tricks command line."""

from __future__ import annotations

import argparse
import sys

from lightning_tricks import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightning-tricks",
                                     description="Proven training tricks as PyTorch Lightning callbacks.")
    parser.add_argument("--version", action="version", version=f"lightning-tricks {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    from lightning_tricks.demo import run

    demo = sub.add_parser(
        "demo", help="train a plain baseline and the guide's recipe on MNIST-1D and compare them",
        description="Train the MNIST-1D ConvBase with plain AdamW and with the guide's recipe, for each seed; "
                    "validate on a split held out of the training set and report the test set once at the end. "
                    "About 3 minutes on 2 CPU cores.")
    run.add_arguments(demo)
    args = parser.parse_args(argv)
    if args.command == "demo":
        run.check_arguments(demo, args)
        run.main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
