"""8-bit peers: stale peer copies held, and exchanged, as int8 weights with one scale per row.

Peers only run forward passes, so they can be held in a precision that gradients could not survive. With
`codistill_peer_dtype="int8"` every weight matrix of a peer (every floating-point parameter of two dimensions or more:
linear, convolution and embedding weights) is stored as int8 with a float32 scale per row (symmetric, the row's
largest magnitude maps to 127), a quarter of float32's bytes; biases and norms, a small share, keep their precision.
A peer's weight is dequantised when its layer reads it (a `torch.nn.utils.parametrize` parametrization), so a forward
holds one layer's weight in full precision at a time. Weights tied to each other (GPT-2's output head and token
embeddings) stay one int8 tensor and one scale.

The exchange sends a peer's wire format: the int8 rows and their scales, which the sending group computes from its
model (`as_sent`). Peer copies that share a layout share a wire format, so every existing exchange path (sharded,
bounded, in the background, checkpoints) moves them unchanged.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn.utils import parametrize

INT8 = torch.int8
SCALE_SUFFIX = "#scale"  # a row scale's key in the wire format, after its weight's name


class RowDequantize(nn.Module):
    """The parametrization of an int8 weight: the int8 rows times their scale, in the weight's own dtype."""

    def __init__(self, rows: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.register_buffer("scale", torch.ones(rows, dtype=torch.float32, device=device))
        self.dtype = dtype

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        weight = stored.to(torch.float32)
        weight.mul_(self.scale.view((-1,) + (1,) * (stored.dim() - 1)))  # in place: one float copy of the layer
        return weight.to(self.dtype)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (the first dimension): (int8 tensor of `weight`'s shape, float32 scale per row)."""
    rows = weight.detach().reshape(weight.shape[0], -1).to(torch.float32)
    scale = rows.abs().amax(dim=1) / 127.0
    quantized = torch.where(scale[:, None] > 0, rows / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None],
                            torch.zeros_like(rows))
    return quantized.round_().clamp_(-127, 127).to(INT8).reshape(weight.shape), scale


def quantizes(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() and tensor.dim() >= 2


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "_codistill_int8", False)


@torch.no_grad()
def quantize_peer(peer: nn.Module) -> nn.Module:
    """`peer` (a frozen copy, changed in place) with its weight matrices held in int8 (see the module docstring)."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in peer.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if quantizes(parameter):
                owners.setdefault(id(parameter), []).append((module, name))
    for modules in owners.values():
        first, name = modules[0]
        weight = getattr(first, name)
        quantized, scale = quantize_rows(weight)
        dequantize = RowDequantize(weight.shape[0], weight.dtype, weight.device)
        dequantize.scale.copy_(scale)
        stored = nn.Parameter(quantized, requires_grad=False)
        for module, tensor_name in modules:  # tied weights: one stored tensor, one parametrization
            parametrize.register_parametrization(module, tensor_name, dequantize, unsafe=True)
            module.parametrizations[tensor_name].original = stored
    peer._codistill_int8 = True
    return peer


def quantized_tensors(peer: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """A quantized peer's wire format, keyed like its model's `exchanged_tensors`: parameters then buffers, each
    shared tensor once, an int8 weight under its model name followed by its row scale (`<name>#scale`)."""
    tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
    seen: set[int] = set()
    for module_name, module in peer.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if parametrize.is_parametrized(module):
            for tensor_name, parametrizations in module.parametrizations.items():
                stored = parametrizations.original
                if id(stored) not in seen:
                    seen.add(id(stored))
                    tensors[f"{prefix}{tensor_name}"] = stored
                    tensors[f"{prefix}{tensor_name}{SCALE_SUFFIX}"] = parametrizations[0].scale
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) not in seen:
                seen.add(id(parameter))
                tensors[f"{prefix}{name}"] = parameter
    for name, buffer in peer.named_buffers():
        if ".parametrizations." not in name and name not in tensors:
            tensors[name] = buffer
    return tensors


@torch.no_grad()
def as_sent(own: OrderedDict[str, torch.Tensor],
            wire: OrderedDict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """This model's tensors (`own`, by name) in the peers' wire format (`wire`, a peer's `exchanged_tensors`): int8
    rows and their scales where the peer holds int8, the peer's precision elsewhere; in `wire`'s order."""
    sent: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, target in wire.items():
        if name.endswith(SCALE_SUFFIX):
            continue  # made with its weight, just before
        if target.dtype == INT8 and own[name].is_floating_point():
            sent[name], sent[name + SCALE_SUFFIX] = quantize_rows(own[name])
        else:
            sent[name] = own[name].detach().to(target.dtype)
    return sent
