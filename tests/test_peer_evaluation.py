"""Peer evaluation gives the same numbers launched (a group fetches its peers) and in one process (every model at
hand), with or without a `compute_metrics`: the ensemble's loss and the agreement always, its metrics with one."""

import pytest
import torch

from hf_codistill import CodistillTrainer, CodistillTrainingArguments
from hf_codistill.peer_evaluation import PeerEvaluation
from tests.conftest import SCRIPTS
from tests.scripts.train_digits import accuracy, digits_dataset, tiny_vit

ARGS = ["--per_device_eval_batch_size", "64", "--report_to", "none", "--seed", "42"]


def shared_keys(metrics):
    """The keys both modes report: not the timings, not one process's per-model `group_<g>/` copies."""
    timings = ("runtime", "per_second", "_time")
    return {key for key in metrics if not key.startswith("group_") and not key.endswith(timings)}


def test_launched_and_one_process_peer_metrics_agree(tmp_path, launcher):
    launched = launcher(SCRIPTS / "train_digits.py", 2,
                        [*ARGS, "--codistill", "--num_groups", "2", "--output_dir", str(tmp_path / "launched"),
                         "--x-eval_only=1", "--x-accuracy=1"], tmp_path / "results")
    group_zero = launched[0]
    models = []
    for group in range(2):  # what group g builds: a tiny ViT under seed + g
        from transformers import set_seed

        set_seed(42 + group)
        models.append(tiny_vit())
    _, eval_data = digits_dataset(256)
    args = CodistillTrainingArguments(str(tmp_path / "one"), codistill=True, num_groups=2, use_cpu=True,
                                      per_device_eval_batch_size=64, report_to="none", seed=42)
    trainer = CodistillTrainer(model=models, args=args, eval_dataset=eval_data, compute_metrics=accuracy)
    one_process = trainer.evaluate()
    trainer = CodistillTrainer(model=models, args=args, eval_dataset=eval_data)
    one_process_without = trainer.evaluate()

    for launched_metrics, local_metrics, expected in (
        (group_zero["eval"], one_process, {"eval_loss", "eval_accuracy", "eval_ensemble_loss",
                                           "eval_ensemble_accuracy", "eval_agreement_0_1", "eval_agreement_mean"}),
        (group_zero["eval_without_compute_metrics"], one_process_without,
         {"eval_loss", "eval_ensemble_loss", "eval_agreement_0_1", "eval_agreement_mean"}),
    ):
        assert shared_keys(launched_metrics) - {"epoch"} == expected
        assert shared_keys(local_metrics) - {"epoch"} == expected
        for key in expected:
            assert local_metrics[key] == pytest.approx(launched_metrics[key], rel=1e-5), key
    # Two models from different random initialisations: they disagree, and the ensemble is neither of them.
    assert one_process["eval_agreement_0_1"] < 1
    assert len({one_process["eval_loss"], one_process["group_1/eval_loss"], one_process["eval_ensemble_loss"]}) == 3


class _OneProcess:
    """What `PeerEvaluation` asks of an accelerator, for one process."""

    def gather_for_metrics(self, tensor):
        return tensor

    def pad_across_processes(self, tensor, dim, pad_index):
        return tensor


def test_pairs_are_named_by_group_when_only_some_peers_are_scored():
    """Groups launched apart score only their live peers: group 2 beside group 0 alone reports `agreement_0_2`."""
    labels = torch.tensor([0, 1, 2, 1])
    own = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 2]), 3).float() * 5
    peer = torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 0]), 3).float() * 5
    evaluation = PeerEvaluation(_OneProcess(), group_index=2, causal=False, keep_predictions=False, peer_groups=[0])
    evaluation.add_batch(own, [peer], labels)
    metrics = evaluation.metrics(None, "eval")
    assert metrics["eval_agreement_0_2"] == 0.5 and metrics["eval_agreement_mean"] == 0.5
    assert set(metrics) == {"eval_ensemble_loss", "eval_agreement_0_2", "eval_agreement_mean"}
