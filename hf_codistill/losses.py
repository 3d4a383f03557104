"""Distillation losses between a model's logits and a peer's, on the positions that carry a label."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def select_labelled_positions(
    logits: torch.Tensor, labels: torch.Tensor | None, shift_labels: bool = False
) -> torch.Tensor:
    """Flatten `logits` to (positions, classes), keeping only positions whose label is not -100.

    For causal LMs (`shift_labels=True`) position t predicts label t+1, as in the model's own loss. For sequence or
    image classification (one label per example) every example counts. Without labels every position counts.
    """
    if shift_labels:
        logits = logits[..., :-1, :]
        labels = labels[..., 1:] if labels is not None else None
    flat = logits.reshape(-1, logits.shape[-1])
    if labels is None or labels.dim() != logits.dim() - 1 or labels.shape != logits.shape[:-1]:
        return flat
    return flat[labels.reshape(-1) != IGNORE_INDEX]


def distillation_loss(
    student_logits: torch.Tensor, peer_logits: torch.Tensor, loss_type: str = "kl", temperature: float = 1.0
) -> torch.Tensor:
    """D(student, peer) averaged over positions; logits are (positions, classes), the peer's carry no gradient.

    - `kl`: T² · KL(softmax(peer/T) ‖ softmax(student/T)), summed over classes (averaging over classes would make the
      term vanishingly weak for large vocabularies), averaged over positions; the T² keeps gradient magnitudes
      comparable across temperatures (Hinton et al. 2015).
    - `ce`: T² · cross-entropy of softmax(student/T) against the peer's soft targets: the KL plus the peer's entropy,
      same gradient, but its value does not reach 0 when the models agree.
    - `mse`: mean squared error between the raw logits (temperature unused).
    """
    if student_logits.shape[-1] != peer_logits.shape[-1]:
        raise ValueError(
            f"Codistilled models must predict over the same output space: this model's logits have "
            f"{student_logits.shape[-1]} classes, its peer's {peer_logits.shape[-1]}. Give every group the same "
            "number of labels / vocabulary size."
        )
    num_positions = student_logits.shape[0]
    if num_positions == 0:
        return student_logits.sum() * 0.0
    student_logits = student_logits.float()
    peer_logits = peer_logits.detach().float()
    if loss_type == "mse":
        return F.mse_loss(student_logits, peer_logits)
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    peer_log_probs = F.log_softmax(peer_logits / temperature, dim=-1)
    if loss_type == "kl":
        # kl_div(input, target) is KL(target ‖ input) with `input` in log space: the peer is the target.
        loss = F.kl_div(student_log_probs, peer_log_probs, reduction="sum", log_target=True)
    elif loss_type == "ce":
        loss = -(peer_log_probs.exp() * student_log_probs).sum()
    else:
        raise ValueError(f"Unknown `codistill_loss` {loss_type!r}: use 'kl', 'ce' or 'mse'.")
    return loss * (temperature**2) / num_positions
