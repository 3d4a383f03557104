"""What every recipe does the same way: parse arguments and set up logging, build the models, pick the splits,
score, resume, train and evaluate, publish."""

from __future__ import annotations

import logging
import math
import os
import sys

import datasets
import evaluate
import numpy as np
import transformers
from transformers import HfArgumentParser, set_seed
from transformers.trainer import TRAINER_STATE_NAME

from ..checkpointing import checkpoint_folders, get_last_checkpoint, group_dir, last_complete_step
from ..config import CodistillTrainingArguments
from ..metrics import metric_path
from ..topology import launched_world_size
from .data import MINILM_HUB_ID, minilm_path

logger = logging.getLogger(__name__)


def parse_recipe_args(*dataclass_types):
    """Parse the recipe's dataclasses plus `CodistillTrainingArguments` from flags or one JSON/YAML file."""
    parser = HfArgumentParser((*dataclass_types, CodistillTrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    if len(sys.argv) == 2 and sys.argv[1].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(yaml_file=os.path.abspath(sys.argv[1]))
    return parser.parse_args_into_dataclasses()


def start_recipe(*dataclass_types):
    """A recipe's opening: its arguments parsed (`parse_recipe_args`), then logging set up (`setup_logging`).

    Returns an instance of each of `dataclass_types`, then the `CodistillTrainingArguments`.
    """
    *parsed, training_args = parse_recipe_args(*dataclass_types)
    setup_logging(training_args)
    return (*parsed, training_args)


def setup_logging(training_args: CodistillTrainingArguments) -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    logging.getLogger("hf_codistill").setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    group = f"group {training_args.group_index}, " if training_args.codistill else ""
    logger.warning(
        f"Process {group}rank {training_args.process_index}/{training_args.world_size}, device: "
        f"{training_args.device}, bf16: {training_args.bf16}, fp16: {training_args.fp16}"
    )


def default_to_minilm(model_args, what: str) -> str | None:
    """With no model given, start from the built-in pre-trained all-MiniLM-L6-v2 (`what` says how, for the log).

    Returns the name the model card gives as the base model: the Hub model, not this machine's copy of it.
    """
    if model_args.model_name_or_path is not None or model_args.config_name is not None:
        return model_args.model_name_or_path
    model_args.model_name_or_path = str(minilm_path())
    logger.info(f"No model given: {what} all-MiniLM-L6-v2 ({model_args.model_name_or_path})")
    return MINILM_HUB_ID


def build_models(training_args: CodistillTrainingArguments, build, one_base: bool = False):
    """This process's model, `build()` under its group's seed (seed + group, so groups start from different random
    weights unless the model is pre-trained).

    With `--codistill` in a single process (no launcher: a notebook-like run on one device) it returns all
    `num_groups` models, model g built under seed + g, and `CodistillTrainer` trains them side by side in the process;
    with `one_base` (`--use_peft`) one model, whose G adapters `CodistillTrainer` trains as the G students.
    """
    in_one_process = (training_args.codistill and launched_world_size() == 1
                      and not training_args.codistill_peer_store)
    if in_one_process and one_base:
        logger.info(f"One process: training {training_args.num_groups} codistilled adapters of one base model in it.")
    elif in_one_process:
        logger.info(f"One process: training all {training_args.num_groups} codistilled models in it.")
        models = []
        for group in range(training_args.num_groups):
            set_seed(training_args.seed + group)
            models.append(build())
        return models
    set_seed(training_args.group_seed)
    return build()


def select_splits(datasets, data_args, training_args: CodistillTrainingArguments):
    """(train, eval) data sets: the `train` split with `--do_train` and the `validation` split with `--do_eval`
    (else None), each cut to `--max_train_samples` / `--max_eval_samples`."""
    train = truncate(datasets["train"], data_args.max_train_samples) if training_args.do_train else None
    evaluation = truncate(datasets["validation"], data_args.max_eval_samples) if training_args.do_eval else None
    return train, evaluation


def truncate(dataset, max_samples: int | None):
    return dataset if max_samples is None else dataset.select(range(min(max_samples, len(dataset))))


def find_resume_checkpoint(training_args: CodistillTrainingArguments) -> str | None:
    """The checkpoint to resume from: `--resume_from_checkpoint`, else the last complete one in `output_dir`."""
    if training_args.resume_from_checkpoint is not None:
        return training_args.resume_from_checkpoint
    root = training_args.output_dir
    if not training_args.do_train or not os.path.isdir(root):
        return None
    if training_args.codistill:
        # Groups launched apart resume from their own last complete step; one launch, from the last of every group.
        alone = bool(training_args.codistill_peer_store)
        group = training_args.group_index if alone else 0
        step = (last_complete_step(group_dir(root, group)) if alone
                else get_last_checkpoint(root, training_args.num_groups))
        checkpoint = os.path.join(group_dir(root, group), f"checkpoint-{step}") if step is not None else None
    else:
        # Trainer writes `trainer_state.json` last: a checkpoint without it was cut short, resume from the one before.
        complete = [path for _, path in sorted(checkpoint_folders(root).items())
                    if os.path.isfile(os.path.join(path, TRAINER_STATE_NAME))]
        checkpoint = complete[-1] if complete else None
    if checkpoint is not None:
        logger.info(f"Checkpoint detected, resuming training at {checkpoint}. "
                    "Use a new `--output_dir` to start afresh.")
    return checkpoint


def classification_metrics(macro_f1: bool = False):
    """`compute_metrics` scoring top-1 accuracy of class logits, with the shipped offline `accuracy` module; with
    `macro_f1` also the F1 averaged over the classes (`f1`, the shipped `f1` module with `average="macro"`)."""
    accuracy = evaluate.load(metric_path("accuracy"))
    f1 = evaluate.load(metric_path("f1")) if macro_f1 else None

    def compute_metrics(prediction):
        logits = prediction.predictions
        predictions = np.argmax(logits[0] if isinstance(logits, tuple) else logits, axis=-1)
        metrics = accuracy.compute(predictions=predictions, references=prediction.label_ids)
        if f1 is not None:
            metrics.update(f1.compute(predictions=predictions, references=prediction.label_ids, average="macro"))
        return metrics

    return compute_metrics


def token_metrics(causal: bool):
    """`compute_metrics` and `preprocess_logits_for_metrics` for LMs: accuracy of the predicted token at every
    position that carries a label (masked tokens for MLM, the next token for causal LMs).

    Logits are reduced to their argmax on the device, so evaluation never holds vocabulary-sized arrays.
    """
    accuracy = evaluate.load(metric_path("accuracy"))

    def preprocess_logits_for_metrics(logits, labels):
        if isinstance(logits, tuple):
            logits = logits[0]
        return logits.argmax(dim=-1)

    def compute_metrics(prediction):
        predictions, labels = prediction.predictions, prediction.label_ids
        if causal:
            predictions, labels = predictions[:, :-1], labels[:, 1:]
        mask = labels != -100
        return accuracy.compute(predictions=predictions[mask], references=labels[mask])

    return compute_metrics, preprocess_logits_for_metrics


def train_and_evaluate(trainer, training_args: CodistillTrainingArguments, train_dataset=None, eval_dataset=None,
                       perplexity: bool = False) -> dict[str, float]:
    """Train (resuming if a checkpoint is there), save, evaluate; log and save metrics like transformers' examples,
    with the number of examples in `train_dataset` / `eval_dataset` (the trainer's, from `select_splits`).

    Returns the evaluation metrics (empty without `--do_eval`).
    """
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=find_resume_checkpoint(training_args))
        trainer.save_model()
        metrics = {**result.metrics, "train_samples": len(train_dataset or [])}
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
    metrics = {}
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset or [])
        if perplexity:  # of this model, and of each model in the one-process mode (`group_<g>/eval_loss`)
            for key in [key for key in metrics if key == "eval_loss" or key.endswith("/eval_loss")]:
                loss = metrics[key]
                metrics[key[: -len("eval_loss")] + "perplexity"] = math.exp(loss) if loss < 700 else float("inf")
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    return metrics


def publish(trainer, training_args: CodistillTrainingArguments, **card) -> None:
    """Push every group's model to the Hub with its card (`--push_to_hub`), or write the cards locally.

    `CodistillTrainer` tags codistilled cards and adds their codistillation section.
    """
    card = {key: value for key, value in card.items() if value is not None}
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)
