"""Codistillation across real processes: 4 CPU workers on gloo, tiny ViTs on scikit-learn's digits."""

import json
import math
import shutil

import pytest
from transformers import ViTForImageClassification

from hf_codistill import get_last_checkpoint
from hf_codistill.checkpointing import STATE_NAME, resolve_resume_checkpoint
from hf_codistill.exchange import exchanged_tensors
from tests.conftest import SCRIPTS
from tests.scripts.train_digits import checksum, tiny_vit

SCRIPT = SCRIPTS / "train_digits.py"
COMMON = ["--per_device_train_batch_size", "16", "--max_steps", "8", "--logging_steps", "2", "--report_to", "none",
          "--learning_rate", "1e-3", "--seed", "42"]
CODISTILL = ["--codistill", "--num_groups", "2", "--codistill_sync_every", "3"]


def by_step(log_history, key):
    return {entry["step"]: entry[key] for entry in log_history if key in entry}


@pytest.fixture(scope="module")
def codistill_run(tmp_path_factory, launcher):
    """One 4-process, 2-group run with checkpoints every 4 steps; several tests read it."""
    root = tmp_path_factory.mktemp("codistill")
    out = root / "out"
    ranks = launcher(SCRIPT, 4, [*COMMON, *CODISTILL, "--output_dir", str(out), "--save_steps", "4", "--x-save=1"],
                     root / "results")
    return out, ranks


def test_groups_are_contiguous_rank_blocks(codistill_run):
    _, ranks = codistill_run
    assert [(r["group_index"], r["group_rank"], r["group_size"]) for r in ranks] == [(0, 0, 2), (0, 1, 2),
                                                                                    (1, 0, 2), (1, 1, 2)]


def test_ranks_agree_inside_a_group_and_groups_differ(codistill_run):
    _, ranks = codistill_run
    assert ranks[0]["final_params"] == ranks[1]["final_params"]
    assert ranks[2]["final_params"] == ranks[3]["final_params"]
    assert ranks[0]["final_params"] != ranks[2]["final_params"]
    # Built from a config, the two groups started from different random weights.
    assert ranks[0]["steps"][0]["own"] != ranks[2]["steps"][0]["own"]


def test_peer_copies_change_only_every_k_steps_and_equal_the_peer_then(codistill_run):
    _, ranks = codistill_run
    own = {r["group_index"]: {s["step"]: s["own"] for s in r["steps"]} for r in ranks}
    for rank in ranks:
        peer_group = 1 - rank["group_index"]
        history = {s["step"]: s["peers"][str(peer_group)] for s in rank["steps"]}
        changed = [step for step in range(2, 9) if history[step] != history[step - 1]]
        assert changed == [3, 6]
        for step in (3, 6):
            assert history[step] == own[peer_group][step]


def test_background_exchange_lands_one_step_later(tmp_path, launcher):
    """`codistill_overlap_exchange`: the exchange started at step s (k = 3) is in the peers from step s + 1."""
    ranks = launcher(SCRIPT, 4, [*COMMON, *CODISTILL, "--codistill_overlap_exchange", "true", "--output_dir",
                                 str(tmp_path / "out"), "--save_steps", "4"], tmp_path / "results")
    own = {r["group_index"]: {s["step"]: s["own"] for s in r["steps"]} for r in ranks}
    for rank in ranks:
        peer_group = 1 - rank["group_index"]
        history = {s["step"]: s["peers"][str(peer_group)] for s in rank["steps"]}
        assert [step for step in range(2, 9) if history[step] != history[step - 1]] == [4, 7]
        assert history[4] == own[peer_group][3] and history[7] == own[peer_group][6]
    assert (tmp_path / "out" / "group_1" / "checkpoint-4" / "codistill_state.json").is_file()


def test_peers_in_bfloat16_with_a_shared_initialisation(tmp_path, launcher):
    """`codistill_peer_dtype=bfloat16`: the peers hold each peer's weights rounded to bfloat16, the exchange moves half
    the bytes, and a shared initialisation still starts both groups from group 0's exact float32 weights."""
    ranks = launcher(SCRIPT, 4, [*COMMON, *CODISTILL, "--codistill_peer_dtype", "bfloat16", "--codistill_shared_init",
                                 "true", "--output_dir", str(tmp_path / "out"), "--save_strategy", "no"],
                     tmp_path / "results")
    assert len({r["start_params"] for r in ranks}) == 1
    assert len({r["final_params"] for r in ranks if r["group_index"] == 0} | {ranks[2]["final_params"]}) == 2
    rounded = {r["group_index"]: {s["step"]: s["own_in_peer_dtype"] for s in r["steps"]} for r in ranks}
    for rank in ranks:
        steps = {s["step"]: s for s in rank["steps"]}
        assert steps[8]["peer_dtypes"] == ["torch.bfloat16"]
        peer_group = 1 - rank["group_index"]
        assert steps[3]["peers"][str(peer_group)] == rounded[peer_group][3]
        assert steps[6]["peers"][str(peer_group)] == rounded[peer_group][6]
    model_bytes = sum(t.numel() * t.element_size() for t in exchanged_tensors(tiny_vit()).values())
    sent = by_step(ranks[0]["log_history"], "group_0/peer_exchange_bytes_sent")
    assert sent[8] == 3 * model_bytes // 2 // 2  # 3 exchanges of half a model per rank, in 2 bytes per value
    assert all(math.isfinite(r["eval"]["eval_loss"]) for r in ranks)


def test_logged_bytes_are_one_model_per_peer_per_exchange(codistill_run):
    _, ranks = codistill_run
    model_bytes = sum(t.numel() * t.element_size() for t in exchanged_tensors(tiny_vit()).values())
    logs = ranks[0]["log_history"]
    for group in (0, 1):
        exchanges = by_step(logs, f"group_{group}/peer_exchanges")
        sent = by_step(logs, f"group_{group}/peer_exchange_bytes_sent")
        # One exchange at the start (step 0), then at steps 3 and 6.
        assert exchanges == {2: 1, 4: 2, 6: 3, 8: 3}
        # Sharded over the group's 2 ranks: each rank moves half of the one peer model, the group a whole one.
        assert all(sent[step] == exchanges[step] * 1 * model_bytes // 2 for step in sent)


def test_every_group_reaches_world_rank_zero_logs(codistill_run):
    _, ranks = codistill_run
    logs = ranks[0]["log_history"]
    for group in (0, 1):
        task = by_step(logs, f"group_{group}/task_loss")
        distill = by_step(logs, f"group_{group}/distill_loss")
        total = by_step(logs, f"group_{group}/loss")
        assert sorted(task) == [2, 4, 6, 8] and all(distill[s] > 0 for s in distill)
        # alpha = 1: the logged loss is the task loss plus the distillation term.
        assert all(total[s] == pytest.approx(task[s] + distill[s], rel=1e-5) for s in task)
        assert all(by_step(logs, f"group_{group}/param_distance_from_init")[s] > 0 for s in task)
        assert f"group_{group}/eval_loss" in logs[-1]
    # Each group's own evaluation: the group's ranks agree, the groups differ.
    assert ranks[0]["eval"]["eval_loss"] == ranks[1]["eval"]["eval_loss"] != ranks[2]["eval"]["eval_loss"]
    assert logs[-1]["group_1/eval_loss"] == ranks[2]["eval"]["eval_loss"]


def test_saved_models_load_with_from_pretrained(codistill_run):
    out, ranks = codistill_run
    group_1 = ViTForImageClassification.from_pretrained(out, subfolder="group_1")
    assert checksum(group_1.parameters()) == ranks[2]["final_params"]
    root = ViTForImageClassification.from_pretrained(out)
    assert checksum(root.parameters()) == ranks[0]["final_params"]
    info = json.loads((out / "codistill.json").read_text())
    assert info["num_groups"] == 2 and info["groups"] == ["group_0", "group_1"]


def test_checkpoints_hold_every_group_and_the_peers(codistill_run):
    out, _ = codistill_run
    assert get_last_checkpoint(str(out), num_groups=2) == 8
    state = json.loads((out / "group_1" / "checkpoint-4" / STATE_NAME).read_text())
    assert state["last_exchange_step"] == 3 and state["num_groups"] == 2


def test_half_written_checkpoint_is_not_resumed(codistill_run, tmp_path):
    out, _ = codistill_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    (copy / "group_1" / "checkpoint-8" / STATE_NAME).unlink()
    assert get_last_checkpoint(str(copy), num_groups=2) == 4
    with pytest.raises(ValueError, match="missing or incomplete"):
        resolve_resume_checkpoint(str(copy / "group_0" / "checkpoint-8"), str(copy), 1, 2)


def test_checkpoint_from_another_number_of_groups_is_refused(codistill_run):
    out, _ = codistill_run
    with pytest.raises(ValueError, match=r"written with num_groups=2, but num_groups=3.*--num_groups 2"):
        get_last_checkpoint(str(out), num_groups=3)
    with pytest.raises(ValueError, match=r"num_groups=2, but num_groups=4"):
        resolve_resume_checkpoint(True, str(out), 0, 4)


def test_groups_agree_on_best_checkpoints_and_early_stopping(tmp_path, launcher):
    """Group 0 has a new best at every evaluation, group 1 only at the first, and group 1 alone asks to stop at step 4:
    every group saves when any has a new best and all stop together (deciding alone would hang the others). With
    `load_best_model_at_end` each group ends on its own best weights, ViT's renamed keys included. Under
    `save_on_each_node`, group 1 (local ranks 2 and 3 of this one node) still saves."""
    out = tmp_path / "out"
    ranks = launcher(SCRIPT, 4, [*COMMON, *CODISTILL, "--output_dir", str(out), "--eval_strategy", "steps",
                                 "--eval_steps", "2", "--save_strategy", "best", "--metric_for_best_model", "score",
                                 "--greater_is_better", "true", "--load_best_model_at_end", "true",
                                 "--save_on_each_node", "true", "--x-stop_group_one_at=4"],
                     tmp_path / "results", timeout=300)
    assert [len(rank["steps"]) for rank in ranks] == [4, 4, 4, 4]
    for group in (0, 1):
        saved = sorted(int(path.name.split("-")[1]) for path in (out / f"group_{group}").glob("checkpoint-*"))
        assert saved == [2, 4]
        assert all((out / f"group_{group}" / f"checkpoint-{step}" / STATE_NAME).is_file() for step in saved)
    assert get_last_checkpoint(str(out), num_groups=2) == 4
    for rank, best_step in ((0, 4), (2, 2)):
        best = ViTForImageClassification.from_pretrained(out / f"group_{rank // 2}" / f"checkpoint-{best_step}")
        assert ranks[rank]["final_params"] == checksum(best.parameters())
    assert ranks[2]["final_params"] != ranks[2]["steps"][-1]["own"]


def test_groups_read_their_own_part_of_a_stream(tmp_path, launcher):
    """A stream cannot be reshuffled per group: each group reads its own half of it (a `datasets.IterableDataset` of 4
    shards), and its two ranks their own examples of that half."""
    ranks = launcher(SCRIPT, 4, [*COMMON[:3], "3", *COMMON[4:], *CODISTILL, "--output_dir", str(tmp_path / "out"),
                                 "--save_strategy", "no", "--ddp_timeout", "900", "--x-stream=1"],
                     tmp_path / "results")
    assert [rank["timeout_s"] for rank in ranks] == [900] * 4  # `--ddp_timeout` reaches the groups and the store
    # The group's first rank reads for both (accelerate dispatches a stream's batches): 3 steps of 2 x 16 examples
    # and one batch ahead, without repeats.
    seen = [rank["seen"] for rank in ranks]
    by_group = [seen[0] + seen[1], seen[2] + seen[3]]
    assert [len(examples) for examples in by_group] == [128, 128]
    assert all(len(set(examples)) == len(examples) for examples in by_group)
    assert not set(by_group[0]) & set(by_group[1])


def test_resume_continues_the_uninterrupted_trajectory(codistill_run, tmp_path, launcher):
    out, ranks = codistill_run
    resumed_out = tmp_path / "out"
    shutil.copytree(out, resumed_out)
    for group in (0, 1):
        shutil.rmtree(resumed_out / f"group_{group}" / "checkpoint-8")
    resumed = launcher(SCRIPT, 4, [*COMMON, *CODISTILL, "--output_dir", str(resumed_out), "--save_steps", "4",
                                   "--x-resume=true"], tmp_path / "results")
    for before, after in zip(ranks, resumed):
        assert after["final_params"] == before["final_params"]
        assert [s["peers"] for s in after["steps"]] == [s["peers"] for s in before["steps"][4:]]
    for group in (0, 1):
        key = f"group_{group}/loss"
        assert by_step(resumed[0]["log_history"], key)[8] == by_step(ranks[0]["log_history"], key)[8]


def test_alpha_zero_matches_plain_trainer_ddp(tmp_path, launcher):
    """With alpha = 0 each group is exactly a plain Trainer DDP run on its n ranks with seed + group index.

    The plain run has no `--use_cpu`: on a machine without an accelerator the arguments still make one DDP world of
    the launched processes (else each would train alone on the whole data set, and the steps would differ)."""
    codistilled = launcher(SCRIPT, 4, [*COMMON, *CODISTILL, "--codistill_alpha", "0", "--output_dir",
                                       str(tmp_path / "codistill"), "--save_strategy", "no"], tmp_path / "r_codistill")
    plain = launcher(SCRIPT, 2, [*COMMON[:-1], "43", "--output_dir", str(tmp_path / "plain"),
                                 "--save_strategy", "no"], tmp_path / "r_plain")
    assert plain[0]["group_size"] == 2
    group_1 = codistilled[2]
    assert [s["own"] for s in group_1["steps"]] == [s["own"] for s in plain[0]["steps"]]
    assert by_step(codistilled[0]["log_history"], "group_1/loss") == by_step(plain[0]["log_history"], "loss")


@pytest.mark.parametrize("num_groups,launcher_name,accumulation,shared", [(3, "torchrun", 2, "true"),
                                                                          (4, "accelerate", 1, "false")])
def test_one_process_per_group(tmp_path, launcher, num_groups, launcher_name, accumulation, shared):
    short = [*COMMON[:3], "4", *COMMON[4:], "--gradient_accumulation_steps", str(accumulation),
             "--codistill_shared_init", shared]
    ranks = launcher(SCRIPT, num_groups, [*short, "--codistill", "--num_groups",
                                          str(num_groups), "--codistill_sync_every", "2", "--output_dir",
                                          str(tmp_path / "out"), "--save_strategy", "no"],
                     tmp_path / "results", launcher=launcher_name)
    assert [r["group_index"] for r in ranks] == list(range(num_groups))
    # A shared initialisation starts every group from group 0's weights; different data orders then part them.
    assert len({r["start_params"] for r in ranks}) == (1 if shared == "true" else num_groups)
    assert len({r["final_params"] for r in ranks}) == num_groups
    model_bytes = sum(t.numel() * t.element_size() for t in exchanged_tensors(tiny_vit()).values())
    for group in range(num_groups):
        assert len(ranks[group]["steps"][-1]["peers"]) == num_groups - 1
        # Exchanges at steps 0, 2 and 4, each bringing the other num_groups - 1 models.
        sent = by_step(ranks[0]["log_history"], f"group_{group}/peer_exchange_bytes_sent")
        assert sent[4] == 3 * (num_groups - 1) * model_bytes
        # With or without gradient accumulation the logged loss splits into task + alpha * distillation.
        logs = ranks[0]["log_history"]
        task, distill = by_step(logs, f"group_{group}/task_loss"), by_step(logs, f"group_{group}/distill_loss")
        total = by_step(logs, f"group_{group}/loss")
        assert all(total[s] == pytest.approx(task[s] + distill[s], rel=1e-5) for s in total)
