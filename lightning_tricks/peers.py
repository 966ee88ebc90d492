"""How callbacks find the peers they cooperate with, and the two roles they cooperate through.

A callback that needs another asks the Trainer for it by class, with :func:`find_callbacks`/:func:`find_callback`,
never by scanning ``trainer.callbacks`` itself. Where two callbacks would otherwise import each other, they meet
through a role defined here instead:

* :class:`EvaluatesOtherWeights`: evaluation runs on weights other than the trained ones (an :class:`EMA` or
  :class:`SWA` average); :class:`EarlyStopping` keeps those as the best weights, since they were measured.
* :class:`ChoosesFinalWeights`: a callback that puts chosen weights in the module at the end of fit
  (:class:`EarlyStopping`'s best weights); an average then does not overwrite them.
"""

from __future__ import annotations

from typing import TypeVar

import lightning.pytorch as pl
from torch import Tensor

__all__ = ["ChoosesFinalWeights", "EvaluatesOtherWeights", "find_callback", "find_callbacks"]

C = TypeVar("C")


def find_callbacks(trainer: pl.Trainer, kind: type[C]) -> list[C]:
    """The callbacks of the Trainer that are instances of ``kind`` (a class or a role), in the Trainer's order."""
    callbacks: list[pl.Callback] = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's connector
    return [cb for cb in callbacks if isinstance(cb, kind)]


def find_callback(trainer: pl.Trainer, kind: type[C]) -> C | None:
    """The first callback of the Trainer that is an instance of ``kind``, or ``None``."""
    found = find_callbacks(trainer, kind)
    return found[0] if found else None


class EvaluatesOtherWeights:
    """Role of a callback under which validation and test run on weights other than the trained ones."""

    def evaluated_state_dict(self, pl_module: pl.LightningModule) -> dict[str, Tensor] | None:
        """The weights evaluation runs on (keys of ``pl_module.state_dict()``, each rank's shards), or ``None``
        when it runs on the module's own. They may be the callback's live tensors: copy them to keep them."""
        raise NotImplementedError


class ChoosesFinalWeights:
    """Role of a callback that puts weights of its choosing in the module at the end of fit."""

    def chooses_final_weights(self) -> bool:
        """Whether it will (it holds weights to restore)."""
        raise NotImplementedError
