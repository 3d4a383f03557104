"""Distillation losses between a model's logits and a peer's, on the positions that carry a label."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def label_mask(labels: torch.Tensor | None, shift_labels: bool) -> torch.Tensor | None:
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
    mask = label_mask(labels, shift_labels) if labels is not None and labels.shape == logits.shape[:-1] else None
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
    return _mean_distillation(student_logits, [[peer_logits]], loss_type, temperature, position_mask)


def _mean_distillation(student: torch.Tensor, peers: list, loss_type: str, temperature: float,
                       position_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over peers of `distillation_loss`; each peer is an iterable of row blocks of its (positions, classes)
    logits, in order, which together cover the student's positions."""
    if loss_type not in ("kl", "ce", "mse"):
        raise ValueError(f"Unknown `codistill_loss` {loss_type!r}: use 'kl', 'ce' or 'mse'.")
    if loss_type != "mse" and student.shape[-1] < 2:
        raise ValueError(
            f"`codistill_loss={loss_type!r}` compares class probabilities, but the model has a single output (a "
            "regression head), whose softmax is always 1: the term would be 0. Use `codistill_loss='mse'`."
        )
    if position_mask is not None and position_mask.numel() != student.shape[0]:
        raise ValueError(f"`position_mask` has {position_mask.numel()} entries for {student.shape[0]} positions.")
    if position_mask is not None:
        position_mask = position_mask.reshape(-1, 1).to(device=student.device, dtype=torch.bool)
    if loss_type != "mse":
        return _SoftTargetLoss.apply(student, peers, temperature, loss_type == "ce", position_mask)
    losses = []
    for blocks in peers:
        peer = torch.cat([block.detach() for block in blocks])
        _check_output_space(student, peer)
        _check_positions(student, peer.shape[0])
        if student.shape[0] == 0:
            losses.append(student.sum() * 0.0)
            continue
        dtype = torch.promote_types(student.dtype, torch.float32)  # fp32 at least, as the soft-target losses
        difference = student.to(dtype) - peer.to(dtype)
        if position_mask is None:
            losses.append(difference.pow(2).mean())
            continue
        # Masked before squaring, so that unscored positions pass no gradient even when they hold inf or NaN.
        difference = difference.masked_fill(~position_mask, 0.0)
        losses.append(difference.pow(2).sum() / (position_mask.sum().clamp(min=1) * difference.shape[-1]))
    return torch.stack(losses).mean()


def _check_output_space(student: torch.Tensor, peer: torch.Tensor) -> None:
    if student.shape[-1] != peer.shape[-1]:
        raise ValueError(
            f"Codistilled models must predict over the same output space: this model's logits have "
            f"{student.shape[-1]} classes, its peer's {peer.shape[-1]}. Give every group the same "
            "number of labels / vocabulary size."
        )


def _check_positions(student: torch.Tensor, peer_positions: int) -> None:
    if peer_positions != student.shape[0]:
        raise ValueError(f"The peer's logits cover {peer_positions} positions, this model's {student.shape[0]}: "
                         "both must be taken at the same positions.")


def labels_per_token(student_logits: torch.Tensor, labels: torch.Tensor | None) -> bool:
    """Whether `labels` label every position of `student_logits` (language models), not one example each."""
    return labels is not None and labels.dim() == 2 and labels.shape == student_logits.shape[:-1]


def flat_label_mask(student_logits: torch.Tensor, labels: torch.Tensor | None, causal_lm: bool) -> torch.Tensor | None:
    """The (batch x positions,) mask of a language model's scored positions, flattened; None for one label per
    example (classifiers) or no labels."""
    if not labels_per_token(student_logits, labels):
        return None
    return label_mask(labels, shift_labels=causal_lm).reshape(-1)


def causal_lm_mask(student_logits: torch.Tensor, labels: torch.Tensor | None, causal_lm: bool):
    """The (positions,) mask with which a causal LM's logits are scored whole, or None where positions are gathered.

    A causal LM labels nearly every position: scoring them all and masking the few without a label avoids copies of
    the (positions x vocabulary) logits and, on GPU, the host sync of a boolean index.
    """
    return flat_label_mask(student_logits, labels, causal_lm) if causal_lm else None


def sample_positions(mask: torch.Tensor | None, fraction: float) -> torch.Tensor | None:
    """ceil(fraction x positions) distinct positions of a language model's flattened `mask` (`flat_label_mask`),
    drawn at random, labelled ones first; None to score them all (`fraction` 1, or no mask: one label per example).

    A count fixed by the shape, not by how many positions carry a label: selecting them needs no host sync.
    """
    if mask is None or fraction >= 1.0:
        return None
    count = max(1, math.ceil(fraction * mask.numel()))
    scores = torch.rand(mask.shape, device=mask.device).masked_fill_(~mask, -1.0)
    return scores.topk(count, sorted=False).indices


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

    Each peer's logits come whole (shaped like the student's), already at the scored positions, (positions,
    classes), as `peer_forward.peer_logits_at_labels` / `peer_logits_at_positions` give them, or, for a causal LM
    scored whole, as an iterable of row blocks of the flattened logits made only when they are scored
    (`peer_forward.peer_logits_in_slices`). For language models, `positions` (from `sample_positions`, indices into
    the flattened batch x positions) scores only those, the unlabelled ones among them masked.
    """
    if positions is not None:
        scored = flat_label_mask(student_logits, labels, causal_lm)
        if scored is None:
            raise ValueError("Sampled `positions` need a label per position (a language model's labels).")
        mask = scored.index_select(0, positions)
        student = student_logits.reshape(-1, student_logits.shape[-1]).index_select(0, positions)
    else:
        mask = causal_lm_mask(student_logits, labels, causal_lm)
        student = (student_logits.reshape(-1, student_logits.shape[-1]) if mask is not None
                   else select_labelled_positions(student_logits, labels, shift_labels=causal_lm))

    def at_scored_positions(peer):
        if not isinstance(peer, torch.Tensor):
            if mask is None or positions is not None:
                raise TypeError("Peer logits in row blocks are only taken for causal LMs scored at every position.")
            return peer
        if peer.dim() == student_logits.dim():  # whole: take the student's positions
            if mask is None:
                peer = select_labelled_positions(peer, labels, shift_labels=causal_lm)
            else:
                peer = peer.reshape(-1, peer.shape[-1])
                if positions is not None:
                    peer = peer.index_select(0, positions)
        return [peer]

    return _mean_distillation(student, [at_scored_positions(peer) for peer in peer_logits], loss_type, temperature,
                              mask)


# fp32 elements per chunk of positions (64 MB): a GPT-2 batch of 16 x 512 tokens would otherwise hold several
# (positions x 50,257) fp32 tensors at once, more memory than the model's own activations.
_CHUNK_ELEMENTS = 1 << 24


class _SoftTargetLoss(torch.autograd.Function):
    """T² / N · mean over peers of Σ_positions KL (or cross-entropy) of softmax(student / T) against softmax(peer / T),
    in fp32 chunks of positions.

    One pass over the vocabulary: each chunk's softmaxes give both the loss and the gradient, which is the same for
    KL and cross-entropy, T / N · (softmax(student / T) - mean over peers of softmax(peer / T)). Only that gradient is
    kept for the backward pass, in the student's precision, one tensor whatever the number of peers, so neither the
    peers' logits nor a copy of the student's outlive the forward, and the backward pass only scales it. Products are
    taken in place in the chunk's buffers.

    Each peer comes as row blocks of its logits (`peers[j]` iterable, all peers' blocks of the same sizes): a block
    may be made only when it is scored (`peer_forward.peer_logits_in_slices`), so a peer's whole logits never exist.
    """

    @staticmethod
    def forward(ctx, student, peers, temperature: float, with_entropy: bool, position_mask=None):
        total = torch.zeros((), dtype=torch.promote_types(student.dtype, torch.float32), device=student.device)
        grad = torch.empty_like(student)
        iterators = [iter(blocks) for blocks in peers]
        rows_done = 0
        while True:
            # One block of each peer at a time, the last ones dropped before the next are made.
            blocks = [next(iterator, None) for iterator in iterators]
            if all(block is None for block in blocks):
                break
            if any(block is None or block.shape[0] != blocks[0].shape[0] for block in blocks):
                raise ValueError("The peers' logits must come in row blocks of the same sizes.")
            rows_done += _score_block(student, blocks, rows_done, temperature, with_entropy, position_mask, total,
                                      grad)
            del blocks
        _check_positions(student, rows_done)
        count = position_mask.sum().clamp(min=1) if position_mask is not None else max(1, student.shape[0])
        ctx.save_for_backward(grad)
        ctx.scale = temperature / count
        return total * temperature**2 / (count * max(1, len(peers)))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # In place: no second (positions x vocabulary) tensor at the start of the backward pass, where memory peaks.
        # A second backward through the same graph would fail autograd's version check rather than go wrong. The
        # factor stays in fp32: an fp16 loss scale times T / N can exceed fp16's range although the product does not.
        return grad.mul_(grad_output * ctx.scale), None, None, None, None


def _score_block(student, blocks, first_row: int, temperature: float, with_entropy: bool, position_mask, total,
                 grad) -> int:
    """Add the peers' `blocks` (rows `first_row` on of every peer's logits) to `total` and their gradient to `grad`,
    in chunks of positions; return the block's number of rows."""
    compute_dtype = total.dtype
    block_rows = blocks[0].shape[0]
    for block in blocks:
        _check_output_space(student, block)
    if first_row + block_rows > student.shape[0]:
        _check_positions(student, first_row + block_rows)
    chunk_rows = max(1, _CHUNK_ELEMENTS // student.shape[-1])
    for start in range(0, block_rows, chunk_rows):
        rows = slice(first_row + start, first_row + min(start + chunk_rows, block_rows))
        student_log_probs = F.log_softmax(_softened(student[rows], compute_dtype, temperature), dim=-1)
        unscored = ~position_mask[rows] if position_mask is not None else None
        mean_target = None
        for block in blocks:
            peer_chunk = block[start:start + chunk_rows].detach()
            peer_log_probs = F.log_softmax(_softened(peer_chunk, compute_dtype, temperature), dim=-1)
            target = peer_log_probs.exp()
            # Σ target · (log target - log student) (KL) or Σ -target · log student (CE), in the peer's buffer.
            if with_entropy:
                terms = torch.mul(student_log_probs, target, out=peer_log_probs).neg_()
            else:
                terms = peer_log_probs.sub_(student_log_probs).mul_(target)
            if unscored is not None:
                # Unscored positions: no loss and no gradient, whatever their logits hold (inf or NaN included).
                terms.masked_fill_(unscored, 0.0)
            total += terms.sum()
            mean_target = target if mean_target is None else mean_target.add_(target)
            del peer_chunk, peer_log_probs, terms, target  # before the next peer's chunk is made
        if len(blocks) > 1:
            mean_target.div_(len(blocks))
        gradient = student_log_probs.exp_().sub_(mean_target)
        if unscored is not None:
            gradient.masked_fill_(unscored, 0.0)
        grad[rows].copy_(gradient)
    return block_rows


def _softened(logits: torch.Tensor, dtype: torch.dtype, temperature: float) -> torch.Tensor:
    logits = logits.to(dtype)
    return logits if temperature == 1.0 else logits / temperature
