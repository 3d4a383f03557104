"""What codistillation logs per training step: running sums of the step metrics and the distance from the initial
parameters (Sodhani et al.'s diagnostic of over-regularisation)."""

from __future__ import annotations

import math
import os

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import TrainerCallback

from .checkpointing import INIT_NAME, rank_file, save_file_atomically
from .sharding import shard_rank


class MetricSums:
    """Per metric, the sum of the 0-d tensors recorded since the last log and their count.

    Constant memory however long logging waits (`logging_strategy="no"` never asks), and no host sync until it does.
    """

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.sums[name] = value if name not in self.sums else self.sums[name] + value
        self.counts[name] = self.counts.get(name, 0) + 1

    def pop(self) -> list[tuple[str, torch.Tensor, int]]:
        """(name, sum, count) of every metric, and start afresh."""
        popped = [(name, total, self.counts[name]) for name, total in self.sums.items()]
        self.sums, self.counts = {}, {}
        return popped


class InitialParameters:
    """A model's trainable parameters at the start of training (fp32, on the CPU), kept to log how far training has
    moved them: codistilled models that stay close to their initialisation are over-regularised."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    @classmethod
    def of(cls, model: nn.Module) -> InitialParameters:
        """`model`'s trainable parameters now: this process's shards of an FSDP2 model (`sharding.shard_rank`)."""
        return cls({name: _local(p).detach().float().cpu().clone()
                    for name, p in model.named_parameters() if p.requires_grad})

    @classmethod
    def load(cls, path: str) -> InitialParameters | None:
        """From a checkpoint's file, or None when the checkpoint has none."""
        return cls(load_file(path)) if os.path.isfile(path) else None

    def save(self, path: str) -> None:
        save_file_atomically(self.tensors, path)

    @torch.no_grad()
    def distance(self, model: nn.Module) -> float:
        """L2 distance between `model`'s trainable parameters and these; for an FSDP2 model summed over its shards
        (collective over the group: every rank of it calls this)."""
        squared = torch.zeros((), dtype=torch.float64)
        for name, param in model.named_parameters():
            if name in self.tensors:
                squared += (_local(param).detach().float().cpu() - self.tensors[name]).pow(2).sum().double()
        if shard_rank(model) is not None:
            mesh = next(model.parameters()).device_mesh
            total = squared.to(next(model.parameters()).device)
            torch.distributed.all_reduce(total, group=mesh.get_group())
            squared = total.cpu()
        return math.sqrt(squared.item())


def _local(param: torch.Tensor) -> torch.Tensor:
    """A parameter, or this process's shard of it (an FSDP2 `DTensor`)."""
    to_local = getattr(param, "to_local", None)
    return to_local() if to_local is not None else param


class ParameterDistanceCallback(TrainerCallback):
    """Without codistillation: keeps the initial parameters (in every checkpoint too) for
    `param_distance_from_init`, so that an all-reduce baseline logs the same diagnostic."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        checkpoint = (self.trainer.resume_checkpoints() or {}).get(0)
        name = rank_file(INIT_NAME, shard_rank(self.trainer.model))
        loaded = InitialParameters.load(os.path.join(checkpoint, name)) if checkpoint else None
        self.trainer.initial_parameters = loaded or InitialParameters.of(self.trainer.model)

    def on_save(self, args, state, control, **kwargs):
        rank = shard_rank(self.trainer.model)
        if args.should_save or rank is not None:  # FSDP2: every rank writes its shards
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(checkpoint, exist_ok=True)
            # After Trainer's own files (no completion marker without codistillation): all or nothing.
            self.trainer.initial_parameters.save(os.path.join(checkpoint, rank_file(INIT_NAME, rank)))
