"""The on-disk layout of codistilled runs: which steps are complete, which checkpoint a run resumes from, what is
rotated and unmarked. Folders are made by hand here; `test_distributed.py` checks them after real runs."""

import os

import pytest

from hf_codistill.checkpointing import (
    STATE_NAME,
    get_last_checkpoint,
    group_dir,
    invalidate_checkpoints_after,
    mark_complete,
    read_state,
    resolve_resume_checkpoint,
    rotate_group_checkpoints,
    sibling_checkpoint,
)


def make_step(root, step, groups=(0, 1), num_groups=2, complete=True):
    for group in groups:
        checkpoint = os.path.join(group_dir(str(root), group), f"checkpoint-{step}")
        os.makedirs(checkpoint, exist_ok=True)
        if complete:
            mark_complete(checkpoint, {"num_groups": num_groups, "group_index": group, "global_step": step})


def test_the_last_checkpoint_is_the_last_step_every_group_completed(tmp_path):
    make_step(tmp_path, 10)
    make_step(tmp_path, 20)
    make_step(tmp_path, 30, groups=(0,))  # group 1 crashed while saving step 30
    make_step(tmp_path, 40, complete=False)
    assert get_last_checkpoint(str(tmp_path)) == 20
    assert get_last_checkpoint(str(tmp_path / "nothing")) is None


def test_a_checkpoint_of_another_number_of_groups_names_the_flag(tmp_path):
    make_step(tmp_path, 10, groups=(0, 1, 2), num_groups=3)
    with pytest.raises(ValueError, match="--num_groups 3"):
        get_last_checkpoint(str(tmp_path), num_groups=2)


def test_resume_resolves_any_group_path_to_this_groups_checkpoint(tmp_path):
    make_step(tmp_path, 10)
    group_zero = os.path.join(group_dir(str(tmp_path), 0), "checkpoint-10")
    assert resolve_resume_checkpoint(group_zero, str(tmp_path), 1, 2) == sibling_checkpoint(group_zero, 1)
    assert resolve_resume_checkpoint(True, str(tmp_path), 1, 2) == sibling_checkpoint(group_zero, 1)
    make_step(tmp_path, 20, complete=False)
    with pytest.raises(ValueError, match="incomplete"):
        resolve_resume_checkpoint(os.path.join(group_dir(str(tmp_path), 0), "checkpoint-20"), str(tmp_path), 0, 2)


def test_marking_leaves_no_partial_file_and_reads_back(tmp_path):
    mark_complete(str(tmp_path), {"global_step": 3})
    assert os.listdir(tmp_path) == [STATE_NAME] and read_state(str(tmp_path)) == {"global_step": 3}


def test_a_run_unmarks_the_checkpoints_past_its_start_and_rotation_drops_them(tmp_path):
    for step in (10, 20, 30):
        make_step(tmp_path, step, groups=(0,))
    root = group_dir(str(tmp_path), 0)
    invalidate_checkpoints_after(root, 10)  # a run resumed from step 10: 20 and 30 are another trajectory's
    assert not os.path.isfile(os.path.join(root, "checkpoint-20", STATE_NAME))
    make_step(tmp_path, 15, groups=(0,))
    rotate_group_checkpoints(root, save_total_limit=5)
    # 20 and 30 are newer than the newest complete step (15): kept until this run rewrites or passes them.
    assert sorted(os.listdir(root)) == ["checkpoint-10", "checkpoint-15", "checkpoint-20", "checkpoint-30"]
    make_step(tmp_path, 40, groups=(0,))
    rotate_group_checkpoints(root, save_total_limit=2, keep=os.path.join(root, "checkpoint-10"))
    assert sorted(os.listdir(root)) == ["checkpoint-10", "checkpoint-15", "checkpoint-40"]
