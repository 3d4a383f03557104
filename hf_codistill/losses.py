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
    if loss_type == "mse":
        return F.mse_loss(student_logits.float(), peer_logits.detach().float())
    if loss_type not in ("kl", "ce"):
        raise ValueError(f"Unknown `codistill_loss` {loss_type!r}: use 'kl', 'ce' or 'mse'.")
    return _SoftTargetLoss.apply(student_logits, peer_logits.detach(), temperature, loss_type == "ce")


# fp32 elements per chunk of positions (64 MB): a GPT-2 batch of 16 x 512 tokens would otherwise hold several
# (positions x 50,257) fp32 tensors for the backward pass, more memory than the model's own activations.
_CHUNK_ELEMENTS = 1 << 24


class _SoftTargetLoss(torch.autograd.Function):
    """T² / N · Σ_positions KL (or cross-entropy) of softmax(student / T) against softmax(peer / T), in fp32 chunks.

    Saves only the two logit tensors in their own precision; the backward pass recomputes the softmaxes chunk by
    chunk. The gradient, the same for KL and cross-entropy, is T / N · (softmax(student / T) - softmax(peer / T)).
    """

    @staticmethod
    def forward(ctx, student, peer, temperature: float, with_entropy: bool):
        rows = max(1, _CHUNK_ELEMENTS // student.shape[-1])
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for student_chunk, peer_chunk in zip(student.split(rows), peer.split(rows)):
            student_log_probs = F.log_softmax(student_chunk.float() / temperature, dim=-1)
            peer_log_probs = F.log_softmax(peer_chunk.float() / temperature, dim=-1)
            target = peer_log_probs.exp()
            total += (target * ((0 if with_entropy else peer_log_probs) - student_log_probs)).sum()
        ctx.save_for_backward(student, peer)
        ctx.temperature, ctx.rows = temperature, rows
        return total * temperature**2 / student.shape[0]

    @staticmethod
    def backward(ctx, grad_output):
        student, peer = ctx.saved_tensors
        temperature, scale = ctx.temperature, grad_output * ctx.temperature / student.shape[0]
        grads = [
            ((F.softmax(s.float() / temperature, dim=-1) - F.softmax(p.float() / temperature, dim=-1)) * scale)
            .to(student.dtype)
            for s, p in zip(student.split(ctx.rows), peer.split(ctx.rows))
        ]
        return torch.cat(grads), None, None, None
