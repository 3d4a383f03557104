"""The peer set of G models trained in one process (the one-process driver): copies refreshed by copying.

It answers the peer-set interface documented in `hf_codistill.exchange`, without any communication.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import AdapterPeer, base_tensors, is_peft_model
from .exchange import exchanged_tensors, frozen_copy, load_peers_state, new_peer, peers_state, ring_peers
from .quantization import as_sent
from .shared_base import are_adapter_students, copy_adapter


class LocalPeers:
    """The peer set of G models trained in one process: frozen copies (in `dtype` if given) of every model, refreshed
    by copying, or (`live`, k = 1) the models themselves, which need no copies and keep their own precision.

    Students that are adapters of one shared base (`hf_codistill.shared_base`) have their copies as more adapters of
    it, and as live peers their own adapters run in eval mode (`AdapterPeer`), which leaves the training student's
    adapter the active one."""

    restores_from_checkpoint = True
    state_rank = None  # one file per checkpoint

    def __init__(self, models: dict[int, nn.Module], live: bool, dtype: torch.dtype | None = None,
                 num_peers: int | None = None):
        self.models = models
        self.num_peers = num_peers
        self.live = live
        self.dtype = None if live else dtype
        self.on_one_base = are_adapter_students(list(models.values()))
        if self.on_one_base:
            self.copies = ([AdapterPeer(models[group].shared_model, models[group].adapter) for group in sorted(models)]
                           if live else [new_peer(models[group], group, dtype) for group in sorted(models)])
        else:
            self.copies = None if live else [frozen_copy(models[group], dtype) for group in sorted(models)]
        self.last_exchange_step: int | None = None
        self.num_exchanges = 0

    def model(self, group: int) -> nn.Module:
        return self.copies[group] if self.copies is not None else self.models[group]

    def peers_of(self, group: int) -> dict[int, nn.Module]:
        return {peer: self.model(peer) for peer in ring_peers(group, len(self.models), self.num_peers)}

    def check_compatible(self) -> None:
        pass  # peers in one process may differ in architecture; their outputs are checked by the loss

    def share_initialisation(self, base_only: bool = False) -> None:
        if self.on_one_base:  # one base already: start every student's adapter from student 0's
            if not base_only:
                for model in self.models.values():
                    copy_adapter(self.models[0], model)
            return
        if base_only:  # a resumed run: checkpoints hold each model but not a PEFT model's base
            if is_peft_model(self.models[0]):
                reference = base_tensors(self.models[0])
                with torch.no_grad():
                    for model in self.models.values():
                        for name, tensor in base_tensors(model).items():
                            tensor.copy_(reference[name])
            return
        reference = self.models[0].state_dict()
        shapes = {name: tuple(tensor.shape) for name, tensor in reference.items()}
        for group, model in self.models.items():
            if {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()} != shapes:
                raise ValueError(
                    f"`codistill_shared_init` starts every model from model 0's weights, but model {group} has "
                    "another architecture; set `codistill_shared_init=False` for peers that differ in architecture or "
                    "size."
                )
            if group != 0:
                with torch.no_grad():
                    model.load_state_dict(reference)

    @torch.no_grad()
    def refresh(self, step: int, background: bool = False) -> None:
        if not self.live:  # live peers are the models (or the students' adapters) themselves: nothing to copy
            for group, model in self.models.items():
                targets = exchanged_tensors(self.copies[group])
                for name, value in as_sent(exchanged_tensors(model), targets).items():
                    targets[name].copy_(value)
        self.last_exchange_step = step
        self.num_exchanges += 1

    def finish(self) -> None:
        pass  # copies are refreshed in place: nothing is ever in flight

    def counters(self) -> dict[str, int]:
        return {"peer_exchanges": self.num_exchanges}

    def checkpoint_state(self) -> dict[str, int | None]:
        return {"last_exchange_step": self.last_exchange_step, "num_exchanges": self.num_exchanges,
                "exchange_bytes_sent": 0, "exchange_bytes_received": 0}

    def load_checkpoint_state(self, state: dict) -> None:
        self.last_exchange_step = state["last_exchange_step"]
        self.num_exchanges = state["num_exchanges"]

    def state_dict(self, group: int) -> dict[str, torch.Tensor]:
        """Group `group`'s peers as a launched group stores them (`group_<j>.<name>`, j != group)."""
        return peers_state(self.peers_of(group))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load the copies a checkpoint holds (one model's checkpoint holds all copies but its own)."""
        if not self.live:
            load_peers_state(dict(enumerate(self.copies)), state, strict=False)
