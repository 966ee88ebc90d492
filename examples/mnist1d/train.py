"""LightningCLI entry point for the demo's model and data: every trick is configured from the YAML.

    python examples/mnist1d/train.py fit --config examples/mnist1d/recipe.yaml
    python examples/mnist1d/train.py fit --config examples/mnist1d/recipe.yaml --trainer.max_epochs 10
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningCLI

from lightning_tricks.demo.data import MNIST1DDataModule
from lightning_tricks.demo.model import ConvBaseClassifier


def main(args: Any = None) -> LightningCLI:
    return LightningCLI(ConvBaseClassifier, MNIST1DDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
