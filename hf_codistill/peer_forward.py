"""The peers' forward pass for the distillation term: only what the term needs.

The distillation term compares predictions at the positions that carry a label (masked tokens for MLM, next tokens
for causal LMs, every example for classification). For language models most of a forward pass past the encoder is
the vocabulary projection, so the peer runs its output head (`get_output_embeddings()`) on the labelled positions
only: with 15% masking, an MLM peer projects 15% of the tokens. (Causal LMs label nearly every position; for them
`CodistillTrainer` runs the peer whole and masks the few unlabelled positions in the loss instead, a slice of the
batch at a time so that its whole logits never exist at once, the `mse` loss excepted.) With
`codistill_position_fraction` < 1, the head of either kind of LM runs at a random sample of positions of a fixed
count, which, unlike gathering the labelled positions, needs no host sync.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .adapters import base_model_of
from .losses import label_mask, labels_per_token, select_labelled_positions

_CAUSAL_LM_CLASSES = frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def is_causal_lm(model: nn.Module) -> bool:
    """Whether `model` (unwrapped; a PEFT model's base) is a causal LM: its position t is scored against label t+1.
    Read from its class and the classes it derives from: `fully_shard` renames the class (`FSDPGPT2LMHeadModel`)."""
    return any(cls.__name__ in _CAUSAL_LM_CLASSES for cls in type(base_model_of(model)).__mro__)


def in_precision(inputs: dict, dtype: torch.dtype | None) -> dict:
    """`inputs` with its floating-point tensors (pixel values, input embeddings) in the peers' precision; token ids
    and masks unchanged. A peer held in bfloat16 cannot take float32 pixels outside autocast."""
    if dtype is None or not dtype.is_floating_point:  # int8 peers compute in their model's own precision
        return inputs
    return {
        key: value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
        for key, value in inputs.items()
    }


def logits_of(outputs, with_loss: bool = False) -> torch.Tensor:
    """A model's logits from its output, a `ModelOutput` or a tuple (whose first entry is the loss `with_loss`)."""
    if isinstance(outputs, dict):
        if "logits" not in outputs:
            raise ValueError(f"Codistillation compares the models' `logits`, but this model's output has only "
                             f"{sorted(outputs.keys())}: use a model with a classification or language-model head.")
        return outputs["logits"]
    return outputs[1] if with_loss else outputs[0]


def peer_logits_for_term(peer: nn.Module, inputs: dict, student_logits: torch.Tensor, labels: torch.Tensor | None,
                         causal_lm: bool, positions: torch.Tensor | None,
                         context: Callable[[], AbstractContextManager]):
    """The peer's logits as `losses.distillation_to_peers` scores them against `student_logits`, computing only what
    the term needs: at the sampled `positions` (`losses.sample_positions`) when given; for a causal LM scored whole, a
    slice of the batch at a time as the loss asks for it; otherwise at the labelled positions. `context()` wraps the
    peer's forward (no_grad, autocast, eval mode)."""
    if positions is None and causal_lm and labels_per_token(student_logits, labels):  # scored whole
        return peer_logits_in_slices(peer, inputs, labels.shape, student_logits.shape[-1], context)
    with context():
        if positions is not None:
            return peer_logits_at_positions(peer, inputs, positions, labels.shape)
        return peer_logits_at_labels(peer, inputs, labels, shift_labels=causal_lm)


# Peer logits made at once when a causal LM is scored whole, in elements (256 MB in bf16): GPT-2's 16 x 512 tokens
# x 50,257 classes come in 4 slices of the batch, each a forward pass still large enough to keep a GPU busy.
PEER_LOGITS_PER_SLICE = 1 << 27


def peer_logits_in_slices(peer: nn.Module, inputs: dict, batch_shape: tuple[int, int], num_classes: int,
                          context: Callable[[], AbstractContextManager]) -> Iterator[torch.Tensor]:
    """The peer's whole logits as (slice rows x positions, classes) blocks, one slice of the batch at a time.

    Run lazily, as the loss scores each block (`losses._SoftTargetLoss`), so that at most one slice's logits exist
    per peer (the peers advance together; the `mse` loss joins the slices): a GPT-2 batch of 16 x 512 tokens has 823
    MB of them in bf16. A slice holds at most `PEER_LOGITS_PER_SLICE` logits, but one sequence at least. Inputs of
    two dimensions or more whose first is the batch are sliced; others are passed whole. `context()` wraps each
    slice's forward (no_grad, autocast).
    """
    batch, positions = batch_shape
    most_rows = max(1, PEER_LOGITS_PER_SLICE // max(1, positions * num_classes))  # one sequence at least
    # Slices as even as the limit allows: 16 sequences of GPT-2 go 4 x 4, not 5 + 5 + 5 + 1.
    rows = math.ceil(batch / math.ceil(batch / most_rows)) if batch else 1
    for start in range(0, batch, rows):
        part = {key: value[start:start + rows] if _is_per_example(value, batch) else value
                for key, value in inputs.items()}
        # Yielded straight from the call: no local of this frame keeps a slice alive while the next one is made.
        yield _flat_logits(peer, part, context)


def _flat_logits(peer: nn.Module, inputs: dict, context) -> torch.Tensor:
    with context():
        logits = logits_of(peer(**inputs))
    return logits.reshape(-1, logits.shape[-1])


def _is_per_example(value, batch: int) -> bool:
    """(batch, ...) inputs of two dimensions or more: ids, masks (4-D ones too), embeddings; not a 1-D
    `position_ids` that happens to be as long as the batch."""
    return isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == batch


def peer_logits_at_labels(peer: nn.Module, inputs: dict, labels: torch.Tensor | None,
                          shift_labels: bool) -> torch.Tensor:
    """The peer's logits at the labelled positions, (positions, classes), in the order `select_labelled_positions`
    gives the student's."""
    mask = label_mask(labels, shift_labels)
    if mask is None:
        return select_labelled_positions(logits_of(peer(**inputs)), labels, shift_labels)
    logits = _with_head_on_rows(peer, inputs, mask.shape, lambda hidden: hidden[mask])
    if logits.dim() == 2:
        return logits
    # The head saw other shapes than (batch, positions, hidden), so it ran everywhere: select afterwards.
    return select_labelled_positions(logits, labels, shift_labels)


def peer_logits_at_positions(peer: nn.Module, inputs: dict, positions: torch.Tensor,
                             batch_shape: tuple[int, int]) -> torch.Tensor:
    """The peer's logits at `positions`, indices into the flattened (batch x positions) grid of shape `batch_shape`
    (`losses.sample_positions`), as (positions, classes)."""
    logits = _with_head_on_rows(peer, inputs, batch_shape,
                                lambda hidden: hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions))
    if logits.dim() == 2:
        return logits
    return logits.reshape(-1, logits.shape[-1]).index_select(0, positions)


def _with_head_on_rows(peer: nn.Module, inputs: dict, batch_shape, rows) -> torch.Tensor:
    """The peer's logits with its output head (`get_output_embeddings()`) run on `rows(hidden)` only, where the head
    sees (batch, positions, hidden) of `batch_shape`; whole logits where it does not (or has no such head)."""
    head = peer.get_output_embeddings() if hasattr(peer, "get_output_embeddings") else None
    if head is None:
        return logits_of(peer(**inputs))

    def keep_rows(module, args):
        hidden = args[0]
        if hidden.dim() == 3 and tuple(hidden.shape[:2]) == tuple(batch_shape):
            return (rows(hidden), *args[1:])
        return None

    handle = head.register_forward_pre_hook(keep_rows)
    try:
        return logits_of(peer(**inputs))
    finally:
        handle.remove()
