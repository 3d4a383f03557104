"""Ensemble and agreement metrics against hand computations, as functions, `compute_metrics` and `evaluate` modules."""

import json

import evaluate
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from transformers import EvalPrediction

from hf_codistill.metrics import metric_path
from hf_codistill.peer_evaluation import PeerEvaluation
from hf_codistill.peer_metrics import ensemble_logits, peer_compute_metrics, top1_agreement

# Three models, four positions; the last position is unlabelled (-100).
PREDICTIONS = [np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4]), np.array([1, 0, 0, 0])]
LABELS = np.array([1, 2, 0, -100])


def test_ensemble_is_the_log_of_the_mean_probability():
    a = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 3.0], [1.0, 1.0]])
    expected = torch.log((torch.softmax(a, -1) + torch.softmax(b, -1)) / 2)
    assert torch.allclose(ensemble_logits([a, b]), expected)
    # Model 0 is confident in class 0, model 1 more confident in class 1: the ensemble picks class 1.
    assert ensemble_logits([a, b])[0].argmax().item() == 1
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(2, 3\)|\(2, 3\).*\(2, 2\)"):
        ensemble_logits([a, torch.zeros(2, 3)])


def test_agreement_pairwise_mean_and_mask():
    assert top1_agreement(PREDICTIONS) == pytest.approx(
        {"agreement_0_1": 3 / 4, "agreement_0_2": 1 / 4, "agreement_1_2": 2 / 4, "agreement_mean": 1.5 / 3}
    )
    masked = top1_agreement(PREDICTIONS, mask=LABELS != -100)
    assert masked == pytest.approx(
        {"agreement_0_1": 2 / 3, "agreement_0_2": 1 / 3, "agreement_1_2": 2 / 3, "agreement_mean": 5 / 9}
    )
    with pytest.raises(ValueError, match="at least 2 models"):
        top1_agreement(PREDICTIONS[:1])


def test_peer_compute_metrics_scores_each_model_and_the_ensemble():
    logits = [np.eye(5)[p] * 4.0 for p in PREDICTIONS]  # confident one-hot logits

    def accuracy(eval_pred):
        counted = eval_pred.label_ids != -100
        return {"accuracy": float((eval_pred.predictions.argmax(-1) == eval_pred.label_ids)[counted].mean())}

    metrics = peer_compute_metrics(accuracy)(EvalPrediction(predictions=tuple(logits), label_ids=LABELS))
    assert metrics["accuracy"] == metrics["group_0/accuracy"] == pytest.approx(2 / 3)
    assert metrics["group_1/accuracy"] == pytest.approx(3 / 3)
    assert metrics["group_2/accuracy"] == pytest.approx(2 / 3)
    # Majority vote of the one-hot models: [1, 2, 0, *] -> all three labelled positions right.
    assert metrics["ensemble_accuracy"] == pytest.approx(1.0)
    ensemble = ensemble_logits([torch.as_tensor(model_logits) for model_logits in logits])
    expected_loss = -np.mean([ensemble[position, label].item() for position, label in enumerate(LABELS[:3])])
    assert metrics["ensemble_loss"] == pytest.approx(expected_loss)
    assert metrics["agreement_mean"] == pytest.approx(5 / 9)
    # `codistill_peer_metrics=False`: each model's own metrics only.
    own_only = peer_compute_metrics(accuracy, with_peer_metrics=False)(
        EvalPrediction(predictions=tuple(logits), label_ids=LABELS))
    assert own_only == {key: metrics[key] for key in ("accuracy", "group_0/accuracy", "group_1/accuracy",
                                                      "group_2/accuracy")}


def test_causal_lm_positions_follow_the_shifted_labels():
    # Position t predicts label t + 1: only positions 0 and 1 predict a labelled token.
    ids = [np.array([[5, 6, 7]]), np.array([[5, 0, 7]])]
    labels = np.array([[-100, 1, 1]])
    metrics = peer_compute_metrics(shift_labels=True)(EvalPrediction(predictions=tuple(ids), label_ids=labels))
    assert metrics["agreement_0_1"] == pytest.approx(1 / 2)
    assert "ensemble_accuracy" not in metrics  # top-1 ids give agreement, not an ensemble


def test_shipped_evaluate_modules_load_offline_and_agree_with_the_functions():
    agreement = evaluate.load(metric_path("agreement"))
    rows = np.stack(PREDICTIONS, axis=1)
    assert agreement.compute(predictions=rows) == pytest.approx(top1_agreement(PREDICTIONS))
    assert agreement.compute(predictions=rows, labels=LABELS) == pytest.approx(
        top1_agreement(PREDICTIONS, LABELS != -100)
    )
    logits = np.stack([np.eye(5)[p] * 4.0 for p in PREDICTIONS], axis=1).astype(np.float32)
    ensemble = evaluate.load(metric_path("ensemble_accuracy"))
    assert ensemble.compute(predictions=logits, references=LABELS) == {"ensemble_accuracy": pytest.approx(1.0)}


def test_peer_evaluation_concatenates_batches_of_different_lengths():
    """Sequences padded per batch (e.g. `--line_by_line`) give batches of different lengths: agreement counts each
    labelled position once, padding never."""
    evaluation = PeerEvaluation(Accelerator(cpu=True), group_index=0, causal=False)
    generator = torch.Generator().manual_seed(0)
    for length in (5, 3):
        own = torch.randn(2, length, 7, generator=generator)
        labels = torch.randint(0, 7, (2, length), generator=generator)
        labels[:, 0] = -100
        evaluation.add_batch(own, [own.clone()], labels)
    metrics = evaluation.metrics(None, "eval")
    assert evaluation.scored_positions == 2 * 4 + 2 * 2  # every labelled position once, across both lengths
    assert metrics["eval_agreement_0_1"] == 1.0 and metrics["eval_ensemble_loss"] > 0


def test_peer_metrics_skip_regression_heads():
    """One output and float labels: no classes to ensemble or compare, and no crash at evaluation."""
    evaluation = PeerEvaluation(Accelerator(cpu=True), group_index=1, causal=False)
    evaluation.add_batch(torch.randn(4, 1), [torch.randn(4, 1)], torch.randn(4))
    assert evaluation.metrics(None, "eval") == {}
    compute = peer_compute_metrics(lambda p: {"mse": float(((p.predictions[:, 0] - p.label_ids) ** 2).mean())})
    metrics = compute(EvalPrediction(predictions=(np.zeros((4, 1)), np.ones((4, 1))), label_ids=np.zeros(4)))
    assert metrics == {"mse": 0.0, "group_0/mse": 0.0, "group_1/mse": 1.0}


def test_peer_evaluation_gives_plain_numbers_and_keeps_predictions_only_for_compute_metrics():
    """The metrics cross processes as JSON: numpy scalars from a user's `compute_metrics` must not reach the logs.
    Without `compute_metrics`, nothing reads the ensemble's (examples x positions x vocabulary) predictions."""
    generator = torch.Generator().manual_seed(0)
    own, peer = torch.randn(2, 2, 4, 7, generator=generator)
    labels = torch.randint(0, 7, (2, 4), generator=generator)
    kept = PeerEvaluation(Accelerator(cpu=True), group_index=0, causal=True)
    kept.add_batch(own, [peer], labels)
    metrics = kept.metrics(lambda p: {"accuracy": np.float32(0.5)}, "eval")
    assert type(metrics["eval_ensemble_accuracy"]) is float and type(metrics["eval_agreement_0_1"]) is float
    assert json.loads(json.dumps(metrics))["eval_ensemble_accuracy"] == 0.5
    lean = PeerEvaluation(Accelerator(cpu=True), group_index=0, causal=True, keep_predictions=False)
    lean.add_batch(own, [peer], labels)
    assert lean.ensemble_predictions is None and lean.labels is None
    assert lean.metrics(None, "eval") == kept.metrics(None, "eval")
    assert kept.ensemble_predictions.shape == (2, 4, 7)
