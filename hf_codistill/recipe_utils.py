"""What every recipe does the same way: parse arguments, log, resume, score, train and evaluate, publish."""

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

from .checkpointing import checkpoint_folders, get_last_checkpoint, group_dir
from .config import CodistillTrainingArguments
from .metrics import metric_path
from .topology import launched_world_size

logger = logging.getLogger(__name__)


def parse_recipe_args(*dataclass_types):
    """Parse the recipe's dataclasses plus `CodistillTrainingArguments` from flags or one JSON/YAML file."""
    parser = HfArgumentParser((*dataclass_types, CodistillTrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    if len(sys.argv) == 2 and sys.argv[1].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(yaml_file=os.path.abspath(sys.argv[1]))
    return parser.parse_args_into_dataclasses()


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


def build_models(training_args: CodistillTrainingArguments, build):
    """This process's model, `build()` under its group's seed (seed + group, so groups start from different random
    weights unless the model is pre-trained).

    With `--codistill` in a single process (no launcher: a notebook-like run on one device) it returns all
    `num_groups` models, model g built under seed + g, and `CodistillTrainer` trains them side by side in the process.
    """
    if training_args.codistill and launched_world_size() == 1:
        logger.info(f"One process: training all {training_args.num_groups} codistilled models in it.")
        models = []
        for group in range(training_args.num_groups):
            set_seed(training_args.seed + group)
            models.append(build())
        return models
    set_seed(training_args.group_seed)
    return build()


def find_resume_checkpoint(training_args: CodistillTrainingArguments) -> str | None:
    """The checkpoint to resume from: `--resume_from_checkpoint`, else the last complete one in `output_dir`."""
    if training_args.resume_from_checkpoint is not None:
        return training_args.resume_from_checkpoint
    root = training_args.output_dir
    if not training_args.do_train or not os.path.isdir(root):
        return None
    if training_args.codistill:
        step = get_last_checkpoint(root, training_args.num_groups)
        checkpoint = os.path.join(group_dir(root, 0), f"checkpoint-{step}") if step is not None else None
    else:
        # Trainer writes `trainer_state.json` last: a checkpoint without it was cut short, resume from the one before.
        complete = [path for _, path in sorted(checkpoint_folders(root).items())
                    if os.path.isfile(os.path.join(path, TRAINER_STATE_NAME))]
        checkpoint = complete[-1] if complete else None
    if checkpoint is not None:
        logger.info(f"Checkpoint detected, resuming training at {checkpoint}. "
                    "Use a new `--output_dir` to start afresh.")
    return checkpoint


def classification_metrics():
    """`compute_metrics` scoring top-1 accuracy of class logits, with the shipped offline `accuracy` module."""
    accuracy = evaluate.load(metric_path("accuracy"))

    def compute_metrics(prediction):
        return accuracy.compute(predictions=np.argmax(prediction.predictions, axis=-1),
                                references=prediction.label_ids)

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


def train_and_evaluate(trainer, training_args: CodistillTrainingArguments, num_train: int | None,
                       num_eval: int | None, perplexity: bool = False) -> dict[str, float]:
    """Train (resuming if a checkpoint is there), save, evaluate; log and save metrics like transformers' examples.

    Returns the evaluation metrics (empty without `--do_eval`).
    """
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=find_resume_checkpoint(training_args))
        trainer.save_model()
        metrics = {**result.metrics, "train_samples": num_train}
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
    metrics = {}
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = num_eval
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
