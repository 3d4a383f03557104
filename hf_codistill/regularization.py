"""Weight decay that fades during training, to account for the regularisation codistillation already brings.

Sodhani et al. (2021, Sec. 4) found codistilled ResNet-50s over-regularised: with constant weight decay they ended
about 2% top-1 below all-reduce, and matched it once weight decay dropped 10x at the first LR decay and to 0 at the
second (1e-4 -> 1e-5 -> 0), with the LR milestones moved a little later. Two schedules carry that over to
`Trainer`'s LR schedules:

- `step`: `weight_decay` until the first milestone, a tenth of it until the second, then 0. Milestones are fractions
  of the training steps (`codistill_weight_decay_milestones`, default 0.5 and 0.75).
- `follow_lr`: `weight_decay * lr_t / lr_peak` after the warm-up, so it decays with a linear or cosine LR schedule.

Only the parameter groups that Trainer decays (weight_decay > 0: not biases and norms) are changed.
"""

from __future__ import annotations

from transformers import TrainerCallback

WEIGHT_DECAY_SCHEDULES = ("constant", "step", "follow_lr")


def weight_decay_factor(schedule: str, progress: float, milestones: tuple[float, float], lr_ratio: float) -> float:
    """The multiplier of the configured weight decay at `progress` (fraction of training steps done)."""
    if schedule == "step":
        first, second = milestones
        return 1.0 if progress < first else 0.1 if progress < second else 0.0
    if schedule == "follow_lr":
        return lr_ratio
    return 1.0


def parse_milestones(text: str) -> tuple[float, float]:
    """'0.5,0.75' -> (0.5, 0.75); two increasing fractions of training in (0, 1]."""
    try:
        first, second = (float(part) for part in text.split(","))
    except ValueError:
        first = second = float("nan")
    if not 0 < first < second <= 1:
        raise ValueError(
            f"`codistill_weight_decay_milestones` is {text!r}; give two increasing fractions of training in (0, 1] "
            "separated by a comma, e.g. '0.5,0.75' (weight decay / 10 at the first, 0 at the second)."
        )
    return first, second


class WeightDecaySchedule(TrainerCallback):
    """Sets the decayed parameter groups' `weight_decay` before every optimizer step.

    Each group's configured value is kept in the group itself (`base_weight_decay`), so it is saved with the
    optimizer state and a resumed run continues the schedule instead of taking the decayed value as its base.
    """

    def __init__(self, schedule: str, milestones: tuple[float, float]):
        self.schedule = schedule
        self.milestones = milestones
        self.current: float | None = None

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None:
            return
        progress = state.global_step / max(1, state.max_steps)
        warming_up = state.global_step < args.get_warmup_steps(state.max_steps)
        for group in optimizer.param_groups:
            base = group.setdefault("base_weight_decay", group.get("weight_decay", 0.0))
            if base <= 0:
                continue
            # The peak LR: the scheduler's `initial_lr` for LambdaLR schedules, else (`reduce_lr_on_plateau`, which
            # records none and ignores warm-up) the first LR seen; kept with the optimizer state for resumed runs.
            peak = group.setdefault("peak_lr", group.get("initial_lr", group["lr"]))
            lr_ratio = 1.0 if warming_up or peak <= 0 else min(1.0, group["lr"] / peak)
            group["weight_decay"] = base * weight_decay_factor(self.schedule, progress, self.milestones, lr_ratio)
            self.current = group["weight_decay"]
