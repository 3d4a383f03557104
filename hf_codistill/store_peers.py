"""The peer set of a group launched on its own: peers read from a peer store (`hf_codistill.peer_store`).

Groups launched apart never wait for each other. Every k steps the group's rank 0 publishes its model to the store
and reads the newest intact version of each peer; the rest of the group receives those bytes from it over the
group's own process group, so the store is read once per group. A peer is *live* while its version is at most
`max_age_steps` steps behind this group and `max_age_seconds` old (each bound optional); the distillation term and
the evaluation's ensemble use the live peers only, and a peer that publishes again comes back. A peer's version
carries its config, so a peer of another size or architecture is built from it, as long as it predicts over the same
outputs. Peers are not kept in checkpoints: a resumed group reads the peers' newest versions instead.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch import nn
from transformers.utils import logging

from .adapters import is_peft_model
from .exchange import frozen_copy, ring_peers
from .peer_store import (
    INIT_VERSION,
    LoadedVersion,
    PeerStore,
    PublishedVersion,
    build_peer,
    describe,
    load_into,
    output_space,
    redacted,
)

logger = logging.get_logger(__name__)


def _group_world() -> tuple[int, int]:
    """(rank, size) of this process in its launch's world (the group), (0, 1) when not launched."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class StorePeers:
    """Peers read from a `PeerStore`; implements the peer-set interface documented in `hf_codistill.exchange`."""

    # A resumed group reads its peers' newest versions from the store instead of restoring them from a checkpoint.
    restores_from_checkpoint = False
    state_rank = None

    def __init__(self, model: nn.Module, store: PeerStore, num_groups: int, num_peers: int | None = None,
                 dtype: torch.dtype | None = None, max_age_steps: int | None = None,
                 max_age_seconds: float | None = None, init_timeout: float = 300.0, fresh: bool = True):
        self.model = model
        self.store = store
        self.group = store.group
        self.dtype = dtype
        self.max_age_steps = max_age_steps
        self.max_age_seconds = max_age_seconds
        self.init_timeout = init_timeout
        self.peer_groups = ring_peers(self.group, num_groups, num_peers)
        self.peers: dict[int, nn.Module] = {}
        self.versions: dict[int, PublishedVersion] = {}
        self.live: list[int] = []
        self.last_exchange_step: int | None = None
        self.num_exchanges = 0
        self.publish_failures = 0
        self.rank, self.world_size = _group_world()
        if fresh and self.rank == 0:
            try:
                self.store.clear()  # an earlier run's versions must not reach this run's peers
            except OSError as error:
                logger.warning(f"Could not clear this group's earlier versions from {redacted(store.url)} "
                               f"({type(error).__name__}); the next publication supersedes them.")

    @classmethod
    def from_arguments(cls, model: nn.Module, args, fresh: bool) -> StorePeers:
        """The peer set that `CodistillTrainingArguments` describe (`codistill_peer_store` and its options)."""
        if not hasattr(getattr(model, "config", None), "to_dict"):
            raise ValueError(
                "`codistill_peer_store` publishes each model with its config, so that peers can rebuild it: train a "
                f"`transformers` model (a `PreTrainedModel`), not a {type(model).__name__}."
            )
        if is_peft_model(model):
            raise ValueError(
                "`codistill_peer_store` publishes whole models; adapters (PEFT) through a store are not supported "
                "yet. Launch the groups together (collective exchange of adapters), or train without adapters."
            )
        store = PeerStore(args.codistill_peer_store, args.group_index, keep=args.codistill_peer_store_keep)
        return cls(model, store, args.num_groups, args.codistill_num_peers, args.peer_torch_dtype,
                   args.codistill_peer_max_age_steps, args.codistill_peer_max_age_seconds,
                   args.codistill_peer_wait_seconds, fresh=fresh)

    def models(self) -> list[nn.Module]:
        """The live peers, in group order."""
        return [self.peers[group] for group in self.live]

    # ---- The peer-set interface -------------------------------------------------------------------------------

    def peers_of(self, group: int) -> dict[int, nn.Module]:
        return {peer: self.peers[peer] for peer in self.live}

    def check_compatible(self) -> None:
        pass  # each version is checked when it is read: its outputs must match this model's

    @torch.no_grad()
    def share_initialisation(self, base_only: bool = False) -> None:
        """Group 0 publishes its initial weights; every other group waits for them (at most `init_timeout` s). A
        resumed group (`base_only`) has its weights in its checkpoint."""
        if base_only:
            return
        if self.group == 0:
            if self.rank == 0:
                self.store.publish(self.model, 0, name=INIT_VERSION)
            return
        loaded = self.store.wait_for(0, INIT_VERSION, self.init_timeout) if self.rank == 0 else None
        loaded = self._share(loaded)
        if loaded is None:
            raise RuntimeError(
                f"Group 0 published no initial weights to {redacted(self.store.url)} within "
                f"{self.init_timeout:.0f} s (`codistill_peer_wait_seconds`), which a shared initialisation needs "
                "(`codistill_shared_init`, on by default for pretrained models): launch group 0 too, wait longer, or "
                "set `codistill_shared_init=False`."
            )
        load_into(self.model, loaded.tensors(), 0)

    @torch.no_grad()
    def refresh(self, step: int, background: bool = False) -> None:
        """Publish this group's model, then read each peer's newest version and decide which peers are live."""
        if self.rank == 0:
            self._publish(step)
        for group in self.peer_groups:
            current = self.versions.get(group)
            loaded = None
            if self.rank == 0:
                loaded = self.store.read_newest(group, newer_than=current.step if current else None)
            loaded = self._share(loaded)
            if loaded is not None:
                self._load(group, loaded)
        live = self._share(self._live_peers(step) if self.rank == 0 else None)
        self._say_what_changed(live, step)
        self.live = live
        self.last_exchange_step = step
        self.num_exchanges += 1

    def _publish(self, step: int) -> None:
        """Publish this group's model; a store that fails for now costs the peers a version, never this training."""
        try:
            self.store.publish(self.model, step, self.dtype)
        except OSError as error:
            self.publish_failures += 1
            logger.warning(f"Step {step}: could not publish to {redacted(self.store.url)} ({type(error).__name__}); "
                           "training goes on and publishes again in `codistill_sync_every` steps.")

    def finish(self) -> None:
        pass  # reads and writes are done when `refresh` returns

    def state_dict(self, group: int) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def counters(self) -> dict[str, float]:
        """Bytes moved through the store and, per peer, the step and age (seconds) of the version held."""
        now = time.time()
        counters = {"peer_exchanges": self.num_exchanges, "peer_store_bytes_written": self.store.bytes_written,
                    "peer_store_bytes_read": self.store.bytes_read, "peers_live": len(self.live),
                    "peer_store_publish_failures": self.publish_failures}
        for group, version in sorted(self.versions.items()):
            counters[f"peer_{group}_step"] = version.step
            counters[f"peer_{group}_age_seconds"] = round(now - version.time, 3)
        return counters

    def checkpoint_state(self) -> dict:
        return {"last_exchange_step": self.last_exchange_step, "num_exchanges": self.num_exchanges,
                "store_bytes_written": self.store.bytes_written, "store_bytes_read": self.store.bytes_read}

    def load_checkpoint_state(self, state: dict) -> None:
        self.last_exchange_step = state.get("last_exchange_step")
        self.num_exchanges = state.get("num_exchanges", 0)
        self.store.bytes_written = state.get("store_bytes_written", 0)
        self.store.bytes_read = state.get("store_bytes_read", 0)

    # ---- Inside ---------------------------------------------------------------------------------------------------

    def _share(self, payload):
        """Rank 0's `payload` on every rank of the group (weights as one byte tensor, the rest as an object)."""
        if self.world_size == 1:
            return payload
        is_version = isinstance(payload, LoadedVersion)
        header = [(asdict(payload.version), payload.config) if is_version else ("object", payload)]
        dist.broadcast_object_list(header, src=0)
        kind, rest = header[0]
        if kind == "object":
            return rest
        version = PublishedVersion(**kind)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        if self.rank == 0:
            data = torch.frombuffer(bytearray(payload.weights), dtype=torch.uint8).to(device)
        else:
            data = torch.empty(version.num_bytes, dtype=torch.uint8, device=device)
        dist.broadcast(data, src=0)
        weights = payload.weights if self.rank == 0 else data.cpu().numpy().tobytes()
        return LoadedVersion(version, rest, weights)

    def _load(self, group: int, loaded: LoadedVersion) -> None:
        own, theirs = output_space(self.model), loaded.version.outputs
        if own != theirs:
            own_config = {**self.model.config.to_dict(), "architectures": [type(self.model).__name__]}
            raise ValueError(
                f"Group {group} publishes {describe(loaded.config, theirs)} to {redacted(self.store.url)}, but group "
                f"{self.group} trains {describe(own_config, own)}: codistilled peers must predict over the same "
                "outputs (the same vocabulary or labels)."
            )
        peer = self.peers.get(group)
        if peer is None or self._config_of(peer) != loaded.config:
            peer = self._new_peer(loaded)
        load_into(peer, loaded.tensors(), group)
        self.peers[group] = peer
        self.versions[group] = loaded.version

    def _new_peer(self, loaded: LoadedVersion) -> nn.Module:
        """A frozen model for a peer: a copy of this group's model when the peer's config is the same (no fresh
        initialisation), else built from the peer's config."""
        same = self._config_of(self.model) == loaded.config
        peer = frozen_copy(self.model, self.dtype) if same else build_peer(loaded)
        device = next(self.model.parameters()).device
        return peer.to(device=device, dtype=self.dtype) if self.dtype is not None else peer.to(device)

    @staticmethod
    def _config_of(model: nn.Module) -> dict:
        # As `PeerStore.publish` writes it (through JSON, so that tuples and lists compare alike).
        config = {**model.config.to_dict(), "architectures": [type(model).__name__]}
        return json.loads(json.dumps(config, sort_keys=True))

    def _live_peers(self, step: int) -> list[int]:
        now = time.time()
        live = []
        for group in self.peer_groups:
            version = self.versions.get(group)
            if version is None:
                continue
            if self.max_age_steps is not None and step - version.step > self.max_age_steps:
                continue
            if self.max_age_seconds is not None and now - version.time > self.max_age_seconds:
                continue
            live.append(group)
        return live

    def _say_what_changed(self, live: list[int], step: int) -> None:
        if self.rank != 0:
            return
        for group in sorted(set(self.live) - set(live)):
            version = self.versions[group]
            logger.warning(
                f"Step {step}: peer group {group} is stale (its newest version is step {version.step}, "
                f"{time.time() - version.time:.0f} s old); it leaves the distillation term until it publishes again."
            )
        for group in sorted(set(live) - set(self.live)):
            logger.info(f"Step {step}: peer group {group} is live (version of step {self.versions[group].step}).")
