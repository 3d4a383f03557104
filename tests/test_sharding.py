"""FSDP2 groups: peers sharded like the student and exchanged shard to shard (`hf_codistill.sharding`), checked on
4 CPU processes (2 groups x 2): with torch's `fully_shard` applied directly, against unsharded references, and
through `CodistillTrainer(fsdp=...)` (accelerate's FSDP2 path, enabled on the CPU by `scripts/fsdp_on_cpu.py`),
against the same groups trained with DDP."""

import json

import pytest
import torch
from safetensors.torch import load
from transformers import GPT2LMHeadModel

from tests.conftest import SCRIPTS
from tests.hub_server import USER, RecordingHub


def test_sharded_peers_equal_the_other_groups_model_bit_for_bit(tmp_path, launcher):
    launcher(SCRIPTS / "sharded_peers.py", 4, [str(tmp_path)], None)
    ranks = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank*.json"))]
    assert [rank["group"] for rank in ranks] == [0, 0, 1, 1]
    for rank in ranks:
        # After a distilled training step of the sharded student (equal to the whole reference's step) and a second
        # exchange, the peer gathered whole is the other group's model, bit for bit, and computes its logits.
        assert rank["student_matches_reference"] and rank["peer_equals_other_group"] and rank["peer_logits_match"]
        assert not rank["peer_requires_grad"]
        # Each rank holds half of the peer (P/n) and sends its shards only: P/n per exchange, nothing gathered in
        # the group.
        assert rank["peer_local_numel"] * 2 == rank["model_numel"]
        assert rank["bytes_sent"] == 2 * rank["local_bytes"] and rank["group_bytes_received"] == 0


# ---- The Trainer path: `CodistillTrainer` with `fsdp` over 2 groups x 2 CPU processes ----------------------------

TRAIN = ["--codistill", "--num_groups", "2", "--codistill_sync_every", "2", "--max_steps", "8", "--save_steps", "4",
         "--logging_steps", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
         "--learning_rate", "3e-3", "--report_to", "none"]


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory, launcher):
    """Four launches of `train_sharded.py`: FSDP2 with sharded checkpoints, the same resumed from its step 4, the
    same arguments without the CPU shim, which accelerate trains with DDP (the reference), and FSDP2 with the
    background exchange."""
    root = tmp_path_factory.mktemp("fsdp_trainer")
    config = root / "fsdp.json"
    config.write_text(json.dumps({"version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"],
                                  "state_dict_type": "SHARDED_STATE_DICT"}))
    fsdp = ["--fsdp", "full_shard", "--fsdp_config", str(config)]
    out = root / "out"
    with RecordingHub() as hub:  # the fresh run pushes each group's model (`save_model`) to a local recording Hub
        runs = {"fsdp": launcher(
            SCRIPTS / "train_sharded.py", 4,
            [*TRAIN, *fsdp, "--output_dir", str(out), "--x-shard_on_cpu=1", "--push_to_hub", "--hub_model_id",
             "gpt2-fsdp", "--hub_token", "hf_codistillTestToken0123456789", "--hub_strategy", "end"],
            root / "fsdp", env={"HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": None, "HF_HUB_DISABLE_TELEMETRY": "1"})}
    runs["hub"] = hub
    runs["saved"] = {group: GPT2LMHeadModel.from_pretrained(out / f"group_{group}").state_dict() for group in (0, 1)}
    runs["checkpoint"] = sorted(path.name for path in (out / "group_1" / "checkpoint-4").iterdir())
    runs["resumed"] = launcher(SCRIPTS / "train_sharded.py", 4, [
        *TRAIN, *fsdp, "--output_dir", str(out), "--x-shard_on_cpu=1",
        f"--x-resume={out / 'group_0' / 'checkpoint-4'}"], root / "resumed")
    runs["ddp"] = launcher(SCRIPTS / "train_sharded.py", 4, [*TRAIN, *fsdp, "--output_dir", str(root / "ddp")],
                           root / "ddp")
    runs["overlap"] = launcher(SCRIPTS / "train_sharded.py", 4, [
        *TRAIN, *fsdp, "--output_dir", str(root / "overlap"), "--x-shard_on_cpu=1",
        "--codistill_overlap_exchange", "true"], root / "overlap")
    return runs


@pytest.mark.slow
def test_fsdp2_groups_train_through_the_trainer_as_ddp_groups_do(sharded_runs):
    fsdp, ddp = sharded_runs["fsdp"], sharded_runs["ddp"]
    assert [rank["group"] for rank in fsdp] == [0, 0, 1, 1]
    for rank in fsdp:
        # accelerate's `fully_shard` over the group's 2 ranks; each peer sharded the same way, frozen.
        assert rank["sharded"] and rank["model_class"] == "FSDPGPT2LMHeadModel"
        assert rank["local_numel"] * 2 == rank["model_numel"] == rank["peer_local_numel"] * 2
        assert not rank["peer_requires_grad"]
        # Shard to shard: P/n per exchange and rank (5 during training, 1 for the evaluation), nothing gathered.
        assert rank["bytes_sent"] == 6 * rank["local_numel"] * 4 and rank["group_bytes_received"] == 0
    for rank in ddp:  # on the CPU accelerate drops FSDP and trains with DDP; the library says so
        assert not rank["sharded"] and any("applies FSDP on accelerators only" in m for m in rank["warnings"])
    for own, other in ((0, 2), (2, 0)):
        for mine, theirs in zip(fsdp[own]["steps"], fsdp[other]["steps"]):
            # Every 2 steps the peer becomes the other group's model gathered whole, bit for bit.
            if mine["step"] % 2 == 0:
                assert list(mine["peers"].values()) == [theirs["own"]]
    # The same training as DDP groups: losses, distillation terms and distances agree to float rounding.
    for sharded, replicated in zip(fsdp, ddp):
        assert sharded["start_own"] == replicated["start_own"]
        logged = ("loss", "distill_loss") + (("param_distance_from_init",) if replicated["group_rank"] == 0 else ())
        for name in logged:
            assert [log[name] for log in sharded["logs"]] == pytest.approx(
                [log[name] for log in replicated["logs"]], rel=1e-5)
        assert sharded["eval"]["eval_loss"] == pytest.approx(replicated["eval"]["eval_loss"], rel=1e-5)
        assert sharded["final_own"] == pytest.approx(replicated["final_own"], rel=1e-6)
        assert "eval_agreement_0_1" in sharded["eval"] and "eval_ensemble_loss" in sharded["eval"]
    # The final models are saved whole (gathered), so `from_pretrained(output_dir/group_g)` reads them.
    assert fsdp[0]["saved"] == fsdp[0]["saved_root"] == fsdp[0]["final_own"]
    assert fsdp[2]["saved"] == fsdp[2]["final_own"]


@pytest.mark.slow
def test_fsdp2_groups_push_their_whole_models_to_the_hub(sharded_runs):
    hub = sharded_runs["hub"]
    assert not hub.unhandled, hub.unhandled
    assert set(hub.repos) == {f"{USER}/gpt2-fsdp-group-0", f"{USER}/gpt2-fsdp-group-1"}
    for group in (0, 1):
        files = hub.repos[f"{USER}/gpt2-fsdp-group-{group}"]
        assert {"README.md", "config.json", "model.safetensors"} <= set(files)
        assert "- codistillation" in files["README.md"].decode()
        pushed, saved = load(files["model.safetensors"]), sharded_runs["saved"][group]
        assert pushed.keys() and all(torch.equal(pushed[name], saved[name]) for name in pushed)


@pytest.mark.slow
def test_fsdp2_checkpoints_hold_each_ranks_peer_shards_and_resume_exactly(sharded_runs):
    checkpoint = sharded_runs["checkpoint"]
    # Trainer's sharded model and optimizer state, and beside it each rank's shards of the peers and initial
    # parameters, marked complete once both groups had written step 4.
    assert {"pytorch_model_fsdp_0", "optimizer_0", "codistill_state.json"} <= set(checkpoint)
    assert {f"codistill_{kind}.rank-{rank}.safetensors" for kind in ("peers", "init") for rank in (0, 1)} <= set(
        checkpoint)
    for fresh, resumed in zip(sharded_runs["fsdp"], sharded_runs["resumed"]):
        assert [step["step"] for step in resumed["steps"]] == [5, 6, 7, 8]
        assert resumed["steps"] == fresh["steps"][4:]  # the model and its peers, bit for bit
        assert resumed["final_own"] == fresh["final_own"]
        assert resumed["eval"]["eval_loss"] == fresh["eval"]["eval_loss"]


@pytest.mark.slow
def test_fsdp2_groups_exchange_their_shards_in_the_background(sharded_runs):
    """With `codistill_overlap_exchange` a snapshot of the shards taken at step s lands at the end of step s + 1;
    before a checkpoint (step 4) and the end (step 8) the exchange completes at once."""
    ranks = sharded_runs["overlap"]
    for own, other in ((0, 2), (2, 0)):
        peer = {step["step"]: next(iter(step["peers"].values())) for step in ranks[own]["steps"]}
        theirs = {step["step"]: step["own"] for step in ranks[other]["steps"]}
        assert [peer[s + 1] for s in (2, 6)] == [theirs[s] for s in (2, 6)]
        assert [peer[s] for s in (2, 6)] != [theirs[s] for s in (2, 6)]  # still the previous peer at step s
        assert [peer[s] for s in (4, 8)] == [theirs[s] for s in (4, 8)]
