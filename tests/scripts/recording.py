"""What the launched test scripts record: checksums of a model's parameters and, per optimizer step, of a group's
model and its peers, compared across ranks, runs and resumes."""

import torch
from transformers import TrainerCallback

from hf_codistill.exchange import exchanged_tensors


def whole(tensor):
    """A parameter, or an FSDP2 shard gathered whole (collective over the group)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def checksum(tensors):
    flat = torch.cat([whole(t).detach().double().reshape(-1).cpu() for t in tensors])
    return float((flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64).remainder(97)).sum())


class Recorder(TrainerCallback):
    """Per optimizer step: this model's checksum and, under codistillation, each peer copy's."""

    def __init__(self, trainer):
        self.trainer, self.steps, self.start = trainer, [], None

    def on_train_begin(self, args, state, control, **kwargs):
        # Runs after CodistillTrainer's own callback, i.e. after the first exchange (and a shared initialisation).
        self.start = checksum(self.trainer.model.parameters())

    def on_step_end(self, args, state, control, **kwargs):
        record = {"step": state.global_step, "own": checksum(self.trainer.model.parameters()),
                  "own_exchanged": checksum(exchanged_tensors(self.trainer.model).values())}
        peer_dtype = getattr(args, "peer_torch_dtype", None)
        if peer_dtype is not None:  # what the peers should hold of this model after an exchange
            record["own_in_peer_dtype"] = checksum(p.to(peer_dtype) for p in self.trainer.model.parameters())
        peers = getattr(self.trainer, "peer_copies", None)
        if peers is not None:
            record["peers"] = {str(g): checksum(p.parameters()) for g, p in peers.peers.items()}
            record["live_peers"] = sorted(int(g) for g in peers.peers_of(self.trainer.group_index))
            record["peer_dtypes"] = sorted({str(t.dtype) for p in peers.models() for t in p.parameters()})
        self.steps.append(record)
