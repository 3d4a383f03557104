"""Peers that cost an adapter, not a model: PEFT models whose peers are extra adapters on the same frozen base.

Groups that fine-tune adapters (LoRA and the like, with `peft`) of one frozen base model differ only in their
adapters. So a group holds each peer as one more adapter of its own `PeftModel` (`codistill_peer_<j>`, frozen) and
runs the peer by running the shared base with that adapter active (peft's per-example `adapter_names`, no gradient),
instead of a deep copy of the whole model; the exchange moves the adapters' tensors only. Peer memory per rank is
then (G-1) x the adapter, and bytes per exchange the adapter's bytes. The groups must share the base weights exactly
(`base_fingerprint`, compared across groups when training starts).

`peft` is optional: nothing here imports it unless a model is a `PeftModel`.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from collections import OrderedDict
from contextlib import contextmanager

import torch
from torch import nn

PEER_ADAPTER = "codistill_peer_{}"
EVALUATION_PEER_ADAPTER = "codistill_eval_peer_{}"  # the current peers an evaluation fetches, removed after it


def with_adapters(model: nn.Module, peft_config) -> nn.Module:
    """`model` with trainable adapters of `peft_config` on it (`peft.get_peft_model`); a list of models, each."""
    if isinstance(model, (list, tuple)):
        return [with_adapters(each, peft_config) for each in model]
    if model is None:
        raise ValueError("`peft_config` adds adapters to `model`: pass the base model as `model` (not `model_init`).")
    try:
        from peft import get_peft_model
    except ImportError as error:
        raise ImportError("`peft_config` needs the `peft` package: `pip install peft`.") from error
    if is_peft_model(model):
        raise ValueError("`model` already carries adapters: pass it without `peft_config`, or pass its base model.")
    return get_peft_model(model, peft_config)


def is_peft_model(model: nn.Module) -> bool:
    peft = sys.modules.get("peft")  # a model cannot be a `PeftModel` unless peft was imported
    return peft is not None and isinstance(model, peft.PeftModel)


def adapted_base_name(model: nn.Module) -> str | None:
    """Where the base of a PEFT model (or of a student adapter) came from, as peft records it; None otherwise."""
    if isinstance(model, OneAdapter):
        return model.shared_model.peft_config[model.adapter].base_model_name_or_path
    return model.peft_config[model.active_adapter].base_model_name_or_path if is_peft_model(model) else None


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers model under a `PeftModel`'s (or a student adapter's) adapters; `model` itself otherwise.
    Its class and `forward` say what the model is (a causal LM?) and which inputs it takes, as Trainer reads them."""
    if isinstance(model, OneAdapter):
        model = model.shared_model
    return model.get_base_model() if is_peft_model(model) else model


def adapter_tensors(model: nn.Module, adapter: str) -> OrderedDict[str, torch.Tensor]:
    """The live tensors of adapter `adapter` of a `PeftModel` (LoRA factors, `modules_to_save` copies), keyed by
    their names without the adapter's, so that two adapters of one configuration list the same keys in one order."""
    marker = f".{adapter}."
    return OrderedDict((name.replace(marker, ".", 1), parameter) for name, parameter in model.named_parameters()
                       if marker in name)


class OneAdapter(nn.Module):
    """One adapter of a `PeftModel` whose base other adapters share (`shared_model`): a peer or a student. What
    defines it is its adapter's tensors, which the exchange moves and checkpoints hold."""

    adapter: str

    def tensors(self) -> OrderedDict[str, torch.Tensor]:
        return adapter_tensors(self.shared_model, self.adapter)

    def get_output_embeddings(self):
        return self.shared_model.get_output_embeddings()


class AdapterPeer(OneAdapter):
    """A peer held as an adapter of the student's own `PeftModel`.

    Not a submodule of anything: the base weights are the student's. Its forward runs the shared model in eval mode
    with the peer's adapter on every example, then puts the model back in the mode it was in.
    """

    def __init__(self, model: nn.Module, adapter: str):
        super().__init__()
        object.__setattr__(self, "shared_model", model)  # not registered: the peer owns no base weights
        self.adapter = adapter
        self.train(False)

    def forward(self, **inputs):
        model = self.shared_model
        batch = next(value.shape[0] for value in inputs.values() if isinstance(value, torch.Tensor))
        training = model.training
        model.eval()  # peft runs per-example adapters only in eval mode; it also turns dropout off
        try:
            return model(**inputs, adapter_names=[self.adapter] * batch)
        finally:
            if training:
                model.train()

    def parameters(self, recurse: bool = True):
        return iter(self.tensors().values())

    def to(self, *args, **kwargs):
        """Moves or casts the peer's adapter only (the base is the student's)."""
        with torch.no_grad():
            for tensor in self.tensors().values():
                tensor.data = tensor.data.to(*args, **kwargs)
        return self


def add_adapter_peer(model: nn.Module, group: int, dtype: torch.dtype | None = None,
                     name_format: str = PEER_ADAPTER, like: str | None = None) -> AdapterPeer:
    """Add group `group`'s peer to `model` as a frozen adapter of the configuration of adapter `like` (by default
    the active one: the student's), in `dtype` if given, named `name_format.format(group)`."""
    name = name_format.format(group)
    active = model.active_adapter
    model.add_adapter(name, model.peft_config[like or active])
    model.set_adapter(active)  # keeps the student's adapter the active, trainable one
    peer = AdapterPeer(model, name)
    for tensor in peer.tensors().values():
        tensor.requires_grad_(False)
    return peer.to(dtype) if dtype is not None else peer


def remove_adapter_peer(peer: AdapterPeer) -> None:
    peer.shared_model.delete_adapter(peer.adapter)


def own_adapter_tensors(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    return adapter_tensors(model, model.active_adapter)


def base_tensors(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The live tensors of a `PeftModel` outside every adapter: the frozen base (parameters, then buffers)."""
    markers = [f".{adapter}." for adapter in model.peft_config]
    tensors = OrderedDict(model.named_parameters())
    tensors.update(model.named_buffers())
    return OrderedDict((name, tensor) for name, tensor in tensors.items()
                       if not any(marker in name for marker in markers))


@torch.no_grad()
def base_fingerprint(model: nn.Module) -> int:
    """A 63-bit digest of the base weights (`base_tensors`): equal across groups that share them.

    Per tensor, its sum, sum of squares and first and last values, computed where the tensor lives, so that a large
    base is not copied to the host.
    """
    digest = hashlib.sha256()
    for name, tensor in base_tensors(model).items():
        flat = tensor.detach().reshape(-1)
        if flat.numel() == 0:
            continue
        values = flat.to(torch.float64)
        stats = torch.stack([values.sum(), (values * values).sum(), values[0], values[-1]]).cpu().tolist()
        digest.update(name.encode() + struct.pack("<4d", *stats))
    return int.from_bytes(digest.digest()[:8], "big") >> 1


@contextmanager
def saving_own_adapter_only(model: nn.Module):
    """While it is open, `model.save_pretrained` (which Trainer calls) writes the student's adapter only, not the
    peers' (peft saves every adapter it holds by default)."""
    if not is_peft_model(model) or len(model.peft_config) == 1:
        yield
        return
    held = model.peft_config
    model.peft_config = {name: config for name, config in held.items() if name == model.active_adapter}
    try:
        yield
    finally:
        model.peft_config = held
