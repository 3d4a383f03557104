"""Bad input gets an error that names the argument and the fix, before any process group exists."""

import pytest
import torch
import torch.distributed as dist
from transformers import Trainer
from transformers.testing_utils import CaptureLogger

from hf_codistill import CodistillTrainer, CodistillTrainingArguments, config


def make_args(tmp_path, **kwargs):
    return CodistillTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kwargs)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"codistill_loss": "js"}, "`codistill_loss` must be one of kl, ce, mse"),
        ({"codistill_alpha": -0.5}, "`codistill_alpha` must be >= 0"),
        ({"codistill_temperature": 0.0}, "`codistill_temperature` must be > 0"),
        ({"codistill_sync_every": 0}, "`codistill_sync_every` must be >= 1"),
        ({"codistill_burn_in_steps": -1}, "`codistill_burn_in_steps` must be >= 0"),
        ({"codistill_alpha_warmup_steps": -3}, "`codistill_alpha_warmup_steps` must be >= 0"),
        ({"codistill": True, "num_groups": 1}, "`num_groups` must be >= 2"),
        ({"codistill_peer_dtype": "int4"}, "`codistill_peer_dtype` must be one of float32, bfloat16, float16, int8"),
        ({"codistill_peer_dtype": "int8", "codistill_peer_store": "/tmp/store"}, "with `codistill_peer_store` use"),
        ({"codistill_position_fraction": 0.0}, "`codistill_position_fraction` must be in (0, 1]"),
        ({"codistill_position_fraction": 1.5}, "`codistill_position_fraction` must be in (0, 1]"),
        ({"codistill_alpha": float("nan")}, "`codistill_alpha` must be >= 0"),
        ({"codistill_temperature": float("nan")}, "`codistill_temperature` must be > 0"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        make_args(tmp_path, **kwargs)
    assert not dist.is_initialized()


def test_options_that_would_do_nothing_are_named(tmp_path):
    """Forgetting `--codistill` would otherwise train one plain model with the codistillation flags silently unused."""
    with CaptureLogger(config.logger) as captured:
        make_args(tmp_path, codistill_alpha=0.5, codistill_sync_every=10, num_groups=1)
    assert "`codistill_alpha`, `codistill_sync_every` only act on codistilled models" in captured.out
    assert "--codistill" in captured.out and "num_groups" not in captured.out
    with CaptureLogger(config.logger) as captured:
        make_args(tmp_path, codistill_weight_decay_schedule="step")
    assert "`weight_decay` is 0" in captured.out and "--weight_decay" in captured.out
    with CaptureLogger(config.logger) as captured:
        make_args(tmp_path, codistill_weight_decay_schedule="follow_lr", weight_decay=0.1,
                  lr_scheduler_type="constant")
    assert "keeps constant" in captured.out and "'step'" in captured.out
    with CaptureLogger(config.logger) as captured:
        make_args(tmp_path, codistill_weight_decay_schedule="step", weight_decay=0.1,
                  codistill_log_param_distance=True)
    assert captured.out == ""


@pytest.mark.parametrize(
    "dataclass_name,kwargs,message",
    [
        ("TextDataArguments", {"max_train_samples": 0}, "`--max_train_samples` is 0; give a positive number"),
        ("TextDataArguments", {"max_seq_length": 0}, "`--max_seq_length` is 0; give a positive number"),
        ("ImageDataArguments", {"max_eval_samples": -1}, "`--max_eval_samples` is -1; give a positive number"),
    ],
)
def test_bad_recipe_arguments_are_named(dataclass_name, kwargs, message):
    from hf_codistill.recipes import arguments as recipe_args

    with pytest.raises(ValueError, match=message):
        getattr(recipe_args, dataclass_name)(**kwargs)


def test_an_unknown_data_set_names_the_offline_ones():
    from hf_codistill.recipes.arguments import ImageDataArguments, ModelArguments, TextDataArguments
    from hf_codistill.recipes.text import load_text_data

    with pytest.raises(ValueError, match=r"Could not load the data set './no_such_set'.*shakespeare.*--train_file"):
        load_text_data(TextDataArguments(dataset_name="./no_such_set"), ModelArguments(), seed=0)
    from hf_codistill.recipes.images import load_image_data

    with pytest.raises(ValueError, match=r"'./no_such_set'.*digits, fashion_mnist.*--train_dir"):
        load_image_data(ImageDataArguments(dataset_name="./no_such_set"), ModelArguments(), 0, needs_validation=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="decides for machines without a multi-process device")
def test_use_cpu_is_forced_for_launches_only(monkeypatch):
    """`use_cpu` is forced for CPU-only launches (one DDP world, with or without codistillation), not for a
    `WORLD_SIZE` left in the environment without a launcher's `LOCAL_RANK`, where accelerate would then wait for a
    rendezvous that never comes. (The launched case itself runs in `test_alpha_zero_matches_plain_trainer_ddp`.)"""
    from hf_codistill.config import launched_without_devices

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert not launched_without_devices(codistill=False)
    assert launched_without_devices(codistill=True)  # codistillation then names the missing `RANK`
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launched_without_devices(codistill=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not launched_without_devices(codistill=True)


def test_world_size_not_divisible_by_groups(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "6")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"6 launched processes cannot be split into `num_groups=4`.*multiple of 4"):
        make_args(tmp_path, codistill=True, num_groups=4)
    assert not dist.is_initialized()


def test_codistill_without_launcher_says_how_to_launch(tmp_path):
    from tests.scripts.train_digits import tiny_vit

    args = make_args(tmp_path, codistill=True, num_groups=2)
    with pytest.raises(ValueError, match=r"torchrun --nproc_per_node 4.*pass a list of 2 models"):
        CodistillTrainer(model=tiny_vit(), args=args)


def test_world_size_without_rank_says_how_to_launch(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="`RANK` is not.*torchrun"):
        make_args(tmp_path, codistill=True, num_groups=2)
    assert not dist.is_initialized()


def test_models_without_logits_are_named():
    from transformers.modeling_outputs import QuestionAnsweringModelOutput

    from hf_codistill.peer_forward import logits_of

    outputs = QuestionAnsweringModelOutput(start_logits=torch.zeros(1, 3), end_logits=torch.zeros(1, 3))
    expected = r"only \['end_logits', 'start_logits'\].*classification or language-model head"
    with pytest.raises(ValueError, match=expected):
        logits_of(outputs)


def test_codistill_off_is_plain_trainer(tmp_path):
    from tests.scripts.train_digits import tiny_vit

    trainer = CodistillTrainer(model=tiny_vit(), args=make_args(tmp_path))
    assert isinstance(trainer, Trainer) and not trainer.codistilling
    assert (trainer.num_groups, trainer.group_index, trainer.group_rank, trainer.group_size) == (1, 0, 0, 1)


def test_flags_reach_the_command_line():
    from transformers import HfArgumentParser

    parser = HfArgumentParser(CodistillTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "x", "--codistill_loss", "mse", "--codistill_sync_every", "7", "--codistill_alpha", "0.5",
         "--codistill_peer_dtype", "bfloat16"]
    )
    assert (args.codistill_loss, args.codistill_sync_every, args.codistill_alpha) == ("mse", 7, 0.5)
    assert args.peer_torch_dtype is torch.bfloat16
    assert "Optimizer steps between two exchanges" in parser.format_help()


def test_alpha_schedule_burn_in_then_linear_warmup(tmp_path):
    from tests.scripts.train_digits import tiny_vit

    args = make_args(tmp_path, codistill_alpha=0.8, codistill_burn_in_steps=3, codistill_alpha_warmup_steps=4)
    trainer = CodistillTrainer(model=tiny_vit(), args=args)
    alphas = []
    for step in range(9):
        trainer.state.global_step = step
        alphas.append(trainer.current_alpha())
    assert alphas == pytest.approx([0, 0, 0, 0.2, 0.4, 0.6, 0.8, 0.8, 0.8])
