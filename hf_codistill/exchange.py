"""Stale local copies of the peer models and the periodic exchange that refreshes them.

Every rank of group g holds a frozen copy of every other group's model. Every k optimizer steps the ranks of a
*column* (rank r of each group) all-gather their model's parameters and buffers, so each rank receives the G-1 peer
models: (G-1) x P bytes in and out per rank and exchange, nothing else crossing group boundaries.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

from .topology import GroupTopology


def exchanged_tensors(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Parameters then buffers, by name, each shared tensor once: what defines a model's function."""
    tensors = OrderedDict(model.named_parameters())
    tensors.update(model.named_buffers())
    return tensors


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` for inference only: eval mode (no dropout, so no RNG is consumed) and no gradients."""
    peer = copy.deepcopy(model)
    peer.eval()
    peer.requires_grad_(False)
    return peer


def _buckets(tensors: OrderedDict[str, torch.Tensor]) -> dict[tuple[torch.dtype, torch.device], list[str]]:
    buckets: dict[tuple[torch.dtype, torch.device], list[str]] = {}
    for name, tensor in tensors.items():
        buckets.setdefault((tensor.dtype, tensor.device), []).append(name)
    return buckets


class PeerCopies:
    """The peer models of one rank, indexed by group, and the exchange that refreshes them."""

    def __init__(self, model: nn.Module, topology: GroupTopology):
        self.topology = topology
        self.peers: dict[int, nn.Module] = {
            group: frozen_copy(model) for group in range(topology.num_groups) if group != topology.group_index
        }
        self.last_exchange_step: int | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.num_exchanges = 0

    def models(self) -> list[nn.Module]:
        return [self.peers[group] for group in sorted(self.peers)]

    @torch.no_grad()
    def exchange(self, model: nn.Module, step: int) -> None:
        """All-gather every group's parameters over this rank's column and load them into the peer copies.

        Collective over the column: every rank of the world must call it at the same `step`.
        """
        own = exchanged_tensors(model)
        peer_tensors = {group: exchanged_tensors(peer) for group, peer in self.peers.items()}
        num_groups = self.topology.num_groups
        for (dtype, device), names in _buckets(own).items():
            flat = torch.cat([own[name].detach().reshape(-1) for name in names])
            gathered = [torch.empty_like(flat) for _ in range(num_groups)]
            self.topology.column.allgather([gathered], [flat]).wait()
            for group, tensors in peer_tensors.items():
                offset = 0
                for name in names:
                    target = tensors[name]
                    target.copy_(gathered[group][offset : offset + target.numel()].view_as(target))
                    offset += target.numel()
            moved = flat.numel() * flat.element_size() * (num_groups - 1)
            self.bytes_sent += moved
            self.bytes_received += moved
        self.num_exchanges += 1
        self.last_exchange_step = step

    @torch.no_grad()
    def check_same_architecture(self, model: nn.Module) -> None:
        """Fail clearly (instead of hanging or mis-copying) when the groups' models differ in shape."""
        sizes = torch.tensor([t.numel() for t in exchanged_tensors(model).values()], dtype=torch.int64)
        header = torch.tensor([sizes.numel(), int(sizes.sum())], dtype=torch.int64)
        gathered = [torch.empty_like(header) for _ in range(self.topology.num_groups)]
        device = next(iter(exchanged_tensors(model).values())).device
        if device.type == "cuda":
            header, gathered = header.to(device), [g.to(device) for g in gathered]
        self.topology.column.allgather([gathered], [header]).wait()
        shapes = [tuple(g.tolist()) for g in gathered]
        if len(set(shapes)) != 1:
            described = ", ".join(f"group {i}: {n} tensors / {p} values" for i, (n, p) in enumerate(shapes))
            raise ValueError(
                f"Every group must train the same architecture to exchange parameters, got {described}. Build the "
                "model from the same config (or checkpoint) in every process."
            )

    def load_into(self, model: nn.Module, group: int) -> None:
        """Overwrite `model` with peer `group`'s weights (for a shared initialisation)."""
        source = exchanged_tensors(self.peers[group])
        with torch.no_grad():
            for name, tensor in exchanged_tensors(model).items():
                tensor.copy_(source[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for group, peer in self.peers.items():
            for name, tensor in exchanged_tensors(peer).items():
                state[f"group_{group}.{name}"] = tensor.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for group, peer in self.peers.items():
                for name, tensor in exchanged_tensors(peer).items():
                    tensor.copy_(state[f"group_{group}.{name}"])
