"""What every recipe does the same way: parse arguments, set up logging, find the checkpoint to resume from."""

from __future__ import annotations

import logging
import os
import sys

import datasets
import transformers
from transformers import HfArgumentParser
from transformers.trainer_utils import get_last_checkpoint as get_last_trainer_checkpoint

from .checkpointing import get_last_checkpoint, group_dir
from .config import CodistillTrainingArguments

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
        checkpoint = get_last_trainer_checkpoint(root)
    if checkpoint is not None:
        logger.info(f"Checkpoint detected, resuming training at {checkpoint}. Use a new `--output_dir` to start afresh.")
    return checkpoint
