"""On-disk layout of codistilled runs and what makes a checkpoint complete.

    output_dir/
        config.json, model.safetensors, ...    group 0's final model, so `from_pretrained(output_dir)` works
        codistill.json                          G and the codistillation settings
        group_<g>/                              group g's final model, tokenizer, metrics, model card
            checkpoint-<N>/                     Trainer's checkpoint of group g (model, optimizer, scheduler, RNG)
                codistill_peers.safetensors     its stale peer copies
                codistill_init.safetensors      its initial parameters (distance-from-init diagnostic)
                codistill_peers.rank-<r>.safetensors, codistill_init.rank-<r>.safetensors
                                                instead, for groups sharded with FSDP2: rank r's shards
                codistill_state.json            written last, once every group has written step N

A step N is resumable only when every group's `checkpoint-N` holds `codistill_state.json`; checkpoints are rotated
only after that, so a crash while saving never leaves groups without a common step to resume from. A run unmarks the
checkpoints past the step it starts from (another trajectory's), so it never resumes from them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile

logger = logging.getLogger(__name__)

GROUP_DIR = "group_{}"
STATE_NAME = "codistill_state.json"
PEERS_NAME = "codistill_peers.safetensors"
INIT_NAME = "codistill_init.safetensors"
RUN_INFO_NAME = "codistill.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def rank_file(name: str, rank: int | None) -> str:
    """`name`, or with `rank` (FSDP2 groups, whose peers and initial parameters are sharded) that rank's own file:
    `codistill_peers.safetensors` -> `codistill_peers.rank-1.safetensors`."""
    if rank is None:
        return name
    stem, extension = name.split(".", 1)
    return f"{stem}.rank-{rank}.{extension}"


def group_dir(root: str, group: int) -> str:
    return os.path.join(root, GROUP_DIR.format(group))


def checkpoint_folders(root: str) -> dict[int, str]:
    """Every `checkpoint-<N>` folder under `root`, complete or not, by step."""
    if not os.path.isdir(root):
        return {}
    matches = ((_CHECKPOINT_RE.match(name), name) for name in os.listdir(root))
    return {int(match.group(1)): os.path.join(root, name) for match, name in matches if match}


def _complete_steps(group_root: str) -> dict[int, str]:
    return {step: path for step, path in checkpoint_folders(group_root).items()
            if os.path.isfile(os.path.join(path, STATE_NAME))}


def invalidate_checkpoints_after(group_root: str, step: int) -> None:
    """Unmark the checkpoints past `step`, where a run starts (or resumes). They belong to an earlier trajectory
    (a run resumed from an earlier step, or another run in the same `output_dir`): resuming from one would continue
    that one, and Trainer rewrites their folders in place when this run reaches their step, so after a crash mid-save
    the marker would vouch for a mix of both runs' files. Rotation removes them once older than a complete one."""
    unmarked = []
    for later, path in sorted(_complete_steps(group_root).items()):
        if later > step:
            os.remove(os.path.join(path, STATE_NAME))
            unmarked.append(later)
    if unmarked:
        logger.warning(f"{group_root}: checkpoints of steps {unmarked} are past this run's start (step {step}); they "
                       "belong to another run and will not be resumed from (their files stay until rotation).")


def sibling_checkpoint(checkpoint: str, group: int) -> str:
    """The same step's checkpoint of another group: `root/group_0/checkpoint-N` -> `root/group_<g>/checkpoint-N`."""
    checkpoint = os.path.normpath(checkpoint)
    root = os.path.dirname(os.path.dirname(checkpoint))
    return os.path.join(group_dir(root, group), os.path.basename(checkpoint))


def mark_complete(checkpoint: str, state: dict) -> None:
    """Write the checkpoint's `codistill_state.json` (atomically: a crash leaves no partial marker). Call it once the
    step's files are written in every group: from then on the step is resumable."""
    tmp = os.path.join(checkpoint, STATE_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(state, f, indent=2)
    os.replace(tmp, os.path.join(checkpoint, STATE_NAME))


def read_state(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, STATE_NAME)) as f:
        return json.load(f)


def last_complete_step(group_root: str) -> int | None:
    """The last step one group checkpointed completely (groups launched apart resume from their own), or None."""
    steps = _complete_steps(group_root)
    return max(steps) if steps else None


def get_last_checkpoint(root: str, num_groups: int | None = None) -> int | None:
    """The last step that every group checkpointed completely under `root`, or `None`.

    Raises when the checkpoints there were written with another number of groups.
    """
    group_zero = _complete_steps(group_dir(root, 0))
    if not group_zero:
        return None
    latest = max(group_zero)
    written_with = read_state(group_zero[latest])["num_groups"]
    if num_groups is not None:
        _check_num_groups(written_with, num_groups, f"The checkpoints in {root} were")
    common = set(group_zero)
    for group in range(1, written_with):
        common &= set(_complete_steps(group_dir(root, group)))
    return max(common) if common else None


def resolve_resume_checkpoint(resume_from_checkpoint: str | bool, root: str, group: int, num_groups: int,
                              alone: bool = False) -> str:
    """This group's checkpoint to resume from, given `True` (the last step every group completed; with `alone`, the
    last this group completed, for groups launched apart) or any group's checkpoint path."""
    if resume_from_checkpoint is True:
        if alone:
            step = last_complete_step(group_dir(root, group))
        else:
            step = get_last_checkpoint(root, num_groups)
        if step is None:
            raise ValueError(f"No complete codistillation checkpoint found in {root}.")
    else:
        path = os.path.normpath(str(resume_from_checkpoint))
        match = _CHECKPOINT_RE.match(os.path.basename(path))
        if match is None:
            raise ValueError(
                f"`resume_from_checkpoint` must be True or a path like {group_dir(root, 0)}/checkpoint-500, "
                f"got {path}."
            )
        step = int(match.group(1))
        root = os.path.dirname(os.path.dirname(path))
    checkpoint = os.path.join(group_dir(root, group), f"checkpoint-{step}")
    if not os.path.isfile(os.path.join(checkpoint, STATE_NAME)):
        raise ValueError(
            f"{checkpoint} is missing or incomplete (no {STATE_NAME}); resume from a step every group saved, e.g. "
            f"`resume_from_checkpoint=True`."
        )
    _check_num_groups(read_state(checkpoint)["num_groups"], num_groups, f"{checkpoint} was")
    return checkpoint


def _check_num_groups(written_with: int, num_groups: int, what: str) -> None:
    if written_with != num_groups:
        raise ValueError(
            f"{what} written with num_groups={written_with}, but num_groups={num_groups} now: pass "
            f"`--num_groups {written_with}` to resume, or choose a new `output_dir` to start afresh."
        )


def rotate_group_checkpoints(group_root: str, save_total_limit: int | None, keep: str | None = None) -> None:
    """Keep the newest `save_total_limit` complete checkpoints (and `keep`, the best one); drop the rest, and the
    incomplete ones older than the newest complete one (an earlier run's, unmarked by `invalidate_checkpoints_after`
    and never rewritten, or cut short by a crash): nothing would resume from them."""
    if not save_total_limit:
        return
    steps = _complete_steps(group_root)
    if steps:
        for step, path in checkpoint_folders(group_root).items():
            # `keep` too: an incomplete "best" is another trajectory's, which `load_best_model_at_end` must not load.
            if step < max(steps) and step not in steps:
                shutil.rmtree(path, ignore_errors=True)
    doomed = sorted(steps)[:-save_total_limit]
    for step in doomed:
        path = steps[step]
        if keep is not None and os.path.abspath(path) == os.path.abspath(keep):
            continue
        shutil.rmtree(path, ignore_errors=True)


def save_file_atomically(tensors: dict, path: str) -> None:
    """`safetensors.torch.save_file`, but a crash mid-write leaves no truncated file under `path`."""
    from safetensors.torch import save_file

    handle, partial = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".partial")
    os.close(handle)
    try:
        save_file(tensors, partial)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def write_run_info(root: str, args, num_groups: int, group_size: int, **extra) -> None:
    """`codistill.json` at the root: G and the codistillation settings, for readers of the output folder."""
    os.makedirs(root, exist_ok=True)
    info = {
        "num_groups": num_groups,
        "group_size": group_size,
        "groups": [os.path.basename(group_dir(root, g)) for g in range(num_groups)],
        **extra,
        **{name: getattr(args, name) for name in ("codistill_alpha", "codistill_loss", "codistill_temperature",
                                                  "codistill_sync_every", "codistill_burn_in_steps",
                                                  "codistill_alpha_warmup_steps", "codistill_peer_dtype",
                                                  "codistill_num_peers")},
    }
    with open(os.path.join(root, RUN_INFO_NAME), "w") as f:
        json.dump(info, f, indent=2)
