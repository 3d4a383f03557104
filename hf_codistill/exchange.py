"""Stale local copies of the peer models and the periodic exchange that refreshes them.

Every rank of group g holds a frozen copy of every other group's model. Every k optimizer steps the groups exchange
their models' parameters and buffers (P bytes per model), and only that crosses group boundaries:

- sharded (groups of n > 1 ranks, the default): rank r of a group sends 1/n of its model (shard r) to rank r of
  every other group over its *column*, then the group all-gathers the shards over its own, fast process group. Each
  rank moves (G-1) x P/n bytes across group boundaries, a group (G-1) x P, whatever n is;
- unsharded (n = 1, or `sharded=False`): every rank all-gathers whole models over its column, (G-1) x P bytes per
  rank, n x (G-1) x P per group.

Both paths copy the same bits: the peer copies are identical either way. With a peer precision (`dtype`, e.g.
bfloat16) the copies are held in it and the floating-point tensors travel in it, halving memory and bytes.

An exchange can also run in the background (`start_exchange` / `finish_exchange`): the cross-group all-gather is
started at step s on a snapshot of the parameters and applied at the next step boundary, so step s+1 still uses the
previous peers and the peers lag one step more than with the blocking `exchange`.

Groups sharded with FSDP2 hold each peer sharded the same way and exchange shard to shard (`hf_codistill.sharding`).

`PeerCopies` (launched groups) is one of the *peer sets* the codistillation engine (`hf_codistill.engine`) works
with, beside `hf_codistill.local_peers.LocalPeers` (all models in one process). A peer set answers:

    peers_of(group)             {peer group: model} that `group`'s model distils from
    dtype                       precision the peers run in (None: the models' own)
    check_compatible()          refuse peers that cannot be exchanged (collective)
    share_initialisation(base_only)   start every model from group 0's weights (resumed: a PEFT base only)
    refresh(step, background)   bring the peers up to date (every k steps)
    finish()                    land a refresh still in flight
    state_dict(group) / load_state_dict(state)          the peers as a checkpoint holds them
    counters() / checkpoint_state() / load_checkpoint_state(state)   what is logged and resumed
    restores_from_checkpoint    whether checkpoints hold the peers (else a resumed run refreshes them)
    state_rank                  FSDP2 peers: the shard this rank holds and saves in its own file (else None)

A third, `hf_codistill.store_peers.StorePeers`, serves groups launched apart that meet through a peer store.
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .adapters import (
    PEER_ADAPTER,
    AdapterPeer,
    OneAdapter,
    add_adapter_peer,
    base_fingerprint,
    base_tensors,
    is_peft_model,
    own_adapter_tensors,
    remove_adapter_peer,
)
from .quantization import INT8, as_sent, is_quantized, quantize_peer, quantized_tensors
from .sharding import is_fully_sharded, local_tensors, shard_rank, sharded_peer
from .topology import GroupTopology


def exchanged_tensors(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Parameters then buffers, by name, each shared tensor once: what defines a model's function. For a PEFT model
    (and a peer held as its adapter) only the adapter's tensors: the frozen base is the same in every group; for an
    FSDP2 model this rank's shards."""
    if isinstance(model, OneAdapter):
        return model.tensors()
    if is_quantized(model):
        return quantized_tensors(model)  # int8 rows and their scales (`hf_codistill.quantization`)
    if is_peft_model(model):
        return own_adapter_tensors(model)
    if is_fully_sharded(model):
        return local_tensors(model)  # this rank's shards: groups sharded alike exchange shard to shard
    tensors = OrderedDict(model.named_parameters())
    tensors.update(model.named_buffers())
    return tensors


def frozen_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of `model` for inference only: eval mode (no dropout, so no RNG is consumed) and no gradients; its
    floating-point parameters and buffers in `dtype` if given (int8: its weight matrices, see `quantization`)."""
    _refuse_int8_adapters(model, dtype)
    peer = copy.deepcopy(model)
    peer.eval()
    peer.requires_grad_(False)
    if dtype == INT8:
        return quantize_peer(peer)
    return peer.to(dtype) if dtype is not None else peer


def _refuse_int8_adapters(model: nn.Module, dtype: torch.dtype | None) -> None:
    if dtype == INT8 and (is_peft_model(model) or isinstance(model, OneAdapter)):
        raise ValueError(
            "`codistill_peer_dtype='int8'` quantises whole models' weight matrices; a peer held as an adapter is "
            "small already: leave `codistill_peer_dtype` unset (or use bfloat16) with PEFT models."
        )


def new_peer(model: nn.Module, group: int, dtype: torch.dtype | None = None, adapter_name: str = PEER_ADAPTER
             ) -> nn.Module:
    """Group `group`'s peer, shaped like `model`: an adapter on `model`'s own base for a PEFT model or a student
    adapter (named `adapter_name.format(group)`), a model sharded like it for an FSDP2 model, else a frozen copy."""
    _refuse_int8_adapters(model, dtype)
    if is_peft_model(model):
        return add_adapter_peer(model, group, dtype, adapter_name)
    if isinstance(model, OneAdapter):
        return add_adapter_peer(model.shared_model, group, dtype, adapter_name, like=model.adapter)
    if is_fully_sharded(model):
        return sharded_peer(model, dtype)
    return frozen_copy(model, dtype)


def ring_peers(group: int, num_groups: int, num_peers: int | None = None) -> list[int]:
    """The groups `group` distils from: the next `num_peers` on a ring (g+1 ... g+m mod G), or all the others."""
    num_peers = num_groups - 1 if num_peers is None else num_peers
    return sorted((group + step) % num_groups for step in range(1, num_peers + 1))


def _buckets(tensors: OrderedDict[str, torch.Tensor]) -> dict[tuple[torch.dtype, torch.device], list[str]]:
    buckets: dict[tuple[torch.dtype, torch.device], list[str]] = {}
    for name, tensor in tensors.items():
        buckets.setdefault((tensor.dtype, tensor.device), []).append(name)
    return buckets


# The most an exchange sends in one collective (unless one tensor is larger), as DDP's default bucket. A blocking
# exchange moves one bucket at a time, so its buffers (a flat copy of the bucket, the G copies the column's
# all-gather fills and the transport's own: about (2G + 1) x the bucket) stay bounded whatever the model's size.
EXCHANGE_BUCKET_BYTES = 25 * 2**20


def _bounded_buckets(tensors: OrderedDict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """`_buckets`' names cut, in order, into runs of at most `max_bytes` (a larger tensor alone)."""
    runs = []
    for names in _buckets(tensors).values():
        run, size = [], 0
        for name in names:
            nbytes = tensors[name].numel() * tensors[name].element_size()
            if run and size + nbytes > max_bytes:
                runs.append(run)
                run, size = [], 0
            run.append(name)
            size += nbytes
        runs.append(run)
    return runs


def _all_gather_single(output: torch.Tensor, input: torch.Tensor) -> None:
    """All-gather over the group's (default) process group into one tensor; the name changed in torch 2.1x."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, input)


@dataclass
class _BucketTransfer:
    """One dtype/device bucket of an exchange in flight: what was sent and where the column's copies arrive."""

    names: list[str]
    numel: int
    sent: torch.Tensor
    gathered: dict[int, torch.Tensor]
    works: list


@dataclass
class _PendingExchange:
    step: int
    buckets: list[_BucketTransfer]


class PeerCopies:
    """The peer models of one rank, indexed by group, and the exchange that refreshes them.

    With `num_peers` m < G - 1 a group holds and fetches only the next m groups' models on a ring (`ring_peers`):
    each group sends its model to the m groups that distil from it and receives its m peers (point to point over the
    column), so memory and bytes scale with m, not G. `bytes_sent` / `bytes_received` count what crossed group
    boundaries (this rank's column traffic); `group_bytes_received` counts what the sharded path adds inside the group.
    """

    restores_from_checkpoint = True  # a checkpoint holds the peers: a resumed run continues exactly

    def __init__(self, model: nn.Module, topology: GroupTopology, sharded: bool = True,
                 dtype: torch.dtype | None = None, num_peers: int | None = None, adapter_name: str = PEER_ADAPTER):
        self.model = model
        self.dtype = dtype
        self.topology = topology
        # An FSDP2 model's tensors are already this rank's shards: the column moves them, nothing is gathered.
        self.sharded = sharded and topology.group_size > 1 and not is_fully_sharded(model)
        self.state_rank = shard_rank(model)  # checkpoints hold each rank's shards of the peers
        group, num_groups = topology.group_index, topology.num_groups
        self.peers: dict[int, nn.Module] = {
            peer: new_peer(model, peer, dtype, adapter_name) for peer in ring_peers(group, num_groups, num_peers)
        }
        # The groups that distil from this one (this group is among their next m).
        self.readers = sorted(reader for reader in range(num_groups) if group in ring_peers(reader, num_groups,
                                                                                             len(self.peers)))
        self.last_exchange_step: int | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.group_bytes_received = 0
        self.num_exchanges = 0
        self._pending: _PendingExchange | None = None

    def models(self) -> list[nn.Module]:
        return [self.peers[group] for group in sorted(self.peers)]

    def release(self) -> None:
        """Drop the peers: adapters leave the shared model (copies go with this object)."""
        for peer in self.peers.values():
            if isinstance(peer, AdapterPeer):
                remove_adapter_peer(peer)
        self.peers = {}

    # ---- The peer-set interface (see the module docstring) ----------------------------------------------------

    def peers_of(self, group: int) -> dict[int, nn.Module]:
        return {peer: self.peers[peer] for peer in sorted(self.peers)}

    def check_compatible(self) -> None:
        self.check_same_architecture(self.model)
        if is_peft_model(self.model):
            self.check_same_base(self.model)

    def share_initialisation(self, base_only: bool = False) -> None:
        """Start from group 0's weights: the model's (a PEFT model's adapter and base), or with `base_only` (a
        resumed run, whose checkpoint holds the rest) a PEFT model's base alone."""
        if base_only and not is_peft_model(self.model):
            return
        self.check_same_architecture(self.model)  # before anything is broadcast
        if is_peft_model(self.model):
            self.broadcast_tensors(base_tensors(self.model), source_group=0)
        if not base_only:
            self.broadcast_model(self.model, source_group=0)

    def refresh(self, step: int, background: bool = False) -> None:
        """Exchange now, or start the cross-group part in the background (landed by `finish`)."""
        if background:
            self.start_exchange(self.model, step)
        else:
            self.exchange(self.model, step)

    def finish(self) -> None:
        self.finish_exchange()

    def counters(self) -> dict[str, int]:
        return {"peer_exchanges": self.num_exchanges, "peer_exchange_bytes_sent": self.bytes_sent,
                "peer_exchange_bytes_received": self.bytes_received}

    def checkpoint_state(self) -> dict[str, int | None]:
        return {"last_exchange_step": self.last_exchange_step, "num_exchanges": self.num_exchanges,
                "exchange_bytes_sent": self.bytes_sent, "exchange_bytes_received": self.bytes_received}

    def load_checkpoint_state(self, state: dict) -> None:
        self.last_exchange_step = state["last_exchange_step"]
        self.num_exchanges = state["num_exchanges"]
        self.bytes_sent = state["exchange_bytes_sent"]
        self.bytes_received = state["exchange_bytes_received"]

    @torch.no_grad()
    def exchange(self, model: nn.Module, step: int) -> None:
        """Refresh every peer copy with the peers' current parameters (blocking), one bucket of at most
        `EXCHANGE_BUCKET_BYTES` at a time, so that its buffers stay a few buckets' size.

        Collective over the whole world: every rank must call it at the same `step`.
        """
        self.finish_exchange()
        own = self._wire_tensors(model)
        peer_tensors = {group: exchanged_tensors(peer) for group, peer in self.peers.items()}
        for tag, names in enumerate(_bounded_buckets(own, EXCHANGE_BUCKET_BYTES)):
            self._land(self._send(own, names, tag), peer_tensors)
        self._exchanged(step)

    @property
    def exchange_in_flight(self) -> bool:
        return self._pending is not None

    @torch.no_grad()
    def start_exchange(self, model: nn.Module, step: int) -> None:
        """Snapshot this model and start the cross-group all-gather without waiting for it.

        Collective over the whole world, like `exchange`; an exchange still in flight is finished first. Training may
        go on (and change the parameters) until `finish_exchange`.
        """
        self.finish_exchange()
        own = self._wire_tensors(model)
        self._pending = _PendingExchange(step, [self._send(own, names, tag)
                                                for tag, names in enumerate(_buckets(own).values())])

    def _wire_tensors(self, model: nn.Module) -> OrderedDict[str, torch.Tensor]:
        """This model's tensors in its peer copies' format: their precision, or int8 rows with their scales."""
        return as_sent(exchanged_tensors(model), exchanged_tensors(next(iter(self.peers.values()))))

    def _send(self, own: OrderedDict[str, torch.Tensor], names: list[str], tag: int) -> _BucketTransfer:
        """Start the column's transfer of one bucket (`names` of `own`, one dtype and device)."""
        topology = self.topology
        flat = torch.cat([own[name].reshape(-1) for name in names])
        numel = flat.numel()
        if self.sharded:
            n = topology.group_size
            shard = -(-numel // n)
            flat = torch.cat([flat, flat.new_zeros(shard * n - numel)])
            sent = flat[topology.group_rank * shard : (topology.group_rank + 1) * shard]
        else:
            sent = flat
        if len(self.peers) == topology.num_groups - 1:  # every group needs every model: one all-gather
            everyone = [torch.empty_like(sent) for _ in range(topology.num_groups)]
            works = [topology.column.allgather([everyone], [sent])]
            gathered = {peer: everyone[peer] for peer in self.peers}
        else:  # a column's rank is its group index; one tag per bucket keeps the messages apart
            gathered = {peer: torch.empty_like(sent) for peer in self.peers}
            works = [topology.column.send([sent], reader, tag) for reader in self.readers]
            works += [topology.column.recv([gathered[peer]], peer, tag) for peer in self.peers]
        self.bytes_sent += sent.numel() * sent.element_size() * len(self.readers)
        self.bytes_received += sent.numel() * sent.element_size() * len(self.peers)
        return _BucketTransfer(names, numel, sent, gathered, works)

    @torch.no_grad()
    def finish_exchange(self) -> bool:
        """Wait for the exchange in flight, if any, and load it into the peer copies; True if one was applied.

        Sharded, this all-gathers the shards inside the group: every rank of the group must call it at the same point.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return False
        peer_tensors = {group: exchanged_tensors(peer) for group, peer in self.peers.items()}
        for bucket in pending.buckets:
            self._land(bucket, peer_tensors)
        self._exchanged(pending.step)
        return True

    def _land(self, bucket: _BucketTransfer, peer_tensors: dict[int, OrderedDict[str, torch.Tensor]]) -> None:
        """Wait for one bucket and copy it into the peer copies (sharded: all-gathered over the group first)."""
        for work in bucket.works:
            work.wait()
        peer_groups = sorted(self.peers)
        if self.sharded:
            # One all-gather over the group for every peer's shards: row r of `assembled` is rank r's shards.
            shards = torch.cat([bucket.gathered[group] for group in peer_groups])
            assembled = shards.new_empty(self.topology.group_size * shards.numel())
            _all_gather_single(assembled, shards)
            self.group_bytes_received += (assembled.numel() - shards.numel()) * shards.element_size()
            assembled = assembled.view(self.topology.group_size, len(peer_groups), -1)
            flats = {group: assembled[:, i].reshape(-1) for i, group in enumerate(peer_groups)}
        else:
            flats = {group: bucket.gathered[group] for group in peer_groups}
        for group, flat in flats.items():
            offset = 0
            for name in bucket.names:
                target = peer_tensors[group][name]
                target.copy_(flat[offset : offset + target.numel()].view_as(target))
                offset += target.numel()

    def _exchanged(self, step: int) -> None:
        self.num_exchanges += 1
        self.last_exchange_step = step

    @torch.no_grad()
    def check_same_architecture(self, model: nn.Module) -> None:
        """Fail clearly (instead of hanging or mis-copying) when the groups' models differ: in their number of
        tensors or values, or in the tensors' names, shapes or precisions (compared as a digest)."""
        tensors = exchanged_tensors(model)
        sizes = [t.numel() for t in tensors.values()]
        layout = ";".join(f"{name}:{tuple(t.shape)}:{t.dtype}" for name, t in tensors.items())
        digest = int.from_bytes(hashlib.sha256(layout.encode()).digest()[:8], "big", signed=True)
        headers = self._every_groups([len(sizes), sum(sizes), digest, int(is_peft_model(model))], tensors)
        with_adapters = [group for group, header in enumerate(headers) if header[3]]
        if 0 < len(with_adapters) < len(headers):
            raise ValueError(
                f"Groups {with_adapters} train adapters (PEFT) and the others whole models: give every group the same "
                "`peft_config` (the recipes' `--use_peft` and LoRA flags), or none."
            )
        if len(set(headers)) != 1:
            described = ", ".join(f"group {i}: {n} tensors / {p} values" for i, (n, p, _, _) in enumerate(headers))
            if len({header[:2] for header in headers}) == 1:
                described += " (as many, but with other names, shapes or precisions)"
            raise ValueError(
                f"Every group must train the same architecture to exchange parameters, got {described}. Build the "
                "model from the same config (or checkpoint) in every process."
            )

    def check_same_base(self, model: nn.Module) -> None:
        """Adapters are exchanged, not bases: refuse groups whose frozen base weights differ (`base_fingerprint`)."""
        fingerprints = self._every_groups([base_fingerprint(model)], exchanged_tensors(model))
        differing = [group for group, value in enumerate(fingerprints) if value != fingerprints[0]]
        if differing:
            raise ValueError(
                f"Groups {differing} hold other base weights than group 0 under their adapters: codistilled adapters "
                "are exchanged without their base, so every group must load the same base model (same checkpoint "
                "and revision, same dtype) before adding its adapter. A base built from a config takes each group's "
                "seed: adapt a pre-trained model, or build the base under one seed in every group."
            )

    def _every_groups(self, values: list[int], tensors: OrderedDict[str, torch.Tensor]) -> list[tuple[int, ...]]:
        """`values` (int64) of every group, by group index, all-gathered over the column on `tensors`' device."""
        header = torch.tensor(values, dtype=torch.int64)
        device = next(iter(tensors.values())).device
        if device.type == "cuda":  # NCCL gathers device tensors only
            header = header.to(device)
        gathered = [torch.empty_like(header) for _ in range(self.topology.num_groups)]
        self.topology.column.allgather([gathered], [header]).wait()
        return [tuple(g.tolist()) for g in gathered]

    @torch.no_grad()
    def broadcast_model(self, model: nn.Module, source_group: int = 0) -> None:
        """Overwrite `model`, in every group, with group `source_group`'s weights at full precision (a shared
        initialisation). Collective over the whole world; follow it with `exchange` to refresh the peers."""
        self.broadcast_tensors(exchanged_tensors(model), source_group)

    @torch.no_grad()
    def broadcast_tensors(self, own: OrderedDict[str, torch.Tensor], source_group: int = 0) -> None:
        """Overwrite `own` (live tensors of this group's model) with group `source_group`'s, over the column."""
        options = dist.BroadcastOptions()
        options.rootRank = source_group  # a column's rank is its group index
        for names in _buckets(own).values():
            flat = torch.cat([own[name].detach().reshape(-1) for name in names])
            self.topology.column.broadcast([flat], options).wait()
            offset = 0
            for name in names:
                own[name].copy_(flat[offset : offset + own[name].numel()].view_as(own[name]))
                offset += own[name].numel()

    def state_dict(self, group: int | None = None) -> dict[str, torch.Tensor]:
        """Every peer copy, as `group_<j>.<name>` (this rank holds one group's peers: `group` is that group)."""
        if self._pending is not None:
            # Finishing here would be a collective on the one rank that saves; the caller finishes on every rank.
            raise RuntimeError("An exchange is in flight: call `finish_exchange()` on every rank before saving peers.")
        return peers_state(self.peers)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_peers_state(self.peers, state, strict=True)


def peers_state(peers: dict[int, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"group_{group}.{name}": tensor.detach().cpu().clone()
            for group, peer in peers.items() for name, tensor in exchanged_tensors(peer).items()}


@torch.no_grad()
def load_peers_state(peers: dict[int, nn.Module], state: dict[str, torch.Tensor], strict: bool) -> None:
    for group, peer in peers.items():
        for name, tensor in exchanged_tensors(peer).items():
            key = f"group_{group}.{name}"
            if strict or key in state:
                tensor.copy_(state[key])
