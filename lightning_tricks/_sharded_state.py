"""Callback state that is sharded like the module (FSDP2's ``DTensor`` shards), written into and read from a
distributed checkpoint next to the module's own shards.

Lightning saves callback state from rank 0 only: each rank's shards of an average or of saved best weights would be
lost. Under ``ModelParallelStrategy``'s distributed checkpoint (a folder) the module's ``state_dict`` is written by
``torch.distributed.checkpoint`` on every rank, so a callback adds its shards there as ``DTensor``s laid out like the
module's tensors, under keys of its own (``_lightning_tricks/<state key>/<name>``); Lightning's loader requests only
the module's keys and leaves them alone. On resume the callback reads them back with ``torch.distributed.checkpoint``,
into ``DTensor``s laid out like the module's now: a checkpoint written by another number of processes is resharded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

PREFIX = "_lightning_tricks"


def _key(owner: str, name: str) -> str:
    return f"{PREFIX}/{owner}/{name}"


def add_shards(checkpoint: dict[str, Any], owner: str, shards: dict[str, Tensor], like: dict[str, Tensor]) -> None:
    """Put this rank's ``shards`` (plain local tensors, by the module's state-dict names) into the checkpoint's
    ``state_dict`` as tensors laid out like the module's ``like`` (``DTensor`` where the module's is one)."""
    state = checkpoint["state_dict"]
    for name, shard in shards.items():
        ref = like[name]
        if isinstance(ref, DTensor):
            state[_key(owner, name)] = DTensor.from_local(shard.to(ref.device), ref.device_mesh, ref.placements,
                                                          run_check=False, shape=ref.shape, stride=ref.stride())
        else:  # replicated (a buffer the sharding left whole): written once
            state[_key(owner, name)] = shard


def load_shards(path: str | Path, owner: str, names: list[str], like: dict[str, Tensor],
                dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Read the shards that :func:`add_shards` wrote, laid out like the module's tensors now (every rank must call
    it); returns this rank's local tensors by name. Raises when the checkpoint does not hold them."""
    import torch.distributed.checkpoint as dcp

    targets = {_key(owner, n): torch.empty_like(like[n], dtype=dtype or like[n].dtype) for n in names}
    try:
        dcp.load({"state_dict": targets}, checkpoint_id=str(path))  # nested as Lightning writes it
    except Exception as error:  # the checkpoint's callback state says the shards are there
        raise RuntimeError(f"{owner}: the checkpoint {path} should hold this callback's shards but they cannot be "
                           f"read ({type(error).__name__}: {error}). Resume from a checkpoint this callback wrote, or "
                           "without the callback's state.") from error
    return {n: (t.to_local() if isinstance(t, DTensor) else t) for n, t in zip(names, targets.values())}
