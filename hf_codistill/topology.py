"""Which process trains which model: the groups, their process groups and the cross-group channels.

Each group is its own `torch.distributed` world: the default process group of a process spans only its group, so
`Trainer`, accelerate and DDP (data sharding, all-reduce, evaluation gathers, saving on rank 0) work per group
unchanged. Two things cross group boundaries, both built from the launcher's rendezvous store:

- a *column* process group per group rank r (the ranks at position r of every group), over which peer parameters
  are exchanged;
- the store itself, for small metadata: logs gathered to world rank 0 and barriers around checkpoints.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

_TOPOLOGY: GroupTopology | None = None
_STORE_PREFIX = "hf_codistill"


def launched_world_size() -> int:
    """Number of processes the launcher started (before groups rewrote `WORLD_SIZE` to the group's size)."""
    return int(os.environ.get("CODISTILL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def get_topology() -> GroupTopology | None:
    """The topology made by `init_groups` in this process, if any."""
    return _TOPOLOGY


@dataclass
class GroupTopology:
    """Where this process sits: world rank r = group_index * group_size + group_rank (contiguous blocks)."""

    world_rank: int
    world_size: int
    num_groups: int
    store: dist.Store
    column: dist.ProcessGroup | None
    timeout: timedelta

    @property
    def group_size(self) -> int:
        return self.world_size // self.num_groups

    @property
    def group_index(self) -> int:
        return self.world_rank // self.group_size

    @property
    def group_rank(self) -> int:
        return self.world_rank % self.group_size

    @property
    def is_world_zero(self) -> bool:
        return self.world_rank == 0

    # Store-based metadata channel. Every call site is reached by all ranks in the same order, so a per-process
    # counter names each round consistently across processes without any extra collective.
    _round: int = 0

    def _next_key(self, name: str) -> str:
        self._round += 1
        return f"{_STORE_PREFIX}/{name}/{self._round}"

    def barrier(self, name: str = "barrier") -> None:
        """Wait until every launched process reached this point (all groups)."""
        key = self._next_key(name)
        if self.store.add(key, 1) == self.world_size:
            self.store.set(f"{key}/done", b"1")
        self.store.wait([f"{key}/done"], self.timeout)

    def any_rank(self, flags: tuple[bool, ...], name: str = "any") -> tuple[bool, ...]:
        """For each flag, whether any launched process (any group) raised it; every process must call this."""
        key = self._next_key(name)
        for index, flag in enumerate(flags):
            if flag:
                self.store.add(f"{key}/{index}", 1)
        self.barrier(name)  # every process has raised its flags
        return tuple(self.store.add(f"{key}/{index}", 0) > 0 for index in range(len(flags)))

    def gather_to_world_zero(self, payload: dict | None, name: str = "logs") -> list[dict] | None:
        """Collect one JSON-able dict per group (sent by its group rank 0) on world rank 0; `None` elsewhere."""
        key = self._next_key(name)
        if self.group_rank == 0 and not self.is_world_zero:
            self.store.set(f"{key}/{self.group_index}", json.dumps(payload).encode())
        if not self.is_world_zero:
            return None
        gathered = [payload]
        for group in range(1, self.num_groups):
            self.store.wait([f"{key}/{group}"], self.timeout)
            gathered.append(json.loads(self.store.get(f"{key}/{group}").decode()))
            self.store.delete_key(f"{key}/{group}")
        return gathered


@dataclass
class SeparateGroup:
    """A group launched on its own (`codistill_peer_store`): its launch's world is the group, and other groups are
    reached only through the store, so barriers and agreements span this group alone and it reports for itself."""

    num_groups: int
    group_index: int
    timeout: timedelta
    column: None = None

    @property
    def group_size(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    @property
    def group_rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def is_world_zero(self) -> bool:
        return self.group_rank == 0

    def barrier(self, name: str = "barrier") -> None:
        if self.group_size > 1:
            dist.barrier()

    def any_rank(self, flags: tuple[bool, ...], name: str = "any") -> tuple[bool, ...]:
        if self.group_size == 1:
            return tuple(flags)
        everyone = [None] * self.group_size
        dist.all_gather_object(everyone, tuple(flags))
        return tuple(any(column) for column in zip(*everyone))

    def gather_to_world_zero(self, payload: dict | None, name: str = "logs") -> list[dict] | None:
        return None  # each launch logs its own group under the usual keys


def _make_process_group(backend: str, store: dist.Store, rank: int, size: int, timeout: timedelta):
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, size, options)
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def init_groups(num_groups: int, backend: str | None = None, timeout: timedelta | None = None) -> GroupTopology:
    """Split the launched processes into `num_groups` groups, each its own default process group.

    Call it on every process before anything creates accelerate's state (`CodistillTrainingArguments` does it for
    you). Reads the launcher's environment (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, as set by torchrun
    and `accelerate launch`), then rewrites `RANK`/`WORLD_SIZE` to the group's view so that every library that reads
    them sees one ordinary data-parallel world per group. `LOCAL_RANK` is left alone: it still selects the device.
    """
    global _TOPOLOGY
    if _TOPOLOGY is not None:
        if _TOPOLOGY.num_groups != num_groups:
            raise ValueError(
                f"Groups were already set up with num_groups={_TOPOLOGY.num_groups}; cannot switch to "
                f"num_groups={num_groups} in the same process."
            )
        return _TOPOLOGY
    if dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is already initialised for the whole world. Create CodistillTrainingArguments (or "
            "call hf_codistill.init_groups) before anything else sets up distributed training (accelerate's "
            "PartialState, a TrainingArguments instance, init_process_group)."
        )
    world_size = launched_world_size()
    if world_size % num_groups != 0:
        raise ValueError(
            f"{world_size} launched processes cannot be split into `num_groups={num_groups}` equal groups: launch a "
            f"multiple of {num_groups} processes or pick a `num_groups` that divides {world_size}."
        )
    timeout = timeout or timedelta(minutes=30)
    if "RANK" not in os.environ:
        raise RuntimeError(f"`WORLD_SIZE={world_size}` is set but `RANK` is not: start the processes with `torchrun` "
                           "or `accelerate launch`, which set both (and `MASTER_ADDR` / `MASTER_PORT`).")
    world_rank = int(os.environ["RANK"])
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))

    # The launcher's store (torchrun's agent store or rank 0's), exactly as init_process_group("env://") finds it.
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    group_size = world_size // num_groups
    group_index, group_rank = divmod(world_rank, group_size)

    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"{_STORE_PREFIX}/group_{group_index}", store),
        rank=group_rank,
        world_size=group_size,
        timeout=timeout,
    )
    # Same construction order on every rank: one column per group rank, holding rank r of every group.
    column = _make_process_group(
        backend, dist.PrefixStore(f"{_STORE_PREFIX}/column_{group_rank}", store), group_index, num_groups, timeout
    )
    os.environ["CODISTILL_WORLD_RANK"] = str(world_rank)
    os.environ["CODISTILL_WORLD_SIZE"] = str(world_size)
    os.environ["CODISTILL_NUM_GROUPS"] = str(num_groups)
    os.environ["RANK"] = str(group_rank)
    os.environ["WORLD_SIZE"] = str(group_size)
    _TOPOLOGY = GroupTopology(world_rank, world_size, num_groups, store, column, timeout)
    atexit.register(destroy_groups)
    return _TOPOLOGY


def destroy_groups(leave_timeout: float = 60.0) -> None:
    """Tear down the groups (registered at exit; safe to call twice).

    World rank 0 leaves last (`leave_in_order`): under a plain `env://` launch it hosts the store, and a rank that
    loses the store while its own teardown still talks to it aborts.
    """
    global _TOPOLOGY
    topology, _TOPOLOGY = _TOPOLOGY, None
    if dist.is_initialized():
        dist.destroy_process_group()
    if topology is None:
        return
    topology.column = None  # the last reference: the column's process group goes now, not at interpreter exit
    leave_in_order(topology.store, topology.world_rank, topology.world_size, topology._next_key("leaving"),
                   leave_timeout)


def leave_in_order(store: dist.Store, world_rank: int, world_size: int, key: str, leave_timeout: float = 60.0) -> None:
    """Let world rank 0, the host of an `env://` store, leave last.

    Call after this rank's process groups are gone. Every other rank says it is leaving; rank 0 waits until all of
    them have (at most `leave_timeout` seconds: a crashed rank never says). Rank 0 must keep the store alive until
    this returns, so that no rank loses it while still tearing down.
    """
    try:
        if world_rank != 0:
            store.add(key, 1)
            return
        deadline = time.monotonic() + leave_timeout
        while store.add(key, 0) < world_size - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception:  # noqa: BLE001 - the store may already be gone; leaving is all that is left to do
        pass
