"""Groups sharded with FSDP2: each peer sharded like the student, exchanged shard to shard.

With torch's `fully_shard` (FSDP2) inside a group, each rank holds 1/n of every parameter (a `DTensor` shard). A
peer is built the same way: the student's architecture on the meta device, `fully_shard` applied to the same
submodules over the same device mesh, then filled by the exchange. Rank r of every group then holds shard r of every
tensor, so the exchange moves local shards over the column (rank r to rank r of the other groups), with no gather
inside the group: (G-1) x P/n bytes per rank and exchange. In the peer's forward FSDP2 gathers one unit (layer) at a
time over the group and frees it after, so peer memory per rank is (G-1) x P/n plus one layer.

`CodistillTrainer` gets there through accelerate (`fsdp=True` with FSDP2, or an `accelerate launch` FSDP2 config):
accelerate shards each group's model over the group's ranks (a group is its processes' default process group) and
the trainer's peers are built from it here. This module also decides which sharding codistillation accepts.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict

import torch
from torch import nn
from transformers.utils import logging

from .adapters import is_peft_model

logger = logging.get_logger(__name__)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def requested_sharding(args) -> tuple[str | None, int | None]:
    """What sharding `args` ask accelerate for: ("deepspeed", None), ("fsdp", version) or (None, None). Both
    `TrainingArguments` (`fsdp`, `fsdp_config`, `deepspeed`) and an `accelerate launch` config (its environment)
    count. `fsdp_config` is read as `TrainingArguments` reads it: a dict or a JSON file, `version` or `fsdp_version`,
    2 unless said otherwise; accelerate's own default is FSDP1."""
    if args.deepspeed or _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed", None
    if args.fsdp:
        config = _fsdp_config(args)
        return "fsdp", int(config.get("version", config.get("fsdp_version", 2)))
    if _env_flag("ACCELERATE_USE_FSDP"):
        return "fsdp", int(os.environ.get("FSDP_VERSION", "1"))
    return None, None


def check_sharding_arguments(args, world_size: int) -> None:
    """Refuse, when codistillation's arguments are built, the sharding its groups cannot train with.

    FSDP2 (`fully_shard`) is supported: each group's model is sharded over the group's ranks, and so are its peers.
    DeepSpeed and FSDP1 hold flat shards the exchange does not know how to copy, so their peers would be wrong.
    """
    sharding, version = requested_sharding(args)
    supported = ('FSDP2 is the sharding codistillation supports: `fsdp=True` with `fsdp_config={"version": 2}` '
                 "(`--fsdp full_shard --fsdp_config fsdp.json`), or `accelerate launch` with `--use_fsdp "
                 "--fsdp_version 2`.")
    if sharding == "deepspeed":
        raise ValueError(
            "`deepspeed` is not supported with `codistill=True`: its partitioned parameters are not what the peer "
            f"exchange copies, so the peers would be wrong. Drop it, or train without `--codistill`. {supported}"
        )
    if sharding != "fsdp":
        return
    if version != 2:
        raise ValueError(f"FSDP version {version} is not supported with `codistill=True`. {supported}")
    if args.codistill_peer_store:
        raise ValueError(
            "`codistill_peer_store` publishes each group's model whole from its first process, which FSDP2 "
            "shards: drop `fsdp` for groups launched apart, or exchange over one launch (no peer store)."
        )
    group_size = world_size // max(1, args.num_groups)
    if world_size <= 1:
        raise ValueError(
            "`fsdp` shards each group's model over the group's processes, and this is one process: the models it "
            "trains (a list of models, or adapters of one base) are not sharded. Drop `fsdp`, or launch "
            f"2 x num_groups processes or more (`torchrun --nproc_per_node {2 * args.num_groups} ...`)."
        )
    if group_size == 1:
        raise ValueError(
            f"`fsdp` with {world_size} processes and num_groups={args.num_groups} gives each group one process, "
            "over which there is nothing to shard: drop `fsdp` (each group then trains alone), or launch "
            f"{2 * args.num_groups} processes or more."
        )
    if args.codistill_peer_dtype is not None:
        raise ValueError(
            f"`codistill_peer_dtype={args.codistill_peer_dtype!r}` is not supported with FSDP2 groups, whose peers "
            "are sharded like the model (1/n of each peer per rank already): leave `codistill_peer_dtype` unset."
        )
    if _offloads(args):
        raise ValueError(
            "FSDP2's CPU offload is not supported with `codistill=True` (the peers are not offloaded with the "
            'model): drop `cpu_offload` from `fsdp_config` (and "offload" from `fsdp`).'
        )


def _fsdp_config(args) -> dict:
    """`fsdp_config` as a dict, read from its JSON file when given one (before `TrainingArguments` reads it)."""
    config = args.fsdp_config or {}
    if isinstance(config, str):
        with open(config, encoding="utf-8") as f:
            config = json.load(f)
    return config


def _offloads(args) -> bool:
    config = _fsdp_config(args)
    offload = str(config.get("cpu_offload", config.get("fsdp_cpu_offload", False))).lower() in ("true", "1")
    return offload or "offload" in str(args.fsdp) or _env_flag("FSDP_OFFLOAD_PARAMS")


def check_sharded_trainer(trainer) -> None:
    """Once accelerate is set up: say when a requested FSDP is not applied, and refuse adapters with FSDP2."""
    if requested_sharding(trainer.args)[0] == "fsdp" and not trainer.is_fsdp_enabled:
        logger.warning(
            "`fsdp` was asked for, but accelerate applies FSDP on accelerators only, not on the CPU: each group "
            "trains with DDP, its model and peers whole on every rank."
        )
    if trainer.is_fsdp_enabled and is_peft_model(trainer.model):
        raise ValueError(
            "Adapters (PEFT) are not supported in FSDP2 groups yet: an adapter peer costs an adapter already, so "
            "drop `fsdp` (each rank then holds the frozen base once and G-1 peer adapters)."
        )


def is_fully_sharded(model: nn.Module) -> bool:
    """Whether `fully_shard` (FSDP2) was applied to `model`."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def shard_rank(model: nn.Module) -> int | None:
    """Which shard of an FSDP2 `model` this process holds (its rank on the model's mesh); None for a model held
    whole. Checkpoints keep what is sharded like the model (peers, initial parameters) in one file per shard."""
    if not is_fully_sharded(model):
        return None
    return next(model.parameters()).device_mesh.get_local_rank()


def sharding_units(model: nn.Module) -> list[list[str]]:
    """The names of the submodules `fully_shard` was applied to, one list per FSDP unit (several modules sharded as
    one, like accelerate's tied embeddings, head and final norm), innermost units first and the root last."""
    from torch.distributed.fsdp import FSDPModule

    units: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            # Modules sharded together share one FSDP state (torch has no public accessor for it).
            units.setdefault(id(module._get_fsdp_state()), []).append(name)
    return sorted(units.values(), key=lambda names: -min(len(name.split(".")) if name else 0 for name in names))


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
    same mesh in the same units, its storage allocated (left for the exchange to fill)."""
    from torch.distributed.fsdp import fully_shard

    if dtype is not None:
        raise ValueError("`codistill_peer_dtype` is not supported for FSDP2-sharded groups yet: leave it unset.")
    device = next(iter(local_tensors(model).values())).device
    mesh = next(model.parameters()).device_mesh
    with torch.device("meta"):
        peer = type(model)(model.config)
    for names in sharding_units(model):  # innermost first, as they were sharded; the root last
        modules = [peer.get_submodule(name) for name in names]
        # Resharded after every forward, the root too: between exchanges a rank holds only its shards of the peer.
        fully_shard(modules if len(modules) > 1 else modules[0], mesh=mesh, reshard_after_forward=True)
    peer.to_empty(device=device)
    if hasattr(peer, "tie_weights"):
        peer.tie_weights()  # allocating storage module by module unties shared weights (accelerate re-ties too)
    peer.eval()
    peer.requires_grad_(False)
    return peer
