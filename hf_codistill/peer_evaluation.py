"""Scoring all G current models together during a group's evaluation: their ensemble and their agreement.

At an evaluation every group holds fresh copies of the other groups' models (fetched for the evaluation only, so the
stale peers that training uses are untouched). Each evaluation batch then runs through all G models; this module
keeps, per example, the ensemble's predictions (after the Trainer's `preprocess_logits_for_metrics`), its loss at the
labelled positions and every model's top-1 prediction, gathered over the group like Trainer gathers its own.
"""

from __future__ import annotations

import torch
from transformers import EvalPrediction
from transformers.trainer_pt_utils import nested_concat, nested_numpify
from transformers.trainer_utils import denumpify_detensorize

from .losses import IGNORE_INDEX
from .peer_forward import logits_of
from .peer_metrics import ensemble_logits, labelled_nll, top1_agreement


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


class PeerEvaluation:
    """Accumulates one evaluation's ensemble and agreement over batches; `metrics` scores them at the end."""

    def __init__(self, accelerator, group_index: int, causal: bool, preprocess_logits_for_metrics=None,
                 keep_predictions: bool = True):
        self.accelerator = accelerator
        self.group_index = group_index
        self.causal = causal
        self.preprocess = preprocess_logits_for_metrics
        # Without `compute_metrics` nothing reads the ensemble's predictions: a language model's would be
        # (examples x positions x vocabulary) floats on the host.
        self.keep_predictions = keep_predictions
        self.ensemble_predictions = None
        self.labels = None
        self.top1 = None
        self.loss_sum = None
        self.loss_count = None

    @torch.no_grad()
    def add_batch(self, own_logits, peer_logits: list, labels: torch.Tensor | None) -> None:
        """`own_logits` from this group's model, `peer_logits` in the order of the peer groups (ascending index)."""
        logits = [_logits(peer) for peer in peer_logits]
        logits.insert(self.group_index, _logits(own_logits))
        if not _are_class_scores(logits[0], labels):
            return  # regression or multi-label heads: no class probabilities to ensemble or top-1 to compare
        ensemble = ensemble_logits(logits)
        aligned = [(model_logits[:, :-1] if self.causal else model_logits) for model_logits in logits]
        # Models last, so that the position dimension (1) is padded like every other tensor's.
        # (batch[, positions], G)
        top1 = torch.stack([model_logits.argmax(dim=-1) for model_logits in aligned], dim=-1)
        batch = {"top1": top1}
        if self.keep_predictions:
            batch["ensemble_predictions"] = ensemble if self.preprocess is None else self.preprocess(ensemble, labels)
        if labels is not None:
            token_loss, valid = labelled_nll(ensemble, labels, self.causal)
            top1.masked_fill_(~valid.unsqueeze(-1), IGNORE_INDEX)
            dims = tuple(range(1, token_loss.dim()))
            batch.update(loss_sum=token_loss.sum(dim=dims) if dims else token_loss,
                         loss_count=valid.sum(dim=dims) if dims else valid.long())
            if self.keep_predictions:
                batch["labels"] = labels
        for name, tensor in batch.items():
            # Sequences differ in length across ranks and batches: pad the position dimension as Trainer does.
            if tensor.dim() > 1 + (name == "top1"):
                tensor = self.accelerator.pad_across_processes(tensor, dim=1, pad_index=IGNORE_INDEX)
            gathered = nested_numpify(self.accelerator.gather_for_metrics(tensor.contiguous()))
            current = getattr(self, name)
            setattr(self, name, gathered if current is None else nested_concat(current, gathered,
                                                                                padding_index=IGNORE_INDEX))

    def metrics(self, compute_metrics, prefix: str) -> dict[str, float]:
        """`<prefix>_ensemble_<metric>` from `compute_metrics` on the ensemble, its loss, and the pairwise
        agreement."""
        if self.top1 is None:
            return {}
        metrics = {}
        if self.loss_sum is not None and self.loss_count.sum() > 0:
            metrics["ensemble_loss"] = float(self.loss_sum.sum() / self.loss_count.sum())
        if compute_metrics is not None and self.labels is not None and self.ensemble_predictions is not None:
            scored = compute_metrics(EvalPrediction(predictions=self.ensemble_predictions, label_ids=self.labels))
            metrics.update({f"ensemble_{key}": value for key, value in scored.items()})
        per_model = [self.top1[..., g] for g in range(self.top1.shape[-1])]
        # Unlabelled positions and padding carry IGNORE_INDEX in every model's row.
        metrics.update(top1_agreement(per_model, mask=per_model[0] != IGNORE_INDEX))
        # Plain Python numbers, as Trainer makes its own: the logs cross processes as JSON.
        return denumpify_detensorize({f"{prefix}_{key}": value for key, value in metrics.items()})
