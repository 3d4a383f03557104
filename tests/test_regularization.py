"""The weight-decay schedule that accounts for codistillation's regularisation (Sodhani et al. 2021, Sec. 4)."""

import pytest
import torch

from hf_codistill import CodistillTrainer, CodistillTrainingArguments
from hf_codistill.regularization import parse_milestones, weight_decay_factor
from tests.scripts.train_digits import digits_dataset, tiny_vit


def test_step_schedule_divides_by_ten_then_stops():
    factors = [weight_decay_factor("step", p, (0.5, 0.75), lr_ratio=0.3) for p in (0.0, 0.49, 0.5, 0.74, 0.75, 1.0)]
    assert factors == [1.0, 1.0, 0.1, 0.1, 0.0, 0.0]
    assert weight_decay_factor("follow_lr", 0.9, (0.5, 0.75), lr_ratio=0.25) == 0.25
    assert weight_decay_factor("constant", 0.9, (0.5, 0.75), lr_ratio=0.25) == 1.0


@pytest.mark.parametrize("text", ["0.75,0.5", "0.5", "a,b", "0,0.5", "0.5,1.5"])
def test_bad_milestones_name_the_argument(text):
    with pytest.raises(ValueError, match="codistill_weight_decay_milestones.*two increasing fractions"):
        parse_milestones(text)


def test_unknown_schedule_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="codistill_weight_decay_schedule.*constant, step, follow_lr"):
        CodistillTrainingArguments(output_dir=str(tmp_path), codistill_weight_decay_schedule="cosine")


def _train(tmp_path, schedule, max_steps=8, resume=False, **extra):
    settings = dict(
        output_dir=str(tmp_path), use_cpu=True, max_steps=max_steps, per_device_train_batch_size=16,
        learning_rate=1e-3, weight_decay=0.1, lr_scheduler_type="linear", warmup_steps=2, logging_steps=1,
        report_to=[], save_strategy="steps", save_steps=5, seed=7, codistill_weight_decay_schedule=schedule,
        codistill_weight_decay_milestones="0.5,0.75",
    )
    args = CodistillTrainingArguments(**{**settings, **extra})
    torch.manual_seed(7)
    train, val = digits_dataset(128)
    trainer = CodistillTrainer(model=tiny_vit(), args=args, train_dataset=train, eval_dataset=val)
    trainer.train(resume_from_checkpoint=resume or None)
    logged = {entry["step"]: entry["weight_decay"] for entry in trainer.state.log_history if "weight_decay" in entry}
    return trainer, logged


def test_step_schedule_is_applied_logged_and_survives_resume(tmp_path):
    trainer, logged = _train(tmp_path / "run", "step")
    # Step s runs with the factor at progress (s - 1) / 8: 1 for steps 1-4, 1/10 for 5-6, 0 for 7-8.
    assert logged == pytest.approx({1: 0.1, 2: 0.1, 3: 0.1, 4: 0.1, 5: 0.01, 6: 0.01, 7: 0.0, 8: 0.0})
    groups = trainer.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0] and [g["base_weight_decay"] for g in groups] == [0.1, 0.0]

    # Resumed from step 5, whose saved optimizer already holds 0.01: the schedule continues from the base value 0.1.
    trainer, resumed = _train(tmp_path / "run", "step", resume=str(tmp_path / "run" / "checkpoint-5"))
    assert {step: value for step, value in resumed.items() if step > 5} == pytest.approx({6: 0.01, 7: 0.0, 8: 0.0})


def test_follow_lr_schedule_tracks_the_learning_rate_after_warmup(tmp_path):
    _, logged = _train(tmp_path, "follow_lr")
    assert logged[1] == logged[2] == pytest.approx(0.1)  # warm-up: full weight decay
    # Linear decay after 2 warm-up steps of 8: step s (from 1) runs at lr = peak x (9 - s) / 6.
    assert [logged[s] for s in range(3, 9)] == pytest.approx([0.1 * (9 - s) / 6 for s in range(3, 9)])


def test_follow_lr_schedule_follows_a_plateau_schedule_too(tmp_path):
    """`reduce_lr_on_plateau` records no `initial_lr`: the LR at the first step stands for the peak."""
    trainer, logged = _train(tmp_path, "follow_lr", lr_scheduler_type="reduce_lr_on_plateau", warmup_steps=0,
                             eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=64,
                             lr_scheduler_kwargs={"patience": 0, "threshold": 1.0}, save_strategy="no")
    rates = {entry["step"]: entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry}
    assert min(rates.values()) < 1e-3  # the plateau schedule did cut the LR
    assert logged == pytest.approx({step: 0.1 * rate / 1e-3 for step, rate in rates.items()})


def test_parameter_distance_can_be_logged_without_codistillation(tmp_path):
    """The all-reduce baseline of a study logs the same over-regularisation diagnostic as codistilled runs."""
    trainer, _ = _train(tmp_path, "constant", codistill_log_param_distance=True)
    distances = [e["param_distance_from_init"] for e in trainer.state.log_history if "param_distance_from_init" in e]
    assert len(distances) == 8 and distances[0] == 0.0  # the first step runs at the warm-up LR of 0
    assert 0 < distances[2] < distances[-1]
    assert distances[-1] == pytest.approx(trainer.parameter_distance_from_init())
    assert (tmp_path / "checkpoint-5" / "codistill_init.safetensors").is_file()
    plain, _ = _train(tmp_path / "default", "constant")
    assert not any("param_distance_from_init" in e for e in plain.state.log_history)
