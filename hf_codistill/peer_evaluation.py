"""Scoring all G current models together during an evaluation: their ensemble and their agreement.

Each evaluation batch runs through all G models (a launched group fetches the other groups' current models into
temporary copies for it; one process has them all). Only the positions that carry a label are scored, so a peer
needs its output head there only (`peer_forward.peer_logits_at_labels`), and per batch only a few numbers per example
are kept: the ensemble's negative log-likelihood, the number of scored positions and, per pair of models, how many of
them the two predict alike. They are gathered across the group like Trainer gathers its own losses. The ensemble's
predictions themselves are kept only when a `compute_metrics` will score them.
"""

from __future__ import annotations

from itertools import combinations

import torch
import torch.nn.functional as F
from transformers import EvalPrediction
from transformers.trainer_pt_utils import nested_concat, nested_numpify
from transformers.trainer_utils import denumpify_detensorize

from .losses import IGNORE_INDEX
from .peer_forward import logits_of
from .peer_metrics import ensemble_logits


def _logits(outputs) -> torch.Tensor:
    # Trainer's `prediction_step` gives logits alone, a tuple of them (logits first) or, for peers, the model output.
    return outputs if isinstance(outputs, torch.Tensor) else logits_of(outputs)


def _are_class_scores(logits: torch.Tensor, labels: torch.Tensor | None) -> bool:
    """Whether `logits` score classes, one class id per label: not a regression (one output, float labels) or
    multi-label head (float label vectors)."""
    if logits.shape[-1] < 2:
        return False
    if labels is None:
        return True
    return not torch.is_floating_point(labels) and labels.shape == logits.shape[:-1]


def aligned_labels(labels: torch.Tensor, causal: bool) -> torch.Tensor:
    """Each position's target: a causal LM's position t is scored against label t + 1, its last position not at all."""
    if not causal or labels.dim() < 2:
        return labels
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)


class PeerEvaluation:
    """Accumulates one evaluation's ensemble loss and agreement over batches; `metrics` scores them at the end."""

    def __init__(self, accelerator, group_index: int, causal: bool, preprocess_logits_for_metrics=None,
                 keep_predictions: bool = True, peer_groups: list[int] | None = None):
        self.accelerator = accelerator
        self.group_index = group_index
        # The groups of the peers' logits, in order; None: every other group (then the pairs run over all G).
        self.peer_groups = peer_groups
        self.causal = causal
        self.preprocess = preprocess_logits_for_metrics
        # Without `compute_metrics` nothing reads the ensemble's predictions: a language model's would be
        # (examples x positions x vocabulary) floats on the host.
        self.keep_predictions = keep_predictions
        self.ensemble_predictions = None
        self.labels = None
        self.num_models: int | None = None
        self.with_labels = True
        self._per_example: list[torch.Tensor] = []

    @torch.no_grad()
    def add_batch(self, own_logits, peer_logits: list, labels: torch.Tensor | None) -> None:
        """`own_logits`: this group's model's whole logits; `peer_logits`: the peers' (in the order of the peer
        groups), whole or already at the scored positions (`peer_forward.peer_logits_at_labels`)."""
        own = _logits(own_logits)
        if not _are_class_scores(own, labels):
            return  # regression or multi-label heads: no class probabilities to ensemble or top-1 to compare
        num_classes, batch = own.shape[-1], own.shape[0]
        if labels is None:  # score every position (but a causal LM's last)
            self.with_labels = False
            targets = own.new_zeros(own.shape[:-1], dtype=torch.long)
            if self.causal and own.dim() == 3:
                targets[:, -1] = IGNORE_INDEX
        else:
            targets = aligned_labels(labels, self.causal)
        scored = (targets != IGNORE_INDEX).reshape(-1)
        rows = [_logits(peer) for peer in peer_logits]
        own_position = (self.group_index if self.peer_groups is None
                        else sum(group < self.group_index for group in self.peer_groups))
        rows.insert(own_position, own)
        rows = [logits.reshape(-1, num_classes)[scored] if logits.shape[:-1] == targets.shape else logits
                for logits in rows]
        self.num_models = len(rows)
        ensemble = ensemble_logits(rows)
        example = torch.arange(batch, device=own.device).repeat_interleave(targets.numel() // batch)[scored]
        top1 = [logits.argmax(dim=-1) for logits in rows]
        # Per scored position: the ensemble's loss, 1 (the count), and whether each pair of models agrees.
        losses = F.nll_loss(ensemble, targets.reshape(-1)[scored].long(), reduction="none")
        agree = [(top1[i] == top1[j]).float() for i, j in combinations(range(len(rows)), 2)]
        row_stats = torch.stack([losses, torch.ones_like(losses), *agree], dim=1)
        per_example = row_stats.new_zeros(batch, row_stats.shape[1]).index_add_(0, example, row_stats)
        self._per_example.append(self.accelerator.gather_for_metrics(per_example))
        if self.keep_predictions and labels is not None:
            # The ensemble at the scored positions; elsewhere (nothing scores there) this model's own logits.
            full = own.clone()
            full.reshape(-1, num_classes)[scored] = ensemble.to(full.dtype)
            self._keep(full if self.preprocess is None else self.preprocess(full, labels), labels)

    def _keep(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        for name, tensor in (("ensemble_predictions", predictions), ("labels", labels)):
            # Sequences differ in length across ranks and batches: pad the position dimension as Trainer does.
            if tensor.dim() > 1:
                tensor = self.accelerator.pad_across_processes(tensor, dim=1, pad_index=IGNORE_INDEX)
            gathered = nested_numpify(self.accelerator.gather_for_metrics(tensor.contiguous()))
            current = getattr(self, name)
            setattr(self, name, gathered if current is None else nested_concat(current, gathered,
                                                                                padding_index=IGNORE_INDEX))

    @property
    def scored_positions(self) -> int:
        return int(torch.cat(self._per_example)[:, 1].sum()) if self._per_example else 0

    def metrics(self, compute_metrics, prefix: str) -> dict[str, float]:
        """`<prefix>_ensemble_loss`, `<prefix>_ensemble_<metric>` from `compute_metrics` on the ensemble, and the
        top-1 agreement of every pair (`<prefix>_agreement_<i>_<j>`) and its mean (Anil et al.'s churn is 1 - it)."""
        if not self._per_example:
            return {}
        totals = torch.cat(self._per_example).double().sum(dim=0).cpu()
        count = float(totals[1])
        metrics = {}
        if self.with_labels and count > 0:
            metrics["ensemble_loss"] = float(totals[0]) / count
        if compute_metrics is not None and self.labels is not None and self.ensemble_predictions is not None:
            scored = compute_metrics(EvalPrediction(predictions=self.ensemble_predictions, label_ids=self.labels))
            metrics.update({f"ensemble_{key}": value for key, value in scored.items()})
        groups = (range(self.num_models) if self.peer_groups is None
                  else sorted([self.group_index, *self.peer_groups]))
        pairs = list(combinations(groups, 2))
        agreement = {f"agreement_{i}_{j}": float(totals[2 + k]) / count if count else float("nan")
                     for k, (i, j) in enumerate(pairs)}
        metrics.update(agreement, agreement_mean=sum(agreement.values()) / len(agreement))
        # Plain Python numbers, as Trainer makes its own: the logs cross processes as JSON.
        return denumpify_detensorize({f"{prefix}_{key}": value for key, value in metrics.items()})
