"""The peers' forward pass for the distillation term: only what the term needs.

The distillation term compares predictions at the positions that carry a label (masked tokens for MLM, next tokens
for causal LMs, every example for classification). For language models most of a forward pass past the encoder is
the vocabulary projection, so the peer runs its output head (`get_output_embeddings()`) on the labelled positions
only: with 15% masking, an MLM peer projects 15% of the tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from .losses import IGNORE_INDEX, select_labelled_positions


def scored_positions(labels: torch.Tensor | None, shift_labels: bool) -> torch.Tensor | None:
    """(batch, positions) mask of the hidden states whose prediction is scored; None for one label per example."""
    if labels is None or labels.dim() != 2:
        return None
    if not shift_labels:
        return labels != IGNORE_INDEX
    # Position t predicts label t + 1; the last position predicts nothing.
    return torch.cat([labels[:, 1:] != IGNORE_INDEX, labels.new_zeros(labels.shape[0], 1, dtype=torch.bool)], dim=1)


def _logits(outputs) -> torch.Tensor:
    return outputs["logits"] if isinstance(outputs, dict) else outputs[0]


def peer_logits_at_labels(peer: nn.Module, inputs: dict, labels: torch.Tensor | None,
                          shift_labels: bool) -> torch.Tensor:
    """The peer's logits at the labelled positions, (positions, classes), in the order `select_labelled_positions`
    gives the student's."""
    mask = scored_positions(labels, shift_labels)
    head = peer.get_output_embeddings() if mask is not None and hasattr(peer, "get_output_embeddings") else None
    if head is None:
        return select_labelled_positions(_logits(peer(**inputs)), labels, shift_labels)

    def keep_scored(module, args):
        hidden = args[0]
        if hidden.dim() == 3 and hidden.shape[:2] == mask.shape:
            return (hidden[mask], *args[1:])
        return None

    handle = head.register_forward_pre_hook(keep_scored)
    try:
        logits = _logits(peer(**inputs))
    finally:
        handle.remove()
    if logits.dim() == 2:
        return logits
    # The head saw other shapes than (batch, positions, hidden), so it ran everywhere: select afterwards.
    return select_labelled_positions(logits, labels, shift_labels)
