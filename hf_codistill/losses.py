"""Distillation losses between a model's logits and a peer's, on the positions that carry a label."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def scored_positions(labels: torch.Tensor | None, shift_labels: bool) -> torch.Tensor | None:
    """(batch, positions) mask of the positions whose prediction is scored; None for one label per example.

    For causal LMs (`shift_labels=True`) position t predicts label t+1, as in the model's own loss, and the last
    position predicts nothing.
    """
    if labels is None or labels.dim() != 2:
        return None
    if not shift_labels:
        return labels != IGNORE_INDEX
    return torch.cat([labels[:, 1:] != IGNORE_INDEX, labels.new_zeros(labels.shape[0], 1, dtype=torch.bool)], dim=1)


def select_labelled_positions(
    logits: torch.Tensor, labels: torch.Tensor | None, shift_labels: bool = False
) -> torch.Tensor:
    """Flatten `logits` to (positions, classes), keeping only positions whose label is not -100.

    For causal LMs (`shift_labels=True`) position t predicts label t+1, as in the model's own loss. For sequence or
    image classification (one label per example) every example counts. Without labels every position counts (but
    the last, for causal LMs). One gather from the model's logits: no shifted or flattened copy first.
    """
    mask = scored_positions(labels, shift_labels) if labels is not None and labels.shape == logits.shape[:-1] else None
    if mask is not None:
        return logits.reshape(-1, logits.shape[-1])[mask.reshape(-1)]
    if shift_labels:
        logits = logits[..., :-1, :]
    return logits.reshape(-1, logits.shape[-1])


def distillation_loss(
    student_logits: torch.Tensor,
    peer_logits: torch.Tensor,
    loss_type: str = "kl",
    temperature: float = 1.0,
    position_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """D(student, peer) averaged over positions; logits are (positions, classes), the peer's carry no gradient.

    - `kl`: T² · KL(softmax(peer/T) ‖ softmax(student/T)), summed over classes (averaging over classes would make the
      term vanishingly weak for large vocabularies), averaged over positions; the T² keeps gradient magnitudes
      comparable across temperatures (Hinton et al. 2015).
    - `ce`: T² · cross-entropy of softmax(student/T) against the peer's soft targets: the KL plus the peer's entropy,
      same gradient, but its value does not reach 0 when the models agree.
    - `mse`: mean squared error between the raw logits (temperature unused).

    `position_mask` (positions,) keeps only the positions where it is True, like selecting them first but without
    copying the logits (and, on GPU, without the host sync of a boolean index): for causal LMs, where nearly every
    position carries a label.
    """
    if student_logits.shape[-1] != peer_logits.shape[-1]:
        raise ValueError(
            f"Codistilled models must predict over the same output space: this model's logits have "
            f"{student_logits.shape[-1]} classes, its peer's {peer_logits.shape[-1]}. Give every group the same "
            "number of labels / vocabulary size."
        )
    if loss_type not in ("kl", "ce", "mse"):
        raise ValueError(f"Unknown `codistill_loss` {loss_type!r}: use 'kl', 'ce' or 'mse'.")
    if loss_type != "mse" and student_logits.shape[-1] < 2:
        raise ValueError(
            f"`codistill_loss={loss_type!r}` compares class probabilities, but the model has a single output (a "
            "regression head), whose softmax is always 1: the term would be 0. Use `codistill_loss='mse'`."
        )
    if peer_logits.shape[0] != student_logits.shape[0]:
        raise ValueError(f"The peer's logits cover {peer_logits.shape[0]} positions, this model's "
                         f"{student_logits.shape[0]}: both must be taken at the same positions.")
    if position_mask is not None and position_mask.numel() != student_logits.shape[0]:
        raise ValueError(f"`position_mask` has {position_mask.numel()} entries for {student_logits.shape[0]} positions.")
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    if position_mask is not None:
        position_mask = position_mask.reshape(-1, 1).to(device=student_logits.device, dtype=torch.bool)
    if loss_type == "mse":
        difference = student_logits.float() - peer_logits.detach().float()
        if position_mask is None:
            return difference.pow(2).mean()
        # Masked before squaring, so that unscored positions pass no gradient even when they hold inf or NaN.
        difference = difference.masked_fill(~position_mask, 0.0)
        return difference.pow(2).sum() / (position_mask.sum().clamp(min=1) * difference.shape[-1])
    return _SoftTargetLoss.apply(student_logits, peer_logits.detach(), temperature, loss_type == "ce", position_mask)


def whole_sequence_mask(student_logits: torch.Tensor, labels: torch.Tensor | None, causal_lm: bool):
    """The (positions,) mask with which a causal LM's logits are scored whole, or None where positions are gathered.

    A causal LM labels nearly every position: scoring them all and masking the few without a label avoids copies of
    the (positions x vocabulary) logits and, on GPU, the host sync of a boolean index.
    """
    if not causal_lm or labels is None or labels.shape != student_logits.shape[:-1]:
        return None
    return scored_positions(labels, shift_labels=True).reshape(-1)


def sample_positions(mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """ceil(fraction x positions) distinct positions drawn at random, labelled (`mask`) ones first.

    A count fixed by the shape, not by how many positions carry a label: selecting them needs no host sync.
    """
    count = max(1, math.ceil(fraction * mask.numel()))
    scores = torch.rand(mask.shape, device=mask.device).masked_fill_(~mask, -1.0)
    return scores.topk(count, sorted=False).indices


def scored_sample(whole_mask: torch.Tensor | None, fraction: float) -> torch.Tensor | None:
    """`sample_positions` of a causal LM's scored positions (`whole_sequence_mask`), or None to score them all."""
    if whole_mask is None or fraction >= 1.0:
        return None
    return sample_positions(whole_mask, fraction)


def distillation_to_peers(
    student_logits: torch.Tensor,
    peer_logits: Iterable[torch.Tensor],
    labels: torch.Tensor | None,
    causal_lm: bool,
    loss_type: str = "kl",
    temperature: float = 1.0,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over peers of `distillation_loss(student, peer)` at the positions that carry a label.

    Each peer's logits come whole (shaped like the student's) or already at the scored positions, (positions,
    classes), as `peer_forward.peer_logits_at_labels` / `peer_logits_at_positions` give them. `peer_logits` may be
    a generator: each peer's logits are used and dropped before the next peer's are made. For causal LMs,
    `positions` (from `sample_positions`, indices into the flattened batch x positions) scores only those.
    """
    mask = whole_sequence_mask(student_logits, labels, causal_lm)
    if mask is not None:
        student = student_logits.reshape(-1, student_logits.shape[-1])
        if positions is not None:
            student, mask = student.index_select(0, positions), mask.index_select(0, positions)
    else:
        student = select_labelled_positions(student_logits, labels, shift_labels=causal_lm)
    losses = []
    for peer in peer_logits:
        if peer.dim() == student_logits.dim():  # whole: take the student's positions
            if mask is None:
                peer = select_labelled_positions(peer, labels, shift_labels=causal_lm)
            else:
                peer = peer.reshape(-1, peer.shape[-1])
                if positions is not None:
                    peer = peer.index_select(0, positions)
        losses.append(distillation_loss(student, peer, loss_type, temperature, mask))
    return torch.stack(losses).mean()


# fp32 elements per chunk of positions (64 MB): a GPT-2 batch of 16 x 512 tokens would otherwise hold several
# (positions x 50,257) fp32 tensors at once, more memory than the model's own activations.
_CHUNK_ELEMENTS = 1 << 24


class _SoftTargetLoss(torch.autograd.Function):
    """T² / N · Σ_positions KL (or cross-entropy) of softmax(student / T) against softmax(peer / T), in fp32 chunks.

    One pass over the vocabulary: each chunk's softmaxes give both the loss and the gradient, which is the same for
    KL and cross-entropy, T / N · (softmax(student / T) - softmax(peer / T)). Only that gradient is kept for the
    backward pass, in the student's precision, so neither the peer's logits nor a copy of the student's outlive the
    forward, and the backward pass only scales it. Products are taken in place in the chunk's buffers.
    """

    @staticmethod
    def forward(ctx, student, peer, temperature: float, with_entropy: bool, position_mask=None):
        compute_dtype = torch.promote_types(student.dtype, torch.float32)
        rows = max(1, _CHUNK_ELEMENTS // student.shape[-1])
        total = torch.zeros((), dtype=compute_dtype, device=student.device)
        grad = torch.empty_like(student)
        masks = position_mask.split(rows) if position_mask is not None else itertools.repeat(None)
        for student_chunk, peer_chunk, grad_chunk, mask in zip(student.split(rows), peer.split(rows),
                                                                grad.split(rows), masks):
            student_log_probs = F.log_softmax(_softened(student_chunk, compute_dtype, temperature), dim=-1)
            peer_log_probs = F.log_softmax(_softened(peer_chunk, compute_dtype, temperature), dim=-1)
            target = peer_log_probs.exp()
            # Σ target · (log target - log student) (KL) or Σ -target · log student (CE), in the peer's buffer.
            if with_entropy:
                terms = torch.mul(student_log_probs, target, out=peer_log_probs).neg_()
            else:
                terms = peer_log_probs.sub_(student_log_probs).mul_(target)
            gradient = student_log_probs.exp_().sub_(target)
            if mask is not None:
                # Unscored positions: no loss and no gradient, whatever their logits hold (inf or NaN included).
                unscored = ~mask
                terms.masked_fill_(unscored, 0.0)
                gradient.masked_fill_(unscored, 0.0)
            total += terms.sum()
            grad_chunk.copy_(gradient)
        count = position_mask.sum().clamp(min=1) if position_mask is not None else student.shape[0]
        ctx.save_for_backward(grad)
        ctx.scale = temperature / count
        return total * temperature**2 / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # In place: no second (positions x vocabulary) tensor at the start of the backward pass, where memory peaks.
        # A second backward through the same graph would fail autograd's version check rather than go wrong. The
        # factor stays in fp32: an fp16 loss scale times T / N can exceed fp16's range although the product does not.
        return grad.mul_(grad_output * ctx.scale), None, None, None, None


def _softened(logits: torch.Tensor, dtype: torch.dtype, temperature: float) -> torch.Tensor:
    logits = logits.to(dtype)
    return logits if temperature == 1.0 else logits / temperature
