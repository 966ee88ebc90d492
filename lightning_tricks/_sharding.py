"""Plain tensors and reductions for callbacks that read parameters sharded by FSDP2 (``DTensor``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor


def local(t: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor`` (a plain tensor); any other tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def is_sharded(params: Sequence[Tensor]) -> bool:
    """Whether any of ``params`` is a ``DTensor`` (FSDP2, tensor parallelism)."""
    return any(isinstance(p, DTensor) for p in params)


class ShardSum:
    """Sums per-parameter quantities of local shards into whole-parameter ones, across the shard group.

    For a parameter sharded by FSDP2 each rank holds a slice, so a sum over the entries of the whole parameter (a
    squared norm) is the sum over ranks of the sums over the local slices. That reduction runs over the mesh
    dimensions on which the parameter is sharded (``Shard`` placements) only: in hybrid sharding (HSDP) the replicas
    hold the same values and are not summed. Columns of unsharded parameters are left as they are.

    Args:
        params: the parameters, in the order of the columns of the tensors passed to :meth:`__call__`.
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        layouts: dict[Any, list[int]] = {}
        meshes: dict[Any, Any] = {}
        for i, p in enumerate(params):
            if isinstance(p, DTensor):
                dims = tuple(d for d, placement in enumerate(p.placements) if placement.is_shard())
                if dims:
                    # by value: fully_shard(layer, mesh=self.device_mesh["data_parallel"]) per layer (as Lightning's
                    # docs write it) makes a new mesh object per call, all over the same ranks
                    mesh = p.device_mesh
                    key = (tuple(mesh.mesh.flatten().tolist()), tuple(mesh.mesh.shape), mesh.mesh_dim_names, dims)
                    layouts.setdefault(key, []).append(i)
                    meshes.setdefault(key, (mesh, dims))
        if len(layouts) > 1:
            raise NotImplementedError(
                f"the parameters are sharded in {len(layouts)} different ways (device meshes or sharded mesh "
                "dimensions); GradientMonitor reduces over one layout. Shard every module on the same mesh."
            )
        self.columns: list[int] = next(iter(layouts.values()), [])
        self.groups = [] if not layouts else [meshes[k][0].get_group(d) for k in layouts for d in meshes[k][1]]

    def __bool__(self) -> bool:
        return bool(self.columns)

    def __call__(self, values: Tensor) -> Tensor:
        """Sum the sharded columns of ``values`` ``(..., P)`` across the shard group (one collective per mesh
        dimension); every rank must call it."""
        if not self.columns:
            return values
        index = torch.tensor(self.columns, device=values.device)
        part = values.index_select(-1, index).contiguous()
        for group in self.groups:
            dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
        return values.index_copy(-1, index, part)

    def max(self, value: Tensor) -> Tensor:
        """The maximum of ``value`` over the shard group (every rank must call it)."""
        value = value.clone()
        for group in self.groups:
            dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
        return value


def agree_on_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's floating buffers (BatchNorm statistics), in place, when processes replicate the
    module (DDP). DDP broadcasts rank 0's buffers before each forward, so during a fit each rank's statistics differ
    only by its own last batch; after a fit's final change to the weights this makes the replicas equal again.
    Sharded modules (``DTensor``) and a single process are left alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers or is_sharded(buffers) or is_sharded(list(module.parameters())):
        return
    for b in buffers:
        dist.broadcast(b.data, src=0)
