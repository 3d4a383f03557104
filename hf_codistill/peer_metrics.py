"""What codistilled models look like side by side: their ensemble and how often they agree.

Codistillation pulls models toward each other, so two numbers next to each model's own metrics say how far:

- the **ensemble** of the models (the mean of their probabilities), scored with the same metric as each model;
- **agreement**: the fraction of evaluated positions where two models' top-1 predictions agree, per pair and as a
  mean. Anil et al. (2018) report *prediction churn*, which is 1 - agreement. For language models only positions with
  a label (not -100) count.

Use them three ways:

    ensemble_logits([logits_0, logits_1])                 # any argmax or metric on logits works on the ensemble
    top1_agreement([preds_0, preds_1], mask=labels != -100)

    # a `compute_metrics` for predictions that hold one array per model (what `CodistillTrainer` with a list of
    # models gathers at evaluation); your own single-model metric is applied to every model and to the ensemble
    compute_metrics = peer_compute_metrics(my_accuracy)
    compute_metrics(EvalPrediction(predictions=(logits_0, logits_1), label_ids=labels))
    # {"accuracy": ..., "group_0/accuracy": ..., "group_1/accuracy": ..., "ensemble_accuracy": ...,
    #  "agreement_0_1": ..., "agreement_mean": ...}

    # or as `evaluate` modules shipped with the package (they load offline)
    evaluate.load(metric_path("agreement")).compute(predictions=np.stack([preds_0, preds_1], axis=1))
    evaluate.load(metric_path("ensemble_accuracy")).compute(predictions=np.stack([l_0, l_1], 1), references=labels)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import combinations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import EvalPrediction

from .losses import IGNORE_INDEX


def ensemble_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """log(mean_i softmax(logits_i)): the ensemble's log-probabilities, shaped like each input."""
    shapes = {tuple(t.shape) for t in logits}
    if len(shapes) != 1:
        raise ValueError(
            f"Ensembled models must predict over the same output space, got logits of shapes {sorted(shapes)}."
        )
    log_probs = torch.stack([F.log_softmax(t.float(), dim=-1) for t in logits])
    return torch.logsumexp(log_probs, dim=0) - math.log(len(logits))


def top1_agreement(
    predictions: Sequence[torch.Tensor | np.ndarray], mask: torch.Tensor | np.ndarray | None = None
) -> dict[str, float]:
    """`agreement_<i>_<j>` (i < j): the fraction of positions where models i and j predict the same class, and the
    mean over pairs as `agreement_mean`. `predictions` are top-1 class ids of equal shape; `mask` picks the positions
    that count."""
    if len(predictions) < 2:
        raise ValueError(f"Agreement needs the predictions of at least 2 models, got {len(predictions)}.")
    arrays = [_numpy(p) for p in predictions]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"Predictions must have one shape for every model, got {[a.shape for a in arrays]}.")
    keep = np.ones(arrays[0].shape, dtype=bool) if mask is None else _numpy(mask).astype(bool)
    if keep.shape != arrays[0].shape:
        raise ValueError(f"`mask` has shape {keep.shape}, the predictions {arrays[0].shape}.")
    counted = int(keep.sum())
    metrics = {}
    for i, j in combinations(range(len(arrays)), 2):
        same = int((arrays[i] == arrays[j])[keep].sum())
        metrics[f"agreement_{i}_{j}"] = same / counted if counted else float("nan")
    metrics["agreement_mean"] = float(np.mean(list(metrics.values())))
    return metrics


def labelled_nll(log_probs: torch.Tensor, labels: torch.Tensor, shift_labels: bool = False):
    """(per-position negative log-likelihood, zero where unlabelled; the labelled-position mask), shaped like the
    labels (shifted for causal LMs). `log_probs` from `ensemble_logits`."""
    if shift_labels:
        log_probs, labels = log_probs[..., :-1, :], labels[..., 1:]
    scored = labels != IGNORE_INDEX
    token_loss = F.nll_loss(log_probs.reshape(-1, log_probs.shape[-1]).float(), labels.reshape(-1).clamp(min=0).long(),
                            reduction="none").view(labels.shape)
    return token_loss * scored, scored


def ensemble_loss(log_probs: torch.Tensor, labels: torch.Tensor, shift_labels: bool = False) -> float:
    """The ensemble's mean negative log-likelihood at the labelled positions (`log_probs` from `ensemble_logits`)."""
    token_loss, scored = labelled_nll(log_probs, labels, shift_labels)
    return float(token_loss.sum() / scored.sum()) if scored.any() else float("nan")


def peer_compute_metrics(
    compute_metrics: Callable[[EvalPrediction], dict] | None = None,
    shift_labels: bool = False,
    with_peer_metrics: bool = True,
) -> Callable[[EvalPrediction], dict[str, float]]:
    """A `compute_metrics` for an `EvalPrediction` whose `predictions` hold one entry per model.

    Returns `compute_metrics` of every model (model 0's also under the plain keys, as Trainer logs group 0), of the
    ensemble (`ensemble_<key>`, and its loss at the labelled positions as `ensemble_loss`), and the top-1
    agreement. A model's entry is either logits (one more dimension than the labels) or top-1 ids (e.g. after
    `preprocess_logits_for_metrics` took the argmax); ids give agreement but no ensemble. Set `shift_labels` for
    causal LMs, whose position t predicts label t + 1. `with_peer_metrics=False` (`codistill_peer_metrics=False`)
    keeps only each model's own metrics.
    """

    def compute(eval_pred: EvalPrediction) -> dict[str, float]:
        per_model = list(eval_pred.predictions)
        labels = eval_pred.label_ids
        metrics: dict[str, float] = {}
        if compute_metrics is not None:
            for group, predictions in enumerate(per_model):
                own = compute_metrics(EvalPrediction(predictions=predictions, label_ids=labels))
                metrics.update({f"group_{group}/{key}": value for key, value in own.items()})
                if group == 0:
                    metrics.update(own)
        if not with_peer_metrics or (labels is not None and np.issubdtype(np.asarray(labels).dtype, np.floating)):
            return metrics  # regression or multi-label heads: no class probabilities to ensemble or compare
        logits = [_first_output(p) for p in per_model]
        are_logits = labels is None or all(np.ndim(output) == np.ndim(labels) + 1 for output in logits)
        if are_logits and (compute_metrics is not None or labels is not None):
            ensemble = ensemble_logits([torch.as_tensor(output) for output in logits])
            if labels is not None:
                metrics["ensemble_loss"] = ensemble_loss(ensemble, torch.as_tensor(labels), shift_labels)
            if compute_metrics is not None:
                own = compute_metrics(EvalPrediction(predictions=ensemble.numpy(), label_ids=labels))
                metrics.update({f"ensemble_{key}": value for key, value in own.items()})
        top1 = [np.argmax(output, axis=-1) if are_logits else np.asarray(output) for output in logits]
        mask = None
        if labels is not None:
            if shift_labels:
                top1, labels = [t[..., :-1] for t in top1], labels[..., 1:]
            if np.shape(labels) == top1[0].shape:
                mask = np.asarray(labels) != IGNORE_INDEX
        metrics.update(top1_agreement(top1, mask))
        return metrics

    return compute


def _first_output(predictions):
    # Models that return several tensors (logits, hidden states, ...) have them gathered as a tuple: logits come first.
    return predictions[0] if isinstance(predictions, (tuple, list)) else predictions


def _numpy(array) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def top1_ids(logits, labels):
    """A `preprocess_logits_for_metrics` that keeps each position's top-1 class id, all agreement needs."""
    return _first_output(logits).argmax(dim=-1)


def per_model_preprocess(preprocess: Callable | None) -> Callable | None:
    """Apply a single-model `preprocess_logits_for_metrics` to each model's entry of per-model logits."""
    if preprocess is None:
        return None

    def apply(logits, labels):
        return tuple(preprocess(entry, labels) for entry in logits)

    return apply
