"""Groups sharded with FSDP2: each peer sharded like the student, exchanged shard to shard.

With torch's `fully_shard` (FSDP2) inside a group, each rank holds 1/n of every parameter (a `DTensor` shard). A
peer is built the same way: the student's architecture on the meta device, `fully_shard` applied to the same
submodules over the same device mesh, then filled by the exchange. Rank r of every group then holds shard r of every
tensor, so the exchange moves local shards over the column (rank r to rank r of the other groups), with no gather
inside the group: (G-1) x P/n bytes per rank and exchange. In the peer's forward FSDP2 gathers one unit (layer) at a
time over the group and frees it after, so peer memory per rank is (G-1) x P/n plus one layer.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


def is_fully_sharded(model: nn.Module) -> bool:
    """Whether `fully_shard` (FSDP2) was applied to `model`."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def local_tensors(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Parameters (this rank's shard of each) then buffers, by name, each shared tensor once. A module left
    unsharded by a forward without backward (FSDP2 keeps the root gathered) is resharded first."""
    from torch.distributed.tensor import DTensor

    model.reshard()
    tensors = OrderedDict((name, p.to_local() if isinstance(p, DTensor) else p)
                          for name, p in model.named_parameters())
    tensors.update(model.named_buffers())
    return tensors


def sharded_peer(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A frozen peer of a `fully_shard`ed `model`: its class and config built on the meta device, sharded over the
    same mesh at the same submodules, its storage allocated (left for the exchange to fill)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if dtype is not None:
        raise ValueError("`codistill_peer_dtype` is not supported for FSDP2-sharded groups yet: leave it unset.")
    device = next(iter(local_tensors(model).values())).device
    mesh = next(model.parameters()).device_mesh
    with torch.device("meta"):
        peer = type(model)(model.config)
    for name, module in reversed(list(model.named_modules())):  # innermost units first, as they were sharded
        if name and isinstance(module, FSDPModule):
            fully_shard(peer.get_submodule(name), mesh=mesh, reshard_after_forward=True)
    # Resharded after every forward, the root too: between exchanges a rank holds only its shards of the peer.
    fully_shard(peer, mesh=mesh, reshard_after_forward=True)
    peer.to_empty(device=device)
    peer.eval()
    peer.requires_grad_(False)
    return peer
