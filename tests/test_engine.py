"""The codistillation engine on its own: alpha's schedule, the loss it adds and records, when peers refresh, and the
checkpoint extras it writes and restores, driven by a minimal one-process driver (no Trainer)."""

import contextlib
import json
import os

import pytest
import torch
from torch import nn

from hf_codistill import CodistillTrainingArguments
from hf_codistill.checkpointing import INIT_NAME, PEERS_NAME, STATE_NAME, group_dir
from hf_codistill.engine import CodistillEngine
from hf_codistill.local_peers import LocalPeers
from hf_codistill.losses import distillation_loss


class Classifier(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return {"logits": self.linear(x)}


class Driver:
    """The smallest `CodistillDriver`: G models in one process, checkpoints under `root/group_<g>`."""

    group_size = 1

    def __init__(self, root, models, resume=None, num_peers=None):
        self.root, self.models, self.resume, self.num_peers = root, models, resume, num_peers
        self.num_groups = len(models)
        self.barriers, self.run_info_written = [], 0

    def codistilled_models(self):
        return dict(enumerate(self.models))

    def make_peer_set(self, models):
        return LocalPeers(models, live=False, num_peers=self.num_peers)

    def resume_checkpoints(self):
        return self.resume

    def group_folder(self, group):
        return group_dir(self.root, group)

    def barrier(self, name):
        self.barriers.append(name)

    def prepare_checkpoint(self, step):
        pass

    def write_run_info(self):
        self.run_info_written += 1


def make_engine(tmp_path, models=None, resume=None, **args):
    models = models or [Classifier(0), Classifier(1)]
    args = CodistillTrainingArguments(str(tmp_path), use_cpu=True, report_to="none", codistill=True,
                                      num_groups=len(models), **args)
    driver = Driver(str(tmp_path), models, resume, args.codistill_num_peers)
    return CodistillEngine(args, driver, autocast=contextlib.nullcontext), driver


def test_alpha_is_zero_in_the_burn_in_then_ramps_linearly(tmp_path):
    engine, _ = make_engine(tmp_path, codistill_alpha=2.0, codistill_burn_in_steps=3, codistill_alpha_warmup_steps=4)
    assert [engine.current_alpha(step) for step in range(9)] == [0, 0, 0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0]


def test_start_shares_nothing_for_models_from_a_config_and_copies_the_peers(tmp_path):
    engine, driver = make_engine(tmp_path)
    engine.start(step=0)
    first, second = driver.models
    assert not torch.equal(first.linear.weight, second.linear.weight)  # built from configs: apart
    assert torch.equal(engine.peers.peers_of(0)[1].linear.weight, second.linear.weight)
    assert driver.run_info_written == 1 and set(engine.initial_parameters) == {0, 1}


def test_a_shared_initialisation_starts_every_model_from_model_0(tmp_path):
    engine, driver = make_engine(tmp_path, codistill_shared_init=True)
    engine.start(step=0)
    assert torch.equal(driver.models[0].linear.weight, driver.models[1].linear.weight)


@pytest.mark.parametrize("scaled", [False, True])
def test_the_term_is_added_on_the_task_loss_footing_and_recorded_per_optimizer_step(tmp_path, scaled):
    engine, driver = make_engine(tmp_path, codistill_alpha=0.5)
    engine.start(step=0)
    with torch.no_grad():
        driver.models[1].linear.weight.add_(1.0)  # the live model moves; the stale peer copy does not
    x = torch.randn(5, 4)
    labels = torch.tensor([0, 1, 2, 0, 1])
    logits = driver.models[0](x)["logits"]
    task = torch.tensor(1.25)
    total = engine.loss_with_distillation(0, task, logits, {"x": x}, labels, step=0, ga_steps=2,
                                          loss_is_scaled_for_ga=scaled)
    with torch.no_grad():
        term = distillation_loss(logits, engine.peers.peers_of(0)[1](x)["logits"])
    torch.testing.assert_close(total, task + 0.5 * (term / 2 if scaled else term))
    logs = engine.pop_metrics(step=1)
    torch.testing.assert_close(logs[0]["distill_loss"], term.item() / 2)
    assert logs[0]["task_loss"] == pytest.approx(1.25 if scaled else 0.625)
    assert logs[0]["alpha"] == 0.5 and logs[0]["peer_exchanges"] == 1
    assert logs[0]["param_distance_from_init"] == 0.0 and logs[1]["param_distance_from_init"] > 0


def test_peers_refresh_every_k_steps(tmp_path):
    engine, driver = make_engine(tmp_path, codistill_sync_every=3)
    engine.start(step=0)
    peer = engine.peers.peers_of(0)[1]
    for step in range(1, 7):
        with torch.no_grad():
            driver.models[1].linear.bias.add_(1.0)
        engine.after_step(step)
        assert torch.equal(peer.linear.bias, driver.models[1].linear.bias) == (step % 3 == 0)
    assert engine.peers.last_exchange_step == 6 and engine.peers.num_exchanges == 3


def test_a_checkpoint_is_marked_after_its_files_and_restores_the_peers(tmp_path):
    engine, driver = make_engine(tmp_path, codistill_sync_every=2)
    engine.start(step=0)
    with torch.no_grad():
        driver.models[1].linear.bias.add_(1.0)
    engine.after_step(2)
    saved_peer = engine.peers.peers_of(0)[1].linear.bias.clone()
    engine.save_checkpoint(step=2, writer=True, best_checkpoint=None)
    assert driver.barriers == ["checkpoint-written", "checkpoint-complete"]
    for group in (0, 1):
        checkpoint = os.path.join(group_dir(str(tmp_path), group), "checkpoint-2")
        assert {PEERS_NAME, INIT_NAME, STATE_NAME} <= set(os.listdir(checkpoint))
        with open(os.path.join(checkpoint, STATE_NAME)) as f:
            state = json.load(f)
        assert state["group_index"] == group and state["global_step"] == 2 and state["last_exchange_step"] == 2

    with torch.no_grad():
        driver.models[1].linear.bias.add_(5.0)  # moves on after the checkpoint
    resumed, _ = make_engine(tmp_path, models=driver.models, codistill_sync_every=2, resume={
        group: os.path.join(group_dir(str(tmp_path), group), "checkpoint-2") for group in (0, 1)})
    resumed.start(step=2)
    assert torch.equal(resumed.peers.peers_of(0)[1].linear.bias, saved_peer)
    assert resumed.peers.num_exchanges == 2 and resumed.peers.last_exchange_step == 2
    torch.testing.assert_close(resumed.initial_parameters[1].tensors["linear.bias"],
                               engine.initial_parameters[1].tensors["linear.bias"])


def test_a_bounded_peer_set_distils_from_the_next_groups_on_a_ring(tmp_path):
    """G = 4, m = 1: model g distils from model g + 1 (mod 4) alone; the term is the KL to that one, by hand."""
    engine, driver = make_engine(tmp_path, models=[Classifier(seed) for seed in range(4)], codistill_num_peers=1)
    engine.start(step=0)
    assert {group: list(engine.peers.peers_of(group)) for group in range(4)} == {0: [1], 1: [2], 2: [3], 3: [0]}
    x = torch.randn(6, 4)
    logits = driver.models[3](x)["logits"]
    term = engine.distillation_term(3, logits, {"x": x}, torch.zeros(6, dtype=torch.long))
    with torch.no_grad():
        target = torch.softmax(driver.models[0](x)["logits"], dim=-1)
    by_hand = (target * (target.log() - torch.log_softmax(logits, dim=-1))).sum(dim=-1).mean()
    torch.testing.assert_close(term, by_hand)
    assert set(engine.peers.state_dict(3)) == {"group_0.linear.weight", "group_0.linear.bias"}
